"""Signatures over manifest.json with OpenSSH's `ssh-keygen -Y sign` and `-Y verify`.

manifest.json lists the sha256 of every artifact, so a good signature over it vouches for the
kernel, the initrd and the boot script. The namespace keeps these signatures apart from any
other use of the same key (git commits, files). Who may sign is an OpenSSH allowed-signers
file (`principal key-type key`, see ssh-keygen(1) ALLOWED SIGNERS): the principal that
matched and the key's fingerprint are what flash records.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
from pathlib import Path

from amnesiac.files import write_atomic
from amnesiac.flash.model import SIGNATURE, Refused, SignatureInfo
from amnesiac.run import require_tools, run

NAMESPACE = "amnesiac-manifest"
_GOOD = re.compile(
    r'^Good "(?P<ns>[^"]+)" signature (?:for (?P<principal>.+) )?with (?P<type>\S+) key (?P<fp>\S+)$'
)


def sign(manifest: Path, key: Path) -> tuple[Path, str]:
    """Write manifest.json.sig next to `manifest`; the key's fingerprint.

    `key` is a private key without a passphrase, or a public key whose private half is in
    ssh-agent ($SSH_AUTH_SOCK): flash runs without a terminal to ask for a passphrase.
    """
    require_tools("ssh-keygen", package_hint="apt-get install openssh-client")
    if not key.is_file():
        raise Refused(f"--sign {key}: no such key file")
    data = manifest.read_bytes()
    result = run(
        ["ssh-keygen", "-Y", "sign", "-f", key, "-n", NAMESPACE], input_bytes=data, check=False, capture=True
    )
    if result.returncode != 0 or b"BEGIN SSH SIGNATURE" not in result.stdout:
        why = _tail(result.stderr) or f"exit code {result.returncode}"
        raise Refused(
            f"signing {manifest} with {key} failed: {why}",
            hint="use a key without a passphrase, or load it into ssh-agent and pass the .pub",
        )
    out = write_atomic(manifest.with_name(SIGNATURE), result.stdout)
    return out, _fingerprint(result.stdout, data)


def verify(data: bytes, signature: bytes | None, allowed_signers: bytes, *, what: str) -> SignatureInfo:
    """Check `signature` over `data` against the allowed signers; Refused with the reason if not."""
    require_tools("ssh-keygen", package_hint="apt-get install openssh-client")
    if signature is None:
        raise Refused(
            f"{what} is not signed ({SIGNATURE} missing) and an allowed-signers file is in force",
            hint="sign it with `amnesiac flash BUILD --sign KEY`",
        )
    with tempfile.TemporaryDirectory(prefix="amnesiac-sig-") as tmp:
        sig, allowed = Path(tmp) / "sig", Path(tmp) / "allowed_signers"
        sig.write_bytes(signature)
        allowed.write_bytes(allowed_signers)
        check = run(
            ["ssh-keygen", "-Y", "check-novalidate", "-n", NAMESPACE, "-s", sig],
            input_bytes=data,
            check=False,
            capture=True,
        )
        if check.returncode != 0:
            raise Refused(
                f"{what}: bad signature ({SIGNATURE} does not match it; changed after signing, "
                f"or not signed for {NAMESPACE})"
            )
        key = _good(check.stdout + check.stderr)[1]
        found = run(
            ["ssh-keygen", "-Y", "find-principals", "-s", sig, "-f", allowed], check=False, capture=True
        )
        principals = [p for p in found.stdout.decode(errors="replace").splitlines() if p.strip()]
        if found.returncode != 0 or not principals:
            raise Refused(f"{what}: signed by {key}, a key the allowed-signers file does not list")
        for principal in principals:
            result = run(
                ["ssh-keygen", "-Y", "verify", "-f", allowed, "-I", principal, "-n", NAMESPACE, "-s", sig],
                input_bytes=data,
                check=False,
                capture=True,
            )
            if result.returncode == 0:
                who, key = _good(result.stdout + result.stderr)
                return SignatureInfo(
                    principal=who or principal,
                    key=key,
                    namespace=NAMESPACE,
                    allowed_signers_sha256=hashlib.sha256(allowed_signers).hexdigest(),
                )
        raise Refused(
            f"{what}: signed by {key} ({', '.join(principals)}), but allowed-signers does not "
            f"allow it for {NAMESPACE} now (namespaces= or valid-before/after)"
        )


def _good(output: bytes) -> tuple[str, str]:
    for line in output.decode(errors="replace").splitlines():
        if match := _GOOD.match(line.strip()):
            return match["principal"] or "", f"{match['type']} {match['fp']}"
    return "", "an unnamed key"


def _fingerprint(signature: bytes, data: bytes) -> str:
    with tempfile.TemporaryDirectory(prefix="amnesiac-sig-") as tmp:
        sig = Path(tmp) / "sig"
        sig.write_bytes(signature)
        out = run(
            ["ssh-keygen", "-Y", "check-novalidate", "-n", NAMESPACE, "-s", sig],
            input_bytes=data,
            check=False,
            capture=True,
        )
    return _good(out.stdout + out.stderr)[1]


def _tail(stderr: bytes) -> str:
    lines = [ln for ln in stderr.decode(errors="replace").splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith("Signing data on standard input")]
    return " / ".join(lines[-2:])
