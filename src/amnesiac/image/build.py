"""`amnesiac build`: a RAM-boot image from a plan: rootfs → configure → minimise → pack → uki → manifest.

The build happens in hidden directories beside `--out` and is renamed into place at the end,
so `--out` holds either the previous complete image or the new one, never a partial one. No
step mounts anything in this process (mmdebstrap unmounts its own), so an interrupted build
leaves nothing mounted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from amnesiac.errors import UsageError
from amnesiac.image import configure, manifest, measure, minimise, pack, rootfs, secure_boot, uki
from amnesiac.image.plan import BuildPlan
from amnesiac.image.secure_boot import SigningKey
from amnesiac.progress import Progress
from amnesiac.run import require_root, require_tools

HOST_TOOLS = ("mmdebstrap", "tar", "zstd", "chroot", "dpkg-query")
# The directories a build makes beside --out: .<out>.<kind>-<pid> (swept once their pid is gone).
WORK_KINDS = ("work", "new", "old")


@dataclass(frozen=True)
class BuildResult:
    out: Path
    manifest: manifest.Manifest
    rootfs_cached: bool
    roles_cached: tuple[str, ...]  # roles whose configure layers came from the cache


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep_stale(out: Path) -> None:
    """Remove work directories that a killed build (SIGKILL, power loss) left behind."""
    for stale in out.parent.glob(f".{out.name}.*-*"):
        kind, _, pid = stale.name.removeprefix(f".{out.name}.").rpartition("-")
        if kind in WORK_KINDS and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def check_destination(out: Path, cache: Path) -> None:
    """Refuse, before anything is made, an --out this build may not replace, and a bad --cache.

    --out is replaced at the end of a build: it must be new, or an amnesiac build (its
    manifest.json reads as one); anything else is someone's, and is never touched.
    """
    if str(out) in {"", "."} or out.resolve() == Path.cwd():
        raise UsageError(f"--out {str(out)!r}: the current directory is not a build to replace")
    for parent in [out.parent, *out.parent.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"--out {out}: {parent} is not a directory")
            break
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise UsageError(f"--out {out}: exists and is not a directory; refusing to replace it")
    if out.is_dir() and any(out.iterdir()):  # an empty directory holds nothing to lose
        if not (out / manifest.NAME).is_file():
            raise UsageError(
                f"--out {out}: exists and is not an amnesiac build (no {manifest.NAME}); "
                "refusing to replace it",
                hint="name a new directory, or a previous build",
            )
        manifest.Manifest.load(out)  # a manifest.json of someone else's is refused by its shape
    if cache.exists() and not cache.is_dir():
        raise UsageError(f"--cache {cache}: not a directory")


def build(
    plan: BuildPlan,
    out: Path,
    cache: Path,
    progress: Progress,
    *,
    refresh: bool = False,
    profile: pack.Profile = pack.Profile.RELEASE,
    signing: SigningKey | None = None,
) -> BuildResult:
    check_destination(out, cache)
    require_root("amnesiac build")
    require_tools(*HOST_TOOLS)
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale(out)
    pid = os.getpid()
    work = out.parent / f".{out.name}.work-{pid}"
    staging = out.parent / f".{out.name}.new-{pid}"
    log = out.parent / f"{out.name}.ansible.log"
    try:
        work.mkdir()
        staging.mkdir()
        root = work / "root"
        with progress.stage("rootfs", f"Root filesystem (Debian {plan.suite}, mmdebstrap)") as stage:
            cached = rootfs.ensure(plan, cache, refresh=refresh)
            stage.note = f"cached {cached.key}" if cached.cached else f"new {cached.key}"
            progress.detail("unpacking")
            rootfs.extract(cached, root)
            early_tools = pack.stage_early_tools(root, work / "early-tools")
        sde = plan.source_date_epoch if plan.source_date_epoch is not None else cached.source_date_epoch

        with progress.stage(
            "configure", f"Configure: {len(plan.roles)} roles over the chroot connection"
        ) as stage:
            configured = configure.configure(plan, cached, root, work, cache, progress=progress, log=log)
            stage.note = configured.note

        with progress.stage("minimise", "Minimise: docs, caches, kernel modules, AppArmor profiles") as stage:
            wanted = [p for p in plan.packages if p not in rootfs.SET_ASIDE_PACKAGES]
            mini = minimise.minimise(root, staging / "vmlinuz", wanted=wanted)
            stage.note = (
                f"{mini.modules_kept} modules kept, {mini.modules_removed} removed; "
                f"{len(mini.profiles_removed)} profiles of absent programs removed"
            )

        with progress.stage("pack", f"Pack: initrd.img (zstd -{profile.zstd_level}), boot.ipxe") as stage:
            packed = pack.pack(
                root,
                staging,
                work,
                early_tools=early_tools,
                clamp=sde,
                policy_id=plan.policy.id,
                policy_sha256=plan.policy.sha256,
                kernel_release=mini.kernel_release,
                profile=profile,
            )
            stage.note = f"{packed.root_unpacked_bytes // 1024**2} MiB unpacked"

        with progress.stage("uki", "Unified kernel image (ukify), PCR 11 predicted") as stage:
            tools = uki.tools_root(plan.suite, plan.mirror, cache, refresh=refresh)
            made = uki.make(
                tools,
                linux=staging / "vmlinuz",
                initrds=[staging / "initrd.img"],
                cmdline=packed.cmdline,
                os_release=(root / "usr/lib/os-release").read_bytes(),
                uname=mini.kernel_release,
                out=staging / uki.NAME,
                source_date_epoch=sde,
            )
            stage.note = f"PCR 11 {made.pcr11[:16]}, {made.size // 1024**2} MiB"
            if signing is not None:  # Authenticode: PCR 11 is the same, the firmware checks it
                secure_boot.sign(made.path, signing)
                stage.note += f", signed by {signing.fingerprint[:16]}"

        with progress.stage("manifest", "Manifest") as stage:
            data = manifest.write(
                staging,
                plan=plan,
                root=root,
                kernel_release=mini.kernel_release,
                cmdline=packed.cmdline,
                source_date_epoch=sde,
                release_date=cached.release_date,
                root_unpacked_bytes=packed.root_unpacked_bytes,
                root_entries=packed.root_entries,
                tmpfs_size_bytes=packed.tmpfs_size_bytes,
                initrd_pieces=[dataclasses.asdict(p) for p in packed.pieces],
                profile=profile.value,
                measured_boot={
                    "file": uki.NAME,
                    "pcr11_sha256": made.pcr11,
                    "pcr12_sha256": measure.ZEROS,
                    "phases": list(measure.PHASES),
                    "sections": made.sections,
                    "stub": tools.versions.get(uki.STUB_PACKAGE, "unknown"),
                    "signed_by": signing.fingerprint if signing else None,
                },
                tools={f"uki:{name}": version for name, version in sorted(tools.versions.items())},
            )
            stage.note = data.sha256[:16]
        _replace(staging, out)
        return BuildResult(out, data, cached.cached, configured.roles_cached)
    finally:
        _remove_tree(work)
        _remove_tree(staging)


def _remove_tree(path: Path, attempts: int = 20) -> None:
    """Remove a work directory, also when an interrupted Ansible's children are still writing
    into it for a moment (a single rmtree then leaves the files they added)."""
    for _ in range(attempts):
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            return
        time.sleep(0.25)
    shutil.rmtree(path)  # still there: let the error say why


def _replace(staging: Path, out: Path) -> None:
    """Put the new build at `out`: two renames, the old build removed only after the swap."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    try:
        staging.rename(out)
    except BaseException:
        with contextlib.suppress(OSError):
            old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)
