"""`amnesiac enrol`: a server's TPM enrolled for attestation, read from the server itself.

What `verify` later trusts (attest.Enrolment) is written here once per machine, on a network
the provider trusts (trust on first use; docs/attestation.md, "Enrolling a fleet"):

1. the server's TPM derives its endorsement key (EK, TCG's template) and the attestation key
   (AK, amnesiac's template) and sends both public areas; the templates are checked byte for
   byte, so the AK is a restricted signing key that never leaves a TPM;
2. the AK is bound to the EK: a credential is made here for that EK and the AK's name
   (TPM2_MakeCredential, in software) and the server's TPM must open it
   (TPM2_ActivateCredential), which a TPM does only with that AK loaded beside that EK;
3. a quote over a fresh nonce, signed by that AK, gives PCR 7 (the Secure Boot policy the
   firmware enforces).

The EK is recorded beside the AK: a server enrolled again shows whether it is the same TPM.
With the TPM makers' CAs (--ek-ca), the EK certificate the maker stored in the TPM must name that
EK and chain to one of them: the AK is then bound to a TPM of that maker, not only to whatever
answered.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import rsa

from amnesiac import attest, ssh
from amnesiac.errors import AmnesiacError, UnreachableError, UsageError
from amnesiac.files import create_atomic
from amnesiac.image.secure_boot import certificate, fingerprint
from amnesiac.progress import Progress
from amnesiac.targets.base import ReachOptions, why_failed, why_unreachable
from amnesiac.targets.ssh import SshTarget


class EnrolmentError(AmnesiacError):
    """The server's TPM did not prove what an enrolment records."""


@dataclass(frozen=True)
class EnrolOptions:
    target: str  # ssh://user@host[:port]
    out: Path
    ssh_key: Path | None = None
    secure_boot_cert: Path | None = None  # the db certificate the server's firmware enforces
    ek_ca: Path | None = None  # the TPM makers' CA certificates (PEM) the EK certificate must chain to


@dataclass(frozen=True)
class Enrolled:
    enrolment: attest.Enrolment
    pcrs: dict[int, str]  # as quoted at enrolment
    out: Path | None = None
    ek_certificate: bool = False  # the TPM holds its maker's certificate of the EK

    @property
    def ek_certificate_status(self) -> str:
        if not self.ek_certificate:
            return "absent"
        if self.enrolment.ek_certified_by is None:
            return "not checked (no --ek-ca)"
        return f"chains to {self.enrolment.ek_certified_by}"

    def as_dict(self) -> dict[str, object]:
        """What `enrol --json` prints: the keys by sha256 of their PEM, the PCRs quoted."""
        record = self.enrolment
        return {
            "out": str(self.out) if self.out else None,
            "ak_sha256": hashlib.sha256(record.ak_pem.encode()).hexdigest(),
            "ek_sha256": hashlib.sha256(record.ek_pem.encode()).hexdigest() if record.ek_pem else None,
            "pcrs": {str(i): v for i, v in self.pcrs.items()},
            "secure_boot": record.secure_boot,
            "ek_certificate": self.ek_certificate_status,
        }


def enrol(options: EnrolOptions, progress: Progress) -> Enrolled:
    """Read the target's TPM over SSH and write its enrolment to `options.out` (never over a
    file already there)."""
    if not options.target.startswith(SshTarget.prefix):
        raise UsageError(f"--target {options.target}: enrol reaches a server over SSH ({SshTarget.form})")
    target = SshTarget.parse(options.target.removeprefix(SshTarget.prefix), options.target)
    secure_boot = None
    if options.secure_boot_cert is not None:
        secure_boot = fingerprint(certificate(options.secure_boot_cert))
    if options.out.exists() or options.out.is_symlink():
        raise UsageError(
            f"--out {options.out}: already there; an enrolment is never replaced",
            hint="enrolling this server again on purpose? move the old one away first",
        )
    if not options.out.parent.is_dir():
        raise UsageError(f"--out {options.out}: no directory {options.out.parent}")
    makers = load_ek_cas(options.ek_ca) if options.ek_ca is not None else None
    ssh_key = ssh.private_key(options.ssh_key)
    attest.require_host_tools()
    with tempfile.TemporaryDirectory(prefix="amnesiac-enrol-") as work:
        reach = ReachOptions(work=Path(work), progress=progress, ssh_key=ssh_key)
        with target.reach(reach) as connection:
            with progress.stage("reach", f"reach {target.spec}"):
                host = _reached(connection, target.spec)
            with progress.stage("tpm", "read its TPM: EK, AK, credential, quote"):
                enrolled = enrol_host(host, secure_boot=secure_boot, makers=makers)
    try:
        create_atomic(options.out, enrolled.enrolment.dump())
    except FileExistsError:
        raise UsageError(f"--out {options.out}: appeared while enrolling; left as it is") from None
    return dataclasses.replace(enrolled, out=options.out)


