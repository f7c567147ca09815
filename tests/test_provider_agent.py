"""The provider agent with Debian's real OpenVPN, a real client and the reference service, in a
network namespace of the test's own: the role developer's loop, in seconds, without an image.

The agent and OpenVPN's management snippet are rendered from the role's templates; OpenVPN,
the agent and the service run inside the namespace (its loopback only), and the session check's
own client and judgement (checks.provider) drive and read them. The boot tier runs the same
check on the built image (tests/boot/test_verify.py).
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from amnesiac import wireguard_client
from amnesiac.checks import provider as check
from amnesiac.checks.expectations import ProviderHarness
from amnesiac.provider.pki import ProviderPki, fingerprint_sha256, node_identity_files
from amnesiac.provider.service import read_journal
from amnesiac.run import spawn, stop_group
from tests.test_provider_check import COUNTER, SESSION, render_agent

NODE = "node-test"
RECORDS = [SESSION, COUNTER]
SERVICE_PORT = 8443
PROXY_PORT = 8444
WAIT = 60.0  # an upper bound on a step (a process starting, a record sent), never a measurement:
# 20 s expired once with an image build beside the fast tier

pytestmark = pytest.mark.skipif(
    shutil.which("openvpn") is None, reason="openvpn is installed by `make setup`"
)

SERVICE = """
import sys, time
from pathlib import Path
from amnesiac.provider.pki import ProviderPki, Pem
from amnesiac.provider.service import ReferenceService
work = Path(sys.argv[1])
pki = ProviderPki(
    ca=Pem((work / "ca.crt").read_bytes(), (work / "ca.key").read_bytes()),
    service=Pem((work / "service.crt").read_bytes(), (work / "service.key").read_bytes()),
)
records = sys.argv[4].split(",")
peers = work / "peers"  # a WireGuard test allows peers by writing it
with ReferenceService(
    pki, {sys.argv[2]: sys.argv[3]}, records, journal=work / "journal.jsonl", port=%d, peers_file=peers
):
    (work / "service.ready").touch()
    time.sleep(600)
"""


# A TCP relay in front of the service that closes the connections whose numbers it is given at
# once, before a byte of TLS: the service out of reach for one request.
DROPPING_RELAY = """
import socket, sys, threading
drop = {int(n) for n in sys.argv[3].split(",")}
listener = socket.create_server(("127.0.0.1", int(sys.argv[1])))
def pipe(a, b):
    try:
        while data := a.recv(65536):
            b.sendall(data)
        b.shutdown(socket.SHUT_WR)
    except OSError:  # the other side closed first
        pass
count = 0
while True:
    client, _ = listener.accept()
    count += 1
    if count in drop:
        client.close()
        print("dropped", count, flush=True)
        continue
    upstream = socket.create_connection(("127.0.0.1", int(sys.argv[2])))
    for a, b in ((client, upstream), (upstream, client)):
        threading.Thread(target=pipe, args=(a, b), daemon=True).start()
