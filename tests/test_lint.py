"""Linters run from the test suite, so CI enforces them (ruff, mypy, yamllint, ansible-lint)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def run(*cmd: str) -> None:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "NO_COLOR": "1"}
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False, env=env)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout[-4000:]}\n{result.stderr[-2000:]}"


def test_ruff_check() -> None:
    run("ruff", "check", "src", "tests", "benchmarks", "molecule", "playbooks")


def test_ruff_format() -> None:
    run("ruff", "format", "--check", "src", "tests", "benchmarks", "molecule", "playbooks")


def test_mypy_strict() -> None:
    run("mypy")


# Every YAML tree the project ships.
YAML_TREES = ("roles", "playbooks", "policies", "molecule", ".yamllint", ".ansible-lint")


def test_yamllint() -> None:
    trees = [t for t in YAML_TREES if (REPO / t).exists()]
    assert {"roles", "playbooks", "policies", "molecule"} <= set(trees), "a YAML tree went missing"
    run("yamllint", "--strict", "-c", ".yamllint", *trees)


@pytest.mark.skipif(not (REPO / "roles").is_dir(), reason="no roles")
def test_ansible_lint_production() -> None:
    # Offline: the collections come from the `ansible` package; Galaxy is unreachable.
    run("ansible-lint", "--offline", "-q", "roles", "playbooks", "molecule")
