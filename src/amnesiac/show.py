"""`amnesiac policy show`: the claim → control → check table, for people and for machines.

Everything in the table comes from a policy file, which is untrusted input: it is printed as
rich `Text`, never parsed as console markup or emoji codes, so a title such as `OVPN [/] policy`
or a path holding `[/red]` prints as written.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from amnesiac.policy import Policy


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
                "permits": c.permits.model_dump(mode="json") if c.permits else None,
            }
            for c in policy.claims
        ],
    }


def render(policy: Policy, console: Console) -> None:
    technical = policy.technical_claims()
    console.print(
        Text.assemble(
            (policy.policy.title, "bold"),
            f" ({policy.id}, {policy.path}): {len(policy.claims)} claims, "
            f"{len(technical)} technical, {len(policy.claims) - len(technical)} organisational; "
            f"languages: {', '.join(policy.policy.sources)}",
        )
    )
    # Ids never wrap (they are what a reader greps for); titles and variables do.
    table = Table(show_lines=True)
    table.add_column("claim", style="bold", ratio=3, min_width=max(len(c.id) for c in policy.claims))
    table.add_column("kind", no_wrap=True)
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
            kind += f"\npermits {', '.join(claim.permits.records)}"
        if not claim.technical:
            controls = Text.assemble(("not verifiable by software", "dim"))
        table.add_row(
            Text.assemble(claim.id, "\n", (claim.title, "dim")),
            Text(kind),
            controls,
            Text("\n".join(claim.checks)),
        )
    console.print(table)
