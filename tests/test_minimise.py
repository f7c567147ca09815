"""Module pruning keeps the allowlist and its dependencies, and nothing else."""

from __future__ import annotations

from pathlib import Path

import pytest

from amnesiac.image import minimise

MODULES = {
    "kernel/drivers/net/virtio_net.ko.xz": ["kernel/net/core/failover.ko.xz"],
    "kernel/net/core/failover.ko.xz": [],
    "kernel/drivers/usb/core/usbcore.ko.xz": [],
    "kernel/drivers/usb/host/xhci-hcd.ko.xz": ["kernel/drivers/usb/core/usbcore.ko.xz"],
    "kernel/drivers/block/virtio_blk.ko.xz": [],
    "kernel/net/netfilter/nft_log.ko.xz": [],
    "kernel/net/netfilter/nft_ct.ko.xz": [],
    "kernel/drivers/net/tun.ko.xz": [],
}


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    moddir = tmp_path / "usr/lib/modules/6.12.0-test"
    for module in MODULES:
        (moddir / module).parent.mkdir(parents=True, exist_ok=True)
        (moddir / module).write_bytes(b"")
    (moddir / "modules.dep").write_text("".join(f"{m}: {' '.join(d)}\n" for m, d in MODULES.items()))
    (tmp_path / "etc/amnesiac/modules.d").mkdir(parents=True)
    (tmp_path / "etc/amnesiac/modules.d/vpn.conf").write_text("# the VPN role\ntun\n")
    allow = tmp_path / "allow"
    allow.mkdir()
    (allow / "modules.allow").write_text("virtio-net\nnft_*\n!nft_log\n")
    monkeypatch.setattr(minimise.paths, "image_dir", lambda: allow)
    monkeypatch.setattr(minimise, "run", lambda *a, **k: None)  # depmod runs in the real image only
    return tmp_path


def test_allowlist_dependencies_and_role_requests(tree: Path) -> None:
    kept, removed = minimise.prune_modules(tree, "6.12.0-test")
    left = {p.name for p in (tree / "usr/lib/modules/6.12.0-test").rglob("*.ko.xz")}
    assert left == {"virtio_net.ko.xz", "failover.ko.xz", "nft_ct.ko.xz", "tun.ko.xz"}
    assert (kept, removed) == (4, 4)
    assert not (tree / "usr/lib/modules/6.12.0-test/kernel/drivers/usb").exists(), "empty directories go too"
