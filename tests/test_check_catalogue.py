"""Claims and checks name each other: every check a policy names exists and says it serves
that claim, and every shipped check serves some shipped claim (or is one verify always runs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from amnesiac import policy
from amnesiac.checks import MODULES
from amnesiac.checks.meta import ALL_TARGETS, catalogue, integrity_checks

POLICIES = sorted((Path(__file__).resolve().parent.parent / "policies").glob("*.yml"))
ALWAYS = set(integrity_checks())  # verify runs these on every target (image integrity)


@pytest.mark.parametrize("path", POLICIES, ids=lambda p: p.stem)
def test_policy_checks_exist_and_agree(path: Path) -> None:
    loaded = policy.load(path)
    checks = catalogue()
    for claim in loaded.technical_claims():
        for check_id in claim.checks:
            assert check_id in checks, f"{path.name}: claim {claim.id} names unknown check {check_id}"
            assert claim.id in checks[check_id].claims, (
                f"{path.name}: claim {claim.id} names {check_id}, whose metadata does not list that claim"
            )


def test_every_check_serves_a_shipped_claim() -> None:
    named = {c for p in POLICIES for claim in policy.load(p).technical_claims() for c in claim.checks}
    unused = set(catalogue()) - named - ALWAYS
    assert unused == set(), f"checks no policy claim names: {sorted(unused)}"


def test_every_module_has_checks_with_metadata() -> None:
    ids = catalogue()
    for module in MODULES:
        assert any(i.startswith(f"{module}.") for i in ids), f"no checks in {module}"
    for meta in ids.values():
        assert meta.rationale and meta.claims
        assert meta.targets == ALL_TARGETS or meta.not_applicable
