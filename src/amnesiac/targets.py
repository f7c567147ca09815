"""What `amnesiac verify --target` names, and how testinfra reaches it.

qemu:BUILD_DIR            boot the build in QEMU (the boot harness), verify over SSH
ssh://user@host[:port]    a live server
chroot:ROOTFS_DIR         an unpacked image root: build-time checks only
podman://CONTAINER        a running container (molecule instances)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from amnesiac.checks.meta import TargetKind as CheckKind
from amnesiac.errors import UsageError
from amnesiac.report.model import TargetKind

_SSH = re.compile(
    r"^ssh://(?:(?P<user>[^@/:]+)@)?(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::(?P<port>\d+))?/?$"
)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

CHECK_KIND = {
    TargetKind.QEMU: CheckKind.BOOTED,
    TargetKind.SSH: CheckKind.BOOTED,
    TargetKind.CHROOT: CheckKind.ROOTFS,
    TargetKind.PODMAN: CheckKind.CONTAINER,
}


@dataclass(frozen=True)
class TargetSpec:
    kind: TargetKind
    address: str  # build dir, user@host:port, rootfs dir or container name
    path: Path | None = None  # qemu: the build; chroot: the root
    user: str = "root"
    host: str = ""
    port: int = 22

    @property
    def check_kind(self) -> CheckKind:
        return CHECK_KIND[self.kind]

    def testinfra_hosts(self, port: int | None = None) -> list[str]:
        """pytest arguments that point testinfra at the target (qemu: at the forwarded port)."""
        if self.kind is TargetKind.CHROOT:
            return ["--connection=chroot", f"--hosts={self.path}"]
        if self.kind is TargetKind.PODMAN:
            return [f"--hosts=podman://{self.address}"]
        host, real_port = ("127.0.0.1", port) if self.kind is TargetKind.QEMU else (self.host, self.port)
        return [f"--hosts=ssh://{self.user}@{host}:{real_port}"]


def parse(spec: str) -> TargetSpec:
    """Read a --target value; a malformed one is a one-line usage error that shows the forms."""
    forms = "qemu:BUILD_DIR, ssh://user@host[:port], chroot:ROOTFS_DIR or podman://CONTAINER"
    if spec.startswith("qemu:"):
        path = Path(spec.removeprefix("qemu:"))
        if not (path / "manifest.json").is_file():
            raise UsageError(f"--target {spec}: {path} is not a build directory (no manifest.json)")
        return TargetSpec(TargetKind.QEMU, str(path), path=path.resolve())
    if spec.startswith("chroot:"):
        path = Path(spec.removeprefix("chroot:"))
        if not (path / "etc").is_dir():
            raise UsageError(f"--target {spec}: {path} is not a root filesystem directory (no etc/)")
        return TargetSpec(TargetKind.CHROOT, str(path), path=path.resolve())
    if spec.startswith("podman://"):
        name = spec.removeprefix("podman://")
        if not _NAME.match(name):
            raise UsageError(f"--target {spec}: not a container name")
        return TargetSpec(TargetKind.PODMAN, name)
    if match := _SSH.match(spec):
        user, host, port = match["user"] or "root", match["host"], int(match["port"] or 22)
        if not 0 < port < 65536:
            raise UsageError(f"--target {spec}: port {port} is out of range")
        return TargetSpec(TargetKind.SSH, f"{user}@{host}:{port}", user=user, host=host, port=port)
    raise UsageError(f"--target {spec!r}: expected {forms}")
