"""The `amnesiac` command: argument parsing only; the work happens in the modules it calls."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from amnesiac import __version__, paths, signals
from amnesiac.errors import AmnesiacError, UsageError

EPILOG = """\
examples:
  amnesiac policy show policies/ovpn.yml     claim -> control -> check table
  amnesiac build                             build the default (OVPN) image into build/ovpn
  amnesiac build --policy policies/ivpn.yml --out build/ivpn --json
  amnesiac boot build/ovpn --ssh-key ~/.ssh/id_ed25519.pub --wait   netboot it in QEMU
  amnesiac verify --target qemu:build/ovpn --report report/        boot it and prove every claim

A build needs root and Debian's mmdebstrap; `make build` installs everything first.
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="amnesiac",
        description="Turn a VPN provider's privacy policy into a diskless RAM-boot server image, "
        "and prove that it keeps nothing.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"amnesiac {__version__}")
    parser.add_argument("--debug", action="store_true", help="show commands as they run, and tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    policy = sub.add_parser("policy", help="read and validate policy files")
    policy_sub = policy.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    show = policy_sub.add_parser(
        "show",
        help="validate a policy and print its claim -> control -> check table",
        description="Validate a policy file (schema, verbatim quotes, roles, variables, check ids) "
        "and print which roles enforce each claim and which checks verify it. Exit 2 on a malformed "
        "policy, with the file and line.",
    )
    show.add_argument(
        "file", type=Path, nargs="?", default=None, help="policy file (default: policies/ovpn.yml)"
    )
    show.add_argument("--json", action="store_true", help="print the table as JSON")

    build = sub.add_parser(
        "build",
        help="build a PXE/RAM-boot image from a policy",
        description="Build kernel, initrd (the whole root filesystem, unpacked into a size-limited "
        "tmpfs at boot), boot.ipxe and manifest.json into --out. The root filesystem from mmdebstrap "
        "is cached by a hash of its inputs, so a rebuild after a role change skips it. --out is "
        "replaced only when the build has succeeded.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  amnesiac build --policy policies/ovpn.yml --out build/ovpn\n"
        "  amnesiac build --var input_lockdown_usb=false --out build/no-usb  # an image without one control",
    )
    build.add_argument("--policy", type=Path, default=None, help="policy file (default: policies/ovpn.yml)")
    build.add_argument("--out", type=Path, default=None, help="output directory (default: build/<policy id>)")
    build.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="rootfs cache directory (default: ~/.cache/amnesiac, or $AMNESIAC_CACHE)",
    )
    build.add_argument(
        "--refresh", action="store_true", help="rebuild the root filesystem even if it is cached"
    )
    build.add_argument("--suite", default=None, help="Debian suite (default: the policy's, else trixie)")
    build.add_argument(
        "--source-date-epoch",
        type=int,
        default=_env_int("SOURCE_DATE_EPOCH"),
        help="timestamp for reproducible output (default: $SOURCE_DATE_EPOCH, else the cached rootfs's)",
    )
    build.add_argument(
        "--var",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override a role variable (VALUE is YAML: true, 42, [a, b]); for test images without a control",
    )
    build.add_argument("--json", action="store_true", help="no live display; print a JSON summary on stdout")
    _boot_parser(sub)
    _verify_parser(sub)
    return parser


