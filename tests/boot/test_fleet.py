"""verify --inventory: every host of an Ansible inventory checked in one parallel run, on a
server that got its identity as a fleet's servers do when the PXE server holds none: released
by the provider's release service for a TPM quote of what booted (tests/boot/release.py).

The session's OVPN image with identity release on is booted ONCE in QEMU and the inventory
names it twice (vpn1 and vpn2, both 127.0.0.1:<forwarded port>): one machine serving as two
fleet members keeps CI time down while still exercising the inventory, the parallel run
(pytest-xdist) and the split of results by host.

It boots measured (UEFI, swtpm, the test UKI) and is enrolled as a provider enrols a server
before it enters the fleet: `amnesiac enrol` over SSH reads its AK, bound to its EK, and PCR 7
(docs/attestation.md), and must agree with what the harness itself enrolled and predicted before
the boot (which the release service held the identity for). `verify --build` predicts PCR 11,
so each host's identity is the TPM's.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from amnesiac import attest, boot, policy, targets, verify
from amnesiac.image.manifest import Manifest
from amnesiac.progress import Progress
from amnesiac.report import model
from amnesiac.targets.inventory import ENROLMENT_VARIABLE
from tests.boot import not_passed
from tests.boot.release import ANSWER_TIMEOUT, CONSOLE, SAID, Release, release_image, release_service
from tests.boot.test_boot import ssh
from tests.images import GUEST_LANE, REPO, amnesiac
from tests.tpm import a_public_key

pytestmark = [pytest.mark.boot, GUEST_LANE]

OVPN = REPO / "policies/ovpn.yml"
HOSTS = ("vpn1", "vpn2")
# The checks that search the server's RAM, which the verifier can read only on qemu: targets.
RAM_CHECKS = {"amnesia.session_forgotten", "amnesia.previous_boot_forgotten"}


@dataclass(frozen=True)
class Booted:
    machine: boot.BootedMachine
    key: Path  # the test's SSH key, the only file of its boot-time overlay
    work: Path
    release: Release
    out: Path  # the build


@pytest.fixture(scope="module")
def booted(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Booted]:
    """The fleet's server, booted measured with no identity of its own: the release service
    holds it for the server's TPM."""
    image = release_image(request)
    work = tmp_path_factory.mktemp("fleet")
    key = work / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key], check=True)
    with release_service(image, work) as release:
        options = boot.BootOptions(
            ssh_key=key.with_suffix(".pub"), measured=True, guest_services=(release.guest_service,)
        )
        with boot.running(image.out, options) as machine:
            release.admit(machine)  # enrolled as the harness made its TPM, before the boot
            machine.wait_ssh(timeout=600)
            machine.wait_console(SAID, timeout=ANSWER_TIMEOUT)
            assert machine.measured is not None
            yield Booted(machine, key, work, release, image.out)


@pytest.fixture(scope="module")
def inventory(booted: Booted) -> Path:
    machine, work = booted.machine, booted.work
    (work / "tpm.json").write_text(_enrol(machine, booted.key, work).dump())
    fleet = work / "fleet.yml"
    fleet.write_text(
        json.dumps(
            {
                "all": {
                    "vars": {
                        "ansible_host": "127.0.0.1",
                        "ansible_port": machine.ssh_port,
                        "ansible_user": "root",
                        "ansible_ssh_private_key_file": str(booted.key),
                        "ansible_ssh_common_args": "-o StrictHostKeyChecking=no "
                        "-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR",
                    },
                    "hosts": {name: {ENROLMENT_VARIABLE: "tpm.json"} for name in HOSTS},
                }
            }
        )
    )
    return fleet


