"""Root cannot quietly undo the controls: the running kernel is locked down, no other kernel can
be started in its place, its self-protection settings are on, no firmware store keeps anything,
and the firmware cannot hand systemd a credential (role server_base; image/README.md gives the
reasons for each setting and for those left out).

Each check tries what the lock forbids, with an attempt that does nothing when it succeeds (a
read of one byte, a write of a value the setting already has), and reads the kernel's own state,
never a configuration file.
"""

from __future__ import annotations

from amnesiac.checks.expectations import Expectations
from amnesiac.checks.meta import KERNEL, check
from amnesiac.checks.probe import Probe

LOCKDOWN = "/sys/kernel/security/lockdown"
# What lockdown=confidentiality refuses to open, even to root: one byte is read from each.
LOCKED_FILES = {
    "/dev/mem": "physical memory",
    "/dev/port": "I/O ports (CMOS NVRAM keeps bytes written there across a reset)",
    "/proc/kcore": "the kernel's memory",
}
# image/README.md, "Kernel self-protection": each setting and the value the image runs with.
SELF_PROTECTION = {
    "kernel.kptr_restrict": "2",
    "kernel.yama.ptrace_scope": "2",
    "kernel.unprivileged_bpf_disabled": "1",
    "net.core.bpf_jit_harden": "2",
    "kernel.perf_event_paranoid": "3",
    "dev.tty.ldisc_autoload": "0",
    "fs.protected_fifos": "2",
    "fs.protected_regular": "2",
    "fs.protected_symlinks": "1",
    "fs.protected_hardlinks": "1",
}


def _sysctl_path(name: str) -> str:
    return "/proc/sys/" + name.replace(".", "/")


def _fields(shown: str) -> dict[str, str]:
    """The "name value" lines that one round trip printed, by name."""
    return dict(line.split(" ", 1) for line in shown.splitlines() if " " in line)


@check(
    claims=["no-disk-storage", "no-physical-access"],
    rationale="The kernel runs in lockdown (confidentiality): root cannot open physical memory, the "
    "kernel's memory or the I/O ports, so it can neither read what the kernel holds nor keep bytes "
    "in CMOS NVRAM across a reset, nor load unsigned code that would undo the module lock.",
    targets=KERNEL,
    not_applicable="lockdown is the booted kernel's",
    integrity=True,
)
def kernel_locked_down(probe: Probe) -> None:
    level = probe.run(f"cat {LOCKDOWN}").stdout.strip()
    assert "[confidentiality]" in level, f"kernel lockdown is {level or 'not available'} ({LOCKDOWN})"
    # One byte from each, in one round trip: each line is the path, then "opened" or head's error.
    attempts = probe.run(
        "; ".join(
            f"printf '%s ' {path}; head -c 1 {path} 2>&1 >/dev/null && echo opened" for path in LOCKED_FILES
        )
    ).stdout
    outcome = _fields(attempts)
    opened = {path: what for path, what in LOCKED_FILES.items() if outcome.get(path, "").strip() == "opened"}
    assert opened == {}, f"root can read {opened} despite lockdown"
    # Each refusal must be lockdown's (EPERM), not a file that is missing.
    other = {
        path: outcome.get(path, "no answer")
        for path in LOCKED_FILES
        if "Operation not permitted" not in outcome.get(path, "")
    }
    assert other == {}, f"not refused by lockdown: {other}"


@check(
    claims=["no-physical-access"],
    rationale="kexec is off for this boot (kernel.kexec_load_disabled=1, which only a reboot resets): "
    "no other kernel can be started in place of the running one, so what was locked at boot "
    "(module loading, lockdown) cannot be left behind that way.",
    targets=KERNEL,
    not_applicable="kexec is the booted kernel's",
    integrity=True,
)
def kexec_disabled(probe: Probe) -> None:
    path = _sysctl_path("kernel.kexec_load_disabled")
    value = probe.run(f"cat {path}").stdout.strip()
    assert value == "1", f"kernel.kexec_load_disabled is {value or 'absent'}: kexec can start another kernel"
    assert not probe.write_accepted(path, "0"), "kexec could be turned back on"


@check(
    claims=["no-pii-on-server"],
    rationale="The kernel's self-protection settings are on: no process may read another's memory "
    "(where a session's addresses live while it lasts) without CAP_SYS_PTRACE, kernel addresses are "
    "hidden even from root, BPF and perf events are root's only and hardened, and files in sticky "
    "world-writable directories cannot be used against another user.",
    targets=KERNEL,
    not_applicable="these settings are the booted kernel's",
    integrity=True,
)
def kernel_self_protection(probe: Probe) -> None:
    paths = " ".join(_sysctl_path(name) for name in SELF_PROTECTION)
    shown = probe.run(f'for f in {paths}; do echo "$f $(cat $f 2>/dev/null || echo absent)"; done').stdout
    running = _fields(shown)
    wrong = {
        name: running.get(_sysctl_path(name), "absent")
        for name, value in SELF_PROTECTION.items()
        if running.get(_sysctl_path(name)) != value
    }
    assert wrong == {}, f"self-protection settings not as image/README.md says: {wrong}"
    # kptr_restrict=2, observed: root reads no kernel address.
    symbol = probe.run("grep -m1 ' T ' /proc/kallsyms").stdout.split()
    assert symbol and set(symbol[0]) == {"0"}, f"root reads kernel addresses: {symbol[:3]}"


