"""Stage 4: pack the root directory into initrd.img, and write boot.ipxe.

initrd.img is two concatenated archives, both read by the kernel: a zstd-compressed cpio with
the early init (image/init) and the busybox and zstd it runs, then an uncompressed cpio holding
root.cpio.zst, the whole root filesystem compressed. The early init unpacks root.cpio.zst into
a size-limited tmpfs. Where each piece lies is recorded in manifest.json (`initrd_pieces`), and
`unpack_initrd` reads an image back the same way.
"""

from __future__ import annotations

import enum
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

import jinja2

from amnesiac import paths
from amnesiac.errors import BuildError
from amnesiac.image import rootfs
from amnesiac.image.cpio import CpioWriter, Entry, tree_entries
from amnesiac.image.hashing import sha256_file
from amnesiac.image.plan import read_list
from amnesiac.run import run

IPXE_LIMIT = 2 * 1024**3 - 1  # iPXE loads images up to about 2 GiB


class Profile(enum.Enum):
    """How the root archive is compressed: the zstd level, on every CPU (-T0).

    Measured on the OVPN image (132 MiB of cpio, two cores, 2026-12-02; benchmarks/README.md):
    -3 48.2 MiB in 0.5 s, -9 43.5 MiB in 3.2 s, -15 43.0 MiB in 19.5 s, -17 40.0 MiB in 24.5 s,
    -18 38.6 MiB in 33.6 s (-19 saved 0.1 MiB more for twice the time, 2026-11-23). What ships
    is the smallest archive that is worth its time: the initrd is RAM the server holds while it
    unpacks. A development build packs in half a second for a quick boot of a changed role;
    `flash` refuses to publish one. No --long: its window would be RAM the early init needs.
    """

    RELEASE = "release"
    DEVELOPMENT = "development"

    @property
    def zstd_level(self) -> int:
        return 18 if self is Profile.RELEASE else 3


EARLY_BINARIES = ("usr/bin/busybox", "usr/bin/zstd")
RUNTIME_HEADROOM = 32 * 1024**2  # room for /etc, /var and /root writes at run time
IMAGE_WORD = "amnesiac.image"  # kernel command-line word carrying the initrd's sha256


ROOT_ARCHIVE = "root.cpio.zst"
CPIO_EXTRACT = ("cpio", "-idmu", "--quiet", "--no-absolute-filenames")


@dataclass(frozen=True)
class Piece:
    """One archive inside initrd.img, where it lies and how it is compressed."""

    name: str
    offset: int
    size: int
    compression: str  # "zstd" or "none"


@dataclass(frozen=True)
class PackResult:
    cmdline: str
    root_unpacked_bytes: int
    root_entries: int
    tmpfs_size_bytes: int
    pieces: list[Piece]


def kernel_cmdline(root: Path) -> str:
    """The words roles ask for in /etc/amnesiac/cmdline.d/*.conf, in file-name order."""
    words: list[str] = ["initrd=initrd.img"]
    conf_dir = root / "etc/amnesiac/cmdline.d"
    for conf in sorted(conf_dir.glob("*.conf")) if conf_dir.is_dir() else []:
        for line in read_list(conf):
            words += [w for w in line.split() if w not in words]
    return " ".join(words)


def tmpfs_size(cmdline: str, ram_bytes: int | None = None) -> int | None:
    """The root tmpfs size the early init will mount, from `amnesiac.root_size=`."""
    for word in cmdline.split():
        if word.startswith("amnesiac.root_size="):
            value = word.split("=", 1)[1]
            units = {"k": 1024, "m": 1024**2, "g": 1024**3}
            if value.endswith("%"):
                return None if ram_bytes is None else ram_bytes * int(value[:-1]) // 100
            if value[-1].lower() in units:
                return int(value[:-1]) * units[value[-1].lower()]
            return int(value)
    return None


