"""The molecule scenarios, as files: one per role, each verified by checks of its own claims.

Fast: nothing runs. The scenarios themselves run in test_molecule.py (the molecule tier).
"""

from __future__ import annotations

import pytest
import yaml

from amnesiac import paths, policy
from amnesiac.checks import DIRECTORY as CHECKS_DIR
from amnesiac.checks import MODULES
from amnesiac.checks.meta import catalogue
from amnesiac.image.plan import make_plan
from amnesiac.roles import catalog
from amnesiac.verify import selected_checks
from tests.molecule import scenarios

# Checks a container cannot show anything for although they are declared for every kind of
# target: left out of the scenarios, which say why (molecule/ram_root/molecule.yml).
NOT_IN_CONTAINERS = {"storage.no_storage_drivers"}
# Roles that enforce no claim, verified by their own tests in molecule/<role>/tests/.
WITHOUT_CLAIMS = {"server_base"}


def claim_ids() -> set[str]:
    ids = {claim for meta in catalogue().values() for claim in meta.claims}
    for file in sorted(paths.policies_dir().glob("*.yml")):
        ids |= {c.id for c in policy.load(file).claims}
    return ids


def role_claims(role: str) -> set[str]:
    """The claim ids the role's tasks are tagged with (tasks/main.yml)."""
    imports = yaml.safe_load((paths.roles_dir() / role / "tasks" / "main.yml").read_text())
    return {tag for task in imports for tag in task.get("tags", [])} & claim_ids()


def test_every_role_has_a_scenario_that_converges_it() -> None:
    role_scenarios = [s for s in scenarios.names() if s != scenarios.IMAGE_SCENARIO]
    assert sorted(role_scenarios) == sorted(catalog())
    for name in role_scenarios:
        assert scenarios.converged_roles(name) == [name], name


@pytest.mark.parametrize("name", scenarios.names())
def test_scenario_names_known_checks(name: str) -> None:
    ids = scenarios.check_ids(name)
    # No list would run every check: only a role without claims verifies with its own tests.
    assert bool(ids) != (name in WITHOUT_CLAIMS), name
    assert len(ids) == len(set(ids)), f"{name} names a check twice"
    assert set(ids) <= set(catalogue()), f"{name}: unknown checks {set(ids) - set(catalogue())}"
    assert not set(ids) & NOT_IN_CONTAINERS, name
    if name in WITHOUT_CLAIMS:
        assert list((scenarios.MOLECULE / name / "tests").glob("test_*.py")), name


@pytest.mark.parametrize("name", sorted(set(catalog()) - WITHOUT_CLAIMS))
def test_role_scenario_checks_verify_its_claims(name: str) -> None:
    claims = role_claims(name)
    assert claims, f"{name} tags no task with a claim id"
    unrelated = [c for c in scenarios.check_ids(name) if not set(catalogue()[c].claims) & claims]
    assert unrelated == [], f"{name}'s scenario runs checks of claims it does not enforce: {unrelated}"


def test_verifier_collects_every_check_module() -> None:
    verifier = yaml.safe_load((scenarios.MOLECULE / "config.yml").read_text())["verifier"]
    directory = (scenarios.MOLECULE / "no_logs" / verifier["directory"]).resolve()
    assert directory == CHECKS_DIR
    collected = {p.stem for pattern in verifier["additional_files_or_dirs"] for p in directory.glob(pattern)}
    assert set(MODULES) <= collected


def test_image_scenario_follows_the_default_policy() -> None:
    loaded = policy.load(paths.default_policy())
    assert scenarios.converged_roles(scenarios.IMAGE_SCENARIO) == list(make_plan(loaded).roles)
    assert scenarios.converge_vars(scenarios.IMAGE_SCENARIO) == dict(make_plan(loaded).role_vars), (
        "converge.yml sets the variables the default policy's build sets"
    )
    wanted = [c for c in selected_checks(loaded) if c not in NOT_IN_CONTAINERS]
    assert sorted(scenarios.check_ids(scenarios.IMAGE_SCENARIO)) == sorted(wanted)


def test_container_only_settings_stay_out_of_the_roles() -> None:
    """The stand-ins for what a container lacks live in molecule/shared/, never in a role."""
    found = [
        p
        for p in paths.roles_dir().rglob("*")
        if p.is_file() and p.suffix != ".md" and "molecule" in p.read_text()
    ]
    assert found == []