@check(
    claims=["no-disk-storage", "no-syslog"],
    rationale="No firmware store keeps anything across a reboot: the kernel registers no persistent "
    "store (pstore) backend, where it would save the end of its log on a crash (ACPI ERST on servers; "
    "the harness attaches one), EFI variables cannot be mounted (efivarfs is not in the image), there "
    "is no /dev/nvram, and /dev/port, through which CMOS NVRAM is written, is refused by lockdown "
    "(kernel_locked_down).",
    targets=KERNEL,
    not_applicable="the firmware stores are the booted kernel's to use",
    integrity=True,
)
def no_firmware_store(probe: Probe, expected: Expectations) -> None:
    shown = probe.run(
        'echo "backend $(cat /sys/module/pstore/parameters/backend 2>/dev/null || echo absent)"; '
        'echo "records $(ls -A /sys/fs/pstore 2>/dev/null | wc -l)"; '
        'echo "erst-table $(test -e /sys/firmware/acpi/tables/ERST && echo yes || echo no)"; '
        'echo "efivarfs $(grep -cw efivarfs /proc/filesystems)"; '
        'echo "nvram $(test -e /dev/nvram && echo yes || echo no)"'
    ).stdout
    state = _fields(shown)
    if expected.test_devices_attached:
        # Positive control: the store is there for the kernel to use; not using it is the control.
        assert state.get("erst-table") == "yes", (
            "positive control: the harness's ERST store did not reach the kernel"
        )
    backend = state.get("backend", "absent")
    assert backend in ("(null)", "", "absent"), (
        f"the kernel keeps its log in a firmware store: pstore backend {backend}"
    )
    assert state.get("records") == "0", (
        f"{state.get('records')} records in /sys/fs/pstore from an earlier boot"
    )
    assert state.get("efivarfs") == "0", "efivarfs is available: EFI variables can be written"
    assert state.get("nvram") == "no", "/dev/nvram is there: CMOS NVRAM can be written"


# systemd reads a boolean as parse_boolean() does; a key given alone means true. The last one wins.
_FALSE = {"0", "no", "n", "false", "f", "off"}
_IMPORT_KEYS = {"systemd.import_credentials", "systemd.import-credentials"}
CREDENTIAL_STORE = "/run/credentials/@system"


def _imports_credentials(cmdline: str) -> bool:
    """Whether systemd imports credentials with this kernel command line (the default: yes)."""
    values = [word.partition("=") for word in cmdline.split()]
    given = [value if eq else "yes" for key, eq, value in values if key in _IMPORT_KEYS]
    return not given or given[-1].lower() not in _FALSE


def offered_credentials_command(entries: str = "/sys/firmware/dmi/entries") -> str:
    """The credentials among the SMBIOS OEM strings, one a line: each type 11 structure is a raw
    file, its header, then its strings, each ending in a NUL."""
    return f"cat {entries}/11-*/raw 2>/dev/null | tr '\\0' '\\n' | grep -ao 'io[.]systemd[.]credential.*'"


def _offered_credentials(strings: str) -> dict[str, str]:
    """The credentials in SMBIOS OEM strings (io.systemd.credential[.binary]:NAME=VALUE), by name."""
    offered: dict[str, str] = {}
    for line in strings.splitlines():
        prefix, colon, credential = line.partition(":")
        if colon and prefix in ("io.systemd.credential", "io.systemd.credential.binary"):
            name, _, value = credential.partition("=")
            offered[name] = value
    return offered


@check(
    claims=["no-physical-access"],
    rationale="systemd takes no credentials from the firmware: without systemd.import_credentials=no "
    "it imports those in the SMBIOS OEM strings (on bare metal too) and its services act on them "
    "(tmpfiles.extra writes any file as root, systemd.extra-unit.* adds a unit, "
    "ssh.authorized_keys.root a root login), so whoever sets the firmware's tables (a BMC, a "
    "hypervisor) would be root without a login and without a trace. The harness offers one, a "
    "tmpfiles line: it must not reach the system's credential store, and its file must not exist.",
    targets=KERNEL,
    not_applicable="the firmware's credentials are the booted system manager's to import",
    integrity=True,
)
def no_firmware_credentials(probe: Probe, expected: Expectations) -> None:
    offered = _offered_credentials(probe.run(offered_credentials_command()).stdout)
    if expected.test_devices_attached:
        assert offered, "positive control: the harness's SMBIOS credential did not reach the kernel"
    elif not offered:
        probe.note("the firmware offers no credential: the verdict rests on the store and the command line")
    # What an offered tmpfiles line would have made (its second field, the path), and the store.
    paths = [
        words[1] for words in map(str.split, offered.get("tmpfiles.extra", "").splitlines()) if len(words) > 1
    ]
    if paths:
        loop = "for p in " + " ".join(["%s"] * len(paths)) + '; do test -e "$p" && echo "$p"; done; true'
        made = probe.run(loop, *paths).stdout.split()
        assert made == [], f"the firmware's tmpfiles line ran as root: {made} exist"
    store = probe.run(f"ls -A {CREDENTIAL_STORE} 2>/dev/null; true").stdout.split()
    assert store == [], f"systemd imported credentials into {CREDENTIAL_STORE}: {store}"
    cmdline = probe.run("cat /proc/cmdline").stdout
    assert not _imports_credentials(cmdline), (
        "systemd would import credentials from the firmware: no systemd.import_credentials=no on the "
        f"kernel command line (offered now: {sorted(offered) or 'none'})"
    )
