"""What is about to be published, and whether it may be: artifacts, signature, verification gate.

Every file is read and checked before anything is copied: the boot files against manifest.json,
manifest.json against its signature, and the report against the manifest. The small files
(manifest, signature, report) are published from the very bytes that were checked; the large
ones are checked again after the copy, on the PXE root.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path

from pydantic import ValidationError

from amnesiac.errors import UsageError
from amnesiac.flash import signing
from amnesiac.flash.model import (
    BOOT_FILES,
    MANIFEST,
    REPORT,
    SIGNATURE,
    UKI,
    FileInfo,
    PublishRecord,
    Refused,
    ReportInfo,
    SignatureInfo,
    now,
    version_id,
)
from amnesiac.image.manifest import ArtifactMismatch, IdentityMismatch, Manifest, PolicyRef
from amnesiac.report import model as report_model

Source = Path | bytes  # a file to copy, or bytes to write


@dataclass(frozen=True)
class Candidate:
    """A build, checked, with the files its version directory will hold."""

    build: Path
    manifest: Manifest  # parsed from manifest_bytes, the bytes that are checked and published
    manifest_bytes: bytes
    signature: bytes | None
    files: dict[str, Source]  # name in versions/<version>/ -> where it comes from
    expected: dict[str, FileInfo]  # name -> what it must be once copied
    report: ReportInfo | None
    objections: list[str] = field(default_factory=list)  # why the gate says no (empty: it says yes)
    signer: SignatureInfo | None = None

    @property
    def image_sha256(self) -> str:
        return self.manifest.image.sha256

    @property
    def short(self) -> str:
        return self.image_sha256[:12]

    @property
    def version(self) -> str:
        """The name of its directory in versions/: a hash of every file it publishes."""
        return version_id(self.expected)

    @property
    def policy(self) -> PolicyRef:
        """The policy the image was built from (load() refuses a manifest that names none)."""
        return _policy(self.manifest, self.build / MANIFEST)

    def record(self, *, serial: int, by: str, forced: list[str]) -> PublishRecord:
        return PublishRecord(
            image_sha256=self.image_sha256,
            serial=serial,
            published=now(),
            published_by=by,
            policy_id=self.policy.id,
            policy_sha256=self.policy.sha256,
            built=self.manifest.built,
            source_date_epoch=self.manifest.source_date_epoch,
            kernel_release=self.manifest.image.kernel_release,
            files=self.expected,
            report=self.report,
            signature=self.signer,
            forced=forced,
        )


def check_build(build: Path, report: Path | None = None) -> tuple[Manifest, bytes]:
    """The cheap checks of a build, made before anything is signed or copied: BUILD_DIR is a
    directory holding an amnesiac manifest.json; --report, when given, is there. UsageError if not.
    """
    try:
        exists = build.exists()
    except OSError as exc:  # a name too long, a loop of symlinks
        raise UsageError(f"{build}: {exc.strerror}") from None
    if not exists:
        raise UsageError(f"{build}: no such build directory", hint="run `amnesiac build` first")
    if not build.is_dir():
        raise UsageError(f"{build}: not a directory; BUILD_DIR is the directory `amnesiac build` wrote")
    manifest_bytes = _read(build / MANIFEST, f"{build} is not a finished build")
    manifest = _manifest(manifest_bytes, build / MANIFEST)
    if report is not None and not report.exists():
        raise UsageError(f"--report {report}: no such file or directory")
    return manifest, manifest_bytes


def load(build: Path, report: Path | None = None) -> Candidate:
    """Read and check a build directory; the gate's objections are collected, not raised."""
    manifest, manifest_bytes = check_build(build, report)
    if manifest.image.profile != "release":
        raise Refused(
            f"{build} is a {manifest.image.profile} build (packed for speed, not size); "
            "it is never published, whatever --force says",
            hint="build it again without --profile",
        )
    # The UKI too, when the build made one: what UEFI machines boot (model.root_script).
    boot_files = (*BOOT_FILES, UKI) if manifest.measured_boot is not None else BOOT_FILES
    try:
        manifest.check_artifacts(build, boot_files)
    except ArtifactMismatch as exc:
        raise Refused(f"{exc.message}; refusing to publish it", hint=exc.hint) from None
    expected: dict[str, FileInfo] = {}
    files: dict[str, Source] = {}
    for name in boot_files:
        meta = manifest.artifacts[name]
        files[name] = build / name
        expected[name] = FileInfo(sha256=meta.sha256, size=meta.size)
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


def gate(manifest: Manifest, data: bytes | None, where: Path) -> tuple[ReportInfo | None, list[str]]:
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
    want = manifest.image.sha256
    built_from = manifest.policy  # load() refuses a manifest without one
    identity = report.target.identity
    objections = []
    if not report.passed:
        # Incomplete is no pass either: a claim not proved on the image is not shipped as proved.
        short = report.failed or report.not_proved
        objections.append(
            f"the verification report's verdict is {report.verdict} "
            f"({', '.join(f'{c.id} {c.status}' for c in short)})"
        )
    if identity.image_sha256 != want:
        objections.append(
            f"the verification report is for image {str(identity.image_sha256)[:16]}, "
            f"not this build's {want[:16]}"
        )
    if identity.manifest_sha256_matches is False:
        objections.append("the verification report says the served files did not match the manifest")
    if built_from is None or report.policy.sha256 != built_from.sha256:
        was = f"{built_from.id} ({built_from.sha256[:12]})" if built_from else "no policy"
        objections.append(
            f"the verification report judged policy {report.policy.id} ({report.policy.sha256[:12]}), "
            f"the image was built from {was}"
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


def _manifest(data: bytes, where: Path) -> Manifest:
    """The manifest in `data`, which must name the policy its image was built from."""
    try:
        manifest = Manifest.parse(data, where)
    except IdentityMismatch:
        raise Refused(
            f"{where}: image.sha256 is not the sha256 of initrd.img; refusing to publish it"
        ) from None
    _policy(manifest, where)
    return manifest


def _policy(manifest: Manifest, where: Path) -> PolicyRef:
    if manifest.policy is None:
        raise UsageError(f"{where}: not an amnesiac manifest (policy: Field required)")
    return manifest.policy


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