def pack(
    root: Path,
    out: Path,
    work: Path,
    *,
    early_tools: dict[str, Path],
    clamp: int,
    policy_id: str,
    policy_sha256: str,
    kernel_release: str,
    profile: Profile = Profile.RELEASE,
) -> PackResult:
    cmdline = kernel_cmdline(root)
    inner = work / "root.cpio.zst"
    raw = work / "root.cpio"
    with raw.open("wb") as f:
        writer = CpioWriter(f)
        for entry in tree_entries(root, clamp):
            writer.add(entry)
        writer.close()
    unpacked, entries = writer.bytes_unpacked, writer.entries

    size = tmpfs_size(cmdline)
    if size is not None and unpacked + RUNTIME_HEADROOM > size:
        need = (unpacked + RUNTIME_HEADROOM) // 1024**2 + 1
        raise BuildError(
            f"the root filesystem needs {unpacked // 1024**2} MiB "
            f"(+{RUNTIME_HEADROOM // 1024**2} MiB to run) "
            f"but its tmpfs is {size // 1024**2} MiB",
            hint=f"set ram_root_tmpfs_size_mib to at least {need} in the policy, or make the image smaller",
        )
    level = f"-{profile.zstd_level}"
    run(["zstd", "-q", level, "-T0", "--no-progress", "-f", "-o", inner, raw], capture=True)
    raw.unlink()

    initrd = out / "initrd.img"
    pieces = _write_initrd(initrd, _early_entries(early_tools, clamp), inner, clamp, work)
    inner.unlink()
    if initrd.stat().st_size > IPXE_LIMIT:
        raise BuildError(
            f"initrd.img is {initrd.stat().st_size // 1024**2} MiB; iPXE cannot load more than 2 GiB",
            hint="remove packages or modules from the image",
        )

    # The image names itself on the command line, so a booted server shows in /proc/cmdline
    # which initrd it came from (the command line is not in the initrd: no circularity).
    cmdline += f" {IMAGE_WORD}={sha256_file(initrd)}"
    template = jinja2.Template((paths.image_dir() / "boot.ipxe.j2").read_text(), keep_trailing_newline=True)
    (out / "boot.ipxe").write_text(
        template.render(
            cmdline=cmdline, policy_id=policy_id, policy_sha256=policy_sha256, kernel_release=kernel_release
        )
    )
    return PackResult(cmdline, unpacked, entries, size or 0, pieces)


def _write_initrd(initrd: Path, early: list[Entry], inner: Path, clamp: int, work: Path) -> list[Piece]:
    """Two concatenated archives the kernel unpacks in turn: the early init, zstd-compressed
    (the kernel decompresses it), then an uncompressed one holding root.cpio.zst, which is
    compressed already. Each piece starts on a 512-byte boundary (the kernel skips the zeros)."""
    early_cpio = work / "early.cpio"
    with early_cpio.open("wb") as f:
        writer = CpioWriter(f)
        for entry in early:
            writer.add(entry)
        writer.close()
    early_zst = work / "early.cpio.zst"
    run(["zstd", "-q", "-19", "--no-progress", "-f", "-o", early_zst, early_cpio], capture=True)
    early_cpio.unlink()
    pieces = []
    with initrd.open("wb") as f:
        with early_zst.open("rb") as src:
            f.write(src.read())
        pieces.append(Piece("early", 0, f.tell(), "zstd"))
        f.write(b"\0" * (-f.tell() % 512))
        start = f.tell()
        writer = CpioWriter(f)
        writer.add(Entry(ROOT_ARCHIVE, stat.S_IFREG | 0o600, mtime=clamp, source=inner))
        writer.close()
        pieces.append(Piece("root", start, f.tell() - start, "none"))
    early_zst.unlink()
    return pieces


def stage_early_tools(root: Path, dest: Path) -> dict[str, Path]:
    """Move the early init's tools (EARLY_BINARIES and their libraries) out of a freshly unpacked
    root, before the roles run. busybox comes from where the root's maker set it aside
    (rootfs.EARLY_STASH; its package is purged) and leaves the root with it: its syslogd, klogd,
    httpd and telnetd applets would be a logger or a server one command away. Returns each
    file's name in the early archive and its staged copy."""
    stash = root / rootfs.EARLY_STASH
    set_aside = {"usr/bin/busybox": stash / "busybox"}
    if not set_aside["usr/bin/busybox"].is_file():
        raise BuildError(
            f"the cached root has no {rootfs.EARLY_STASH}/busybox", hint="build again with --refresh"
        )
    files: dict[str, Path] = {}
    for binary in EARLY_BINARIES:
        if binary in set_aside:
            files[binary] = set_aside[binary]  # static: no libraries
            continue
        files[binary] = _resolve(root, "/" + binary)
        for lib in _libraries(root, binary):
            files[_canonical(root, lib)] = _resolve(root, lib)
    staged = {}
    for name, source in sorted(files.items()):
        copy = dest / name
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, copy)
        staged[name] = copy
    shutil.rmtree(stash)
    return staged


