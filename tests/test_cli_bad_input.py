"""Bad command lines cost nothing: one line on stderr, the documented exit code, nothing touched.

Each row is a command line a user could type by mistake; none may print a traceback or a usage
block, and none may create, move or delete a file (the directory's listing and hashes are the
same after)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from amnesiac.errors import ExitCode
from tests.test_boot_unit import measured_manifest

REPO = Path(__file__).resolve().parent.parent
USAGE, UNREACHABLE = ExitCode.USAGE, ExitCode.UNREACHABLE
SIZE = "ram_root_tmpfs_size_mib"
REPORT = ["--report", "r"]


def snapshot(root: Path) -> dict[str, str]:
    """Every path under root with its content's hash (directories as 'dir')."""
    found = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        found[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return found


@pytest.fixture
def place(tmp_path: Path) -> Path:
    """A working directory holding what a user has lying around: files that are not builds."""
    (tmp_path / "notes.txt").write_text("mine\n")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"\xff\xd8 not really")
    (tmp_path / "fake-build").mkdir()
    (tmp_path / "fake-build" / "manifest.json").write_text('{"who": "someone else"}')
    (tmp_path / "badshape").mkdir()
    (tmp_path / "badshape" / "manifest.json").write_text("[1, 2]")
    (tmp_path / "inventory.yml").write_text("this is: [not an inventory\n")
    (tmp_path / "measured-build").mkdir()  # a build with a UKI, booted measured: 352 + 64 MiB
    (tmp_path / "measured-build" / "manifest.json").write_text(measured_manifest().model_dump_json())
    return tmp_path


