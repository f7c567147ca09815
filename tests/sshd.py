"""An sshd of the test's own on 127.0.0.1 (a free port), for the tests that need a real SSH
server: flash to ssh:// PXE roots, verify's shared connection. Debian's openssh-server is
installed with its service blocked (Makefile); this daemon runs only while its test does."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SSHD = shutil.which("sshd") or ("/usr/sbin/sshd" if Path("/usr/sbin/sshd").exists() else None)
WAIT = 30.0  # an upper bound on waiting for sshd to listen or stop, never a measurement


@dataclass(frozen=True)
class Sshd:
    port: int
    host_key: Path  # its public half is host_key.pub
    log: Path


def keygen(path: Path, comment: str = "") -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", path], check=True)
    return path


@contextlib.contextmanager
def loopback_sshd(base: Path, authorized: Path, *, log_level: str = "ERROR") -> Iterator[Sshd]:
    """sshd on 127.0.0.1 letting the keys of `authorized` in as root (no PAM, no passwords,
    sftp for scp), logging to base/sshd.log; stopped when the context ends."""
    if SSHD is None or os.geteuid() != 0:
        pytest.skip("needs root and sshd (apt-get install openssh-server)")
    host_key = keygen(base / "host_key", "host")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = base / "sshd.log"
    config = base / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {host_key}\nPidFile {base}/sshd.pid\n"
        f"AuthorizedKeysFile {authorized}\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        f"StrictModes no\nUsePAM no\nSubsystem sftp internal-sftp\nLogLevel {log_level}\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)  # privilege separation directory
    proc = subprocess.Popen([SSHD, "-D", "-E", str(log), "-f", str(config)])
    try:
        deadline = time.monotonic() + WAIT
        while True:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert proc.poll() is None, log.read_text() if log.exists() else "sshd stopped"
            assert time.monotonic() < deadline, "sshd never listened"
            time.sleep(0.1)
        yield Sshd(port, host_key, log)
    finally:
        proc.terminate()
        proc.wait(timeout=WAIT)
