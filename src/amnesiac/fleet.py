"""`amnesiac verify --inventory FLEET`: the claim checks on every server of an Ansible inventory.

The inventory is read with testinfra's Ansible support (its ansible_host, ansible_port,
ansible_user, ansible_ssh_private_key_file and ansible_ssh_common_args), each host's identity
is read first, then ONE pytest run checks every reachable host in parallel (pytest-xdist) and
its results are split by host: each host gets the single-target report of `amnesiac verify`
(DIR/<host>/report.{html,json} and junit.xml), and the fleet gets DIR/fleet.json and
DIR/fleet.html, a table of hosts by claims. The fleet passes only when every host passes; a
host that cannot be reached fails the fleet and has no report of its own.

The key the inventory logs in with is an operator's: it must be one the policy names
(ssh_admin_authorized_keys), or the integrity check that the server carries no other key
fails. A key the verifier put on the servers itself is declared with --verifier-key; the
reports name it.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

import jinja2

from amnesiac import __version__, policy
from amnesiac.image import manifest as manifest_file
from amnesiac.policy import ClaimKind, Policy
from amnesiac.progress import Progress
from amnesiac.report import render
from amnesiac.report.model import CheckResult, ClaimStatus, Identity, Report, Target, TargetKind, Verdict
from amnesiac.targets import TargetSpec
from amnesiac.verify import (
    Session,
    VerifyError,
    build_report,
    check_result,
    expectations,
    fingerprint,
    read_verifier_keys,
    run_pytest,
    selected_checks,
)
from amnesiac.verify import _identity as read_identity

FLEET_JSON = "fleet.json"
FLEET_HTML = "fleet.html"
HOST_ID = "ansible://"  # testinfra's pytest id of an inventory host: ansible://<inventory name>
_SAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class FleetOptions:
    policy: Path
    inventory: Path
    report_dir: Path
    build: Path | None = None  # the build every host should be running
    workers: int | None = None  # pytest-xdist workers; None: one per host, at most the CPUs
    verifier_keys: tuple[Path, ...] = ()  # as VerifyOptions.verifier_keys


@dataclass(frozen=True)
class Member:
    """One server of the inventory, as testinfra's Ansible support reads it."""

    name: str  # the inventory hostname
    host: str
    port: int
    user: str

    @property
    def address(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"

    @property
    def directory(self) -> str:
        """Where this host's report goes under the fleet's directory."""
        return _SAFE.sub("_", self.name).lstrip(".") or "_"


@dataclass(frozen=True)
class FleetResult:
    reports: dict[str, Report]  # inventory hostname -> its report
    unreachable: dict[str, str]  # inventory hostname -> why
    summary: dict[str, Any]
    json: Path
    html: Path

    @property
    def passed(self) -> bool:
        return bool(self.summary["verdict"] == Verdict.PASS.value)


def tool_env(work: Path) -> dict[str, str]:
    """The environment testinfra reads the inventory in.

    This Python's bin first on PATH (testinfra runs `ansible-inventory` from it), and an empty
    Ansible configuration: the inventory alone says how to reach a host. (testinfra 10 reads
    `become = false` from an ansible.cfg as the string "false", which is true, and so would run
    every command through sudo.)
    """
    config = work / "ansible.cfg"
    config.touch()
    bindir = os.fspath(Path(sys.executable).parent)
    path = os.pathsep.join([bindir, os.environ.get("PATH", "")])
    return {**os.environ, "PATH": path, "ANSIBLE_CONFIG": os.fspath(config)}


def members(inventory: Path, work: Path) -> list[Member]:
    """Every host of the inventory, with how to reach it."""
    from testinfra.utils.ansible_runner import AnsibleRunner

    env = tool_env(work)  # the identity reads run in this process
    os.environ["PATH"], os.environ["ANSIBLE_CONFIG"] = env["PATH"], env["ANSIBLE_CONFIG"]
    try:
        runner = AnsibleRunner(os.fspath(inventory))
        names = runner.get_hosts("all")
    except Exception as exc:
        raise VerifyError(f"cannot read the inventory {inventory}: {exc}") from None
    found = []
    for name in names:
        hostvars = runner.get_variables(name)
        found.append(
            Member(
                name=name,
                host=str(hostvars.get("ansible_host", name)),
                port=int(hostvars.get("ansible_port", 22)),
                user=str(hostvars.get("ansible_user", "root")),
            )
        )
    if not found:
        raise VerifyError(f"the inventory {inventory} names no hosts")
    return found


def verify_fleet(options: FleetOptions, progress: Progress) -> FleetResult:
    """Verify every host of the inventory against the policy; write every report and the summary."""
    loaded = policy.load(options.policy)
    check_ids = selected_checks(loaded)
    built = manifest_file.read(options.build) if options.build is not None else None
    verifier_keys = read_verifier_keys(options.verifier_keys)
    inventory = options.inventory.resolve()
    identities: dict[str, Identity] = {}
    unreachable: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="amnesiac-fleet-") as tmp:
        work = Path(tmp)
        fleet = members(inventory, work)
        sessions = {m.name: _session(m, inventory, work) for m in fleet}
        with progress.stage("identity", f"Identity of {len(fleet)} hosts") as stage:
            with ThreadPoolExecutor(max_workers=min(8, len(fleet))) as pool:
                futures = {n: pool.submit(read_identity, s, built) for n, s in sessions.items()}
            for name, future in futures.items():
                try:
                    identities[name] = future.result()
                except VerifyError as exc:
                    unreachable[name] = str(exc)
            stage.note = f"{len(identities)} reachable, {len(unreachable)} not"
        reachable = [m for m in fleet if m.name in identities]
        records: list[dict[str, Any]] = []
        if reachable:
            workers = options.workers or min(len(reachable), max(2, os.cpu_count() or 2))
            with progress.stage(
                "checks", f"Checks: {len(check_ids)} on {len(reachable)} hosts, {workers} workers"
            ):
                session = Session(
                    spec=sessions[reachable[0].name].spec,
                    hosts=[
                        "--hosts=" + ",".join(HOST_ID + m.name for m in reachable),
                        f"--ansible-inventory={inventory}",
                    ],
                    work=work,
                    test_keys=verifier_keys,
                )
                expect = expectations(loaded, built, session)
                extra = ["-n", str(workers), "--dist", "load"] if workers > 1 else []
                records = run_pytest(
                    session, check_ids, expect, options.report_dir, progress, extra=extra, env=tool_env(work)
                )
    reports: dict[str, Report] = {}
    with progress.stage("report", f"Reports: {options.report_dir}"):
        grouped = group_by_host(records)
        for member in reachable:
            target = Target(
                kind=TargetKind.SSH,
                address=member.address,
                identity=identities[member.name],
                verifier_keys=[fingerprint(k) for k in verifier_keys],
            )
            reports[member.name] = build_report(loaded, target, grouped.get(member.name, {}), built)
            render.write(reports[member.name], options.report_dir / member.directory)
        data = summary(loaded, options.inventory, fleet, reports, unreachable)
        json_file, html_file = write_summary(data, options.report_dir)
    return FleetResult(reports, unreachable, data, json_file, html_file)


