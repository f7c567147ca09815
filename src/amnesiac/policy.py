"""The policy model and its loader: the only place that reads policy YAML.

A policy quotes each claim of a provider's privacy policy verbatim, in every language it is
published in, and says how software enforces (controls: roles and their variables) and proves
(checks) each technical claim. Every error names the file and line and exits 2.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from amnesiac.checks import MODULES
from amnesiac.errors import PolicyError
from amnesiac.roles import Role, catalog

# Checks live in src/amnesiac/checks/<module>.py and are named <module>.<function>.
CHECK_MODULES = frozenset(MODULES)
# Applied to every image, before the roles the claims name: the system itself, and the key-only
# management access that `amnesiac verify` and operators reach a server through.
BASE_ROLES = ("server_base", "ssh_admin")

Identifier = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]*$")]
CheckId = Annotated[str, Field(pattern=r"^[a-z_]+\.[a-z0-9_]+$")]

Path_ = tuple[str | int, ...]


class ClaimKind(StrEnum):
    TECHNICAL = "technical"
    ORGANISATIONAL = "organisational"


class Destination(StrEnum):
    OFF_SERVER = "off-server"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Permits(_Strict):
    """What a provider says it MAY record. A RAM-only server keeps none of it itself."""

    records: list[Annotated[str, Field(pattern=r"^[a-z0-9_]+$")]] = Field(min_length=1)
    retention_days: int | None = Field(default=None, ge=1)
    destination: Destination


class Control(_Strict):
    role: str
    vars: dict[str, Any] = Field(default_factory=dict)


class Claim(_Strict):
    id: Identifier
    kind: ClaimKind
    title: str = Field(min_length=1)
    text: dict[str, list[str]]
    rationale: str | None = None
    controls: list[Control] = Field(default_factory=list)
    checks: list[CheckId] = Field(default_factory=list)
    permits: Permits | None = None

    @field_validator("text", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {lang: [q] if isinstance(q, str) else q for lang, q in value.items()}
        return value

    @property
    def technical(self) -> bool:
        return self.kind is ClaimKind.TECHNICAL


class Header(_Strict):
    id: Identifier
    provider: str
    title: str
    sources: dict[Annotated[str, Field(pattern=r"^[a-z]{2}$")], str] = Field(min_length=1)


class ImageSettings(_Strict):
    suite: str = "trixie"
    mirror: str = "http://deb.debian.org/debian"


class Policy(_Strict):
    schema_version: Literal[1] = Field(alias="schema")
    policy: Header
    image: ImageSettings = Field(default_factory=ImageSettings)
    claims: list[Claim] = Field(min_length=1)

    _path: Path = PrivateAttr()
    _sha256: str = PrivateAttr()

    @property
    def path(self) -> Path:
        return self._path

    @property
    def sha256(self) -> str:
        return self._sha256

    @property
    def id(self) -> str:
        return self.policy.id

    def technical_claims(self) -> list[Claim]:
        return [c for c in self.claims if c.technical]

    def roles(self) -> list[str]:
        """The roles the image applies: the base roles, then each role in order of first mention."""
        ordered = list(BASE_ROLES)
        for claim in self.technical_claims():
            for control in claim.controls:
                if control.role not in ordered:
                    ordered.append(control.role)
        return ordered

    def role_vars(self) -> dict[str, Any]:
        """Every variable the claims set (the loader has refused conflicting values)."""
        merged: dict[str, Any] = {}
        for claim in self.technical_claims():
            for control in claim.controls:
                merged.update(control.vars)
        return merged

    def claims_of_check(self, check_id: str) -> list[str]:
        return [c.id for c in self.claims if check_id in c.checks]


# --- YAML with line numbers -------------------------------------------------------------------


class _LineTable:
    """Maps a path into the document (('claims', 3, 'kind')) to the line it starts on."""

    def __init__(self) -> None:
        self.lines: dict[Path_, int] = {}

    def line_of(self, path: Path_) -> int | None:
        for end in range(len(path), -1, -1):
            if (line := self.lines.get(path[:end])) is not None:
                return line
        return None


def _scalar(node: yaml.Node) -> Any:
    return yaml.SafeLoader("").construct_object(node)


def _construct(node: yaml.Node, path: Path_, table: _LineTable, file: Path) -> Any:
    table.lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = _scalar(key_node)
            if not isinstance(key, str | int):
                raise PolicyError(file, key_node.start_mark.line + 1, "mapping keys must be strings")
            if key in result:
                raise PolicyError(file, key_node.start_mark.line + 1, f"duplicate key '{key}'")
            table.lines[(*path, key)] = key_node.start_mark.line + 1
            result[key] = _construct(value_node, (*path, key), table, file)
        return result
    if isinstance(node, yaml.SequenceNode):
        return [_construct(item, (*path, i), table, file) for i, item in enumerate(node.value)]
    return _scalar(node)


def _read_yaml(path: Path) -> tuple[Any, _LineTable]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PolicyError(path, None, "no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(path, None, f"cannot read: {exc}") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else None
        raise PolicyError(path, line, f"invalid YAML: {exc.problem or exc.context}") from None
    table = _LineTable()
    if node is None:
        raise PolicyError(path, 1, "the file is empty")
    return _construct(node, (), table, path), table


# --- loading ----------------------------------------------------------------------------------


def _pydantic_message(err: Mapping[str, Any]) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        return f"unknown key '{err['loc'][-1]}'" + (
            f" in {'.'.join(map(str, err['loc'][:-1]))}" if len(err["loc"]) > 1 else ""
        )
    if err["type"] == "missing":
        return f"missing required key '{loc}'"
    return f"{loc}: {err['msg']}"


def load(path: Path | str, roles: Mapping[str, Role] | None = None) -> Policy:
    """Load and validate a policy file; raise PolicyError naming the file and line."""
    path = Path(path)
    data, table = _read_yaml(path)
    if not isinstance(data, dict):
        raise PolicyError(path, 1, "a policy is a mapping with schema, policy and claims")
    try:
        policy = Policy.model_validate(data)
    except ValidationError as exc:
        # A misspelt key shows up twice: as unknown and as a required key missing. Name the typo.
        err = min(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
        loc = tuple(p for p in err["loc"] if isinstance(p, str | int))
        raise PolicyError(path, table.line_of(loc), _pydantic_message(err)) from None
    policy._path = path
    policy._sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    _validate(policy, table, roles if roles is not None else catalog())
    return policy


def _validate(policy: Policy, table: _LineTable, roles: Mapping[str, Role]) -> None:
    _Validator(policy, table, roles).run()


class _Validator:
    """The rules a schema cannot say: verbatim quotes, known roles and variables, no conflicts."""

    def __init__(self, policy: Policy, table: _LineTable, roles: Mapping[str, Role]) -> None:
        self.policy = policy
        self.table = table
        self.roles = roles
        self.set_by: dict[str, tuple[Any, str]] = {}

    def fail(self, where: Path_, message: str) -> NoReturn:
        raise PolicyError(self.policy.path, self.table.line_of(where), message)

    def run(self) -> None:
        for base in BASE_ROLES:
            if base not in self.roles:
                self.fail((), f"the base role '{base}' is missing from roles/")
        sources = {lang: self.source_text(lang) for lang in self.policy.policy.sources}
        seen: dict[str, int] = {}
        for i, claim in enumerate(self.policy.claims):
            at: Path_ = ("claims", i)
            if claim.id in seen:
                self.fail(
                    (*at, "id"), f"duplicate claim id '{claim.id}' (first at claim {seen[claim.id] + 1})"
                )
            seen[claim.id] = i
            self.texts(claim, at, sources)
            self.kind(claim, at)
            for j, control in enumerate(claim.controls):
                self.control(claim, control, (*at, "controls", j))
            for k, check in enumerate(claim.checks):
                if check.split(".", 1)[0] not in CHECK_MODULES:
                    modules = ", ".join(sorted(CHECK_MODULES))
                    self.fail((*at, "checks", k), f"unknown check module in '{check}' (modules: {modules})")

    def source_text(self, lang: str) -> str:
        name = self.policy.policy.sources[lang]
        source = self.policy.path.parent / "sources" / name
        if "/" in name or not source.is_file():
            self.fail(("policy", "sources", lang), f"source '{name}' not found in {source.parent}")
        return _fold(source.read_text(encoding="utf-8", errors="replace"))

    def texts(self, claim: Claim, at: Path_, sources: Mapping[str, str]) -> None:
        for lang in self.policy.policy.sources:
            if lang not in claim.text:
                self.fail(
                    (*at, "text"),
                    f"claim '{claim.id}' has no '{lang}' text (the policy is published in {lang})",
                )
        for lang, quotes in claim.text.items():
            if lang not in sources:
                self.fail(
                    (*at, "text", lang), f"claim '{claim.id}': language '{lang}' is not in policy.sources"
                )
            for q, quote in enumerate(quotes):
                if _fold(quote) not in sources[lang]:
                    self.fail(
                        (*at, "text", lang, q),
                        f"claim '{claim.id}': the {lang} text is not a verbatim quote of "
                        f"{self.policy.policy.sources[lang]}: {quote[:60]!r}",
                    )

    def kind(self, claim: Claim, at: Path_) -> None:
        if claim.technical:
            if not claim.controls:
                self.fail(at, f"technical claim '{claim.id}' names no control (a role that enforces it)")
            if not claim.checks:
                self.fail(at, f"technical claim '{claim.id}' names no check that verifies it")
        elif claim.controls or claim.checks:
            self.fail(
                at,
                f"organisational claim '{claim.id}' cannot have controls or checks "
                "(software cannot verify it)",
            )

    def control(self, claim: Claim, control: Control, at: Path_) -> None:
        role = self.roles.get(control.role)
        if role is None:
            self.fail(
                (*at, "role"), f"unknown role '{control.role}' (roles: {', '.join(sorted(self.roles))})"
            )
        for name, value in control.vars.items():
            var = role.variables.get(name)
            if var is None:
                self.fail((*at, "vars", name), f"role '{role.name}' has no variable '{name}'")
            if problem := var.problem_with(value):
                self.fail((*at, "vars", name), problem)
            if name in self.set_by and self.set_by[name][0] != value:
                first, where = self.set_by[name]
                self.fail((*at, "vars", name), f"{name} is {value!r} here but {first!r} in claim '{where}'")
            self.set_by[name] = (value, claim.id)


def _fold(text: str) -> str:
    return " ".join(text.split())


def iter_checks(policy: Policy) -> Iterator[tuple[str, list[str]]]:
    """Each check id with the claims it serves, in policy order."""
    seen: dict[str, list[str]] = {}
    for claim in policy.technical_claims():
        for check in claim.checks:
            seen.setdefault(check, []).append(claim.id)
    yield from seen.items()
