"""`amnesiac verify`: run the claim checks a policy names against targets, and report.

One flow for one target and for a fleet (a single target is a fleet of one): reach every target
(targets/: boot it, for qemu:), read each one's identity before anything else runs on it, run
the checks through pytest and testinfra with `amnesiac.checks.plugin` in ONE run over every
reachable target (pytest-xdist when there are several), then write each target's report a
reviewer reads, and for an inventory the fleet's summary beside them.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from amnesiac import __version__, attest, policy, ssh
from amnesiac.boot.image import refuse_too_little_memory
from amnesiac.checks import DIRECTORY as CHECKS_DIR
from amnesiac.checks import MODULES
from amnesiac.checks.expectations import Expectations, PermittedRecord
from amnesiac.checks.meta import catalogue, integrity_checks
from amnesiac.checks.results import CheckRecord, CheckResult, Evidence, read_records
from amnesiac.errors import ExitCode, UnreachableError, UsageError
from amnesiac.image.manifest import Manifest
from amnesiac.image.plan import make_plan, permitted_record_vars
from amnesiac.policy import RECORDS_VAR, Policy
from amnesiac.progress import Progress
from amnesiac.report import fleet, model, render
from amnesiac.report.model import CheckOutcome, Identity, Report, Verdict
from amnesiac.report.model import Target as ReportTarget
from amnesiac.run import run
from amnesiac.targets import Connection, ReachOptions, Target, parse
from amnesiac.targets.base import TargetKind, Unreachable
from amnesiac.targets.inventory import ENROLMENT_VARIABLE, InventoryHost, members

CHECKS_TIMEOUT = 900  # seconds for the whole check run: a hung SSH session must not hang verify


class VerifyError(UnreachableError):
    """The target could not be reached or the checks could not run at all: an error of the run
    (exit 4), never a claim that failed."""


@dataclass(frozen=True)
class VerifyOptions:
    policy: Path
    report_dir: Path
    target: str | None = None  # --target; or:
    inventory: Path | None = None  # --inventory: every host of it, each an ssh target
    ssh_key: Path | None = None  # ssh:// targets: the private key to log in with
    build: Path | None = None  # the build the targets should be (qemu: says so itself)
    memory_mib: int | None = None  # qemu: targets
    boot_timeout: float = 600.0
    # Public key files of keys the verifier itself put on the target to log in: allowed beside
    # the policy's keys by ssh.no_test_key, and named in the report. None by default, so a key
    # an operator logs in with must be one the policy names.
    verifier_keys: tuple[Path, ...] = ()
    workers: int | None = None  # pytest-xdist workers; None: one per target, at most the CPUs
    # ssh:// targets: the server's TPM as the provider enrolled it (attest.Enrolment); an
    # inventory names each host's in its `amnesiac_enrolment` variable instead.
    enrolment: Path | None = None


@dataclass(frozen=True)
class Verification:
    """What a run found: a report per reachable target, and why the others were not checked."""

    targets: list[Target]
    reports: dict[str, Report]  # target name -> its report
    files: dict[str, render.ReportFiles]
    unreachable: dict[str, str]  # target name -> why
    fleet: fleet.FleetFiles | None  # an inventory's summary

    @property
    def passed(self) -> bool:
        return not self.unreachable and all(r.passed for r in self.reports.values())

    @property
    def exit_code(self) -> ExitCode:
        """A claim that failed anywhere, then a host not checked, then a claim not proved: CI
        tells each apart (README, "Exit codes")."""
        verdicts = {r.verdict for r in self.reports.values()}
        if Verdict.FAIL in verdicts:
            return ExitCode.FAILED
        if self.unreachable:
            return ExitCode.UNREACHABLE
        return ExitCode.INCOMPLETE if Verdict.INCOMPLETE in verdicts else ExitCode.OK

    @property
    def report(self) -> Report:
        """The report of a single target."""
        (only,) = self.reports.values()
        return only


def verify(options: VerifyOptions, progress: Progress) -> Verification:
    """Verify the targets against the policy, write every report and return them."""
    loaded = policy.load(options.policy)
    check_ids = selected_checks(loaded)
    with tempfile.TemporaryDirectory(prefix="amnesiac-verify-") as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        targets = resolve(options, work)
        built = _built(targets, options.build)
        reach = reach_options(options, work, progress)
        connections = {t.name: stack.enter_context(t.reach(reach)) for t in targets}
        identities, unreachable = read_identities(
            targets, connections, built, progress, fleet=options.inventory
        )
        reachable = [t for t in targets if t.name in identities]
        results: dict[str, dict[str, CheckResult]] = {}
        if reachable:
            kinds = {t.surface for t in reachable}
            where = f"{len(reachable)} hosts" if len(reachable) > 1 else f"a {kinds.pop().value} target"
            with progress.stage("checks", f"Checks: {len(check_ids)} on {where}") as stage:
                chosen = [connections[t.name] for t in reachable]
                expect = expectations(loaded, built, chosen[0])
                records = run_checks(
                    reachable[0],
                    chosen,
                    check_ids,
                    expect,
                    work=work,
                    report_dir=options.report_dir,
                    progress=progress,
                    workers=options.workers,
                )
                results = group_by_target(
                    records, {c.host: t.name for t, c in zip(reachable, chosen, strict=True)}
                )
                stage.note = _count(results)
    with progress.stage("report", f"Report: {options.report_dir}"):
        reports, files = {}, {}
        for target in reachable:
            report_target = ReportTarget(
                kind=target.kind,
                address=target.address,
                identity=identities[target.name],
                verifier_keys=[ssh.fingerprint(k) for k in connections[target.name].test_keys],
            )
            reports[target.name] = build_report(loaded, report_target, results.get(target.name, {}), built)
            directory = options.report_dir
            if isinstance(target, InventoryHost):
                directory = options.report_dir / target.directory
            files[target.name] = render.write(reports[target.name], directory)
        summary = None
        if options.inventory is not None:
            hosts = [t for t in targets if isinstance(t, InventoryHost)]
            summary = fleet.write(
                loaded,
                options.inventory,
                fleet=hosts,
                reports=reports,
                unreachable=unreachable,
                directory=options.report_dir,
            )
    return Verification(targets, reports, files, unreachable, summary)


def resolve(options: VerifyOptions, work: Path) -> list[Target]:
    """The targets the command line names: one --target, or every host of --inventory."""
    if options.inventory is not None:
        if options.enrolment is not None:
            where = f"each host's goes in its {ENROLMENT_VARIABLE} variable"
            raise UsageError(f"--enrolment with --inventory: {where}")
        return list(members(options.inventory, work))
    if options.target is None:
        raise VerifyError("nothing to verify: give a target or an inventory")
    target = parse(options.target)
    if options.enrolment is not None and target.kind is not TargetKind.SSH:
        why = "the harness enrols the TPM it boots" if target.kind is TargetKind.QEMU else "it has no TPM"
        raise UsageError(f"--enrolment is for ssh:// targets, not {options.target} ({why})")
    if options.memory_mib is not None and target.kind is TargetKind.QEMU and target.build_dir is not None:
        built = Manifest.load(target.build_dir)  # booted measured when the build has a UKI
        refuse_too_little_memory(built, options.memory_mib, measured=True, what="--memory")
    return [target]


def reach_options(options: VerifyOptions, work: Path, progress: Progress) -> ReachOptions:
    """What reaching a target may use, from the command line (keys read and checked here)."""
    return ReachOptions(
        enrolment=attest.Enrolment.load(options.enrolment) if options.enrolment is not None else None,
        work=work,
        progress=progress,
        ssh_key=ssh.private_key(options.ssh_key),
        verifier_keys=tuple(read_verifier_keys(options.verifier_keys)),
        memory_mib=options.memory_mib,
        boot_timeout=options.boot_timeout,
    )


def _built(targets: Sequence[Target], build: Path | None) -> Manifest | None:
    """The build the targets should be running: the one a qemu: target boots, else --build."""
    own = next((t.build_dir for t in targets if t.build_dir is not None), None)
    where = own or build
    return Manifest.load(where) if where is not None else None


def read_identities(
    targets: Sequence[Target],
    connections: Mapping[str, Connection],
    built: Manifest | None,
    progress: Progress,
    fleet: Path | None = None,
) -> tuple[dict[str, Identity], dict[str, str]]:
    """Each target's identity, read in parallel; the ones that did not answer, and why (a
    single target that does not answer is a VerifyError; a fleet's are reported)."""
    title = "Identity: image, kernel, boot" if fleet is None else f"Identity of {len(targets)} hosts"
    identities: dict[str, Identity] = {}
    unreachable: dict[str, str] = {}
    with progress.stage("identity", title) as stage:
        with ThreadPoolExecutor(max_workers=min(8, len(targets))) as pool:
            futures = {t.name: pool.submit(t.identity, connections[t.name], built) for t in targets}
        for name, future in futures.items():
            try:
                identities[name] = future.result()
            except Unreachable as exc:
                unreachable[name] = str(exc)
        if fleet is None and unreachable:  # one target: nothing to verify, an error of the run
            raise VerifyError(next(iter(unreachable.values())))
        if fleet is None:
            identity = next(iter(identities.values()))
            stage.note = f"{identity.established_by}, boot {identity.boot_id or '-'}"
            if identity.tpm is not None and not identity.tpm.attested:
                stage.note += f"; not attested: {identity.tpm.reason}"
            if identity.tpm is not None and identity.tpm.ek_sha256 is not None:
                maker = identity.tpm.ek_certified_by
                stage.note += f"; its TPM's EK {f'chains to {maker}' if maker else 'unchecked (no --ek-ca)'}"
        else:
            stage.note = f"{len(identities)} reachable, {len(unreachable)} not"
    return identities, unreachable


