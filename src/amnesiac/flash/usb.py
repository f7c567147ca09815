"""Boot media for servers without network boot: an EFI-bootable disk image with the build on it.

The image is a GPT disk with one EFI system partition (FAT, made with dosfstools and filled with
mtools, no mount): systemd-boot from Debian's systemd-boot-efi as the removable-media loader
EFI/BOOT/BOOTX64.EFI, one loader entry that starts vmlinuz with the manifest's command line,
and the build's files at the root of the partition. The command line's `initrd=initrd.img`
makes the kernel's EFI stub load the initrd from there, so the kernel sees the same command
line as when it netboots. manifest.json, its signature, the report and a publish record go
along in amnesiac/, for whoever finds the stick.

The same gate as a publish applies (signature, passing report; --force records the override).
A block device is written only when nothing has it mounted or in use and it holds no
filesystem or partition table (--force: even then, but never when mounted); a file is
replaced through a temporary file and a rename.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from amnesiac.errors import UsageError
from amnesiac.files import write_atomic
from amnesiac.flash import candidate as candidates
from amnesiac.flash.model import MANIFEST, RECORD, REPORT, SIGNATURE, FlashError, Refused
from amnesiac.flash.publish import admit, allowed_signers, operator
from amnesiac.image.hashing import sha256_file
from amnesiac.progress import Progress
from amnesiac.run import require_tools, run

if TYPE_CHECKING:
    from amnesiac.flash.command import FlashOptions

MIB = 1024**2
SECTOR = 512
SYSTEMD_BOOT = Path("/usr/lib/systemd/boot/efi/systemd-bootx64.efi")
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
MIN_ESP_MIB = 64  # FAT32 needs 65525 clusters: 64 MiB of 512-byte clusters is past that
TOOLS_HINT = "apt-get install dosfstools mtools fdisk systemd-boot-efi, or `make setup`"


@dataclass(frozen=True)
class UsbResult:
    target: Path
    device: bool
    size: int
    version: str
    sha256: str  # of the whole image as written
    forced: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {
            "action": "usb",
            "target": str(self.target),
            "device": self.device,
            "size": self.size,
            "version": self.version,
            "sha256": self.sha256,
            "forced": self.forced,
        }

    def summary(self) -> str:
        kind = "device" if self.device else "image"
        return (
            f"[bold green]wrote[/] {self.target} ({kind}, {self.size / MIB:.0f} MiB): EFI boot of "
            f"{self.version[:12]}, image sha256 {self.sha256[:16]}"
        )


def preflight(options: FlashOptions) -> bool:
    """The tools are there and --usb may be written (whether it is a block device), or an error
    now: before anything is signed or written."""
    if options.usb is None or options.build is None:
        raise UsageError("--usb needs BUILD_DIR and a FILE_OR_DEVICE")
    require_tools("mkfs.vfat", "mcopy", "mmd", "sfdisk", "wipefs", package_hint=TOOLS_HINT)
    if not SYSTEMD_BOOT.is_file():
        raise UsageError(f"{SYSTEMD_BOOT} is missing", hint=TOOLS_HINT)
    return check_target(options.usb, force=options.force)


def command(options: FlashOptions, progress: Progress) -> UsbResult:
    device = preflight(options)
    target = options.usb
    if target is None or options.build is None:
        raise UsageError("--usb needs BUILD_DIR and a FILE_OR_DEVICE")
    with progress.stage("check", f"Check {options.build}") as stage:
        found = candidates.load(options.build, options.report)
        allowed, source = allowed_signers(None, options.allowed_signers)
        admitted = admit(found, allowed, source, force=options.force)
        stage.note = f"image {admitted.short}"
    for objection in admitted.objections:
        if not progress.quiet:
            progress.console.print(f"[yellow]forced:[/] {objection}", soft_wrap=True)
    record = admitted.record(serial=1, by=operator(), forced=list(admitted.objections))
    with tempfile.TemporaryDirectory(prefix="amnesiac-usb-") as tmp:
        work = Path(tmp)
        with progress.stage("image", "Make the EFI disk image (dosfstools, mtools, sfdisk)") as stage:
            files: dict[str, Path | bytes] = {
                "vmlinuz": options.build / "vmlinuz",
                "initrd.img": options.build / "initrd.img",
                f"amnesiac/{MANIFEST}": admitted.manifest_bytes,
                f"amnesiac/{RECORD}": record.to_bytes(),
            }
            if admitted.signature is not None:
                files[f"amnesiac/{SIGNATURE}"] = admitted.signature
            if REPORT in admitted.files:
                files[f"amnesiac/{REPORT}"] = admitted.files[REPORT]
            image = make_image(work, admitted, files)
            check_copy(image, {n: admitted.expected[n].sha256 for n in ("vmlinuz", "initrd.img")}, work)
            digest = sha256_file(image)
            stage.note = f"{image.stat().st_size / MIB:.0f} MiB, kernel and initrd checked on it"
        with progress.stage("write", f"Write {target}") as stage:
            write(image, target, device=device)
            stage.note = "synced"
        size = image.stat().st_size
    return UsbResult(target, device, size, admitted.image_sha256, digest, admitted.objections)


# --- the image ----------------------------------------------------------------------------------


def loader_entry(found: candidates.Candidate) -> str:
    """The systemd-boot entry: the kernel with the manifest's command line, nothing added."""
    return (
        f"title amnesiac {found.policy.id} {found.short}\n"
        "linux /vmlinuz\n"
        f"options {found.manifest.image.cmdline}\n"
    )


