"""Remote attestation: a TPM quote of the PCRs that say what booted, checked on the verifier.

A diskless node keeps no key, so its attestation key (AK) is a *primary* key: the TPM derives
it from the endorsement hierarchy's seed and a fixed template, the same key on every boot of
the same TPM. A provider enrols the AK's public half once per machine (`derive_ak` against the
machine's TPM before it enters the fleet, or the first derivation on a machine it trusts);
`verify` then sends a fresh nonce, the target re-derives the AK and quotes PCRs 7, 11 and 12
with it (roles/server_base/files/amnesiac-tpm-quote), and `check` proves on the verifier, with
tpm2_checkquote, that the quote is signed by the enrolled key, carries this nonce and holds the
PCRs predicted: 7 the Secure Boot policy enrolled and the db entry that let the UKI start
(image/secure_boot.py), 11 the UKI's sections from the manifest (image/measure.py), 12 all
zeros (no loader command line, credential or add-on replaced what PCR 11 names).

`SoftwareTpm` is swtpm (Debian's), for the QEMU harness and the tests.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from amnesiac.errors import AmnesiacError, UsageError
from amnesiac.image.manifest import Manifest, Sha256
from amnesiac.image.measure import BANK, ZEROS, pcr11_of_digests
from amnesiac.run import run, spawn, stop_group

# The AK: a restricted ECDSA P-256 signing key, primary in the endorsement hierarchy. Every
# field is fixed, so the TPM's seed alone decides the key (TCG's "AK template" idea, EK-style).
AK_ALGORITHM = "ecc256:ecdsa-sha256:null"
AK_ATTRIBUTES = "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|sign|noda"
QUOTED_PCRS = (7, 11, 12)
NONCE_BYTES = 20
HOST_TOOLS = (
    "tpm2_createprimary", "tpm2_readpublic", "tpm2_quote", "tpm2_checkquote", "tpm2_flushcontext",
    "tpm2_makecredential", "tpm2_createek",
)  # fmt: skip
QUOTE_FILES = ("ak.pem", "quote.msg", "quote.sig", "quote.pcrs")
GUEST_TOOL = "/usr/local/libexec/amnesiac/amnesiac-tpm-quote"
GUEST_FILES = ("ak.der", "quote.msg", "quote.sig", "quote.pcrs")  # what it prints, in hex

# The two keys' public areas (TPMT_PUBLIC) up to their unique field (the ECC point, the RSA
# modulus), as the guest tool's templates make them (TCG TPM 2.0 Part 2, 12.2.4): type, name
# algorithm, object attributes, authPolicy, parameters. A key whose area differs in any byte is
# not one of these.
_SHA256_ALG = b"\x00\x0b"
AK_AREA_PREFIX = bytes.fromhex(
    "0023" "000b"  # ECC, SHA-256
    "00050472"  # fixedTPM|fixedParent|sensitiveDataOrigin|userWithAuth|noDA|restricted|sign
    "0000"  # no authPolicy
    "0010" "0018000b" "0003" "0010"  # no symmetric; ECDSA with SHA-256; NIST P-256; no KDF
)  # fmt: skip
# The EK of TCG's EK Credential Profile, template L-1 (RSA 2048): the key every PC-client TPM's
# maker certifies (NV index 0x01c00002), usable only under PolicySecret(TPM_RH_ENDORSEMENT).
EK_AREA_PREFIX = bytes.fromhex(
    "0001" "000b"  # RSA, SHA-256
    "000300b2"  # fixedTPM|fixedParent|sensitiveDataOrigin|adminWithPolicy|restricted|decrypt
    "0020" "837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa"
    "0006" "0080" "0043" "0010" "0800" "00000000"  # AES-128-CFB; no scheme; 2048 bits; e = 65537
)  # fmt: skip
KEY_FILES = ("ek.public", "ak.public", "ak.der")  # what `amnesiac-tpm-quote --keys` prints
EK_CERTIFICATE = "ek.certificate"  # and this too, where the TPM's maker stored one


class AttestationError(AmnesiacError):
    """A TPM could not be asked, or its answer is not a quote."""


@dataclass(frozen=True)
class Quote:
    """What a target sent: the AK it derived (its claim, not trusted) and a quote made with it."""

    ak_pem: bytes
    message: bytes  # TPMS_ATTEST, as signed
    signature: bytes
    pcrs: bytes  # the quoted PCR values, concatenated in selection order

    def files(self) -> dict[str, bytes]:
        return dict(zip(QUOTE_FILES, (self.ak_pem, self.message, self.signature, self.pcrs), strict=True))


@dataclass(frozen=True)
class Attestation:
    """The verdict on a quote: `attested` only if every part held."""

    signature_ok: bool  # signed by the enrolled AK, over this nonce, PCR digest matching the values
    ak_enrolled: bool  # the target's AK is the enrolled one
    pcrs: dict[int, str]  # what the quote holds (empty when the signature failed)
    expected: dict[int, str]
    detail: str

    @property
    def mismatched(self) -> list[int]:
        return [i for i, want in self.expected.items() if self.pcrs.get(i) != want]

    @property
    def attested(self) -> bool:
        return self.signature_ok and self.ak_enrolled and not self.mismatched

    def why(self) -> str:
        if not self.ak_enrolled:
            return "the target's attestation key is not the enrolled one"
        if not self.signature_ok:
            return f"the quote does not verify: {self.detail}"
        if self.mismatched:
            return "; ".join(
                f"PCR {i} is {self.pcrs.get(i, 'absent')[:16]}…, expected {self.expected[i][:16]}…"
                for i in self.mismatched
            )
        return "attested"


@dataclass(frozen=True)
class Expected:
    """What a target's quote must show: signed by this AK, these PCR values; and what the
    report names beside them (a test overlay measured with the image, a deliberate tampering,
    the Secure Boot certificate the firmware enforces)."""

    ak_pem: bytes
    expected_pcrs: dict[int, str]
    overlay_sha256: str | None = None
    tampered: str | None = None
    secure_boot: str | None = None


class Enrolment(BaseModel):
    """One server's TPM as the provider enrolled it (docs/attestation.md, "Enrolling a fleet"):
    a JSON file, read by `verify` for an ssh:// target (--enrolment) or an inventory host (its
    `amnesiac_enrolment` variable). PCR 11 is not in it: it is the image's, predicted by the
    build's manifest (--build)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ak_pem: str  # the AK's public half, PEM (tpm2_readpublic -f pem, or the quote tool's ak.der)
    pcr7: Sha256  # the Secure Boot policy its firmware enforced at enrolment
    secure_boot: Sha256 | None = None  # the db certificate's sha256, when Secure Boot is on
    # A UKI whose initrd is not the build's own: the harness's test UKI carries the test overlay
    # after it. That initrd's sha256 replaces the manifest's in the PCR 11 prediction, and the
    # overlay is named in the report.
    initrd_sha256: Sha256 | None = None
    overlay_sha256: Sha256 | None = None
    # The endorsement key the AK was bound to at enrolment (`amnesiac enrol`): the TPM's own
    # identity, which its maker's certificate names. `verify` names it in the report.
    ek_pem: str | None = None
    ek_certified_by: str | None = None  # the TPM maker's root its EK certificate chains to (--ek-ca)

    @field_validator("ak_pem", "ek_pem")
    @classmethod
    def _a_public_key(cls, pem: str | None) -> str | None:
        if pem is None:
            return None
        try:
            serialization.load_pem_public_key(pem.encode())
        except ValueError:
            raise ValueError("not a PEM public key") from None
        return pem

    @classmethod
    def load(cls, path: Path, *, what: str = "--enrolment") -> Enrolment:
        """Read one; anything wrong is one UsageError naming the file (and the line or field)."""
        try:
            return cls.model_validate_json(path.read_bytes())
        except OSError as exc:
            raise UsageError(f"{what} {path}: {exc.strerror or exc}") from None
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "the file"
            raise UsageError(f"{what} {path}: {where}: {first['msg']}") from None

    def dump(self) -> str:
        return self.model_dump_json(indent=2, exclude_none=True) + "\n"

    def expected(self, built: Manifest | None) -> Expected:
        """PCR 7 enrolled, PCR 11 predicted from the build (the test UKI's initrd in place of
        its own, when named), PCR 12 zero; AttestationError without a build to predict from."""
        booted = built.measured_boot if built is not None else None
        if booted is None:
            why = "no build to predict PCR 11 from (--build)" if built is None else "the build has no UKI"
            raise AttestationError(f"cannot check the quote: {why}")
        pcr11 = booted.pcr11_sha256
        if self.initrd_sha256 is not None:
            pcr11 = pcr11_of_digests({**booted.sections, ".initrd": self.initrd_sha256})
        return Expected(
            ak_pem=self.ak_pem.encode(),
            expected_pcrs=expected_pcrs(self.pcr7, pcr11),
            overlay_sha256=self.overlay_sha256,
            secure_boot=self.secure_boot,
        )


def new_nonce() -> bytes:
    return os.urandom(NONCE_BYTES)


# --- what runs where the TPM is ------------------------------------------------------------------


def derive_ak_commands(work: str) -> list[list[str]]:
    """tpm2-tools commands that derive the AK into `work`/ak.ctx and write its public PEM."""
    return [
        # A TPM without a resource manager (swtpm over TCP) keeps transient objects; make room.
        ["tpm2_flushcontext", "-t"],
        ["tpm2_createprimary", "-Q", "-C", "e", "-g", "sha256", "-G", AK_ALGORITHM, "-a", AK_ATTRIBUTES,
         "-c", f"{work}/ak.ctx"],
        ["tpm2_readpublic", "-Q", "-c", f"{work}/ak.ctx", "-o", f"{work}/ak.pem", "-f", "pem"],
    ]  # fmt: skip


def quote_commands(work: str, nonce: bytes) -> list[list[str]]:
    """Derive the AK, then quote QUOTED_PCRS over `nonce` into `work`/quote.*."""
    return [
        *derive_ak_commands(work),
        ["tpm2_quote", "-Q", "-c", f"{work}/ak.ctx", "-l", _selection(), "-q", nonce.hex(),
         "-g", "sha256", "-m", f"{work}/quote.msg", "-s", f"{work}/quote.sig", "-o", f"{work}/quote.pcrs",
         "-F", "values"],
    ]  # fmt: skip


def guest_command(nonce: bytes) -> str:
    """The target's side: the image's own quote tool (server_base installs it; perl-base against
    /dev/tpmrm0, so the image needs no Python and no TPM software stack)."""
    return f"{GUEST_TOOL} {nonce.hex()}"


def parse_guest_output(text: str) -> Quote:
    """The quote from the guest tool's output (AttestationError if a part is missing or
    malformed). Its key comes as DER: made PEM here."""
    files = guest_parts(text, GUEST_FILES)
    pem = _pem_of_der(files["ak.der"], "ak.der")
    return Quote(pem, files["quote.msg"], files["quote.sig"], files["quote.pcrs"])


def guest_parts(text: str, names: Sequence[str], optional: Sequence[str] = ()) -> dict[str, bytes]:
    """The guest tool's output: `== name` lines, each followed by its bytes in hex (none for an
    empty part); every one of `names` must be there."""
    files: dict[str, bytes] = {}
    name = None
    for line in text.splitlines():
        if line.startswith("== "):
            name = line[3:].strip()
        elif name is not None and name in (*names, *optional) and line.strip():
            try:
                files[name] = bytes.fromhex(line.strip())
            except ValueError:
                raise AttestationError(f"the target's {name} is not hex") from None
            name = None
    if missing := [n for n in names if n not in files]:
        raise AttestationError(f"the target sent no {', '.join(missing)}")
    return files


def _pem_of_der(der: bytes, what: str) -> bytes:
    try:
        key = serialization.load_der_public_key(der)
    except ValueError:
        raise AttestationError(f"the target's {what} is not a public key") from None
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


# --- binding the AK to the TPM's endorsement key (enrolment) --------------------------------------


@dataclass(frozen=True)
class TpmKeys:
    """A TPM's EK and AK as its public areas (TPM2B_PUBLIC), checked to be made from the two
    templates: the AK a restricted signing key that never leaves the TPM, the EK the profile's;
    and the EK certificate its maker stored, if any (DER, unchecked here)."""

    ek_public: bytes
    ak_public: bytes
    ek_certificate: bytes | None = None

    @classmethod
    def parse(cls, text: str) -> TpmKeys:
        """From `amnesiac-tpm-quote --keys` (AttestationError for anything but the templates)."""
        parts = guest_parts(text, KEY_FILES, optional=(EK_CERTIFICATE,))
        keys = cls(parts["ek.public"], parts["ak.public"], parts.get(EK_CERTIFICATE))
        if keys.ak_pem != _pem_of_der(parts["ak.der"], "ak.der"):
            raise AttestationError("the target's ak.der is not the key of its ak.public")
        keys.ek_key()
        return keys

    @classmethod
    def of_enrolled(cls, ek_pem: bytes, ak_pem: bytes) -> TpmKeys:
        """The public areas again from the two keys an enrolment recorded: the templates fix
        every other byte, so the EK's public key and the AK's decide them (what a verifier needs
        to make a credential for that TPM without asking it)."""
        ek = serialization.load_pem_public_key(ek_pem)
        ak = serialization.load_pem_public_key(ak_pem)
        if not isinstance(ek, rsa.RSAPublicKey) or ek.key_size != 2048 or ek.public_numbers().e != 65537:
            raise AttestationError("the enrolled EK is not an RSA 2048 key of template L-1")
        if not isinstance(ak, ec.EllipticCurvePublicKey) or not isinstance(ak.curve, ec.SECP256R1):
            raise AttestationError("the enrolled AK is not a P-256 key")
        numbers = ak.public_numbers()
        ek_area = EK_AREA_PREFIX + _b2(ek.public_numbers().n.to_bytes(256))
        ak_area = AK_AREA_PREFIX + _b2(numbers.x.to_bytes(32)) + _b2(numbers.y.to_bytes(32))
        return cls(_b2(ek_area), _b2(ak_area))

    @property
    def ak_pem(self) -> bytes:
        x, y = _unique(self.ak_public, AK_AREA_PREFIX, (32, 32), "ak.public")
        try:
            key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + x + y)
        except ValueError:
            raise AttestationError("the target's ak.public is not a point on P-256") from None
        return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def ek_key(self) -> rsa.RSAPublicKey:
        (modulus,) = _unique(self.ek_public, EK_AREA_PREFIX, (256,), "ek.public")
        return rsa.RSAPublicNumbers(65537, int.from_bytes(modulus)).public_key()

    @property
    def ek_pem(self) -> bytes:
        return ek_pem(self.ek_public)

    @property
    def ak_name(self) -> bytes:
        """The AK's TPM name: its name algorithm, then the digest of its public area."""
        return _SHA256_ALG + hashlib.sha256(self.ak_public[2:]).digest()


