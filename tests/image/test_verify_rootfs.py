"""verify on an unpacked image root (chroot:): the build-time half of every claim.

The negative proof: on the OVPN image built with every control off, every technical claim of
the policy fails. A check that could never fail would leave its claim standing here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from amnesiac import policy
from tests.images import BUILD_LANE, REPO, Built, amnesiac

pytestmark = [pytest.mark.build, BUILD_LANE]

OVPN = REPO / "policies/ovpn.yml"


def verify_rootfs(
    built: Built, report: Path, *, unpack: bool = False, policy_file: Path = OVPN, tmpdir: Path | None = None
) -> tuple[int, dict[str, Any]]:
    """chroot: on the root the fixture unpacked (with --build), or on the build directory, which
    verify unpacks itself (`unpack`)."""
    where = (
        ["--target", f"chroot:{built.out}"]
        if unpack
        else ["--target", f"chroot:{built.root}", "--build", str(built.out)]
    )
    result = amnesiac(
        "verify",
        "--json",
        "--policy",
        str(policy_file),
        *where,
        "--report",
        str(report),
        check=False,
        tmpdir=tmpdir,
    )
    assert result.returncode in (0, 1, 5), result.stderr
    data: dict[str, Any] = json.loads((report / "report.json").read_text())
    return result.returncode, data


def statuses(report: dict[str, Any]) -> dict[str, str]:
    return {c["id"]: c["status"] for c in report["claims"] if c["kind"] == "technical"}


def test_shipped_image_root_fails_nothing_and_proves_only_part(ovpn: Built, tmp_path: Path) -> None:
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    code, report = verify_rootfs(ovpn, tmp_path / "report", unpack=True, tmpdir=tmpdir)
    identity = report["target"]["identity"]
    assert identity["artifacts"] == {"initrd.img": ovpn.manifest["image"]["sha256"]}
    assert identity["manifest_sha256_matches"] is True
    assert list(tmpdir.iterdir()) == [], "the unpacked root is gone"
    failed = {
        c["id"]: c["reason"] for c in [report["integrity"], *report["claims"]] if c["status"] == "failed"
    }
    assert failed == {}
    # A root file tree cannot show what runs: the claims with booted-only checks say so, and the
    # verdict is incomplete (exit 5), never a pass.
    assert (code, report["verdict"]) == (5, "incomplete")
    partial = {c["id"]: c["reason"] for c in report["claims"] if c["status"] == "partially-verified"}
    assert partial and all("checks ran on this target; not here:" in r for r in partial.values())
    assert "logging.logger_canary_not_kept" in partial["no-activity-logging"]
    assert report["target"]["kind"] == "chroot"
    assert report["target"]["identity"]["image_sha256"] == ovpn.manifest["image"]["sha256"]
    # Build-time checks ran: a rootfs is not a free pass.
    outcomes = [k["outcome"] for c in report["claims"] for k in c["checks"]]
    assert outcomes.count("passed") >= 10
    assert all(c["status"] != "not-applicable" or c["reason"] for c in report["claims"])
    assert (tmp_path / "report/report.html").is_file() and (tmp_path / "report/junit.xml").is_file()


def test_every_claim_fails_without_its_controls(ovpn_without_controls: Built, tmp_path: Path) -> None:
    code, report = verify_rootfs(ovpn_without_controls, tmp_path / "report")
    assert code == 1
    technical = {c.id for c in policy.load(OVPN).technical_claims()}
    got = statuses(report)
    standing = sorted(c for c in technical if got[c] != "failed")
    assert standing == [], f"claims whose checks do not fail without their controls: {standing}"
    # A check that cannot run here does not hide a failure beside it: failed wins over partial.
    mixed = [
        c for c in report["claims"]
        if c["status"] == "failed" and {k["outcome"] for k in c["checks"]} >= {"failed", "not-applicable"}
    ]  # fmt: skip
    assert mixed, "some claim has a failed check and one that cannot run on a root tree"


@pytest.mark.parametrize("name", ["ivpn", "cloudvpn"])
def test_every_seed_image_root_fails_nothing(
    name: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """The other seed policies' images, as built: no build-time check fails on their roots.
    (Under `make test` this lane builds them, while the guest lane boots the OVPN image.)"""
    built: Built = request.getfixturevalue(name)
    code, report = verify_rootfs(built, tmp_path / "report", policy_file=REPO / f"policies/{name}.yml")
    failed = {
        c["id"]: c["reason"] for c in [report["integrity"], *report["claims"]] if c["status"] == "failed"
    }
    assert failed == {}
    assert (code, report["verdict"]) == (5, "incomplete")  # booted-only checks cannot run on a root
