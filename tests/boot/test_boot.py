"""A real boot in QEMU as a server with a TPM boots (UEFI, swtpm, the build's UKI with the test
key's overlay), and a netboot over iPXE from 127.0.0.1 (`amnesiac boot --netboot`).

The module's machine is booted twice: its first QEMU is made to die as the emulator does, 1 boot
in about 20 under TCG (boot/emulator.py), so every test here also shows that the boot the harness
starts again is whole: the TPM attests it, its test devices are blank, its client link carries.

The image is $AMNESIAC_BOOT_BUILD (a build to reuse while developing), else the session's OVPN image.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from amnesiac import attest, boot
from amnesiac.boot import link, memory
from amnesiac.boot.emulator import Emulator
from amnesiac.boot.qemu import KERNEL_STARTED, read_log
from amnesiac.image import uki
from tests.boot.shell import ssh
from tests.images import GUEST_LANE, Built

pytestmark = [pytest.mark.boot, GUEST_LANE]

REPO = Path(__file__).resolve().parents[2]
SSH_TIMEOUT = 600.0
MIB = 1024**2


@pytest.fixture(scope="module")
def image(request: pytest.FixtureRequest) -> Path:
    """$AMNESIAC_BOOT_BUILD (a build to reuse while developing), else the session's OVPN image."""
    if os.geteuid() != 0:
        pytest.skip("booting needs root (and building an image does too)")
    if shutil.which("qemu-system-x86_64") is None or shutil.which("ssh") is None:
        pytest.fail("qemu-system-x86_64 and ssh are needed: run `make setup`")
    if env := os.environ.get("AMNESIAC_BOOT_BUILD"):
        return Path(env)
    built: Built = request.getfixturevalue("ovpn")
    return built.out


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("key") / "id_ed25519"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "amnesiac-boot-test", "-f", str(path)],
        check=True,
    )
    return path


INJECTED_OOPS = "[    9.999999] Oops: injected by the test (the emulator's failure)\n"


def _die_as_the_emulator_does(process: subprocess.Popen[bytes], serial: Path) -> None:
    """Once the kernel runs /init: QEMU stopped, an oops line at the end of its console, QEMU
    killed (stopped first, so that it cannot write over the line). Bounded: 300 s."""
    deadline = time.monotonic() + 300
    while KERNEL_STARTED not in read_log(serial):
        if time.monotonic() > deadline or process.poll() is not None:
            return
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGSTOP)
    with serial.open("a") as console:
        console.write(INJECTED_OOPS)
    os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def machine(image: Path, key: Path) -> Iterator[boot.BootedMachine]:
    start = Emulator.start

    def start_then_die_once(emulator: Emulator) -> subprocess.Popen[bytes]:
        process = start(emulator)
        if emulator.lost is None:  # the first start
            chardev = next(arg for arg in emulator.argv if arg.startswith("file,id=serial0,"))
            serial = Path(chardev.split("path=")[1])
            threading.Thread(target=_die_as_the_emulator_does, args=(process, serial), daemon=True).start()
        return process

    options = boot.BootOptions(ssh_key=key.with_suffix(".pub"), client_link=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Emulator, "start", start_then_die_once)
        with boot.running(image, options) as booted:
            booted.wait_ssh(SSH_TIMEOUT)
            print(f"\nSSH up {booted.ssh_ready_seconds} s after QEMU started ({booted.accel.reason})")
            yield booted
    assert booted.process.poll() is not None, "QEMU still running after running()"
    assert not booted.serial_log.exists(), "temporary files left behind"


def test_ssh_with_the_overlay_key(machine: boot.BootedMachine, key: Path) -> None:
    assert machine.ssh_banner.startswith("SSH-2.0-")
    assert ssh(machine, key, "id -u").strip() == "0"


