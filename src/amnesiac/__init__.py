"""amnesiac: a VPN server image that cannot keep what its privacy policy says it does not keep."""

from __future__ import annotations

__version__ = "0.1.0"
