"""Fleet benchmark: `verify --inventory` over up to 20 live targets, time per host and in total.

Run as root from the repository, with a build:
    .venv/bin/python -m benchmarks.fleet build/ovpn [--sizes 1,5,10,20] [--keep-reports DIR]

The targets are containers on this machine, one per host, each running the build's own root
filesystem with systemd as PID 1. The root is unpacked from initrd.img and imported once as a
local podman image (localhost/amnesiac-fleet-bench:<first 12 of the image's sha256>, kept for
the next run); the test key is layered at start (a bind mount on /root/.ssh/authorized_keys),
never built in. Each container has its own network namespace with nothing but loopback
(`--network none`): its sshd listens there, and this process relays 127.0.0.1:<port of its own>
on this machine to it, so no container has an address anywhere else and nothing leaves it.

For each size n it writes an inventory of the first n containers and times one
`amnesiac verify --inventory` over them (the test key declared with --verifier-key, as
tests/boot/test_fleet.py does). Prints one line per n: hosts, total seconds, seconds per
host, the exit code, the fleet's verdict, the check outcomes summed over the hosts (passed, failed,
error, not applicable: a container is not a booted server, so many checks fail or do not apply;
the figure is the time) and the 1-min load average before and after the run (2 cores, other
jobs share them). A figure, never an assertion. Every container is removed at the end, also on
Ctrl-C; the image is kept and its tag printed.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from amnesiac import container, signals, ssh
from amnesiac.errors import AmnesiacError
from amnesiac.image.pack import unpack_initrd
from amnesiac.run import require_root, require_tools, run

REPO = Path(__file__).resolve().parent.parent
POLICY = REPO / "policies/ovpn.yml"
REPOSITORY = "localhost/amnesiac-fleet-bench"
LABEL = "org.amnesiac.bench=fleet"  # every container this benchmark starts carries it
OUTCOMES = ("passed", "failed", "error", "not-applicable")
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def podman(*args: str, check: bool = True, timeout: float | None = 120.0) -> str:
    """podman with the settings this host needs (runc, lower ulimits: container.podman_env)."""
    result = run(["podman", *args], check=check, capture=True, env=container.podman_env(), timeout=timeout)
    return result.stdout.decode(errors="replace").strip()


def image_tag(build: Path) -> tuple[str, float | None]:
    """The build's root as a local podman image: the tag, and the seconds the import took
    (None: the tag was there already). No registry: unpacked from initrd.img, then imported."""
    manifest = json.loads((build / "manifest.json").read_text())["image"]
    tag = f"{REPOSITORY}:{manifest['sha256'][:12]}"
    if container.tag_exists(tag):
        return tag, None
    start = time.monotonic()
    unpacked = Path(tempfile.mkdtemp(prefix="amnesiac-fleet-root-"))
    try:
        _, root = unpack_initrd(build / "initrd.img", manifest["initrd_pieces"], unpacked / "initrd")
        tarball = unpacked / "root.tar"
        run(["tar", "--numeric-owner", "-C", root, "-cf", tarball, "."], capture=True)
        shutil.rmtree(unpacked / "initrd")
        podman(
            "import", "--quiet",
            "--change", 'CMD ["/sbin/init"]',
            "--change", "STOPSIGNAL=SIGRTMIN+3",
            "--message", f"amnesiac fleet benchmark: the root of {build} ({manifest['sha256'][:12]})",
            str(tarball), tag,
            timeout=600,
        )  # fmt: skip
    finally:
        shutil.rmtree(unpacked, ignore_errors=True)
    return tag, time.monotonic() - start


def _setns(fd: int) -> None:
    """Move the calling thread (only it) into the network namespace `fd` (os.setns is 3.12+)."""
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


def _pump(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(65536):
            dst.sendall(data)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


class Relay:
    """127.0.0.1:port on this machine to 127.0.0.1:22 in one container's loopback-only network
    namespace: the container is reached over loopback alone, and has no address to leave by."""

    HOST_NS = os.open("/proc/self/ns/net", os.O_RDONLY)  # the main thread's: this machine's

    def __init__(self, pid: int) -> None:
        self.netns = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.5)  # accept() wakes up to see close()
        self.port: int = self.listener.getsockname()[1]
        self.open = True
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while self.open:
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.setblocking(True)
            try:
                server = self._connect()
            except OSError:
                client.close()  # sshd not up yet: the client sees the connection closed
                continue
            threading.Thread(target=self._relay, args=(client, server), daemon=True).start()

    def _connect(self) -> socket.socket:
        _setns(self.netns)
        try:
            server = socket.create_connection(("127.0.0.1", 22), timeout=5)
        finally:
            _setns(self.HOST_NS)
        server.settimeout(None)
        return server

    @staticmethod
    def _relay(client: socket.socket, server: socket.socket) -> None:
        back = threading.Thread(target=_pump, args=(server, client), daemon=True)
        back.start()
        _pump(client, server)
        back.join()
        client.close()
        server.close()

    def close(self) -> None:
        self.open = False
        self.listener.close()
        os.close(self.netns)


@contextlib.contextmanager
def fleet(tag: str, count: int, public_key: Path, timeout: float) -> Iterator[list[tuple[str, int]]]:
    """`count` systemd containers of the image, each one's sshd on a 127.0.0.1 port of its own;
    yields (name, port) once every sshd has sent its banner. Every container is removed on the
    way out, whatever happened."""
    names: list[str] = []
    relays: list[Relay] = []
    try:
        start = time.monotonic()
        for index in range(1, count + 1):
            name = f"amnesiac-fleet-bench-{os.getpid()}-{index:02d}"
            names.append(name)
            podman(
                "run", "--detach", "--name", name, "--hostname", f"fleet{index:02d}", "--label", LABEL,
                "--systemd=always", "--network=none",
                # As molecule's instances (molecule/config.yml): the container's own network
                # namespace configured as a server's (OpenVPN's tun, nftables), processes of
                # other users readable by the checks.
                "--cap-add=NET_ADMIN", "--cap-add=SYS_PTRACE", "--device=/dev/net/tun",
                "--volume", f"{public_key}:/root/.ssh/authorized_keys:ro",
                tag, "/sbin/init",
            )  # fmt: skip
            pid = int(podman("inspect", "--format", "{{.State.Pid}}", name))
            relays.append(Relay(pid))
        started = time.monotonic() - start
        waiting = dict(zip(names, (r.port for r in relays), strict=True))
        while waiting and time.monotonic() - start < timeout:
            waiting = {n: p for n, p in waiting.items() if not ssh.read_banner(p, timeout=1.0)}
            if waiting:
                time.sleep(0.5)
        if waiting:
            raise SystemExit(f"no SSH banner within {timeout:.0f} s from {', '.join(sorted(waiting))}")
        print(
            f"{count} containers started in {started:.1f} s, every sshd answering "
            f"{time.monotonic() - start:.1f} s after the first start"
        )
        yield [(n, r.port) for n, r in zip(names, relays, strict=True)]
    finally:
        for relay in relays:
            relay.close()
        if names:
            # A second Ctrl-C would stop the removal half way: ignored until it is done.
            handlers = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                podman("rm", "--force", "--ignore", "--time", "10", *names, check=False, timeout=300)
                left = podman("ps", "--all", "--quiet", "--filter", f"label={LABEL}", check=False)
            finally:
                for number, handler in handlers.items():
                    signal.signal(number, handler)
            print(
                f"removed {len(names)} containers"
                + (
                    f"; still there (podman rm -f $(podman ps -aq --filter label={LABEL})): {left}"
                    if left
                    else ""
                )
            )


def write_inventory(file: Path, hosts: list[tuple[str, int]], key: Path) -> Path:
    """An Ansible inventory (JSON is YAML) as tests/boot/test_fleet.py writes one."""
    common = "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"
    data = {
        "all": {
            "vars": {
                "ansible_host": "127.0.0.1",
                "ansible_user": "root",
                "ansible_ssh_private_key_file": str(key),
                "ansible_ssh_common_args": common,
            },
            "hosts": {f"fleet{i:02d}": {"ansible_port": port} for i, (_, port) in enumerate(hosts, 1)},
        }
    }
    file.write_text(json.dumps(data, indent=1) + "\n")
    return file


def outcomes(report: Path) -> Counter[str]:
    """Check outcomes summed over the hosts' reports (each check once per host, though a claim
    may share it with another)."""
    totals: Counter[str] = Counter()
    summary = report / "fleet.json"
    if not summary.is_file():
        return totals
    for host in json.loads(summary.read_text())["hosts"].values():
        if "report" not in host:
            continue  # unreachable: no report of its own
        data = json.loads((report / host["report"]["json"]).read_text())
        checks = {
            c["id"]: c["outcome"] for claim in [data["integrity"], *data["claims"]] for c in claim["checks"]
        }
        totals.update(checks.values())
    return totals


def verify_fleet(inventory: Path, report: Path, public_key: Path, timeout: float) -> tuple[float, int, str]:
    """One `amnesiac verify --inventory`: its seconds, exit code and the fleet's verdict. The test
    key is declared (--verifier-key), as tests/boot/test_fleet.py does."""
    start = time.monotonic()
    result = run(
        [sys.executable, "-m", "amnesiac.cli", "verify", "--json", "--policy", POLICY,
         "--inventory", inventory, "--report", report, "--verifier-key", public_key],
        cwd=REPO, capture=True, check=False, timeout=timeout,
    )  # fmt: skip
    elapsed = time.monotonic() - start
    try:
        out = json.loads(result.stdout)
        verdict = out["verdict"] + (f", {len(out['unreachable'])} unreachable" if out["unreachable"] else "")
    except (ValueError, KeyError):
        verdict = "no summary"
        print(result.stderr.decode(errors="replace").strip()[-2000:], file=sys.stderr)
    return elapsed, result.returncode, verdict


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("build", type=Path, nargs="?", default=REPO / "build/ovpn")
    parser.add_argument("--sizes", default="1,5,10,20", help="fleet sizes, each verified once, in this order")
    parser.add_argument("--ssh-timeout", type=float, default=120.0, help="seconds for every sshd to answer")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds for one verify run")
    parser.add_argument(
        "--keep-reports", type=Path, metavar="DIR", help="write each run's reports to DIR/<n> and keep them"
    )
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if not sizes or min(sizes) < 1:
        parser.error("--sizes: positive numbers, e.g. 1,5,10,20")
    if not (args.build / "manifest.json").is_file() or not (args.build / "initrd.img").is_file():
        raise SystemExit(f"{args.build}: no build there (manifest.json and initrd.img)")
    signals.install()  # SIGTERM too: the containers are removed on the way out
    try:
        require_root("the fleet benchmark")
        require_tools("podman", "ssh", "ssh-keygen", "tar", "zstd", "cpio")
        measure(args.build.resolve(), sizes, args.ssh_timeout, args.timeout, args.keep_reports)
    except AmnesiacError as exc:
        raise SystemExit(f"{exc}") from None


def measure(build: Path, sizes: list[int], ssh_timeout: float, timeout: float, keep: Path | None) -> None:
    """The image, the containers, then one verify per size on the first n of them."""
    tag, imported = image_tag(build)
    print(f"image {tag}: " + (f"imported in {imported:.1f} s" if imported is not None else "cached"))
    with tempfile.TemporaryDirectory(prefix="amnesiac-fleet-bench-") as tmp:
        work = Path(tmp)
        key = work / "id_ed25519"
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "fleet-bench", "-f", key], capture=True)
        public = key.with_name("id_ed25519.pub")
        with fleet(tag, max(sizes), public, ssh_timeout) as hosts:
            print(
                f"{'hosts':>5} {'total s':>8} {'s/host':>7} {'exit':>4}  {'verdict':24} "
                f"{'passed':>6} {'failed':>6} {'error':>5} {'n/a':>4}  load 1-min before / after"
            )
            for n in sizes:
                inventory = write_inventory(work / f"inventory-{n}.json", hosts[:n], key)
                report = (keep.resolve() / str(n)) if keep else work / f"report-{n}"
                before = os.getloadavg()[0]
                elapsed, code, verdict = verify_fleet(inventory, report, public, timeout)
                after = os.getloadavg()[0]
                counts = outcomes(report)
                print(
                    f"{n:5d} {elapsed:8.1f} {elapsed / n:7.1f} {code:4d}  {verdict:24} "
                    + " ".join(f"{counts[o]:{w}d}" for o, w in zip(OUTCOMES, (6, 6, 5, 4), strict=True))
                    + f"  {before:.2f} / {after:.2f}"
                )
    if keep:
        print(f"reports kept in {keep}/<hosts>/fleet.html")
    print(f"image kept for the next run: {tag} (remove it: podman image rm {tag})")


if __name__ == "__main__":
    main()
