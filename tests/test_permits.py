"""Permitted records as data: every shape a provider states fits the schema without code, each
malformed record stops with file:line, and no report calls a permitted record verified
unless a check watched it leave the server."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from amnesiac import policy
from amnesiac.errors import PolicyError
from amnesiac.policy import RecordKind, Retention
from amnesiac.report import CheckOutcome, CheckResult, ClaimStatus, Target, TargetKind, Verdict, build_report

# A provider that is none of the seeds: it counts each account's open connections while they
# last (a limit of five) and keeps each user's monthly traffic for three months. Written in the
# schema alone, read against the shipped roles and checks.
SOURCE = (
    "Example VPN counts the connections each account has open, only while they are connected, "
    "to enforce the limit of five. We keep the amount of traffic each user moved in a month for "
    "three months, for fair use. Nothing else leaves the server. Example VPN kører uden diske."
)

FOURTH = """\
schema: 2
policy:
  id: example-fourth
  provider: Example VPN
  title: Example VPN privacy policy
  sources:
    en: en.txt
  endpoints:
    accounts:
      url: https://accounts.example.net/v1/node
      description: Example VPN's account service
claims:
  - id: session-records-off-server
    kind: technical
    title: Open connections are counted per account while they last
    text:
      en: >-
        Example VPN counts the connections each account has open, only while they are connected,
        to enforce the limit of five.
    translation:
      da: Example VPN tæller de forbindelser, hver konto har åbne, kun mens de er forbundet.
    permits:
      - record: open-connections
        kind: counter
        purpose: enforce the limit of five connections per account
        fields: [account, connection_count]
        events: [connect, disconnect]
        maximum: 5
        retention: while connected
        destination: accounts
    controls:
      - role: provider_agent
    checks: [provider.agent_writes_nothing]
  - id: data-volume-off-server
    kind: technical
    title: The monthly traffic of each user is kept three months, off the server
    text:
      en: >-
        We keep the amount of traffic each user moved in a month for three months, for fair use.
    permits:
      - record: monthly-traffic
        kind: volume
        purpose: fair use
        fields: [account, data_volume]
        events: [disconnect]
        period: month
        retention: 3 months
        destination: accounts
    controls:
      - role: provider_agent
    checks: [provider.agent_writes_nothing]
"""


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "sources").mkdir(exist_ok=True)
    (tmp_path / "sources" / "en.txt").write_text(SOURCE)
    path = tmp_path / "fourth.yml"
    path.write_text(text)
    return path


def test_a_fourth_provider_fits_the_schema_without_code(tmp_path: Path) -> None:
    loaded = policy.load(write(tmp_path, FOURTH))
    counter, volume = loaded.permitted_records()
    assert (counter.kind, counter.maximum, counter.retention.while_connected) == (RecordKind.COUNTER, 5, True)
    assert (volume.kind, volume.period, str(volume.retention)) == (RecordKind.VOLUME, "month", "3 months")
    assert loaded.claims[0].translation == {
        "da": ["Example VPN tæller de forbindelser, hver konto har åbne, kun mens de er forbundet."]
    }


def test_what_only_shows_nothing_is_kept_does_not_verify_a_permitted_record(tmp_path: Path) -> None:
    loaded = policy.load(write(tmp_path, FOURTH))
    passed = CheckResult(id="provider.agent_writes_nothing", title="t", outcome=CheckOutcome.PASSED)
    integrity = [CheckResult(id="ssh.key_only", title="k", outcome=CheckOutcome.PASSED)]
    report = build_report(
        loaded,
        Target(kind=TargetKind.QEMU, address="build/example"),
        {passed.id: passed},
        integrity=integrity,
        generated=datetime.now(UTC),
        tool_version="0",
    )
    assert {c.id: c.status for c in report.claims} == {
        "session-records-off-server": ClaimStatus.UNPROVEN,
        "data-volume-off-server": ClaimStatus.UNPROVEN,
    }
    assert report.verdict is Verdict.INCOMPLETE
    reason = report.claims[0].reason or ""
    assert "open-connections (account, connection_count) to accounts" in reason


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90 days", "90 days"),
        ("1 month", "1 month"),
        ("2  Years", "2 years"),
        ("1 weeks", "1 week"),
        ("While connected", "while connected"),
    ],
)
def test_retention_reads_as_written(text: str, expected: str) -> None:
    assert str(Retention.parse(text)) == expected


def _replace(old: str, new: str) -> str:
    assert old in FOURTH, old
    return FOURTH.replace(old, new, 1)


ENDPOINTS = """\
  endpoints:
    accounts:
      url: https://accounts.example.net/v1/node
      description: Example VPN's account service
"""
SECOND = "  - id: data-volume-off-server\n    kind: "

# (what is wrong, the broken policy, expected line, words the one-line message must contain)
MALFORMED = [
    ("unknown endpoint", _replace("destination: accounts", "destination: billing"), 30, "not an endpoint"),
    ("no endpoints", _replace(ENDPOINTS, ""), 26, "declares none"),
    ("bad retention", _replace("retention: while connected", "retention: forever"), 29, "N days"),
    ("retention number", _replace("retention: 3 months", "retention: 3"), 47, "retention is text"),
    ("unknown field", _replace("[account, connection_count]", "[account, username]"), 26, "fields.1"),
    ("field twice", _replace("[account, connection_count]", "[account, account]"), 23, "named twice"),
    ("counter events", _replace("[connect, disconnect]", "[disconnect]"), 23, "a counter changes"),
    ("max, not counter", _replace("month\n", "month\n        maximum: 3\n"), 41, "only a counter"),
    ("volume no period", _replace("        period: month\n", ""), 41, "a volume needs a period"),
    ("period, not volume", _replace("maximum: 5", "maximum: 5\n        period: day"), 23, "a volume"),
    ("record twice", _replace("record: monthly-traffic", "record: open-connections"), 41, "permitted twice"),
    ("permits twice", _replace("maximum: 5\n", "maximum: 5\n    permits: []\n"), 29, "key 'permits'"),
    ("http endpoint", _replace("https://accounts", "http://accounts"), 10, "url"),
    ("translated into en", _replace("      da: Example", "      en: Example"), 21, "quote it under"),
    ("organisational permits", _replace(SECOND + "technical", SECOND + "organisational"), 34, "or permits"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "text", "line", "words"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_records_name_file_and_line(
    tmp_path: Path, name: str, text: str, line: int, words: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(PolicyError) as caught:
        policy.load(path)
    message = str(caught.value)
    assert words in message, message
    assert message.startswith(f"{path}:{line}: "), message
    assert "\n" not in message


def test_the_records_the_agent_sends_are_never_set_by_hand(tmp_path: Path) -> None:
    """provider_agent_records comes from `permits`: a control that sets it is refused by line."""
    text = FOURTH.replace(
        "      - role: provider_agent\n    checks: [provider.agent_writes_nothing]\n  - id: data-volume",
        "      - role: provider_agent\n        vars:\n          provider_agent_records: []\n"
        "    checks: [provider.agent_writes_nothing]\n  - id: data-volume",
        1,
    )
    assert text != FOURTH
    with pytest.raises(PolicyError) as caught:
        policy.load(write(tmp_path, text))
    assert "provider_agent_records is not set by hand" in str(caught.value)
    assert "fourth.yml:" in str(caught.value)
