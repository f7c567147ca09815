"""The cpio writer: same tree, same bytes; and a real cpio reads back what it wrote."""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from amnesiac.image.cpio import CpioWriter, Entry, tree_entries


def make_tree(root: Path, mtime: int) -> None:
    (root / "etc/amnesiac").mkdir(parents=True)
    (root / "etc/amnesiac/a.conf").write_text("alpha\n")
    (root / "etc/secret").write_text("x" * 5000)
    (root / "etc/secret").chmod(0o600)
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/tool").write_bytes(b"\x7fELF" + bytes(range(256)))
    (root / "usr/bin/tool").chmod(0o755)
    (root / "bin").symlink_to("usr/bin")
    for path in [*root.rglob("*"), root]:
        os.utime(path, (mtime, mtime), follow_symlinks=False)


def archive(root: Path, clamp: int) -> bytes:
    buf = io.BytesIO()
    writer = CpioWriter(buf)
    for entry in tree_entries(root, clamp):
        writer.add(entry)
    writer.close()
    return buf.getvalue()


def test_same_tree_same_bytes(tmp_path: Path) -> None:
    make_tree(tmp_path / "a", mtime=2_000_000_000)
    make_tree(tmp_path / "b", mtime=1_900_000_000)
    # Different file mtimes (both later than the clamp) and creation order: identical archives.
    assert archive(tmp_path / "a", clamp=1_700_000_000) == archive(tmp_path / "b", clamp=1_700_000_000)
    assert len(archive(tmp_path / "a", clamp=1_700_000_000)) % 512 == 0


def test_clamp_changes_bytes(tmp_path: Path) -> None:
    make_tree(tmp_path / "a", mtime=2_000_000_000)
    assert archive(tmp_path / "a", clamp=1) != archive(tmp_path / "a", clamp=2)


@pytest.mark.skipif(shutil.which("cpio") is None, reason="GNU cpio not installed")
def test_gnu_cpio_reads_it_back(tmp_path: Path) -> None:
    make_tree(tmp_path / "src", mtime=1_800_000_000)
    data = archive(tmp_path / "src", clamp=1_700_000_000)
    (tmp_path / "out").mkdir()
    subprocess.run(
        ["cpio", "-idm", "--quiet", "--no-absolute-filenames"],
        input=data,
        cwd=tmp_path / "out",
        check=True,
    )
    out = tmp_path / "out"
    assert (out / "etc/amnesiac/a.conf").read_text() == "alpha\n"
    assert (out / "etc/secret").read_text() == "x" * 5000
    assert stat.S_IMODE((out / "etc/secret").stat().st_mode) == 0o600
    assert (out / "bin").readlink() == Path("usr/bin")
    assert (out / "usr/bin/tool").stat().st_mtime == 1_700_000_000


def test_device_node_entry() -> None:
    buf = io.BytesIO()
    writer = CpioWriter(buf)
    writer.add(Entry("dev/console", stat.S_IFCHR | 0o600, rdev=os.makedev(5, 1)))
    writer.close()
    header = buf.getvalue()[:110]
    assert header.startswith(b"070701")
    # rdevmajor and rdevminor are the 10th and 11th 8-digit hex fields
    assert header[6 + 9 * 8 : 6 + 10 * 8] == b"00000005"
    assert header[6 + 10 * 8 : 6 + 11 * 8] == b"00000001"


@pytest.mark.skipif(shutil.which("cpio") is None, reason="GNU cpio not installed")
def test_hard_links_stay_one_file(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src, mtime=1_800_000_000)
    (src / "usr/bin/tool2").hardlink_to(src / "usr/bin/tool")
    data = archive(src, clamp=1_700_000_000)
    assert data.count(b"\x7fELF") == 1, "the shared data is stored once"
    (tmp_path / "out").mkdir()
    subprocess.run(["cpio", "-idm", "--quiet"], input=data, cwd=tmp_path / "out", check=True)
    one, two = tmp_path / "out/usr/bin/tool", tmp_path / "out/usr/bin/tool2"
    assert one.read_bytes() == two.read_bytes() == (src / "usr/bin/tool").read_bytes()
    assert one.stat().st_ino == two.stat().st_ino
