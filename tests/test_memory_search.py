"""The guest-RAM search on ELF cores made here the way QEMU lays them out (boot/memory.py).

The real dump of a booted guest is searched in the boot tier (tests/boot/test_boot.py); here
the reading of the core: segments and their guest-physical addresses, needles at segment
edges, several hits, a core that is not one.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from amnesiac.boot.errors import BootError
from amnesiac.boot.memory import Segment, kpageflags_command, page_kind, page_kinds, search, segments


def core(blocks: list[tuple[int, bytes]], *, note: bool = True) -> bytes:
    """An ELF64 core: a PT_NOTE (as QEMU writes one) and a PT_LOAD per (physical address, bytes)."""
    headers = [(4, b"NOTE")] if note else []
    headers += [(1, data) for _, data in blocks]
    phoff, phentsize = 64, 56
    offset = phoff + phentsize * len(headers)
    table, body = b"", b""
    physical = [0] * (1 if note else 0) + [address for address, _ in blocks]
    for (p_type, data), address in zip(headers, physical, strict=True):
        table += struct.pack("<IIQQQQQQ", p_type, 0, offset + len(body), 0, address, len(data), len(data), 0)
        body += data
    header = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header += struct.pack("<HHIQQQIHHHHHH", 4, 62, 1, 0, phoff, 0, 0, 64, phentsize, len(headers), 0, 0, 0)
    return header + table + body


def test_segments_and_physical_addresses(tmp_path: Path) -> None:
    low = b"\0" * 100 + b"CANARY-1" + b"\0" * 50
    high = b"CANARY-1" + b"x" * 10 + b"CANARY-1CANARY-1"
    path = tmp_path / "core.elf"
    path.write_bytes(core([(0x0, low), (0x100000, high)]))
    data = path.read_bytes()
    assert [s.physical for s in segments(data)] == [0x0, 0x100000]
    assert segments(data)[1] == Segment(
        offset=segments(data)[0].offset + len(low), physical=0x100000, size=len(high)
    )
    searched, hits = search(path, {"c": b"CANARY-1", "never": b"NEVER-SENT", "edge": b"-1CAN"})
    assert searched == len(low) + len(high)
    assert hits["c"] == [100, 0x100000, 0x100000 + 18, 0x100000 + 26]
    assert hits["never"] == []
    assert hits["edge"] == [0x100000 + 24]


def test_a_needle_across_two_blocks_is_not_a_hit(tmp_path: Path) -> None:
    """Two blocks are not adjacent in the guest (a hole between them): no match spans them."""
    path = tmp_path / "core.elf"
    path.write_bytes(core([(0x0, b"....CANA"), (0x100000, b"RY......")], note=False))
    assert search(path, {"c": b"CANARY"})[1]["c"] == []


def test_not_a_core(tmp_path: Path) -> None:
    path = tmp_path / "core.elf"
    path.write_bytes(b"MZ" + bytes(200))
    with pytest.raises(BootError, match="not a little-endian ELF64 core"):
        search(path, {"c": b"x"})
    path.write_bytes(core([], note=True))
    with pytest.raises(BootError, match="holds no RAM"):
        search(path, {"c": b"x"})
    with pytest.raises(ValueError, match="empty needle"):
        search(path, {"c": b""})


def test_page_kinds_from_kpageflags() -> None:
    assert page_kind(1 << 10) == "free page (buddy allocator)"
    assert page_kind(1 << 7 | 1 << 5) == "kernel slab"
    assert page_kind(1 << 12 | 1 << 11 | 1 << 5) == "process memory (anonymous)"
    assert page_kind(1 << 14 | 1 << 5) == "tmpfs or shared memory"
    assert page_kind(1 << 5 | 1 << 3) == "page cache"
    assert page_kind(0) == "kernel (other)"
    command = kpageflags_command([0x1000, 0x1FFF, 0x5000])
    assert command.count("dd if=/proc/kpageflags") == 2 and "skip=1 " in command and "skip=5 " in command
    assert page_kinds("1 1024\n5 0\nnoise\n") == {1: "free page (buddy allocator)", 5: "kernel (other)"}
