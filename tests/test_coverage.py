"""`policy show` both ways and the source coverage: which sentences of each source no claim quotes."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from amnesiac import coverage, policy, show
from amnesiac.cli import main
from amnesiac.coverage import Sentence, split_sentences
from amnesiac.roles import Role

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted((REPO / "policies").glob("*.yml"))


def texts(source: str) -> list[str]:
    return [s.text for s in split_sentences(source)]


# --- the sentence splitter ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("We keep nothing. Nothing at all.", ["We keep nothing.", "Nothing at all."]),
        ("Attention! Do we log? Never.", ["Attention!", "Do we log?", "Never."]),
        # Abbreviations: dotted letter groups in any language, and the listed ones.
        ("No data, e.g. no email. Or i.e. none.", ["No data, e.g. no email.", "Or i.e. none."]),
        ("Vi sparar t.ex. inget. Klart.", ["Vi sparar t.ex. inget.", "Klart."]),
        ("Keine Daten, z.B. Mails. Ende.", ["Keine Daten, z.B. Mails.", "Ende."]),
        ("See cf. the annex. Then vs. them.", ["See cf. the annex.", "Then vs. them."]),
        # Numbers and host names have no white space after the dot.
        (
            "Client 1.2.5.2213 is current. Version 2.0 next.",
            ["Client 1.2.5.2213 is current.", "Version 2.0 next."],
        ),
        ("Visit ovpn.com today. Thanks.", ["Visit ovpn.com today.", "Thanks."]),
        # The number of a numbered heading does not end a sentence; a number ending one does.
        ("1. Failure to store personal data", ["1. Failure to store personal data"]),
        ("2.1. Definitions", ["2.1. Definitions"]),
        ("as in paragraph 2.1. This means", ["as in paragraph 2.1.", "This means"]),
        # Closing quotes and brackets stay with their sentence.
        ('We are "OVPN". We log (nothing.) Done.', ['We are "OVPN".', "We log (nothing.)", "Done."]),
        ("Called \u201cPersonal Data.\u201d Next one.", ["Called \u201cPersonal Data.\u201d", "Next one."]),
        # White space folded as the loader folds quotes.
        ("  Many   spaces\there.  ", ["Many spaces here."]),
        ("etc. ends a sentence, name etc. We too.", ["etc.", "ends a sentence, name etc.", "We too."]),
    ],
)
def test_sentences_in_a_line(source: str, expected: list[str]) -> None:
    assert texts(source) == expected


def test_every_line_break_ends_a_sentence() -> None:
    # An unmarked list is only told apart by its lines; a hard-wrapped sentence shows in pieces.
    source = "Nothing is kept:\nno logging of traffic\nno logging of DNS\nwhat we\nmean by privacy."
    assert split_sentences(source) == [
        Sentence(1, "Nothing is kept:"),
        Sentence(2, "no logging of traffic"),
        Sentence(3, "no logging of DNS"),
        Sentence(4, "what we"),
        Sentence(5, "mean by privacy."),
    ]


def test_list_and_heading_markers_are_dropped() -> None:
    source = (
        "# Privacy\n\n* first item\n- second item\n  \u2022 third item\n+ fourth\n> quoted\n### Sub-heading"
    )
    assert texts(source) == [
        "Privacy",
        "first item",
        "second item",
        "third item",
        "fourth",
        "quoted",
        "Sub-heading",
    ]
    # A dash inside a line is text, not a marker.
    assert texts("No disks - instead tmpfs.") == ["No disks - instead tmpfs."]


def test_blank_lines_punctuation_and_markup_are_not_sentences() -> None:
    source = '\n\n---\n|---|---|\n{\n}\n<div class="table">\n</div>\nok\n#\n* \nyes\n'
    assert split_sentences(source) == [Sentence(12, "yes")]


def test_line_numbers_count_line_feeds_only() -> None:
    assert split_sentences("One.\r\nTwo. Three.\r\n\r\nFour.") == [
        Sentence(1, "One."),
        Sentence(2, "Two."),
        Sentence(2, "Three."),
        Sentence(4, "Four."),
    ]


# --- coverage of one source -----------------------------------------------------------------------


def test_covered_both_ways_and_not_by_a_partial_overlap() -> None:
    source = "Court orders We keep nothing. We own our servers.\nWe use tmpfs. We log none."
    quotes = [
        "We keep nothing.",  # part of the first sentence (a heading run into it)
        "We own   our servers.\nWe use tmpfs.",  # spans two sentences, white space folded
        "tmpfs. We log",  # starts and ends inside sentences: covers neither
    ]
    result = coverage.measure_source("en", Path("en.txt"), source, quotes)
    assert (result.sentences, result.covered) == (4, 3)
    assert result.uncovered == (Sentence(2, "We log none."),)
    assert result.percent == 75.0
    covered_chars = len("Court orders We keep nothing.") + len("We own our servers.") + len("We use tmpfs.")
    total = covered_chars + len("We log none.")
    assert result.percent_of_text == int(1000 * covered_chars / total) / 10


def test_percentages_round_down_and_reach_100_only_when_complete() -> None:
    source = "\n".join(f"Sentence number {i}." for i in range(1000))
    quotes = [f"Sentence number {i}." for i in range(999)]
    nearly = coverage.measure_source("en", Path("en.txt"), source, quotes)
    assert (nearly.percent, len(nearly.uncovered)) == (99.9, 1)
    assert coverage.measure_source("en", Path("en.txt"), "", ["x"]).percent == 100.0


# --- a small policy, written for the test ---------------------------------------------------------

SOURCE_EN = """\
# Privacy

