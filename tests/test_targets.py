"""The table of target backends: every kind has one, and --target reads only the table."""

from __future__ import annotations

from pathlib import Path

import pytest

from amnesiac import targets
from amnesiac.checks.meta import Surface
from amnesiac.errors import UsageError
from amnesiac.report.model import Target as ReportTarget
from amnesiac.targets import TargetKind


def test_every_kind_has_its_backend_module() -> None:
    for kind in TargetKind:
        backend = kind.backend
        assert backend.kind is kind, kind
        assert backend.__module__ == f"amnesiac.targets.{kind.value}"
        assert backend.form.startswith(backend.prefix) and backend.help


@pytest.fixture
def build(tmp_path: Path) -> Path:
    (tmp_path / "build").mkdir()
    (tmp_path / "build" / "manifest.json").write_text("{}")
    (tmp_path / "root" / "etc").mkdir(parents=True)
    return tmp_path


@pytest.mark.parametrize(
    ("spec", "kind", "surface", "address"),
    [
        ("ssh://vpn1.example.net", TargetKind.SSH, Surface.BOOTED, "root@vpn1.example.net:22"),
        ("ssh://ops@[::1]:2222", TargetKind.SSH, Surface.BOOTED, "ops@[::1]:2222"),
        ("podman://amnesiac-molecule-no_logs", TargetKind.PODMAN, Surface.CONTAINER, None),
    ],
)
def test_parse_each_form(spec: str, kind: TargetKind, surface: Surface, address: str | None) -> None:
    target = targets.parse(spec)
    assert target.kind is kind and target.surface is surface
    assert target.address == (address or spec.removeprefix(target.prefix))
    report_form = ReportTarget(kind=kind, address=target.address).spec
    assert report_form == target.spec


def test_parse_directories(build: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(build)
    qemu = targets.parse("qemu:build")
    assert qemu.kind is TargetKind.QEMU and qemu.build_dir == build / "build"
    chroot = targets.parse("chroot:root")
    assert chroot.kind is TargetKind.CHROOT and chroot.surface is Surface.ROOTFS
    with pytest.raises(UsageError, match="not a build directory"):
        targets.parse("qemu:root")
    # A build directory: its initrd is unpacked for the run (tests/image/test_verify_rootfs.py).
    unpacked = targets.parse("chroot:build")
    assert unpacked.kind is TargetKind.CHROOT and unpacked.build_dir == build / "build"
    (build / "empty").mkdir()
    with pytest.raises(UsageError, match="neither a root filesystem"):
        targets.parse("chroot:empty")


@pytest.mark.parametrize(
    "spec", ["vpn1", "ssh://", "ssh://-oProxyCommand=x", "ssh://h:70000", "ssh://h/path", "podman://a b"]
)
def test_a_malformed_target_is_one_usage_error(spec: str) -> None:
    with pytest.raises(UsageError, match=r"^--target"):
        targets.parse(spec)


def test_the_forms_come_from_the_table() -> None:
    with pytest.raises(UsageError) as raised:
        targets.parse("tftp://x")
    assert all(kind.backend.form in str(raised.value) for kind in TargetKind)
