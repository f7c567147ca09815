"""Time to forget: a canary session through a booted build, then its whole RAM searched from the
host until nothing of the session is left or the bound passes (amnesiac.canary).

Prints, per canary kind, how many copies the server held during the session, the seconds after
the disconnect until none was left (or what still holds it at the bound), the RAM searched per
second and the whole measurement's time. A figure, never an assertion.

    .venv/bin/python -m benchmarks.forget build/cloudvpn [--bound 120] [--wireguard wg0]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from amnesiac import canary
from amnesiac.progress import Progress
from amnesiac.targets.base import ReachOptions
from amnesiac.targets.qemu import QemuTarget

MIB = 1024 * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("build", type=Path, help="a build directory whose policy asks a provider")
    parser.add_argument(
        "--bound", type=float, default=120.0, help="seconds to keep searching after the disconnect"
    )
    parser.add_argument(
        "--wireguard", metavar="INTERFACE", help="a WireGuard session through this interface, not OpenVPN"
    )
    args = parser.parse_args()
    target = QemuTarget.parse(str(args.build), f"qemu:{args.build}")
    with tempfile.TemporaryDirectory(prefix="amnesiac-forget-") as tmp:
        options = ReachOptions(work=Path(tmp), progress=Progress())
        with target.reach(options) as connection:
            if connection.provider is None or connection.guest_memory is None:
                raise SystemExit(f"{args.build}: no provider agent in this build, so no session to measure")
            host = connection.testinfra_host()
            start = time.monotonic()
            result = canary.measure(
                connection.provider,
                connection.guest_memory,
                lambda cmd: host.run(cmd).stdout,
                bound=args.bound,
                wireguard=args.wireguard,
            )
            whole = time.monotonic() - start
    searches = [result.during, *result.after]
    traffic = [ln for ln in result.client_log.strip().splitlines() if not ln.startswith(("20", "  "))]
    print(f"\n{result.vpn} session traffic: {traffic[:6]}")
    print(f"the payload reached the sink through the server: {result.sink_received}")
    print(f"{'canary':22} {'during':>7} {'forgotten after':>16}   shown during by / still held at the end by")
    kept = result.kept()
    gone = result.forgotten_after()
    for name in result.during.hits:
        during = len(result.during.hits.get(name, []))
        when = gone.get(name)
        shown = (
            "-" if name not in gone else (f"{when:.0f} s" if when is not None else f"> {args.bound:.0f} s")
        )
        views = result.during.views.get(name, {})
        print(f"{name:22} {during:7d} {shown:>16}   {views or ''} / {kept.get(name, '')}")
    searched = sum(s.searched_bytes for s in searches) / MIB
    rate = searched / sum(s.seconds for s in searches)
    size = result.during.searched_bytes / MIB
    print(f"\n{len(searches)} searches of {size:.0f} MiB: {rate:.0f} MiB/s, dump included")
    print(f"whole measurement (session, searches, attribution): {whole:.1f} s")


if __name__ == "__main__":
    main()
