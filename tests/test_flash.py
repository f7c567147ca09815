"""`amnesiac flash` on local PXE roots: publish, list, rollback, prune, lock, gate, signatures, faults.

Builds here are small fakes (a few MiB of random bytes with a real manifest.json) and reports are
made with the report model, so every path runs in seconds. A publish is killed with SIGKILL at
each step (tests/flash_faults.py runs it with a store that stops itself there first) and the
root must still serve the previous image, whole. The ssh:// tests run the same against an sshd
on 127.0.0.1 (openssh-server, which `make test` installs), as root.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from amnesiac.errors import UsageError
from amnesiac.flash import command as command_module
from amnesiac.flash import publish as ops
from amnesiac.flash.candidate import load as load_candidate
from amnesiac.flash.command import FlashOptions, action, command
from amnesiac.flash.model import (
    LOCK,
    ROOT_SCRIPT,
    FlashError,
    LockBusy,
    Refused,
    State,
    parse_root_script,
    root_script,
)
from amnesiac.flash.store import CHECKPOINTS, LocalStore, SshStore
from amnesiac.policy import ClaimKind
from amnesiac.progress import Progress
from amnesiac.report.model import (
    CheckOutcome,
    CheckResult,
    ClaimResult,
    Identity,
    PolicyInfo,
    Report,
    Target,
    TargetKind,
    Tool,
    claim_status,
    count_statuses,
    integrity_claim,
    verdict_of,
)
from amnesiac.ssh import SshUrl, parse_url
from tests.sshd import keygen, loopback_sshd

REPO = Path(__file__).resolve().parent.parent
POLICY_SHA = "c" * 64
MIB = 1024**2
WAIT = 120.0  # an upper bound on waiting for a subprocess to reach a state, never a measurement


# --- fixtures: builds, reports, keys ------------------------------------------------------------


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_build(path: Path, name: str, *, initrd_mib: int = 3, uki: bool = False) -> Path:
    """A build directory with small random artifacts and a manifest.json that lists them (with
    `uki`, an amnesiac.efi too, named by measured_boot as a real build's is)."""
    path.mkdir(parents=True)
    files = {
        "vmlinuz": os.urandom(64 * 1024),
        "initrd.img": os.urandom(initrd_mib * MIB),
        "boot.ipxe": b"#!ipxe\nkernel vmlinuz initrd=initrd.img console=ttyS0\ninitrd initrd.img\nboot\n",
    }
    if uki:
        files["amnesiac.efi"] = b"MZ" + os.urandom(64 * 1024)
    for file_name, data in files.items():
        (path / file_name).write_bytes(data)
    manifest = {
        "format": 1,
        "image": {
            "sha256": sha256(files["initrd.img"]),
            "kernel_release": "6.12.0-test",
            "cmdline": f"initrd=initrd.img console=ttyS0 amnesiac.image={sha256(files['initrd.img'])}",
        },
        "artifacts": {n: {"sha256": sha256(d), "size": len(d)} for n, d in files.items()},
        "policy": {"id": "ovpn", "file": "ovpn.yml", "sha256": POLICY_SHA, "claims": ["no-disk"]},
        "source_date_epoch": 1_700_000_000,
        "built": f"2023-11-14T22:13:20+00:00 {name}",
    }
    if uki:
        manifest["measured_boot"] = {
            "file": "amnesiac.efi",
            "pcr11_sha256": "1" * 64,
            "pcr12_sha256": "0" * 64,
        }
    (path / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def image_of(build: Path) -> str:
    return str(json.loads((build / "manifest.json").read_text())["image"]["sha256"])


def version_of(build: Path, report: Path | None = None) -> str:
    """The name of the version that publishes `build` (with `report`, by default its own): the
    sha256 of the `sha256sum` lines of every file it holds but publish.json, sorted by name."""
    files = {
        n: build / n for n in ("vmlinuz", "initrd.img", "boot.ipxe", "manifest.json", "manifest.json.sig")
    }
    files["report.json"] = report if report is not None else build / "report.json"
    lines = "".join(
        f"{sha256(path.read_bytes())}  {n}\n" for n, path in sorted(files.items()) if path.is_file()
    )
    return sha256(lines.encode())


def make_report(
    build: Path,
    *,
    passed: bool = True,
    image: str | None = None,
    policy_sha: str = POLICY_SHA,
    outcome: CheckOutcome | None = None,
) -> bytes:
    """A report.json as `amnesiac verify` writes it, for the image in `build`."""
    outcome = outcome or (CheckOutcome.PASSED if passed else CheckOutcome.FAILED)
    check = CheckResult(
        id="storage.root_is_tmpfs",
        title="The root is a tmpfs",
        outcome=outcome,
        reason=None if outcome is CheckOutcome.PASSED else "/ is ext4",
    )
    status, reason = claim_status(ClaimKind.TECHNICAL, [check])
    claims = [
        ClaimResult(
            id="no-disk",
            title="No disks",
            kind=ClaimKind.TECHNICAL,
            status=status,
            reason=reason,
            text={"en": ["We keep nothing on disk."]},
            sources={},
            checks=[check],
        )
    ]
    report = Report(
        tool=Tool(version="0.1.0"),
        generated=datetime.now(UTC),
        policy=PolicyInfo(
            id="ovpn", title="OVPN", provider="OVPN", file="ovpn.yml", sha256=policy_sha, sources={}
        ),
        target=Target(
            kind=TargetKind.QEMU,
            address=str(build),
            identity=Identity(image_sha256=image or image_of(build), manifest_sha256_matches=True),
        ),
        integrity=(integrity := integrity_claim([check.model_copy(update={"id": "ssh.key_only"})])),
        totals=count_statuses(claims),
        verdict=verdict_of(integrity, claims),
        claims=claims,
    )
    return report.model_dump_json(indent=2).encode()


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("keys")
    ops_key = keygen(base / "ops", "ops")
    stranger = keygen(base / "stranger", "stranger")
    allowed = base / "allowed_signers"
    public = ops_key.with_suffix(".pub").read_text().split()
    allowed.write_text(f"release@example.net {public[0]} {public[1]}\n")
    return {"ops": ops_key, "stranger": stranger, "allowed": allowed}


@pytest.fixture
def builds(tmp_path: Path, keys: dict[str, Path]) -> list[Path]:
    """Five signed builds with passing reports, ready to publish."""
    result = []
    for i in range(5):
        build = make_build(tmp_path / f"build{i}", f"v{i}")
        (build / "report.json").write_bytes(make_report(build))
        command(FlashOptions(build=build, sign=keys["ops"], json=True))
        result.append(build)
    return result


@pytest.fixture
def root(tmp_path: Path, keys: dict[str, Path]) -> Path:
    """A PXE root whose allowed_signers lists the ops key."""
    path = tmp_path / "pxe"
    path.mkdir()
    shutil.copy(keys["allowed"], path / "allowed_signers")
    return path


def publish(build: Path, root: Path | str, **kwargs: Any) -> int:
    return command(FlashOptions(build=build, to=str(root), json=True, **kwargs))


def listing(root: Path | str) -> dict[str, Any]:
    result: dict[str, Any] = ops.listing(LocalStore(Path(root))).as_dict()
    return result


def amnesiac(
    *args: str, env: dict[str, str] | None = None, within: Sequence[str] = ()
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*within, sys.executable, "-m", "amnesiac.cli", *args],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        timeout=WAIT,
    )


def served(root: Path) -> tuple[bytes, dict[str, bytes]]:
    """What a machine netbooting now would get: the entry point and the files it chains to."""
    script = (root / ROOT_SCRIPT).read_bytes()
    state = parse_root_script(script.decode(), "test")
    assert state is not None
    version = root / "versions" / state.current
    return script, {n: (version / n).read_bytes() for n in ("vmlinuz", "initrd.img", "boot.ipxe")}


def assert_serves(root: Path, build: Path) -> None:
    _, files = served(root)
    for name, data in files.items():
        assert data == (build / name).read_bytes(), f"{name} served is not {build}'s"


# --- publish, list, rollback, prune -------------------------------------------------------------


def test_publish_layout_entry_point_and_record(builds: list[Path], root: Path) -> None:
    assert publish(builds[0], root) == 0
    image = version_of(builds[0])
    version = root / "versions" / image
    assert sorted(p.name for p in version.iterdir()) == [
        "boot.ipxe", "initrd.img", "manifest.json", "manifest.json.sig", "publish.json", "report.json",
        "vmlinuz",
    ]  # fmt: skip
    script = (root / "boot.ipxe").read_text()
    assert script.startswith("#!ipxe\n")
    assert f"chain versions/{image}/boot.ipxe\n" in script
    state = parse_root_script(script, "x")
    assert state is not None and state.current == image and state.previous is None
    assert_serves(root, builds[0])
    record = json.loads((version / "publish.json").read_text())
    assert record["signature"]["principal"] == "release@example.net"
    assert record["signature"]["key"].startswith("ED25519 SHA256:")
    assert record["report"]["passed"] is True and record["report"]["verdict"] == "pass"
    assert record["forced"] == []
    assert record["serial"] == 1
    for name, info in record["files"].items():
        assert sha256((version / name).read_bytes()) == info["sha256"]
    assert not (root / ".staging").exists()
    log = [json.loads(line) for line in (root / "flash.log").read_text().splitlines()]
    assert log[-1]["action"] == "publish" and log[-1]["signed_by"].startswith("release@example.net")


def test_a_build_with_a_uki_is_chained_by_uefi_machines_and_never_falls_back(
    builds: list[Path], root: Path, tmp_path: Path, keys: dict[str, Path]
) -> None:
    """UEFI machines chain the signed, measured UKI; BIOS ones boot.ipxe with their overlay. A
    UEFI machine whose UKI does not start gets nothing else (a failed chain ends the script)."""
    build = make_build(tmp_path / "uki", "uki", uki=True)
    (build / "report.json").write_bytes(make_report(build))
    command(FlashOptions(build=build, sign=keys["ops"], json=True))
    assert publish(build, root) == 0
    script = (root / ROOT_SCRIPT).read_text()
    state = parse_root_script(script, "x")
    assert state is not None and state.uki
    version = root / "versions" / state.current
    assert (version / "amnesiac.efi").read_bytes() == (build / "amnesiac.efi").read_bytes()
    lines = script.splitlines()
    branch = lines.index("iseq ${platform} efi && goto uefi ||")
    bios = lines.index(f"chain versions/{state.current}/boot.ipxe")
    assert branch < bios and lines[bios + 1 :] == [":uefi", f"chain versions/{state.current}/amnesiac.efi"]
    # A script that says it has a UKI but does not chain it is not flash's.
    broken = script.replace(f"chain versions/{state.current}/amnesiac.efi", "")
    with pytest.raises(FlashError, match=r"does not chain the current version's amnesiac\.efi"):
        parse_root_script(broken, "x")
    # A version without one: BIOS only; a rollback to the one with it: the UEFI branch again.
    assert publish(builds[0], root) == 0
    without = parse_root_script((root / ROOT_SCRIPT).read_text(), "x")
    assert without is not None and not without.uki and "goto uefi" not in (root / ROOT_SCRIPT).read_text()
    assert command(FlashOptions(to=str(root), rollback="", json=True)) == 0
    rolled = parse_root_script((root / ROOT_SCRIPT).read_text(), "x")
    assert rolled is not None and rolled.current == state.current and rolled.uki


def test_list_shows_policy_build_date_report_and_signer(builds: list[Path], root: Path) -> None:
    publish(builds[0], root)
    publish(builds[1], root, force=True, report=builds[0] / "report.json")  # a report for another image
    found = listing(root)
    assert found["current"] == version_of(builds[1], builds[0] / "report.json")
    assert found["previous"] == version_of(builds[0])
    assert found["versions"][0]["image"] == image_of(builds[1])
    newest, oldest = found["versions"]
    assert newest["current"] and newest["report_passed"] is False and newest["forced"]
    assert "not this build's" in newest["forced"][0]
    assert oldest["previous"] and oldest["report_passed"] is True
    assert oldest["policy"] == "ovpn" and oldest["built"].endswith("v0")
    assert oldest["signature"]["principal"] == "release@example.net"
    text = amnesiac("flash", "--to", str(root), "--list")
    assert text.returncode == 0, text.stderr
    for word in (
        "current",
        "previous",
        found["current"][:12],
        image_of(builds[1])[:12],
        "ovpn",
        "pass",
        "forced",
        "release@example.net",
    ):
        assert word in text.stdout


def test_second_publish_then_rollback_and_back(builds: list[Path], root: Path) -> None:
    publish(builds[0], root)
    publish(builds[1], root)
    assert_serves(root, builds[1])
    assert command(FlashOptions(to=str(root), rollback="", json=True)) == 0
    assert_serves(root, builds[0])
    state = listing(root)
    assert state["current"] == version_of(builds[0]) and state["previous"] == version_of(builds[1])
    assert state["state"]["action"] == "rollback"
    assert command(FlashOptions(to=str(root), rollback="", json=True)) == 0  # previous is now builds[1]
    assert_serves(root, builds[1])
    assert command(FlashOptions(to=str(root), rollback=image_of(builds[0])[:8], json=True)) == 0
    assert_serves(root, builds[0])


def test_a_machine_booting_across_a_publish_gets_the_old_image_whole(builds: list[Path], root: Path) -> None:
    """A machine that fetched boot.ipxe before the switch fetches the old version's files after it."""
    publish(builds[0], root)
    script = (root / "boot.ipxe").read_text()  # the machine's first request
    chained = next(line.split()[1] for line in script.splitlines() if line.startswith("chain "))
    publish(builds[1], root, keep=1)  # meanwhile: a publish, and a prune down to one version
    version = (root / chained).parent
    for name in ("boot.ipxe", "vmlinuz", "initrd.img"):  # the machine's next requests
        assert (version / name).read_bytes() == (builds[0] / name).read_bytes()
    assert_serves(root, builds[1])  # a machine that starts now gets the new image


def test_republishing_the_current_image_switches_nothing(builds: list[Path], root: Path) -> None:
    publish(builds[0], root)
    before = (root / "boot.ipxe").read_bytes()
    publish(builds[0], root)
    assert (root / "boot.ipxe").read_bytes() == before


def rewrite(build: Path, name: str, data: bytes, key: Path) -> None:
    """Replace one boot file of `build` (initrd.img stays), list it in manifest.json, sign again."""
    (build / name).write_bytes(data)
    manifest = json.loads((build / "manifest.json").read_text())
    manifest["artifacts"][name] = {"sha256": sha256(data), "size": len(data)}
    (build / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    command(FlashOptions(build=build, sign=key, json=True))


@pytest.mark.parametrize("change", ["boot.ipxe", "vmlinuz", "report.json"])
def test_the_same_image_with_other_files_is_a_new_version(
    builds: list[Path], root: Path, keys: dict[str, Path], change: str
) -> None:
    """initrd.img (the image) unchanged, another file changed: published, never "already current"."""
    build = builds[0]
    assert publish(build, root) == 0
    first = version_of(build)
    if change == "report.json":
        time.sleep(1.1)  # another `generated` second: another report for the same image
        (build / "report.json").write_bytes(make_report(build))
    elif change == "boot.ipxe":
        rewrite(
            build, "boot.ipxe", b"#!ipxe\nkernel vmlinuz initrd=initrd.img console=tty0\nboot\n", keys["ops"]
        )
    else:
        rewrite(build, "vmlinuz", os.urandom(64 * 1024), keys["ops"])
    second = version_of(build)
    assert second != first
    result = amnesiac("flash", str(build), "--to", str(root), "--json")
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout)
    assert outcome["switched"] and outcome["copied"]
    assert outcome["version"] == second and outcome["previous"] == first
    assert outcome["image"] == image_of(build)
    assert_serves(root, build)
    for name in ("manifest.json", "manifest.json.sig", "report.json"):
        assert (root / "versions" / second / name).read_bytes() == (build / name).read_bytes()
    found = listing(root)
    assert [v["version"] for v in found["versions"]] == [second, first]
    assert {v["image"] for v in found["versions"]} == {image_of(build)}
    # Only when every file is the same is it "already current".
    again = amnesiac("flash", str(build), "--to", str(root))
    assert again.returncode == 0 and "already current" in again.stderr, again.stderr
    # Both versions of the one image can be gone back to: by name, or by the image (ambiguous here).
    assert command(FlashOptions(to=str(root), rollback=first[:10], json=True)) == 0
    assert (root / "versions" / first / "manifest.json").read_bytes() == served_file(root, "manifest.json")
    with pytest.raises(UsageError, match="ambiguous"):
        command(FlashOptions(to=str(root), rollback=image_of(build)[:10]))
    # Publishing the changed build again switches back to its version, without a copy.
    outcome = ops.publish(
        LocalStore(root),
        ops.admit(load_candidate(build), (root / "allowed_signers").read_bytes(), "x", force=False),
        Progress(quiet=True),
    )
    assert outcome.switched and not outcome.copied and outcome.version == second


def served_file(root: Path, name: str) -> bytes:
    """A file of the version the entry point chains to now."""
    state = parse_root_script((root / ROOT_SCRIPT).read_text(), "test")
    assert state is not None
    return (root / "versions" / state.current / name).read_bytes()


def test_a_version_is_named_by_the_sha256sum_of_its_files(builds: list[Path], root: Path) -> None:
    """What model.version_id promises: the boot server's coreutils recompute a version's name."""
    publish(builds[0], root)
    version = version_of(builds[0])
    line = "ls | grep -vx publish.json | LC_ALL=C sort | xargs sha256sum | sha256sum"
    out = subprocess.run(
        ["sh", "-c", line], cwd=root / "versions" / version, capture_output=True, text=True, check=True
    )
    assert out.stdout.split()[0] == version


def test_versions_named_by_their_image_are_still_served(builds: list[Path], root: Path) -> None:
    """A root published before versions were named by their files: versions/<image sha256>/."""
    for build in builds[:2]:
        publish(build, root)
    for build in builds[:2]:
        (root / "versions" / version_of(build)).rename(root / "versions" / image_of(build))
    state = State(
        current=image_of(builds[1]), previous=image_of(builds[0]), action="publish", switched="x", by="u@h"
    )
    (root / ROOT_SCRIPT).write_text(root_script(state))
    found = listing(root)
    assert [v["version"] for v in found["versions"]] == [image_of(builds[1]), image_of(builds[0])]
    assert not any(v["damaged"] for v in found["versions"])
    before = (root / ROOT_SCRIPT).read_bytes()
    assert publish(builds[1], root) == 0  # the same files, under the old name: already current
    assert (root / ROOT_SCRIPT).read_bytes() == before
    assert command(FlashOptions(to=str(root), rollback="", json=True)) == 0
    assert_serves(root, builds[0])


def test_list_shows_damaged_versions(builds: list[Path], root: Path) -> None:
    for build in builds[:3]:
        publish(build, root)
    oldest, middle, newest = (root / "versions" / version_of(b) for b in builds[:3])
    with (oldest / "vmlinuz").open("r+b") as f:  # the same size, other bytes
        f.write(b"evil")
    (middle / "boot.ipxe").unlink()
    (newest / "publish.json").unlink()
    result = amnesiac("flash", "--to", str(root), "--list", "--json")
    assert result.returncode == 0, result.stderr
    found = {v["version"]: v for v in json.loads(result.stdout)["versions"]}
    assert found[oldest.name]["damaged"] and found[oldest.name]["problem"] == "damaged: vmlinuz changed"
    assert found[middle.name]["damaged"] and found[middle.name]["problem"] == "damaged: boot.ipxe missing"
    assert found[newest.name]["damaged"] and found[newest.name]["problem"] == "no publish.json"
    assert found[middle.name]["image"] == image_of(builds[1])  # still told what it was
    text = amnesiac("flash", "--to", str(root), "--list")
    assert text.returncode == 0, text.stderr
    rows = {name[:12]: [ln for ln in text.stdout.splitlines() if name[:12] in ln] for name in found}
    assert "damaged: vmlinuz changed" in rows[oldest.name[:12]][0]
    assert "damaged: boot.ipxe missing" in rows[middle.name[:12]][0]
    assert "no publish.json" in rows[newest.name[:12]][0]
    # Whole versions are not: the listing hashed them, and they matched.
    (oldest / "vmlinuz").write_bytes((builds[0] / "vmlinuz").read_bytes())
    found = {
        v["version"]: v
        for v in json.loads(amnesiac("flash", "--to", str(root), "--list", "--json").stdout)["versions"]
    }
    assert not found[oldest.name]["damaged"] and found[oldest.name]["problem"] is None


def test_prune_keeps_the_newest_and_never_current_or_previous(builds: list[Path], root: Path) -> None:
    for build in builds[:4]:
        publish(build, root, keep=2)
    names = {p.name for p in (root / "versions").iterdir()}
    assert names == {version_of(builds[2]), version_of(builds[3])}
    # Roll back to the older of the two, then publish two more with keep=1: the current and
    # previous versions survive even though only one version is "kept".
    command(FlashOptions(to=str(root), rollback="", json=True))
    assert_serves(root, builds[2])
    publish(builds[4], root, keep=1)
    names = {p.name for p in (root / "versions").iterdir()}
    assert names == {version_of(builds[4]), version_of(builds[2])}  # current, previous
    assert command(FlashOptions(to=str(root), rollback="", json=True)) == 0
    assert_serves(root, builds[2])


def test_prune_alone(builds: list[Path], root: Path) -> None:
    for build in builds[:4]:
        publish(build, root, keep=10)
    assert command(FlashOptions(to=str(root), prune=True, keep=1, json=True)) == 0
    assert {p.name for p in (root / "versions").iterdir()} == {version_of(builds[3]), version_of(builds[2])}
    log = (root / "flash.log").read_text().splitlines()
    assert json.loads(log[-1])["action"] == "prune"


def test_rollback_needs_something_to_go_back_to(builds: list[Path], root: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no such PXE root"):
        command(FlashOptions(to=str(tmp_path / "nowhere"), rollback=""))
    assert not (tmp_path / "nowhere").exists()
    with pytest.raises(UsageError, match="nothing published"):
        command(FlashOptions(to=str(root), rollback=""))
    assert not (root / LOCK).exists()  # refused before taking the lock: nothing written
    publish(builds[0], root)
    with pytest.raises(UsageError, match="no previous version"):
        command(FlashOptions(to=str(root), rollback=""))
    with pytest.raises(UsageError, match="no version"):
        command(FlashOptions(to=str(root), rollback="abcdef"))


# --- the gate -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "no verification report"),
        ("failing", "verdict is fail"),
        ("incomplete", "verdict is incomplete"),  # nothing failed, but not everything was proved
        ("other-image", "not this build's"),
        ("other-policy", "judged policy"),
        ("garbage", "not a valid verification report"),
    ],
)
def test_gate_refuses_without_a_passing_report_for_this_image(
    builds: list[Path], root: Path, case: str, message: str
) -> None:
    build = builds[0]
    report = build / "report.json"
    if case == "missing":
        report.unlink()
    elif case == "failing":
        report.write_bytes(make_report(build, passed=False))
    elif case == "incomplete":
        report.write_bytes(make_report(build, outcome=CheckOutcome.NOT_APPLICABLE))
    elif case == "other-image":
        report.write_bytes(make_report(build, image="d" * 64))
    elif case == "other-policy":
        report.write_bytes(make_report(build, policy_sha="e" * 64))
    else:
        report.write_text('{"verdict": "pass"}')
    with pytest.raises(Refused, match=message) as refused:
        publish(build, root)
    assert refused.value.exit_code == 3
    assert not (root / "boot.ipxe").exists() and not (root / "versions").exists()
    # --force publishes it, and says so where --list and an auditor look.
    assert publish(build, root, force=True) == 0
    entry = listing(root)["versions"][0]
    assert entry["forced"] and message in entry["forced"][0]
    assert entry["report_passed"] is False
    assert "forced" in (root / "flash.log").read_text()


