"""An HTTP server in a daemon thread for the life of a `with` block: the one way the netboot
server (boot.http) and the reference provider service (provider.service) run beside the tool."""

from __future__ import annotations

import threading
from socketserver import BaseServer
from typing import Self


class InThread:
    """`with Sub(...) as server:` serves until the block ends; `close()` may come earlier."""

    def _serve_in_thread(self, httpd: BaseServer, name: str, poll: float = 0.5) -> None:
        """Call from __init__: `poll` is how long shutdown() may wait for the loop to notice."""
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, args=(poll,), name=name, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join(timeout=10)
        self._httpd.server_close()
