"""Netboot a build in QEMU the way a server boots: iPXE ROM, then HTTP from a loopback server.

The NIC's iPXE ROM gets its first script from QEMU's DHCP (`bootfile=`) and fetches everything
over HTTP from a server this module runs on 127.0.0.1. The build's own `boot.ipxe` is served
unmodified. A test key comes as a second initrd (`overlay.cpio`, see image/README.md): a small
harness script loads it, then `chain`s `boot.ipxe`. iPXE keeps images fetched before `chain`
(`kernel` only selects, it frees nothing; a running script is unregistered while it runs, so it
is not passed on as an initrd), and hands every registered image to the kernel as one
initramfs, in load order: the overlay, then initrd.img. Every response is hashed as it is sent
and vmlinuz and initrd.img must match manifest.json, so what booted is what was built.

The guest network is isolated (`restrict=on`): the guest reaches only QEMU's DHCP and the HTTP
server, through a `guestfwd` rule at 10.0.2.100:80 (slirp refuses forward rules on the host
address 10.0.2.2), and the host reaches the guest's SSH through a forward on 127.0.0.1. Nothing
the image sends can leave the machine.

`running()` is the API (verify uses it); `command()` is `amnesiac boot`. On the way out, even
on Ctrl-C or SIGTERM, QEMU is stopped (QMP `quit`, then signals) and the temporary directory
and the HTTP server are removed.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import io
import json
import logging
import math
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from amnesiac.errors import AmnesiacError, UsageError
from amnesiac.http_serve import FileServer, Served, Source
from amnesiac.image.cpio import CpioWriter, Entry
from amnesiac.image.hashing import sha256_file
from amnesiac.progress import Progress

log = logging.getLogger("amnesiac.boot")

MIB = 1024**2
QEMU = "qemu-system-x86_64"
IPXE_ROMS = (Path("/usr/lib/ipxe/qemu/efi-virtio.rom"), Path("/usr/lib/ipxe/qemu/pxe-virtio.rom"))
GUEST_HTTP = "10.0.2.100"  # where the guest finds the HTTP server (a guestfwd rule, port 80)
HARNESS_SCRIPT = "amnesiac-harness.ipxe"
OVERLAY = "overlay.cpio"
SERVED_ARTIFACTS = ("boot.ipxe", "vmlinuz", "initrd.img")  # the build's files, served unmodified
MUST_MATCH = ("vmlinuz", "initrd.img")  # a boot is refused unless these match the manifest
TEST_DISK_BYTES = 64 * MIB
TEST_STICK_BYTES = 16 * MIB
ACCEL_ENV = "AMNESIAC_ACCEL"

Accel = Literal["auto", "kvm", "tcg"]


class BootError(AmnesiacError):
    """The machine did not boot, or stopped; the message carries the console's last lines."""


class ImageMismatch(BootError):
    """An artifact on disk or on the wire does not match manifest.json: refused to boot it."""


# --- the build ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BootImage:
    """A build directory whose artifacts match its manifest."""

    dir: Path
    manifest: dict[str, Any]

    @property
    def cmdline(self) -> str:
        return str(self.manifest["image"]["cmdline"])

    @property
    def sha256(self) -> str:
        return str(self.manifest["image"]["sha256"])

    def expected(self, name: str) -> str:
        return str(self.manifest["artifacts"][name]["sha256"])

    def path(self, name: str) -> Path:
        return self.dir / name


def load_image(build_dir: Path) -> BootImage:
    """Read manifest.json and check every served artifact against it (sha256 and size)."""
    if not build_dir.is_dir():
        raise UsageError(f"{build_dir}: no such build directory", hint="run `amnesiac build` first")
    manifest_path = build_dir / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
        artifacts = manifest["artifacts"]
        manifest["image"]["cmdline"]
        manifest["image"]["sha256"]
    except FileNotFoundError:
        raise UsageError(f"{manifest_path}: missing; {build_dir} is not a finished build") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{manifest_path}: not an amnesiac manifest ({exc})") from None
    for name in SERVED_ARTIFACTS:
        path = build_dir / name
        meta = artifacts.get(name)
        if meta is None:
            raise ImageMismatch(f"{manifest_path} does not list {name}")
        if not path.is_file():
            raise UsageError(f"{path}: missing; {build_dir} is not a complete build")
        actual = sha256_file(path)
        if actual != meta["sha256"]:
            raise ImageMismatch(
                f"{path} does not match manifest.json (sha256 {actual[:16]}, "
                f"manifest {meta['sha256'][:16]}); refusing to boot it",
                hint="rebuild, or restore the artifact that changed",
            )
    return BootImage(build_dir.resolve(), manifest)


