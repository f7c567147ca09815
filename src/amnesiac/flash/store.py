"""A PXE root, local or over SSH: the few operations a publish is made of, each safe on its own.

Both kinds do the same steps the same way: copy into a fresh directory under .staging/, hash
what landed, rename the directory into versions/ (one rename(2)), then write the new entry
point beside the old and rename it over (one more). Under the root's lock, whatever is left in
.staging/ or .trash/ belongs to a flash that died, and is removed.

Over SSH each step is a short POSIX shell script run with `sh -c` on the boot server (it needs
sh, flock, mktemp, sha256sum, mv, sync: coreutils and util-linux), files go by scp, and one
connection, opened by the process that holds the lock, carries every command (ControlMaster).

A publish calls `Store.checkpoint` at each of its steps (CHECKPOINTS): a subclass can watch a
publish go by there, or stop it (the tests kill a publish at each one).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import shlex
import shutil
import socket
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import PIPE, CompletedProcess, Popen
from typing import BinaryIO

from amnesiac.errors import UsageError
from amnesiac.files import sync_directory, write_atomic
from amnesiac.flash.model import (
    IDENTITIES,
    INDEX,
    LOCK,
    LOG,
    RECORD,
    ROOT_SCRIPT,
    STAGING,
    TRASH,
    VERSIONS,
    FileInfo,
    FlashError,
    LockBusy,
    now,
)
from amnesiac.image.hashing import sha256_file
from amnesiac.run import require_tools, run, spawn, stop_group
from amnesiac.ssh import SshUrl, client_args, parse_url

# The steps of a publish at which `Store.checkpoint` is called, in order:
#   copy       the copy is under way: the small files are staged, initrd.img is not yet whole
#   staged     the copy is whole and its hashes match manifest.json; not yet in versions/
#   committed  the copy is versions/<version>/; the entry point still names the previous version
# (an identity set published with it reaches staged and committed too, in identities/)
#   switch     the new entry point is about to replace the old one (over ssh: it is written beside)
CHECKPOINTS = ("copy", "staged", "committed", "switch")
CHUNK = 1 << 20
HASH_NAME = re.compile(r"^[0-9a-f]{64}$")

Source = Path | bytes
OnWait = Callable[[str], None]


def holder_line() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()} since {now()}"


@dataclass(frozen=True)
class Snapshot:
    """What a PXE root holds: its entry point and each version's publish record (raw bytes)."""

    exists: bool
    script: bytes | None = None
    records: dict[str, bytes | None] = field(default_factory=dict)  # version -> publish.json
    sets: dict[str, bytes | None] = field(default_factory=dict)  # identity set -> identities.json


class Store(ABC):
    """A PXE root. Mutating operations are only called while `locked()`."""

    label: str

    def checkpoint(self, step: str) -> None:  # noqa: B027 (a hook: by default it does nothing)
        """Called as a publish reaches `step` (one of CHECKPOINTS); does nothing here.

        The extension point for watching a publish step by step, or interrupting it at one: a
        subclass that overrides it sees every step of every publish made through it.
        """

    @abstractmethod
    def locked(self, timeout: float, on_wait: OnWait) -> contextlib.AbstractContextManager[None]:
        """Hold the root's lock (created with the root if need be); LockBusy after `timeout` s."""

    @abstractmethod
    def snapshot(self) -> Snapshot: ...

    @abstractmethod
    def read(self, rel: str) -> bytes | None:
        """A file of the root (`versions/<h>/manifest.json`); None when there is none."""

    @abstractmethod
    def tidy(self) -> None:
        """Remove what dead flashes left: .staging/, .trash/, temporary entry points."""

    @abstractmethod
    def stage(self, version: str, files: Mapping[str, Source]) -> str:
        """Copy `files` into a new directory under .staging/; its path relative to the root."""

    @abstractmethod
    def hashes(self, rel_dir: str, names: Sequence[str]) -> dict[str, FileInfo]:
        """sha256 and size of the named files as stored (a missing file is left out)."""

    @abstractmethod
    def commit(self, staging: str, version: str, into: str = VERSIONS) -> None:
        """Rename a staged directory to versions/<version> (or identities/<set>), which must not exist."""

    @abstractmethod
    def discard(self, staging: str) -> None: ...

    @abstractmethod
    def switch(self, script: bytes) -> None:
        """Replace the root's boot.ipxe with `script` by one atomic rename."""

    @abstractmethod
    def append_log(self, line: str) -> None: ...

    @abstractmethod
    def remove_version(self, version: str, under: str = VERSIONS) -> None:
        """Take versions/<version> (or identities/<set>) out with one rename, then delete it."""


