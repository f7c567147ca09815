"""The report's three renderings: report.html for people, report.json for tools, junit.xml for CI.

`write` renders all three before it touches the directory, then replaces each file through a
temporary name and a rename: a file is never seen half-written, and a rendering error leaves the
previous report as it was.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jinja2

from amnesiac.files import write_all_atomic
from amnesiac.report.model import (
    OUTPUT_LIMIT,
    CheckOutcome,
    CheckResult,
    ClaimResult,
    ClaimStatus,
    Evidence,
    Report,
    Verdict,
    first_line,
    printable,
)

HTML_NAME = "report.html"
JSON_NAME = "report.json"
JUNIT_NAME = "junit.xml"

ORGANISATIONAL_MESSAGE = "organisational: not verifiable by software"

# How languages are named in the report; a code missing here is shown as the code alone.
LANGUAGES = {
    "da": "Danish",
    "de": "German",
    "en": "English",
    "es": "Spanish",
    "fi": "Finnish",
    "fr": "French",
    "it": "Italian",
    "ja": "Japanese",
    "nb": "Norwegian Bokmål",
    "nl": "Dutch",
    "no": "Norwegian",
    "pl": "Polish",
    "pt": "Portuguese",
    "ru": "Russian",
    "sv": "Swedish",
    "uk": "Ukrainian",
    "zh": "Chinese",
}

STATUS_LABELS = {
    ClaimStatus.VERIFIED: "Verified",
    ClaimStatus.PARTIAL: "Partially verified",
    ClaimStatus.UNPROVEN: "Not yet provable",
    ClaimStatus.FAILED: "Failed",
    ClaimStatus.NOT_APPLICABLE: "Not applicable",
    ClaimStatus.ORGANISATIONAL: "Organisational",
}
OUTCOME_LABELS = {
    CheckOutcome.PASSED: "Passed",
    CheckOutcome.FAILED: "Failed",
    CheckOutcome.NOT_APPLICABLE: "Not applicable",
    CheckOutcome.ERROR: "Error",
}
# Symbols repeat the text label for a quick scan; they are hidden from screen readers.
STATUS_SYMBOLS = {
    ClaimStatus.VERIFIED: "✓",
    ClaimStatus.PARTIAL: "◐",
    ClaimStatus.UNPROVEN: "?",
    ClaimStatus.FAILED: "✗",
    ClaimStatus.NOT_APPLICABLE: "\u2013",
    ClaimStatus.ORGANISATIONAL: "◇",
}
OUTCOME_SYMBOLS = {
    CheckOutcome.PASSED: "✓",
    CheckOutcome.FAILED: "✗",
    CheckOutcome.NOT_APPLICABLE: "\u2013",
    CheckOutcome.ERROR: "!",
}


@dataclass(frozen=True)
class ReportFiles:
    html: Path
    json: Path
    junit: Path


def write(report: Report, directory: Path) -> ReportFiles:
    """Write report.html, report.json and junit.xml into `directory` (created if missing)."""
    directory.mkdir(parents=True, exist_ok=True)
    files = ReportFiles(directory / HTML_NAME, directory / JSON_NAME, directory / JUNIT_NAME)
    rendered = {
        files.html: render_html(report).encode("utf-8"),
        files.json: render_json(report).encode("utf-8"),
        files.junit: render_junit(report),
    }
    write_all_atomic(rendered)
    return files


# --- JSON ---------------------------------------------------------------------------------------


def render_json(report: Report) -> str:
    """The model as JSON: what `model.load` reads back."""
    return report.model_dump_json(indent=2) + "\n"


# --- HTML ---------------------------------------------------------------------------------------


@cache
def environment() -> jinja2.Environment:
    """The Jinja2 environment of every HTML page amnesiac writes (report.html, fleet.html)."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("amnesiac.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["language"] = language_name
    env.filters["value"] = _value
    env.filters["seconds"] = _seconds
    env.filters["first_line"] = first_line
    env.globals.update(
        status_labels=STATUS_LABELS,
        outcome_labels=OUTCOME_LABELS,
        status_symbols=STATUS_SYMBOLS,
        outcome_symbols=OUTCOME_SYMBOLS,
        ClaimStatus=ClaimStatus,
        CheckOutcome=CheckOutcome,
        Verdict=Verdict,
    )
    return env


