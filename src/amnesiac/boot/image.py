"""The build being booted and the files the netboot server serves for it.

A boot serves either a build directory's own boot.ipxe, vmlinuz and initrd.img (`served_from_build`)
or everything under a PXE root that `amnesiac flash` publishes to (`served_from_pxe_root`); in
both cases an expected build says which kernel and initrd must reach the guest, and its
artifacts are checked against its manifest before anything starts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from amnesiac.boot.errors import ImageMismatch
from amnesiac.boot.http import Source
from amnesiac.errors import UsageError
from amnesiac.image.manifest import ArtifactMismatch, Manifest

MIB = 1024**2
SERVED_ARTIFACTS = ("boot.ipxe", "vmlinuz", "initrd.img")  # the build's files, served unmodified
MUST_MATCH = ("vmlinuz", "initrd.img")  # a boot is refused unless these match the manifest

# Measured with the OVPN image (initrd 52 MiB, root 158 MiB), TCG, test devices attached: 304
# MiB boots, 296 MiB does not (the kernel kills zstd while the early init unpacks): a fixed part
# of about 94 MiB. Again on 2026-12-01, the negative image (initrd 38 MiB, root 135 MiB): 272 MiB
# boots, 256 does not (about 99 MiB). A CI boot at 320 MiB once ended the way a failed unpack
# ends (power-off 70 s after start), so the margin is a generous 160 MiB: room for the VPN
# clients and conntrack at run time, and for whatever made that boot run out.
KERNEL_AND_SERVICES_BYTES = 160 * MIB
MIN_MEMORY_MIB = 320  # whatever the image: below this a trimmed image has nothing to spare


@dataclass(frozen=True)
class BootImage:
    """A build directory whose artifacts match its manifest."""

    dir: Path
    manifest: Manifest

    @property
    def cmdline(self) -> str:
        return self.manifest.image.cmdline

    @property
    def sha256(self) -> str:
        return self.manifest.sha256

    def expected(self, name: str) -> str:
        return self.manifest.artifacts[name].sha256

    def path(self, name: str) -> Path:
        return self.dir / name


@dataclass(frozen=True)
class ServedFiles:
    """What the netboot server serves, by URL path, and the image expected to boot from it."""

    image: BootImage
    table: Mapping[str, Source]


def load_image(build_dir: Path) -> BootImage:
    """Read manifest.json and check every served artifact against it (sha256 and size)."""
    try:
        manifest = Manifest.load(build_dir, verify_artifacts=SERVED_ARTIFACTS)
    except ArtifactMismatch as exc:
        raise ImageMismatch(f"{exc.message}; refusing to boot it", hint=exc.hint) from None
    return BootImage(build_dir.resolve(), manifest)


def served_from_build(build_dir: Path) -> ServedFiles:
    """A build's boot.ipxe, vmlinuz and initrd.img, each cut off on the wire if it changes."""
    image = load_image(build_dir)
    table = {
        name: Source(path=image.path(name), expect_sha256=image.expected(name)) for name in SERVED_ARTIFACTS
    }
    return ServedFiles(image, table)


def served_from_pxe_root(root: Path, expected: Path) -> ServedFiles:
    """Every regular file under a PXE root, by its path relative to it (hidden ones left out),
    as it is now; `expected` is the build whose kernel and initrd must be the ones served.

    The root's boot.ipxe chains into versions/<version>/: which image boots is the root's choice,
    and the machine refuses (ImageMismatch) if it is not `expected`.
    """
    image = load_image(expected)
    if not (root / "boot.ipxe").is_file():
        raise UsageError(f"{root}: no boot.ipxe; not a PXE root (see `amnesiac flash --to`)")
    table = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            table[rel.as_posix()] = Source(path=path)
    return ServedFiles(image, table)


def memory_mib(manifest: Manifest) -> int:
    """The smallest RAM (MiB) the image boots in, with the margin measured on a real boot.

    Peak use is while the early init unpacks the root: the kernel and its allocations, the
    initramfs still holding root.cpio.zst (about the size of initrd.img) and the root tree
    being filled in its tmpfs (root_unpacked_bytes; root_tmpfs_size_bytes is only its limit).
    After switch_root the initramfs is freed and systemd and the services use that room.
    """
    initrd = manifest.artifacts["initrd.img"].size
    need = KERNEL_AND_SERVICES_BYTES + initrd + manifest.image.root_unpacked_bytes
    return max(MIN_MEMORY_MIB, math.ceil(need / MIB / 32) * 32)


def uki_memory_mib(uki_bytes: int) -> int:
    """The memory (MiB, a multiple of 32) a UKI of `uki_bytes` takes while the firmware holds it."""
    return -(-uki_bytes // (32 * MIB)) * 32


# A measured boot's test UKI is the build's with the harness's overlay after its initrd (a public
# key, an identity: a few KiB).
OVERLAY_ALLOWANCE = 64 * 1024


def refuse_too_little_memory(manifest: Manifest, memory: int, *, measured: bool, what: str) -> None:
    """A UsageError naming `what` (the option) when `memory` MiB is below what this build needs
    booted: the root's unpack (memory_mib) and, booted measured, the UKI the firmware holds while
    the kernel starts. Too little fails quietly otherwise: the unpack stops short of the tree, or
    the firmware stops on "Out of resources" with nothing on the network."""
    need = memory_mib(manifest)
    uki = manifest.artifacts.get("amnesiac.efi")
    if measured and uki is not None:
        need += uki_memory_mib(uki.size + OVERLAY_ALLOWANCE)
    if memory < need:
        how = "booted measured (the UKI too)" if measured and uki is not None else "netbooted"
        raise UsageError(f"{what} {memory}: this image needs at least {need} MiB {how}")


def served_name(name: str) -> str:
    """A served path without its directories: versions/<version>/initrd.img is an initrd.img."""
    return name.rsplit("/", 1)[-1]
