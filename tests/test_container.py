"""The molecule base image's inputs and the environment molecule gets (nothing is built here)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from amnesiac import container
from amnesiac.image.plan import read_list
from amnesiac.paths import image_dir
from amnesiac.roles import catalog

REPO = Path(__file__).resolve().parent.parent


def test_spec_holds_every_role_package_and_no_kernel() -> None:
    spec = container.spec()
    assert spec.suite == "trixie"
    assert spec.mirror.startswith("http")
    for role in catalog().values():
        assert set(role.packages) <= set(spec.packages), role.name
    assert {"python3", "python3-apt"} <= set(spec.packages)  # Ansible's modules
    assert not set(spec.packages) & container.KERNEL_PACKAGES
    assert set(read_list(image_dir() / "packages.txt")) - container.KERNEL_PACKAGES <= set(spec.packages)
    assert list(spec.packages) == sorted(spec.packages)


def test_key_changes_with_every_input() -> None:
    spec = container.spec()
    key = spec.key("1.3.5")
    assert key == container.spec().key("1.3.5"), "the key is not stable"
    others = {
        replace(spec, suite="forky").key("1.3.5"),
        replace(spec, mirror="http://mirror.example/debian").key("1.3.5"),
        replace(spec, packages=(*spec.packages, "curl")).key("1.3.5"),
        spec.key("1.3.6"),
    }
    assert key not in others and len(others) == 4


def test_shell_exports_survive_eval() -> None:
    env = {"A": "plain", "B": "with space and 'quote'", "C": "$HOME;`x`"}
    script = container.shell_exports(env) + 'printf "%s\\n" "$A" "$B" "$C"'
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == list(env.values())


def fake_image() -> container.BaseImage:
    return container.BaseImage(
        "localhost/amnesiac-base:trixie-0123456789abcdef",
        "0123456789abcdef",
        Path("/nonexistent.tar"),
        built=False,
        imported=False,
        seconds=0.0,
    )


def test_molecule_state_stays_under_build(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(container, "needs", tuple)
    monkeypatch.delenv("CONTAINERS_CONF", raising=False)
    env = container.molecule_env(fake_image(), "no_logs")
    build = REPO / "build" / "molecule"
    assert env["AMNESIAC_BASE_IMAGE"].endswith(":trixie-0123456789abcdef")
    assert Path(env["ANSIBLE_HOME"]).is_relative_to(build)
    assert Path(env["MOLECULE_EPHEMERAL_DIRECTORY"]) == build / "state" / "no_logs"
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert "CONTAINERS_CONF" not in env, "a host that needs nothing keeps podman's defaults"


def test_podman_settings_only_where_needed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONTAINERS_CONF", raising=False)
    monkeypatch.setattr(container, "needs", lambda: ("cgroup v1 or hybrid hierarchy",))
    conf = container.molecule_env(fake_image())["CONTAINERS_CONF"]
    assert Path(conf) == REPO / "molecule" / "containers.conf"
    assert 'runtime = "runc"' in Path(conf).read_text()
    # One the caller chose is kept.
    monkeypatch.setenv("CONTAINERS_CONF", "/etc/elsewhere.conf")
    assert "CONTAINERS_CONF" not in container.molecule_env(fake_image())
    assert container.podman_env()["CONTAINERS_CONF"] == "/etc/elsewhere.conf"


def test_needs_names_its_reasons() -> None:
    reasons = container.needs()
    assert all(isinstance(r, str) and r for r in reasons)


def test_molecule_shell_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONTAINERS_CONF", raising=False)
    monkeypatch.setattr(container, "needs", lambda: ("cgroup v1 or hybrid hierarchy",))
    text = container.molecule_shell(fake_image())
    assert text.startswith("# containers.conf: cgroup v1 or hybrid hierarchy\n")
    assert "export CONTAINERS_CONF=" in text
    monkeypatch.setattr(container, "needs", tuple)
    assert not container.molecule_shell(fake_image()).startswith("#")
