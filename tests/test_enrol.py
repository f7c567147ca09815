"""`amnesiac enrol` against a real TPM 2.0 (swtpm) through the image's own tool: the AK it
records is the TPM's, bound to that TPM's EK by a credential only that TPM opens; a relayed AK,
a key of another template and a wrong answer are refused; the file it writes is what `verify`
reads."""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from amnesiac import attest
from amnesiac.enrol import EnrolmentError, enrol_host
from amnesiac.files import create_atomic
from amnesiac.image import measure
from amnesiac.image.measure import ZEROS
from amnesiac.targets.base import Connection, _attestation
from tests.tpm import SECTIONS, SwtpmHost, a_public_key, built, extend, extend_pcr11, software_tpm


@pytest.fixture(scope="module")
def tpm(tmp_path_factory: pytest.TempPathFactory) -> attest.SoftwareTpm:
    return software_tpm(tmp_path_factory.mktemp("swtpm"))


@pytest.fixture(scope="module")
def other_tpm(tmp_path_factory: pytest.TempPathFactory) -> attest.SoftwareTpm:
    return software_tpm(tmp_path_factory.mktemp("swtpm-other"))


def _tpm2_tools_ek(tcti: str, work: Path) -> str:
    """The EK as tpm2-tools makes it from TCG's RSA 2048 template (PEM)."""
    env = {**os.environ, "TPM2TOOLS_TCTI": tcti}
    subprocess.run(["tpm2_flushcontext", "-t"], env=env, check=True, capture_output=True)
    createek = ["tpm2_createek", "-G", "rsa", "-c", str(work / "ek.ctx"),
                "-u", str(work / "ek.pem"), "-f", "pem"]  # fmt: skip
    subprocess.run(createek, env=env, check=True, capture_output=True)
    subprocess.run(["tpm2_flushcontext", "-t"], env=env, check=True, capture_output=True)
    return (work / "ek.pem").read_text()


def test_an_enrolment_is_this_tpms_ak_bound_to_its_ek(tpm: attest.SoftwareTpm, tmp_path: Path) -> None:
    policy = b"the firmware's Secure Boot policy"
    with tpm.serving() as tcti:
        extend(tcti, 7, policy)
        host = SwtpmHost(tcti)
        enrolled = enrol_host(host, secure_boot="a" * 64)
        ak = attest.derive_ak(tcti)
        ek = _tpm2_tools_ek(tcti, tmp_path)
        extend_pcr11(tcti, SECTIONS)
        # Written and read back as `verify --enrolment` reads it, it attests this server.
        path = create_atomic(tmp_path / "vpn1.json", enrolled.enrolment.dump())
        enrolment = attest.Enrolment.load(path)
        record = _attestation(
            host, Connection(host="ssh://root@vpn1:22", enrolment=enrolment), built(SECTIONS)
        )
    assert enrolment == enrolled.enrolment
    assert enrolment.ak_pem == ak.decode()  # the AK tpm2-tools derives with the same template
    assert enrolment.ek_pem == ek  # the EK of TCG's profile, which a TPM maker certifies
    assert not enrolled.ek_certificate and enrolment.ek_certified_by is None  # swtpm has none by default
    assert enrolment.pcr7 == measure.extend(bytes(32), policy).hex()
    assert enrolment.secure_boot == "a" * 64
    assert enrolled.pcrs[12] == ZEROS
    assert [c.split()[1] for c in host.commands[:2]] == ["--keys", "--activate"]
    assert record is not None and record.attested, record.reason
    # The report names the TPM the AK was bound to, unvouched for: swtpm has no EK certificate.
    assert record.ek_sha256 == hashlib.sha256(ek.encode()).hexdigest() and record.ek_certified_by is None


