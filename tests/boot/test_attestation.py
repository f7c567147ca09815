"""Attestation's negative images: a UKI whose command line and initrd differ from the build by a
few bytes, on firmware whose Secure Boot was turned off after enrolment, boots and runs (a
modified server would), and its TPM says so. The quote verifies (right key, right nonce) but
PCR 11 is not the manifest's prediction and PCR 7 not the enrolled policy, so the identity the
report gives is "reported by the target" and the identity check fails; the image asks the
provider's release service for its identity at boot, which refuses the same quote, so the
server runs without one (tests/boot/release.py). One boot carries all
three changes (each boot costs minutes under TCG); that each alone moves its PCR is
tests/test_measure.py's and tests/test_secure_boot.py's, on the same predictions the booted
PCRs matched in test_boot."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from amnesiac import attest, boot
from amnesiac.boot.firmware import Tamper
from amnesiac.boot.overlay import OverlayFile, overlay_cpio
from amnesiac.provider.harness import GUEST_RELEASE
from amnesiac.report.model import REPORTED, Identity
from amnesiac.targets.base import quote_target
from tests.boot.release import ANSWER_TIMEOUT, SAID, release_image, release_service
from tests.boot.test_boot import SSH_TIMEOUT, image, ssh
from tests.images import GUEST_LANE

pytestmark = [pytest.mark.boot, GUEST_LANE]
__all__ = ["image"]  # the fixture: $AMNESIAC_BOOT_BUILD, else the session's OVPN image

# One more word on the command line, passed by the loader as a boot menu's editor would (where
# `apparmor=0` would turn a control off; this one changes nothing, so that the boot surely gets
# as far as the quote): with Secure Boot off the stub takes it, and PCR 12 says so. And a file
# the build never had, in an archive appended to the initrd (the early init copies it): PCR 11.
TAMPERED = Tamper(
    loader_cmdline_suffix=" amnesiac.tampered=1",
    extra_initrd=overlay_cpio([OverlayFile("etc/amnesiac-tampered", b"1\n")]),
    secure_boot_off=True,
)


@dataclass
class _Run:
    rc: int
    stdout: str
    stderr: str


class _SshHost:
    """The one method of a testinfra host that quote_target uses, over the test's ssh."""

    def __init__(self, machine: boot.BootedMachine, key: Path) -> None:
        self.machine, self.key = machine, key

    def run(self, command: str) -> _Run:
        result = subprocess.run(
            ["ssh", "-i", str(self.key), "-p", str(self.machine.ssh_port), "-o", "StrictHostKeyChecking=no",
             "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
             "root@127.0.0.1", command],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        return _Run(result.returncode, result.stdout, result.stderr)


def test_a_tampered_uki_boots_and_fails_attestation(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """...and gets no identity: the release service, holding the identity for this very TPM,
    refuses its quote (the image asks for its identity at boot: tests/boot/release.py)."""
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    image = release_image(request)
    with release_service(image, tmp_path) as release:
        options = boot.BootOptions(
            ssh_key=key.with_suffix(".pub"), tamper=TAMPERED, test_devices=False,
            guest_services=(release.guest_service,),
        )  # fmt: skip
        with boot.running(image.out, options) as machine:
            release.admit(machine)
            machine.wait_ssh(SSH_TIMEOUT)
            machine.wait_console(SAID, timeout=ANSWER_TIMEOUT)
            measured = machine.measured
            assert measured is not None and measured.tampered, "the tampering is named"
            # Both changes took effect: the server runs them.
            assert "amnesiac.tampered=1" in ssh(machine, key, "cat /proc/cmdline").split()
            assert ssh(machine, key, "cat /etc/amnesiac-tampered") == "1\n"
            nonce = attest.new_nonce()
            answer = attest.parse_guest_output(ssh(machine, key, attest.guest_command(nonce)))
            verdict = attest.check(measured.ak_pem, answer, nonce, measured.expected_pcrs)
            record = quote_target(_SshHost(machine, key), measured.expected())
            console = machine.console()
            provider_files = ssh(machine, key, "ls -A /etc/amnesiac/provider")
    assert verdict.signature_ok and verdict.ak_enrolled, verdict.why()  # a genuine quote ...
    assert verdict.mismatched == [7, 11, 12] and not verdict.attested  # ... of something else
    assert not record.attested and all(f"PCR {n}" in record.reason for n in (7, 11, 12)), record.reason
    assert record.tampered == measured.tampered
    assert Identity(tpm=record).established_by == REPORTED
    # The release service saw the same at boot, and sent no identity.
    assert release.paths() == [("/v1/identity/challenge", 200), ("/v1/identity/quote", 403)]
    refused = f"amnesiac: identity release: https://{GUEST_RELEASE} refused the quote: not attested: PCR 7 is"
    assert refused in console, console[-3000:]
    assert "amnesiac: no provider identity" in console
    assert provider_files == ""


def test_under_secure_boot_an_unsigned_uki_never_starts(image: Path) -> None:
    """The firmware enrolled with the provider's key starts only a UKI that key signed: the same
    test UKI unsigned is refused, no kernel runs, and nothing else boots in its place. No NIC:
    the firmware's network boot options would only add minutes of DHCP and PXE timeouts."""
    options = boot.BootOptions(tamper=Tamper(unsigned=True), test_devices=False, network=False)
    with boot.running(image, options) as machine:
        assert machine.measured is not None and machine.measured.secure_boot
        # What `verify qemu:` meets on such a build: the boot fails at once, saying why.
        with pytest.raises(boot.BootError, match="the firmware found nothing it would boot"):
            machine.wait_ssh(SSH_TIMEOUT)
        console = machine.console()
    assert "Linux version" not in console and "EFI stub" not in console, console[-2000:]
    # The UKI's option fails ("Not Found": EDK2's boot manager reports an image Secure Boot
    # refused so), then the firmware's own shell, unsigned too, is refused by name.
    assert 'failed to load Boot0001 "UEFI Non-Block Boot Device"' in console, console[-2000:]
    assert "Security Violation" in console
