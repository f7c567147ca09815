"""The boot harness without QEMU: overlay archive, memory, scripts, hashes, HTTP, argv, CLI."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from amnesiac import boot, ssh
from amnesiac.boot import accel, machine, overlay, qemu
from amnesiac.boot import image as boot_image
from amnesiac.boot.emulator import Emulator
from amnesiac.boot.http import FileServer, Served, Source
from amnesiac.errors import UsageError
from amnesiac.image import secure_boot
from amnesiac.image.manifest import Manifest

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeFakeFakeFakeFakeFakeFakeFakeFakeFakeFake test@amnesiac"


def fake_build(root: Path, cmdline: str = "initrd=initrd.img console=ttyS0 panic=10") -> Path:
    out = root / "build"
    out.mkdir()
    (out / "vmlinuz").write_bytes(b"MZ fake kernel" * 100)
    (out / "initrd.img").write_bytes(b"070701 fake initrd" * 1000)
    (out / "boot.ipxe").write_text(f"#!ipxe\nkernel vmlinuz {cmdline}\ninitrd initrd.img\nboot\n")
    artifacts = {
        name: {
            "sha256": hashlib.sha256((out / name).read_bytes()).hexdigest(),
            "size": (out / name).stat().st_size,
        }
        for name in ("vmlinuz", "initrd.img", "boot.ipxe")
    }
    manifest = {
        "format": 1,
        "image": {
            "sha256": artifacts["initrd.img"]["sha256"],
            "cmdline": cmdline,
            "root_tmpfs_size_bytes": 384 * 1024**2,
            "root_unpacked_bytes": 200 * 1024**2,
        },
        "artifacts": artifacts,
        "source_date_epoch": 1_700_000_000,
    }
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


# --- overlay ------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("cpio") is None, reason="GNU cpio not installed")
def test_overlay_cpio_unpacks_with_modes(tmp_path: Path) -> None:
    pub = tmp_path / "id.pub"
    pub.write_text(KEY + "\n")
    data = overlay.overlay_cpio([overlay.authorized_key(pub)], mtime=1_700_000_000)
    assert len(data) % 512 == 0, "the next initrd must start aligned"
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["cpio", "-idm", "--quiet", "--no-absolute-filenames"], input=data, cwd=out, check=True)
    names = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert names == ["overlay", "overlay/root", "overlay/root/.ssh", "overlay/root/.ssh/authorized_keys"]
    modes = {name: stat.S_IMODE((out / name).stat().st_mode) for name in names}
    assert modes == {
        "overlay": 0o755,
        "overlay/root": 0o700,  # cp -a copies it over /root: must stay private
        "overlay/root/.ssh": 0o700,
        "overlay/root/.ssh/authorized_keys": 0o600,
    }
    assert (out / "overlay/root/.ssh/authorized_keys").read_text() == KEY + "\n"
    listing = subprocess.run(["cpio", "-tv", "--quiet"], input=data, capture_output=True, check=True).stdout
    assert all(line.split()[2:4] == [b"root", b"root"] for line in listing.splitlines()), listing


def test_overlay_cpio_is_deterministic_and_parents_first() -> None:
    files = [overlay.OverlayFile("etc/openvpn/server/id.key", b"secret", 0o600)]
    one, two = overlay.overlay_cpio(files, 5), overlay.overlay_cpio(files, 5)
    assert one == two
    names = [n.decode() for n in _cpio_names(one)]
    assert names == [
        "overlay",
        "overlay/etc",
        "overlay/etc/openvpn",
        "overlay/etc/openvpn/server",
        *["overlay/etc/openvpn/server/id.key"],
        "TRAILER!!!",
    ]


def _cpio_names(data: bytes) -> list[bytes]:
    names, pos = [], 0
    while True:
        header = data[pos : pos + 110]
        namesize, filesize = int(header[94:102], 16), int(header[54:62], 16)
        name = data[pos + 110 : pos + 110 + namesize - 1]
        names.append(name)
        if name == b"TRAILER!!!":
            return names
        pos += 110 + namesize
        pos += -pos % 4
        pos += filesize + (-filesize % 4)


def test_overlay_rejects_paths_outside_root() -> None:
    with pytest.raises(UsageError):
        overlay.overlay_cpio([overlay.OverlayFile("../etc/passwd", b"x")])


def test_authorized_key_refuses_private_key_and_junk(tmp_path: Path) -> None:
    private = tmp_path / "id"
    private.write_text(
        "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEA\n-----END OPENSSH PRIVATE KEY-----\n"
    )
    with pytest.raises(UsageError, match="private key"):
        overlay.authorized_key(private)
    junk = tmp_path / "junk.pub"
    junk.write_text("hello world\n")
    with pytest.raises(UsageError, match="not an OpenSSH public key"):
        overlay.authorized_key(junk)
    with pytest.raises(UsageError, match="cannot read"):
        overlay.authorized_key(tmp_path / "missing.pub")


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen not installed")
def test_authorized_key_from_ssh_keygen(tmp_path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")], check=True)
    item = overlay.authorized_key(tmp_path / "k.pub")
    assert item.path == "root/.ssh/authorized_keys" and item.mode == 0o600
    assert item.data == (tmp_path / "k.pub").read_bytes()


# --- memory, scripts, argv ----------------------------------------------------------------------


def _manifest(initrd_mib: int, unpacked_mib: int) -> Manifest:
    digest = "0" * 64
    artifacts = {name: {"sha256": digest, "size": 1000} for name in ("vmlinuz", "boot.ipxe")}
    return Manifest.model_validate(
        {
            "artifacts": {**artifacts, "initrd.img": {"sha256": digest, "size": initrd_mib * 1024**2}},
            "image": {
                "sha256": digest,
                "cmdline": "",
                "root_unpacked_bytes": unpacked_mib * 1024**2,
                "root_tmpfs_size_bytes": 2048 * 1024**2,
            },
        }
    )


def test_memory_has_a_floor_and_grows_with_the_image() -> None:
    assert boot_image.memory_mib(_manifest(5, 20)) == boot_image.MIN_MEMORY_MIB
    small, big = boot_image.memory_mib(_manifest(60, 230)), boot_image.memory_mib(_manifest(120, 600))
    assert big > small >= boot_image.MIN_MEMORY_MIB
    assert big % 32 == 0
    # the tmpfs limit is not what the machine uses: only the unpacked size counts
    assert boot_image.memory_mib(_manifest(60, 230)) == small
    need = (boot_image.KERNEL_AND_SERVICES_BYTES + (120 + 600) * 1024**2) / 1024**2
    assert need <= big < need + 32


def measured_manifest() -> Manifest:
    """The OVPN build's sizes (initrd 40 MiB, root 141 MiB) and its UKI (amnesiac.efi, 51.5 MiB)."""
    data = _manifest(40, 141).model_dump(mode="json")
    uki = {"sha256": "0" * 64, "size": 54_033_408}
    return Manifest.model_validate({**data, "artifacts": {**data["artifacts"], "amnesiac.efi": uki}})