LOADER_CONF = "default amnesiac.conf\ntimeout 0\neditor no\nauto-entries no\nauto-firmware no\n"


def make_image(work: Path, found: candidates.Candidate, files: dict[str, Path | bytes]) -> Path:
    """A GPT disk image with one FAT EFI system partition holding systemd-boot and `files`."""
    image_sha = found.image_sha256
    content = dict(files)
    content["EFI/BOOT/BOOTX64.EFI"] = SYSTEMD_BOOT
    content["loader/loader.conf"] = LOADER_CONF.encode()
    content["loader/entries/amnesiac.conf"] = loader_entry(found).encode()
    payload = sum(len(d) if isinstance(d, bytes) else d.stat().st_size for d in content.values())
    esp_mib = max(MIN_ESP_MIB, -(-int(payload * 1.1 + 4 * MIB) // MIB))
    esp = work / "esp.img"
    epoch = found.manifest.source_date_epoch or 0
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1", "SOURCE_DATE_EPOCH": str(epoch)}
    volume_id = image_sha[:8]
    run(["mkfs.vfat", "-F", "32", "-S", str(SECTOR), "-n", "AMNESIAC", "-i", volume_id,
         "-C", esp, str(esp_mib * 1024)], capture=True, env=env)  # fmt: skip
    staged = work / "files"
    dirs = sorted({str(parent) for name in content for parent in Path(name).parents if str(parent) != "."})
    for directory in dirs:
        run(["mmd", "-D", "s", "-i", esp, f"::/{directory}"], capture=True, env=env)
    for name, data in sorted(content.items()):
        source = data if isinstance(data, Path) else staged / name
        if isinstance(data, bytes):
            source.parent.mkdir(parents=True, exist_ok=True)
            source.write_bytes(data)
        run(["mcopy", "-o", "-i", esp, source, f"::/{name}"], capture=True, env=env)
    disk = work / "disk.img"
    total = (esp_mib + 2) * MIB  # 1 MiB before the partition, room for the backup GPT after it
    with disk.open("wb") as f:
        f.truncate(total)
    script = (
        "label: gpt\n"
        f"label-id: {uuid.UUID(image_sha[:32])}\n"
        "first-lba: 2048\n"
        f"start=2048, size={esp_mib * MIB // SECTOR}, type={ESP_TYPE}, "
        f'uuid={uuid.UUID(image_sha[32:])}, name="amnesiac"\n'
    )
    run(
        ["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", disk],
        input_bytes=script.encode(),
        capture=True,
    )
    with disk.open("r+b") as out, esp.open("rb") as src:
        out.seek(MIB)
        shutil.copyfileobj(src, out, 4 * MIB)
    return disk


def check_copy(image: Path, expected: dict[str, str], work: Path) -> None:
    """Read the files back from the image's partition: they must match manifest.json."""
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    for name, want in expected.items():
        out = work / f"readback-{name}"
        run(["mcopy", "-n", "-i", f"{image}@@{MIB}", f"::/{name}", out], capture=True, env=env)
        if (got := sha256_file(out)) != want:
            raise Refused(f"{name} as written (sha256 {got[:16]}) does not match manifest.json ({want[:16]})")
        out.unlink()


# --- the target ---------------------------------------------------------------------------------


def check_target(target: Path, *, force: bool) -> bool:
    """Whether `target` is a block device; refuse a mounted or busy one, and data without --force."""
    try:
        mode = target.stat().st_mode
    except FileNotFoundError:
        if not target.parent.is_dir():
            raise UsageError(f"--usb {target}: {target.parent} is not a directory") from None
        return False
    if stat.S_ISBLK(mode):
        if busy := in_use(target):
            raise Refused(f"--usb {target}: {busy}; refusing to write to it (unmount it first)")
        _refuse_data(target, force=force)
        return True
    if stat.S_ISREG(mode):
        if target.stat().st_size:
            _refuse_data(target, force=force)
        return False
    raise UsageError(f"--usb {target}: neither a block device nor a regular file")


def in_use(device: Path) -> str | None:
    """Why a block device is in use (mounted, a partition mounted, held by LVM/dm/md), or None."""
    rdev = device.stat().st_rdev
    numbers = {f"{os.major(rdev)}:{os.minor(rdev)}"}
    sys_dir = Path(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}")
    parts = [p for p in sys_dir.glob("*") if (p / "partition").is_file()] if sys_dir.is_dir() else []
    for part in parts:
        with contextlib.suppress(OSError):
            numbers.add((part / "dev").read_text().strip())
    mounts = mounted_numbers(Path("/proc/self/mountinfo").read_text())
    if hit := numbers & set(mounts):
        return f"it is mounted (on {mounts[min(hit)]})"
    swaps = Path("/proc/swaps").read_text().splitlines()[1:] if Path("/proc/swaps").exists() else []
    for line in swaps:
        with contextlib.suppress(OSError):
            swap = Path(line.split()[0])
            if (
                swap.exists()
                and f"{os.major(swap.stat().st_rdev)}:{os.minor(swap.stat().st_rdev)}" in numbers
            ):
                return "it is in use as swap"
    for entry in [sys_dir, *parts]:
        if entry.is_dir() and any((entry / "holders").glob("*")):
            return f"it is held by {', '.join(h.name for h in (entry / 'holders').iterdir())}"
    return None


def mounted_numbers(mountinfo: str) -> dict[str, str]:
    """major:minor -> mount point, from /proc/self/mountinfo."""
    found: dict[str, str] = {}
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) > 4:
            found.setdefault(fields[2], fields[4])
    return found


def signatures(target: Path) -> list[str]:
    """Filesystem and partition-table signatures wipefs finds on `target` (it changes nothing)."""
    out = run(["wipefs", "--no-act", "--noheadings", "--output", "TYPE", target], capture=True, check=False)
    if out.returncode != 0:
        raise FlashError(f"--usb {target}: cannot probe it ({out.stderr.decode(errors='replace').strip()})")
    return [line.strip() for line in out.stdout.decode().splitlines() if line.strip()]


def _refuse_data(target: Path, *, force: bool) -> None:
    found = signatures(target)
    if found and not force:
        raise Refused(
            f"--usb {target} holds {', '.join(dict.fromkeys(found))}; refusing to write over it",
            hint="--force writes over it",
        )


def write(image: Path, target: Path, *, device: bool) -> None:
    """Copy `image` to `target`: a device in place (opened exclusively), a file by rename."""
    if device:
        size, need = _device_size(target), image.stat().st_size
        if size < need:
            raise FlashError(
                f"--usb {target}: {size / MIB:.0f} MiB is too small for the {need / MIB:.0f} MiB image"
            )
        try:
            fd = os.open(target, os.O_WRONLY | os.O_EXCL | os.O_CLOEXEC)  # EBUSY if mounted meanwhile
        except OSError as exc:
            raise FlashError(f"--usb {target}: cannot open it exclusively ({exc.strerror})") from None
        try:
            with os.fdopen(fd, "wb") as out, image.open("rb") as src:
                shutil.copyfileobj(src, out, 4 * MIB)
                out.flush()
                os.fsync(out.fileno())
        except OSError as exc:
            raise FlashError(f"--usb {target}: writing failed ({exc.strerror})") from None
        return
    try:
        # In memory: the image is the size of its kernel and initrd, which a machine boots from RAM.
        write_atomic(target, image.read_bytes())
    except OSError as exc:
        raise FlashError(f"--usb {target}: writing failed ({exc.strerror})") from None


def _device_size(target: Path) -> int:
    fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)
