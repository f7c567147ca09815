"""Measured boot in the harness: UEFI firmware (OVMF), a TPM (swtpm) and the UKI, as a server
with a TPM boots, so that `verify` can ask the TPM what booted instead of the target.

The build's `amnesiac.efi` holds the image's initrd alone; the test access (the verifier's key,
a VPN identity) cannot come beside it, because systemd-stub takes no second initrd from a boot
loader (docs/measured-boot/README.md). So each boot makes a *test UKI*: the same kernel,
command line, os-release and stub, with the boot-time overlay after initrd.img in `.initrd`.
What PCR 11 must then hold is predicted from the signed manifest's section digests and the
overlay's own sha256, never from the test UKI: a changed kernel, initrd or command line in it
shows as a mismatch. Before QEMU starts, the harness enrols the machine: it manufactures the
TPM and derives its attestation key, as a provider does before a server enters the fleet, and
PCR 7 is predicted from the Secure Boot variables it enrolled (image/secure_boot.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from amnesiac import attest, paths
from amnesiac.boot.errors import BootError, ImageMismatch
from amnesiac.boot.image import BootImage
from amnesiac.boot.qemu import die_with_parent, opt
from amnesiac.errors import UsageError
from amnesiac.image import measure, secure_boot, uki
from amnesiac.run import stop_group

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
TEST_UKI = "test.efi"


@dataclass(frozen=True)
class MeasuredBoot:
    """What the harness booted under UEFI and what the TPM must say about it."""

    uki_sha256: str  # the test UKI QEMU was given
    parts: dict[str, str]  # what went into it: vmlinuz, initrd.img, overlay.cpio -> sha256
    expected_pcrs: dict[int, str]  # 7 from the enrolled variables, 11 from manifest.json and the overlay
    ak_pem: bytes  # the attestation key enrolled before the first boot
    ek_pem: bytes  # the endorsement key it is bound to (TCG's template L-1), read before it too
    overlay_sha256: str | None  # the test overlay measured with the image in PCR 11
    initrd_sha256: str  # the test UKI's .initrd: the build's initrd, then the overlay
    tampered: str | None = None  # what the harness changed on purpose (negative tests)
    secure_boot: str | None = None  # the enrolled db certificate's sha256, when Secure Boot is on
    stub: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    netbooted: str | None = None  # UefiNetboot: the UKI's name, which iPXE fetched from the root
    uki_size: int = 0  # the UKI's bytes: the firmware (and, netbooted, iPXE) holds them in RAM

    def expected(self) -> attest.Expected:
        """What the quote must show, as the harness enrolled and predicted it."""
        return attest.Expected(
            ak_pem=self.ak_pem,
            expected_pcrs=self.expected_pcrs,
            overlay_sha256=self.overlay_sha256,
            tampered=self.tampered,
            secure_boot=self.secure_boot,
        )

    def enrolment(self) -> attest.Enrolment:
        """This machine's TPM as a provider would enrol it, for `verify` of it over ssh:// (PCR
        11 is then predicted from the build and this UKI's initrd)."""
        return attest.Enrolment(
            ak_pem=self.ak_pem.decode(),
            pcr7=self.expected_pcrs[7],
            secure_boot=self.secure_boot,
            initrd_sha256=self.initrd_sha256,
            overlay_sha256=self.overlay_sha256,
            ek_pem=self.ek_pem.decode(),
        )

    def as_dict(self) -> dict[str, object]:
        return {
            "uki_sha256": self.uki_sha256,
            "parts": self.parts,
            "expected_pcrs": {str(k): v for k, v in self.expected_pcrs.items()},
            "ak_sha256": hashlib.sha256(self.ak_pem).hexdigest(),
            "overlay_sha256": self.overlay_sha256,
            "initrd_sha256": self.initrd_sha256,
            "tampered": self.tampered,
            "secure_boot": self.secure_boot,
            "stub": self.stub,
            "timings": self.timings,
        }


