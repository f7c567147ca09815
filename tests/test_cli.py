"""The command line: one-line errors with exit codes, JSON where asked, no tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from amnesiac.cli import main

REPO = Path(__file__).resolve().parent.parent


def amnesiac(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "amnesiac.cli", *args], capture_output=True, text=True, check=False
    )


def test_policy_show_table() -> None:
    result = amnesiac("policy", "show", str(REPO / "policies/ovpn.yml"))
    assert result.returncode == 0, result.stderr
    assert "no-disk-storage" in result.stdout
    assert "ram_root" in result.stdout
    assert "not verifiable by software" in result.stdout


def test_policy_show_json() -> None:
    result = amnesiac("policy", "show", "--json", str(REPO / "policies/ovpn.yml"))
    data = json.loads(result.stdout)
    claim = next(c for c in data["claims"] if c["id"] == "vpn-no-write")
    assert claim["kind"] == "technical"
    assert {c["role"] for c in claim["controls"]} >= {"openvpn_server"}
    assert data["roles"][:2] == ["server_base", "ssh_admin"]


def test_malformed_policy_is_one_line_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text("schema: 1\npolicy: [\n")
    result = amnesiac("policy", "show", str(bad))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"{bad}:" in lines[0]
    assert "Traceback" not in result.stderr


def test_build_needs_root_or_tools_one_line(monkeypatch: object, tmp_path: Path) -> None:
    # A --var naming no role variable is refused before anything is built.
    result = amnesiac("build", "--var", "no_such_var=1", "--out", str(tmp_path / "x"))
    assert result.returncode == 2
    assert "no role declares this variable" in result.stderr
    assert not (tmp_path / "x").exists()


def test_bad_var_value_type(tmp_path: Path) -> None:
    result = amnesiac("build", "--var", "ram_root_tmpfs_size_mib=lots", "--out", str(tmp_path / "x"))
    assert result.returncode == 2
    assert "must be of type int" in result.stderr


def test_main_returns_exit_code(tmp_path: Path) -> None:
    assert main(["policy", "show", str(tmp_path / "missing.yml")]) == 2
