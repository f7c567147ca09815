"""The report: claim status from check outcomes, the verdict, and the HTML, JSON and JUnit renderings.

tests/report/policy.yml is a small two-language policy with a claim of every status; the results
below cover every check outcome, a check shared by two claims and a check the suite lacks.
"""

from __future__ import annotations

import html
import json
import os
import shutil
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta, timezone
from html.parser import HTMLParser
from pathlib import Path

import markupsafe
import pytest
import yaml
from pydantic import ValidationError

from amnesiac import policy as policy_mod
from amnesiac.checks.meta import ALL_TARGETS, CheckMeta
from amnesiac.checks.results import printable
from amnesiac.policy import ClaimKind, PermittedRecord, Policy
from amnesiac.report import (
    CheckOutcome,
    CheckResult,
    ClaimStatus,
    Evidence,
    Identity,
    Report,
    Target,
    TargetKind,
    Verdict,
    bound_output,
    build_report,
    claim_status,
    exit_code,
    load,
    model,
    render,
    render_html,
    render_json,
    render_junit,
    write,
)
from amnesiac.report.model import TpmAttestation
from amnesiac.roles import Role

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "report"
GENERATED = datetime(2025, 11, 23, 6, 31, 5, tzinfo=UTC)
SHA_A = "a" * 64
SHA_B = "b" * 64

P, F, N, E = CheckOutcome.PASSED, CheckOutcome.FAILED, CheckOutcome.NOT_APPLICABLE, CheckOutcome.ERROR


def check(check_id: str, outcome: CheckOutcome, reason: str | None = None, **kwargs: object) -> CheckResult:
    if reason is None and outcome is not P:
        reason = f"{check_id} is {outcome} here"
    return CheckResult.model_validate(
        {
            "id": check_id,
            "title": check_id.split(".")[1].replace("_", " ").capitalize(),
            "outcome": outcome,
            "reason": reason,
        }
        | kwargs
    )


JOURNAL_LISTING = "\n".join(f"/var/log/journal/0f3c/system@{i:04x}.journal  8.0M" for i in range(400))


def all_results() -> dict[str, CheckResult]:
    """Every outcome; dns.resolver_logs_no_queries is missing on purpose."""
    return {
        "storage.root_is_size_limited_tmpfs": check(
            "storage.root_is_size_limited_tmpfs",
            P,
            rationale="A size-limited tmpfs root cannot outgrow RAM and is gone at power-off.",
            duration_s=0.12,
            evidence=[
                Evidence(
                    command="findmnt --noheadings --output FSTYPE,OPTIONS /",
                    exit_code=0,
                    output="tmpfs rw,nosuid,nodev,relatime,size=393216k,mode=755\n",
                ),
            ],
        ),
        "storage.no_block_device_mounted": check(
            "storage.no_block_device_mounted",
            N,
            "QEMU attaches no disk to the test VM, so the absence of mounts proves nothing about hardware",
            duration_s=0.01,
        ),
        "logging.journald_stores_nothing": check(
            "logging.journald_stores_nothing",
            F,
            "assert not journal_files\n +  where journal_files = ['/var/log/journal/0f3c/system.journal']",
            rationale="With Storage=none journald forwards to nothing and writes no journal files.",
            duration_s=0.48,
            evidence=[
                Evidence(
                    command="systemd-analyze cat-config systemd/journald.conf",
                    exit_code=0,
                    output="[Journal]\nStorage=persistent\n",
                ),
                Evidence(
                    command="find /var/log/journal -type f -printf '%p  %s\\n'",
                    exit_code=0,
                    output=JOURNAL_LISTING,
                    note="400 journal files on a server that must keep none",
                ),
            ],
        ),
        "storage.no_swap_active": check(
            "storage.no_swap_active",
            N,
            "swap is a kernel property; a container shares the host's kernel",
            duration_s=0.0,
        ),
        "provider.shipped_off_server": check(
            "provider.shipped_off_server",
            E,
            "ConnectionRefusedError: [Errno 111] Connection refused (the records collector at 10.0.2.2:6514)",
            duration_s=3.02,
            evidence=[
                Evidence(command="ss -tnp state established '( dport = :6514 )'", exit_code=1, output="")
            ],
        ),
    }


def fake_checks(path: Path) -> dict[str, CheckMeta]:
    """A check catalogue in which every check the policy names serves the claims that name it:
    the report's rules are under test here, not the shipped checks' metadata (a check missing
    from the results is still reported missing)."""
    loaded = yaml.safe_load(path.read_text())
    serves: dict[str, list[str]] = {}
    for claim in loaded["claims"]:
        for check_id in claim.get("checks", []):
            serves.setdefault(check_id, []).append(claim["id"])
    return {
        i: CheckMeta(id=i, claims=tuple(c), rationale="r", targets=ALL_TARGETS, not_applicable="")
        for i, c in serves.items()
    }


@pytest.fixture
def example_policy(fake_roles: dict[str, Role]) -> Policy:
    return policy_mod.load(DATA / "policy.yml", fake_roles, fake_checks(DATA / "policy.yml"))


