"""A real WireGuard client for the checks' sessions: wireguard-go in the harness's network
namespace with a tunnel to the server, allowed by the reference provider's service.

The provider check (checks/provider.py) uses it to watch a session's records leave; the canary
session (amnesiac.canary) to carry canaries through the server from an address and port of its
own.
"""

from __future__ import annotations

import contextlib
import ipaddress
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from amnesiac.run import run, spawn, stop_group

# Traffic through a tunnel: a DNS query to the server's resolver at its tunnel address (argv[1]),
# true when an answer with the query's id comes back (the verifier need not have ping or dig).
DNS_PROBE = """
import socket, sys
header = bytes.fromhex("a5a5 0100 0001 0000 0000 0000")  # id, recursion desired, one question
query = header + b"\\x08amnesiac\\x07invalid\\x00" + bytes.fromhex("0001 0001")  # A, IN
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    s.settimeout(2)
    s.sendto(query, (sys.argv[1], 53))
    sys.exit(0 if s.recvfrom(512)[0][:2] == query[:2] else 1)
"""


@dataclass(frozen=True)
class Tunnel:
    """Both ends of a WireGuard client's tunnel to the server."""

    server_key: str
    endpoint: str  # the server's address on the harness's link, and WireGuard's port
    server_ip: str  # inside the tunnel: the server's resolver listens there
    client_ip: str


def require_client() -> None:
    if shutil.which("wireguard-go") is None or shutil.which("wg") is None:
        raise RuntimeError(
            "the verifier has no WireGuard client (apt-get install wireguard-go wireguard-tools)"
        )


def tunnel_to(shell: Callable[[str], str], interface: str, server_host: str) -> Tunnel:
    """The server's side of a tunnel through `interface`, read over the verifier's login; the
    client takes the first other address of the interface's network."""
    server_key = shell(f"wg show {interface} public-key").strip()
    port = shell(f"wg show {interface} listen-port").strip()
    address = shell(f"ip -4 -o addr show dev {interface}").split()
    if not (server_key and port.isdigit() and "inet" in address):
        raise AssertionError(f"{interface} is not up on the server")
    server = ipaddress.ip_interface(address[address.index("inet") + 1])
    return Tunnel(
        server_key=server_key,
        endpoint=f"{server_host}:{port}",
        server_ip=str(server.ip),
        client_ip=str(next(h for h in server.network.hosts() if h != server.ip)),
    )


def keypair() -> tuple[str, str]:
    """A fresh (private, public) key pair, base64 as `wg` prints them."""
    private = _output(["wg", "genkey"])
    return private, _output(["wg", "pubkey"], private)


@contextlib.contextmanager
def allowed_peer(peers_file: Path, public: str, client_ip: str) -> Iterator[None]:
    """The reference service allows the peer while the context lasts (its agent adds it within
    its interval), and withdraws it after."""
    peers_file.write_text(f"{public} {client_ip}/32\n")
    try:
        yield
    finally:
        peers_file.write_text("")


@contextlib.contextmanager
def wireguard_client(
    netns: str,
    private: str,
    tunnel: Tunnel,
    *,
    listen_port: int | None = None,
    through: Sequence[str] = (),
) -> Iterator[Callable[[], bool]]:
    """wireguard-go in `netns` with its tunnel to the server (and routes to the `through`
    addresses over it); yields a probe that is true when the server's resolver answered a query
    sent through the tunnel."""
    name = f"amwg{secrets.token_hex(3)}"
    ns = ["ip", "netns", "exec", netns]
    routed = [tunnel.server_ip, *through]
    allowed = ",".join(f"{ip}/32" for ip in routed)
    port = ["listen-port", str(listen_port)] if listen_port else []
    with tempfile.TemporaryDirectory(prefix="amnesiac-wg-") as tmp:
        key = Path(tmp) / "private"
        key.write_text(private + "\n")
        key.chmod(0o600)
        log_path = Path(tmp) / "wireguard-go.log"
        with log_path.open("wb") as log:
            daemon = spawn([*ns, "wireguard-go", "-f", name], stdout=log, stderr=subprocess.STDOUT)
        try:
            until(lambda: ok([*ns, "ip", "link", "show", name]), 10)
            for argv in (
                [*ns, "wg", "set", name, "private-key", str(key), *port, "peer", tunnel.server_key,
                 "endpoint", tunnel.endpoint, "allowed-ips", allowed, "persistent-keepalive", "1"],
                [*ns, "ip", "addr", "add", f"{tunnel.client_ip}/32", "dev", name],
                [*ns, "ip", "link", "set", name, "up"],
                *([*ns, "ip", "route", "add", f"{ip}/32", "dev", name] for ip in routed),
            ):  # fmt: skip
                run(argv, capture=True)
            yield lambda: ok([*ns, sys.executable, "-c", DNS_PROBE, tunnel.server_ip])
        except BaseException as exc:
            # A tunnel that vanished mid-session (a route gone: ENETUNREACH) is a client that died.
            if daemon.poll() is not None:
                tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
                raise RuntimeError(f"wireguard-go exited ({daemon.returncode}): {' / '.join(tail)}") from exc
            raise
        finally:
            stop_group(daemon, term_timeout=10)
            run([*ns, "ip", "link", "del", name], check=False, capture=True)


def ok(argv: list[str]) -> bool:
    return run(argv, check=False, capture=True).returncode == 0


def until(done: Callable[[], bool], seconds: float) -> bool:
    """Poll `done` until it holds or `seconds` pass (a bound, never a measurement)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if done():
            return True
        time.sleep(0.5)
    return False


def _output(argv: list[str], stdin: str | None = None) -> str:
    data = stdin.encode() if stdin is not None else None
    return run(argv, capture=True, input_bytes=data).stdout.decode().strip()
