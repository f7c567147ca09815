"""The image's TPM tool run here, against swtpm's TCP port instead of a server's /dev/tpmrm0."""

from __future__ import annotations

import subprocess
from types import SimpleNamespace

from amnesiac import attest
from tests.images import REPO

QUOTE_TOOL = REPO / "roles/server_base/files/amnesiac-tpm-quote"


class SwtpmHost:
    """The one method of a testinfra host that attestation and enrolment use (`run`): each
    command is the image's tool, run with perl here and pointed at swtpm's port."""

    def __init__(self, tcti: str) -> None:
        self.port = tcti.rsplit("port=", 1)[1]
        self.commands: list[str] = []

    def run(self, command: str) -> SimpleNamespace:
        self.commands.append(command)
        tool, *args = command.split()
        assert tool == attest.GUEST_TOOL
        argv = ["perl", str(QUOTE_TOOL), *args, f"127.0.0.1:{self.port}"]
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        return SimpleNamespace(rc=done.returncode, stdout=done.stdout, stderr=done.stderr)
