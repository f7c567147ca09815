"""The results model: what a verification run found, claim by claim, and the verdict it adds up to.

A report is built from the policy and the checks' results by `build_report`, which is pure: the
same policy, target and results always give the same report. The models validate their own
consistency (a claim's status follows from its checks, the totals and the verdict from the
claims), so a report read back from report.json cannot contradict itself either.

Silence is never a pass: a check a claim names that did not run counts as an error, and a
technical claim is verified only when at least one of its checks passed and none failed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_serializer, field_validator, model_validator

from amnesiac.checks.results import (
    MISSING_CHECK_REASON,
    OUTPUT_LIMIT,
    REASON_LIMIT,
    CheckOutcome,
    CheckResult,
    Evidence,
    bound_output,
    printable,
)
from amnesiac.image.manifest import Sha256
from amnesiac.policy import Claim, ClaimKind, Control, Permits, Policy
from amnesiac.targets.base import TargetKind

# The check-level types (checks.results) are part of the report too: named here for its readers.
__all__ = [
    "FORMAT",
    "MISSING_CHECK_REASON",
    "NO_CHECKS_REASON",
    "OUTPUT_LIMIT",
    "REASON_LIMIT",
    "TOOL_NAME",
    "CheckOutcome",
    "CheckResult",
    "ClaimResult",
    "ClaimStatus",
    "Evidence",
    "Identity",
    "PolicyInfo",
    "Report",
    "Target",
    "TargetKind",
    "Tool",
    "Verdict",
    "bound_output",
    "build_report",
    "claim_status",
    "count_statuses",
    "exit_code",
    "first_line",
    "load",
    "printable",
    "result_for",
    "verdict_of",
]

FORMAT: Literal[1] = 1
TOOL_NAME = "amnesiac"

NO_CHECKS_REASON = "no check verifies this claim"


class ClaimStatus(StrEnum):
    VERIFIED = "verified"
    FAILED = "failed"
    NOT_APPLICABLE = "not-applicable"
    ORGANISATIONAL = "organisational"


class Verdict(StrEnum):
    PASS = "pass"  # noqa: S105 (a verdict, not a password)
    FAIL = "fail"


# --- the model ----------------------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def claim_status(kind: ClaimKind, checks: Sequence[CheckResult]) -> tuple[ClaimStatus, str | None]:
    """A claim's status and, unless verified or organisational, why: derived from its checks alone.

    organisational → organisational; any check failed or in error → failed; every check not
    applicable → not-applicable; otherwise (at least one passed, none failed) → verified.
    """
    if kind is ClaimKind.ORGANISATIONAL:
        return ClaimStatus.ORGANISATIONAL, None
    if not checks:
        return ClaimStatus.FAILED, NO_CHECKS_REASON
    bad = [c for c in checks if c.outcome in {CheckOutcome.FAILED, CheckOutcome.ERROR}]
    if bad:
        return ClaimStatus.FAILED, "; ".join(
            _unique(f"{c.id} {c.outcome}: {first_line(c.reason)}" for c in bad)
        )
    if all(c.outcome is CheckOutcome.NOT_APPLICABLE for c in checks):
        return ClaimStatus.NOT_APPLICABLE, "; ".join(_unique(c.reason or "" for c in checks))
    return ClaimStatus.VERIFIED, None


def first_line(text: str | None) -> str:
    """The first non-empty line of an assertion message: what a summary can show of it."""
    lines = (text or "").strip().splitlines()
    return lines[0] if lines else ""


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(i for i in items if i))


class ClaimResult(_Model):
    """One claim of the policy, quoted in every language, with what enforces and what proves it."""

    id: str
    title: str
    kind: ClaimKind
    status: ClaimStatus
    reason: str | None = None
    text: dict[str, list[str]]
    sources: dict[str, str]
    rationale: str | None = None
    controls: list[Control] = Field(default_factory=list)
    permits: Permits | None = None
    checks: list[CheckResult] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> ClaimResult:
        status, _ = claim_status(self.kind, self.checks)
        if self.status is not status:
            raise ValueError(f"claim '{self.id}' is marked {self.status} but its checks make it {status}")
        if status in {ClaimStatus.FAILED, ClaimStatus.NOT_APPLICABLE} and not self.reason:
            raise ValueError(f"claim '{self.id}' is {status} but gives no reason")
        return self

    @classmethod
    def of(cls, claim: Claim, sources: Mapping[str, str], checks: Sequence[CheckResult]) -> ClaimResult:
        status, reason = claim_status(claim.kind, checks)
        return cls(
            id=claim.id,
            title=claim.title,
            kind=claim.kind,
            status=status,
            reason=reason,
            text=claim.text,
            sources={lang: sources[lang] for lang in claim.text if lang in sources},
            rationale=claim.rationale,
            controls=claim.controls,
            permits=claim.permits,
            checks=list(checks),
        )


class Identity(_Model):
    """What the target says it is, read before any check runs; anything unread stays None."""

    image_sha256: Sha256 | None = None
    kernel_release: str | None = None
    cmdline: str | None = None
    boot_id: str | None = None
    hostname: str | None = None
    artifacts: dict[str, Sha256] = Field(default_factory=dict)  # served file name -> sha256
    manifest_sha256_matches: bool | None = None  # the served artifacts match manifest.json


class Target(_Model):
    kind: TargetKind
    address: str
    identity: Identity = Field(default_factory=Identity)
    # Fingerprints (SHA256:...) of the public keys the verifier itself put on the target to log
    # in (qemu:'s boot-time overlay key, --verifier-key): the only keys allowed beside the policy's.
    verifier_keys: list[str] = Field(default_factory=list)

    @property
    def spec(self) -> str:
        """The target as the command line names it: qemu:build/ovpn, ssh://host, podman://name."""
        return f"{self.kind.backend.prefix}{self.address}"


