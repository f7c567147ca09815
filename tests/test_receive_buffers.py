"""no_logs' receive-buffer control as the role renders it: valid bash, silent, never in a
container. Whether it frees what it should is measured on a booted image, where it has network
cards to rebind (amnesia.session_forgotten's packet headers, boot tier)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests import role_templates


def _render(name: str) -> str:
    return role_templates.render("no_logs", name)


def test_the_flush_script_is_valid_bash_and_rebinds_only_through_sysfs(tmp_path: Path) -> None:
    script = tmp_path / "flush-receive-buffers"
    script.write_text(_render("flush-receive-buffers.sh.j2"))
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert '> "$driver/unbind"' in text and '> "$driver/bind"' in text
    assert "sleep 5" in text  # no_logs_receive_buffers_interval


def test_the_unit_says_nothing_and_skips_containers() -> None:
    unit = _render("amnesiac-receive-buffers.service.j2")
    for line in ("ConditionVirtualization=!container", "StandardOutput=null", "StandardError=null",
                 "CapabilityBoundingSet=CAP_NET_ADMIN"):  # fmt: skip
        assert line in unit.splitlines(), line
