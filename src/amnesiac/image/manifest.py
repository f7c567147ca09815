"""manifest.json: what the image is, where it came from, and the hashes that identify it.

`write` makes it at the end of a build; `Manifest.load` is the one reader (boot, flash, verify
and the CLI), a frozen model that validates what it reads and, when asked, checks the
artifacts on disk against it.
"""

from __future__ import annotations

import json
import platform
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from amnesiac import __version__
from amnesiac.errors import AmnesiacError, UsageError
from amnesiac.image.hashing import sha256_file
from amnesiac.run import run

if TYPE_CHECKING:  # the readers of a manifest need no build plan (nor the policy behind it)
    from amnesiac.image.plan import BuildPlan

NAME = "manifest.json"
ARTIFACTS = ("vmlinuz", "initrd.img", "boot.ipxe")
FORMAT: Literal[1] = 1

Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class ArtifactMismatch(AmnesiacError):
    """A file of the build is not the file manifest.json lists (changed, truncated, swapped)."""


class IdentityMismatch(UsageError):
    """manifest.json's image.sha256 is not the sha256 it lists for initrd.img.

    `Manifest.parse` raises it with the message of any other malformed manifest; it is a
    UsageError like them, told apart for callers that refuse such a build (flash).
    """


class _NotTheInitrd(ValueError):
    pass


# --- the model ----------------------------------------------------------------------------------


class _Model(BaseModel):
    # Unknown fields are kept out, not refused: a newer amnesiac may add some, and the bytes are
    # what a signature covers, not this model.
    model_config = ConfigDict(frozen=True, extra="ignore")


class Artifact(_Model):
    sha256: Sha256
    size: int = Field(ge=0)


class InitrdPiece(_Model):
    """Where one archive lies in initrd.img (pack.unpack_initrd reads them)."""

    name: str
    offset: int = Field(ge=0)
    size: int = Field(ge=0)
    compression: str


class ImageInfo(_Model):
    # The image's identity: the sha256 of the initrd that holds the whole root filesystem.
    sha256: Sha256
    cmdline: str
    kernel_release: str = ""
    root_tmpfs_size_bytes: int = 0
    root_unpacked_bytes: int = 0
    root_entries: int = 0
    initrd_pieces: list[InitrdPiece] = Field(default_factory=list)
    profile: Literal["release", "development"] = "release"  # before 2026-12-02, every build


class PolicyRef(_Model):
    id: str
    sha256: Sha256
    file: str = ""
    claims: list[str] = Field(default_factory=list)  # the technical claims, by id


class DebianInfo(_Model):
    suite: str
    mirror: str
    release_date: str


class RoleVars(_Model):
    name: str
    vars: dict[str, Any]


class Package(_Model):
    name: str
    version: str
    architecture: str


class MeasuredBoot(_Model):
    """The unified kernel image (image/uki.py) and what the TPM will hold after booting it."""

    file: str  # in `artifacts` too
    pcr11_sha256: Sha256  # after systemd-stub measured its sections (image/measure.py)
    pcr12_sha256: Sha256  # no loader command line, credential or add-on: all zeros
    phases: list[str] = Field(default_factory=list)  # systemd-pcrphase's words in PCR 11: none
    sections: dict[str, Sha256] = Field(default_factory=dict)  # measured section -> its sha256
    stub: str = ""  # the systemd-boot-efi version the stub came from
    signed_by: Sha256 | None = None  # Secure Boot: sha256 of the signing certificate's DER


