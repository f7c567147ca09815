"""A deterministic newc cpio writer (the format the kernel's initramfs unpacker reads).

Entries are written in sorted path order, owners as numbers, mtimes clamped to
SOURCE_DATE_EPOCH and inode numbers counted from 1, so the same tree always gives the same
bytes. Hard links keep one inode: every name but the last is written empty and the last one
carries the data, the convention of GNU cpio that the kernel and busybox both read.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class Entry:
    """One archive member. `source` is read for regular files; `data` is used otherwise."""

    name: str  # relative, no leading slash
    mode: int
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    data: bytes = b""
    source: Path | None = None
    rdev: int = 0
    link_key: tuple[int, int] | None = None  # (st_dev, st_ino) of a hard-linked file
    last_link: bool = True  # for hard links: this name carries the data


class CpioWriter:
    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.ino = 0
        self.bytes_unpacked = 0  # what the tree will take in a tmpfs, in whole pages
        self.entries = 0
        self._links: dict[tuple[int, int], tuple[int, int]] = {}  # link key -> (ino, nlink)

    def add(self, entry: Entry) -> None:
        self.entries += 1
        nlink = None
        if entry.link_key is not None:
            if entry.link_key not in self._links:
                self.ino += 1
                count = entry.source.stat().st_nlink if entry.source else 1
                self._links[entry.link_key] = (self.ino, count)
            ino, nlink = self._links[entry.link_key]
        else:
            self.ino += 1
            ino = self.ino
        has_data = entry.link_key is None or entry.last_link
        size = (entry.source.stat().st_size if entry.source else len(entry.data)) if has_data else 0
        self._header(
            entry.name,
            entry.mode,
            size,
            uid=entry.uid,
            gid=entry.gid,
            mtime=entry.mtime,
            rdev=entry.rdev,
            nlink=nlink,
            ino=ino,
        )
        if not has_data:
            return
        if entry.source and size:
            with entry.source.open("rb") as f:
                while chunk := f.read(1 << 20):
                    self.out.write(chunk)
        else:
            self.out.write(entry.data)
        self._pad(size)
        self.bytes_unpacked += -(-size // 4096) * 4096

    def close(self) -> None:
        self.ino = 0
        self._header(TRAILER, 0, 0, nlink=1)
        pos = self.out.tell()
        self.out.write(b"\0" * (-pos % 512))

    def _header(
        self,
        name: str,
        mode: int,
        size: int,
        *,
        uid: int = 0,
        gid: int = 0,
        mtime: int = 0,
        rdev: int = 0,
        nlink: int | None = None,
        ino: int | None = None,
    ) -> None:
        raw = name.encode() + b"\0"
        links = nlink if nlink is not None else (2 if stat.S_ISDIR(mode) else 1)
        fields = (
            self.ino if ino is None else ino,
            mode,
            uid,
            gid,
            links,
            mtime,
            size,
            0,
            0,
            os.major(rdev),
            os.minor(rdev),
            len(raw),
            0,
        )
        self.out.write(b"070701" + b"".join(b"%08X" % v for v in fields))
        self.out.write(raw)
        self._pad(110 + len(raw))

    def _pad(self, length: int) -> None:
        self.out.write(b"\0" * (-length % 4))


def tree_entries(root: Path, clamp: int) -> Iterator[Entry]:
    """Every file, directory, link and device under `root`, sorted, as archive entries."""
    paths = sorted(_walk(root))
    stats = {rel: (root / rel).lstat() for rel in paths}
    # Hard links inside the tree: the last name (in archive order) of each inode carries the data.
    last_name: dict[tuple[int, int], str] = {}
    for rel, st in stats.items():
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            last_name[(st.st_dev, st.st_ino)] = rel
    for rel in paths:
        full = root / rel
        st = stats[rel]
        mtime = min(int(st.st_mtime), clamp)
        mode = st.st_mode
        if stat.S_ISLNK(mode):
            yield Entry(rel, mode, st.st_uid, st.st_gid, mtime, data=full.readlink().as_posix().encode())
        elif stat.S_ISREG(mode):
            key = (st.st_dev, st.st_ino) if st.st_nlink > 1 else None
            last = key is None or last_name[key] == rel
            yield Entry(rel, mode, st.st_uid, st.st_gid, mtime, source=full, link_key=key, last_link=last)
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            yield Entry(rel, mode, st.st_uid, st.st_gid, mtime, rdev=st.st_rdev)
        else:  # directories, fifos, sockets
            yield Entry(rel, mode, st.st_uid, st.st_gid, mtime)


def _walk(root: Path) -> Iterator[str]:
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        for name in dirnames + filenames:
            yield name if rel == "." else f"{rel}/{name}"
