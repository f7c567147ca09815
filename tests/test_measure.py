"""PCR 11 as systemd-stub extends it, predicted from sections or from their digests (what a
verifier has in manifest.json); tests/test_attest.py checks the prediction against a real TPM
extended the same way, and the build against systemd-measure."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from amnesiac.image import measure, uki

SECTIONS = {
    ".linux": b"kernel",
    ".osrel": b"ID=debian\n",
    ".cmdline": b"quiet",
    ".initrd": b"root",
    ".uname": b"6",
}


def test_the_prediction_from_digests_is_the_prediction_from_contents() -> None:
    digests = {name: hashlib.sha256(body).hexdigest() for name, body in SECTIONS.items()}
    assert measure.pcr11(SECTIONS) == measure.pcr11_of_digests(digests)


def test_every_section_and_its_order_count() -> None:
    base = measure.pcr11(SECTIONS)
    assert measure.pcr11({**SECTIONS, ".cmdline": b"quiet "}) != base
    assert measure.pcr11({k: v for k, v in SECTIONS.items() if k != ".uname"}) != base
    # The stub's order, not the file's: a dict in another order predicts the same value.
    assert measure.pcr11(dict(reversed(list(SECTIONS.items())))) == base
    # Names are measured too: the same contents under swapped names differ.
    swapped = {**SECTIONS, ".osrel": SECTIONS[".uname"], ".uname": SECTIONS[".osrel"]}
    assert measure.pcr11(swapped) != base
    assert measure.pcr11({}) == measure.ZEROS


def test_the_uki_command_line_drops_only_initrd() -> None:
    cmdline = "initrd=initrd.img console=ttyS0 amnesiac.image=ab initrd=other.img quiet"
    assert uki.uki_cmdline(cmdline) == "console=ttyS0 amnesiac.image=ab quiet"


def test_two_builds_making_the_same_tools_root_at_once_both_use_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two cold builds beside each other (make test's lanes) each make the UKI tools root under
    a name of their own; the second to finish finds the first's in place and uses it."""
    cache = tmp_path / "cache"
    made: list[Path] = []

    def mmdebstrap(argv: list[str], **_: object) -> None:
        partial = Path(argv[-2])
        (partial / "made-by-me").mkdir(parents=True)
        made.append(partial)
        root = cache / partial.name.removeprefix(".").rsplit(".", 2)[0]
        (root / "made-by-the-other-build").mkdir(parents=True)  # it finished first

    monkeypatch.setattr(uki, "run", mmdebstrap)
    monkeypatch.setattr(uki.rootfs, "mmdebstrap_version", lambda: "1.5.7")
    monkeypatch.setattr(uki, "_versions", lambda root, packages: {})
    tools = uki.tools_root("trixie", "http://deb.debian.org/debian", cache)
    assert (tools.dir / "made-by-the-other-build").is_dir() and not (tools.dir / "made-by-me").exists()
    assert not made[0].exists(), "its own partial root is removed"
