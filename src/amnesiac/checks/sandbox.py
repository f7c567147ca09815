"""Every daemon the roles run is sandboxed by systemd, within a bound a reviewer can read.

A daemon that is taken over keeps what its sandbox lets it keep: with a read-only system, no
devices and a system call filter it can write no log and load nothing. The bound is the exposure
`systemd-analyze security` gives the unit (0 is the most confined, 10 none); each role's README
records the measured value and what its sandbox leaves open, and why.
"""

from __future__ import annotations

import fnmatch
import re

from amnesiac.checks.meta import RUNNING, check
from amnesiac.checks.probe import Probe

# Unit (a glob) -> the highest exposure its role allows. Measured on the booted images (role
# READMEs); the bound leaves 0.2 to 0.4 for systemd's scoring, never a setting dropped.
EXPOSURE_BOUNDS = {
    "openvpn-server@*.service": 3.0,  # openvpn_server: 2.6
    "unbound.service": 2.5,  # dns_resolver: 2.3
    "ssh.service": 7.8,  # ssh_admin, as far as a management shell allows: 7.6
    "amnesiac-provider-agent.service": 3.0,  # provider_agent: 2.8
    "amnesiac-provider-wireguard.service": 3.4,  # provider_agent (WireGuard peers): 3.1
    "amnesiac-identity-release.service": 2.3,  # provider_agent (identity release): 1.9
    "amnesiac-receive-buffers.service": 5.0,  # no_logs: 4.8
}
EXPOSURE = re.compile(r"^EXPOSURE (\S+) .*Overall exposure level for \S+: ([0-9.]+)", re.MULTILINE)
PROCESS = re.compile(r"^PROCESS (\S+) (\d+) Seccomp:\s*(\d) NoNewPrivs:\s*(\d)$", re.MULTILINE)
UNREAD = re.compile(r"^UNREAD (\S+) (\S*)$", re.MULTILINE)


def _report(units: list[str]) -> str:
    """One round trip for all units: each one's exposure, and the seccomp mode of its running
    main process, asked again for a while when there is none yet or it was replaced in between
    (unbound restarts every 30 s). A unit starting has a main process that is still systemd's
    executor (seen during unbound's restarts), which is applying the sandbox, not yet running under
    it: only a unit that is running and whose process has become its program is read. A unit
    that is stopped (or exited) has no process to show; one that shows none in 10 s is UNREAD,
    never taken for stopped."""
    return " ".join(
        f'echo "EXPOSURE {u} $(systemd-analyze security --no-pager {u} 2>&1 | tail -n 1)"; '
        f"shown=; for i in 1 2 3 4 5 6 7 8 9 10; do state=$(systemctl show -P SubState {u}); "
        f"case $state in dead|exited|failed) shown=stopped; break;; running) ;; *) sleep 1; continue;; esac; "
        f"p=$(systemctl show -P MainPID {u}); "
        f"case $(readlink /proc/$p/exe 2>/dev/null) in ''|*/systemd-executor) sleep 1; continue;; esac; "
        f"s=$(grep -E '^(Seccomp|NoNewPrivs):' /proc/$p/status 2>/dev/null | sort -r | tr '\\n\\t' '  ') "
        f'&& {{ echo "PROCESS {u} $p $s" | tr -s " " | sed "s/ $//"; shown=yes; break; }}; sleep 1; done; '
        f'[ -n "$shown" ] || echo "UNREAD {u} $state";'
        for u in units
    )


@check(
    claims=["no-activity-logging", "no-dns-logging"],
    rationale="Each daemon the image runs (OpenVPN, unbound, sshd, the provider agents) is sandboxed by "
    "systemd within the exposure bound its role's README gives, as PID 1 applies it (systemd-analyze "
    "security), and its running process is under a system call filter: a daemon taken over cannot write "
    "a log, load a module or reach a device the sandbox withholds.",
    targets=RUNNING,
    not_applicable="systemd does not run in an unpacked root",
    integrity=True,
)
def services_sandboxed(probe: Probe) -> None:
    listed = probe.run("systemctl list-units --all --type=service --no-legend --plain").stdout
    loaded = [line.split()[0] for line in listed.splitlines() if line.split()]
    bounds = {
        unit: bound
        for unit in loaded
        for pattern, bound in EXPOSURE_BOUNDS.items()
        if fnmatch.fnmatchcase(unit, pattern)
    }
    assert bounds, f"none of the daemons the roles run is loaded ({', '.join(EXPOSURE_BOUNDS)})"
    shown = probe.run(_report(sorted(bounds))).stdout
    exposure = {unit: float(value) for unit, value in EXPOSURE.findall(shown)}
    unscored = sorted(set(bounds) - set(exposure))
    assert unscored == [], f"systemd-analyze gave no exposure for {unscored}: {shown.strip()[-300:]}"
    running = {unit: (pid, seccomp, nnp) for unit, pid, seccomp, nnp in PROCESS.findall(shown)}
    probe.note(
        "; ".join(
            f"{unit} {exposure[unit]} (bound {bound})"
            + (f", pid {running[unit][0]} seccomp {running[unit][1]}" if unit in running else ", not running")
            for unit, bound in sorted(bounds.items())
        )
    )
    over = {unit: f"{exposure[unit]} > {bound}" for unit, bound in bounds.items() if exposure[unit] > bound}
    assert over == {}, f"daemons less confined than their roles allow: {over}"
    unread = dict(UNREAD.findall(shown))
    assert unread == {}, f"no sandboxed process to read in 10 s (unit: its state): {unread}"
    # What PID 1 says it applies, seen on the process: seccomp mode 2 is a filter.
    unfiltered = sorted(unit for unit, (_, seccomp, _) in running.items() if seccomp != "2")
    assert unfiltered == [], f"running without a system call filter: {unfiltered}"
