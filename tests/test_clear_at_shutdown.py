"""ram_root's shutdown hook as the role renders it: valid sh, and nothing happens unless PID 1 is
systemd-shutdown. It is never run here: on this machine it would empty every tmpfs. What it
clears is measured on a booted image (amnesia.previous_boot_forgotten, boot tier)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests import role_templates


def test_the_hook_is_valid_sh_and_first_of_all_asks_who_pid_1_is(tmp_path: Path) -> None:
    script = tmp_path / "amnesiac-clear-tmpfs"
    script.write_text(role_templates.render("ram_root", "clear-at-shutdown.sh.j2"))
    subprocess.run(["sh", "-n", str(script)], check=True)
    commands = [ln for ln in script.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert commands[0] == '[ "$(cat /proc/1/comm 2> /dev/null)" = systemd-shutdow ] || exit 0'
    assert commands[1] == "systemd-detect-virt --container --quiet && exit 0"
    (find,) = [ln for ln in commands if ln.startswith("find ")]
    assert find.startswith("find $targets -xdev -type f ") and find.endswith(" -delete 2> /dev/null")
