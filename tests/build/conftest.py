"""Real builds, shared by the build-tier tests: one default image, unpacked once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
SDE = 1_700_000_000  # a fixed SOURCE_DATE_EPOCH: the builds below must agree byte for byte


def amnesiac(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "amnesiac.cli", *args], capture_output=True, text=True, check=False, cwd=REPO
    )
    if check and result.returncode != 0:
        pytest.fail(f"amnesiac {' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result


@dataclass(frozen=True)
class Built:
    out: Path
    summary: dict[str, Any]
    manifest: dict[str, Any]
    root: Path  # the root filesystem unpacked from initrd.img
    early: Path  # the outer archive unpacked


def build(out: Path, *extra: str) -> dict[str, Any]:
    result = amnesiac("build", "--json", "--source-date-epoch", str(SDE), "--out", str(out), *extra)
    summary: dict[str, Any] = json.loads(result.stdout)
    return summary


def unpack_initrd(initrd: Path, dest: Path) -> tuple[Path, Path]:
    early, root = dest / "early", dest / "root"
    early.mkdir(parents=True)
    root.mkdir()
    subprocess.run(["cpio", "-idm", "--quiet", "-F", str(initrd)], cwd=early, check=True)
    zstd = subprocess.Popen(["zstd", "-dcq", str(early / "root.cpio.zst")], stdout=subprocess.PIPE)
    subprocess.run(["cpio", "-idm", "--quiet"], stdin=zstd.stdout, cwd=root, check=True)
    assert zstd.wait() == 0
    return early, root


@pytest.fixture(scope="session")
def needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("building an image needs root (mmdebstrap, chroot)")


@pytest.fixture(scope="session")
def ovpn(tmp_path_factory: pytest.TempPathFactory, needs_root: None) -> Built:
    base = tmp_path_factory.mktemp("ovpn")
    out = base / "ovpn"
    summary = build(out, "--policy", "policies/ovpn.yml")
    early, root = unpack_initrd(out / "initrd.img", base / "unpacked")
    manifest = json.loads((out / "manifest.json").read_text())
    return Built(out, summary, manifest, root, early)
