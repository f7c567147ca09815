"""Build benchmark: cold build, rebuilds from the per-role cache, pack profiles, initrd sizes.

Run as root from the repository:  .venv/bin/python -m benchmarks.build [--policy policies/ovpn.yml]
Prints the figures; targets (2 cores): cold <= 120 s, rebuild after one role variable <= 30 s.
Cases, each in the same fresh cache: cold (mmdebstrap and every role), nothing changed (every
role's layer from the cache), a variable of an early role (--early: it and every role after it
run), of a late one (--late), and of another late one (--late-dev) with `--profile development`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def build(out: Path, cache: Path, *extra: str) -> tuple[float, dict[str, object]]:
    start = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "amnesiac.cli",
            "build",
            "--json",
            "--cache",
            str(cache),
            "--out",
            str(out),
            *extra,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.monotonic() - start
    if result.returncode != 0:
        sys.exit(f"build failed: {result.stderr.strip().splitlines()[-1]}")
    summary: dict[str, object] = json.loads(result.stdout)
    return seconds, summary


def line(name: str, seconds: float, summary: dict[str, object]) -> str:
    stages = {s["name"]: s for s in summary["stages"]}  # type: ignore[attr-defined]
    size = summary["artifacts"]["initrd.img"]["size"] / 2**20  # type: ignore[index]
    cached = len(summary["roles_cached"])  # type: ignore[arg-type]
    parts = ", ".join(f"{n} {s['seconds']:.1f}" for n, s in stages.items())
    return f"{name:<60} {seconds:6.1f} s  roles cached {cached}  initrd {size:5.1f} MiB  ({parts})"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--policy", default="policies/ovpn.yml")
    parser.add_argument("--early", default="ssh_admin_port=2222", help="a variable of an early role")
    parser.add_argument("--late", default="input_lockdown_sysrq=false", help="a variable of a late role")
    parser.add_argument(
        "--late-dev",
        default="input_lockdown_ctrl_alt_del=false",
        help="another one, for the development build",
    )
    args = parser.parse_args()
    policy = ("--policy", args.policy)
    cases: list[tuple[str, tuple[str, ...]]] = [
        ("cold (empty cache)", policy),
        ("rebuild, nothing changed", policy),
        (f"rebuild, {args.early}", (*policy, "--var", args.early)),
        (f"rebuild, {args.late}", (*policy, "--var", args.late)),
        (
            f"rebuild, {args.late_dev}, --profile development",
            (*policy, "--var", args.late_dev, "--profile", "development"),
        ),
    ]
    print(f"policy {args.policy}; targets: cold <= 120 s, rebuild after one role variable <= 30 s")
    with tempfile.TemporaryDirectory(prefix="amnesiac-bench-") as tmp:
        base = Path(tmp)
        for number, (name, extra) in enumerate(cases):
            seconds, summary = build(base / f"case{number}", base / "cache", *extra)
            print(line(name, seconds, summary), flush=True)
            if number == 0:
                manifest = json.loads((base / "case0" / "manifest.json").read_text())
                unpacked = manifest["image"]["root_unpacked_bytes"] / 2**20
                tmpfs = manifest["image"]["root_tmpfs_size_bytes"] / 2**20
                print(f"{'root unpacked':<60} {unpacked:6.1f} MiB in a {tmpfs:.0f} MiB tmpfs", flush=True)


if __name__ == "__main__":
    main()
