"""`amnesiac verify`: run the claim checks a policy names against a target, and report.

Identity first (what image, kernel and boot this is), then the checks through pytest and
testinfra with `amnesiac.checks.plugin`, then the report a reviewer reads. A qemu: target is
booted with the boot harness and a throwaway key that arrives in a boot-time overlay, so the
artifact verified is the artifact that ships.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from amnesiac import __version__, boot, policy
from amnesiac.checks import MODULES
from amnesiac.checks.meta import catalogue
from amnesiac.errors import AmnesiacError
from amnesiac.image import manifest as manifest_file
from amnesiac.image.plan import make_plan
from amnesiac.policy import ClaimKind, Policy
from amnesiac.progress import Progress
from amnesiac.report import model, render
from amnesiac.report.model import (
    CheckOutcome,
    CheckResult,
    ClaimResult,
    Evidence,
    Identity,
    Report,
    Target,
    TargetKind,
)
from amnesiac.run import run
from amnesiac.targets import TargetSpec, parse

CHECKS_DIR = Path(__file__).resolve().parent / "checks"
# Run on every target whatever the policy names: the verified image is the shipped image, it
# carries no key of its own, and the one way in takes keys only.
INTEGRITY_CHECKS = ("ssh.no_test_key", "ssh.key_only")
INTEGRITY_CLAIM = "amnesiac-integrity"
INTEGRITY_TEXT = (
    "The image verified is the image that ships: it carries no SSH key of its own (the "
    "verifier's key arrives in a boot-time overlay), and management access accepts keys only."
)
CHECKS_TIMEOUT = 900  # seconds for the whole check run: a hung SSH session must not hang verify
SSH_OPTIONS = (
    "StrictHostKeyChecking no",  # host keys are made at every boot: nothing to pin
    "UserKnownHostsFile /dev/null",
    "LogLevel ERROR",
    "IdentitiesOnly yes",
    "BatchMode yes",
    "ConnectTimeout 20",
    "ServerAliveInterval 15",
)


class VerifyError(AmnesiacError):
    """The target could not be reached or the checks could not run at all."""


@dataclass(frozen=True)
class VerifyOptions:
    policy: Path
    target: str
    report_dir: Path
    ssh_key: Path | None = None  # ssh:// targets: the private key to log in with
    build: Path | None = None  # ssh:// and chroot: targets: the build they should be
    memory_mib: int | None = None  # qemu: targets
    boot_timeout: float = 600.0
    # Public key files of keys the verifier itself put on the target to log in: allowed beside
    # the policy's keys by ssh.no_test_key, and named in the report. None by default, so a key
    # an operator logs in with must be one the policy names.
    verifier_keys: tuple[Path, ...] = ()


@dataclass
class Session:
    """How the checks reach the target, and what verify knows about it before they run."""

    spec: TargetSpec
    hosts: list[str]
    work: Path
    test_keys: list[str] = field(default_factory=list)
    identity: Identity = field(default_factory=Identity)
    test_devices_attached: bool = (
        False  # qemu: the harness attached a USB keyboard and stick and a virtio disk
    )


def verify(options: VerifyOptions, progress: Progress) -> tuple[Report, render.ReportFiles]:
    """Verify the target against the policy, write the report and return it."""
    loaded = policy.load(options.policy)
    spec = parse(options.target)
    check_ids = selected_checks(loaded)
    built = manifest_file.read(spec.path) if spec.kind is TargetKind.QEMU and spec.path else None
    if built is None and options.build is not None:
        built = manifest_file.read(options.build)
    with (
        tempfile.TemporaryDirectory(prefix="amnesiac-verify-") as tmp,
        _reach(spec, options, progress, Path(tmp)) as session,
    ):
        with progress.stage("identity", "Identity: image, kernel, boot") as stage:
            session.identity = _identity(session, built)
            stage.note = f"boot {session.identity.boot_id or '-'}"
        with progress.stage(
            "checks", f"Checks: {len(check_ids)} on a {spec.check_kind.value} target"
        ) as stage:
            results = _run_checks(session, check_ids, expectations(loaded, built, session), options, progress)
            stage.note = ", ".join(f"{n} {o}" for o, n in _count(results).items() if n)
    with progress.stage("report", f"Report: {options.report_dir}"):
        target = Target(
            kind=spec.kind,
            address=spec.address,
            identity=session.identity,
            verifier_keys=[fingerprint(k) for k in session.test_keys],
        )
        report = build_report(loaded, target, results, built)
        files = render.write(report, options.report_dir)
    return report, files


def read_verifier_keys(files: Sequence[Path]) -> list[str]:
    """The public keys of --verifier-key files, in order, each once."""
    return list(dict.fromkeys(k for f in files for k in boot.public_keys(f, "--verifier-key")))


def fingerprint(key: str) -> str:
    """OpenSSH's SHA256 fingerprint of a public key line (`ssh-keygen -l` prints the same)."""
    blob = base64.b64decode(key.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def selected_checks(loaded: Policy) -> list[str]:
    """The checks the policy's technical claims name, in policy order, plus the integrity checks."""
    ids = [c for claim in loaded.technical_claims() for c in claim.checks]
    return list(dict.fromkeys([*INTEGRITY_CHECKS, *ids]))


def expectations(loaded: Policy, built: dict[str, Any] | None, session: Session) -> dict[str, Any]:
    """What the target should be, from the policy (never from the target itself)."""
    plan = make_plan(loaded)
    roles = set(plan.roles)
    expect: dict[str, Any] = {
        "policy": loaded.id,
        "authorized_keys": plan.var("ssh_admin_authorized_keys") if "ssh_admin" in roles else [],
        "test_keys": session.test_keys,
        "test_devices_attached": session.test_devices_attached,
    }
    if "ram_root" in roles:
        expect["root_tmpfs_size_bytes"] = int(plan.var("ram_root_tmpfs_size_mib")) * 1024**2
    if "openvpn_server" in roles:
        expect["openvpn_unit"] = f"openvpn-server@{plan.var('openvpn_server_instance')}.service"
    if "wireguard_server" in roles:
        expect["wireguard_interface"] = plan.var("wireguard_server_interface")
    if built is not None:
        expect["image_sha256"] = built["image"]["sha256"]
    return expect


@contextlib.contextmanager
def _reach(spec: TargetSpec, options: VerifyOptions, progress: Progress, work: Path) -> Iterator[Session]:
    """Make the target reachable for the checks (boot it, for qemu:) for the duration."""
    if spec.kind is not TargetKind.QEMU:
        hosts = spec.testinfra_hosts()
        if spec.kind is TargetKind.SSH:
            hosts += _ssh_args(work, options.ssh_key)
        yield Session(spec, hosts, work, test_keys=read_verifier_keys(options.verifier_keys))
        return
    if spec.path is None:
        raise VerifyError(f"{spec.address}: no build directory to boot")
    key = _throwaway_key(work)
    boot_options = boot.BootOptions(memory_mib=options.memory_mib, ssh_key=key.with_suffix(".pub"))
    with contextlib.ExitStack() as stack:  # QEMU runs until the checks are done, whatever happens
        with progress.stage("boot", f"Boot {spec.path.name} in QEMU over iPXE") as stage:
            machine = stack.enter_context(boot.running(spec.path, boot_options))
            seconds = machine.wait_ssh(timeout=options.boot_timeout, on_tick=progress.detail)
            stage.note = f"SSH after {seconds:.0f} s, {machine.accel.accel}, {machine.memory_mib} MiB"
        session = Session(spec, spec.testinfra_hosts(machine.ssh_port) + _ssh_args(work, key), work)
        session.test_keys = read_verifier_keys([key.with_suffix(".pub"), *options.verifier_keys])
        session.test_devices_attached = boot_options.test_devices
        session.identity = Identity(artifacts={s.name: s.sha256 for s in machine.served() if s.sha256})
        yield session


def _throwaway_key(work: Path) -> Path:
    key = work / "id_ed25519"
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "amnesiac-verify", "-f", key], capture=True)
    return key


