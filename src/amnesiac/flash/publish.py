"""Publish, list, roll back and prune the versions of a PXE root.

A publish, in order, under the root's lock: check the build (artifacts against manifest.json,
the signature against the allowed signers, the verification report against the manifest), copy
into .staging/, hash the copy against manifest.json, rename it into versions/<version>/, then
switch the entry point by renaming a new boot.ipxe over the old. Killed at any point before that
last rename, the root still serves the previous image, whole; the next flash sweeps up.

A version is named by all of its files (`model.version_id`), so a build whose initrd.img is the
current one's but whose boot.ipxe, kernel, manifest, signature or report differ is published as
a new version; "already current" means every file served is the same.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import socket
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from amnesiac.errors import UsageError
from amnesiac.flash import signing
from amnesiac.flash.candidate import Candidate, check_signature
from amnesiac.flash.identities import IdentitySet, hosts_of
from amnesiac.flash.model import (
    ALLOWED_SIGNERS,
    IDENTITIES,
    INDEX,
    MANIFEST,
    RECORD,
    ROOT_SCRIPT,
    SIGNATURE,
    UKI,
    VERSIONS,
    FileInfo,
    FlashError,
    PublishRecord,
    Refused,
    ReportInfo,
    SignatureInfo,
    State,
    now,
    os_error,
    parse_record,
    parse_root_script,
    root_script,
    version_id,
)
from amnesiac.flash.store import Snapshot, Source, Store
from amnesiac.progress import Progress

DEFAULT_KEEP = 3
DEFAULT_LOCK_TIMEOUT = 300.0


def operator() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


@dataclass(frozen=True)
class Version:
    """One directory of versions/, with its publish record when it is readable."""

    name: str
    record: PublishRecord | None
    problem: str | None = None  # why the record cannot be read, or the files do not match it
    current: bool = False
    previous: bool = False

    @property
    def damaged(self) -> bool:
        """Not a whole version: no readable record, or (once checked) files that differ from it."""
        return self.problem is not None

    def as_dict(self) -> dict[str, object]:
        record = self.record
        return {
            "version": self.name,
            "image": record.image_sha256 if record else None,
            "current": self.current,
            "previous": self.previous,
            "damaged": self.damaged,
            "policy": record.policy_id if record else None,
            "built": record.built if record else None,
            "published": record.published if record else None,
            "published_by": record.published_by if record else None,
            "serial": record.serial if record else None,
            "report": record.report.model_dump() if record and record.report else None,
            "report_passed": bool(record and record.report and record.report.passed),
            "signature": record.signature.model_dump() if record and record.signature else None,
            "forced": record.forced if record else [],
            "problem": self.problem,
        }


@dataclass(frozen=True)
class Listing:
    root: str
    exists: bool
    state: State | None
    versions: list[Version]  # newest publish first; unreadable ones last
    checked: bool = False  # every version's files were hashed against its record
    identity_sets: dict[str, list[str] | None] = field(default_factory=dict)  # set -> its hosts

    def as_dict(self) -> dict[str, object]:
        return {
            "root": self.root,
            "current": self.state.current if self.state else None,
            "previous": self.state.previous if self.state else None,
            "identities": self.state.identities if self.state else None,
            "state": self.state.model_dump() if self.state else None,
            "checked": self.checked,
            "versions": [v.as_dict() for v in self.versions],
            "identity_sets": [
                {
                    "set": name,
                    "hosts": hosts,
                    "current": bool(self.state and self.state.identities == name),
                    "previous": bool(self.state and self.state.previous_identities == name),
                }
                for name, hosts in self.identity_sets.items()
            ],
        }


@dataclass(frozen=True)
class Outcome:
    """What a publish, rollback or prune did."""

    action: str
    root: str
    version: str | None = None
    previous: str | None = None
    switched: bool = False
    copied: bool = False
    pruned: list[str] = field(default_factory=list)
    forced: list[str] = field(default_factory=list)
    signer: SignatureInfo | None = None
    report: ReportInfo | None = None
    image: str | None = None  # the image sha256 (of initrd.img) the version holds
    identities: str | None = None  # the identity set machines load now
    identities_signer: SignatureInfo | None = None
    hosts: list[str] = field(default_factory=list)  # the hosts of an identity set just published

    def as_dict(self) -> dict[str, object]:
        return {
            "action": self.action,
            "root": self.root,
            "version": self.version,
            "image": self.image,
            "previous": self.previous,
            "switched": self.switched,
            "copied": self.copied,
            "pruned": self.pruned,
            "forced": self.forced,
            "signature": self.signer.model_dump() if self.signer else None,
            "report": self.report.model_dump() if self.report else None,
            "identities": self.identities,
            "identities_signature": self.identities_signer.model_dump() if self.identities_signer else None,
            "hosts": self.hosts,
        }


# --- reading a root -----------------------------------------------------------------------------


def listing(store: Store, *, check: bool = False) -> Listing:
    """What the root holds; `check`: hash every version's files against its publish record."""
    snap = store.snapshot()
    if not snap.exists:
        raise UsageError(f"{store.label}: no such PXE root", hint="check --to")
    return _listing(store, snap, check=check)