def read_verifier_keys(files: Sequence[Path]) -> list[str]:
    """The public keys of --verifier-key files, in order, each once."""
    return list(dict.fromkeys(k for f in files for k in ssh.public_keys(f, "--verifier-key")))


def selected_checks(loaded: Policy) -> list[str]:
    """The checks the policy's technical claims name, in policy order, plus the integrity checks."""
    ids = [c for claim in loaded.technical_claims() for c in claim.checks]
    return list(dict.fromkeys([*integrity_checks(), *ids]))


def expectations(loaded: Policy, built: Manifest | None, connection: Connection) -> Expectations:
    """What the target should be, from the policy and the build (never from the target itself)."""
    plan = make_plan(loaded)
    roles = set(plan.roles)
    return Expectations(
        policy=loaded.id,
        authorized_keys=list(plan.var("ssh_admin_authorized_keys")) if "ssh_admin" in roles else [],
        test_keys=list(connection.test_keys),
        test_devices_attached=connection.test_devices_attached,
        root_tmpfs_size_bytes=int(plan.var("ram_root_tmpfs_size_mib")) * 1024**2
        if "ram_root" in roles
        else None,
        openvpn_unit=(
            f"openvpn-server@{plan.var('openvpn_server_instance')}.service"
            if "openvpn_server" in roles
            else None
        ),
        wireguard_interface=plan.var("wireguard_server_interface") if "wireguard_server" in roles else None,
        image_sha256=built.sha256 if built is not None else None,
        permitted_records=[
            PermittedRecord.model_validate(r) for r in permitted_record_vars(loaded).get(RECORDS_VAR, [])
        ],
        provider=connection.provider,
        guest_memory=connection.guest_memory,
        forget_seconds=loaded.policy.forget_after_disconnect_seconds,
    )