def memory_mib(manifest: dict[str, Any]) -> int:
    """The smallest RAM (MiB) the image boots in, with the margin measured on a real boot.

    Peak use is while the early init unpacks the root: the kernel and its allocations, the
    initramfs still holding root.cpio.zst (about the size of initrd.img) and the root tree
    being filled in its tmpfs (root_unpacked_bytes; root_tmpfs_size_bytes is only its limit).
    After switch_root the initramfs is freed and systemd and the services use that room.
    """
    initrd = int(manifest["artifacts"]["initrd.img"]["size"])
    unpacked = int(manifest["image"]["root_unpacked_bytes"])
    need = KERNEL_AND_SERVICES_BYTES + initrd + unpacked
    return max(MIN_MEMORY_MIB, math.ceil(need / MIB / 32) * 32)


# Measured with the OVPN image (initrd 52 MiB, root 158 MiB), TCG, test devices attached: 304
# MiB boots, 296 MiB does not (the kernel kills zstd while the early init unpacks). That is a
# fixed part of about 94 MiB; 128 MiB leaves room for the VPN clients and conntrack at run time.
KERNEL_AND_SERVICES_BYTES = 128 * MIB
MIN_MEMORY_MIB = 320  # whatever the image: below this a trimmed image has nothing to spare


# --- the boot-time overlay ----------------------------------------------------------------------


@dataclass(frozen=True)
class OverlayFile:
    """A file the early init copies over the root at boot; `path` is relative to /."""

    path: str
    data: bytes
    mode: int = 0o644


# Directories the overlay creates on the way to its files. `cp -a` in the early init copies
# their modes over the image's, so they must be what the image has: /root and ~/.ssh are 0700.
OVERLAY_DIR_MODES = {"root": 0o700, "root/.ssh": 0o700}


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


_KEY_TYPES = re.compile(r"^(ssh-(ed25519|rsa|dss)|ecdsa-sha2-\S+|sk-\S+)\s+[A-Za-z0-9+/=]+(\s.*)?$")


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


def authorized_key(pub: Path) -> OverlayFile:
    """root's authorized_keys from a public key file; a private key is refused, never copied."""
    return OverlayFile("root/.ssh/authorized_keys", ("\n".join(public_keys(pub)) + "\n").encode(), 0o600)


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


# --- options and devices ------------------------------------------------------------------------


@dataclass(frozen=True)
class BootOptions:
    memory_mib: int | None = None  # None: memory_mib(manifest)
    cpus: int = 2
    accel: Accel | None = None  # None: $AMNESIAC_ACCEL, else "auto" (probe KVM, fall back to TCG)
    ssh_key: Path | None = None  # a public key authorised for root through the overlay
    overlay_files: tuple[OverlayFile, ...] = ()  # more boot-time files (a VPN identity)
    test_devices: bool = True  # USB keyboard + USB stick on xhci, and a virtio disk
    ssh_port: int | None = None  # host port forwarded to the guest's 22; None: a free one
    forwards: tuple[tuple[Literal["tcp", "udp"], int], ...] = ()  # more guest ports to forward
    serial_log: Path | None = None  # keep the console log here; None: in the temp dir
    # Netboot from a PXE root that `amnesiac flash` publishes to (every file under it is served,
    # as it is when the boot starts; its boot.ipxe chains into versions/<sha256>/) instead of the
    # build directory. The build passed to running() is then the image expected to boot.
    pxe_root: Path | None = None


