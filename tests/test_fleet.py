"""verify --inventory, without a fleet: results split by host, one report per host, the summary."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from amnesiac import policy, ssh, targets, verify
from amnesiac.checks.results import CheckRecord, title_of
from amnesiac.errors import UsageError
from amnesiac.progress import Progress
from amnesiac.report import fleet, model
from amnesiac.report.model import Identity, Target, TargetKind
from amnesiac.targets.inventory import HOST_ID, InventoryHost
from amnesiac.verify import build_report, group_by_target, selected_checks

REPO = Path(__file__).resolve().parent.parent
OVPN = policy.load(REPO / "policies/ovpn.yml")


def record(check_id: str, host: str, outcome: str = "passed") -> CheckRecord:
    return CheckRecord.model_validate(_record(check_id, host, outcome))


def _record(check_id: str, host: str, outcome: str) -> dict[str, Any]:
    return {
        "id": check_id,
        "title": title_of(check_id),
        "host": f"ansible://{host}",
        "claims": [],
        "rationale": None,
        "outcome": outcome,
        "reason": None if outcome == "passed" else "it <b>failed</b>",
        "duration_s": 0.1,
        "evidence": [{"command": "true", "exit_code": 0, "output": "", "note": None}],
    }


def by_host(names: list[str]) -> dict[str, str]:
    """testinfra's host URL of each inventory host -> its name, as verify maps them."""
    return {f"{HOST_ID}{n}": n for n in names}


def fake_fleet(failing: str | None = None) -> tuple[list[InventoryHost], dict[str, model.Report]]:
    inventory = Path("fleet.yml")
    members = [InventoryHost(n, "127.0.0.1", 2222, "root", inventory) for n in ("vpn1", "vpn2", "vpn/3")]
    records = [
        record(c, m.name, "failed" if (m.name, c) == ("vpn2", failing) else "passed")
        for m in members
        for c in selected_checks(OVPN)
    ]
    grouped = group_by_target(records, by_host([m.name for m in members]))
    reports = {
        m.name: build_report(
            OVPN,
            Target(kind=TargetKind.SSH, address=m.address, identity=Identity(boot_id=m.name)),
            grouped[m.name],
        )
        for m in members
    }
    return members, reports


def test_results_are_grouped_by_inventory_host() -> None:
    records = [record("ssh.key_only", "vpn1"), record("ssh.key_only", "vpn2", "failed")]
    grouped = group_by_target(records, by_host(["vpn1", "vpn2"]))
    assert sorted(grouped) == ["vpn1", "vpn2"]
    assert grouped["vpn1"]["ssh.key_only"].outcome is model.CheckOutcome.PASSED
    assert grouped["vpn2"]["ssh.key_only"].outcome is model.CheckOutcome.FAILED


def test_every_host_passing_passes_the_fleet(tmp_path: Path) -> None:
    members, reports = fake_fleet()
    data = fleet.summary(OVPN, tmp_path / "fleet.yml", members, reports, {})
    assert data["verdict"] == "pass"
    assert list(data["hosts"]) == ["vpn1", "vpn2", "vpn/3"]
    technical = {c.id for c in OVPN.technical_claims()} | {"amnesiac-integrity"}
    for host in data["hosts"].values():
        assert set(host["claims"]) == technical
        assert set(host["claims"].values()) == {"verified"}
    assert data["hosts"]["vpn/3"]["report"]["json"] == "vpn_3/report.json"


def test_one_failing_check_fails_its_host_and_the_fleet(tmp_path: Path) -> None:
    members, reports = fake_fleet(failing="ssh.key_only")
    data = fleet.summary(OVPN, tmp_path / "fleet.yml", members, reports, {})
    assert data["verdict"] == "fail"
    assert data["hosts"]["vpn1"]["verdict"] == "pass"
    assert data["hosts"]["vpn2"]["verdict"] == "fail"
    assert "amnesiac-integrity" in data["hosts"]["vpn2"]["failed"]


