"""server_base in a container: what it sets up, seen from inside (it enforces no claim itself).

Run by molecule's testinfra verifier against the instance (`--hosts podman://...`).
"""

from __future__ import annotations

from typing import Any

from amnesiac.checks.lockdown import SELF_PROTECTION

MASKED = ("apt-daily.timer", "apt-daily-upgrade.timer", "dpkg-db-backup.timer", "fstrim.timer")


def test_identity(host: Any) -> None:
    assert host.file("/etc/hostname").content_string == "amnesiac\n"
    assert "127.0.1.1\tamnesiac" in host.file("/etc/hosts").content_string
    machine_id = host.file("/etc/machine-id")
    assert machine_id.size == 0 and machine_id.mode == 0o444, "machine-id is not empty and read-only"


def test_root_has_no_password(host: Any) -> None:
    # '*': no password can match (`passwd -S` reports L); keys still work.
    assert host.run("passwd -S root").stdout.split()[1] == "L"
    assert host.run("getent shadow root").stdout.split(":")[1] == "*"


def test_network(host: Any) -> None:
    assert host.service("systemd-networkd").is_enabled
    network = host.file("/etc/systemd/network/89-amnesiac-ethernet.network").content_string
    assert "Type=ether" in network and "ClientIdentifier=mac" in network
    resolv = host.file("/etc/resolv.conf").content_string
    assert "(role server_base)" in resolv, "resolv.conf is not the role's"
    assert [line for line in resolv.splitlines() if line.startswith("nameserver")] == ["nameserver 127.0.0.1"]


def test_system(host: Any) -> None:
    default = host.file("/etc/systemd/system/default.target")
    assert default.linked_to == "/usr/lib/systemd/system/multi-user.target"
    assert host.file("/etc/localtime").linked_to == "/usr/share/zoneinfo/Etc/UTC"
    cmdline = host.file("/etc/amnesiac/cmdline.d/server_base.conf").content_string.splitlines()[-1]
    assert cmdline.split() == [
        "console=ttyS0,115200n8",
        "panic=10",
        "lockdown=confidentiality",
        "sysctl.kernel.kexec_load_disabled=1",
        "systemd.import_credentials=no",
    ]


def test_lockdown_settings(host: Any) -> None:
    """What the booted kernel applies (lockdown.* checks prove it on a booted image; a container
    shares the host's kernel): kexec off and the self-protection settings of image/README.md."""
    settings = host.file("/etc/sysctl.d/60-server_base-lockdown.conf").content_string
    lines = {line.split(" = ")[0]: line.split(" = ")[1] for line in settings.splitlines() if " = " in line}
    # The same table the check lockdown.kernel_self_protection holds the running kernel to.
    assert lines == {**SELF_PROTECTION, "kernel.kexec_load_disabled": "1"}


def test_unused_units_masked(host: Any) -> None:
    states = {unit: host.run(f"systemctl is-enabled {unit}").stdout.strip() for unit in MASKED}
    assert states == dict.fromkeys(MASKED, "masked")


def test_the_quote_tool_runs_on_the_image_python(host: Any) -> None:
    """The TPM quote tool is installed and starts on the image's perl-base; a container has no
    TPM, so it says so (tests/test_attest.py quotes with it against swtpm, verify on a boot)."""
    tool = host.file("/usr/local/libexec/amnesiac/amnesiac-tpm-quote")
    assert tool.mode == 0o755 and tool.user == "root"
    usage = host.run("/usr/local/libexec/amnesiac/amnesiac-tpm-quote")
    assert usage.rc == 1 and "usage: amnesiac-tpm-quote NONCE_HEX" in usage.stderr
    no_tpm = host.run("/usr/local/libexec/amnesiac/amnesiac-tpm-quote 00 /nonexistent/tpmrm0")
    assert no_tpm.rc != 0 and "No such file" in no_tpm.stderr
