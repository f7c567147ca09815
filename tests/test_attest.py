"""Attestation against a real TPM 2.0 (swtpm): the AK a diskless node re-derives, a quote over a
fresh nonce, and the verifier's check that refuses another key, another nonce, other PCRs."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from pathlib import Path

import pytest

from amnesiac import attest
from amnesiac.errors import UsageError
from amnesiac.image import measure
from amnesiac.image.measure import ZEROS
from amnesiac.report.model import ATTESTED, REPORTED, Identity
from amnesiac.targets.base import Connection, _attestation
from tests.tpm import (
    QUOTE_TOOL,
    SECTIONS,
    SwtpmHost,
    a_public_key,
    built,
    extend,
    extend_pcr11,
    software_tpm,
)


@pytest.fixture(scope="module")
def tpm(tmp_path_factory: pytest.TempPathFactory) -> attest.SoftwareTpm:
    return software_tpm(tmp_path_factory.mktemp("swtpm"))


def test_the_ak_is_the_same_key_at_every_derivation_and_differs_per_tpm(
    tpm: attest.SoftwareTpm, tmp_path: Path
) -> None:
    with tpm.serving() as tcti:
        first = attest.derive_ak(tcti)
    with tpm.serving() as tcti:  # a new power-on: nothing kept but the TPM's own seeds
        again = attest.derive_ak(tcti)
    other = software_tpm(tmp_path / "other")
    with other.serving() as tcti:
        foreign = attest.derive_ak(tcti)
    assert first == again
    assert foreign != first


def test_a_quote_of_the_predicted_pcrs_is_attested_and_anything_else_is_not(
    tpm: attest.SoftwareTpm, tmp_path: Path
) -> None:
    sections = {".linux": b"kernel", ".osrel": b"ID=debian\n", ".cmdline": b"quiet", ".initrd": b"root"}
    predicted = measure.pcr11(sections)
    policy = b"the firmware's Secure Boot policy"  # one event in PCR 7, as the firmware's stand-in
    pcr7 = measure.extend(bytes(32), policy).hex()
    with tpm.serving() as tcti:  # a fresh start: PCRs 7, 11 and 12 are zero
        enrolled = attest.derive_ak(tcti)
        extend(tcti, 7, policy)
        extend_pcr11(tcti, sections)
        nonce = attest.new_nonce()
        answer = attest.quote(tcti, nonce)

    good = attest.check(enrolled, answer, nonce, attest.expected_pcrs(pcr7, predicted))
    assert good.attested, good.why()
    assert good.pcrs == {7: pcr7, 11: predicted, 12: ZEROS}

    # The stub measured another command line: the quote verifies, the PCR does not.
    tampered = measure.pcr11({**sections, ".cmdline": b"quiet "})
    wrong_pcr = attest.check(enrolled, answer, nonce, attest.expected_pcrs(pcr7, tampered))
    assert wrong_pcr.signature_ok and not wrong_pcr.attested
    assert wrong_pcr.mismatched == [11]
    assert "PCR 11" in wrong_pcr.why()

    # Another Secure Boot policy was enrolled (or none): PCR 7 says the firmware's was not it.
    other_policy = attest.check(enrolled, answer, nonce, attest.expected_pcrs(ZEROS, predicted))
    assert other_policy.signature_ok and other_policy.mismatched == [7] and "PCR 7" in other_policy.why()

    # A replayed quote: another nonce.
    replay = attest.check(enrolled, answer, attest.new_nonce(), attest.expected_pcrs(pcr7, predicted))
    assert not replay.signature_ok and not replay.attested

    # Another machine's key, however the quote reads.
    other = software_tpm(tmp_path / "other")
    with other.serving() as tcti:
        foreign_ak = attest.derive_ak(tcti)
    foreign = attest.check(foreign_ak, answer, nonce, attest.expected_pcrs(pcr7, predicted))
    assert not foreign.attested and not foreign.ak_enrolled


def test_the_image_quote_tool_derives_the_enrolled_key_and_its_quote_is_attested(
    tpm: attest.SoftwareTpm,
) -> None:
    """The image's own quote tool (perl-base, its own TPM marshalling) against the
    same TPM as tpm2-tools: the same AK from the same template, and a quote tpm2_checkquote
    accepts; the tool's output is what verify parses."""
    nonce = attest.new_nonce()
    with tpm.serving() as tcti:
        enrolled = attest.derive_ak(tcti)
        port = tcti.rsplit("port=", 1)[1]
        tool = ["perl", str(QUOTE_TOOL), nonce.hex(), f"127.0.0.1:{port}"]
        output = subprocess.run(tool, check=True, capture_output=True, text=True).stdout
        again = subprocess.run(tool, check=True, capture_output=True, text=True).stdout  # flushed its key
    answer = attest.parse_guest_output(output)
    assert answer.ak_pem == enrolled  # byte for byte, PEM and all
    verdict = attest.check(enrolled, answer, nonce, attest.expected_pcrs(ZEROS, ZEROS))
    assert verdict.attested, verdict.why()
    assert attest.parse_guest_output(again).ak_pem == enrolled
    with pytest.raises(attest.AttestationError, match=r"quote\.sig"):
        attest.parse_guest_output(output.replace("== quote.sig", "== other"))
    assert attest.guest_command(nonce) == f"{attest.GUEST_TOOL} {nonce.hex()}"


