"""The previous-boot search's parts that need no machine: what is planted and how, and what counts
as kept. The search itself runs on booted images (amnesia.previous_boot_forgotten, boot tier)."""

from __future__ import annotations

import subprocess

from amnesiac.boot.memory import MemorySearch
from amnesiac.canary import NEVER
from amnesiac.previous_boot import MUST_BE_SEEN, Planted, Reboot


def test_the_planting_command_is_bash_and_carries_no_canary_in_clear() -> None:
    planted = Planted.fresh()
    command = planted.command()
    subprocess.run(["bash", "-n", "-c", command], check=True)
    for name, value in planted.needles().items():
        assert value.decode() not in command, name
    assert planted.needles()[NEVER].hex() not in command.replace("\\x", "")  # never even escaped
    assert set(MUST_BE_SEEN) < set(planted.needles())


def test_only_what_was_seen_before_the_reboot_counts_as_kept() -> None:
    planted = Planted.fresh()
    tmpfs, process, dns = "root tmpfs file", "process memory", "resolver query"
    before = MemorySearch(1024, 0.1, {tmpfs: [4096], process: [8192], dns: []})
    after = MemorySearch(1024, 0.1, {tmpfs: [4096], process: [], dns: [12288]})
    assert Reboot(planted, before, after, 9.0, "shutdown").kept() == {tmpfs: [4096]}
    assert Reboot(planted, before, None, 180.0, "running").kept() == {}