We own our servers. Nothing is kept, e.g. no logs:
* no logging of traffic
* no logging of IP addresses
* no logging of DNS requests
All servers run without disks (see section 1.2 for details). Cookies are set!
"""
SOURCE_SV = """\
Vi äger våra servrar. Alla servrar saknar diskar.
 \u2022 ingen loggning av trafik
 \u2022 ingen loggning av IP-adresser
"""

MINI = f"""\
schema: {policy.SCHEMA}
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
      en: All servers run without disks (see section 1.2 for details).
      sv: Alla servrar saknar diskar.
    controls:
      - role: ram_root
    checks: [storage.root_is_size_limited_tmpfs]
  - id: no-traffic-logging
    kind: technical
    title: No traffic logs
    text:
      en: no logging of traffic
      sv: ingen loggning av trafik
    controls:
      - role: no_logs
    checks: [firewall.no_log_rules, firewall.no_per_client_counters]
  - id: no-ip-logging
    kind: technical
    title: No IP logs
    text:
      en: no logging of IP addresses
      sv: ingen loggning av IP-adresser
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


@pytest.fixture
def mini(tmp_path: Path, fake_roles: dict[str, Role]) -> policy.Policy:
    return load_mini(tmp_path, fake_roles, SOURCE_EN)


def load_mini(folder: Path, roles: dict[str, Role], source_en: str) -> policy.Policy:
    (folder / "sources").mkdir(parents=True, exist_ok=True)
    (folder / "sources" / "en.txt").write_text(source_en)
    (folder / "sources" / "sv.txt").write_text(SOURCE_SV)
    (folder / "mini.yml").write_text(MINI)
    return policy.load(folder / "mini.yml", roles)


def test_a_policy_s_coverage_per_language(mini: policy.Policy) -> None:
    en, sv = coverage.measure(mini)
    assert (en.language, en.file) == ("en", mini.path.parent / "sources" / "en.txt")
    assert (en.sentences, en.covered, en.percent) == (8, 4, 50.0)
    assert en.uncovered == (
        Sentence(1, "Privacy"),
        Sentence(3, "Nothing is kept, e.g. no logs:"),
        Sentence(6, "no logging of DNS requests"),
        Sentence(7, "Cookies are set!"),
    )
    assert (sv.language, sv.sentences, sv.covered, sv.percent, sv.uncovered) == ("sv", 4, 4, 100.0, ())
    assert sv.percent_of_text == 100.0


def test_json_has_checks_and_coverage(mini: policy.Policy) -> None:
    data = json.loads(json.dumps(show.as_data(mini)))
    assert list(data) == ["policy", "roles", "claims", "checks", "coverage"]
    assert data["checks"] == {
        "storage.root_is_size_limited_tmpfs": ["no-disk-storage"],
        "firewall.no_log_rules": ["no-traffic-logging", "no-ip-logging"],
        "firewall.no_per_client_counters": ["no-traffic-logging"],
    }
    en = data["coverage"]["en"]
    assert set(en) == {"file", "sentences", "covered", "percent", "percent_of_text", "uncovered"}
    assert en["file"] == str(mini.path.parent / "sources" / "en.txt")
    assert (en["sentences"], en["covered"], en["percent"]) == (8, 4, 50.0)
    assert en["uncovered"][0] == {"line": 1, "text": "Privacy"}
    assert data["coverage"]["sv"]["uncovered"] == []