def _b2(data: bytes) -> bytes:
    """A TPM2B: the size, two bytes big-endian, then the bytes."""
    return len(data).to_bytes(2) + data


def ek_pem(public: bytes) -> bytes:
    """The EK of a TPM2B_PUBLIC made from template L-1, as PEM (AttestationError for another)."""
    key = TpmKeys(public, b"").ek_key()
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _unique(public: bytes, prefix: bytes, sizes: tuple[int, ...], what: str) -> tuple[bytes, ...]:
    """The key of a TPM2B_PUBLIC made from the template `prefix` starts: its TPM2B fields of
    exactly `sizes` (an ECC point's x and y, an RSA modulus), and nothing after them."""
    area = public[2:]
    if len(public) < 2 or int.from_bytes(public[:2]) != len(area) or not area.startswith(prefix):
        raise AttestationError(f"the target's {what} is not a key of its template")
    fields, at = [], len(prefix)
    for size in sizes:
        if area[at : at + 2] != size.to_bytes(2) or len(area) < at + 2 + size:
            raise AttestationError(f"the target's {what} is not a key of its template")
        fields.append(area[at + 2 : at + 2 + size])
        at += 2 + size
    if at != len(area):
        raise AttestationError(f"the target's {what} is not a key of its template")
    return tuple(fields)


