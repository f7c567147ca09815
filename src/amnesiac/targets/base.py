"""The protocol every kind of target implements, and the table of kinds."""

from __future__ import annotations

import abc
import contextlib
import hashlib
import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, cast

from amnesiac.checks.expectations import GuestMemory, ProviderHarness
from amnesiac.checks.meta import Surface
from amnesiac.errors import UnreachableError, UsageError

if TYPE_CHECKING:
    from amnesiac.attest import Enrolment, Expected
    from amnesiac.boot import BootedMachine
    from amnesiac.image.manifest import Manifest
    from amnesiac.progress import Progress
    from amnesiac.report.model import Identity, TpmAttestation


class TargetKind(StrEnum):
    """How a target is reached: the table of backends. A member's backend is the class `BACKEND`
    in the module `amnesiac.targets.<value>` (imported when first needed)."""

    QEMU = "qemu"
    SSH = "ssh"
    CHROOT = "chroot"
    PODMAN = "podman"

    @property
    def backend(self) -> type[Target]:
        module = importlib.import_module(f"amnesiac.targets.{self.value}")
        return cast(type[Target], module.BACKEND)


class Unreachable(UnreachableError):
    """The target could not be reached, or did not answer who it is."""


@dataclass(frozen=True)
class ReachOptions:
    """What reaching a target may use, from the command line."""

    work: Path  # this run's private temporary directory
    progress: Progress
    ssh_key: Path | None = None  # ssh targets: the private key to log in with
    verifier_keys: tuple[str, ...] = ()  # public keys the verifier put on the target (--verifier-key)
    enrolment: Enrolment | None = None  # ssh:// targets: the server's TPM as enrolled (--enrolment)
    memory_mib: int | None = None  # qemu: guest RAM
    boot_timeout: float = 600.0  # qemu: seconds until SSH answers


@dataclass(frozen=True)
class Connection:
    """How the checks reach one target for the duration of a run.

    `host` is testinfra's host URL, and the id the results of this target are filed under;
    `pytest_args` are what every host of one check run shares (an ssh_config, testinfra's
    connection type, an inventory).
    """

    host: str
    pytest_args: tuple[str, ...] = ()
    ssh_config: Path | None = None
    ansible_inventory: Path | None = None  # an inventory host: the inventory says how to log in
    env: Mapping[str, str] | None = None  # the environment pytest and testinfra run in
    # Keys the verifier itself put on the target to log in: allowed beside the policy's keys.
    test_keys: tuple[str, ...] = ()
    test_devices_attached: bool = False  # qemu: boot/qemu.py emulated_devices
    served: Mapping[str, str] = field(default_factory=dict)  # qemu: file -> sha256 the target was sent
    # The machine the backend runs itself (qemu:, driven through QMP): the capabilities only some
    # kinds of target have (guest memory dumps, hot-plug, a TPM) hang off it; None elsewhere.
    machine: BootedMachine | None = None
    guest_memory: GuestMemory | None = None  # qemu: the checks may dump the server's RAM
    # qemu: the reference provider service the target was given, for the session check.
    provider: ProviderHarness | None = None
    # ssh://, an inventory host: its TPM as the provider enrolled it (attest.Enrolment), so
    # that the TPM, not the server, says what booted.
    enrolment: Enrolment | None = None

    def testinfra_host(self) -> Any:
        import testinfra

        options = {"ssh_config": self.ssh_config, "ansible_inventory": self.ansible_inventory}
        return testinfra.get_host(self.host, **{k: str(v) for k, v in options.items() if v is not None})


IDENTITY_COMMANDS = (
    ("kernel_release", "uname -r"),
    ("cmdline", "cat /proc/cmdline"),
    ("boot_id", "cat /proc/sys/kernel/random/boot_id"),
    ("hostname", "cat /proc/sys/kernel/hostname"),
)


