"""The guest's whole RAM, seen from the host: dump it through QMP and search it for canaries.

A careful server keeps nothing in files; RAM is where a seized one still holds what it was
sent (measured on an OVPN image: a DNS name in unbound's heap and in kernel slabs eleven
minutes later, a packet's payload in freed pages). QMP's `dump-guest-memory` without paging
writes the guest's physical memory as an ELF core: each PT_LOAD segment is one block of guest
RAM and its p_paddr the block's guest-physical address, so a hit is named by the physical
address that the guest's /proc/kpageflags attributes (free page, slab, process memory, page
cache). The guest is paused while QEMU writes the dump, so the search sees one instant, whole.
"""

from __future__ import annotations

import mmap
import re
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from amnesiac.boot.errors import BootError
from amnesiac.boot.qmp import Qmp

PT_LOAD = 1
PN_XNUM = 0xFFFF  # more segments than the header can count: QEMU's dump never has that many here
DUMP_TIMEOUT = 600.0


@dataclass(frozen=True)
class Segment:
    """One block of guest RAM in the dump: where its bytes are in the file, where in the guest."""

    offset: int
    physical: int
    size: int


@dataclass(frozen=True)
class MemorySearch:
    """What one search of the whole guest RAM found: each needle's guest-physical addresses."""

    searched_bytes: int
    seconds: float  # the dump and the search
    hits: dict[str, list[int]] = field(default_factory=dict)

    def found(self, name: str) -> bool:
        return bool(self.hits.get(name))

    def as_dict(self) -> dict[str, object]:
        return {
            "searched_bytes": self.searched_bytes,
            "seconds": self.seconds,
            "hits": {name: [hex(a) for a in addresses] for name, addresses in self.hits.items()},
        }


# /proc/kpageflags bits (Documentation/admin-guide/mm/pagemap.rst) that say what holds a page,
# in the order they are asked: the first that is set names it.
PAGE_KINDS = (
    (10, "free page (buddy allocator)"),
    (26, "page table"),
    (7, "kernel slab"),
    (12, "process memory (anonymous)"),
    (14, "tmpfs or shared memory"),
    (5, "page cache"),
)
PAGE_SIZE = 4096


def page_kind(flags: int) -> str:
    """What a page is, from its /proc/kpageflags word; "kernel (other)" when no bit says.

    Only the first page of a free block carries BUDDY: a hit in the rest of one reads as
    "kernel (other)", as do the kernel's own allocations that are neither slab nor tables.
    """
    for bit, kind in PAGE_KINDS:
        if flags >> bit & 1:
            return kind
    return "kernel (other)"


def kpageflags_command(addresses: list[int]) -> str:
    """A shell command for the guest (root) printing `PFN FLAGS` for the page of each address."""
    return _per_page("/proc/kpageflags", addresses)


def kpagecgroup_command(addresses: list[int]) -> str:
    """The same for `PFN INODE`: the inode of the memory cgroup the page is charged to (0: none)."""
    return _per_page("/proc/kpagecgroup", addresses)


# Every cgroup directory as `INODE PATH`, to name the owners kpagecgroup gives by inode.
CGROUPS_COMMAND = "find /sys/fs/cgroup -type d -exec stat -c '%i %n' {} +"