def make_credential(keys: TpmKeys, secret: bytes) -> tuple[bytes, bytes]:
    """A credential only the TPM holding `keys`' EK can open, and only with `keys`' AK loaded
    (TPM2_MakeCredential, done in software by tpm2-tools): the credential blob and the
    encrypted seed, each a TPM2B, as TPM2_ActivateCredential takes them."""
    require_host_tools()
    with tempfile.TemporaryDirectory(prefix="amnesiac-credential-") as work:
        (Path(work) / "ek.pub").write_bytes(keys.ek_public)
        (Path(work) / "secret").write_bytes(secret)
        run(["tpm2_makecredential", "-Q", "--tcti", "none", "-u", f"{work}/ek.pub", "-s", f"{work}/secret",
             "-n", keys.ak_name.hex(), "-o", f"{work}/blob"], capture=True)  # fmt: skip
        blob = (Path(work) / "blob").read_bytes()
    # tpm2-tools' file: magic BADCC0DE, version 1, then the TPM2B_ID_OBJECT and the
    # TPM2B_ENCRYPTED_SECRET.
    if blob[:8] != bytes.fromhex("badcc0de00000001"):
        raise AttestationError("tpm2_makecredential wrote a file of another format")
    size = int.from_bytes(blob[8:10])
    return blob[8 : 10 + size], blob[10 + size :]


