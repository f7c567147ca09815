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
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from amnesiac.boot import memory
from amnesiac.boot.link import HOST_ADDRESS, PREFIX
from amnesiac.boot.qmp import Qmp
from amnesiac.checks.expectations import GuestMemory, ProviderHarness
from amnesiac.run import run, spawn, stop_group

CONNECT_SECONDS = 60.0  # a bound: a TCG guest answers slowly
POLL_SECONDS = 5.0  # between searches after the disconnect
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

    account: str
    client_address: str
    client_port: int
    dns_name: str
    payload: str
    never: str  # the negative control: sent nowhere

    @classmethod
    def fresh(cls, account: str) -> Canaries:
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
        sockaddr = struct.pack("<H", socket.AF_INET) + struct.pack(">H", self.client_port)
        return {
            "account": self.account.encode(),
            "client address": self.client_address.encode(),
            "client address:port": f"{self.client_address}:{self.client_port}".encode(),
            "client sockaddr": sockaddr + socket.inet_aton(self.client_address),
            "dns name": self.dns_name.split(".")[0].encode(),  # as a label: text and wire form
            "payload": self.payload.encode(),
            "never sent": self.never.encode(),
        }


@dataclass
class Search:
    """One search of the whole guest RAM: each canary's hits, and what holds them."""

    seconds_after_disconnect: float | None  # None: during the session
    searched_bytes: int
    seconds: float  # the dump and the search (the guest is paused for the dump)
    hits: dict[str, list[int]]
    holders: dict[str, dict[str, int]] = field(default_factory=dict)  # canary -> holder -> hits

    def found(self) -> list[str]:
        return [name for name, addresses in self.hits.items() if addresses]


@dataclass
class Forgetting:
    """A session and the searches after it: when each canary was last seen."""

    canaries: Canaries
    during: Search
    after: list[Search]
    bound: float
    sink_received: bool
    client_log: str = ""

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
        """What the last search still found, and where."""
        last = self.after[-1] if self.after else self.during
        return {name: last.holders.get(name, {}) for name in last.found()}


def measure(
    harness: ProviderHarness,
    guest: GuestMemory,
    shell: Callable[[str], str],
    *,
    bound: float,
    poll: float = POLL_SECONDS,
) -> Forgetting:
    """A session with canaries through the server, a search while it runs, then searches every
    `poll` seconds after the disconnect until nothing is found or `bound` has passed.
    `shell` runs a command on the server as root and returns its output (attribution)."""
    if harness.sink_host is None or harness.sink_file is None:
        raise RuntimeError("the target has no traffic sink for the session's payload")
    canaries = Canaries.fresh(harness.account)
    needles = canaries.needles()
    qmp = Qmp(Path(guest.qmp_socket), timeout=60.0)
    try:

        def look(after: float | None) -> Search:
            found = memory.search_guest(qmp, Path(guest.dump_dir), needles)
            search = Search(after, found.searched_bytes, found.seconds, found.hits)
            search.holders = holders(found.hits, shell) if search.found() else {}
            return search

        with tunnel_session(harness, canaries, shell) as session:
            during = look(None)
        disconnected = time.monotonic()
        after: list[Search] = []
        while True:
            elapsed = time.monotonic() - disconnected
            after.append(look(round(elapsed, 1)))
            wanted = set(during.found()) - {"never sent"}
            if not wanted & set(after[-1].found()) or elapsed >= bound:
                break
            time.sleep(max(0.0, min(poll, bound - elapsed)))
    finally:
        qmp.close()
    received = canaries.payload.encode() in Path(harness.sink_file).read_bytes()
    return Forgetting(canaries, during, after, bound, received, session.log)


@dataclass
class _Session:
    log: str = ""


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
    address = f"{canaries.client_address}/{PREFIX}"
    device = _link_device(harness.netns)
    run(["ip", "-n", harness.netns, "addr", "add", address, "dev", device], capture=True)
    session = _Session()
    try:
        with tempfile.TemporaryDirectory(prefix="amnesiac-canary-") as tmp:
            directory = Path(tmp)
            config, log = _client_config(directory, harness, canaries, fingerprint)
            client = spawn([*ns, "openvpn", "--config", str(config)], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)  # fmt: skip
            try:
                if not client_connected(log, client, CONNECT_SECONDS):
                    raise RuntimeError(f"the canary session did not connect: {_tail(log)}")
                resolver = _pushed_resolver(log.read_text(errors="replace")) or "10.8.0.1"
                sink = f"{harness.sink_host}:{harness.sink_port}"
                traffic = run([*ns, sys.executable, "-c", TRAFFIC, resolver, canaries.dns_name, sink,
                               canaries.payload], capture=True, check=False)  # fmt: skip
                session.log = traffic.stdout.decode(errors="replace") + traffic.stderr.decode(
                    errors="replace"
                )
                yield session
            finally:
                stop_group(client, term_timeout=15)
                session.log += _tail(log)
    finally:
        run(["ip", "-n", harness.netns, "addr", "del", address, "dev", device], check=False, capture=True)


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
