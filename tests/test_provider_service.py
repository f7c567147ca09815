"""The reference provider service (amnesiac.provider) over real HTTPS on 127.0.0.1: mutual TLS
refuses strangers at the handshake, the endpoints answer as docs/provider-interface.md says,
every request is recorded (passwords redacted), and a node's identity files are what the
provider_agent role reads. The clients are curl, as on a node, and Python's ssl."""

from __future__ import annotations

import http.client
import json
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from amnesiac.provider import (
    Pem,
    ProviderPki,
    ReferenceService,
    Request,
    fingerprint_sha256,
    node_identity_files,
    read_journal,
)

CURL = "/usr/bin/curl"
PASSWORD = "correct horse battery staple"  # noqa: S105 (the test account's)


@dataclass(frozen=True)
class Files:
    """PEM files as curl takes them."""

    ca: Path
    cert: Path
    key: Path


def _write(directory: Path, ca: bytes, node: Pem) -> Files:
    directory.mkdir()
    files = Files(directory / "ca.crt", directory / "node.crt", directory / "node.key")
    files.ca.write_bytes(ca)
    files.cert.write_bytes(node.cert)
    files.key.write_bytes(node.key)
    files.key.chmod(0o600)
    return files


@pytest.fixture(scope="module")
def pki() -> ProviderPki:
    return ProviderPki.create(["127.0.0.1", "provider.test"])


@pytest.fixture(scope="module")
def node(pki: ProviderPki, tmp_path_factory: pytest.TempPathFactory) -> Files:
    return _write(tmp_path_factory.mktemp("pki") / "node", pki.ca.cert, pki.issue_node("node-a"))


@pytest.fixture(scope="module")
def intruder(pki: ProviderPki, tmp_path_factory: pytest.TempPathFactory) -> Files:
    """A client certificate for the same name from another CA (this side trusts the real CA)."""
    other = ProviderPki.create(["127.0.0.1"])
    return _write(tmp_path_factory.mktemp("pki") / "intruder", pki.ca.cert, other.issue_node("node-a"))


@pytest.fixture
def service(pki: ProviderPki, tmp_path: Path) -> Iterator[ReferenceService]:
    with ReferenceService(
        pki,
        {"alice": PASSWORD},
        ["sessions"],
        journal=tmp_path / "journal.jsonl",
        peers=[("KEY=", "10.8.0.2/32")],
    ) as running:
        yield running


@dataclass(frozen=True)
class Answer:
    exit_code: int
    status: int
    body: str
    stderr: str