def qemu_target() -> Target:
    return Target(
        kind=TargetKind.QEMU,
        address="build/example",
        identity=Identity(
            image_sha256=SHA_A,
            kernel_release="6.12.57+deb13-amd64",
            cmdline="initrd=initrd.img console=ttyS0 quiet amnesiac.root=tmpfs",
            boot_id="5d1b1e3c-8f0a-4c35-9a3e-2a8e0b4b5f11",
            hostname="vpn-example-01",
            artifacts={"vmlinuz": SHA_B, "initrd.img": SHA_A, "boot.ipxe": "c" * 64},
            manifest_sha256_matches=True,
        ),
    )


INTEGRITY = [check("ssh.key_only", P, evidence=[Evidence(command="sshd -T", exit_code=0)])]


def make_report(
    policy: Policy,
    results: Mapping[str, CheckResult] | None = None,
    integrity: list[CheckResult] = INTEGRITY,
) -> Report:
    return build_report(
        policy,
        qemu_target(),
        all_results() if results is None else results,
        integrity=integrity,
        generated=GENERATED,
        tool_version="0.1.0",
    )


def passing_results(policy: Policy) -> dict[str, CheckResult]:
    ids = [c for claim in policy.claims for c in claim.checks]
    return {i: check(i, P, evidence=[Evidence(command="true", exit_code=0)]) for i in ids}


# --- claim status ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "outcomes", "expected"),
    [
        (ClaimKind.ORGANISATIONAL, [], ClaimStatus.ORGANISATIONAL),
        (ClaimKind.TECHNICAL, [P], ClaimStatus.VERIFIED),
        (ClaimKind.TECHNICAL, [P, P], ClaimStatus.VERIFIED),
        (ClaimKind.TECHNICAL, [P, N], ClaimStatus.PARTIAL),  # a check that did not run proves nothing
        (ClaimKind.TECHNICAL, [N, P, N], ClaimStatus.PARTIAL),
        (ClaimKind.TECHNICAL, [N], ClaimStatus.NOT_APPLICABLE),
        (ClaimKind.TECHNICAL, [N, N], ClaimStatus.NOT_APPLICABLE),
        (ClaimKind.TECHNICAL, [F], ClaimStatus.FAILED),
        (ClaimKind.TECHNICAL, [E], ClaimStatus.FAILED),
        (ClaimKind.TECHNICAL, [P, F], ClaimStatus.FAILED),
        (ClaimKind.TECHNICAL, [P, E], ClaimStatus.FAILED),
        (ClaimKind.TECHNICAL, [N, F], ClaimStatus.FAILED),
        (ClaimKind.TECHNICAL, [N, E], ClaimStatus.FAILED),
        (ClaimKind.TECHNICAL, [], ClaimStatus.FAILED),  # no check at all is not a pass
    ],
)
def test_claim_status_table(kind: ClaimKind, outcomes: list[CheckOutcome], expected: ClaimStatus) -> None:
    checks = [check(f"storage.check_{i}", o) for i, o in enumerate(outcomes)]
    status, reason = claim_status(kind, checks)
    assert status is expected
    assert (reason is None) == (expected in {ClaimStatus.VERIFIED, ClaimStatus.ORGANISATIONAL})


def test_partial_says_how_many_ran_and_what_did_not() -> None:
    checks = [check("storage.a", P), check("storage.b", N, "runs on booted targets\nmore"), check("dns.c", P)]
    assert claim_status(ClaimKind.TECHNICAL, checks) == (
        ClaimStatus.PARTIAL,
        "partially verified: 2 of 3 checks ran on this target; not here: storage.b (runs on booted targets)",
    )


def permitted(**overrides: object) -> PermittedRecord:
    record = {
        "record": "session",
        "kind": "session",
        "purpose": "abuse handling",
        "fields": ["client_ip", "session_start"],
        "events": ["disconnect"],
        "retention": "90 days",
        "destination": "collector",
    }
    return PermittedRecord.model_validate(record | overrides)


@pytest.mark.parametrize(
    ("outcomes", "observes", "expected"),
    [
        ([P, P], False, ClaimStatus.UNPROVEN),  # passed checks that show only what is not kept
        ([P, N], False, ClaimStatus.UNPROVEN),
        ([P, P], True, ClaimStatus.VERIFIED),  # a check watched the record leave, and only it
        ([P, N], True, ClaimStatus.PARTIAL),
        ([N, N], True, ClaimStatus.NOT_APPLICABLE),
        ([P, F], True, ClaimStatus.FAILED),
    ],
)
def test_a_permitted_record_needs_a_check_that_watched_it_leave(
    outcomes: list[CheckOutcome], observes: bool, expected: ClaimStatus
) -> None:
    checks = [check(f"storage.check_{i}", o) for i, o in enumerate(outcomes)]
    checks[0] = checks[0].model_copy(update={"observes_records": observes})
    status, reason = claim_status(ClaimKind.TECHNICAL, checks, [permitted()])
    assert status is expected
    if expected is ClaimStatus.UNPROVEN:
        assert reason and reason.startswith("not yet provable: no check observed the permitted records")
        assert "session (client_ip, session_start) to collector" in reason


def test_an_observing_check_that_did_not_pass_proves_nothing() -> None:
    checks = [
        check("storage.a", N, "booted only").model_copy(update={"observes_records": True}),
        check("dns.b", P),
    ]
    assert claim_status(ClaimKind.TECHNICAL, checks, [permitted()])[0] is ClaimStatus.UNPROVEN


