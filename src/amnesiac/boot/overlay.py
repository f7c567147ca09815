"""The boot-time overlay: files a test or a machine needs at boot that are not in the image.

They come as a second initrd (`overlay.cpio`, see image/README.md) that a small harness script
loads before it `chain`s the build's own boot.ipxe. iPXE keeps images fetched before `chain`
(`kernel` only selects, it frees nothing; a running script is unregistered while it runs, so it
is not passed on as an initrd), and hands every registered image to the kernel as one
initramfs, in load order: the overlay, then initrd.img. The early init copies `overlay/` over
the root.
"""

from __future__ import annotations

import hashlib
import io
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from amnesiac import ssh
from amnesiac.boot.http import Source
from amnesiac.errors import UsageError
from amnesiac.image.cpio import CpioWriter, Entry

HARNESS_SCRIPT = "amnesiac-harness.ipxe"
OVERLAY = "overlay.cpio"

# Directories the overlay creates on the way to its files. `cp -a` in the early init copies
# their modes over the image's, so they must be what the image has: /root, ~/.ssh and the
# identity directories (provider_agent, openvpn_server, wireguard_server) are 0700.
OVERLAY_DIR_MODES = {
    "root": 0o700,
    "root/.ssh": 0o700,
    "etc/amnesiac/provider": 0o700,
    "etc/openvpn/server/identity": 0o700,
    "etc/wireguard": 0o700,
    "etc/wireguard/identity": 0o700,
}


@dataclass(frozen=True)
class OverlayFile:
    """A file the early init copies over the root at boot; `path` is relative to /."""

    path: str
    data: bytes
    mode: int = 0o644


@dataclass(frozen=True)
class Harness:
    """What the netboot server serves beside the build: the first script iPXE runs and the
    overlay it loads (if any)."""

    first_script: str  # the name QEMU's DHCP hands to iPXE
    files: dict[str, Source]
    overlay_sha256: str | None


def harness(files: Sequence[OverlayFile], mtime: int = 0) -> Harness:
    """The harness script and `files` as overlay.cpio; without files iPXE starts at boot.ipxe."""
    served = {HARNESS_SCRIPT: Source(data=harness_script(overlay=bool(files)).encode())}
    if not files:
        return Harness("boot.ipxe", served, None)
    data = overlay_cpio(files, mtime)
    digest = hashlib.sha256(data).hexdigest()
    served[OVERLAY] = Source(data=data, expect_sha256=digest)
    return Harness(HARNESS_SCRIPT, served, digest)


def overlay_cpio(files: Sequence[OverlayFile], mtime: int = 0) -> bytes:
    """A newc archive of `files` under overlay/, with every parent directory, owned by root."""
    names: dict[str, Entry] = {"overlay": Entry("overlay", stat.S_IFDIR | 0o755, mtime=mtime)}
    for item in files:
        rel = item.path.strip("/")
        if not rel or ".." in rel.split("/"):
            raise UsageError(f"overlay path {item.path!r} is not inside the root")
        parts = rel.split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            mode = OVERLAY_DIR_MODES.get(parent, 0o755)
            names.setdefault(
                f"overlay/{parent}", Entry(f"overlay/{parent}", stat.S_IFDIR | mode, mtime=mtime)
            )
        names[f"overlay/{rel}"] = Entry(
            f"overlay/{rel}", stat.S_IFREG | (item.mode & 0o7777), mtime=mtime, data=item.data
        )
    buf = io.BytesIO()
    writer = CpioWriter(buf)
    for name in sorted(names):
        writer.add(names[name])
    writer.close()  # pads to 512 bytes: the next initrd starts aligned
    return buf.getvalue()


def authorized_key(pub: Path) -> OverlayFile:
    """root's authorized_keys from a public key file; a private key is refused, never copied."""
    keys = ssh.public_keys(pub)
    return OverlayFile("root/.ssh/authorized_keys", ("\n".join(keys) + "\n").encode(), 0o600)


def harness_script(*, overlay: bool) -> str:
    """The first script iPXE runs: load the overlay, then chain the build's own boot.ipxe."""
    lines = [
        "#!ipxe",
        "# amnesiac boot harness: boot-time overlay first, then the image's boot.ipxe, unmodified",
    ]
    if overlay:
        lines.append(f"initrd {OVERLAY}")
    lines.append("chain boot.ipxe")
    return "\n".join(lines) + "\n"