@dataclass(frozen=True)
class Tamper:
    """A test's deliberate change to the test UKI, which attestation must catch."""

    cmdline_suffix: str = ""  # appended to the UKI's own command line (.cmdline: PCR 11)
    # Appended to the UKI's command line and passed by the loader (QEMU's -append): systemd-stub
    # takes a loader's command line only with Secure Boot off, and measures it into PCR 12.
    loader_cmdline_suffix: str = ""
    extra_initrd: bytes = b""  # appended after the overlay (a file the build never had)
    unsigned: bool = False  # under Secure Boot: the UKI is not signed (the firmware must refuse it)
    secure_boot_off: bool = False  # the firmware's Secure Boot turned off after enrolment (PCR 7)

    def describe(self) -> str | None:
        parts = ["UKI not signed"] if self.unsigned else []
        if self.secure_boot_off:
            parts.append("Secure Boot off after enrolment")
        if self.cmdline_suffix:
            parts.append(f"command line + {self.cmdline_suffix!r}")
        if self.loader_cmdline_suffix:
            parts.append(f"loader's command line: the UKI's + {self.loader_cmdline_suffix!r}")
        if self.extra_initrd:
            parts.append(f"initrd + {len(self.extra_initrd)} bytes")
        return ", ".join(parts) or None


@dataclass(frozen=True)
class UefiNetboot:
    """A PXE root netbooted as a fleet's UEFI server boots it (docs/attestation.md): firmware
    whose PK, KEK and db hold the provider's certificate starts `ipxe`, an iPXE EFI binary
    signed with the provider's key (Debian's ipxe.efi, sbsign), which runs the root's boot.ipxe;
    its UEFI branch chains the published, signed amnesiac.efi as it is: no test UKI and no
    overlay, so PCR 11 must be the manifest's own prediction, and no test access either."""

    ipxe: Path
    key: secure_boot.SigningKey  # its certificate is enrolled; the key signed `ipxe` and the UKI


def find_ovmf() -> tuple[Path, Path]:
    for path in (OVMF_CODE, OVMF_VARS):
        if not path.is_file():
            raise UsageError(f"no UEFI firmware ({path})", hint="apt-get install ovmf, or `make setup`")
    return OVMF_CODE, OVMF_VARS


def expected_pcr11(image: BootImage, initrd_sha256: str) -> str:
    """PCR 11 after the stub measured this image's UKI sections with `.initrd` replaced (by the
    image's initrd followed by the test overlay), from manifest.json alone."""
    booted = image.manifest.measured_boot
    if booted is None:
        raise UsageError(f"{image.dir}: the build has no unified kernel image", hint="build it again")
    return measure.pcr11_of_digests({**booted.sections, ".initrd": initrd_sha256})


@dataclass(frozen=True)
class _Uki:
    """The UKI a measured boot starts: the test UKI made for it, or (a UEFI netboot) the build's own."""

    path: Path
    linux_sha256: str  # the kernel as put in it
    initrd_sha256: str  # the build's initrd as copied into it (the manifest's, or refused)
    expected_initrd_sha256: str  # .initrd as PCR 11 must name it: that initrd, then the overlay


def _published_uki(image: BootImage) -> _Uki:
    """The build's own UKI, as a netbooted server gets it: PCR 11 is the manifest's prediction."""
    booted = image.manifest.measured_boot
    if booted is None:
        raise UsageError(f"{image.dir}: the build has no unified kernel image", hint="build it again")
    if booted.signed_by is None:
        raise UsageError(
            f"{image.dir}: its amnesiac.efi is not signed; a UEFI server with Secure Boot would refuse it",
            hint="build it with --secure-boot-key and --secure-boot-cert",
        )
    image.manifest.check_artifacts(image.dir, (booted.file,))
    initrd = booted.sections[".initrd"]
    return _Uki(image.path(booted.file), booted.sections[".linux"], initrd, initrd)


