"""qemu:BUILD_DIR — the build booted in QEMU as a server boots (UEFI with a TPM and the build's
UKI, boot/firmware.py; a build without a UKI netboots over iPXE), then verified over SSH with a
throwaway key that arrives in a boot-time overlay: the artifact verified is the artifact that
ships, and the TPM's quote says so. The only kind with a machine of its own to drive (QMP)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from amnesiac import boot, ssh
from amnesiac.boot.sink import traffic_sink
from amnesiac.checks.expectations import GuestMemory
from amnesiac.checks.meta import Surface
from amnesiac.errors import UsageError
from amnesiac.image.manifest import NAME as MANIFEST
from amnesiac.image.manifest import Manifest
from amnesiac.provider.harness import reference_provider
from amnesiac.run import run
from amnesiac.targets import mux
from amnesiac.targets.base import Connection, ReachOptions, Target, TargetKind, Unreachable
from amnesiac.targets.ssh import client_config


class QemuTarget(Target):
    kind = TargetKind.QEMU
    surface = Surface.BOOTED
    prefix = "qemu:"
    form = "qemu:BUILD_DIR"
    help = (
        "netboot the build in QEMU (a throwaway key arrives in a boot-time overlay; the image is "
        "served unmodified), verify, power it off"
    )

    def __init__(self, address: str, build: Path) -> None:
        super().__init__(address)
        self.build = build

    @classmethod
    def parse(cls, value: str, spec: str) -> QemuTarget:
        path = Path(value)
        if not (path / MANIFEST).is_file():
            raise UsageError(f"--target {spec}: {path} is not a build directory (no {MANIFEST})")
        return cls(value, path.resolve())

    @property
    def build_dir(self) -> Path:
        return self.build

    @contextlib.contextmanager
    def reach(self, options: ReachOptions) -> Iterator[Connection]:
        """Boot the build; QEMU runs until the context ends, whatever happens."""
        key = throwaway_key(options.work)
        progress = options.progress
        built = Manifest.load(self.build)
        agent = AgentBuild.of(built)
        with contextlib.ExitStack() as stack:
            # A build that asks a provider gets a reference one, whose journal the checks read.
            attached = stack.enter_context(reference_provider(options.work, agent.records)) if agent else None
            # Where its clients' canary traffic goes through it (checks/amnesia.py).
            sink = stack.enter_context(traffic_sink(options.work)) if agent else None
            boot_options = boot.BootOptions(
                memory_mib=options.memory_mib,
                ssh_key=key.with_suffix(".pub"),
                overlay_files=attached.overlay_files if attached else (),
                guest_services=(attached.guest_service, sink.service) if attached and sink else (),
                client_link=agent is not None,
            )
            # A build with a UKI boots as a server with a TPM does, so that its TPM can attest it.
            how = "under UEFI with a TPM (measured boot)" if built.measured_boot else "over iPXE"
            with progress.stage("boot", f"Boot {self.build.name} in QEMU {how}") as stage:
                try:
                    machine = stack.enter_context(boot.running(self.build, boot_options))
                    seconds = machine.wait_ssh(timeout=options.boot_timeout, on_tick=progress.detail)
                except boot.BootError as exc:
                    # Nothing was proved either way: the run's error (exit 4), not a failed claim.
                    raise Unreachable(f"{self.spec} did not boot: {exc.message}", hint=exc.hint) from None
                stage.note = f"SSH after {seconds:.0f} s, {machine.accel.accel}, {machine.memory_mib} MiB"
                if machine.emulator_retry:  # the boot the emulator lost is part of `seconds`
                    stage.note += f"; booted twice (the emulator lost the first: {machine.emulator_retry})"
            config = client_config(options.work, key)
            # Closed before QEMU stops (the stack unwinds in reverse).
            url = ssh.SshUrl(host="127.0.0.1", user="root", port=machine.ssh_port)
            stack.enter_context(mux.shared(config, url, options.work))
            own = ssh.public_keys(key.with_suffix(".pub"), "--ssh-key")
            yield Connection(
                host=f"ssh://root@127.0.0.1:{machine.ssh_port}",
                pytest_args=(f"--ssh-config={config}",),
                ssh_config=config,
                test_keys=tuple(dict.fromkeys([*own, *options.verifier_keys])),
                test_devices_attached=boot_options.test_devices,
                # What reached the guest: served over HTTP, or put in the measured boot's test UKI.
                served=machine.measured.parts
                if machine.measured
                else {s.name: s.sha256 for s in machine.served() if s.sha256},
                machine=machine,
                guest_memory=GuestMemory(
                    qmp_socket=str(machine.checks_qmp),
                    dump_dir=str(machine.work),
                    memory_mib=machine.memory_mib,
                )
                if machine.checks_qmp
                else None,
                provider=(
                    attached.harness(machine.link, agent.openvpn_port, agent.openvpn_proto, sink)
                    if attached and agent and machine.link
                    else None
                ),
            )


@dataclass(frozen=True)
class AgentBuild:
    """A build whose OpenVPN asks the provider (role provider_agent), from its manifest."""

    records: list[str]
    openvpn_proto: Literal["tcp", "udp"]
    openvpn_port: int

    @classmethod
    def of(cls, manifest: Manifest) -> AgentBuild | None:
        roles = {r.name: r.vars for r in manifest.roles}
        if "provider_agent" not in roles or "openvpn_server" not in roles:
            return None
        openvpn = roles["openvpn_server"]
        return cls(
            records=[r["record"] for r in roles["provider_agent"].get("provider_agent_records", [])],
            openvpn_proto="tcp" if openvpn.get("openvpn_server_proto") == "tcp" else "udp",
            openvpn_port=int(openvpn.get("openvpn_server_port", 1194)),
        )


def throwaway_key(work: Path) -> Path:
    """A key made for this run only; its public half reaches the guest in the boot overlay."""
    key = work / "id_ed25519"
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "amnesiac-verify", "-f", key], capture=True)
    return key


BACKEND = QemuTarget