def run_checks(
    kind: Target,
    connections: Sequence[Connection],
    check_ids: Sequence[str],
    expect: Expectations,
    *,
    work: Path,
    report_dir: Path,
    progress: Progress,
    workers: int | None = None,
) -> list[CheckRecord]:
    """Run the checks on every connection in one pytest run; the plugin's records, one per check
    and host. The connections share their pytest arguments (one kind of target)."""
    shared = dict.fromkeys(a for c in connections for a in c.pytest_args)
    expect_file = expect.write(work / "expect.json")
    results_file = work / "results.json"
    log = report_dir / "pytest.log"  # the checks' own output, for whoever debugs a check
    count = len(connections)
    workers = workers or (min(count, max(2, os.cpu_count() or 2)) if count > 1 else 1)
    argv: list[str | os.PathLike[str]] = [
        sys.executable, "-m", "pytest",
        "-c", CHECKS_DIR / "pytest.ini", "--rootdir", CHECKS_DIR,
        "-p", "amnesiac.checks.plugin", "-p", "no:cacheprovider",
        "--hosts=" + ",".join(c.host for c in connections), *shared,
        f"--amnesiac-target-kind={kind.surface.value}",
        f"--amnesiac-checks={','.join(check_ids)}",
        f"--amnesiac-results={results_file}",
        f"--amnesiac-expect={expect_file}",
        "-q", "-rA", "--color=no",
        *(["-n", str(workers), "--dist", "load"] if workers > 1 else []),
        *(CHECKS_DIR / f"{m}.py" for m in MODULES),
    ]  # fmt: skip
    progress.detail(f"pytest, {len(check_ids)} checks")
    report_dir.mkdir(parents=True, exist_ok=True)
    env = next((c.env for c in connections if c.env is not None), None)
    try:
        proc = run(argv, check=False, stdout_to=log, merge_stderr=True, timeout=CHECKS_TIMEOUT, env=env)
    except subprocess.TimeoutExpired:
        raise VerifyError(f"the checks did not finish in {CHECKS_TIMEOUT} s (log: {log})") from None
    if proc.returncode not in (0, 1) or not results_file.exists():
        tail = " ".join(log.read_text(errors="replace").split()[-30:])
        raise VerifyError(
            f"the checks could not run (pytest exit {proc.returncode}): {tail[-300:]}", hint=f"log: {log}"
        )
    return read_records(results_file)


