"""podman://CONTAINER — a running systemd container (a molecule instance): services run, the
kernel and the devices are the host's."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

from amnesiac.checks.meta import Surface
from amnesiac.errors import UsageError
from amnesiac.targets.base import Connection, ReachOptions, Target, TargetKind

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class PodmanTarget(Target):
    kind = TargetKind.PODMAN
    surface = Surface.CONTAINER
    prefix = "podman://"
    form = "podman://CONTAINER"
    help = "a running container (molecule instances)"

    @classmethod
    def parse(cls, value: str, spec: str) -> PodmanTarget:
        if not _NAME.match(value):
            raise UsageError(f"--target {spec}: not a container name")
        return cls(value)

    @contextlib.contextmanager
    def reach(self, options: ReachOptions) -> Iterator[Connection]:
        yield Connection(host=f"podman://{self.address}")


BACKEND = PodmanTarget