class Manifest(_Model):
    format: Literal[1] = FORMAT
    image: ImageInfo
    artifacts: dict[str, Artifact]
    policy: PolicyRef | None = None
    debian: DebianInfo | None = None
    roles: list[RoleVars] = Field(default_factory=list)
    packages: list[Package] = Field(default_factory=list)
    source_date_epoch: int | None = None
    built: str = ""
    tools: dict[str, str] = Field(default_factory=dict)
    measured_boot: MeasuredBoot | None = None  # builds before 2026-12-02 have none

    @model_validator(mode="after")
    def _complete(self) -> Manifest:
        if missing := [n for n in ARTIFACTS if n not in self.artifacts]:
            raise ValueError(f"artifacts: {', '.join(missing)} not listed")
        if self.measured_boot and self.measured_boot.file not in self.artifacts:
            raise ValueError(f"artifacts: {self.measured_boot.file} (measured_boot.file) not listed")
        if self.image.sha256 != self.artifacts["initrd.img"].sha256:
            raise _NotTheInitrd("image.sha256 is not the sha256 of initrd.img")
        return self

    @classmethod
    def parse(cls, data: bytes | str, where: Path) -> Manifest:
        """A manifest from its bytes; anything else is a one-line usage error naming `where`."""
        try:
            return cls.model_validate_json(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or "manifest"
            cause = first.get("ctx", {}).get("error")
            error = IdentityMismatch if isinstance(cause, _NotTheInitrd) else UsageError
            raise error(f"{where}: not an amnesiac manifest ({field}: {first['msg']})") from None

    @classmethod
    def load(cls, build_dir: Path, *, verify_artifacts: bool | tuple[str, ...] = False) -> Manifest:
        """Read `build_dir`/manifest.json; with `verify_artifacts` (True: every artifact, or the
        names given) check each file's sha256 and size first (ArtifactMismatch)."""
        if not build_dir.is_dir():
            raise UsageError(f"{build_dir}: no such build directory", hint="run `amnesiac build` first")
        path = build_dir / NAME
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise UsageError(f"{path}: missing; {build_dir} is not a finished build") from None
        except OSError as exc:
            raise UsageError(f"{path}: cannot read it ({exc.strerror})") from None
        manifest = cls.parse(data, path)
        if isinstance(verify_artifacts, tuple):
            manifest.check_artifacts(build_dir, verify_artifacts)
        elif verify_artifacts:
            manifest.check_artifacts(build_dir, ARTIFACTS)
        return manifest

    def check_artifacts(self, build_dir: Path, names: tuple[str, ...] = ARTIFACTS) -> None:
        """Each named file in `build_dir` is the one listed: sha256 and size (ArtifactMismatch)."""
        for name in names:
            path = build_dir / name
            if name not in self.artifacts:
                raise ArtifactMismatch(f"{build_dir / NAME} does not list {name}")
            if not path.is_file():
                raise UsageError(f"{path}: missing; {build_dir} is not a complete build")
            want = self.artifacts[name]
            actual = sha256_file(path)
            if actual != want.sha256 or path.stat().st_size != want.size:
                raise ArtifactMismatch(
                    f"{path} does not match manifest.json "
                    f"(sha256 {actual[:16]}, manifest {want.sha256[:16]})",
                    hint="rebuild, or restore the artifact that changed",
                )

    @property
    def sha256(self) -> str:
        """The image's identity (initrd.img's sha256)."""
        return self.image.sha256


# --- writing it ---------------------------------------------------------------------------------


def installed_packages(root: Path) -> list[dict[str, str]]:
    out = run(
        [
            "dpkg-query",
            f"--admindir={root / 'var/lib/dpkg'}",
            "-W",
            "-f",
            "${Package}\t${Version}\t${Architecture}\n",
        ],
        capture=True,
    )
    rows = [line.split("\t") for line in out.stdout.decode().splitlines() if line]
    return [{"name": n, "version": v, "architecture": a} for n, v, a in sorted(rows)]


def _version(cmd: list[str]) -> str:
    try:
        out = run(cmd, capture=True, check=False).stdout.decode(errors="replace").strip()
    except FileNotFoundError:
        return "missing"
    return out.splitlines()[0] if out else "unknown"


def tool_versions() -> dict[str, str]:
    def dist(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "missing"

    return {
        "amnesiac": __version__,
        "python": platform.python_version(),
        "ansible-core": dist("ansible-core"),
        "ansible": dist("ansible"),
        "ansible-runner": dist("ansible-runner"),
        "mmdebstrap": _version(["mmdebstrap", "--version"]).split()[-1],
        "zstd": _version(["zstd", "--version"]),
    }


def write(
    out: Path,
    *,
    plan: BuildPlan,
    root: Path,
    kernel_release: str,
    cmdline: str,
    source_date_epoch: int,
    release_date: str,
    root_unpacked_bytes: int,
    root_entries: int,
    tmpfs_size_bytes: int,
    initrd_pieces: list[dict[str, Any]],
    profile: str,
    measured_boot: dict[str, Any] | None = None,
    tools: dict[str, str] | None = None,
) -> Manifest:
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "image": {
            # The image's identity: the sha256 of the initrd that holds the whole root filesystem.
            "sha256": sha256_file(out / "initrd.img"),
            "kernel_release": kernel_release,
            "cmdline": cmdline,
            "root_tmpfs_size_bytes": tmpfs_size_bytes,
            "root_unpacked_bytes": root_unpacked_bytes,
            "root_entries": root_entries,
            # Where the early init and the root archive lie in initrd.img (pack.unpack_initrd).
            "initrd_pieces": initrd_pieces,
            # How the root archive was packed (pack.Profile): flash publishes "release" only.
            "profile": profile,
        },
        "artifacts": {
            name: {"sha256": sha256_file(out / name), "size": (out / name).stat().st_size}
            for name in (*ARTIFACTS, *([measured_boot["file"]] if measured_boot else []))
        },
        "policy": {
            "id": plan.policy.id,
            "file": plan.policy.path.name,
            "sha256": plan.policy.sha256,
            "claims": [c.id for c in plan.policy.technical_claims()],
        },
        "debian": {
            "suite": plan.suite,
            "mirror": plan.mirror,
            "release_date": release_date,
        },
        "roles": [{"name": name, "vars": values} for name, values in plan.effective_vars().items()],
        "packages": installed_packages(root),
        "source_date_epoch": source_date_epoch,
        "built": datetime.fromtimestamp(source_date_epoch, UTC).isoformat(),
        "tools": {**tool_versions(), **(tools or {})},
        **({"measured_boot": measured_boot} if measured_boot else {}),
    }
    text = json.dumps(manifest, indent=2, sort_keys=False) + "\n"
    model = Manifest.parse(text, out / NAME)  # what we write, we can read
    (out / NAME).write_text(text)
    return model