def _verify_parser(sub: Any) -> None:
    verify = sub.add_parser(
        "verify",
        help="prove a policy's technical claims on a target and write a report for reviewers",
        description="""Run the checks each technical claim of the policy names against a target, and write
DIR/report.html (for a security reviewer), DIR/report.json and DIR/junit.xml. The target's
identity (image sha256, kernel, command line, boot id) is read first. A check that cannot
run on this kind of target is reported not applicable with the reason; it never passes.

Targets:
  qemu:BUILD_DIR            netboot the build in QEMU (a throwaway key arrives in a
                            boot-time overlay; the image is served unmodified), verify,
                            power it off
  ssh://user@host[:port]    a live server (--ssh-key: the private key to log in with;
                            --build: the build it should be running)
  chroot:ROOTFS_DIR         an unpacked image root: build-time checks only
  podman://CONTAINER        a running container (molecule instances)

Exit code: 0 when every technical claim that applies to the target is verified, 1 when
one failed, 2 on bad input.""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  amnesiac verify --target qemu:build/ovpn --report report/ovpn\n"
        "  amnesiac verify --policy policies/ivpn.yml --target ssh://root@vpn1.example.net "
        "--ssh-key ~/.ssh/admin --report report/vpn1",
    )
    verify.add_argument("--policy", type=Path, default=None, help="policy file (default: policies/ovpn.yml)")
    verify.add_argument("--target", required=True, help="what to verify (see above)")
    verify.add_argument(
        "--report", type=Path, default=None, help="report directory (default: report/<policy id>)"
    )
    verify.add_argument(
        "--ssh-key", type=Path, default=None, help="ssh:// targets: private key to log in with"
    )
    verify.add_argument("--build", type=Path, default=None, help="the build the target should be running")
    verify.add_argument("--memory", type=int, default=None, metavar="MIB", help="qemu: targets: guest RAM")
    verify.add_argument("--json", action="store_true", help="no live display; print a JSON summary on stdout")


def _boot_parser(sub: Any) -> None:
    boot = sub.add_parser(
        "boot",
        help="netboot a build in QEMU (iPXE over HTTP from 127.0.0.1), for testing",
        description="""\
Netboot DIR in QEMU the way a server boots: the NIC's iPXE ROM fetches the build's
boot.ipxe, vmlinuz and initrd.img over HTTP from a server on 127.0.0.1. vmlinuz and
initrd.img must match manifest.json, or nothing boots.

The guest's network is isolated: it reaches only that server, and its SSH port is
forwarded to 127.0.0.1. A USB keyboard, a USB stick and a virtio disk are attached, so
the lockdown and diskless claims meet real devices. KVM is used when a probe guest runs
under it, else TCG emulation (the output says which and why).

Runs until Ctrl-C, SIGTERM or the guest powering off; then QEMU is stopped and every
temporary file removed. With --wait (or --json) it first waits for sshd and says so.""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  amnesiac boot build/ovpn --ssh-key ~/.ssh/id_ed25519.pub --wait\n"
        "  amnesiac boot build/ovpn --ssh-key key.pub --json > ready.json &   # ready info when SSH is up",
    )
    boot.add_argument(
        "dir", type=Path, nargs="?", default=Path("build/ovpn"), help="build directory (default: build/ovpn)"
    )
    boot.add_argument(
        "--ssh-key",
        type=Path,
        metavar="PUB",
        help="authorise this public key for root, through a second initrd loaded at boot "
        "(the image itself is served unmodified)",
    )
    boot.add_argument(
        "--wait",
        action="store_true",
        help="wait until sshd answers, print a ready line with the time it took, then keep running",
    )
    boot.add_argument(
        "--json", action="store_true", help="like --wait, and print the ready information as JSON on stdout"
    )
    boot.add_argument(
        "--timeout", type=float, default=600, metavar="S", help="give up waiting after S seconds (600)"
    )
    boot.add_argument(
        "--memory",
        type=int,
        metavar="MIB",
        help="guest RAM (default: the smallest the image needs, from its manifest)",
    )
    boot.add_argument("--cpus", type=int, default=2, help="virtual CPUs (2)")
    boot.add_argument(
        "--accel",
        choices=("auto", "kvm", "tcg"),
        default=None,
        help="auto (default, or $AMNESIAC_ACCEL): KVM if a probe guest runs under it, else TCG emulation",
    )
    boot.add_argument(
        "--no-test-devices", action="store_true", help="attach no USB keyboard, USB stick or virtio disk"
    )
    boot.add_argument(
        "--ssh-port", type=int, metavar="PORT", help="host port for the guest's SSH (default: a free one)"
    )
    boot.add_argument(
        "--serial-log", type=Path, metavar="FILE", help="keep the serial console here (default: a temp file)"
    )


def _boot(args: argparse.Namespace) -> int:
    from amnesiac import boot

    options = boot.BootOptions(
        memory_mib=args.memory,
        cpus=args.cpus,
        accel=args.accel,
        ssh_key=args.ssh_key,
        test_devices=not args.no_test_devices,
        ssh_port=args.ssh_port,
        serial_log=args.serial_log,
    )
    return boot.command(args.dir, options, wait=args.wait, json_out=args.json, timeout=args.timeout)


