"""Ctrl-C and SIGTERM become one exception, so every context manager cleans up on the way out.

Inside `deferred()` a signal only sets a flag: code that drives a child which must be stopped
through its own interface (ansible-runner's cancel callback) polls the flag instead.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

from amnesiac.errors import Interrupted

_state: dict[str, object] = {"deferred": False, "pending": None}


def _handler(signum: int, _frame: FrameType | None) -> None:
    _state["pending"] = signum
    if not _state["deferred"]:
        raise Interrupted(signum)


def install() -> None:
    signal.signal(signal.SIGINT, _handler)
    signal.signal(signal.SIGTERM, _handler)


@contextmanager
def deferred() -> Iterator[Callable[[], bool]]:
    """Within the block, signals are recorded; the block polls `cancelled()`; raise on exit."""
    _state["deferred"] = True
    try:
        yield lambda: _state["pending"] is not None
    finally:
        _state["deferred"] = False
    if (signum := _state["pending"]) is not None:
        raise Interrupted(int(signum))  # type: ignore[call-overload]
