"""A command on a booted guest over SSH, as the boot tests run it: its output, or an assertion
that says what the guest's console said last."""

from __future__ import annotations

import subprocess
from pathlib import Path

from amnesiac import boot


def ssh(machine: boot.BootedMachine, key: Path, command: str) -> str:
    result = subprocess.run(
        [
            "ssh", "-i", str(key), "-p", str(machine.ssh_port),
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "BatchMode=yes", "-o", "ConnectTimeout=30", "-o", "LogLevel=ERROR",
            "root@127.0.0.1", command,
        ],
        capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert result.returncode == 0, f"ssh {command!r}: {result.stderr}\nconsole:\n{machine.console(20)}"
    return result.stdout
