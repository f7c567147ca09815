"""What a boot can fail with, beyond a usage error."""

from __future__ import annotations

from amnesiac.errors import AmnesiacError


class BootError(AmnesiacError):
    """The machine did not boot, or stopped; the message carries the console's last lines."""


class ImageMismatch(BootError):
    """An artifact on disk or on the wire does not match manifest.json: refused to boot it."""