def _ssh_args(work: Path, key: Path | None) -> list[str]:
    config = work / "ssh_config"
    lines = ["Host *", *(f"    {o}" for o in SSH_OPTIONS)]
    if key is not None:
        lines.append(f"    IdentityFile {key}")
    config.write_text("\n".join(lines) + "\n")
    return [f"--ssh-config={config}"]


def _identity(session: Session, built: dict[str, Any] | None) -> Identity:
    """Read who the target is before anything else runs on it."""
    import testinfra

    spec = session.spec
    if spec.kind is TargetKind.CHROOT:
        return Identity(image_sha256=built["image"]["sha256"] if built else None)
    url = next(a.removeprefix("--hosts=") for a in session.hosts if a.startswith("--hosts="))
    config = next(
        (a.removeprefix("--ssh-config=") for a in session.hosts if a.startswith("--ssh-config=")), None
    )
    try:
        host = testinfra.get_host(url, ssh_config=config)
        values = {
            name: host.run(command).stdout.strip()
            for name, command in (
                ("kernel_release", "uname -r"),
                ("cmdline", "cat /proc/cmdline"),
                ("boot_id", "cat /proc/sys/kernel/random/boot_id"),
                ("hostname", "cat /proc/sys/kernel/hostname"),
            )
        }
    except Exception as exc:
        raise VerifyError(f"cannot reach {spec.kind}:{spec.address}: {exc}") from None
    image = next(
        (w.split("=", 1)[1] for w in values["cmdline"].split() if w.startswith("amnesiac.image=")), None
    )
    artifacts = session.identity.artifacts
    matches = None
    if built is not None and artifacts:
        matches = all(
            built["artifacts"][n]["sha256"] == s for n, s in artifacts.items() if n in built["artifacts"]
        )
    return Identity(
        image_sha256=image if image and len(image) == 64 else None,
        kernel_release=values["kernel_release"] or None,
        cmdline=values["cmdline"] or None,
        boot_id=values["boot_id"] or None,
        hostname=values["hostname"] or None,
        artifacts=artifacts,
        manifest_sha256_matches=matches,
    )


