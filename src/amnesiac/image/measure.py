"""What systemd-stub measures into PCR 11 when it boots a unified kernel image, predicted.

The stub extends PCR 11 (sha256 bank) twice per section it finds, in a fixed order: once with
the section's name and its NUL, once with the section's contents. The build predicts the value
from the sections actually in the UKI (read with pefile, so the prediction does not trust the
tool that made the file) and cross-checks it with systemd-measure (image/uki.py); verify
compares a TPM quote with it (attest.py). Nothing else reaches PCR 11 on this image: the boot
phases systemd-pcrphase would add need efivarfs, which lockdown keeps out (see `PHASES`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import pefile

BANK = "sha256"
ZEROS = "0" * 64
# systemd-stub's order (src/fundamental/uki.h, unified_sections[], systemd 257); .pcrsig is
# not measured (it holds signatures of these very values).
STUB_ORDER = (
    ".linux", ".osrel", ".cmdline", ".initrd", ".ucode", ".splash", ".dtb", ".uname", ".sbat", ".pcrpkey"
)  # fmt: skip
# The boot phases extended into PCR 11 after the stub: none on this image. systemd-pcrphase
# runs only where systemd knows the UKI was measured (ConditionSecurity=measured-uki, read from
# the stub's EFI variables), and efivarfs never loads (lockdown.no_firmware_store).
PHASES: tuple[str, ...] = ()


def extend(pcr: bytes, measured: bytes) -> bytes:
    """A TPM2_PCR_Extend of the sha256 bank with the digest of `measured`."""
    return hashlib.sha256(pcr + hashlib.sha256(measured).digest()).digest()


def pcr11(sections: Mapping[str, bytes]) -> str:
    """PCR 11 (hex) after systemd-stub measured these sections (name -> contents)."""
    return pcr11_of_digests({name: hashlib.sha256(body).hexdigest() for name, body in sections.items()})


def pcr11_of_digests(digests: Mapping[str, str]) -> str:
    """PCR 11 (hex) from each section's sha256 (hex), as manifest.json records them: what a
    verifier predicts without the UKI itself."""
    pcr = bytes(32)
    for name in STUB_ORDER:
        if name in digests:
            pcr = extend(pcr, name.encode() + b"\0")
            pcr = hashlib.sha256(pcr + bytes.fromhex(digests[name])).digest()
    return pcr.hex()


def uki_sections(uki: Path) -> dict[str, bytes]:
    """The measured sections of a UKI, each cut to its virtual size (the stub measures that
    many bytes; the file pads sections to its alignment)."""
    pe = pefile.PE(str(uki), fast_load=True)
    try:
        found = {}
        for section in pe.sections:
            name = section.Name.rstrip(b"\0").decode("ascii", errors="replace")
            if name in STUB_ORDER:
                found[name] = section.get_data()[: section.Misc_VirtualSize]
        return found
    finally:
        pe.close()
