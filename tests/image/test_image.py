"""The default (OVPN) image, built for real: artifacts, manifest, and what the root holds."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from amnesiac import paths
from amnesiac.image import measure, uki
from amnesiac.provider.harness import GUEST_RELEASE
from tests.images import (
    BUILD_LANE,
    REPO,
    SDE,
    Built,
    ReleaseImage,
    amnesiac,
    build,
    build_and_unpack,
    rootfs_only_cache,
)

pytestmark = [pytest.mark.build, BUILD_LANE]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_artifacts_match_manifest(ovpn: Built) -> None:
    assert sorted(p.name for p in ovpn.out.iterdir()) == [
        "amnesiac.efi",
        "boot.ipxe",
        "initrd.img",
        "manifest.json",
        "vmlinuz",
    ]
    for name, meta in ovpn.manifest["artifacts"].items():
        assert sha256(ovpn.out / name) == meta["sha256"], name
        assert (ovpn.out / name).stat().st_size == meta["size"], name
    assert ovpn.manifest["image"]["sha256"] == ovpn.manifest["artifacts"]["initrd.img"]["sha256"]
    assert ovpn.summary["image_sha256"] == ovpn.manifest["image"]["sha256"]


def test_manifest_records_provenance(ovpn: Built) -> None:
    m = ovpn.manifest
    assert m["policy"]["id"] == "ovpn"
    assert m["policy"]["sha256"] == sha256(REPO / "policies/ovpn.yml")
    assert m["debian"]["suite"] == "trixie"
    assert m["source_date_epoch"] == SDE
    assert {"ansible-core", "mmdebstrap", "zstd", "amnesiac"} <= set(m["tools"])
    packages = {p["name"]: p["version"] for p in m["packages"]}
    assert "openvpn" in packages and "linux-image-amd64" in packages
    roles = [r["name"] for r in m["roles"]]
    assert roles[0] == "server_base"
    assert {"ram_root", "no_logs", "openvpn_server", "input_lockdown", "ssh_admin", "firewall"} <= set(roles)
    ram_root = next(r for r in m["roles"] if r["name"] == "ram_root")
    assert ram_root["vars"]["ram_root_tmpfs_size_mib"] * 1024**2 == m["image"]["root_tmpfs_size_bytes"]


def test_boot_script_and_cmdline(ovpn: Built) -> None:
    script = (ovpn.out / "boot.ipxe").read_text()
    assert script.startswith("#!ipxe\n")
    cmdline = ovpn.manifest["image"]["cmdline"]
    assert f"kernel vmlinuz {cmdline}\n" in script  # relative URLs: boots from any HTTP/TFTP root
    assert "initrd initrd.img\n" in script
    words = cmdline.split()
    size = ovpn.manifest["image"]["root_tmpfs_size_bytes"] // 1024**2
    assert f"amnesiac.root_size={size}M" in words
    assert "usbcore.nousb" in words
    assert "i8042.nokbd" in words
    # The image names itself, so a live server's /proc/cmdline says which initrd it booted.
    assert f"amnesiac.image={ovpn.manifest['image']['sha256']}" in words


def test_the_uki_holds_the_build_and_its_pcr11_is_predicted(ovpn: Built) -> None:
    """amnesiac.efi is the kernel, the initrd and the command line of this build behind
    systemd-stub, and the manifest's PCR 11 is what the stub will measure: recomputed here from
    the file's own sections, independently of the build's two predictions."""
    booted = ovpn.manifest["measured_boot"]
    assert booted["file"] == "amnesiac.efi" and booted["phases"] == []
    assert booted["pcr12_sha256"] == measure.ZEROS and booted["stub"]
    sections = measure.uki_sections(ovpn.out / "amnesiac.efi")
    assert sections[".linux"] == (ovpn.out / "vmlinuz").read_bytes()
    assert sections[".initrd"] == (ovpn.out / "initrd.img").read_bytes()
    cmdline = ovpn.manifest["image"]["cmdline"]
    assert sections[".cmdline"].decode() == uki.uki_cmdline(cmdline)  # no newline
    assert "initrd=" in cmdline and "initrd=" not in uki.uki_cmdline(cmdline)  # iPXE's, not the UKI's
    assert sections[".uname"].decode() == ovpn.manifest["image"]["kernel_release"]
    assert b"ID=debian" in sections[".osrel"]
    assert booted["pcr11_sha256"] == measure.pcr11(sections)
    assert booted["sections"] == {name: hashlib.sha256(body).hexdigest() for name, body in sections.items()}
    tools = ovpn.manifest["tools"]
    assert tools["uki:systemd-boot-efi"] == booted["stub"] and "uki:systemd-ukify" in tools


def test_identity_release_is_built_in_with_its_ca_and_no_identity(
    ovpn_release: ReleaseImage, ovpn: Built
) -> None:
    """Built early in the build lane: the guest lane boots it (test_attestation, test_fleet,
    test_flash_e2e's UEFI netboot, which needs its UKI signed with the provider's key)."""
    built = json.loads((ovpn_release.out / "manifest.json").read_text())["measured_boot"]
    assert built["signed_by"] == ovpn_release.secure_boot.fingerprint
    root = ovpn_release.root
    assert root is not None
    release = root / "etc/amnesiac/release"
    assert (release / "url").read_text() == f"https://{GUEST_RELEASE}\n"
    assert (release / "ca.crt").read_bytes() == ovpn_release.pki.ca.cert  # the CA it trusts: measured with it
    wants = root / "etc/systemd/system/multi-user.target.wants/amnesiac-identity-release.service"
    assert wants.is_symlink()
    for tool in ("identity-release", "identity-unpack", "amnesiac-tpm-quote"):
        assert (root / "usr/local/libexec/amnesiac" / tool).stat().st_mode & 0o111, tool
    assert list((root / "etc/amnesiac/provider").iterdir()) == []  # no identity in the image
    # Off by default: the shipped image has none of it.
    assert not (ovpn.root / "etc/amnesiac/release").exists()
    assert not (ovpn.root / "etc/systemd/system/amnesiac-identity-release.service").exists()


def test_early_init_archive(ovpn: Built) -> None:
    names = {str(p.relative_to(ovpn.early)) for p in ovpn.early.rglob("*")}
    assert {"init", "usr/bin/busybox", "usr/bin/zstd", "root.cpio.zst", "dev/console"} <= names
    assert (ovpn.early / "init").read_text().startswith("#!/bin/busybox sh")


def test_root_fits_its_tmpfs_and_ipxe(ovpn: Built) -> None:
    image = ovpn.manifest["image"]
    assert image["root_unpacked_bytes"] < image["root_tmpfs_size_bytes"]
    assert ovpn.manifest["artifacts"]["initrd.img"]["size"] < 2 * 1024**3


def test_no_syslog_daemon_and_no_log_files(ovpn: Built) -> None:
    packages = {p["name"] for p in ovpn.manifest["packages"]}
    assert not packages & {
        "rsyslog",
        "syslog-ng",
        "syslog-ng-core",
        "busybox-syslogd",
        "inetutils-syslogd",
        "auditd",
        "busybox",
        "busybox-static",  # the early init keeps its own copy, gone after switch_root
    }
    daemons = ("usr/sbin/rsyslogd", "usr/sbin/syslog-ng", "sbin/auditd", "usr/sbin/auditd", "usr/bin/busybox")
    for daemon in daemons:
        assert not (ovpn.root / daemon).exists(), daemon
    files = [p for p in (ovpn.root / "var/log").rglob("*") if p.is_file() and not p.is_symlink()]
    assert files == [], files


def test_no_keys_or_ids_baked_in(ovpn: Built) -> None:
    assert list((ovpn.root / "etc/ssh").glob("ssh_host_*")) == []
    assert not (ovpn.root / "root/.ssh/authorized_keys").exists(), "the production image carries no key"
    assert (ovpn.root / "root/.ssh").is_dir(), "a boot-time overlay drops test keys here"
    assert (ovpn.root / "etc/machine-id").read_text() == ""
    assert not (ovpn.root / "var/lib/systemd/random-seed").exists()


def test_no_usb_or_storage_drivers(ovpn: Built) -> None:
    modules = {
        p.name.split(".ko")[0].replace("-", "_") for p in (ovpn.root / "usr/lib/modules").rglob("*.ko*")
    }
    assert modules, "the network and firewall modules are kept"
    assert {"tun", "nf_tables", "virtio_net"} <= modules
    forbidden = {"usbcore", "xhci_hcd", "ehci_hcd", "usbhid", "usb_storage", "uas", "ahci", "nvme", "sd_mod",
                 "virtio_blk", "virtio_scsi", "nft_log", "nf_log_syslog"}  # fmt: skip
    assert not modules & forbidden


def test_fstab_has_no_entries(ovpn: Built) -> None:
    fstab = (ovpn.root / "etc/fstab").read_text()
    entries = [line for line in fstab.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert entries == []


def test_rebuild_is_reproducible_with_and_without_cached_layers(ovpn: Built, tmp_path: Path) -> None:
    """Same inputs and SOURCE_DATE_EPOCH: the same initrd, byte for byte, whether every role ran
    or none did (every layer from the cache). The session's image is the first kind when its
    cache was empty (a clean clone); otherwise a build from a cache without layers is."""
    roles = [role["name"] for role in ovpn.manifest["roles"]]
    builds, cache = [ovpn.summary], paths.cache_dir()
    if ovpn.summary["roles_cached"]:
        cache = rootfs_only_cache(tmp_path / "cache")
        builds.append(build(tmp_path / "ran", "--cache", str(cache)))
        assert builds[-1]["rootfs_cached"] is True
    assert builds[-1]["roles_cached"] == []  # every role ran
    builds.append(build(tmp_path / "cached", "--cache", str(cache)))
    assert builds[-1]["roles_cached"] == roles
    assert [s["note"] for s in builds[-1]["stages"] if s["name"] == "configure"] == ["9 of 9 roles cached"]
    for again in builds[1:]:
        assert again["image_sha256"] == ovpn.manifest["image"]["sha256"]
        for name in ("vmlinuz", "initrd.img", "boot.ipxe", "amnesiac.efi", "manifest.json"):
            assert sha256(Path(again["out"]) / name) == sha256(ovpn.out / name), name


def test_a_cold_build_with_its_own_empty_cache_gives_the_same_image(ovpn: Built, tmp_path: Path) -> None:
    """Two cold builds of one commit, each from an empty cache of its own (the session's was, on
    a clean clone): the same bytes, so that a third party can rebuild what a manifest names. The
    epoch is the session's; a build without one derives it from the mirror's Release date
    (tests/test_rootfs.py). When they differ, diffoscope says where."""
    cold = build_and_unpack(tmp_path, "cold", "--cache", str(tmp_path / "cache"))
    assert cold.summary["rootfs_cached"] is False and cold.summary["roles_cached"] == []
    release = (ovpn.manifest["debian"]["release_date"], cold.manifest["debian"]["release_date"])
    assert release[0] == release[1], f"the mirror changed between the two builds: {release}"
    if cold.manifest["image"]["sha256"] != ovpn.manifest["image"]["sha256"]:
        pytest.fail("two cold builds differ:\n" + diffoscope(ovpn.root, cold.root))
    for name in ("vmlinuz", "initrd.img", "boot.ipxe", "amnesiac.efi", "manifest.json"):
        assert sha256(cold.out / name) == sha256(ovpn.out / name), name


def diffoscope(a: Path, b: Path, limit: int = 20_000) -> str:
    """What differs between two unpacked roots, as diffoscope tells it (bounded)."""
    if shutil.which("diffoscope") is None:
        return "(diffoscope is not installed: `make setup` installs diffoscope-minimal)"
    result = subprocess.run(
        ["diffoscope", "--text", "-", "--no-progress", "--exclude-directory-metadata", "no", str(a), str(b)],
        capture_output=True,
        text=True,
        check=False,
        timeout=900,
    )
    return (result.stdout + result.stderr)[:limit]


def test_a_changed_variable_reruns_its_role_and_those_after_it(ovpn: Built, tmp_path: Path) -> None:
    """input_lockdown's variable: the roles before it come from the cache, it and the rest run.
    Packed as a development build (zstd -3, seconds), which the manifest says it is."""
    roles = [role["name"] for role in ovpn.manifest["roles"]]
    out = tmp_path / "sysrq"
    summary = build(out, "--var", "input_lockdown_sysrq=false", "--profile", "development")
    assert summary["roles_cached"] == roles[: roles.index("input_lockdown")]
    assert summary["image_sha256"] != ovpn.manifest["image"]["sha256"]
    assert summary["profile"] == "development"
    assert json.loads((out / "manifest.json").read_text())["image"]["profile"] == "development"
    assert ovpn.manifest["image"]["profile"] == "release"


def test_tmpfs_too_small_is_refused(ovpn: Built, tmp_path: Path) -> None:
    out = tmp_path / "tiny"
    result = amnesiac(
        "build", "--source-date-epoch", str(SDE), "--var", "ram_root_tmpfs_size_mib=100", "--out", str(out),
        check=False,
    )  # fmt: skip
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert "does not fit" in last or "needs" in last, result.stderr
    assert "ram_root_tmpfs_size_mib" in last
    assert not out.exists()
    assert list(tmp_path.glob(".tiny.*")) == []


def test_interrupted_build_leaves_nothing(ovpn: Built, tmp_path: Path) -> None:
    """SIGTERM during the Ansible stage: exit 143, no --out, no work directory, no mount."""
    out = tmp_path / "interrupted"
    cache = rootfs_only_cache(tmp_path / "cache")  # no layer: Ansible runs
    argv = ["build", "--source-date-epoch", str(SDE), "--out", str(out), "--cache", str(cache)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "amnesiac.cli", *argv],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    work = None
    while time.monotonic() < deadline and work is None:  # wait until the configure stage runs
        ansible = list(tmp_path.glob(".interrupted.work-*/ansible/artifacts"))
        work = ansible[0] if ansible else None
        time.sleep(0.5)
    assert work is not None, "the build never reached the configure stage"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr  # 128 + SIGTERM
    assert "interrupted" in stderr.strip().splitlines()[-1]
    assert not out.exists()
    assert list(tmp_path.glob(".interrupted.*")) == []
    assert list(cache.glob("layers/.*")) == []  # layers are stored whole or not at all
    mounts = Path("/proc/mounts").read_text()
    assert str(tmp_path) not in mounts
    # nothing of the build goes on in the background
    assert subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, check=False).returncode == 1


def test_json_summary_lists_stages(ovpn: Built) -> None:
    stages = [s["name"] for s in ovpn.summary["stages"]]
    assert stages == ["rootfs", "configure", "minimise", "pack", "uki", "manifest"]
    json.dumps(ovpn.summary)
    assert Path(ovpn.summary["out"]).is_absolute()
