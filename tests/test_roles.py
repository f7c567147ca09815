"""The role catalogue: variable types and choices as Ansible's argument_specs mean them."""

from __future__ import annotations

import pytest

from amnesiac.roles import RoleVariable, catalog


def var(type_: str, choices: tuple[object, ...] = ()) -> RoleVariable:
    return RoleVariable(name="r_v", type=type_, default=None, description="", choices=choices)


@pytest.mark.parametrize(
    ("variable", "value", "problem"),
    [
        (var("int"), 3, None),
        (var("int"), True, "must be of type int"),
        (var("str", ("a", "b")), "b", None),
        (var("str", ("a", "b")), "c", "must be one of a, b, got 'c'"),
        (var("list", ("a", "b")), ["a", "b"], None),  # choices constrain a list's elements
        (var("list", ("a", "b")), ["a", "z"], "(each element) must be one of a, b, got 'z'"),
        (var("list"), "a", "must be of type list"),
    ],
)
def test_problem_with(variable: RoleVariable, value: object, problem: str | None) -> None:
    found = variable.problem_with(value)
    assert (found is None) if problem is None else (found is not None and problem in found), found


def test_every_role_default_fits_its_own_spec() -> None:
    for role in catalog().values():
        for variable in role.variables.values():
            if variable.default is not None:
                assert variable.problem_with(variable.default) is None, (role.name, variable.name)