@dataclass(frozen=True)
class EmulatedDevice:
    """An emulated device attached so that lockdown and diskless checks meet real hardware."""

    qemu_id: str
    kind: str  # virtio-blk, usb-storage, usb-kbd
    description: str
    serial: str = ""
    backing: Path | None = None  # the raw image behind a disk (removed at exit)
    size: int = 0

    def is_blank(self) -> bool:
        """True while nothing has written to the backing image (it was created all zeros)."""
        if self.backing is None:
            return True
        with self.backing.open("rb") as f:
            while chunk := f.read(1 << 20):
                if chunk.count(0) != len(chunk):
                    return False
        return True

    def as_dict(self) -> dict[str, object]:
        return {"id": self.qemu_id, "kind": self.kind, "description": self.description, "serial": self.serial}


def emulated_devices(work: Path) -> tuple[list[EmulatedDevice], list[str]]:
    """The devices and their QEMU arguments; disks are sparse zero files in `work`."""
    disk, stick = work / "disk.img", work / "stick.img"
    for path, size in ((disk, TEST_DISK_BYTES), (stick, TEST_STICK_BYTES)):
        with path.open("wb") as f:
            f.truncate(size)
    devices = [
        EmulatedDevice("disk0", "virtio-blk", "virtio disk", "amnesiac-disk", disk, TEST_DISK_BYTES),
        EmulatedDevice("kbd0", "usb-kbd", "USB keyboard on xhci"),
        EmulatedDevice(
            "stick0", "usb-storage", "USB stick on xhci", "amnesiac-stick", stick, TEST_STICK_BYTES
        ),
    ]
    args = [
        "-drive", f"if=none,id=disk0-drive,format=raw,file={_opt(disk)}",
        "-device", "virtio-blk-pci,drive=disk0-drive,id=disk0,serial=amnesiac-disk",
        "-device", "qemu-xhci,id=xhci",
        "-device", "usb-kbd,bus=xhci.0,id=kbd0",
        "-drive", f"if=none,id=stick0-drive,format=raw,file={_opt(stick)}",
        "-device", "usb-storage,bus=xhci.0,drive=stick0-drive,id=stick0,serial=amnesiac-stick",
    ]  # fmt: skip
    return devices, args


def _opt(value: object) -> str:
    """A value inside a QEMU option list: commas are doubled."""
    return str(value).replace(",", ",,")


# --- acceleration -------------------------------------------------------------------------------


@dataclass(frozen=True)
class AccelChoice:
    accel: Literal["kvm", "tcg"]
    reason: str


_probe_cache: dict[str, AccelChoice] = {}


def choose_accel(requested: Accel | None, kernel: Path) -> AccelChoice:
    """KVM when a probe guest runs under it, else TCG; the reason is for the output."""
    requested = requested or _env_accel()
    if requested == "tcg":
        return AccelChoice("tcg", "TCG emulation, as asked")
    if requested == "kvm":
        return AccelChoice("kvm", "KVM, as asked (no probe)")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return AccelChoice("tcg", "TCG emulation: /dev/kvm is missing or not usable")
    if "auto" not in _probe_cache:
        _probe_cache["auto"] = _probe_kvm(kernel)
    return _probe_cache["auto"]


def _env_accel() -> Accel:
    value = os.environ.get(ACCEL_ENV, "auto")
    if value not in {"auto", "kvm", "tcg"}:
        raise UsageError(f"${ACCEL_ENV} must be auto, kvm or tcg, not {value!r}")
    return value  # type: ignore[return-value]


