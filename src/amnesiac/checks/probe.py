"""Evidence: every command a check runs on the target is kept for the report, bounded."""

from __future__ import annotations

import shlex
from dataclasses import asdict, dataclass
from typing import Any

OUTPUT_LIMIT = 4000  # characters of output kept per command: head and tail


def bounded(text: str, limit: int = OUTPUT_LIMIT) -> str:
    """At most `limit` characters: the head and the tail, with what was left out in between."""
    if len(text) <= limit:
        return text
    head, tail = text[: limit // 2], text[-(limit // 2) :]
    return f"{head}\n[… {len(text) - len(head) - len(tail)} characters omitted …]\n{tail}"


@dataclass(frozen=True)
class Evidence:
    command: str
    exit_code: int | None
    output: str
    note: str | None = None


class Probe:
    """Runs commands on the target through testinfra and records each as evidence.

    Checks use `probe.run` rather than `host.run` so that a reviewer sees exactly what was run
    and what came back; `probe.note` records a finding that is not a command.
    """

    def __init__(self, host: Any) -> None:
        self.host = host
        self.evidence: list[Evidence] = []

    def run(self, command: str, *args: str, note: str | None = None) -> Any:
        """Run `command` (args are shell-quoted into it) and return testinfra's CommandResult."""
        result = self.host.run(command, *args)
        shown = command % tuple(shlex.quote(a) for a in args) if args else command
        output = result.stdout + (f"\n[stderr]\n{result.stderr}" if result.stderr.strip() else "")
        self.evidence.append(Evidence(shown, result.rc, bounded(output.strip()), note))
        return result

    def note(self, text: str) -> None:
        self.evidence.append(Evidence("", None, "", bounded(text)))

    def as_data(self) -> list[dict[str, Any]]:
        return [asdict(e) for e in self.evidence]
