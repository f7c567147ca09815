"""Build benchmark: cold build, rebuild after one variable changes, initrd sizes.

Run as root from the repository:  .venv/bin/python -m benchmarks.build [--policy policies/ovpn.yml]
Prints the figures; targets (2 cores): cold <= 150 s, rebuild <= 30 s, initrd <= 40 MB.
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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--policy", default="policies/ovpn.yml")
    parser.add_argument("--var", default="ssh_admin_port=2222", help="the one variable the rebuild changes")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="amnesiac-bench-") as tmp:
        base = Path(tmp)
        cold, summary = build(base / "cold", base / "cache", "--policy", args.policy)
        rebuild, _ = build(base / "rebuild", base / "cache", "--policy", args.policy, "--var", args.var)
        manifest = json.loads((base / "cold" / "manifest.json").read_text())
    initrd = manifest["artifacts"]["initrd.img"]["size"]
    unpacked = manifest["image"]["root_unpacked_bytes"]
    stages = ", ".join(f"{s['name']} {s['seconds']} s" for s in summary["stages"])  # type: ignore[attr-defined]
    print(f"policy              {args.policy}")
    print(f"cold build          {cold:6.1f} s   (target <= 150 s; {stages})")
    print(f"rebuild ({args.var}) {rebuild:6.1f} s   (target <= 30 s)")
    print(f"initrd compressed   {initrd / 1e6:6.1f} MB  (target <= 40 MB)")
    tmpfs = manifest["image"]["root_tmpfs_size_bytes"] / 2**20
    print(f"root unpacked       {unpacked / 1e6:6.1f} MB  (tmpfs {tmpfs:.0f} MiB)")


if __name__ == "__main__":
    main()
