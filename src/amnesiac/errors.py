"""The one exception family, and the exit codes. The CLI catches it once and prints a single line."""

from __future__ import annotations

import signal
from enum import IntEnum


class ExitCode(IntEnum):
    """What `amnesiac` exits with (MEANINGS says each; README.md and `--help` print the table)."""

    OK = 0
    FAILED = 1
    USAGE = 2
    REFUSED = 3
    UNREACHABLE = 4
    INCOMPLETE = 5
    INTERNAL = 70  # EX_SOFTWARE
    LOCKED = 75  # EX_TEMPFAIL
    SIGINT = 130  # 128 + the signal, as a shell reports it
    SIGTERM = 143


MEANINGS = {
    ExitCode.OK: "success: built, booted, published; verify: every technical claim verified",
    ExitCode.FAILED: "verify: a claim failed on the target; a build, boot or publish step failed",
    ExitCode.USAGE: "a bad argument or input file (policy, manifest, inventory, key): nothing was done",
    ExitCode.REFUSED: "flash: no passing report for this image, a bad signature, a changed artifact",
    ExitCode.UNREACHABLE: "verify: the target could not be reached, or the checks could not run at all",
    ExitCode.INCOMPLETE: "verify: no claim failed, but not every technical claim could be proved here "
    "(partially verified, not applicable on this kind of target, or not yet provable)",
    ExitCode.INTERNAL: "a bug in amnesiac: --debug shows the traceback",
    ExitCode.LOCKED: "another flash holds the PXE root: try again later",
    ExitCode.SIGINT: "interrupted by Ctrl-C; everything it made was cleaned up",
    ExitCode.SIGTERM: "interrupted by SIGTERM; everything it made was cleaned up",
}


def exit_code_table() -> str:
    """The exit codes as lines `  N    meaning`, for --help."""
    return "\n".join(f"  {code.value:<4} {MEANINGS[code]}" for code in ExitCode)


class AmnesiacError(Exception):
    """A failure the user can act on: one line, an optional hint, an exit code."""

    exit_code: int = ExitCode.FAILED

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class PolicyError(AmnesiacError):
    """A policy file is malformed; the message names the file and line."""

    exit_code = ExitCode.USAGE

    def __init__(self, path: object, line: int | None, message: str) -> None:
        where = f"{path}:{line}" if line else f"{path}"
        super().__init__(f"{where}: {message}")
        self.path = path
        self.line = line


class UsageError(AmnesiacError):
    """The command line or the environment cannot work (not root, a tool missing)."""

    exit_code = ExitCode.USAGE


class BuildError(AmnesiacError):
    """A build step failed; the partial output has been removed."""


class UnreachableError(AmnesiacError):
    """The target could not be reached, or the checks could not run at all: nothing was proved
    either way, which a CI job must tell apart from a claim that failed."""

    exit_code = ExitCode.UNREACHABLE


class Interrupted(AmnesiacError):
    """Ctrl-C or SIGTERM: everything was cleaned up on the way out (exit 128 + the signal)."""

    exit_code: int = ExitCode.SIGINT

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}; cleaned up")
        self.exit_code = 128 + signum
