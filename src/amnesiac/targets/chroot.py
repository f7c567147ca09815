"""chroot:ROOTFS_DIR or chroot:BUILD_DIR — an image root: files only, nothing runs (build-time
checks, in seconds and without a boot). Given a build directory, the backend unpacks its
initrd.img itself, as the early init would, into the run's temporary directory (removed with it),
and the identity is the sha256 of the initrd it unpacked."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from amnesiac.checks.meta import Surface
from amnesiac.errors import UsageError
from amnesiac.image.manifest import NAME as MANIFEST
from amnesiac.targets.base import Connection, ReachOptions, Target, TargetKind

if TYPE_CHECKING:
    from amnesiac.image.manifest import Manifest
    from amnesiac.report.model import Identity

INITRD = "initrd.img"


class ChrootTarget(Target):
    kind = TargetKind.CHROOT
    surface = Surface.ROOTFS
    prefix = "chroot:"
    form = "chroot:ROOTFS_DIR|BUILD_DIR"
    help = "an image root, or a build whose initrd is unpacked for the run: build-time checks only"

    def __init__(self, address: str, path: Path, *, build: bool = False) -> None:
        super().__init__(address)
        self.path = path  # the root filesystem, or the build to unpack one from
        self.build = path if build else None

    @classmethod
    def parse(cls, value: str, spec: str) -> ChrootTarget:
        path = Path(value)
        if (path / MANIFEST).is_file():
            return cls(value, path.resolve(), build=True)
        if not (path / "etc").is_dir():
            raise UsageError(
                f"--target {spec}: {path} is neither a root filesystem (no etc/) nor a build ({MANIFEST})"
            )
        return cls(value, path.resolve())

    @property
    def build_dir(self) -> Path | None:
        return self.build

    @contextlib.contextmanager
    def reach(self, options: ReachOptions) -> Iterator[Connection]:
        if self.build is None:
            yield Connection(host=os.fspath(self.path), pytest_args=("--connection=chroot",))
            return
        from amnesiac.image.manifest import Manifest
        from amnesiac.image.pack import unpack_initrd

        manifest = Manifest.load(self.build)
        with options.progress.stage("unpack", f"Unpack {self.build.name}/{INITRD}") as stage:
            # Hashed and unpacked from the same bytes: the identity is of what the checks see.
            data = (self.build / INITRD).read_bytes()
            pieces = [p.model_dump() for p in manifest.image.initrd_pieces]
            _, root = unpack_initrd(data, pieces, options.work / "unpacked")
            stage.note = f"{len(data) / 2**20:.1f} MiB"
        yield Connection(
            host=os.fspath(root),
            pytest_args=("--connection=chroot",),
            served={INITRD: hashlib.sha256(data).hexdigest()},
        )

    def identity(self, connection: Connection, built: Manifest | None) -> Identity:
        """Nothing runs in a directory: the initrd it was unpacked from, when it unpacked one,
        else the build it names is all it can say."""
        from amnesiac.report.model import Identity

        if not connection.served:
            return Identity(image_sha256=built.sha256 if built else None)
        unpacked = connection.served[INITRD]
        return Identity(
            image_sha256=unpacked,
            artifacts=dict(connection.served),
            manifest_sha256_matches=None if built is None else unpacked == built.artifacts[INITRD].sha256,
        )


BACKEND = ChrootTarget
