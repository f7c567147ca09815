"""The policy model: shipped policies load; malformed ones stop with file:line and exit 2."""

from __future__ import annotations

import os
import re
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
schema: 2
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
    checks: [firewall.no_log_rules]
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
    ("missing schema", _replace("schema: 2\n", ""), 2, "missing required key 'schema'"),
    ("wrong schema", _replace("schema: 2\n", "schema: 3\n"), 2, "schema"),
    ("schema 1", _replace("schema: 2\n", "schema: 1\n"), 2, "schema 1 is no longer read"),
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
        _replace("    checks: [firewall.no_log_rules]\n", ""),
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
        _replace("firewall.no_log_rules", "telepathy.reads_minds"),
        30,
        "unknown check module",
    ),
    ("malformed check id", _replace("firewall.no_log_rules", "Logging Stores"), 30, "checks.0"),
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
    assert all(r.destination in loaded.policy.endpoints for r in loaded.permitted_records())
    fields = {f for r in loaded.permitted_records() for f in r.fields}
    assert "client_ip" in fields


def policy_path(name: str) -> Path:
    return Path(__file__).resolve().parent.parent / "policies" / f"{name}.yml"


def test_text_fold_ignores_line_breaks(tmp_path: Path, fake_roles: dict[str, Role]) -> None:
    text = _replace(
        "en: All servers run without disks.", "en: >-\n        All servers run\n        without disks."
    )
    assert policy.load(write_policy(tmp_path, textwrap.dedent(text)), fake_roles)


# --- untrusted input: every rule the loader enforces beyond the schema ---------------------------

# (what is wrong, the broken policy text, expected line, words the one-line message must contain)
RULES = [
    # checks: the full id must exist in the catalogue and its metadata must list the claim
    (
        "unknown check in a known module",
        _replace("firewall.no_log_rules", "firewall.reads_minds"),
        30,
        "claim 'no-traffic-logging': unknown check 'firewall.reads_minds' (firewall has: no_log_rules,",
    ),
    (
        "check that does not serve the claim",
        _replace("checks: [firewall.no_log_rules]", "checks: [storage.no_swap]"),
        30,
        "claim 'no-traffic-logging': the check 'storage.no_swap' does not verify it (its metadata lists:",
    ),
    (
        "check named twice",
        _replace("checks: [firewall.no_log_rules]", "checks: [firewall.no_log_rules, firewall.no_log_rules]"),
        30,
        "claim 'no-traffic-logging' names the check 'firewall.no_log_rules' twice",
    ),
    # technical claim ids come from the vocabulary
    (
        "technical claim outside the vocabulary",
        _replace("id: no-traffic-logging", "id: no-traffic-logs"),
        22,
        "technical claim 'no-traffic-logs' is not in the technical claim vocabulary "
        "(did you mean 'no-traffic-logging'?",
    ),
    # schema is the integer 2
    ("schema true", _replace("schema: 2\n", "schema: true\n"), 2, "schema: must be the integer 2, not bool"),
    ("schema string", _replace("schema: 2\n", "schema: '1'\n"), 2, "schema: must be the integer 2, not str"),
    ("schema float", _replace("schema: 2\n", "schema: 1.0\n"), 2, "schema: must be the integer 2, not float"),
    # quotes are not empty, and a quote that is not in the source says where it departs from it
    ("empty quote", _replace("sv: Alla servrar saknar diskar.", 'sv: ""'), 16, "the sv quote is empty"),
    ("blank quote", _replace("sv: Alla servrar saknar diskar.", 'sv: "  \\n "'), 16, "the sv quote is empty"),
    (
        "blank quote in a list",
        _replace("en: [no logging of traffic]", "en: [' ']"),
        26,
        "the en quote is empty",
    ),
    ("no quote", _replace("en: [no logging of traffic]", "en: []"), 26, "the en text is an empty list"),
    (
        "blank title",
        _replace("title: No disks", "title: ' '"),
        13,
        "claim 'no-disk-storage': the title is blank",
    ),
    ("blank provider", _replace("provider: Mini VPN", "provider: ''"), 5, "policy.provider is blank"),
    (
        "quote departs from the source",
        _replace("en: All servers run without disks.", "en: All servers run without any disks at all."),
        15,
        "the source has 'All servers run without' but not what follows it, 'any disks at all.'",
    ),
    (
        "quote with no word in the source",
        _replace("sv: Alla servrar saknar diskar.", "sv: Helt annan text."),
        16,
        "the source has no 'Helt annan text.'",
    ),
    (
        "source is a directory",
        _replace("sv: sv.txt", "sv: ''"),
        9,
        "source '': a file name in",
    ),
    ("source is a path", _replace("sv: sv.txt", "sv: ../mini.yml"), 9, "a file name in"),
    # YAML the loader refuses before it constructs anything
    ("anchor", _replace("title: No disks", "title: &t No disks"), 13, "the anchor &t is not allowed"),
    (
        "alias",
        _replace("title: No traffic logs", "title: *t"),
        24,
        "the alias *t is not allowed",
    ),
    (
        "merge key",
        _replace("    kind: organisational\n", "    kind: organisational\n    <<: {rationale: x}\n"),
        33,
        "merge keys (<<) are not allowed",
    ),
    (
        "python tag",
        _replace("title: No disks", "title: !!python/object/apply:os.system [true]"),
        13,
        "the tag '!!python/object/apply:os.system' is not allowed",
    ),
    (
        "custom tag",
        _replace("title: No disks", "title: !shout No disks"),
        13,
        "the tag '!shout' is not allowed",
    ),
    ("set tag", _replace("title: No disks", "title: !!set {a}"), 13, "the tag '!!set' is not allowed"),
    (
        "binary tag",
        _replace("title: No disks", "title: !!binary aGk="),
        13,
        "the tag '!!binary' is not allowed",
    ),
    (
        "bad bool",
        _replace("ram_root_tmpfs_size_mib: 256", "ram_root_tmpfs_size_mib: !!bool maybe"),
        20,
        "'maybe' is not a boolean",
    ),
    (
        "bad int",
        _replace("ram_root_tmpfs_size_mib: 256", "ram_root_tmpfs_size_mib: !!int lots"),
        20,
        "'lots' is not an integer",
    ),
    (
        "int beyond Python's digit limit",
        _replace("ram_root_tmpfs_size_mib: 256", "ram_root_tmpfs_size_mib: " + "9" * 5000),
        20,
        "is not an integer",
    ),
    ("bad float", _replace("schema: 2\n", "schema: !!float one\n"), 2, "'one' is not a number"),
    (
        "date",
        _replace("title: No disks", "title: 2018-02-10"),
        13,
        "'2018-02-10': a date is not a policy value",
    ),
    (
        "escape sequence",
        _replace("title: No disks", 'title: "\\e[2J No disks"'),
        13,
        "U+001B is not allowed in text",
    ),
    ("NUL in text", _replace("title: No disks", 'title: "No\\0disks"'), 13, "U+0000 is not allowed in text"),
    ("line break in a key", _replace("    title: No disks", '    "ti\\ntle": No disks'), 13, "in a key"),
    ("raw control character", _replace("title: No disks", "title: No\x07disks"), 13, "invalid YAML"),
    (
        "mapping as a key",
        _replace("    title: No disks", "    ? {a: b}\n    : No disks"),
        13,
        "keys must be strings",
    ),
    ("boolean key", _replace("    title: No disks", "    yes: No disks"), 13, "keys must be strings"),
    ("two documents", VALID + "---\nschema: 2\n", 37, "one YAML document"),
    ("nested too deep", VALID + "x: " + "[" * 40 + "]" * 40 + "\n", 37, "nested more"),
    ("tab indentation", _replace("    kind: organisational", "\tkind: organisational"), 32, "invalid YAML"),
]


