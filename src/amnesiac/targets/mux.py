"""One SSH connection per target for a whole verify run (OpenSSH connection multiplexing).

Every check command is an ssh of its own (testinfra's ssh backend); alone, each pays for a key
exchange, an authentication and a PAM session, about a second under emulation. With a
ControlPath in the run's private work directory, a run's commands to one host share one master
connection: the backend opens it in `reach()` before anything runs on the target (so the
identity read and every pytest-xdist worker find it there and never race to make one), and
closes it when the target's context ends, whatever ended it. Sharing is an optimisation only: a
master that cannot be opened leaves each command to connect by itself, as before.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from amnesiac import ssh
from amnesiac.run import run

log = logging.getLogger(__name__)

OPEN_TIMEOUT = 60.0  # s to connect and log in; past it, no master
CLOSE_TIMEOUT = 5.0  # s for the masters to go once asked to


def sockets(work: Path) -> Path:
    """Where a run's master sockets are: short, as the whole path must fit a Unix socket."""
    return work / "cm"


def control_path(work: Path) -> str | None:
    """The ControlPath of a run (its socket directory made, private: a master's socket runs
    commands on the target for whoever reaches it); None where the work directory's name is too
    long for a Unix socket: then every command connects by itself."""
    path = ssh.control_path(sockets(work))
    if path is not None:
        sockets(work).mkdir(mode=0o700, exist_ok=True)
    return path


@contextlib.contextmanager
def shared(config: Path, url: ssh.SshUrl, work: Path) -> Iterator[None]:
    """Hold a master connection to `url`, made as `config` (the run's ssh_config) says, until the
    context ends; then close every master of the run's directory."""
    if ssh.control_path(sockets(work)) is None:  # too long a name: the config names none either
        yield
        return
    try:
        open_master(config, ["-p", str(url.port or 22), url.destination])
        yield
    finally:
        close(work)


def open_master(config: Path, destination: Sequence[str]) -> bool:
    """Open the master; whether it is there. The config's ControlPersist sends it to the
    background once logged in, so this returns then, and it outlives this ssh."""
    ssh_f = ["ssh", "-F", os.fspath(config)]
    # One there already (its socket taken): a second would stay in the foreground, unshared.
    if run([*ssh_f, "-O", "check", *destination], capture=True, check=False).returncode == 0:
        return True
    argv = [*ssh_f, "-o", "ControlMaster=yes", "-N", *destination]
    try:
        result = run(argv, capture=True, check=False, timeout=OPEN_TIMEOUT)
    except subprocess.TimeoutExpired:
        log.info("no shared ssh connection: no login in %.0f s", OPEN_TIMEOUT)
        return False
    if result.returncode != 0:  # the identity read after this says why, as it always has
        why = result.stderr.decode(errors="replace").strip().splitlines()[-1:]
        log.info("no shared ssh connection (exit %d): %s", result.returncode, " ".join(why))
        return False
    return True


def hang_up(config: Path, url: ssh.SshUrl) -> None:
    """End the master to `url` (if there is one): before its host resets, after which its
    connection would be dead and the next command would wait on it. The next command opens a
    new one (the config's ControlMaster is auto)."""
    argv = ["ssh", "-F", os.fspath(config), "-O", "exit", "-p", str(url.port or 22), url.destination]
    with contextlib.suppress(subprocess.TimeoutExpired):
        run(argv, capture=True, check=False, timeout=CLOSE_TIMEOUT)


def close(work: Path) -> None:
    """Ask every master of the run's directory to exit, and wait until they are gone."""
    found = live(work)
    for socket in found:
        # The socket alone names its master: no config, and a loopback name ssh never dials.
        escaped = os.fspath(socket).replace("%", "%%")  # ControlPath expands %-tokens
        argv = ["ssh", "-F", "/dev/null", "-o", f"ControlPath={escaped}", "-O", "exit", "127.0.0.1"]
        with contextlib.suppress(subprocess.TimeoutExpired):
            run(argv, capture=True, check=False, timeout=CLOSE_TIMEOUT)
    deadline = time.monotonic() + CLOSE_TIMEOUT
    while found and time.monotonic() < deadline:
        time.sleep(0.05)
        found = live(work)  # a master removes its socket as it exits
    if found:
        log.warning("ssh masters still open: %s", ", ".join(map(os.fspath, found)))


def live(work: Path) -> list[Path]:
    """The master sockets of the run's directory."""
    try:
        entries = list(sockets(work).iterdir())
    except FileNotFoundError:
        return []
    return sorted(e for e in entries if _is_socket(e))


def _is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(path.lstat().st_mode)
    except FileNotFoundError:  # its master just went
        return False
