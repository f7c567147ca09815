"""Where a boot's time goes: QEMU start to SSH, phase by phase, and the systemd units on the path.

Run as root from the repository, with a build:
    .venv/bin/python -m benchmarks.boot_phases build/ovpn [--boots 2] [--netboot]
A build with a UKI boots measured (UEFI, swtpm, Secure Boot: boot/firmware.py); --netboot boots
the same build over iPXE under SeaBIOS, for the comparison. Prints, per boot, when each
milestone first showed on the serial console (the host's clock from QEMU's start, read every
0.1 s), the phases between them, then, from the booted guest,
`systemd-analyze` and the critical chain to ssh.service and the slowest units. Target (TCG,
2 cores): QEMU start to SSH <= 20 s.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from amnesiac import boot

REPO = Path(__file__).resolve().parent.parent
# Console lines that start each phase, in boot order: (milestone, text that marks it).
MILESTONES = (
    ("UEFI firmware", "BdsDxe"),
    ("systemd-stub hands over", "EFI stub:"),
    ("iPXE", "iPXE"),
    ("iPXE fetches the kernel", "vmlinuz"),
    ("kernel starts", "Linux version"),
    ("early init starts", "Run /init as init process"),
    ("systemd starts", "systemd["),
    ("sshd started", "OpenBSD Secure Shell server"),
)
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1bc|\r")
GUEST_COMMANDS = (
    "systemd-analyze",
    "systemd-analyze critical-chain ssh.service --no-pager",
    "systemd-analyze blame --no-pager | head -15",
)


def watch_console(log: Path, start: float, lines: list[tuple[float, str]], stop: threading.Event) -> None:
    """Each console line with the host's time (from `start`) when it first showed in `log`.

    Read from the file, not from the machine: `boot.running` returns only once the kernel runs."""
    offset, pending = 0, b""
    while not stop.is_set():
        if log.exists():
            with log.open("rb") as f:
                f.seek(offset)
                data = f.read()
            if len(data) == 0 and log.stat().st_size < offset:  # QEMU started again: a new log
                offset, pending = 0, b""
                lines.clear()
                continue
            offset += len(data)
            *complete, pending = (pending + data).split(b"\n")
            now = time.monotonic() - start
            lines.extend((now, ANSI.sub("", line.decode(errors="replace")).strip()) for line in complete)
        time.sleep(0.05)


def one_boot(build: Path, work: Path, timeout: float, guest: bool, netboot: bool = False) -> None:
    key = work / "id_ed25519"
    if not key.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key], check=True)
    log = work / "serial.log"
    log.unlink(missing_ok=True)
    lines: list[tuple[float, str]] = []
    stop = threading.Event()
    start = time.monotonic()
    watcher = threading.Thread(target=watch_console, args=(log, start, lines, stop), daemon=True)
    watcher.start()
    options = boot.BootOptions(
        ssh_key=key.with_suffix(".pub"), serial_log=log, measured=False if netboot else None
    )
    with boot.running(build, options) as machine:
        ssh_at = machine.wait_ssh(timeout=timeout) + (machine.started - start)
        if machine.measured is not None:
            print(f"measured boot: prepared in {machine.measured.timings}")
        time.sleep(0.2)
        stop.set()
        watcher.join()
        seen: dict[str, float] = {}
        for at, text in lines:
            for name, marker in MILESTONES:
                if name not in seen and marker in text:
                    seen[name] = at
        seen["QEMU starts"] = machine.started - start  # after the test UKI and the TPM are ready
        seen["SSH answers"] = ssh_at
        previous = 0.0
        print(f"{'milestone':<28} {'at':>7} {'phase':>7}")
        for name, at in sorted(seen.items(), key=lambda item: item[1]):
            print(f"{name:<28} {at:6.1f}s {at - previous:6.1f}s")
            previous = at
        (work / "console-timed.txt").write_text("".join(f"{at:7.2f} {text}\n" for at, text in lines))
        if not guest:
            return
        ssh_argv = shlex.split(machine.ssh_command())
        command = [ssh_argv[0], "-o", "LogLevel=ERROR", *ssh_argv[1:]]
        for remote in GUEST_COMMANDS:
            result = subprocess.run([*command, remote], capture_output=True, text=True, check=False)
            print(f"\n$ {remote}\n{(result.stdout or result.stderr).rstrip()}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("build", type=Path, nargs="?", default=REPO / "build/ovpn")
    parser.add_argument("--boots", type=int, default=2, help="boots in a row; the last is asked")
    parser.add_argument("--timeout", type=float, default=240.0)
    parser.add_argument("--keep", type=Path, help="keep each boot's timed console log here")
    parser.add_argument("--netboot", action="store_true", help="iPXE under SeaBIOS: no UKI, no TPM")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="amnesiac-bench-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for number in range(args.boots):
            print(f"== boot {number + 1} of {args.boots}", flush=True)
            last = number == args.boots - 1
            one_boot(args.build.resolve(), work, args.timeout, guest=last, netboot=args.netboot)
            if args.keep:
                (work / "console-timed.txt").rename(work / f"console-timed-{number + 1}.txt")


if __name__ == "__main__":
    main()
