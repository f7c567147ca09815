"""logging.no_syslog_daemon's negative for multi-call binaries: no image carries busybox any more
(it is purged when the root is made), so the target without the control is this machine, which
has busybox-static (`make setup` installs it for the QEMU harness's relay)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from amnesiac.verify import CHECKS_DIR


def test_a_root_with_busybox_fails_no_syslog_daemon(tmp_path: Path) -> None:
    assert shutil.which("busybox"), "make setup installs busybox-static"
    results = tmp_path / "results.json"
    subprocess.run(
        [sys.executable, "-m", "pytest", "-c", str(CHECKS_DIR / "pytest.ini"), "--rootdir", str(CHECKS_DIR),
         "-p", "amnesiac.checks.plugin", "-p", "no:cacheprovider", "--hosts=local://",
         "--amnesiac-target-kind=container", "--amnesiac-checks=logging.no_syslog_daemon",
         f"--amnesiac-results={results}", "-q", str(CHECKS_DIR / "logging.py")],
        capture_output=True, text=True, check=False, cwd=tmp_path,
    )  # fmt: skip
    (record,) = json.loads(results.read_text())
    assert record["outcome"] == "failed", record
    assert "busybox-static" in str(record["reason"]), record["reason"]
