"""Management access: keys only, nothing logged, no key baked into the image."""

from __future__ import annotations

from amnesiac.checks.expectations import Expectations
from amnesiac.checks.meta import RUNNING, Surface, check
from amnesiac.checks.probe import Probe


def _sshd_settings(probe: Probe) -> dict[str, str]:
    result = probe.run("sshd -T 2>&1")
    assert result.rc == 0, f"sshd -T failed: {result.stdout.strip()[:300]}"
    return {k: v for k, _, v in (line.partition(" ") for line in result.stdout.splitlines())}


def _differs(settings: dict[str, str], wanted: dict[str, str]) -> dict[str, str | None]:
    """The settings (of `sshd -T`) that are not as `wanted`, with what they are."""
    return {k: settings.get(k) for k, v in wanted.items() if settings.get(k) != v}


@check(
    claims=["no-ip-logging", "no-timestamp-logging"],
    rationale="The SSH server offers public-key authentication only: a client asking for a "
    "password or keyboard-interactive login is told 'publickey' is the only method.",
    targets=RUNNING,
    not_applicable="sshd does not run in an unpacked root",
    integrity=True,
)
def key_only(probe: Probe) -> None:
    settings = _sshd_settings(probe)
    keys_only = {"passwordauthentication": "no", "kbdinteractiveauthentication": "no"}
    wrong = _differs(settings, {**keys_only, "pubkeyauthentication": "yes"})
    assert wrong == {}, f"sshd allows more than keys: {wrong}"
    port = settings.get("port", "22").split()[0]
    # ssh exits 255 when refused, which testinfra's own ssh transport takes for a lost
    # connection: report the inner exit status on stdout instead.
    attempt = probe.run(
        "ssh -F /dev/null -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
        f"-o PreferredAuthentications=password,keyboard-interactive -p {port} nobody@127.0.0.1 true 2>&1; "
        'echo "ssh exit status $?"'
    )
    assert "ssh exit status 0" not in attempt.stdout, "a password login attempt was not refused"
    assert "Permission denied (publickey)" in attempt.stdout, f"sshd offered: {attempt.stdout.strip()}"


@check(
    claims=["no-ip-logging", "no-timestamp-logging"],
    rationale="The image carries no SSH key: every authorised key on the target is one the "
    "policy names for its administrators or the verifier's own boot-time test key.",
    integrity=True,
)
def no_test_key(probe: Probe, kind: Surface, expected: Expectations) -> None:
    allowed = {" ".join(k.split()[:2]) for k in expected.authorized_keys}
    if kind is Surface.BOOTED:
        allowed |= {" ".join(k.split()[:2]) for k in expected.test_keys}
    found = probe.run(
        "cat /root/.ssh/authorized_keys /root/.ssh/authorized_keys2 /etc/ssh/authorized_keys/* "
        "2>/dev/null; true"
    ).stdout
    keys = {
        " ".join(line.split()[:2]) for line in found.splitlines() if line.strip() and not line.startswith("#")
    }
    unexpected = sorted(keys - allowed)
    assert unexpected == [], f"keys the policy does not name: {[k[:40] + '…' for k in unexpected]}"
    host_keys = probe.run("ls /etc/ssh/ssh_host_*_key 2>/dev/null").stdout.split()
    if kind is Surface.ROOTFS:
        assert host_keys == [], f"host keys baked into the image: {host_keys}"


@check(
    claims=["no-ip-logging", "no-timestamp-logging"],
    rationale="sshd logs nothing (LogLevel QUIET), does no reverse lookups of clients and "
    "prints no last-login line, so a login leaves no address or time behind.",
    targets=RUNNING,
    not_applicable="sshd -T needs the boot-time host keys",
)
def quiet_logging(probe: Probe) -> None:
    settings = _sshd_settings(probe)
    # sshd -T prints LogLevel QUIET under its other name, SILENT.
    wanted = {"loglevel": ("quiet", "silent"), "usedns": ("no",), "printlastlog": ("no",)}
    wrong = {k: settings.get(k) for k, v in wanted.items() if settings.get(k, "").lower() not in v}
    assert wrong == {}, f"sshd records logins: {wrong}"


@check(
    claims=["no-traffic-logging"],
    rationale="The management SSH server forwards nothing (DisableForwarding, PermitTunnel no, as sshd "
    "itself reports them): no TCP, Unix socket, X11 or agent forwarding and no tun device, so no "
    "traffic crosses the server beside the reviewed VPN and its firewall.",
    targets=RUNNING,
    not_applicable="sshd does not run in an unpacked root",
    integrity=True,
)
def no_forwarding(probe: Probe) -> None:
    wanted = {
        "disableforwarding": "yes",
        "allowtcpforwarding": "no",
        "allowstreamlocalforwarding": "no",
        "allowagentforwarding": "no",
        "x11forwarding": "no",
        "permittunnel": "no",
    }
    wrong = _differs(_sshd_settings(probe), wanted)
    assert wrong == {}, f"sshd forwards for a client that asks: {wrong}"
