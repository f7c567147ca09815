"""A minimal client for QEMU's machine protocol (QMP), over the unix socket QEMU opens."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from pathlib import Path
from typing import Any

from amnesiac.boot.errors import BootError


class Qmp:
    """One connection, one command at a time."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        self._sock.connect(str(path))
        self._file = self._sock.makefile("rwb")
        self._lock = threading.Lock()
        self.greeting = self._read()
        self.execute("qmp_capabilities")

    def execute(self, command: str, **arguments: object) -> Any:
        """Run a QMP command; return its `return` value; raise BootError on a QMP error."""
        with self._lock:
            message: dict[str, object] = {"execute": command}
            if arguments:
                message["arguments"] = arguments
            self._file.write(json.dumps(message).encode() + b"\n")
            self._file.flush()
            while True:
                reply = self._read()
                if "return" in reply:
                    return reply["return"]
                if "error" in reply:
                    raise BootError(f"QMP {command}: {reply['error'].get('desc', reply['error'])}")

    def _read(self) -> dict[str, Any]:
        line = self._file.readline()
        if not line:
            raise ConnectionError("QMP connection closed")
        data: dict[str, Any] = json.loads(line)
        return data

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()
            self._sock.close()
