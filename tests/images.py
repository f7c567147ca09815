"""Real images for the slow tiers, built once per session and shared by build, boot and verify.

`ovpn` is the default image; `ivpn` and `cloudvpn` are the other seed policies' images.
`ovpn_without_controls` is the OVPN policy with every control switched off (and a syslog daemon
added): the image the negative tests prove the checks fail on.

`make test` runs the slow tiers on two pytest-xdist workers, one lane each (`xdist_group`): the
guest lane boots (one TCG guest at a time, so boot timings stay comparable), the build lane
builds, then runs the molecule scenarios (tests/molecule), which would otherwise wait for the
guest lane's last boot. Each image is built once per session whichever lane asks first, under a
lock in the directory the workers share; the other lane waits for it and reuses it. Builds and
scenarios run niced: a booted guest beside them keeps the CPU it needs.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from amnesiac.image import secure_boot
from amnesiac.image.pack import unpack_initrd
from amnesiac.image.secure_boot import SigningKey
from amnesiac.provider.harness import GUEST_RELEASE
from amnesiac.provider.pki import Pem, ProviderPki

REPO = Path(__file__).resolve().parent.parent
SDE = 1_700_000_000  # a fixed SOURCE_DATE_EPOCH: builds of the same inputs must agree byte for byte

# Every control of the OVPN policy's roles, off; each is a role variable a negative-test image
# sets. A syslog daemon is added because Debian installs none by default: without one, "no
# syslog daemon" could not fail.
WITHOUT_CONTROLS = {
    "server_base_packages": "[systemd, systemd-sysv, udev, iproute2, kmod, rsyslog]",
    "ram_root_no_block_storage": "false",
    "ram_root_clear_at_shutdown": "false",
    # A root tmpfs of another size than the policy reviewed (384 MiB): the size check must see it.
    "ram_root_tmpfs_size_mib": "256",
    "ram_root_storage_modules": "[virtio_blk, virtio_scsi, sd_mod]",
    "ram_root_fstab_entries": "['/dev/vda /mnt auto defaults,nofail 0 0']",
    "no_logs_syslog": "false",
    "no_logs_journald_storage": "volatile",
    "no_logs_login_records": "false",
    "no_logs_kernel_messages": "false",
    "no_logs_audit": "false",
    "no_logs_var_log_readonly": "false",
    "openvpn_server_discard_logs": "false",
    "openvpn_server_apparmor": "false",
    "openvpn_server_systemd_sandbox": "false",
    "firewall_log_dropped": "true",
    "firewall_per_client_counters": "true",
    "dns_resolver_log_queries": "true",
    "input_lockdown_usb": "false",
    # The image keeps no USB driver otherwise: these let the harness's USB keyboard and stick enumerate.
    "input_lockdown_kept_usb_modules": "[xhci_pci, xhci_hcd, usbhid, hid_generic, usb_storage]",
    "input_lockdown_keyboard": "false",
    "input_lockdown_gettys": "false",
    "input_lockdown_sysrq": "false",
    "input_lockdown_ctrl_alt_del": "false",
    "input_lockdown_rescue_shell": "false",
    "input_lockdown_lock_modules": "false",
    "ssh_admin_key_only": "false",
    "ssh_admin_no_forwarding": "false",
    "ssh_admin_sandbox": "false",
    "dns_resolver_sandbox": "false",
    "server_base_kernel_lockdown": "none",
    "server_base_kexec_disabled": "false",
    "server_base_firmware_credentials_ignored": "false",
    "server_base_kernel_self_protection": "false",
    "ssh_admin_log_level": "INFO",
    "ssh_admin_no_lastlog": "false",
    # A record with fields the policy does not permit, and a copy kept on the server.
    "provider_agent_extra_fields": "[client_ip, session_start]",
    "provider_agent_local_copy": "true",
    # Nothing cleared or restarted: a session's canaries stay in RAM past the bound.
    "no_logs_clear_freed_memory": "false",
    "no_logs_flush_receive_buffers_when_idle": "false",
    "dns_resolver_lifetime_seconds": "0",
    "provider_agent_fresh_openvpn_when_idle": "false",
    "firewall_vpn_untracked": "false",
    "provider_agent_wireguard_forget_idle_endpoints": "false",
    "provider_agent_sandbox": "false",
}


def without_controls_args() -> list[str]:
    """WITHOUT_CONTROLS as `amnesiac build` arguments, and identity release built in (a CA of
    its own, never served): the release unit is there, unsandboxed, for the sandbox check to
    find over its bound (a boot given its identity in an overlay never runs it)."""
    ca = ProviderPki.create([GUEST_RELEASE]).ca.cert.decode()
    release = {
        "provider_agent_release_url": f"https://{GUEST_RELEASE}",
        "provider_agent_release_ca": json.dumps(ca),
    }
    return [
        arg for name, value in {**WITHOUT_CONTROLS, **release}.items() for arg in ("--var", f"{name}={value}")
    ]


# The two lanes of the slow tiers (module marks): xdist's loadgroup keeps each on one worker.
GUEST_LANE = pytest.mark.xdist_group("guest")
BUILD_LANE = pytest.mark.xdist_group("build")


# How the build lane's work runs (builds, molecule scenarios) beside a booted guest: the guest gets
# the larger share of the CPU, not all of it (benchmarks/README.md, "The lanes, timed").
NICE = ("nice", "-n", "10")


def amnesiac(
    *args: str, check: bool = True, nice: bool = False, tmpdir: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """The CLI as a user runs it; `tmpdir`: its TMPDIR, where a test looks for what a run leaves
    (the shared /tmp has the other lane's runs in it)."""
    argv = [sys.executable, "-m", "amnesiac.cli", *args]
    env = {**os.environ, "TMPDIR": str(tmpdir)} if tmpdir else None
    result = subprocess.run(
        [*NICE, *argv] if nice else argv,
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
        env=env,
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
    early: Path  # the early archive unpacked


def build(out: Path, *extra: str) -> dict[str, Any]:
    result = amnesiac(
        "build", "--json", "--source-date-epoch", str(SDE), "--out", str(out), *extra, nice=True
    )
    summary: dict[str, Any] = json.loads(result.stdout)
    return summary


def build_and_unpack(base: Path, name: str, *extra: str, policy: str = "ovpn") -> Built:
    out = base / name
    summary = build(out, "--policy", f"policies/{policy}.yml", *extra)
    manifest = json.loads((out / "manifest.json").read_text())
    early, root = unpack_initrd(
        out / "initrd.img", manifest["image"]["initrd_pieces"], base / f"{name}.unpacked"
    )
    return Built(out, summary, manifest, root, early)


def session_image(factory: pytest.TempPathFactory, name: str, *extra: str, policy: str = "ovpn") -> Built:
    """The session's one build of `name`: under xdist, in the directory every worker of the run
    shares (xdist's own advice for session fixtures), built by the first worker to ask while the
    others wait on its lock; without xdist, in this session's temporary directory."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return build_and_unpack(factory.mktemp("images"), name, *extra, policy=policy)
    shared = factory.getbasetemp().parent / "images"
    shared.mkdir(exist_ok=True)
    summary = shared / f"{name}.summary.json"  # written last: the build and its unpacked trees are whole
    with (shared / f"{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not summary.exists():
            built = build_and_unpack(shared, name, *extra, policy=policy)
            summary.write_text(json.dumps(built.summary))
            return built
    out, unpacked = shared / name, shared / f"{name}.unpacked"  # where build_and_unpack put them
    manifest = json.loads((out / "manifest.json").read_text())
    return Built(out, json.loads(summary.read_text()), manifest, unpacked / "root", unpacked / "early")


def rootfs_only_cache(dest: Path) -> Path:
    """A cache holding the shared cache's root filesystems and no role layer: a build from it
    runs every role (a hard link where the file system allows, else a copy)."""
    from amnesiac import paths

    dest.mkdir(parents=True)
    for made in paths.cache_dir().glob("rootfs-*"):
        try:
            (dest / made.name).hardlink_to(made)
        except OSError:
            shutil.copy2(made, dest / made.name)
    return dest


@pytest.fixture(scope="session")
def needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("building and booting images needs root (mmdebstrap, chroot, QEMU)")


@pytest.fixture(scope="session")
def ovpn(tmp_path_factory: pytest.TempPathFactory, needs_root: None) -> Built:
    """The default image: policies/ovpn.yml as shipped."""
    return session_image(tmp_path_factory, "ovpn")


@dataclass(frozen=True)
class ReleaseImage:
    """An image that asks for its identity at boot (identity release), signed for Secure Boot:
    what a fleet's UEFI servers netboot. `pki` is the release service's (its CA is built into
    the image), `secure_boot` the provider's db key that signed the UKI."""

    out: Path
    pki: ProviderPki
    secure_boot: SigningKey
    root: Path | None = None  # its root file system unpacked (the session's build only)


def release_setup(directory: Path) -> tuple[ProviderPki, SigningKey]:
    """The release service's PKI (for a service at GUEST_RELEASE) and a provider Secure Boot key,
    kept in `directory`, made by the first worker to ask, under a lock: the image that trusts
    and carries them is built once per session."""
    directory.mkdir(parents=True, exist_ok=True)
    pki_file = directory / "pki.json"
    with (directory / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not pki_file.exists():
            secure_boot.throwaway_key(directory, "amnesiac test provider db key")
            made = ProviderPki.create([GUEST_RELEASE])
            parts = [made.ca.cert, made.ca.key, made.service.cert, made.service.key]
            pki_file.write_text(json.dumps([part.decode() for part in parts]))
    ca_cert, ca_key, cert, key = (part.encode() for part in json.loads(pki_file.read_text()))
    signing = SigningKey(directory / "sb.key", directory / "sb.crt", "")
    fingerprint = secure_boot.fingerprint(secure_boot.certificate(signing.cert))
    return ProviderPki(ca=Pem(ca_cert, ca_key), service=Pem(cert, key)), SigningKey(
        signing.key, signing.cert, fingerprint
    )


def release_args(pki: ProviderPki, key: SigningKey) -> list[str]:
    """`amnesiac build` arguments that turn identity release on, trusting `pki`'s CA, and sign
    the UKI with `key`."""
    return ["--var", f"provider_agent_release_url=https://{GUEST_RELEASE}",
            "--var", f"provider_agent_release_ca={json.dumps(pki.ca.cert.decode())}",
            "--secure-boot-key", str(key.key), "--secure-boot-cert", str(key.cert)]  # fmt: skip


@pytest.fixture(scope="session")
def ovpn_release(tmp_path_factory: pytest.TempPathFactory, ovpn: Built) -> ReleaseImage:
    """policies/ovpn.yml with identity release on (provider_agent_release_url): at boot the
    server asks the release service at GUEST_RELEASE:443 for its identity, with a TPM quote.
    Built after `ovpn`, from its cached root and role layers (only provider_agent's and those
    after it run again), rather than beside it from a cold cache."""
    xdist = "PYTEST_XDIST_WORKER" in os.environ
    shared = tmp_path_factory.getbasetemp().parent if xdist else tmp_path_factory.getbasetemp()
    pki, key = release_setup(shared / "ovpn_release.keys")
    built = session_image(tmp_path_factory, "ovpn_release", *release_args(pki, key))
    return ReleaseImage(built.out, pki, key, built.root)


@pytest.fixture(scope="session")
def ivpn(tmp_path_factory: pytest.TempPathFactory, needs_root: None) -> Built:
    """policies/ivpn.yml as shipped (OpenVPN and WireGuard)."""
    return session_image(tmp_path_factory, "ivpn", policy="ivpn")


@pytest.fixture(scope="session")
def cloudvpn(tmp_path_factory: pytest.TempPathFactory, needs_root: None) -> Built:
    """policies/cloudvpn.yml as shipped (permitted session records sent off the server)."""
    return session_image(tmp_path_factory, "cloudvpn", policy="cloudvpn")


@pytest.fixture(scope="session")
def ovpn_without_controls(tmp_path_factory: pytest.TempPathFactory, needs_root: None) -> Built:
    """The OVPN policy's image with every control off: every technical claim must fail on it."""
    return session_image(tmp_path_factory, "ovpn-without-controls", *without_controls_args())
