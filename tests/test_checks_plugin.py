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


@check(claims=["c-missing"], rationale="an attempt that must fail, made with a program the target lacks")
def missing_program(probe):
    attempt = probe.run("amnesiac-no-such-program --write /var/log/x 2>&1")
    assert attempt.rc != 0, "the write succeeded"


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
        "sample.missing_program",
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
    # A refused attempt proves nothing when the attempt never ran (exit 127): an error.
    missing = results["sample.missing_program"]
    assert missing["outcome"] == "error", missing
    assert "a program is missing on the target" in str(missing["reason"])
    assert missing["evidence"][0]["exit_code"] == 127


@pytest.mark.parametrize("exit_code", [125, 126, 127])
def test_a_command_that_did_not_run_is_an_error(exit_code: int) -> None:
    from amnesiac.checks.probe import Probe, TargetError

    class Result:  # the fields of testinfra's CommandResult that Probe reads
        rc, stdout, stderr = exit_code, "", "Error: no such container x"

    class Host:
        def run(self, command: str) -> Result:
            return Result()

    probe = Probe(Host())
    with pytest.raises(TargetError, match=r"did not run.*no such container"):
        probe.run("find /var/log -type f")
    assert probe.evidence[0].exit_code == exit_code  # still shown to the reviewer


def test_checks_against_a_missing_container_are_errors(tmp_path: Path) -> None:
    """podman exec into a container that does not exist exits 125: nothing may pass."""
    import shutil

    if shutil.which("podman") is None:
        pytest.skip("podman is not installed")
    from amnesiac import container

    module = tmp_path / "sample.py"
    module.write_text(CHECKS)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    results = tmp_path / "results.json"
    subprocess.run(
        [sys.executable, "-m", "pytest", "-c", str(tmp_path / "pytest.ini"), "-p", "amnesiac.checks.plugin",
         "--hosts=podman://amnesiac-no-such-container", "--amnesiac-target-kind=container",
         f"--amnesiac-results={results}",
         "--amnesiac-checks=sample.passes,sample.fails,sample.missing_program",
         str(module), "-q"],
        capture_output=True, text=True, check=False, cwd=tmp_path, env=container.podman_env(),
    )  # fmt: skip
    outcomes = {r["id"]: r["outcome"] for r in json.loads(results.read_text())}
    assert outcomes == dict.fromkeys(("sample.passes", "sample.fails", "sample.missing_program"), "error")


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


def test_a_check_that_resets_the_target_runs_after_every_other(tmp_path: Path) -> None:
    """Nothing may run on a machine that is booting again: however it is declared, it runs last."""
    order = tmp_path / "order"
    (tmp_path / "ordered.py").write_text(
        "from amnesiac.checks.meta import check\n"
        + "".join(
            f"\n\n@check(claims=['c'], rationale='r', resets={name == 'resets'})\n"
            f"def {name}(probe):\n    probe.run('echo {name} >> {order}')\n"
            for name in ("resets", "first", "second")
        )
    )
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    subprocess.run(
        [sys.executable, "-m", "pytest", "-c", str(tmp_path / "pytest.ini"), "-p", "amnesiac.checks.plugin",
         "--hosts=local://", "--amnesiac-target-kind=container", f"--amnesiac-results={tmp_path / 'r.json'}",
         "--amnesiac-checks=ordered.resets,ordered.first,ordered.second", str(tmp_path / "ordered.py"), "-q"],
        capture_output=True, text=True, check=True, cwd=tmp_path,
    )  # fmt: skip
    assert order.read_text().split() == ["first", "second", "resets"]
