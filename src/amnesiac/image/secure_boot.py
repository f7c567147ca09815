"""Secure Boot: the UKI signed with the provider's key, the firmware enrolled with it.

The build signs amnesiac.efi with the provider's db key when given one (`provider_key`,
`sign`). With Secure Boot on, the firmware starts only a UKI signed by a key in its `db`, and
systemd-stub ignores any command line the boot loader passes (it could otherwise replace the
UKI's, which PCR 11 would not show). The harness plays the provider: it makes a throwaway key
and certificate per boot, enrols the certificate as PK, KEK and db in a copy of OVMF's
variables (virt-firmware), and signs the test UKI with Debian's sbsign. A real provider enrols
its own db key (or signs through shim); docs/attestation.md says how.

PCR 7 says which Secure Boot policy the firmware enforced and which db entry let the UKI run;
`expected_pcr7` predicts it from the variable store the harness enrolled, so a quote shows
Secure Boot switched off or another key's image started, which PCR 11 alone would not.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import shutil
import struct
import sys
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from amnesiac.errors import UsageError
from amnesiac.image.measure import extend
from amnesiac.run import run

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.secboot.fd")
# The owner of the harness's entries in PK, KEK and db (any fixed GUID does).
OWNER_GUID = "7d8e4a4c-6d3b-4f0e-9a39-616d6e657369"
GLOBAL_VARIABLE = uuid.UUID("8be4df61-93ca-11d2-aa0d-00e098032b8c")  # EFI_GLOBAL_VARIABLE
IMAGE_SECURITY_DATABASE = uuid.UUID("d719b2cb-3d3a-4596-a3bc-dad00e67656f")
# What the firmware measures into PCR 7 before it boots anything (EDK2's Tcg2Dxe,
# MeasureAllSecureVariables), in this order; a variable that is not there, with no data.
SECURE_VARIABLES = (
    ("SecureBoot", GLOBAL_VARIABLE),
    ("PK", GLOBAL_VARIABLE),
    ("KEK", GLOBAL_VARIABLE),
    ("db", IMAGE_SECURITY_DATABASE),
    ("dbx", IMAGE_SECURITY_DATABASE),
)
SEPARATOR = bytes(4)  # EV_SEPARATOR, when the firmware is ready to boot


@dataclass(frozen=True)
class SigningKey:
    key: Path  # PEM, RSA 2048 (what the firmware's db verification supports everywhere)
    cert: Path  # PEM, self-signed
    fingerprint: str  # sha256 of the certificate's DER


def require_tools() -> None:
    if shutil.which("sbsign") is None:
        raise UsageError("missing host tool: sbsign", hint="apt-get install sbsigntool, or `make setup`")
    if not OVMF_CODE.is_file():
        raise UsageError(
            f"no Secure Boot firmware ({OVMF_CODE})", hint="apt-get install ovmf, or `make setup`"
        )


def throwaway_key(work: Path, name: str = "amnesiac harness Secure Boot key") -> SigningKey:
    """A key and certificate for one boot, in `work` (removed with it)."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .sign(private, hashes.SHA256())
    )
    key_path, cert_path = work / "sb.key", work / "sb.crt"
    key_path.touch(mode=0o600)
    key_path.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return SigningKey(key_path, cert_path, fingerprint(cert))


def certificate(cert: Path) -> x509.Certificate:
    """The provider's db certificate (--secure-boot-cert, PEM), or one UsageError."""
    if not cert.is_file():
        raise UsageError(f"--secure-boot-cert {cert}: no such file")
    try:
        return x509.load_pem_x509_certificate(cert.read_bytes())
    except ValueError:
        raise UsageError(f"--secure-boot-cert {cert}: not a PEM certificate") from None


def fingerprint(cert: x509.Certificate) -> str:
    """How PCR 7's db entry, the manifest and the report name a certificate: its DER's sha256."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def provider_key(key: Path, cert: Path) -> SigningKey:
    """The provider's own db key and certificate (`amnesiac build --secure-boot-key/-cert`)."""
    if not key.is_file():
        raise UsageError(f"--secure-boot-key {key}: no such file")
    loaded = certificate(cert)
    try:
        private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    except (ValueError, TypeError):
        raise UsageError(f"--secure-boot-key {key}: not an unencrypted PEM private key") from None
    der = serialization.PublicFormat.SubjectPublicKeyInfo
    if private.public_key().public_bytes(serialization.Encoding.DER, der) != loaded.public_key().public_bytes(
        serialization.Encoding.DER, der
    ):
        raise UsageError(f"--secure-boot-key {key}: not the key of --secure-boot-cert {cert}")
    return SigningKey(key, cert, fingerprint(loaded))


def sign(uki: Path, key: SigningKey) -> None:
    """Sign `uki` in place with sbsign (an Authenticode signature: PCR 11 does not change)."""
    signed = uki.with_name(uki.name + ".signed")
    run(["sbsign", "--key", key.key, "--cert", key.cert, "--output", signed, uki], capture=True)
    signed.replace(uki)


def enrolled_variables(template: Path, key: SigningKey, out: Path) -> None:
    """OVMF's variable store with `key` as PK, KEK and db, and Secure Boot on."""
    run(
        [
            sys.executable, "-m", "virt.firmware.vars", "--input", template, "--output", out,
            "--set-pk", OWNER_GUID, key.cert, "--add-kek", OWNER_GUID, key.cert,
            "--add-db", OWNER_GUID, key.cert, "--secure-boot",
        ],
        capture=True,
    )  # fmt: skip


def expected_pcr7(variables: Path, signer: SigningKey | None) -> str:
    """PCR 7 (sha256, hex) after OVMF booted with the variable store `variables` and started an
    image signed by `signer`'s db entry (EV_EFI_VARIABLE_AUTHORITY; None: nothing verified it,
    as with Secure Boot off). Each event is a UEFI_VARIABLE_DATA: the variable's GUID, its
    name's length and its data's, the name (UTF-16), the data."""
    # Imported here: the harness alone reads variable stores (0.1 s of every command's start).
    from virt.firmware.varstore.autodetect import open_varstore  # type: ignore[import-untyped]

    store = open_varstore(os.fspath(variables)).get_varlist()
    secure = secure_boot_on(store)
    pcr = bytes(32)
    for name, guid in SECURE_VARIABLES:
        data = (
            (b"\1" if secure else b"\0")
            if name == "SecureBoot"
            else bytes(store[name].data)
            if name in store
            else b""
        )
        pcr = extend(pcr, _variable_data(guid, name, data))
    pcr = extend(pcr, SEPARATOR)
    if secure and signer is not None:
        cert = x509.load_pem_x509_certificate(signer.cert.read_bytes()).public_bytes(
            serialization.Encoding.DER
        )
        # The db entry that verified the image: EFI_SIGNATURE_DATA, its owner then the certificate.
        pcr = extend(
            pcr, _variable_data(IMAGE_SECURITY_DATABASE, "db", uuid.UUID(OWNER_GUID).bytes_le + cert)
        )
    return pcr.hex()


def secure_boot_on(store: Mapping[str, Any]) -> bool:
    """EDK2's rule (AuthVariableLib): Secure Boot is on in user mode (a PK enrolled) unless the
    platform's switch, SecureBootEnable, says off; a store without the switch gets it set on."""
    if "PK" not in store:
        return False
    switch = store.get("SecureBootEnable")
    return switch is None or bytes(switch.data) == b"\1"


def _variable_data(guid: uuid.UUID, name: str, data: bytes) -> bytes:
    return guid.bytes_le + struct.pack("<QQ", len(name), len(data)) + name.encode("utf-16-le") + data
