"""Secure Boot's parts, without a boot: the harness's key, a UKI signed with Debian's sbsign and
OVMF's variables with that key enrolled (tests/boot/test_attestation.py boots them)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from amnesiac.boot import firmware
from amnesiac.image import secure_boot

# A signed-or-not PE binary the host has: systemd-boot's loader (make setup installs it).
PE = Path("/usr/lib/systemd/boot/efi/systemd-bootx64.efi")


def test_a_signed_uki_verifies_with_the_enrolled_certificate_only(tmp_path: Path) -> None:
    key = secure_boot.throwaway_key(tmp_path)
    (tmp_path / "other").mkdir()
    other = secure_boot.throwaway_key(tmp_path / "other")
    assert key.key.stat().st_mode & 0o777 == 0o600
    uki = tmp_path / "uki.efi"
    shutil.copyfile(PE, uki)
    secure_boot.sign(uki, key)

    def verifies(cert: Path) -> bool:
        return (
            subprocess.run(
                ["sbverify", "--cert", str(cert), str(uki)], capture_output=True, check=False
            ).returncode
            == 0
        )

    assert verifies(key.cert) and not verifies(other.cert)
    assert key.fingerprint != other.fingerprint


def test_the_variables_enrol_the_key_and_turn_secure_boot_on(tmp_path: Path) -> None:
    key = secure_boot.throwaway_key(tmp_path)
    out = tmp_path / "VARS.fd"
    secure_boot.enrolled_variables(firmware.OVMF_VARS, key, out)
    listing = subprocess.run(
        [sys.executable, "-m", "virt.firmware.vars", "--input", str(out), "--print", "--verbose"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    for name in ("PK", "KEK", "db", "SecureBootEnable"):
        assert f"name={name} " in listing, listing[:2000]
    assert listing.count("subject CN=amnesiac harness Secure Boot key") == 3  # PK, KEK, db
    assert out.read_bytes() != firmware.OVMF_VARS.read_bytes()


def test_pcr7_is_the_enrolled_policy_then_the_db_entry_that_let_the_uki_in(tmp_path: Path) -> None:
    """The prediction before the boot agrees with virt-firmware's own calculation (the same
    events, written by others); the db entry's event, Secure Boot off and another key each give
    another value. That the firmware's PCR 7 is this value is the booted test's
    (tests/boot/test_boot.py: the quote is attested)."""
    from virt.firmware import measure as virt_measure
    from virt.firmware.varstore.autodetect import open_varstore

    key = secure_boot.throwaway_key(tmp_path)
    enrolled = tmp_path / "VARS.fd"
    secure_boot.enrolled_variables(firmware.OVMF_VARS, key, enrolled)
    events = virt_measure.measure_varlist(["sha256"], open_varstore(str(enrolled)).get_varlist())
    (theirs,) = virt_measure.calculate_pcrs(["sha256"], events)
    assert secure_boot.expected_pcr7(enrolled, None) == theirs["digest"]

    booted = secure_boot.expected_pcr7(enrolled, key)
    (tmp_path / "other").mkdir()
    other = secure_boot.throwaway_key(tmp_path / "other")
    elsewhere = tmp_path / "OTHER.fd"
    secure_boot.enrolled_variables(firmware.OVMF_VARS, other, elsewhere)
    off = secure_boot.expected_pcr7(firmware.OVMF_VARS, None)
    values = [booted, theirs["digest"], secure_boot.expected_pcr7(elsewhere, other), off]
    assert len(set(values)) == len(values)
    # Secure Boot off: no db entry verifies anything, whatever signed the image.
    assert secure_boot.expected_pcr7(firmware.OVMF_VARS, key) == off


def test_missing_sbsign_is_one_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(secure_boot.shutil, "which", lambda _name: None)
    with pytest.raises(secure_boot.UsageError, match="sbsign"):
        secure_boot.require_tools()


def test_the_providers_key_is_checked_before_a_build_signs_with_it(tmp_path: Path) -> None:
    """`amnesiac build --secure-boot-key/-cert`: a key and its certificate, or one line naming
    the argument that is wrong."""
    key = secure_boot.throwaway_key(tmp_path)
    (tmp_path / "other").mkdir()
    other = secure_boot.throwaway_key(tmp_path / "other")
    loaded = secure_boot.provider_key(key.key, key.cert)
    assert loaded.fingerprint == key.fingerprint
    with pytest.raises(
        secure_boot.UsageError, match=r"--secure-boot-key .*: not the key of --secure-boot-cert"
    ):
        secure_boot.provider_key(other.key, key.cert)
    with pytest.raises(secure_boot.UsageError, match=r"--secure-boot-cert .*: not a PEM certificate"):
        secure_boot.provider_key(key.key, key.key)
    with pytest.raises(
        secure_boot.UsageError, match=r"--secure-boot-key .*: not an unencrypted PEM private key"
    ):
        secure_boot.provider_key(key.cert, key.cert)
    with pytest.raises(secure_boot.UsageError, match=r"--secure-boot-key .*: no such file"):
        secure_boot.provider_key(tmp_path / "absent.key", key.cert)


def test_secure_boot_is_on_with_a_pk_unless_the_platform_switch_says_off() -> None:
    """EDK2's rule, which PCR 7's prediction follows: a store with a PK but no SecureBootEnable
    (a firmware that never wrote the switch) boots with Secure Boot on."""
    on, off = SimpleNamespace(data=b"\1"), SimpleNamespace(data=b"\0")
    assert secure_boot.secure_boot_on({"PK": on, "SecureBootEnable": on})
    assert secure_boot.secure_boot_on({"PK": on})
    assert not secure_boot.secure_boot_on({"PK": on, "SecureBootEnable": off})
    assert not secure_boot.secure_boot_on({"SecureBootEnable": on})
