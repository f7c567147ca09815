"""Where the project's data lives: next to the package when installed, the checkout otherwise."""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


@cache
def data_root() -> Path:
    """The directory holding roles/, playbooks/, image/ and policies/."""
    for candidate in (_PACKAGE / "data", _PACKAGE.parent.parent):
        if (candidate / "roles").is_dir() and (candidate / "playbooks").is_dir():
            return candidate
    raise RuntimeError(f"amnesiac data (roles/, playbooks/) not found near {_PACKAGE}")


def roles_dir() -> Path:
    return data_root() / "roles"


def playbooks_dir() -> Path:
    return data_root() / "playbooks"


def image_dir() -> Path:
    return data_root() / "image"


def policies_dir() -> Path:
    return data_root() / "policies"


def default_policy() -> Path:
    return policies_dir() / "ovpn.yml"


def cache_dir() -> Path:
    """Rootfs tarballs keyed by input hash; `AMNESIAC_CACHE` overrides, then XDG_CACHE_HOME."""
    if env := os.environ.get("AMNESIAC_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "amnesiac"
