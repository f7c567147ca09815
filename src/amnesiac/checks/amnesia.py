"""Measured amnesia: what a client told the server is gone from all of its RAM within the policy's
bound after the client disconnects (amnesiac.canary holds the session and the search).

Files, journals and logs are searched by the other checks; RAM is where a seized server still
holds what it was sent. This check is the one that looks there: a real session through the
booted server carrying canaries (account, client address and port, a DNS name, payload through
the tunnel; OpenVPN, and WireGuard where the image has it), the guest's whole physical memory
dumped from the host and searched (the client's packets too, as the network card received them)
while the session runs (the positive control: the search must find what the server was told) and
again every few seconds after the disconnect, until nothing is left or the bound passes.
"""

from __future__ import annotations

from pathlib import Path

from amnesiac import previous_boot, ssh
from amnesiac.canary import NEVER, Forgetting, measure
from amnesiac.checks.expectations import Expectations
from amnesiac.checks.meta import KERNEL, check
from amnesiac.checks.plugin import not_applicable
from amnesiac.checks.probe import Probe
from amnesiac.targets import mux

# What the server must have been told, so must be found while the session runs: a search that
# does not find them proves nothing about their absence later. WireGuard's kernel keeps the
# client's endpoint as a sockaddr, never as text, and its account (the peer's key) stays allowed.
MUST_BE_SEEN = {
    "OpenVPN": ("account", "client address", "client sockaddr", "client packet header", "dns name"),
    "WireGuard": ("client sockaddr", "client packet header", "dns name"),
}
MIB = 1024 * 1024
UNREADABLE = "the verifier cannot read this target's RAM (only a qemu: target's, whose machine it runs)"


@check(
    claims=[
        "no-ip-logging",
        "no-dns-logging",
        "no-traffic-logging",
        "no-bandwidth-logging",
        "no-activity-logging",
        "no-visited-resources",
        "no-pii-on-server",
    ],
    rationale="A real client session through the booted server (OpenVPN, and WireGuard where the image "
    "has it) carries canaries (its account, its own address and port, a DNS name resolved through the "
    "server, payload to a sink through the tunnel); the server's whole RAM, dumped from the host (the "
    "client's packets as the network card received them too), and its own views (journal, kernel log, "
    "connection tracking, sockets, WireGuard's peers, processes, tmpfs files) hold them while the session "
    "runs and none of them within the policy's bound after the disconnect; a string never sent is never "
    "found.",
    targets=KERNEL,
    not_applicable="the server's RAM can be searched only where the verifier runs the machine "
    "(qemu: targets), and only through a session of a reference provider's account",
)
def session_forgotten(probe: Probe, expected: Expectations) -> None:
    harness, guest = expected.provider, expected.guest_memory
    if guest is None:
        not_applicable(UNREADABLE)
    if harness is None or harness.sink_host is None:
        not_applicable("no reference provider and client link are attached: no session to carry canaries")
    assert guest is not None and harness is not None
    probe.run("uname -r; nproc; grep MemTotal /proc/meminfo")  # what was searched, for the record

    def shell(command: str) -> str:  # attribution reads: the summary below is the evidence
        return str(probe.host.run(command).stdout)

    bound = float(expected.forget_seconds)
    results = [measure(harness, guest, shell, bound=bound, must_see=MUST_BE_SEEN["OpenVPN"])]
    if expected.wireguard_interface and harness.peers_file:
        wireguard = expected.wireguard_interface
        must_see = MUST_BE_SEEN["WireGuard"]
        results.append(measure(harness, guest, shell, bound=bound, wireguard=wireguard, must_see=must_see))
    probe.note("\n\n".join(_summary(result) for result in results))
    problems = [problem for result in results for problem in _problems(result, expected.forget_seconds)]
    assert problems == [], "; ".join(problems)


def _problems(result: Forgetting, bound: int) -> list[str]:
    seen = set(result.during.found())
    missing = [name for name in MUST_BE_SEEN[result.vpn] if name not in seen]
    rebound = "; the network cards were rebound while it ran" if result.cards_rebound else ""
    assert missing == [], (
        f"the positive control failed: {missing} not found in the server's RAM by "
        f"{result.during_searches} searches during the {result.vpn} session{rebound}, so the search "
        f"proves nothing (session: {result.client_log.strip()[-300:]})"
    )
    assert all(NEVER not in s.found() for s in [result.during, *result.after]), (
        "a string never sent was found: the search is not telling the canaries apart"
    )
    problems = [
        f"{bound} s after the {result.vpn} client's disconnect the server still held {name} in "
        f"{_holders(where)}"
        for name, where in result.kept().items()
    ]
    if not result.sink_received:  # the payload canary proves nothing unless it crossed the server
        said = [
            ln for ln in result.client_log.splitlines() if "Error" in ln or ln.startswith(("dns:", "sink:"))
        ]
        traffic = " | ".join(said[-3:])
        problems.append(
            f"the {result.vpn} session's payload never reached the sink through the server ({traffic})"
        )
    return problems


