"""Per-host identities: what makes one server of a fleet *that* server, published beside the image.

One image serves every server; their keys are not in it. An operator keeps them in a directory
with one subdirectory per machine, named by the MAC address it netboots with, holding the
files at their paths in the root (docs/identities.md):

    IDENTITIES/52-54-00-12-34-56/etc/amnesiac/provider/{url,ca.crt,node.crt,node.key}
    IDENTITIES/52-54-00-12-34-56/etc/openvpn/server/identity/{ca.crt,server.crt,server.key,...}
    IDENTITIES/52-54-00-12-34-56/etc/wireguard/identity/wg0.key

Only files directly in IDENTITY_DIRS are taken: an identity may not change what the image does
(its configuration was verified; a per-host file that replaced it would void the report). Each
machine's files become one boot-time overlay (`<mac>.cpio`, the format of boot/overlay.py, byte
for byte the same for the same files), and `identities.json` lists every overlay's sha256: it
is what `--sign` signs, like manifest.json for an image.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from amnesiac.boot.overlay import OverlayFile, overlay_cpio
from amnesiac.errors import UsageError
from amnesiac.files import write_atomic
from amnesiac.flash import signing
from amnesiac.flash.model import INDEX, INDEX_SIGNATURE, FileInfo, Refused, SignatureInfo, version_id

NAMESPACE = "amnesiac-identities"  # signatures over an index are never taken for a manifest's
FORMAT = 1
# Where the roles look for a delivered identity (their defaults): openvpn_server's identity
# directory, wireguard_server's key directory, provider_agent's node identity.
IDENTITY_DIRS = ("etc/amnesiac/provider", "etc/openvpn/server/identity", "etc/wireguard/identity")
MAC = re.compile(r"^[0-9a-f]{2}([-:])[0-9a-f]{2}(\1[0-9a-f]{2}){4}$")
MAX_FILE_BYTES = 64 * 1024  # keys and certificates; anything larger is a mistake


def host_name(mac: str) -> str:
    """A MAC address as iPXE's ${mac:hexhyp} prints it: 52-54-00-12-34-56."""
    return mac.lower().replace(":", "-")


@dataclass(frozen=True)
class IdentitySet:
    """Every host's overlay, the index that lists them and (when signed) the index's signature."""

    source: Path
    overlays: dict[str, bytes]  # host (52-54-00-12-34-56) -> its overlay cpio
    host_files: dict[str, list[OverlayFile]]  # host -> what its overlay holds (paths relative to /)
    index: bytes
    signature: bytes | None = None  # source/identities.json.sig, when it is for this very index
    signer: SignatureInfo | None = field(default=None, compare=False)
    stale: bool = False  # a signature is there, over an index that no longer lists these files

    def files(self) -> dict[str, bytes]:
        """What identities/<set>/ holds: one overlay per host, the index, its signature."""
        files = {f"{host}.cpio": data for host, data in self.overlays.items()}
        files[INDEX] = self.index
        if self.signature is not None:
            files[INDEX_SIGNATURE] = self.signature
        return files

    @property
    def expected(self) -> dict[str, FileInfo]:
        return {name: _info(data) for name, data in self.files().items()}

    @property
    def name(self) -> str:
        """The set's directory name: named by its files, as a version is (model.version_id)."""
        return version_id(self.expected)


def load(source: Path) -> IdentitySet:
    """The identity set in `source`, checked; a UsageError naming the first bad file or name."""
    if not source.is_dir():
        raise UsageError(f"--identities {source}: not a directory")
    overlays: dict[str, bytes] = {}
    host_files: dict[str, list[OverlayFile]] = {}
    seen: dict[str, str] = {}
    for entry in sorted(source.iterdir()):
        if entry.name in {INDEX, INDEX_SIGNATURE}:
            continue
        if not entry.is_dir() or entry.is_symlink() or not MAC.match(entry.name.lower()):
            raise UsageError(
                f"{entry}: not a host directory (name each by the machine's MAC address, "
                "52-54-00-12-34-56 or 52:54:00:12:34:56)"
            )
        host = host_name(entry.name)
        if host in seen:
            raise UsageError(f"{entry}: the same MAC address as {source / seen[host]}")
        seen[host] = entry.name
        files = _host_files(entry)
        overlays[host] = overlay_cpio(files)
        host_files[host] = files
    if not overlays:
        raise UsageError(f"--identities {source}: no host directories in it")
    index = (
        json.dumps({"format": FORMAT, "hosts": _listing(overlays, host_files)}, indent=2) + "\n"
    ).encode()
    signature, stale = _signature(source, index)
    return IdentitySet(source, overlays, host_files, index, signature, stale=stale)


