"""What a booted build leaves of its previous boot in RAM: canaries planted (amnesiac.previous_boot:
a file in the root tmpfs and in /dev/shm, a process's memory, a resolver query), the whole RAM
searched, then either

- `--case reboot`: `systemctl reboot` with QEMU stopping the machine where it would reset, and
  the RAM searched as the image left it for the next system (what amnesia.previous_boot_forgotten
  checks at every verification), or
- `--case reset`: a warm reset (QMP system_reset: the button, RAM as it was), the build booted
  again, and its RAM searched once sshd answers (what the next boot of this image clears).

Prints the copies of each canary before and after, and the seconds the reboot or the reset took.
A figure, never an assertion.

    .venv/bin/python -m benchmarks.reset build/ovpn --case reset
"""

from __future__ import annotations

import argparse
import shlex
import tempfile
from pathlib import Path

from amnesiac import boot, previous_boot
from amnesiac.boot.memory import MemorySearch
from amnesiac.checks.expectations import GuestMemory
from amnesiac.run import run
from amnesiac.targets.qemu import throwaway_key

MIB = 1024 * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("build", type=Path, help="a build directory")
    parser.add_argument("--case", choices=("reboot", "reset"), default="reboot")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="amnesiac-reset-") as tmp:
        key = throwaway_key(Path(tmp))
        with boot.running(args.build, boot.BootOptions(ssh_key=key.with_suffix(".pub"))) as machine:
            print(f"SSH after {machine.wait_ssh():.0f} s")

            def shell(command: str) -> str:
                argv = [*shlex.split(machine.ssh_command()), "-o", "BatchMode=yes", command]
                return str(run(argv, capture=True, check=False, timeout=120).stdout.decode())

            guest = GuestMemory(
                qmp_socket=str(machine.checks_qmp),
                dump_dir=str(machine.work),
                memory_mib=machine.memory_mib,
                serial_log=str(machine.serial_log),
                ssh_port=machine.ssh_port,
            )
            if args.case == "reboot":
                result = previous_boot.across_reboot(guest, shell, hang_up=lambda: None)
                before, after, seconds = result.before, result.after, result.shutdown_seconds
                what = f"`systemctl reboot` to the stop where it would reset (QEMU: {result.state})"
            else:
                planted = previous_boot.Planted.fresh()
                shell(planted.command())
                before = machine.search_memory(planted.needles())
                seconds = machine.reset()
                after = machine.search_memory(planted.needles())
                what = "warm reset to the new boot's sshd"
    report(before, after, seconds, what)


def report(before: MemorySearch, after: MemorySearch | None, seconds: float, what: str) -> None:
    print(f"{what}: {seconds:.1f} s; {before.searched_bytes / MIB:.0f} MiB searched each time")
    print(f"{'canary':20} {'before':>8} {'after':>8}")
    for name, hits in before.hits.items():
        left = "-" if after is None else str(len(after.hits.get(name, [])))
        print(f"{name:20} {len(hits):8d} {left:>8}")


if __name__ == "__main__":
    main()
