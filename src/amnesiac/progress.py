"""Progress of long steps: a live display for people, a record of stages for `--json`."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from rich.console import Console
from rich.markup import escape
from rich.status import Status


@dataclass
class StageRecord:
    name: str
    seconds: float = 0.0
    note: str = ""


@dataclass
class Progress:
    """Shows one spinner line per running stage and a tick line when it ends.

    With `quiet` nothing is drawn (the caller prints JSON); stages are recorded either way.
    Titles, notes and details are plain text (they carry paths and names from the user, never
    markup); `info` takes rich markup, so its callers escape what they did not write.
    """

    quiet: bool = False
    console: Console = field(default_factory=lambda: Console(stderr=True, highlight=False))
    stages: list[StageRecord] = field(default_factory=list)
    _status: Status | None = None
    _current: StageRecord | None = None

    @contextmanager
    def stage(self, name: str, title: str) -> Iterator[StageRecord]:
        record = StageRecord(name)
        self.stages.append(record)
        self._current = record
        start = time.monotonic()
        title = escape(title)
        status = None if self.quiet else self.console.status(f"[bold]{title}[/]")
        self._status = status
        self._title = title
        ok = False
        try:
            if status:
                status.start()
            yield record
            ok = True
        finally:
            record.seconds = round(time.monotonic() - start, 1)
            if status:
                status.stop()
            if not self.quiet:
                mark = "[green]✓[/]" if ok else "[red]✗[/]"
                note = f" [dim]({escape(record.note)})[/]" if record.note else ""
                self.console.print(f"{mark} {title} [dim]{record.seconds:.1f} s[/]{note}")
            self._status = None
            self._current = None

    def detail(self, text: str) -> None:
        """Show what the current stage is doing now (an Ansible task, a file count)."""
        if self._status is not None:
            self._status.update(f"[bold]{self._title}[/] [dim]{escape(text)}[/]")

    def info(self, text: str) -> None:
        if not self.quiet:
            self.console.print(text)