def test_an_unreachable_host_fails_the_fleet(tmp_path: Path) -> None:
    members, reports = fake_fleet()
    del reports["vpn2"]
    data = fleet.summary(OVPN, tmp_path / "fleet.yml", members, reports, {"vpn2": "cannot reach <it>"})
    assert data["verdict"] == "fail"
    assert data["hosts"]["vpn2"]["unreachable"] == "cannot reach <it>"


def test_summary_files_are_written_and_the_html_escapes(tmp_path: Path) -> None:
    members, reports = fake_fleet(failing="ssh.key_only")
    del reports["vpn1"]
    data = fleet.summary(OVPN, tmp_path / "fleet.yml", members, reports, {"vpn1": "cannot reach <script>"})
    json_file, html_file = fleet.write_summary(data, tmp_path / "out")
    assert json.loads(json_file.read_text()) == data
    html = html_file.read_text()
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert 'href="vpn2/report.html"' in html and 'href="vpn_3/report.html"' in html
    assert '<td class="failed" title="amnesiac-integrity">failed</td>' in html  # vpn2's
    assert "<link" not in html and "src=" not in html  # self-contained


def test_verifier_keys_are_read_and_fingerprinted_as_ssh_keygen_does(tmp_path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", tmp_path / "k"], check=True)
    pub = tmp_path / "k.pub"
    keys = verify.read_verifier_keys([pub, pub])  # the same key twice counts once
    assert keys == [pub.read_text().strip()]
    listed = subprocess.run(["ssh-keygen", "-l", "-f", pub], capture_output=True, text=True, check=True)
    assert ssh.fingerprint(keys[0]) == listed.stdout.split()[1]


def test_a_bad_verifier_key_names_the_option_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pub"
    bad.write_text(
        "# a comment\n"
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl ok\n"
        "nonsense\n"
    )
    with pytest.raises(UsageError, match=rf"^--verifier-key {bad}:3: not an OpenSSH public key"):
        verify.read_verifier_keys([bad])
    private = tmp_path / "id"
    private.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    with pytest.raises(UsageError, match="is a private key"):
        verify.read_verifier_keys([private])


def test_the_login_key_is_not_a_verifier_key_by_default(tmp_path: Path) -> None:
    """An ssh:// target: no key but a declared one is allowed beside the policy's."""
    options = verify.VerifyOptions(
        policy=REPO / "policies/ovpn.yml", target="ssh://root@vpn1.example.net", report_dir=tmp_path
    )
    assert options.target is not None
    target = targets.parse(options.target)
    with target.reach(verify.reach_options(options, tmp_path, Progress(quiet=True))) as connection:
        assert connection.test_keys == ()


def test_each_inventory_host_names_its_own_enrolment(tmp_path: Path) -> None:
    """`amnesiac_enrolment`, relative to the inventory: read when the inventory is, so that a
    bad one stops the run before any host is reached, naming the inventory, host and file."""
    from amnesiac import attest
    from amnesiac.targets.inventory import ENROLMENT_VARIABLE, members
    from tests.tpm import a_public_key

    enrolled = attest.Enrolment(ak_pem=a_public_key(), pcr7="7" * 64)
    (tmp_path / "tpm").mkdir()
    (tmp_path / "tpm/vpn1.json").write_text(enrolled.dump())
    hosts = {"vpn1": {ENROLMENT_VARIABLE: "tpm/vpn1.json"}, "vpn2": {}}
    inventory = tmp_path / "fleet.yml"
    inventory.write_text(json.dumps({"all": {"hosts": hosts}}))
    found = {host.name: host for host in members(inventory, tmp_path)}
    assert found["vpn1"].enrolment == enrolled and found["vpn2"].enrolment is None
    hosts["vpn2"] = {ENROLMENT_VARIABLE: "tpm/vpn2.json"}
    inventory.write_text(json.dumps({"all": {"hosts": hosts}}))
    with pytest.raises(
        UsageError, match=rf"--inventory {inventory}: vpn2: {ENROLMENT_VARIABLE} .*vpn2\.json"
    ):
        members(inventory, tmp_path)
