"""The results model: what a verification run found, claim by claim, and the verdict it adds up to.

A report is built from the policy and the checks' results by `build_report`, which is pure: the
same policy, target and results always give the same report. The models validate their own
consistency (a claim's status follows from its checks, the totals and the verdict from the
claims), so a report read back from report.json cannot contradict itself either.

Silence is never a pass: a check a claim names that did not run counts as an error, and a
technical claim is verified only when every check the policy names for it ran on this target and
passed; one whose guarantee is a permitted record needs, besides, a check that watched the record
leave the server. The target's integrity (the image verified is the image built) is a claim of
amnesiac's own, kept apart from the policy's claims and their totals, and part of the verdict.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    computed_field,
    field_serializer,
    field_validator,
    model_validator,
)

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
from amnesiac.errors import ExitCode
from amnesiac.image.manifest import Sha256
from amnesiac.policy import Claim, ClaimKind, Control, Endpoint, PermittedRecord, Policy
from amnesiac.targets.base import TargetKind

# The check-level types (checks.results) are part of the report too: named here for its readers.
__all__ = [
    "FORMAT",
    "INTEGRITY_CLAIM",
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
    "integrity_claim",
    "load",
    "printable",
    "result_for",
    "verdict_of",
]

# 2: the integrity claim apart from the policy's claims; partially verified, unproven; incomplete.
FORMAT: Literal[2] = 2
TOOL_NAME = "amnesiac"

NO_CHECKS_REASON = "no check verifies this claim"

INTEGRITY_CLAIM = "amnesiac-integrity"
INTEGRITY_TITLE = "The verified image is the shipped image"
INTEGRITY_TEXT = (
    "The image verified is the image that ships: it carries no SSH key of its own (the "
    "verifier's key arrives in a boot-time overlay), management access accepts keys only and "
    "forwards nothing, and root cannot quietly undo the controls: the kernel is locked down, "
    "cannot be replaced by kexec and runs with its self-protection settings, no firmware store keeps "
    "anything across a reboot, and every daemon runs in a systemd sandbox within its role's bound."
)
INTEGRITY_RATIONALE = (
    "Checked on every target whatever the policy says: a key baked into the image, password "
    "logins, or a root able to read kernel memory or start another kernel would make every "
    "other result meaningless."
)


class ClaimStatus(StrEnum):
    VERIFIED = "verified"  # every check the policy names ran here and passed
    PARTIAL = "partially-verified"  # those that ran passed; some cannot run on this kind of target
    UNPROVEN = "unproven"  # a permitted record: nothing yet observed it leave, and only it
    NOT_APPLICABLE = "not-applicable"  # none of its checks can run on this kind of target
    FAILED = "failed"  # a check failed, stopped with an error, or did not run at all
    ORGANISATIONAL = "organisational"  # about how the provider operates: no software can check it


# What a technical claim's status is short of: verified, or failed, or somewhere in between.
NOT_PROVED = frozenset({ClaimStatus.PARTIAL, ClaimStatus.UNPROVEN, ClaimStatus.NOT_APPLICABLE})


class Verdict(StrEnum):
    PASS = "pass"  # noqa: S105 (a verdict, not a password): every technical claim verified
    INCOMPLETE = "incomplete"  # none failed, but not every one could be proved on this target
    FAIL = "fail"


# --- the model ----------------------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def claim_status(  # noqa: PLR0911 (a decision table: one return per row of the docstring)
    kind: ClaimKind, checks: Sequence[CheckResult], permits: Sequence[PermittedRecord] = ()
) -> tuple[ClaimStatus, str | None]:
    """A claim's status and, unless verified or organisational, why: derived from its checks alone.

    organisational → organisational; no check, or any failed or in error → failed; every check
    not applicable → not-applicable; a permitted record that no passed check watched leave the
    server → unproven; some not applicable → partially verified; every one passed → verified.
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
    absent = [c for c in checks if c.outcome is CheckOutcome.NOT_APPLICABLE]
    if len(absent) == len(checks):
        return ClaimStatus.NOT_APPLICABLE, "; ".join(_unique(c.reason or "" for c in checks))
    not_here = "; ".join(f"{c.id} ({first_line(c.reason)})" for c in absent)
    ran = f"{len(checks) - len(absent)} of {len(checks)} checks ran on this target"
    if permits and not any(c.observes_records and c.outcome is CheckOutcome.PASSED for c in checks):
        records = ", ".join(f"{r.record} ({', '.join(r.fields)}) to {r.destination}" for r in permits)
        why = (
            f"not yet provable: no check observed the permitted records, {records}, leave the server "
            "with nothing else leaving and nothing staying; the checks that passed show only what "
            "the server does not keep"
        )
        return ClaimStatus.UNPROVEN, f"{why}; {ran}, not here: {not_here}" if absent else why
    if absent:
        return ClaimStatus.PARTIAL, f"partially verified: {ran}; not here: {not_here}"
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
    translation: dict[str, list[str]] | None = None  # the policy author's, never checked as a quote
    rationale: str | None = None
    controls: list[Control] = Field(default_factory=list)
    permits: list[PermittedRecord] | None = None
    checks: list[CheckResult] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> ClaimResult:
        status, _ = claim_status(self.kind, self.checks, self.permits or ())
        if self.status is not status:
            raise ValueError(f"claim '{self.id}' is marked {self.status} but its checks make it {status}")
        if status not in {ClaimStatus.VERIFIED, ClaimStatus.ORGANISATIONAL} and not self.reason:
            raise ValueError(f"claim '{self.id}' is {status} but gives no reason")
        return self

    @classmethod
    def of(cls, claim: Claim, sources: Mapping[str, str], checks: Sequence[CheckResult]) -> ClaimResult:
        status, reason = claim_status(claim.kind, checks, claim.permits or ())
        return cls(
            id=claim.id,
            title=claim.title,
            kind=claim.kind,
            status=status,
            reason=reason,
            text=claim.text,
            sources={lang: sources[lang] for lang in claim.text if lang in sources},
            translation=claim.translation,
            rationale=claim.rationale,
            controls=claim.controls,
            permits=claim.permits,
            checks=list(checks),
        )


