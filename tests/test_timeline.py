"""`--timeline` (tests/timeline.py), as `make test` uses it: every test's worker, start and end
in the file, and each lane's tests printed in order with the CPU used."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.test_lanes import MODULE

REPO = Path(__file__).resolve().parent.parent


def test_each_lane_is_printed_in_order_with_the_cpu_used(tmp_path: Path) -> None:
    for name, group in (("a", "guest"), ("b", "build")):
        slow = MODULE.replace("    pass\n", "    import time; time.sleep(1)\n")
        (tmp_path / f"test_{name}.py").write_text(slow.format(group=group, name=name))
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    timeline = tmp_path / "out" / "timeline.jsonl"
    run = [sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadgroup", "-p", "no:cacheprovider",
           "-p", "tests.timeline", f"--timeline={timeline}"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # the plugin, as `-p tests.timeline`
    result = subprocess.run(
        run, cwd=tmp_path, env=env, capture_output=True, text=True, check=False, timeout=120
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    lines = [json.loads(line) for line in timeline.read_text().splitlines()]
    assert len(lines) == 8 and {line["worker"] for line in lines} == {"gw0", "gw1"}
    assert all(line["end"] - line["start"] >= 1 for line in lines)
    out = result.stdout
    assert "timeline (s from the session's start)" in out and "% of " in out and "CPUs over the run" in out
    for worker in ("gw0", "gw1"):
        assert f"{worker}: 4 tests" in out, out
    printed = [line.split()[-1] for line in out.splitlines() if "::test_uses_the_machine" in line]
    assert sorted(printed) == sorted(line["test"] for line in lines)