def _listing(store: Store, snap: Snapshot, *, check: bool = False) -> Listing:
    state = _state(store, snap)
    versions = []
    for name, data in snap.records.items():
        where = f"{store.label}/{VERSIONS}/{name}"
        record, problem = None, None
        if data is None:
            problem = "no publish.json"
        else:
            try:
                record = parse_record(data, where)
                # Named by its files; or, published before that was so, by its image.
                if name not in {version_id(record.files), record.image_sha256}:
                    record, problem = None, "publish.json is another version's"
            except FlashError as exc:
                problem = exc.message
        if check and record is not None and (damage := _damage(store, name, record)):
            problem = f"damaged: {damage}"
        versions.append(
            Version(
                name,
                record,
                problem,
                current=bool(state and state.current == name),
                previous=bool(state and state.previous == name),
            )
        )
    versions.sort(key=lambda v: -(v.record.serial if v.record else 0))
    sets = {name: hosts_of(index) for name, index in snap.sets.items()}
    return Listing(store.label, snap.exists, state, versions, checked=check, identity_sets=sets)


def _damage(store: Store, name: str, record: PublishRecord) -> str | None:
    """What differs between versions/<name> as stored and its publish record; None: nothing."""
    found = store.hashes(f"{VERSIONS}/{name}", sorted(record.files))
    missing = [n for n in record.files if n not in found]
    changed = [n for n, want in record.files.items() if n in found and found[n] != want]
    parts = [
        f"{', '.join(names)} {what}" for names, what in ((changed, "changed"), (missing, "missing")) if names
    ]
    return "; ".join(parts) or None


def _state(store: Store, snap: Snapshot) -> State | None:
    if snap.script is None:
        return None
    return parse_root_script(snap.script.decode(errors="replace"), f"{store.label}/{ROOT_SCRIPT}")


def _foreign(snap: Snapshot, state: State | None) -> bool:
    """A boot.ipxe is there that flash did not write (a build copied by hand)."""
    return snap.script is not None and state is None


def allowed_signers(store: Store | None, given: Path | None) -> tuple[bytes | None, str]:
    """The allowed-signers file in force and where it came from: --allowed-signers, else the root's."""
    if given is not None:
        try:
            return given.read_bytes(), str(given)
        except OSError as exc:
            raise UsageError(f"--allowed-signers {given}: cannot read it ({exc.strerror})") from None
    if store is None:
        return None, "no --allowed-signers given"
    data = store.read(ALLOWED_SIGNERS)
    where = f"{store.label}/{ALLOWED_SIGNERS}"
    return data, where if data is not None else f"none at {where}, no --allowed-signers given"


# --- publish ------------------------------------------------------------------------------------


def admit(candidate: Candidate, allowed: bytes | None, source: str, *, force: bool) -> Candidate:
    """Signature and gate: the candidate, signed and judged; Refused unless it passes or is forced."""
    candidate = check_signature(candidate, allowed, source)
    if candidate.objections and not force:
        more = len(candidate.objections) - 1
        raise Refused(
            f"refusing to publish {candidate.build}: {candidate.objections[0]}"
            + (f" (and {more} more)" if more else ""),
            hint="--force publishes it anyway, and records that it was forced",
        )
    return candidate