@pytest.mark.parametrize(("case", "text", "line", "words"), RULES, ids=[r[0] for r in RULES])
def test_loader_rules(
    tmp_path: Path, fake_roles: dict[str, Role], case: str, text: str, line: int, words: str
) -> None:
    test_malformed_policy_names_file_and_line(tmp_path, fake_roles, case, text, line, words)


# The same refusals with PyYAML's pure-Python parser, which reports positions differently and
# lets a lone surrogate escape through (libyaml refuses it itself).
PURE_PYTHON = [
    ("lone surrogate", _replace("title: No disks", 'title: "\\ud800 No disks"'), 13, "surrogate U+D800"),
    ("alias", _replace("title: No traffic logs", "title: *t"), 24, "the alias *t is not allowed"),
    ("raw control character", _replace("title: No disks", "title: No\x07disks"), 13, "invalid YAML"),
    ("bad bool", _replace("schema: 2\n", "schema: !!bool maybe\n"), 2, "'maybe' is not a boolean"),
]


@pytest.mark.parametrize(("case", "text", "line", "words"), PURE_PYTHON, ids=[r[0] for r in PURE_PYTHON])
def test_loader_rules_without_libyaml(
    tmp_path: Path,
    fake_roles: dict[str, Role],
    monkeypatch: pytest.MonkeyPatch,
    case: str,
    text: str,
    line: int,
    words: str,
) -> None:
    import yaml

    monkeypatch.setattr(policy, "_Loader", yaml.SafeLoader)
    monkeypatch.setattr(policy, "_LIBYAML", False)
    test_malformed_policy_names_file_and_line(tmp_path, fake_roles, case, text, line, words)
    monkeypatch.undo()
    assert policy.load(write_policy(tmp_path, VALID), fake_roles)


