"""The PXE root's layout, its one piece of state (the root boot.ipxe) and what flash records.

```
PXE_ROOT/
  boot.ipxe                 the entry point machines netboot: chains versions/<version>/boot.ipxe;
                            its comment line holds the state (current, previous); replaced
                            only by an atomic rename
  identities/<set>/         (optional) one published identity set (flash/identities.py), never
                            modified, named by its files like a version:
    <mac>.cpio              one machine's identity overlay (52-54-00-12-34-56.cpio)
    identities.json         every overlay's sha256 and the files it delivers
    identities.json.sig     the OpenSSH signature of identities.json (when signed)
  versions/<version>/       one published version, never modified, named by its content (below):
    vmlinuz initrd.img boot.ipxe manifest.json   the build's files, checked against manifest.json
    manifest.json.sig       the OpenSSH signature of manifest.json (when signed)
    report.json             the `amnesiac verify` report it was published with (when attached)
    publish.json            who published it, when, the signer, the gate's verdict, --force
  allowed_signers           (optional) OpenSSH allowed-signers: every publish must be signed
  flash.log                 one JSON line per publish, rollback and prune (an audit trail)
  .flash.lock               flock(2) lock that serialises flashes to this root
  .staging/ .trash/         a publish's copy in progress / a pruned version being removed
```
A version's name is the sha256 of the `sha256sum` lines of its files but publish.json, sorted
by name (`version_id`): one image (initrd.img, whose sha256 is the image's) published with
another boot.ipxe, kernel, manifest, signature or report is another version, and republishing
the very same files finds the version already there. (Roots published before this was so name
versions by their image sha256; those are still read, rolled back to and pruned.)

A version appears in versions/ only complete and checked (renamed from .staging/), and the
entry point names versions by hash, so a machine that fetched the old boot.ipxe goes on
fetching the old version's files even while a publish switches: never a mix. The same holds for
identity sets: the entry point loads `identities/<set>/${mac:hexhyp}.cpio` (a machine without
one says so on its console and boots to serve no one), and a set is switched with the image, or
alone to rotate keys, by the same rename of boot.ipxe.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from amnesiac.errors import AmnesiacError, ExitCode

ROOT_SCRIPT = "boot.ipxe"
VERSIONS = "versions"
IDENTITIES = "identities"
INDEX = "identities.json"  # an identity set's list of overlays (what its signature covers)
INDEX_SIGNATURE = "identities.json.sig"
STAGING = ".staging"
TRASH = ".trash"
LOCK = ".flash.lock"
LOG = "flash.log"
ALLOWED_SIGNERS = "allowed_signers"
MANIFEST = "manifest.json"
SIGNATURE = "manifest.json.sig"
REPORT = "report.json"
RECORD = "publish.json"
BOOT_FILES = ("vmlinuz", "initrd.img", "boot.ipxe")  # listed with their sha256 in manifest.json
UKI = "amnesiac.efi"  # the unified kernel image, published too when the build has one (UEFI machines)
STATE_MARK = "# amnesiac-flash-state: "
FORMAT: Literal[1] = 1

HASH = re.compile(r"^[0-9a-f]{64}$")
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class FlashError(AmnesiacError):
    """A publish, rollback or prune could not be done; the PXE root still serves what it did."""


class Refused(FlashError):
    """The image is not fit to publish: no passing report, a bad signature, a changed artifact."""

    exit_code = ExitCode.REFUSED


class LockBusy(FlashError):
    """Another flash held the root's lock for longer than --lock-timeout."""

    exit_code = ExitCode.LOCKED  # EX_TEMPFAIL: try again later


def os_error(exc: OSError) -> str:
    """An OSError in words, naming the file: `/srv/pxe/versions: Permission denied`."""
    why = exc.strerror or type(exc).__name__
    paths = [p for p in (exc.filename, exc.filename2) if p is not None]
    where = " -> ".join(os.fsdecode(p) if isinstance(p, bytes) else str(p) for p in paths)
    return f"{where}: {why}" if where else why


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class State(_Model):
    """What the root's boot.ipxe selects; the only mutable state of a PXE root."""

    current: Sha256
    previous: Sha256 | None = None
    action: Literal["publish", "rollback", "identities"]
    switched: str  # ISO 8601, UTC
    by: str  # user@host of the flash that switched
    identities: Sha256 | None = None  # the identity set machines load, if any
    previous_identities: Sha256 | None = None  # the one before it (kept until the next switch)
    uki: bool = False  # the current version holds amnesiac.efi: UEFI machines chain it


