"""A traffic sink: the destination a VPN client's canary traffic goes to through the server.

A TCP service on 127.0.0.1 that the guest reaches through a `guestfwd` rule (GuestService), as
it reaches the reference provider: the isolated guest gets one more address it may send to, and
nothing beyond it. Whatever arrives is appended to a file, so a check can tell that its traffic
really crossed the server (decrypted, routed, translated) before it searches the server for it.
"""

from __future__ import annotations

import contextlib
import socketserver
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from amnesiac.boot.qemu import GuestService

GUEST_SINK = "10.0.2.102"  # 10.0.2.100 is the HTTP server, 10.0.2.101 the reference provider
GUEST_SINK_PORT = 9  # discard
MAX_BYTES = 1 << 20  # per connection: a canary is a few bytes, never a flood
READ_SECONDS = 30.0


@dataclass(frozen=True)
class Sink:
    service: GuestService  # where the guest finds it
    received: Path  # everything it was sent, in arrival order


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        self.request.settimeout(READ_SECONDS)
        total = 0
        with contextlib.suppress(OSError):
            while total < MAX_BYTES and (data := self.request.recv(65536)):
                total += len(data)
                with self.server.lock, self.server.received.open("ab") as out:
                    out.write(data)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, received: Path) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.received = received
        self.lock = threading.Lock()


@contextlib.contextmanager
def traffic_sink(work: Path) -> Iterator[Sink]:
    """Run the sink until the context ends; what it received stays in `work`."""
    received = work / "sink-received"
    received.touch()
    server = _Server(received)
    thread = threading.Thread(target=server.serve_forever, name="amnesiac-sink", daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        yield Sink(GuestService(GUEST_SINK, GUEST_SINK_PORT, port), received)
    finally:
        server.shutdown()
        server.server_close()
