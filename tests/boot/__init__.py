"""Boot tiers: images booted in QEMU (one guest at a time: tests.images.GUEST_LANE)."""

from __future__ import annotations

import json
from typing import Any


def not_passed(report: dict[str, Any], outcomes: frozenset[str] = frozenset({"passed"})) -> str:
    """Each check that did not pass, with its reason and the end of its evidence: what a failure
    in CI must show, since the report's directory is gone with the run (`outcomes`: those left out)."""
    lines = []
    for claim in [report["integrity"], *report["claims"]]:
        for check in claim["checks"]:
            if check["outcome"] not in outcomes:
                evidence = json.dumps(check["evidence"], indent=1)[-3000:]
                heading = f"{claim['id']} / {check['id']}: {check['outcome']}: {check['reason']}"
                lines.append(f"{heading}\n{evidence}")
    return "\n\n".join(lines)
