"""The policy model and its loader: the only place that reads policy YAML.

A policy quotes each claim of a provider's privacy policy verbatim, in every language it is
published in, and says how software enforces (controls: roles and their variables) and proves
(checks) each technical claim. Every error names the file and line and exits 2.

A policy file is untrusted input: only a regular file of at most MAX_BYTES is read (never a
device or a FIFO, never blocking), the YAML is composed event by event with no anchors or
aliases, at most MAX_DEPTH levels deep and MAX_NODES values, and every failure, whatever
PyYAML, pydantic or the file system raise, becomes one PolicyError naming the file and line.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
import stat
from collections.abc import Iterator, Mapping
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)

from amnesiac.checks import MODULES
from amnesiac.checks.meta import CheckMeta, catalogue
from amnesiac.errors import PolicyError
from amnesiac.roles import Role, catalog

# Checks live in src/amnesiac/checks/<module>.py and are named <module>.<function>.
CHECK_MODULES = frozenset(MODULES)
# Applied to every image, before the roles the claims name: the system itself, and the key-only
# management access that `amnesiac verify` and operators reach a server through.
BASE_ROLES = ("server_base", "ssh_admin")

# The technical claim vocabulary (policies/README.md): the same id means the same guarantee in
# every policy, the roles tag their tasks with it and the checks' metadata names it. A new
# guarantee is added here, in the README's table and in the metadata of the checks that prove it.
TECHNICAL_CLAIMS = frozenset(
    {
        "no-activity-logging",
        "no-traffic-logging",
        "no-timestamp-logging",
        "no-dns-logging",
        "no-ip-logging",
        "no-mac-logging",
        "no-bandwidth-logging",
        "no-disk-storage",
        "vpn-no-write",
        "no-syslog",
        "no-physical-access",
        "no-pii-on-server",
        "no-visited-resources",
        "session-records-off-server",
        "data-volume-off-server",
        "account-counter-off-server",
    }
)

# Role variables the build derives from the policy itself (image.plan), never written in a control.
RECORDS_VAR = "provider_agent_records"  # what the records role sends (image.plan.permitted_record_vars)
DERIVED_VARS = {RECORDS_VAR: "the build derives it from the claims' `permits`"}

# Limits on what the loader reads. The largest shipped policy is 32 KB, 762 values, 6 levels deep.
MAX_BYTES = 4 * 1024 * 1024  # the policy file, and each source text it quotes
MAX_DEPTH = 32  # nested mappings and sequences
MAX_NODES = 20_000  # scalars, mappings and sequences, keys included

Identifier = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]*$")]
CheckId = Annotated[str, Field(pattern=r"^[a-z_]+\.[a-z0-9_]+$")]

Path_ = tuple[str | int, ...]


class ClaimKind(StrEnum):
    TECHNICAL = "technical"
    ORGANISATIONAL = "organisational"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- permitted records: what a provider says a server MAY record, and where it goes ------------


class RecordKind(StrEnum):
    """The shapes of record providers permit (policies/README.md, "Permitted records")."""

    SESSION = "session"  # one record per VPN session: its fields, sent at an event of the session
    COUNTER = "counter"  # a number per account, +1 at connect and -1 at disconnect (0 to maximum)
    VOLUME = "volume"  # the traffic a user moved over a period (a day, a month)


class RecordEvent(StrEnum):
    """What makes a record: a VPN session starting or ending."""

    CONNECT = "connect"
    DISCONNECT = "disconnect"


class RecordField(StrEnum):
    """What a VPN node can put in a record: the node knows these and nothing else of a session."""

    ACCOUNT = "account"  # the account name or token the client authenticated with
    CLIENT_IP = "client_ip"  # the client's public address, as the server sees it
    CLIENT_PORT = "client_port"
    SESSION_ID = "session_id"  # an id the node makes for the session, to pair connect and disconnect
    SESSION_START = "session_start"
    SESSION_END = "session_end"
    BYTES_RECEIVED = "bytes_received"  # from the client, during the session
    BYTES_SENT = "bytes_sent"  # to the client, during the session
    DATA_VOLUME = "data_volume"  # received + sent, added to the period's total
    CONNECTION_COUNT = "connection_count"  # the account's sessions open now
    DEVICE_COUNT = "device_count"  # the account's devices connected now


class Period(StrEnum):
    DAY = "day"
    WEEK = "week"
    MONTH = "month"


_RETENTION = re.compile(r"^(?P<amount>[1-9][0-9]{0,4}) (?P<unit>day|week|month|year)s?$")
WHILE_ACTIVE = "while connected"


class Retention(_Strict):
    """How long the provider keeps a record: a duration, or only while the session lasts.

    Written in a policy as `90 days`, `1 month`, `2 years` or `while connected`.
    """

    amount: int | None = None
    unit: Literal["day", "week", "month", "year"] | None = None
    while_connected: bool = False

    @classmethod
    def parse(cls, value: object) -> Retention:
        if isinstance(value, Retention):
            return value
        if not isinstance(value, str):
            raise ValueError(f"retention is text such as '90 days' or '{WHILE_ACTIVE}'")
        text = " ".join(value.split()).lower()
        if text == WHILE_ACTIVE:
            return cls(while_connected=True)
        if (match := _RETENTION.match(text)) is None:
            raise ValueError(
                f"retention {_q(value)}: write N days, weeks, months or years (such as '90 days'), "
                f"or '{WHILE_ACTIVE}'"
            )
        return cls(amount=int(match["amount"]), unit=match["unit"])

    def __str__(self) -> str:
        if self.while_connected:
            return WHILE_ACTIVE
        return f"{self.amount} {self.unit}{'s' if self.amount != 1 else ''}"


class PermittedRecord(_Strict):
    """One record a provider MAY keep: what it holds, why, what makes it, for how long, and the
    provider's endpoint it goes to. A RAM-only server sends it there and keeps none of it."""

    record: Identifier
    kind: RecordKind
    purpose: str = Field(min_length=1)
    fields: list[RecordField] = Field(min_length=1)
    events: list[RecordEvent] = Field(min_length=1)
    retention: Retention
    destination: Identifier  # a key of policy.endpoints
    maximum: int | None = Field(default=None, ge=1, strict=True)  # counters: the highest count
    period: Period | None = None  # volumes: what the total is summed over

    @field_validator("retention", mode="before")
    @classmethod
    def _retention(cls, value: Any) -> Any:
        return Retention.parse(value)

    @field_serializer("retention")
    def _retention_text(self, value: Retention) -> str:
        return str(value)

    @model_validator(mode="after")
    def _shape(self) -> PermittedRecord:
        for name, values in (("fields", self.fields), ("events", self.events)):
            if len(set(values)) != len(values):
                raise ValueError(f"record '{self.record}': {name} are named twice")
        if self.kind is RecordKind.COUNTER and self.events != [RecordEvent.CONNECT, RecordEvent.DISCONNECT]:
            raise ValueError(
                f"record '{self.record}': a counter changes at [connect, disconnect] (+1, -1), "
                f"not at {[e.value for e in self.events]}"
            )
        if self.maximum is not None and self.kind is not RecordKind.COUNTER:
            raise ValueError(f"record '{self.record}': only a counter has a maximum")
        if (self.period is None) is (self.kind is RecordKind.VOLUME):
            raise ValueError(
                f"record '{self.record}': a volume needs a period (day, week, month), "
                "and only a volume has one"
            )
        return self