def test_a_measured_boot_needs_room_for_its_uki_too() -> None:
    """Booted measured, the firmware holds the UKI while its kernel starts: 352 MiB, enough to
    netboot the OVPN image, stopped OVMF on "Out of resources" (benchmarks.boot, 2026-12-04)."""
    netboot, measured = _manifest(40, 141), measured_manifest()
    floor = boot_image.memory_mib(netboot)
    boot_image.refuse_too_little_memory(measured, floor, measured=False, what="--memory")
    boot_image.refuse_too_little_memory(netboot, floor, measured=True, what="--memory")  # no UKI
    boot_image.refuse_too_little_memory(measured, floor + 64, measured=True, what="--memory")
    with pytest.raises(UsageError, match=rf"--memory {floor}: .* at least {floor + 64} MiB booted measured"):
        boot_image.refuse_too_little_memory(measured, floor, measured=True, what="--memory")


def test_the_firmware_stopping_for_good_is_told_from_the_console() -> None:
    """OVMF waiting for a key, or systemd-stub unable to start its kernel, ends the boot at once
    with the firmware's words, not at the SSH timeout (QEMU itself runs on)."""
    stub = (
        "EFI stub: ERROR: Failed to load initrd: 0x8000000000000009\r\n"
        "EFI stub: ERROR: efi_stub_entry() failed!\r\n"
        "\x1b[1m../src/boot/linux.c:153@linux_exec: Error starting kernel image: Out of resources\r\n"
        "!!!! X64 Exception Type - 0D(#GP - General Protection)  CPU Apic ID - 00000000 !!!!\r\n"
    )
    assert qemu.firmware_failure(stub) == (
        "the firmware could not start the UKI's kernel (Error starting kernel image: Out of resources)"
    )
    assert "Error starting kernel image: Out of resources" in machine.failure_summary(stub).split(" / ")[0]
    gave_up = "BdsDxe: No bootable option or device was found.\r\n"
    assert qemu.firmware_failure(gave_up) == "the firmware found nothing it would boot"
    assert qemu.firmware_failure("EFI stub: UEFI Secure Boot is enabled.\r\n[    0.000000] Linux") is None