CASES: list[tuple[str, list[str], int, str]] = [
    # build: --out may only be new or a previous build; every argument checked before mmdebstrap
    ("out is a file", ["build", "--out", "notes.txt"], USAGE, "not a directory; refusing"),
    ("out is someone's directory", ["build", "--out", "photos"], USAGE, "not an amnesiac build"),
    ("out has a foreign manifest", ["build", "--out", "fake-build"], USAGE, "not an amnesiac manifest"),
    ("out is empty", ["build", "--out", ""], USAGE, "current directory"),
    ("out is here", ["build", "--out", "."], USAGE, "current directory"),
    ("out below a file", ["build", "--out", "notes.txt/x"], USAGE, "is not a directory"),
    ("cache is a file", ["build", "--out", "new", "--cache", "notes.txt"], USAGE, "--cache"),
    ("secure boot key alone", ["build", "--out", "x", "--secure-boot-key", "notes.txt"], USAGE, "together"),
    (
        "secure boot cert not one",
        ["build", "--out", "new", "--secure-boot-key", "notes.txt", "--secure-boot-cert", "notes.txt"],
        USAGE,
        "--secure-boot-cert notes.txt: not a PEM certificate",
    ),
    ("var without value", ["build", "--out", "new", "--var", SIZE], USAGE, "NAME=VALUE"),
    ("var negative size", ["build", "--out", "new", "--var", f"{SIZE}=-5"], USAGE, "at least 1"),
    ("var zero size", ["build", "--out", "new", "--var", f"{SIZE}=0"], USAGE, "at least 1"),
    ("var not yaml", ["build", "--out", "new", "--var", f"{SIZE}=[1"], USAGE, "not YAML"),
    ("var unknown", ["build", "--out", "new", "--var", "nope=1"], USAGE, "no role declares"),
    ("suite", ["build", "--out", "new", "--suite", "../../etc"], USAGE, "not a Debian suite"),
    ("epoch", ["build", "--out", "new", "--source-date-epoch", "-1"], USAGE, "before 1970"),
    ("epoch text", ["build", "--out", "new", "--source-date-epoch", "soon"], USAGE, "invalid int"),
    ("policy missing", ["build", "--out", "new", "--policy", "nope.yml"], USAGE, "nope.yml"),
    # boot
    ("boot cpus 0", ["boot", "fake-build", "--cpus", "0"], USAGE, "--cpus"),
    ("boot memory 1", ["boot", str(REPO), "--memory", "-1"], USAGE, "--memory"),
    ("boot port", ["boot", "fake-build", "--ssh-port", "70000"], USAGE, "--ssh-port"),
    ("boot timeout", ["boot", "fake-build", "--timeout", "nan"], USAGE, "--timeout"),
    ("boot no build", ["boot", "nothing-here"], USAGE, "no such build directory"),
    ("boot foreign manifest", ["boot", "fake-build"], USAGE, "not an amnesiac manifest"),
    ("boot manifest list", ["boot", "badshape"], USAGE, "not an amnesiac manifest"),
    # verify: bad input is 2; a target that cannot be reached is 4, with no report
    ("verify target form", ["verify", "--target", "vpn1", *REPORT], USAGE, "expected qemu:"),
    ("verify ssh option", ["verify", "--target", "ssh://-oProxyCommand=x", *REPORT], USAGE, "--target"),
    ("verify qemu no build", ["verify", "--target", "qemu:photos", *REPORT], USAGE, "not a build"),
    ("verify qemu bad manifest", ["verify", "--target", "qemu:badshape", *REPORT], USAGE, "manifest"),
    ("verify key missing", ["verify", "--target", "ssh://h", "--ssh-key", "nokey", *REPORT], USAGE,
     "--ssh-key"),
    ("verify inventory missing", ["verify", "--inventory", "none.yml", *REPORT], USAGE, "no such file"),
    ("verify inventory bad", ["verify", "--inventory", "inventory.yml", *REPORT], USAGE, "--inventory"),
    ("verify both", ["verify", "--target", "podman://a", "--inventory", "i.yml"], USAGE, "not allowed with"),
    ("verify memory", ["verify", "--target", "podman://a", "--memory", "0"], USAGE, "--memory"),
    ("verify memory for a uki", ["verify", "--target", "qemu:measured-build", "--memory", "400", *REPORT],
     USAGE, "--memory 400: this image needs at least 416 MiB"),
    ("enrolment not ssh", ["verify", "--target", "podman://a", "--enrolment", "notes.txt", *REPORT], USAGE,
     "--enrolment is for ssh:// targets"),
    ("enrolment and fleet", ["verify", "--inventory", "inventory.yml", "--enrolment", "notes.txt", *REPORT],
     USAGE, "amnesiac_enrolment variable"),
    ("enrol not ssh", ["enrol", "--target", "qemu:photos", "--out", "new.json"], USAGE,
     "reaches a server over SSH"),
    ("enrol over a file", ["enrol", "--target", "ssh://root@127.0.0.1:1", "--out", "notes.txt"], USAGE,
     "an enrolment is never replaced"),
    ("enrol into no directory", ["enrol", "--target", "ssh://h", "--out", "none/vpn1.json"], USAGE,
     "no directory"),
    ("enrol bad cert", ["enrol", "--target", "ssh://h", "--out", "n.json", "--secure-boot-cert", "notes.txt"],
     USAGE, "not a PEM certificate"),
    ("enrol no out", ["enrol", "--target", "ssh://h"], USAGE, "--out"),
    ("enrol key missing", ["enrol", "--target", "ssh://h", "--out", "n.json", "--ssh-key", "nokey"], USAGE,
     "--ssh-key nokey: no such file"),
    ("enrol bad ek ca", ["enrol", "--target", "ssh://h", "--out", "n.json", "--ek-ca", "notes.txt"], USAGE,
     "--ek-ca notes.txt: no PEM certificate"),
    ("enrol no ek ca", ["enrol", "--target", "ssh://h", "--out", "n.json", "--ek-ca", "none.pem"], USAGE,
     "--ek-ca none.pem: No such file"),
    ("enrol unreachable", ["enrol", "--json", "--target", "ssh://root@127.0.0.1:1", "--out", "n.json"],
     UNREACHABLE, "cannot reach"),
    ("verify unreachable", ["verify", "--json", "--target", "ssh://root@127.0.0.1:1", *REPORT], UNREACHABLE,
     "cannot reach"),
    # the command line itself
    ("no command", [], USAGE, "required"),
    ("unknown command", ["frobnicate"], USAGE, "invalid choice"),
    ("policy show missing", ["policy", "show", "missing.yml"], USAGE, "missing.yml"),
    ("markup in a path", ["policy", "show", "[/red]x[bold].yml"], USAGE, "[/red]x[bold].yml"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "argv", "code", "says"), CASES, ids=[c[0] for c in CASES])
def test_bad_command_line(place: Path, name: str, argv: list[str], code: int, says: str) -> None:
    before = snapshot(place)
    env = {**os.environ, "AMNESIAC_CACHE": str(place / "cache-env")}
    result = subprocess.run(
        [sys.executable, "-m", "amnesiac.cli", *argv],
        capture_output=True, text=True, check=False, cwd=place, env=env, timeout=120,
    )  # fmt: skip
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, (name, result.returncode, result.stderr)
    assert len(lines) == 1 and lines[0].startswith("amnesiac"), result.stderr
    assert says in lines[0], lines[0]
    assert "Traceback" not in result.stderr
    assert snapshot(place) == before, f"{name} changed files it did not create"


