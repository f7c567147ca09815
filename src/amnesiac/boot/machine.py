"""The running machine: QEMU netbooting a build, how to reach it, and its cleanup.

`running()` is the API (verify uses it). The NIC's iPXE ROM gets its first script from QEMU's
DHCP (`bootfile=`) and fetches everything over HTTP from a server on 127.0.0.1 (boot.http).
Every response is hashed as it is sent and vmlinuz and initrd.img must match manifest.json, so
what booted is what was built. On the way out, even on Ctrl-C or SIGTERM, QEMU is stopped (QMP
`quit`, then signals) and the temporary directory and the HTTP server are removed.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from amnesiac import ssh
from amnesiac.boot.accel import Accel, AccelChoice, choose_accel
from amnesiac.boot.emulator import Emulator
from amnesiac.boot.errors import BootError, ImageMismatch
from amnesiac.boot.firmware import TEST_UKI, MeasuredBoot, Tamper, UefiNetboot, measured_boot
from amnesiac.boot.http import FileServer, Served, Source
from amnesiac.boot.image import (
    MUST_MATCH,
    BootImage,
    ServedFiles,
    memory_mib,
    served_from_build,
    served_name,
    uki_memory_mib,
)
from amnesiac.boot.link import ClientLink, attach, client_link
from amnesiac.boot.memory import MemorySearch, search_guest
from amnesiac.boot.overlay import OverlayFile, authorized_key, harness, overlay_cpio
from amnesiac.boot.qemu import (
    GUEST_HTTP,
    EmulatedDevice,
    GuestService,
    emulated_devices,
    find_tools,
    firmware_failure,
    qemu_argv,
    read_log,
)
from amnesiac.boot.qmp import Qmp
from amnesiac.boot.reset import boot_again
from amnesiac.errors import UsageError


@dataclass(frozen=True)
class BootOptions:
    memory_mib: int | None = None  # None: memory_mib(manifest)
    cpus: int = 2
    accel: Accel | None = None  # None: $AMNESIAC_ACCEL, else "auto" (probe KVM, fall back to TCG)
    ssh_key: Path | None = None  # a public key authorised for root through the overlay
    overlay_files: tuple[OverlayFile, ...] = ()  # more boot-time files (a VPN identity)
    test_devices: bool = True  # USB keyboard + stick, a virtio disk, ERST, an SMBIOS credential
    ssh_port: int | None = None  # host port forwarded to the guest's 22; None: a free one
    serial_log: Path | None = None  # keep the console log here; None: in the temp dir
    guest_services: tuple[GuestService, ...] = ()  # host services the guest may reach
    # A second NIC linked to a namespace of the harness's own (boot.link), for real clients.
    client_link: bool = False
    # UEFI + TPM + the build's UKI (boot/firmware.py), so the TPM can say what booted. None: when
    # the build has a UKI and is booted from its own directory (a PXE root is netbooted).
    measured: bool | None = None
    tamper: Tamper | None = None  # a deliberate change to the measured UKI (negative tests)
    secure_boot: bool = True  # measured: the firmware enrolled with a key, the UKI signed with it
    # A PXE root netbooted as a fleet's UEFI server (Secure Boot, a signed iPXE, the published
    # UKI): measured, with no overlay and so no test access (boot/firmware.py).
    uefi_netboot: UefiNetboot | None = None
    network: bool = True  # False: no NIC (no SSH either): a boot only watched on its console


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
    emulator: Emulator  # QEMU, and whether the emulator lost a first boot
    started: float  # time.monotonic() when QEMU started
    _server: FileServer
    _qmp: Qmp | None
    _qmp_socket: Path
    link: ClientLink | None = None  # BootOptions.client_link
    checks_qmp: Path | None = None  # the monitor the checks' own process connects to
    ssh_ready_seconds: float | None = None
    ssh_banner: str = ""
    measured: MeasuredBoot | None = None  # booted under UEFI with a TPM: what it must attest
    # SSH answered, the console showed what was waited for, or QMP was used: the emulator's
    # failure is reported from then on, no longer booted again.
    _observed: bool = field(default=False, repr=False)
    _stopped: bool = field(default=False, repr=False)

    @property
    def http_url(self) -> str:
        return self._server.url

    def served(self) -> list[Served]:
        """Every request the HTTP server answered, in order."""
        return self._server.records()

    @property
    def process(self) -> subprocess.Popen[bytes]:
        return self.emulator.process

    @property
    def emulator_retry(self) -> str | None:
        """The emulator failure the guest was booted again after (boot/emulator.py), if any."""
        return self.emulator.lost

    def is_running(self) -> bool:
        return self.process.poll() is None

    def console(self, lines: int = 0) -> str:
        """The serial console so far (the last `lines` non-empty lines when given), plain text."""
        text = _plain(read_log(self.serial_log))
        if lines:
            return "\n".join([ln for ln in text.splitlines() if ln.strip()][-lines:])
        return text

    def qmp(self, command: str, **arguments: object) -> Any:
        """A QMP command (`device_add`, `query-status`, ...) to the running QEMU."""
        if self._qmp is None:
            raise BootError("QMP is not connected")
        self._observed = True  # what it changes would not survive booting again
        return self._qmp.execute(command, **arguments)

    def search_memory(self, needles: Mapping[str, bytes]) -> MemorySearch:
        """Search the guest's whole RAM, dumped through QMP, for each needle (boot/memory.py)."""
        if self._qmp is None:
            raise BootError("QMP is not connected")
        self._observed = True
        return search_guest(self._qmp, self.work, needles)

    @property
    def work(self) -> Path:
        """The harness's private directory (removed with the machine): where dumps are written."""
        return self.emulator.log.parent

    def wait_ssh(self, timeout: float = 600.0, on_tick: Callable[[str], None] | None = None) -> float:
        """Block until sshd answers with its banner on the forwarded port; seconds since start.

        Raises BootError if QEMU stops first (with the console's last lines) or on timeout, and
        ImageMismatch if what was served is not what manifest.json lists.
        """
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive("before SSH came up")
            banner = ssh.read_banner(self.ssh_port)
            if banner:
                self.ssh_banner = banner
                self.ssh_ready_seconds = round(time.monotonic() - self.started, 1)
                self._observed = True
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

    def reset(self, timeout: float = 600.0) -> float:
        """A warm reset (boot/reset.py), then wait until sshd of the new boot answers; seconds
        from the reset."""
        if self._qmp is None:
            raise BootError("QMP is not connected")
        self._observed = True
        seconds = boot_again(self._qmp, self.serial_log, self.ssh_port, timeout, alive=self._check_alive)
        self.check_served()  # what the new boot was served is the build too
        return seconds

    def wait_console(self, text: str, timeout: float = 600.0) -> float:
        """Block until `text` appears on the serial console; seconds since start."""
        deadline = time.monotonic() + timeout
        while text not in (console := self.console()):
            self._check_alive(f"before {text!r} on the console", console)
            if time.monotonic() > deadline:
                raise BootError(f"{text!r} not on the console after {timeout:.0f} s", hint=self._tail())
            time.sleep(0.5)
        self._observed = True
        return round(time.monotonic() - self.started, 1)

    def wait_exit(self) -> int:
        """Block until QEMU ends (the guest powered off, or a failed boot); its exit code."""
        # A blocking wait: Ctrl-C or SIGTERM still ends it (PEP 475), and Popen's lock is then
        # released by a with-block. The polling wait takes it with acquire() before its try:
        # a signal landing between the two leaves it held, and cleanup's wait() blocks forever.
        return self.process.wait()

    def check_served(self) -> None:
        """vmlinuz and initrd.img were served whole and match manifest.json (a measured boot
        serves nothing: its UKI is checked before it starts, and the TPM attests what ran; a
        UEFI netboot, the UKI alone)."""
        if self.measured is not None and self.measured.netbooted is None:
            return
        records = self.served()
        for name in (self.measured.netbooted,) if self.measured and self.measured.netbooted else MUST_MATCH:
            done = [r for r in records if served_name(r.name) == name and r.status == 200 and r.bytes]
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
            "emulator_retry": self.emulator_retry,
            "measured_boot": self.measured.as_dict() if self.measured else None,
            "served": [r.as_dict() for r in self.served()],
            "devices": [d.as_dict() for d in self.devices],
        }

    def _check_alive(self, when: str, console: str | None = None) -> None:
        """Raise BootError if QEMU ended or its firmware gave up (judged on `console`, the
        caller's own reading of it, when given). Until something was observed of the guest, or
        done to it, a boot the emulator lost is booted again instead (boot/emulator.py)."""
        code = self.process.poll()
        if code is None:
            if why := firmware_failure(read_log(self.serial_log) if console is None else console):
                raise BootError(f"{why} {when}: {self._tail()}")
            return
        self._refuse_mismatch()  # the likeliest reason, when it applies
        if not self._observed and self._boot_again():
            return
        raise BootError(f"QEMU stopped (exit {code}) {when}: {self._tail()}")

    def _boot_again(self) -> bool:
        """The emulator's second boot, when it lost the first: QEMU restarted, QMP reconnected."""
        console = read_log(self.serial_log)
        if not self.emulator.boot_again(console, failure_summary(console)):
            return False
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = _connect_qmp(self, self._qmp_socket)
        return True

    def _refuse_mismatch(self) -> None:
        for record in self.served():
            name = served_name(record.name)
            if name in MUST_MATCH and record.bytes and record.sha256 != self.image.expected(name):
                raise ImageMismatch(f"{record.name} changed on disk while being served; the boot was stopped")

    def _tail(self) -> str:
        return failure_summary(self.console(), read_log(self.emulator.log))

    def stop(self) -> None:
        """Power off now: QMP quit, then SIGTERM, then SIGKILL; idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self._qmp is not None:  # QEMU started
            if self.process.poll() is None:
                with contextlib.suppress(Exception):
                    self._qmp.execute("quit")
            self._qmp.close()
        self.emulator.stop(grace=10)


@contextlib.contextmanager
def running(build: Path | ServedFiles, options: BootOptions | None = None) -> Iterator[BootedMachine]:
    """Netboot a build directory (or what a `ServedFiles` serves) in QEMU; on exit (or Ctrl-C)
    stop it and remove everything.

    Refuses to start when an artifact differs from manifest.json (ImageMismatch), when a tool
    is missing (UsageError), or when QEMU does not start (BootError). Does not wait for the
    guest: call `wait_ssh()`.
    """
    options = options or BootOptions()
    served = build if isinstance(build, ServedFiles) else served_from_build(build)
    image = served.image
    overlay_files = list(options.overlay_files)
    if options.ssh_key is not None:
        overlay_files.append(authorized_key(options.ssh_key))
    qemu, busybox = find_tools()
    accel = choose_accel(options.accel, image.path("vmlinuz"))
    memory = options.memory_mib or memory_mib(image.manifest)
    netboot = _uefi_netboot(build, options, overlay_files)
    measured_wanted = options.measured if netboot is None else True
    if measured_wanted is None:
        measured_wanted = not isinstance(build, ServedFiles) and image.manifest.measured_boot is not None
    ssh_port = options.ssh_port or _free_port()

    work = _work_dir()
    stack = contextlib.ExitStack()
    stack.callback(shutil.rmtree, work, ignore_errors=True)
    try:
        sde = image.manifest.source_date_epoch or 0
        first = harness(overlay_files, sde)
        server = stack.enter_context(FileServer(_served_table(served, first.files, measured_wanted, netboot)))
        measured, firmware_args, restart_tpm = None, list[str](), None
        if measured_wanted:
            overlay = overlay_cpio(overlay_files, sde) if overlay_files else b""
            measured, firmware_args, restart_tpm = stack.enter_context(
                measured_boot(
                    image, work, overlay, options.tamper, secure=options.secure_boot, netboot=netboot
                )
            )
            memory = options.memory_mib or memory + _uki_memory_mib(work, measured)

        devices, device_args = emulated_devices(work) if options.test_devices else ([], [])
        link = stack.enter_context(client_link(work)) if options.client_link else None
        if link is not None:
            device_args = [*device_args, *link.qemu_args()]
        serial_log = options.serial_log or work / "serial.log"
        serial_log.parent.mkdir(parents=True, exist_ok=True)
        qmp_socket, checks_qmp = work / "qmp.sock", work / "checks-qmp.sock"
        argv = qemu_argv(
            qemu=qemu,
            relay=busybox,
            accel=accel.accel,
            memory_mib=memory,
            cpus=options.cpus,
            http_port=server.port,
            first_script=first.first_script,
            forwards=[("tcp", ssh_port, 22)],
            serial_log=serial_log,
            guest_services=options.guest_services,
            qmp_socket=qmp_socket,
            checks_qmp_socket=checks_qmp,
            device_args=device_args,
            firmware_args=firmware_args,
            network=options.network,
            # Secure Boot refuses iPXE's unsigned ROM: the signed iPXE drives the NIC itself.
            nic_rom=netboot is None,
        )
        if link is not None:
            attach(link, work)  # before QEMU starts: it is given the tap as an open descriptor

        emulator = _emulator(
            argv, work, accel=accel, restart_tpm=restart_tpm, test_devices=options.test_devices, link=link
        )
        machine = BootedMachine(
            image=image,
            accel=accel,
            memory_mib=memory,
            cpus=options.cpus,
            ssh_port=ssh_port,
            ports={"tcp/22": ssh_port},
            serial_log=serial_log,
            ssh_key=options.ssh_key,
            devices=devices,
            overlay_sha256=first.overlay_sha256,
            emulator=emulator,
            started=time.monotonic(),  # the time to SSH includes a boot lost to the emulator, if any
            _server=server,
            _qmp=None,
            _qmp_socket=qmp_socket,
            link=link,
            checks_qmp=checks_qmp,
            measured=measured,
        )
        stack.callback(_shielded_stop, machine)
        emulator.start()
        machine._qmp = _connect_qmp(machine, qmp_socket)
        yield machine
    finally:
        with _shielded():
            stack.close()


def _served_table(
    served: ServedFiles, harness_files: dict[str, Source], measured: bool, netboot: UefiNetboot | None
) -> dict[str, Source]:
    """What the boot's HTTP server serves. A measured boot of a build, nothing: should the
    firmware refuse the UKI, it must not fall back to netbooting the same build unmeasured. A
    UEFI netboot, the PXE root as it is (its script sends UEFI machines to the UKI only). A
    netboot, the build or root and the harness's script and overlay."""
    if netboot is not None:
        return dict(served.table)
    return {} if measured else {**served.table, **harness_files}


