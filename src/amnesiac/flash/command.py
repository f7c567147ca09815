"""`amnesiac flash`: which action the options ask for, and what it prints.

Bad input costs nothing: the options, --to, BUILD_DIR and its manifest.json, --report and the
--sign key are all checked before anything is signed, locked or copied (UsageError, exit 2).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from amnesiac.errors import UsageError
from amnesiac.flash import candidate as candidates
from amnesiac.flash import identities, signing
from amnesiac.flash import publish as ops
from amnesiac.flash.model import INDEX, INDEX_SIGNATURE, MANIFEST, FlashError, os_error
from amnesiac.flash.store import Store, open_store
from amnesiac.progress import Progress


@dataclass(frozen=True)
class FlashOptions:
    build: Path | None = None
    to: str | None = None
    usb: Path | None = None
    list: bool = False
    rollback: str | None = None  # "" : the previous version
    prune: bool = False
    check: bool = False
    keep: int = ops.DEFAULT_KEEP
    report: Path | None = None
    force: bool = False
    sign: Path | None = None
    allowed_signers: Path | None = None
    ssh_config: Path | None = None
    ssh_key: Path | None = None
    lock_timeout: float = ops.DEFAULT_LOCK_TIMEOUT
    json: bool = False
    identities: Path | None = None  # a directory of per-host identities (flash/identities.py)


def action(options: FlashOptions) -> str:
    """publish, list, rollback, prune, check, usb or sign; a UsageError for a muddle."""
    chosen = [
        name
        for name, on in (
            ("list", options.list),
            ("rollback", options.rollback is not None),
            ("prune", options.prune),
            ("check", options.check),
            ("usb", options.usb is not None),
        )
        if on
    ]
    if len(chosen) > 1:
        raise UsageError(f"flash: choose one of --{' / --'.join(chosen)}")
    if options.keep < 1:
        raise UsageError("--keep must be at least 1 (the current and previous versions are always kept)")
    if not (math.isfinite(options.lock_timeout) and options.lock_timeout >= 0):
        raise UsageError(f"--lock-timeout {options.lock_timeout:g}: a number of seconds, 0 or more")
    publish = options.to is not None  # even --to '': open_store says what is wrong with it
    name = chosen[0] if chosen else ("publish" if publish else ("sign" if options.sign else ""))
    if not name:
        raise UsageError("flash: say where: --to PXE_ROOT, --usb FILE_OR_DEVICE, or --sign KEY alone")
    if options.identities is not None and name not in {"publish", "check", "sign"}:
        raise UsageError(f"--{name} takes no --identities (they are published to a PXE root: --to)")
    if name in {"list", "rollback", "prune"}:
        if options.to is None:
            raise UsageError(f"--{name} needs --to PXE_ROOT")
        if options.build is not None:
            raise UsageError(f"--{name} takes no BUILD_DIR")
        ignored = [
            option
            for option, given in (
                ("--sign", options.sign is not None),
                ("--report", options.report is not None),
                ("--force", options.force),
                ("--allowed-signers", options.allowed_signers is not None and name != "rollback"),
            )
            if given
        ]
        if ignored:
            raise UsageError(f"--{name} takes no {' / '.join(ignored)}")
    elif name == "usb" and options.to is not None:
        raise UsageError("--usb and --to are separate runs")
    elif options.build is None and options.identities is None:
        raise UsageError(f"flash: BUILD_DIR is needed to {name} (or --identities DIR alone)")
    return name


def command(options: FlashOptions) -> int:
    try:
        return _command(options)
    except OSError as exc:  # what no step turned into words: still one line, naming the file
        raise FlashError(f"flash: {os_error(exc)}") from None


def _command(options: FlashOptions) -> int:
    name = action(options)
    store = _store(options) if options.to is not None else None  # a bad --to: nothing touched
    if name == "rollback" and options.rollback:
        ops.check_version(options.rollback)
    signing_too = options.sign is not None and name in {"publish", "check", "usb", "sign"}
    if options.build is not None:  # before anything is signed or copied
        candidates.check_build(options.build, options.report)
    identity_set = identities.load(options.identities) if options.identities is not None else None
    if options.allowed_signers is not None and name in {"publish", "check", "usb", "rollback"}:
        ops.allowed_signers(None, options.allowed_signers)  # a file that is not there: UsageError
    if signing_too and options.sign is not None:
        signing.check_key(options.sign)
    if name == "usb":
        from amnesiac.flash import usb

        usb.preflight(options)
    progress = Progress(quiet=options.json)
    if signing_too and options.sign is not None:
        identity_set = _sign(options.build, identity_set, options.sign, progress)
    if name == "usb":
        from amnesiac.flash import usb

        written = usb.command(options, progress)
        _emit(options, progress, written.as_dict(), written.summary())
    elif name == "list" and store is not None:
        _list(store, options)
    elif name == "rollback" and store is not None:
        _rollback(store, options, progress)
    elif name == "prune" and store is not None:
        outcome = ops.prune(store, progress, keep=options.keep, lock_timeout=options.lock_timeout)
        _emit(
            options,
            progress,
            outcome.as_dict(),
            f"pruned {len(outcome.pruned)} version(s) from {outcome.root}",
        )
    elif name in {"publish", "check"}:
        _publish(options, progress, store, identity_set, check_only=name == "check")
    return 0


def _store(options: FlashOptions) -> Store:
    if options.to is None:
        raise UsageError("flash: --to PXE_ROOT is needed")
    return open_store(options.to, ssh_config=options.ssh_config, ssh_key=options.ssh_key)


def _rollback(store: Store, options: FlashOptions, progress: Progress) -> None:
    allowed = ops.allowed_signers(store, options.allowed_signers)
    outcome = ops.rollback(
        store, options.rollback or None, progress, allowed=allowed, lock_timeout=options.lock_timeout
    )
    text = (
        f"[bold green]rolled back[/] {escape(outcome.root)} to {str(outcome.version)[:12]} "
        f"(from {str(outcome.previous)[:12]})"
        if outcome.switched
        else f"{str(outcome.version)[:12]} is already current at {escape(outcome.root)}"
    )
    _emit(options, progress, outcome.as_dict(), text)


def _publish(
    options: FlashOptions,
    progress: Progress,
    store: Store | None,
    identity_set: identities.IdentitySet | None,
    *,
    check_only: bool,
) -> None:
    allowed, source = ops.allowed_signers(store, options.allowed_signers)
    admitted = None
    if options.build is not None:
        with progress.stage("check", f"Check {options.build}") as stage:
            found = candidates.load(options.build, options.report)
            admitted = ops.admit(found, allowed, source, force=options.force)
            stage.note = _verdicts(admitted)
        for objection in admitted.objections:
            if not progress.quiet:
                progress.console.print(f"[yellow]forced:[/] {objection}", soft_wrap=True)
    if identity_set is not None:  # a signature is never forced, for identities as for images
        with progress.stage("check-identities", f"Check the identities in {identity_set.source}") as stage:
            identity_set = identities.check_signature(identity_set, allowed, source)
            signer = identity_set.signer
            stage.note = f"{_hosts(identity_set)}, " + (
                f"signed by {signer.principal}" if signer else "signature not checked"
            )
    if check_only or store is None:
        _emit_check(options, progress, admitted, identity_set)
        return
    outcome = ops.publish(
        store,
        admitted,
        progress,
        identities=identity_set,
        force=options.force,
        keep=options.keep,
        lock_timeout=options.lock_timeout,
    )
    what = "published" if outcome.switched else "already current:"
    version = str(outcome.version)[:12]
    image = f"image {admitted.short}" if admitted else "the current image"
    text = f"[bold green]{what}[/] {version} ({image}) at {escape(outcome.root)}"
    if identity_set is not None:
        text += f" with identities {str(outcome.identities)[:12]} ({_hosts(identity_set)})"
    if outcome.switched and admitted is not None:
        text += f" (previous: {(outcome.previous or 'none')[:12]})"
    if outcome.pruned:
        text += f"; pruned {', '.join(p[:12] for p in outcome.pruned)}"
    _emit(options, progress, outcome.as_dict(), text)


def _hosts(identity_set: identities.IdentitySet) -> str:
    count = len(identity_set.overlays)
    return f"{count} host{'' if count == 1 else 's'}"


def _emit_check(
    options: FlashOptions,
    progress: Progress,
    admitted: candidates.Candidate | None,
    identity_set: identities.IdentitySet | None,
) -> None:
    objections = admitted.objections if admitted else []
    verdict = "fit to publish" if not objections else "publishable only with --force:"
    data: dict[str, object] = {
        "action": "check",
        "build": str(options.build) if options.build else None,
        "version": admitted.version if admitted else None,
        "image": admitted.image_sha256 if admitted else None,
        "objections": objections,
        "signature": admitted.signer.model_dump() if admitted and admitted.signer else None,
        "report": admitted.report.model_dump() if admitted and admitted.report else None,
        "identities": identity_set.name if identity_set else None,
        "hosts": sorted(identity_set.overlays) if identity_set else [],
        "identities_signature": (
            identity_set.signer.model_dump() if identity_set and identity_set.signer else None
        ),
    }
    what = [f"{admitted.version[:12]} (image {admitted.short})"] if admitted else []
    if identity_set is not None:
        what.append(f"identities {identity_set.name[:12]} ({_hosts(identity_set)})")
    _emit(options, progress, data, f"[bold]{verdict}[/] {' and '.join(what)}")


def _sign(
    build: Path | None, identity_set: identities.IdentitySet | None, key: Path, progress: Progress
) -> identities.IdentitySet | None:
    """Sign the build's manifest.json and the identities' index (whichever are given)."""
    if build is not None:
        manifest = build / MANIFEST
        if not manifest.is_file():
            raise UsageError(f"{manifest}: missing; {build} is not a finished build")
        with progress.stage("sign", f"Sign {manifest}") as stage:
            out, fingerprint = signing.sign(manifest, key)
            stage.note = f"{out.name}, {fingerprint}"
    if identity_set is not None:
        with progress.stage("sign", f"Sign the identities in {identity_set.source}") as stage:
            identity_set, fingerprint = identities.sign(identity_set, key)
            stage.note = f"{INDEX} and {INDEX_SIGNATURE}, {fingerprint}"
    return identity_set


def _verdicts(found: candidates.Candidate) -> str:
    signed = f"signed by {found.signer.principal}" if found.signer else "signature not checked"
    report = "report: pass" if found.report and found.report.passed else "report: no pass"
    return f"image {found.short}, {signed}, {report}"


def _emit(options: FlashOptions, progress: Progress, data: dict[str, object], text: str) -> None:
    if options.json:
        print(json.dumps(data, indent=2))
    else:
        progress.console.print(text, soft_wrap=True)


def _list(store: Store, options: FlashOptions) -> None:
    found = ops.listing(store, check=True)  # a missing root: UsageError
    if options.json:
        print(json.dumps(found.as_dict(), indent=2))
        return
    console = Console(highlight=False) if sys.stdout.isatty() else Console(highlight=False, width=200)
    if not found.versions:
        console.print(f"{escape(found.root)}: nothing published")
        return
    table = Table(title=escape(found.root), title_justify="left")
    for column in ("", "version", "image", "policy", "built", "published", "report", "signed by", "notes"):
        table.add_column(column)
    for version in found.versions:
        record = version.record
        mark = "current" if version.current else ("previous" if version.previous else "")
        problem = f"[red]{escape(version.problem)}[/]" if version.problem else ""
        if record is None:
            table.add_row(f"[bold]{mark}[/]", version.name[:12], "", "", "", "", "", "", problem)
            continue
        report = record.report
        report_text = (
            "[green]pass[/]"
            if report and report.passed
            else (f"[red]{escape(report.verdict)}, not this image[/]" if report else "[red]none[/]")
        )
        if report and not report.passed and report.verdict in {"fail", "incomplete"}:
            report_text = f"[red]{report.verdict}[/]"
        signer = escape(record.signature.principal) if record.signature else "[red]unsigned[/]"
        by = escape(record.published_by)
        notes = problem or (f"[yellow]forced[/] by {by}" if record.forced else f"by {by}")
        table.add_row(
            f"[bold]{mark}[/]",
            version.name[:12],
            record.image_sha256[:12],
            escape(record.policy_id),
            escape(record.built[:10]),
            escape(record.published),
            report_text,
            signer,
            notes,
        )
    console.print(table)
    state = found.state
    for name, hosts in found.identity_sets.items():
        marks = {state.identities: " (current)", state.previous_identities: " (previous)"} if state else {}
        count = "[red]no index[/]" if hosts is None else f"{len(hosts)} host{'' if len(hosts) == 1 else 's'}"
        console.print(f"identities {name[:12]}{marks.get(name, '')}: {count}")
