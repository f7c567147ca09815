"""The pytest plugin behind `amnesiac verify`: collect the checks, apply target kinds, record.

Loaded with `-p amnesiac.checks.plugin`. It collects only functions marked with `@check`,
keeps those the policy selects (`--amnesiac-checks`), reports a check that cannot run on this
kind of target as not applicable (never as passed), and writes every outcome with its evidence
to `--amnesiac-results` as JSON.
"""

from __future__ import annotations

import inspect
from collections.abc import Generator
from pathlib import Path
from typing import Any, cast

import pytest

from amnesiac.checks.expectations import Expectations
from amnesiac.checks.meta import CheckMeta, Surface, meta_of
from amnesiac.checks.probe import Probe
from amnesiac.checks.results import CheckOutcome, CheckRecord, title_of, write_records

NOT_APPLICABLE = "not applicable: "
_RESULTS = pytest.StashKey[list[dict[str, Any]]]()
_PROPERTY = "amnesiac-result"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("amnesiac", "amnesiac claim checks")
    group.addoption(
        "--amnesiac-target-kind",
        choices=[k.value for k in Surface],
        default=Surface.BOOTED.value,
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
    # A check that resets the target goes last: nothing else may run on a machine booting again.
    # (One target runs in one process; several are ssh: hosts, which no such check runs on.)
    items[:] = sorted(keep, key=lambda item: bool((meta := _meta(item)) and meta.resets))


def target_kind(config: pytest.Config) -> Surface:
    return Surface(config.getoption("amnesiac_target_kind"))


def pytest_runtest_setup(item: pytest.Item) -> None:
    meta = _meta(item)
    if meta is not None and (reason := meta.reason_not_applicable(target_kind(item.config))):
        pytest.skip(NOT_APPLICABLE + reason)


@pytest.fixture
def probe(host: Any) -> Probe:
    """Runs commands on the target and keeps them as the check's evidence."""
    return Probe(host)


@pytest.fixture(scope="session")
def expected(request: pytest.FixtureRequest) -> Expectations:
    """What the target should be, from the policy and the build's manifest (see verify)."""
    path = request.config.getoption("amnesiac_expect")
    return Expectations.read(Path(path)) if path else Expectations()


@pytest.fixture(scope="session")
def kind(request: pytest.FixtureRequest) -> Surface:
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
    """One result per check and host, from the phase that decided it (as JSON-ready data: under
    pytest-xdist it travels to the controller inside the report)."""
    probe = getattr(item, "funcargs", {}).get("probe")
    evidence = list(probe.evidence) if isinstance(probe, Probe) else []
    reason: str | None = None
    if report.when == "setup" and report.passed:
        return None
    if report.when == "teardown" and not report.failed:
        return None
    if report.skipped:
        outcome = CheckOutcome.NOT_APPLICABLE
        reason = _skip_reason(report).removeprefix(NOT_APPLICABLE) or "skipped without a reason"
    elif report.when == "call" and report.passed:
        outcome = CheckOutcome.PASSED
        if not evidence:
            outcome, reason = CheckOutcome.ERROR, "the check recorded no evidence; silence is not a pass"
    elif report.when == "call" and call.excinfo is not None and call.excinfo.errisinstance(AssertionError):
        outcome = CheckOutcome.FAILED
        reason = _failure(call)
    else:  # an exception that is not an assertion: the check could not look, so it proves nothing
        outcome = CheckOutcome.ERROR
        reason = f"{report.when}: {call.excinfo.typename if call.excinfo else 'error'}: {_failure(call)}"
    params = getattr(item, "callspec", None)
    record = CheckRecord(
        id=meta.id,
        title=title_of(meta.id),
        host=params.id if params is not None else "",
        claims=list(meta.claims),
        rationale=meta.rationale,
        outcome=outcome,
        reason=reason,
        duration_s=max(0.0, round(report.duration, 3)),
        evidence=evidence,
    )
    return record.model_dump(mode="json")


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
    return text.strip() or call.excinfo.typename


def pytest_sessionfinish(session: pytest.Session) -> None:
    path = session.config.getoption("amnesiac_results")
    if not path or _is_worker(session.config):
        return
    records = [CheckRecord.model_validate(r) for r in session.config.stash[_RESULTS]]
    write_records(records, Path(path))
