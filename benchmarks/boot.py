"""Boot and verify benchmark: QEMU start to "VPN serving" and to SSH, smallest RAM, verify time.

Run as root from the repository, with a build:
    .venv/bin/python -m benchmarks.boot build/ovpn [--memory-steps 352,320,304,288]
Prints the figures; targets (TCG, 2 cores): boot <= 30 s, verify <= 45 s, RAM <= 384 MiB.

"VPN serving" is observed, not read from a log: an OpenVPN client's first packet (a hard
reset) is sent to the forwarded UDP port until the server answers with its own.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from amnesiac import boot

REPO = Path(__file__).resolve().parent.parent
# P_CONTROL_HARD_RESET_CLIENT_V2 (opcode 7, key id 0), a session id, no acks, packet id 0.
CLIENT_RESET = bytes([7 << 3]) + os.urandom(8) + b"\x00" + b"\x00\x00\x00\x00"
SERVER_RESET_OPCODE = 8  # P_CONTROL_HARD_RESET_SERVER_V2


def vpn_answers(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.5)
        sock.sendto(CLIENT_RESET, ("127.0.0.1", port))
        try:
            data = sock.recv(2048)
        except OSError:
            return False
    return bool(data) and data[0] >> 3 == SERVER_RESET_OPCODE


def forward_udp(machine: boot.BootedMachine, guest_port: int) -> int:
    """A free UDP port on 127.0.0.1 forwarded to the guest's, added to the running QEMU over QMP."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    rule = f"hostfwd_add {boot.NETDEV} udp:127.0.0.1:{port}-:{guest_port}"
    answer = machine.qmp("human-monitor-command", **{"command-line": rule})
    if answer:  # the monitor answers nothing when the rule is in place
        raise RuntimeError(f"{rule}: {answer.strip()}")
    return port


def boot_times(build: Path, memory: int | None, timeout: float) -> tuple[float | None, float | None, int]:
    """Seconds from QEMU start to SSH and to the VPN answering (None: not within timeout)."""
    vpn: list[float] = []
    with boot.running(build, boot.BootOptions(memory_mib=memory)) as machine:
        port = forward_udp(machine, 1194)  # before the guest's network is up: nothing is missed

        def probe() -> None:
            while time.monotonic() - machine.started < timeout and machine.is_running():
                if vpn_answers(port):
                    vpn.append(time.monotonic() - machine.started)
                    return

        thread = threading.Thread(target=probe, daemon=True)
        thread.start()
        try:
            ssh = machine.wait_ssh(timeout=timeout)
        except Exception:
            return None, None, machine.memory_mib
        thread.join(timeout=max(0.0, timeout - (time.monotonic() - machine.started)))
        return ssh, (vpn[0] if vpn else None), machine.memory_mib


def verify_time(build: Path) -> tuple[float, int]:
    with tempfile.TemporaryDirectory(prefix="amnesiac-bench-") as tmp:
        start = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "amnesiac.cli", "verify", "--json", "--target", f"qemu:{build}",
             "--report", str(Path(tmp) / "report")],
            cwd=REPO, capture_output=True, text=True, check=False,
        )  # fmt: skip
        return time.monotonic() - start, result.returncode


def seconds(value: float | None) -> str:
    return f"{value:.1f} s" if value is not None else "no"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("build", type=Path, nargs="?", default=REPO / "build/ovpn")
    parser.add_argument("--memory-steps", default="352,320,304,288,272", help="MiB, tried in this order")
    parser.add_argument("--timeout", type=float, default=240.0)
    args = parser.parse_args()

    ssh, vpn, memory = boot_times(args.build, None, args.timeout)
    print(f"default RAM         {memory} MiB (the harness's choice from the manifest)")
    print(
        f"QEMU start -> SSH   {ssh:6.1f} s   (target <= 30 s)"
        if ssh
        else "QEMU start -> SSH   did not come up"
    )
    print(
        f"QEMU start -> VPN   {vpn:6.1f} s   (OpenVPN answers a client's hard reset)"
        if vpn
        else "VPN   no answer"
    )

    smallest = None
    for step in (int(s) for s in args.memory_steps.split(",")):
        up, serving, _ = boot_times(args.build, step, args.timeout)
        print(f"  {step:4d} MiB: SSH {seconds(up)}, VPN {seconds(serving)}")
        if not (up and serving):
            break
        smallest = step
    print(f"smallest RAM tried that boots and serves: {smallest} MiB (target <= 384 MiB)")

    elapsed, code = verify_time(args.build)
    print(f"verify qemu: (boot + identity + checks + report) {elapsed:6.1f} s, exit {code} (target <= 45 s)")


if __name__ == "__main__":
    main()
