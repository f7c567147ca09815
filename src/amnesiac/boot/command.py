"""`amnesiac boot`: netboot a build in QEMU and run it until Ctrl-C or power-off."""

from __future__ import annotations

import json
from pathlib import Path

from rich.markup import escape

from amnesiac.boot.errors import BootError
from amnesiac.boot.image import refuse_too_little_memory
from amnesiac.boot.machine import BootOptions, running
from amnesiac.boot.qemu import GUEST_HTTP
from amnesiac.image.manifest import Manifest
from amnesiac.progress import Progress


def command(build_dir: Path, options: BootOptions, *, wait: bool, json_out: bool, timeout: float) -> int:
    """Boot, say how to reach the machine, maybe wait for SSH, run until Ctrl-C."""
    progress = Progress(quiet=json_out)

    def say(text: str) -> None:
        if not progress.quiet:  # soft wrap: the ssh command must stay one line to copy
            progress.console.print(text, soft_wrap=True)

    if options.memory_mib is not None:
        # Measured unless --netboot: a build without a UKI is netbooted whatever it is asked.
        measured = options.measured is not False
        refuse_too_little_memory(
            Manifest.load(build_dir), options.memory_mib, measured=measured, what="--memory"
        )
    with running(build_dir, options) as machine:
        say(
            f"[bold]booting[/] {escape(str(machine.image.dir))} (image {machine.image.sha256[:12]}): "
            f"{machine.memory_mib} MiB, {machine.cpus} vCPUs, {machine.accel.reason}"
        )
        if machine.measured is not None:
            expected = machine.measured.expected_pcrs[11]
            say(f"  measured boot: UEFI, swtpm, the build's UKI with the overlay; PCR 11 must be {expected}")
        else:
            say(f"  netboot: {machine.http_url} (the guest's http://{GUEST_HTTP}/; guest network isolated)")
        say(f"  serial console: {escape(str(machine.serial_log))}")
        if machine.devices:
            say("  test devices: " + ", ".join(d.description for d in machine.devices))
        say(f"  ssh: {escape(machine.ssh_command())}")
        if wait or json_out:
            with progress.stage("boot", "waiting for SSH") as stage:
                seconds = machine.wait_ssh(timeout, on_tick=progress.detail)
                stage.note = machine.ssh_banner
                if machine.measured is None:
                    stage.note += "; served files match manifest.json"
            if machine.emulator_retry:
                why = escape(machine.emulator_retry)
                say(f"  [yellow]booted again[/]: the first boot died of a TCG emulator failure ({why})")
            if json_out:
                print(json.dumps(machine.summary(), indent=2), flush=True)
            say(f"[bold green]ready[/] in {seconds:.1f} s: {escape(machine.ssh_command())}")
        say("[dim]running until Ctrl-C, which powers the machine off and removes its files[/]")
        code = machine.wait_exit()
        console = machine.console(3)
    if "Kernel panic" in console or "amnesiac:" in console:
        raise BootError(f"the machine stopped (QEMU exit {code}): {' / '.join(console.splitlines())}")
    say(f"the machine powered off (QEMU exit {code})")
    return 0
