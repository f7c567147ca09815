"""The QEMU command line: the tools it needs, its isolated network and the emulated test devices.

The guest network is isolated (`restrict=on`): the guest reaches only QEMU's DHCP and the HTTP
server, through a `guestfwd` rule at 10.0.2.100:80 (slirp refuses forward rules on the host
address 10.0.2.2), and the host reaches the guest's SSH through a forward on 127.0.0.1. Nothing
the image sends can leave the machine.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from amnesiac.errors import UsageError

MIB = 1024**2
QEMU = "qemu-system-x86_64"
IPXE_ROMS = (Path("/usr/lib/ipxe/qemu/efi-virtio.rom"), Path("/usr/lib/ipxe/qemu/pxe-virtio.rom"))
GUEST_HTTP = "10.0.2.100"  # where the guest finds the HTTP server (a guestfwd rule, port 80)
# The kernel's console line as it hands over to the image's init: the kernel booted.
KERNEL_STARTED = "Run /init as init process"
# What the firmware says when no boot option is left: OVMF then waits for a key, forever, so a
# boot that reaches this line fails now rather than at its SSH timeout.
FIRMWARE_GAVE_UP = re.compile(r"No bootable option or device was found|No bootable device")
# systemd-stub's line when the UKI it started could not start its kernel ("Out of resources":
# no room for the initrd, as a measured boot with too little memory shows); OVMF then stops
# on an exception, and QEMU runs on with nothing to boot.
UKI_FAILED = re.compile(r"Error starting kernel image: .*")


def firmware_failure(console: str) -> str | None:
    """Why the firmware stopped for good, from its console, or None while it may boot on."""
    if FIRMWARE_GAVE_UP.search(console):
        return "the firmware found nothing it would boot"
    if found := UKI_FAILED.search(console):
        return f"the firmware could not start the UKI's kernel ({found.group(0).strip()})"
    return None


NETDEV = "n0"  # the guest NIC's user-mode network (QMP's hostfwd_add names it)
TEST_DISK_BYTES = 64 * MIB
TEST_STICK_BYTES = 16 * MIB
# A firmware persistent store (ACPI ERST, as servers have): the kernel would keep its last log
# there across reboots unless told not to (no_logs: erst_disable). 64 KiB: eight 8 KiB records.
TEST_ERST_BYTES = 64 * 1024
# A systemd credential in the SMBIOS OEM strings (type 11), as a BMC or a hypervisor could set
# one: a tmpfiles line that would have systemd write a file as root. server_base's
# systemd.import_credentials=no refuses it; a system that imports it creates FIRMWARE_CANARY.
FIRMWARE_CANARY = "/run/amnesiac-firmware-credential"
FIRMWARE_CREDENTIAL = f"io.systemd.credential:tmpfiles.extra=f {FIRMWARE_CANARY} 0600 root root - firmware"


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


@dataclass(frozen=True)
class GuestService:
    """A TCP service on the host's loopback that the guest reaches at guest_ip:guest_port (a
    `guestfwd` rule: the only addresses besides DHCP that an isolated guest can reach)."""

    guest_ip: str
    guest_port: int
    host_port: int


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
    guest_services: Sequence[GuestService] = (),
    qmp_socket: Path,
    checks_qmp_socket: Path | None = None,
    device_args: Sequence[str] = (),
    firmware_args: Sequence[str] = (),
    network: bool = True,
    nic_rom: bool = True,
) -> list[str]:
    """The QEMU command line. `forwards` are (protocol, host port, guest port). Without
    `firmware_args` SeaBIOS netboots the NIC's iPXE; with them (boot/firmware.py: OVMF, a TPM
    and `-kernel`) the firmware boots the given UKI. `network=False`: no NIC at all (a boot
    only watched on its console; the firmware has no network boot option to try)."""
    netdev = [
        "user",
        f"id={NETDEV}",
        "restrict=on",  # the guest reaches nothing but DHCP and the guestfwd rule below
        f"bootfile=http://{GUEST_HTTP}/{first_script}",
        f"guestfwd=tcp:{GUEST_HTTP}:80-cmd:{relay} nc 127.0.0.1 {http_port}",
        *(
            f"guestfwd=tcp:{svc.guest_ip}:{svc.guest_port}-cmd:{relay} nc 127.0.0.1 {svc.host_port}"
            for svc in guest_services
        ),
        *(f"hostfwd={proto}:127.0.0.1:{host}-:{guest}" for proto, host, guest in forwards),
    ]
    # Without the NIC's option ROM (an unsigned iPXE that Secure Boot refuses) a signed iPXE
    # given as -kernel drives the NIC itself.
    nic = f"virtio-net-pci,netdev={NETDEV}" + ("" if nic_rom else ",romfile=")
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
        # A failed netboot ends it too.
        *([] if firmware_args else ["-boot", "order=n,strict=on,reboot-timeout=0"]),
        *firmware_args,
        "-chardev", f"file,id=serial0,path={opt(serial_log)}",
        "-serial", "chardev:serial0",
        "-qmp", f"unix:{opt(qmp_socket)},server=on,wait=off",
        # A second monitor for the checks, which run in their own process (QMP serves one client
        # per socket): they dump the guest's memory through it (boot/memory.py).
        *(["-qmp", f"unix:{opt(checks_qmp_socket)},server=on,wait=off"] if checks_qmp_socket else []),
        # QEMU finds Debian's iPXE ROM by itself; naming it with romfile= stops SeaBIOS from
        # booting it (measured with QEMU 7.2), so find_tools() only checks that it is there.
        *(["-netdev", _opt_join(netdev), "-device", nic] if network else []),
        *device_args,
    ]  # fmt: skip


def opt(value: object) -> str:
    """A value inside a QEMU option list: commas are doubled."""
    return str(value).replace(",", ",,")


def _opt_join(parts: Sequence[str]) -> str:
    return ",".join(p.split("=", 1)[0] + "=" + opt(p.split("=", 1)[1]) if "=" in p else p for p in parts)


# --- emulated devices ---------------------------------------------------------------------------


@dataclass(frozen=True)
class EmulatedDevice:
    """An emulated device attached so that lockdown and diskless checks meet real hardware."""

    qemu_id: str
    kind: str  # virtio-blk, usb-storage, usb-kbd, acpi-erst
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
    """The devices and their QEMU arguments; disks and the ERST store are sparse zero files in
    `work` (QEMU formats the store when it starts)."""
    disk, stick, erst = work / "disk.img", work / "stick.img", work / "erst.img"
    for path, size in ((disk, TEST_DISK_BYTES), (stick, TEST_STICK_BYTES), (erst, TEST_ERST_BYTES)):
        with path.open("wb") as f:
            f.truncate(size)
    devices = [
        EmulatedDevice("disk0", "virtio-blk", "virtio disk", "amnesiac-disk", disk, TEST_DISK_BYTES),
        EmulatedDevice("kbd0", "usb-kbd", "USB keyboard on xhci"),
        EmulatedDevice(
            "stick0", "usb-storage", "USB stick on xhci", "amnesiac-stick", stick, TEST_STICK_BYTES
        ),
        EmulatedDevice("erst0", "acpi-erst", "ACPI ERST firmware persistent store"),
        EmulatedDevice("smbios11", "smbios-credential", f"SMBIOS OEM string {FIRMWARE_CREDENTIAL}"),
    ]
    erst_store = f"memory-backend-file,id=erst0-store,size={TEST_ERST_BYTES},share=on,mem-path={opt(erst)}"
    args = [
        "-drive", f"if=none,id=disk0-drive,format=raw,file={opt(disk)}",
        "-device", "virtio-blk-pci,drive=disk0-drive,id=disk0,serial=amnesiac-disk",
        "-device", "qemu-xhci,id=xhci",
        "-device", "usb-kbd,bus=xhci.0,id=kbd0",
        "-drive", f"if=none,id=stick0-drive,format=raw,file={opt(stick)}",
        "-device", "usb-storage,bus=xhci.0,drive=stick0-drive,id=stick0,serial=amnesiac-stick",
        "-object", erst_store,
        "-device", "acpi-erst,memdev=erst0-store,id=erst0",
        "-smbios", f"type=11,value={opt(FIRMWARE_CREDENTIAL)}",
    ]  # fmt: skip
    return devices, args


# --- the process --------------------------------------------------------------------------------


# Looked up here, in the parent: the child of a process with threads (the harness's HTTP server)
# must not dlopen() between fork and exec, where a lock another thread held at the fork stays held.
_PRCTL: Callable[..., int] | None
try:
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):
    _PRCTL = None
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In the child: SIGTERM when the harness dies (even by SIGKILL), so QEMU never lingers."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


def read_log(path: Path) -> str:
    """A file QEMU writes (the serial console, its stderr): '' until it exists."""
    try:
        return path.read_bytes().decode(errors="replace")
    except FileNotFoundError:
        return ""