def _probe_kvm(kernel: Path, timeout: float = 20.0) -> AccelChoice:
    """Boot the image's kernel under KVM with no root: it must reach its panic, quickly.

    On some hosts /dev/kvm opens but guests hang or stop ("KVM internal error", emulation
    failure in the kernel's decompressor under nested virtualisation); that is a fallback.
    """
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="amnesiac-kvm-probe-") as tmp:
        serial, err = Path(tmp) / "serial.log", Path(tmp) / "qemu.err"
        cmd = [
            QEMU, "-accel", "kvm", "-machine", "q35", "-cpu", "host", "-m", "256", "-nodefaults",
            "-display", "none", "-no-reboot", "-serial", f"file:{serial}",
            "-kernel", str(kernel), "-append", "console=ttyS0 panic=-1",
        ]  # fmt: skip
        with err.open("wb") as err_file:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err_file,
                start_new_session=True,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 (prctl only, no locks)
            )
        verdict = ""
        try:
            while time.monotonic() - start < timeout:
                time.sleep(0.2)
                text = _read(serial)
                if "Kernel panic" in text:
                    verdict = "ok"
                    break
                errors = _read(err)
                if "KVM internal error" in errors or "emulation failure" in errors:
                    verdict = "KVM internal error (emulation failure)"
                    break
                if proc.poll() is not None:
                    verdict = f"the probe guest stopped early (QEMU exit {proc.returncode})"
                    break
            else:
                verdict = f"the probe guest made no progress in {timeout:.0f} s"
        finally:
            _kill_group(proc, grace=0)
    seconds = time.monotonic() - start
    if verdict == "ok":
        return AccelChoice("kvm", f"KVM (a probe guest ran under it in {seconds:.1f} s)")
    return AccelChoice(
        "tcg",
        f"TCG emulation: /dev/kvm is there but KVM guests fail on this host ({verdict}; "
        f"{ACCEL_ENV}=tcg skips this {seconds:.0f} s probe)",
    )


def _read(path: Path) -> str:
    try:
        return path.read_bytes().decode(errors="replace")
    except FileNotFoundError:
        return ""


# --- QEMU ---------------------------------------------------------------------------------------


def find_tools() -> tuple[str, str]:
    """qemu-system-x86_64, an iPXE ROM for virtio-net and busybox (the guestfwd relay)."""
    qemu = shutil.which(QEMU)
    if qemu is None:
        raise UsageError(
            f"missing host tool: {QEMU}", hint="apt-get install qemu-system-x86, or `make setup`"
        )
    rom = next((r for r in IPXE_ROMS if r.is_file()), None)
    if rom is None:
        raise UsageError(
            f"no iPXE ROM for virtio-net ({IPXE_ROMS[0]})", hint="apt-get install ipxe-qemu, or `make setup`"
        )
    busybox = shutil.which("busybox")
    if busybox is None:
        raise UsageError("missing host tool: busybox", hint="apt-get install busybox-static, or `make setup`")
    return qemu, busybox


def qemu_argv(
    *,
    qemu: str,
    relay: str,
    accel: Literal["kvm", "tcg"],
    memory_mib: int,
    cpus: int,
    http_port: int,
    first_script: str,
    forwards: Sequence[tuple[str, int, int]],
    serial_log: Path,
    qmp_socket: Path,
    device_args: Sequence[str] = (),
) -> list[str]:
    """The QEMU command line. `forwards` are (protocol, host port, guest port)."""
    netdev = [
        "user",
        "id=n0",
        "restrict=on",  # the guest reaches nothing but DHCP and the guestfwd rule below
        f"bootfile=http://{GUEST_HTTP}/{first_script}",
        f"guestfwd=tcp:{GUEST_HTTP}:80-cmd:{relay} nc 127.0.0.1 {http_port}",
        *(f"hostfwd={proto}:127.0.0.1:{host}-:{guest}" for proto, host, guest in forwards),
    ]
    return [
        qemu,
        "-name", "amnesiac-boot",
        "-machine", "q35,graphics=off",  # firmware and iPXE print to the serial console too
        "-accel", accel,
        "-cpu", "host" if accel == "kvm" else "max",
        "-smp", str(cpus),
        "-m", str(memory_mib),
        "-nodefaults",
        "-display", "none",
        "-no-reboot",  # a failed boot (panic=, the early init's reboot) ends QEMU
        "-boot", "order=n,strict=on,reboot-timeout=0",  # a failed netboot ends it too
        "-chardev", f"file,id=serial0,path={_opt(serial_log)}",
        "-serial", "chardev:serial0",
        "-qmp", f"unix:{_opt(qmp_socket)},server=on,wait=off",
        "-netdev", _opt_join(netdev),
        # QEMU finds Debian's iPXE ROM by itself; naming it with romfile= stops SeaBIOS from
        # booting it (measured with QEMU 7.2), so find_tools() only checks that it is there.
        "-device", "virtio-net-pci,netdev=n0",
        *device_args,
    ]  # fmt: skip


