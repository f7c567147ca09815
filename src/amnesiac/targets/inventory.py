"""--inventory FLEET — every host of an Ansible inventory, each an ssh target.

The inventory is read with testinfra's Ansible support (ansible_host, ansible_port,
ansible_user, ansible_ssh_private_key_file, ansible_ssh_common_args), and the checks reach each
host through testinfra's ansible backend, so the inventory alone says how to log in. A run's
commands to a host share one connection (targets.mux): the first, the identity read (in
parallel, host by host, before the checks), opens it.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from amnesiac import ssh
from amnesiac.attest import Enrolment
from amnesiac.errors import UsageError
from amnesiac.targets import mux
from amnesiac.targets.base import Connection, ReachOptions
from amnesiac.targets.ssh import SshTarget

ENROLMENT_VARIABLE = "amnesiac_enrolment"  # a host's enrolment file (attest.Enrolment)
HOST_ID = "ansible://"  # testinfra's id of an inventory host: ansible://<inventory name>
_SAFE = re.compile(r"[^A-Za-z0-9._-]")


class InventoryHost(SshTarget):
    """One server of the inventory, reached as the inventory says."""

    def __init__(
        self,
        name: str,
        host: str,
        port: int,
        user: str,
        inventory: Path,
        *,
        enrolment: Enrolment | None = None,
    ) -> None:
        super().__init__(user, host, port, name=name)
        self.inventory = inventory
        self.enrolment = enrolment  # its `amnesiac_enrolment` variable, read

    @property
    def directory(self) -> str:
        """Where this host's report goes under the fleet's directory."""
        return _SAFE.sub("_", self.name).lstrip(".") or "_"

    @contextlib.contextmanager
    def reach(self, options: ReachOptions) -> Iterator[Connection]:
        try:
            yield Connection(
                host=f"{HOST_ID}{self.name}",
                pytest_args=(f"--ansible-inventory={self.inventory}",),
                ansible_inventory=self.inventory,
                env=tool_env(options.work),
                test_keys=options.verifier_keys,
                enrolment=self.enrolment,
            )
        finally:
            # The fleet's masters share one directory (one ansible.cfg names it): the first
            # host done closes them all, once every check has run.
            mux.close(options.work)


def tool_env(work: Path) -> dict[str, str]:
    """The environment testinfra reads the inventory in.

    This Python's bin first on PATH (testinfra runs `ansible-inventory` from it), and an
    Ansible configuration that says nothing of how to reach a host, only that a run's commands
    to one share a connection: the inventory alone says how to reach a host. (testinfra 10 reads
    `become = false` from an ansible.cfg as the string "false", which is true, and so would run
    every command through sudo.)
    """
    config = work / "ansible.cfg"
    config.write_text(ansible_config(work))
    bindir = os.fspath(Path(sys.executable).parent)
    path = os.pathsep.join([bindir, os.environ.get("PATH", "")])
    return {**os.environ, "PATH": path, "ANSIBLE_CONFIG": os.fspath(config)}


def ansible_config(work: Path) -> str:
    """The ansible.cfg of a run: testinfra puts `ssh_args` first on every ssh command line to an
    inventory host (before the inventory's own arguments), and, finding ControlMaster and
    ControlPath there, adds neither of its own."""
    control = mux.control_path(work)
    if control is None:
        return ""
    args = " ".join(f"-o {o.replace(' ', '=', 1)}" for o in ssh.control_options(control))
    return "[ssh_connection]\nssh_args = " + args.replace("%", "%%") + "\n"  # % is configparser's


def members(inventory: Path, work: Path) -> list[InventoryHost]:
    """Every host of the inventory, with how to reach it."""
    from testinfra.utils.ansible_runner import AnsibleRunner

    if not inventory.is_file():
        raise UsageError(f"--inventory {inventory}: no such file")
    inventory = inventory.resolve()
    env = tool_env(work)  # the identity reads run in this process
    os.environ["PATH"], os.environ["ANSIBLE_CONFIG"] = env["PATH"], env["ANSIBLE_CONFIG"]
    try:
        runner = AnsibleRunner(os.fspath(inventory))
        names = runner.get_hosts("all")
    except Exception as exc:
        raise UsageError(f"--inventory {inventory}: not an Ansible inventory ({exc})") from None
    found = []
    for name in names:
        hostvars = runner.get_variables(name)
        enrolment = None
        if (path := hostvars.get(ENROLMENT_VARIABLE)) is not None:
            where = inventory.parent / str(path)  # relative to the inventory, like a playbook's files
            enrolment = Enrolment.load(where, what=f"--inventory {inventory}: {name}: {ENROLMENT_VARIABLE}")
        found.append(
            InventoryHost(
                name=name,
                host=str(hostvars.get("ansible_host", name)),
                port=int(hostvars.get("ansible_port", 22)),
                user=str(hostvars.get("ansible_user", "root")),
                inventory=inventory,
                enrolment=enrolment,
            )
        )
    if not found:
        raise UsageError(f"--inventory {inventory}: names no hosts")
    return found
