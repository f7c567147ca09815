"""Files that are never seen half-written: written beside their place, flushed, then renamed."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path


def write_atomic(path: Path, data: str | bytes, *, mode: int = 0o644) -> Path:
    """Replace `path` with `data` in one rename: readers see the old file or the new, never part."""
    return write_all_atomic({path: data}, mode=mode)[0]


def create_atomic(path: Path, data: str | bytes, *, mode: int = 0o644) -> Path:
    """Create `path` whole, in one link: FileExistsError if something is there (it stays)."""
    temporary = _stage(path, data.encode("utf-8") if isinstance(data, str) else data, mode)
    try:
        os.link(temporary, path)
        sync_directory(path.parent)
    finally:
        temporary.unlink()
    return path


def write_all_atomic(files: Mapping[Path, str | bytes], *, mode: int = 0o644) -> list[Path]:
    """Stage every file first, then rename each into place: a failure leaves every old file as it was.

    The directories must exist. The renames are made durable (the directory is synced), so a
    file that was announced survives a power cut.
    """
    staged: list[tuple[Path, Path]] = []
    try:
        for path, data in files.items():
            staged.append((_stage(path, data.encode("utf-8") if isinstance(data, str) else data, mode), path))
        for temporary, path in staged:
            temporary.replace(path)
        for directory in dict.fromkeys(path.parent for path in files):
            sync_directory(directory)
    finally:
        for temporary, _ in staged:
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()
    return list(files)


def _stage(path: Path, data: bytes, mode: int) -> Path:
    """`data` in a hidden temporary file beside `path`, flushed to disk, with `mode`."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    temporary = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        temporary.chmod(mode)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return temporary


def sync_directory(directory: Path) -> None:
    """Make renames in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
