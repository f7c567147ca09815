"""A loopback-only HTTP server for netboot files, which records what it served and its sha256.

It serves a fixed table of names (no directory listing, no other paths), from files or from
bytes in memory. Each response is hashed as it is sent; a file with an expected sha256 that no
longer matches when it has been read (changed on disk after the check before boot) is cut off
before its last chunk, so the boot loader sees a failed download instead of a wrong image.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from amnesiac.serving import InThread

log = logging.getLogger("amnesiac.http")

CHUNK = 1 << 20


@dataclass(frozen=True)
class Source:
    """What one URL serves: a file on disk or bytes, and the sha256 it must have (if known)."""

    path: Path | None = None
    data: bytes | None = None
    expect_sha256: str | None = None
    content_type: str = "application/octet-stream"

    def open(self) -> BinaryIO:
        if self.path is not None:
            return self.path.open("rb")
        return io.BytesIO(self.data or b"")

    def size(self) -> int:
        return self.path.stat().st_size if self.path is not None else len(self.data or b"")


@dataclass(frozen=True)
class Served:
    """One request as the server answered it."""

    name: str
    status: int
    bytes: int  # body bytes sent
    sha256: str | None  # of the bytes sent; None when no body was sent
    complete: bool  # the whole body was sent
    at: float  # time.monotonic() when the response ended
    note: str = ""

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "status": self.status,
            "bytes": self.bytes,
            "sha256": self.sha256,
            "complete": self.complete,
        }


class FileServer(InThread):
    """`with FileServer(table) as server:` serves on 127.0.0.1, a free port, in a thread."""

    def __init__(self, table: Mapping[str, Source], host: str = "127.0.0.1") -> None:
        if host not in {"127.0.0.1", "::1", "localhost"}:
            raise ValueError("the netboot server binds to the loopback only")
        self.table = dict(table)
        self._records: list[Served] = []
        self._lock = threading.Lock()
        httpd = _Server((host, 0), _handler_for(self))
        self.port: int = httpd.server_address[1]
        self._serve_in_thread(httpd, "amnesiac-http")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def records(self) -> list[Served]:
        with self._lock:
            return list(self._records)

    def _record(self, served: Served) -> None:
        with self._lock:
            self._records.append(served)
        log.debug("served %s: %s, %d bytes%s", served.name, served.status, served.bytes, served.note)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = False


def _handler_for(server: FileServer) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        # HTTP/1.0: one request per connection, so each guest connection ends cleanly.
        protocol_version = "HTTP/1.0"
        server_version = "amnesiac-boot"
        sys_version = ""

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def do_GET(self) -> None:
            self._answer(body=True)

        def _answer(self, *, body: bool) -> None:
            name = self.path.split("?", 1)[0].lstrip("/")
            source = server.table.get(name)
            if source is None:
                self.send_error(404)
                server._record(Served(name, 404, 0, None, False, time.monotonic()))
                return
            try:
                size = source.size()
            except OSError as exc:
                self.send_error(500)
                server._record(Served(name, 500, 0, None, False, time.monotonic(), note=f": {exc}"))
                return
            self.send_response(200)
            self.send_header("Content-Type", source.content_type)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            if not body:
                server._record(Served(name, 200, 0, None, True, time.monotonic()))
                return
            sent, digest, complete, note = _send(self.wfile, source)
            server._record(Served(name, 200, sent, digest, complete, time.monotonic(), note))

        def log_message(self, format: str, *args: object) -> None:
            log.debug("http: " + format, *args)

    return Handler


def _send(out: io.BufferedIOBase, source: Source) -> tuple[int, str, bool, str]:
    """Stream the body, one chunk behind, so a mismatching file loses its last chunk."""
    digest = hashlib.sha256()
    sent = 0
    try:
        with source.open() as f:
            held = f.read(CHUNK)
            while held:
                digest.update(held)
                nxt = f.read(CHUNK)
                if not nxt and source.expect_sha256 and digest.hexdigest() != source.expect_sha256:
                    return sent, digest.hexdigest(), False, ": sha256 mismatch, download cut short"
                out.write(held)
                sent += len(held)
                held = nxt
    except OSError as exc:  # the guest closed the connection, or the file went away
        return sent, digest.hexdigest(), False, f": {exc}"
    return sent, digest.hexdigest(), True, ""
