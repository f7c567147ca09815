"""No disk: the root filesystem is a size-limited tmpfs, nothing is mounted from a block device.

The QEMU harness attaches a virtio disk and a USB stick, so "no block device" is observed with
devices that are really there.
"""

from __future__ import annotations

from amnesiac.checks.expectations import Expectations
from amnesiac.checks.meta import KERNEL, Surface, check
from amnesiac.checks.probe import Probe

STORAGE_MODULES = (
    "ahci", "libata", "ata_piix", "sd_mod", "sr_mod", "nvme", "nvme_core", "virtio_blk", "virtio_scsi",
    "scsi_mod", "usb_storage", "uas", "mmc_block", "sdhci", "floppy", "xen_blkfront", "megaraid_sas",
    "mpt3sas", "hpsa", "aacraid", "smartpqi", "vmw_pvscsi", "hv_storvsc",
)  # fmt: skip
# PCI class 0x01xxxx: mass storage controllers (virtio-blk, AHCI, NVMe, SCSI HBAs).
PCI_STORAGE_CLASS = "0x01"


def _mounts(probe: Probe) -> list[list[str]]:
    out = probe.run("cat /proc/self/mounts").stdout
    return [line.split() for line in out.splitlines() if line.strip()]


@check(
    claims=["no-disk-storage", "no-pii-on-server"],
    rationale="/ is a tmpfs (RAM) whose size is the reviewed limit, so nothing the server keeps "
    "survives a power cut and the whole root cannot outgrow what the policy set.",
    targets=KERNEL,
    not_applicable="an unpacked root or a container shares the host's mounts",
)
def root_is_size_limited_tmpfs(probe: Probe, expected: Expectations) -> None:
    root = [m for m in _mounts(probe) if m[1] == "/"]
    assert root, "no / in /proc/self/mounts"
    source, _, fstype, options = root[-1][:4]  # the last mount on / is the visible one
    assert fstype == "tmpfs", f"/ is {fstype} from {source}, not tmpfs"
    size = probe.run("stat -f -c '%S %b' /").stdout.split()
    size_bytes = int(size[0]) * int(size[1])
    want = expected.root_tmpfs_size_bytes
    assert want, "the expected root tmpfs size is unknown (no manifest or policy value)"
    assert size_bytes == want, f"/ is a tmpfs of {size_bytes} bytes ({options}), the policy sets {want}"


@check(
    claims=["no-disk-storage", "no-pii-on-server"],
    rationale="Nothing is mounted from a block device, and the disk and USB stick attached to "
    "the machine have no driver: there is nowhere to write that outlives RAM.",
    targets=KERNEL,
    not_applicable="an unpacked root or a container shares the host's devices and mounts",
)
def no_block_device_mounted(probe: Probe, expected: Expectations) -> None:
    from_devices = [m for m in _mounts(probe) if m[0].startswith("/dev/")]
    assert from_devices == [], f"mounted from block devices: {from_devices}"
    blocks = probe.run("ls -1 /sys/block").stdout.split()
    real = [b for b in blocks if not b.startswith(("loop", "ram", "zram"))]
    assert real == [], f"block devices exist: {real}"
    # The controllers are on the bus (the harness attached them) but no driver claims them.
    controllers = probe.pci_devices(PCI_STORAGE_CLASS)
    if expected.test_devices_attached:
        assert controllers, (
            "positive control: the harness attached a virtio disk but no storage controller is on the bus"
        )
    # virtio-pci is only the transport; the disk driver would be virtio_blk on the virtio bus.
    virtio = probe.run(
        "for v in /sys/bus/virtio/devices/*; do [ -e $v/device ] || continue; "
        'echo "$(basename $v) device=$(cat $v/device) '
        'driver=$(basename "$(readlink $v/driver)" 2>/dev/null)"; done'
    ).stdout.splitlines()
    bound = [" ".join(c) for c in controllers if c[2] not in ("", "virtio-pci")]
    # virtio device ids: 0x0002 block, 0x0008 SCSI host.
    bound += [line for line in virtio if line.split()[1] in ("device=0x0002", "device=0x0008")
              and not line.endswith("driver=")]  # fmt: skip
    assert bound == [], f"storage controllers with a driver: {bound}"


@check(
    claims=["no-disk-storage", "no-pii-on-server"],
    rationale="No swap: memory pages, which may hold client data, are never written to a device.",
    targets=KERNEL,
    not_applicable="swap is the host's in a container, and nothing runs in an unpacked root",
)
def no_swap(probe: Probe) -> None:
    swaps = probe.run("cat /proc/swaps").stdout.strip().splitlines()[1:]
    assert swaps == [], f"swap in use: {swaps}"


@check(
    claims=["no-disk-storage", "no-pii-on-server"],
    rationale="/etc/fstab has no entry, so no boot and no later `mount -a` mounts a disk.",
)
def fstab_empty(probe: Probe) -> None:
    result = probe.run("cat /etc/fstab")
    entries = [
        line for line in result.stdout.splitlines() if line.strip() and not line.lstrip().startswith("#")
    ]
    assert entries == [], f"/etc/fstab has entries: {entries}"
    units = probe.run(
        "find /etc/systemd/system /usr/lib/systemd/system \\( -name '*.swap' -o -name '*.mount' \\) "
        "-exec grep -l '^What=/dev/' {} + 2>/dev/null"
    ).stdout.split()
    assert units == [], f"mount or swap units for devices: {units}"


@check(
    claims=["no-disk-storage"],
    rationale="The image carries no driver for disks, SCSI, NVMe or USB storage, so an attached "
    "disk cannot even be seen, and no such driver is loaded.",
)
def no_storage_drivers(probe: Probe, kind: Surface) -> None:
    names = "\\|".join(m.replace("_", "[-_]") for m in STORAGE_MODULES)
    files = probe.run(f"find /usr/lib/modules -regex '.*/\\({names}\\)\\.ko\\(\\.[a-z]+\\)?' 2>/dev/null")
    assert files.stdout.strip() == "", f"storage driver modules in the image: {files.stdout.split()}"
    if kind is Surface.BOOTED:
        loaded = probe.run("cat /proc/modules").stdout.split("\n")
        found = [line.split()[0] for line in loaded if line and line.split()[0] in STORAGE_MODULES]
        assert found == [], f"storage drivers loaded: {found}"
