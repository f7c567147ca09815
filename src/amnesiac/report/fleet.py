"""The fleet's summary: fleet.json and fleet.html, a table of hosts by claims.

`amnesiac verify --inventory` writes one report per host (render.write) and this summary
beside them. The fleet passes only when every host passes; a host that could not be reached
fails the fleet and has no report of its own; a host whose verdict is incomplete makes the
fleet's incomplete, unless another failed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from amnesiac import __version__
from amnesiac.files import write_all_atomic
from amnesiac.policy import Policy
from amnesiac.report import render
from amnesiac.report.model import INTEGRITY_CLAIM, Report, Verdict

FLEET_JSON = "fleet.json"
FLEET_HTML = "fleet.html"


class Member(Protocol):
    """A host of the fleet as the summary names it (targets.inventory.InventoryHost)."""

    @property
    def name(self) -> str: ...
    @property
    def address(self) -> str: ...
    @property
    def directory(self) -> str: ...


def summary(
    loaded: Policy,
    inventory: Path,
    fleet: Sequence[Member],
    reports: Mapping[str, Report],
    unreachable: Mapping[str, str],
) -> dict[str, Any]:
    """fleet.json: per host its verdict, identity and the status of every technical claim (the
    integrity claim first)."""
    claims = [INTEGRITY_CLAIM, *(c.id for c in loaded.technical_claims())]
    hosts: dict[str, Any] = {}
    for member in fleet:
        entry: dict[str, Any] = {"address": member.address}
        if member.name in reports:
            report = reports[member.name]
            entry |= {
                "verdict": report.verdict.value,
                "identity": report.target.identity.model_dump(mode="json"),
                "claims": {c.id: c.status.value for c in [report.integrity, *report.technical_claims]},
                "failed": [c.id for c in report.failed],
                "not_proved": [c.id for c in report.not_proved],
                "report": {
                    "html": f"{member.directory}/{render.HTML_NAME}",
                    "json": f"{member.directory}/{render.JSON_NAME}",
                    "junit": f"{member.directory}/{render.JUNIT_NAME}",
                },
            }
        else:
            entry |= {
                "verdict": Verdict.FAIL.value,
                "unreachable": unreachable.get(member.name, "not checked"),
                "claims": {},
                "failed": [],
                "not_proved": [],
            }
        hosts[member.name] = entry
    verdicts = {h["verdict"] for h in hosts.values()}
    if not hosts or Verdict.FAIL.value in verdicts:
        verdict = Verdict.FAIL
    else:
        verdict = Verdict.INCOMPLETE if Verdict.INCOMPLETE.value in verdicts else Verdict.PASS
    return {
        "format": 2,
        "tool": {"name": "amnesiac", "version": __version__},
        "generated": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "policy": {"id": loaded.id, "file": str(loaded.path), "sha256": loaded.sha256},
        "inventory": str(inventory),
        "verdict": verdict.value,
        "claims": claims,
        "hosts": hosts,
    }


def render_html(data: Mapping[str, Any]) -> str:
    return render.environment().get_template("fleet.html.j2").render(fleet=data)


@dataclass(frozen=True)
class FleetFiles:
    summary: dict[str, Any]  # what fleet.json holds
    json: Path
    html: Path

    @property
    def passed(self) -> bool:
        return bool(self.summary["verdict"] == Verdict.PASS.value)


def write(
    loaded: Policy,
    inventory: Path,
    *,
    fleet: Sequence[Member],
    reports: Mapping[str, Report],
    unreachable: Mapping[str, str],
    directory: Path,
) -> FleetFiles:
    """The fleet's summary, written into `directory` beside the hosts' reports."""
    data = summary(loaded, inventory, fleet, reports, unreachable)
    json_file, html_file = write_summary(data, directory)
    return FleetFiles(data, json_file, html_file)


def write_summary(data: Mapping[str, Any], directory: Path) -> tuple[Path, Path]:
    """Write fleet.json and fleet.html into `directory`, each through a temporary name."""
    directory.mkdir(parents=True, exist_ok=True)
    files = (directory / FLEET_JSON, directory / FLEET_HTML)
    write_all_atomic({files[0]: json.dumps(data, indent=2) + "\n", files[1]: render_html(data)})
    return files
