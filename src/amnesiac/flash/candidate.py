"""What is about to be published, and whether it may be: artifacts, signature, verification gate.

Every file is read and checked before anything is copied: the boot files against manifest.json,
manifest.json against its signature, and the report against the manifest. The small files
(manifest, signature, report) are published from the very bytes that were checked; the large
ones are checked again after the copy, on the PXE root.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from amnesiac.errors import UsageError
from amnesiac.flash import signing
from amnesiac.flash.model import (
    BOOT_FILES,
    MANIFEST,
    REPORT,
    SIGNATURE,
    FileInfo,
    PublishRecord,
    Refused,
    ReportInfo,
    SignatureInfo,
    now,
)
from amnesiac.image.hashing import sha256_file
from amnesiac.report import model as report_model

Source = Path | bytes  # a file to copy, or bytes to write


@dataclass(frozen=True)
class Candidate:
    """A build, checked, with the files its version directory will hold."""

    build: Path
    manifest: dict[str, Any]
    manifest_bytes: bytes
    signature: bytes | None
    files: dict[str, Source]  # name in versions/<sha256>/ -> where it comes from
    expected: dict[str, FileInfo]  # name -> what it must be once copied
    report: ReportInfo | None
    objections: list[str] = field(default_factory=list)  # why the gate says no (empty: it says yes)
    signer: SignatureInfo | None = None

    @property
    def image_sha256(self) -> str:
        return str(self.manifest["image"]["sha256"])

    @property
    def short(self) -> str:
        return self.image_sha256[:12]

    def record(self, *, serial: int, by: str, forced: list[str]) -> PublishRecord:
        image, policy = self.manifest["image"], self.manifest["policy"]
        return PublishRecord(
            image_sha256=self.image_sha256,
            serial=serial,
            published=now(),
            published_by=by,
            policy_id=str(policy["id"]),
            policy_sha256=str(policy["sha256"]),
            built=str(self.manifest.get("built", "")),
            source_date_epoch=self.manifest.get("source_date_epoch"),
            kernel_release=str(image.get("kernel_release", "")),
            files=self.expected,
            report=self.report,
            signature=self.signer,
            forced=forced,
        )


def load(build: Path, report: Path | None = None) -> Candidate:
    """Read and check a build directory; the gate's objections are collected, not raised."""
    if not build.is_dir():
        raise UsageError(f"{build}: no such build directory", hint="run `amnesiac build` first")
    manifest_bytes = _read(build / MANIFEST, f"{build} is not a finished build")
    manifest = _manifest(manifest_bytes, build / MANIFEST)
    expected: dict[str, FileInfo] = {}
    files: dict[str, Source] = {}
    for name in BOOT_FILES:
        path, meta = build / name, manifest["artifacts"][name]
        if not path.is_file():
            raise UsageError(f"{path}: missing; {build} is not a complete build")
        actual = sha256_file(path)
        if actual != meta["sha256"] or path.stat().st_size != meta["size"]:
            raise Refused(
                f"{path} does not match manifest.json (sha256 {actual[:16]}, manifest "
                f"{meta['sha256'][:16]}); refusing to publish it",
                hint="rebuild, or restore the artifact that changed",
            )
        files[name] = path
        expected[name] = FileInfo(sha256=meta["sha256"], size=meta["size"])
    files[MANIFEST] = manifest_bytes
    expected[MANIFEST] = _info(manifest_bytes)
    signature = _optional(build / SIGNATURE)
    if signature is not None:
        files[SIGNATURE] = signature
        expected[SIGNATURE] = _info(signature)
    report_path = report if report is not None else build / REPORT
    if report_path.is_dir():
        report_path = report_path / REPORT
    report_bytes = _optional(report_path)
    info, objections = gate(manifest, report_bytes, report_path)
    if info is not None and report_bytes is not None:
        files[REPORT] = report_bytes
        expected[REPORT] = _info(report_bytes)
    return Candidate(build, manifest, manifest_bytes, signature, files, expected, info, objections)


def gate(manifest: Mapping[str, Any], data: bytes | None, where: Path) -> tuple[ReportInfo | None, list[str]]:
    """Read a report.json against a manifest: what it says, and every reason it does not pass.

    It passes when `amnesiac verify` wrote it (it validates), its verdict is pass, the image it
    verified is this manifest's image, the served files matched the manifest, and it judged
    against the policy this image was built from.
    """
    if data is None:
        return None, [f"no verification report ({where} missing; run `amnesiac verify` or pass --report)"]
    try:
        report = report_model.load(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        return None, [f"{where} is not a valid verification report ({loc}: {err['msg']})"]
    want = str(manifest["image"]["sha256"])
    identity = report.target.identity
    objections = []
    if not report.passed:
        failed = [c.id for c in report.claims if c.status is report_model.ClaimStatus.FAILED]
        objections.append(
            f"the verification report's verdict is {report.verdict} (failed: {', '.join(failed)})"
        )
    if identity.image_sha256 != want:
        objections.append(
            f"the verification report is for image {str(identity.image_sha256)[:16]}, "
            f"not this build's {want[:16]}"
        )
    if identity.manifest_sha256_matches is False:
        objections.append("the verification report says the served files did not match the manifest")
    if report.policy.sha256 != manifest["policy"]["sha256"]:
        objections.append(
            f"the verification report judged policy {report.policy.id} ({report.policy.sha256[:12]}), "
            f"the image was built from {manifest['policy']['id']} ({str(manifest['policy']['sha256'])[:12]})"
        )
    info = ReportInfo(
        verdict=report.verdict.value,
        generated=report.model_dump(mode="json")["generated"],
        target=report.target.spec,
        image_sha256=identity.image_sha256,
        passed=not objections,
    )
    return info, objections


def check_signature(candidate: Candidate, allowed_signers: bytes | None, source: str) -> Candidate:
    """The candidate with its signer; a bad or unknown signature is Refused, whatever --force says.

    With no allowed-signers file in force the signature cannot be judged: that becomes an
    objection of the gate (which --force may override, and which is then recorded).
    """
    if allowed_signers is None:
        what = "signed, but" if candidate.signature is not None else "unsigned, and"
        objection = f"manifest {what} no allowed-signers file to check it against ({source})"
        return replace(candidate, objections=[*candidate.objections, objection])
    signer = signing.verify(
        candidate.manifest_bytes,
        candidate.signature,
        allowed_signers,
        what=str(candidate.build / MANIFEST),
    )
    return replace(candidate, signer=signer)


def _manifest(data: bytes, where: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(data)
        for name in BOOT_FILES:
            meta = manifest["artifacts"][name]
            if not isinstance(meta["sha256"], str) or not isinstance(meta["size"], int):
                raise TypeError(f"artifacts.{name}")
        manifest["image"]["sha256"]
        manifest["policy"]["id"]
        manifest["policy"]["sha256"]
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{where}: not an amnesiac manifest (missing or bad {exc})") from None
    if manifest["image"]["sha256"] != manifest["artifacts"]["initrd.img"]["sha256"]:
        raise Refused(f"{where}: image.sha256 is not the sha256 of initrd.img; refusing to publish it")
    result: dict[str, Any] = manifest
    return result


def _info(data: bytes) -> FileInfo:
    return FileInfo(sha256=hashlib.sha256(data).hexdigest(), size=len(data))


def _read(path: Path, why: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"{path}: missing; {why}") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read it ({exc.strerror})") from None


def _optional(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read it ({exc.strerror})") from None