def test_not_applicable_reason_joins_the_checks_reasons() -> None:
    checks = [check("storage.a", N, "no kernel of its own"), check("storage.b", N, "no disks attached")]
    checks.append(check("storage.c", N, "no kernel of its own"))
    assert claim_status(ClaimKind.TECHNICAL, checks) == (
        ClaimStatus.NOT_APPLICABLE,
        "no kernel of its own; no disks attached",
    )


def test_failed_reason_names_each_failing_check() -> None:
    checks = [check("storage.a", P), check("storage.b", F, "assert 1 == 2\n more"), check("dns.c", E, "boom")]
    status, reason = claim_status(ClaimKind.TECHNICAL, checks)
    assert status is ClaimStatus.FAILED
    assert reason == "storage.b failed: assert 1 == 2; dns.c error: boom"


@pytest.mark.parametrize("outcome", [F, E, N])
def test_a_check_that_did_not_pass_must_say_why(outcome: CheckOutcome) -> None:
    with pytest.raises(ValidationError, match="gives no reason"):
        CheckResult(id="storage.a", title="a", outcome=outcome)
    with pytest.raises(ValidationError, match="gives no reason"):
        CheckResult(id="storage.a", title="a", outcome=outcome, reason="  \n")


def test_titles_and_rationales_are_one_line() -> None:
    result = check("storage.a", P, rationale="one\n  two", title="a\ttitle\n")
    assert (result.title, result.rationale) == ("a title", "one two")


# --- building the report -----------------------------------------------------------------------


def test_claims_follow_policy_order_with_their_checks(example_policy: Policy) -> None:
    report = make_report(example_policy)
    assert [c.id for c in report.claims] == [c.id for c in example_policy.claims]
    statuses = {c.id: c.status for c in report.claims}
    assert statuses == {
        "no-disk-storage": ClaimStatus.PARTIAL,
        "no-traffic-logging": ClaimStatus.FAILED,
        "no-swap": ClaimStatus.NOT_APPLICABLE,
        "session-records-off-server": ClaimStatus.FAILED,
        "owns-servers": ClaimStatus.ORGANISATIONAL,
        "independent-audit": ClaimStatus.ORGANISATIONAL,
    }
    for claim, source in zip(report.claims, example_policy.claims, strict=True):
        assert [c.id for c in claim.checks] == source.checks
        assert claim.text == source.text
        assert claim.sources == {"en": "en.txt", "sv": "sv.txt"}
        assert claim.controls == source.controls
        assert claim.permits == source.permits
    assert report.totals == {
        ClaimStatus.VERIFIED: 0,
        ClaimStatus.PARTIAL: 1,
        ClaimStatus.UNPROVEN: 0,
        ClaimStatus.NOT_APPLICABLE: 1,
        ClaimStatus.FAILED: 2,
        ClaimStatus.ORGANISATIONAL: 2,
    }


def test_the_integrity_claim_is_apart_from_the_policys_totals(example_policy: Policy) -> None:
    report = make_report(example_policy, passing_results(example_policy))
    assert report.integrity.id == "amnesiac-integrity"
    assert report.integrity.id not in [c.id for c in report.claims]
    assert sum(report.totals.values()) == len(example_policy.claims)
    assert report.totals[ClaimStatus.VERIFIED] == len(example_policy.technical_claims()) - 1  # + unproven
    # ... and yet it is part of the verdict: a failed integrity fails the report.
    broken = make_report(
        example_policy, passing_results(example_policy), [check("ssh.key_only", F, "passwords")]
    )
    assert broken.integrity.status is ClaimStatus.FAILED
    assert (broken.verdict, exit_code(broken)) == (Verdict.FAIL, 1)
    assert broken.totals == report.totals
    # No integrity check at all is not a pass either.
    assert make_report(example_policy, passing_results(example_policy), []).verdict is Verdict.FAIL


def test_a_shared_check_appears_under_each_claim(example_policy: Policy) -> None:
    report = make_report(example_policy)
    shared = "storage.root_is_size_limited_tmpfs"
    holders = [c.id for c in report.claims if shared in [k.id for k in c.checks]]
    assert holders == ["no-disk-storage", "no-traffic-logging"]


def test_a_check_missing_from_the_suite_is_an_error(example_policy: Policy) -> None:
    results = passing_results(example_policy)
    del results["dns.resolver_logs_no_queries"]
    report = make_report(example_policy, results)
    claim = next(c for c in report.claims if c.id == "no-traffic-logging")
    missing = claim.checks[-1]
    assert (missing.id, missing.outcome, missing.reason) == (
        "dns.resolver_logs_no_queries",
        CheckOutcome.ERROR,
        "no such check in the suite",
    )
    assert claim.status is ClaimStatus.FAILED
    assert "dns.resolver_logs_no_queries error: no such check in the suite" in (claim.reason or "")
    assert (report.verdict, exit_code(report)) == (Verdict.FAIL, 1)


def test_no_results_at_all_fail_every_technical_claim(example_policy: Policy) -> None:
    report = make_report(example_policy, {})
    assert report.totals[ClaimStatus.FAILED] == len(example_policy.technical_claims())
    assert exit_code(report) == 1


