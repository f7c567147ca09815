"""What the TPM tests share: swtpm machines, the image's TPM tool run here against swtpm's TCP
port instead of a server's /dev/tpmrm0, PCR extends as the firmware and the stub make them, and
a build's manifest that predicts PCR 11."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path
from types import SimpleNamespace

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from amnesiac import attest
from amnesiac.image import measure
from amnesiac.image.manifest import Manifest
from amnesiac.image.measure import ZEROS
from tests.images import REPO

QUOTE_TOOL = REPO / "roles/server_base/files/amnesiac-tpm-quote"
# A UKI's measured sections, small: what `built` predicts PCR 11 for.
SECTIONS = {".linux": b"kernel", ".osrel": b"ID=debian\n", ".cmdline": b"quiet", ".initrd": b"root"}


def software_tpm(state: Path) -> attest.SoftwareTpm:
    """A new TPM (its own endorsement seed) with its state in `state`."""
    machine = attest.SoftwareTpm(state)
    machine.create()
    return machine


def extend(tcti: str, pcr: int, data: bytes) -> None:
    env = {"TPM2TOOLS_TCTI": tcti, "PATH": "/usr/bin:/bin"}
    command = ["tpm2_pcrextend", f"{pcr}:sha256={hashlib.sha256(data).hexdigest()}"]
    subprocess.run(command, check=True, env=env, capture_output=True)


def extend_pcr11(tcti: str, sections: dict[str, bytes]) -> None:
    """Do to PCR 11 what systemd-stub does at boot (two extends per section)."""
    for name in measure.STUB_ORDER:
        if name in sections:
            for data in (name.encode() + b"\0", sections[name]):
                extend(tcti, 11, data)


def built(sections: dict[str, bytes]) -> Manifest:
    """A manifest whose measured_boot predicts PCR 11 for these UKI sections."""
    digests = {name: hashlib.sha256(data).hexdigest() for name, data in sections.items()}
    zeros = "0" * 64
    return Manifest.model_validate(
        {
            "artifacts": {
                n: {"sha256": zeros, "size": 1} for n in ("vmlinuz", "initrd.img", "boot.ipxe", "a.efi")
            },
            "image": {"sha256": zeros, "cmdline": "quiet"},
            "measured_boot": {
                "file": "a.efi",
                "pcr11_sha256": measure.pcr11(sections),
                "pcr12_sha256": ZEROS,
                "sections": digests,
            },
        }
    )


def a_public_key() -> str:
    """A P-256 public key, PEM, of no TPM: another machine's AK."""
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


class SwtpmHost:
    """The one method of a testinfra host that attestation and enrolment use (`run`): each
    command is the image's tool, run with perl here and pointed at swtpm's port."""

    def __init__(self, tcti: str) -> None:
        self.port = tcti.rsplit("port=", 1)[1]
        self.commands: list[str] = []

    def run(self, command: str) -> SimpleNamespace:
        self.commands.append(command)
        tool, *args = command.split()
        assert tool == attest.GUEST_TOOL
        argv = ["perl", str(QUOTE_TOOL), *args, f"127.0.0.1:{self.port}"]
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        return SimpleNamespace(rc=done.returncode, stdout=done.stdout, stderr=done.stderr)