def test_report_elsewhere_is_attached(builds: list[Path], root: Path, tmp_path: Path) -> None:
    report_dir = tmp_path / "report"
    report_dir.mkdir()
    (builds[0] / "report.json").rename(report_dir / "report.json")
    publish(builds[0], root, report=report_dir)
    version = root / "versions" / version_of(builds[0], report_dir / "report.json")
    assert (version / "report.json").read_bytes() == (report_dir / "report.json").read_bytes()


# --- signatures and tampering -------------------------------------------------------------------


def test_unsigned_build_is_refused_when_signers_are_in_force(builds: list[Path], root: Path) -> None:
    (builds[0] / "manifest.json.sig").unlink()
    for force in (False, True):
        with pytest.raises(Refused, match="not signed"):
            publish(builds[0], root, force=force)


def test_signature_by_a_key_not_allowed_is_refused(
    builds: list[Path], root: Path, keys: dict[str, Path]
) -> None:
    command(FlashOptions(build=builds[0], sign=keys["stranger"], json=True))
    with pytest.raises(Refused, match="does not list"):
        publish(builds[0], root, force=True)


def test_changed_manifest_fails_its_signature(builds: list[Path], root: Path) -> None:
    manifest = builds[0] / "manifest.json"
    manifest.write_text(manifest.read_text().replace("6.12.0-test", "6.12.0-evil"))
    with pytest.raises(Refused, match="bad signature"):
        publish(builds[0], root, force=True)
    assert not (root / "versions").exists()