def test_a_boot_the_emulator_lost_is_booted_again_once(machine: boot.BootedMachine, key: Path) -> None:
    assert machine.emulator_retry is not None and "injected by the test" in machine.emulator_retry
    assert INJECTED_OOPS.strip() not in machine.console(), "the console is the second boot's"
    # The link's tap device, given to QEMU open, carried the second boot's DHCP exchange.
    wait = (
        f"for i in $(seq 60); do ip -4 -o addr | grep -qF ' {link.GUEST_ADDRESS}/' && exit 0; sleep 1; done"
    )
    ssh(machine, key, f"{wait}; ip -4 -o addr; exit 1")


def test_the_tpm_attests_what_was_built(machine: boot.BootedMachine, key: Path) -> None:
    """The boot was measured: the TPM's quote, made by the image's own tool with the key enrolled
    before the boot, holds the PCR 11 that manifest.json and the overlay predict."""
    measured = machine.measured
    assert measured is not None, "a build with a UKI boots measured"
    manifest = machine.image.manifest
    assert measured.parts["vmlinuz"] == manifest.artifacts["vmlinuz"].sha256
    assert measured.parts["initrd.img"] == manifest.artifacts["initrd.img"].sha256 == manifest.image.sha256
    assert measured.parts["overlay.cpio"] == measured.overlay_sha256 == machine.overlay_sha256
    assert measured.tampered is None
    # Under Secure Boot with the harness's provider key: the kernel says so, and ignores any
    # loader command line (PCR 12 stays zero either way).
    assert measured.secure_boot
    assert "Secure boot enabled" in ssh(machine, key, "dmesg")
    nonce = attest.new_nonce()
    answer = attest.parse_guest_output(ssh(machine, key, attest.guest_command(nonce)))
    verdict = attest.check(measured.ak_pem, answer, nonce, measured.expected_pcrs)
    assert verdict.attested, verdict.why()
    print(f"\nattested: PCR 7 {verdict.pcrs[7]}, PCR 11 {verdict.pcrs[11]}, {measured.timings}")


def test_booted_the_manifest_cmdline_on_a_tmpfs_root(machine: boot.BootedMachine, key: Path) -> None:
    cmdline = ssh(machine, key, "cat /proc/cmdline").split()
    # Measured: the UKI's own command line, without iPXE's initrd= (image/uki.py).
    assert cmdline == uki.uki_cmdline(machine.image.cmdline).split()
    assert ssh(machine, key, "findmnt -n -o FSTYPE /").strip() == "tmpfs"


def test_without_a_provider_identity_the_server_serves_no_one_and_says_so(
    machine: boot.BootedMachine, key: Path
) -> None:
    """Booted without the per-host overlay of provider_agent: the console says why, the agent
    does not run, so OpenVPN authenticates nobody."""
    assert "amnesiac: no provider identity" in machine.console(), machine.console(20)
    state = ssh(machine, key, "systemctl is-active amnesiac-provider-agent.service || true").strip()
    assert state == "inactive"
    assert ssh(machine, key, "systemctl is-active openvpn-server@server.service").strip() == "active"


def test_test_devices_are_attached(machine: boot.BootedMachine) -> None:
    attached = {d["name"] for d in machine.qmp("qom-list", path="/machine/peripheral")}
    assert {"xhci", "kbd0", "stick0", "disk0"} <= attached
    assert all(d.is_blank() for d in machine.devices), "the image wrote to a disk"