def test_a_bad_environment_variable_is_one_line(place: Path) -> None:
    env = {**os.environ, "SOURCE_DATE_EPOCH": "abc"}
    result = subprocess.run(
        [sys.executable, "-m", "amnesiac.cli", "build", "--out", "new"],
        capture_output=True, text=True, check=False, cwd=place, env=env,
    )  # fmt: skip
    assert result.returncode == USAGE and "$SOURCE_DATE_EPOCH" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_the_exit_codes_are_documented_alike() -> None:
    """--help and the README show the same table, from ExitCode."""
    from amnesiac.errors import MEANINGS

    readme = (REPO / "README.md").read_text()
    shown = subprocess.run(
        [sys.executable, "-m", "amnesiac.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for code, meaning in MEANINGS.items():
        assert f"| {code.value} | {meaning} |" in readme, code
        assert meaning in " ".join(shown.split()), code
    assert json.dumps(sorted(int(c) for c in MEANINGS)) == json.dumps(sorted(int(c) for c in ExitCode))


# Generated: every option that takes a value, given values it must refuse. Run in-process
# (cli.main) to keep the fast tier fast; the table above runs the real program.
BAD_VALUES: dict[str, tuple[list[str], list[str]]] = {
    # option: (the command line before it, values it must refuse with exit 2)
    "--cpus": (["boot", "fake-build"], ["0", "-2", "two", "", "1.5", "9" * 40 + "x"]),
    "--memory": (["boot", "fake-build"], ["0", "-1", "lots", "", "3.5"]),
    "--ssh-port": (["boot", "fake-build"], ["0", "65536", "-22", "ssh", ""]),
    "--timeout": (["boot", "fake-build"], ["0", "-1", "inf", "nan", "soon", ""]),
    "--accel": (["boot", "fake-build"], ["xen", "", "KVM"]),
    "--source-date-epoch": (["build", "--out", "new"], ["-1", "yesterday", "", "1.5"]),
    "--suite": (["build", "--out", "new"], ["", "Trixie", "../x", "a b", "sid;rm", "-x"]),
    "--var": (
        ["build", "--out", "new"],
        ["", "=", "x", "=1", f"{SIZE}=", f"{SIZE}=-1", f"{SIZE}=0", f"{SIZE}=big", f"{SIZE}=true",
         f"{SIZE}=[1]", f"{SIZE}={{a: 1}}", "ram_root_no_block_storage=maybe", "nope=1",
         f"{SIZE}=!!python/x 1"],
    ),
    "--out": (["build"], ["", ".", "notes.txt", "photos", "fake-build", "badshape", "notes.txt/deeper"]),
    "--cache": (["build", "--out", "new"], ["notes.txt", "photos/cat.jpg"]),
    "--policy": (["build", "--out", "new"], ["missing.yml", "photos", "notes.txt", "[/red].yml"]),
    "--target": (
        ["verify", "--report", "r"],
        ["", "vpn1", "qemu:", "qemu:photos", "qemu:badshape", "qemu:fake-build", "chroot:", "chroot:photos",
         "podman://", "podman://a b", "podman://-x", "ssh://", "ssh://-oX=y", "ssh://h:0", "ssh://h:99999",
         "ssh://h/p", "ssh://@h", "tftp://h", "file:///etc"],
    ),
    "--inventory": (["verify", "--report", "r"], ["none.yml", "inventory.yml"]),
    "--enrolment": (
        ["verify", "--report", "r", "--target", "ssh://root@127.0.0.1:9"],
        ["none.json", "notes.txt", "photos", "fake-build/manifest.json"],
    ),
}  # fmt: skip
GENERATED = [(opt, [*before, opt, value]) for opt, (before, values) in BAD_VALUES.items() for value in values]


@pytest.mark.parametrize(("option", "argv"), GENERATED, ids=[" ".join(a) for _, a in GENERATED])
def test_generated_bad_values(
    place: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    option: str,
    argv: list[str],
) -> None:
    from amnesiac.cli import main

    monkeypatch.chdir(place)
    monkeypatch.setenv("AMNESIAC_CACHE", str(place / "cache-env"))
    before = snapshot(place)
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own refusals
        code = int(exc.code or 0)
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if not line.startswith(("✗", "✓"))]
    assert code == USAGE, (argv, code, err)
    assert len(lines) == 1 and lines[0].startswith("amnesiac"), err
    assert snapshot(place) == before


def test_enough_bad_command_lines() -> None:
    assert len(CASES) + len(GENERATED) >= 100