def test_tampered_artifact_is_refused_whatever_the_options(builds: list[Path], root: Path) -> None:
    initrd = builds[0] / "initrd.img"
    data = bytearray(initrd.read_bytes())
    data[1000] ^= 0xFF
    initrd.write_bytes(bytes(data))
    result = amnesiac("flash", str(builds[0]), "--to", str(root), "--force", "--json")
    assert result.returncode == 3
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "initrd.img does not match manifest.json" in result.stderr
    assert not (root / "versions").exists()


def test_a_development_build_is_never_published(builds: list[Path], root: Path) -> None:
    """`build --profile development` packs for speed: flash refuses it, --force or not."""
    manifest = json.loads((builds[0] / "manifest.json").read_text())
    manifest["image"]["profile"] = "development"
    (builds[0] / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    result = amnesiac("flash", str(builds[0]), "--to", str(root), "--force", "--json")
    assert result.returncode == 3
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "is a development build" in result.stderr, result.stderr
    assert not (root / "versions").exists()


def test_signers_from_the_command_line(builds: list[Path], tmp_path: Path, keys: dict[str, Path]) -> None:
    bare = tmp_path / "bare-root"
    with pytest.raises(Refused, match="no allowed-signers file"):
        publish(builds[0], bare)
    assert publish(builds[0], bare, allowed_signers=keys["allowed"]) == 0
    assert listing(bare)["versions"][0]["signature"]["principal"] == "release@example.net"


def test_a_changed_copy_is_caught_before_the_switch(builds: list[Path], root: Path) -> None:
    """The copy is hashed where it landed: a store that corrupts it never gets switched."""

    class Corrupting(LocalStore):
        def stage(self, version: str, files: Any) -> str:
            staging = super().stage(version, files)
            with (self.root / staging / "initrd.img").open("r+b") as f:
                f.seek(5)
                f.write(b"X")
            return staging

    publish(builds[0], root)
    before = served(root)
    store = Corrupting(root)
    found = ops.admit(load_candidate(builds[1]), (root / "allowed_signers").read_bytes(), "x", force=False)
    with pytest.raises(FlashError, match=r"copy of initrd\.img does not match manifest\.json"):
        ops.publish(store, found, Progress(quiet=True))
    assert served(root) == before
    assert not (root / "versions" / version_of(builds[1])).exists()
    assert not list((root / ".staging").glob("*")) if (root / ".staging").exists() else True


def test_rollback_refuses_a_damaged_version(builds: list[Path], root: Path) -> None:
    publish(builds[0], root)
    publish(builds[1], root)
    with (root / "versions" / version_of(builds[0]) / "vmlinuz").open("r+b") as f:
        f.write(b"evil")
    before = served(root)
    with pytest.raises(Refused, match="damaged"):
        command(FlashOptions(to=str(root), rollback=""))
    assert served(root) == before
    # Publishing the same build again repairs the damaged, not current, version.
    publish(builds[0], root)
    assert_serves(root, builds[0])


def test_rollback_checks_the_stored_signature_against_todays_signers(
    builds: list[Path], root: Path, keys: dict[str, Path]
) -> None:
    publish(builds[0], root)
    publish(builds[1], root)
    stranger = keys["stranger"].with_suffix(".pub").read_text().split()
    (root / "allowed_signers").write_text(f"someone@example.net {stranger[0]} {stranger[1]}\n")  # key revoked
    with pytest.raises(Refused, match="does not list"):
        command(FlashOptions(to=str(root), rollback=""))
    assert_serves(root, builds[1])


def test_a_damaged_current_version_is_not_replaced_in_place(builds: list[Path], root: Path) -> None:
    publish(builds[0], root)
    (root / "versions" / version_of(builds[0]) / "initrd.img").write_bytes(b"truncated")
    with pytest.raises(Refused, match="current but damaged"):
        publish(builds[0], root)


def test_a_boot_ipxe_not_written_by_flash_is_kept_unless_forced(builds: list[Path], root: Path) -> None:
    (root / "boot.ipxe").write_text("#!ipxe\nchain http://legacy/boot.ipxe\n")
    with pytest.raises(Refused, match="not written by amnesiac flash"):
        publish(builds[0], root)
    assert "legacy" in (root / "boot.ipxe").read_text()
    publish(builds[0], root, force=True)
    assert_serves(root, builds[0])


def test_sign_and_publish_in_one_run(tmp_path: Path, root: Path, keys: dict[str, Path]) -> None:
    build = make_build(tmp_path / "b", "x")
    (build / "report.json").write_bytes(make_report(build))
    assert publish(build, root, sign=keys["ops"]) == 0
    record = json.loads((root / "versions" / version_of(build) / "publish.json").read_text())
    assert record["signature"]["principal"] == "release@example.net"


def test_sign_only_writes_the_signature(tmp_path: Path, keys: dict[str, Path]) -> None:
    build = make_build(tmp_path / "b", "x")
    result = amnesiac("flash", str(build), "--sign", str(keys["ops"]))
    assert result.returncode == 0, result.stderr
    assert (build / "manifest.json.sig").read_text().startswith("-----BEGIN SSH SIGNATURE-----")
    check = amnesiac("flash", str(build), "--check", "--allowed-signers", str(keys["allowed"]), "--json")
    assert check.returncode == 3 and "no verification report" in check.stderr  # unsigned is fine; no report
    (build / "report.json").write_bytes(make_report(build))
    check = amnesiac("flash", str(build), "--check", "--allowed-signers", str(keys["allowed"]), "--json")
    assert check.returncode == 0, check.stderr
    assert json.loads(check.stdout)["signature"]["principal"] == "release@example.net"


# --- faults: SIGKILL at every step, a full disk, the lock ---------------------------------------


def stopped(pid: int) -> bool:
    with contextlib.suppress(FileNotFoundError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
    return False


def stopping_flash(point: str, *args: str) -> list[str]:
    """`amnesiac flash ARGS` with a PXE root that stops itself (SIGSTOP) at `point`."""
    return [sys.executable, "-m", "tests.flash_faults", point, "flash", *args]


def kill_at(point: str, build: Path, to: Path | str, *extra: str) -> None:
    """Run a publish, let it stop itself at `point`, SIGKILL it there. Its temporary files, which
    a SIGKILL leaves by definition, go to a directory of the test's, not the machine's /tmp."""
    with tempfile.TemporaryDirectory(prefix="amnesiac-test-killed-") as scratch:
        proc = subprocess.Popen(
            stopping_flash(point, str(build), "--to", str(to), "--json", *extra),
            cwd=REPO,
            env={**os.environ, "TMPDIR": scratch},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + WAIT
        while not stopped(proc.pid):
            assert proc.poll() is None, (
                f"flash ended before {point}: {proc.stderr.read().decode() if proc.stderr else ''}"
            )
            assert time.monotonic() < deadline, f"flash never reached {point}"
            time.sleep(0.05)
        proc.kill()
        proc.wait()
        if proc.stderr:
            proc.stderr.close()


@pytest.mark.parametrize("point", CHECKPOINTS)
def test_a_publish_killed_at_any_step_leaves_the_previous_image_served(
    builds: list[Path], root: Path, point: str
) -> None:
    publish(builds[0], root)
    before = served(root)
    kill_at(point, builds[1], root)
    assert served(root) == before  # same entry point, same files: the previous image, whole
    assert_serves(root, builds[0])
    if point == "copy":  # the copy was under way: half an initrd.img in .staging/
        partial = list((root / ".staging").glob("*/initrd.img"))
        assert partial and partial[0].stat().st_size < (builds[1] / "initrd.img").stat().st_size
    # The next flash sweeps up and publishes.
    assert publish(builds[1], root) == 0
    assert_serves(root, builds[1])
    assert not (root / ".staging").exists()
    assert not list(root.glob(".boot.ipxe.*"))
    assert command(FlashOptions(to=str(root), rollback="", json=True)) == 0
    assert_serves(root, builds[0])


def test_the_next_flash_sweeps_up_what_a_dead_one_left(builds: list[Path], root: Path) -> None:
    """A copy under way, a version being removed, a new entry point written but not renamed."""
    publish(builds[0], root)
    (root / ".staging" / f"{version_of(builds[1])}.4242").mkdir(parents=True)
    (root / ".staging" / f"{version_of(builds[1])}.4242" / "initrd.img").write_bytes(b"half")
    (root / ".trash" / f"{version_of(builds[2])}.4242").mkdir(parents=True)
    (root / ".boot.ipxe.4242.tmp").write_text("#!ipxe\nchain versions/nothing/boot.ipxe\n")
    (root / ".boot.ipxe.k2_x9q.tmp").write_text("#!ipxe\n")
    assert_serves(root, builds[0])
    assert publish(builds[1], root) == 0
    assert_serves(root, builds[1])
    assert not (root / ".staging").exists() and not (root / ".trash").exists()
    assert not list(root.glob(".boot.ipxe.*"))


def test_sigterm_mid_copy_cleans_up_and_says_so(builds: list[Path], root: Path) -> None:
    publish(builds[0], root)
    before = served(root)
    proc = subprocess.Popen(
        stopping_flash("copy", str(builds[1]), "--to", str(root), "--json"),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + WAIT
    while not stopped(proc.pid):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # pending until it runs again
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 128 + signal.SIGTERM
    assert err.strip().count("\n") == 0 and "interrupted by SIGTERM" in err
    assert served(root) == before
    assert not list((root / ".staging").glob("*")) if (root / ".staging").exists() else True


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 6 MiB tmpfs: room for one small image, not two."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], check=False)
    if result.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_one_line_and_leaves_the_previous_image(
    small_disk: Path, tmp_path: Path, keys: dict[str, Path]
) -> None:
    root = small_disk / "pxe"
    first = make_build(tmp_path / "small1", "s1", initrd_mib=2)
    second = make_build(tmp_path / "small2", "s2", initrd_mib=4)
    for build in (first, second):
        (build / "report.json").write_bytes(make_report(build))
        command(FlashOptions(build=build, sign=keys["ops"], json=True))
    args = ("--allowed-signers", str(keys["allowed"]), "--json")
    assert amnesiac("flash", str(first), "--to", str(root), *args).returncode == 0
    before = served(root)
    result = amnesiac("flash", str(second), "--to", str(root), *args)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "No space left on device" in result.stderr and "nothing was switched" in result.stderr
    assert served(root) == before
    assert not list((root / ".staging").glob("*")) if (root / ".staging").exists() else True


@contextlib.contextmanager
def held_lock(root: Path) -> Iterator[None]:
    root.mkdir(exist_ok=True)
    fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, b"pid 1 on a test\n")
    try:
        yield
    finally:
        os.close(fd)


def test_a_held_lock_times_out_with_one_line(builds: list[Path], root: Path) -> None:
    with held_lock(root):
        result = amnesiac("flash", str(builds[0]), "--to", str(root), "--lock-timeout", "0", "--json")
    assert result.returncode == 75
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "locked by another flash (pid 1 on a test)" in result.stderr
    assert not (root / "boot.ipxe").exists()
    publish(builds[0], root)
    publish(builds[1], root)
    with held_lock(root), pytest.raises(LockBusy):
        command(FlashOptions(to=str(root), rollback="", lock_timeout=0))
    assert_serves(root, builds[1])


def test_concurrent_flashes_are_serialised(builds: list[Path], root: Path) -> None:
    publish(builds[0], root)
    with held_lock(root):
        proc = subprocess.Popen(
            [sys.executable, "-m", "amnesiac.cli", "flash", str(builds[1]), "--to", str(root)],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stderr is not None
        lines = []
        for line in proc.stderr:  # blocks until the flash says it waits: no timing involved
            lines.append(line)
            if "waiting for the lock" in line:
                break
        assert "held by pid 1 on a test" in "".join(lines)
        assert_serves(root, builds[0])  # nothing happened while the lock was held
    _, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 0, err
    assert_serves(root, builds[1])


# --- command line -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (FlashOptions(), "say where"),
        (FlashOptions(list=True), "--list needs --to"),
        (FlashOptions(to="/x", list=True, prune=True), "choose one"),
        (FlashOptions(to="/x"), "BUILD_DIR is needed"),
        (FlashOptions(to="/x", keep=0, build=Path("b")), "--keep"),
        (FlashOptions(build=Path("b"), to="/x", usb=Path("u")), "separate"),
    ],
)
def test_usage_errors(options: FlashOptions, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        action(options)


def test_cli_errors_are_one_line_with_exit_codes(tmp_path: Path) -> None:
    result = amnesiac("flash", str(tmp_path / "nope"), "--to", str(tmp_path / "pxe"), "--json")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "no such build directory" in result.stderr
    result = amnesiac("flash", "--to", "ftp://x/y", "--list")
    assert result.returncode == 2 and "ssh://" in result.stderr


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, Path]) -> dict[str, Path]:
    """A signed build with its report, a PXE root it is published to, and bad inputs beside them."""
    base = tmp_path_factory.mktemp("world")
    build = make_build(base / "build", "w")
    (build / "report.json").write_bytes(make_report(build))
    command(FlashOptions(build=build, sign=keys["ops"], json=True))
    pxe = base / "pxe"
    pxe.mkdir()
    shutil.copy(keys["allowed"], pxe / "allowed_signers")
    assert publish(build, pxe) == 0
    garbled = make_build(base / "garbled", "g")
    (garbled / "manifest.json").write_text('{"format": 1, "image": ')
    dir_manifest = make_build(base / "dir-manifest", "d")
    (dir_manifest / "manifest.json").unlink()
    (dir_manifest / "manifest.json").mkdir()
    foreign = make_build(base / "foreign", "f")
    (foreign / "manifest.json").write_text('{"name": "not an amnesiac manifest"}')
    (base / "a-file").write_text("not a directory\n")
    (base / "not-a-key").write_text("hello\n")
    (base / "key-dir").mkdir()
    return {
        "base": base,
        "build": build,
        "pxe": pxe,
        "garbled": garbled,
        "dir_manifest": dir_manifest,
        "foreign": foreign,
        "file": base / "a-file",
        "missing": base / "missing",
        "key": keys["ops"],
        "not_a_key": base / "not-a-key",
        "key_dir": base / "key-dir",
    }


def tree(base: Path) -> dict[str, str]:
    """Every path under `base` with its kind, mode and sha256: what "nothing changed" compares."""
    found = {}
    for path in sorted(base.rglob("*")):
        info = path.lstat()
        if path.is_symlink():
            what = f"-> {path.readlink()}"
        elif path.is_dir():
            what = "dir"
        else:
            what = sha256(path.read_bytes())
        found[str(path.relative_to(base))] = f"{oct(info.st_mode)} {what}"
    return found


USAGE = 2
BAD_COMMAND_LINES = [
    # BUILD_DIR
    pytest.param(["{missing}", "--to", "{pxe}"], USAGE, "no such build directory", id="missing-build"),
    pytest.param(["{file}", "--to", "{pxe}"], USAGE, "not a directory", id="build-is-a-file"),
    pytest.param(["{garbled}", "--to", "{pxe}"], USAGE, "not an amnesiac manifest", id="malformed-manifest"),
    pytest.param(["{foreign}", "--to", "{pxe}"], USAGE, "not an amnesiac manifest", id="foreign-manifest"),
    pytest.param(["{dir_manifest}", "--to", "{pxe}"], USAGE, "cannot read it", id="manifest-is-a-directory"),
    pytest.param(["{garbled}", "--check"], USAGE, "not an amnesiac manifest", id="check-malformed-manifest"),
    pytest.param(
        ["{build}", "--to", "{pxe}", "--report", "{missing}"], USAGE, "--report", id="missing-report"
    ),
    pytest.param(
        ["{build}", "--to", "{pxe}", "--allowed-signers", "{missing}"],
        USAGE,
        "cannot read",
        id="missing-signers",
    ),
    # --to
    pytest.param(["{build}", "--to", ""], USAGE, "name a PXE root", id="to-empty"),
    pytest.param(["{build}", "--to", "   "], USAGE, "name a PXE root", id="to-blank"),
    pytest.param(["{build}", "--to", "ssh://"], USAGE, "expected ssh://", id="to-ssh-nothing"),
    pytest.param(["{build}", "--to", "ssh://host"], USAGE, "absolute path", id="to-ssh-no-path"),
    pytest.param(["{build}", "--to", "ftp://host/pxe"], USAGE, "ssh://", id="to-other-scheme"),
    pytest.param(["{build}", "--to", "{file}"], USAGE, "not a directory", id="to-a-file"),
    pytest.param(["{build}", "--to", "{file}/pxe"], USAGE, "is not a directory", id="to-below-a-file"),
    pytest.param(
        ["{build}", "--to", "{base}/" + "x" * 300], USAGE, "File name too long", id="to-name-too-long"
    ),
    pytest.param(
        ["{build}", "--to", "ssh://pxe-test/srv/pxe", "--ssh-config", "{missing}"],
        USAGE,
        "--ssh-config",
        id="missing-ssh-config",
    ),
    # options that do not go together, or are out of range
    pytest.param([], USAGE, "say where", id="nothing"),
    pytest.param(["--to", "{pxe}"], USAGE, "BUILD_DIR is needed", id="no-build"),
    pytest.param(["--list"], USAGE, "--list needs --to", id="list-without-to"),
    pytest.param(["--to", "{pxe}", "--list", "--prune"], USAGE, "choose one", id="list-and-prune"),
    pytest.param(["--to", "{pxe}", "--rollback", "--check"], USAGE, "choose one", id="rollback-and-check"),
    pytest.param(["{build}", "--to", "{pxe}", "--list"], USAGE, "takes no BUILD_DIR", id="list-with-build"),
    pytest.param(
        ["--to", "{pxe}", "--list", "--sign", "{key}"], USAGE, "takes no --sign", id="list-with-sign"
    ),
    pytest.param(
        ["--to", "{pxe}", "--rollback", "--report", "{missing}", "--force"],
        USAGE,
        "--rollback takes no --report / --force",
        id="rollback-with-report-force",
    ),
    pytest.param(["{build}", "--to", "{pxe}", "--usb", "{base}/u.img"], USAGE, "separate", id="usb-and-to"),
    pytest.param(["{build}", "--to", "{pxe}", "--keep", "0"], USAGE, "--keep", id="keep-0"),
    pytest.param(["{build}", "--to", "{pxe}", "--keep", "-2"], USAGE, "--keep", id="keep-negative"),
    pytest.param(["{build}", "--to", "{pxe}", "--keep", "many"], USAGE, "--keep", id="keep-not-a-number"),
    pytest.param(
        ["{build}", "--to", "{pxe}", "--lock-timeout", "-1"], USAGE, "--lock-timeout", id="timeout-neg"
    ),
    pytest.param(
        ["{build}", "--to", "{pxe}", "--lock-timeout", "nan"], USAGE, "--lock-timeout", id="timeout-nan"
    ),
    pytest.param(["{build}", "--to", "{pxe}", "--frobnicate"], USAGE, "--frobnicate", id="unknown-option"),
    pytest.param(["{build}", "{build}", "--to", "{pxe}"], USAGE, "unrecognized", id="two-builds"),
    # --sign KEY
    pytest.param(
        ["{build}", "--to", "{pxe}", "--sign", "{missing}"], USAGE, "no such key", id="sign-missing-key"
    ),
    pytest.param(["{build}", "--sign", "{key_dir}"], USAGE, "a directory", id="sign-key-is-a-directory"),
    pytest.param(
        ["{build}", "--sign", "{not_a_key}"], USAGE, "not an OpenSSH private key", id="sign-not-a-key"
    ),
    pytest.param(
        ["{garbled}", "--sign", "{key}"], USAGE, "not an amnesiac manifest", id="sign-malformed-manifest"
    ),
    pytest.param(["{build}", "--to", "", "--sign", "{key}"], USAGE, "name a PXE root", id="sign-then-bad-to"),
    pytest.param(
        ["{build}", "--to", "{pxe}", "--sign", "{key}", "--keep", "0"],
        USAGE,
        "--keep",
        id="sign-then-bad-keep",
    ),
    # a PXE root or a version that is not there
    pytest.param(["--to", "{missing}", "--list"], USAGE, "no such PXE root", id="list-missing-root"),
    pytest.param(
        ["--to", "{missing}", "--list", "--json"], USAGE, "no such PXE root", id="list-json-missing"
    ),
    pytest.param(["--to", "{missing}", "--rollback"], USAGE, "no such PXE root", id="rollback-missing-root"),
    pytest.param(["--to", "{missing}", "--prune"], USAGE, "no such PXE root", id="prune-missing-root"),
    pytest.param(["--to", "{file}", "--list"], USAGE, "not a directory", id="list-a-file"),
    pytest.param(["--to", "{pxe}", "--rollback", "zz"], USAGE, "hex digits", id="rollback-not-hex"),
    pytest.param(
        ["--to", "{pxe}", "--rollback", "abcdef12"], USAGE, "no version abcdef12", id="rollback-unknown"
    ),
    pytest.param(["--to", "{pxe}", "--rollback"], USAGE, "no previous version", id="rollback-no-previous"),
]


@pytest.mark.parametrize(("args", "code", "message"), BAD_COMMAND_LINES)
def test_bad_command_lines_cost_nothing(
    world: dict[str, Path], args: list[str], code: int, message: str
) -> None:
    """Each: one line on stderr naming the problem, its exit code, and not a byte changed anywhere."""
    argv = [arg.format(**world) for arg in args]
    before = tree(world["base"])
    result = amnesiac("flash", *argv)
    assert result.returncode == code, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert re.match(r"^amnesiac( flash)?: ", lines[0]), lines[0]
    assert message in lines[0]
    for python in ("Traceback", "Errno", "Error(", "internal error"):
        assert python not in lines[0]
    assert result.stdout == ""
    assert tree(world["base"]) == before


def test_an_os_error_is_words_naming_the_file(
    builds: list[Path], root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An OSError no step expected (permissions, as root hard to provoke) is still one line of words."""

    class Unreadable(LocalStore):
        def snapshot(self) -> Any:
            raise PermissionError(13, "Permission denied", str(self.root / "versions"))

    monkeypatch.setattr(command_module, "open_store", lambda to, **_: Unreadable(Path(to)))
    with pytest.raises(FlashError) as raised:
        command(FlashOptions(to=str(root), list=True))
    assert str(raised.value) == f"flash: {root}/versions: Permission denied"


def test_root_script_round_trip() -> None:
    state = State(
        current="a" * 64, previous="b" * 64, action="publish", switched="2025-01-01T00:00:00Z", by="u@h"
    )
    text = root_script(state)
    assert parse_root_script(text, "x") == state
    assert parse_root_script("#!ipxe\nkernel vmlinuz\n", "x") is None
    with pytest.raises(FlashError, match="chain line"):
        parse_root_script(text.replace("chain versions/" + "a" * 64, "chain versions/" + "b" * 64), "x")


# --- ssh:// roots ---------------------------------------------------------------------------------


def parse_ssh_root(url: str) -> SshUrl:
    """An ssh:// PXE root as `--to` takes it (open_store parses it so)."""
    return parse_url(url, option="--to", path=True)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("ssh://boot1/srv/pxe", SshUrl(host="boot1", path="/srv/pxe")),
        (
            "ssh://root@boot1.example.net:2222/srv/pxe/",
            SshUrl("boot1.example.net", "/srv/pxe", "root", 2222),
        ),
        ("ssh://ops@[::1]:22/pxe", SshUrl("[::1]", "/pxe", "ops", 22)),
    ],
)
def test_ssh_urls(url: str, expected: SshUrl) -> None:
    assert parse_ssh_root(url) == expected


