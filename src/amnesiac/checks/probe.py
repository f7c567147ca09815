"""Evidence: every command a check runs on the target is kept for the report (checks.results
bounds and cleans it, as everywhere)."""

from __future__ import annotations

import shlex
from typing import Any

from amnesiac.checks.results import Evidence, bound_output

# Exit codes that mean the command never ran on the target, so its silence proves nothing:
# 125 is the transport's own failure (podman exec: no such container; chroot: no such root),
# 126 and 127 the shell's "cannot execute" and "not found".
DID_NOT_RUN = {
    125: "the transport failed (no such container or root?)",
    126: "a program could not be executed",
    127: "a program is missing on the target",
}


class TargetError(RuntimeError):
    """The target could not run a probe: the check is an error (proved nothing), not a pass."""


class Probe:
    """Runs commands on the target through testinfra and records each as evidence.

    Checks use `probe.run` rather than `host.run` so that a reviewer sees exactly what was run
    and what came back; `probe.note` records a finding that is not a command.
    """

    def __init__(self, host: Any) -> None:
        self.host = host
        self.evidence: list[Evidence] = []

    def run(self, command: str, *args: str, note: str | None = None) -> Any:
        """Run `command` (args are shell-quoted into it) and return testinfra's CommandResult.

        Raises TargetError when the command did not run at all (DID_NOT_RUN): a check asserting
        that an attempt failed, or that a listing is empty, must not pass because nothing ran.
        """
        result = self.host.run(command, *args)
        shown = command % tuple(shlex.quote(a) for a in args) if args else command
        output = result.stdout + (f"\n[stderr]\n{result.stderr}" if result.stderr.strip() else "")
        self.evidence.append(Evidence(command=shown, exit_code=result.rc, output=output.strip(), note=note))
        if result.rc in DID_NOT_RUN:
            detail = (result.stderr.strip() or result.stdout.strip()).splitlines()[-1:] or [""]
            raise TargetError(
                f"`{bound_output(shown, 200)}` did not run: {DID_NOT_RUN[result.rc]} {detail[0]}".strip()
            )
        return result

    def pci_devices(self, class_prefix: str) -> list[tuple[str, str, str]]:
        """PCI functions of a class (e.g. 0x0c03 USB): (address, vendor:device, driver or "")."""
        out = self.run(
            "for d in /sys/bus/pci/devices/*; do case $(cat $d/class) in " + class_prefix + "*) "
            'echo "$(basename $d) $(cat $d/vendor):$(cat $d/device) '
            '$(basename "$(readlink $d/driver)" 2>/dev/null)";; esac; done'
        ).stdout
        return [
            (f[0], f[1], f[2] if len(f) > 2 else "") for f in (line.split() for line in out.splitlines()) if f
        ]

    def write_accepted(self, path: str, value: str) -> bool:
        """Whether root may write `value` to a one-way kernel setting (a sysctl, a module
        parameter). Called with the value an unlocked setting already has, so the attempt
        changes nothing where it succeeds; a locked setting refuses it."""
        attempt = self.run(
            f'echo {value} 2>&1 > {path} && echo accepted || echo "refused: $?"; cat {path}',
            note=f"writing {value} back to {path}: a locked setting refuses it",
        )
        return "accepted" in attempt.stdout

    def note(self, text: str) -> None:
        self.evidence.append(Evidence(command="", note=bound_output(text)))
