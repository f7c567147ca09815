"""What the molecule scenarios say, read from their files (shared by the fast and slow tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent.parent
MOLECULE = REPO / "molecule"
# The scenario that converges the whole image playbook rather than one role.
IMAGE_SCENARIO = "default"


def names() -> list[str]:
    return sorted(p.parent.name for p in MOLECULE.glob("*/molecule.yml"))


def config(name: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((MOLECULE / name / "molecule.yml").read_text()) or {}
    return data


def check_ids(name: str) -> list[str]:
    """The claim checks the scenario's verifier runs (its --amnesiac-checks)."""
    options = config(name).get("verifier", {}).get("options", {})
    return [c.strip() for c in str(options.get("amnesiac-checks", "")).split(",") if c.strip()]


def converged_roles(name: str) -> list[str]:
    """The roles converge.yml applies: a play's `roles:`, or the image playbook's amnesiac_roles."""
    plays = yaml.safe_load((MOLECULE / name / "converge.yml").read_text())
    roles: list[str] = []
    for play in plays:
        roles += [r["role"] if isinstance(r, dict) else r for r in play.get("roles", [])]
        roles += play.get("vars", {}).get("amnesiac_roles", [])
    return roles


def converge_vars(name: str) -> dict[str, Any]:
    """The role variables converge.yml sets (beside amnesiac_roles)."""
    plays = yaml.safe_load((MOLECULE / name / "converge.yml").read_text())
    found: dict[str, Any] = {}
    for play in plays:
        found.update({k: v for k, v in play.get("vars", {}).items() if k != "amnesiac_roles"})
    return found
