"""Molecule benchmark: the base image (cold and cached), one role's `molecule test`, all of them.

Run as root from the repository:  .venv/bin/python -m benchmarks.molecule [--role no_logs] [--cold]
Prints the figures, the load average next to each (2 cores; other jobs share them), and each
scenario's steps. Target: <= 45 s for one role's `molecule test`.
--cold removes the cached base image and tarball first, to time mmdebstrap and the import.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from amnesiac import container

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# Molecule's log lines without colour: "INFO     [no_logs > converge] Executing".
STEP = re.compile(r"^[A-Z]+ +\[[\w-]+ > (\w+)\] (Executing|Executed: \w+)")


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def molecule_test(scenario: str, image: container.BaseImage) -> tuple[float, bool, str]:
    """Run `molecule test -s SCENARIO`; its time, success, and the time of each step."""
    env = {**os.environ, **container.molecule_env(image, scenario), "NO_COLOR": "1"}
    start = time.monotonic()
    steps: list[str] = []
    began: dict[str, float] = {}
    with subprocess.Popen(
        [BIN / "molecule", "test", "-s", scenario],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            if not (match := STEP.search(line)):
                continue
            step, what = match.groups()
            if what == "Executing":
                began[step] = time.monotonic()
            elif step in began:
                steps.append(f"{step} {time.monotonic() - began.pop(step):.1f}")
    seconds = time.monotonic() - start
    return seconds, proc.returncode == 0, ", ".join(steps)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--role", default="no_logs", help="the scenario timed alone first")
    parser.add_argument("--cold", action="store_true", help="build the base image from nothing first")
    args = parser.parse_args()
    spec = container.spec()
    if args.cold:
        image = container.ensure(spec, container.state_dir())
        subprocess.run(["podman", "rmi", "--force", image.tag], env=container.podman_env(), check=True)
        image.tarball.unlink(missing_ok=True)
    image = container.ensure(spec, container.state_dir())
    done = "built and imported" if image.built else "imported" if image.imported else "cached"
    print(f"base image          {image.seconds:6.1f} s   ({done}: {image.tag})")
    image = container.ensure(spec, container.state_dir())
    print(f"base image, again   {image.seconds:6.1f} s   (cached)")

    scenarios = sorted(p.parent.name for p in (REPO / "molecule").glob("*/molecule.yml"))
    total = 0.0
    failed = []
    for scenario in [args.role, *(s for s in scenarios if s != args.role)]:
        seconds, ok, steps = molecule_test(scenario, image)
        total += seconds
        if not ok:
            failed.append(scenario)
        target = "  (target <= 45 s)" if scenario == args.role else ""
        verdict = "ok" if ok else "FAILED"
        print(f"{scenario:<19} {seconds:6.1f} s{target}  {verdict}  load {load()}  [{steps}]")
    print(f"all {len(scenarios)} scenarios     {total:6.1f} s")
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