def publish(
    store: Store,
    candidate: Candidate | None,
    progress: Progress,
    *,
    identities: IdentitySet | None = None,
    force: bool = False,
    keep: int = DEFAULT_KEEP,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
) -> Outcome:
    """Publish an admitted candidate and/or an identity set and make them current, in one switch;
    prune beyond `keep`. Identities alone (a rotation) keep the current image."""
    forced = list(candidate.objections) if candidate else []
    if candidate is None:  # identities alone: checked before the lock, which would create the root
        _must_have_image(store, store.snapshot())
    with _locked(store, progress, lock_timeout):
        snap = store.snapshot()
        state = _state(store, snap)
        if _foreign(snap, state):
            objection = f"{store.label}/{ROOT_SCRIPT} was not written by amnesiac flash"
            if not force:
                raise Refused(objection, hint="move it away, or --force to replace it (no rollback to it)")
            forced.append(objection)
        store.tidy()
        current = _listing(store, snap)
        copied = False
        if candidate is not None:
            placed = _place_version(store, snap, current, candidate, forced=forced, progress=progress)
            version, copied = placed
        else:
            version = _must_have_image(store, snap)
        image = candidate.image_sha256 if candidate else _image(current, version)
        identity_set = state.identities if state else None
        if identities is not None:
            identity_set = _place_identities(store, snap, state, identities, progress)
        switched = False
        previous = state.current if state else None
        with progress.stage("switch", f"Switch {store.label}/{ROOT_SCRIPT}") as stage:
            if state is not None and (state.current, state.identities) == (version, identity_set):
                stage.note = f"{version[:12]} is already current" + (
                    f", with identities {identity_set[:12]}" if identity_set else ""
                )
            else:
                image_changed = state is None or state.current != version
                identities_changed = identity_set != (state.identities if state else None)
                new = State(
                    current=version,
                    previous=previous if image_changed else (state.previous if state else None),
                    action="publish" if image_changed else "identities",
                    switched=now(),
                    by=operator(),
                    identities=identity_set,
                    previous_identities=(
                        (state.identities if state else None)
                        if identities_changed
                        else (state.previous_identities if state else None)
                    ),
                    uki=UKI in candidate.expected if candidate else bool(state and state.uki),
                )
                _guard(store, "switching boot.ipxe", lambda: store.switch(root_script(new).encode()))
                switched = True
                changes = [f"{(previous or 'nothing')[:12]} -> {version[:12]}"] if image_changed else []
                if identities_changed:
                    old = (state.identities if state else None) or "none"
                    changes.append(f"identities {old[:12]} -> {(identity_set or 'none')[:12]}")
                stage.note = "; ".join(changes)
        _log(
            store,
            "publish" if candidate is not None else "identities",
            version,
            image=image,
            previous=previous if switched and candidate is not None else None,
            forced=forced,
            signer=candidate.signer if candidate else None,
            identities=identity_set if identities is not None else None,
            identities_signer=identities.signer if identities else None,
        )
        pruned = _prune(store, keep)
    image_switched = switched and (state is None or state.current != version)
    return Outcome(
        "publish" if candidate is not None else "identities",
        store.label,
        version,
        previous if image_switched else (state.previous if state else None),
        switched,
        copied,
        pruned,
        forced,
        candidate.signer if candidate else None,
        candidate.report if candidate else None,
        image=image,
        identities=identity_set,
        identities_signer=identities.signer if identities else None,
        hosts=sorted(identities.overlays) if identities else [],
    )


def _must_have_image(store: Store, snap: Snapshot) -> str:
    """The current version, for identities published alone; a UsageError when there is none."""
    state = _state(store, snap) if snap.exists else None
    if state is None:
        raise UsageError(
            f"{store.label}: no image published by amnesiac flash there; publish one with its "
            "identities: amnesiac flash BUILD_DIR --identities DIR --to PXE_ROOT"
        )
    return state.current


def _place_version(
    store: Store,
    snap: Snapshot,
    current: Listing,
    candidate: Candidate,
    *,
    forced: list[str],
    progress: Progress,
) -> tuple[str, bool]:
    """versions/<version> holding the candidate, whole: found there, or copied in; and whether copied."""
    version = candidate.version
    with progress.stage("copy", f"Copy {version[:12]} (image {candidate.short}) to {store.label}") as stage:
        there = _same(store, current, candidate)
        if there is not None:
            stage.note = f"{VERSIONS}/{there[:12]} already there, whole"
            return there, False
        if version in snap.records:  # damaged and not current: replaced below
            store.remove_version(version)
        serial = max((v.record.serial for v in current.versions if v.record), default=0) + 1
        record = candidate.record(serial=serial, by=operator(), forced=forced)
        _copy_in(store, candidate, record)
        size = sum(f.size for f in candidate.expected.values())
        stage.note = f"{size / 1024**2:.1f} MiB, sha256 checked against manifest.json"
        return version, True


