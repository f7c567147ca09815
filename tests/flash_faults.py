"""`amnesiac flash` that stops itself at one step of a publish, for the tests that SIGKILL it there.

    python -m tests.flash_faults STEP flash BUILD_DIR --to PXE_ROOT ...

runs the command line as `amnesiac` does, except that the PXE root it opens is a store that
sends itself SIGSTOP when the publish reaches STEP (one of amnesiac.flash.store.CHECKPOINTS,
through the `Store.checkpoint` hook). The test sees the process stopped (state T in
/proc/PID/stat) and kills it there, or lets it go on with SIGCONT.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from amnesiac import cli
from amnesiac.flash import command
from amnesiac.flash.store import CHECKPOINTS, LocalStore, SshStore, Store, open_store


class _StopAt:
    """Mixed into a store: SIGSTOP this process when the publish reaches `stop_at`."""

    stop_at = ""

    def checkpoint(self, step: str) -> None:
        if step == self.stop_at:
            os.kill(os.getpid(), signal.SIGSTOP)


class StoppingLocalStore(_StopAt, LocalStore):
    pass


class StoppingSshStore(_StopAt, SshStore):
    pass


def stopping(store: Store, step: str) -> Store:
    """The same PXE root as `store`, reached the same way, stopping at `step`."""
    found: StoppingLocalStore | StoppingSshStore
    if isinstance(store, LocalStore):
        found = StoppingLocalStore(store.root)
    elif isinstance(store, SshStore):
        found = StoppingSshStore(store.root, ssh_config=store.ssh_config, ssh_key=store.ssh_key)
    else:
        raise TypeError(f"no stopping variant of {type(store).__name__}")
    found.stop_at = step
    return found


def main(argv: list[str]) -> int:
    step, *args = argv
    if step not in CHECKPOINTS:
        raise SystemExit(f"usage: python -m tests.flash_faults {{{'|'.join(CHECKPOINTS)}}} flash ARGS...")

    def open_stopping(to: str, *, ssh_config: Path | None = None, ssh_key: Path | None = None) -> Store:
        return stopping(open_store(to, ssh_config=ssh_config, ssh_key=ssh_key), step)

    vars(command)["open_store"] = open_stopping  # the PXE root the flash command opens
    return cli.main(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