def test_the_whole_ram_is_searched_from_the_host(machine: boot.BootedMachine, key: Path) -> None:
    """Canaries planted in the guest's page cache (a tmpfs file) and in a process's memory (its
    environment) are found in the dump of its RAM; a string the guest never saw is not."""
    token = secrets.token_hex(8)
    cache, process, never = (f"amnesiac-{kind}-{token}" for kind in ("cache", "process", "never"))
    # Detached (ssh would wait for its output), its PID kept so that only it is stopped after.
    holder = f"echo $$ > /dev/shm/canary.pid; exec env CANARY={process} sleep 900"
    ssh(
        machine,
        key,
        f"printf %s {cache} > /dev/shm/canary && setsid -f sh -c '{holder}' </dev/null >/dev/null 2>&1",
    )
    # setsid returns before its child has exec'd sleep; under emulation the dump could start
    # first and find only the command line's freed copies (CI, stop 19). Wait, bounded.
    running = 'test "$(cat /proc/$(cat /dev/shm/canary.pid 2>/dev/null)/comm 2>/dev/null)" = sleep'
    ssh(machine, key, f"for i in $(seq 100); do {running} && exit 0; sleep 0.1; done; exit 1")
    try:
        found = machine.search_memory(
            {"cache": cache.encode(), "process": process.encode(), "never": never.encode()}
        )
        # What holds each hit, asked of the guest's kernel while the canaries are still there.
        addresses = found.hits["cache"] + found.hits["process"]
        kinds = memory.page_kinds(ssh(machine, key, memory.kpageflags_command(addresses)))
    finally:
        ssh(
            machine,
            key,
            "kill $(cat /dev/shm/canary.pid) 2>/dev/null; rm -f /dev/shm/canary /dev/shm/canary.pid",
        )
    where = {
        name: sorted({kinds.get(address // memory.PAGE_SIZE, "?") for address in found.hits[name]})
        for name in ("cache", "process")
    }
    print(f"\nsearched {found.searched_bytes / MIB:.0f} MiB in {found.seconds} s; hits held by {where}")
    assert found.found("cache") and found.found("process"), found.as_dict()
    assert not found.found("never"), found.as_dict()
    assert "tmpfs or shared memory" in where["cache"], where
    assert "process memory (anonymous)" in where["process"], where
    assert found.searched_bytes >= 0.9 * machine.memory_mib * MIB  # all of its RAM, not a part
    assert all(address < machine.memory_mib * MIB for address in found.hits["cache"])  # below 4 GiB: all RAM


# QMP quit (10 s at most), then QEMU's grace (10 s) and SIGTERM (5 s): a bound, with room for load.
CLEANUP_BOUND = 60


def _stopped_within(proc: subprocess.Popen[str], seconds: float) -> str:
    """The stderr of a process that ended within `seconds`; else fail with its Python stacks."""
    try:
        return proc.communicate(timeout=seconds)[1]
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)  # faulthandler prints every thread's stack, then it dies
        _, err = proc.communicate(timeout=30)
        pytest.fail(f"not ended {seconds} s after SIGTERM; where it was:\n{err[-6000:]}")


def test_cli_ready_json_then_sigterm_leaves_nothing(image: Path, key: Path, tmp_path: Path) -> None:
    # faulthandler: should the cleanup hang, SIGABRT makes the process print where it is stuck.
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONFAULTHANDLER": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "amnesiac.cli",
            "boot",
            str(image),
            "--ssh-key",
            f"{key}.pub",
            "--json",
            "--netboot",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
    try:
        assert proc.stdout is not None
        lines = []
        while not (lines and lines[-1] == "}\n"):
            line = proc.stdout.readline()
            if not line:
                pytest.fail(f"amnesiac boot ended before ready: {proc.stderr.read() if proc.stderr else ''}")
            lines.append(line)
        ready = json.loads("".join(lines))
        assert ready["ssh_ready_seconds"] > 0
        # Netbooted over iPXE: every file the guest fetched is the build's, whole.
        assert ready["measured_boot"] is None
        manifest = json.loads((image / "manifest.json").read_text())
        served = {r["name"]: r for r in ready["served"] if r["status"] == 200}
        for name in ("boot.ipxe", "vmlinuz", "initrd.img"):
            assert served[name]["sha256"] == manifest["artifacts"][name]["sha256"], name
            assert served[name]["complete"], name
        assert served["overlay.cpio"]["sha256"] == ready["overlay_sha256"]
        assert ready["ssh"]["host"] == "127.0.0.1"
        qemu_pid = ready["qemu_pid"]
        os.kill(qemu_pid, 0)  # running
    finally:
        proc.send_signal(signal.SIGTERM)
        err = _stopped_within(proc, CLEANUP_BOUND)
    assert proc.returncode == 143, err  # 128 + SIGTERM
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):
        os.kill(qemu_pid, 0)
    assert list(tmp_path.iterdir()) == [], "temporary files left behind"