def keys_command() -> str:
    """The target's side: its EK and AK public areas and EK certificate, by the image's tool."""
    return f"{GUEST_TOOL} --keys"


def activate_command(credential: tuple[bytes, bytes]) -> str:
    """The target's side: TPM2_ActivateCredential with its EK and AK, by the image's tool."""
    blob, seed = credential
    return f"{GUEST_TOOL} --activate {blob.hex()} {seed.hex()}"


def _tpm2(cmd: Sequence[str], tcti: str) -> subprocess.CompletedProcess[bytes]:
    return run(list(cmd), capture=True, env={**os.environ, "TPM2TOOLS_TCTI": tcti})


def derive_ak(tcti: str) -> bytes:
    """The AK's public key (PEM) of the TPM at `tcti` (e.g. swtpm:host=127.0.0.1,port=N)."""
    require_host_tools()
    with tempfile.TemporaryDirectory(prefix="amnesiac-ak-") as work:
        for cmd in derive_ak_commands(work):
            _tpm2(cmd, tcti)
        return (Path(work) / "ak.pem").read_bytes()


def derive_ek(tcti: str) -> bytes:
    """The EK's public area (TPM2B_PUBLIC, TCG's template L-1) of the TPM at `tcti`: what the
    image's tool prints as ek.public, made here with tpm2-tools (the harness, before a boot)."""
    require_host_tools()
    with tempfile.TemporaryDirectory(prefix="amnesiac-ek-") as work:
        _tpm2(["tpm2_createek", "-G", "rsa", "-c", f"{work}/ek.ctx", "-u", f"{work}/ek.public"], tcti)
        _tpm2(["tpm2_flushcontext", "-t"], tcti)
        return (Path(work) / "ek.public").read_bytes()