class Tool(_Model):
    name: str = TOOL_NAME
    version: str


class PolicyInfo(_Model):
    id: str
    title: str
    provider: str
    file: str
    sha256: Sha256
    sources: dict[str, str]  # language -> source file name

    @classmethod
    def of(cls, policy: Policy) -> PolicyInfo:
        header = policy.policy
        return cls(
            id=header.id,
            title=header.title,
            provider=header.provider,
            file=str(policy.path),
            sha256=policy.sha256,
            sources=header.sources,
        )


def count_statuses(claims: Iterable[ClaimResult]) -> dict[ClaimStatus, int]:
    totals = dict.fromkeys(ClaimStatus, 0)
    for claim in claims:
        totals[claim.status] += 1
    return totals


def verdict_of(claims: Iterable[ClaimResult]) -> Verdict:
    """pass when every technical claim that applies to the target is verified: none failed."""
    return Verdict.FAIL if any(c.status is ClaimStatus.FAILED for c in claims) else Verdict.PASS


class Report(_Model):
    format: Literal[1] = FORMAT
    tool: Tool
    generated: datetime
    policy: PolicyInfo
    target: Target
    totals: dict[ClaimStatus, int]
    verdict: Verdict
    claims: list[ClaimResult] = Field(min_length=1)

    @field_validator("generated")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("the generation time must carry a time zone")
        return value.astimezone(UTC).replace(microsecond=0)

    @field_serializer("generated")
    def _iso(self, value: datetime) -> str:
        return value.strftime("%Y-%m-%dT%H:%M:%SZ")

    @model_validator(mode="after")
    def _consistent(self) -> Report:
        if self.totals != count_statuses(self.claims):
            raise ValueError("the totals do not match the claims")
        if self.verdict is not verdict_of(self.claims):
            raise ValueError(f"the verdict '{self.verdict}' does not follow from the claims")
        ids = [c.id for c in self.claims]
        if len(set(ids)) != len(ids):
            raise ValueError("claim ids are not unique")
        return self

    @property
    def passed(self) -> bool:
        return self.verdict is Verdict.PASS

    @property
    def technical_claims(self) -> list[ClaimResult]:
        return [c for c in self.claims if c.kind is ClaimKind.TECHNICAL]

    def check_totals(self) -> dict[CheckOutcome, int]:
        """How many (claim, check) pairs ended each way: a shared check counts once per claim."""
        totals = dict.fromkeys(CheckOutcome, 0)
        for claim in self.claims:
            for check in claim.checks:
                totals[check.outcome] += 1
        return totals


def result_for(check_id: str, results: Mapping[str, CheckResult]) -> CheckResult:
    """The result of `check_id`, or an error result when the suite did not run it."""
    result = results.get(check_id)
    if result is None:
        return CheckResult.missing(check_id)
    if result.id != check_id:
        raise ValueError(f"the result filed under '{check_id}' is for check '{result.id}'")
    return result


def build_report(
    policy: Policy,
    target: Target,
    results: Mapping[str, CheckResult],
    *,
    generated: datetime,
    tool_version: str,
) -> Report:
    """The report of `results` (check id -> result) against `policy`'s claims, in policy order.

    Each claim carries the results of the checks it names, so a check shared by two claims
    appears under both; a named check missing from `results` is an error. Results of checks no
    claim names are not part of any claim and are left out.
    """
    sources = policy.policy.sources
    claims = [
        ClaimResult.of(claim, sources, [result_for(c, results) for c in dict.fromkeys(claim.checks)])
        for claim in policy.claims
    ]
    return Report(
        tool=Tool(version=tool_version),
        generated=generated,
        policy=PolicyInfo.of(policy),
        target=target,
        totals=count_statuses(claims),
        verdict=verdict_of(claims),
        claims=claims,
    )


def exit_code(report: Report) -> int:
    """The process exit code for a verification run: 0 only when the verdict is pass."""
    return 0 if report.verdict is Verdict.PASS else 1


def load(data: str | bytes) -> Report:
    """A report read back from its report.json, validated (and so consistent) as when written."""
    return Report.model_validate_json(data)