def test_render_by_section(mini: policy.Policy) -> None:
    def rendered(*sections: show.Section) -> str:
        console = Console(file=io.StringIO(), width=200)
        show.render(mini, console, *([sections] if sections else []))
        return console.file.getvalue()  # type: ignore[attr-defined]

    everything = rendered()  # render's default: every section
    assert "controls (role: variables)" in everything
    assert "verifies the claims" in everything
    assert "en: 4 of 8 sentences quoted (50.0 %" in everything
    assert "sv: 4 of 4 sentences quoted (100.0 %" in everything
    assert re.search(r"^ *6  no logging of DNS requests *$", everything, re.MULTILINE)
    checks = rendered(show.Section.CHECKS)
    assert "controls (role: variables)" not in checks
    assert "sentences quoted" not in checks
    assert "firewall.no_log_rules" in checks
    only_coverage = rendered(show.Section.COVERAGE)
    assert "storage.root_is_size_limited_tmpfs" not in only_coverage
    assert "50.0 %" in only_coverage


def test_source_text_prints_as_text(tmp_path: Path, fake_roles: dict[str, Role]) -> None:
    """A source is untrusted: markup prints as written, a terminal escape is spelt out."""
    source = SOURCE_EN + "We are [bold red]bold[/] :smile: here.\nClear \x1b[2J the screen.\n"
    loaded = load_mini(tmp_path / "[red]", fake_roles, source)
    console = Console(file=io.StringIO(), width=200, force_terminal=True, color_system="truecolor")
    show.render(loaded, console, (show.Section.COVERAGE,))
    out = console.file.getvalue()  # type: ignore[attr-defined]
    assert "We are [bold red]bold[/] :smile: here." in out
    assert "Clear \\x1b[2J the screen." in out
    assert "\x1b[2J" not in out
    assert "[red]/sources/en.txt" in out


# --- the shipped policies -------------------------------------------------------------------------


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_policies_report_coverage(path: Path) -> None:
    loaded = policy.load(path)
    measured = coverage.measure(loaded)
    assert [c.language for c in measured] == list(loaded.policy.sources)
    for source in measured:
        assert source.covered >= 1  # every claim quotes every language
        assert 0 < source.percent <= 100
        assert 0 < source.percent_of_text <= 100
        assert source.covered + len(source.uncovered) == source.sentences
        lines = source.file.read_bytes().decode("utf-8", errors="replace").split("\n")
        for sentence in source.uncovered:
            first_word = sentence.text.split()[0]
            assert first_word in lines[sentence.line - 1], (source.file.name, sentence)


# --- the command line -----------------------------------------------------------------------------


def amnesiac(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "amnesiac.cli", *args], capture_output=True, text=True, check=False
    )


def test_cli_coverage_prints_the_percentage() -> None:
    result = amnesiac("policy", "show", "--coverage", str(REPO / "policies/ovpn.yml"))
    assert result.returncode == 0, result.stderr
    en, sv = coverage.measure(policy.load(REPO / "policies/ovpn.yml"))
    for source in (en, sv):
        quoted = f"{source.covered} of {source.sentences} sentences quoted ({source.percent:.1f} %"
        assert f"{source.language}: {quoted}" in result.stdout
    assert "controls (role: variables)" not in result.stdout
    assert "verifies the claims" not in result.stdout


def test_cli_by_check_lists_every_check_once() -> None:
    path = REPO / "policies/ovpn.yml"
    result = amnesiac("policy", "show", "--by", "check", str(path))
    assert result.returncode == 0, result.stderr
    checks = [check for check, _ in policy.iter_checks(policy.load(path))]
    assert checks
    for check in checks:
        found = re.findall(rf"(?<![\w.]){re.escape(check)}(?![\w.])", result.stdout)
        assert len(found) == 1, check
    assert "controls (role: variables)" not in result.stdout
    assert "sentences quoted" not in result.stdout


def test_default_prints_both_tables_and_coverage(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "show", str(REPO / "policies/ivpn.yml")]) == 0
    out = capsys.readouterr().out
    assert "controls (role: variables)" in out
    assert "verifies the claims" in out
    assert "en: " in out and "sentences quoted" in out


@pytest.mark.parametrize(
    "args",
    [
        ["--by", "check", "--coverage"],
        ["--by", "claim", "--json"],
        ["--coverage", "--json"],
        ["--by", "rule"],
    ],
)
def test_views_are_one_at_a_time(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["policy", "show", *args, str(REPO / "policies/ovpn.yml")])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