def _run_checks(
    session: Session, check_ids: list[str], expect: dict[str, Any], options: VerifyOptions, progress: Progress
) -> dict[str, CheckResult]:
    records = run_pytest(session, check_ids, expect, options.report_dir, progress)
    return {r["id"]: check_result(r) for r in records}


def run_pytest(
    session: Session,
    check_ids: list[str],
    expect: dict[str, Any],
    report_dir: Path,
    progress: Progress,
    *,
    extra: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Run the checks through pytest and return the plugin's records (one per check and host)."""
    work = session.work
    (work / "expect.json").write_text(json.dumps(expect, indent=2))
    results_file = work / "results.json"
    log = report_dir / "pytest.log"  # the checks' own output, for whoever debugs a check
    argv = [
        sys.executable, "-m", "pytest",
        "-c", os.fspath(CHECKS_DIR / "pytest.ini"), "--rootdir", os.fspath(CHECKS_DIR),
        "-p", "amnesiac.checks.plugin", "-p", "no:cacheprovider",
        *session.hosts,
        f"--amnesiac-target-kind={session.spec.check_kind.value}",
        f"--amnesiac-checks={','.join(check_ids)}",
        f"--amnesiac-results={results_file}",
        f"--amnesiac-expect={work / 'expect.json'}",
        "-q", "-rA", "--color=no", *extra,
        *(os.fspath(CHECKS_DIR / f"{m}.py") for m in MODULES),
    ]  # fmt: skip
    progress.detail(f"pytest, {len(check_ids)} checks")
    report_dir.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        try:
            proc = subprocess.run(
                argv, stdout=out, stderr=subprocess.STDOUT, timeout=CHECKS_TIMEOUT, check=False, env=env
            )
        except subprocess.TimeoutExpired:
            raise VerifyError(f"the checks did not finish in {CHECKS_TIMEOUT} s (log: {log})") from None
    if proc.returncode not in (0, 1) or not results_file.exists():
        tail = " ".join(log.read_text(errors="replace").split()[-30:])
        raise VerifyError(
            f"the checks could not run (pytest exit {proc.returncode}): {tail[-300:]}", hint=f"log: {log}"
        )
    records: list[dict[str, Any]] = json.loads(results_file.read_text())
    return records


def check_result(record: dict[str, Any]) -> CheckResult:
    """A check's result from the plugin's record of it."""
    meta = catalogue()
    check_id = record["id"]
    title = check_id.split(".", 1)[1].replace("_", " ").capitalize()
    return CheckResult(
        id=check_id,
        title=title,
        rationale=meta[check_id].rationale if check_id in meta else record.get("rationale"),
        outcome=CheckOutcome(record["outcome"]),
        reason=record["reason"],
        duration_s=max(0.0, float(record["duration_s"])),
        evidence=[Evidence(**e) for e in record["evidence"]],
    )


def identity_result(identity: Identity, built: dict[str, Any] | None) -> CheckResult | None:
    """The target runs the build it should: the image it names and the files it was served."""
    if built is None:
        return None
    want = built["image"]["sha256"]
    evidence = [
        Evidence(
            command="cat /proc/cmdline", exit_code=0, output=identity.cmdline or "", note="amnesiac.image="
        ),
        Evidence(
            command="", output=json.dumps(identity.artifacts, indent=1), note="files the boot server sent"
        ),
        Evidence(command="", output=json.dumps(built["artifacts"], indent=1), note="manifest.json"),
    ]
    problems = []
    if identity.cmdline is not None and identity.image_sha256 != want:
        problems.append(f"the target booted image {identity.image_sha256 or 'unnamed'}, the build is {want}")
    if identity.manifest_sha256_matches is False:
        problems.append("the files the target was served differ from manifest.json")
    return CheckResult(
        id="identity.matches_manifest",
        title="The target runs this build",
        rationale="The kernel command line names the initrd's sha256 and the served files match "
        "manifest.json, so every result below is about the image that ships.",
        outcome=CheckOutcome.FAILED if problems else CheckOutcome.PASSED,
        reason="; ".join(problems) or None,
        evidence=evidence,
    )


def build_report(
    loaded: Policy, target: Target, results: dict[str, CheckResult], built: dict[str, Any] | None = None
) -> Report:
    """The policy's claims, with the integrity of the target first."""
    report = model.build_report(
        loaded, target, results, generated=datetime.now(UTC), tool_version=__version__
    )
    checks = [model.result_for(c, results) for c in INTEGRITY_CHECKS]
    if (identity := identity_result(target.identity, built)) is not None:
        checks.insert(0, identity)
    status, reason = model.claim_status(ClaimKind.TECHNICAL, checks)
    integrity = ClaimResult(
        id=INTEGRITY_CLAIM,
        title="The verified image is the shipped image",
        kind=ClaimKind.TECHNICAL,
        status=status,
        reason=reason,
        text={"en": [INTEGRITY_TEXT]},
        sources={"en": "amnesiac (not a provider's sentence)"},
        rationale="Checked on every target whatever the policy says: a key baked into the image, or "
        "password logins, would make every other result meaningless.",
        checks=checks,
    )
    claims = [integrity, *report.claims]
    return report.model_copy(
        update={"claims": claims, "totals": model.count_statuses(claims), "verdict": model.verdict_of(claims)}
    )


def _count(results: dict[str, CheckResult]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for result in results.values():
        counts[result.outcome.value] = counts.get(result.outcome.value, 0) + 1
    return counts