def _verify(args: argparse.Namespace) -> int:
    from amnesiac import policy
    from amnesiac.progress import Progress
    from amnesiac.report.model import exit_code
    from amnesiac.verify import VerifyOptions, verify

    policy_file = args.policy or paths.default_policy()
    report_dir = args.report or Path("report") / policy.load(policy_file).id
    options = VerifyOptions(
        policy=policy_file,
        target=args.target,
        report_dir=report_dir,
        ssh_key=args.ssh_key,
        build=args.build,
        memory_mib=args.memory,
    )
    progress = Progress(quiet=args.json)
    report, files = verify(options, progress)
    if args.json:
        summary = {
            "verdict": report.verdict.value,
            "target": report.target.spec,
            "identity": report.target.identity.model_dump(mode="json"),
            "totals": {k.value: v for k, v in report.totals.items()},
            "failed": [c.id for c in report.claims if c.status.value == "failed"],
            "report": {"html": str(files.html), "json": str(files.json), "junit": str(files.junit)},
            "stages": [{"name": s.name, "seconds": s.seconds, "note": s.note} for s in progress.stages],
        }
        print(json.dumps(summary, indent=2))
    else:
        colour = "green" if report.passed else "red"
        totals = ", ".join(f"{n} {k.value}" for k, n in report.totals.items() if n)
        progress.info(f"[bold {colour}]{report.verdict.value.upper()}[/] {report.target.spec}: {totals}")
        for claim in report.claims:
            if claim.status.value == "failed":
                progress.info(f"  [red]failed[/] {claim.id}: {claim.reason}")
        progress.info(f"report: {files.html}")
    return exit_code(report)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    if not value.isdigit():
        raise UsageError(f"${name} must be a whole number of seconds, got {value!r}")
    return int(value)


def _parse_vars(items: list[str]) -> dict[str, Any]:
    from amnesiac.roles import catalog

    result: dict[str, Any] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep:
            raise UsageError(f"--var {item!r}: expected NAME=VALUE")
        var = next((r.variables[name] for r in catalog().values() if name in r.variables), None)
        if var is None:
            raise UsageError(f"--var {name}: no role declares this variable")
        value = yaml.safe_load(raw)
        if problem := var.problem_with(value):
            raise UsageError(f"--var {problem}")
        result[name] = value
    return result


def _policy_show(args: argparse.Namespace) -> int:
    from amnesiac import policy, show

    # A pipe or file gets a table wide enough for the ids, not an 80-column squeeze.
    console = Console(highlight=False) if sys.stdout.isatty() else Console(highlight=False, width=160)
    loaded = policy.load(args.file or paths.default_policy())
    if args.json:
        print(json.dumps(show.as_data(loaded), indent=2, ensure_ascii=False))
    else:
        show.render(loaded, console)
    return 0


def _build(args: argparse.Namespace) -> int:
    from amnesiac import build, policy
    from amnesiac.build.plan import make_plan
    from amnesiac.progress import Progress

    loaded = policy.load(args.policy or paths.default_policy())
    extra = _parse_vars(args.var)
    plan = make_plan(loaded, source_date_epoch=args.source_date_epoch, extra_vars=extra, suite=args.suite)
    unapplied = [n for n in extra if not any(n in plan.effective_vars()[r] for r in plan.roles)]
    if unapplied:
        raise UsageError(f"--var {unapplied[0]}: its role is not applied by policy {loaded.id}")
    out = args.out or Path("build") / loaded.id
    progress = Progress(quiet=args.json)
    result = build.build(plan, out, args.cache or paths.cache_dir(), progress, refresh=args.refresh)
    image = result.manifest["image"]
    if args.json:
        summary = {
            "out": str(result.out),
            "policy": loaded.id,
            "image_sha256": image["sha256"],
            "kernel_release": image["kernel_release"],
            "cmdline": image["cmdline"],
            "artifacts": result.manifest["artifacts"],
            "rootfs_cached": result.rootfs_cached,
            "stages": [{"name": s.name, "seconds": s.seconds, "note": s.note} for s in progress.stages],
        }
        print(json.dumps(summary, indent=2))
    else:
        size = result.manifest["artifacts"]["initrd.img"]["size"]
        progress.info(
            f"[bold green]built[/] {result.out}: initrd.img {size / 1024**2:.1f} MiB, "
            f"root {image['root_unpacked_bytes'] / 1024**2:.0f} MiB in a "
            f"{image['root_tmpfs_size_bytes'] / 1024**2:.0f} MiB tmpfs, image sha256 {image['sha256'][:16]}"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console = Console(stderr=True, highlight=False)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING, format="%(name)s: %(message)s"
    )
    signals.install()
    commands: dict[str, Callable[[argparse.Namespace], int]] = {
        "policy": _policy_show,
        "build": _build,
        "boot": _boot,
        "verify": _verify,
    }
    try:
        return commands[args.command](args)
    except AmnesiacError as exc:
        if args.debug:
            raise
        console.print(f"[red]amnesiac:[/] {exc}", soft_wrap=True)
        return exc.exit_code
    except Exception as exc:  # a bug, not bad input: still one line, the traceback on --debug
        if args.debug:
            raise
        console.print(f"[red]amnesiac: internal error:[/] {type(exc).__name__}: {exc} (rerun with --debug)")
        return 70


if __name__ == "__main__":
    sys.exit(main())