def test_the_server_got_its_identity_for_a_quote_of_what_booted(booted: Booted) -> None:
    """Its boot carried no identity (the overlay holds the test key only): the release service
    sent it once the TPM quoted the build's UKI (PCR 11), the firmware's enrolled Secure Boot
    policy (PCR 7) and nothing from the loader (PCR 12), with the enrolled AK, and only that TPM
    opened the credential holding the token for it."""
    booted.machine.wait_console(
        "amnesiac: provider identity present", timeout=120
    )  # read by the units after it
    assert CONSOLE in booted.machine.console()
    assert booted.release.paths() == [
        ("/v1/identity/challenge", 200),
        ("/v1/identity/quote", 200),
        ("/v1/identity", 200),
    ]
    listing = ssh(booted.machine, booted.key, "cd /etc/amnesiac/provider && stat -c '%n %a' * && sha256sum *")
    want = {f.path.rsplit("/", 1)[1]: f for f in booted.release.files}
    for name, item in want.items():
        assert f"{name} {item.mode:o}" in listing, listing
        assert f"{hashlib.sha256(item.data).hexdigest()}  {name}" in listing, listing


def _enrol(machine: boot.BootedMachine, key: Path, work: Path) -> attest.Enrolment:
    """`amnesiac enrol` of the booted server, checked against the harness's own enrolment; plus
    what only the harness knows: the test UKI's initrd (the overlay with the test key after the
    build's), which PCR 11 is predicted from, and the Secure Boot certificate it signed with."""
    assert machine.measured is not None
    result = amnesiac(
        "enrol", "--json", "--target", f"ssh://root@127.0.0.1:{machine.ssh_port}", "--ssh-key", str(key),
        "--out", str(work / "enrolled.json"),
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    enrolled = attest.Enrolment.load(work / "enrolled.json")
    harness = machine.measured.enrolment()
    assert enrolled.ak_pem == harness.ak_pem  # the key the harness derived before the boot
    assert enrolled.pcr7 == harness.pcr7  # the Secure Boot policy the harness predicted
    assert enrolled.ek_pem == harness.ek_pem  # the EK the release service made its credential for
    assert enrolled.ek_pem is not None and summary["ek_sha256"] and summary["pcrs"]["12"] == "0" * 64
    only_the_harness_knows = ("initrd_sha256", "overlay_sha256", "secure_boot")
    return enrolled.model_copy(update={name: getattr(harness, name) for name in only_the_harness_knows})


@pytest.fixture(scope="module")
def verified(
    booted: Booted, inventory: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[int, dict[str, Any], Path]:
    report = tmp_path_factory.mktemp("fleet-report") / "report"
    # The test key came in the boot-time overlay, as a verifier's key would: declared as such.
    key = inventory.with_name("id_ed25519.pub")
    result = amnesiac(
        "verify", "--json", "--policy", str(OVPN), "--inventory", str(inventory), "--report", str(report),
        "--verifier-key", str(key), "--build", str(booted.out),
        check=False,
    )  # fmt: skip
    assert result.returncode in (0, 1, 5), result.stderr[-3000:]
    return result.returncode, json.loads(result.stdout), report


def test_every_host_verifies_every_technical_claim_it_can(verified: tuple[int, dict[str, Any], Path]) -> None:
    """Live servers over SSH: every claim verified but those permitting a record, which only a
    reference service can observe (qemu: targets attach one; a fleet's records go to the
    provider's own): unproven, so the fleet is incomplete (exit 5), never a pass; and those whose
    proof includes the server's RAM (after a session, across a reboot), which the verifier cannot
    read on a live server: partially verified."""
    code, stdout, report = verified
    fleet = json.loads((report / "fleet.json").read_text())
    assert sorted(fleet["hosts"]) == sorted(HOSTS)
    loaded = policy.load(OVPN)
    technical = {c.id for c in loaded.technical_claims()}
    permitted = {c.id for c in loaded.technical_claims() if c.permits}
    assert permitted, "the default policy permits a record (the device counter)"
    in_ram = {c.id for c in loaded.technical_claims() if RAM_CHECKS & set(c.checks)} - permitted
    assert in_ram, "the default policy's logging claims are proved in RAM too"
    expected = {**dict.fromkeys(permitted, "unproven"), **dict.fromkeys(in_ram, "partially-verified")}
    for name, host in fleet["hosts"].items():
        not_verified = {c: s for c, s in host["claims"].items() if s != "verified"}
        host_report = json.loads((report / name / "report.json").read_text())
        detail = not_passed(host_report, frozenset({"passed", "not-applicable"}))
        assert not_verified == expected, f"{name}: {detail}"
        assert technical <= set(host["claims"]), name
        assert host["verdict"] == "incomplete" and host["identity"]["boot_id"], name
        # Its TPM said what booted: the enrolled key quoted the PCRs the build predicts.
        assert host["identity"]["established_by"] == model.ATTESTED, host_report["target"]["identity"]
    assert code == 5 and fleet["verdict"] == "incomplete" and stdout["verdict"] == "incomplete"


def test_each_host_has_its_own_report(inventory: Path, verified: tuple[int, dict[str, Any], Path]) -> None:
    _, _, report = verified
    fingerprint = _ssh_keygen_fingerprint(inventory.with_name("id_ed25519.pub"))
    for name in HOSTS:
        loaded = model.load((report / name / "report.json").read_bytes())
        assert loaded.failed == [] and loaded.target.kind is model.TargetKind.SSH
        assert loaded.target.verifier_keys == [fingerprint], "the declared verifier key, by fingerprint"
        assert (report / name / "report.html").is_file() and (report / name / "junit.xml").is_file()
        assert f'href="{name}/report.html"' in (report / "fleet.html").read_text()


@pytest.mark.parametrize("declared", [True, False], ids=["declared", "undeclared"])
def test_a_login_key_the_policy_does_not_name_fails_unless_declared(
    inventory: Path, declared: bool, tmp_path: Path
) -> None:
    """The key the servers were booted with is not in the policy: only --verifier-key allows it."""
    hostvars = json.loads(inventory.read_text())["all"]["vars"]
    private = Path(hostvars["ansible_ssh_private_key_file"])
    options = verify.VerifyOptions(
        policy=OVPN,
        target=f"ssh://root@127.0.0.1:{hostvars['ansible_port']}",
        report_dir=tmp_path / "report",
        ssh_key=private,
        verifier_keys=(private.with_name(private.name + ".pub"),) if declared else (),
    )
    progress = Progress(quiet=True)
    assert options.target is not None
    target = targets.parse(options.target)
    with target.reach(verify.reach_options(options, tmp_path, progress)) as connection:
        expect = verify.expectations(policy.load(OVPN), None, connection)
        records = verify.run_checks(
            target, [connection], ["ssh.no_test_key"], expect,
            work=tmp_path, report_dir=options.report_dir, progress=progress,
        )  # fmt: skip
    (record,) = records
    if declared:
        assert record.outcome == "passed", record.reason
    else:
        assert record.outcome == "failed", record
        assert "keys the policy does not name" in (record.reason or "")


def _ssh_keygen_fingerprint(pub: Path) -> str:
    out = subprocess.run(["ssh-keygen", "-l", "-f", pub], capture_output=True, text=True, check=True).stdout
    return out.split()[1]


def test_a_server_is_attested_only_by_its_own_enrolment(
    booted: Booted, inventory: Path, tmp_path: Path
) -> None:
    """The same server as ssh://, enrolled as another TPM (a replaced machine, a relay to
    another): its quote is genuine but not by the enrolled key, so the target only reports who
    it is."""
    hostvars = json.loads(inventory.read_text())["all"]["vars"]
    enrolled = attest.Enrolment.load(inventory.with_name("tpm.json"))
    (tmp_path / "other.json").write_text(enrolled.model_copy(update={"ak_pem": a_public_key()}).dump())
    options = verify.VerifyOptions(
        policy=OVPN,
        target=f"ssh://root@127.0.0.1:{hostvars['ansible_port']}",
        report_dir=tmp_path / "report",
        ssh_key=Path(hostvars["ansible_ssh_private_key_file"]),
        enrolment=tmp_path / "other.json",
    )
    assert options.target is not None
    target = targets.parse(options.target)
    with target.reach(verify.reach_options(options, tmp_path, Progress(quiet=True))) as connection:
        identity = target.identity(connection, Manifest.load(booted.out))
    assert identity.tpm is not None and not identity.tpm.attested
    assert "not the enrolled one" in identity.tpm.reason, identity.tpm.reason
    assert identity.established_by == model.REPORTED