ATTESTED = "attested by the TPM"
REPORTED = "reported by the target"


class TpmAttestation(_Model):
    """A TPM quote of what booted, checked by the verifier against the enrolled attestation key,
    its own nonce and the manifest's predicted PCRs (attest.py)."""

    attested: bool
    reason: str  # "attested", or why not
    nonce: str
    ak_sha256: str  # of the enrolled key's PEM
    quoted_pcrs: dict[str, str] = Field(default_factory=dict)  # sha256 bank: index -> value
    expected_pcrs: dict[str, str] = Field(default_factory=dict)
    # The test overlay measured with the image into PCR 11 (the verifier's key, an identity).
    overlay_sha256: str | None = None
    tampered: str | None = None  # what the harness changed on purpose (a negative test)
    secure_boot: str | None = None  # sha256 of the db certificate the firmware enforced, if any
    # Whose TPM the enrolled AK is (ssh:// and inventory hosts; attest.Enrolment): the endorsement
    # key it was bound to at enrolment, and the maker's root that key's certificate chains to
    # (None: not checked, trust on first use). None for the harness's own swtpm (qemu:).
    ek_sha256: str | None = None
    ek_certified_by: str | None = None


class Identity(_Model):
    """What the target says it is, read before any check runs; anything unread stays None."""

    image_sha256: Sha256 | None = None
    kernel_release: str | None = None
    cmdline: str | None = None
    boot_id: str | None = None
    hostname: str | None = None
    artifacts: dict[str, Sha256] = Field(default_factory=dict)  # served file name -> sha256
    manifest_sha256_matches: bool | None = None  # the served artifacts match manifest.json
    tpm: TpmAttestation | None = None  # a quote was asked for (qemu: boots measured)

    @model_validator(mode="before")
    @classmethod
    def _derived(cls, data: Any) -> Any:
        """report.json carries `established_by` for its readers; it is derived, never read back."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if k != "established_by"}
        return data

    @computed_field  # type: ignore[prop-decorator]
    @property
    def established_by(self) -> str:
        """How the report knows who the target is: never the same words for both."""
        return ATTESTED if self.tpm is not None and self.tpm.attested else REPORTED


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
    endpoints: dict[str, Endpoint] = Field(default_factory=dict)  # where permitted records go

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
            endpoints=header.endpoints,
        )


def count_statuses(claims: Iterable[ClaimResult]) -> dict[ClaimStatus, int]:
    totals = dict.fromkeys(ClaimStatus, 0)
    for claim in claims:
        totals[claim.status] += 1
    return totals


def verdict_of(integrity: ClaimResult, claims: Iterable[ClaimResult]) -> Verdict:
    """pass when the integrity claim and every technical claim are verified; fail when any
    failed; incomplete when none failed but some could not be proved here."""
    statuses = {integrity.status, *(c.status for c in claims)}
    if ClaimStatus.FAILED in statuses:
        return Verdict.FAIL
    return Verdict.INCOMPLETE if statuses & NOT_PROVED else Verdict.PASS


def integrity_claim(checks: Sequence[CheckResult]) -> ClaimResult:
    """amnesiac's own claim about the target, whatever the policy: it runs the image that was
    built, and only the policy's keys log in (the integrity checks and the identity's)."""
    status, reason = claim_status(ClaimKind.TECHNICAL, checks)
    return ClaimResult(
        id=INTEGRITY_CLAIM,
        title=INTEGRITY_TITLE,
        kind=ClaimKind.TECHNICAL,
        status=status,
        reason=reason,
        text={"en": [INTEGRITY_TEXT]},
        sources={"en": "amnesiac (not a provider's sentence)"},
        rationale=INTEGRITY_RATIONALE,
        checks=list(checks),
    )


class Report(_Model):
    format: Literal[2] = FORMAT
    tool: Tool
    generated: datetime
    policy: PolicyInfo
    target: Target
    integrity: ClaimResult  # amnesiac's own claim, apart from the policy's (and from the totals)
    totals: dict[ClaimStatus, int]  # the policy's claims by status
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
        if self.integrity.id != INTEGRITY_CLAIM:
            raise ValueError(f"the integrity claim is '{INTEGRITY_CLAIM}', not '{self.integrity.id}'")
        if self.verdict is not verdict_of(self.integrity, self.claims):
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
        """The policy's technical claims (the integrity claim is apart: `integrity`)."""
        return [c for c in self.claims if c.kind is ClaimKind.TECHNICAL]

    @property
    def not_proved(self) -> list[ClaimResult]:
        """Technical claims, the integrity claim among them, that neither failed nor are verified."""
        return [c for c in [self.integrity, *self.claims] if c.status in NOT_PROVED]

    @property
    def failed(self) -> list[ClaimResult]:
        return [c for c in [self.integrity, *self.claims] if c.status is ClaimStatus.FAILED]

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
    integrity: Sequence[CheckResult],
    generated: datetime,
    tool_version: str,
) -> Report:
    """The report of `results` (check id -> result) against `policy`'s claims, in policy order,
    and of `integrity` (the integrity checks' results) as amnesiac's own claim.

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
        integrity=(whole := integrity_claim(integrity)),
        totals=count_statuses(claims),
        verdict=verdict_of(whole, claims),
        claims=claims,
    )


def exit_code(report: Report) -> int:
    """The process exit code for a verification run: 0 only when the verdict is pass."""
    codes = {
        Verdict.PASS: ExitCode.OK,
        Verdict.FAIL: ExitCode.FAILED,
        Verdict.INCOMPLETE: ExitCode.INCOMPLETE,
    }
    return int(codes[report.verdict])


def load(data: str | bytes) -> Report:
    """A report read back from its report.json, validated (and so consistent) as when written."""
    return Report.model_validate_json(data)
