"""Attestation against a real TPM 2.0 (swtpm): the AK a diskless node re-derives, a quote over a
fresh nonce, and the verifier's check that refuses another key, another nonce, other PCRs."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from amnesiac import attest
from amnesiac.image import measure
from amnesiac.image.measure import ZEROS
from tests.images import REPO

QUOTE_TOOL = REPO / "roles/server_base/files/amnesiac-tpm-quote"


@pytest.fixture(scope="module")
def tpm(tmp_path_factory: pytest.TempPathFactory) -> attest.SoftwareTpm:
    machine = attest.SoftwareTpm(tmp_path_factory.mktemp("swtpm"))
    machine.create()
    return machine


def _extend_pcr11(tcti: str, sections: dict[str, bytes]) -> None:
    """Do to PCR 11 what systemd-stub does at boot (two extends per section)."""
    for name in measure.STUB_ORDER:
        if name in sections:
            for data in (name.encode() + b"\0", sections[name]):
                _extend(tcti, 11, data)


def _extend(tcti: str, pcr: int, data: bytes) -> None:
    env = {"TPM2TOOLS_TCTI": tcti, "PATH": "/usr/bin:/bin"}
    extend = ["tpm2_pcrextend", f"{pcr}:sha256={hashlib.sha256(data).hexdigest()}"]
    subprocess.run(extend, check=True, env=env, capture_output=True)


def test_the_ak_is_the_same_key_at_every_derivation_and_differs_per_tpm(
    tpm: attest.SoftwareTpm, tmp_path: Path
) -> None:
    with tpm.serving() as tcti:
        first = attest.derive_ak(tcti)
    with tpm.serving() as tcti:  # a new power-on: nothing kept but the TPM's own seeds
        again = attest.derive_ak(tcti)
    other = attest.SoftwareTpm(tmp_path / "other")
    other.create()
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
        _extend(tcti, 7, policy)
        _extend_pcr11(tcti, sections)
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
    other = attest.SoftwareTpm(tmp_path / "other")
    other.create()
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
