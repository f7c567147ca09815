"""No logs: no syslog daemon, journald keeps nothing, no login records, nothing in /var/log.

The canary checks write a unique string the way a daemon would log it, then search every file
on the target for it. A positive control (the same string planted in a file of our own) proves
the search would have found it.
"""

from __future__ import annotations

import secrets

from amnesiac.checks.meta import KERNEL, RUNNING, Surface, check
from amnesiac.checks.probe import Probe

SYSLOG_PACKAGES = (
    "rsyslog",
    "syslog-ng-core",
    "busybox-syslogd",
    "inetutils-syslogd",
    "sysklogd",
    "logrotate",
    # Multi-call binaries: their syslogd and klogd applets are a syslog daemon one command away.
    "busybox",
    "busybox-static",
    "toybox",
)
# Daemons and multi-call binaries, wherever a package manager would not see them.
SYSLOG_BINARIES = (
    "/usr/sbin/rsyslogd",
    "/usr/sbin/syslog-ng",
    "/usr/sbin/syslogd",
    "/sbin/syslogd",
    "/usr/bin/busybox",
    "/bin/busybox",
    "/usr/sbin/busybox",
    "/usr/bin/toybox",
)
SYSLOG_DAEMONS = ("rsyslogd", "syslog-ng", "syslogd", "klogd", "auditd")
LOGIN_RECORDS = (
    "/var/log/wtmp",
    "/var/log/btmp",
    "/var/log/lastlog",
    "/var/log/wtmp.db",  # trixie's sshd-session writes wtmpdb's database directly
    "/run/utmp",
    "/var/lib/wtmpdb/wtmp.db",
    "/var/lib/lastlog/lastlog2.db",
)
# Where a search for a canary does not look: kernel and device views, not storage.
PSEUDO = ("/proc", "/sys", "/dev")


def canary() -> str:
    return f"amnesiac-canary-{secrets.token_hex(8)}"


def find_everywhere(probe: Probe, text: str) -> list[str]:
    """Every file on the target that contains `text`, with a planted positive control."""
    control = f"/run/amnesiac-positive-control-{secrets.token_hex(4)}"
    probe.run(f"printf '%s\\n' {text} > {control}", note="positive control: plant the canary in a file")
    prune = " -o ".join(f"-path {p}" for p in PSEUDO)
    found = probe.run(
        f"find / \\( {prune} \\) -prune -o -type f -print0 2>/dev/null | xargs -0 -r grep -lsF -- {text}"
    ).stdout.split()
    probe.run(f"rm -f {control}")
    assert control in found, "the search did not find the planted positive control: it proves nothing"
    return [f for f in found if f != control]


def _installed(probe: Probe, packages: tuple[str, ...]) -> list[str]:
    out = probe.run(
        "dpkg-query -W -f '${Package} ${db:Status-Status}\\n' " + " ".join(packages) + " 2>/dev/null"
    ).stdout
    return [line.split()[0] for line in out.splitlines() if line.endswith(" installed")]


@check(
    claims=["no-syslog", "no-activity-logging"],
    rationale="No syslog daemon is installed or running, so nothing turns log messages into files; "
    "nor is a multi-call binary (busybox, toybox) whose syslogd applet would be one.",
)
def no_syslog_daemon(probe: Probe, kind: Surface) -> None:
    installed = _installed(probe, SYSLOG_PACKAGES)
    assert installed == [], f"a syslog daemon, logrotate or a multi-call binary is installed: {installed}"
    binaries = probe.run(f"ls -1 {' '.join(SYSLOG_BINARIES)} 2>/dev/null").stdout.split()
    assert binaries == [], f"syslog daemons in the image: {binaries}"
    if kind is not Surface.ROOTFS:
        running = probe.run("ps -eo comm=").stdout.split()
        assert not set(running) & set(SYSLOG_DAEMONS), f"running: {set(running) & set(SYSLOG_DAEMONS)}"


@check(
    claims=[
        "no-syslog",
        "no-activity-logging",
        "no-timestamp-logging",
        "no-ip-logging",
        "no-mac-logging",
        "no-pii-on-server",
        "no-visited-resources",
    ],
    rationale="journald runs (programs may log) but is set to store nothing, not even in RAM: "
    "a message sent to it cannot be read back and no journal file exists.",
    targets=RUNNING,
    not_applicable="journald does not run in an unpacked root",
)
def journald_stores_nothing(probe: Probe) -> None:
    mark = canary()
    sent = probe.run(f"systemd-cat -t amnesiac-check echo {mark}")
    assert sent.rc == 0, "could not send a message to journald (is it running?)"
    probe.run("journalctl --sync 2>/dev/null || true")
    read = probe.run(f"journalctl --no-pager -o cat --grep {mark} 2>&1")
    assert mark not in read.stdout, "journald kept the message"
    files = probe.run("find /var/log/journal /run/log/journal -name '*.journal*' 2>/dev/null").stdout.split()
    assert files == [], f"journal files exist: {files}"