def curl(
    service: ReferenceService,
    path: str,
    files: Files | None,
    *args: str,
    ca: bool = True,
    host: str = "127.0.0.1",
) -> Answer:
    """curl as the node's agent runs it (TLS 1.2+, 5 s, never -k), with or without a client
    certificate or the CA; `host` is a name for the loopback address."""
    argv = [CURL, "-q", "--silent", "--show-error", "--noproxy", "*", "--tlsv1.2", "--max-time", "5"]
    if files is not None:
        argv += ["--cert", str(files.cert), "--key", str(files.key)]
    if ca and files is not None:
        argv += ["--cacert", str(files.ca)]
    if host != "127.0.0.1":
        argv += ["--resolve", f"{host}:{service.port}:127.0.0.1"]
    argv += ["--write-out", "\n%{http_code}", *args, f"https://{host}:{service.port}{path}"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    body, _, status = done.stdout.rpartition("\n")
    return Answer(done.returncode, int(status or 0), body, done.stderr)


def form(*pairs: str) -> list[str]:
    return [argument for pair in pairs for argument in ("--data-urlencode", pair)]


def python_client(files: Files, *, tls12: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=files.ca)
    context.load_cert_chain(files.cert, files.key)
    if tls12:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    return context


def post(service: ReferenceService, path: str, body: bytes, context: ssl.SSLContext, **headers: str) -> int:
    connection = http.client.HTTPSConnection("127.0.0.1", service.port, context=context, timeout=5)
    try:
        connection.request(
            "POST", path, body, {"Content-Type": "application/x-www-form-urlencoded", **headers}
        )
        return connection.getresponse().status
    finally:
        connection.close()


def only(service: ReferenceService, method: str = "POST") -> Request:
    requests = [request for request in service.requests() if request.method == method]
    assert len(requests) == 1, requests
    return requests[0]


def test_auth_allows_the_right_password_and_denies_anything_else(
    service: ReferenceService, node: Files
) -> None:
    right = curl(service, "/v1/auth", node, *form("username=alice", f"password={PASSWORD}"))
    assert (right.exit_code, right.status, right.body) == (0, 200, "allow"), right
    wrong = curl(service, "/v1/auth", node, *form("username=alice", "password=guess"))
    unknown = curl(service, "/v1/auth", node, *form("username=mallory", f"password={PASSWORD}"))
    assert (wrong.status, wrong.body) == (unknown.status, unknown.body) == (403, "deny")
    requests = service.requests()
    assert [request.password_ok for request in requests] == [True, False, False]
    assert requests[0].fields == (("username", "alice"), ("password", "<redacted>"))
    assert {request.client_cn for request in requests} == {"node-a"}


def test_a_client_without_a_certificate_is_refused_at_the_handshake(
    service: ReferenceService, node: Files
) -> None:
    bare = curl(service, "/v1/auth", None, "--cacert", str(node.ca), *form("username=alice", "password=x"))
    assert bare.exit_code != 0 and bare.status == 0, bare
    assert service.wait_for(lambda requests: any(r.method == "TLS" for r in requests), timeout=5)
    (refused,) = service.requests()
    assert (refused.method, refused.status, refused.client_cn) == ("TLS", 0, "")
    assert "certificate" in refused.error, refused.error
    # And from Python: the handshake, not an HTTP answer, is what refuses it.
    context = ssl.create_default_context(cafile=node.ca)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        post(service, "/v1/auth", b"username=alice&password=x", context)
    assert not [request for request in service.requests() if request.method != "TLS"]


def test_a_client_certificate_from_another_ca_is_refused(service: ReferenceService, intruder: Files) -> None:
    answer = curl(service, "/v1/auth", intruder, *form("username=alice", f"password={PASSWORD}"))
    assert answer.exit_code != 0 and answer.status == 0, answer
    assert service.wait_for(bool, timeout=5)
    (refused,) = service.requests()
    assert refused.method == "TLS" and "certificate verify failed" in refused.error, refused


def test_the_service_certificate_verifies_with_the_provider_ca_only(
    service: ReferenceService, node: Files
) -> None:
    assert curl(service, "/v1/wireguard/peers", node).status == 200, "no -k: verified for 127.0.0.1"
    # The system's CAs do not vouch for it (60: the peer certificate cannot be authenticated).
    assert curl(service, "/v1/wireguard/peers", node, ca=False).exit_code == 60
    # A DNS name in its subjectAltName verifies; a name that is not there does not.
    assert curl(service, "/v1/wireguard/peers", node, host="provider.test").status == 200
    assert curl(service, "/v1/wireguard/peers", node, host="other.test").exit_code == 60


def test_a_record_is_kept_with_its_fields_in_order_and_the_nodes_name(
    service: ReferenceService, node: Files
) -> None:
    body = b"event=connect&account=alice&client_ip=192.0.2.7&session_id=5f3a&session_start=1700000000"
    assert post(service, "/v1/records/sessions", body, python_client(node)) == 204
    kept = only(service)
    assert kept.fields == (
        ("event", "connect"),
        ("account", "alice"),
        ("client_ip", "192.0.2.7"),
        ("session_id", "5f3a"),
        ("session_start", "1700000000"),
    )
    assert (kept.path, kept.status, kept.client_cn, kept.tls_version) == (
        "/v1/records/sessions",
        204,
        "node-a",
        "TLSv1.3",
    )
    assert kept.password_ok is None
    # TLS 1.2 is accepted too, and said so.
    assert post(service, "/v1/records/sessions", b"event=disconnect", python_client(node, tls12=True)) == 204
    assert service.requests()[-1].tls_version == "TLSv1.2"


def test_the_service_records_fields_it_does_not_judge(service: ReferenceService, node: Files) -> None:
    """A field the policy does not permit is kept as it arrived: the check, not the service, judges."""
    answer = curl(service, "/v1/records/sessions", node, "--data", "event=connect&dns_query=example.org")
    assert answer.status == 204
    assert only(service).fields == (("event", "connect"), ("dns_query", "example.org"))


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/v1/records/unknown", "event=connect&account=alice", 404),
        ("/v1/records/sessions", "event=connect&account=a&account=b", 400),
        ("/v1/records/sessions", "event=connect&event=connect", 400),
        ("/v1/records/sessions", "account=alice", 400),
        ("/v1/records/sessions", "event=started", 400),
        ("/v1/records/sessions", "event=connect&&account=alice", 400),
        ("/v1/records/sessions", "event=connect&account", 400),
        ("/v1/records/sessions", "event=connect&account=%ff", 400),
        ("/v1/records/sessions/more", "event=connect", 404),
        ("/v1/records/", "event=connect", 404),
        ("/v1/auth", f"username=alice&password={PASSWORD}&client_ip=192.0.2.7", 400),
        ("/v1/auth", "username=alice&username=alice&password=x", 400),
        ("/v1/auth", "username=alice", 400),
        ("/v1/auth", "username=alice;password=x", 400),
        ("/v1/elsewhere", "event=connect", 404),
    ],
)
def test_a_bad_request_is_answered_and_recorded(
    service: ReferenceService, node: Files, path: str, body: str, status: int
) -> None:
    answer = curl(service, path, node, "--data", body)
    assert answer.status == status, answer
    recorded = only(service)
    assert (recorded.path, recorded.status, recorded.client_cn) == (path, status, "node-a")
    assert recorded.password_ok is None