def test_harness_script_chains_the_build_script() -> None:
    with_overlay = overlay.harness_script(overlay=True).splitlines()
    assert with_overlay[0] == "#!ipxe"
    commands = [line for line in with_overlay if not line.startswith("#")]
    assert commands == ["initrd overlay.cpio", "chain boot.ipxe"]
    assert [ln for ln in overlay.harness_script(overlay=False).splitlines() if not ln.startswith("#")] == [
        "chain boot.ipxe"
    ]


def test_qemu_argv_isolates_the_guest(tmp_path: Path) -> None:
    argv = qemu.qemu_argv(
        qemu="qemu-system-x86_64",
        relay="/bin/busybox",
        accel="tcg",
        memory_mib=384,
        cpus=2,
        http_port=40000,
        first_script="amnesiac-harness.ipxe",
        forwards=[("tcp", 40022, 22), ("udp", 41194, 1194)],
        serial_log=tmp_path / "a,b/serial.log",
        qmp_socket=tmp_path / "qmp.sock",
    )
    netdev = argv[argv.index("-netdev") + 1]
    assert "restrict=on" in netdev.split(",")
    assert "bootfile=http://10.0.2.100/amnesiac-harness.ipxe" in netdev
    assert "guestfwd=tcp:10.0.2.100:80-cmd:/bin/busybox nc 127.0.0.1 40000" in netdev
    assert "hostfwd=tcp:127.0.0.1:40022-:22" in netdev and "hostfwd=udp:127.0.0.1:41194-:1194" in netdev
    assert "-no-reboot" in argv
    assert argv[argv.index("-accel") + 1] == "tcg" and argv[argv.index("-cpu") + 1] == "max"
    assert argv[argv.index("-m") + 1] == "384" and argv[argv.index("-smp") + 1] == "2"
    assert "a,,b/serial.log" in argv[argv.index("-chardev") + 1], "commas in paths are escaped"


def test_qemu_argv_for_a_uefi_netboot_has_no_nic_rom(tmp_path: Path) -> None:
    """Secure Boot would refuse iPXE's unsigned option ROM: the signed iPXE drives the NIC."""
    common = {
        "qemu": "qemu-system-x86_64", "relay": "/bin/busybox", "accel": "tcg", "memory_mib": 384, "cpus": 2,
        "http_port": 40000, "first_script": "boot.ipxe", "forwards": [("tcp", 40022, 22)],
        "serial_log": tmp_path / "serial.log", "qmp_socket": tmp_path / "qmp.sock",
    }  # fmt: skip
    with_rom = qemu.qemu_argv(**common)  # type: ignore[arg-type]
    without = qemu.qemu_argv(**common, nic_rom=False)  # type: ignore[arg-type]
    assert with_rom[with_rom.index("-device", with_rom.index("-netdev")) + 1] == "virtio-net-pci,netdev=n0"
    assert (
        without[without.index("-device", without.index("-netdev")) + 1] == "virtio-net-pci,netdev=n0,romfile="
    )


def test_a_uefi_netboot_is_of_a_pxe_root_and_takes_no_overlay(tmp_path: Path) -> None:
    netboot = boot.UefiNetboot(
        tmp_path / "ipxe.efi", secure_boot.SigningKey(tmp_path / "k", tmp_path / "c", "")
    )
    options = boot.BootOptions(uefi_netboot=netboot, ssh_key=tmp_path / "id.pub")
    served = boot.ServedFiles(image=None, table={})  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="no overlay"):
        machine._uefi_netboot(served, options, [boot.OverlayFile("root/.ssh/authorized_keys", b"k")])
    with pytest.raises(UsageError, match="of a PXE root"):
        machine._uefi_netboot(tmp_path, options, [])
    assert machine._uefi_netboot(served, options, []) is netboot


