"""Per-host identities published with `amnesiac flash --identities`: layout, switch, rotation,
signatures, pruning, bad input, over a local root and over ssh://.

What a machine gets is read the way iPXE would: the root's boot.ipxe names the identity set,
`${mac:hexhyp}.cpio` in it is this machine's overlay, and the overlay is the newc archive the
image's early init copies over the root (unpacked here with cpio(1), as the kernel would).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from amnesiac.errors import UsageError
from amnesiac.flash import identities
from amnesiac.flash.command import FlashOptions, command
from amnesiac.flash.model import ROOT_SCRIPT, Refused, parse_root_script
from amnesiac.provider.pki import ProviderPki, node_identity_files
from tests import test_flash
from tests.test_flash import amnesiac, assert_serves, listing, publish

# test_flash's fixtures: signed fake builds with reports, a root with allowed signers, an sshd.
keys, builds, root, sshd = test_flash.keys, test_flash.builds, test_flash.root, test_flash.sshd

MAC_A = "52-54-00-12-34-56"
MAC_B = "52:54:00:AB:CD:EF"  # as ops may write it; published as 52-54-00-ab-cd-ef


def identity_dir(base: Path, hosts: dict[str, str], *, wireguard: bool = True) -> Path:
    """A directory of identities: for each MAC a provider identity issued to `name` (and a
    WireGuard key file naming it)."""
    pki = ProviderPki.create(["10.0.2.101"])
    base.mkdir(parents=True, exist_ok=True)
    for mac, name in hosts.items():
        node = pki.issue_node(name)
        files = node_identity_files("https://10.0.2.101", pki, node)
        for file_name, (data, _mode) in files.items():
            path = base / mac / "etc/amnesiac/provider" / file_name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        if wireguard:
            wg = base / mac / "etc/wireguard/identity/wg0.key"
            wg.parent.mkdir(parents=True)
            wg.write_text(f"{name}-wireguard-key\n")
    return base


def state(root: Path) -> dict[str, object]:
    parsed = parse_root_script((root / ROOT_SCRIPT).read_text(), "test")
    assert parsed is not None
    return parsed.model_dump()


def overlay_for(root: Path, mac: str, tmp: Path) -> dict[str, tuple[bytes, int]]:
    """What a machine with `mac` gets, unpacked: path under / -> (content, mode)."""
    current = state(root)["identities"]
    assert current, "the entry point names no identity set"
    script = (root / ROOT_SCRIPT).read_text()
    assert f"initrd identities/{current}/${{mac:hexhyp}}.cpio || echo amnesiac: no identity" in script
    cpio = root / "identities" / str(current) / f"{identities.host_name(mac)}.cpio"
    out = Path(tempfile.mkdtemp(prefix="unpacked-", dir=tmp))
    subprocess.run(
        ["cpio", "-idm", "--quiet", "--no-absolute-filenames"],
        input=cpio.read_bytes(),
        cwd=out,
        check=True,
    )
    return {
        str(p.relative_to(out / "overlay")): (p.read_bytes(), p.stat().st_mode & 0o7777)
        for p in (out / "overlay").rglob("*")
        if p.is_file()
    }


def test_publish_with_identities_then_rotate_alone(
    builds: list[Path], root: Path, keys: dict[str, Path], tmp_path: Path
) -> None:
    first = identity_dir(tmp_path / "ids1", {MAC_A: "node-a", MAC_B: "node-b"})
    assert command(FlashOptions(identities=first, sign=keys["ops"], json=True)) == 0  # sign only
    assert (first / "identities.json.sig").is_file()
    assert publish(builds[0], root, identities=first) == 0
    assert_serves(root, builds[0])
    set1 = str(state(root)["identities"])
    assert sorted(p.name for p in (root / "identities" / set1).iterdir()) == [
        "52-54-00-12-34-56.cpio", "52-54-00-ab-cd-ef.cpio", "identities.json", "identities.json.sig",
    ]  # fmt: skip
    got = overlay_for(root, MAC_A, tmp_path)
    source = first / MAC_A / "etc/amnesiac/provider"
    assert got["etc/amnesiac/provider/node.key"] == ((source / "node.key").read_bytes(), 0o600)
    assert got["etc/amnesiac/provider/node.crt"] == ((source / "node.crt").read_bytes(), 0o644)
    assert got["etc/wireguard/identity/wg0.key"][0] == b"node-a-wireguard-key\n"
    assert overlay_for(root, "52:54:00:ab:cd:ef", tmp_path)["etc/wireguard/identity/wg0.key"][0] == (
        b"node-b-wireguard-key\n"
    )

    # Rotation: new keys alone, the image stays; one switch, the old set kept as previous.
    second = identity_dir(tmp_path / "ids2", {MAC_A: "node-a2"})
    result = amnesiac(
        "flash", "--identities", str(second), "--sign", str(keys["ops"]), "--to", str(root), "--json"
    )
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout)
    assert outcome["action"] == "identities" and outcome["switched"] and outcome["hosts"] == [MAC_A]
    assert outcome["identities_signature"]["principal"] == "release@example.net"
    now = state(root)
    assert now["action"] == "identities" and now["previous_identities"] == set1
    assert_serves(root, builds[0])
    assert (
        overlay_for(root, MAC_A, tmp_path)["etc/wireguard/identity/wg0.key"][0] == b"node-a2-wireguard-key\n"
    )

    # A new image keeps the identities; a rollback of the image too.
    assert publish(builds[1], root) == 0
    assert state(root)["identities"] == now["identities"]
    assert command(FlashOptions(to=str(root), rollback="", json=True)) == 0
    assert_serves(root, builds[0])
    assert state(root)["identities"] == now["identities"]

    # The set before the previous one is pruned at the next switch: rotated keys do not linger.
    third = identity_dir(tmp_path / "ids3", {MAC_A: "node-a3"})
    assert command(FlashOptions(identities=third, sign=keys["ops"], to=str(root), json=True)) == 0
    assert not (root / "identities" / set1).exists()
    sets = {s["set"]: s for s in listing(root)["identity_sets"]}
    assert len(sets) == 2 and sets[str(state(root)["identities"])]["current"]
    log = [json.loads(line) for line in (root / "flash.log").read_text().splitlines()]
    assert any(entry.get("pruned") == [f"identities/{set1}"] for entry in log)
    text = amnesiac("flash", "--to", str(root), "--list").stdout
    assert f"identities {str(state(root)['identities'])[:12]} (current): 1 host" in text, text


def test_republishing_the_same_identities_switches_nothing(
    builds: list[Path], root: Path, keys: dict[str, Path], tmp_path: Path
) -> None:
    ids = identity_dir(tmp_path / "ids", {MAC_A: "node-a"})
    assert (
        command(FlashOptions(build=builds[0], identities=ids, sign=keys["ops"], to=str(root), json=True)) == 0
    )
    before = (root / ROOT_SCRIPT).read_bytes()
    result = amnesiac("flash", str(builds[0]), "--identities", str(ids), "--to", str(root), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["switched"] is False
    assert (root / ROOT_SCRIPT).read_bytes() == before


def test_unsigned_or_changed_identities_are_refused_where_signers_are_in_force(
    builds: list[Path], root: Path, keys: dict[str, Path], tmp_path: Path
) -> None:
    ids = identity_dir(tmp_path / "ids", {MAC_A: "node-a"})
    with pytest.raises(Refused, match=r"identities.json is not signed"):
        command(FlashOptions(build=builds[0], identities=ids, to=str(root), json=True, force=True))
    assert not (root / ROOT_SCRIPT).exists() and not (root / "identities").exists()
    command(FlashOptions(identities=ids, sign=keys["stranger"], json=True))
    with pytest.raises(Refused, match="a key the allowed-signers file does not list"):
        command(FlashOptions(build=builds[0], identities=ids, to=str(root), json=True))
    command(FlashOptions(identities=ids, sign=keys["ops"], json=True))
    (ids / MAC_A / "etc/amnesiac/provider/url").write_text("https://10.0.2.102\n")
    with pytest.raises(Refused, match="changed after it was signed"):
        command(FlashOptions(build=builds[0], identities=ids, to=str(root), json=True))
    assert not (root / ROOT_SCRIPT).exists()
    # Signed again, as changed: published.
    assert (
        command(FlashOptions(build=builds[0], identities=ids, sign=keys["ops"], to=str(root), json=True)) == 0
    )


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("not-a-mac/etc/amnesiac/provider/url", "not a host directory"),
        (f"{MAC_A}/etc/openvpn/server/server.conf", "not in an identity directory"),
        (f"{MAC_A}/etc/amnesiac/provider/sub/x.key", "not an identity directory"),
        (f"{MAC_A}/etc/shadow", "not in an identity directory"),
    ],
)
def test_an_identity_may_not_change_the_image(tmp_path: Path, path: str, message: str) -> None:
    ids = identity_dir(tmp_path / "ids", {MAC_B: "node-b"})
    bad = ids / path
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_text("x\n")
    with pytest.raises(UsageError, match=message) as caught:
        identities.load(ids)
    assert str(ids) in caught.value.message


def test_bad_identity_directories_are_one_line(builds: list[Path], root: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    twice = identity_dir(tmp_path / "twice", {MAC_A: "a"})
    shutil.copytree(twice / MAC_A, twice / MAC_A.replace("-", ":").upper())
    link = identity_dir(tmp_path / "link", {MAC_A: "a"})
    (link / MAC_A / "etc/wireguard/identity/wg0.key").unlink()
    (link / MAC_A / "etc/wireguard/identity/wg0.key").symlink_to("/etc/hostname")
    for where, message in (
        (tmp_path / "missing", "not a directory"),
        (empty, "no host directories"),
        (twice, "the same MAC address"),
        (link, "a symbolic link"),
    ):
        result = amnesiac("flash", str(builds[0]), "--identities", str(where), "--to", str(root))
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert message in lines[0] and "Traceback" not in result.stderr, result.stderr
    assert not (root / ROOT_SCRIPT).exists()
    result = amnesiac("flash", "--identities", str(twice), "--to", str(root), "--list")
    assert result.returncode == 2 and "--list takes no --identities" in result.stderr


def test_identities_alone_need_a_published_image(root: Path, keys: dict[str, Path], tmp_path: Path) -> None:
    ids = identity_dir(tmp_path / "ids", {MAC_A: "a"})
    command(FlashOptions(identities=ids, sign=keys["ops"], json=True))
    with pytest.raises(UsageError, match="no image published by amnesiac flash there"):
        command(FlashOptions(identities=ids, to=str(root), json=True))
    with pytest.raises(UsageError, match="no image published"):
        command(FlashOptions(identities=ids, to=str(root / "nowhere"), json=True))
    assert not (root / "nowhere").exists()


def test_overlays_are_reproducible(tmp_path: Path) -> None:
    """The same files make the same set: republishing finds it, a signature stays valid."""
    ids = identity_dir(tmp_path / "ids", {MAC_A: "a"})
    assert identities.load(ids).name == identities.load(ids).name
    copy = tmp_path / "copy"
    shutil.copytree(ids, copy)
    for path in copy.rglob("*"):
        path.touch()  # other mtimes
    assert identities.load(copy).index == identities.load(ids).index


def test_ssh_publish_identities(
    builds: list[Path], sshd: Path, root: Path, tmp_path: Path, keys: dict[str, Path]
) -> None:
    """The same over ssh:// to the root (with its allowed signers) on the loopback sshd."""
    url = f"ssh://pxe-test{root}"
    args = ("--ssh-config", str(sshd), "--json")
    first = identity_dir(tmp_path / "ids1", {MAC_A: "a1"})
    result = amnesiac(
        "flash", str(builds[0]), "--identities", str(first), "--sign", str(keys["ops"]), "--to", url, *args
    )
    assert result.returncode == 0, result.stderr
    set1 = str(state(root)["identities"])
    assert overlay_for(root, MAC_A, tmp_path)["etc/wireguard/identity/wg0.key"][0] == b"a1-wireguard-key\n"
    for n in (2, 3):
        ids = identity_dir(tmp_path / f"ids{n}", {MAC_A: f"a{n}"})
        result = amnesiac("flash", "--identities", str(ids), "--sign", str(keys["ops"]), "--to", url, *args)
        assert result.returncode == 0, result.stderr
    found = json.loads(amnesiac("flash", "--to", url, "--list", *args).stdout)
    assert len(found["identity_sets"]) == 2 and set1 not in {s["set"] for s in found["identity_sets"]}
    assert overlay_for(root, MAC_A, tmp_path)["etc/wireguard/identity/wg0.key"][0] == b"a3-wireguard-key\n"
    assert_serves(root, builds[0])