def test_verdict_and_exit_code(example_policy: Policy) -> None:
    assert (make_report(example_policy).verdict, exit_code(make_report(example_policy))) == (Verdict.FAIL, 1)

    # Every check passed, but the permitted record was not watched leaving: not a pass.
    passing = make_report(example_policy, passing_results(example_policy))
    assert [c.id for c in passing.not_proved] == ["session-records-off-server"]
    assert (passing.verdict, exit_code(passing), passing.passed) == (Verdict.INCOMPLETE, 5, False)

    observed = passing_results(example_policy)
    observed["provider.shipped_off_server"] = observed["provider.shipped_off_server"].model_copy(
        update={"observes_records": True}
    )
    proved = make_report(example_policy, observed)
    assert (proved.verdict, exit_code(proved), proved.passed) == (Verdict.PASS, 0, True)

    # A claim no check can prove on this target does not fail the verdict, nor pass it.
    observed["storage.no_swap_active"] = check("storage.no_swap_active", N, "container")
    report = make_report(example_policy, observed)
    assert report.totals[ClaimStatus.NOT_APPLICABLE] == 1
    assert (report.verdict, exit_code(report)) == (Verdict.INCOMPLETE, 5)


def test_a_result_filed_under_another_id_is_refused(example_policy: Policy) -> None:
    results = passing_results(example_policy)
    results["storage.no_swap_active"] = check("storage.something_else", P)
    with pytest.raises(ValueError, match=r"is for check 'storage\.something_else'"):
        make_report(example_policy, results)


def test_the_report_cannot_contradict_itself(example_policy: Policy) -> None:
    data = json.loads(render_json(make_report(example_policy)))
    tampered = json.loads(json.dumps(data))
    tampered["verdict"] = "pass"
    with pytest.raises(ValidationError, match="does not follow from the claims"):
        load(json.dumps(tampered))

    tampered = json.loads(json.dumps(data))
    tampered["claims"][1]["status"] = "verified"
    with pytest.raises(ValidationError, match="its checks make it failed"):
        load(json.dumps(tampered))

    tampered = json.loads(json.dumps(data))
    tampered["claims"][0]["status"] = "verified"  # partially verified, claimed whole
    with pytest.raises(ValidationError, match="its checks make it partially-verified"):
        load(json.dumps(tampered))

    tampered = json.loads(json.dumps(data))
    tampered["claims"][3]["checks"][0]["observes_records"] = True  # cannot make an error a proof
    tampered["integrity"]["checks"][0]["outcome"] = "failed"
    with pytest.raises(ValidationError, match=r"gives no reason|its checks make it failed"):
        load(json.dumps(tampered))

    tampered = json.loads(json.dumps(data))
    tampered["totals"]["verified"] = 5
    with pytest.raises(ValidationError, match="totals do not match"):
        load(json.dumps(tampered))


def test_generated_is_utc_iso_8601(example_policy: Policy) -> None:
    cest = timezone(timedelta(hours=2))
    report = build_report(
        example_policy,
        qemu_target(),
        all_results(),
        integrity=INTEGRITY,
        generated=datetime(2025, 11, 23, 8, 31, 5, 999, tzinfo=cest),
        tool_version="0.1.0",
    )
    assert json.loads(render_json(report))["generated"] == "2025-11-23T06:31:05Z"
    with pytest.raises(ValidationError, match="time zone"):
        build_report(
            example_policy,
            qemu_target(),
            {},
            integrity=INTEGRITY,
            generated=datetime(2025, 1, 1),
            tool_version="0",
        )


def test_target_spec() -> None:
    assert Target(kind=TargetKind.QEMU, address="build/ovpn").spec == "qemu:build/ovpn"
    assert Target(kind=TargetKind.SSH, address="root@vpn1").spec == "ssh://root@vpn1"
    assert Target(kind=TargetKind.PODMAN, address="vpn").spec == "podman://vpn"
    with pytest.raises(ValidationError):
        Identity(image_sha256="not-a-hash")


# --- evidence ----------------------------------------------------------------------------------


def test_short_output_is_kept_whole() -> None:
    assert bound_output("tmpfs / rw\n") == "tmpfs / rw\n"
    assert bound_output("x" * model.OUTPUT_LIMIT) == "x" * model.OUTPUT_LIMIT


def test_long_output_keeps_head_and_tail_and_counts_what_it_omits() -> None:
    lines = [f"line {i:05d} ünïcode" for i in range(2000)]
    text = "\n".join(lines) + "\n"
    bounded = bound_output(text)
    assert len(bounded) <= model.OUTPUT_LIMIT
    head, _, tail = bounded.partition("[… ")
    assert head.startswith("line 00000") and head.endswith("\n")  # cut on a line boundary
    assert tail.endswith("line 01999 ünïcode\n")
    omitted_bytes = int(tail.split(" ", 1)[0])
    tail_text = tail.split(" omitted …]\n", 1)[1]
    assert omitted_bytes == len(text.encode()) - len(head.encode()) - len(tail_text.encode())
    assert bound_output(bounded) == bounded  # idempotent: a report read back is unchanged


def test_unbroken_output_is_bounded_too() -> None:
    bounded = bound_output("é" * 10_000, limit=100)
    assert len(bounded) <= 100
    assert "bytes omitted" in bounded
    assert bounded.startswith("é") and bounded.endswith("é")


def test_evidence_is_bounded_and_printable() -> None:
    evidence = Evidence(command="cat /dev/x\x00", exit_code=0, output="\x1b[31mred\x1b[0m\x07" + "y" * 9000)
    assert len(evidence.output) <= model.OUTPUT_LIMIT
    assert evidence.output.startswith("red\\x07y")
    assert evidence.command == "cat /dev/x\\x00"
    assert printable("a\x9b31mb\x85c") == "a\\x9b31mb\\x85c"  # C1 controls: CSI, NEL
    long_reason = check("storage.a", F, "z" * 10_000)
    assert len(long_reason.reason or "") <= model.REASON_LIMIT