class Endpoint(_Strict):
    """A service of the provider's that permitted records are sent to."""

    url: Annotated[str, Field(pattern=r"^(https|udp)://[^\s/]+(/\S*)?$")]
    description: str = Field(min_length=1)


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
    # What the provider says a server MAY record under this claim (policies/README.md).
    permits: list[PermittedRecord] | None = Field(default=None, min_length=1)
    # The policy author's translation for reviewers, by language: shown as a translation,
    # never checked as a quote (the quotes are `text`).
    translation: dict[Annotated[str, Field(pattern=r"^[a-z]{2}$")], list[str]] | None = None

    @field_validator("text", "translation", mode="before")
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
    # The provider's services that permitted records go to, by name.
    endpoints: dict[Identifier, Endpoint] = Field(default_factory=dict)
    # What "not kept" means in time: seconds after a client disconnects by which the server holds
    # nothing of its session anywhere, RAM included (checked by amnesia.session_forgotten).
    forget_after_disconnect_seconds: int = Field(default=60, ge=1, le=3600, strict=True)


class ImageSettings(_Strict):
    suite: str = "trixie"
    mirror: str = "http://deb.debian.org/debian"


SCHEMA = 2  # 2: permitted records are a list of records with fields, events, retention, endpoint


class Policy(_Strict):
    schema_version: Literal[2] = Field(alias="schema")
    policy: Header
    image: ImageSettings = Field(default_factory=ImageSettings)
    claims: list[Claim] = Field(min_length=1)

    _path: Path = PrivateAttr()
    _sha256: str = PrivateAttr()
    _sources: dict[str, str] = PrivateAttr(default_factory=dict)  # language -> text, as read

    @field_validator("schema_version", mode="before")
    @classmethod
    def _integer(cls, value: Any) -> Any:
        # Literal[2] alone would take 2.0 (equal to 2 in Python).
        if type(value) is not int:
            raise ValueError(f"must be the integer {SCHEMA}, not {type(value).__name__} {_clip(repr(value))}")
        if value == 1:
            raise ValueError(
                "schema 1 is no longer read: `permits` became a list of records with fields, events, "
                "retention and an endpoint (policies/README.md); convert the file and write schema: 2"
            )
        return value

    @property
    def path(self) -> Path:
        return self._path

    @property
    def sha256(self) -> str:
        return self._sha256

    @property
    def id(self) -> str:
        return self.policy.id

    def source_text(self, language: str) -> str:
        """The source text of `language` as the loader read and checked it (not read again)."""
        return self._sources[language]

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

    def permitted_records(self) -> list[PermittedRecord]:
        return [r for c in self.claims for r in c.permits or ()]


