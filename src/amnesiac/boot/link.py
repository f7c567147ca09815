"""A client link: a second guest NIC whose other end is a tap device in a network namespace the
harness creates and removes, for clients that must reach the guest as a VPN client would.

QEMU's isolated user network (`restrict=on`) drops every UDP datagram the guest sends that is
not DHCP, so a client on 127.0.0.1 cannot hold a UDP session with the guest's OpenVPN. The link
carries it instead, and reaches nothing else: the namespace holds the tap device, its own
loopback, a DHCP server that gives the guest one address and no router, and whatever client a
check runs inside it (`ip netns exec`). Nothing of it touches the host's own network.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from amnesiac.boot.errors import BootError
from amnesiac.run import run, spawn, stop_group

# RFC 2544's benchmarking range: never routed, and only inside the namespace and the guest.
HOST_ADDRESS = "198.18.0.1"
GUEST_ADDRESS = "198.18.0.2"
PREFIX = 24
GUEST_MAC = "52:54:00:a0:00:02"  # the link's NIC in the guest (the first NIC is QEMU's default)
# <linux/if_tun.h>
_TUNSETIFF = 0x400454CA
_IFF_TAP, _IFF_NO_PI, _IFF_VNET_HDR = 0x0002, 0x1000, 0x4000


@dataclass
class ClientLink:
    """The namespace, its tap device and the guest's address on the link."""

    netns: str
    tap: str
    tap_fd: int = -1  # the tap, opened by the harness: QEMU is given it, and a restarted QEMU again
    guest_address: str = GUEST_ADDRESS
    _stack: contextlib.ExitStack | None = field(default=None, repr=False)

    def qemu_args(self) -> list[str]:
        return [
            "-netdev", f"tap,id=link0,fd={self.tap_fd}",
            "-device", f"virtio-net-pci,netdev=link0,mac={GUEST_MAC}",
        ]  # fmt: skip

    def command(self, argv: list[str]) -> list[str]:
        """`argv` run inside the link's namespace."""
        return ["ip", "netns", "exec", self.netns, *argv]


@contextlib.contextmanager
def client_link(work: Path) -> Iterator[ClientLink]:
    """Create the tap device and open it (QEMU is given the descriptor, so the device can live in
    the namespace before QEMU starts, and through a restart); `attach()` it. On the way out,
    whatever happened: the DHCP server stopped, the namespace and the device gone."""
    token = secrets.token_hex(4)
    link = ClientLink(netns=f"amnesiac-link-{token}", tap=f"amlink{token}")
    with contextlib.ExitStack() as stack:
        # Registered first, run last: wherever the device is by then, it goes.
        stack.callback(_quiet, ["ip", "link", "del", link.tap])
        stack.callback(_quiet, ["ip", "netns", "del", link.netns])
        stack.callback(_quiet, ["ip", "-n", link.netns, "link", "del", link.tap])
        run(["ip", "tuntap", "add", "dev", link.tap, "mode", "tap"], capture=True)
        link.tap_fd = _open_tap(link.tap)
        stack.callback(os.close, link.tap_fd)
        link._stack = stack
        yield link


def attach(link: ClientLink, work: Path) -> None:
    """Move the tap device into a new namespace, address it, serve DHCP (its open descriptor
    stays attached to it)."""
    stack = link._stack
    if stack is None:
        raise RuntimeError("attach() is for a link inside client_link()")
    run(["ip", "netns", "add", link.netns], capture=True)
    ns = ["ip", "-n", link.netns]
    for argv in (
        ["ip", "link", "set", "dev", link.tap, "netns", link.netns],
        [*ns, "link", "set", "lo", "up"],
        [*ns, "addr", "add", f"{HOST_ADDRESS}/{PREFIX}", "dev", link.tap],
        [*ns, "link", "set", link.tap, "up"],
    ):
        run(argv, capture=True)
    config = work / "udhcpd.conf"
    config.write_text(
        "\n".join(
            [
                f"start {link.guest_address}",
                f"end {link.guest_address}",
                f"interface {link.tap}",
                f"lease_file {work / 'udhcpd.leases'}",
                f"pidfile {work / 'udhcpd.pid'}",
                "max_leases 1",
                # No router and no DNS server: the guest learns one address and no way anywhere.
                f"option subnet {_netmask(PREFIX)}",
                "option lease 3600",
                "",
            ]
        )
    )
    (work / "udhcpd.leases").touch()
    dhcp = spawn(
        link.command(["busybox", "udhcpd", "-f", str(config)]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    stack.callback(stop_group, dhcp, term_timeout=5)
    if dhcp.poll() is not None:
        raise BootError(f"the client link's DHCP server (busybox udhcpd) stopped at once ({dhcp.returncode})")


def _open_tap(name: str) -> int:
    """Attach to the tap device `name` as QEMU would itself (tap-linux.c: no packet information,
    virtio-net headers)."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(
            fd, _TUNSETIFF, struct.pack("16sH22x", name.encode(), _IFF_TAP | _IFF_NO_PI | _IFF_VNET_HDR)
        )
    except OSError:
        os.close(fd)
        raise
    return fd


def _netmask(prefix: int) -> str:
    mask = (0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF
    return ".".join(str(mask >> shift & 0xFF) for shift in (24, 16, 8, 0))


def _quiet(argv: list[str]) -> None:
    """Cleanup that must not fail the way out (the device may already be gone)."""
    run(argv, check=False, capture=True)