def test_qemu_argv_without_network_has_no_nic(tmp_path: Path) -> None:
    argv = qemu.qemu_argv(
        qemu="qemu-system-x86_64", relay="/bin/busybox", accel="tcg", memory_mib=384, cpus=2,
        http_port=40000, first_script="x.ipxe", forwards=[("tcp", 40022, 22)],
        serial_log=tmp_path / "serial.log", qmp_socket=tmp_path / "qmp.sock", network=False,
    )  # fmt: skip
    assert "-netdev" not in argv and not any("virtio-net" in a for a in argv)


def test_emulated_devices_are_blank_sparse_files(tmp_path: Path) -> None:
    devices, args = qemu.emulated_devices(tmp_path)
    kinds = {d.kind for d in devices}
    assert kinds == {"virtio-blk", "usb-kbd", "usb-storage", "acpi-erst", "smbios-credential"}
    assert f"type=11,value={qemu.FIRMWARE_CREDENTIAL}" in args
    assert "acpi-erst,memdev=erst0-store,id=erst0" in args
    assert "qemu-xhci,id=xhci" in args
    for device in devices:
        assert device.is_blank()
        if device.backing:
            assert device.backing.stat().st_size == device.size
            assert device.backing.stat().st_blocks == 0, "sparse"
    disk = next(d for d in devices if d.kind == "virtio-blk")
    assert disk.backing is not None
    with disk.backing.open("r+b") as f:
        f.seek(4096)
        f.write(b"written")
    assert not disk.is_blank()


def test_failure_summary_names_the_reason_first() -> None:
    console = "\x1b[0mSeaBIOS\r\n[ 16.1] Out of memory: Killed process 137 (zstd)\nKilled\n"
    console += "amnesiac: the root filesystem does not fit its tmpfs; rebooting in 30 s\n"
    console += "[ 46.2] reboot: Restarting system\n[ 46.3] reboot: machine restart\n"
    line = machine.failure_summary(console, "qemu-system-x86_64: terminating on signal 15\n")
    assert line.startswith("amnesiac: the root filesystem does not fit")
    assert line.endswith("reboot: machine restart / qemu-system-x86_64: terminating on signal 15")
    assert "\x1b" not in line and "\n" not in line
    assert machine.failure_summary("") == "(nothing on the console)"


# --- the build and its hashes -------------------------------------------------------------------


def test_load_image_accepts_a_matching_build(tmp_path: Path) -> None:
    image = boot_image.load_image(fake_build(tmp_path))
    assert image.cmdline.startswith("initrd=initrd.img")
    assert image.expected("initrd.img") == hashlib.sha256((image.dir / "initrd.img").read_bytes()).hexdigest()


def test_hash_mismatch_refuses_to_boot(tmp_path: Path) -> None:
    out = fake_build(tmp_path)
    (out / "initrd.img").write_bytes(b"tampered")
    with pytest.raises(boot.ImageMismatch, match=r"initrd\.img does not match manifest\.json"):
        boot_image.load_image(out)
    # running() refuses before it starts anything
    with pytest.raises(boot.ImageMismatch), boot.running(out, boot.BootOptions(accel="tcg")):
        pytest.fail("booted a mismatching image")


def test_served_from_pxe_root_serves_the_tree_and_expects_the_build(tmp_path: Path) -> None:
    out = fake_build(tmp_path)
    root = tmp_path / "pxe"
    with pytest.raises(UsageError, match="not a PXE root"):
        boot.served_from_pxe_root(tmp_path, out)
    version = root / "versions" / "abc"
    version.mkdir(parents=True)
    (root / "boot.ipxe").write_text("#!ipxe\nchain versions/abc/boot.ipxe\n")
    (root / ".lock").write_text("")
    for name in ("boot.ipxe", "vmlinuz", "initrd.img"):
        shutil.copy(out / name, version / name)
    served = boot.served_from_pxe_root(root, out)
    assert sorted(served.table) == [
        "boot.ipxe",
        "versions/abc/boot.ipxe",
        "versions/abc/initrd.img",
        "versions/abc/vmlinuz",
    ]
    assert served.image.dir == out.resolve()


