"""The reference central service of docs/provider-interface.md: HTTPS with mutual TLS, stdlib only.

It answers `/v1/auth` from a table of accounts, keeps the records a node sends, and records
every request it receives (and every refused TLS handshake) as a `Request`, in memory and, if
asked, as JSON lines in a journal that another process can read. It does not judge which
fields a record may carry: it keeps what arrived, and the checks judge. Passwords are never
kept: a journal of them would be a record the provider must not keep.
"""

from __future__ import annotations

import contextlib
import hmac
import http.server
import ipaddress
import json
import os
import shutil
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qsl, urlencode

from amnesiac.provider.pki import ProviderPki
from amnesiac.serving import InThread

AUTH = "/v1/auth"
RECORDS = "/v1/records/"
PEERS = "/v1/wireguard/peers"
FORM = "application/x-www-form-urlencoded"
EVENTS = frozenset({"connect", "disconnect"})
BODY_LIMIT = 64 * 1024
REDACTED = "<redacted>"
SECRET_FIELDS = frozenset({"password", "token"})  # never journaled (a token is identity release's)
# A client that stalls the handshake or a request holds one thread; these bound how long.
HANDSHAKE_TIMEOUT = 5.0
REQUEST_TIMEOUT = 10.0
SHUTDOWN_POLL = 0.05