def _place_identities(
    store: Store, snap: Snapshot, state: State | None, identities: IdentitySet, progress: Progress
) -> str:
    """identities/<set> holding the set, whole: found there, or copied in and checked."""
    name = identities.name
    hosts = f"{len(identities.overlays)} host identit{'y' if len(identities.overlays) == 1 else 'ies'}"
    with progress.stage("identities", f"Copy {hosts} to {store.label}") as stage:
        expected = identities.expected
        if name in snap.sets:
            found = store.hashes(f"{IDENTITIES}/{name}", sorted(expected))
            if found == expected:
                stage.note = f"{IDENTITIES}/{name[:12]} already there, whole"
                return name
            if state is not None and state.identities == name:
                raise Refused(
                    f"{store.label}/{IDENTITIES}/{name[:12]} is current but damaged",
                    hint="publish another identity set first; this one is then replaced",
                )
            store.remove_version(name, under=IDENTITIES)
        _copy_checked(
            store, name, identities.files(), expected, into=IDENTITIES, against=INDEX, what="the identity set"
        )
        signed = f"signed by {identities.signer.principal}" if identities.signer else "unsigned"
        stage.note = f"{IDENTITIES}/{name[:12]}, {signed}"
        return name


def _same(store: Store, current: Listing, candidate: Candidate) -> str | None:
    """The version already holding exactly the candidate's files, whole; None when there is none.

    It is versions/<candidate.version>, or on a root published before versions were named by
    their files, versions/<image sha256> with the same files (the current one first).
    """
    same = [
        v
        for v in current.versions
        if v.name == candidate.version or (v.record is not None and v.record.files == candidate.expected)
    ]
    for entry in sorted(same, key=lambda v: not v.current):
        if _intact(store, current, entry.name):
            return entry.name
    return None


def _copy_in(store: Store, candidate: Candidate, record: PublishRecord) -> None:
    data = record.to_bytes()
    files = {**candidate.files, RECORD: data}
    expected = {
        **candidate.expected,
        RECORD: FileInfo(sha256=hashlib.sha256(data).hexdigest(), size=len(data)),
    }
    _copy_checked(
        store, candidate.version, files, expected, into=VERSIONS, against=MANIFEST, what=candidate.short
    )


def _copy_checked(
    store: Store,
    name: str,
    files: Mapping[str, Source],
    expected: Mapping[str, FileInfo],
    *,
    into: str,
    against: str,
    what: str,
) -> None:
    """Stage `files`, hash them where they landed, rename them into `into`/<name>; nothing is
    left in .staging/ on failure. `against` names the file that lists the expected hashes,
    `what` the copy in an error."""
    staging: str | None = None
    try:
        staging = store.stage(name, files)
        found = store.hashes(staging, sorted(expected))
        for file_name, want in expected.items():
            got = found.get(file_name)
            if got != want:
                what = "missing" if got is None else f"sha256 {got.sha256[:16]}, {got.size} bytes"
                raise FlashError(
                    f"{store.label}: the copy of {file_name} does not match {against} ({what}; "
                    f"expected {want.sha256[:16]}, {want.size} bytes); nothing was switched"
                )
        store.checkpoint("staged")
        store.commit(staging, name, into=into)
        staging = None
        store.checkpoint("committed")
    except OSError as exc:
        raise FlashError(
            f"{store.label}: copying {what} failed ({exc.strerror or type(exc).__name__}); "
            "nothing was switched"
        ) from None
    finally:
        if staging is not None:
            with contextlib.suppress(OSError, FlashError):  # else the next flash removes it
                store.discard(staging)


def _intact(store: Store, listing: Listing, version: str) -> bool:
    """Whether versions/<version> holds every file its record lists, unchanged.

    A damaged current version cannot be replaced without a moment where machines find it
    half-there: that is refused; a damaged other version is replaced.
    """
    entry = next(v for v in listing.versions if v.name == version)
    problem = entry.problem
    if entry.record is not None:
        problem = _damage(store, version, entry.record)
    if problem is None:
        return True
    if entry.current:
        raise Refused(
            f"{store.label}/{VERSIONS}/{version[:12]} is current but damaged ({problem})",
            hint="roll back to another version first; it is then replaced by this publish",
        )
    return False