@pytest.mark.parametrize(
    "url", ["ssh://boot1", "ssh://boot1/", "ssh://-oProxyCommand=x/p", "ssh://h:99999/p", "ssh://h/a/../b"]
)
def test_bad_ssh_urls(url: str) -> None:
    with pytest.raises(UsageError):
        parse_ssh_root(url)


def test_ssh_command_lines() -> None:
    store = SshStore(
        parse_ssh_root("ssh://ops@boot1:2222/srv/my pxe"), ssh_config=Path("cfg"), ssh_key=Path("k")
    )
    argv = store.ssh_argv("echo $1", "x y")
    assert argv[:3] == ["ssh", "-p", "2222"]
    assert argv[3:5] == ["-F", "cfg"] and "IdentitiesOnly=yes" in argv and "BatchMode=yes" in argv
    assert argv[-2] == "ops@boot1"
    # One string for the remote shell: sh -c SCRIPT $0 ROOT ARGS, each quoted.
    assert argv[-1] == "sh -c 'echo $1' amnesiac-flash '/srv/my pxe' 'x y'"
    master = store.ssh_argv("true", master=Path("/tmp/cm"))
    assert "ControlMaster=yes" in master and "ControlPath=/tmp/cm" in master
    scp = store.scp_argv(Path("/tmp/up/initrd.img"), ".staging/abc")
    assert scp[:4] == ["scp", "-q", "-P", "2222"]
    assert scp[-2:] == ["/tmp/up/initrd.img", "ops@boot1:/srv/my pxe/.staging/abc/"]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, Path]) -> Iterator[Path]:
    """An sshd on 127.0.0.1 (a free port) that lets the ops key in as root; an ssh_config for it."""
    base = tmp_path_factory.mktemp("sshd")
    authorized = base / "authorized_keys"
    authorized.write_text(keys["ops"].with_suffix(".pub").read_text())
    authorized.chmod(0o600)
    with loopback_sshd(base, authorized) as daemon:
        known = base / "known_hosts"
        known.write_text(f"[127.0.0.1]:{daemon.port} {daemon.host_key.with_suffix('.pub').read_text()}")
        client = base / "ssh_config"
        client.write_text(
            f"Host pxe-test\n  HostName 127.0.0.1\n  Port {daemon.port}\n  User root\n"
            f"  IdentityFile {keys['ops']}\n  UserKnownHostsFile {known}\n  StrictHostKeyChecking yes\n"
        )
        yield client