def identity_line(identities: str) -> str:
    """The entry point's line that loads this machine's identity, or says on its console why not."""
    return (
        f"initrd {IDENTITIES}/{identities}/${{mac:hexhyp}}.cpio || "
        f"echo amnesiac: no identity for ${{mac}} in {IDENTITIES}/{identities[:12]}: "
        "this server will serve no one"
    )


def root_script(state: State) -> str:
    """The entry point: a comment carrying the state, the identity, a chain into the current version.

    iPXE keeps the identity overlay it loaded across `chain` and hands it to the kernel before
    initrd.img (boot/overlay.py): the image's early init copies it over the root. When the
    version holds a UKI, a machine that booted iPXE under UEFI chains that instead: measured by
    the firmware and the stub, started only if its signature is in the firmware's db (Secure
    Boot), and given no overlay (a UKI takes none; its identity comes by release, docs/
    attestation.md). A failed `chain` ends the script: a UEFI machine never falls back to the
    unmeasured kernel.
    """
    identity = f"{identity_line(state.identities)}\n" if state.identities else ""
    uefi = "iseq ${platform} efi && goto uefi ||\n" if state.uki else ""
    uki = f":uefi\n{uki_line(state.current)}\n" if state.uki else ""
    return (
        "#!ipxe\n"
        "# Written by `amnesiac flash`, replaced atomically on every publish and rollback: do not edit.\n"
        f"{STATE_MARK}{state.model_dump_json()}\n"
        f"{uefi}"
        f"{identity}"
        f"chain {VERSIONS}/{state.current}/boot.ipxe\n"
        f"{uki}"
    )


def uki_line(version: str) -> str:
    return f"chain {VERSIONS}/{version}/{UKI}"


def parse_root_script(text: str, where: str) -> State | None:
    """The state in a root boot.ipxe; None when the script was not written by flash."""
    lines = text.splitlines()
    mark = [ln for ln in lines if ln.startswith(STATE_MARK)]
    if not lines or lines[0].strip() != "#!ipxe" or len(mark) != 1:
        return None
    try:
        state = State.model_validate_json(mark[0].removeprefix(STATE_MARK))
    except ValidationError as exc:
        raise FlashError(f"{where}: unreadable flash state ({_first_error(exc)})") from None
    if f"chain {VERSIONS}/{state.current}/boot.ipxe" not in lines:
        raise FlashError(f"{where}: its chain line does not name the current version {state.current[:12]}")
    if state.identities and identity_line(state.identities) not in lines:
        raise FlashError(f"{where}: it does not load the identity set {state.identities[:12]} it names")
    if state.uki and uki_line(state.current) not in lines:
        raise FlashError(f"{where}: it does not chain the current version's {UKI} under UEFI")
    return state


class FileInfo(_Model):
    sha256: Sha256
    size: int = Field(ge=0)


def version_id(files: Mapping[str, FileInfo]) -> str:
    """The name of the version that holds `files` (every file of it but publish.json).

    The sha256 of their `sha256sum` lines sorted by name, so that on the boot server
    `cd versions/V && ls | grep -vx publish.json | LC_ALL=C sort | xargs sha256sum | sha256sum`
    prints V.
    """
    lines = "".join(f"{files[name].sha256}  {name}\n" for name in sorted(files))
    return hashlib.sha256(lines.encode()).hexdigest()


class SignatureInfo(_Model):
    """Who signed manifest.json: the allowed-signers principal and the key's fingerprint."""

    principal: str
    key: str  # "ED25519 SHA256:..."
    namespace: str
    allowed_signers_sha256: Sha256


class ReportInfo(_Model):
    """The verification report a version was published with, as the gate read it."""

    verdict: str
    generated: str
    target: str
    image_sha256: str | None
    passed: bool  # the gate accepted it: a pass, for this image and policy


class PublishRecord(_Model):
    """versions/<version>/publish.json: what was published, by whom, and on what evidence."""

    format: Literal[1] = FORMAT
    image_sha256: Sha256
    serial: int = Field(ge=1)  # publish order within this root
    published: str
    published_by: str
    policy_id: str
    policy_sha256: str
    built: str
    source_date_epoch: int | None = None
    kernel_release: str
    files: dict[str, FileInfo]  # every file of the version but publish.json itself (its name)
    report: ReportInfo | None = None
    signature: SignatureInfo | None = None
    forced: list[str] = Field(default_factory=list)  # the gate's objections --force overrode

    def to_bytes(self) -> bytes:
        return (json.dumps(self.model_dump(mode="json"), indent=2) + "\n").encode()


def parse_record(data: bytes, where: str) -> PublishRecord:
    try:
        return PublishRecord.model_validate_json(data)
    except ValidationError as exc:
        raise FlashError(f"{where}: not a publish record ({_first_error(exc)})") from None


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    return f"{loc}: {err['msg']}" if loc else str(err["msg"])