# --- rollback and prune -------------------------------------------------------------------------


def rollback(
    store: Store,
    version: str | None,
    progress: Progress,
    *,
    allowed: tuple[bytes | None, str],
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
) -> Outcome:
    """Switch back to `version` (default: the previous one), checked as it is stored."""
    _must_exist(store)
    _target(store, store.snapshot(), version)  # a rollback that cannot be done touches nothing
    with _locked(store, progress, lock_timeout):
        snap = store.snapshot()
        state, current, target = _target(store, snap, version)
        if target == state.current:
            return Outcome(
                "rollback", store.label, target, state.previous, switched=False, image=_image(current, target)
            )
        with progress.stage("check", f"Check {VERSIONS}/{target[:12]} as stored") as stage:
            entry = next(v for v in current.versions if v.name == target)
            if entry.record is None:
                raise Refused(
                    f"{store.label}/{VERSIONS}/{target[:12]}: {entry.problem}; refusing to switch to it"
                )
            if damage := _damage(store, target, entry.record):
                raise Refused(
                    f"{store.label}/{VERSIONS}/{target[:12]} is damaged ({damage}); refusing to switch to it"
                )
            signer = _stored_signature(store, target, allowed)
            stage.note = f"whole; signed by {signer.principal}" if signer else "whole; no allowed signers"
        with progress.stage("switch", f"Switch {store.label}/{ROOT_SCRIPT}") as stage:
            new = State(
                current=target,
                previous=state.current,
                action="rollback",
                switched=now(),
                by=operator(),
                identities=state.identities,  # a rollback is of the image; the identities stay
                previous_identities=state.previous_identities,
                uki=UKI in entry.record.files,
            )
            _guard(store, "switching boot.ipxe", lambda: store.switch(root_script(new).encode()))
            stage.note = f"{state.current[:12]} -> {target[:12]}"
        _log(
            store, "rollback", target, image=entry.record.image_sha256, previous=state.current, signer=signer
        )
    return Outcome(
        "rollback",
        store.label,
        target,
        state.current,
        switched=True,
        signer=signer,
        image=entry.record.image_sha256,
    )


def _target(store: Store, snap: Snapshot, version: str | None) -> tuple[State, Listing, str]:
    """The state, the versions and the version a rollback goes to; UsageError when there is none."""
    state = _state(store, snap)
    if state is None:
        raise UsageError(f"{store.label}: nothing published by amnesiac flash; nothing to roll back to")
    current = _listing(store, snap)
    target = resolve(current, version) if version else state.previous
    if target is None:
        raise UsageError(f"{store.label}: no previous version is recorded; name one (see --list)")
    if target not in snap.records:
        raise UsageError(
            f"{store.label}: the previous version {target[:12]} is gone (pruned?); name one (see --list)"
        )
    return state, current, target


def _image(current: Listing, version: str) -> str | None:
    entry = next((v for v in current.versions if v.name == version), None)
    return entry.record.image_sha256 if entry and entry.record else None


def _stored_signature(store: Store, version: str, allowed: tuple[bytes | None, str]) -> SignatureInfo | None:
    signers, _ = allowed
    if signers is None:
        return None
    manifest = store.read(f"{VERSIONS}/{version}/{MANIFEST}")
    if manifest is None:
        raise Refused(f"{store.label}/{VERSIONS}/{version[:12]}: no manifest.json")
    signature = store.read(f"{VERSIONS}/{version}/{SIGNATURE}")
    return signing.verify(
        manifest, signature, signers, what=f"{store.label}/{VERSIONS}/{version[:12]}/{MANIFEST}"
    )


def prune(
    store: Store, progress: Progress, *, keep: int = DEFAULT_KEEP, lock_timeout: float = DEFAULT_LOCK_TIMEOUT
) -> Outcome:
    _must_exist(store)
    with _locked(store, progress, lock_timeout):
        store.tidy()
        pruned = _prune(store, keep)
    return Outcome("prune", store.label, pruned=pruned)