# --- reading: bounded, never blocking --------------------------------------------------------


class _Unreadable(Exception):
    """Why a file cannot be read (not found, not a regular file, too large); the caller says where."""

    def __init__(self, reason: str, *, missing: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.missing = missing


def _file_kind(mode: int) -> str:
    kinds = (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    )
    return next((name for test, name in kinds if test(mode)), "of an unknown kind")


def _read_bounded(path: Path, limit: int = MAX_BYTES) -> bytes:
    """The bytes of a regular file of at most `limit` bytes. Devices, FIFOs and directories are
    refused from their stat before they are opened, and the file is opened non-blocking, so a
    path naming /dev/zero or a FIFO with no writer costs one system call, not a hang."""
    try:
        before = path.stat()
    except FileNotFoundError:
        raise _Unreadable("no such file", missing=True) from None
    except (OSError, ValueError) as exc:
        raise _Unreadable(f"cannot read: {_os_reason(exc)}") from None
    if not stat.S_ISREG(before.st_mode):
        raise _Unreadable(f"not a regular file ({_file_kind(before.st_mode)})")
    if before.st_size > limit:
        raise _Unreadable(f"too large: {before.st_size} bytes (the limit is {limit})")
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except (OSError, ValueError) as exc:
        raise _Unreadable(f"cannot read: {_os_reason(exc)}") from None
    try:
        now = os.fstat(fd)
        if not stat.S_ISREG(now.st_mode) or (now.st_dev, now.st_ino) != (before.st_dev, before.st_ino):
            raise _Unreadable("the file was replaced while it was being opened")
        chunks: list[bytes] = []
        size = 0
        while chunk := os.read(fd, min(1 << 16, limit + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise _Unreadable(f"too large: more than {limit} bytes")
        return b"".join(chunks)
    except OSError as exc:
        raise _Unreadable(f"cannot read: {_os_reason(exc)}") from None
    finally:
        os.close(fd)


def _os_reason(exc: Exception) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)


# --- YAML with line numbers: composed event by event, within limits -------------------------

try:
    from yaml import CSafeLoader as _Loader  # libyaml: about 15 times faster on a large file

    _LIBYAML = True
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    from yaml import SafeLoader as _Loader  # type: ignore[assignment]

    _LIBYAML = False

_TAG = "tag:yaml.org,2002:"
_STR, _INT, _FLOAT, _BOOL, _NULL = (f"{_TAG}{t}" for t in ("str", "int", "float", "bool", "null"))
_SEQ, _MAP = f"{_TAG}seq", f"{_TAG}map"
# Control characters (C0, DEL, C1) would reach terminals and reports; a lone surrogate is not
# Unicode at all and cannot be written out as UTF-8. Text may keep tabs and line breaks.
_BAD_IN_TEXT = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")
_BAD_IN_KEY = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


class _LineTable:
    """Maps a path into the document (('claims', 3, 'kind')) to the line it starts on."""

    def __init__(self) -> None:
        self.lines: dict[Path_, int] = {}

    def line_of(self, path: Path_) -> int | None:
        for end in range(len(path), -1, -1):
            if (line := self.lines.get(path[:end])) is not None:
                return line
        return None


class _Composer:
    """Builds plain Python values (dict, list, str, int, float, bool, None) straight from the
    parser's events, so nothing is constructed that a limit has not been checked for: no anchors
    or aliases (no billion laughs, no recursive documents), no tags beyond the plain types, at most
    MAX_DEPTH levels and MAX_NODES values."""

    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.loader: Any = _Loader(text)
        self.table = _LineTable()
        self.nodes = 0
        self.constructor = yaml.constructor.SafeConstructor()

    def fail(self, mark: Any, message: str) -> NoReturn:
        raise self.error(mark, message)

    def error(self, mark: Any, message: str) -> PolicyError:
        return PolicyError(self.path, mark.line + 1 if mark is not None else None, message)

    def document(self) -> Any:
        """The one document of the stream; _EMPTY when there is none."""
        try:
            self.loader.get_event()  # StreamStart
            if self.loader.check_event(yaml.StreamEndEvent):
                return _EMPTY
            self.loader.get_event()  # DocumentStart
            value = self.node((), 1)
            self.loader.get_event()  # DocumentEnd
            if not self.loader.check_event(yaml.StreamEndEvent):
                self.fail(self.loader.peek_event().start_mark, "a policy is one YAML document, not several")
            return value
        finally:
            self.loader.dispose()

    def node(self, path: Path_, depth: int) -> Any:
        event: Any = self.loader.get_event()
        mark = event.start_mark
        self.count(event)
        if depth > MAX_DEPTH:
            self.fail(mark, f"nested more than {MAX_DEPTH} levels deep")
        self.table.lines.setdefault(path, mark.line + 1)
        if isinstance(event, yaml.ScalarEvent):
            return self.scalar(event)
        if isinstance(event, yaml.SequenceStartEvent):
            self.collection_tag(event, _SEQ)
            items: list[Any] = []
            while not self.loader.check_event(yaml.SequenceEndEvent):
                items.append(self.node((*path, len(items)), depth + 1))
            self.loader.get_event()
            return items
        if isinstance(event, yaml.MappingStartEvent):
            self.collection_tag(event, _MAP)
            result: dict[str, Any] = {}
            while not self.loader.check_event(yaml.MappingEndEvent):
                key_event: Any = self.loader.get_event()
                self.count(key_event)
                if not isinstance(key_event, yaml.ScalarEvent):
                    self.fail(key_event.start_mark, "mapping keys must be strings")
                key_mark: Any = key_event.start_mark
                key = self.scalar(key_event, key=True)
                if not isinstance(key, str):
                    self.fail(key_mark, "mapping keys must be strings")
                if key in result:
                    self.fail(key_mark, f"duplicate key {_q(key)}")
                self.table.lines[(*path, key)] = key_mark.line + 1
                result[key] = self.node((*path, key), depth + 1)
            self.loader.get_event()
            return result
        raise self.error(mark, f"unexpected YAML {type(event).__name__}")  # the parser yields none

    def count(self, event: Any) -> None:
        if isinstance(event, yaml.AliasEvent):
            self.fail(
                event.start_mark,
                f"the alias *{_clip(str(event.anchor), 40)} is not allowed: a policy has no anchors or "
                "aliases (write the value out)",
            )
        if getattr(event, "anchor", None) is not None:
            self.fail(
                event.start_mark,
                f"the anchor &{_clip(str(event.anchor), 40)} is not allowed: a policy has no anchors or "
                "aliases (write the value out)",
            )
        self.nodes += 1
        if self.nodes > MAX_NODES:
            self.fail(event.start_mark, f"more than {MAX_NODES} values (a policy has a few hundred)")

    def collection_tag(self, event: Any, standard: str) -> None:
        if event.tag not in (None, "!", standard):
            self.fail(event.start_mark, f"the tag {_tag(event.tag)} is not allowed in a policy")

    def scalar(self, event: Any, *, key: bool = False) -> Any:
        mark = event.start_mark
        value: str = event.value
        tag = event.tag
        if tag is None or tag == "!":
            tag = self.loader.resolve(yaml.ScalarNode, value, event.implicit)
        if tag == _STR:
            if bad := (_BAD_IN_KEY if key else _BAD_IN_TEXT).search(value):
                char = ord(bad.group())
                what = "a lone surrogate" if 0xD800 <= char <= 0xDFFF else "the control character"
                self.fail(mark, f"{what} U+{char:04X} is not allowed in {'a key' if key else 'text'}")
            return value
        if tag == _NULL:
            return None
        if tag == _BOOL:
            if value.lower() not in self.constructor.bool_values:
                self.fail(mark, f"{_q(value)} is not a boolean (true or false)")
            return self.constructor.bool_values[value.lower()]
        if tag in (_INT, _FLOAT):
            node = yaml.ScalarNode(tag, value, mark, event.end_mark)
            try:
                if tag == _INT:
                    return self.constructor.construct_yaml_int(node)
                return self.constructor.construct_yaml_float(node)
            except (ValueError, TypeError, KeyError, IndexError, OverflowError):
                kind = "an integer" if tag == _INT else "a number"
                self.fail(mark, f"{_q(value)} is not {kind}")
        if tag == f"{_TAG}timestamp":
            self.fail(mark, f"{_q(value)}: a date is not a policy value (quote it to mean text)")
        if tag == f"{_TAG}merge":
            self.fail(mark, "merge keys (<<) are not allowed in a policy")
        raise self.error(mark, f"the tag {_tag(tag)} is not allowed in a policy")


_EMPTY = object()


def _read_yaml(path: Path) -> tuple[Any, _LineTable, bytes]:
    try:
        raw = _read_bounded(path)
    except _Unreadable as exc:
        raise PolicyError(path, None, exc.reason) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise PolicyError(path, line, f"not UTF-8 text (byte 0x{raw[exc.start]:02x})") from None
    try:
        composer = _Composer(path, text)  # PyYAML's own reader checks the characters here
        data = composer.document()
    except yaml.MarkedYAMLError as exc:
        mark: Any = exc.problem_mark or exc.context_mark
        what = exc.problem or exc.context or "malformed"
        raise PolicyError(path, mark.line + 1 if mark else None, f"invalid YAML: {_one_line(what)}") from None
    except yaml.reader.ReaderError as exc:
        # The position counts characters in PyYAML's reader, bytes of the UTF-8 in libyaml's.
        before = raw[: exc.position] if _LIBYAML else text[: exc.position].encode()
        char = f" U+{exc.character:04X}" if isinstance(exc.character, int) else ""
        raise PolicyError(
            path, before.count(b"\n") + 1, f"invalid YAML: {_one_line(exc.reason)}{char}"
        ) from None
    except yaml.YAMLError as exc:
        raise PolicyError(path, None, f"invalid YAML: {_one_line(str(exc))}") from None
    except RecursionError:  # the depth limit makes this unreachable; a guard, not a path
        raise PolicyError(path, None, f"nested more than {MAX_DEPTH} levels deep") from None
    if data is _EMPTY:
        raise PolicyError(path, 1, "the file is empty")
    return data, composer.table, raw


# --- messages ---------------------------------------------------------------------------------


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _clip(text: str, limit: int = 60) -> str:
    text = _one_line(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _q(text: object, limit: int = 60) -> str:
    """User text in a message: on one line, clipped, in quotes."""
    return f"'{_clip(str(text), limit)}'"


def _tag(tag: str) -> str:
    return _q(f"!!{tag.removeprefix(_TAG)}" if tag.startswith(_TAG) else tag)


def _r(value: object) -> str:
    return _clip(repr(value), 80)


# --- loading ----------------------------------------------------------------------------------


def _pydantic_message(err: Mapping[str, Any]) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        return f"unknown key {_q(err['loc'][-1])}" + (
            f" in {'.'.join(map(str, err['loc'][:-1]))}" if len(err["loc"]) > 1 else ""
        )
    if err["type"] == "missing":
        return f"missing required key '{loc}'"
    if err["type"] == "value_error" and "error" in err.get("ctx", {}):
        return f"{loc}: {_one_line(str(err['ctx']['error']))}"
    return f"{loc}: {_one_line(err['msg'])}"


def load(
    path: Path | str,
    roles: Mapping[str, Role] | None = None,
    checks: Mapping[str, CheckMeta] | None = None,
) -> Policy:
    """Load and validate a policy file; raise PolicyError naming the file and line.

    `roles` and `checks` are the role and check catalogues the policy is read against (default:
    the shipped ones).
    """
    path = Path(path)
    data, table, raw = _read_yaml(path)
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
    policy._sha256 = hashlib.sha256(raw).hexdigest()
    _Validator(
        policy,
        table,
        roles if roles is not None else catalog(),
        checks if checks is not None else catalogue(),
    ).run()
    return policy


class _Validator:
    """The rules a schema cannot say: verbatim quotes, the claim vocabulary, checks that exist
    and serve the claim, known roles and variables, no conflicts."""

    def __init__(
        self, policy: Policy, table: _LineTable, roles: Mapping[str, Role], checks: Mapping[str, CheckMeta]
    ) -> None:
        self.policy = policy
        self.table = table
        self.roles = roles
        self.checks = checks
        # The vocabulary, and any claim a check in the catalogue says it proves.
        self.vocabulary = TECHNICAL_CLAIMS | {c for meta in checks.values() for c in meta.claims}
        self.set_by: dict[str, tuple[Any, str]] = {}
        self.records: dict[str, str] = {}  # permitted record -> the claim that permits it

    def fail(self, where: Path_, message: str) -> NoReturn:
        raise PolicyError(self.policy.path, self.table.line_of(where), message)

    def run(self) -> None:
        for base in BASE_ROLES:
            if base not in self.roles:
                self.fail((), f"the base role '{base}' is missing from roles/")
        self.header()
        sources = {lang: self.source_text(lang) for lang in self.policy.policy.sources}
        seen: dict[str, int] = {}
        for i, claim in enumerate(self.policy.claims):
            at: Path_ = ("claims", i)
            if claim.id in seen:
                self.fail(
                    (*at, "id"), f"duplicate claim id '{claim.id}' (first at claim {seen[claim.id] + 1})"
                )
            seen[claim.id] = i
            if not claim.title.strip():
                self.fail((*at, "title"), f"claim '{claim.id}': the title is blank")
            self.texts(claim, at, sources)
            self.kind(claim, at)
            for j, control in enumerate(claim.controls):
                self.control(claim, control, (*at, "controls", j))
            for k, check in enumerate(claim.checks):
                self.check(claim, check, (*at, "checks", k))
            for r, record in enumerate(claim.permits or ()):
                self.record(claim, record, (*at, "permits", r))
            self.translation(claim, at)

    def header(self) -> None:
        header = self.policy.policy
        for key, value in (("provider", header.provider), ("title", header.title)):
            if not value.strip():
                self.fail(("policy", key), f"policy.{key} is blank")

    def source_text(self, lang: str) -> str:
        name = self.policy.policy.sources[lang]
        folder = self.policy.path.parent / "sources"
        if "/" in name or name in {"", ".", ".."}:
            self.fail(("policy", "sources", lang), f"source {_q(name)}: a file name in {folder}, not a path")
        try:
            raw = _read_bounded(folder / name)
        except _Unreadable as exc:
            reason = f"not found in {folder}" if exc.missing else f"in {folder}: {exc.reason}"
            self.fail(("policy", "sources", lang), f"source {_q(name)} {reason}")
        text = raw.decode("utf-8", errors="replace")
        self.policy._sources[lang] = text
        return fold(text)

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
            if not quotes:
                self.fail((*at, "text", lang), f"claim '{claim.id}': the {lang} text is an empty list")
            for q, quote in enumerate(quotes):
                folded = fold(quote)
                if not folded:
                    self.fail(
                        (*at, "text", lang, q),
                        f"claim '{claim.id}': the {lang} quote is empty (quote the sentence itself)",
                    )
                if folded not in sources[lang]:
                    self.fail(
                        (*at, "text", lang, q),
                        f"claim '{claim.id}': the {lang} text is not a verbatim quote of "
                        f"{self.policy.policy.sources[lang]}: {_departure(folded, sources[lang])}",
                    )

    def kind(self, claim: Claim, at: Path_) -> None:
        if claim.technical:
            if claim.id not in self.vocabulary:
                near = difflib.get_close_matches(claim.id, self.vocabulary, n=1)
                hint = f"did you mean '{near[0]}'? " if near else ""
                self.fail(
                    (*at, "id"),
                    f"technical claim '{claim.id}' is not in the technical claim vocabulary ({hint}"
                    "see policies/README.md; or make it organisational)",
                )
            if not claim.controls:
                self.fail(at, f"technical claim '{claim.id}' names no control (a role that enforces it)")
            if not claim.checks:
                self.fail(at, f"technical claim '{claim.id}' names no check that verifies it")
        elif claim.controls or claim.checks or claim.permits:
            self.fail(
                at,
                f"organisational claim '{claim.id}' cannot have controls, checks or permits "
                "(software cannot verify it; what a server may record is a technical claim)",
            )

    def check(self, claim: Claim, check: str, at: Path_) -> None:
        module = check.split(".", 1)[0]
        if module not in CHECK_MODULES:
            modules = ", ".join(sorted(CHECK_MODULES))
            self.fail(at, f"claim '{claim.id}': unknown check module in '{check}' (modules: {modules})")
        meta = self.checks.get(check)
        if meta is None:
            names = sorted(i.split(".", 1)[1] for i in self.checks if i.startswith(f"{module}."))
            self.fail(at, f"claim '{claim.id}': unknown check '{check}' ({module} has: {', '.join(names)})")
        if claim.checks.index(check) != at[-1]:
            self.fail(at, f"claim '{claim.id}' names the check '{check}' twice")
        if claim.id not in meta.claims:
            self.fail(
                at,
                f"claim '{claim.id}': the check '{check}' does not verify it "
                f"(its metadata lists: {', '.join(meta.claims)})",
            )

    def record(self, claim: Claim, record: PermittedRecord, at: Path_) -> None:
        endpoints = self.policy.policy.endpoints
        if record.destination not in endpoints:
            known = f"it declares: {', '.join(endpoints)}" if endpoints else "it declares none"
            self.fail(
                (*at, "destination"),
                f"record '{record.record}' goes to '{record.destination}', which is not an endpoint "
                f"of policy.endpoints ({known})",
            )
        if record.record in self.records:
            self.fail(
                (*at, "record"),
                f"record '{record.record}' is permitted twice "
                f"(first in claim '{self.records[record.record]}')",
            )
        self.records[record.record] = claim.id

    def translation(self, claim: Claim, at: Path_) -> None:
        for lang, texts in (claim.translation or {}).items():
            if lang in self.policy.policy.sources:
                self.fail(
                    (*at, "translation", lang),
                    f"claim '{claim.id}': the policy is published in '{lang}': quote it under text, "
                    "a translation is into another language",
                )
            if not texts or not all(t.strip() for t in texts):
                self.fail((*at, "translation", lang), f"claim '{claim.id}': the {lang} translation is blank")

    def control(self, claim: Claim, control: Control, at: Path_) -> None:
        role = self.roles.get(control.role)
        if role is None:
            self.fail(
                (*at, "role"), f"unknown role {_q(control.role)} (roles: {', '.join(sorted(self.roles))})"
            )
        for name, value in control.vars.items():
            var = role.variables.get(name)
            if var is None:
                self.fail((*at, "vars", name), f"role '{role.name}' has no variable {_q(name)}")
            if name in DERIVED_VARS:
                self.fail((*at, "vars", name), f"{name} is not set by hand: {DERIVED_VARS[name]}")
            if problem := var.problem_with(value):
                self.fail((*at, "vars", name), _clip(problem, 200))
            if name in self.set_by and self.set_by[name][0] != value:
                first, where = self.set_by[name]
                self.fail(
                    (*at, "vars", name), f"{name} is {_r(value)} here but {_r(first)} in claim '{where}'"
                )
            self.set_by[name] = (value, claim.id)


def fold(text: str) -> str:
    """White space folded: how quotes and sources are compared (and coverage measured)."""
    return " ".join(text.split())


def _departure(quote: str, source: str) -> str:
    """Where a (folded) quote leaves its (folded) source: the longest run of its first words
    that the source holds, and the words that follow it."""
    words = quote.split(" ")
    # Every prefix of a substring is a substring, so the longest matching prefix is found by
    # bisection on the number of words.
    low, high = 0, len(words)
    while low < high:
        middle = (low + high + 1) // 2
        if " ".join(words[:middle]) in source:
            low = middle
        else:
            high = middle - 1
    rest = _q(" ".join(words[low : low + 8]), 70)
    if low == 0:
        return f"the source has no {rest}"
    kept = " ".join(words[max(0, low - 8) : low])
    kept = kept if low <= 8 else f"…{kept}"
    return f"the source has {_q(kept, 70)} but not what follows it, {rest}"


def iter_checks(policy: Policy) -> Iterator[tuple[str, list[str]]]:
    """Each check id with the claims it serves, in policy order."""
    seen: dict[str, list[str]] = {}
    for claim in policy.technical_claims():
        for check in claim.checks:
            seen.setdefault(check, []).append(claim.id)
    yield from seen.items()
