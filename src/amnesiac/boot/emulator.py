"""QEMU's process for one boot, and the one boot more that the emulator is allowed.

QEMU 7.2's multi-threaded TCG can let one vCPU run code that another has just repatched (the
kernel's int3-based text patching: static keys in its first seconds, then again as udev loads
modules): 1 TCG boot in 46 measured ended in "Oops: int3" and "Kernel panic - not syncing:
Fatal exception in interrupt"; clean clones' boots died so 1.6-3.3 s in, one of a "double fault"
in __kmalloc with garbage flags 0.27 s in, and others after /init (CI's netboot 3.3 s in, one
17.5 s in on 2026-12-04): the same emulator (benchmarks/README.md). One host thread for both vCPUs
(`-accel tcg,thread=single`) avoids it at about +60 % boot time. Instead, under TCG, a boot whose
kernel oopsed before anything was observed of it (before SSH answered, before the console
showed what a caller waited for) is booted once more from the same files, and the machine
records that it was. Debian's kernel does not oops by itself on QEMU's machine: an oops the
image causes happens on the second boot too, and is reported.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from amnesiac.boot.qemu import die_with_parent
from amnesiac.run import spawn, stop_group

KERNEL_OOPS = re.compile(r"\bOops: ")


@dataclass
class Emulator:
    """The QEMU command line of a boot and the process running it (`start()` first)."""

    argv: list[str]
    log: Path  # QEMU's stdout and stderr, appended to by each start
    tcg: bool  # only the emulator's boots are booted again (KVM runs the guest on the CPU)
    # Run before booting again: what is not QEMU's own memory made as it was at the first start
    # (a measured boot's swtpm, which ends with its QEMU; the blank test disks).
    before_again: Callable[[], None] | None = None
    pass_fds: tuple[int, ...] = ()  # descriptors QEMU is given (the client link's tap)
    lost: str | None = None  # why the first boot was the emulator's failure, once it was
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def process(self) -> subprocess.Popen[bytes]:
        if self._process is None:
            raise RuntimeError("the emulator was not started")
        return self._process

    def start(self) -> subprocess.Popen[bytes]:
        with self.log.open("ab") as err:
            # Its own session (spawn): Ctrl-C reaches us and we stop QEMU ourselves.
            self._process = spawn(
                self.argv, stdout=err, stderr=err, preexec_fn=die_with_parent, pass_fds=self.pass_fds
            )
        return self._process

    def stop(self, grace: float) -> None:
        """End QEMU (after `grace` s to end by itself), and its relay children (busybox nc),
        which share its process group; nothing to do before `start()`."""
        if self._process is not None:
            stop_group(self._process, grace=grace, term_timeout=5)

    def boot_again(self, console: str, why: str) -> bool:
        """QEMU ended, its console `console`: if that was the emulator's failure (a kernel oops
        under TCG) and the first, start the same boot again and keep `why`. False otherwise:
        the caller reports the failure."""
        if not self.tcg or self.lost is not None or KERNEL_OOPS.search(console) is None:
            return False
        self.lost = why
        self.stop(grace=1)  # its relay children, if any are left
        if self.before_again is not None:
            self.before_again()
        self.start()  # QEMU truncates the serial log it reopens
        return True