# --- report.json -------------------------------------------------------------------------------


def test_report_json_content(example_policy: Policy) -> None:
    report = make_report(example_policy)
    data = json.loads(render_json(report))
    assert list(data) == [
        "format", "tool", "generated", "policy", "target", "integrity", "totals", "verdict", "claims"
    ]  # fmt: skip
    assert data["format"] == 2
    assert data["tool"] == {"name": "amnesiac", "version": "0.1.0"}
    assert data["verdict"] == "fail"
    assert data["totals"] == {
        "verified": 0, "partially-verified": 1, "unproven": 0,
        "not-applicable": 1, "failed": 2, "organisational": 2,
    }  # fmt: skip
    assert (data["integrity"]["id"], data["integrity"]["status"]) == ("amnesiac-integrity", "verified")
    assert data["policy"] == {
        "id": "example",
        "title": "Example VPN privacy policy",
        "provider": "Example VPN AB",
        "file": str(DATA / "policy.yml"),
        "sha256": example_policy.sha256,
        "sources": {"en": "en.txt", "sv": "sv.txt"},
        "endpoints": {
            "records": {
                "url": "https://records.example.net/v1/sessions",
                "description": "Example VPN's central records service",
            }
        },
    }
    assert data["target"]["kind"] == "qemu"
    assert data["target"]["identity"]["image_sha256"] == SHA_A
    assert data["target"]["identity"]["manifest_sha256_matches"] is True

    claim = data["claims"][1]
    assert claim["id"] == "no-traffic-logging"
    assert (claim["kind"], claim["status"]) == ("technical", "failed")
    assert claim["text"]["sv"][0] == "Vi loggar ingen trafik, inga DNS-förfrågningar och inga tidsstämplar."
    assert claim["controls"][0] == {"role": "no_logs", "vars": {"no_logs_journald_storage": "none"}}
    first = claim["checks"][0]
    assert (first["id"], first["outcome"]) == ("logging.journald_stores_nothing", "failed")
    assert first["evidence"][0] == {
        "command": "systemd-analyze cat-config systemd/journald.conf",
        "exit_code": 0,
        "output": "[Journal]\nStorage=persistent\n",
        "note": None,
    }
    assert "bytes omitted" in first["evidence"][1]["output"]
    permits = data["claims"][3]["permits"]
    assert permits == [
        {
            "record": "session-times",
            "kind": "session",
            "purpose": "billing disputes",
            "fields": ["session_start", "session_end"],
            "events": ["disconnect"],
            "retention": "30 days",
            "destination": "records",
            "maximum": None,
            "period": None,
        }
    ]
    assert data["claims"][4]["checks"] == []
    assert data["claims"][4]["status"] == "organisational"


def test_report_json_reads_back_equal(example_policy: Policy) -> None:
    report = make_report(example_policy)
    assert load(render_json(report)) == report


# --- junit.xml ---------------------------------------------------------------------------------


def junit_xml(data: bytes) -> ET.Element:
    return ET.fromstring(data)  # noqa: S314 (the test's own output, not untrusted input)


def test_junit_counts_and_cases(example_policy: Policy) -> None:
    report = make_report(example_policy)
    root = junit_xml(render_junit(report))
    suites = root.findall("testsuite")
    assert root.tag == "testsuites" and len(suites) == 1
    suite = suites[0]
    assert suite.get("name") == "example on qemu:build/example"
    cases = suite.findall("testcase")
    pairs = [(c.get("classname"), c.get("name")) for c in cases]
    assert pairs == [
        ("amnesiac-integrity", "ssh.key_only"),
        ("no-disk-storage", "storage.root_is_size_limited_tmpfs"),
        ("no-disk-storage", "storage.no_block_device_mounted"),
        ("no-disk-storage", "verdict"),
        ("no-traffic-logging", "logging.journald_stores_nothing"),
        ("no-traffic-logging", "storage.root_is_size_limited_tmpfs"),
        ("no-traffic-logging", "dns.resolver_logs_no_queries"),
        ("no-swap", "storage.no_swap_active"),
        ("session-records-off-server", "provider.shipped_off_server"),
        ("owns-servers", "organisational"),
        ("independent-audit", "organisational"),
    ]
    failures = [c for c in cases if c.find("failure") is not None]
    errors = [c for c in cases if c.find("error") is not None]
    skipped = [c for c in cases if c.find("skipped") is not None]
    assert [c.get("name") for c in failures] == ["logging.journald_stores_nothing"]
    assert [c.get("name") for c in errors] == [
        "dns.resolver_logs_no_queries",
        "provider.shipped_off_server",
    ]
    assert len(skipped) == 5
    for element in (root, suite):
        assert element.get("tests") == "11"
        assert element.get("failures") == "1"
        assert element.get("errors") == "2"
        assert element.get("skipped") == "5"

    failure = failures[0].find("failure")
    assert failure is not None
    assert (failure.get("message") or "").startswith("assert not journal_files")
    assert "$ systemd-analyze cat-config systemd/journald.conf" in (failure.text or "")
    assert "Storage=persistent" in (failure.text or "")
    error = errors[0].find("error")
    assert error is not None and error.get("message") == "no such check in the suite"
    messages = {(c.get("classname"), c.get("name")): c.find("skipped") for c in skipped}
    swap = messages[("no-swap", "storage.no_swap_active")]
    assert (
        swap is not None
        and swap.get("message") == "swap is a kernel property; a container shares the host's kernel"
    )
    partial = messages[("no-disk-storage", "verdict")]
    assert partial is not None and (partial.get("message") or "").startswith(
        "partially-verified: partially verified: 1 of 2 checks ran on this target"
    )
    organisational = messages[("owns-servers", "organisational")]
    assert organisational is not None
    assert organisational.get("message") == "organisational: not verifiable by software"

    properties = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert properties["verdict"] == "fail"
    assert properties["policy.sha256"] == example_policy.sha256
    assert properties["target.image_sha256"] == SHA_A
    assert properties["claim.no-swap"] == "not-applicable"
    assert properties["claim.amnesiac-integrity"] == "verified"


