"""A warm reset: the reset button, not a power cycle.

QEMU keeps the guest's RAM across a reset, as most machines do: what the previous boot held is
there for the firmware and the next kernel to clear, or not (amnesiac.previous_boot searches it).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from amnesiac import ssh
from amnesiac.boot.errors import BootError
from amnesiac.boot.qemu import KERNEL_STARTED, read_log
from amnesiac.boot.qmp import Qmp


@contextlib.contextmanager
def warm_reset(qmp: Qmp) -> Iterator[None]:
    """Reset the machine now; it boots again from its firmware, RAM as it was. Leave the context
    once the new boot is up."""
    # The harness runs QEMU with -no-reboot (a failed boot ends it), which turns every reset into
    # a power-off. Resets stay resets until the context ends: SeaBIOS resets the machine once more
    # as it starts again after a warm reset (measured: a second RESET event, "guest-reset").
    qmp.execute("set-action", reboot="reset")
    try:
        qmp.execute("system_reset")
        yield
    finally:
        qmp.execute("set-action", reboot="shutdown")


def boot_again(
    qmp: Qmp,
    serial_log: Path,
    ssh_port: int,
    timeout: float,
    alive: Callable[[str], None] = lambda when: None,
) -> float:
    """A warm reset, then wait for the new boot: its kernel on the serial console (the old boot's
    sshd could answer a moment longer), then its sshd's banner; seconds from the reset. `alive`
    raises when the machine is gone (it is given what was being waited for)."""
    seen, start = len(read_log(serial_log)), time.monotonic()
    deadline = start + timeout

    def wait(what: str, done: Callable[[], bool]) -> None:
        while not done():
            alive(f"after a reset, before {what}")
            if time.monotonic() > deadline:
                raise BootError(f"{what}: not {timeout:.0f} s after a reset")
            time.sleep(0.5)

    with warm_reset(qmp):
        wait("the kernel started again", lambda: KERNEL_STARTED in read_log(serial_log)[seen:])
    wait("sshd answered again", lambda: bool(ssh.read_banner(ssh_port)))
    return round(time.monotonic() - start, 1)
