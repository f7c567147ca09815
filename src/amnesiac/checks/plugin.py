"""The pytest plugin behind `amnesiac verify`: collect the checks, apply target kinds, record.

Loaded with `-p amnesiac.checks.plugin`. It collects only functions marked with `@check`,
keeps those the policy selects (`--amnesiac-checks`), reports a check that cannot run on this
kind of target as not applicable (never as passed), and writes every outcome with its evidence
to `--amnesiac-results` as JSON.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from amnesiac.checks.meta import CheckMeta, TargetKind, meta_of
from amnesiac.checks.probe import Probe, bounded

NOT_APPLICABLE = "not applicable: "
_RESULTS = pytest.StashKey[list[dict[str, Any]]]()
_PROPERTY = "amnesiac-result"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("amnesiac", "amnesiac claim checks")
    group.addoption(
        "--amnesiac-target-kind",
        choices=[k.value for k in TargetKind],
        default=TargetKind.BOOTED.value,
        help="what the target is: rootfs, container or booted (default: booted)",
    )
    group.addoption("--amnesiac-checks", default=None, help="comma-separated check ids to run (default: all)")
    group.addoption("--amnesiac-results", default=None, help="write outcomes and evidence to this JSON file")
    group.addoption(
        "--amnesiac-expect", default=None, help="JSON file: what the target should be (tmpfs size, hashes)"
    )


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_RESULTS] = []
    if not _is_worker(config):
        config.pluginmanager.register(_Collector(config.stash[_RESULTS]), "amnesiac-results")


def _is_worker(config: pytest.Config) -> bool:
    """A pytest-xdist worker: its reports go to the controller, which records them."""
    return hasattr(config, "workerinput")


def pytest_pycollect_makeitem(collector: pytest.Collector, name: str, obj: object) -> Any:
    if inspect.isfunction(obj) and meta_of(obj) is not None:
        # The same path pytest takes for test_* functions, so testinfra can parametrize `host`.
        return list(collector._genfunctions(name, obj))  # type: ignore[attr-defined]
    return None


def _meta(item: pytest.Item) -> CheckMeta | None:
    return meta_of(getattr(item, "obj", None))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    wanted = config.getoption("amnesiac_checks")
    if not wanted:
        return
    ids = {w.strip() for w in wanted.split(",") if w.strip()}
    keep: list[pytest.Item] = []
    drop: list[pytest.Item] = []
    for item in items:
        meta = _meta(item)
        (keep if meta is not None and meta.id in ids else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep


def target_kind(config: pytest.Config) -> TargetKind:
    return TargetKind(config.getoption("amnesiac_target_kind"))


def pytest_runtest_setup(item: pytest.Item) -> None:
    meta = _meta(item)
    if meta is not None and (reason := meta.reason_not_applicable(target_kind(item.config))):
        pytest.skip(NOT_APPLICABLE + reason)


@pytest.fixture
def probe(host: Any) -> Probe:
    """Runs commands on the target and keeps them as the check's evidence."""
    return Probe(host)


@pytest.fixture(scope="session")
def expected(request: pytest.FixtureRequest) -> dict[str, Any]:
    """What the target should be, from the policy and the build's manifest (see verify)."""
    path = request.config.getoption("amnesiac_expect")
    data: dict[str, Any] = json.loads(Path(path).read_text()) if path else {}
    return data


@pytest.fixture(scope="session")
def kind(request: pytest.FixtureRequest) -> TargetKind:
    return target_kind(request.config)


def not_applicable(reason: str) -> None:
    """Inside a check: this target cannot show the claim (say why); never a pass."""
    pytest.skip(NOT_APPLICABLE + reason)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    meta = _meta(item)
    if meta is None:
        return
    record = _record(item, meta, report, call)
    if record is not None:
        # On the report, not in this process: under pytest-xdist the report travels to the
        # controller, which alone writes the results file (see pytest_runtest_logreport).
        report.user_properties.append((_PROPERTY, record))


class _Collector:
    """Gathers the records from the reports in the process that writes the results file."""

    def __init__(self, results: list[dict[str, Any]]) -> None:
        self.results = results

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.results.extend(
            cast(dict[str, Any], v) for name, v in report.user_properties if name == _PROPERTY
        )


def _record(
    item: pytest.Item, meta: CheckMeta, report: pytest.TestReport, call: pytest.CallInfo[None]
) -> dict[str, Any] | None:
    """One result per check and host: from the phase that decided it."""
    probe = getattr(item, "funcargs", {}).get("probe")
    evidence = probe.as_data() if isinstance(probe, Probe) else []
    reason: str | None = None
    if report.when == "setup" and report.passed:
        return None
    if report.when == "teardown" and not report.failed:
        return None
    if report.skipped:
        outcome = "not-applicable"
        reason = _skip_reason(report).removeprefix(NOT_APPLICABLE)
    elif report.when == "call" and report.passed:
        outcome = "passed"
        if not evidence:
            outcome, reason = "error", "the check recorded no evidence; silence is not a pass"
    elif report.when == "call" and call.excinfo is not None and call.excinfo.errisinstance(AssertionError):
        outcome = "failed"
        reason = _failure(call)
    else:  # an exception that is not an assertion: the check could not look, so it proves nothing
        outcome = "error"
        reason = f"{report.when}: {call.excinfo.typename if call.excinfo else 'error'}: {_failure(call)}"
    params = getattr(item, "callspec", None)
    return {
        "id": meta.id,
        "host": params.id if params is not None else "",
        "claims": list(meta.claims),
        "rationale": meta.rationale,
        "outcome": outcome,
        "reason": reason,
        "duration_s": round(report.duration, 3),
        "evidence": evidence,
    }


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _failure(call: pytest.CallInfo[None]) -> str:
    if call.excinfo is None:
        return "failed"
    text = str(call.excinfo.value) or call.excinfo.typename
    if isinstance(call.excinfo.value, AssertionError):
        # pytest appends its own explanation ("assert ... where ..."): the check's message is
        # what a reviewer reads; the evidence carries the rest.
        text = text.split("\nassert ", 1)[0]
    return bounded(text.strip(), 1500)


def pytest_sessionfinish(session: pytest.Session) -> None:
    path = session.config.getoption("amnesiac_results")
    if not path or _is_worker(session.config):
        return
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}")
    tmp.write_text(json.dumps(session.config.stash[_RESULTS], indent=2) + "\n")
    tmp.replace(target)


def iter_results(path: Path) -> Iterator[dict[str, Any]]:
    yield from json.loads(path.read_text())