def test_auth_takes_a_form_and_nothing_else(service: ReferenceService, node: Files) -> None:
    text = curl(service, "/v1/auth", node, "-H", "Content-Type: text/plain", "--data", "username=alice")
    json_body = curl(service, "/v1/auth", node, "--json", '{"username": "alice"}')
    get = curl(service, "/v1/auth", node)
    assert (text.status, json_body.status, get.status) == (400, 400, 405)
    charset = curl(
        service,
        "/v1/auth",
        node,
        "-H",
        "Content-Type: application/x-www-form-urlencoded; charset=UTF-8",
        *form("username=alice", f"password={PASSWORD}"),
    )
    assert charset.status == 200


def test_a_body_over_the_cap_is_refused_before_it_is_read(service: ReferenceService, node: Files) -> None:
    connection = http.client.HTTPSConnection(
        "127.0.0.1", service.port, context=python_client(node), timeout=5
    )
    try:
        connection.putrequest("POST", "/v1/records/sessions")
        connection.putheader("Content-Type", "application/x-www-form-urlencoded")
        connection.putheader("Content-Length", str(64 * 1024 + 1))
        connection.endheaders()
        assert connection.getresponse().status == 413
    finally:
        connection.close()
    assert only(service).status == 413


def test_the_peers_list_is_one_line_per_peer(service: ReferenceService, node: Files) -> None:
    answer = curl(service, "/v1/wireguard/peers", node)
    assert (answer.status, answer.body) == (200, "KEY= 10.8.0.2/32\n")
    assert curl(service, "/v1/wireguard/peers", node, "--data", "x=1").status == 405


def test_passwords_are_never_recorded_and_the_journal_reads_back(
    service: ReferenceService, node: Files, tmp_path: Path
) -> None:
    curl(service, "/v1/auth", node, *form("username=alice", f"password={PASSWORD}"))
    curl(service, "/v1/auth", node, *form("username=alice", "password=hunter2", "password=again"))
    curl(service, "/v1/records/sessions", node, *form("event=connect", "password=leaked"))
    curl(service, "/v1/auth?password=inthequery", node, *form("username=alice", "password=x"))
    curl(service, "/v1/auth", None, "--cacert", str(node.ca), *form("username=a", "password=notls"))
    assert service.wait_for(lambda requests: len(requests) == 5, timeout=5)
    journal = tmp_path / "journal.jsonl"
    text = journal.read_text()
    for secret in (PASSWORD, "hunter2", "again", "leaked", "inthequery", "notls"):
        assert secret not in text and secret not in repr(service.requests())
    assert service.requests()[1].fields == (
        ("username", "alice"),
        ("password", "<redacted>"),
        ("password", "<redacted>"),
    )
    assert service.requests()[3].path == "/v1/auth?password=<redacted>"
    assert journal.stat().st_mode & 0o777 == 0o600, "the journal names accounts: the owner's only"
    # Another process reads the file: the same requests, in order, whatever it reads mid-write.
    assert read_journal(journal) == service.requests()
    partial = tmp_path / "partial.jsonl"
    partial.write_text(text + json.dumps(service.requests()[0].as_dict())[:40])
    assert read_journal(partial) == service.requests()
    assert read_journal(tmp_path / "missing.jsonl") == []


