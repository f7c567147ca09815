from __future__ import annotations

from pathlib import Path

import pytest

from amnesiac.roles import Role, RoleVariable

# Real images (slow tiers): built once per session, shared by the build, boot and verify tests.
from tests.images import cloudvpn, ivpn, needs_root, ovpn, ovpn_release, ovpn_without_controls

pytest_plugins = ["tests.timeline"]  # --timeline: each lane's tests in order (make test)

__all__ = ["cloudvpn", "ivpn", "needs_root", "ovpn", "ovpn_release", "ovpn_without_controls"]

REPO = Path(__file__).resolve().parent.parent


def _var(name: str, type_: str, default: object, choices: tuple[object, ...] = ()) -> RoleVariable:
    return RoleVariable(name=name, type=type_, default=default, description="", choices=choices)


@pytest.fixture
def fake_roles() -> dict[str, Role]:
    """A small role catalogue so policy tests do not depend on the real roles' contents."""
    return {
        "server_base": Role("server_base", Path("/nonexistent"), "", {}),
        "ssh_admin": Role("ssh_admin", Path("/nonexistent"), "", {}),
        "ram_root": Role(
            "ram_root",
            Path("/nonexistent"),
            "",
            {"ram_root_tmpfs_size_mib": _var("ram_root_tmpfs_size_mib", "int", 384)},
        ),
        "no_logs": Role(
            "no_logs",
            Path("/nonexistent"),
            "",
            {
                "no_logs_journald_storage": _var(
                    "no_logs_journald_storage", "str", "none", ("none", "volatile")
                )
            },
        ),
    }