def _test_uki(image: BootImage, work: Path, overlay: bytes, tamper: Tamper) -> _Uki:
    booted, debian = image.manifest.measured_boot, image.manifest.debian
    if booted is None or debian is None:
        raise UsageError(
            f"{image.dir}: the build has no unified kernel image (built before measured boot)",
            hint="build it again",
        )
    image.manifest.check_artifacts(image.dir, (booted.file,))
    initrd = work / "initrd-with-overlay.img"
    shipped, joined = hashlib.sha256(), hashlib.sha256()  # of the bytes copied, not of a re-read
    with initrd.open("wb") as out, image.path("initrd.img").open("rb") as source:
        while chunk := source.read(1 << 20):
            shipped.update(chunk)
            joined.update(chunk)
            out.write(chunk)
        joined.update(overlay)
        out.write(overlay + tamper.extra_initrd)  # the tampering is never in `joined`
    if shipped.hexdigest() != image.expected("initrd.img"):
        raise ImageMismatch(f"{image.path('initrd.img')} changed on disk; refusing to boot it")
    production = measure.uki_sections(image.path(booted.file))
    made = uki.make(
        uki.tools_root(debian.suite, debian.mirror, paths.cache_dir()),
        linux=image.path("vmlinuz"),
        initrds=[initrd],
        cmdline=image.cmdline + tamper.cmdline_suffix,
        os_release=production[".osrel"],
        uname=production[".uname"].decode(),
        out=work / TEST_UKI,
        source_date_epoch=image.manifest.source_date_epoch or 0,
    )
    initrd.unlink()
    return _Uki(made.path, made.sections[".linux"], shipped.hexdigest(), joined.hexdigest())


def _enrol(work: Path) -> tuple[attest.SoftwareTpm, bytes, bytes]:
    """A new TPM, its attestation key and its endorsement key (PEM), derived before the
    machine's first boot."""
    tpm = attest.SoftwareTpm(work / "tpm")
    tpm.create()
    with tpm.serving() as tcti:
        return tpm, attest.derive_ak(tcti), attest.ek_pem(attest.derive_ek(tcti))


