"""sandbox.services_sandboxed reads systemd-analyze's and /proc's own words: parsed as captured
from a booted OVPN image."""

from __future__ import annotations

import fnmatch

from amnesiac.checks.sandbox import EXPOSURE, EXPOSURE_BOUNDS, PROCESS, _report

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


def test_one_round_trip_asks_for_each_unit() -> None:
    script = _report(["ssh.service", "unbound.service"])
    assert script.count("systemd-analyze security --no-pager") == 2
    assert "inactive|failed) break" in script  # a stopped unit has no process to wait for