def group_by_target(
    records: Sequence[CheckRecord], names: Mapping[str, str]
) -> dict[str, dict[str, CheckResult]]:
    """The plugin's records (one per check and host) as check results by target name; `names`
    maps testinfra's host URL (Connection.host) to the target's name."""
    only = set(names.values())
    grouped: dict[str, dict[str, CheckResult]] = {}
    for record in records:
        # One target: every record is its own, whatever id testinfra gave the host.
        name = next(iter(only)) if len(only) == 1 else names.get(record.host, record.host)
        grouped.setdefault(name, {})[record.id] = with_catalogue_meta(record.result())
    return grouped


def with_catalogue_meta(result: CheckResult) -> CheckResult:
    """The rationale a reviewer reads, and what the check observes, are the shipped check's,
    whatever the record says."""
    meta = catalogue().get(result.id)
    if meta is None:
        return result.model_copy(update={"observes_records": False})
    return result.model_copy(update={"rationale": meta.rationale, "observes_records": meta.observes_records})


def identity_result(identity: Identity, built: Manifest | None) -> CheckResult | None:
    """The target runs the build it should: attested by its TPM where the boot was measured,
    otherwise the image it names and the files it was served."""
    if built is None:
        return None
    want = built.sha256
    artifacts = {n: a.model_dump() for n, a in built.artifacts.items()}
    evidence = [
        Evidence(
            command="cat /proc/cmdline", exit_code=0, output=identity.cmdline or "", note="amnesiac.image="
        ),
        Evidence(command="", output=_json(identity.artifacts), note="files the boot server sent"),
        Evidence(command="", output=_json(artifacts), note="manifest.json"),
    ]
    problems = []
    if identity.cmdline is not None and identity.image_sha256 != want:
        problems.append(f"the target booted image {identity.image_sha256 or 'unnamed'}, the build is {want}")
    if identity.manifest_sha256_matches is False:
        problems.append("the files the target was served differ from manifest.json")
    if (tpm := identity.tpm) is not None:
        evidence.insert(
            0,
            Evidence(
                command=f"{attest.GUEST_TOOL} <nonce>; tpm2_checkquote",
                exit_code=0 if tpm.attested else 1,
                output=_json(tpm.model_dump(mode="json")),
                note=identity.established_by,
            ),
        )
        if not tpm.attested:
            problems.append(f"TPM attestation failed: {tpm.reason}")
    rationale = (
        "The kernel command line names the initrd's sha256 and the served files match "
        "manifest.json, so every result below is about the image that ships."
    )
    if identity.tpm is not None:
        rationale = (
            "The target's TPM quoted PCRs 7, 11 and 12 over a fresh nonce with the attestation key "
            "enrolled before it booted; PCR 7 is the Secure Boot policy the firmware enforced and the "
            "db entry that let the UKI start, and must equal what was enrolled; PCR 11 is what "
            "systemd-stub measured (kernel, initrd with the test overlay named here, command line) "
            "and must equal the manifest's prediction; PCR 12 (anything a boot loader added) must "
            "be empty. " + rationale
        )
    return CheckResult(
        id="identity.matches_manifest",
        title="The target runs this build",
        rationale=rationale,
        outcome=CheckOutcome.FAILED if problems else CheckOutcome.PASSED,
        reason="; ".join(problems) or None,
        evidence=evidence,
    )


def _json(data: Any) -> str:
    return json.dumps(data, indent=1)


def build_report(
    loaded: Policy, target: ReportTarget, results: Mapping[str, CheckResult], built: Manifest | None = None
) -> Report:
    """The policy's claims, and the integrity of the target: its identity and the integrity checks."""
    integrity = [model.result_for(c, results) for c in integrity_checks()]
    if (identity := identity_result(target.identity, built)) is not None:
        integrity.insert(0, identity)
    return model.build_report(
        loaded, target, results, integrity=integrity, generated=datetime.now(UTC), tool_version=__version__
    )


def _count(results: Mapping[str, Mapping[str, CheckResult]]) -> str:
    counts: dict[str, int] = {}
    for by_id in results.values():
        for result in by_id.values():
            counts[result.outcome.value] = counts.get(result.outcome.value, 0) + 1
    return ", ".join(f"{n} {o}" for o, n in counts.items() if n)
