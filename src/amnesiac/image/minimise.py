"""Stage 3: strip what a RAM-only server does not need, and every per-build random id.

Runs on the configured root directory. Kernel modules are reduced to the allowlist in
image/modules.allow plus what roles ask for in /etc/amnesiac/modules.d/, with dependencies;
AppArmor profiles to those of programs the image has (image/apparmor.py).
"""

from __future__ import annotations

import fnmatch
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from amnesiac import paths
from amnesiac.errors import BuildError
from amnesiac.image import apparmor
from amnesiac.image.plan import read_list
from amnesiac.run import run

# Removed outright (globs relative to the root). Copyright files stay: the image ships them.
REMOVE = [
    "usr/share/man",
    "usr/share/info",
    "usr/share/lintian",
    "usr/share/bug",
    "usr/share/locale/*",
    "usr/share/i18n/charmaps",
    "var/lib/apt/lists/*",
    "var/cache/apt/*",
    "var/cache/debconf/*-old",
    "var/cache/ldconfig/aux-cache",
    "var/lib/dpkg/*-old",
    "var/lib/systemd/random-seed",
    "var/lib/dbus/machine-id",
    "etc/ssh/ssh_host_*",
    "root/.ansible",
    "root/.cache",
    "tmp/*",
    "var/tmp/*",
    "boot/*",
    "usr/lib/firmware",
    # udev's hardware database names vendors and models for desktops; a server boots without it.
    "usr/lib/udev/hwdb.d",
    "usr/lib/udev/hwdb.bin",
    "etc/udev/hwdb.bin",
    # glibc's converters for legacy character sets; UTF-8 is built in.
    "usr/lib/x86_64-linux-gnu/gconv",
    "etc/initrd-release",  # systemd would try to switch root and end in emergency mode
]


@dataclass(frozen=True)
class MinimiseResult:
    kernel_release: str
    vmlinuz: Path
    modules_kept: int
    modules_removed: int
    profiles_removed: list[str]  # AppArmor profiles of programs the image does not have


def kernel_release(root: Path) -> str:
    releases = sorted(p.name for p in (root / "usr/lib/modules").iterdir() if p.is_dir())
    if len(releases) != 1:
        raise BuildError(f"expected one kernel in the image, found {releases or 'none'}")
    return releases[0]


def minimise(root: Path, vmlinuz_out: Path, wanted: Iterable[str] = ()) -> MinimiseResult:
    release = kernel_release(root)
    kernel = root / "boot" / f"vmlinuz-{release}"
    if not kernel.is_file():
        raise BuildError(f"no kernel at {kernel}")
    shutil.copy2(kernel, vmlinuz_out)

    _purge_build_only(root, wanted)
    _remove_orphaned_python(root)
    _remove_docs(root)
    for pattern in REMOVE:
        for path in root.glob(pattern):
            _remove(path)
    _empty_logs(root)
    profiles = apparmor.prune(root)
    (root / "etc/machine-id").write_text("")  # systemd makes a fresh one at every boot
    kept, removed = prune_modules(root, release)
    return MinimiseResult(release, vmlinuz_out, kept, removed, profiles)


def _purge_build_only(root: Path, wanted: Iterable[str]) -> None:
    """Purge image/build-only.txt (Python, apt) and everything the plan did not ask for.

    mmdebstrap marks its whole base set as installed by hand, so autoremove alone would keep
    apt's own dependencies (libapt-pkg, sqv, keyrings) for ever. Everything is marked automatic
    except the packages the plan asks for; autoremove then leaves those, what they depend on,
    and the Essential set.
    """
    packages = read_list(paths.image_dir() / "build-only.txt")
    keep = sorted(set(wanted) - set(packages))
    env = {"PATH": "/usr/sbin:/usr/bin", "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"}
    manual = run(["chroot", root, "apt-mark", "showmanual"], capture=True, env=env).stdout.decode().split()
    if manual:
        run(["chroot", root, "apt-mark", "auto", *manual], capture=True, env=env)
    if keep:
        run(["chroot", root, "apt-mark", "manual", *keep], capture=True, env=env)
    # apt counts itself as essential; exit codes are unreliable without /dev/pts: check dpkg.
    run(
        [
            "chroot",
            root,
            "apt-get",
            "purge",
            "-y",
            "-q",
            "--autoremove",
            "--allow-remove-essential",
            *packages,
        ],
        capture=True,
        check=False,
        env=env,
    )
    left = run(
        [
            "dpkg-query",
            f"--admindir={root / 'var/lib/dpkg'}",
            "-W",
            "-f",
            "${Package} ${db:Status-Status}\n",
            *packages,
        ],
        capture=True,
        check=False,
    ).stdout.decode()
    installed = [line.split()[0] for line in left.splitlines() if line.endswith(" installed")]
    if installed:
        raise BuildError(f"could not purge build-only packages from the image: {', '.join(installed)}")


def _remove_orphaned_python(root: Path) -> None:
    """Python's standard library, once no interpreter is left to run it.

    Debian's unbound links libpython for its optional Python module (off here), so the shared
    library stays; the 20 MB of modules only an interpreter would import go.
    """
    if any((root / "usr/bin").glob("python3*")):
        return
    for stdlib in (root / "usr/lib").glob("python3*"):
        _remove(stdlib)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _remove_docs(root: Path) -> None:
    doc = root / "usr/share/doc"
    if not doc.is_dir():
        return
    for path in sorted(doc.rglob("*"), reverse=True):
        if path.name == "copyright" or (path.is_symlink() and path.parent == doc):
            continue
        if path.is_dir() and not path.is_symlink():
            if not any(path.iterdir()):
                path.rmdir()
        else:
            path.unlink()


def _empty_logs(root: Path) -> None:
    """Nothing from the build (dpkg.log, apt history) leaves in the image's /var/log."""
    log = root / "var/log"
    if not log.is_dir():
        return
    for path in sorted(log.iterdir()):  # files and the directories packages made (apt/, private/)
        _remove(path)


def _module_name(path: str) -> str:
    return Path(path).name.split(".ko")[0].replace("-", "_")


def _wanted(root: Path) -> tuple[list[str], list[str]]:
    patterns = read_list(paths.image_dir() / "modules.allow")
    extra = root / "etc/amnesiac/modules.d"
    if extra.is_dir():
        for conf in sorted(extra.glob("*.conf")):
            patterns += read_list(conf)
    keep = [p.replace("-", "_") for p in patterns if not p.startswith("!")]
    deny = [p[1:].replace("-", "_") for p in patterns if p.startswith("!")]
    return keep, deny


def prune_modules(root: Path, release: str) -> tuple[int, int]:
    moddir = root / "usr/lib/modules" / release
    deps: dict[str, list[str]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        module, _, rest = line.partition(":")
        deps[module] = rest.split()
    by_name = {_module_name(m): m for m in deps}
    keep_patterns, deny_patterns = _wanted(root)

    def denied(name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in deny_patterns)

    todo = [
        m
        for n, m in by_name.items()
        if not denied(n) and any(fnmatch.fnmatchcase(n, p) for p in keep_patterns)
    ]
    keep: set[str] = set()
    while todo:
        module = todo.pop()
        if module not in keep:
            keep.add(module)
            todo.extend(deps.get(module, []))
    removed = 0
    for module in deps:
        if module not in keep:
            (moddir / module).unlink()
            removed += 1
    for directory in sorted((moddir / "kernel").rglob("*"), reverse=True):
        if directory.is_dir() and not any(directory.iterdir()):
            directory.rmdir()
    run(["chroot", root, "depmod", "-a", release], capture=True)
    return len(keep), removed