@check(
    claims=["no-syslog", "no-activity-logging", "no-ip-logging", "no-timestamp-logging"],
    rationale="A message logged the way any daemon logs (syslog(3) through /dev/log, and "
    "stdout to the journal) is found in no file anywhere on the server afterwards.",
    targets=RUNNING,
    not_applicable="nothing runs in an unpacked root to receive the message",
)
def logger_canary_not_kept(probe: Probe) -> None:
    mark = canary()
    assert probe.run(f"logger -t amnesiac-check -p auth.notice {mark}").rc == 0, "logger failed"
    probe.run(f"systemd-cat -t amnesiac-check echo {mark}")
    probe.run("sleep 1")
    found = find_everywhere(probe, mark)
    assert found == [], f"the canary was stored in {found}"


@check(
    claims=["no-syslog", "no-activity-logging", "no-mac-logging", "no-visited-resources"],
    rationale="A line a program writes to the kernel log (/dev/kmsg) is not kept in the kernel's "
    "ring buffer, the journal or any file; the kernel's own boot messages prove dmesg can be read.",
    targets=KERNEL,
    not_applicable="the kernel log is the host's in a container, and absent in an unpacked root",
)
def kernel_canary_not_kept(probe: Probe) -> None:
    mark = canary()
    probe.run(f"echo {mark} > /dev/kmsg")
    ring = probe.run("dmesg")
    assert ring.rc == 0 and "Linux version" in ring.stdout, "positive control: dmesg shows no boot messages"
    assert mark not in ring.stdout, "the canary is in the kernel ring buffer"
    found = find_everywhere(probe, mark)
    assert found == [], f"the canary was stored in {found}"


@check(
    claims=["no-ip-logging", "no-timestamp-logging", "no-pii-on-server"],
    rationale="After our own SSH login, no login record (utmp, wtmp, btmp, lastlog, wtmpdb, "
    "lastlog2) exists and the client's address is found in no file.",
)
def no_login_records(probe: Probe, kind: Surface) -> None:
    present = probe.run(
        # A regular file, even empty, is where the next login would be recorded; a missing file
        # or a link to /dev/null is not (glibc's updwtmp does not create a missing wtmp).
        "for f in " + " ".join(LOGIN_RECORDS) + '; do [ -f "$f" ] && ls -l "$f"; done; true'
    ).stdout.splitlines()
    assert present == [], f"login record files exist: {present}"
    if kind is not Surface.BOOTED:
        return
    client = probe.run("echo ${SSH_CONNECTION%% *}").stdout.strip()
    if not client:
        probe.note("not logged in over SSH: the client-address search was skipped")
        return
    found = [f for f in find_everywhere(probe, client) if not _only_as_network_peer(probe, f, client)]
    assert found == [], f"the SSH client's address {client} is stored in {found}"


# networkd's DHCP lease names the DHCP server and router. Behind NAT (QEMU's user network, a
# provider's management gateway) the SSH client's address can be that router: found there, it
# is the network's configuration, not a record of the login.
LEASE_PEER_KEYS = ("SERVER_ADDRESS", "ROUTER", "DNS", "NTP", "NEXT_SERVER", "SIP")


def _only_as_network_peer(probe: Probe, path: str, address: str) -> bool:
    if not path.startswith("/run/systemd/netif/leases/"):
        return False
    lines = probe.run(f"grep -F -- {address} {path}").stdout.splitlines()
    peer = all(line.split("=", 1)[0] in LEASE_PEER_KEYS for line in lines)
    if peer:
        probe.note(f"{address} is in {path} as the network's DHCP server or router, not as a login")
    return peer


@check(
    claims=["no-syslog", "no-activity-logging", "no-pii-on-server"],
    rationale="/var/log holds no file; on a booted server it is read-only, so no program can "
    "start a log file there.",
)
def var_log_empty(probe: Probe, kind: Surface) -> None:
    files = probe.run("find /var/log -xdev -type f 2>/dev/null").stdout.split()
    assert files == [], f"files in /var/log: {files}"
    if kind is Surface.BOOTED:
        attempt = probe.run(
            "touch /var/log/amnesiac-write-probe 2>&1; rc=$?; rm -f /var/log/amnesiac-write-probe; exit $rc"
        )
        assert attempt.rc != 0, "root could create a file in /var/log"
        assert "Read-only file system" in attempt.stdout, f"touch failed otherwise: {attempt.stdout}"


@check(
    claims=["no-activity-logging", "no-timestamp-logging"],
    rationale="No audit daemon records system calls or logins, and the kernel's audit is off.",
)
def no_audit_daemon(probe: Probe, kind: Surface) -> None:
    assert _installed(probe, ("auditd",)) == [], "auditd is installed"
    if kind is Surface.BOOTED:
        running = probe.run("ps -eo comm=").stdout.split()
        assert "auditd" not in running, "auditd is running"
        cmdline = probe.run("cat /proc/cmdline").stdout.split()
        assert "audit=0" in cmdline, "the kernel's audit is not switched off (audit=0)"
