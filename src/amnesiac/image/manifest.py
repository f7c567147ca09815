"""manifest.json: what the image is, where it came from, and the hashes that identify it."""

from __future__ import annotations

import json
import platform
import subprocess
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from amnesiac import __version__
from amnesiac.image.hashing import sha256_file
from amnesiac.image.plan import BuildPlan
from amnesiac.run import run

ARTIFACTS = ("vmlinuz", "initrd.img", "boot.ipxe")
FORMAT = 1


def installed_packages(root: Path) -> list[dict[str, str]]:
    out = run(
        [
            "dpkg-query",
            f"--admindir={root / 'var/lib/dpkg'}",
            "-W",
            "-f",
            "${Package}\t${Version}\t${Architecture}\n",
        ],
        capture=True,
    )
    rows = [line.split("\t") for line in out.stdout.decode().splitlines() if line]
    return [{"name": n, "version": v, "architecture": a} for n, v, a in sorted(rows)]


def _version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=False).stdout.strip()
    except FileNotFoundError:
        return "missing"
    return out.splitlines()[0] if out else "unknown"


def tool_versions() -> dict[str, str]:
    def dist(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "missing"

    return {
        "amnesiac": __version__,
        "python": platform.python_version(),
        "ansible-core": dist("ansible-core"),
        "ansible": dist("ansible"),
        "ansible-runner": dist("ansible-runner"),
        "mmdebstrap": _version(["mmdebstrap", "--version"]).split()[-1],
        "zstd": _version(["zstd", "--version"]),
    }


def write(
    out: Path,
    *,
    plan: BuildPlan,
    root: Path,
    kernel_release: str,
    cmdline: str,
    source_date_epoch: int,
    release_date: str,
    root_unpacked_bytes: int,
    root_entries: int,
    tmpfs_size_bytes: int,
    initrd_pieces: list[dict[str, Any]],
) -> dict[str, Any]:
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "image": {
            # The image's identity: the sha256 of the initrd that holds the whole root filesystem.
            "sha256": sha256_file(out / "initrd.img"),
            "kernel_release": kernel_release,
            "cmdline": cmdline,
            "root_tmpfs_size_bytes": tmpfs_size_bytes,
            "root_unpacked_bytes": root_unpacked_bytes,
            "root_entries": root_entries,
            # Where the early init and the root archive lie in initrd.img (pack.unpack_initrd).
            "initrd_pieces": initrd_pieces,
        },
        "artifacts": {
            name: {"sha256": sha256_file(out / name), "size": (out / name).stat().st_size}
            for name in ARTIFACTS
        },
        "policy": {
            "id": plan.policy.id,
            "file": plan.policy.path.name,
            "sha256": plan.policy.sha256,
            "claims": [c.id for c in plan.policy.technical_claims()],
        },
        "debian": {
            "suite": plan.suite,
            "mirror": plan.mirror,
            "release_date": release_date,
        },
        "roles": [{"name": name, "vars": values} for name, values in plan.effective_vars().items()],
        "packages": installed_packages(root),
        "source_date_epoch": source_date_epoch,
        "built": datetime.fromtimestamp(source_date_epoch, UTC).isoformat(),
        "tools": tool_versions(),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return manifest


def read(build_dir: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((build_dir / "manifest.json").read_text())
    return data
