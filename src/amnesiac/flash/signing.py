"""Signatures over manifest.json with OpenSSH's `ssh-keygen -Y sign` and `-Y verify`.

manifest.json lists the sha256 of every artifact, so a good signature over it vouches for the
kernel, the initrd and the boot script. The namespace keeps these signatures apart from any
other use of the same key (git commits, files). Who may sign is an OpenSSH allowed-signers
file (`principal key-type key`, see ssh-keygen(1) ALLOWED SIGNERS): the principal that
matched and the key's fingerprint are what flash records.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

from amnesiac.errors import UsageError
from amnesiac.files import write_atomic
from amnesiac.flash.model import SIGNATURE, Refused, SignatureInfo
from amnesiac.run import require_tools, run

NAMESPACE = "amnesiac-manifest"
_GOOD = re.compile(
    r'^Good "(?P<ns>[^"]+)" signature (?:for (?P<principal>.+) )?with (?P<type>\S+) key (?P<fp>\S+)$'
)


_PUBLIC = re.compile(rb"^(ssh-|ecdsa-|sk-)[\w@.-]+ [A-Za-z0-9+/]+=*(\s|$)")
KEY_HINT = "a private key without a passphrase, or KEY.pub with the private key in ssh-agent"


def check_key(key: Path) -> None:
    """A --sign KEY that cannot sign is a usage error, found before anything is written.

    It must be a readable file holding an OpenSSH or PEM private key, or a public key (whose
    private half ssh-agent holds: then $SSH_AUTH_SOCK must be set).
    """
    try:
        head = key.read_bytes()[:4096]
    except FileNotFoundError:
        raise UsageError(f"--sign {key}: no such key file") from None
    except IsADirectoryError:
        raise UsageError(f"--sign {key}: a directory, not a key file") from None
    except OSError as exc:
        raise UsageError(f"--sign {key}: cannot read it ({exc.strerror})") from None
    first = head.lstrip().split(b"\n", 1)[0].strip()
    if first.startswith(b"-----BEGIN ") and first.endswith(b"PRIVATE KEY-----"):
        return
    if _PUBLIC.match(first):
        if not os.environ.get("SSH_AUTH_SOCK"):
            raise UsageError(
                f"--sign {key}: a public key signs only through ssh-agent, and SSH_AUTH_SOCK is not set",
                hint=KEY_HINT,
            )
        return
    raise UsageError(f"--sign {key}: not an OpenSSH private key", hint=KEY_HINT)


def sign(
    manifest: Path, key: Path, *, namespace: str = NAMESPACE, signature_name: str = SIGNATURE
) -> tuple[Path, str]:
    """Write manifest.json.sig (`signature_name`) next to `manifest`; the key's fingerprint.

    `key` is a private key without a passphrase, or a public key whose private half is in
    ssh-agent ($SSH_AUTH_SOCK): flash runs without a terminal to ask for a passphrase. A key
    that cannot sign is a UsageError: nothing is written.
    """
    require_tools("ssh-keygen", package_hint="apt-get install openssh-client")
    check_key(key)
    data = manifest.read_bytes()
    result = run(
        ["ssh-keygen", "-Y", "sign", "-f", key, "-n", namespace], input_bytes=data, check=False, capture=True
    )
    if result.returncode != 0 or b"BEGIN SSH SIGNATURE" not in result.stdout:
        why = _tail(result.stderr) or f"exit code {result.returncode}"
        raise UsageError(f"--sign {key}: signing {manifest} failed: {why}", hint=KEY_HINT)
    out = write_atomic(manifest.with_name(signature_name), result.stdout)
    return out, _fingerprint(result.stdout, data, namespace)


def verify(
    data: bytes,
    signature: bytes | None,
    allowed_signers: bytes,
    *,
    what: str,
    namespace: str = NAMESPACE,
    signature_name: str = SIGNATURE,
    hint: str = "sign it with `amnesiac flash BUILD --sign KEY`",
) -> SignatureInfo:
    """Check `signature` over `data` against the allowed signers; Refused with the reason if not."""
    require_tools("ssh-keygen", package_hint="apt-get install openssh-client")
    if signature is None:
        raise Refused(
            f"{what} is not signed ({signature_name} missing) and an allowed-signers file is in force",
            hint=hint,
        )
    with tempfile.TemporaryDirectory(prefix="amnesiac-sig-") as tmp:
        sig, allowed = Path(tmp) / "sig", Path(tmp) / "allowed_signers"
        sig.write_bytes(signature)
        allowed.write_bytes(allowed_signers)
        check = run(
            ["ssh-keygen", "-Y", "check-novalidate", "-n", namespace, "-s", sig],
            input_bytes=data,
            check=False,
            capture=True,
        )
        if check.returncode != 0:
            raise Refused(
                f"{what}: bad signature ({signature_name} does not match it; changed after signing, "
                f"or not signed for {namespace})"
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
                ["ssh-keygen", "-Y", "verify", "-f", allowed, "-I", principal, "-n", namespace, "-s", sig],
                input_bytes=data,
                check=False,
                capture=True,
            )
            if result.returncode == 0:
                who, key = _good(result.stdout + result.stderr)
                return SignatureInfo(
                    principal=who or principal,
                    key=key,
                    namespace=namespace,
                    allowed_signers_sha256=hashlib.sha256(allowed_signers).hexdigest(),
                )
        raise Refused(
            f"{what}: signed by {key} ({', '.join(principals)}), but allowed-signers does not "
            f"allow it for {namespace} now (namespaces= or valid-before/after)"
        )


def _good(output: bytes) -> tuple[str, str]:
    for line in output.decode(errors="replace").splitlines():
        if match := _GOOD.match(line.strip()):
            return match["principal"] or "", f"{match['type']} {match['fp']}"
    return "", "an unnamed key"


def _fingerprint(signature: bytes, data: bytes, namespace: str) -> str:
    with tempfile.TemporaryDirectory(prefix="amnesiac-sig-") as tmp:
        sig = Path(tmp) / "sig"
        sig.write_bytes(signature)
        out = run(
            ["ssh-keygen", "-Y", "check-novalidate", "-n", namespace, "-s", sig],
            input_bytes=data,
            check=False,
            capture=True,
        )
    return _good(out.stdout + out.stderr)[1]


def _tail(stderr: bytes) -> str:
    lines = [ln for ln in stderr.decode(errors="replace").splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith("Signing data on standard input")]
    return " / ".join(lines[-2:])