def test_ssh_publish_list_rollback(builds: list[Path], sshd: Path, root: Path) -> None:
    url = f"ssh://pxe-test{root}"
    args = ("--ssh-config", str(sshd), "--json")
    for build in builds[:3]:
        result = amnesiac("flash", str(build), "--to", url, "--keep", "2", *args)
        assert result.returncode == 0, result.stderr
    assert_serves(root, builds[2])
    record = json.loads((root / "versions" / version_of(builds[2]) / "publish.json").read_text())
    assert record["signature"]["principal"] == "release@example.net"
    found = json.loads(amnesiac("flash", "--to", url, "--list", *args).stdout)
    assert [v["version"] for v in found["versions"]] == [version_of(builds[2]), version_of(builds[1])]
    assert [v["image"] for v in found["versions"]] == [image_of(builds[2]), image_of(builds[1])]
    assert found["versions"][0]["current"] and found["versions"][1]["previous"]
    result = amnesiac("flash", "--to", url, "--rollback", *args)
    assert result.returncode == 0, result.stderr
    assert_serves(root, builds[1])
    assert not (root / ".staging").exists()


def test_ssh_publish_killed_before_the_switch(builds: list[Path], sshd: Path, tmp_path: Path) -> None:
    root = tmp_path / "remote-pxe"
    url = f"ssh://pxe-test{root}"
    args = ("--ssh-config", str(sshd), "--force")
    assert amnesiac("flash", str(builds[0]), "--to", url, *args).returncode == 0
    before = served(root)
    for point in ("copy", "switch"):
        kill_at(point, builds[1], url, *args)
        assert served(root) == before
    result = amnesiac("flash", str(builds[1]), "--to", url, *args)  # the dead flash's lock is gone
    assert result.returncode == 0, result.stderr
    assert_serves(root, builds[1])
    assert not (root / ".staging").exists() and not list(root.glob(".boot.ipxe.*"))


