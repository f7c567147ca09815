"""What a check run yields, one set of types from the probe to the report.

The probe records `Evidence`; the pytest plugin writes one `CheckRecord` per check and host to
its results file (JSON); `amnesiac verify` reads the records back and the report carries each
as a `CheckResult`. Every text is made printable and bounded by one rule here, so evidence
looks the same wherever it is shown.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator

OUTPUT_LIMIT = 4000  # characters of command output kept per piece of evidence
REASON_LIMIT = 2000  # characters of an assertion message kept as a check's reason
_MARKER_ROOM = 48  # room for the "[… N bytes omitted …]" line, so a bounded text stays in its limit

MISSING_CHECK_REASON = "no such check in the suite"

CheckId = Annotated[str, Field(pattern=r"^[a-z_]+\.[a-z0-9_]+$")]


class CheckOutcome(StrEnum):
    PASSED = "passed"
    FAILED = "failed"
    NOT_APPLICABLE = "not-applicable"
    ERROR = "error"


# --- text hygiene -------------------------------------------------------------------------------

# Colour and style escapes carry no evidence; other control characters are shown, not dropped.
_SGR = re.compile(r"\x1b\[[0-9;]*m")
# What XML 1.0 cannot carry (and HTML shows as garbage): C0 controls but tab/LF/CR, DEL, lone
# surrogates and the two non-characters; and the C1 controls, which some terminals obey as
# escapes (U+009B is a CSI) when a report, a source text or evidence is printed.
_UNPRINTABLE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff\ufffe\uffff]")


def printable(text: str) -> str:
    """`text` with colour escapes removed and other control characters spelt out (``\\x1b``)."""
    text = _SGR.sub("", text).replace("\r\n", "\n")
    return _UNPRINTABLE.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def bound_output(text: str, limit: int = OUTPUT_LIMIT) -> str:
    """At most `limit` characters of `text`: its head and tail around an omission marker.

    The cut falls on line boundaries where one is near, and the marker counts the UTF-8 bytes
    left out, so a reader knows how much is missing. Bounding a bounded text changes nothing.
    """
    if len(text) <= limit:
        return text
    budget = max(limit - _MARKER_ROOM, 2)
    head_len = budget // 2
    tail_len = budget - head_len
    head, tail = text[:head_len], text[len(text) - tail_len :]
    if (cut := head.rfind("\n")) >= head_len // 2:
        head = head[: cut + 1]
    if 0 <= (cut := tail.find("\n")) < tail_len // 2:
        tail = tail[cut + 1 :]
    omitted = text[len(head) : len(text) - len(tail)]
    size = len(omitted.encode("utf-8", errors="surrogatepass"))
    marker = f"[… {size} bytes omitted …]"
    return f"{head}{'' if head.endswith(chr(10)) else chr(10)}{marker}\n{tail}"


def _one_line(text: str) -> str:
    return " ".join(text.split())


# --- the types ----------------------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Evidence(_Model):
    """What a check ran or read on the target and what came back."""

    command: str
    exit_code: int | None = None
    output: str = ""
    note: str | None = None

    @field_validator("command", "note")
    @classmethod
    def _printable(cls, value: str | None) -> str | None:
        return None if value is None else printable(value)

    @field_validator("output")
    @classmethod
    def _bounded(cls, value: str) -> str:
        return bound_output(printable(value))


class CheckResult(_Model):
    """One check's outcome on the target; a failure or error carries its assertion message."""

    id: CheckId
    title: str = Field(min_length=1)
    rationale: str | None = None
    outcome: CheckOutcome
    reason: str | None = None
    duration_s: float = Field(default=0.0, ge=0)
    evidence: list[Evidence] = Field(default_factory=list)
    # The check watched permitted records leave the server for the provider's endpoint, and
    # nothing else leave or stay (CheckMeta.observes_records): what a permitted record needs.
    observes_records: bool = False

    @field_validator("title", "rationale")
    @classmethod
    def _fold(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not (folded := _one_line(printable(value))):
            raise ValueError("must not be blank")
        return folded

    @field_validator("reason")
    @classmethod
    def _bounded(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        return bound_output(printable(value.strip()), REASON_LIMIT)

    @model_validator(mode="after")
    def _reason_given(self) -> CheckResult:
        if self.outcome is not CheckOutcome.PASSED and self.reason is None:
            raise ValueError(f"check '{self.id}' is {self.outcome} but gives no reason")
        return self

    @classmethod
    def missing(cls, check_id: str) -> CheckResult:
        """The result of a check the policy names but the suite does not have: an error."""
        return cls(id=check_id, title=check_id, outcome=CheckOutcome.ERROR, reason=MISSING_CHECK_REASON)


def title_of(check_id: str) -> str:
    """A check's title from its id: storage.no_swap -> "No swap"."""
    return check_id.split(".", 1)[1].replace("_", " ").capitalize()


class CheckRecord(CheckResult):
    """A check's result on one host, as the plugin writes it: the host testinfra named and the
    claims the check declares, beside the result itself."""

    host: str = ""
    claims: list[str] = Field(default_factory=list)

    def result(self) -> CheckResult:
        return CheckResult.model_validate(self.model_dump(exclude={"host", "claims"}))


_RECORDS = TypeAdapter(list[CheckRecord])


def write_records(records: Sequence[CheckRecord], path: Path) -> None:
    from amnesiac.files import write_atomic

    write_atomic(path, _RECORDS.dump_json(list(records), indent=2) + b"\n")


def read_records(path: Path) -> list[CheckRecord]:
    return _RECORDS.validate_json(path.read_bytes())
