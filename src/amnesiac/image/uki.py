"""The unified kernel image: kernel, initrd and command line in one EFI binary, and its PCR 11.

systemd-stub, at the front of the UKI, measures each of its sections into PCR 11 before it
starts the kernel, so a TPM quote of PCR 11 says which kernel, initrd and command line booted
(attest.py). The UKI is made with Debian's own ukify and stub, of the image's suite, from a
tools root that mmdebstrap makes once per suite and mirror and keeps in the cache (the image
itself carries neither). The build predicts PCR 11 twice, by measure.pcr11 from the sections in
the file and by systemd-measure, and refuses a UKI on which they disagree.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from amnesiac.errors import BuildError
from amnesiac.image import measure, rootfs
from amnesiac.run import run

NAME = "amnesiac.efi"
TOOLS_PACKAGES = ("systemd-ukify", "systemd-boot-efi", "systemd")
STUB_PACKAGE = "systemd-boot-efi"
SYSTEMD_MEASURE = "/usr/lib/systemd/systemd-measure"
# The sections systemd-measure takes as --<name>=FILE.
_MEASURE_OPTIONS = {".linux": "linux", ".osrel": "osrel", ".cmdline": "cmdline", ".initrd": "initrd",
                    ".uname": "uname", ".sbat": "sbat"}  # fmt: skip


@dataclass(frozen=True)
class ToolsRoot:
    """A root of the image's suite with ukify, systemd-stub and systemd-measure."""

    dir: Path
    key: str
    versions: dict[str, str]  # package -> version: the stub is what the firmware runs


@dataclass(frozen=True)
class Uki:
    path: Path
    sha256: str
    size: int
    pcr11: str  # the sha256 bank's PCR 11 after the stub measured it (hex)
    sections: dict[str, str]  # measured section -> sha256 of its contents


def uki_cmdline(cmdline: str) -> str:
    """The image's command line as the UKI carries it: without `initrd=`, which names a file on
    a boot loader's file system (iPXE's, for the kernel's EFI stub); a UKI's initrd is its own."""
    return " ".join(word for word in cmdline.split() if not word.startswith("initrd="))


def tools_key(suite: str, mirror: str, mmdebstrap_version: str) -> str:
    inputs = {"format": 1, "suite": suite, "mirror": mirror,
              "packages": sorted(TOOLS_PACKAGES), "mmdebstrap": mmdebstrap_version}  # fmt: skip
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def tools_root(suite: str, mirror: str, cache: Path, *, refresh: bool = False) -> ToolsRoot:
    """The cached tools root for a suite and mirror, made first if it is missing (by the build,
    and by the QEMU harness for the test UKI, from the same cache).

    Made under a temporary name and renamed, so an interrupted run leaves no half root in the
    cache; like the image's root it stays as made until `--refresh`.
    """
    key = tools_key(suite, mirror, rootfs.mmdebstrap_version())
    root = cache / f"uki-tools-{suite}-{key}"
    if refresh and root.is_dir():
        shutil.rmtree(root)
    if not root.is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        partial = cache / f".{root.name}.{os.getpid()}.partial"
        try:
            run(
                [
                    "mmdebstrap",
                    "--variant=apt",
                    "--mode=root",
                    f"--include={','.join(TOOLS_PACKAGES)}",
                    '--aptopt=Acquire::Languages "none"',
                    suite,
                    partial,
                    mirror,
                ],
                capture=True,
            )
            try:
                partial.rename(root)
            except OSError:
                if not root.is_dir():
                    raise
                # A build beside this one made the same root first (same key, same inputs): use it.
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return ToolsRoot(root, key, _versions(root, TOOLS_PACKAGES))


def _versions(root: Path, packages: Sequence[str]) -> dict[str, str]:
    admin = f"--admindir={root / 'var/lib/dpkg'}"
    out = run(["dpkg-query", admin, "-W", "-f", "${Package}\t${Version}\n", *packages], capture=True)
    return dict(line.split("\t", 1) for line in out.stdout.decode().splitlines() if "\t" in line)


def make(
    tools: ToolsRoot,
    *,
    linux: Path,
    initrds: Sequence[Path],
    cmdline: str,
    os_release: bytes,
    uname: str,
    out: Path,
    source_date_epoch: int,
) -> Uki:
    """Write the UKI of these parts to `out` (the command line as `uki_cmdline` makes it) and
    predict its PCR 11 (BuildError if the two predictions differ). Several initrds are
    concatenated into the one .initrd section, as a boot loader would hand them over."""
    work = tools.dir / "tmp" / f"amnesiac-uki-{os.getpid()}"
    inside = Path("/") / work.relative_to(tools.dir)
    work.mkdir(parents=True)
    try:
        shutil.copyfile(linux, work / "linux")
        for index, initrd in enumerate(initrds):
            shutil.copyfile(initrd, work / f"initrd{index}")
        # No trailing newline: it would be part of .cmdline, and of the measurement.
        (work / "cmdline").write_text(uki_cmdline(cmdline))
        (work / "os-release").write_bytes(os_release)
        env = {**os.environ, "SOURCE_DATE_EPOCH": str(source_date_epoch)}
        run(
            [
                "chroot", tools.dir, "ukify", "build",
                "--linux", inside / "linux",
                *(arg for i in range(len(initrds)) for arg in ("--initrd", str(inside / f"initrd{i}"))),
                "--cmdline", f"@{inside / 'cmdline'}",
                "--os-release", f"@{inside / 'os-release'}",
                "--uname", uname,
                "--output", inside / "uki.efi",
            ],
            capture=True,
            env=env,
        )  # fmt: skip
        sections = measure.uki_sections(work / "uki.efi")
        predicted = measure.pcr11(sections)
        told = _systemd_measure(tools, work, inside, sections)
        if told != predicted:
            raise BuildError(
                f"PCR 11 of the UKI: systemd-measure says {told[:16]}, amnesiac {predicted[:16]}",
                hint="the stub's measurement changed: update image/measure.py's STUB_ORDER",
            )
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(work / "uki.efi", out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    data = out.read_bytes()
    return Uki(
        path=out,
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        pcr11=predicted,
        sections={name: hashlib.sha256(body).hexdigest() for name, body in sections.items()},
    )


def _systemd_measure(tools: ToolsRoot, work: Path, inside: Path, sections: dict[str, bytes]) -> str:
    """systemd's own prediction of PCR 11 with no boot phase (measure.PHASES is empty)."""
    args = []
    for name, body in sections.items():
        option = _MEASURE_OPTIONS.get(name)
        if option is None:
            raise BuildError(f"the UKI has a section {name} that systemd-measure is not given")
        (work / f"section{name}").write_bytes(body)
        args.append(f"--{option}={inside / f'section{name}'}")
    out = run(
        ["chroot", tools.dir, SYSTEMD_MEASURE, "calculate", *args, f"--bank={measure.BANK}",
         f"--phase={':'.join(measure.PHASES)}"],
        capture=True,
    )  # fmt: skip
    for line in out.stdout.decode().splitlines():
        # "11:sha256=<hex>"
        head, _, value = line.strip().partition("=")
        if head == f"11:{measure.BANK}":
            return value.lower()
    raise BuildError(f"systemd-measure printed no PCR 11: {out.stdout.decode().strip()[:200]}")
