"""The VPN processes cannot write anywhere: AppArmor in enforce mode and a systemd sandbox.

The write check does not read the configuration: it enters the running OpenVPN process's mount
namespace, takes on its AppArmor label, and tries to create a file in each place a daemon might
keep something. A positive control proves the same attempt works without the confinement.
"""

from __future__ import annotations

from amnesiac.checks.expectations import Expectations
from amnesiac.checks.meta import KERNEL, RUNNING, Surface, check
from amnesiac.checks.plugin import not_applicable
from amnesiac.checks.probe import Probe

DEFAULT_UNIT = "openvpn-server@server.service"
PROFILE = "amnesiac-openvpn"
WRITE_TARGETS = ("/", "/tmp", "/var", "/var/tmp", "/run", "/etc", "/dev/shm", "/root")
# The write attempt, run by the image's sh: under OpenVPN's profile it may map its libraries, and
# the profile decides every write (the image carries no busybox to run it with).
ATTEMPT = (
    "for d in " + " ".join(WRITE_TARGETS) + "; do "
    'f="$d/.amnesiac-write-probe-$$"; '
    'if ( : > "$f" ) 2>/dev/null; then echo "WROTE $d"; rm -f "$f"; else echo "denied $d"; fi; done'
)


# What would make OpenVPN write: a status or pool file, a log, a pid file. `management` makes a
# socket file unless it listens on loopback TCP (provider_agent's, whose only client is the agent).
FORBIDDEN_DIRECTIVES = ("status", "ifconfig-pool-persist", "log-append", "writepid", "syslog")
LOOPBACK = ("127.0.0.1", "::1")


def management_problem(args: list[str]) -> str | None:
    """Why a `management` directive is not allowed: anything but a loopback TCP port is (a unix
    socket is a file; another address exposes OpenVPN's client list to a network)."""
    if len(args) >= 2 and args[0] in LOOPBACK and args[1].isdigit():
        return None
    return f"`management {' '.join(args)}` (allowed only on 127.0.0.1 or ::1, TCP)"


def directives_of(text: str) -> list[tuple[str, list[str]]]:
    """A configuration file's directives, in order (comments and blank lines left out)."""
    words = [line.split() for line in text.splitlines()]
    return [(w[0], w[1:]) for w in words if w and not w[0].startswith(("#", ";"))]


def server_configs(texts: dict[str, str]) -> dict[str, list[tuple[str, list[str]]]]:
    """The servers the files configure, each with its directives and those of every file it
    includes.

    openvpn-server@NAME runs `--config NAME.conf`; a file that another includes (`config FILE`,
    e.g. provider_agent's management snippet) is part of that server, not a server of its own.
    """
    by_path = {path: directives_of(text) for path, text in texts.items()}

    def included(path: str) -> list[str]:
        targets = [args[0] for name, args in by_path[path] if name == "config" and args]
        return [p for p in by_path for t in targets if p == t or p.endswith("/" + t)]

    snippets = {child for path in by_path for child in included(path)}
    servers = {}
    for path in sorted(set(by_path) - snippets):
        found: list[tuple[str, list[str]]] = []
        seen: set[str] = set()
        pending = [path]
        while pending:  # the server's own file, then what it includes (each once)
            current = pending.pop()
            if current not in seen:
                seen.add(current)
                found += by_path[current]
                pending += included(current)
        servers[path] = found
    return servers


def _unit(expected: Expectations) -> str:
    return expected.openvpn_unit or DEFAULT_UNIT


def _main_pid(probe: Probe, unit: str) -> int:
    pid = probe.run(f"systemctl show -p MainPID --value {unit}").stdout.strip()
    assert pid.isdigit() and int(pid) > 0, f"{unit} is not running (MainPID={pid or '?'})"
    comm = probe.run(f"cat /proc/{pid}/comm").stdout.strip()
    assert comm == "openvpn", f"{unit}'s main process is {comm!r}, not openvpn"
    return int(pid)


def _label(probe: Probe, pid: int) -> str:
    return str(
        probe.run(
            f"cat /proc/{pid}/attr/apparmor/current 2>/dev/null || cat /proc/{pid}/attr/current"
        ).stdout.strip()
    )


@check(
    claims=["vpn-no-write", "session-records-off-server"],
    rationale="The running OpenVPN process is confined by the amnesiac-openvpn AppArmor profile "
    "in enforce mode (not complain, not unconfined), so the kernel denies every write the "
    "profile does not allow.",
    targets=KERNEL,
    not_applicable="AppArmor labels belong to the booted kernel; a container shares the host's",
)
def openvpn_confined_by_apparmor(probe: Probe, expected: Expectations) -> None:
    enabled = probe.run("cat /sys/module/apparmor/parameters/enabled").stdout.strip()
    assert enabled == "Y", f"AppArmor is not enabled in the kernel ({enabled or 'absent'})"
    pid = _main_pid(probe, _unit(expected))
    label = _label(probe, pid)
    assert label == f"{PROFILE} (enforce)", f"openvpn (pid {pid}) runs as {label!r}"
    profiles = probe.run("cat /sys/kernel/security/apparmor/profiles").stdout
    assert f"{PROFILE} (enforce)" in profiles.splitlines(), "the profile is not loaded in enforce mode"


