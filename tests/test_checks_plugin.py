"""The check plugin: how outcomes become results. Silence and wrong targets are never passes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

CHECKS = """
from amnesiac.checks.meta import KERNEL, check
from amnesiac.checks.plugin import not_applicable


@check(claims=["c-pass"], rationale="passes with evidence")
def passes(probe):
    assert probe.run("echo %s", "hello world").stdout == "hello world\\n"


@check(claims=["c-silent"], rationale="passes without looking at anything")
def silent(probe):
    pass


@check(claims=["c-fail"], rationale="fails")
def fails(probe):
    result = probe.run("echo found-a-log; exit 3")
    assert result.rc == 0, "the probe found a log"


@check(claims=["c-kernel"], rationale="needs a kernel", targets=KERNEL, not_applicable="no kernel of its own")
def kernel_only(probe):
    probe.run("true")


@check(claims=["c-na"], rationale="decides at run time")
def decides(probe):
    probe.run("true")
    not_applicable("nothing to look at here")


@check(claims=["c-broken"], rationale="cannot look")
def broken(probe):
    probe.run("true")
    raise RuntimeError("lost the connection")


def helper_not_a_check(probe):
    raise AssertionError("never collected")
"""


def run_checks(tmp_path: Path, *extra: str) -> tuple[int, dict[str, dict[str, object]]]:
    module = tmp_path / "sample.py"
    module.write_text(CHECKS)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    results = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-c", str(tmp_path / "pytest.ini"), "-p", "amnesiac.checks.plugin",
         "--hosts=local://", "--amnesiac-target-kind=container", f"--amnesiac-results={results}",
         str(module), "-q", *extra],
        capture_output=True, text=True, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert results.exists(), proc.stdout + proc.stderr
    return proc.returncode, {r["id"]: r for r in json.loads(results.read_text())}


def test_outcomes(tmp_path: Path) -> None:
    rc, results = run_checks(tmp_path)
    assert rc == 1
    assert set(results) == {
        "sample.passes",
        "sample.silent",
        "sample.fails",
        "sample.kernel_only",
        "sample.decides",
        "sample.broken",
    }
    assert results["sample.broken"]["outcome"] == "error"  # not a failure of the claim: no proof at all
    assert "RuntimeError: lost the connection" in str(results["sample.broken"]["reason"])
    assert results["sample.passes"]["outcome"] == "passed"
    assert results["sample.passes"]["claims"] == ["c-pass"]
    evidence = results["sample.passes"]["evidence"]
    assert evidence[0]["command"] == "echo 'hello world'" and evidence[0]["exit_code"] == 0
    assert results["sample.silent"]["outcome"] == "error"
    assert "silence is not a pass" in str(results["sample.silent"]["reason"])
    assert results["sample.fails"]["outcome"] == "failed"
    assert "the probe found a log" in str(results["sample.fails"]["reason"])
    assert results["sample.fails"]["evidence"][0]["exit_code"] == 3
    assert results["sample.kernel_only"]["outcome"] == "not-applicable"
    assert "not on a container: no kernel of its own" in str(results["sample.kernel_only"]["reason"])
    assert results["sample.decides"]["outcome"] == "not-applicable"
    assert results["sample.decides"]["reason"] == "nothing to look at here"


def test_selection_by_id(tmp_path: Path) -> None:
    rc, results = run_checks(tmp_path, "--amnesiac-checks=sample.passes,sample.kernel_only")
    assert rc == 0
    assert set(results) == {"sample.passes", "sample.kernel_only"}


def test_a_check_must_say_why_it_cannot_run_everywhere() -> None:
    from amnesiac.checks.meta import KERNEL, check

    with pytest.raises(ValueError, match="must say why"):
        check(claims=["x"], rationale="r", targets=KERNEL)(lambda: None)
    with pytest.raises(ValueError, match="names no claim"):
        check(claims=[], rationale="r")(lambda: None)
