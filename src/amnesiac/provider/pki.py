"""A provider PKI for tests and the reference service: one CA, the service's certificate, node certificates.

One CA signs both sides, as docs/provider-interface.md describes a node's `ca.crt`: the node
verifies the service against it, and the service accepts only clients it issued. The CA's
private key stays in the object, so this is a PKI for tests and a reference, not for a
provider's production CA (which belongs offline).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVICE_CN = "amnesiac-reference-provider"
CA_CN = "amnesiac reference provider CA"
# A freshly booted VM's clock may run behind the host's until NTP (if any) catches up.
CLOCK_SKEW = timedelta(hours=1)

# The files of a node's identity (docs/provider-interface.md, "Identity of a node") and their modes.
PUBLIC = 0o644
PRIVATE = 0o600


@dataclass(frozen=True)
class Pem:
    """A certificate and its private key, PEM (the key unencrypted PKCS#8)."""

    cert: bytes
    key: bytes = field(repr=False)  # never in a repr, a log line or a traceback


@dataclass(frozen=True)
class ProviderPki:
    """The provider CA (with its key: a test/reference PKI) and the service's server certificate."""

    ca: Pem
    service: Pem
    days: int = 7

    @classmethod
    def create(cls, service_addresses: Sequence[str], days: int = 7) -> ProviderPki:
        """A new CA and a server certificate for every address (IP addresses or DNS names) of the service."""
        if not service_addresses:
            raise ValueError("the service certificate needs at least one address: a client verifies one")
        if days < 1:
            raise ValueError(f"days must be at least 1, not {days}")
        ca_key = ec.generate_private_key(ec.SECP256R1())
        not_before, not_after = _validity(days)
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(_name(CA_CN))
            .issuer_name(_name(CA_CN))
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(key_cert_sign=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        ca = Pem(ca_cert.public_bytes(serialization.Encoding.PEM), _key_pem(ca_key))
        names = x509.SubjectAlternativeName([_general_name(address) for address in service_addresses])
        service = _issue(ca, SERVICE_CN, ExtendedKeyUsageOID.SERVER_AUTH, not_after, names)
        return cls(ca=ca, service=service, days=days)

    def issue_node(self, name: str) -> Pem:
        """A client certificate for the node `name` (its subject CN: the service knows who speaks)."""
        if not name:
            raise ValueError("a node certificate needs a name")
        not_after = min(_validity(self.days)[1], _load_cert(self.ca.cert).not_valid_after_utc)
        return _issue(self.ca, name, ExtendedKeyUsageOID.CLIENT_AUTH, not_after)


def fingerprint_sha256(cert_pem: bytes) -> str:
    """The certificate's SHA-256 fingerprint as OpenSSL prints it: upper-case hex pairs joined by colons."""
    return _load_cert(cert_pem).fingerprint(hashes.SHA256()).hex(":").upper()


def node_identity_files(url: str, pki: ProviderPki, node: Pem) -> dict[str, tuple[bytes, int]]:
    """The files of a node's identity in /etc/amnesiac/provider/, by name: (content, mode)."""
    if not url.startswith("https://") or any(char.isspace() for char in url):
        raise ValueError(f"the service URL must be one https:// URL without spaces, not {url!r}")
    return {
        "url": ((url + "\n").encode("utf-8"), PUBLIC),
        "ca.crt": (pki.ca.cert, PUBLIC),
        "node.crt": (node.cert, PUBLIC),
        "node.key": (node.key, PRIVATE),
    }


def _issue(
    ca: Pem,
    common_name: str,
    usage: x509.ObjectIdentifier,
    not_after: datetime,
    names: x509.SubjectAlternativeName | None = None,
) -> Pem:
    """An end-entity certificate for one purpose (server or client authentication), signed by `ca`."""
    ca_cert = _load_cert(ca.cert)
    ca_key = serialization.load_pem_private_key(ca.key, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise TypeError("the provider CA key is not an EC key")
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_validity(1)[0])
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if names is not None:
        builder = builder.add_extension(names, critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return Pem(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _validity(days: int) -> tuple[datetime, datetime]:
    now = datetime.now(UTC)
    return now - CLOCK_SKEW, now + timedelta(days=days)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _general_name(address: str) -> x509.GeneralName:
    """An IP address as an IPAddress entry (clients match IPs only there), anything else as a DNS name."""
    try:
        return x509.IPAddress(ipaddress.ip_address(address))
    except ValueError:
        return x509.DNSName(address)


def _key_usage(*, digital_signature: bool = False, key_cert_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=key_cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _load_cert(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)
