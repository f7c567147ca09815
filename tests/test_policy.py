"""The policy model: shipped policies load; malformed ones stop with file:line and exit 2."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from amnesiac import policy
from amnesiac.errors import PolicyError
from amnesiac.roles import Role

SOURCE_EN = "We own our servers. Nothing is kept:\n\n  no logging of traffic\nAll servers run without disks."
SOURCE_SV = "Vi äger våra servrar. Inget sparas: • ingen loggning av trafik. Alla servrar saknar diskar."

VALID = """\
---
schema: 1
policy:
  id: mini
  provider: Mini VPN
  title: Mini policy
  sources:
    en: en.txt
    sv: sv.txt
claims:
  - id: no-disk-storage
    kind: technical
    title: No disks
    text:
      en: All servers run without disks.
      sv: Alla servrar saknar diskar.
    controls:
      - role: ram_root
        vars:
          ram_root_tmpfs_size_mib: 256
    checks: [storage.root_is_size_limited_tmpfs]
  - id: no-traffic-logging
    kind: technical
    title: No traffic logs
    text:
      en: [no logging of traffic]
      sv: ingen loggning av trafik
    controls:
      - role: no_logs
    checks: [logging.journald_stores_nothing]
  - id: owns-servers
    kind: organisational
    title: Owns its servers
    text:
      en: We own our servers.
      sv: Vi äger våra servrar.