@dataclass(frozen=True)
class Request:
    """One request as the service received and answered it (a refused handshake: method "TLS", status 0).

    `fields` are the body's fields in the order and multiplicity they arrived, any `password`
    or `token` value replaced by REDACTED; `password_ok` is the auth verdict (None for other requests).
    """

    time: float
    method: str
    path: str
    fields: tuple[tuple[str, str], ...]
    status: int
    client_cn: str
    tls_version: str
    password_ok: bool | None = None
    error: str = ""

    def as_dict(self) -> dict[str, object]:
        return {
            "time": self.time,
            "method": self.method,
            "path": self.path,
            "fields": [[name, value] for name, value in self.fields],
            "status": self.status,
            "client_cn": self.client_cn,
            "tls_version": self.tls_version,
            "password_ok": self.password_ok,
            "error": self.error,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Request:
        """The inverse of as_dict; a ValueError for anything else (a journal is input, not trusted)."""
        try:
            pairs = data["fields"]
            if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
                raise ValueError(f"fields are not [name, value] pairs: {pairs!r}")
            fields = tuple((_str(name), _str(value)) for name, value in pairs)
            password_ok = data["password_ok"]
            if password_ok is not None and not isinstance(password_ok, bool):
                raise ValueError(f"password_ok is {password_ok!r}")
            status = data["status"]
            if not isinstance(status, int) or isinstance(status, bool):
                raise ValueError(f"status is {status!r}")
            moment = data["time"]
            if not isinstance(moment, int | float) or isinstance(moment, bool):
                raise ValueError(f"time is {moment!r}")
            return cls(
                time=float(moment),
                method=_str(data["method"]),
                path=_str(data["path"]),
                fields=fields,
                status=status,
                client_cn=_str(data["client_cn"]),
                tls_version=_str(data["tls_version"]),
                password_ok=password_ok,
                error=_str(data["error"]),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a request record: {exc}") from exc


def read_journal(path: Path) -> list[Request]:
    """The requests a service journaled so far; none if it has not written yet.

    The service writes whole lines; a last line without its newline is one being written now
    and is left for the next read.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    complete = data[: data.rfind(b"\n") + 1]
    return [Request.from_dict(json.loads(line)) for line in complete.decode("utf-8").splitlines() if line]


class JournaledService(InThread):
    """An HTTPS service of the provider in a thread, which keeps every request it answers (and
    every refused TLS handshake) as a `Request`, in memory and, if asked, in a JSON-lines journal."""

    def _start(
        self,
        pki: ProviderPki,
        handler: type[JournaledHandler],
        *,
        journal: Path | None,
        host: str,
        port: int,
        client_certificates: bool,
        name: str,
    ) -> None:
        """Call from __init__: listen on (host, port); serve once the `with` block starts."""
        self.journal = journal
        self.host = host
        self._requests: list[Request] = []
        self._lock = threading.Lock()
        httpd = _Server((host, port), _server_context(pki, client_certificates), self, handler)
        self._port = int(httpd.server_address[1])
        # A short poll interval: shutdown() waits for the loop's next poll, and a context should end promptly.
        self._serve_in_thread(httpd, name, SHUTDOWN_POLL)

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        """The base URL a node's identity names (no trailing slash: the node appends /v1/...)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}"

    def requests(self) -> list[Request]:
        with self._lock:
            return list(self._requests)

    def wait_for(self, predicate: Callable[[list[Request]], bool], timeout: float) -> bool:
        """Whether `predicate(requests)` held within `timeout` seconds (polled every 0.1 s)."""
        deadline = time.monotonic() + timeout
        while True:
            if predicate(self.requests()):
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            time.sleep(min(0.1, remaining))

    def _record(self, request: Request) -> None:
        """Keep `request` before it is answered, so a client that has its answer finds it here."""
        line = (json.dumps(request.as_dict()) + "\n").encode("ascii")
        with self._lock:
            self._requests.append(request)
            if self.journal is not None:
                # One write per line with O_APPEND: a reader sees whole lines and at most one partial last.
                fd = os.open(self.journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    os.write(fd, line)
                finally:
                    os.close(fd)


class ReferenceService(JournaledService):
    """`with ReferenceService(pki, accounts, records) as service:` serves HTTPS in a thread.

    `accounts` maps usernames to passwords for /v1/auth; `records` are the record names
    /v1/records/{record} accepts; `peers` are the (public key, allowed IP/prefix) lines of
    /v1/wireguard/peers, or, with `peers_file`, that file's lines as they are at each request
    (another process, a check, allows and removes peers by rewriting it). The client must
    present a certificate from the PKI's CA.
    """

    def __init__(
        self,
        pki: ProviderPki,
        accounts: Mapping[str, str],
        records: Iterable[str],
        *,
        journal: Path | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        peers: Iterable[tuple[str, str]] = (),
        peers_file: Path | None = None,
    ) -> None:
        self.accounts = dict(accounts)
        self.records = frozenset(records)
        self.peers = tuple(peers)
        for peer in self.peers:
            if any(not part or any(char.isspace() for char in part) for part in peer):
                raise ValueError(f"a peer is a public key and an IP/prefix without spaces, not {peer!r}")
        self.peers_file = peers_file
        self._start(
            pki,
            _ReferenceHandler,
            journal=journal,
            host=host,
            port=port,
            client_certificates=True,
            name="amnesiac-provider",
        )

    def current_peers(self) -> tuple[tuple[str, str], ...]:
        """The peers to answer with now: the file's lines (missing: none), else `peers`."""
        if self.peers_file is None:
            return self.peers
        try:
            lines = self.peers_file.read_text().splitlines()
        except FileNotFoundError:
            return ()
        return tuple((f[0], f[1]) for f in (line.split() for line in lines) if len(f) == 2)

    def password_ok(self, username: str, password: str) -> bool:
        expected = self.accounts.get(username)
        # compare_digest: no early exit at the first wrong byte; an unknown account is compared too.
        same = hmac.compare_digest((expected or "").encode(), password.encode())
        return same and expected is not None


def _server_context(pki: ProviderPki, client_certificates: bool) -> ssl.SSLContext:
    """TLS 1.2+, the service's certificate, and (with `client_certificates`) clients required to
    present one from the provider CA."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if client_certificates:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cadata=pki.ca.cert.decode("ascii"))
    # load_cert_chain reads files only: the key lives on disk for as long as it takes to load it.
    directory = Path(tempfile.mkdtemp(prefix="amnesiac-provider-"))
    try:
        cert, key = directory / "service.crt", directory / "service.key"
        for path, data in ((cert, pki.service.cert), (key, pki.service.key)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        context.load_cert_chain(cert, key)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return context


class _Server(http.server.ThreadingHTTPServer):
    """Accepts TCP, then does each TLS handshake in the connection's own thread (a slow client
    cannot stall the accept loop), journaling a refused one."""

    daemon_threads = True
    allow_reuse_address = False

    def __init__(
        self,
        address: tuple[str, int],
        context: ssl.SSLContext,
        service: JournaledService,
        handler: type[JournaledHandler],
    ) -> None:
        self.context = context
        self.service = service
        with contextlib.suppress(ValueError):
            if ipaddress.ip_address(address[0]).version == 6:
                self.address_family = socket.AF_INET6
        super().__init__(address, handler)

    def get_request(self) -> tuple[Any, Any]:
        sock, address = self.socket.accept()
        try:
            return self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), address
        except BaseException:
            sock.close()
            raise

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(HANDSHAKE_TIMEOUT)
        try:
            request.do_handshake()
        except OSError as exc:  # ssl.SSLError is one: no certificate, another CA, no TLS at all, a timeout
            self.service._record(Request(time.time(), "TLS", "", (), 0, "", "", error=str(exc)))
            return
        super().finish_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Stay quiet: a client that goes away mid-request is not the service's error to print."""


class JournaledHandler(http.server.BaseHTTPRequestHandler):
    """What every JournaledService's handler shares: each method routed to `_dispatch`, bodies
    read within limits, answers and errors written one way. The reference service's and the
    identity release's (provider/release.py) handlers route their own paths."""

    # HTTP/1.1 as the interface says, one request per connection (a node makes one per curl).
    protocol_version = "HTTP/1.1"
    server_version = "amnesiac-reference-provider"
    sys_version = ""
    timeout = REQUEST_TIMEOUT
    server: _Server

    # Every method reaches the router, so a wrong one is a 405 that is recorded, not the base's 501.
    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_OPTIONS(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        raise NotImplementedError  # each service's own handler routes its paths

    def _read_body(self) -> bytes | int:
        """The body, or the status that refuses it: 413 over BODY_LIMIT, 400 for odd framing."""
        if "Transfer-Encoding" in self.headers:
            return 400  # Content-Length only: one framing, nothing to disagree about
        lengths = self.headers.get_all("Content-Length") or []
        if not lengths:
            return b""
        if len(lengths) != 1 or not (lengths[0].isascii() and lengths[0].isdigit()):
            return 400
        length = int(lengths[0])
        if length > BODY_LIMIT:
            return 413
        try:
            body = self.rfile.read(length)
        except OSError:
            return 400
        return body if len(body) == length else 400

    def _form(self, body: bytes) -> list[tuple[str, str]] | None:
        """The form's fields in order, duplicates kept; None if it is not a well-formed UTF-8 form."""
        if _media_type(self.headers) != FORM:
            return None
        try:
            return parse_qsl(
                body.decode("utf-8"), keep_blank_values=True, strict_parsing=True, errors="strict"
            )
        except ValueError:  # UnicodeDecodeError is one
            return None

    def _answer(
        self,
        status: int,
        text: str,
        fields: Iterable[tuple[str, str]] = (),
        *,
        password_ok: bool | None = None,
        allow: str | None = None,
    ) -> None:
        """Record the request, then answer it with a short text/plain body and close the connection."""
        self.server.service._record(
            Request(
                time=time.time(),
                method=self.command,
                path=_redact_path(self.path),
                fields=_redact(fields),
                status=status,
                client_cn=_client_cn(self.connection),
                tls_version=_tls_version(self.connection),
                password_ok=password_ok,
            )
        )
        self.close_connection = True
        self.send_response(status)
        if allow is not None:
            self.send_header("Allow", allow)
        body = text.encode("utf-8")
        if status != 204:  # a 204 has no body and no Content-Length (RFC 9110)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if status != 204 and self.command != "HEAD":
            self.wfile.write(body)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The base class's own refusals (a bad request line, an unknown method) are requests too."""
        self.server.service._record(
            Request(
                time=time.time(),
                method=getattr(self, "command", None) or "",
                path=_redact_path(getattr(self, "path", None) or ""),
                fields=(),
                status=code,
                client_cn=_client_cn(self.connection),
                tls_version=_tls_version(self.connection),
            )
        )
        super().send_error(code, message, explain)

    def log_message(self, format: str, *args: object) -> None:
        """Silent: the service's one account of what it received is its requests and journal."""


class _ReferenceHandler(JournaledHandler):
    """The paths of this page's interface: /v1/auth, /v1/records/{record}, /v1/wireguard/peers."""

    @property
    def service(self) -> ReferenceService:
        return cast(ReferenceService, self.server.service)  # _ReferenceHandler serves only it

    def _dispatch(self) -> None:
        body = self._read_body()  # read first, so an early answer does not reset the connection
        path = self.path
        record = _record_name(path)
        if path == AUTH or record is not None:
            allowed = "POST"
        elif path == PEERS:
            allowed = "GET"
        else:
            self._answer(404, "not found")
            return
        if self.command != allowed:
            self._answer(405, "method not allowed", allow=allowed)
        elif isinstance(body, int):
            self._answer(body, "body too large" if body == 413 else "malformed request")
        elif path == PEERS:
            peers = self.service.current_peers()
            self._answer(200, "".join(f"{key} {allowed_ip}\n" for key, allowed_ip in peers))
        else:
            fields = self._form(body)
            if fields is None:
                self._answer(400, "malformed body")
            elif path == AUTH:
                self._auth(fields)
            else:
                self._keep(str(record), fields)

    def _auth(self, fields: list[tuple[str, str]]) -> None:
        if sorted(name for name, _ in fields) != ["password", "username"]:  # both, once, nothing else
            self._answer(400, "the body is username and password, nothing else", fields)
            return
        form = dict(fields)
        ok = self.service.password_ok(form["username"], form["password"])
        self._answer(200 if ok else 403, "allow" if ok else "deny", fields, password_ok=ok)

    def _keep(self, record: str, fields: list[tuple[str, str]]) -> None:
        names = [name for name, _ in fields]
        events = [value for name, value in fields if name == "event"]
        if record not in self.service.records:
            self._answer(404, "no such record", fields)
        elif len(set(names)) != len(names) or len(events) != 1 or events[0] not in EVENTS:
            self._answer(400, "event is connect or disconnect, and each field is given once", fields)
        else:
            self._answer(204, "", fields)


def _record_name(path: str) -> str | None:
    """`record` of a path /v1/records/{record} (one non-empty segment), else None."""
    name = path.removeprefix(RECORDS)
    return name if path.startswith(RECORDS) and name and "/" not in name else None


def _media_type(headers: Message) -> str:
    return (headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()


def _redact(fields: Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    return tuple((name, REDACTED if name in SECRET_FIELDS else value) for name, value in fields)


def _redact_path(path: str) -> str:
    """The path as received, unless its query carries a password: then that value is redacted."""
    base, mark, query = path.partition("?")
    pairs = parse_qsl(query, keep_blank_values=True)
    if not mark or all(name not in SECRET_FIELDS for name, _ in pairs):
        return path
    return f"{base}?{urlencode(_redact(pairs), safe='<>')}"


def _client_cn(connection: Any) -> str:
    peer = connection.getpeercert() if isinstance(connection, ssl.SSLSocket) else None
    for rdn in (peer or {}).get("subject", ()):
        for attribute in rdn:
            if isinstance(attribute, tuple) and attribute[0] == "commonName":
                return str(attribute[1])
    return ""


def _tls_version(connection: Any) -> str:
    return (connection.version() or "") if isinstance(connection, ssl.SSLSocket) else ""


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value
