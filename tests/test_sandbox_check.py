"""sandbox.services_sandboxed reads systemd-analyze's and /proc's own words: parsed as captured
from a booted OVPN image."""

from __future__ import annotations

import fnmatch
import subprocess
import sys
from pathlib import Path

from amnesiac.checks.sandbox import EXPOSURE, EXPOSURE_BOUNDS, PROCESS, UNREAD, _report

# As the check's one round trip printed it on a booted image (unbound between two processes).
SHOWN = """\
EXPOSURE openvpn-server@server.service → Overall exposure level for openvpn-server@server.service: 2.6 OK :-)
PROCESS openvpn-server@server.service 406 Seccomp: 2 NoNewPrivs: 1
EXPOSURE ssh.service → Overall exposure level for ssh.service: 7.6 EXPOSED :-(
PROCESS ssh.service 3273 Seccomp: 2 NoNewPrivs: 0
EXPOSURE unbound.service → Overall exposure level for unbound.service: 9.6 UNSAFE :-{
"""


def test_exposures_and_processes_are_read_per_unit() -> None:
    exposure = {unit: float(value) for unit, value in EXPOSURE.findall(SHOWN)}
    assert exposure == {"openvpn-server@server.service": 2.6, "ssh.service": 7.6, "unbound.service": 9.6}
    running = {unit: (pid, seccomp) for unit, pid, seccomp, _ in PROCESS.findall(SHOWN)}
    assert running == {"openvpn-server@server.service": ("406", "2"), "ssh.service": ("3273", "2")}


def test_every_unit_pattern_has_a_bound_and_the_openvpn_instances_match() -> None:
    assert all(0 < bound < 10 for bound in EXPOSURE_BOUNDS.values())
    assert any(fnmatch.fnmatchcase("openvpn-server@udp-1194.service", p) for p in EXPOSURE_BOUNDS)
    assert not any(fnmatch.fnmatchcase("systemd-udevd.service", p) for p in EXPOSURE_BOUNDS)


def test_one_round_trip_reads_running_units_and_never_takes_a_silent_one_for_stopped(tmp_path: Path) -> None:
    """The round trip against a fake systemctl: a running unit's process is read from /proc (this
    test's own child stands in for it), a stopped one has none, one that never settles is UNREAD."""
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as child:
        states = {"ssh.service": "running", "openvpn-server@a.service": "dead", "unbound.service": "start"}
        cases = "".join(f'*"SubState {unit}"*) echo {state};; ' for unit, state in states.items())
        fakes = {
            "systemctl": f'case "$*" in {cases}*"MainPID ssh.service"*) echo {child.pid};; *) echo 0;; esac',
            "systemd-analyze": 'echo "→ Overall exposure level for $3: 2.0 OK :-)"',
            "sleep": "true",  # ten tries of a unit that never settles, at once
        }
        for name, body in fakes.items():
            (tmp_path / name).write_text(f"#!/bin/bash\n{body}\n")
            (tmp_path / name).chmod(0o755)
        script = _report(sorted(states))
        env = {"PATH": f"{tmp_path}:/usr/bin:/bin"}
        shown = subprocess.run(
            ["bash", "-c", script], env=env, capture_output=True, text=True, check=True
        ).stdout
        child.kill()
    assert sorted(unit for unit, _ in EXPOSURE.findall(shown)) == sorted(states)
    assert [(unit, pid) for unit, pid, *_ in PROCESS.findall(shown)] == [("ssh.service", str(child.pid))]
    assert dict(UNREAD.findall(shown)) == {"unbound.service": "start"}