LOCK_POLICY = "/sys/module/apparmor/parameters/lock_policy"


@check(
    claims=["vpn-no-write", "no-activity-logging", "no-traffic-logging", "no-ip-logging"],
    rationale="The AppArmor policy is locked once loaded (lock_policy=Y): until the next boot no "
    "profile can be loaded, replaced or removed, even by root, so OpenVPN's confinement cannot be "
    "taken away from the running server; unsetting the lock is refused too.",
    targets=KERNEL,
    not_applicable="the AppArmor policy belongs to the booted kernel; a container shares the host's",
)
def apparmor_policy_locked(probe: Probe) -> None:
    value = probe.run(f"cat {LOCK_POLICY}").stdout.strip()
    assert value == "Y", f"the AppArmor policy is not locked (lock_policy={value or 'absent'})"
    assert not probe.write_accepted(LOCK_POLICY, "N"), "root could unlock the AppArmor policy"


@check(
    claims=[
        "vpn-no-write",
        "no-activity-logging",
        "no-traffic-logging",
        "no-ip-logging",
        "session-records-off-server",
        "account-counter-off-server",
    ],
    rationale="Entering the OpenVPN process's mount namespace with its AppArmor label, even as "
    "root, no file can be created in /, /tmp, /var, /var/tmp, /run, /etc, /dev/shm or /root; "
    "the same attempt outside the confinement succeeds, so the test itself can write.",
    targets=KERNEL,
    not_applicable="needs the booted kernel's AppArmor and the service's own namespaces",
)
def openvpn_write_denied(probe: Probe, expected: Expectations) -> None:
    control = probe.run(f"sh -c '{ATTEMPT}'", note="positive control: no confinement, as root")
    assert "WROTE /tmp" in control.stdout, "positive control: root cannot write /tmp even unconfined"
    pid = _main_pid(probe, _unit(expected))
    label = _label(probe, pid).removesuffix(" (enforce)").removesuffix(" (complain)")
    confine = "" if label == "unconfined" else f"--apparmor-profile={label}"
    for who, creds in (
        ("root", ""),
        (
            "its own user",
            f"--reuid=$(stat -c %u /proc/{pid}) --regid=$(stat -c %g /proc/{pid}) --clear-groups",
        ),
    ):
        result = probe.run(
            f"nsenter --target={pid} --mount -- setpriv {creds} {confine} -- sh -c '{ATTEMPT}'",
            note=f"as {who}, in openvpn's mount namespace, with its label {label!r}",
        )
        assert result.rc == 0 and "denied /" in result.stdout, "the confined write attempt did not run"
        wrote = [line.split(" ", 1)[1] for line in result.stdout.splitlines() if line.startswith("WROTE ")]
        assert wrote == [], f"as {who}, the OpenVPN confinement let it write to {wrote}"


@check(
    claims=["vpn-no-write"],
    rationale="The OpenVPN unit runs with ProtectSystem=strict and no writable paths, a private "
    "/tmp, no new privileges, its AppArmor profile, and standard output and error to nowhere.",
    targets=RUNNING,
    not_applicable="systemd does not run in an unpacked root",
)
def openvpn_unit_sandboxed(probe: Probe, expected: Expectations) -> None:
    unit = _unit(expected)
    props = probe.run(
        f"systemctl show {unit} -p ProtectSystem -p ReadWritePaths -p PrivateTmp -p NoNewPrivileges "
        "-p StandardOutput -p StandardError -p AppArmorProfile -p RuntimeDirectory -p StateDirectory "
        "-p LogsDirectory -p CacheDirectory"
    ).stdout
    values = dict(line.split("=", 1) for line in props.splitlines() if "=" in line)
    wanted = {
        "ProtectSystem": "strict",
        "ReadWritePaths": "",
        "PrivateTmp": "yes",
        "NoNewPrivileges": "yes",
        "StandardOutput": "null",
        "StandardError": "null",
        "RuntimeDirectory": "",
        "StateDirectory": "",
        "LogsDirectory": "",
        "CacheDirectory": "",
    }
    wrong = {k: values.get(k) for k, v in wanted.items() if values.get(k, "") != v}
    assert wrong == {}, f"{unit} is not sandboxed as required: {wrong}"
    profile = values.get("AppArmorProfile", "")
    assert profile.endswith(PROFILE), f"{unit} does not switch to {PROFILE} (AppArmorProfile={profile!r})"