def render_html(report: Report) -> str:
    """One self-contained page: inline styles, no scripts, fonts or images from anywhere."""
    return environment().get_template("report.html.j2").render(report=report, **_html_context(report))


def _html_context(report: Report) -> dict[str, Any]:
    check_totals = report.check_totals()
    return {
        "check_totals": check_totals,
        "check_count": sum(check_totals.values()),
        "check_parts": ", ".join(f"{n} {OUTCOME_LABELS[o].lower()}" for o, n in check_totals.items() if n),
        "output_limit": OUTPUT_LIMIT,
        "failed_claims": report.failed,
        "not_proved": report.not_proved,
        "verdict_symbol": {Verdict.PASS: "✓", Verdict.INCOMPLETE: "◐", Verdict.FAIL: "✗"}[report.verdict],
        "endpoints": report.policy.endpoints,
        "technical_count": len(report.technical_claims),
        "generated": report.generated.strftime("%Y-%m-%d %H:%M:%S UTC"),
        "check_summary": {c.id: _check_summary(c) for c in [report.integrity, *report.claims]},
    }


def _check_summary(claim: ClaimResult) -> str:
    """'2 passed, 1 not applicable' for the summary table."""
    counts = {o: sum(1 for c in claim.checks if c.outcome is o) for o in CheckOutcome}
    return ", ".join(f"{n} {OUTCOME_LABELS[o].lower()}" for o, n in counts.items() if n)


def language_name(code: str) -> str:
    name = LANGUAGES.get(code)
    return f"{name} ({code})" if name else code


def _value(value: object) -> str:
    """A role variable's value as YAML would read it back: true, 384, "none", [a, b]."""
    return json.dumps(value, ensure_ascii=False)


def _seconds(value: float) -> str:
    return f"{value:.2f} s" if value < 10 else f"{value:.1f} s"


# --- JUnit XML ----------------------------------------------------------------------------------


def render_junit(report: Report) -> bytes:
    """One testsuite; one testcase per (claim, check), the integrity claim's first, and one per
    organisational claim. A claim whose checks passed but that is not proved (partially
    verified, not yet provable) adds a skipped `verdict` case: CI sees what the HTML says."""
    cases: list[ET.Element] = []
    for claim in [report.integrity, *report.claims]:
        if claim.status is ClaimStatus.ORGANISATIONAL:
            cases.append(_organisational_case(claim))
        elif not claim.checks:  # only a hand-made report can get here; it still must not pass
            cases.append(_unchecked_case(claim))
        else:
            cases += [_testcase(claim, check) for check in claim.checks]
            if claim.status in {ClaimStatus.PARTIAL, ClaimStatus.UNPROVEN}:
                cases.append(_not_proved_case(claim))

    counts = {
        "tests": len(cases),
        "failures": sum(1 for c in cases if c.find("failure") is not None),
        "errors": sum(1 for c in cases if c.find("error") is not None),
        "skipped": sum(1 for c in cases if c.find("skipped") is not None),
    }
    duration = sum(float(c.get("time", "0")) for c in cases)
    name = f"{report.policy.id} on {report.target.spec}"
    root = ET.Element("testsuites", _attrs(name=name, time=f"{duration:.3f}", **counts))
    suite = ET.SubElement(
        root,
        "testsuite",
        _attrs(
            name=name,
            timestamp=report.generated.strftime("%Y-%m-%dT%H:%M:%S"),
            hostname=report.target.identity.hostname or report.target.address,
            time=f"{duration:.3f}",
            **counts,
        ),
    )
    properties = ET.SubElement(suite, "properties")
    for key, value in _properties(report):
        ET.SubElement(properties, "property", _attrs(name=key, value=value))
    suite.extend(cases)
    ET.indent(root)
    data: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return data + b"\n"