# --- a local directory --------------------------------------------------------------------------


class LocalStore(Store):
    def __init__(self, root: Path) -> None:
        self.root = root
        self.label = str(root)

    @contextlib.contextmanager
    def locked(self, timeout: float, on_wait: OnWait) -> Iterator[None]:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise FlashError(
                f"{self.label}: cannot create the PXE root or its lock ({exc.strerror})"
            ) from None
        try:
            deadline = time.monotonic() + timeout
            waiting = False
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another flash"
                    if not waiting:
                        on_wait(holder)
                        waiting = True
                    if time.monotonic() >= deadline:
                        raise LockBusy(
                            f"{self.label} is locked by another flash ({holder}); "
                            f"gave up after {timeout:.0f} s",
                            hint="wait for it, or raise --lock-timeout",
                        ) from None
                    time.sleep(0.2)
            os.ftruncate(fd, 0)
            os.pwrite(fd, (holder_line() + "\n").encode(), 0)
            yield
        finally:
            os.close(fd)  # releases the lock; the file stays (removing it would race)

    def snapshot(self) -> Snapshot:
        if not self.root.is_dir():
            return Snapshot(exists=False)
        records: dict[str, bytes | None] = {}
        sets: dict[str, bytes | None] = {}
        for kind, found, name in ((VERSIONS, records, RECORD), (IDENTITIES, sets, INDEX)):
            if (self.root / kind).is_dir():
                for entry in sorted((self.root / kind).iterdir()):
                    if HASH_NAME.match(entry.name) and entry.is_dir():
                        found[entry.name] = _read(entry / name)
        return Snapshot(exists=True, script=_read(self.root / ROOT_SCRIPT), records=records, sets=sets)

    def read(self, rel: str) -> bytes | None:
        return _read(self.root / rel)

    def tidy(self) -> None:
        for name in (STAGING, TRASH):
            shutil.rmtree(self.root / name, ignore_errors=True)
        for tmp in self.root.glob(f".{ROOT_SCRIPT}.*.tmp"):
            tmp.unlink(missing_ok=True)

    def stage(self, version: str, files: Mapping[str, Source]) -> str:
        staging = self.root / STAGING / f"{version}.{os.getpid()}"
        staging.parent.mkdir(exist_ok=True)
        staging.mkdir(mode=0o755)
        try:
            staging.chmod(0o755)
            for name, source in files.items():
                fd = os.open(staging / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
                with os.fdopen(fd, "wb") as out:
                    if isinstance(source, bytes):
                        out.write(source)
                    elif name == "initrd.img":  # the largest: the copy is under way once it starts
                        _copy(source, out, started=lambda: self.checkpoint("copy"))
                    else:
                        _copy(source, out)
                    out.flush()
                    os.fsync(out.fileno())
                (staging / name).chmod(0o644)
            sync_directory(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)  # a full disk: give the room back now
            raise
        return f"{STAGING}/{staging.name}"

    def hashes(self, rel_dir: str, names: Sequence[str]) -> dict[str, FileInfo]:
        found = {}
        for name in names:
            path = self.root / rel_dir / name
            if path.is_file():
                found[name] = FileInfo(sha256=sha256_file(path), size=path.stat().st_size)
        return found

    def commit(self, staging: str, version: str, into: str = VERSIONS) -> None:
        versions = self.root / into
        versions.mkdir(exist_ok=True)
        target = versions / version
        if target.exists():
            raise FlashError(f"{self.label}: {into}/{version} appeared during the publish")
        (self.root / staging).rename(target)
        sync_directory(versions)
        with contextlib.suppress(OSError):
            (self.root / STAGING).rmdir()

    def discard(self, staging: str) -> None:
        shutil.rmtree(self.root / staging, ignore_errors=True)

    def switch(self, script: bytes) -> None:
        self.checkpoint("switch")
        # Written beside as .boot.ipxe.*.tmp (what tidy() sweeps if we die), then renamed over.
        write_atomic(self.root / ROOT_SCRIPT, script, mode=0o644)

    def append_log(self, line: str) -> None:
        with (self.root / LOG).open("a") as log:
            log.write(line.rstrip("\n") + "\n")

    def remove_version(self, version: str, under: str = VERSIONS) -> None:
        trash = self.root / TRASH
        trash.mkdir(exist_ok=True)
        gone = trash / f"{version}.{os.getpid()}"
        (self.root / under / version).rename(gone)
        sync_directory(self.root / under)
        shutil.rmtree(gone, ignore_errors=True)


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None


def _copy(source: Path, out: BinaryIO, *, started: Callable[[], None] | None = None) -> None:
    """Copy `source` into `out`; `started` is called once the first chunk is on disk."""
    with source.open("rb") as f:
        while chunk := f.read(CHUNK):
            out.write(chunk)
            if started is not None:
                out.flush()  # part of the file on disk, not all of it
                started()
                started = None


# --- a directory on a boot server, over SSH -----------------------------------------------------

MISSING = 44  # exit code of the remote scripts for "no such file"
EXISTS = 17

LOCK_SCRIPT = r"""set -eu
root=$1 timeout=$2 who=$3
command -v flock >/dev/null || { echo "flock is missing on the boot server (util-linux)" >&2; exit 69; }
mkdir -p -- "$root"
exec 9>>"$root/.flash.lock"
if ! flock -n 9; then
  printf 'waiting %s\n' "$(head -n 1 "$root/.flash.lock" 2>/dev/null || true)"
  flock -w "$timeout" 9 || { echo busy; exit 75; }
fi
printf '%s\n' "$who" > "$root/.flash.lock"
echo locked
exec cat >/dev/null
"""

SNAPSHOT_SCRIPT = r"""set -eu
root=$1 sep=$2
cd -- "$root" 2>/dev/null || { printf '\n%s none\n' "$sep"; exit 0; }
printf '\n%s root\n' "$sep"
if [ -f boot.ipxe ]; then printf '\n%s script\n' "$sep"; cat boot.ipxe; fi
# $1: versions or identities, $2: the file that describes an entry, $3: the entry's tag
entries() {
  for d in "$1"/*; do
    [ -d "$d" ] || continue
    if [ -f "$d/$2" ]; then printf '\n%s %s %s\n' "$sep" "$3" "${d#"$1"/}"; cat "$d/$2"
    else printf '\n%s bare%s %s\n' "$sep" "$3" "${d#"$1"/}"; fi
  done
}
entries versions publish.json record
entries identities identities.json set
"""

READ_SCRIPT = r"""f=$1/$2
if [ -f "$f" ]; then exec cat -- "$f"; else exit 44; fi
"""

TIDY_SCRIPT = r"""set -eu
cd -- "$1"
rm -rf -- .staging .trash
rm -f -- .boot.ipxe.*.tmp
"""

MKSTAGE_SCRIPT = r"""set -eu
mkdir -p -- "$1/.staging"
d=$(mktemp -d "$1/.staging/$2.XXXXXX")
chmod 755 "$d"
printf '%s\n' "${d##*/}"
"""

SEAL_SCRIPT = r"""set -eu
cd -- "$1/$2"
chmod 644 -- *
sync -- * .
"""

HASH_SCRIPT = r"""set -eu
cd -- "$1/$2"
shift 2
for f; do
  if [ -f "$f" ]; then printf '%s ' "$(wc -c < "$f")"; sha256sum -- "$f"; fi
done
"""

COMMIT_SCRIPT = r"""set -eu
mkdir -p -- "$1/$4"
if [ -e "$1/$4/$3" ]; then exit 17; fi
mv -T -- "$1/$2" "$1/$4/$3"
sync -- "$1/$4"
rmdir -- "$1/.staging" 2>/dev/null || true
"""

DISCARD_SCRIPT = r"""rm -rf -- "$1/$2"
"""

WRITE_SCRIPT = r"""set -eu
t="$1/.boot.ipxe.$2.tmp"
cat > "$t"
chmod 644 "$t"
sync -- "$t"
"""

RENAME_SCRIPT = r"""set -eu
mv -f -T -- "$1/.boot.ipxe.$2.tmp" "$1/boot.ipxe"
sync -- "$1"
"""

APPEND_SCRIPT = r"""cat >> "$1/flash.log"
"""

REMOVE_SCRIPT = r"""set -eu
mkdir -p -- "$1/.trash"
t="$1/.trash/$2.$$"
mv -T -- "$1/$3/$2" "$t"
sync -- "$1/$3"
rm -rf -- "$t"
"""


class SshStore(Store):
    """A PXE root on a boot server, reached with OpenSSH (keys, agent and ~/.ssh/config apply)."""

    def __init__(self, root: SshUrl, *, ssh_config: Path | None = None, ssh_key: Path | None = None) -> None:
        if root.path is None:
            raise UsageError(f"--to {root.url!r}: the PXE root must be an absolute path below /")
        self.root = root
        self.path = root.path
        self.label = root.url
        self.ssh_config = ssh_config
        self.ssh_key = ssh_key
        self._control: Path | None = None  # the lock holder's ControlMaster socket
        self._holder: Popen[bytes] | None = None  # the ssh that holds the lock
        self._token = secrets.token_hex(4)

    # -- command lines (pure, unit-tested) --

    def ssh_options(self) -> list[str]:
        opts: list[str] = []
        if self.ssh_config is not None:
            opts += ["-F", os.fspath(self.ssh_config)]
        if self.ssh_key is not None:
            opts += ["-i", os.fspath(self.ssh_key), "-o", "IdentitiesOnly=yes"]
        opts += client_args()
        if self._control is not None:
            opts += ["-o", f"ControlPath={self._control}", "-o", "ControlMaster=no"]
        return opts

    def ssh_argv(self, script: str, *args: str, master: Path | None = None) -> list[str]:
        """ssh … DEST 'sh -c SCRIPT amnesiac-flash ROOT ARGS…' (the remote shell gets one string)."""
        opts = self.ssh_options()
        if master is not None:
            opts += ["-o", f"ControlPath={master}", "-o", "ControlMaster=yes", "-o", "ControlPersist=no"]
        port = ["-p", str(self.root.port)] if self.root.port else []
        remote = shlex.join(["sh", "-c", script, "amnesiac-flash", self.path, *args])
        return ["ssh", *port, *opts, self.root.destination, remote]

    def scp_argv(self, local: Path, remote_dir: str) -> list[str]:
        port = ["-P", str(self.root.port)] if self.root.port else []
        target = f"{self.root.scp_destination}:{self.path}/{remote_dir}/"
        return ["scp", "-q", *port, *self.ssh_options(), os.fspath(local), target]

    # -- running them --

    def _remote(self, what: str, script: str, *args: str, data: bytes | None = None) -> bytes:
        result = run(self.ssh_argv(script, *args), input_bytes=data, capture=True, check=False)
        if result.returncode != 0:
            raise FlashError(f"{self.label}: {what} failed: {_why(result)}")
        return result.stdout

    @contextlib.contextmanager
    def locked(self, timeout: float, on_wait: OnWait) -> Iterator[None]:
        require_tools("ssh", "scp", package_hint="apt-get install openssh-client")
        with tempfile.TemporaryDirectory(prefix="amnesiac-ssh-") as tmp:
            master = Path(tmp) / "cm"
            argv = self.ssh_argv(LOCK_SCRIPT, str(int(timeout)), holder_line(), master=master)
            # Not run(): this ssh lives as long as the lock. If we die, even by SIGKILL, its stdin
            # closes, the remote `cat` ends and the lock goes with it.
            proc = spawn(argv, stdin=PIPE, stdout=PIPE, stderr=PIPE)
            try:
                self._await_lock(proc, timeout, on_wait)
                self._control, self._holder = master, proc
                yield
            finally:
                self._control, self._holder = None, None
                _release(proc)

    def _await_lock(self, proc: Popen[bytes], timeout: float, on_wait: OnWait) -> None:
        if proc.stdout is None:
            raise FlashError(f"{self.label}: the lock holder has no output")
        while line := proc.stdout.readline().decode(errors="replace"):
            if line.startswith("waiting"):
                on_wait(line.removeprefix("waiting").strip() or "another flash")
            elif line.strip() == "busy":
                proc.wait()
                raise LockBusy(
                    f"{self.label} is locked by another flash; gave up after {timeout:.0f} s",
                    hint="wait for it, or raise --lock-timeout",
                )
            elif line.strip() == "locked":
                return
        proc.wait()
        err = (proc.stderr.read() if proc.stderr else b"").decode(errors="replace")
        lines = [ln.strip() for ln in err.splitlines() if ln.strip()]
        raise FlashError(
            f"{self.label}: cannot lock the PXE root over ssh (exit {proc.returncode}): "
            f"{' / '.join(lines[-2:]) or 'no message'}"
        )

    def snapshot(self) -> Snapshot:
        sep = f"--amnesiac-{secrets.token_hex(8)}--"
        out = self._remote("reading the PXE root", SNAPSHOT_SCRIPT, sep)
        parts = re.split(rb"\n" + re.escape(sep.encode()) + rb" (\w+)(?: (\S+))?\n", out)
        records: dict[str, bytes | None] = {}
        sets: dict[str, bytes | None] = {}
        script: bytes | None = None
        exists = False
        for i in range(1, len(parts) - 2, 3):
            kind, name, body = parts[i].decode(), (parts[i + 1] or b"").decode(), parts[i + 2]
            if kind == "root":
                exists = True
            elif kind == "script":
                script = body
            elif kind in {"record", "barerecord"} and HASH_NAME.match(name):
                records[name] = body if kind == "record" else None
            elif kind in {"set", "bareset"} and HASH_NAME.match(name):
                sets[name] = body if kind == "set" else None
        return Snapshot(exists=exists, script=script, records=records, sets=sets)

    def read(self, rel: str) -> bytes | None:
        result = run(self.ssh_argv(READ_SCRIPT, rel), capture=True, check=False)
        if result.returncode == MISSING:
            return None
        if result.returncode != 0:
            raise FlashError(f"{self.label}: reading {rel} failed: {_why(result)}")
        return result.stdout

    def tidy(self) -> None:
        self._remote("removing leftovers of interrupted flashes", TIDY_SCRIPT)

    def stage(self, version: str, files: Mapping[str, Source]) -> str:
        name = self._remote("creating a staging directory", MKSTAGE_SCRIPT, version).decode().strip()
        staging = f"{STAGING}/{name}"
        try:
            with tempfile.TemporaryDirectory(prefix="amnesiac-upload-") as tmp:
                for file_name, source in sorted(files.items(), key=lambda item: item[0] == "initrd.img"):
                    local = Path(tmp) / file_name
                    if isinstance(source, bytes):
                        local.write_bytes(source)
                    else:
                        local.symlink_to(source.resolve())
                    if file_name == "initrd.img":
                        self.checkpoint("copy")  # the other files are there, the largest is not
                    result = run(self.scp_argv(local, staging), capture=True, check=False)
                    if result.returncode != 0:
                        raise FlashError(f"{self.label}: copying {file_name} failed: {_why(result)}")
            self._remote("syncing the copy", SEAL_SCRIPT, staging)
        except BaseException:
            self.discard(staging)
            raise
        return staging

    def hashes(self, rel_dir: str, names: Sequence[str]) -> dict[str, FileInfo]:
        out = self._remote(f"hashing {rel_dir}", HASH_SCRIPT, rel_dir, *names).decode(errors="replace")
        found = {}
        for line in out.splitlines():
            size, digest, name = line.split(maxsplit=2)
            found[name.strip()] = FileInfo(sha256=digest, size=int(size))
        return found

    def _still_locked(self) -> None:
        """Before a rename: the ssh holding the lock (and carrying our commands) is still there."""
        if self._holder is None or self._holder.poll() is not None:
            raise FlashError(f"{self.label}: lost the connection that holds the lock; nothing was switched")

    def commit(self, staging: str, version: str, into: str = VERSIONS) -> None:
        self._still_locked()
        result = run(self.ssh_argv(COMMIT_SCRIPT, staging, version, into), capture=True, check=False)
        if result.returncode == EXISTS:
            raise FlashError(f"{self.label}: {into}/{version} appeared during the publish")
        if result.returncode != 0:
            raise FlashError(f"{self.label}: moving the copy into {into}/ failed: {_why(result)}")

    def discard(self, staging: str) -> None:
        run(self.ssh_argv(DISCARD_SCRIPT, staging), capture=True, check=False)

    def switch(self, script: bytes) -> None:
        self._remote("writing the new boot.ipxe", WRITE_SCRIPT, self._token, data=script)
        self.checkpoint("switch")
        self._still_locked()
        self._remote("switching boot.ipxe", RENAME_SCRIPT, self._token)

    def append_log(self, line: str) -> None:
        self._remote("appending to flash.log", APPEND_SCRIPT, data=(line.rstrip("\n") + "\n").encode())

    def remove_version(self, version: str, under: str = VERSIONS) -> None:
        self._remote(f"removing {under}/{version[:12]}", REMOVE_SCRIPT, version, under)


def _release(proc: Popen[bytes]) -> None:
    """End the lock holder: close its stdin (the remote `cat` ends), then make sure it is gone."""
    with contextlib.suppress(OSError):
        if proc.stdin is not None:
            proc.stdin.close()
    stop_group(proc, grace=20.0, term_timeout=5.0)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def _why(result: CompletedProcess[bytes]) -> str:
    lines = [ln.strip() for ln in result.stderr.decode(errors="replace").splitlines() if ln.strip()]
    return " / ".join(lines[-2:]) or f"exit code {result.returncode}"


def open_store(to: str, *, ssh_config: Path | None = None, ssh_key: Path | None = None) -> Store:
    """The PXE root `--to` names: ssh://… or a local directory. Nothing is touched yet; a
    `--to` that cannot be a PXE root is a UsageError now, before anything is signed or copied."""
    if not to.strip():
        raise UsageError(f"--to {to!r}: name a PXE root, a local directory or ssh://[user@]host[:port]/path")
    if to.startswith("ssh://"):
        url = parse_url(to, option="--to", path=True)
        for option, given in (("--ssh-config", ssh_config), ("--ssh-key", ssh_key)):
            if given is not None and not given.is_file():
                raise UsageError(f"{option} {given}: no such file")
        return SshStore(url, ssh_config=ssh_config, ssh_key=ssh_key)
    if "://" in to:
        raise UsageError(f"--to {to!r}: a local directory or ssh://[user@]host[:port]/path")
    path = Path(to)
    try:
        existing = next((p for p in (path, *path.absolute().parents) if p.exists()), None)
    except OSError as exc:  # a name too long, a loop of symlinks
        raise UsageError(f"--to {to}: {exc.strerror}") from None
    if existing is not None and not existing.is_dir():
        what = "" if existing == path else f" ({existing} is not a directory)"
        raise UsageError(f"--to {to}: not a directory{what}; a PXE root is a directory")
    return LocalStore(path)
