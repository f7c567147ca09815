"""Stage 2: apply the policy's roles to the root directory over Ansible's chroot connection.

Ansible is driven through ansible-runner; its events feed the progress display and, on
failure, name the task and host that failed. The roles whose layers are cached (image.layers)
are not run again: their layers are applied, and Ansible starts at the first role that changed.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ansible_runner

from amnesiac import paths, signals
from amnesiac.errors import BuildError
from amnesiac.image import layers
from amnesiac.image.plan import BuildPlan
from amnesiac.image.rootfs import CachedRootfs
from amnesiac.progress import Progress

HOST = "image"  # an alias: a host named by its path breaks Ansible's per-host output


@dataclass(frozen=True)
class Configured:
    roles_cached: tuple[str, ...]  # applied from their cached layers
    roles_run: tuple[str, ...]
    playbook: PlaybookResult | None  # None when every role was cached

    @property
    def note(self) -> str:
        cached = f"{len(self.roles_cached)} of {len(self.roles_cached) + len(self.roles_run)} roles cached"
        if self.playbook is None:
            return cached
        ran = f"{self.playbook.tasks} tasks, {self.playbook.changed} changed"
        return f"{cached}; {ran}" if self.roles_cached else ran


@dataclass
class PlaybookResult:
    ok: int = 0
    changed: int = 0
    tasks: int = 0
    failures: list[str] = field(default_factory=list)


def configure(
    plan: BuildPlan,
    rootfs: CachedRootfs,
    root: Path,
    work: Path,
    cache: Path,
    *,
    progress: Progress,
    log: Path | None = None,
) -> Configured:
    """Apply the plan's roles to `root`, from the cache where it can."""
    store = cache / "layers"
    chain = layers.keys(rootfs.identity, plan.roles, plan.variables(), ansible_version())
    hits = layers.cached_prefix(store, chain)
    for layer in chain[:hits]:
        progress.detail(f"cached layer of {layer.role}")
        layers.apply(store, layer, root)
    cached, to_run = plan.roles[:hits], plan.roles[hits:]
    if not to_run:
        return Configured(cached, to_run, None)
    staging = work / "layers"
    layers.begin(staging, root)
    extravars = {
        "amnesiac_roles": list(plan.roles),
        "amnesiac_roles_from": hits,
        "amnesiac_layer_staging": os.fspath(staging),
        **plan.role_vars,
        **plan.extra_vars,
    }
    try:
        result = run_playbook(root, work, extravars, on_task=progress.detail, log=log)
    finally:
        layers.store(staging, store, chain[hits:])  # what completed, also when a later role failed
    return Configured(cached, to_run, result)


def ansible_version() -> str:
    return importlib.metadata.version("ansible-core")


def run_playbook(
    root: Path,
    work: Path,
    extravars: Mapping[str, Any],
    *,
    on_task: Callable[[str], None] = lambda _t: None,
    playbook: str = "image.yml",
    tags: str | None = None,
    log: Path | None = None,
) -> PlaybookResult:
    """Run `playbooks/<playbook>` against `root` and return its counts; raise on any failure.

    Ansible's own output goes to `log` (kept beside the output directory, outside the image).
    """
    data = paths.data_root()
    result = PlaybookResult()

    def on_event(event: dict[str, Any]) -> bool:
        kind = event.get("event", "")
        data_ = event.get("event_data", {})
        if kind == "playbook_on_task_start":
            result.tasks += 1
            on_task(str(data_.get("task", "")))
        elif kind == "runner_on_ok":
            result.ok += 1
            result.changed += bool(data_.get("res", {}).get("changed"))
        elif kind in ("runner_on_failed", "runner_on_unreachable") and not data_.get("ignore_errors"):
            res = data_.get("res", {})
            msg = res.get("msg") or res.get("stderr") or res.get("module_stderr") or "failed"
            result.failures.append(f"task '{data_.get('task', '?')}': {' '.join(str(msg).split())[:300]}")
        return False  # do not keep the event in memory

    env = {
        # ansible-playbook from this interpreter's environment, whether or not it is activated
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "ANSIBLE_CONFIG": os.fspath(data / "ansible.cfg"),
        "ANSIBLE_ROLES_PATH": os.fspath(data / "roles"),
        "ANSIBLE_HOME": os.fspath(work / "ansible-home"),
        "ANSIBLE_LOCAL_TEMP": os.fspath(work / "ansible-tmp"),
        "ANSIBLE_REMOTE_TEMP": "/tmp/.ansible",  # noqa: S108 (inside the chroot; minimise empties /tmp)
        "ANSIBLE_NOCOLOR": "1",
    }
    inventory = {
        "all": {
            "hosts": {
                HOST: {
                    "ansible_host": os.fspath(root),
                    "ansible_connection": "community.general.chroot",
                }
            }
        }
    }
    (work / "ansible").mkdir(parents=True, exist_ok=True)
    with signals.deferred() as cancelled:
        runner = ansible_runner.run(
            private_data_dir=os.fspath(work / "ansible"),
            playbook=os.fspath(data / "playbooks" / playbook),
            inventory=inventory,
            extravars=dict(extravars),
            envvars=env,
            tags=tags,
            quiet=True,
            event_handler=on_event,
            cancel_callback=cancelled,
            settings={"suppress_ansible_output": True},
        )
    output = runner.stdout.read() if runner.stdout else ""
    if log is not None:
        log.write_text(output)
    hint = f"Ansible's output: {log}" if log else None
    if result.failures:
        raise BuildError(f"Ansible failed: {result.failures[0]}", hint=hint)
    if runner.rc != 0 or runner.status != "successful":
        tail = " ".join(output.split()[-40:])
        raise BuildError(
            f"Ansible ended with status {runner.status} (rc {runner.rc}): {tail[-300:]}", hint=hint
        )
    return result
