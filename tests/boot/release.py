"""Identity release for one booted test machine: the provider's release service on 127.0.0.1,
which the guest reaches at GUEST_RELEASE:443, holding the identity of the machine about to boot.

The harness derives the machine's EK and AK before QEMU starts (boot/firmware.py), as a provider
enrols a server before it enters the fleet; the test admits that enrolment as soon as QEMU runs,
well before the guest's identity release unit asks (it waits for the network, then tries for a
minute)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from amnesiac import boot
from amnesiac.boot.overlay import OverlayFile
from amnesiac.flash import identities
from amnesiac.image.manifest import Manifest
from amnesiac.provider.harness import GUEST_RELEASE
from amnesiac.provider.release import IdentityRelease, server
from tests.images import ReleaseImage, release_setup
from tests.test_flash_identities import identity_dir

MAC = "52-54-00-12-34-56"  # QEMU's first NIC, the host directory the identity is filed under
NODE = "vpn-release-1"  # the node certificate's name
# What the guest's console says when the identity (url, ca.crt, node.crt, node.key) arrived.
CONSOLE = f"amnesiac: identity release: 4 files from https://{GUEST_RELEASE}"
SAID = "amnesiac: identity release: "  # what it says either way, after network-online (SSH is up before)
ANSWER_TIMEOUT = 300.0  # network-online, then a minute of tries at most, a quote and an activation


@dataclass(frozen=True)
class Release:
    service: IdentityRelease
    files: tuple[OverlayFile, ...]  # the identity it holds for the machine
    built: Manifest

    @property
    def guest_service(self) -> boot.GuestService:
        return boot.GuestService(GUEST_RELEASE, 443, self.service.port)

    def admit(self, machine: boot.BootedMachine) -> None:
        """Hold the machine's identity for its TPM, enrolled by the harness before it booted."""
        assert machine.measured is not None, "identity release needs a measured boot (a TPM)"
        self.service.admit(MAC, server(MAC, self.built, machine.measured.enrolment(), self.files))

    def paths(self) -> list[tuple[str, int]]:
        return [(r.path, r.status) for r in self.service.requests()]


def release_image(request: pytest.FixtureRequest) -> ReleaseImage:
    """$AMNESIAC_RELEASE_BUILD (a build made with tests.images.release_args of the keys in
    BUILD.keys/), else the session's."""
    build = os.environ.get("AMNESIAC_RELEASE_BUILD")
    if not build:
        image: ReleaseImage = request.getfixturevalue("ovpn_release")
        return image
    return ReleaseImage(Path(build), *release_setup(Path(f"{build}.keys")))


@contextlib.contextmanager
def release_service(image: ReleaseImage, work: Path) -> Iterator[Release]:
    source = identity_dir(work / "identities", {MAC: NODE}, wireguard=False)
    files = tuple(identities.load(source).host_files[MAC])
    with IdentityRelease(image.pki, {}, journal=work / "release-requests.jsonl") as service:
        yield Release(service, files, Manifest.load(image.out))