@contextlib.contextmanager
def measured_boot(
    image: BootImage,
    work: Path,
    overlay: bytes,
    tamper: Tamper | None = None,
    *,
    secure: bool = True,
    netboot: UefiNetboot | None = None,
) -> Iterator[tuple[MeasuredBoot, list[str], Callable[[], None]]]:
    """Make the test UKI and an enrolled swtpm for one boot (with `secure`, the firmware enrolled
    with a provider key and the UKI signed with it: image/secure_boot.py); yields what to expect,
    QEMU's arguments (firmware, TPM, `-kernel`) and what starts the TPM again before QEMU starts
    again (a QEMU that exits shuts its swtpm down). swtpm stops when the context ends. With
    `netboot`, no test UKI: the firmware starts the signed iPXE, which netboots the build's UKI."""
    code, vars_template = find_ovmf()
    if secure or netboot:
        secure_boot.require_tools()
        code = secure_boot.OVMF_CODE
    tamper = tamper or Tamper()
    timings: dict[str, float] = {}

    started = time.monotonic()
    test_uki = _test_uki(image, work, overlay, tamper) if netboot is None else _published_uki(image)
    timings["test_uki_seconds"] = round(time.monotonic() - started, 1)
    started = time.monotonic()
    tpm, ak, ek = _enrol(work)
    timings["enrol_seconds"] = round(time.monotonic() - started, 1)

    started = time.monotonic()
    if netboot is None:
        variables, key, pcr7 = _firmware_variables(work, vars_template, test_uki.path, tamper, secure=secure)
    else:
        key, variables = netboot.key, work / "OVMF_VARS.fd"
        secure_boot.enrolled_variables(vars_template, key, variables)
        pcr7 = secure_boot.expected_pcr7(variables, key)  # one db entry verified iPXE and the UKI
    timings["secure_boot_seconds"] = round(time.monotonic() - started, 1)

    socket_path = work / "swtpm.sock"
    running: list[subprocess.Popen[bytes]] = []

    def start_tpm() -> None:
        """(Again:) the same enrolled TPM state, on the same socket; QEMU's start resets it, as a
        power-on does."""
        if running:
            stop_group(running.pop(), term_timeout=5)
            socket_path.unlink(missing_ok=True)
        running.append(tpm.qemu_socket(socket_path, preexec_fn=die_with_parent))  # gone with the harness
        _wait_socket(socket_path, running[-1])

    try:
        start_tpm()
        args = [
            "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={opt(code)}",
            "-drive", f"if=pflash,format=raw,unit=1,file={opt(variables)}",
            "-chardev", f"socket,id=chrtpm,path={opt(socket_path)}",
            "-tpmdev", "emulator,id=tpm0,chardev=chrtpm",
            "-device", "tpm-tis,tpmdev=tpm0",
            "-kernel", str(test_uki.path if netboot is None else netboot.ipxe),
        ]  # fmt: skip
        if tamper.loader_cmdline_suffix:
            args += ["-append", image.cmdline + tamper.cmdline_suffix + tamper.loader_cmdline_suffix]
        if secure or netboot:  # the variable store only writable from SMM, as Secure Boot requires
            args += ["-machine", "smm=on", "-global", "driver=cfi.pflash01,property=secure,value=on"]
        parts = {"vmlinuz": test_uki.linux_sha256, "initrd.img": test_uki.initrd_sha256}
        if netboot is not None:
            parts = {test_uki.path.name: image.expected(test_uki.path.name)}
        overlay_sha256 = hashlib.sha256(overlay).hexdigest() if overlay else None
        if overlay_sha256:
            parts["overlay.cpio"] = overlay_sha256
        booted = image.manifest.measured_boot
        pcr11 = expected_pcr11(image, test_uki.expected_initrd_sha256)
        yield (
            MeasuredBoot(
                uki_sha256=hashlib.sha256(test_uki.path.read_bytes()).hexdigest(),
                parts=parts,
                expected_pcrs=attest.expected_pcrs(pcr7, pcr11),
                ak_pem=ak,
                ek_pem=ek,
                overlay_sha256=overlay_sha256,
                initrd_sha256=test_uki.expected_initrd_sha256,
                tampered=tamper.describe(),
                secure_boot=key.fingerprint if key else None,
                stub=booted.stub if booted else "",
                timings=timings,
                netbooted=test_uki.path.name if netboot is not None else None,
                uki_size=test_uki.path.stat().st_size,
            ),
            args,
            start_tpm,
        )
    finally:
        for swtpm in running:
            stop_group(swtpm, term_timeout=5)


def _firmware_variables(
    work: Path, template: Path, test_uki: Path, tamper: Tamper, *, secure: bool
) -> tuple[Path, secure_boot.SigningKey | None, str]:
    """OVMF's variable store for the boot (with `secure`, a throwaway key enrolled as PK, KEK
    and db, and the test UKI signed with it), the key, and what PCR 7 must then hold."""
    variables = work / "OVMF_VARS.fd"
    key = None
    if secure:
        key = secure_boot.throwaway_key(work)
        if not tamper.unsigned:
            secure_boot.sign(test_uki, key)
        secure_boot.enrolled_variables(template, key, variables)
    else:
        shutil.copyfile(template, variables)
    # What was enrolled, hence what PCR 7 must hold; then, for the negative, the firmware's own
    # variables without the keys (as its setup screen's "Secure Boot: off" leaves them).
    pcr7 = secure_boot.expected_pcr7(variables, key)
    if tamper.secure_boot_off:
        shutil.copyfile(template, variables)
    return variables, key, pcr7


def _wait_socket(path: Path, process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise BootError(f"swtpm stopped (exit {process.returncode}) before QEMU could use it")
        if time.monotonic() > deadline:
            raise BootError(f"swtpm made no socket {path} in {timeout:.0f} s")
        time.sleep(0.05)