def quote(tcti: str, nonce: bytes) -> Quote:
    """A quote from the TPM at `tcti`, made with the host's tpm2-tools (the tests, enrolment)."""
    require_host_tools()
    with tempfile.TemporaryDirectory(prefix="amnesiac-quote-") as work:
        for cmd in quote_commands(work, nonce):
            _tpm2(cmd, tcti)
        files = [(Path(work) / name).read_bytes() for name in QUOTE_FILES]
    return Quote(*files)


# --- the verifier's side -------------------------------------------------------------------------


def _selection() -> str:
    return f"{BANK}:{','.join(str(i) for i in QUOTED_PCRS)}"


def expected_pcrs(pcr7: str, pcr11: str) -> dict[int, str]:
    return {7: pcr7.lower(), 11: pcr11.lower(), 12: ZEROS}


_PCR_LINE = re.compile(r"^\s*(\d+)\s*:\s*(?:0x)?([0-9A-Fa-f]{64})\s*$")


def check(enrolled_ak_pem: bytes, answer: Quote, nonce: bytes, expected: Mapping[int, str]) -> Attestation:
    """Check a quote with tpm2_checkquote against the enrolled AK and this nonce, then its PCRs
    against `expected` (PCR index -> hex)."""
    require_host_tools()
    ak_enrolled = _same_key(enrolled_ak_pem, answer.ak_pem)
    with tempfile.TemporaryDirectory(prefix="amnesiac-checkquote-") as work:
        for name, data in answer.files().items():
            (Path(work) / name).write_bytes(data)
        (Path(work) / "enrolled.pem").write_bytes(enrolled_ak_pem)
        result = run(
            ["tpm2_checkquote", "-u", f"{work}/enrolled.pem", "-m", f"{work}/quote.msg",
             "-s", f"{work}/quote.sig", "-f", f"{work}/quote.pcrs", "-l", _selection(), "-g", "sha256",
             "-q", nonce.hex()],
            capture=True, check=False,
        )  # fmt: skip
    out = result.stdout.decode(errors="replace")
    err = result.stderr.decode(errors="replace") if result.stderr else ""
    pcrs: dict[int, str] = {}
    if result.returncode == 0:
        for line in out.splitlines():
            if m := _PCR_LINE.match(line):
                pcrs[int(m.group(1))] = m.group(2).lower()
    detail = (err.strip().splitlines() or ["tpm2_checkquote failed"])[-1] if result.returncode else "ok"
    want = {index: value.lower() for index, value in expected.items()}
    return Attestation(result.returncode == 0, ak_enrolled, pcrs, want, detail)