def _opt_join(parts: Sequence[str]) -> str:
    return ",".join(p.split("=", 1)[0] + "=" + _opt(p.split("=", 1)[1]) if "=" in p else p for p in parts)


class Qmp:
    """A minimal QMP client: one connection, one command at a time."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        self._sock.connect(str(path))
        self._file = self._sock.makefile("rwb")
        self._lock = threading.Lock()
        self.greeting = self._read()
        self.execute("qmp_capabilities")

    def execute(self, command: str, **arguments: object) -> Any:
        """Run a QMP command; return its `return` value; raise BootError on a QMP error."""
        with self._lock:
            message: dict[str, object] = {"execute": command}
            if arguments:
                message["arguments"] = arguments
            self._file.write(json.dumps(message).encode() + b"\n")
            self._file.flush()
            while True:
                reply = self._read()
                if "return" in reply:
                    return reply["return"]
                if "error" in reply:
                    raise BootError(f"QMP {command}: {reply['error'].get('desc', reply['error'])}")

    def _read(self) -> dict[str, Any]:
        line = self._file.readline()
        if not line:
            raise ConnectionError("QMP connection closed")
        data: dict[str, Any] = json.loads(line)
        return data

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()
            self._sock.close()


# --- the running machine ------------------------------------------------------------------------


@dataclass
class BootedMachine:
    """A QEMU guest netbooted from a build; valid inside `running()`."""

    image: BootImage
    accel: AccelChoice
    memory_mib: int
    cpus: int
    ssh_port: int
    ports: dict[str, int]  # "tcp/22" -> host port on 127.0.0.1
    serial_log: Path
    ssh_key: Path | None
    devices: list[EmulatedDevice]
    overlay_sha256: str | None
    process: subprocess.Popen[bytes]
    started: float  # time.monotonic() when QEMU started
    _server: FileServer
    _qmp: Qmp | None
    _qemu_log: Path
    ssh_ready_seconds: float | None = None
    ssh_banner: str = ""
    _stopped: bool = field(default=False, repr=False)

    @property
    def http_url(self) -> str:
        return self._server.url

    def served(self) -> list[Served]:
        """Every request the HTTP server answered, in order."""
        return self._server.records()

    def is_running(self) -> bool:
        return self.process.poll() is None

    def console(self, lines: int = 0) -> str:
        """The serial console so far (the last `lines` non-empty lines when given), plain text."""
        text = _plain(_read(self.serial_log))
        if lines:
            return "\n".join([ln for ln in text.splitlines() if ln.strip()][-lines:])
        return text

    def qmp(self, command: str, **arguments: object) -> Any:
        """A QMP command (`device_add`, `query-status`, ...) to the running QEMU."""
        if self._qmp is None:
            raise BootError("QMP is not connected")
        return self._qmp.execute(command, **arguments)

    def wait_ssh(self, timeout: float = 600.0, on_tick: Callable[[str], None] | None = None) -> float:
        """Block until sshd answers with its banner on the forwarded port; seconds since start.

        Raises BootError if QEMU stops first (with the console's last lines) or on timeout, and
        ImageMismatch if what was served is not what manifest.json lists.
        """
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive("before SSH came up")
            banner = _ssh_banner(self.ssh_port)
            if banner:
                self.ssh_banner = banner
                self.ssh_ready_seconds = round(time.monotonic() - self.started, 1)
                self.check_served()
                return self.ssh_ready_seconds
            if time.monotonic() > deadline:
                raise BootError(
                    f"no SSH banner on 127.0.0.1:{self.ssh_port} {timeout:.0f} s after start",
                    hint=f"console: {self._tail()}",
                )
            if on_tick is not None:
                on_tick(self.console(1)[-100:])
            time.sleep(1.0)

    def wait_console(self, text: str, timeout: float = 600.0) -> float:
        """Block until `text` appears on the serial console; seconds since start."""
        deadline = time.monotonic() + timeout
        while text not in self.console():
            self._check_alive(f"before {text!r} on the console")
            if time.monotonic() > deadline:
                raise BootError(f"{text!r} not on the console after {timeout:.0f} s", hint=self._tail())
            time.sleep(0.5)
        return round(time.monotonic() - self.started, 1)

    def wait_exit(self) -> int:
        """Block until QEMU ends (the guest powered off, or a failed boot); its exit code."""
        while True:
            try:
                return self.process.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                continue

    def check_served(self) -> None:
        """vmlinuz and initrd.img were served whole and match manifest.json."""
        records = self.served()
        for name in MUST_MATCH:
            done = [r for r in records if _basename(r.name) == name and r.status == 200 and r.bytes]
            if not done:
                raise BootError(f"{name} was never served to the guest")
            for record in done:
                if not record.complete or record.sha256 != self.image.expected(name):
                    raise ImageMismatch(
                        f"{name} as served (sha256 {str(record.sha256)[:16]}, {record.bytes} bytes) "
                        f"does not match manifest.json ({self.image.expected(name)[:16]})"
                    )

    def ssh_command(self) -> str:
        key = self.ssh_key
        private = key.with_suffix("") if key and key.suffix == ".pub" else None
        ident = f"-i {shlex.quote(str(private))} " if private else ("-i KEY " if key else "")
        # Host keys are made at each boot: do not record them.
        return (
            f"ssh {ident}-p {self.ssh_port} -o StrictHostKeyChecking=no "
            f"-o UserKnownHostsFile=/dev/null root@127.0.0.1"
        )

    def summary(self) -> dict[str, Any]:
        """What booted and how to reach it, for JSON output and reports."""
        return {
            "build": str(self.image.dir),
            "image_sha256": self.image.sha256,
            "cmdline": self.image.cmdline,
            "accel": self.accel.accel,
            "accel_reason": self.accel.reason,
            "memory_mib": self.memory_mib,
            "cpus": self.cpus,
            "qemu_pid": self.process.pid,
            "ssh": {"host": "127.0.0.1", "port": self.ssh_port, "command": self.ssh_command()},
            "ports": self.ports,
            "ssh_ready_seconds": self.ssh_ready_seconds,
            "ssh_banner": self.ssh_banner,
            "serial_log": str(self.serial_log),
            "http": {"url": self.http_url, "guest_url": f"http://{GUEST_HTTP}/"},
            "overlay_sha256": self.overlay_sha256,
            "served": [r.as_dict() for r in self.served()],
            "devices": [d.as_dict() for d in self.devices],
        }

    def _check_alive(self, when: str) -> None:
        code = self.process.poll()
        if code is None:
            return
        self._refuse_mismatch()  # the likeliest reason, when it applies
        raise BootError(f"QEMU stopped (exit {code}) {when}: {self._tail()}")

    def _refuse_mismatch(self) -> None:
        for record in self.served():
            if (
                _basename(record.name) in MUST_MATCH
                and record.bytes
                and record.sha256 != self.image.expected(_basename(record.name))
            ):
                raise ImageMismatch(f"{record.name} changed on disk while being served; the boot was stopped")

    def _tail(self) -> str:
        return failure_summary(self.console(), _read(self._qemu_log))

    def stop(self) -> None:
        """Power off now: QMP quit, then SIGTERM, then SIGKILL; idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self.process.poll() is None and self._qmp is not None:
            with contextlib.suppress(Exception):
                self._qmp.execute("quit")
        if self._qmp is not None:
            self._qmp.close()
        _kill_group(self.process, grace=10)


_WHY = re.compile(r"^amnesiac: |Kernel panic|Out of memory|\bFAILED\b|No bootable device|Connection reset")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][0-9A-Za-z]|\r")


