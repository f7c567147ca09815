"""No console, keyboard or USB access.

The QEMU harness attaches a USB controller with a keyboard and a stick: the checks show the
controller is on the bus and that nothing drives it, rather than that a setting is present.
"""

from __future__ import annotations

from amnesiac.checks.expectations import Expectations
from amnesiac.checks.meta import KERNEL, RUNNING, Surface, check
from amnesiac.checks.probe import Probe

PCI_USB_CLASS = "0x0c03"  # serial bus controller, USB
GETTY_PROCESSES = ("agetty", "getty", "mingetty", "login", "sulogin", "sushell")


@check(
    claims=["no-physical-access"],
    rationale="The USB controller is present on the PCI bus but no driver claims it: the USB "
    "keyboard and stick plugged into it are not enumerated and give no input device.",
    targets=KERNEL,
    not_applicable="USB enumeration is the booted kernel's; a container or root directory has none",
)
def usb_not_enumerated(probe: Probe, expected: Expectations) -> None:
    controllers = probe.pci_devices(PCI_USB_CLASS)
    if expected.test_devices_attached:
        assert controllers, "positive control: the harness attached a USB controller but it is not on the bus"
    bound = [" ".join(c) for c in controllers if c[2]]
    assert bound == [], f"USB controllers with a driver: {bound}"
    bus = probe.run("ls -1 /sys/bus/usb/devices 2>&1; test ! -e /sys/bus/usb")
    assert bus.rc == 0, f"the USB bus exists: {bus.stdout.split()}"
    inputs = probe.run("cat /proc/bus/input/devices").stdout
    assert "Bus=0003" not in inputs, "an input device on the USB bus (Bus=0003)"


@check(
    claims=["no-physical-access"],
    rationale="No PS/2 (i8042) keyboard is registered: the keyboard port gives no input device.",
    targets=KERNEL,
    not_applicable="input devices are the booted kernel's",
)
def no_i8042_keyboard(probe: Probe) -> None:
    inputs = probe.run("cat /proc/bus/input/devices").stdout
    keyboards = [
        block for block in inputs.split("\n\n") if "Bus=0011" in block or "keyboard" in block.lower()
    ]
    assert keyboards == [], f"keyboard input devices: {keyboards}"
    serio = probe.run("ls -1 /sys/bus/serio/devices 2>/dev/null").stdout.split()
    assert serio == [], f"PS/2 (serio) ports in use: {serio}"


@check(
    claims=["no-physical-access"],
    rationale="No getty or login prompt runs on any virtual terminal or serial line, and the "
    "getty units are masked so nothing can start one.",
)
def no_getty(probe: Probe, kind: Surface) -> None:
    # A unit is masked by a link to /dev/null in /etc; an alias (autovt@ is getty@ in Debian)
    # is masked when the unit it names is.
    masked = probe.run(
        "for u in getty@.service serial-getty@.service autovt@.service console-getty.service; do "
        "t=$u; a=$(readlink /usr/lib/systemd/system/$u); case $a in */*|'') ;; *) t=$a;; esac; "
        "l=$(readlink /etc/systemd/system/$u || readlink /etc/systemd/system/$t); "
        'printf "%s %s %s\\n" $u $t "$l"; done'
    ).stdout.splitlines()
    unmasked = [line.split()[0] for line in masked if not line.endswith("/dev/null")]
    assert unmasked == [], f"getty units not masked: {unmasked}"
    if kind is not Surface.ROOTFS:
        running = probe.run("ps -eo comm=").stdout.split()
        found = sorted(set(running) & set(GETTY_PROCESSES))
        assert found == [], f"login processes running: {found}"


@check(
    claims=["no-physical-access"],
    rationale="The magic SysRq key is off: no key combination on a console can act on the kernel.",
    targets=KERNEL,
    not_applicable="the SysRq setting is the booted kernel's",
)
def sysrq_disabled(probe: Probe) -> None:
    value = probe.run("cat /proc/sys/kernel/sysrq").stdout.strip()
    assert value == "0", f"kernel.sysrq is {value}"
    cmdline = probe.run("cat /proc/cmdline").stdout.split()
    assert "sysrq_always_enabled" not in cmdline, "sysrq_always_enabled is on the command line"


@check(
    claims=["no-physical-access"],
    rationale="Ctrl-Alt-Del on a console does nothing: ctrl-alt-del.target is masked and the "
    "burst action is none.",
    targets=RUNNING,
    not_applicable="systemd does not run in an unpacked root",
)
def ctrl_alt_del_masked(probe: Probe) -> None:
    state = probe.run("systemctl is-enabled ctrl-alt-del.target").stdout.strip()
    assert state == "masked", f"ctrl-alt-del.target is {state!r}"
    burst = probe.run("systemctl show -p CtrlAltDelBurstAction --value").stdout.strip()
    assert burst == "none", f"CtrlAltDelBurstAction={burst}"


@check(
    claims=["no-physical-access"],
    rationale="A failed boot never gives a shell: the emergency and rescue units do not start "
    "sulogin or a shell, and the debug shell is off.",
    targets=RUNNING,
    not_applicable="systemd does not run in an unpacked root",
)
def no_rescue_shell(probe: Probe) -> None:
    for unit in ("emergency.service", "rescue.service"):
        start = probe.run(f"systemctl show -p ExecStart --value {unit}; systemctl is-enabled {unit}").stdout
        assert "sulogin" not in start and "/bin/sh" not in start and "bash" not in start, (
            f"{unit} starts a shell: {start.strip()}"
        )
    debug = probe.run("systemctl is-enabled debug-shell.service; systemctl is-active debug-shell.service")
    assert "enabled" not in debug.stdout.split() and "active" not in debug.stdout.split(), debug.stdout
    assert "systemd.debug_shell" not in probe.run("cat /proc/cmdline").stdout


@check(
    claims=["no-physical-access"],
    rationale="Once boot is complete no kernel module can be loaded (kernel.modules_disabled=1): "
    "a driver for a device plugged in later cannot be loaded, even by root.",
    targets=KERNEL,
    not_applicable="module loading is the booted kernel's",
)
def module_loading_locked(probe: Probe) -> None:
    value = probe.run("cat /proc/sys/kernel/modules_disabled").stdout.strip()
    assert value == "1", f"kernel.modules_disabled is {value}"
    candidate = probe.run(
        "loaded=$(cut -d' ' -f1 /proc/modules); "
        "for m in $(find /usr/lib/modules/$(uname -r) -name '*.ko*' -printf '%f\\n' "
        "| sed 's/\\.ko.*//;s/-/_/g'); do "
        'case " $(echo $loaded) " in *" $m "*) ;; *) echo $m; break;; esac; done'
    ).stdout.strip()
    if not candidate:
        probe.note("every module in the image is loaded: no load attempt possible beyond the sysctl")
        return
    attempt = probe.run(f"modprobe {candidate} 2>&1")
    assert attempt.rc != 0, f"root could load the module {candidate}"
    # The refusal must be the lock's (EPERM), not a module that failed for its own reasons.
    assert "Operation not permitted" in attempt.stdout, (
        f"modprobe {candidate} failed otherwise: {attempt.stdout}"
    )
