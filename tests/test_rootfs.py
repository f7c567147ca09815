"""The root filesystem's epoch: derived from the archive state it is made from, never the clock,
so that two cold builds of one archive state agree (issue #14's reproducibility)."""

from __future__ import annotations

from pathlib import Path

import pytest

from amnesiac import policy
from amnesiac.errors import BuildError
from amnesiac.image import pack, rootfs
from amnesiac.image.plan import make_plan
from amnesiac.image.rootfs import release_epoch

REPO = Path(__file__).resolve().parent.parent

IN_RELEASE = """-----BEGIN PGP SIGNED MESSAGE-----
Hash: SHA512

Origin: Debian
Suite: testing
Codename: trixie
Date: Sat, 21 Nov 2026 09:15:44 UTC
Valid-Until: Sat, 28 Nov 2026 09:15:44 UTC
"""


def mirror_with(tmp_path: Path, text: str) -> str:
    release = tmp_path / "dists" / "trixie" / "InRelease"
    release.parent.mkdir(parents=True)
    release.write_text(text)
    return tmp_path.as_uri()


def test_the_epoch_is_the_release_files_date(tmp_path: Path) -> None:
    assert release_epoch(mirror_with(tmp_path, IN_RELEASE), "trixie") == 1795252544


def test_a_mirror_without_a_release_date_is_one_line_naming_it(tmp_path: Path) -> None:
    mirror = mirror_with(tmp_path, IN_RELEASE.replace("Date:", "X-Date:"))
    with pytest.raises(BuildError, match=r"InRelease has no valid Date: field"):
        release_epoch(mirror, "trixie")
    with pytest.raises(BuildError, match=r"cannot read .*/dists/sid/InRelease"):
        release_epoch(mirror, "sid")


def test_the_root_cache_is_keyed_by_its_epoch() -> None:
    """A root made with one epoch carries it (shadow's last-change days): a build asking for
    another epoch must not reuse it."""
    loaded = policy.load(REPO / "policies/ovpn.yml")
    keys = {make_plan(loaded, source_date_epoch=e).rootfs_key("1.5.7") for e in (None, 1, 2)}
    assert len(keys) == 3


def test_the_early_busybox_leaves_the_root_for_the_early_archive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """busybox's package is purged when the root is made; the copy set aside for the early init
    is moved out of the root before the roles run, so the image never carries it."""
    root = tmp_path / "root"
    stash = root / rootfs.EARLY_STASH
    stash.mkdir(parents=True)
    (stash / "busybox").write_bytes(b"\x7fELF static busybox")
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/zstd").write_bytes(b"zstd")
    monkeypatch.setattr(pack, "_libraries", lambda root, binary: [])  # ldd runs in the chroot
    staged = pack.stage_early_tools(root, tmp_path / "early")
    assert staged["usr/bin/busybox"].read_bytes() == b"\x7fELF static busybox"
    assert not (root / rootfs.EARLY_STASH).exists()
    assert "busybox-static" in rootfs.SET_ASIDE_PACKAGES
    assert "dpkg --purge busybox-static" in rootfs.SET_ASIDE_BUSYBOX


def test_a_root_cached_without_the_set_aside_busybox_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "root/usr/bin").mkdir(parents=True)
    with pytest.raises(BuildError, match="no var/lib/amnesiac-early/busybox") as raised:
        pack.stage_early_tools(tmp_path / "root", tmp_path / "early")
    assert raised.value.hint == "build again with --refresh"
