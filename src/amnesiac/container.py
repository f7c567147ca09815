"""The base image of the molecule containers, and the environment molecule runs in.

Role developers iterate in systemd containers (molecule/, podman driver) rather than by
building and booting an image. Every instance starts from one base image made here without a
registry: mmdebstrap makes a root of the image's Debian suite, from the image's mirror, with the
image's variant, and `podman import` turns it into `localhost/amnesiac-base:<suite>-<key>`, the
key being a hash of every input. When that tag exists nothing is done; the tarball is kept as
well, so that an emptied podman store is refilled without the network.

The root holds every package the roles install (each role's `<role>_packages`), as the image
build does, so that a role's package task changes nothing in a container either and a converge
needs no network. It has no kernel (a container runs the host's) and no SSH host keys (the build
removes them; ssh_admin's unit makes them at boot).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shlex
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from amnesiac import paths, policy
from amnesiac.errors import UsageError
from amnesiac.image.plan import VARIANT, read_list
from amnesiac.image.rootfs import mmdebstrap_argv, mmdebstrap_version
from amnesiac.roles import catalog
from amnesiac.run import require_root, require_tools, run

REPOSITORY = "localhost/amnesiac-base"
# Bump when the commands below change what the image holds without changing another input.
RECIPE = 1
# A container runs the host's kernel: no kernel, and no initramfs generator for one.
KERNEL_PACKAGES = frozenset({"linux-image-amd64", "tiny-initramfs"})
# Nothing reads these in a container, and the checks that search every file for a canary would.
PATH_EXCLUDES = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/info/*", "/usr/share/locale/*")
# Podman settings for hosts where podman's defaults cannot start a container (see needs()).
CONTAINERS_CONF = "containers.conf"
# Every molecule instance is named amnesiac-molecule-<scenario> (molecule/config.yml).
INSTANCE_PREFIX = "amnesiac-molecule-"


@dataclass(frozen=True)
class BaseImageSpec:
    """Everything that decides what the base image holds."""

    suite: str
    mirror: str
    packages: tuple[str, ...]

    def key(self, mmdebstrap: str) -> str:
        inputs = {
            "recipe": RECIPE,
            "suite": self.suite,
            "mirror": self.mirror,
            "variant": VARIANT,
            "packages": sorted(self.packages),
            "excludes": list(PATH_EXCLUDES),
            "mmdebstrap": mmdebstrap,
        }
        return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class BaseImage:
    tag: str
    key: str
    tarball: Path
    built: bool  # mmdebstrap ran (not only the cached tarball)
    imported: bool  # podman import ran (the tag did not exist)
    seconds: float


def spec(policy_file: Path | None = None, *, suite: str | None = None) -> BaseImageSpec:
    """The suite and mirror of the policy's image (default policy), and every role's packages."""
    settings = policy.load(policy_file or paths.default_policy()).image
    packages = set(read_list(paths.image_dir() / "packages.txt")) - KERNEL_PACKAGES
    for role in catalog().values():
        packages.update(role.packages)
    return BaseImageSpec(
        suite=suite or settings.suite, mirror=settings.mirror, packages=tuple(sorted(packages))
    )


def checkout() -> Path:
    """The source checkout the molecule scenarios live in (they are not part of the package)."""
    root = paths.data_root()
    if not (root / "molecule").is_dir():
        raise UsageError(f"no molecule/ directory in {root}", hint="molecule runs from a source checkout")
    return root


def state_dir() -> Path:
    """Everything molecule keeps, under the checkout's build directory."""
    return checkout() / "build" / "molecule"


def podman_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment podman runs with: the project's containers.conf where needs() says so."""
    env = dict(os.environ if base is None else base)
    if "CONTAINERS_CONF" not in env and needs():
        env["CONTAINERS_CONF"] = os.fspath(checkout() / "molecule" / CONTAINERS_CONF)
    return env


@cache
def needs() -> tuple[str, ...]:
    """Why podman's defaults cannot start a container on this host (empty on a normal machine).

    crun refuses a cgroup hierarchy in hybrid mode (v1 controllers plus a v2 mount), where runc
    works; and podman raises a container's open-file and process limits to 1048576, which fails
    where even root may not raise its hard limits. molecule/containers.conf selects runc and
    lower limits; on other hosts podman keeps its defaults.
    """
    reasons = []
    if not Path("/sys/fs/cgroup/cgroup.controllers").exists():
        reasons.append("cgroup v1 or hybrid hierarchy: crun refuses it, runc runs")
    probe = "import resource as r; r.setrlimit(r.RLIMIT_NOFILE, (1048576, 1048576))"
    raised = run([sys.executable, "-c", probe], check=False, capture=True)
    if raised.returncode != 0:
        reasons.append("resource limits cannot be raised: containers get lower ones")
    return tuple(reasons)


