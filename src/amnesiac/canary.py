"""Measured amnesia: a real client session through a booted server, carrying canaries, then the
server's whole RAM searched for them until they are gone.

A VPN client (Debian's OpenVPN, a tun device) runs in the harness's network namespace from an
address of its own, so what the server learns of it is unique to this run: the account name, the
client's address and port (as text and as the `sockaddr_in` a daemon keeps), a DNS name resolved
through the server's resolver, and payload bytes sent through the tunnel to the harness's sink.
The search dumps the guest's physical memory from the host (boot/memory.py): a page that holds a
canary is named by what the guest's kernel says holds it (/proc/kpageflags) and by whom (the
cgroup of the page's owner, /proc/kpagecgroup: a systemd unit).

The session is the positive control (every canary the server must have seen is found while it
runs); a string never sent is the negative one (never found).
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from amnesiac import residue, wireguard_client
from amnesiac.boot import memory
from amnesiac.boot.link import HOST_ADDRESS, PREFIX
from amnesiac.boot.qmp import Qmp
from amnesiac.checks.expectations import GuestMemory, ProviderHarness
from amnesiac.run import run, spawn, stop_group

CONNECT_SECONDS = 60.0  # a bound: a TCG guest answers slowly
POLL_SECONDS = 2.0  # between searches after the disconnect (a search itself takes about 5 s)
DURING_SEARCHES = 3  # at most, while the session runs
# Every network card and its interface index: a card rebound (no_logs' receive-buffer flusher)
# comes back with a new index, and its receive buffers with it.
CARDS = "for c in /sys/class/net/*/device; do d=${c%/device}; echo ${d##*/} $(cat $d/ifindex); done"
NEVER = "never sent"  # the negative control's name among the needles
# Canary traffic, run inside the harness's namespace: a DNS query for argv[2] to the resolver the
# server pushed (argv[1]), then argv[4] over TCP to the sink (argv[3] "host:port"). It prints what
# happened, one line each.
TRAFFIC = r"""
import socket, sys, time
resolver, name, sink, payload = sys.argv[1:5]
labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
query = bytes.fromhex("a5a5 0100 0001 0000 0000 0000") + labels + b"\x00" + bytes.fromhex("0001 0001")
# A refused query (the resolver restarting: dns_resolver_lifetime_seconds) is sent again; a query
# that the resolver took needs no answer (the test's server reaches no upstream).
for attempt in range(10):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(4)
        s.connect((resolver, 53))
        s.send(query)
        try:
            print("dns: answered", len(s.recv(512)), "bytes")
        except ConnectionRefusedError:
            time.sleep(1)
            continue
        except OSError as exc:
            print("dns: taken, no answer:", exc)
        break
host, port = sink.rsplit(":", 1)
with socket.create_connection((host, int(port)), timeout=10) as s:
    s.sendall(payload.encode())
print("sink: sent", len(payload), "bytes")
"""


@dataclass(frozen=True)
class Canaries:
    """What one session told the server, as the byte strings a search looks for."""

    account: str | None  # None: a WireGuard session, whose account (the peer's key) stays allowed
    client_address: str
    client_port: int
    dns_name: str
    payload: str
    never: str  # the negative control: sent nowhere

    def packet_header(self, server: str) -> bytes:
        """The start of every packet the client sent the server (IPv4 source and destination, then
        the UDP or TCP source port), as a network card's receive buffer holds it."""
        return (
            socket.inet_aton(self.client_address)
            + socket.inet_aton(server)
            + struct.pack(">H", self.client_port)
        )

    @classmethod
    def fresh(cls, account: str | None) -> Canaries:
        token = secrets.token_hex(6)
        # 198.18.0.0/24 is the link's; .100-.249 leaves the harness's and the guest's addresses.
        return cls(
            account=account,
            client_address=f"198.18.0.{100 + secrets.randbelow(150)}",
            client_port=20000 + secrets.randbelow(30000),
            dns_name=f"amnesiac-dns-{token}.example",
            payload=f"amnesiac-payload-{token}-{secrets.token_hex(8)}",
            never=f"amnesiac-never-{token}",
        )

    def needles(self) -> dict[str, bytes]:
        address = socket.inet_aton(self.client_address)
        port = struct.pack(">H", self.client_port)
        sockaddr = struct.pack("<H", socket.AF_INET) + port + address
        # Connection tracking's tuple (struct nf_conntrack_man): the address in a zeroed 16-byte
        # union, then the port; a flow's entry outlives its last packet by its timeout.
        conntrack = address + bytes(12) + port
        account = {"account": self.account.encode()} if self.account else {}
        return {
            **account,
            "client address": self.client_address.encode(),
            "client address:port": f"{self.client_address}:{self.client_port}".encode(),
            "client sockaddr": sockaddr,
            "client conntrack tuple": conntrack,
            "dns name": self.dns_name.split(".")[0].encode(),  # as a label: text and wire form
            "payload": self.payload.encode(),
            NEVER: self.never.encode(),
        }


