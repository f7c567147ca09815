"""The `amnesiac` command: argument parsing only; the work happens in the modules it calls."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
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
    return parser


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


def _policy_show(args: argparse.Namespace, console: Console) -> int:
    from amnesiac import policy, show

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
    try:
        if args.command == "policy":
            return _policy_show(args, Console(highlight=False))
        if args.command == "build":
            return _build(args)
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
    return 2


if __name__ == "__main__":
    sys.exit(main())
