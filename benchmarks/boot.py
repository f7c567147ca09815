"""Boot and verify benchmark: QEMU start to "VPN serving" and to SSH, smallest RAM, verify time.

Run as root from the repository, with a build:
    .venv/bin/python -m benchmarks.boot build/ovpn [--memory-steps 416,384,352]
Prints the figures; targets (TCG, 2 cores): boot <= 30 s, verify <= 45 s, RAM <= 384 MiB.

"VPN serving" is observed, not read from a log: an OpenVPN client's first packet (a hard
reset) is sent from the client link's namespace (boot/link.py) until the server answers with
its own. A server serves no one until it has its provider identity (#12), so each boot is
given one as `verify qemu:` gives it: a reference provider on loopback, its node identity in
the boot overlay. The RAM steps start at the harness's own choice (a measured boot holds the
UKI too, #14) and go down 32 MiB at a time until a boot does not serve.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from amnesiac import boot
from amnesiac.image.manifest import Manifest
from amnesiac.provider.harness import reference_provider
from amnesiac.targets.qemu import AgentBuild

REPO = Path(__file__).resolve().parent.parent
# P_CONTROL_HARD_RESET_CLIENT_V2 (opcode 7, key id 0), a session id, no acks, packet id 0.
CLIENT_RESET = bytes([7 << 3]) + os.urandom(8) + b"\x00" + b"\x00\x00\x00\x00"
SERVER_RESET_OPCODE = 8  # P_CONTROL_HARD_RESET_SERVER_V2


def vpn_answers(address: str, port: int, proto: str) -> bool:
    """Whether OpenVPN at `address`:`port` answers a client's hard reset with its own."""
    if proto == "tcp":  # each packet after its 16-bit length
        try:
            with socket.create_connection((address, port), timeout=0.5) as tcp:
                tcp.sendall(len(CLIENT_RESET).to_bytes(2, "big") + CLIENT_RESET)
                data = tcp.recv(2048)[2:]
        except OSError:
            return False
    else:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(0.5)
            try:
                sock.sendto(CLIENT_RESET, (address, port))
                data = sock.recv(2048)
            except OSError:  # no route yet, refused, or no answer
                return False
    return bool(data) and data[0] >> 3 == SERVER_RESET_OPCODE


def probe(address: str, port: int, proto: str, until: float) -> None:
    """Run inside the client link's namespace: ask until OpenVPN answers or time.monotonic()
    reaches `until` (one clock for every namespace), then print when it answered, if it did."""
    while time.monotonic() < until:
        if vpn_answers(address, port, proto):
            print(time.monotonic(), flush=True)
            return
        time.sleep(0.2)


def boot_times(build: Path, memory: int | None, timeout: float) -> tuple[float | None, float | None, int]:
    """Seconds from QEMU start to SSH and to the VPN answering (None: not within timeout).

    The VPN is asked from the client link's namespace, as a client reaches it: QEMU's isolated
    user network drops every UDP datagram the guest sends (boot/link.py), answers included."""
    agent = AgentBuild.of(Manifest.load(build))
    if agent is None:
        raise SystemExit(f"{build}: no OpenVPN server that asks a provider (openvpn_server, provider_agent)")
    with (
        tempfile.TemporaryDirectory(prefix="amnesiac-bench-") as work,
        reference_provider(Path(work), agent.records) as provider,
    ):
        options = boot.BootOptions(
            memory_mib=memory,
            overlay_files=provider.overlay_files,
            guest_services=(provider.guest_service,),
            client_link=True,
        )
        with boot.running(build, options) as machine:
            assert machine.link is not None
            code = (
                "import sys; from benchmarks.boot import probe; "
                "probe(sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4]))"
            )
            argv = [sys.executable, "-c", code, machine.link.guest_address, str(agent.openvpn_port)]
            argv += [agent.openvpn_proto, str(machine.started + timeout)]
            asking = subprocess.Popen(machine.link.command(argv), cwd=REPO, stdout=subprocess.PIPE, text=True)
            try:
                ssh = machine.wait_ssh(timeout=timeout)
            except Exception:
                asking.kill()
                asking.wait()
                return None, None, machine.memory_mib
            left = machine.started + timeout - time.monotonic()  # the probe gives up by then
            answered = asking.communicate(timeout=max(left, 0.0) + 5)[0]
            vpn = float(answered) - machine.started if answered.strip() else None
            return ssh, vpn, machine.memory_mib


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
    parser.add_argument(
        "--memory-steps",
        help="MiB, tried in this order (default: the harness's choice, then 32 MiB less each)",
    )
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

    steps = (
        [int(s) for s in args.memory_steps.split(",")]
        if args.memory_steps
        else [memory - 32 * n for n in range(1, 5)]  # the default boot was the first step
    )
    smallest = memory if ssh and vpn and not args.memory_steps else None
    for step in steps:
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