# --- a server's enrolment: what `verify` of an ssh:// target or an inventory host reads ---------


@pytest.mark.parametrize("test_uki", [False, True], ids=["the-build's-uki", "a-test-uki"])
def test_an_enrolled_server_is_attested_against_its_build(tpm: attest.SoftwareTpm, test_uki: bool) -> None:
    """An enrolment (the AK, PCR 7) and the build's manifest (PCR 11) are all `verify` needs of
    a server it reaches over SSH; a test UKI's initrd (the build's, then an overlay) is named by
    its sha256 and the prediction follows it. The same boot against another enrolment fails."""
    initrd = SECTIONS[".initrd"] + (b"overlay" if test_uki else b"")
    booted = {**SECTIONS, ".initrd": initrd}
    with tpm.serving() as tcti:
        ak = attest.derive_ak(tcti)
        extend_pcr11(tcti, booted)  # the stub's measurements; PCR 7 stays zero on this TPM
        host = SwtpmHost(tcti)
        enrolment = attest.Enrolment(
            ak_pem=ak.decode(),
            pcr7=ZEROS,
            initrd_sha256=hashlib.sha256(initrd).hexdigest() if test_uki else None,
            overlay_sha256=hashlib.sha256(b"overlay").hexdigest() if test_uki else None,
        )
        connection = Connection(host="ssh://root@server:22", enrolment=enrolment)
        record = _attestation(host, connection, built(SECTIONS))
        assert record is not None and record.attested, record.reason
        assert Identity(tpm=record).established_by == ATTESTED
        assert record.overlay_sha256 == enrolment.overlay_sha256
        # The prediction without the test UKI's initrd: PCR 11 is not what it says.
        if test_uki:
            plain = enrolment.model_copy(update={"initrd_sha256": None})
            other = _attestation(host, Connection(host="x", enrolment=plain), built(SECTIONS))
            assert other is not None and not other.attested and "PCR 11" in other.reason
        # Another PCR 7 (the firmware's Secure Boot policy is not the one enrolled).
        moved = enrolment.model_copy(update={"pcr7": "1" * 64})
        other = _attestation(host, Connection(host="x", enrolment=moved), built(SECTIONS))
        assert other is not None and not other.attested and "PCR 7" in other.reason
    # No build: nothing to predict PCR 11 from, and the report says so rather than "attested".
    unknown = _attestation(host, connection, None)
    assert unknown is not None and not unknown.attested and "--build" in unknown.reason
    assert Identity(tpm=unknown).established_by == REPORTED


def test_another_tpms_quote_is_not_attested(tpm: attest.SoftwareTpm, tmp_path: Path) -> None:
    """A server answering with a TPM that is not the enrolled one (a replaced machine, a relay)."""
    other = software_tpm(tmp_path / "other")
    with other.serving() as tcti:
        foreign = attest.derive_ak(tcti)
    with tpm.serving() as tcti:
        enrolment = attest.Enrolment(ak_pem=foreign.decode(), pcr7=ZEROS)
        manifest = built(SECTIONS)
        extend_pcr11(tcti, SECTIONS)
        record = _attestation(SwtpmHost(tcti), Connection(host="x", enrolment=enrolment), manifest)
    assert record is not None and not record.attested and "not the enrolled one" in record.reason


def test_an_enrolment_file_round_trips_and_a_bad_one_is_one_line(tmp_path: Path) -> None:
    good = attest.Enrolment(ak_pem=a_public_key(), pcr7=ZEROS)
    path = tmp_path / "vpn1.enrolment.json"
    path.write_text(good.dump())
    assert attest.Enrolment.load(path) == good
    pem = json.dumps(good.ak_pem)
    for text, words in (
        ("{", "Invalid JSON"),
        ("[]", "Input should be an object"),
        (f'{{"ak_pem": {pem}}}', "pcr7: Field required"),
        (f'{{"ak_pem": {pem}, "pcr7": "ABC"}}', "pcr7: String should match pattern"),
        (f'{{"ak_pem": {pem}, "pcr7": "{ZEROS}", "pcr11": "{ZEROS}"}}', "pcr11: Extra inputs"),
        (f'{{"ak_pem": "-----BEGIN PUBLIC KEY-----", "pcr7": "{ZEROS}"}}', "ak_pem: Value error, not a PEM"),
    ):
        path.write_text(text)
        with pytest.raises(UsageError, match=re.escape(f"--enrolment {path}: ")) as raised:
            attest.Enrolment.load(path)
        assert words in raised.value.message and "\n" not in raised.value.message, raised.value.message
    with pytest.raises(UsageError, match="No such file"):
        attest.Enrolment.load(tmp_path / "absent.json")