def _same_key(a: bytes, b: bytes) -> bool:
    def der(pem: bytes) -> bytes | None:
        try:
            key = serialization.load_pem_public_key(pem)
        except ValueError:
            return None
        return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)

    left = der(a)
    return left is not None and left == der(b)


def require_host_tools() -> None:
    if missing := [t for t in HOST_TOOLS if shutil.which(t) is None]:
        raise UsageError(
            f"missing host tool: {', '.join(missing)}", hint="apt-get install tpm2-tools, or `make setup`"
        )


# --- swtpm -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SoftwareTpm:
    """A TPM 2.0 emulated by swtpm, its state (seeds, hence the AK) kept in `state`."""

    state: Path

    def create(self) -> None:
        """Manufacture it: a new endorsement seed (a new machine, as far as the AK goes). No EK
        is made: the AK needs the seed only, and an EK's RSA key costs seconds under load."""
        if shutil.which("swtpm_setup") is None:
            raise UsageError(
                "missing host tool: swtpm_setup", hint="apt-get install swtpm-tools, or `make setup`"
            )
        self.state.mkdir(parents=True, exist_ok=True)
        run(["swtpm_setup", "--tpm2", "--tpmstate", self.state, "--pcr-banks", "sha256", "--overwrite"],
            capture=True)  # fmt: skip

    @contextlib.contextmanager
    def serving(self) -> Iterator[str]:
        """Serve it on loopback TCP for tpm2-tools; yields the TCTI string."""
        port = _free_port_pair()  # tpm2-tools' swtpm TCTI finds the control port at port + 1
        ctrl = port + 1
        process = spawn(
            ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={self.state}",
             "--server", f"type=tcp,port={port},bindaddr=127.0.0.1",
             "--ctrl", f"type=tcp,port={ctrl},bindaddr=127.0.0.1", "--flags", "not-need-init,startup-clear"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            _wait_port(port, process)
            yield f"swtpm:host=127.0.0.1,port={port}"
        finally:
            stop_group(process, term_timeout=5)  # it never ends by itself: no grace to wait out

    def qemu_socket(
        self, path: Path, preexec_fn: Callable[[], None] | None = None
    ) -> subprocess.Popen[bytes]:
        """swtpm for QEMU's `-tpmdev emulator` on a unix control socket; the caller stops it.
        It ends when its QEMU does (QEMU shuts its TPM down as it exits): a QEMU started again
        needs it started again too (boot/firmware.py)."""
        return spawn(
            [
                "swtpm",
                "socket",
                "--tpm2",
                "--tpmstate",
                f"dir={self.state}",
                "--ctrl",
                f"type=unixio,path={path}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=preexec_fn,
        )


def _free_port_pair(attempts: int = 50) -> int:
    """A loopback port whose successor is free too."""
    for _ in range(attempts):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port: int = first.getsockname()[1]
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
                return port
    raise AttestationError("no two consecutive free ports on 127.0.0.1 for swtpm")


def _wait_port(port: int, process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AttestationError(f"swtpm stopped (exit {process.returncode}) before it served")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.05)
    raise AttestationError(f"swtpm did not listen on 127.0.0.1:{port} in {timeout:.0f} s")
