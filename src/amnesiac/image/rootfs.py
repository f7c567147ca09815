"""Stage 1: the root filesystem, made by mmdebstrap and cached as a tarball by input hash."""

from __future__ import annotations

import email.utils
import json
import os
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from amnesiac.errors import BuildError
from amnesiac.image.plan import VARIANT, BuildPlan
from amnesiac.run import run

RELEASE_TIMEOUT = 60.0  # seconds for the mirror's InRelease file (a bound)
# The early init runs busybox, but in the root its syslogd, klogd, httpd and telnetd applets would
# be a logger or a server one command away. The binary is set aside, outside dpkg's knowledge, for
# the early archive (pack.stage_early_tools takes it out of the root) and the package purged while
# mmdebstrap still has /proc mounted: purged later, through Ansible's chroot connection, it fires
# tiny-initramfs's trigger, which fails without /proc.
EARLY_STASH = "var/lib/amnesiac-early"
SET_ASIDE_PACKAGES = ("busybox-static",)  # in the plan's packages, purged before the roles run
SET_ASIDE_BUSYBOX = (
    f'--customize-hook=mkdir -p "$1"/{EARLY_STASH} && cp -p "$1"/usr/bin/busybox "$1"/{EARLY_STASH}/busybox'
    ' && chroot "$1" dpkg --purge busybox-static'
)


@dataclass(frozen=True)
class CachedRootfs:
    tarball: Path
    key: str
    source_date_epoch: int
    release_date: str  # the Date: of the suite's Release file when the cache was made
    cached: bool  # True when this build reused it

    @property
    def identity(self) -> str:
        """Which root this is: its inputs' key, and what tells a refreshed one from the last."""
        made = self.tarball.stat()
        return f"{self.key}:{self.source_date_epoch}:{self.release_date}:{made.st_size}:{made.st_mtime_ns}"


def mmdebstrap_version() -> str:
    out = run(["mmdebstrap", "--version"], capture=True).stdout.decode().strip()
    return out.split()[-1]


def ensure(plan: BuildPlan, cache: Path, *, refresh: bool = False) -> CachedRootfs:
    """Return the cached rootfs tarball for this plan, making it first if needed.

    The tarball and its metadata appear only complete: both are written under temporary names
    and renamed, metadata last, so an interrupted run leaves the cache as it was.
    """
    key = plan.rootfs_key(mmdebstrap_version())
    tarball = cache / f"rootfs-{plan.suite}-{key}.tar"
    meta_file = tarball.with_suffix(".json")
    if not refresh and tarball.is_file() and meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        return CachedRootfs(tarball, key, meta["source_date_epoch"], meta["release_date"], cached=True)

    cache.mkdir(parents=True, exist_ok=True)
    # Derived from the inputs, never the clock: two builds of the same archive state agree to
    # the byte, /etc/shadow's last-change day included (mmdebstrap and useradd honour it).
    sde = plan.source_date_epoch
    if sde is None:
        sde = release_epoch(plan.mirror, plan.suite)
    tmp_tar = cache / f".{tarball.name}.{os.getpid()}.partial"
    release = cache / f".{tarball.name}.{os.getpid()}.release"
    try:
        run(
            mmdebstrap_argv(
                plan.packages,
                plan.suite,
                plan.mirror,
                tmp_tar,
                # The Release file's date says which state of the archive this root comes from.
                f"--customize-hook=grep -h '^Date:' \"$1\"/var/lib/apt/lists/*Release > {release} || true",
                SET_ASIDE_BUSYBOX,
            ),
            capture=True,
            env={**os.environ, "SOURCE_DATE_EPOCH": str(sde)},
        )
        release_date = (
            release.read_text().splitlines()[0].removeprefix("Date:").strip() if release.exists() else ""
        )
        tmp_tar.rename(tarball)
        meta = {
            "key": key,
            "source_date_epoch": sde,
            "release_date": release_date,
            "packages": list(plan.packages),
        }
        # Named by this process: a build beside this one, of the same key, writes its own.
        tmp_meta = meta_file.with_name(f".{meta_file.name}.{os.getpid()}.partial")
        tmp_meta.write_text(json.dumps(meta, indent=2) + "\n")
        tmp_meta.rename(meta_file)
    finally:
        tmp_tar.unlink(missing_ok=True)
        release.unlink(missing_ok=True)
    return CachedRootfs(tarball, key, sde, release_date, cached=False)


def release_epoch(mirror: str, suite: str) -> int:
    """The Date: of the suite's InRelease file on the mirror, in seconds since the epoch: the
    state of the archive a new root is made from, and the default SOURCE_DATE_EPOCH."""
    url = f"{mirror.rstrip('/')}/dists/{suite}/InRelease"
    try:
        with urllib.request.urlopen(url, timeout=RELEASE_TIMEOUT) as answer:  # noqa: S310 (the policy's mirror)
            head = answer.read(64 * 1024).decode("utf-8", errors="replace")
    except (OSError, urllib.error.URLError) as exc:
        raise BuildError(
            f"cannot read {url}: {exc}",
            hint="check the policy's image.mirror, or pass --source-date-epoch",
        ) from exc
    for line in head.splitlines():
        if line.startswith("Date:"):
            try:
                return int(email.utils.parsedate_to_datetime(line.removeprefix("Date:").strip()).timestamp())
            except (TypeError, ValueError):
                break
    raise BuildError(f"{url} has no valid Date: field", hint="pass --source-date-epoch")


def mmdebstrap_argv(
    packages: Sequence[str], suite: str, mirror: str, tarball: Path, *options: str
) -> list[str | os.PathLike[str]]:
    """mmdebstrap making a root as a tar file: the variant and options every root here shares
    (the image's and the molecule base image's), then the caller's `options`."""
    return [
        "mmdebstrap",
        f"--variant={VARIANT}",
        "--mode=root",
        "--format=tar",
        f"--include={','.join(packages)}",
        '--aptopt=Acquire::Languages "none"',
        *options,
        suite,
        tarball,
        mirror,
    ]


def extract(rootfs: CachedRootfs, dest: Path) -> None:
    """Unpack the cached root into `dest` (owners, modes, capabilities and xattrs preserved)."""
    dest.mkdir(parents=True)
    untar(rootfs.tarball, dest)


def untar(tarball: Path, dest: Path) -> None:
    """Unpack a tarball over `dest`, owners, modes, capabilities and xattrs as recorded (the
    cached root, and the role layers on top of it)."""
    xattrs = ["--xattrs", "--xattrs-include=*"]
    run(["tar", "--numeric-owner", *xattrs, "-C", dest, "-xpf", tarball], capture=True)