def test_a_journal_line_that_is_not_a_request_is_an_error(tmp_path: Path) -> None:
    good = Request(1.5, "POST", "/v1/auth", (("username", "a"),), 200, "n", "TLSv1.3", True)
    assert Request.from_dict(json.loads(json.dumps(good.as_dict()))) == good
    for broken in ({**good.as_dict(), "fields": ["ab"]}, {**good.as_dict(), "status": "200"}, {"time": 1}):
        with pytest.raises(ValueError):
            Request.from_dict(broken)
    journal = tmp_path / "j.jsonl"
    journal.write_text("[1, 2]\n")
    with pytest.raises(ValueError):
        read_journal(journal)


def test_wait_for_gives_up_after_its_timeout(service: ReferenceService) -> None:
    assert service.wait_for(lambda requests: not requests, timeout=0)
    assert not service.wait_for(bool, timeout=0.2)


def test_the_port_is_closed_when_the_service_ends(pki: ProviderPki, node: Files) -> None:
    with ReferenceService(pki, {}, []) as service:
        assert service.url == f"https://127.0.0.1:{service.port}"
        assert curl(service, "/v1/wireguard/peers", node).status == 200
    assert curl(service, "/v1/wireguard/peers", node).exit_code == 7, "curl: could not connect"


def test_the_fingerprint_is_openssls(pki: ProviderPki, tmp_path: Path) -> None:
    for name, pem in (("ca", pki.ca.cert), ("service", pki.service.cert)):
        path = tmp_path / f"{name}.crt"
        path.write_bytes(pem)
        out = subprocess.run(
            ["openssl", "x509", "-noout", "-fingerprint", "-sha256", "-in", str(path)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert out.strip() == f"sha256 Fingerprint={fingerprint_sha256(pem)}"


def test_the_certificates_are_for_their_purpose(pki: ProviderPki) -> None:
    ca = x509.load_pem_x509_certificate(pki.ca.cert)
    service = x509.load_pem_x509_certificate(pki.service.cert)
    node = x509.load_pem_x509_certificate(pki.issue_node("node-b").cert)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    for leaf, usage in ((service, ExtendedKeyUsageOID.SERVER_AUTH), (node, ExtendedKeyUsageOID.CLIENT_AUTH)):
        assert leaf.issuer == ca.subject
        assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        assert list(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [usage]
        # A freshly booted VM whose clock is behind still accepts it.
        assert leaf.not_valid_before_utc <= datetime.now(UTC) - timedelta(minutes=59)
        assert leaf.not_valid_after_utc <= ca.not_valid_after_utc
    assert node.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "node-b"
    assert (
        service.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "amnesiac-reference-provider"
    )
    names = service.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert names.get_values_for_type(x509.DNSName) == ["provider.test"]
    assert b"PRIVATE KEY" in pki.ca.key and "PRIVATE" not in repr(pki), "no private key in a repr"


def test_a_nodes_identity_files_are_what_the_agent_reads(pki: ProviderPki) -> None:
    node = pki.issue_node("node-a")
    files = node_identity_files("https://192.0.2.10:8443", pki, node)
    assert files == {
        "url": (b"https://192.0.2.10:8443\n", 0o644),
        "ca.crt": (pki.ca.cert, 0o644),
        "node.crt": (node.cert, 0o644),
        "node.key": (node.key, 0o600),
    }
    for url in ("http://192.0.2.10", "https://a.example\nhttps://b.example"):
        with pytest.raises(ValueError):
            node_identity_files(url, pki, node)