def _session(member: Member, inventory: Path, work: Path) -> Session:
    spec = TargetSpec(TargetKind.SSH, member.address, user=member.user, host=member.host, port=member.port)
    return Session(spec, [f"--hosts={HOST_ID}{member.name}?ansible_inventory={inventory}"], work)


def group_by_host(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, CheckResult]]:
    """The plugin's records (one per check and host) as check results by inventory hostname."""
    grouped: dict[str, dict[str, CheckResult]] = {}
    for record in records:
        name = str(record.get("host", "")).removeprefix(HOST_ID)
        grouped.setdefault(name, {})[record["id"]] = check_result(dict(record))
    return grouped


def summary(
    loaded: Policy,
    inventory: Path,
    fleet: Sequence[Member],
    reports: Mapping[str, Report],
    unreachable: Mapping[str, str],
) -> dict[str, Any]:
    """fleet.json: per host its verdict, identity and the status of every technical claim."""
    claims = (
        [c.id for c in next(iter(reports.values())).claims if c.kind is ClaimKind.TECHNICAL]
        if reports
        else []
    )
    if not claims:
        claims = [c.id for c in loaded.technical_claims()]
    hosts: dict[str, Any] = {}
    for member in fleet:
        entry: dict[str, Any] = {"address": member.address}
        if member.name in reports:
            report = reports[member.name]
            entry |= {
                "verdict": report.verdict.value,
                "identity": report.target.identity.model_dump(mode="json"),
                "claims": {c.id: c.status.value for c in report.claims if c.kind is ClaimKind.TECHNICAL},
                "failed": [c.id for c in report.claims if c.status is ClaimStatus.FAILED],
                "report": {
                    "html": f"{member.directory}/{render.HTML_NAME}",
                    "json": f"{member.directory}/{render.JSON_NAME}",
                    "junit": f"{member.directory}/{render.JUNIT_NAME}",
                },
            }
        else:
            entry |= {
                "verdict": Verdict.FAIL.value,
                "unreachable": unreachable.get(member.name, "not checked"),
                "claims": {},
                "failed": [],
            }
        hosts[member.name] = entry
    passed = bool(hosts) and all(h["verdict"] == Verdict.PASS.value for h in hosts.values())
    return {
        "format": 1,
        "tool": {"name": "amnesiac", "version": __version__},
        "generated": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "policy": {"id": loaded.id, "file": str(loaded.path), "sha256": loaded.sha256},
        "inventory": str(inventory),
        "verdict": (Verdict.PASS if passed else Verdict.FAIL).value,
        "claims": claims,
        "hosts": hosts,
    }


@cache
def _template() -> jinja2.Template:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("amnesiac.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return env.get_template("fleet.html.j2")


def render_html(data: Mapping[str, Any]) -> str:
    return _template().render(fleet=data)


def write_summary(data: Mapping[str, Any], directory: Path) -> tuple[Path, Path]:
    """Write fleet.json and fleet.html into `directory`, each through a temporary name."""
    directory.mkdir(parents=True, exist_ok=True)
    files = (directory / FLEET_JSON, directory / FLEET_HTML)
    texts = (json.dumps(data, indent=2) + "\n", render_html(data))
    for path, text in zip(files, texts, strict=True):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    return files