def test_junit_stays_valid_xml_whatever_the_output(example_policy: Policy) -> None:
    results = all_results()
    results["logging.journald_stores_nothing"] = check(
        "logging.journald_stores_nothing",
        F,
        'bad bytes \x00\x1b]0;title\x07 and "quotes" & <tags> ]]>',
        evidence=[Evidence(command="printf '\\0'", exit_code=0, output="\x00\x01\x02 ]]> </failure>")],
    )
    root = junit_xml(render_junit(make_report(example_policy, results)))
    failure = next(root.iter("failure"))
    assert failure.get("message") == 'bad bytes \\x00\\x1b]0;title\\x07 and "quotes" & <tags> ]]>'
    assert "\\x00\\x01\\x02 ]]> </failure>" in (failure.text or "")


# --- report.html -------------------------------------------------------------------------------


class _Page(HTMLParser):
    """What a reader sees of the report: the quotes by language, claim sections, badges."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.quotes: list[tuple[str, str]] = []
        self.claim_ids: list[str] = []
        self.tags: set[str] = set()
        self.attrs: list[tuple[str, str]] = []
        self._quote_lang: str | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        values = {k: v or "" for k, v in attrs}
        self.attrs += list(values.items())
        if tag == "blockquote":
            self._quote_lang, self._text = values.get("lang", "?"), []
        if tag == "article" and values.get("id", "").startswith("claim-"):
            self.claim_ids.append(values["id"].removeprefix("claim-"))

    def handle_endtag(self, tag: str) -> None:
        if tag == "blockquote" and self._quote_lang is not None:
            self.quotes.append((self._quote_lang, "".join(self._text)))
            self._quote_lang = None

    def handle_data(self, data: str) -> None:
        if self._quote_lang is not None:
            self._text.append(data)


def parse(page: str) -> _Page:
    parser = _Page()
    parser.feed(page)
    parser.close()
    return parser


def test_html_quotes_every_claim_in_every_language(example_policy: Policy) -> None:
    page = render_html(make_report(example_policy))
    parsed = parse(page)
    expected = [(lang, q) for claim in example_policy.claims for lang, qs in claim.text.items() for q in qs]
    integrity = [("en", q) for q in model.integrity_claim(INTEGRITY).text["en"]]
    assert parsed.quotes == integrity + expected
    assert parsed.claim_ids == ["amnesiac-integrity", *(c.id for c in example_policy.claims)]
    for lang, quote in expected:
        assert f'<blockquote lang="{lang}"><p>{markupsafe.escape(quote)}</p></blockquote>' in page
    # The source files are named beside the quotes.
    assert page.count("source: <code>en.txt</code>") == len(example_policy.claims)
    assert page.count("source: <code>sv.txt</code>") == len(example_policy.claims)


def test_html_escapes_markup_from_the_policy(example_policy: Policy) -> None:
    page = render_html(make_report(example_policy))
    assert "<script" not in page
    assert "&lt;script&gt;alert(&#34;the report must escape this&#34;)&lt;/script&gt;" in page
    assert "script" not in parse(page).tags
    assert "&amp; nobody else has access" in page


def test_html_is_self_contained(example_policy: Policy) -> None:
    page = render_html(make_report(example_policy))
    parsed = parse(page)
    assert not {"script", "link", "img", "iframe", "object", "embed"} & parsed.tags
    for name, value in parsed.attrs:
        if name in {"href", "src"}:
            assert value.startswith("#"), (name, value)
    assert "url(" not in page and "@import" not in page and "@font-face" not in page


def test_html_header_and_verdict(example_policy: Policy) -> None:
    page = render_html(make_report(example_policy))
    for fact in [
        "Example VPN privacy policy",
        "Example VPN AB",
        str(DATA / "policy.yml"),
        example_policy.sha256,
        "qemu:build/example",
        SHA_A,
        "6.12.57+deb13-amd64",
        "initrd=initrd.img console=ttyS0 quiet amnesiac.root=tmpfs",
        "5d1b1e3c-8f0a-4c35-9a3e-2a8e0b4b5f11",
        "2025-11-23 06:31:05 UTC",
        "amnesiac 0.1.0",
    ]:
        assert markupsafe.escape(fact) in page, fact
    assert 'class="verdict verdict--fail"' in page
    assert "<title>FAIL: Example VPN privacy policy" in page
    assert "2 claims failed on this target" in page
    assert "2 claims are not proved by this report:" in page

    incomplete = render_html(make_report(example_policy, passing_results(example_policy)))
    assert 'class="verdict verdict--incomplete"' in incomplete
    assert "1 claim is not proved by this report although nothing failed" in incomplete

    results = passing_results(example_policy)
    shipped = results["provider.shipped_off_server"]
    results[shipped.id] = shipped.model_copy(update={"observes_records": True})
    passing = render_html(make_report(example_policy, results))
    assert 'class="verdict verdict--pass"' in passing
    assert "every check the policy names ran on this target and passed" in passing


def test_html_says_each_status_in_words(example_policy: Policy) -> None:
    page = render_html(make_report(example_policy))
    sections = page.split('<article class="claim ')[1:]
    words = {
        "amnesiac-integrity": ["Verified", "amnesiac's own claim, on every target"],
        "no-disk-storage": ["Partially verified", "Not proved:", "1 of 2 checks ran on this target"],
        "no-traffic-logging": ["Failed", "Assertion:", "no such check in the suite", "Error"],
        "no-swap": ["Not applicable", "Not applicable to this target:", "a container shares the host"],
        "session-records-off-server": [
            "Failed",
            "What the policy permits the provider to record",
            "not a result: no check has observed these records leave",
            "30 days",
            "session_start",
            "https://records.example.net/v1/sessions",
        ],
        "owns-servers": [
            "Organisational",
            "Not verifiable by software.",
            "German (de)",
            "not checked against any source",
            "Wir besitzen jeden Server, den wir betreiben, & niemand sonst hat Zugang.",
        ],
        "independent-audit": ["Organisational", "Not verifiable by software."],
    }
    assert len(sections) == len(words)
    for section, (claim_id, expected) in zip(sections, words.items(), strict=True):
        assert f'id="claim-{claim_id}"' in section
        for word in expected:
            assert markupsafe.escape(word) in section, (claim_id, word)
    # The summary table links each claim and names its status.
    summary = page.split('<table class="summary">', 1)[1].split("</table>", 1)[0]
    for claim_id in list(words)[1:]:
        assert f'href="#claim-{claim_id}"' in summary
    assert summary.count("> Partially verified</span>") == 1
    assert summary.count("> Organisational</span>") == 2


def test_html_shows_controls_and_evidence(example_policy: Policy) -> None:
    page = render_html(make_report(example_policy))
    assert "<code>ram_root</code>" in page
    assert "ram_root_tmpfs_size_mib: 384" in page
    assert "no_logs_journald_storage: &#34;none&#34;" in page
    assert "findmnt --noheadings --output FSTYPE,OPTIONS /" in page
    assert "tmpfs rw,nosuid,nodev,relatime,size=393216k,mode=755" in page
    assert "bytes omitted" in page
    assert '<span class="exit exit--nonzero">exit 1</span>' in page
    assert "400 journal files on a server that must keep none" in page


def test_html_warns_when_the_image_is_not_the_built_one(example_policy: Policy) -> None:
    target = qemu_target().model_copy(
        update={"identity": qemu_target().identity.model_copy(update={"manifest_sha256_matches": False})}
    )
    report = build_report(
        example_policy,
        target,
        passing_results(example_policy),
        integrity=INTEGRITY,
        generated=GENERATED,
        tool_version="0",
    )
    assert "do not match the build manifest" in render_html(report)


def report_with_tpm(policy: Policy, tpm: TpmAttestation | None) -> Report:
    """A passing report of a qemu: target whose identity holds `tpm`."""
    identity = qemu_target().identity.model_copy(update={"tpm": tpm})
    return build_report(
        policy,
        qemu_target().model_copy(update={"identity": identity}),
        passing_results(policy),
        integrity=INTEGRITY,
        generated=GENERATED,
        tool_version="0",
    )


def test_the_identity_says_attested_only_when_the_tpm_did(example_policy: Policy) -> None:
    """ "attested by the TPM" and "reported by the target" are never the same words: a report
    without a quote, with a failed one and with a good one, in HTML, JSON and JUnit."""

    def page(tpm: TpmAttestation | None) -> tuple[str, str, Report]:
        report = report_with_tpm(example_policy, tpm)
        return render_html(report), render_junit(report).decode(), report

    pcrs = {"11": "1" * 64, "12": "0" * 64}
    good = TpmAttestation(
        attested=True, reason="attested", nonce="ab" * 20, ak_sha256="d" * 64,
        quoted_pcrs=pcrs, expected_pcrs=pcrs, overlay_sha256="e" * 64,
    )  # fmt: skip
    bad = good.model_copy(
        update={
            "attested": False,
            "reason": "PCR 11 is 2222…, expected 1111…",
            "quoted_pcrs": {"11": "2" * 64},
        }
    )
    html, junit, report = page(None)
    assert "reported by the target: no TPM was asked" in html and "attested by the TPM" not in html
    assert 'name="target.identity" value="reported by the target"' in junit
    html, junit, report = page(bad)
    assert "not attested" in html and "did not attest this build" in html and "PCR 11 is 2222" in html
    assert 'value="attested by the TPM"' not in junit
    html, junit, report = page(good)
    assert "✓ attested by the TPM" in html and "= predicted" in html and "e" * 64 in html
    assert 'name="target.identity" value="attested by the TPM"' in junit
    assert "Attestation key's TPM" not in html  # the harness's swtpm: no enrolment to name
    data = json.loads(report.model_dump_json())
    assert data["target"]["identity"]["established_by"] == "attested by the TPM"
    assert Report.model_validate_json(report.model_dump_json()) == report  # read back as written


def test_the_identity_names_the_tpm_the_attestation_key_was_bound_to(example_policy: Policy) -> None:
    """An enrolled server's quote is worth what its enrolment was: the report says which
    endorsement key the AK was bound to, and whether a TPM maker's certificate vouched for it
    or it was trusted on first use."""
    pcrs = {"11": "1" * 64}
    attested = TpmAttestation(
        attested=True, reason="attested", nonce="ab" * 20, ak_sha256="d" * 64,
        quoted_pcrs=pcrs, expected_pcrs=pcrs, ek_sha256="f" * 64,
    )  # fmt: skip
    maker = "CN=Example TPM Root CA,O=Example"
    for tpm, says in (
        (attested, "not checked against a TPM maker's certificate"),
        (attested.model_copy(update={"ek_certified_by": maker}), f"chains to the TPM maker's root {maker}"),
    ):
        report = report_with_tpm(example_policy, tpm)
        html, junit = render_html(report), render_junit(report).decode()
        assert "Attestation key's TPM" in html and "f" * 16 in html and says in html, says
        assert f'name="target.tpm.ek_sha256" value="{"f" * 64}"' in junit
        assert (f'name="target.tpm.ek_certified_by" value="{maker}"' in junit) is bool(tpm.ek_certified_by)


# --- writing -----------------------------------------------------------------------------------


def test_write_puts_three_files_and_no_temporaries(example_policy: Policy, tmp_path: Path) -> None:
    report = make_report(example_policy)
    out = tmp_path / "out"
    files = write(report, out)
    assert sorted(p.name for p in out.iterdir()) == ["junit.xml", "report.html", "report.json"]
    assert (files.html, files.json, files.junit) == (
        out / "report.html",
        out / "report.json",
        out / "junit.xml",
    )
    assert load(files.json.read_text(encoding="utf-8")) == report
    junit_xml(files.junit.read_bytes())
    assert files.html.read_text(encoding="utf-8") == render_html(report)
    assert oct(files.html.stat().st_mode & 0o777) == "0o644"


def test_write_leaves_the_old_report_when_rendering_fails(
    example_policy: Policy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(make_report(example_policy), tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def broken(report: Report) -> bytes:
        raise RuntimeError("renderer broke")

    monkeypatch.setattr(render, "render_junit", broken)
    with pytest.raises(RuntimeError):
        write(make_report(example_policy, passing_results(example_policy)), tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_templates_ship_in_the_package() -> None:
    # hatch packages src/amnesiac whole: the templates are package files beside render.py.
    templates = Path(render.__file__).parent / "templates"
    assert (templates / "report.html.j2").is_file()
    assert (templates / "report.css").is_file()


# --- the page in a browser ---------------------------------------------------------------------

ARTIFACTS = Path(os.environ.get("AMNESIAC_TEST_ARTIFACTS", REPO / "build" / "test-artifacts")) / "report"


def chromium(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("chromium")
    assert binary, "the browser tier needs Debian's chromium (apt-get install chromium)"
    cmd = [
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--no-first-run",
        f"--user-data-dir={cwd / 'profile'}",
        *args,
    ]
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.browser
def test_html_renders_in_chromium(example_policy: Policy, tmp_path: Path) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    report = make_report(example_policy)
    files = write(report, ARTIFACTS)
    url = files.html.resolve().as_uri()

    dom = chromium("--dump-dom", url, cwd=tmp_path).stdout
    parsed = parse(dom)
    assert parsed.claim_ids == [report.integrity.id, *(c.id for c in report.claims)]
    assert "script" not in parsed.tags  # the quote's <script> stayed text in the live DOM
    assert 'alert("the report must escape this")' in html.unescape(dom)
    for claim in report.claims:
        section = dom.split(f'id="claim-{claim.id}"', 1)[1].split("</article>", 1)[0]
        assert render.STATUS_LABELS[claim.status] in section
    assert "FAIL" in dom

    screenshot = ARTIFACTS / "report.png"
    screenshot.unlink(missing_ok=True)
    chromium(f"--screenshot={screenshot}", "--window-size=1200,3000", url, cwd=tmp_path)
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    pdf = ARTIFACTS / "report.pdf"
    pdf.unlink(missing_ok=True)
    chromium(f"--print-to-pdf={pdf}", "--no-pdf-header-footer", url, cwd=tmp_path)
    assert pdf.read_bytes()[:5] == b"%PDF-"


def test_html_names_the_verifiers_keys(example_policy: Policy) -> None:
    """A reviewer sees which keys were allowed beside the policy's, or that none were."""
    report = make_report(example_policy)
    assert "none: every key on the target must be one the policy names" in render_html(report)
    fingerprint = "SHA256:4tOnJqkH3bQ0S0Kcx4ZrXW8v0J2y9VnGqUhN0eFf1xY"
    keyed = report.model_copy(
        update={"target": report.target.model_copy(update={"verifier_keys": [fingerprint]})}
    )
    page = render_html(keyed)
    assert fingerprint in page and "allowed beside the policy's keys" in page