def enrol_host(
    host: Any, *, secure_boot: str | None = None, makers: list[x509.Certificate] | None = None
) -> Enrolled:
    """The TPM dialogue with any host that runs commands (`host.run`: a testinfra host). With
    `makers`, the EK must carry a certificate that chains to one of them."""
    keys = attest.TpmKeys.parse(_ask(host, attest.keys_command(), "keys"))
    certified_by = ek_certified_by(keys, makers) if makers is not None else None
    secret = os.urandom(32)
    opened = _ask(host, attest.activate_command(attest.make_credential(keys, secret)), "credential")
    credential = attest.guest_parts(opened, ("credential",))["credential"]
    if not hmac.compare_digest(credential, secret):
        raise EnrolmentError("the target's TPM opened the credential to something else")
    nonce = attest.new_nonce()
    answer = attest.parse_guest_output(_ask(host, attest.guest_command(nonce), "quote"))
    # Signed by the AK just bound, over this nonce: any PCR values pass here; PCR 7 is read.
    verdict = attest.check(keys.ak_pem, answer, nonce, {})
    if not verdict.attested:
        raise EnrolmentError(f"the target's quote is not its AK's: {verdict.why()}")
    enrolment = attest.Enrolment(
        ak_pem=keys.ak_pem.decode(),
        pcr7=verdict.pcrs[7],
        secure_boot=secure_boot,
        ek_pem=keys.ek_pem.decode(),
        ek_certified_by=certified_by,
    )
    return Enrolled(enrolment, verdict.pcrs, ek_certificate=keys.ek_certificate is not None)


def _reached(connection: Any, spec: str) -> Any:
    """The testinfra host of `connection`, once it has answered a command."""
    try:
        host = connection.testinfra_host()
        answer = host.run("true")
    except Exception as exc:  # testinfra raises its own for a refused connection
        raise UnreachableError(f"cannot reach {spec}: {why_unreachable(exc)}") from None
    if answer.rc != 0:
        raise UnreachableError(f"cannot reach {spec}: {why_failed(answer)}")
    return host


def _ask(host: Any, command: str, what: str) -> str:
    try:
        answer = host.run(command)
    except Exception as exc:  # testinfra raises its own for a lost connection
        raise EnrolmentError(f"cannot ask the target for its {what}: {why_unreachable(exc)}") from None
    if answer.rc != 0:
        raise EnrolmentError(f"the target gave no {what}: {why_failed(answer)}")
    return str(answer.stdout)


def load_ek_cas(path: Path) -> list[x509.Certificate]:
    """--ek-ca: the TPM makers' root and intermediate certificates, PEM, one file."""
    try:
        return x509.load_pem_x509_certificates(path.read_bytes())
    except OSError as exc:
        raise UsageError(f"--ek-ca {path}: {exc.strerror or exc}") from None
    except ValueError:
        raise UsageError(f"--ek-ca {path}: no PEM certificate in it") from None


MAX_CHAIN = 8


def ek_certified_by(keys: attest.TpmKeys, makers: list[x509.Certificate]) -> str:
    """The subject of the `makers` root the TPM's EK certificate chains to, through `makers`'
    intermediates; EnrolmentError if it has none, it names another key, or it chains to none.
    Signatures only: TPM makers' certificates outlive their validity dates by design."""
    if keys.ek_certificate is None:
        raise EnrolmentError("the target's TPM holds no EK certificate (NV 0x01c00002) to check --ek-ca with")
    try:
        # A certificate in NV may be followed by padding: read the DER's own length.
        certificate = x509.load_der_x509_certificate(_der_prefix(keys.ek_certificate))
    except ValueError:
        raise EnrolmentError("the target's EK certificate is not X.509 DER") from None
    ek = keys.ek_key().public_numbers()
    if not isinstance(key := certificate.public_key(), rsa.RSAPublicKey) or key.public_numbers() != ek:
        raise EnrolmentError("the target's EK certificate names another key than its EK")
    current = certificate
    for _ in range(MAX_CHAIN):
        issuer = next((ca for ca in makers if ca.subject == current.issuer and _issued(current, ca)), None)
        if issuer is None:
            raise EnrolmentError(
                f"the target's EK certificate (issuer {current.issuer.rfc4514_string()}) chains to no --ek-ca"
            )
        if issuer.subject == issuer.issuer and _issued(issuer, issuer):
            return issuer.subject.rfc4514_string()
        current = issuer
    raise EnrolmentError(f"the target's EK certificate chain is longer than {MAX_CHAIN}")


def _issued(certificate: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        certificate.verify_directly_issued_by(issuer)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def _der_prefix(data: bytes) -> bytes:
    """The one DER SEQUENCE `data` starts with."""
    if len(data) < 2 or data[0] != 0x30:
        return data
    if data[1] < 0x80:
        return data[: 2 + data[1]]
    count = data[1] & 0x7F
    return data[: 2 + count + int.from_bytes(data[2 : 2 + count])]
