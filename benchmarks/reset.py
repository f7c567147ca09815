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
import tempfile
from pathlib import Path

from amnesiac import previous_boot, ssh
from amnesiac.boot.memory import MemorySearch
from amnesiac.progress import Progress
from amnesiac.targets import mux
from amnesiac.targets.base import ReachOptions
from amnesiac.targets.qemu import QemuTarget

MIB = 1024 * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("build", type=Path, help="a build directory")
    parser.add_argument("--case", choices=("reboot", "reset"), default="reboot")
    args = parser.parse_args()
    target = QemuTarget.parse(str(args.build), f"qemu:{args.build}")
    with tempfile.TemporaryDirectory(prefix="amnesiac-reset-") as tmp:
        options = ReachOptions(work=Path(tmp), progress=Progress())
        with target.reach(options) as connection:
            machine, guest, config = connection.machine, connection.guest_memory, connection.ssh_config
            if machine is None or guest is None or config is None:
                raise SystemExit(f"{args.build}: the verifier cannot read this machine's RAM")
            host = connection.testinfra_host()
            url = ssh.parse_url(connection.host, option="connection", path=False)

            def shell(command: str) -> str:
                return str(host.run(command).stdout)

            if args.case == "reboot":
                result = previous_boot.across_reboot(guest, shell, hang_up=lambda: mux.hang_up(config, url))
                before, after, seconds = result.before, result.after, result.shutdown_seconds
                what = f"`systemctl reboot` to the stop where it would reset (QEMU: {result.state})"
            else:
                planted = previous_boot.Planted.fresh()
                shell(planted.command())
                before = machine.search_memory(planted.needles())
                mux.hang_up(config, url)  # the reset would leave it dead
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