# --- USB media ----------------------------------------------------------------------------------

USB_TOOLS = ("mkfs.vfat", "mcopy", "sfdisk", "wipefs")
needs_usb_tools = pytest.mark.skipif(
    any(shutil.which(t) is None for t in USB_TOOLS) or not Path("/usr/lib/systemd/boot/efi").is_dir(),
    reason="needs dosfstools, mtools, fdisk and systemd-boot-efi (`make setup`)",
)


def esp_file(image: Path, name: str) -> bytes:
    """A file from the image's EFI system partition (it starts at 1 MiB), read with mtools."""
    result = subprocess.run(
        ["mtype", "-i", f"{image}@@1M", f"::/{name}"],
        capture_output=True,
        check=True,
        env={**os.environ, "MTOOLS_SKIP_CHECK": "1"},
    )
    return result.stdout


@needs_usb_tools
def test_usb_image_is_a_gpt_disk_with_an_efi_partition_holding_the_build(
    builds: list[Path], tmp_path: Path, keys: dict[str, Path]
) -> None:
    stick = tmp_path / "stick.img"
    result = amnesiac(
        "flash", str(builds[0]), "--usb", str(stick), "--allowed-signers", str(keys["allowed"]), "--json"
    )
    assert result.returncode == 0, result.stderr
    written = json.loads(result.stdout)
    assert written["version"] == image_of(builds[0]) and written["sha256"] == sha256(stick.read_bytes())
    table = json.loads(
        subprocess.run(["sfdisk", "--json", str(stick)], capture_output=True, check=True).stdout
    )
    (part,) = table["partitiontable"]["partitions"]
    assert table["partitiontable"]["label"] == "gpt"
    assert part["type"] == "C12A7328-F81F-11D2-BA4B-00A0C93EC93B" and part["start"] == 2048
    assert esp_file(stick, "vmlinuz") == (builds[0] / "vmlinuz").read_bytes()
    assert esp_file(stick, "initrd.img") == (builds[0] / "initrd.img").read_bytes()
    assert esp_file(stick, "EFI/BOOT/BOOTX64.EFI")[:2] == b"MZ"  # systemd-boot, a PE binary
    cmdline = json.loads((builds[0] / "manifest.json").read_text())["image"]["cmdline"]
    entry = esp_file(stick, "loader/entries/amnesiac.conf").decode()
    assert "linux /vmlinuz\n" in entry and f"options {cmdline}\n" in entry
    record = json.loads(esp_file(stick, "amnesiac/publish.json"))
    assert record["signature"]["principal"] == "release@example.net" and record["report"]["passed"]
    assert esp_file(stick, "amnesiac/manifest.json") == (builds[0] / "manifest.json").read_bytes()