def _host_files(host: Path) -> list[OverlayFile]:
    files = []
    for path in sorted(host.rglob("*")):
        rel = path.relative_to(host).as_posix()
        if path.is_symlink():
            raise UsageError(f"{path}: a symbolic link; an identity holds regular files only")
        if path.is_dir():
            if not any(d == rel or d.startswith(rel + "/") for d in IDENTITY_DIRS):
                raise UsageError(f"{path}: not an identity directory ({', '.join(IDENTITY_DIRS)})")
            continue
        if not stat.S_ISREG(path.lstat().st_mode):
            raise UsageError(f"{path}: not a regular file")
        if rel.rsplit("/", 1)[0] not in IDENTITY_DIRS or "/" not in rel:
            raise UsageError(
                f"{path}: /{rel} is not in an identity directory (/{', /'.join(IDENTITY_DIRS)}); "
                "an identity may not change the image's configuration"
            )
        size = path.stat().st_size
        if size == 0 or size > MAX_FILE_BYTES:
            raise UsageError(f"{path}: {size} bytes; an identity file is a key, a certificate or a URL")
        # Keys for root only; certificates and the URL readable (the image's own modes).
        mode = 0o600 if path.suffix == ".key" else 0o644
        files.append(OverlayFile(rel, path.read_bytes(), mode))
    if not files:
        raise UsageError(f"{host}: no identity files in it")
    return files


def _listing(overlays: dict[str, bytes], host_files: dict[str, list[OverlayFile]]) -> dict[str, object]:
    return {
        host: {**_info(data).model_dump(), "files": [f.path for f in host_files[host]]}
        for host, data in sorted(overlays.items())
    }


def _signature(source: Path, index: bytes) -> tuple[bytes | None, bool]:
    """source/identities.json.sig when it was made for this very set, and whether one is there
    for another (the files changed after signing)."""
    sig_path = source / INDEX_SIGNATURE
    if not sig_path.is_file():
        return None, False
    signed = (source / INDEX).read_bytes() if (source / INDEX).is_file() else None
    if signed != index:
        return None, True
    return sig_path.read_bytes(), False


def sign(identities: IdentitySet, key: Path) -> tuple[IdentitySet, str]:
    """Write identities.json and its signature into the source directory; the signed set."""
    index_path = write_atomic(identities.source / INDEX, identities.index)
    out, fingerprint = signing.sign(index_path, key, namespace=NAMESPACE, signature_name=INDEX_SIGNATURE)
    return dataclasses.replace(identities, signature=out.read_bytes(), stale=False), fingerprint


def check_signature(identities: IdentitySet, allowed: bytes | None, source: str) -> IdentitySet:
    """The set with its signer, when allowed signers are in force; Refused if it is not signed by one."""
    if allowed is None:
        return identities
    if identities.stale:
        raise Refused(
            f"{identities.source}: changed after it was signed ({INDEX} no longer lists its files)",
            hint=f"sign it again: amnesiac flash --identities {identities.source} --sign KEY",
        )
    signer = signing.verify(
        identities.index,
        identities.signature,
        allowed,
        what=f"{identities.source}/{INDEX}",
        namespace=NAMESPACE,
        signature_name=INDEX_SIGNATURE,
        hint=f"sign it with `amnesiac flash --identities {identities.source} --sign KEY` ({source})",
    )
    return dataclasses.replace(identities, signer=signer)


def hosts_of(index: bytes | None) -> list[str] | None:
    """The hosts a published identities.json lists; None when it cannot be read."""
    try:
        hosts = json.loads(index or b"").get("hosts")
    except (ValueError, AttributeError):
        return None
    return sorted(hosts) if isinstance(hosts, dict) else None


def _info(data: bytes) -> FileInfo:
    return FileInfo(sha256=hashlib.sha256(data).hexdigest(), size=len(data))
