"""The configure stage's cache: what each role did to the root, as a layer keyed by its inputs.

A layer is the difference one role made: a tar of every path whose inode changed or appeared
while the role ran (its ctime is newer than the role's start: a write, chmod, chown, rename or
link all set it, and nothing can set it back) and the list of paths the role removed. Its key
hashes everything the role's result depends on: the key of the tree before it (the cached root
filesystem, then the layers before), the role's files, the value of every variable its files
name (its own and another role's, default or set), the playbook and Ansible's version. A change
to one role's variable changes that role's key and every key after it, so a build applies the
cached layers before the first changed role and runs Ansible for the rest. Container image layers
and mkosi's incremental mode are the model; the tree is the same with or without hits, so the
image's sha256 is too (tests/image/test_image.py builds both ways and compares).

The playbook records a layer after each role through the `amnesiac_layer` action
(playbooks/action_plugins), which calls `record` in Ansible's controller process: no extra
process per role, and nothing at all when the playbook runs without a staging directory
(molecule's converge).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amnesiac import paths
from amnesiac.image.rootfs import untar
from amnesiac.run import run

FORMAT = 1
TAR = "layer.tar"
REMOVED = "removed"  # paths, each ending in a NUL byte
STATE = "state.json"  # in the staging directory: the tree as the last layer left it
# The kernel stamps ctimes from a coarse clock, up to a tick (4 ms at 250 Hz) behind the clock
# read before a role: a layer also takes what changed this long before its role began (harmless:
# the same bytes again), so that nothing changed during the role can be missed.
CTIME_MARGIN_NS = 100_000_000
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class RoleLayer:
    role: str
    key: str


def keys(
    base: str, roles: Sequence[str], variables: Mapping[str, Any], ansible_version: str
) -> list[RoleLayer]:
    """The key of each role's layer, in order: each one covers the tree before it.

    `variables` are every variable a role may read, with the value the build gives it (set or
    default); a role depends on those whose names appear in its files.
    """
    shared = _digest_files(_playbook_support())
    layers, previous = [], base
    for role in roles:
        role_dir = paths.roles_dir() / role
        files = sorted(p for p in role_dir.rglob("*") if p.is_file() and p.name != "README.md")
        words = set()
        for file in files:
            words.update(_WORD.findall(file.read_text(errors="replace")))
        used = {name: variables[name] for name in sorted(words & variables.keys())}
        inputs = {
            "format": FORMAT,
            "before": previous,
            "role": role,
            "files": _digest_files(files, relative_to=role_dir),
            "variables": used,
            "playbook": shared,
            "ansible": ansible_version,
        }
        previous = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:24]
        layers.append(RoleLayer(role, previous))
    return layers


def _playbook_support() -> list[Path]:
    """What every role's run depends on besides the role: the playbook, Ansible's settings,
    the layer recorder."""
    playbooks = paths.playbooks_dir()
    return [
        paths.data_root() / "ansible.cfg",
        playbooks / "image.yml",
        playbooks / "tasks" / "apply_role.yml",
        *sorted((playbooks / "action_plugins").glob("*.py")),
        Path(__file__),
    ]


def _digest_files(files: Sequence[Path], *, relative_to: Path | None = None) -> str:
    digest = hashlib.sha256()
    for file in files:
        name = file.relative_to(relative_to) if relative_to else file.name
        digest.update(f"{name}\0{os.access(file, os.X_OK)}\0".encode())
        digest.update(file.read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()


def cached_prefix(cache: Path, layers: Sequence[RoleLayer]) -> int:
    """How many layers from the first are in the cache."""
    count = 0
    for layer in layers:
        if not (cache / layer.key / TAR).is_file():
            break
        count += 1
    return count


def apply(cache: Path, layer: RoleLayer, root: Path) -> None:
    """Put a cached layer onto `root`: its removals, then its paths as they were."""
    directory = cache / layer.key
    for name in (directory / REMOVED).read_bytes().split(b"\0")[:-1]:
        _remove(root / os.fsdecode(name))
    untar(directory / TAR, root)
    os.utime(directory)  # last used: what a pruning of old layers would read


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


# The staging directory, during one playbook run: one subdirectory per recorded layer, named by
# its role, and STATE, the tree after the last one.


def begin(staging: Path, root: Path) -> None:
    """Note the tree before the first role this run applies."""
    staging.mkdir(parents=True, exist_ok=True)
    _write_state(staging, root, time.time_ns())


def record(staging: Path, root: Path, role: str) -> int:
    """Record what happened to `root` since the last state as the layer of `role`; return its
    path count. Called after each role, with Ansible waiting."""
    now = time.time_ns()
    state = json.loads((staging / STATE).read_text())
    since = state["since"] - CTIME_MARGIN_NS
    removed: list[str] = []
    before: dict[str, str] = state["tree"]
    after: dict[str, str] = {}
    changed = []
    for rel, kind, ctime in _walk(root):
        after[rel] = kind
        if before.get(rel) not in (None, kind):
            removed.append(rel)  # a file became a directory, or the other way: replace it
        if ctime >= since and rel != ".":
            changed.append(rel)
    removed += [p for p in before if p not in after]
    layer = staging / role
    layer.mkdir()
    (layer / REMOVED).write_bytes(b"".join(os.fsencode(p) + b"\0" for p in sorted(set(removed))))
    listing = layer / "paths"
    listing.write_bytes(b"".join(os.fsencode(f"./{p}") + b"\0" for p in sorted(changed)))
    partial = layer / f"{TAR}.partial"  # the layer is complete once its TAR is there
    run(
        [
            "tar", "--create", "--format=posix", "--numeric-owner", "--xattrs", "--xattrs-include=*",
            "-f", partial, "-C", root, "--no-recursion", "--null", "--files-from", listing,
        ],
        capture=True,
    )  # fmt: skip
    listing.unlink()
    partial.rename(layer / TAR)
    _write_state(staging, root, now, tree=after)
    return len(changed)


def store(staging: Path, cache: Path, layers: Sequence[RoleLayer]) -> None:
    """Move the layers this run recorded completely into the cache (also when a later role
    failed: they are the right trees for their keys)."""
    cache.mkdir(parents=True, exist_ok=True)
    for layer in layers:
        source = staging / layer.role
        if not (source / TAR).is_file() or (cache / layer.key).exists():
            continue
        partial = cache / f".{layer.key}.{os.getpid()}.partial"
        try:
            shutil.move(source, partial)  # a copy when the cache is on another file system
            partial.rename(cache / layer.key)
        except OSError:
            if not (cache / layer.key).is_dir():
                raise
            shutil.rmtree(partial)  # a build beside this one stored the same layer first
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise


def _write_state(staging: Path, root: Path, since: int, tree: Mapping[str, str] | None = None) -> None:
    if tree is None:
        tree = {rel: kind for rel, kind, _ in _walk(root)}
    data = {"since": since, "tree": dict(tree)}
    (staging / STATE).write_text(json.dumps(data))


def _walk(root: Path) -> Iterator[tuple[str, str, int]]:
    """Every path under `root` (relative), its kind (d, l or f: anything else) and its ctime."""
    yield ".", "d", root.lstat().st_ctime_ns
    pending = [("", os.fspath(root))]
    while pending:
        prefix, directory = pending.pop()
        with os.scandir(directory) as entries:
            for entry in entries:
                rel = prefix + entry.name
                info = entry.stat(follow_symlinks=False)
                if stat.S_ISDIR(info.st_mode):
                    pending.append((rel + "/", entry.path))
                    kind = "d"
                else:
                    kind = "l" if stat.S_ISLNK(info.st_mode) else "f"
                yield rel, kind, info.st_ctime_ns