class _Relay(SwtpmHost):
    """A server that answers with its own TPM's EK but another TPM's AK: a key held elsewhere
    (a software key, another machine's TPM) passed off as this TPM's."""

    def __init__(self, tcti: str, elsewhere: str) -> None:
        super().__init__(tcti)
        self.elsewhere = SwtpmHost(elsewhere)

    def run(self, command: str) -> SimpleNamespace:
        answer = super().run(command)
        if command.endswith("--keys"):
            mine = attest.guest_parts(answer.stdout, attest.KEY_FILES)
            theirs = attest.guest_parts(self.elsewhere.run(command).stdout, attest.KEY_FILES)
            parts = {
                "ek.public": mine["ek.public"],
                "ak.public": theirs["ak.public"],
                "ak.der": theirs["ak.der"],
            }
            answer.stdout = "".join(f"== {name}\n{data.hex()}\n" for name, data in parts.items())
        return answer


def test_an_ak_from_another_tpm_is_not_enrolled(
    tpm: attest.SoftwareTpm, other_tpm: attest.SoftwareTpm
) -> None:
    with tpm.serving() as tcti, other_tpm.serving() as elsewhere:
        relay = _Relay(tcti, elsewhere)
        with pytest.raises(EnrolmentError, match=r"gave no credential: .*TPM command 0x147 failed"):
            enrol_host(relay)
        # The same host without the relay enrols; its tool flushed what it loaded on failure.
        assert enrol_host(SwtpmHost(tcti)).enrolment.ak_pem == attest.derive_ak(tcti).decode()


class _Rewriting(SwtpmHost):
    """A server whose answer to one command is rewritten by `change`."""

    def __init__(self, tcti: str, option: str, change: Callable[[str], str]) -> None:
        super().__init__(tcti)
        self.option, self.change = option, change

    def run(self, command: str) -> SimpleNamespace:
        answer = super().run(command)
        if command.split()[1] == self.option:
            answer.stdout = self.change(answer.stdout)
        return answer


def _flip_ak_attributes(text: str) -> str:
    """The AK's area with `restricted` cleared: a key that would sign anything it is given."""
    parts = attest.guest_parts(text, attest.KEY_FILES)
    area = bytearray(parts["ak.public"])
    attributes = int.from_bytes(area[6:10]) & ~0x10000
    area[6:10] = attributes.to_bytes(4)
    return text.replace(parts["ak.public"].hex(), bytes(area).hex())


def _another_ak_der(text: str) -> str:
    parts = attest.guest_parts(text, attest.KEY_FILES)

    other = serialization.load_pem_public_key(a_public_key().encode()).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return text.replace(parts["ak.der"].hex(), other.hex())


@pytest.mark.parametrize(
    ("option", "change", "says"),
    [
        ("--keys", _flip_ak_attributes, "ak.public is not a key of its template"),
        ("--keys", _another_ak_der, "ak.der is not the key of its ak.public"),
        ("--keys", lambda text: text.replace("== ek.public", "== ek"), "the target sent no ek.public"),
        (
            "--activate",
            lambda text: text.replace(text.split()[-1], "00" * 32),
            "opened the credential to something else",
        ),
        ("--activate", lambda text: "", "the target sent no credential"),
    ],
    ids=["ak-not-restricted", "ak-der-of-another-key", "no-ek", "wrong-credential", "no-credential"],
)
def test_an_answer_that_is_not_the_tpms_is_refused(
    tpm: attest.SoftwareTpm, option: str, change: Callable[[str], str], says: str
) -> None:
    with tpm.serving() as tcti, pytest.raises((EnrolmentError, attest.AttestationError), match=says):
        enrol_host(_Rewriting(tcti, option, change))


def test_an_enrolment_file_is_created_whole_and_never_over_another(tmp_path: Path) -> None:
    path = tmp_path / "vpn1.json"
    path.write_text("the provider's\n")
    with pytest.raises(FileExistsError):
        create_atomic(path, "{}\n")
    assert path.read_text() == "the provider's\n"
    assert [p.name for p in tmp_path.iterdir()] == ["vpn1.json"]  # no staging file left behind
    fresh = create_atomic(tmp_path / "vpn2.json", "{}\n")
    assert fresh.read_text() == "{}\n" and hashlib.sha256(fresh.read_bytes()).hexdigest()


# --- the EK certificate: from the TPM's maker to the AK ------------------------------------------