class Target(abc.ABC):
    """One thing to verify. Subclasses set the class attributes and implement `parse` and `reach`."""

    kind: ClassVar[TargetKind]
    surface: ClassVar[Surface]  # what it lets a check see
    prefix: ClassVar[str]  # how --target starts: "qemu:", "ssh://"
    form: ClassVar[str]  # the whole form, for help and errors: "qemu:BUILD_DIR"
    help: ClassVar[str]  # one line

    def __init__(self, address: str, name: str | None = None) -> None:
        self.address = address  # as the report shows it after the prefix
        self.name = name or address  # a short name: an inventory's hostname

    @classmethod
    @abc.abstractmethod
    def parse(cls, value: str, spec: str) -> Target:
        """The target `spec` names (`value` is spec without the prefix); a UsageError if malformed."""

    @abc.abstractmethod
    def reach(self, options: ReachOptions) -> contextlib.AbstractContextManager[Connection]:
        """Make the target reachable for the checks (boot it, for qemu:) until the context ends."""

    @property
    def spec(self) -> str:
        return f"{self.prefix}{self.address}"

    @property
    def build_dir(self) -> Path | None:
        """The build this target is made from, where it says so itself (qemu:)."""
        return None

    def identity(self, connection: Connection, built: Manifest | None) -> Identity:
        """Read who the target is before anything else runs on it (Unreachable if it cannot)."""
        from amnesiac.report.model import Identity

        try:
            host = connection.testinfra_host()
            results = {name: host.run(command) for name, command in IDENTITY_COMMANDS}
        except Exception as exc:
            raise Unreachable(f"cannot reach {self.spec}: {why_unreachable(exc)}") from None
        if (first := results["kernel_release"]).rc != 0:  # e.g. podman exec into no such container
            raise Unreachable(f"cannot reach {self.spec}: {why_failed(first)}")
        values = {name: result.stdout.strip() for name, result in results.items()}
        image = next(
            (w.split("=", 1)[1] for w in values["cmdline"].split() if w.startswith("amnesiac.image=")), None
        )
        matches = None
        if built is not None and connection.served:
            matches = all(
                built.artifacts[n].sha256 == s for n, s in connection.served.items() if n in built.artifacts
            )
        return Identity(
            image_sha256=image if image and len(image) == 64 else None,
            kernel_release=values["kernel_release"] or None,
            cmdline=values["cmdline"] or None,
            boot_id=values["boot_id"] or None,
            hostname=values["hostname"] or None,
            artifacts=dict(connection.served),
            manifest_sha256_matches=matches,
            tpm=_attestation(host, connection, built),
        )


def why_unreachable(exc: Exception) -> str:
    """One line for a command that could not be run: testinfra's ssh backend raises with the
    failed ssh's CommandResult, whose stderr says why ("Connection refused"), not its repr."""
    result = exc.args[0] if exc.args else None
    text = getattr(result, "stderr", None) or str(exc)
    return " ".join(str(text).split())[-300:]


def why_failed(result: Any) -> str:
    """One line for a command that ran and failed: the end of what it said, or its exit code."""
    return " ".join((result.stderr or result.stdout or "").split())[-300:] or f"exit {result.rc}"


def _attestation(host: Any, connection: Connection, built: Manifest | None) -> TpmAttestation | None:
    """The TPM's word on what booted: asked of a machine the harness booted measured (qemu:) or
    of a server with an enrolment (ssh://, an inventory host); None where neither is."""
    from amnesiac import attest
    from amnesiac.report.model import TpmAttestation

    if connection.machine is not None and connection.machine.measured is not None:
        return quote_target(host, connection.machine.measured.expected())
    if connection.enrolment is None:
        return None
    enrolled = connection.enrolment
    bound = {
        "ek_sha256": hashlib.sha256(enrolled.ek_pem.encode()).hexdigest() if enrolled.ek_pem else None,
        "ek_certified_by": enrolled.ek_certified_by,
    }
    try:
        expected = enrolled.expected(built)
    except attest.AttestationError as exc:
        ak = hashlib.sha256(enrolled.ak_pem.encode()).hexdigest()
        return TpmAttestation(attested=False, reason=exc.message, nonce="", ak_sha256=ak, **bound)
    return quote_target(host, expected).model_copy(update=bound)


def quote_target(host: Any, expected: Expected) -> TpmAttestation:
    """Ask the target's TPM for a quote over a fresh nonce and check it (attest.py)."""

    from amnesiac import attest
    from amnesiac.report.model import TpmAttestation

    nonce = attest.new_nonce()
    record = {
        "nonce": nonce.hex(),
        "ak_sha256": hashlib.sha256(expected.ak_pem).hexdigest(),
        "expected_pcrs": {str(k): v for k, v in expected.expected_pcrs.items()},
        "overlay_sha256": expected.overlay_sha256,
        "tampered": expected.tampered,
        "secure_boot": expected.secure_boot,
    }
    answer = host.run(attest.guest_command(nonce))
    if answer.rc != 0:
        why = why_failed(answer)
        return TpmAttestation(attested=False, reason=f"the target gave no quote: {why}", **record)
    try:
        verdict = attest.check(
            expected.ak_pem, attest.parse_guest_output(answer.stdout), nonce, expected.expected_pcrs
        )
    except attest.AttestationError as exc:
        return TpmAttestation(attested=False, reason=exc.message, **record)
    return TpmAttestation(
        attested=verdict.attested,
        reason=verdict.why(),
        quoted_pcrs={str(k): v for k, v in verdict.pcrs.items()},
        **record,
    )


def backends() -> list[type[Target]]:
    return [kind.backend for kind in TargetKind]


def forms() -> str:
    """Every form of --target, for an error message."""
    found = [b.form for b in backends()]
    return ", ".join(found[:-1]) + " or " + found[-1]


def parse(spec: str) -> Target:
    """Read a --target value; a malformed one is a one-line usage error that shows the forms."""
    for backend in backends():
        if spec.startswith(backend.prefix):
            return backend.parse(spec.removeprefix(backend.prefix), spec)
    raise UsageError(f"--target {spec!r}: expected {forms()}")