@dataclass
class Search:
    """One search of the whole guest RAM: each canary's hits, and what holds them."""

    seconds_after_disconnect: float | None  # None: during the session
    searched_bytes: int
    seconds: float  # the dump and the search (the guest is paused for the dump)
    hits: dict[str, list[int]]
    holders: dict[str, dict[str, int]] = field(default_factory=dict)  # canary -> holder -> hits
    views: dict[str, dict[str, int]] = field(default_factory=dict)  # canary -> view -> matches

    def found(self) -> list[str]:
        """The canaries in RAM or in one of the server's own views (amnesiac.residue)."""
        return [name for name, addresses in self.hits.items() if addresses or self.views.get(name)]

    def merged(self, later: Search) -> Search:
        """Two searches during the session as one: each canary as the first that found it."""
        first = set(self.found())

        def pick(name: str) -> Search:
            return self if name in first else later

        return Search(
            None,
            later.searched_bytes,
            self.seconds + later.seconds,
            {name: pick(name).hits.get(name, []) for name in {**self.hits, **later.hits}},
            {n: h for n in {**self.holders, **later.holders} if (h := pick(n).holders.get(n))},
            {n: v for n in {**self.views, **later.views} if (v := pick(n).views.get(n))},
        )


@dataclass
class Forgetting:
    """A session and the searches after it: when each canary was last seen."""

    canaries: Canaries
    vpn: str  # "OpenVPN" or "WireGuard"
    during: Search
    after: list[Search]
    bound: float
    sink_received: bool
    client_log: str = ""
    during_searches: int = 1  # searches while the session ran (more when one missed a canary)
    cards_rebound: bool = False  # the server's network cards were rebound while the session ran

    def forgotten_after(self) -> dict[str, float | None]:
        """Per canary seen during the session: seconds from the disconnect to the first search
        that no longer found it (and no later one did); None when it was still there at the end."""
        result: dict[str, float | None] = {}
        for name in self.during.found():
            gone: float | None = None
            for search in self.after:
                if search.hits.get(name):
                    gone = None
                elif gone is None:
                    gone = search.seconds_after_disconnect
            result[name] = gone
        return result

    def kept(self) -> dict[str, dict[str, int]]:
        """What the last search still found, and where: the pages' holders and the server's views."""
        last = self.after[-1] if self.after else self.during
        return {name: {**last.holders.get(name, {}), **last.views.get(name, {})} for name in last.found()}


def measure(
    harness: ProviderHarness,
    guest: GuestMemory,
    shell: Callable[[str], str],
    *,
    bound: float,
    poll: float = POLL_SECONDS,
    wireguard: str | None = None,
    must_see: Collection[str] = (),
) -> Forgetting:
    """A session with canaries through the server (OpenVPN, or WireGuard through the interface
    named by `wireguard`), a search while it runs, then searches every `poll` seconds after the
    disconnect until nothing is found or `bound` has passed. `shell` runs a command on the server
    as root and returns its output (attribution and the server's own views). The search
    also looks for the client's packets as the network card received them (its receive buffers
    keep them until freed or overwritten: no_logs_flush_receive_buffers_when_idle). A search
    during the session that misses one of `must_see` is repeated (DURING_SEARCHES in all): the
    client's newest packet may sit in a receive buffer the driver has just freed, its next one
    (a keepalive a second later) in one it keeps; and the resolver forgets a query it gave up on
    or restarts (dns_resolver_lifetime_seconds) between the query and the search, so a missed DNS
    name is asked for again before the next search."""
    if harness.sink_host is None or harness.sink_file is None:
        raise RuntimeError("the target has no traffic sink for the session's payload")
    if wireguard:
        wireguard_client.require_client()
        tunnel = wireguard_client.tunnel_to(shell, wireguard, harness.openvpn_host)
        private, public = wireguard_client.keypair()
        canaries = Canaries.fresh(None)
        # The peer stays allowed after the client goes quiet: what must go is where it was.
        allowed: contextlib.AbstractContextManager[None] = wireguard_client.allowed_peer(
            Path(harness.peers_file or ""), public, tunnel.client_ip
        )
        session = wireguard_session(harness, canaries, tunnel, private)
    else:
        canaries = Canaries.fresh(harness.account)
        allowed = contextlib.nullcontext()
        session = tunnel_session(harness, canaries, shell)
    needles = {**canaries.needles(), "client packet header": canaries.packet_header(harness.openvpn_host)}
    # The views decode what they look for inside the server's own processes: never the negative
    # control, which must stay a string the server never had.
    viewed = {name: value for name, value in needles.items() if name != NEVER}
    qmp = Qmp(Path(guest.qmp_socket), timeout=60.0)
    try:
        since = int(shell("date +%s").strip())  # the server's clock: files written from now on

        def look(after: float | None) -> Search:
            found = memory.search_guest(qmp, Path(guest.dump_dir), needles)
            search = Search(after, found.searched_bytes, found.seconds, found.hits)
            search.holders = holders(found.hits, shell) if any(found.hits.values()) else {}
            search.views = residue.parse(shell(residue.command(viewed, since)), viewed)
            return search

        with allowed:
            with session as done:
                cards = shell(CARDS)
                during, searches = _search_during(look, done, must_see)
                rebound = shell(CARDS) != cards
            disconnected = time.monotonic()
            after: list[Search] = []
            while True:
                elapsed = time.monotonic() - disconnected
                after.append(look(round(elapsed, 1)))
                wanted = set(during.found()) - {NEVER}
                if not wanted & set(after[-1].found()) or elapsed >= bound:
                    break
                time.sleep(max(0.0, min(poll, bound - elapsed)))
    finally:
        qmp.close()
    received = canaries.payload.encode() in Path(harness.sink_file).read_bytes()
    vpn = "WireGuard" if wireguard else "OpenVPN"
    return Forgetting(canaries, vpn, during, after, bound, received, done.log, searches, rebound)