@pytest.fixture(scope="module")
def certified(tmp_path_factory: pytest.TempPathFactory) -> tuple[attest.SoftwareTpm, list[x509.Certificate]]:
    """A TPM whose maker (swtpm's local CA, in a directory of the test's own) stored an EK
    certificate in it, as a PC-client TPM's maker does; and that maker's root and issuer."""
    work = tmp_path_factory.mktemp("swtpm-certified")
    ca = work / "ca"
    ca.mkdir()
    (work / "localca.conf").write_text(
        f"statedir = {ca}\nsigningkey = {ca}/signkey.pem\nissuercert = {ca}/issuercert.pem\n"
        f"certserial = {ca}/certserial\n"
    )
    (work / "setup.conf").write_text(
        f"create_certs_tool = /usr/bin/swtpm_localca\ncreate_certs_tool_config = {work}/localca.conf\n"
        "active_pcr_banks = sha256\n"
    )
    state = work / "state"
    state.mkdir()
    manufacture = ["swtpm_setup", "--tpm2", "--tpmstate", str(state), "--pcr-banks", "sha256",
                   "--create-ek-cert", "--config", str(work / "setup.conf")]  # fmt: skip
    subprocess.run(manufacture, check=True, capture_output=True)
    makers = [x509.load_pem_x509_certificate((ca / name).read_bytes())
              for name in ("swtpm-localca-rootca-cert.pem", "issuercert.pem")]  # fmt: skip
    return attest.SoftwareTpm(state), makers


def a_ca(name: str) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    """A self-signed CA of no TPM maker."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def test_an_ek_certificate_chains_the_ak_to_the_tpms_maker(
    certified: tuple[attest.SoftwareTpm, list[x509.Certificate]],
) -> None:
    tpm, makers = certified
    with tpm.serving() as tcti:
        enrolled = enrol_host(SwtpmHost(tcti), makers=makers)
        unchecked = enrol_host(SwtpmHost(tcti))
        with pytest.raises(EnrolmentError, match="chains to no --ek-ca"):
            enrol_host(SwtpmHost(tcti), makers=[a_ca("Another maker")[0]])
        # The root alone: the maker's issuing CA must be in the bundle too.
        with pytest.raises(EnrolmentError, match=r"issuer CN=swtpm-localca.* chains to no --ek-ca"):
            enrol_host(SwtpmHost(tcti), makers=makers[:1])
        record = _attestation(
            SwtpmHost(tcti), Connection(host="ssh://root@vpn1:22", enrolment=enrolled.enrolment), None
        )
    root = makers[0].subject.rfc4514_string()
    assert enrolled.enrolment.ek_certified_by == root
    assert record is not None and record.ek_certified_by == root  # what the report shows
    assert enrolled.as_dict()["ek_certificate"] == f"chains to {root}"
    assert unchecked.ek_certificate and unchecked.enrolment.ek_certified_by is None
    assert unchecked.enrolment.ek_pem == enrolled.enrolment.ek_pem


def _certificate_of_another_key(ca: x509.Certificate, ca_key: rsa.RSAPrivateKey) -> bytes:
    """An EK certificate the CA issued, for a key that is not this TPM's EK."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(2)
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


def test_an_ek_certificate_of_another_key_or_none_is_refused(
    certified: tuple[attest.SoftwareTpm, list[x509.Certificate]], tpm: attest.SoftwareTpm
) -> None:
    certified_tpm, _ = certified
    ca, ca_key = a_ca("A maker")
    foreign = _certificate_of_another_key(ca, ca_key)

    def swap(text: str) -> str:
        mine = attest.guest_parts(text, attest.KEY_FILES, optional=(attest.EK_CERTIFICATE,))
        return text.replace(mine[attest.EK_CERTIFICATE].hex(), foreign.hex())

    with certified_tpm.serving() as tcti, pytest.raises(EnrolmentError, match="names another key"):
        enrol_host(_Rewriting(tcti, "--keys", swap), makers=[ca])
    with tpm.serving() as tcti, pytest.raises(EnrolmentError, match="holds no EK certificate"):
        enrol_host(SwtpmHost(tcti), makers=[ca])
