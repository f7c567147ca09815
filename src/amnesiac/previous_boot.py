"""What the server leaves in its RAM for whatever boots after it: "everything is in RAM, gone at
reboot", measured.

A reboot does not clear RAM: the firmware hands it, as it was, to the next system, which may be
one that whoever seized the server brought. What the image can clear is what it frees on its
way down (every process's memory and every tmpfs it unmounts, cleared by init_on_free, and the
root tmpfs's files: ram_root_clear_at_shutdown). So the search runs on the RAM exactly as the
image left it: the server is rebooted the orderly way, as an administrator or a data centre
would, with QEMU told to stop the machine where it would reset, then its whole RAM is dumped.

A reset (the button) leaves everything the running server held, as any machine does; that is
what the other checks bound. Its next boot of this image clears every page it does not use
(init_on_free clears memory as the kernel frees it at boot), which a benchmark measures
(benchmarks/reset.py) rather than every verification, as under emulation it costs minutes.
"""

from __future__ import annotations

import secrets
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from amnesiac.boot.memory import MemorySearch, search_guest
from amnesiac.boot.qmp import Qmp
from amnesiac.canary import NEVER
from amnesiac.checks.expectations import GuestMemory
from amnesiac.residue import escaped_bytes

SHUTDOWN_SECONDS = 180.0  # a bound on the orderly reboot, under emulation
PLANTED_BYTES = 262144  # per file: 64 pages, so that what survives is counted, not guessed
# A DNS query (header, then the name's labels, type A, class IN) for the resolver on loopback.
DNS_HEADER = bytes.fromhex("5a5a 0100 0001 0000 0000 0000")
# What must be found before the reboot (the positive control): the resolver's canary is looked
# for too, but an image may have no resolver.
MUST_BE_SEEN = ("root tmpfs file", "shared memory file", "process memory")


@dataclass(frozen=True)
class Planted:
    """Canaries planted in the running server: what it holds in files of its tmpfs filesystems,
    in a process's memory and in its resolver."""

    token: str

    @classmethod
    def fresh(cls) -> Planted:
        return cls(secrets.token_hex(8))

    def needles(self) -> dict[str, bytes]:
        return {
            "root tmpfs file": f"amnesiac-root-{self.token}".encode(),
            "shared memory file": f"amnesiac-shm-{self.token}".encode(),
            "process memory": f"amnesiac-process-{self.token}".encode(),
            "resolver query": f"amnesiac-dns-{self.token}".encode(),
            NEVER: f"amnesiac-never-{self.token}".encode(),
        }

    def command(self) -> str:
        """Plant them, each only in what it names: the command carries them as `\\xNN` escapes
        that the server's shell expands (the negative control never leaves the verifier)."""
        n = {name: escaped_bytes(value) for name, value in self.needles().items()}
        name = self.needles()["resolver query"] + b".example"
        query = escaped_bytes(DNS_HEADER + _labels(name) + b"\x00\x01\x00\x01")
        holder = 'echo $$ > /dev/shm/amnesiac-canary.pid; exec env "CANARY=$1" sleep 86400'
        running = 'test "$(cat /proc/$(cat /dev/shm/amnesiac-canary.pid)/comm)" = sleep'
        fill, quiet = f"head -c {PLANTED_BYTES}", "/dev/null 2>&1"
        script = "\n".join(
            [
                f"yes \"$(printf '{n['root tmpfs file']}')\" | {fill} > /var/tmp/amnesiac-canary",
                f"yes \"$(printf '{n['shared memory file']}')\" | {fill} > /dev/shm/amnesiac-canary",
                f"setsid -f sh -c '{holder}' sh \"$(printf '{n['process memory']}')\" < /dev/null > {quiet}",
                f"printf '{query}' > /dev/udp/127.0.0.1/53 2> /dev/null || true",
                # Until the process runs with its canary (setsid returns before it has).
                f"for i in $(seq 100); do {running} 2> /dev/null && break; sleep 0.1; done",
                "sync",
            ]
        )
        return f"bash -c {shlex.quote(script)}"


@dataclass
class Reboot:
    """The server's RAM before an orderly reboot and as the reboot left it for the next system."""

    planted: Planted
    before: MemorySearch
    after: MemorySearch | None  # None: the server never reached the reset
    shutdown_seconds: float
    state: str  # QEMU's run state at the end ("shutdown": stopped where it would have reset)

    def kept(self) -> dict[str, list[int]]:
        """Per canary found before the reboot, its addresses in RAM after it."""
        if self.after is None:
            return {}
        seen = {name for name, hits in self.before.hits.items() if hits}
        return {name: hits for name, hits in self.after.hits.items() if hits and name in seen}


def across_reboot(guest: GuestMemory, shell: Callable[[str], str], hang_up: Callable[[], None]) -> Reboot:
    """Plant canaries (through `shell`, a root shell on the server), search the RAM, have the
    server reboot the orderly way and stop where it would reset, search again. The machine stays
    stopped: this is the last thing a run does with it. `hang_up` ends the verifier's shared SSH
    connection first (the reboot would leave it dead)."""
    planted = Planted.fresh()
    needles = planted.needles()
    shell(planted.command())
    qmp = Qmp(Path(guest.qmp_socket), timeout=60.0)
    try:
        before = search_guest(qmp, Path(guest.dump_dir), needles)
        hang_up()
        # Where the machine would reset, it stops instead (QEMU's reboot action is already
        # "shutdown": the harness runs it with -no-reboot).
        qmp.execute("set-action", reboot="shutdown", shutdown="pause")
        start = time.monotonic()
        shell("nohup sh -c 'sleep 1; systemctl reboot' > /dev/null 2>&1 &")
        state = "running"
        while time.monotonic() - start < SHUTDOWN_SECONDS:
            state = qmp.execute("query-status")["status"]
            if state != "running":
                break
            time.sleep(1.0)
        seconds = round(time.monotonic() - start, 1)
        after = search_guest(qmp, Path(guest.dump_dir), needles) if state == "shutdown" else None
    finally:
        qmp.close()
    return Reboot(planted, before, after, seconds, state)


def _labels(name: bytes) -> bytes:
    return b"".join(bytes([len(p)]) + p for p in name.split(b".")) + b"\x00"