def _summary(result: Forgetting) -> str:
    searches = [result.during, *result.after]
    lines = [
        f"{result.vpn} session: searched {result.during.searched_bytes / MIB:.0f} MiB of guest RAM "
        f"{len(searches) - 1 + result.during_searches} times ({result.during_searches} during the "
        f"session; {sum(s.seconds for s in searches):.1f} s, dump included); bound {result.bound:.0f} s; "
        f"payload reached the sink: {result.sink_received}"
        + ("; the network cards were rebound during the session" if result.cards_rebound else ""),
        f"session: {' | '.join(result.client_log.strip().splitlines()[:2])}",
    ]
    forgotten = result.forgotten_after()
    for name in result.during.hits:
        during = result.during.hits.get(name, [])
        where = _holders(result.during.holders.get(name, {}))
        if name not in forgotten:
            lines.append(f"{name}: not in RAM during the session")
            continue
        gone = forgotten[name]
        after = f"gone {gone:.0f} s after the disconnect" if gone is not None else "STILL THERE at the bound"
        views = result.during.views.get(name, {})
        shown = f"shown by {_holders(views)}" if views else "in none of the server's views"
        lines.append(f"{name}: {len(during)} in RAM during the session ({where}); {shown}; {after}")
    return "\n".join(lines)


def _holders(where: dict[str, int]) -> str:
    return ", ".join(f"{count} in {holder}" for holder, count in where.items()) or "nothing"


@check(
    claims=["no-disk-storage", "no-pii-on-server"],
    rationale="Everything is in RAM, and a reboot does not clear RAM: the firmware hands it as it was to "
    "the next system, which may be one whoever seized the server brought. Canaries planted in a file of "
    "the root tmpfs, a file of /dev/shm, a process's memory and the resolver are found in the server's "
    "whole RAM, dumped from the host; then the server reboots the orderly way and QEMU stops it where it "
    "would reset, and the same search of its RAM, as the image left it for the next system, finds none of "
    "them. A string never sent is never found. (A reset button skips the image's way down: what the "
    "server held then is what the other checks bound.)",
    targets=KERNEL,
    not_applicable="the server's RAM can be searched across its reboot only where the verifier runs the "
    "machine (qemu: targets)",
    resets=True,
)
def previous_boot_forgotten(probe: Probe, expected: Expectations) -> None:
    guest = expected.guest_memory
    if guest is None:
        not_applicable(UNREADABLE)
    assert guest is not None
    probe.run("uname -r; grep MemTotal /proc/meminfo; findmnt -n -o FSTYPE,SIZE /")  # for the record

    def shell(command: str) -> str:  # the canaries' planting: the note below is the evidence
        return str(probe.host.run(command).stdout)

    backend = probe.host.backend  # testinfra's ssh backend: the run's config and the host
    url = ssh.SshUrl(host=backend.host.name, user=backend.host.user or "root", port=backend.host.port)
    config = Path(backend.ssh_config)
    result = previous_boot.across_reboot(guest, shell, hang_up=lambda: mux.hang_up(config, url))
    probe.note(_reboot_summary(result))
    missing = [name for name in previous_boot.MUST_BE_SEEN if not result.before.found(name)]
    assert missing == [], f"the positive control failed: {missing} not in the server's RAM before the reboot"
    assert not result.before.found(NEVER), "a string never sent was found before the reboot"
    assert result.after is not None, (
        f"the server did not reach its reset {result.shutdown_seconds:.0f} s after `systemctl reboot` "
        f"(QEMU: {result.state}): its RAM as it leaves it could not be searched"
    )
    assert not result.after.found(NEVER), "a string never sent was found after the reboot"
    kept = result.kept()
    assert kept == {}, "the reboot left the next system " + "; ".join(
        f"{name} ({len(hits)} copies)" for name, hits in kept.items()
    )


def _reboot_summary(result: previous_boot.Reboot) -> str:
    before = result.before
    lines = [
        f"searched {before.searched_bytes / MIB:.0f} MiB of guest RAM before `systemctl reboot` and after "
        f"it, stopped where it would reset ({result.shutdown_seconds:.0f} s; QEMU: {result.state})",
    ]
    for name, hits in before.hits.items():
        if name == NEVER:
            continue
        after = result.after.hits.get(name, []) if result.after else None
        left = "not searched" if after is None else (f"{len(after)} left" if after else "none left")
        lines.append(f"{name}: {len(hits)} copies before the reboot; {left}")
    lines.append(
        "not covered: a reset without the image's way down (the reset button, a watchdog) leaves what the "
        "server held at that moment, as any machine does; the next boot of this image clears what it does "
        "not use (init_on_free), another system does not; UEFI's memory-overwrite request, which has the "
        "firmware clear RAM at the next boot, needs a UEFI boot path (this one is BIOS and iPXE)"
    )
    return "\n".join(lines)