def failure_summary(console: str, qemu_log: str = "") -> str:
    """One line: the console line that says why a boot failed, its last lines, QEMU's errors."""
    text = [ln.strip() for ln in _plain(console).splitlines() if ln.strip()]
    why = [ln for ln in text if _WHY.search(ln)][-1:]
    lines = why + [ln for ln in text[-3:] if ln not in why]
    lines += [ln.strip() for ln in qemu_log.splitlines() if ln.strip()][-2:]
    return " / ".join(lines) or "(nothing on the console)"


def _plain(text: str) -> str:
    return _ANSI.sub("", text)


def _ssh_banner(port: int, timeout: float = 3.0) -> str:
    """The SSH identification line, if sshd answers (slirp accepts, then closes, before it does)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            data = sock.recv(256)
    except OSError:
        return ""
    line = data.split(b"\r\n", 1)[0].split(b"\n", 1)[0].decode(errors="replace")
    return line if line.startswith("SSH-") else ""


def _free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _kill_group(proc: subprocess.Popen[bytes], grace: float) -> None:
    """Wait `grace` s for the process, then SIGTERM, then SIGKILL; then sweep its group."""
    try:
        proc.wait(timeout=grace if proc.poll() is None and grace else 0.01)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    # QEMU's relay children (busybox nc) share its process group.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _die_with_parent() -> None:
    """In the child: SIGTERM when the harness dies (even by SIGKILL), so QEMU never lingers."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@contextlib.contextmanager
