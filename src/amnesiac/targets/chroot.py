"""chroot:ROOTFS_DIR — an unpacked image root: files only, nothing runs (build-time checks)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from amnesiac.checks.meta import Surface
from amnesiac.errors import UsageError
from amnesiac.targets.base import Connection, ReachOptions, Target, TargetKind

if TYPE_CHECKING:
    from amnesiac.image.manifest import Manifest
    from amnesiac.report.model import Identity


class ChrootTarget(Target):
    kind = TargetKind.CHROOT
    surface = Surface.ROOTFS
    prefix = "chroot:"
    form = "chroot:ROOTFS_DIR"
    help = "an unpacked image root: build-time checks only"

    def __init__(self, address: str, root: Path) -> None:
        super().__init__(address)
        self.root = root

    @classmethod
    def parse(cls, value: str, spec: str) -> ChrootTarget:
        path = Path(value)
        if not (path / "etc").is_dir():
            raise UsageError(f"--target {spec}: {path} is not a root filesystem directory (no etc/)")
        return cls(value, path.resolve())

    @contextlib.contextmanager
    def reach(self, options: ReachOptions) -> Iterator[Connection]:
        yield Connection(host=os.fspath(self.root), pytest_args=("--connection=chroot",))

    def identity(self, connection: Connection, built: Manifest | None) -> Identity:
        """Nothing runs in a directory: the build it was unpacked from is all it can say."""
        from amnesiac.report.model import Identity

        return Identity(image_sha256=built.sha256 if built else None)


BACKEND = ChrootTarget