def _per_page(table: str, addresses: list[int]) -> str:
    pfns = sorted({address // PAGE_SIZE for address in addresses})
    reads = "; ".join(
        f"printf '%s ' {pfn}; dd if={table} bs=8 skip={pfn} count=1 2>/dev/null | od -An -tu8" for pfn in pfns
    )
    return reads or "true"


def page_kinds(output: str) -> dict[int, str]:
    """PFN -> kind from what kpageflags_command printed."""
    return {pfn: page_kind(word) for pfn, word in _words(output).items()}


def page_owners(output: str, cgroups: str) -> dict[int, str]:
    """PFN -> the cgroup (a systemd unit or slice, relative to /sys/fs/cgroup) its owner is in,
    from what kpagecgroup_command and CGROUPS_COMMAND printed; pages charged to none are left out.

    Both tables are read just after the dump, with the guest running again: a page freed in
    between (a process that exited, a service restarted) reads as free, never as its old owner.
    """
    names = {}
    for line in cgroups.splitlines():
        inode, _, path = line.partition(" ")
        if inode.isdigit() and path:
            names[int(inode)] = _unit_name(path.removeprefix("/sys/fs/cgroup").strip("/"))
    return {pfn: names.get(inode, f"cgroup inode {inode}") for pfn, inode in _words(output).items() if inode}


def _unit_name(cgroup: str) -> str:
    """`system.slice/system-openvpn\\x2dserver.slice/openvpn-server@server.service` ->
    `openvpn-server@server.service`: the unit (its last part), systemd's escapes undone."""
    if not cgroup:
        return "the root cgroup"
    return re.sub(r"\\x([0-9a-f]{2})", lambda m: chr(int(m.group(1), 16)), cgroup.rsplit("/", 1)[-1])


def _words(output: str) -> dict[int, int]:
    words = {}
    for line in output.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            words[int(parts[0])] = int(parts[1])
    return words


def dump(qmp: Qmp, path: Path, timeout: float = DUMP_TIMEOUT) -> None:
    """Write the guest's physical memory to `path` (ELF, no paging), waiting until it is whole."""
    qmp.execute("dump-guest-memory", paging=False, protocol=f"file:{path}", detach=True)
    deadline = time.monotonic() + timeout
    while True:
        status = qmp.execute("query-dump")
        if status.get("status") == "completed":
            return
        if status.get("status") == "failed":
            raise BootError(f"QEMU could not dump the guest's memory to {path}")
        if time.monotonic() > deadline:
            raise BootError(f"dumping the guest's memory took over {timeout:.0f} s ({status})")
        time.sleep(0.1)


def segments(core: bytes | mmap.mmap) -> list[Segment]:
    """The RAM blocks of an ELF64 little-endian core that QEMU wrote."""
    if core[:4] != b"\x7fELF" or core[4] != 2 or core[5] != 1:
        raise BootError("the memory dump is not a little-endian ELF64 core")
    (phoff,) = struct.unpack_from("<Q", core, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", core, 0x36)
    if phnum == PN_XNUM:
        raise BootError("the memory dump has more segments than this reader handles")
    found = []
    for index in range(phnum):
        p_type, _flags, offset, _vaddr, physical, filesz = struct.unpack_from(
            "<IIQQQQ", core, phoff + index * phentsize
        )
        if p_type == PT_LOAD and filesz:
            found.append(Segment(offset, physical, filesz))
    if not found:
        raise BootError("the memory dump holds no RAM")
    return found


def search(path: Path, needles: Mapping[str, bytes]) -> tuple[int, dict[str, list[int]]]:
    """Every occurrence of each needle in the dump at `path`: bytes searched, name -> addresses."""
    if any(not needle for needle in needles.values()):
        raise ValueError("an empty needle is found everywhere")
    hits: dict[str, list[int]] = {name: [] for name in needles}
    with path.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as core:
        blocks = segments(core)
        for name, needle in needles.items():
            for block in blocks:
                end = block.offset + block.size
                at = core.find(needle, block.offset, end)
                while at != -1:
                    hits[name].append(block.physical + at - block.offset)
                    at = core.find(needle, at + 1, end)
    return sum(b.size for b in blocks), hits


def search_guest(qmp: Qmp, work: Path, needles: Mapping[str, bytes]) -> MemorySearch:
    """Dump the guest's RAM into `work`, search it, remove the dump (it holds all of the guest)."""
    start = time.monotonic()
    path = work / f"memory-{time.monotonic_ns()}.elf"
    try:
        dump(qmp, path)
        searched, hits = search(path, needles)
    finally:
        path.unlink(missing_ok=True)
    return MemorySearch(searched, round(time.monotonic() - start, 1), hits)