"""


@pytest.fixture
def netns(needs_root: None) -> Iterator[str]:
    name = f"amnesiac-test-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@contextlib.contextmanager
def node(netns: str, work: Path, drop: str = "", **agent_vars: object) -> Iterator[ProviderHarness]:
    """OpenVPN with the agent and the reference service, all inside `netns`, until the end;
    with `drop`, the agent reaches the service through DROPPING_RELAY."""
    account, password = f"amnesiac-canary-{secrets.token_hex(4)}", secrets.token_urlsafe(12)
    pki = ProviderPki.create(["127.0.0.1"])
    for name, pem in (("ca", pki.ca), ("service", pki.service)):
        (work / f"{name}.crt").write_bytes(pem.cert)
        (work / f"{name}.key").write_bytes(pem.key)
    credentials = work / "credentials"
    credentials.mkdir()
    port = PROXY_PORT if drop else SERVICE_PORT
    files = node_identity_files(f"https://127.0.0.1:{port}", pki, pki.issue_node(NODE))
    for name, (data, _) in files.items():
        (credentials / name).write_bytes(data)
    (credentials / "management.pw").write_text(secrets.token_hex(16) + "\n")
    server = pki.issue_node("amnesiac-openvpn-server")  # any certificate: the client pins it
    (work / "server.crt").write_bytes(server.cert)
    (work / "server.key").write_bytes(server.key)
    agent = work / "provider-agent"
    agent.write_text(render_agent(provider_agent_records=[r.model_dump() for r in RECORDS], **agent_vars))
    agent.chmod(0o700)
    (work / "service.py").write_text(SERVICE % SERVICE_PORT)
    in_ns = ["ip", "netns", "exec", netns]
    records = ",".join(r.record for r in RECORDS)
    with contextlib.ExitStack() as stack:
        start = _starter(stack, work)
        service = [sys.executable, str(work / "service.py"), str(work), account, password, records]
        start("service", [*in_ns, *service])
        _wait((work / "service.ready").exists, "the reference service")
        if drop:
            relay = [sys.executable, "-c", DROPPING_RELAY, str(PROXY_PORT), str(SERVICE_PORT), drop]
            start("relay", [*in_ns, *relay])
        start("openvpn", [
            *in_ns, "openvpn", "--dev", "tun", "--disable-dco", "--topology", "subnet",
            "--server", "10.8.0.0", "255.255.255.0", "--local", "127.0.0.1", "--port", "1194",
            "--proto", "udp", "--cert", str(work / "server.crt"), "--key", str(work / "server.key"),
            "--dh", "none", "--peer-fingerprint", ":".join(["00"] * 32), "--verify-client-cert", "none",
            "--management", "127.0.0.1", "7505", str(credentials / "management.pw"),
            "--management-client-auth", "--keepalive", "10", "60", "--verb", "3",
        ])  # fmt: skip
        start("agent", [*in_ns, "env", f"CREDENTIALS_DIRECTORY={credentials}", "bash", str(agent), "openvpn"])
        # OpenVPN holds a client that arrives before the agent: start with the agent connected.
        _wait(lambda: b"MANAGEMENT: Client connected" in (work / "openvpn.log").read_bytes(), "the agent")
        yield ProviderHarness(
            journal=str(work / "journal.jsonl"),
            node=NODE,
            netns=netns,
            openvpn_host="127.0.0.1",
            openvpn_port=1194,
            openvpn_proto="udp",
            account=account,
            password=password,
        )


def _starter(stack: contextlib.ExitStack, work: Path) -> Callable[[str, list[str]], None]:
    def start(name: str, argv: list[str]) -> None:
        log = (work / f"{name}.log").open("wb")
        stack.callback(log.close)
        stack.callback(stop_group, spawn(argv, stdout=log, stderr=subprocess.STDOUT), term_timeout=10)

    return start


def _wait(done: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {WAIT:.0f} s")
        time.sleep(0.1)


def server_fingerprint(work: Path) -> str:
    return fingerprint_sha256((work / "server.crt").read_bytes())


def test_a_session_sends_exactly_the_permitted_records(netns: str, tmp_path: Path) -> None:
    with node(netns, tmp_path) as harness:
        fingerprint = server_fingerprint(tmp_path)
        wrong = check._session(harness, fingerprint, password=secrets.token_hex(6), hold=0.0)
        assert not wrong.connected and "AUTH_FAILED" in wrong.log, wrong.tail
        session = check._session(harness, fingerprint, password=harness.password, hold=1.0)
        assert session.connected, session.tail
        seen = check._wait_for_records(harness, RECORDS, start=0)
    assert check._judge(seen, RECORDS, harness) == [], [check._shown(r) for r in seen]
    paths = [r.path for r in seen]
    # The refused client caused one question and no record; the session, a counter +1 and -1.
    assert paths[:2] == ["/v1/auth", "/v1/auth"] and paths.count("/v1/records/device-counter") == 2
    assert all(
        dict(r.fields).get("password") in (None, "<redacted>") for r in read_journal(Path(harness.journal))
    )


def test_a_record_that_never_left_is_sent_again_and_only_once(netns: str, tmp_path: Path) -> None:
    """The connection of the session's first record is closed before TLS (connection 1 is the
    auth): the agent tries again from memory, and the service receives each record once."""
    with node(netns, tmp_path, drop="2") as harness:
        session = check._session(harness, server_fingerprint(tmp_path), password=harness.password, hold=1.0)
        assert session.connected, session.tail
        seen = check._wait_for_records(harness, RECORDS, start=0)
    assert (tmp_path / "relay.log").read_text().split() == ["dropped", "2"]
    assert check._judge(seen, RECORDS, harness) == [], [check._shown(r) for r in seen]
    sent = [(check._record_name(r), dict(r.fields)["event"]) for r in seen if check._record_name(r)]
    assert sorted(sent) == sorted({(r.record, e) for r in RECORDS for e in r.events}), sent


def test_a_field_the_policy_does_not_permit_is_caught(netns: str, tmp_path: Path) -> None:
    with node(netns, tmp_path, provider_agent_extra_fields=["client_port"]) as harness:
        session = check._session(harness, server_fingerprint(tmp_path), password=harness.password, hold=0.5)
        assert session.connected, session.tail
        seen = check._wait_for_records(harness, RECORDS, start=0)
    problems = check._judge(seen, RECORDS, harness)
    assert any("fields not permitted ['client_port']" in p for p in problems), problems


def test_an_unreachable_service_refuses_every_client(netns: str, tmp_path: Path) -> None:
    with node(netns, tmp_path) as harness:
        subprocess.run(["pkill", "-f", str(tmp_path / "service.py")], check=False)
        time.sleep(0.5)
        session = check._session(harness, server_fingerprint(tmp_path), password=harness.password, hold=0.0)
    assert not session.connected and "AUTH_FAILED" in session.log, session.tail


@pytest.mark.parametrize("fresh", [True, False])
def test_openvpn_is_told_to_exit_after_its_last_session(netns: str, tmp_path: Path, fresh: bool) -> None:
    """provider_agent_fresh_openvpn_when_idle: once the last session's records are sent, the agent
    has OpenVPN exit (systemd starts a fresh process on the server); off, OpenVPN keeps running."""
    with node(netns, tmp_path, provider_agent_fresh_openvpn_when_idle=fresh) as harness:
        session = check._session(harness, server_fingerprint(tmp_path), password=harness.password, hold=0.5)
        assert session.connected, session.tail
        check._wait_for_records(harness, RECORDS, start=0)
        log = tmp_path / "openvpn.log"
        deadline = time.monotonic() + 5.0  # the agent signals right after the disconnect's records
        while b"process exiting" not in log.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.1)
        told = b"process exiting" in log.read_bytes()
    assert told == fresh, log.read_text(errors="replace")[-2000:]


@pytest.mark.skipif(shutil.which("wireguard-go") is None, reason="wireguard-go is installed by `make setup`")
@pytest.mark.parametrize("forget", [True, False])
def test_a_quiet_wireguard_peer_ends_its_session_and_its_endpoint_is_forgotten(
    netns: str, tmp_path: Path, forget: bool
) -> None:
    """provider_agent_wireguard_forget_idle_endpoints: a peer from which nothing came for the idle
    time has its disconnect record sent and (the control) the kernel forgets where it was; the
    peer stays allowed. Server and client are wireguard-go interfaces in the test's namespace."""
    with node(
        netns, tmp_path, provider_agent_wireguard_interval=1, provider_agent_wireguard_idle_seconds=3,
        provider_agent_wireguard_forget_idle_endpoints=forget,
    ) as harness, contextlib.ExitStack() as stack:  # fmt: skip
        in_ns = ["ip", "netns", "exec", netns]
        server, client = f"amsrv{secrets.token_hex(3)}", f"amcli{secrets.token_hex(3)}"
        start = _starter(stack, tmp_path)
        start("wg-server", [*in_ns, "wireguard-go", "-f", server])
        _wait(lambda: wireguard_client.ok([*in_ns, "wg", "show", server]), "the server's wireguard-go")
        server_private, server_public = wireguard_client.keypair()
        client_private, client_public = wireguard_client.keypair()
        (tmp_path / "server.wg").write_text(server_private)
        (tmp_path / "client.wg").write_text(client_private)
        _run(
            [*in_ns, "wg", "set", server, "private-key", str(tmp_path / "server.wg"), "listen-port", "51820"]
        )
        _run([*in_ns, "ip", "link", "set", server, "up"])
        agent = [*in_ns, "env", f"CREDENTIALS_DIRECTORY={tmp_path / 'credentials'}", "bash",
                 str(tmp_path / "provider-agent"), "wireguard", server]  # fmt: skip
        start("wg-agent", agent)
        (tmp_path / "peers").write_text(f"{client_public} 10.9.0.2/32\n")
        _wait(
            lambda: client_public in _out([*in_ns, "wg", "show", server, "peers"]),
            "the agent adding the peer",
        )
        daemon = spawn(
            [*in_ns, "wireguard-go", "-f", client], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        try:
            _wait(lambda: wireguard_client.ok([*in_ns, "wg", "show", client]), "the client's wireguard-go")
            peer = ["peer", server_public, "endpoint", "127.0.0.1:51820", "allowed-ips", "10.9.0.1/32"]
            key = ["private-key", str(tmp_path / "client.wg")]
            _run([*in_ns, "wg", "set", client, *key, *peer, "persistent-keepalive", "1"])
            _run([*in_ns, "ip", "link", "set", client, "up"])
            _wait(lambda: "127.0.0.1:" in _out([*in_ns, "wg", "show", server, "endpoints"]), "the handshake")
        finally:
            stop_group(daemon, term_timeout=10)  # the client goes quiet
        _wait(lambda: _events(harness) >= {"connect", "disconnect"}, "the disconnect record")
        time.sleep(2)  # two of the agent's intervals after it
        endpoints = _out([*in_ns, "wg", "show", server, "endpoints"])
    assert client_public in endpoints, "the peer must stay allowed"
    assert ("127.0.0.1:" not in endpoints) == forget, endpoints


def _events(harness: ProviderHarness) -> set[str]:
    return {
        str(dict(r.fields).get("event")) for r in read_journal(Path(harness.journal)) if r.method == "POST"
    }


def _out(argv: list[str]) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=False).stdout


def _run(argv: list[str]) -> None:
    subprocess.run(argv, capture_output=True, check=True)
