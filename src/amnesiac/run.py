"""Every subprocess goes through here: logged, checked, and killed with its group on the way out."""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from amnesiac.errors import BuildError, UsageError

log = logging.getLogger("amnesiac.run")

Arg = str | os.PathLike[str]


def argv(cmd: Sequence[Arg]) -> list[str]:
    return [os.fspath(c) for c in cmd]


def run(
    cmd: Sequence[Arg],
    *,
    check: bool = True,
    capture: bool = False,
    input_bytes: bytes | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    stdout_to: Path | None = None,
    merge_stderr: bool = False,
    timeout: float | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run a command in its own process group; on any exception the whole group is killed.

    Output is captured (`capture`), written to a file (`stdout_to`, with stderr too when
    `merge_stderr`), or inherited. A failure raises BuildError quoting the command and the tail
    of its error output. Past `timeout` seconds the group is killed and TimeoutExpired raised.
    """
    args = argv(cmd)
    log.debug("run: %s", shlex.join(args))
    out_file = stdout_to.open("wb") if stdout_to else None
    try:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.PIPE if input_bytes is not None else subprocess.DEVNULL,
            stdout=out_file or (subprocess.PIPE if capture else None),
            stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE if capture or out_file else None,
            env=None if env is None else dict(env),
            cwd=cwd,
            start_new_session=True,  # Ctrl-C reaches us; we stop the child ourselves, cleanly
        )
        try:
            stdout, stderr = proc.communicate(input_bytes, timeout=timeout)
        except BaseException:
            stop_group(proc)
            raise
    finally:
        if out_file:
            out_file.close()
    result = subprocess.CompletedProcess(args, proc.returncode, stdout or b"", stderr or b"")
    if check and proc.returncode != 0:
        tail = (stderr or b"").decode(errors="replace").strip().splitlines()[-3:]
        detail = f": {' / '.join(tail)}" if tail else ""
        raise BuildError(f"`{shlex.join(args)[:200]}` failed with exit code {proc.returncode}{detail}")
    return result


def spawn(cmd: Sequence[Arg], **popen: Any) -> subprocess.Popen[bytes]:
    """Start a long-lived command (QEMU, a lock holder) in its own process group; stop it with
    `stop_group`. For commands that end by themselves, use `run`."""
    args = argv(cmd)
    log.debug("spawn: %s", shlex.join(args))
    popen.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.Popen(args, start_new_session=True, **popen)


def stop_group(proc: subprocess.Popen[bytes], *, grace: float = 0.0, term_timeout: float = 20.0) -> None:
    """Let the process end by itself for `grace` s, then SIGTERM its group and, if it is still
    there after `term_timeout` s, SIGKILL it; then sweep the group (children it left behind)."""
    try:
        proc.wait(timeout=grace if grace and proc.poll() is None else 0.01)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=term_timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def require_tools(*tools: str, package_hint: str = "") -> None:
    """Fail with one line naming every missing host tool and how to get it."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        hint = package_hint or "run `make setup` as root, or apt-get install the Debian packages"
        raise UsageError(f"missing host tools: {', '.join(missing)}", hint=hint)


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise UsageError(f"{what} needs root (mmdebstrap and the chroot connection)", hint="run it with sudo")