def _shielded() -> Iterator[None]:
    """Cleanup must finish: Ctrl-C and SIGTERM are ignored while it runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def running(build_dir: Path, options: BootOptions | None = None) -> Iterator[BootedMachine]:
    """Netboot `build_dir` in QEMU; on exit (or Ctrl-C) stop it and remove everything.

    Refuses to start when an artifact differs from manifest.json (ImageMismatch), when a tool
    is missing (UsageError), or when QEMU does not start (BootError). Does not wait for the
    guest: call `wait_ssh()`.
    """
    options = options or BootOptions()
    image = load_image(build_dir)
    overlay_files = list(options.overlay_files)
    if options.ssh_key is not None:
        overlay_files.append(authorized_key(options.ssh_key))
    qemu, busybox = find_tools()
    accel = choose_accel(options.accel, image.path("vmlinuz"))
    memory = options.memory_mib or memory_mib(image.manifest)
    ssh_port = options.ssh_port or _free_port()
    ports = {"tcp/22": ssh_port}
    forwards: list[tuple[str, int, int]] = [("tcp", ssh_port, 22)]
    for proto, guest in options.forwards:
        host = _free_port(socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM)
        ports[f"{proto}/{guest}"] = host
        forwards.append((proto, host, guest))

    work = Path(tempfile.mkdtemp(prefix="amnesiac-boot-"))
    stack = contextlib.ExitStack()
    stack.callback(shutil.rmtree, work, ignore_errors=True)
    try:
        table = (
            pxe_root_table(options.pxe_root)
            if options.pxe_root is not None
            else {
                name: Source(path=image.path(name), expect_sha256=image.expected(name))
                for name in SERVED_ARTIFACTS
            }
        )
        overlay_sha256 = None
        if overlay_files:
            mtime = int(image.manifest.get("source_date_epoch") or 0)
            data = overlay_cpio(overlay_files, mtime)
            overlay_sha256 = _sha256(data)
            table[OVERLAY] = Source(data=data, expect_sha256=overlay_sha256)
        first = HARNESS_SCRIPT if overlay_files else "boot.ipxe"
        table[HARNESS_SCRIPT] = Source(data=harness_script(overlay=bool(overlay_files)).encode())
        server = stack.enter_context(FileServer(table))

        devices, device_args = emulated_devices(work) if options.test_devices else ([], [])
        serial_log = options.serial_log or work / "serial.log"
        serial_log.parent.mkdir(parents=True, exist_ok=True)
        qemu_log, qmp_socket = work / "qemu.log", work / "qmp.sock"
        argv = qemu_argv(
            qemu=qemu,
            relay=busybox,
            accel=accel.accel,
            memory_mib=memory,
            cpus=options.cpus,
            http_port=server.port,
            first_script=first,
            forwards=forwards,
            serial_log=serial_log,
            qmp_socket=qmp_socket,
            device_args=device_args,
        )
        log.debug("qemu: %s", shlex.join(argv))
        with qemu_log.open("wb") as err:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                start_new_session=True,  # Ctrl-C reaches us; we stop QEMU ourselves
                preexec_fn=_die_with_parent,  # noqa: PLW1509 (prctl only, no locks)
            )
        machine = BootedMachine(
            image=image,
            accel=accel,
            memory_mib=memory,
            cpus=options.cpus,
            ssh_port=ssh_port,
            ports=ports,
            serial_log=serial_log,
            ssh_key=options.ssh_key,
            devices=devices,
            overlay_sha256=overlay_sha256,
            process=process,
            started=time.monotonic(),
            _server=server,
            _qmp=None,
            _qemu_log=qemu_log,
        )
        stack.callback(_shielded_stop, machine)
        machine._qmp = _connect_qmp(machine, qmp_socket)
        yield machine
    finally:
        with _shielded():
            stack.close()


def pxe_root_table(root: Path) -> dict[str, Source]:
    """Every regular file under a PXE root, by its path relative to it (hidden ones left out)."""
    if not (root / "boot.ipxe").is_file():
        raise UsageError(f"{root}: no boot.ipxe; not a PXE root (see `amnesiac flash --to`)")
    table = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            table[rel.as_posix()] = Source(path=path)
    return table


def _basename(name: str) -> str:
    """A served name without its directories: versions/<sha256>/initrd.img is an initrd.img."""
    return name.rsplit("/", 1)[-1]


def _shielded_stop(machine: BootedMachine) -> None:
    with _shielded():
        machine.stop()


def _connect_qmp(machine: BootedMachine, path: Path, timeout: float = 15.0) -> Qmp:
    """QEMU is up once its QMP socket answers; a bad option or a busy port ends it first."""
    deadline = time.monotonic() + timeout
    while True:
        if machine.process.poll() is not None:
            raise BootError(f"QEMU did not start: {machine._tail()}")
        if path.exists():
            with contextlib.suppress(OSError):
                return Qmp(path)
        if time.monotonic() > deadline:
            raise BootError(f"QEMU did not open its QMP socket in {timeout:.0f} s: {machine._tail()}")
        time.sleep(0.1)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- `amnesiac boot` ----------------------------------------------------------------------------


def command(build_dir: Path, options: BootOptions, *, wait: bool, json_out: bool, timeout: float) -> int:
    """`amnesiac boot`: boot, say how to reach the machine, maybe wait for SSH, run until Ctrl-C."""
    progress = Progress(quiet=json_out)

    def say(text: str) -> None:
        if not progress.quiet:  # soft wrap: the ssh command must stay one line to copy
            progress.console.print(text, soft_wrap=True)

    with running(build_dir, options) as machine:
        say(
            f"[bold]booting[/] {machine.image.dir} (image {machine.image.sha256[:12]}): "
            f"{machine.memory_mib} MiB, {machine.cpus} vCPUs, {machine.accel.reason}"
        )
        say(f"  netboot: {machine.http_url} (the guest's http://{GUEST_HTTP}/; guest network isolated)")
        say(f"  serial console: {machine.serial_log}")
        if machine.devices:
            say("  test devices: " + ", ".join(d.description for d in machine.devices))
        say(f"  ssh: {machine.ssh_command()}")
        if wait or json_out:
            with progress.stage("boot", "waiting for SSH") as stage:
                seconds = machine.wait_ssh(timeout, on_tick=progress.detail)
                stage.note = f"{machine.ssh_banner}; served files match manifest.json"
            if json_out:
                print(json.dumps(machine.summary(), indent=2), flush=True)
            say(f"[bold green]ready[/] in {seconds:.1f} s: {machine.ssh_command()}")
        say("[dim]running until Ctrl-C, which powers the machine off and removes its files[/]")
        code = machine.wait_exit()
        console = machine.console(3)
    if "Kernel panic" in console or "amnesiac:" in console:
        raise BootError(f"the machine stopped (QEMU exit {code}): {' / '.join(console.splitlines())}")
    say(f"the machine powered off (QEMU exit {code})")
    return 0