def _search_during(
    look: Callable[[float | None], Search], session: _Session, must_see: Collection[str]
) -> tuple[Search, int]:
    """Searches while the session runs, until each of `must_see` was found or DURING_SEARCHES
    were made: the searches as one, and how many there were."""
    during = look(None)
    searches = 1
    while searches < DURING_SEARCHES and (missed := set(must_see) - set(during.found())):
        if "dns name" in missed:
            session.send_again()  # the resolver freed the query, or restarted: a new one
        else:
            time.sleep(1.0)  # the client's next keepalive
        during = during.merged(look(None))
        searches += 1
    return during, searches


@dataclass
class _Session:
    """What a session's client said; `send` sends its canary traffic (once on connecting)."""

    send: Callable[[], str]
    log: str = ""

    def send_again(self) -> None:
        self.log += self.send()


@contextlib.contextmanager
def tunnel_session(
    harness: ProviderHarness, canaries: Canaries, shell: Callable[[str], str]
) -> Iterator[_Session]:
    """Connect a tun-mode OpenVPN client from the canary address, send the canary traffic, and
    yield while the session is up; it disconnects (exit notification) when the context ends."""
    fingerprint = (
        shell("openssl x509 -noout -fingerprint -sha256 -in /etc/openvpn/server/identity/server.crt")
        .strip()
        .split("=", 1)[-1]
    )
    ns = ["ip", "netns", "exec", harness.netns]
    session = _Session(lambda: "")  # its traffic goes to the resolver the server pushes
    with _client_address(harness, canaries), tempfile.TemporaryDirectory(prefix="amnesiac-canary-") as tmp:
        config, log = _client_config(Path(tmp), harness, canaries, fingerprint)
        client = spawn([*ns, "openvpn", "--config", str(config)], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            if not client_connected(log, client, CONNECT_SECONDS):
                raise RuntimeError(f"the canary session did not connect: {_tail(log)}")
            resolver = _pushed_resolver(log.read_text(errors="replace")) or "10.8.0.1"
            session.send = lambda: _traffic(harness, canaries, resolver)
            session.log = session.send()
            yield session
        finally:
            stop_group(client, term_timeout=15)
            session.log += _tail(log)


@contextlib.contextmanager
def wireguard_session(
    harness: ProviderHarness, canaries: Canaries, tunnel: wireguard_client.Tunnel, private: str
) -> Iterator[_Session]:
    """A WireGuard client (wireguard-go) from the canary address and port, its peer allowed by the
    caller; it sends the canary traffic through the tunnel and yields while it runs. WireGuard has
    no disconnect: when the context ends the client is gone and the server hears nothing more."""
    session = _Session(lambda: _traffic(harness, canaries, tunnel.server_ip))
    with (
        _client_address(harness, canaries, route_to=harness.openvpn_host),
        wireguard_client.wireguard_client(
            harness.netns, private, tunnel, listen_port=canaries.client_port, through=[str(harness.sink_host)]
        ) as answered,
    ):
        if not wireguard_client.until(answered, CONNECT_SECONDS):
            raise RuntimeError(f"the WireGuard canary session got no answer within {CONNECT_SECONDS:.0f} s")
        session.log = session.send()
        yield session


@contextlib.contextmanager
def _client_address(
    harness: ProviderHarness, canaries: Canaries, route_to: str | None = None
) -> Iterator[None]:
    """The canary address on the harness's link device while the context lasts; with `route_to`,
    packets to that address leave from it (a client that cannot bind its source address)."""
    ns = ["ip", "-n", harness.netns]
    device = _link_device(harness.netns)
    run([*ns, "addr", "add", f"{canaries.client_address}/{PREFIX}", "dev", device], capture=True)
    route = [f"{route_to}/32", "dev", device, "src", canaries.client_address] if route_to else []
    try:
        if route:
            run([*ns, "route", "add", *route], capture=True)
        yield
    finally:
        if route:
            run([*ns, "route", "del", *route], check=False, capture=True)
        run(
            [*ns, "addr", "del", f"{canaries.client_address}/{PREFIX}", "dev", device],
            check=False,
            capture=True,
        )


def _traffic(harness: ProviderHarness, canaries: Canaries, resolver: str) -> str:
    """The canary traffic from the harness's namespace: what it said happened."""
    sink = f"{harness.sink_host}:{harness.sink_port}"
    argv = ["ip", "netns", "exec", harness.netns, sys.executable, "-c", TRAFFIC, resolver,
            canaries.dns_name, sink, canaries.payload]  # fmt: skip
    traffic = run(argv, capture=True, check=False)
    return traffic.stdout.decode(errors="replace") + traffic.stderr.decode(errors="replace")


def _client_config(
    directory: Path, harness: ProviderHarness, canaries: Canaries, fingerprint: str
) -> tuple[Path, Path]:
    credentials = directory / "account"
    credentials.write_text(f"{harness.account}\n{harness.password}\n")
    credentials.chmod(0o600)
    config, log = directory / "client.conf", directory / "client.log"
    config.write_text(
        "\n".join(
            [
                "client",
                # A tun device inside the harness's namespace: its routes change only that namespace.
                "dev tun",
                "route-nopull",  # not the server's default route: only the sink goes through
                f"route {harness.sink_host} 255.255.255.255 vpn_gateway",
                "pull-filter ignore dhcp-option",
                "script-security 1",
                f"proto {harness.openvpn_proto}",
                f"remote {harness.openvpn_host} {harness.openvpn_port}",
                f"local {canaries.client_address}",
                f"lport {canaries.client_port}",
                f"peer-fingerprint {fingerprint}",
                "connect-retry-max 1",
                "resolv-retry 0",
                "auth-nocache",
                f"auth-user-pass {credentials}",
                "explicit-exit-notify 1",
                "verb 3",
                f"log {log}",
                "",
            ]
        )
    )
    return config, log


def _link_device(netns: str) -> str:
    """The tap device of the harness's link: the namespace's device holding HOST_ADDRESS."""
    out = run(["ip", "-n", netns, "-o", "-4", "addr", "show"], capture=True).stdout.decode()
    for line in out.splitlines():
        if f" {HOST_ADDRESS}/" in line:
            return line.split()[1]
    raise RuntimeError(f"no device with {HOST_ADDRESS} in namespace {netns}")


def _pushed_resolver(log: str) -> str | None:
    for word in log.replace(",", " ").split("dhcp-option DNS ")[1:]:
        return word.split()[0].strip("'")
    return None


def client_connected(log: Path, client: subprocess.Popen[bytes], timeout: float) -> bool:
    """True when an OpenVPN client's session is up; False when refused, ended or still down after
    `timeout` (read from its `--log`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if "Initialization Sequence Completed" in text:
            return True
        if "AUTH_FAILED" in text or client.poll() is not None:
            return False
        time.sleep(0.25)
    return False


def _tail(log: Path, lines: int = 8) -> str:
    text = log.read_text(errors="replace") if log.exists() else "(no client log)"
    return "\n".join(text.strip().splitlines()[-lines:])


def holders(hits: Mapping[str, list[int]], shell: Callable[[str], str]) -> dict[str, dict[str, int]]:
    """Per canary, what holds its hits (page kind, and the systemd unit of the page's owner)."""
    addresses = [a for found in hits.values() for a in found]
    kinds = memory.page_kinds(shell(memory.kpageflags_command(addresses)))
    owners = memory.page_owners(shell(memory.kpagecgroup_command(addresses)), shell(memory.CGROUPS_COMMAND))
    result: dict[str, dict[str, int]] = {}
    for name, found in hits.items():
        counted: dict[str, int] = {}
        for address in found:
            pfn = address // memory.PAGE_SIZE
            holder = kinds.get(pfn, "unknown")
            if owner := owners.get(pfn):
                holder += f" of {owner}"
            counted[holder] = counted.get(holder, 0) + 1
        if counted:
            result[name] = counted
    return result
