"""The provider side of docs/provider-interface.md: a PKI for tests and a reference central service.

`pki` makes the provider CA, the service's certificate and node certificates, and the files of
a node's identity (/etc/amnesiac/provider/); `service` is a real HTTPS service with mutual TLS
that answers /v1/auth, keeps the records a node sends and records every request it receives,
so a check can judge what a node sent. Both are for tests and a starting point for a provider:
the CA key lives in memory beside the certificates it signs.
"""

from amnesiac.provider.pki import Pem, ProviderPki, fingerprint_sha256, node_identity_files
from amnesiac.provider.service import ReferenceService, Request, read_journal

__all__ = [
    "Pem",
    "ProviderPki",
    "ReferenceService",
    "Request",
    "fingerprint_sha256",
    "node_identity_files",
    "read_journal",
]