@check(
    claims=[
        "no-activity-logging",
        "no-traffic-logging",
        "no-ip-logging",
        "no-bandwidth-logging",
        "no-timestamp-logging",
        "vpn-no-write",
        "data-volume-off-server",
    ],
    rationale="OpenVPN is configured to log to /dev/null at verbosity 0 with no status file, no "
    "address pool file and no management interface but a loopback TCP port (no socket file); the "
    "running process holds no file open for writing but /dev/null and the tun device.",
)
def openvpn_no_log_or_status_file(probe: Probe, kind: Surface, expected: Expectations) -> None:
    configs = probe.run("find /etc/openvpn/server -maxdepth 1 -name '*.conf' -type f").stdout.split()
    assert configs, "no OpenVPN server configuration in /etc/openvpn/server"
    texts = {conf: probe.run(f"cat {conf}").stdout for conf in configs}
    for conf, text in texts.items():  # in any file, included or not, or started on its own
        names = {name for name, _ in directives_of(text)}
        for forbidden in FORBIDDEN_DIRECTIVES:
            assert forbidden not in names, f"{conf} has `{forbidden}`"
        for name, args in directives_of(text):
            problem = management_problem(args) if name == "management" else None
            assert problem is None, f"{conf} has {problem}"
    servers = server_configs(texts)
    assert servers, f"no server configuration: every file includes another in a loop ({configs})"
    for instance, directives in servers.items():
        logs = [args for name, args in directives if name == "log"]
        assert logs and all(args == ["/dev/null"] for args in logs), (
            f"{instance} (with what it includes) logs to {logs or 'the journal'}, not only to /dev/null"
        )
    if kind is Surface.ROOTFS:
        return
    pid = _main_pid(probe, _unit(expected))
    argv = probe.run(f"tr '\\0' ' ' < /proc/{pid}/cmdline").stdout
    assert "--status" not in argv and "--log" not in argv, f"openvpn runs with {argv}"
    fds = probe.run(
        f"for fd in /proc/{pid}/fdinfo/*; do n=${{fd##*/}}; "
        f"echo \"$(readlink /proc/{pid}/fd/$n) flags=$(awk '/^flags/{{print $2}}' $fd)\"; done"
    ).stdout.splitlines()
    # Every descriptor must have been read (an unreadable fdinfo would hide a log file), and
    # OpenVPN always holds its tun device: seeing it proves the listing looked at the process.
    unread = [fd for fd in fds if not fd.rsplit("=", 1)[-1].isdigit() or fd.startswith(" ")]
    assert fds and unread == [], f"cannot read openvpn's descriptors: {unread or 'none listed'}"
    assert any(fd.split()[0] == "/dev/net/tun" for fd in fds), (
        "positive control: no tun device among its descriptors"
    )
    # O_WRONLY (1) or O_RDWR (2) in the low bits of the octal flags: open for writing.
    writable = [
        fd for fd in fds
        if fd.split()[0].startswith("/") and int(fd.rsplit("=", 1)[1], 8) & 0o3
        and fd.split()[0] not in ("/dev/null", "/dev/net/tun")
    ]  # fmt: skip
    assert writable == [], f"openvpn holds files open for writing: {writable}"


@check(
    claims=[
        "vpn-no-write",
        "no-activity-logging",
        "no-timestamp-logging",
        "no-bandwidth-logging",
        "no-ip-logging",
    ],
    rationale="WireGuard runs in the kernel: no userspace WireGuard daemon (wireguard-go, "
    "boringtun) that could write exists, and wg-quick's unit is sandboxed and silent.",
    targets=RUNNING,
    not_applicable="units are not running in an unpacked root",
)
def wireguard_no_userspace_writer(probe: Probe, expected: Expectations) -> None:
    interface = expected.wireguard_interface
    if not interface:
        not_applicable("this image has no WireGuard server")
    daemons = probe.run("ps -eo comm=").stdout.split()
    assert not {"wireguard-go", "boringtun", "boringtun-cli"} & set(daemons), "a userspace WireGuard runs"
    props = probe.run(
        f"systemctl show wg-quick@{interface}.service -p ProtectSystem -p ReadWritePaths "
        "-p StandardOutput -p StandardError -p ActiveState"
    ).stdout
    values = dict(line.split("=", 1) for line in props.splitlines() if "=" in line)
    assert values.get("ProtectSystem") == "strict", f"wg-quick is not read-only: {values}"
    assert values.get("ReadWritePaths", "") == "", f"wg-quick has writable paths: {values}"
    assert values.get("StandardOutput") == "null" and values.get("StandardError") == "null", values