"""


def write_policy(tmp_path: Path, text: str) -> Path:
    (tmp_path / "sources").mkdir(exist_ok=True)
    (tmp_path / "sources" / "en.txt").write_text(SOURCE_EN)
    (tmp_path / "sources" / "sv.txt").write_text(SOURCE_SV)
    path = tmp_path / "mini.yml"
    path.write_text(text)
    return path


def test_valid_policy_loads(tmp_path: Path, fake_roles: dict[str, Role]) -> None:
    loaded = policy.load(write_policy(tmp_path, VALID), fake_roles)
    assert [c.id for c in loaded.claims] == ["no-disk-storage", "no-traffic-logging", "owns-servers"]
    assert loaded.roles() == ["server_base", "ssh_admin", "ram_root", "no_logs"]
    assert loaded.role_vars() == {"ram_root_tmpfs_size_mib": 256}
    assert loaded.claims[1].text["en"] == ["no logging of traffic"]
    assert len(loaded.sha256) == 64
    assert dict(policy.iter_checks(loaded))["storage.root_is_size_limited_tmpfs"] == ["no-disk-storage"]


def _replace(old: str, new: str) -> str:
    assert old in VALID, old
    return VALID.replace(old, new, 1)


# (what is wrong, the broken policy text, expected line, words the one-line message must contain)
MALFORMED = [
    ("bad YAML", _replace("  title: Mini policy\n", "  title: [Mini policy\n"), 7, "invalid YAML"),
    ("empty file", "", 1, "empty"),
    ("not a mapping", "- a\n- b\n", 1, "mapping"),
    ("unknown top key", VALID + "extra: 1\n", 37, "unknown key 'extra'"),
    (
        "unknown claim key",
        _replace("    kind: organisational\n", "    kind: organisational\n    colour: red\n"),
        33,
        "unknown key 'colour'",
    ),
    ("missing schema", _replace("schema: 1\n", ""), 2, "missing required key 'schema'"),
    ("wrong schema", _replace("schema: 1\n", "schema: 2\n"), 2, "schema"),
    ("bad kind", _replace("kind: organisational", "kind: legal"), 32, "technical"),
    (
        "duplicate key",
        _replace("    title: No disks\n", "    title: No disks\n    title: Again\n"),
        14,
        "duplicate key 'title'",
    ),
    (
        "duplicate claim id",
        _replace("id: no-traffic-logging", "id: no-disk-storage"),
        22,
        "duplicate claim id 'no-disk-storage'",
    ),
    ("bad claim id", _replace("id: owns-servers", "id: Owns Servers"), 31, "claims.2.id"),
    ("unknown role", _replace("role: no_logs", "role: no_such_role"), 29, "unknown role 'no_such_role'"),
    (
        "unknown variable",
        _replace("ram_root_tmpfs_size_mib: 256", "ram_root_size: 256"),
        20,
        "has no variable 'ram_root_size'",
    ),
    (
        "wrong variable type",
        _replace("ram_root_tmpfs_size_mib: 256", "ram_root_tmpfs_size_mib: big"),
        20,
        "must be of type int",
    ),
    (
        "bool for int",
        _replace("ram_root_tmpfs_size_mib: 256", "ram_root_tmpfs_size_mib: true"),
        20,
        "must be of type int",
    ),
    (
        "technical without control",
        _replace("    controls:\n      - role: no_logs\n", ""),
        22,
        "names no control",
    ),
    (
        "technical without check",
        _replace("    checks: [logging.journald_stores_nothing]\n", ""),
        22,
        "names no check",
    ),
    (
        "organisational with check",
        VALID.rstrip("\n") + "\n    checks: [storage.no_swap]\n",
        31,
        "organisational claim 'owns-servers' cannot have",
    ),
    (
        "unknown check module",
        _replace("logging.journald_stores_nothing", "telepathy.reads_minds"),
        30,
        "unknown check module",
    ),
    ("malformed check id", _replace("logging.journald_stores_nothing", "Logging Stores"), 30, "checks.0"),
    (
        "quote not in source",
        _replace("en: All servers run without disks.", "en: All servers run without any disks."),
        15,
        "not a verbatim quote",
    ),
    ("missing language", _replace("      sv: Alla servrar saknar diskar.\n", ""), 14, "has no 'sv' text"),
    (
        "unknown language",
        _replace(
            "      sv: Alla servrar saknar diskar.\n",
            "      sv: Alla servrar saknar diskar.\n      de: Keine Platten.\n",
        ),
        17,
        "'de' is not in policy.sources",
    ),
    ("missing source file", _replace("sv: sv.txt", "sv: missing.txt"), 9, "source 'missing.txt' not found"),
    ("missing claims", _replace("claims:\n", "claimz:\n"), 10, "unknown key 'claimz'"),
]


@pytest.mark.parametrize(("case", "text", "line", "words"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_policy_names_file_and_line(
    tmp_path: Path, fake_roles: dict[str, Role], case: str, text: str, line: int, words: str
) -> None:
    path = write_policy(tmp_path, text)
    with pytest.raises(PolicyError) as info:
        policy.load(path, fake_roles)
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: "), message
    assert words in message, message
    assert "\n" not in message
    assert info.value.exit_code == 2


def test_conflicting_variables_across_claims(tmp_path: Path, fake_roles: dict[str, Role]) -> None:
    text = _replace(
        "      - role: no_logs\n",
        "      - role: no_logs\n      - role: ram_root\n        vars: {ram_root_tmpfs_size_mib: 512}\n",
    )
    with pytest.raises(
        PolicyError,
        match=r"mini.yml:31: ram_root_tmpfs_size_mib is 512 here but 256 in claim 'no-disk-storage'",
    ):
        policy.load(write_policy(tmp_path, text), fake_roles)


def test_missing_file() -> None:
    with pytest.raises(PolicyError, match=r"no-such\.yml: no such file"):
        policy.load(Path("no-such.yml"), {})


@pytest.mark.parametrize("name", ["ovpn", "ivpn", "cloudvpn"])
def test_shipped_policies_load(name: str) -> None:
    """Every shipped policy is valid against the real roles, with every claim quoted verbatim."""
    loaded = policy.load(policy_path(name))
    assert loaded.technical_claims(), "a policy with no technical claim builds nothing"
    for claim in loaded.technical_claims():
        assert claim.controls and claim.checks


def test_ovpn_carries_english_and_swedish() -> None:
    loaded = policy.load(policy_path("ovpn"))
    assert set(loaded.policy.sources) == {"en", "sv"}
    assert all(set(c.text) == {"en", "sv"} for c in loaded.claims)
    ids = {c.id for c in loaded.claims}
    assert {"no-disk-storage", "vpn-no-write", "no-syslog", "no-physical-access"} <= ids
    assert any(not c.technical for c in loaded.claims), "organisational claims are kept, not dropped"


def test_cloudvpn_says_what_may_be_recorded() -> None:
    loaded = policy.load(policy_path("cloudvpn"))
    permitted = [c for c in loaded.claims if c.permits]
    assert permitted
    assert all(c.permits and c.permits.destination == "off-server" for c in permitted)
    records = {r for c in permitted if c.permits for r in c.permits.records}
    assert "client_ip" in records


def policy_path(name: str) -> Path:
    return Path(__file__).resolve().parent.parent / "policies" / f"{name}.yml"


def test_text_fold_ignores_line_breaks(tmp_path: Path, fake_roles: dict[str, Role]) -> None:
    text = _replace(
        "en: All servers run without disks.", "en: >-\n        All servers run\n        without disks."
    )
    assert policy.load(write_policy(tmp_path, textwrap.dedent(text)), fake_roles)