def _uefi_netboot(
    build: Path | ServedFiles, options: BootOptions, overlay_files: list[OverlayFile]
) -> UefiNetboot | None:
    """options.uefi_netboot, when it can be done: of a PXE root, with nothing the UKI cannot take."""
    if options.uefi_netboot is not None and (not isinstance(build, ServedFiles) or overlay_files):
        raise UsageError("a UEFI netboot is of a PXE root, with no overlay: the UKI takes none (no test key)")
    return options.uefi_netboot


def _emulator(
    argv: list[str],
    work: Path,
    *,
    accel: AccelChoice,
    restart_tpm: Callable[[], None] | None,
    test_devices: bool,
    link: ClientLink | None,
) -> Emulator:
    """QEMU for this boot: booted again (under TCG), it finds things as at its first start."""

    def as_at_first_start() -> None:
        if restart_tpm is not None:
            restart_tpm()
        if test_devices:
            emulated_devices(work)  # blank again

    return Emulator(
        argv,
        work / "qemu.log",
        tcg=accel.accel == "tcg",
        before_again=as_at_first_start,
        pass_fds=(link.tap_fd,) if link is not None else (),
    )


def _uki_memory_mib(work: Path, measured: MeasuredBoot) -> int:
    """What a UKI boot needs beyond a netboot: the firmware holds the UKI while the kernel starts
    (a netbooted one twice: as iPXE downloaded it, and as the firmware loaded it)."""
    if measured.netbooted is None:
        return uki_memory_mib((work / TEST_UKI).stat().st_size)
    return 2 * uki_memory_mib(measured.uki_size)


# The longest name of a socket in a boot's work directory (QEMU's monitors, swtpm's).
_LONGEST_SOCKET = "checks-qmp.sock"


def _work_dir() -> Path:
    """A boot's private directory, in $TMPDIR unless its sockets' paths would not fit a Unix
    socket address there (a long TMPDIR, as pytest-xdist's): then in /tmp. Removed after."""
    base = tempfile.gettempdir()
    longest = Path(base, "amnesiac-boot-" + "x" * 8, _LONGEST_SOCKET)  # mkdtemp adds 8 characters
    short = len(os.fsencode(longest)) <= ssh.SOCKET_PATH_MAX
    fallback = "/tmp"  # noqa: S108 (mkdtemp: a new directory, mode 0700, of a random name)
    return Path(tempfile.mkdtemp(prefix="amnesiac-boot-", dir=None if short else fallback))


_WHY = re.compile(
    r"^amnesiac: |Kernel panic|Out of memory|\bFAILED\b|No bootable|Error starting kernel|Connection reset"
)
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


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


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