@needs_usb_tools
def test_usb_refuses_a_file_with_a_filesystem_unless_forced(builds: list[Path], tmp_path: Path) -> None:
    stick = tmp_path / "data.img"
    subprocess.run(["mkfs.vfat", "-C", str(stick), "8192"], capture_output=True, check=True)
    before = stick.read_bytes()
    result = amnesiac("flash", str(builds[0]), "--usb", str(stick), "--json")
    assert result.returncode == 3 and "holds vfat" in result.stderr, result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert stick.read_bytes() == before
    result = amnesiac("flash", str(builds[0]), "--usb", str(stick), "--force", "--json")  # unsigned too
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["forced"]  # no allowed signers: recorded
    assert esp_file(stick, "vmlinuz") == (builds[0] / "vmlinuz").read_bytes()


@needs_usb_tools
def test_usb_gate_applies(builds: list[Path], tmp_path: Path, keys: dict[str, Path]) -> None:
    (builds[0] / "report.json").unlink()
    stick = tmp_path / "stick.img"
    result = amnesiac("flash", str(builds[0]), "--usb", str(stick), "--allowed-signers", str(keys["allowed"]))
    assert result.returncode == 3 and "no verification report" in result.stderr
    assert not stick.exists()


@contextlib.contextmanager
def loop_device(backing: Path) -> Iterator[Path]:
    result = subprocess.run(
        ["losetup", "--find", "--show", str(backing)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        pytest.skip(f"no loop device here: {result.stderr.strip()}")
    device = Path(result.stdout.strip())
    try:
        yield device
    finally:
        subprocess.run(["losetup", "--detach", str(device)], check=False)


@contextlib.contextmanager
def private_mount_namespace() -> Iterator[list[str]]:
    """A mount namespace of the test's own, as the command prefix that enters it.

    A mount made in the host's namespace is copied into every namespace another test creates
    meanwhile (a chroot build, a podman container), and such a copy keeps the device busy after
    the test unmounts it: flash's exclusive open would then fail for a reason not its own.
    """
    holder = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sleep", "infinity"])
    try:
        within = ["nsenter", f"--target={holder.pid}", "--mount"]
        for _ in range(100):  # until unshare has exec'd sleep inside the new namespace
            if Path(f"/proc/{holder.pid}/ns/mnt").readlink() != Path("/proc/self/ns/mnt").readlink():
                break
            time.sleep(0.05)
        else:
            pytest.fail("unshare made no mount namespace")
        yield within
    finally:
        holder.kill()
        holder.wait()


@needs_usb_tools
def test_usb_refuses_a_mounted_device_even_forced(builds: list[Path], tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("loop devices need root")
    backing = tmp_path / "disk.img"
    with backing.open("wb") as f:
        f.truncate(80 * MIB)
    subprocess.run(["mkfs.ext4", "-q", str(backing)], capture_output=True, check=True)
    mount = tmp_path / "mnt"
    mount.mkdir()
    with loop_device(backing) as device, private_mount_namespace() as within:
        mounting = subprocess.run(
            [*within, "mount", str(device), str(mount)], check=False, capture_output=True
        )
        if mounting.returncode != 0:
            pytest.skip("cannot mount an ext4 loop device here")
        try:
            result = amnesiac(
                "flash", str(builds[0]), "--usb", str(device), "--force", "--json", within=within
            )
            assert result.returncode == 3 and "it is mounted" in result.stderr, result.stderr
        finally:
            subprocess.run([*within, "umount", str(mount)], check=True)
        result = amnesiac("flash", str(builds[0]), "--usb", str(device), "--json")
        assert result.returncode == 3 and "holds ext4" in result.stderr
        result = amnesiac("flash", str(builds[0]), "--usb", str(device), "--force", "--json")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["device"] is True
    table = json.loads(
        subprocess.run(["sfdisk", "--json", str(backing)], capture_output=True, check=True).stdout
    )
    assert table["partitiontable"]["label"] == "gpt"


def test_mountinfo_parsing() -> None:
    from amnesiac.flash.usb import mounted_numbers

    text = (
        "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
        "40 22 7:0 / /mnt/usb rw - vfat /dev/loop0 rw\n"
    )
    assert mounted_numbers(text) == {"8:1": "/", "7:0": "/mnt/usb"}


# --- the fleet playbook -------------------------------------------------------------------------

PLAYBOOK = REPO / "playbooks" / "publish.yml"


def playbook(inventory: dict[str, Any], tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "fleet.json"
    path.write_text(json.dumps({"all": {"children": {"pxe_servers": {"hosts": inventory}}}}))
    return subprocess.run(
        [str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(path), str(PLAYBOOK), *extra],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
        env={**os.environ, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_LOCALHOST_WARNING": "0"},
    )


def recap(output: str) -> dict[str, dict[str, int]]:
    hosts = {}
    for line in output.split("PLAY RECAP", 1)[1].splitlines():
        if ":" in line and "ok=" in line:
            name, counts = line.split(":", 1)
            hosts[name.strip()] = {k: int(v) for k, v in (c.split("=") for c in counts.split())}
    return hosts


def test_playbook_publishes_to_every_boot_server(
    builds: list[Path], tmp_path: Path, keys: dict[str, Path]
) -> None:
    roots = {name: tmp_path / name for name in ("boot1", "boot2")}
    inventory = {
        name: {"ansible_connection": "local", "amnesiac_publish_to": str(root)}
        for name, root in roots.items()
    }
    signers = ("-e", f"amnesiac_publish_allowed_signers={keys['allowed']}")
    for build in builds[:2]:
        result = playbook(inventory, tmp_path, "-e", f"amnesiac_publish_build={build}", *signers)
        assert result.returncode == 0, result.stdout[-3000:]
        assert all(recap(result.stdout)[name]["changed"] == 1 for name in roots)
    for root in roots.values():
        assert_serves(root, builds[1])
        assert listing(root)["previous"] == version_of(builds[0])
    # Again: nothing to switch anywhere.
    result = playbook(inventory, tmp_path, "-e", f"amnesiac_publish_build={builds[1]}", *signers)
    assert result.returncode == 0 and all(recap(result.stdout)[name]["changed"] == 0 for name in roots)
    # A build without a passing report is stopped before any boot server is touched.
    (builds[2] / "report.json").unlink()
    result = playbook(inventory, tmp_path, "-e", f"amnesiac_publish_build={builds[2]}", *signers)
    assert result.returncode != 0 and "no verification report" in result.stdout
    assert "boot1" not in recap(result.stdout)
    for root in roots.values():
        assert_serves(root, builds[1])


def test_playbook_reaches_boot_servers_over_ssh(
    builds: list[Path], sshd: Path, tmp_path: Path, keys: dict[str, Path]
) -> None:
    root = tmp_path / "remote"
    root.mkdir()
    shutil.copy(keys["allowed"], root / "allowed_signers")
    local = tmp_path / "local"
    local.mkdir()
    shutil.copy(keys["allowed"], local / "allowed_signers")
    inventory = {
        "boot-ssh": {"ansible_host": "pxe-test", "ansible_user": "root", "amnesiac_publish_root": str(root),
                     "ansible_ssh_private_key_file": str(keys["ops"])},
        "boot-local": {"ansible_connection": "local", "amnesiac_publish_to": str(local)},
    }  # fmt: skip
    result = playbook(
        inventory,
        tmp_path,
        "-e", f"amnesiac_publish_build={builds[0]}",
        "-e", f"amnesiac_publish_ssh_config={sshd}",
        "-e", "amnesiac_publish_serial=1",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:]
    said = " ".join(result.stdout.split())  # the YAML callback folds long lines
    assert f"ssh://root@pxe-test{root} serves {version_of(builds[0])[:12]}" in said
    assert_serves(root, builds[0])
    assert_serves(local, builds[0])
