"""SSH as amnesiac speaks it: ssh:// URLs, the client options, and public keys.

One parser for `ssh://[user@]host[:port][/path]` (verify's --target, flash's --to), one set of
client options (never a prompt, bounded waits), and one reader of OpenSSH public key files.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path

from amnesiac.errors import UsageError

_URL = re.compile(
    r"^ssh://(?:(?P<user>[^@/:\s]+)@)?(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9._-]*)"
    r"(?::(?P<port>\d+))?(?P<path>/[^\n\r]*)?$"
)
_KEY_TYPES = re.compile(r"^(ssh-(ed25519|rsa|dss)|ecdsa-sha2-\S+|sk-\S+)\s+[A-Za-z0-9+/=]+(\s.*)?$")

# Every ssh amnesiac starts: no prompt (it would hang a run), bounded waits, only the key given.
CLIENT_OPTIONS = (
    "BatchMode yes",
    "ConnectTimeout 20",
    "ServerAliveInterval 15",
    "ServerAliveCountMax 4",
)
# For servers whose host keys are made at every boot (a booted image has no key of its own to
# pin): verify's targets, never a boot server that flash publishes to.
EPHEMERAL_HOST_OPTIONS = ("StrictHostKeyChecking no", "UserKnownHostsFile /dev/null", "LogLevel ERROR")

# Connection multiplexing (verify: one connection per target for a run, targets.mux). A master
# left idle this long ends by itself: a run killed before it could close its masters leaves
# none behind for good. Longer than any pause between a run's commands.
CONTROL_PERSIST = "5m"
# The longest Unix socket path every OpenSSH platform binds (sun_path: 104 bytes with the NUL).
SOCKET_PATH_MAX = 103
# ssh binds "<ControlPath>.<16 random characters>" before renaming it; %C is 40 hex characters
# (a hash of the local host, host, port, user and jump host), whatever the host's name.
_CONTROL_NAME_LENGTH = 40 + 1 + 16


@dataclass(frozen=True)
class SshUrl:
    """ssh://[user@]host[:port][/path]: user and port None when the URL does not say."""

    host: str  # as written: an IPv6 address keeps its brackets
    path: str | None = None
    user: str | None = None
    port: int | None = None

    @property
    def destination(self) -> str:
        """What ssh takes: user@host, the IPv6 brackets removed."""
        host = self.host.strip("[]")
        return f"{self.user}@{host}" if self.user else host

    @property
    def scp_destination(self) -> str:
        """What scp takes before the colon: an IPv6 address keeps its brackets."""
        return f"{self.user}@{self.host}" if self.user else self.host

    @property
    def url(self) -> str:
        port = f":{self.port}" if self.port else ""
        user = f"{self.user}@" if self.user else ""
        return f"ssh://{user}{self.host}{port}{self.path or ''}"


def parse_url(url: str, *, option: str, path: bool) -> SshUrl:
    """Read an ssh:// URL given as `option`; `path`: whether it must name an absolute path.

    A malformed one is a one-line usage error naming the option and the forms it takes.
    """
    form = "ssh://[user@]host[:port]" + ("/absolute/path" if path else "")
    match = _URL.match(url)
    if not match:
        raise UsageError(f"{option} {url!r}: expected {form}")
    port = int(match["port"]) if match["port"] else None
    if port is not None and not 0 < port < 65536:
        raise UsageError(f"{option} {url!r}: port {port} is out of range")
    found = match["path"]
    if path:
        found = (found or "").rstrip("/")
        if not found or "/../" in f"{found}/":
            raise UsageError(f"{option} {url!r}: the path must be an absolute path below /")
    elif found not in (None, "/"):
        raise UsageError(f"{option} {url!r}: expected {form}, without a path")
    else:
        found = None
    return SshUrl(host=match["host"], path=found, user=match["user"], port=port)


def control_path(directory: Path) -> str | None:
    """ssh's ControlPath for one master socket per host in `directory`; None where the sockets
    would not fit a Unix socket path, or where the directory's name would need quoting."""
    name = os.fspath(directory)
    if len(os.fsencode(name)) + 1 + _CONTROL_NAME_LENGTH > SOCKET_PATH_MAX:
        return None
    if any(c.isspace() or c in "\"'" for c in name):  # ssh splits option values at blanks
        return None
    return name.replace("%", "%%") + "/%C"  # ssh expands %-tokens in ControlPath


def control_options(path: str) -> tuple[str, ...]:
    """The client options that share one master connection per host through `path`: the first
    ssh to a host becomes its master, the others run their commands over it."""
    return ("ControlMaster auto", f"ControlPath {path}", f"ControlPersist {CONTROL_PERSIST}")


def client_config(
    file: Path,
    *,
    identity: Path | None = None,
    ephemeral_host_keys: bool = False,
    control: str | None = None,
) -> Path:
    """Write an ssh_config (`ssh -F`) with the client options and the key to log in with;
    `control`: a ControlPath (`control_path`) to share one connection per host through."""
    options = [*CLIENT_OPTIONS, *(EPHEMERAL_HOST_OPTIONS if ephemeral_host_keys else ())]
    options.append("IdentitiesOnly yes")  # never the agent's keys: only the one named here
    if identity is not None:
        options.append(f"IdentityFile {identity}")
    if control is not None:
        options.extend(control_options(control))
    file.write_text("\n".join(["Host *", *(f"    {o}" for o in options)]) + "\n")
    return file


def client_args() -> list[str]:
    """The client options as `-o` arguments."""
    return [arg for option in CLIENT_OPTIONS for arg in ("-o", option.replace(" ", "=", 1))]


def private_key(path: Path | None) -> Path | None:
    """--ssh-key as given, checked before anything is reached: a missing key is bad input (exit
    2), not a server that cannot be reached."""
    if path is not None and not path.is_file():
        raise UsageError(f"--ssh-key {path}: no such file")
    return path


def public_keys(pub: Path, option: str = "--ssh-key") -> list[str]:
    """The OpenSSH public keys in a file, one per line; a private key is refused, never read on.

    Errors name the option the file came from (`option`) and the file.
    """
    try:
        text = pub.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{option} {pub}: cannot read it ({exc})") from None
    if "PRIVATE KEY" in text:
        raise UsageError(f"{option} {pub} is a private key", hint=f"pass the public key, {pub}.pub")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip() and not line.startswith("#") and not _KEY_TYPES.match(line.strip()):
            raise UsageError(
                f"{option} {pub}:{number}: not an OpenSSH public key (ssh-ed25519 AAAA... comment)"
            )
    if not lines:
        raise UsageError(f"{option} {pub}: no public key in it (ssh-ed25519 AAAA... comment)")
    return lines


def fingerprint(key: str) -> str:
    """OpenSSH's SHA256 fingerprint of a public key line (`ssh-keygen -l` prints the same)."""
    blob = base64.b64decode(key.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def read_banner(port: int, host: str = "127.0.0.1", timeout: float = 3.0) -> str:
    """The SSH identification line, if sshd answers (slirp accepts, then closes, before it does)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            data = sock.recv(256)
    except OSError:
        return ""
    line = data.split(b"\r\n", 1)[0].split(b"\n", 1)[0].decode(errors="replace")
    return line if line.startswith("SSH-") else ""