def _properties(report: Report) -> list[tuple[str, str]]:
    identity = report.target.identity
    pairs = [
        ("verdict", str(report.verdict)),
        ("tool", f"{report.tool.name} {report.tool.version}"),
        ("generated", report.generated.strftime("%Y-%m-%dT%H:%M:%SZ")),
        ("policy.id", report.policy.id),
        ("policy.title", report.policy.title),
        ("policy.provider", report.policy.provider),
        ("policy.file", report.policy.file),
        ("policy.sha256", report.policy.sha256),
        ("target", report.target.spec),
        ("target.identity", identity.established_by),
        ("target.image_sha256", identity.image_sha256),
        ("target.kernel_release", identity.kernel_release),
        ("target.cmdline", identity.cmdline),
        ("target.boot_id", identity.boot_id),
        ("target.hostname", identity.hostname),
    ]
    if identity.manifest_sha256_matches is not None:
        pairs.append(("target.manifest_sha256_matches", str(identity.manifest_sha256_matches).lower()))
    pairs += [(f"target.artifact.{name}", digest) for name, digest in identity.artifacts.items()]
    if identity.tpm is not None:
        pairs.append(("target.tpm.reason", identity.tpm.reason))
        pairs.append(("target.tpm.ek_sha256", identity.tpm.ek_sha256))
        pairs.append(("target.tpm.ek_certified_by", identity.tpm.ek_certified_by))
        pairs += [(f"target.tpm.pcr{index}", value) for index, value in identity.tpm.quoted_pcrs.items()]
    pairs += [(f"claim.{c.id}", str(c.status)) for c in [report.integrity, *report.claims]]
    return [(k, v) for k, v in pairs if v is not None]


def _testcase(claim: ClaimResult, check: CheckResult) -> ET.Element:
    case = ET.Element("testcase", _attrs(classname=claim.id, name=check.id, time=f"{check.duration_s:.3f}"))
    evidence = _evidence_text(check)
    reason = check.reason or ""
    if check.outcome is CheckOutcome.FAILED:
        failure = ET.SubElement(case, "failure", _attrs(message=reason, type="failed"))
        failure.text = _xml_text(evidence or reason)
    elif check.outcome is CheckOutcome.ERROR:
        error = ET.SubElement(case, "error", _attrs(message=reason, type="error"))
        error.text = _xml_text(evidence or reason)
    elif check.outcome is CheckOutcome.NOT_APPLICABLE:
        ET.SubElement(case, "skipped", _attrs(message=reason))
    if evidence and check.outcome in {CheckOutcome.PASSED, CheckOutcome.NOT_APPLICABLE}:
        ET.SubElement(case, "system-out").text = _xml_text(evidence)
    return case


def _organisational_case(claim: ClaimResult) -> ET.Element:
    case = ET.Element("testcase", _attrs(classname=claim.id, name="organisational", time="0.000"))
    ET.SubElement(case, "skipped", _attrs(message=ORGANISATIONAL_MESSAGE))
    return case


def _not_proved_case(claim: ClaimResult) -> ET.Element:
    case = ET.Element("testcase", _attrs(classname=claim.id, name="verdict", time="0.000"))
    ET.SubElement(case, "skipped", _attrs(message=f"{claim.status}: {claim.reason or ''}"))
    return case


def _unchecked_case(claim: ClaimResult) -> ET.Element:
    case = ET.Element("testcase", _attrs(classname=claim.id, name="no-checks", time="0.000"))
    ET.SubElement(case, "failure", _attrs(message=claim.reason or "", type="failed"))
    return case


def _evidence_text(check: CheckResult) -> str:
    parts = [f"{check.id}: {check.title}"]
    if check.rationale:
        parts.append(f"rationale: {check.rationale}")
    if check.reason:
        parts.append(f"reason: {check.reason}")
    parts += [_one_evidence(e) for e in check.evidence]
    return "\n\n".join(parts) if check.evidence or check.reason else ""


def _one_evidence(evidence: Evidence) -> str:
    exit_code = "not recorded" if evidence.exit_code is None else str(evidence.exit_code)
    lines = [f"$ {evidence.command}", f"exit code: {exit_code}"]
    if evidence.note:
        lines.append(f"note: {evidence.note}")
    if evidence.output:
        lines.append(evidence.output.rstrip("\n"))
    return "\n".join(lines)


def _xml_text(text: str) -> str:
    # The model already keeps evidence printable; claim texts and titles come from YAML, which
    # can spell a control character with an escape. XML 1.0 cannot carry those at all.
    return printable(text)


def _attrs(**values: object) -> dict[str, str]:
    return {key: _xml_text(str(value)) for key, value in values.items()}
