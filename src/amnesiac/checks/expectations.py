"""What the checks expect of the target: from the policy and the build, never from the target.

`amnesiac verify` writes it as JSON (`--amnesiac-expect`); the plugin's `expected` fixture
reads it back. A run without it (a role developer's molecule scenario) gets the defaults, and a
check that needs a value the defaults leave unknown fails saying so.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from amnesiac.files import write_atomic


class PermittedRecord(BaseModel):
    """A record the policy permits, as the node sends it (docs/provider-interface.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    record: str
    events: list[str]
    fields: list[str]


class ProviderHarness(BaseModel):
    """The reference provider service a target was given (qemu: attaches one), and how a real
    client reaches the target's OpenVPN: from inside the harness's own network namespace, over
    the guest's second NIC (boot.link)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    journal: str  # the service's JSON-lines journal of every request it received
    node: str  # the common name of the client certificate the target was given
    netns: str  # where a client runs (`ip netns exec`)
    openvpn_host: str  # the guest's address on the link
    openvpn_port: int
    openvpn_proto: str
    account: str  # an account the service accepts: unique to this run, a canary
    password: str
    # WireGuard: the file whose lines ("KEY IP/PREFIX") the service answers /v1/wireguard/peers with.
    peers_file: str | None = None
    # A TCP sink the guest reaches at sink_host:sink_port (a guestfwd rule): the destination of
    # a session's canary traffic, which writes what it received to sink_file.
    sink_host: str | None = None
    sink_port: int | None = None
    sink_file: str | None = None


class GuestMemory(BaseModel):
    """The target's physical memory, as the harness that runs it can dump it (qemu: targets)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    qmp_socket: str  # a QMP monitor reserved for the checks
    dump_dir: str  # where QEMU may write a dump (the harness's private directory)
    memory_mib: int


class Expectations(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: str = ""  # the policy's id
    # Keys the policy names for its administrators (ssh_admin_authorized_keys).
    authorized_keys: list[str] = Field(default_factory=list)
    # Keys the verifier itself put on the target to log in (qemu:'s boot-time key, --verifier-key).
    test_keys: list[str] = Field(default_factory=list)
    # qemu: the harness attached devices for the checks to find (boot/qemu.py: emulated_devices).
    test_devices_attached: bool = False
    root_tmpfs_size_bytes: int | None = None  # ram_root's size limit
    openvpn_unit: str | None = None  # the OpenVPN server's systemd unit
    wireguard_interface: str | None = None
    image_sha256: str | None = None  # the build the target should be running
    permitted_records: list[PermittedRecord] = Field(default_factory=list)  # the policy's permits
    provider: ProviderHarness | None = None  # the verifier's reference service, when attached
    guest_memory: GuestMemory | None = None  # qemu: the checks can search all of the server's RAM
    # The policy's bound: seconds after a client disconnects by which the server holds nothing
    # of its session anywhere, RAM included.
    forget_seconds: int = 60

    def write(self, path: Path) -> Path:
        return write_atomic(path, self.model_dump_json(indent=2) + "\n")

    @classmethod
    def read(cls, path: Path) -> Expectations:
        return cls.model_validate_json(path.read_bytes())
