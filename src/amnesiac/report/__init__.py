"""The verification report: the results model (`model`) and its renderings (`render`).

`build_report(policy, target, results, generated=..., tool_version=...)` gives a `Report`;
`write(report, directory)` puts report.html, report.json and junit.xml there; `exit_code(report)`
is 0 only when the verdict is pass. `load(text)` reads a report.json back, validated.
"""

from __future__ import annotations

from amnesiac.report.model import (
    CheckOutcome,
    CheckResult,
    ClaimResult,
    ClaimStatus,
    Evidence,
    Identity,
    PolicyInfo,
    Report,
    Target,
    TargetKind,
    Tool,
    Verdict,
    bound_output,
    build_report,
    claim_status,
    exit_code,
    load,
)
from amnesiac.report.render import ReportFiles, render_html, render_json, render_junit, write

__all__ = [
    "CheckOutcome",
    "CheckResult",
    "ClaimResult",
    "ClaimStatus",
    "Evidence",
    "Identity",
    "PolicyInfo",
    "Report",
    "ReportFiles",
    "Target",
    "TargetKind",
    "Tool",
    "Verdict",
    "bound_output",
    "build_report",
    "claim_status",
    "exit_code",
    "load",
    "render_html",
    "render_json",
    "render_junit",
    "write",
]
