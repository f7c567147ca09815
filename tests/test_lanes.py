"""`make test` runs its slow tiers in two lanes (tests/images.py): `--dist loadgroup` sends every
test of an `xdist_group` to one worker, so a boot module's machine is booted once and one guest
runs at a time. pytest-xdist tags grouped tests through their node ids; when a pytest release
changes how node ids are kept, the grouping stops without an error (pytest-xdist #1386, pytest
9.2). This runs the same scheduling on two small modules and fails if a group was split."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

MODULE = """
import os
import pytest

pytestmark = pytest.mark.xdist_group("{group}")


@pytest.fixture(scope="module")
def machine():
    with open("setups.log", "a") as log:
        log.write("{name} " + os.environ["PYTEST_XDIST_WORKER"] + "\\n")
    yield


@pytest.mark.parametrize("i", range(4))
def test_uses_the_machine(machine, i):
    pass
"""


def test_a_group_runs_on_one_worker_and_its_module_fixture_is_made_once(tmp_path: Path) -> None:
    for name, group in (("a", "guest"), ("b", "guest"), ("c", "build")):
        (tmp_path / f"test_{name}.py").write_text(MODULE.format(group=group, name=name))
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    run = [sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadgroup", "-p", "no:cacheprovider"]
    result = subprocess.run(run, cwd=tmp_path, capture_output=True, text=True, check=False, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    setups = sorted((tmp_path / "setups.log").read_text().split("\n")[:-1])
    modules = [line.split()[0] for line in setups]
    assert modules == ["a", "b", "c"], f"a module's fixture was made more than once: {setups}"
    workers = {line.split()[0]: line.split()[1] for line in setups}
    assert workers["a"] == workers["b"], f"the guest group was split across workers: {setups}"
