"""The `amnesiac` command: argument parsing only; the work happens in the modules it calls."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import yaml
from rich.console import Console
from rich.markup import escape

from amnesiac import __version__, paths, signals
from amnesiac.errors import AmnesiacError, ExitCode, UsageError, exit_code_table

EPILOG = (
    """\
examples:
  amnesiac policy show policies/ovpn.yml     claim -> control -> check table
  amnesiac build                             build the default (OVPN) image into build/ovpn
  amnesiac build --policy policies/ivpn.yml --out build/ivpn --json
  amnesiac boot build/ovpn --ssh-key ~/.ssh/id_ed25519.pub --wait   netboot it in QEMU
  amnesiac verify --target qemu:build/ovpn --report report/        boot it and prove every claim

A build needs root and Debian's mmdebstrap; `make build` installs everything first.

exit codes:
"""
    + exit_code_table()
    + "\n"
)


class _Parser(argparse.ArgumentParser):
    """argparse with amnesiac's one-line errors (exit 2) instead of a usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(ExitCode.USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 < value < 65536:
        raise ValueError(text)
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise ValueError(text)
    return value


# How argparse names these in its errors: "argument --cpus: invalid positive integer value: '0'".
_positive_int.__name__ = "positive integer"
_port.__name__ = "port"
_seconds.__name__ = "positive number of seconds"


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="amnesiac",
        description="Turn a VPN provider's privacy policy into a diskless RAM-boot server image, "
        "and prove that it keeps nothing.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"amnesiac {__version__}")
    parser.add_argument("--debug", action="store_true", help="show commands as they run, and tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    policy = sub.add_parser("policy", help="read and validate policy files")
    policy_sub = policy.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    show = policy_sub.add_parser(
        "show",
        help="validate a policy; print claim -> controls -> checks, check -> claims, source coverage",
        # Line breaks by hand: the raw formatter keeps the epilog's example columns, and the
        # description's lines with them.
        description="Validate a policy file (schema, verbatim quotes, roles, variables, check ids)\n"
        "and print which roles enforce each claim and which checks verify it, which claims\n"
        "each check verifies, and the sentences of each source text that no claim quotes (with\n"
        "their line numbers), so a reviewer sees what the policy file leaves out.\n"
        "Exit 2 on a malformed policy, with the file and line.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""\
examples:
  amnesiac policy show policies/ovpn.yml               both tables and the source coverage
  amnesiac policy show --by check policies/ivpn.yml    which claims each check verifies
  amnesiac policy show --coverage policies/ovpn.yml    what of each source no claim quotes
  amnesiac policy show --json policies/ovpn.yml | jq '.coverage.en.uncovered'

A sentence ends at . ! or ? before white space (not after e.g. or i.e.) and at every line break;
it counts as quoted when a claim's quote holds it or it holds a quote (policies/README.md).
""",
    )
    show.add_argument(
        "file", type=Path, nargs="?", default=None, help="policy file (default: policies/ovpn.yml)"
    )
    view = show.add_mutually_exclusive_group()
    view.add_argument(
        "--by",
        choices=("claim", "check"),
        default=None,
        help="print only one table: claim -> controls -> checks, or check -> claims "
        "(default: both, then the coverage)",
    )
    view.add_argument(
        "--coverage",
        action="store_true",
        help="print only the source coverage: per language, the sentences no claim quotes",
    )
    view.add_argument(
        "--json", action="store_true", help="print all of it as JSON: claims, checks and coverage"
    )

    build = sub.add_parser(
        "build",
        help="build a PXE/RAM-boot image from a policy",
        description="Build kernel, initrd (the whole root filesystem, unpacked into a size-limited "
        "tmpfs at boot), boot.ipxe and manifest.json into --out. The root filesystem from mmdebstrap "
        "is cached by a hash of its inputs, and what each role did to it by a hash of the role's "
        "files, the variables it reads and the tree before it: a rebuild after a change runs only "
        "the changed role and those after it, and gives the same image as a build without the cache. "
        "--out is replaced only when the build has succeeded.",
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
        help="cache directory: root filesystems and role layers (default: ~/.cache/amnesiac, "
        "or $AMNESIAC_CACHE)",
    )
    build.add_argument(
        "--refresh",
        action="store_true",
        help="rebuild the root filesystem even if it is cached (and so every role's layer)",
    )
    build.add_argument(
        "--profile",
        choices=("release", "development"),  # image.pack.Profile, not imported for --help's sake
        default="release",
        help="release (default): the root archive at zstd -18, what ships; development: zstd -3, "
        "packed in a second for a quick boot of a change, a few MiB larger, never published by flash",
    )
    build.add_argument(
        "--secure-boot-key",
        type=Path,
        metavar="KEY",
        help="sign amnesiac.efi for Secure Boot with this PEM key (with --secure-boot-cert): the "
        "provider's db key, which its servers' firmware is enrolled with; PCR 11 does not change",
    )
    build.add_argument(
        "--secure-boot-cert", type=Path, metavar="CERT", help="the PEM certificate of --secure-boot-key"
    )
    build.add_argument("--suite", default=None, help="Debian suite (default: the policy's, else trixie)")
    build.add_argument(
        "--source-date-epoch",
        type=int,
        default=None,
        help="timestamp for reproducible output (default: $SOURCE_DATE_EPOCH, else the Date: of the "
        "mirror's Release file the root was made from, so that two builds of one archive state agree)",
    )
    build.add_argument(
        "--var",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override a role variable (VALUE is YAML: true, 42, [a, b]); for test images without a control",
    )
    build.add_argument("--json", action="store_true", help="no live display; print a JSON summary on stdout")
    image = sub.add_parser(
        "container-image",
        help="build the base image of the molecule containers (cached), for role development",
        description="Make localhost/amnesiac-base:<suite>-<key> with mmdebstrap (the image's suite, mirror "
        "and variant, every role's packages, no kernel) and `podman import`; no registry is used. The "
        "key hashes the inputs: when that tag exists nothing is done. molecule/README.md has the rest.",
    )
    image.add_argument("--policy", type=Path, default=None, help="take suite and mirror from this policy")
    image.add_argument("--refresh", action="store_true", help="rebuild even if the image exists")
    image.add_argument("--json", action="store_true", help="print the tag and what was done as JSON")
    image.add_argument(
        "--env", action="store_true", help="print the environment molecule needs, as shell exports to eval"
    )
    _boot_parser(sub)
    _verify_parser(sub)
    _enrol_parser(sub)
    _flash_parser(sub)
    return parser


def _flash_parser(sub: Any) -> None:
    flash = sub.add_parser(
        "flash",
        help="publish a verified, signed build to PXE boot servers atomically; list, roll back; USB media",
        description="""\
Publish BUILD_DIR to a PXE root (a local directory, or ssh://user@host[:port]/path on a
boot server) that a fleet netboots from: BIOS servers get boot.ipxe (kernel and initrd), UEFI
servers the signed, measured amnesiac.efi (docs/identities.md). The files go to
PXE_ROOT/versions/<version>/, named by a hash of all of them, each checked against
manifest.json after the copy; only then is PXE_ROOT/boot.ipxe, which chains into one version,
replaced by an atomic rename. The same image with another boot.ipxe, kernel, manifest,
signature or report is another version; a build whose every file is already served is
"already current". A machine that netboots meanwhile gets the old image or the new one, never
a mix; a publish killed at any point (or a full disk) leaves the previous image served.
Concurrent flashes to one root wait for its lock.

The gate: a build is published only with a passing `amnesiac verify` report for this very
image (--report, default BUILD_DIR/report.json) and a manifest.json signed by a key that the
allowed-signers file lists (--allowed-signers, default PXE_ROOT/allowed_signers). --force
publishes without a passing report, or without any allowed-signers file, and the publish
record and PXE_ROOT/flash.log say so; it never overrides a bad, unknown or missing signature
where an allowed-signers file is in force, nor an artifact that differs from manifest.json.

Signing: `amnesiac flash BUILD_DIR --sign KEY` writes BUILD_DIR/manifest.json.sig with
`ssh-keygen -Y sign -n amnesiac-manifest` (a key without passphrase, or KEY.pub with the
private key in ssh-agent); --sign with --to signs, then publishes. Allowed signers are
OpenSSH's format: `ops@example.net ssh-ed25519 AAAA...`. The signer's principal and key are
recorded in versions/<version>/publish.json and shown by --list, which also hashes every
version and shows one whose files differ from its record as damaged.

Per-host identities (docs/identities.md): --identities DIR, one subdirectory per machine named
by its MAC address (52-54-00-12-34-56) holding its keys and certificates at their paths in
the root (etc/amnesiac/provider/, etc/openvpn/server/identity/, etc/wireguard/identity/ only).
Each becomes PXE_ROOT/identities/<set>/<mac>.cpio, which boot.ipxe loads before it chains to
the image; a machine without one says so on its console and serves no one. Published with a
build, or alone to rotate keys (the current image stays), by the same atomic switch; signed
like a manifest (--sign writes DIR/identities.json and its .sig) and refused unsigned where an
allowed-signers file is in force. Sets the entry point no longer names are pruned.

--usb writes a GPT disk image with an EFI system partition (systemd-boot, the build's kernel
and initrd, started with the manifest's command line) to a file, a USB stick or a BMC's
virtual media, after the same gate. A mounted or busy device is refused; one holding a
filesystem or partition table too, unless --force.

Exit codes: 0 done, 1 failed (the root serves what it served), 2 bad usage or input (options,
--to, BUILD_DIR or its manifest.json, the --sign key, a PXE root or version that is not there:
checked before anything is signed, locked or copied), 3 refused (gate, signature, changed or
damaged artifact), 75 the root stayed locked past --lock-timeout.""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""examples:
  amnesiac flash build/ovpn --sign ~/.ssh/release_ed25519        sign the build
  amnesiac flash build/ovpn --report report/ovpn --to /srv/pxe   publish (report, signature checked)
  amnesiac flash build/ovpn --to ssh://root@boot1.example.net/srv/pxe
  amnesiac flash --to /srv/pxe --list                            versions, reports, signers
  amnesiac flash --to /srv/pxe --rollback                        back to the previous version
  amnesiac flash --identities hosts/ --sign KEY --to /srv/pxe    rotate the fleet's identities
  amnesiac flash build/ovpn --usb /dev/sdX                       EFI USB stick: kernel + initrd
  ansible-playbook -i fleet.ini playbooks/publish.yml -e amnesiac_publish_build=build/ovpn""",
    )
    flash.add_argument("build", type=Path, nargs="?", default=None, metavar="BUILD_DIR", help="the build")
    flash.add_argument("--to", metavar="PXE_ROOT", help="directory or ssh://[user@]host[:port]/path")
    flash.add_argument("--list", action="store_true", help="list the published versions of --to")
    flash.add_argument(
        "--rollback", nargs="?", const="", default=None, metavar="VERSION",
        help="switch --to back to VERSION (version or image sha256, or a prefix), default the previous one",
    )  # fmt: skip
    flash.add_argument("--prune", action="store_true", help="only prune --to down to --keep versions")
    flash.add_argument("--check", action="store_true", help="run every check of a publish, publish nothing")
    flash.add_argument(
        "--keep", type=int, default=3, metavar="N",
        help="versions kept after a publish (3); the current and previous are never pruned",
    )  # fmt: skip
    flash.add_argument("--report", type=Path, metavar="FILE", help="report.json (BUILD_DIR/report.json)")
    flash.add_argument("--force", action="store_true", help="override the gate, recorded; --usb: overwrite")
    flash.add_argument("--sign", type=Path, metavar="KEY", help="sign manifest.json with this OpenSSH key")
    flash.add_argument(
        "--allowed-signers", type=Path, metavar="FILE", help="OpenSSH allowed signers (ROOT/allowed_signers)"
    )
    flash.add_argument("--ssh-config", type=Path, metavar="FILE", help="ssh:// roots: an ssh_config (ssh -F)")
    flash.add_argument("--ssh-key", type=Path, metavar="KEY", help="ssh:// roots: the private key to use")
    flash.add_argument(
        "--lock-timeout", type=float, default=300, metavar="S", help="wait S seconds for another flash (300)"
    )
    flash.add_argument(
        "--identities", type=Path, metavar="DIR", help="per-host identities, one directory per MAC address"
    )
    flash.add_argument("--usb", type=Path, metavar="FILE_OR_DEVICE", help="write an EFI-bootable USB image")
    flash.add_argument("--json", action="store_true", help="no live display; print the outcome as JSON")


def _flash(args: argparse.Namespace) -> int:
    from amnesiac.flash.command import FlashOptions, command

    options = FlashOptions(
        build=args.build,
        to=args.to,
        usb=args.usb,
        list=args.list,
        rollback=args.rollback,
        prune=args.prune,
        check=args.check,
        keep=args.keep,
        report=args.report,
        force=args.force,
        sign=args.sign,
        identities=args.identities,
        allowed_signers=args.allowed_signers,
        ssh_config=args.ssh_config,
        ssh_key=args.ssh_key,
        lock_timeout=args.lock_timeout,
        json=args.json,
    )
    return command(options)


def _targets_help() -> str:
    """The forms of --target, from the table of target backends."""
    import textwrap

    from amnesiac.targets.base import backends

    lines = []
    for backend in backends():
        wrapped = textwrap.wrap(backend.help, width=62, break_on_hyphens=False)
        lines.append(f"  {backend.form:<26}{wrapped[0]}")
        lines += [" " * 28 + more for more in wrapped[1:]]
    return "\n".join(lines)


def _verify_parser(sub: Any) -> None:
    verify = sub.add_parser(
        "verify",
        help="prove a policy's technical claims on a target and write a report for reviewers",
        description="""Run the checks each technical claim of the policy names against a target, and write
DIR/report.html (for a security reviewer), DIR/report.json and DIR/junit.xml. The target's
identity (image sha256, kernel, command line, boot id) is read first. A check that cannot
run on this kind of target is reported not applicable with the reason; it never passes.

Targets:
"""
        + _targets_help()
        + """

--inventory FLEET instead of --target: every host of an Ansible inventory (its ansible_host,
ansible_port, ansible_user, ansible_ssh_private_key_file, ansible_ssh_common_args), checked
over SSH in one parallel run; DIR/<host>/ holds each host's report, DIR/fleet.html and
DIR/fleet.json the hosts by claims. Exit 0 only when every host passes.

Keys: every key the target accepts must be one the policy names (ssh_admin_authorized_keys),
except the verifier's own: qemu:'s throwaway key, and any you declare with --verifier-key
(a key put on the servers only to verify them). The report names those by fingerprint. An
operator's key the policy does not name fails the integrity claim, as it should.

Exit code: 0 when every technical claim that applies to the target is verified, 1 when one
failed (a fleet: on any host), 2 on bad input, 4 when the target could not be reached or the
checks could not run (a fleet: when no host failed but some could not be checked); no report
is written then, since nothing was proved either way.""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  amnesiac verify --target qemu:build/ovpn --report report/ovpn\n"
        "  amnesiac verify --policy policies/ivpn.yml --target ssh://root@vpn1.example.net "
        "--ssh-key ~/.ssh/admin --report report/vpn1\n"
        "  amnesiac verify --target ssh://root@vpn1.example.net --ssh-key ~/.ssh/admin "
        "--build build/ovpn --enrolment tpm/vpn1.json   # its TPM says what booted\n"
        "  amnesiac verify --inventory fleet.yml --report report/fleet",
    )
    verify.add_argument("--policy", type=Path, default=None, help="policy file (default: policies/ovpn.yml)")
    what = verify.add_mutually_exclusive_group(required=True)
    what.add_argument("--target", help="what to verify (see above)")
    what.add_argument(
        "--inventory",
        type=Path,
        metavar="FLEET",
        help="verify every host of this Ansible inventory over SSH in parallel: DIR/<host>/ reports, "
        "DIR/fleet.json and DIR/fleet.html; exit 0 only when every host passes",
    )
    verify.add_argument(
        "--report", type=Path, default=None, help="report directory (default: report/<policy id>)"
    )
    verify.add_argument(
        "--ssh-key", type=Path, default=None, help="ssh:// targets: private key to log in with"
    )
    verify.add_argument(
        "--verifier-key",
        type=Path,
        action="append",
        default=[],
        metavar="PUB",
        help="a public key you put on the target only to verify it (not the image's, not the policy's): "
        "allowed beside the policy's keys and named in the report; repeatable. Without it, the key "
        "you log in with must be one the policy names",
    )
    verify.add_argument("--build", type=Path, default=None, help="the build the target should be running")
    verify.add_argument(
        "--enrolment",
        type=Path,
        default=None,
        metavar="FILE",
        help="ssh:// targets: the server's TPM as you enrolled it (its attestation key and PCR 7, JSON; "
        "docs/attestation.md), so that its TPM, not the server, says what booted: needs --build, which "
        "predicts PCR 11. An inventory names each host's in its amnesiac_enrolment variable",
    )
    verify.add_argument(
        "--memory", type=_positive_int, default=None, metavar="MIB", help="qemu: targets: guest RAM"
    )
    verify.add_argument("--json", action="store_true", help="no live display; print a JSON summary on stdout")


def _enrol_parser(sub: Any) -> None:
    enrol = sub.add_parser(
        "enrol",
        help="enrol a server's TPM (its attestation key, bound to its endorsement key, and PCR 7) "
        "for verify --enrolment",
        description="""Read a server's TPM over SSH and write its enrolment: the JSON file that
`verify --enrolment` (or an inventory host's amnesiac_enrolment) checks its quotes against.

The server's TPM derives its endorsement key (EK, TCG's RSA 2048 template L-1) and attestation
key (AK, amnesiac's template); both templates are checked byte for byte. Its TPM must then open
a credential made here for that EK and the AK's name (TPM2_ActivateCredential), which a TPM
does only with that AK inside it, and quote PCR 7 with the AK over a fresh nonce.

Trust on first use: run it once per machine on a network you trust (at delivery, or on its
first boot in a closed network). The EK is recorded too, and with --ek-ca the EK certificate
the TPM's maker stored in it must chain to one of those CAs: the AK is then bound to a TPM of
that maker, not only to whatever answered (docs/attestation.md, "Enrolling a fleet"). The EK
is what a release service makes a server's identity credential for (identity release,
docs/provider-interface.md). An existing FILE is never replaced.""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  amnesiac enrol --target ssh://root@192.0.2.11 --ssh-key ~/.ssh/admin --out fleet/tpm/vpn1.json\n"
        "  amnesiac enrol --target ssh://root@192.0.2.11 --ssh-key ~/.ssh/admin --secure-boot-cert db.crt "
        "--ek-ca tpm-makers.pem --out fleet/tpm/vpn1.json --json",
    )
    enrol.add_argument("--target", required=True, help="the server: ssh://user@host[:port]")
    enrol.add_argument("--ssh-key", type=Path, default=None, help="private key to log in with")
    enrol.add_argument(
        "--out", type=Path, required=True, metavar="FILE", help="where to write the enrolment (a new file)"
    )
    enrol.add_argument(
        "--secure-boot-cert",
        type=Path,
        default=None,
        metavar="CERT",
        help="the db certificate (PEM) the server's firmware enforces, to be named in reports; "
        "leave it out with Secure Boot off",
    )
    enrol.add_argument(
        "--ek-ca",
        type=Path,
        default=None,
        metavar="PEM",
        help="the TPM makers' CA certificates (roots and intermediates, one PEM file): the EK "
        "certificate the TPM holds must chain to one, or nothing is written",
    )
    enrol.add_argument("--json", action="store_true", help="no live display; print a JSON summary on stdout")


def _boot_parser(sub: Any) -> None:
    boot = sub.add_parser(
        "boot",
        help="boot a build in QEMU (UEFI with a TPM, or iPXE over HTTP from 127.0.0.1), for testing",
        description="""\
Boot DIR in QEMU the way a server boots. A build with a unified kernel image
(amnesiac.efi) boots under UEFI firmware (OVMF) with a TPM (swtpm): the UKI with the
boot-time overlay after its initrd, so systemd-stub measures both into PCR 11, and the
TPM's attestation key enrolled before the boot (`verify` asks it for a quote). With
--netboot, or a build without a UKI, the NIC's iPXE ROM fetches the build's boot.ipxe,
vmlinuz and initrd.img over HTTP from a server on 127.0.0.1 instead. Either way the
files must match manifest.json, or nothing boots.

The guest's network is isolated: it reaches only that server, and its SSH port is
forwarded to 127.0.0.1. A USB keyboard, a USB stick, a virtio disk, an ACPI ERST store
and a systemd credential in the SMBIOS OEM strings are attached, so the lockdown and
diskless claims meet real devices. KVM is used when a probe guest runs
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
        "--timeout", type=_seconds, default=600, metavar="S", help="give up waiting after S seconds (600)"
    )
    boot.add_argument(
        "--memory",
        type=_positive_int,
        metavar="MIB",
        help="guest RAM (default: the smallest the image needs, from its manifest)",
    )
    boot.add_argument("--cpus", type=_positive_int, default=2, help="virtual CPUs (2)")
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
        "--netboot",
        action="store_true",
        help="netboot over iPXE (BIOS) even when the build has a UKI: no firmware, no TPM, nothing attested",
    )
    boot.add_argument(
        "--ssh-port", type=_port, metavar="PORT", help="host port for the guest's SSH (default: a free one)"
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
        measured=False if args.netboot else None,
    )
    return boot.command(args.dir, options, wait=args.wait, json_out=args.json, timeout=args.timeout)


VERDICT_COLOURS = {"pass": "green", "incomplete": "yellow", "fail": "red"}  # a verdict, as printed


def _verify(args: argparse.Namespace) -> int:
    from amnesiac import policy
    from amnesiac.progress import Progress
    from amnesiac.verify import VerifyOptions, verify

    policy_file = args.policy or paths.default_policy()
    options = VerifyOptions(
        policy=policy_file,
        report_dir=args.report or Path("report") / policy.load(policy_file).id,
        target=args.target,
        inventory=args.inventory,
        ssh_key=args.ssh_key,
        build=args.build,
        memory_mib=args.memory,
        verifier_keys=tuple(args.verifier_key),
        enrolment=args.enrolment,
    )
    progress = Progress(quiet=args.json)
    result = verify(options, progress)
    if result.fleet is not None:
        _say_fleet(result.fleet, result.unreachable, progress, json_out=args.json)
        return result.exit_code
    report, files = result.report, next(iter(result.files.values()))
    if args.json:
        summary = {
            "verdict": report.verdict.value,
            "target": report.target.spec,
            "identity": report.target.identity.model_dump(mode="json"),
            "integrity": report.integrity.status.value,
            "totals": {k.value: v for k, v in report.totals.items()},
            "failed": [c.id for c in report.failed],
            "not_proved": {c.id: c.status.value for c in report.not_proved},
            "report": {"html": str(files.html), "json": str(files.json), "junit": str(files.junit)},
            "stages": _stages(progress),
        }
        print(json.dumps(summary, indent=2))
    else:
        colour = VERDICT_COLOURS[report.verdict.value]
        totals = ", ".join(f"{n} {k.value}" for k, n in report.totals.items() if n)
        progress.info(
            f"[bold {colour}]{report.verdict.value.upper()}[/] {escape(report.target.spec)}: "
            f"integrity {report.integrity.status.value}; the policy's claims: {totals}"
        )
        for claim in report.failed:
            progress.info(f"  [red]failed[/] {claim.id}: {escape(claim.reason or '')}")
        for claim in report.not_proved:
            progress.info(f"  [yellow]{claim.status.value}[/] {claim.id}: {escape(claim.reason or '')}")
        progress.info(f"report: {escape(str(files.html))}")
    return result.exit_code


def _enrol(args: argparse.Namespace) -> int:
    from amnesiac.enrol import EnrolOptions, enrol
    from amnesiac.progress import Progress

    options = EnrolOptions(
        target=args.target,
        out=args.out,
        ssh_key=args.ssh_key,
        secure_boot_cert=args.secure_boot_cert,
        ek_ca=args.ek_ca,
    )
    progress = Progress(quiet=args.json)
    enrolled = enrol(options, progress)
    summary = enrolled.as_dict()
    if args.json:
        print(json.dumps({**summary, "target": args.target, "stages": _stages(progress)}, indent=2))
    else:
        progress.info(
            f"[bold green]enrolled[/] {escape(args.target)}: {escape(str(args.out))}, "
            f"AK {summary['ak_sha256']}, bound to EK {summary['ek_sha256']}, PCR 7 {enrolled.pcrs[7]}; "
            f"EK certificate: {escape(enrolled.ek_certificate_status)}"
        )
    return 0


def _say_fleet(fleet: Any, unreachable: dict[str, str], progress: Any, *, json_out: bool) -> None:
    hosts = fleet.summary["hosts"]
    if json_out:
        summary = {
            "verdict": fleet.summary["verdict"],
            "hosts": {
                n: {k: h[k] for k in ("verdict", "failed", "not_proved", "address") if k in h}
                for n, h in hosts.items()
            },
            "unreachable": unreachable,
            "report": {"html": str(fleet.html), "json": str(fleet.json)},
            "stages": _stages(progress),
        }
        print(json.dumps(summary, indent=2))
        return
    for name, host in hosts.items():
        colour = VERDICT_COLOURS[host["verdict"]]
        why = host.get("unreachable") or ", ".join(host["failed"] or host["not_proved"])
        progress.info(f"[bold {colour}]{host['verdict'].upper()}[/] {escape(f'{name} {why}'.rstrip())}")
    progress.info(f"fleet {fleet.summary['verdict'].upper()}: {escape(str(fleet.html))}")


def _stages(progress: Any) -> list[dict[str, Any]]:
    return [{"name": s.name, "seconds": s.seconds, "note": s.note} for s in progress.stages]


def _container_image(args: argparse.Namespace) -> int:
    from amnesiac import container

    image = container.ensure(container.spec(args.policy), container.state_dir(), refresh=args.refresh)
    if args.env:
        print(container.molecule_shell(image), end="")
    elif args.json:
        print(json.dumps({"tag": image.tag, "built": image.built, "imported": image.imported,
                          "seconds": round(image.seconds, 1)}))  # fmt: skip
    else:
        done = "built and imported" if image.built else "imported" if image.imported else "cached"
        print(f"{image.tag} ({done}, {image.seconds:.1f} s)")
    return 0


SUITE = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")  # trixie, bookworm-backports, sid


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
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise UsageError(f"--var {name}: VALUE is not YAML ({' '.join(str(exc).split())})") from None
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
        return 0
    sections: tuple[show.Section, ...] = tuple(show.Section)
    if args.by is not None:
        sections = (show.Section.CLAIMS if args.by == "claim" else show.Section.CHECKS,)
    elif args.coverage:
        sections = (show.Section.COVERAGE,)
    show.render(loaded, console, sections)
    return 0


def _build(args: argparse.Namespace) -> int:
    from amnesiac import policy
    from amnesiac.image import build as image
    from amnesiac.image.pack import Profile
    from amnesiac.image.plan import make_plan
    from amnesiac.progress import Progress

    loaded = policy.load(args.policy or paths.default_policy())
    extra = _parse_vars(args.var)
    epoch = args.source_date_epoch if args.source_date_epoch is not None else _env_int("SOURCE_DATE_EPOCH")
    if epoch is not None and epoch < 0:
        raise UsageError(f"--source-date-epoch {epoch}: a time before 1970")
    if args.suite is not None and not SUITE.match(args.suite):
        raise UsageError(f"--suite {args.suite!r}: not a Debian suite name (trixie, bookworm, sid, ...)")
    plan = make_plan(loaded, source_date_epoch=epoch, extra_vars=extra, suite=args.suite)
    unapplied = [n for n in extra if not any(n in plan.effective_vars()[r] for r in plan.roles)]
    if unapplied:
        raise UsageError(f"--var {unapplied[0]}: its role is not applied by policy {loaded.id}")
    out = args.out if args.out is not None else Path("build") / loaded.id
    cache = args.cache or paths.cache_dir()
    image.check_destination(out, cache)  # before anything is made, and before asking for root
    progress = Progress(quiet=args.json)
    profile = Profile(args.profile)
    signing = None
    if (args.secure_boot_key is None) != (args.secure_boot_cert is None):
        raise UsageError("--secure-boot-key and --secure-boot-cert go together")
    if args.secure_boot_key is not None:
        from amnesiac.image import secure_boot

        signing = secure_boot.provider_key(args.secure_boot_key, args.secure_boot_cert)
        secure_boot.require_tools()
    result = image.build(plan, out, cache, progress, refresh=args.refresh, profile=profile, signing=signing)
    made = result.manifest.image
    if args.json:
        summary = {
            "out": str(result.out),
            "policy": loaded.id,
            "image_sha256": made.sha256,
            "kernel_release": made.kernel_release,
            "cmdline": made.cmdline,
            "artifacts": {n: a.model_dump() for n, a in result.manifest.artifacts.items()},
            "rootfs_cached": result.rootfs_cached,
            "roles_cached": list(result.roles_cached),
            "profile": made.profile,
            "stages": [{"name": s.name, "seconds": s.seconds, "note": s.note} for s in progress.stages],
        }
        print(json.dumps(summary, indent=2))
    else:
        size = result.manifest.artifacts["initrd.img"].size
        progress.info(
            f"[bold green]built[/] {escape(str(result.out))}: initrd.img {size / 1024**2:.1f} MiB, "
            f"root {made.root_unpacked_bytes / 1024**2:.0f} MiB in a "
            f"{made.root_tmpfs_size_bytes / 1024**2:.0f} MiB tmpfs, image sha256 {made.sha256[:16]}"
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
        "enrol": _enrol,
        "flash": _flash,
        "container-image": _container_image,
    }
    try:
        return commands[args.command](args)
    except AmnesiacError as exc:
        if args.debug:
            raise
        # What the user typed or named is shown as text, never read as markup.
        console.print(f"[red]amnesiac:[/] {escape(_one_line(str(exc)))}", soft_wrap=True)
        return exc.exit_code
    except Exception as exc:  # a bug, not bad input: still one line, the traceback on --debug
        if args.debug:
            raise
        what = _one_line(str(exc)) or type(exc).__name__
        console.print(
            f"[red]amnesiac: internal error:[/] {escape(what)} (rerun with --debug)", soft_wrap=True
        )
        return ExitCode.INTERNAL


def _one_line(text: str) -> str:
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
