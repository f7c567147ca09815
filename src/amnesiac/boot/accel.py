"""KVM or TCG: KVM only when a probe guest really runs under it.

On some hosts /dev/kvm opens but guests hang or stop ("KVM internal error", emulation failure
in the kernel's decompressor under nested virtualisation); there the boot falls back to TCG and
says why.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from amnesiac.boot.qemu import QEMU, die_with_parent, read_log
from amnesiac.errors import UsageError
from amnesiac.run import spawn, stop_group

ACCEL_ENV = "AMNESIAC_ACCEL"

Accel = Literal["auto", "kvm", "tcg"]


@dataclass(frozen=True)
class AccelChoice:
    accel: Literal["kvm", "tcg"]
    reason: str


_probe_cache: dict[str, AccelChoice] = {}


def choose_accel(requested: Accel | None, kernel: Path) -> AccelChoice:
    """KVM when a probe guest runs under it, else TCG; the reason is for the output."""
    requested = requested or _env_accel()
    if requested == "tcg":
        return AccelChoice("tcg", "TCG emulation, as asked")
    if requested == "kvm":
        return AccelChoice("kvm", "KVM, as asked (no probe)")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return AccelChoice("tcg", "TCG emulation: /dev/kvm is missing or not usable")
    if "auto" not in _probe_cache:
        _probe_cache["auto"] = _probe_kvm(kernel)
    return _probe_cache["auto"]


def _env_accel() -> Accel:
    value = os.environ.get(ACCEL_ENV, "auto")
    if value not in {"auto", "kvm", "tcg"}:
        raise UsageError(f"${ACCEL_ENV} must be auto, kvm or tcg, not {value!r}")
    return value  # type: ignore[return-value]


def _probe_kvm(kernel: Path, timeout: float = 20.0) -> AccelChoice:
    """Boot the image's kernel under KVM with no root: it must reach its panic, quickly."""
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="amnesiac-kvm-probe-") as tmp:
        serial, err = Path(tmp) / "serial.log", Path(tmp) / "qemu.err"
        cmd = [
            QEMU, "-accel", "kvm", "-machine", "q35", "-cpu", "host", "-m", "256", "-nodefaults",
            "-display", "none", "-no-reboot", "-serial", f"file:{serial}",
            "-kernel", str(kernel), "-append", "console=ttyS0 panic=-1",
        ]  # fmt: skip
        with err.open("wb") as err_file:
            proc = spawn(cmd, stdout=subprocess.DEVNULL, stderr=err_file, preexec_fn=die_with_parent)
        verdict = ""
        try:
            while time.monotonic() - start < timeout:
                time.sleep(0.2)
                if "Kernel panic" in read_log(serial):
                    verdict = "ok"
                    break
                errors = read_log(err)
                if "KVM internal error" in errors or "emulation failure" in errors:
                    verdict = "KVM internal error (emulation failure)"
                    break
                if proc.poll() is not None:
                    verdict = f"the probe guest stopped early (QEMU exit {proc.returncode})"
                    break
            else:
                verdict = f"the probe guest made no progress in {timeout:.0f} s"
        finally:
            stop_group(proc, term_timeout=5)
    seconds = time.monotonic() - start
    if verdict == "ok":
        return AccelChoice("kvm", f"KVM (a probe guest ran under it in {seconds:.1f} s)")
    return AccelChoice(
        "tcg",
        f"TCG emulation: /dev/kvm is there but KVM guests fail on this host ({verdict}; "
        f"{ACCEL_ENV}=tcg skips this {seconds:.0f} s probe)",
    )
