"""lockdown.no_firmware_credentials reads what systemd reads: the SMBIOS OEM strings as the kernel
shows them, and the kernel command line as systemd parses it."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pytest

from amnesiac.boot.qemu import FIRMWARE_CANARY, FIRMWARE_CREDENTIAL
from amnesiac.checks.lockdown import _imports_credentials, _offered_credentials, offered_credentials_command


def _type11(handle: int, *strings: str) -> bytes:
    """An SMBIOS type 11 structure as /sys/firmware/dmi/entries/11-N/raw holds it: the header
    (type, length, handle, string count), then the strings, each NUL-terminated, then a NUL."""
    return (
        struct.pack("<BBHB", 11, 5, handle, len(strings))
        + b"".join(s.encode() + b"\0" for s in strings)
        + b"\0"
    )


def test_the_credentials_offered_in_the_oem_strings_are_found_past_the_header(tmp_path: Path) -> None:
    entries = tmp_path / "entries"
    for n, structure in enumerate(
        [_type11(0x0B00, FIRMWARE_CREDENTIAL, "vendor note"), _type11(0x0B01, "io.systemd.credential:a=b")]
    ):
        (entries / f"11-{n}").mkdir(parents=True)
        (entries / f"11-{n}" / "raw").write_bytes(structure)
    (entries / "1-0").mkdir()
    (entries / "1-0" / "raw").write_bytes(b"\x01\x05\x00\x01\x01io.systemd.credential:not=type11\0\0")
    shown = subprocess.run(
        ["bash", "-c", offered_credentials_command(str(entries))], capture_output=True, text=True, check=True
    ).stdout
    offered = _offered_credentials(shown)
    assert offered == {"tmpfiles.extra": f"f {FIRMWARE_CANARY} 0600 root root - firmware", "a": "b"}


def test_no_oem_strings_offer_nothing(tmp_path: Path) -> None:
    command = offered_credentials_command(str(tmp_path))
    shown = subprocess.run(["bash", "-c", command], capture_output=True, text=True, check=False)
    assert shown.returncode == 1 and _offered_credentials(shown.stdout) == {}  # grep found nothing


@pytest.mark.parametrize(
    ("cmdline", "imports"),
    [
        ("console=ttyS0 panic=10", True),  # systemd's default
        ("panic=10 systemd.import_credentials=no", False),
        ("systemd.import-credentials=0 quiet", False),  # '-' and '_' are the same to systemd
        ("systemd.import_credentials=off systemd.import_credentials", True),  # the last wins; alone: yes
        ("systemd.import_credentials=no systemd.import_credentials=yes", True),
        ("rd.systemd.import_credentials=no", True),  # the rd. form applies in an initrd only
    ],
)
def test_the_command_line_is_read_as_systemd_reads_it(cmdline: str, imports: bool) -> None:
    assert _imports_credentials(cmdline) is imports
