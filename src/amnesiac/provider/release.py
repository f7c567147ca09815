"""Identity released after attestation: the provider's service hands a server its identity only
when that server's TPM proves it booted the build's image (docs/provider-interface.md,
"Identity release").

Every server then netboots the same signed UKI and nothing secret sits on the PXE server: the
identity (the files flash.identities would put in a per-host overlay) waits here. A booting
server asks for a challenge, answers with a TPM quote over it, and gets back a credential made
for its enrolled EK and AK (TPM2_MakeCredential) only if the quote is its enrolled AK's and its
PCRs are the build's (7 as enrolled, 11 as the manifest predicts, 12 zero). Only that TPM can
open the credential (TPM2_ActivateCredential); what it holds is a one-time token for which the
service sends the identity. A server is known by its TPM: each request names its endorsement
key (its public area, as `amnesiac enrol` recorded it), not an address anyone can set. The node
has no client certificate yet (that is part of what it asks for), so TLS here authenticates the
service only: the image carries the provider CA.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from amnesiac import attest
from amnesiac.boot.overlay import OverlayFile
from amnesiac.errors import UsageError
from amnesiac.flash.identities import IdentitySet
from amnesiac.image.manifest import Manifest
from amnesiac.provider.pki import ProviderPki
from amnesiac.provider.service import JournaledHandler, JournaledService

CHALLENGE = "/v1/identity/challenge"
QUOTE = "/v1/identity/quote"
IDENTITY = "/v1/identity"
PATHS = (CHALLENGE, QUOTE, IDENTITY)
# A booting server answers a challenge in seconds (one quote, one activation); these bound how
# long a nonce or a token it was sent can be used, once.
CHALLENGE_SECONDS = 120.0
TOKEN_SECONDS = 120.0
TOKEN_BYTES = 32  # the credential's size: at most a SHA-256 digest (TPM2B_DIGEST of the EK's name algorithm)


@dataclass(frozen=True)
class Server:
    """One server the service may release an identity to: what its quote must show, the keys to
    make its credential for, and its identity."""

    expected: attest.Expected
    keys: attest.TpmKeys
    files: tuple[OverlayFile, ...]


def servers(
    built: Manifest, enrolments: Mapping[str, attest.Enrolment], identities: IdentitySet
) -> dict[str, Server]:
    """Every host of `identities` with its enrolment; a UsageError for a host without one, or
    with one that recorded no EK (made by hand, not by `amnesiac enrol`)."""
    fleet = {}
    for host, files in sorted(identities.host_files.items()):
        enrolment = enrolments.get(host)
        if enrolment is None:
            raise UsageError(f"{identities.source}/{host}: no enrolment for this host (amnesiac enrol)")
        fleet[host] = server(host, built, enrolment, files)
    return fleet


def server(host: str, built: Manifest, enrolment: attest.Enrolment, files: Sequence[OverlayFile]) -> Server:
    """One host as the service holds it; a UsageError for an enrolment without an EK (made by
    hand, not by `amnesiac enrol`) or a build without a UKI to predict PCR 11 from."""
    if enrolment.ek_pem is None:
        raise UsageError(f"the enrolment of {host} has no ek_pem: enrol it with `amnesiac enrol`")
    try:
        expected = enrolment.expected(built)
        keys = attest.TpmKeys.of_enrolled(enrolment.ek_pem.encode(), enrolment.ak_pem.encode())
    except attest.AttestationError as exc:
        raise UsageError(f"the enrolment of {host}: {exc}") from None
    return Server(expected, keys, tuple(files))


def bundle(files: Sequence[OverlayFile]) -> str:
    """The identity as the node's unpacker reads it: for each file, `== PATH MODE` (octal), then
    its bytes in hex on one line (the quote tool's output form; perl-base reads it with pack)."""
    return "".join(f"== {f.path} {f.mode:o}\n{f.data.hex()}\n" for f in files)


@dataclass
class _Pending:
    secret: bytes  # the nonce a quote must be over, or the sha256 of the token a node must show
    deadline: float


class IdentityRelease(JournaledService):
    """`with IdentityRelease(pki, servers) as release:` serves the three requests of identity
    release over HTTPS (the service's certificate from `pki`; no client certificate asked)."""

    def __init__(
        self,
        pki: ProviderPki,
        fleet: Mapping[str, Server],
        *,
        journal: Path | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pki = pki
        self.fleet = dict(fleet)
        self._by_ek = {server.keys.ek_public.hex(): host for host, server in self.fleet.items()}
        self._clock = clock
        self._nonces: dict[str, _Pending] = {}
        self._tokens: dict[str, _Pending] = {}
        self._state = threading.Lock()
        self._start(
            pki, _ReleaseHandler, journal=journal, host=host, port=port, client_certificates=False,
            name="amnesiac-identity-release",
        )  # fmt: skip

    def admit(self, host: str, server: Server) -> None:
        """Hold `host` from now on (a server enrolled while the service runs)."""
        with self._state:
            self.fleet[host] = server
            self._by_ek[server.keys.ek_public.hex()] = host

    def host_of(self, ek: str) -> str | None:
        """The host whose enrolled EK has this public area (hex), if any."""
        with self._state:
            return self._by_ek.get(ek.lower())

    def challenge(self, host: str) -> bytes:
        """A fresh nonce for `host` (replacing any it was sent before)."""
        nonce = attest.new_nonce()
        with self._state:
            self._nonces[host] = _Pending(nonce, self._clock() + CHALLENGE_SECONDS)
        return nonce

    def attest(self, host: str, answer: str) -> tuple[bytes, bytes] | str:
        """The credential (blob, encrypted seed) for `host`'s TPM if `answer` is its quote over its
        challenge showing the build's PCRs; else why not. Either way the challenge is spent."""
        with self._state:
            server = self.fleet[host]
        pending = self._take(self._nonces, host)
        if pending is None:
            return "no challenge for this host, or it expired: ask again"
        try:
            quote = attest.parse_guest_output(answer)
        except attest.AttestationError as exc:
            return str(exc)
        expected = server.expected
        verdict = attest.check(expected.ak_pem, quote, pending.secret, expected.expected_pcrs)
        if not verdict.attested:
            return f"not attested: {verdict.why()}"
        token = os.urandom(TOKEN_BYTES)
        credential = attest.make_credential(server.keys, token)
        with self._state:
            self._tokens[host] = _Pending(hashlib.sha256(token).digest(), self._clock() + TOKEN_SECONDS)
        return credential

    def release(self, host: str, token: bytes) -> tuple[OverlayFile, ...] | None:
        """`host`'s identity for the token its TPM opened (once, in time); else None."""
        pending = self._take(self._tokens, host)
        if pending is None or not hmac.compare_digest(pending.secret, hashlib.sha256(token).digest()):
            return None
        with self._state:
            return self.fleet[host].files

    def _take(self, table: dict[str, _Pending], host: str) -> _Pending | None:
        with self._state:
            pending = table.pop(host, None)
        return pending if pending is not None and self._clock() <= pending.deadline else None


class _ReleaseHandler(JournaledHandler):
    @property
    def service(self) -> IdentityRelease:
        return cast(IdentityRelease, self.server.service)  # _ReleaseHandler serves only it

    def _dispatch(self) -> None:
        form = self._request()
        if form is None:
            return
        host = self.service.host_of(form["ek"])
        if host is None:
            self._answer(
                404, "no identity for this TPM: enrol it, and give the service its identity\n", form.items()
            )
        elif self.path == CHALLENGE:
            self._answer(200, self.service.challenge(host).hex() + "\n", form.items())
        elif self.path == QUOTE:
            credential = self.service.attest(host, form["quote"])
            if isinstance(credential, str):
                self._answer(403, credential + "\n", form.items())
            else:
                self._answer(200, " ".join(part.hex() for part in credential) + "\n", form.items())
        else:
            files = self.service.release(host, _hex(form["token"]))
            if files is None:
                self._answer(403, "no identity for this token: attest again\n", form.items())
            else:
                self._answer(200, bundle(files), form.items())

    def _request(self) -> dict[str, str] | None:
        """The form of a well-formed request to one of PATHS; else None, answered already."""
        body = self._read_body()  # read first, so an early answer does not reset the connection
        if self.path not in PATHS:
            self._answer(404, "not found")
        elif self.command != "POST":
            self._answer(405, "method not allowed", allow="POST")
        elif isinstance(body, int):
            self._answer(body, "body too large" if body == 413 else "malformed request")
        else:
            fields = self._form(body)
            wanted = {CHALLENGE: ["ek"], QUOTE: ["ek", "quote"], IDENTITY: ["ek", "token"]}[self.path]
            if fields is not None and sorted(name for name, _ in fields) == wanted:
                return dict(fields)
            self._answer(400, f"the body is {' and '.join(wanted)}, each once, nothing else", fields or ())
        return None


def _hex(text: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError:
        return b""
