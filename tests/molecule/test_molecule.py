"""The molecule tier: every scenario's `molecule test`, and that it leaves nothing behind.

Each scenario runs as a developer runs it (molecule/run), in a subprocess with the environment
`amnesiac container-image --env` gives, its state under build/molecule and HOME pointed at an
empty directory, which must stay empty. Afterwards no container of the scenario and no new
volume may exist, whether the scenario passed or failed. A control switched off must fail its
check: the molecule verifier is the same claim check the product runs, and it can fail.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from amnesiac import container
from tests.images import BUILD_LANE, NICE
from tests.molecule import scenarios

# In `make test` the scenarios run on the build lane once its images are built (tests/images.py):
# that lane idles while the guest lane boots, and a scenario is about one CPU's work.
pytestmark = [pytest.mark.molecule, BUILD_LANE]

BIN = Path(sys.executable).parent
TIMEOUT = 900  # seconds for one `molecule test`; the longest (default, the whole image) takes 3 min


@pytest.fixture(scope="session")
def base_image(needs_root: None) -> container.BaseImage:
    return container.ensure(container.spec(), container.state_dir())


@pytest.fixture
def podman_state() -> set[str]:
    """The volumes that exist before the test (a run must add none)."""
    return set(_podman_names("volume", "ls", "--format", "{{.Name}}"))


def _podman_names(*cmd: str) -> list[str]:
    result = subprocess.run(
        ["podman", *cmd],
        env=container.podman_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.split()


def molecule_test(
    scenario: str, image: container.BaseImage, home: Path, *ansible_args: str, suffix: str = ""
) -> tuple[int, str, list[dict[str, Any]] | None]:
    """`molecule test -s SCENARIO`: its exit code, the tail of its output, the check results.

    With a `suffix`, a run separate from the scenario's own (instance, state, results), so that
    both can run at once (pytest-xdist). The output is kept in build/molecule/logs/.
    """
    results = container.state_dir() / "results" / f"{scenario}{suffix}.json"
    results.unlink(missing_ok=True)
    log = container.state_dir() / "logs" / f"{scenario}{suffix}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    home.mkdir()
    env = {
        **os.environ,
        **container.molecule_env(image, scenario, suffix=suffix),
        "HOME": os.fspath(home),
        "NO_COLOR": "1",
        "PY_COLORS": "0",
        "ANSIBLE_NOCOLOR": "1",
    }
    extra = ["--", *ansible_args] if ansible_args else []
    cmd = [*NICE, BIN / "molecule", "test", "-s", scenario, *extra]  # niced like the builds
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=scenarios.REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = proc.wait(timeout=TIMEOUT)
        except BaseException:  # a timeout or Ctrl-C: stop molecule, then still destroy
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
            subprocess.run(
                [BIN / "molecule", "destroy", "-s", scenario], cwd=scenarios.REPO, env=env, check=False
            )
            raise
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-60:])
    records = json.loads(results.read_text()) if results.exists() else None
    return code, f"{log}:\n{tail}", records


def assert_left_nothing(run: str, volumes_before: set[str], home: Path) -> None:
    """No container of the run (scenario and suffix), no new volume, nothing in the home directory."""
    instance = container.INSTANCE_PREFIX + run
    assert instance not in _podman_names("ps", "--all", "--format", "{{.Names}}"), f"{instance} left behind"
    new_volumes = set(_podman_names("volume", "ls", "--format", "{{.Name}}")) - volumes_before
    assert new_volumes == set(), f"volumes left behind: {new_volumes}"
    written = sorted(os.fspath(p.relative_to(home)) for p in home.rglob("*"))
    assert written == [], f"molecule wrote to the home directory: {written}"


@pytest.mark.parametrize("scenario", scenarios.names())
def test_scenario(
    scenario: str, base_image: container.BaseImage, podman_state: set[str], tmp_path: Path
) -> None:
    code, output, records = molecule_test(scenario, base_image, tmp_path / "home")
    assert_left_nothing(scenario, podman_state, tmp_path / "home")
    assert code == 0, output
    wanted = scenarios.check_ids(scenario)
    assert records is not None, output
    outcomes = {r["id"]: r for r in records}
    assert sorted(outcomes) == sorted(wanted), "every named check reports exactly once"
    for check_id, record in outcomes.items():
        assert record["outcome"] in ("passed", "not-applicable"), (check_id, record["reason"])
        if record["outcome"] == "not-applicable":
            # Only kernel and hardware checks, and they say why.
            assert record["reason"].startswith("runs on booted targets"), (check_id, record["reason"])
        else:
            assert record["evidence"], check_id


def test_a_control_off_fails_its_check(
    base_image: container.BaseImage, podman_state: set[str], tmp_path: Path
) -> None:
    """journald keeping messages in RAM (no_logs_journald_storage=volatile): the scenario fails."""
    code, output, records = molecule_test(
        "no_logs",
        base_image,
        tmp_path / "home",
        "--extra-vars",
        "no_logs_journald_storage=volatile",
        suffix="-journald-volatile",
    )
    assert_left_nothing("no_logs-journald-volatile", podman_state, tmp_path / "home")
    assert code != 0, output
    assert records is not None, output
    outcomes = {r["id"]: r["outcome"] for r in records}
    assert outcomes["logging.journald_stores_nothing"] == "failed", outcomes
    assert outcomes["logging.no_syslog_daemon"] == "passed", outcomes
