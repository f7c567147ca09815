"""`amnesiac policy show`: a policy both ways (claim → controls → checks, check → claims) and
what of its sources no claim quotes, for people and for machines.

Everything shown comes from a policy file and its source texts, which are untrusted input: it is
printed as rich `Text`, never parsed as console markup or emoji codes, so a title such as
`OVPN [/] policy` or a path holding `[/red]` prints as written; a source sentence has its control
characters spelt out (`\\x1b`) before it reaches the terminal.
"""

from __future__ import annotations

from collections.abc import Collection
from enum import StrEnum
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from amnesiac import coverage
from amnesiac.checks.results import printable
from amnesiac.policy import Policy, iter_checks


class Section(StrEnum):
    """The parts `render` can print, in the order it prints them."""

    CLAIMS = "claims"  # claim → controls → checks
    CHECKS = "checks"  # check → claims
    COVERAGE = "coverage"  # the sentences of each source that no claim quotes


def as_data(policy: Policy) -> dict[str, Any]:
    return {
        "policy": {
            "id": policy.id,
            "provider": policy.policy.provider,
            "file": str(policy.path),
            "sha256": policy.sha256,
        },
        "roles": policy.roles(),
        "claims": [
            {
                "id": c.id,
                "kind": c.kind.value,
                "title": c.title,
                "text": c.text,
                "controls": [{"role": ctl.role, "vars": ctl.vars} for ctl in c.controls],
                "checks": c.checks,
                "permits": [r.model_dump(mode="json") for r in c.permits] if c.permits else None,
                "translation": c.translation,
            }
            for c in policy.claims
        ],
        "checks": dict(iter_checks(policy)),
        "coverage": {
            source.language: {
                "file": str(source.file),
                "sentences": source.sentences,
                "covered": source.covered,
                "percent": source.percent,
                "percent_of_text": source.percent_of_text,
                "uncovered": [{"line": s.line, "text": s.text} for s in source.uncovered],
            }
            for source in coverage.measure(policy)
        },
    }


def render(policy: Policy, console: Console, sections: Collection[Section] = tuple(Section)) -> None:
    """The policy's summary line, then each of `sections` (all of them unless told)."""
    technical = policy.technical_claims()
    console.print(
        Text.assemble(
            (policy.policy.title, "bold"),
            f" ({policy.id}, {policy.path}): {len(policy.claims)} claims, "
            f"{len(technical)} technical, {len(policy.claims) - len(technical)} organisational; "
            f"languages: {', '.join(policy.policy.sources)}",
        )
    )
    if Section.CLAIMS in sections:
        _render_claims(policy, console)
    if Section.CHECKS in sections:
        _render_checks(policy, console)
    if Section.COVERAGE in sections:
        _render_coverage(policy, console)


def _render_claims(policy: Policy, console: Console) -> None:
    # Ids never wrap (they are what a reader greps for); titles and variables do.
    table = Table(show_lines=True)
    table.add_column("claim", style="bold", ratio=3, min_width=max(len(c.id) for c in policy.claims))
    # The kind never wraps; the permitted records under it do (they are long).
    table.add_column("kind", ratio=2, min_width=len("organisational"))
    table.add_column("controls (role: variables)", ratio=2)
    width = max((len(c) for claim in policy.claims for c in claim.checks), default=6)
    table.add_column("checks", no_wrap=True, min_width=width)
    for claim in policy.claims:
        controls = Text(
            "\n".join(
                f"{c.role}" + (": " + ", ".join(f"{k}={v}" for k, v in c.vars.items()) if c.vars else "")
                for c in claim.controls
            )
        )
        kind = claim.kind.value
        if claim.permits:
            kind += "".join(
                f"\npermits {r.record} ({', '.join(r.fields)}; {r.retention}) to {r.destination}"
                for r in claim.permits
            )
        if not claim.technical:
            controls = Text.assemble(("not verifiable by software", "dim"))
        table.add_row(
            Text.assemble(claim.id, "\n", (claim.title, "dim")),
            Text(kind),
            controls,
            Text("\n".join(claim.checks)),
        )
    console.print(table)


def _render_checks(policy: Policy, console: Console) -> None:
    checks = list(iter_checks(policy))
    table = Table(show_lines=True)
    table.add_column(
        "check", style="bold", no_wrap=True, min_width=max((len(c) for c, _ in checks), default=5)
    )
    table.add_column("verifies the claims", ratio=1)
    titles = {claim.id: claim.title for claim in policy.claims}
    for check, claims in checks:
        table.add_row(
            Text(check),
            Text("\n").join(Text.assemble(claim, "  ", (titles[claim], "dim")) for claim in claims),
        )
    console.print(table)


def _render_coverage(policy: Policy, console: Console) -> None:
    console.print(
        Text.assemble(
            ("Source coverage", "bold"), ": the sentences that no claim quotes, by line of the source"
        )
    )
    for source in coverage.measure(policy):
        left_out = len(source.uncovered)
        console.print(
            Text.assemble(
                (source.language, "bold"),
                f": {source.covered} of {source.sentences} sentences quoted ({source.percent:.1f} %; "
                f"{source.percent_of_text:.1f} % of the text) in ",
                str(source.file),
                f", {left_out} not quoted:" if left_out else ".",
            )
        )
        if not left_out:
            continue
        # A grid keeps a wrapped sentence under its own text, clear of the line numbers.
        lines = Table.grid(padding=(0, 2))
        lines.add_column(justify="right", style="dim", no_wrap=True)
        lines.add_column()
        for sentence in source.uncovered:
            lines.add_row(Text(str(sentence.line)), Text(printable(sentence.text)))
        console.print(lines)
