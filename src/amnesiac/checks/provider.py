"""The provider interface, observed: a real client session through the booted server, and what
the provider's service received because of it (docs/provider-interface.md).

The check drives Debian's OpenVPN client on the verifier's machine against the target's OpenVPN
(inside the harness's network namespace, over the guest's link NIC, `--dev null`: the
verifier's own network is never touched) and reads the journal of the reference service the
target was given. It is the one kind of check that can verify a claim with `permits`
(`observes_records`): it watches the permitted records leave, and nothing else leave or stay.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from amnesiac import wireguard_client
from amnesiac.canary import client_connected
from amnesiac.checks.expectations import Expectations, PermittedRecord, ProviderHarness
from amnesiac.checks.logging import find_everywhere
from amnesiac.checks.meta import KERNEL, Surface, check
from amnesiac.checks.plugin import not_applicable
from amnesiac.checks.probe import Probe
from amnesiac.provider.service import PEERS, Request, read_journal
from amnesiac.run import spawn, stop_group

SERVER_CERT = "/etc/openvpn/server/identity/server.crt"
# Bounds, never measurements: a TCG guest answers slowly.
CONNECT_SECONDS = 60.0
HOLD_SECONDS = 3.0  # keepalive pings cross the data channel meanwhile
RECORD_SECONDS = 30.0
WIREGUARD_SECONDS = 60.0
# What each event can carry (docs/provider-interface.md): the node sends a permitted field only
# when it exists at that event, and never the counted ones.
AT_CONNECT = ("account", "client_ip", "client_port", "session_id", "session_start")
AT_DISCONNECT = (*AT_CONNECT, "session_end", "bytes_received", "bytes_sent", "data_volume")
AUTH_FIELDS = ["username", "password"]


@check(
    claims=[
        "session-records-off-server",
        "data-volume-off-server",
        "account-counter-off-server",
    ],
    rationale="A real OpenVPN client connects with an account, moves traffic and disconnects: the "
    "provider's service must have been asked about the account over mutual TLS, refused a wrong "
    "password, and received each permitted record at its events with exactly the permitted fields; "
    "the account name is then found in no file on the server.",
    targets=KERNEL,
    not_applicable="a session needs the booted server's OpenVPN and a reference provider service",
    observes_records=True,
)
def session_records_observed(probe: Probe, expected: Expectations) -> None:
    harness = expected.provider
    if harness is None:
        not_applicable(
            "no reference provider service is attached to this target (qemu: targets attach one; a "
            "live server's records go to the provider's own service, which the verifier cannot read)"
        )
    assert harness is not None
    if shutil.which("openvpn") is None:
        raise RuntimeError("the verifier has no OpenVPN client (apt-get install openvpn, or `make setup`)")
    fingerprint = probe.run(f"openssl x509 -noout -fingerprint -sha256 -in {SERVER_CERT}").stdout
    assert "=" in fingerprint, f"the server has no OpenVPN certificate at {SERVER_CERT}"
    fingerprint = fingerprint.strip().split("=", 1)[1]

    before = len(read_journal(Path(harness.journal)))
    wrong = _session(harness, fingerprint, password=secrets.token_hex(8), hold=0.0)
    probe.note(f"wrong password: client {'connected' if wrong.connected else 'not connected'}\n{wrong.tail}")
    assert not wrong.connected, "a wrong password was accepted"
    assert "AUTH_FAILED" in wrong.log, f"the client was not refused by the server: {wrong.tail}"
    refused = read_journal(Path(harness.journal))[before:]
    asked = [r for r in refused if not _background(r)]
    assert [r.path for r in asked] == ["/v1/auth"], f"a refused client caused {_paths(asked)}"

    session = _session(harness, fingerprint, password=harness.password, hold=HOLD_SECONDS)
    probe.note(f"session: {'connected' if session.connected else 'not connected'}\n{session.tail}")
    assert session.connected, f"the account was not accepted: {session.tail}"
    seen = _wait_for_records(harness, expected.permitted_records, start=before + len(refused))
    probe.note("the service received:\n" + "\n".join(_shown(r) for r in seen))

    problems = _judge(seen, expected.permitted_records, harness)
    assert problems == [], "; ".join(problems)
    canaries = [harness.account]
    if expected.wireguard_interface and harness.peers_file:
        canaries.append(_wireguard(probe, harness, expected.wireguard_interface, expected.permitted_records))
    for canary in canaries:
        found = find_everywhere(probe, canary)
        assert found == [], f"{canary} (an account) stayed on the server in {found}"


def _background(request: Request) -> bool:
    """Requests no client caused: a handshake the service refused (it reached nothing), and the
    WireGuard agent asking which peers it may accept."""
    return request.method == "TLS" or (request.method == "GET" and request.path == PEERS)


def _wireguard(
    probe: Probe, harness: ProviderHarness, interface: str, permitted: list[PermittedRecord]
) -> str:
    """A WireGuard session: the service allows a new peer, a real client (wireguard-go in the
    harness's namespace) handshakes and queries the server's resolver through the tunnel, the
    service withdraws the peer. The records it caused must be exactly the permitted ones; returns
    the peer's public key (its account) for the search of the server's files."""
    wireguard_client.require_client()
    tunnel = wireguard_client.tunnel_to(lambda c: probe.run(c).stdout, interface, harness.openvpn_host)
    private, public = wireguard_client.keypair()
    peers = Path(harness.peers_file or "")
    before = len(read_journal(Path(harness.journal)))
    with (
        wireguard_client.allowed_peer(peers, public, tunnel.client_ip),
        wireguard_client.wireguard_client(harness.netns, private, tunnel) as answered,
    ):
        through = wireguard_client.until(answered, WIREGUARD_SECONDS)
        probe.note(f"WireGuard: {'the resolver answered through the tunnel' if through else 'no answer'}")
        assert through, f"the server did not answer through WireGuard within {WIREGUARD_SECONDS:.0f} s"
        wanted = {(r.record, "connect") for r in permitted if "connect" in r.events}
        _wait_for(harness, wanted, before)
    # The service withdrew the peer.
    wanted |= {(r.record, "disconnect") for r in permitted if "disconnect" in r.events}
    seen = _wait_for(harness, wanted, before)
    received = "\n".join(_shown(r) for r in seen if not _background(r))
    probe.note(f"the service received (WireGuard):\n{received}")
    problems = _judge(seen, permitted, harness, auth=False)
    assert problems == [], "WireGuard: " + "; ".join(problems)
    accounts = {dict(r.fields).get("account") for r in seen if _record_name(r)} - {None}
    assert accounts <= {public}, f"WireGuard records named accounts {accounts}, not the peer's key"
    return public


def _wait_for(harness: ProviderHarness, wanted: set[tuple[str, str]], start: int) -> list[Request]:
    """The journal since `start` once every (record, event) in `wanted` arrived, or RECORD_SECONDS."""

    def arrived() -> bool:
        seen = read_journal(Path(harness.journal))[start:]
        return wanted <= {(_record_name(r), dict(r.fields).get("event")) for r in seen}

    wireguard_client.until(arrived, RECORD_SECONDS)
    return read_journal(Path(harness.journal))[start:]


class _Session:
    def __init__(self, log: str, connected: bool) -> None:
        self.log = log
        self.connected = connected

    @property
    def tail(self) -> str:
        return "\n".join(self.log.strip().splitlines()[-6:])


def _session(harness: ProviderHarness, fingerprint: str, *, password: str, hold: float) -> _Session:
    """One client session: connect with the account, hold it, disconnect (exit notification)."""
    with _client_files(harness, fingerprint, password) as (config, log_path):
        process = spawn(
            ["ip", "netns", "exec", harness.netns, "openvpn", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            connected = client_connected(log_path, process, CONNECT_SECONDS)
            if connected and hold:
                time.sleep(hold)
        finally:
            # SIGTERM: with explicit-exit-notify the client tells the server at once.
            stop_group(process, term_timeout=15)
        return _Session(log_path.read_text(errors="replace"), connected)


@contextlib.contextmanager
def _client_files(harness: ProviderHarness, fingerprint: str, password: str) -> Iterator[tuple[Path, Path]]:
    with tempfile.TemporaryDirectory(prefix="amnesiac-client-") as tmp:
        directory = Path(tmp)
        credentials = directory / "account"
        credentials.write_text(f"{harness.account}\n{password}\n")
        credentials.chmod(0o600)
        config = directory / "client.conf"
        log = directory / "client.log"
        config.write_text(
            "\n".join(
                [
                    "client",
                    # No tun device, and inside the harness's namespace: nothing on the verifier's
                    # network changes. The data channel still carries the session's pings.
                    "dev null",
                    "ifconfig-noexec",
                    "route-noexec",
                    "script-security 1",
                    f"proto {harness.openvpn_proto}",
                    f"remote {harness.openvpn_host} {harness.openvpn_port}",
                    # The server's certificate is made at boot: it is trusted by its fingerprint,
                    # read from the server over the verifier's SSH login.
                    f"peer-fingerprint {fingerprint}",
                    "nobind",
                    "connect-retry-max 1",
                    "resolv-retry 0",
                    "auth-nocache",
                    f"auth-user-pass {credentials}",
                    "ping 1",
                    "explicit-exit-notify 1",
                    "verb 3",
                    f"log {log}",
                    "",
                ]
            )
        )
        yield config, log


def _wait_for_records(
    harness: ProviderHarness, permitted: list[PermittedRecord], start: int
) -> list[Request]:
    """The requests since `start`, once every permitted event arrived or RECORD_SECONDS passed."""
    return _wait_for(harness, {(r.record, e) for r in permitted for e in r.events}, start)


def _judge(
    seen: list[Request], permitted: list[PermittedRecord], harness: ProviderHarness, *, auth: bool = True
) -> list[str]:
    """Every way what the service received differs from what the policy permits (`auth`: the
    session had to ask about an account, as an OpenVPN login does)."""
    problems: list[str] = []
    by_name = {r.record: r for r in permitted}
    expected_events = {(r.record, e) for r in permitted for e in r.events}
    received: set[tuple[str, str]] = set()
    for request in seen:
        if _background(request):
            continue
        if request.client_cn != harness.node:
            problems.append(f"{request.path} came without the node's certificate ({request.client_cn!r})")
        if not request.tls_version.startswith("TLSv1.") or request.tls_version in ("TLSv1", "TLSv1.1"):
            problems.append(f"{request.path} came over {request.tls_version or 'no TLS'}")
        names = [k for k, _ in request.fields]
        if request.path == "/v1/auth":
            if names != AUTH_FIELDS:
                problems.append(f"the auth request carried {names}, not only {AUTH_FIELDS}")
            continue
        name = _record_name(request)
        if name is None or name not in by_name:
            problems.append(f"a request the policy permits no record for: {request.method} {request.path}")
            continue
        event = dict(request.fields).get("event", "")
        if event not in by_name[name].events:
            allowed_events = by_name[name].events
            problems.append(f"record {name} sent at {event or 'no event'}, permitted at {allowed_events}")
            continue
        received.add((name, event))
        allowed = set(AT_DISCONNECT if event == "disconnect" else AT_CONNECT)
        want = [f for f in by_name[name].fields if f in allowed]
        if sorted(names) != sorted(["event", *want]):
            extra = sorted(set(names) - {"event", *want})
            missing = sorted(set(want) - set(names))
            problems.append(f"record {name} at {event}: fields not permitted {extra}, missing {missing}")
    for name, event in sorted(expected_events - received):
        problems.append(f"record {name} was never received at {event}")
    if auth and not any(r.path == "/v1/auth" for r in seen):
        problems.append("the service was never asked about the account")
    return problems


def _record_name(request: Request) -> str | None:
    prefix = "/v1/records/"
    return request.path[len(prefix) :] if request.path.startswith(prefix) else None


def _paths(requests: list[Request]) -> list[str]:
    return [f"{r.method} {r.path}" for r in requests]


def _shown(request: Request) -> str:
    fields = " ".join(f"{k}={v}" for k, v in request.fields)
    who = f"[{request.client_cn}, {request.tls_version}]"
    return f"{request.method} {request.path} {request.status} {who} {fields}"


# OpenVPN's agent, and WireGuard's where the image has one.
AGENT_UNITS = ("amnesiac-provider-agent.service", "amnesiac-provider-wireguard.service")
AGENT = "/usr/local/libexec/amnesiac/provider-agent"
# An output redirection to a path or a variable (`> file`, `>> "$f"`, `2>$x`), not to a
# descriptor (`>&3`), not inside a word or a quoted protocol line ('>CLIENT:...'), not `<>`.
REDIRECT = re.compile(r"""(?<![<>&\w'"])\d?>>?\s*"?([/$][^\s;|&)"]*)""")
# systemd settings that would give the agent somewhere to write, and what they must be.
WRITABLE = ("ReadWritePaths", "StateDirectory", "CacheDirectory", "LogsDirectory", "RuntimeDirectory")
CONFINED = {
    "DynamicUser": "yes",
    "ProtectSystem": "strict",
    "StandardOutput": "null",
    "StandardError": "null",
}


@check(
    claims=[
        "session-records-off-server",
        "data-volume-off-server",
        "account-counter-off-server",
        "no-activity-logging",
        "no-pii-on-server",
    ],
    rationale="The agents that send the permitted records (OpenVPN's, and WireGuard's where there is "
    "one) run as dynamic users on a read-only system with no writable directory and their output "
    "discarded, and their script redirects nothing to a file: they have nowhere to keep a record.",
)
def agent_writes_nothing(probe: Probe, kind: Surface) -> None:
    paths = " ".join(f"/etc/systemd/system/{unit}" for unit in AGENT_UNITS)
    units = probe.run(f"ls {paths} 2>/dev/null").stdout
    present = [u for u in AGENT_UNITS if u in units]
    assert AGENT_UNITS[0] in present, (
        f"no provider agent ({AGENT_UNITS[0]}): the permitted records have no way off the server"
    )
    for unit in present:
        settings = _unit_settings(probe.run(f"cat /etc/systemd/system/{unit}").stdout)
        if kind is not Surface.ROOTFS:
            # What systemd made of the unit, drop-ins included.
            shown = probe.run(f"systemctl show {unit} -p {','.join([*WRITABLE, *CONFINED])}").stdout
            settings = {**settings, **_unit_settings(shown)}
        writable = {k: v for k in WRITABLE if (v := settings.get(k, ""))}
        assert writable == {}, f"{unit} may write to {writable}"
        wrong = {k: settings.get(k, "") for k, v in CONFINED.items() if settings.get(k, "") != v}
        assert wrong == {}, f"{unit} is not confined as it should be: {wrong} (want {CONFINED})"
    script = probe.run(f"cat {AGENT}").stdout
    code = [line for line in script.splitlines() if not line.lstrip().startswith("#")]
    writes = [line.strip() for line in code for target in REDIRECT.findall(line) if target != "/dev/null"]
    assert writes == [], f"the agent redirects output to a file: {writes}"


def _unit_settings(text: str) -> dict[str, str]:
    """Key=value lines of a unit file or of `systemctl show` (the last one of a key wins)."""
    settings: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and not key.startswith(("#", ";")):
            settings[key.strip()] = value.strip()
    return settings
