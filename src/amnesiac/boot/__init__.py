"""Netboot a build in QEMU the way a server boots: iPXE ROM, then HTTP from a loopback server.

- `image`: the build being booted (checked against manifest.json) and the files served for it
- `overlay`: the boot-time overlay (a test key, a VPN identity) and the iPXE harness script
- `http`: the loopback HTTP server that hashes every response as it sends it
- `qemu`: the QEMU command line, its isolated network and the emulated test devices
- `accel`: KVM or TCG, by probing
- `qmp`: a minimal QMP client
- `emulator`: QEMU's process, and the one boot more allowed when TCG kills the first
- `machine`: `running()`, the booted machine and its cleanup (the API verify uses)
- `command`: `amnesiac boot`
- `errors`: BootError, and ImageMismatch when what would boot is not what was built
- `firmware`: measured boots under UEFI with a TPM: the test UKI, or a PXE root netbooted by a
  signed iPXE (`UefiNetboot`)
"""

from amnesiac.boot.accel import choose_accel
from amnesiac.boot.command import command
from amnesiac.boot.errors import BootError, ImageMismatch
from amnesiac.boot.firmware import UefiNetboot
from amnesiac.boot.image import ServedFiles, memory_mib, served_from_pxe_root
from amnesiac.boot.machine import BootedMachine, BootOptions, running
from amnesiac.boot.overlay import OverlayFile
from amnesiac.boot.qemu import GUEST_HTTP, NETDEV, GuestService

__all__ = [
    "GUEST_HTTP",
    "NETDEV",
    "BootError",
    "BootOptions",
    "BootedMachine",
    "GuestService",
    "ImageMismatch",
    "OverlayFile",
    "ServedFiles",
    "UefiNetboot",
    "choose_accel",
    "command",
    "memory_mib",
    "running",
    "served_from_pxe_root",
]
