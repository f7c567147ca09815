"""One SSH connection per target for a verify run (targets.mux): the client options, the
ansible.cfg of an inventory, and, against an sshd on 127.0.0.1, that a run's commands share
one login and leave no ssh process or socket behind."""

from __future__ import annotations

import configparser
import json
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from amnesiac import policy, ssh, verify
from amnesiac.progress import Progress
from amnesiac.targets import ReachOptions, mux
from amnesiac.targets.base import Unreachable
from amnesiac.targets.inventory import ansible_config, members
from amnesiac.targets.ssh import SshTarget, client_config
from tests.sshd import keygen, loopback_sshd

REPO = Path(__file__).resolve().parent.parent


def test_the_control_path_is_one_socket_per_host_in_the_directory() -> None:
    assert ssh.control_path(Path("/tmp/amnesiac-verify-ab12cd34/cm")) == "/tmp/amnesiac-verify-ab12cd34/cm/%C"
    assert ssh.control_path(Path("/tmp/50%/cm")) == "/tmp/50%%/cm/%C", "a % in the name is not a token"


def test_the_control_path_fits_a_unix_socket_or_is_none() -> None:
    """ssh binds <ControlPath>.<16 characters> first, and %C is 40: the whole must fit sun_path."""
    for length in range(1, 120):
        directory = Path("/" + "d" * (length - 1))
        path = ssh.control_path(directory)
        longest = length + len("/") + 40 + len(".") + 16
        assert (path is not None) == (longest <= ssh.SOCKET_PATH_MAX), length
    # A run's work directory in the usual temporary directory leaves room.
    assert ssh.control_path(Path(tempfile.gettempdir()) / "amnesiac-verify-ab12cd34" / "cm")


@pytest.mark.parametrize("name", ["/tmp/a b", "/tmp/a\tb", '/tmp/a"b', "/tmp/a'b"])
def test_a_directory_name_ssh_would_split_gets_no_control_path(name: str) -> None:
    assert ssh.control_path(Path(name)) is None


def test_the_ssh_config_shares_a_connection_and_keeps_the_host_key_options(tmp_path: Path) -> None:
    config = ssh.client_config(tmp_path / "c", identity=Path("/k"), ephemeral_host_keys=True, control="/w/%C")
    lines = [line.strip() for line in config.read_text().splitlines()]
    assert lines[0] == "Host *"
    assert "ControlMaster auto" in lines and "ControlPath /w/%C" in lines
    assert f"ControlPersist {ssh.CONTROL_PERSIST}" in lines
    for option in (*ssh.CLIENT_OPTIONS, *ssh.EPHEMERAL_HOST_OPTIONS, "IdentitiesOnly yes", "IdentityFile /k"):
        assert option in lines
    plain = ssh.client_config(tmp_path / "p", identity=Path("/k")).read_text()
    assert "Control" not in plain


def test_the_target_config_names_the_run_s_socket_directory() -> None:
    with tempfile.TemporaryDirectory(prefix="amnesiac-verify-") as tmp:
        work = Path(tmp)
        text = client_config(work, Path("/k")).read_text()
        assert f"ControlPath {work}/cm/%C" in text
        assert (work / "cm").is_dir() and (work / "cm").stat().st_mode & 0o777 == 0o700


def test_a_work_directory_too_long_for_a_socket_shares_nothing(tmp_path: Path) -> None:
    work = tmp_path / ("w" * 80)
    work.mkdir()
    assert "Control" not in client_config(work, Path("/k")).read_text()
    assert not (work / "cm").exists()
    assert ansible_config(work) == ""


def test_an_inventory_host_s_ssh_command_carries_one_control_path() -> None:
    """testinfra reads the ansible.cfg's ssh_args (configparser: %% is %) and adds neither its
    own ControlMaster nor ControlPath when it finds them there."""
    from testinfra.utils.ansible_runner import get_ansible_host

    with tempfile.TemporaryDirectory(prefix="amnesiac-verify-") as tmp:
        work = Path(tmp)
        parser = configparser.ConfigParser()
        parser.read_string(ansible_config(work))
        inventory = {
            "all": {"hosts": ["vpn1"]},
            "_meta": {
                "hostvars": {
                    "vpn1": {
                        "ansible_host": "127.0.0.1",
                        "ansible_port": 2222,
                        "ansible_ssh_common_args": "-o StrictHostKeyChecking=no",
                    }
                }
            },
        }
        host = get_ansible_host(parser, inventory, "vpn1")
        cmd, args = host.backend._build_ssh_command("true")
        line = " ".join(cmd) % tuple(args)
    assert line.count("ControlPath=") == 1 and f"ControlPath={work}/cm/%C" in line
    assert line.count("ControlMaster=") == 1 and "ControlMaster=auto" in line
    assert f"ControlPersist={ssh.CONTROL_PERSIST}" in line and "ControlPersist=60s" not in line
    assert line.index("ControlPath") < line.index("StrictHostKeyChecking"), "ours first"


# -- against an sshd on 127.0.0.1 --


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path, Path]]:
    """An sshd on 127.0.0.1 that lets a fresh key in as root and logs each login:
    (port, the private key, the log)."""
    base = tmp_path_factory.mktemp("sshd")
    key = keygen(base / "id_ed25519")
    authorized = base / "authorized_keys"
    authorized.write_text(key.with_suffix(".pub").read_text())
    with loopback_sshd(base, authorized, log_level="VERBOSE") as daemon:
        yield daemon.port, key, daemon.log