BYTES = [
    (
        "not UTF-8",
        VALID.encode().replace(b"Owns its servers", b"Owns \xff servers"),
        33,
        "not UTF-8 text (byte 0xff)",
    ),
    ("UTF-16", VALID.encode("utf-16"), 1, "not UTF-8 text"),
    ("NUL byte", VALID.encode().replace(b"Mini VPN", b"Mini\0VPN"), 5, "invalid YAML"),
    ("encoded surrogate", VALID.encode().replace(b"Mini VPN", b"Mini \xed\xa0\x80"), 5, "not UTF-8 text"),
]


@pytest.mark.parametrize(("case", "data", "line", "words"), BYTES, ids=[b[0] for b in BYTES])
def test_bytes_that_are_not_text(
    tmp_path: Path, fake_roles: dict[str, Role], case: str, data: bytes, line: int, words: str
) -> None:
    path = write_policy(tmp_path, "")
    path.write_bytes(data)
    with pytest.raises(PolicyError) as info:
        policy.load(path, fake_roles)
    assert str(info.value).startswith(f"{path}:{line}: "), info.value
    assert words in str(info.value)


def test_only_regular_files_are_read(tmp_path: Path, fake_roles: dict[str, Role]) -> None:
    fifo = tmp_path / "policy.fifo"
    os.mkfifo(fifo)
    (tmp_path / "dir.yml").mkdir()
    for path, words in [
        (fifo, "not a regular file (a FIFO)"),
        (Path("/dev/zero"), "not a regular file (a character device)"),
        (tmp_path / "dir.yml", "not a regular file (a directory)"),
        (tmp_path / "nul\0.yml", "cannot read"),
    ]:
        with pytest.raises(PolicyError, match=re.escape(words)):
            policy.load(path, fake_roles)


def test_size_limit(tmp_path: Path, fake_roles: dict[str, Role]) -> None:
    path = write_policy(tmp_path, VALID)
    with path.open("r+b") as f:
        f.truncate(policy.MAX_BYTES + 1)  # sparse: refused from its size, before any read
    with pytest.raises(PolicyError, match=r"too large: 4194305 bytes \(the limit is 4194304\)"):
        policy.load(path, fake_roles)


def test_source_must_be_a_regular_file(tmp_path: Path, fake_roles: dict[str, Role]) -> None:
    path = write_policy(tmp_path, VALID)
    (tmp_path / "sources" / "sv.txt").unlink()
    os.mkfifo(tmp_path / "sources" / "sv.txt")
    with pytest.raises(
        PolicyError, match=r"mini\.yml:9: source 'sv.txt' in .*: not a regular file \(a FIFO\)"
    ):
        policy.load(path, fake_roles)


def test_sha256_is_of_the_bytes_read(tmp_path: Path, fake_roles: dict[str, Role]) -> None:
    import hashlib

    path = write_policy(tmp_path, VALID)
    assert policy.load(path, fake_roles).sha256 == hashlib.sha256(VALID.encode()).hexdigest()


def test_vocabulary_matches_readme_and_checks() -> None:
    """The vocabulary in code is the README's table, and every claim a check proves is in it."""
    from amnesiac.checks.meta import catalogue

    readme = (Path(__file__).resolve().parent.parent / "policies" / "README.md").read_text()
    table = readme.split("## Technical claim vocabulary", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([a-z0-9-]+)` \|", table, flags=re.MULTILINE))
    assert documented == policy.TECHNICAL_CLAIMS
    proved = {claim for meta in catalogue().values() for claim in meta.claims}
    assert proved <= policy.TECHNICAL_CLAIMS, proved - policy.TECHNICAL_CLAIMS


def test_show_prints_markup_as_text(tmp_path: Path, fake_roles: dict[str, Role]) -> None:
    """Titles, ids and paths from the user are text: `[/]` or `[/red]` neither crash nor style."""
    import io

    from rich.console import Console

    from amnesiac import show

    folder = tmp_path / "x[" / "red]"
    folder.mkdir(parents=True)
    text = _replace("title: Mini policy", "title: 'OVPN [/] policy :smile:'")
    text = text.replace("title: Owns its servers", "title: '[bold red]Owns[/] its servers'")
    loaded = policy.load(write_policy(folder, text), fake_roles)
    console = Console(file=io.StringIO(), width=200, force_terminal=True, color_system="truecolor")
    show.render(loaded, console)
    out = console.file.getvalue()  # type: ignore[attr-defined]
    assert "OVPN [/] policy :smile:" in out
    assert "x[/red]/mini.yml" in out
    assert "[bold red]Owns[/] its servers" in out