def test_missing_dir_or_manifest(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no such build directory"):
        boot_image.load_image(tmp_path / "nope")
    out = fake_build(tmp_path)
    (out / "manifest.json").unlink()
    with pytest.raises(UsageError, match=r"manifest\.json: missing"):
        boot_image.load_image(out)


def test_missing_qemu_is_one_usage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = fake_build(tmp_path)
    monkeypatch.setattr(qemu.shutil, "which", lambda _name: None)
    with pytest.raises(UsageError, match="qemu-system-x86_64"), boot.running(out):
        pytest.fail("started without QEMU")


def test_missing_rom_is_one_usage_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(qemu.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(qemu, "IPXE_ROMS", (tmp_path / "efi-virtio.rom",))
    with pytest.raises(UsageError, match="iPXE ROM"):
        qemu.find_tools()


def test_accel_choice(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert accel.choose_accel("tcg", tmp_path / "vmlinuz").accel == "tcg"
    monkeypatch.setenv(accel.ACCEL_ENV, "tcg")
    assert accel.choose_accel(None, tmp_path / "vmlinuz").accel == "tcg"
    monkeypatch.setenv(accel.ACCEL_ENV, "fast")
    with pytest.raises(UsageError, match="AMNESIAC_ACCEL"):
        accel.choose_accel(None, tmp_path / "vmlinuz")
    monkeypatch.setenv(accel.ACCEL_ENV, "auto")
    monkeypatch.setattr(accel.os, "access", lambda *_a: False)
    choice = accel.choose_accel(None, tmp_path / "vmlinuz")
    assert choice.accel == "tcg" and "/dev/kvm" in choice.reason


# --- the HTTP server ----------------------------------------------------------------------------


def test_server_serves_only_its_table_and_records_hashes(tmp_path: Path) -> None:
    blob = tmp_path / "initrd.img"
    blob.write_bytes(b"x" * 3_000_000)
    digest = hashlib.sha256(blob.read_bytes()).hexdigest()
    table = {"initrd.img": Source(path=blob, expect_sha256=digest), "s.ipxe": Source(data=b"#!ipxe\n")}
    with FileServer(table) as server:
        assert server.url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(server.url + "initrd.img", timeout=10) as response:  # noqa: S310 (loopback)
            assert hashlib.sha256(response.read()).hexdigest() == digest
        with urllib.request.urlopen(server.url + "s.ipxe", timeout=10) as response:  # noqa: S310
            assert response.read() == b"#!ipxe\n"
        for path in ("manifest.json", "../initrd.img", ""):
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(server.url + path, timeout=10)  # noqa: S310
            assert err.value.code == 404
        records = _records(server, 5)  # each response is recorded by its own thread, once sent
    assert sorted((r.name, r.status) for r in records) == [
        ("", 404),
        ("../initrd.img", 404),
        ("initrd.img", 200),
        ("manifest.json", 404),
        ("s.ipxe", 200),
    ]
    initrd = next(r for r in records if r.name == "initrd.img")
    assert initrd.sha256 == digest and initrd.complete and initrd.bytes == 3_000_000


def _records(server: FileServer, count: int) -> list[Served]:
    deadline = time.monotonic() + 10
    while len(server.records()) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return server.records()


def test_server_cuts_short_a_file_that_changed(tmp_path: Path) -> None:
    blob = tmp_path / "vmlinuz"
    blob.write_bytes(b"good" * 1_000_000)
    good = hashlib.sha256(blob.read_bytes()).hexdigest()
    blob.write_bytes(b"evil" * 1_000_000)  # changed after the check before boot
    with FileServer({"vmlinuz": Source(path=blob, expect_sha256=good)}) as server:
        with (
            pytest.raises(http.client.IncompleteRead),
            urllib.request.urlopen(server.url + "vmlinuz", timeout=10) as response,  # noqa: S310
        ):
            response.read()
        record = _records(server, 1)[0]
    assert not record.complete
    assert record.bytes < 4_000_000
    assert record.sha256 != good


def test_server_binds_loopback_only() -> None:
    with pytest.raises(ValueError, match="loopback"):
        FileServer({}, host="0.0.0.0")  # noqa: S104


def test_ssh_banner_needs_a_real_banner() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(2)
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()  # first: accepted and closed (what slirp does early on)
            conn.close()
            conn, _ = listener.accept()
            conn.sendall(b"SSH-2.0-OpenSSH_10.0p2 Debian-7\r\n")
            conn.close()

        thread = threading.Thread(target=serve)
        thread.start()
        assert ssh.read_banner(port) == ""
        assert ssh.read_banner(port) == "SSH-2.0-OpenSSH_10.0p2 Debian-7"
        thread.join()


# --- the command line ---------------------------------------------------------------------------


def amnesiac(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "amnesiac.cli", *args], capture_output=True, text=True, check=False
    )


def test_cli_missing_dir_is_one_line(tmp_path: Path) -> None:
    result = amnesiac("boot", str(tmp_path / "nope"), "--accel", "tcg")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "no such build directory" in result.stderr


def test_cli_mismatch_is_one_line_exit_1(tmp_path: Path) -> None:
    out = fake_build(tmp_path)
    (out / "vmlinuz").write_bytes(b"other kernel")
    result = amnesiac("boot", str(out), "--accel", "tcg")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "vmlinuz does not match manifest.json" in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_cli_private_key_is_refused(tmp_path: Path) -> None:
    out = fake_build(tmp_path)
    private = tmp_path / "id"
    private.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n")
    result = amnesiac("boot", str(out), "--ssh-key", str(private), "--accel", "tcg")
    assert result.returncode == 2 and "is a private key" in result.stderr


def test_cli_help_documents_the_lifecycle() -> None:
    result = amnesiac("boot", "--help")
    assert result.returncode == 0
    for words in ("Ctrl-C", "--wait", "--ssh-key", "--no-test-devices", "--memory", "manifest.json"):
        assert words in result.stdout


# --- the emulator's failures: one more boot, on a kernel oops before anything was observed -----

RACE_CONSOLE = (
    "[    1.658284] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI\n"
    "[    1.661266] RIP: 0010:hrtimer_start_range_ns+0x1c6/0x430\n"
    "[    3.263046] Kernel panic - not syncing: Fatal exception in interrupt\n"
)
DOUBLE_FAULT_CONSOLE = (  # measured 2026-12-04, 0.27 s into a netboot under TCG
    "[    0.267620] Oops: double fault: 0000 [#1] PREEMPT SMP NOPTI\n"
    "[    0.268621] RIP: 0010:__kmalloc_noprof+0x27f/0x400\n"
    "[    0.268957] Kernel panic - not syncing: Fatal exception in interrupt\n"
)
AFTER_INIT_CONSOLE = (  # after /init, as CI's netboot of 2026-12-04 died (it kept only the panic line)
    "[    2.904121] Run /init as init process\n"
    "[    3.250113] Oops: general protection fault: 0000 [#1] PREEMPT SMP NOPTI\n"
    "[    3.253455] Kernel panic - not syncing: Fatal exception in interrupt\n"
)


SECOND_BOOT = "[    4.1] the second boot: Run /init as init process"


def fake_qemu(tmp_path: Path, first: str, then: str = "") -> tuple[Emulator, Path]:
    """A stand-in for QEMU that writes `first` to the console and exits on its first run, then
    `then` (and exits) or starts the kernel and stays up: the logic alone, in milliseconds."""
    serial, runs = tmp_path / "serial.log", tmp_path / "runs"
    stay_up = f'echo "{SECOND_BOOT}" > {serial}; exec sleep 60'
    later = f'printf %s "$2" > {serial}; exit 0' if then else stay_up
    script = (
        f'echo x >> {runs}; if [ "$(wc -l < {runs})" -eq 1 ]; then printf %s "$1" > {serial}; exit 0; fi; '
        + later
    )
    return Emulator(["sh", "-c", script, "fake-qemu", first, then], tmp_path / "qemu.log", tcg=True), serial


def ended(emulator: Emulator) -> None:
    emulator.process.wait(timeout=30)


@pytest.mark.parametrize(
    ("first", "retried"),
    [
        (RACE_CONSOLE, True),
        (DOUBLE_FAULT_CONSOLE, True),
        (AFTER_INIT_CONSOLE, True),
        ("[    2.1] Kernel panic - not syncing: Out of memory\n", False),
        ("BdsDxe: No bootable option or device was found.\r\n", False),
    ],
    ids=["int3-race", "double-fault", "after-init", "other-panic", "firmware-gave-up"],
)
def test_a_kernel_oops_and_only_it_boots_again(tmp_path: Path, first: str, retried: bool) -> None:
    emulator, serial = fake_qemu(tmp_path, first)
    tpm_starts: list[str] = []  # a measured boot's swtpm ends with its QEMU: started again first
    emulator.before_again = lambda: tpm_starts.append(serial.read_text())
    emulator.start()
    try:
        ended(emulator)
        assert emulator.boot_again(serial.read_text(), "why") is retried
        assert len(tpm_starts) == (1 if retried else 0)
        if retried:
            assert emulator.lost == "why"
            deadline = time.monotonic() + 30  # the second run starts writing at once
            while SECOND_BOOT not in serial.read_text() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert emulator.process.poll() is None and SECOND_BOOT in serial.read_text()
        else:
            assert emulator.lost is None and emulator.process.poll() is not None  # for the caller to report
        assert (tmp_path / "runs").read_text().count("x") == (2 if retried else 1)
    finally:
        emulator.stop(grace=1)


def test_a_second_oops_is_reported_not_booted_again(tmp_path: Path) -> None:
    """The image's own oops comes back on the second boot: that one is the caller's to report."""
    emulator, serial = fake_qemu(tmp_path, RACE_CONSOLE, then=RACE_CONSOLE)
    emulator.start()
    try:
        ended(emulator)
        assert emulator.boot_again(serial.read_text(), "the first")
        ended(emulator)
        assert not emulator.boot_again(serial.read_text(), "the second")
        assert emulator.lost == "the first" and (tmp_path / "runs").read_text().count("x") == 2
    finally:
        emulator.stop(grace=1)


def test_under_kvm_an_oops_is_never_booted_again(tmp_path: Path) -> None:
    emulator, serial = fake_qemu(tmp_path, RACE_CONSOLE)
    emulator.tcg = False
    emulator.start()
    try:
        ended(emulator)
        assert not emulator.boot_again(serial.read_text(), "why") and emulator.lost is None
    finally:
        emulator.stop(grace=1)


def test_a_long_tmpdir_moves_the_boots_sockets_to_tmp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """QEMU refuses a monitor socket whose path passes 108 bytes ("UNIX socket path is too
    long"): a $TMPDIR that deep (pytest-xdist's, in a test) must not stop a boot."""
    deep = tmp_path / ("d" * 60)
    deep.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    work = machine._work_dir()
    try:
        assert work.parent == Path("/tmp")
        assert len(os.fsencode(work / machine._LONGEST_SOCKET)) <= ssh.SOCKET_PATH_MAX
    finally:
        work.rmdir()
    short = Path(tempfile.mkdtemp(prefix="t", dir=deep.anchor + "tmp"))  # /tmp/tXXXXXXXX
    monkeypatch.setattr(tempfile, "tempdir", str(short))
    try:
        work = machine._work_dir()
        assert work.parent == short, "a TMPDIR short enough is kept"
        work.rmdir()
    finally:
        short.rmdir()


def test_a_measured_boot_must_name_a_listed_artifact(tmp_path: Path) -> None:
    """manifest.json's measured_boot names the UKI whose PCR 11 it predicts: that file must be
    one of the artifacts the signature covers, or the prediction names nothing."""
    data = _manifest(5, 20).model_dump(mode="json")
    booted = {"file": "amnesiac.efi", "pcr11_sha256": "1" * 64, "pcr12_sha256": "0" * 64}
    with pytest.raises(UsageError, match=r"amnesiac\.efi \(measured_boot\.file\) not listed"):
        Manifest.parse(json.dumps({**data, "measured_boot": booted}), tmp_path / "manifest.json")
    data["artifacts"]["amnesiac.efi"] = {"sha256": "2" * 64, "size": 3}
    parsed = Manifest.parse(json.dumps({**data, "measured_boot": booted}), tmp_path / "manifest.json")
    assert parsed.measured_boot is not None and parsed.measured_boot.phases == []