def tag_exists(tag: str) -> bool:
    return (
        run(["podman", "image", "exists", tag], check=False, capture=True, env=podman_env()).returncode == 0
    )


def ensure(base: BaseImageSpec, cache_dir: Path, *, refresh: bool = False) -> BaseImage:
    """Return the base image for `base`, building and importing only what is missing.

    The tarball is kept in `cache_dir`, so that a missing tag is imported again without mmdebstrap.
    """
    start = time.monotonic()
    require_tools("podman")
    key = base.key(_mmdebstrap_version())
    tag = f"{REPOSITORY}:{base.suite}-{key}"
    tarball = cache_dir / f"base-{base.suite}-{key}.tar"
    if not refresh and tag_exists(tag):
        return BaseImage(tag, key, tarball, built=False, imported=False, seconds=time.monotonic() - start)
    cache_dir.mkdir(parents=True, exist_ok=True)
    # One builder at a time (parallel test workers ask at once); the others then find the tag.
    with (cache_dir / ".base-image.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not refresh and tag_exists(tag):
            return BaseImage(tag, key, tarball, built=False, imported=False, seconds=time.monotonic() - start)
        built = False
        if refresh or not tarball.is_file():
            _mmdebstrap(base, tarball)
            built = True
        run(
            [
                "podman", "import", "--quiet",
                "--change", 'CMD ["/sbin/init"]',
                "--change", "STOPSIGNAL=SIGRTMIN+3",
                "--change", f"LABEL org.amnesiac.base.key={key}",
                "--message", f"amnesiac molecule base: {base.suite}, {len(base.packages)} packages",
                tarball, tag,
            ],
            capture=True,
            env=podman_env(),
        )  # fmt: skip
    return BaseImage(tag, key, tarball, built=built, imported=True, seconds=time.monotonic() - start)


def _mmdebstrap_version() -> str:
    require_tools("mmdebstrap")
    return mmdebstrap_version()


def _mmdebstrap(base: BaseImageSpec, tarball: Path) -> None:
    """The root as a tarball, written under a temporary name and renamed when complete."""
    require_root("the molecule base image")
    tarball.parent.mkdir(parents=True, exist_ok=True)
    partial = tarball.with_name(f".{tarball.name}.{os.getpid()}.partial")
    try:
        run(
            mmdebstrap_argv(
                base.packages,
                base.suite,
                base.mirror,
                partial,
                *(f"--dpkgopt=path-exclude={p}" for p in PATH_EXCLUDES),
                # As in the image: no host key is baked in (ssh_admin makes them at boot).
                '--customize-hook=rm -f "$1"/etc/ssh/ssh_host_*',
            ),
            capture=True,
        )
        partial.rename(tarball)
    finally:
        partial.unlink(missing_ok=True)


def molecule_env(image: BaseImage, scenario: str | None = None, *, suffix: str = "") -> dict[str, str]:
    """What molecule needs on top of the caller's environment.

    The base image's tag; the venv's tools on PATH; Ansible's home (molecule's cache, Ansible's
    local temporary files) and, for one scenario, molecule's state under build/molecule rather
    than in the home directory; the podman settings this host needs (see needs()). A `suffix`
    names a second, separate run of the scenario: its own instance, state and results.
    """
    state = state_dir()
    env = {
        "AMNESIAC_BASE_IMAGE": image.tag,
        "ANSIBLE_HOME": os.fspath(state / "ansible"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    if scenario is not None:
        env["MOLECULE_EPHEMERAL_DIRECTORY"] = os.fspath(state / "state" / f"{scenario}{suffix}")
    if suffix:
        env["AMNESIAC_MOLECULE_SUFFIX"] = suffix
    conf = podman_env({}).get("CONTAINERS_CONF") if "CONTAINERS_CONF" not in os.environ else None
    if conf:
        env["CONTAINERS_CONF"] = conf
    return env


def shell_exports(env: Mapping[str, str]) -> str:
    return "".join(f"export {name}={shlex.quote(value)}\n" for name, value in sorted(env.items()))


def molecule_shell(image: BaseImage) -> str:
    """molecule_env() as shell exports, saying why when the podman settings are selected."""
    env = molecule_env(image)
    why = [f"# {CONTAINERS_CONF}: {reason}\n" for reason in needs()] if "CONTAINERS_CONF" in env else []
    return "".join(why) + shell_exports(env)
