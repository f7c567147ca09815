"""ssh://user@host[:port] — a live server, reached with the operator's key (--ssh-key)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from amnesiac import ssh
from amnesiac.checks.meta import Surface
from amnesiac.targets import mux
from amnesiac.targets.base import Connection, ReachOptions, Target, TargetKind


class SshTarget(Target):
    kind = TargetKind.SSH
    surface = Surface.BOOTED
    prefix = "ssh://"
    form = "ssh://user@host[:port]"
    help = (
        "a live server (--ssh-key: the private key to log in with; --build: the build it should be running)"
    )

    def __init__(self, user: str, host: str, port: int, name: str | None = None) -> None:
        super().__init__(f"{user}@{host}:{port}", name)
        self.user, self.host, self.port = user, host, port

    @classmethod
    def parse(cls, value: str, spec: str) -> SshTarget:
        url = ssh.parse_url(spec, option="--target", path=False)
        return cls(url.user or "root", url.host, url.port or 22)

    @contextlib.contextmanager
    def reach(self, options: ReachOptions) -> Iterator[Connection]:
        """One connection to the server, shared by every command of the run (targets.mux)."""
        config = client_config(options.work, options.ssh_key)
        url = ssh.SshUrl(host=self.host, user=self.user, port=self.port)
        with mux.shared(config, url, options.work):
            yield Connection(
                host=f"ssh://{self.user}@{self.host}:{self.port}",
                pytest_args=(f"--ssh-config={config}",),
                ssh_config=config,
                test_keys=options.verifier_keys,
                enrolment=options.enrolment,
            )


def client_config(work: Path, key: Path | None) -> Path:
    """The ssh_config testinfra's ssh backend uses: host keys are made at every boot of an
    amnesiac image, so there is nothing to pin; a run's commands to a host share one
    connection where the work directory's name allows (targets.mux)."""
    control = mux.control_path(work)
    return ssh.client_config(work / "ssh_config", identity=key, ephemeral_host_keys=True, control=control)


BACKEND = SshTarget
