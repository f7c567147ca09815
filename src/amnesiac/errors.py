"""The one exception family. The CLI catches it once and prints a single line."""

from __future__ import annotations


class AmnesiacError(Exception):
    """A failure the user can act on: one line, an optional hint, an exit code."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class PolicyError(AmnesiacError):
    """A policy file is malformed; the message names the file and line."""

    exit_code = 2

    def __init__(self, path: object, line: int | None, message: str) -> None:
        where = f"{path}:{line}" if line else f"{path}"
        super().__init__(f"{where}: {message}")
        self.path = path
        self.line = line


class UsageError(AmnesiacError):
    """The command line or the environment cannot work (not root, a tool missing)."""

    exit_code = 2


class BuildError(AmnesiacError):
    """A build step failed; the partial output has been removed."""


class Interrupted(AmnesiacError):
    """Ctrl-C or SIGTERM: everything was cleaned up on the way out."""

    exit_code = 130
