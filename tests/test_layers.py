"""The configure stage's per-role cache (image.layers): a layer puts back exactly what a role
did, and a key changes with exactly what the role depends on."""

from __future__ import annotations

import os
import stat
import subprocess
import time
from pathlib import Path

import yaml

from amnesiac import policy
from amnesiac.image import layers
from amnesiac.image.plan import make_plan
from tests.images import REPO


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """What the image's packer reads of a tree: kind, mode, owner, content or link, hard links."""
    seen: dict[tuple[int, int], str] = {}
    tree: dict[str, tuple[object, ...]] = {}
    for directory, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            path = Path(directory) / name
            info = path.lstat()
            rel = str(path.relative_to(root))
            if stat.S_ISLNK(info.st_mode):
                body: object = str(path.readlink())
            elif stat.S_ISREG(info.st_mode):
                body = path.read_bytes()
            else:
                body = None
            link = seen.setdefault((info.st_dev, info.st_ino), rel) if info.st_nlink > 1 else None
            tree[rel] = (info.st_mode, info.st_uid, info.st_gid, body, link)
    return tree


def make_tree(root: Path) -> None:
    (root / "etc/ssh").mkdir(parents=True)
    (root / "etc/ssh/sshd_config").write_text("Port 22\n")
    (root / "etc/motd").write_text("hello\n")
    (root / "var/log/apt").mkdir(parents=True)
    (root / "var/log/apt/history.log").write_text("installed\n")
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/tool").write_bytes(b"\x7fELF")
    (root / "usr/bin/tool").chmod(0o755)
    (root / "usr/bin/same").write_bytes(b"twin")
    os.link(root / "usr/bin/same", root / "usr/bin/twin")
    (root / "etc/became-dir").write_text("a file first\n")


def role(root: Path) -> None:
    """What a role does: rewrites by rename and in place, modes, owners, removals, links."""
    new = root / "etc/ssh/.sshd_config.tmp"
    new.write_text("Port 22\nPermitRootLogin prohibit-password\n")
    new.rename(root / "etc/ssh/sshd_config")
    with (root / "etc/motd").open("a") as f:
        f.write("in place\n")
    (root / "usr/bin/tool").chmod(0o700)
    os.chown(root / "etc/motd", 0, 4)
    subprocess.run(["rm", "-r", root / "var/log/apt"], check=True)
    (root / "etc/became-dir").unlink()
    (root / "etc/became-dir").mkdir()
    (root / "etc/became-dir/inside").write_text("x\n")
    (root / "etc/localtime").symlink_to("/usr/share/zoneinfo/UTC")
    os.link(root / "usr/bin/tool", root / "usr/bin/tool-alias")


def test_a_layer_puts_back_exactly_what_the_role_did(tmp_path: Path) -> None:
    original, before = tmp_path / "original", tmp_path / "before"
    make_tree(original)
    subprocess.run(["cp", "-a", original, before], check=True)
    time.sleep(layers.CTIME_MARGIN_NS / 1e9 * 2)  # so the layer holds what the role did, not the tree
    staging = tmp_path / "staging"
    layers.begin(staging, original)
    role(original)
    count = layers.record(staging, original, "the_role")
    # what the role changed (8 paths) and the 3 directories it changed them in, not the tree
    assert count == 11

    cache = tmp_path / "cache"
    layer = layers.RoleLayer("the_role", "k1")
    layers.store(staging, cache, [layer])
    assert layers.cached_prefix(cache, [layer, layers.RoleLayer("next", "k2")]) == 1
    layers.apply(cache, layer, before)
    assert snapshot(before) == snapshot(original)


def test_a_role_that_changes_nothing_leaves_an_empty_layer(tmp_path: Path) -> None:
    root = tmp_path / "root"
    make_tree(root)
    time.sleep(layers.CTIME_MARGIN_NS / 1e9 * 2)  # the tree is older than the role
    staging = tmp_path / "staging"
    layers.begin(staging, root)
    assert layers.record(staging, root, "idle") == 0
    assert (staging / "idle" / layers.REMOVED).read_bytes() == b""


def test_a_key_changes_with_what_its_role_reads_and_every_key_after_it() -> None:
    plan = make_plan(policy.load(REPO / "policies/ovpn.yml"))
    roles = list(plan.roles)
    variables = plan.variables()
    chain = layers.keys("base", roles, variables, "2.19")
    assert len({layer.key for layer in chain}) == len(roles)
    assert layers.keys("base", roles, variables, "2.19") == chain  # deterministic

    # A variable only the firewall's files name: the roles before it keep their layers.
    changed = layers.keys("base", roles, {**variables, "firewall_log_dropped": True}, "2.19")
    at = roles.index("firewall")
    assert changed[:at] == chain[:at]
    assert all(a.key != b.key for a, b in zip(changed[at:], chain[at:], strict=True))

    # A variable no role names changes nothing; another root or Ansible changes everything.
    assert layers.keys("base", roles, {**variables, "unread_variable": 1}, "2.19") == chain
    assert not {c.key for c in layers.keys("other", roles, variables, "2.19")} & {c.key for c in chain}
    assert layers.keys("base", roles, variables, "2.20")[0].key != chain[0].key


CHROOT_GUARD = "ansible_connection not in ['community.general.chroot', 'chroot']"


def test_no_handler_runs_in_an_image_build() -> None:
    """Handlers run at the end of the play, after every role's layer was recorded: a handler that
    changed the image would be in no layer, and a rebuild from the cache would lack it."""
    handlers = sorted((REPO / "roles").glob("*/handlers/*.yml"))
    assert handlers
    for file in handlers:
        for handler in yaml.safe_load(file.read_text()) or []:
            when = handler.get("when", [])
            assert CHROOT_GUARD in ([when] if isinstance(when, str) else when), (
                f"{file.relative_to(REPO)}: handler {handler['name']!r} runs over the chroot connection"
            )
