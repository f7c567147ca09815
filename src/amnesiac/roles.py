"""The role catalogue: what each role in roles/ declares in meta/argument_specs.yml."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from amnesiac import paths
from amnesiac.errors import AmnesiacError

# argument_specs types and the Python values that satisfy them.
_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "bool": (bool,),
    "list": (list,),
    "dict": (dict,),
    "raw": (object,),
    "path": (str,),
    "float": (int, float),
}


@dataclass(frozen=True)
class RoleVariable:
    name: str
    type: str
    default: Any
    description: str
    choices: tuple[Any, ...] = ()

    def problem_with(self, value: Any) -> str | None:
        """Why `value` does not fit this variable, or None when it does."""
        allowed = _TYPES.get(self.type, (object,))
        # bool is an int in Python; an `int` variable must not accept `true`.
        if (isinstance(value, bool) and bool not in allowed) or not isinstance(value, allowed):
            return f"{self.name} must be of type {self.type}, got {type(value).__name__} {value!r}"
        # argument_specs has no ranges: a size (a name ending in _mib) is at least 1 MiB.
        if self.name.endswith("_mib") and isinstance(value, int) and value < 1:
            return f"{self.name} is a size in MiB: at least 1, got {value!r}"
        # For a list, `choices` constrain its elements (as in Ansible's argument_specs).
        items = value if isinstance(value, list) else [value]
        bad = [item for item in items if self.choices and item not in self.choices]
        if bad:
            what = " (each element)" if isinstance(value, list) else ""
            return f"{self.name}{what} must be one of {', '.join(map(str, self.choices))}, got {bad[0]!r}"
        return None


@dataclass(frozen=True)
class Role:
    name: str
    path: Path
    description: str
    variables: Mapping[str, RoleVariable] = field(default_factory=dict)

    @property
    def packages(self) -> tuple[str, ...]:
        """The Debian packages the role installs (its `<role>_packages` default)."""
        var = self.variables.get(f"{self.name}_packages")
        return tuple(var.default or ()) if var else ()


def load_role(path: Path) -> Role:
    spec_file = path / "meta" / "argument_specs.yml"
    if not spec_file.is_file():
        raise AmnesiacError(f"{spec_file}: missing; every role declares its variables there")
    try:
        spec = yaml.safe_load(spec_file.read_text()) or {}
        main = spec["argument_specs"]["main"]
    except (yaml.YAMLError, KeyError, TypeError) as exc:
        raise AmnesiacError(f"{spec_file}: not a valid argument_specs file ({exc})") from exc
    variables = {
        name: RoleVariable(
            name=name,
            type=str(opt.get("type", "str")),
            default=opt.get("default"),
            description=" ".join(opt.get("description", ""))
            if isinstance(opt.get("description"), list)
            else str(opt.get("description", "")),
            choices=tuple(opt.get("choices", ())),
        )
        for name, opt in (main.get("options") or {}).items()
    }
    return Role(
        name=path.name,
        path=path,
        description=str(main.get("short_description", "")),
        variables=variables,
    )


@cache
def catalog(roles_dir: Path | None = None) -> Mapping[str, Role]:
    root = roles_dir or paths.roles_dir()
    return {p.name: load_role(p) for p in sorted(root.iterdir()) if p.is_dir() and (p / "tasks").is_dir()}
