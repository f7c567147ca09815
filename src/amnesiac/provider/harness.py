"""A reference provider for one booted machine: the service on 127.0.0.1, the node identity
the guest receives in its boot-time overlay, and the forwards that join them.

The guest reaches the service only through a `guestfwd` rule at GUEST_PROVIDER:443 (its
network stays isolated), with an identity made for this run: a provider CA, the service's
certificate for that address, the node's client certificate. The test account is a canary:
unique to the run, so the session check can search the server's files for it.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from amnesiac.boot.link import ClientLink
from amnesiac.boot.overlay import OverlayFile
from amnesiac.boot.qemu import GuestService
from amnesiac.boot.sink import Sink
from amnesiac.checks.expectations import ProviderHarness
from amnesiac.provider.pki import ProviderPki, node_identity_files
from amnesiac.provider.service import ReferenceService

GUEST_PROVIDER = "10.0.2.101"  # where the guest finds the service (10.0.2.100 is the HTTP server)
GUEST_RELEASE = "10.0.2.103"  # where a test finds an identity release service (10.0.2.102: boot.sink)
IDENTITY_DIR = "etc/amnesiac/provider"  # provider_agent_identity_dir, relative to /
NODE_NAME = "amnesiac-verify-node"


@dataclass(frozen=True)
class AttachedProvider:
    """What booting with a reference provider needs, and what the checks are told of it."""

    service: ReferenceService
    overlay_files: tuple[OverlayFile, ...]
    guest_service: GuestService
    account: str
    password: str
    journal: Path
    peers_file: Path  # the WireGuard peers the service allows: rewritten by the session check

    def harness(
        self, link: ClientLink, openvpn_port: int, openvpn_proto: str, sink: Sink | None = None
    ) -> ProviderHarness:
        return ProviderHarness(
            journal=str(self.journal),
            node=NODE_NAME,
            netns=link.netns,
            openvpn_host=link.guest_address,
            openvpn_port=openvpn_port,
            openvpn_proto=openvpn_proto,
            account=self.account,
            password=self.password,
            peers_file=str(self.peers_file),
            sink_host=sink.service.guest_ip if sink else None,
            sink_port=sink.service.guest_port if sink else None,
            sink_file=str(sink.received) if sink else None,
        )


@contextlib.contextmanager
def reference_provider(work: Path, records: list[str]) -> Iterator[AttachedProvider]:
    """Start the reference service for a machine about to boot; stopped when the context ends."""
    pki = ProviderPki.create([GUEST_PROVIDER, "127.0.0.1"])
    account = f"amnesiac-canary-{secrets.token_hex(6)}"
    password = secrets.token_urlsafe(18)
    journal = work / "provider-requests.jsonl"
    node = pki.issue_node(NODE_NAME)
    files = node_identity_files(f"https://{GUEST_PROVIDER}", pki, node)
    overlay = tuple(OverlayFile(f"{IDENTITY_DIR}/{name}", data, mode) for name, (data, mode) in files.items())
    peers = work / "provider-wireguard-peers"
    with ReferenceService(pki, {account: password}, records, journal=journal, peers_file=peers) as service:
        yield AttachedProvider(
            service=service,
            overlay_files=overlay,
            guest_service=GuestService(GUEST_PROVIDER, 443, service.port),
            account=account,
            password=password,
            journal=journal,
            peers_file=peers,
        )