def _prune(store: Store, keep: int) -> list[str]:
    """Remove the versions beyond the `keep` newest; never the current or the previous one.

    Identity sets are kept only while the entry point names them (current, or previous for a
    machine that fetched the old boot.ipxe): a rotated key does not linger on the boot server.
    """
    current = listing(store)
    state = current.state
    protected = {state.current, state.previous} if state else set()
    readable = [v for v in current.versions if v.record is not None]  # newest first
    kept = protected | {v.name for v in readable[:keep]}
    doomed = [(VERSIONS, v.name) for v in readable if v.name not in kept]
    named = {state.identities, state.previous_identities} if state else set()
    doomed += [(IDENTITIES, name) for name in current.identity_sets if state and name not in named]
    for under, name in doomed:
        try:
            store.remove_version(name, under=under)
        except OSError as exc:
            raise FlashError(f"{store.label}: pruning {under}/{name[:12]} failed ({os_error(exc)})") from None
    pruned = [name if under == VERSIONS else f"{IDENTITIES}/{name}" for under, name in doomed]
    if pruned:
        _log(store, "prune", None, pruned=pruned)
    return pruned


def check_version(version: str) -> str:
    """A version as --rollback names it: a sha256 or a prefix of at least 4 hex digits."""
    wanted = version.lower()
    if len(wanted) < 4 or len(wanted) > 64 or any(c not in "0123456789abcdef" for c in wanted):
        raise UsageError(
            f"--rollback {version!r}: name a version, or an image, by its sha256 or a prefix of "
            "at least 4 hex digits (see --list)"
        )
    return wanted


def resolve(current: Listing, version: str) -> str:
    """A version named by its name, or the image it holds, or an unambiguous prefix of either."""
    wanted = check_version(version)
    matches = [v.name for v in current.versions if v.name.startswith(wanted)]
    if not matches:  # by image: the sha256 that `amnesiac build` and `verify` print
        matches = [v.name for v in current.versions if v.record and v.record.image_sha256.startswith(wanted)]
    if not matches:
        raise UsageError(f"{current.root}: no version {version} (see --list)")
    if len(matches) > 1:
        raise UsageError(
            f"--rollback {version}: ambiguous, matches versions {', '.join(m[:12] for m in matches)}"
        )
    return matches[0]


# --- helpers ------------------------------------------------------------------------------------


def _must_exist(store: Store) -> None:
    """Rollback and prune never create a root (taking the lock would)."""
    if not store.snapshot().exists:
        raise UsageError(f"{store.label}: no such PXE root", hint="check --to")


@contextmanager
def _locked(store: Store, progress: Progress, timeout: float) -> Iterator[None]:
    """Hold the root's lock; an OSError inside (permissions, a full disk) becomes one line."""

    def waiting(holder: str) -> None:
        if not progress.quiet:
            progress.console.print(f"waiting for the lock on {store.label}, held by {holder}", soft_wrap=True)

    try:
        with store.locked(timeout, waiting):
            yield
    except OSError as exc:
        raise FlashError(f"{store.label}: {os_error(exc)}") from None


def _guard(store: Store, what: str, action: Callable[[], None]) -> None:
    try:
        action()
    except OSError as exc:
        raise FlashError(f"{store.label}: {what} failed ({os_error(exc)})") from None


def _log(
    store: Store,
    action: str,
    version: str | None,
    *,
    image: str | None = None,
    previous: str | None = None,
    forced: list[str] | None = None,
    signer: SignatureInfo | None = None,
    pruned: list[str] | None = None,
    identities: str | None = None,
    identities_signer: SignatureInfo | None = None,
) -> None:
    entry: dict[str, object] = {"at": now(), "by": operator(), "action": action}
    if version:
        entry["version"] = version
    if image:
        entry["image"] = image
    if previous:
        entry["previous"] = previous
    if forced:
        entry["forced"] = forced
    if signer:
        entry["signed_by"] = f"{signer.principal} ({signer.key})"
    if pruned:
        entry["pruned"] = pruned
    if identities:
        entry["identities"] = identities
    if identities_signer:
        entry["identities_signed_by"] = f"{identities_signer.principal} ({identities_signer.key})"
    # The audit trail is a convenience: the switch has happened and publish.json records it.
    with contextlib.suppress(OSError, FlashError):
        store.append_log(json.dumps(entry))
