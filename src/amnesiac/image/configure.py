"""Stage 2: apply the policy's roles to the root directory over Ansible's chroot connection.

Ansible is driven through ansible-runner; its events feed the progress display and, on
failure, name the task and host that failed.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ansible_runner

from amnesiac import paths, signals
from amnesiac.errors import BuildError

HOST = "image"  # an alias: a host named by its path breaks Ansible's per-host output


@dataclass
class PlaybookResult:
    ok: int = 0
    changed: int = 0
    tasks: int = 0
    failures: list[str] = field(default_factory=list)


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