@pytest.fixture
def work() -> Iterator[Path]:
    """A run's work directory, named as verify names it (pytest's own would be too long)."""
    with tempfile.TemporaryDirectory(prefix="amnesiac-verify-") as tmp:
        yield Path(tmp)


def _logins(log: Path) -> int:
    return log.read_text().count("Accepted publickey")


def _ssh_processes(work: Path) -> list[str]:
    """Command lines of the ssh processes that name the run's directory (a master names itself
    `ssh: <socket> [mux]`)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            text = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        program = Path(text.split(" ", 1)[0]).name
        if program.startswith("ssh") and str(work) in text:
            found.append(text)
    return found


def test_a_run_logs_in_once_and_leaves_nothing_behind(sshd: tuple[int, Path, Path], work: Path) -> None:
    """Identity read and the pytest-xdist workers: every command over the one master the
    backend opened; when the context ends, the master and its socket are gone."""
    port, key, log = sshd
    before = _logins(log)
    target = SshTarget("root", "127.0.0.1", port)
    options = ReachOptions(work=work, progress=Progress(quiet=True), ssh_key=key)
    with target.reach(options) as connection:
        assert len(mux.live(work)) == 1, "the master is open before anything runs"
        assert len(_ssh_processes(work)) == 1, "one ssh: the master"
        host = connection.testinfra_host()
        seen = {host.run("echo $SSH_CONNECTION").stdout.split()[1] for _ in range(3)}
        assert len(seen) == 1, f"one TCP connection, one client port: {seen}"
        loaded = policy.load(REPO / "policies/ovpn.yml")
        records = verify.run_checks(
            target, [connection], ["input.sysrq_disabled", "ssh.no_test_key"],
            verify.expectations(loaded, None, connection),
            work=work, report_dir=work / "report", progress=options.progress, workers=2,
        )  # fmt: skip
        assert {r.id for r in records} == {"input.sysrq_disabled", "ssh.no_test_key"}
        assert all(r.outcome != "error" for r in records), [r.reason for r in records]
        assert all(r.evidence for r in records)
    assert _logins(log) - before == 1, "one login for the whole run"
    assert mux.live(work) == []
    assert _ssh_processes(work) == []


def test_a_master_a_command_made_is_closed_too(sshd: tuple[int, Path, Path], work: Path) -> None:
    """If the backend's master went, the next command becomes the master (ControlMaster auto);
    the context's end closes that one as well."""
    port, key, _ = sshd
    target = SshTarget("root", "127.0.0.1", port)
    options = ReachOptions(work=work, progress=Progress(quiet=True), ssh_key=key)
    with target.reach(options) as connection:
        mux.close(work)
        assert mux.live(work) == []
        assert connection.testinfra_host().run("true").rc == 0
        assert len(mux.live(work)) == 1
    assert mux.live(work) == []
    assert _ssh_processes(work) == []


def test_an_unreachable_server_is_still_reported_by_the_identity_read(work: Path) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    target = SshTarget("root", "127.0.0.1", port)
    options = ReachOptions(work=work, progress=Progress(quiet=True))
    with target.reach(options) as connection, pytest.raises(Unreachable, match="cannot reach"):
        target.identity(connection, None)
    assert mux.live(work) == [] and _ssh_processes(work) == []


def test_an_interrupted_run_leaves_nothing_behind(sshd: tuple[int, Path, Path], work: Path) -> None:
    port, key, _ = sshd
    target = SshTarget("root", "127.0.0.1", port)
    options = ReachOptions(work=work, progress=Progress(quiet=True), ssh_key=key)
    with pytest.raises(KeyboardInterrupt), target.reach(options):
        assert len(mux.live(work)) == 1
        raise KeyboardInterrupt
    assert mux.live(work) == [] and _ssh_processes(work) == []


def test_a_master_already_there_is_kept(sshd: tuple[int, Path, Path], work: Path) -> None:
    """Opening again finds the master (a second would bind no socket and stay in the foreground)."""
    port, key, _ = sshd
    target = SshTarget("root", "127.0.0.1", port)
    options = ReachOptions(work=work, progress=Progress(quiet=True), ssh_key=key)
    with target.reach(options):
        start = time.monotonic()
        assert mux.open_master(work / "ssh_config", ["-p", str(port), "root@127.0.0.1"])
        assert time.monotonic() - start < mux.OPEN_TIMEOUT / 2
        assert len(_ssh_processes(work)) == 1
    assert _ssh_processes(work) == []


def test_an_inventory_host_shares_one_connection(
    sshd: tuple[int, Path, Path], work: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first command (the identity read) opens the host's master; the rest share it."""
    port, key, log = sshd
    for name in ("PATH", "ANSIBLE_CONFIG"):  # members() sets them for this process: restored after
        monkeypatch.setenv(name, os.environ.get(name, ""))
    inventory = tmp_path / "fleet.yml"
    hostvars = {
        "ansible_host": "127.0.0.1",
        "ansible_port": port,
        "ansible_user": "root",
        "ansible_ssh_private_key_file": str(key),
        "ansible_ssh_common_args": "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null",
    }
    inventory.write_text(json.dumps({"all": {"hosts": {"vpn1": hostvars}}}))
    (host,) = members(inventory, work)
    before = _logins(log)
    with host.reach(ReachOptions(work=work, progress=Progress(quiet=True))) as connection:
        remote = connection.testinfra_host()
        seen = {remote.run("echo $SSH_CONNECTION").stdout.split()[1] for _ in range(3)}
        assert len(seen) == 1, f"one TCP connection, one client port: {seen}"
        assert len(mux.live(work)) == 1
    assert _logins(log) - before == 1
    assert mux.live(work) == [] and _ssh_processes(work) == []
