"""`--timeline FILE`: when each test ran on which worker, and how busy the CPUs were.

`make test` passes it to the slow tiers: their two lanes (tests/images.py) are where the run's
time goes, and `--durations` alone cannot show a lane waiting for the other's build or idling at
the end. Each worker appends a line per test to FILE; the controller prints each lane's tests
in order (start and length, in seconds from the session's start) and the CPU time used over the
whole run, from /proc/stat (on two cores, the ceiling any reordering of the lanes can reach).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Generator
from pathlib import Path

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--timeline",
        metavar="FILE",
        help="record each test's worker, start and end in FILE (JSON lines) and print each lane",
    )


def _cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of every CPU since boot."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _is_controller(config: pytest.Config) -> bool:
    return not hasattr(config, "workerinput")


# The session's start on the controller: wall time and CPU ticks.
_START = pytest.StashKey[tuple[float, tuple[int, int]]]()


def pytest_sessionstart(session: pytest.Session) -> None:
    config = session.config
    path = config.getoption("timeline")
    if path and _is_controller(config):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text("")
        config.stash[_START] = (time.time(), _cpu_ticks())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, object, object]:
    path = item.config.getoption("timeline")
    start = time.time()
    try:
        return (yield)
    finally:
        if path:
            line = {
                "worker": os.environ.get("PYTEST_XDIST_WORKER", "main"),
                "test": item.nodeid,
                "start": start,
                "end": time.time(),
            }
            with Path(path).open("a") as file:  # one short write per line: whole under O_APPEND
                file.write(json.dumps(line) + "\n")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    path = config.getoption("timeline")
    if not path or not _is_controller(config) or _START not in config.stash:
        return
    began, (busy0, total0) = config.stash[_START]
    busy1, total1 = _cpu_ticks()
    ended = time.time()
    lines = [json.loads(line) for line in Path(path).read_text().splitlines() if line]
    write = terminalreporter.write_line
    terminalreporter.section("timeline (s from the session's start)")
    cpus = os.cpu_count() or 1
    used = (busy1 - busy0) / max(total1 - total0, 1)
    write(f"{ended - began:.0f} s; CPU busy {used:.0%} of {cpus} CPUs over the run")
    for worker in sorted({line["worker"] for line in lines}):
        mine = sorted((line for line in lines if line["worker"] == worker), key=lambda line: line["start"])
        busy = sum(line["end"] - line["start"] for line in mine)
        last = max(line["end"] for line in mine) - began
        write(f"{worker}: {len(mine)} tests, {busy:.0f} s in tests, last ended at {last:.0f}")
        for line in mine:
            length = line["end"] - line["start"]
            if length >= 1:
                write(f"  {line['start'] - began:6.0f} {length:6.0f}  {line['test']}")