def _early_entries(tools: dict[str, Path], clamp: int) -> list[Entry]:
    """The early archive: directories, /dev/console, the init script and its tools."""
    d, x = stat.S_IFDIR | 0o755, stat.S_IFREG | 0o755
    entries = [
        Entry(name, d, mtime=clamp)
        for name in ("dev", "newroot", "proc", "sys", "usr", "usr/bin", "usr/lib", "usr/lib64")
    ]
    # The kernel opens /dev/console for init's output before devtmpfs is mounted.
    entries.append(Entry("dev/console", stat.S_IFCHR | 0o600, mtime=clamp, rdev=os.makedev(5, 1)))
    entries += [
        Entry(name, stat.S_IFLNK | 0o777, mtime=clamp, data=target.encode())
        for name, target in (
            ("bin", "usr/bin"),
            ("lib", "usr/lib"),
            ("lib64", "usr/lib64"),
            ("sbin", "usr/bin"),
        )
    ]
    entries.append(Entry("init", x, mtime=clamp, source=paths.image_dir() / "init"))
    dirs = {str(Path(name).parent) for name in tools} - {"usr/bin", "usr/lib", "usr/lib64", "."}
    entries += [Entry(name, d, mtime=clamp) for name in sorted(dirs)]
    # Modes as in the image: the dynamic loader, like the binaries, must be executable.
    entries += [
        Entry(name, src.stat().st_mode, mtime=clamp, source=src) for name, src in sorted(tools.items())
    ]
    return entries


def _libraries(root: Path, binary: str) -> list[str]:
    """Shared libraries of a binary in the image, as absolute paths inside the image."""
    out = run(["chroot", root, "/usr/bin/ldd", "/" + binary], capture=True, check=False)
    if out.returncode != 0 and b"not a dynamic executable" in out.stdout + out.stderr:
        return []
    libs = []
    for line in out.stdout.decode().splitlines():
        parts = line.split()
        if "=>" in parts and len(parts) >= 3 and parts[2].startswith("/"):
            libs.append(parts[2])
        elif parts and parts[0].startswith("/"):
            libs.append(parts[0])  # the dynamic loader
    if not libs and out.returncode != 0:
        raise BuildError(f"cannot list the libraries of {binary} in the image")
    return libs


def _resolve(root: Path, path: str) -> Path:
    """Follow symlinks inside the image (absolute links point into the image, not the host)."""
    current = Path("/")
    parts = list(Path(path).parts[1:])
    hops = 0
    while parts:
        candidate = current / parts.pop(0)
        host = root / candidate.relative_to("/")
        if host.is_symlink():
            hops += 1
            if hops > 40:
                raise BuildError(f"symlink loop at {path} in the image")
            target = host.readlink()
            parts = list(target.parts[1:] if target.is_absolute() else target.parts) + parts
            current = Path("/") if target.is_absolute() else current
            continue
        current = Path(os.path.normpath(candidate))
    return root / current.relative_to("/")


def _canonical(root: Path, path: str) -> str:
    """Where a library is stored in the early archive: its real directory, its asked-for name."""
    directory = _resolve(root, str(Path(path).parent)).relative_to(root)
    return str(directory / Path(path).name)


def unpack_initrd(initrd: Path | bytes, pieces: list[dict[str, object]], dest: Path) -> tuple[Path, Path]:
    """Unpack an initrd.img (a file, or its bytes) as the kernel and the early init would:
    dest/early and dest/root."""
    early, root = dest / "early", dest / "root"
    early.mkdir(parents=True)
    root.mkdir()
    data = initrd if isinstance(initrd, bytes) else initrd.read_bytes()
    for piece in pieces:
        offset, size = int(str(piece["offset"])), int(str(piece["size"]))
        chunk = data[offset : offset + size]
        if piece["compression"] == "zstd":
            chunk = run(["zstd", "-dcq"], input_bytes=chunk, capture=True).stdout
        run([*CPIO_EXTRACT], input_bytes=chunk, cwd=early, capture=True)
    root_cpio = run(["zstd", "-dcq", early / ROOT_ARCHIVE], capture=True).stdout
    run([*CPIO_EXTRACT], input_bytes=root_cpio, cwd=root, capture=True)
    return early, root
