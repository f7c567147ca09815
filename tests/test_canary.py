"""The canary session's pieces that need no booted server: what is searched for, how the time to
forget is read from the searches, who holds a page, the traffic sink, and the check's refusals."""

from __future__ import annotations

import ipaddress
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest

from amnesiac import residue
from amnesiac.boot import memory
from amnesiac.boot.sink import GUEST_SINK, traffic_sink
from amnesiac.canary import DURING_SEARCHES, Canaries, Forgetting, Search, _search_during, _Session
from amnesiac.checks import amnesia
from amnesiac.checks.expectations import Expectations, GuestMemory
from tests.test_provider_check import HARNESS


def test_canaries_are_unique_to_a_session_and_distinct() -> None:
    one, two = Canaries.fresh("amnesiac-canary-a"), Canaries.fresh("amnesiac-canary-a")
    needles = one.needles()
    assert len(set(needles.values())) == len(needles)
    assert needles["dns name"] != two.needles()["dns name"] and needles["payload"] != two.needles()["payload"]
    # The client's own address on the link, clear of the harness's (.1) and the guest's (.2).
    address = ipaddress.ip_address(one.client_address)
    assert address in ipaddress.ip_network("198.18.0.0/24") and 100 <= int(str(address).split(".")[-1]) < 250
    # struct sockaddr_in as a daemon or the kernel keeps it: family (host order), port, address.
    family, port = struct.unpack_from("<HH", needles["client sockaddr"])
    assert family == socket.AF_INET and socket.ntohs(port) == one.client_port
    assert needles["client sockaddr"][4:] == socket.inet_aton(one.client_address)
    assert b"." not in needles["dns name"]  # one label: found in the text form and the wire form
    # Connection tracking's tuple: the address in a zeroed 16-byte union, then the port.
    tuple_ = needles["client conntrack tuple"]
    assert tuple_[:4] == socket.inet_aton(one.client_address) and tuple_[4:16] == bytes(12)
    assert struct.unpack(">H", tuple_[16:])[0] == one.client_port


def test_the_servers_views_name_where_a_canary_is_without_the_server_seeing_it_in_clear(
    tmp_path: Path,
) -> None:
    """The views' command runs here as it would on the server: a process whose environment holds
    canaries, and a file written since `since`, are named; the command itself never holds a
    canary in clear (it would find itself, and leave a copy in the server's RAM)."""
    canaries = Canaries.fresh("amnesiac-canary-views")
    needles = canaries.needles()
    command = residue.command(needles, since=int(time.time()) - 5)
    for value in needles.values():
        assert value not in command.encode()
    secret = f"{canaries.client_address}:{canaries.client_port} {canaries.account}"
    holder = subprocess.Popen(["sleep", "30"], env={"AMNESIAC_TEST": secret})
    try:
        shown = subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=True)
    finally:
        holder.kill()
        holder.wait()
    views = residue.parse(shown.stdout, needles)
    process = "process sleep (environ, no service)"
    named = ("account", "client address", "client address:port")
    assert {name: views.get(name, {}).get(process) for name in named} == dict.fromkeys(named, 1)
    assert "never sent" not in views and "client sockaddr" not in views  # binary: RAM only


def test_views_parse_counts_a_match_for_every_canary_it_holds() -> None:
    needles = {"address": b"198.18.0.7", "address:port": b"198.18.0.7:4000", "name": b"n-1"}
    output = "\n".join([
        "connection tracking\t" + b"198.18.0.7:4000".hex(),
        "file /run/x\t" + b"198.18.0.7".hex(),
        "garbage line",
        "journal\tzz",
    ])  # fmt: skip
    assert residue.parse(output, needles) == {
        "address": {"connection tracking": 1, "file /run/x": 1},
        "address:port": {"connection tracking": 1},
    }


def _search(after: float | None, **hits: int) -> Search:
    return Search(after, 352 << 20, 1.0, {name: [0x1000] * count for name, count in hits.items()})


def test_the_time_to_forget_is_the_first_search_after_which_nothing_came_back() -> None:
    canaries = Canaries.fresh("amnesiac-canary-a")
    result = Forgetting(
        canaries,
        "OpenVPN",
        during=_search(None, account=3, **{"dns name": 2, "client address": 1}),
        after=[
            _search(0.0, account=2, **{"dns name": 2}),
            _search(5.0, **{"dns name": 1}),
            _search(10.0, account=1),  # back again: not forgotten at 5 s after all
            _search(15.0),
        ],
        bound=60.0,
        sink_received=True,
    )
    assert result.forgotten_after() == {"account": 15.0, "dns name": 10.0, "client address": 0.0}
    assert result.kept() == {}
    still = Forgetting(canaries, "OpenVPN", result.during, [_search(60.0, account=1)], 60.0, True)
    assert still.forgotten_after()["account"] is None
    assert list(still.kept()) == ["account"]


def test_searches_during_a_session_merge_as_the_first_that_found_each_canary() -> None:
    """A second search during the session fills in what the first missed (a packet header in a
    receive buffer just freed); what the first found stays as the first found it."""
    first = _search(None, account=2, **{"client packet header": 0})
    first.holders = {"account": {"kernel slab": 2}}
    second = _search(None, account=1, **{"client packet header": 3})
    second.holders = {"account": {"kernel slab": 1}, "client packet header": {"kernel (other)": 3}}
    merged = first.merged(second)
    assert sorted(merged.found()) == ["account", "client packet header"]
    assert len(merged.hits["account"]) == 2 and merged.holders["account"] == {"kernel slab": 2}
    assert merged.holders["client packet header"] == {"kernel (other)": 3}
    assert merged.seconds == 2.0 and merged.seconds_after_disconnect is None


def test_a_dns_name_missed_during_the_session_is_asked_for_again_before_the_next_search() -> None:
    """The resolver frees a query it gave up on and restarts every dns_resolver_lifetime_seconds:
    a name missed is sent again, so the positive control rests on a query the resolver holds; a
    missed packet header waits for the client's next keepalive instead."""
    sent: list[str] = []
    session = _Session(lambda: sent.append("query") or "dns: taken, no answer: timed out\n")
    found = iter([_search(None, **{"dns name": 0}), _search(None, **{"dns name": 1})])
    during, searches = _search_during(lambda _after: next(found), session, ["dns name"])
    assert (searches, sent, during.found()) == (2, ["query"], ["dns name"])
    assert session.log.startswith("dns: taken")
    headers = iter([_search(None, **{"client packet header": 0}) for _ in range(DURING_SEARCHES)])
    _during, searches = _search_during(lambda _after: next(headers), session, ["client packet header"])
    assert (searches, sent) == (DURING_SEARCHES, ["query"])


def test_pages_are_attributed_to_the_cgroup_of_their_owner() -> None:
    owners = memory.page_owners(
        "10 4242\n11 0\n12 99\n",
        "1 /sys/fs/cgroup\n"
        "4242 /sys/fs/cgroup/system.slice/system-openvpn\\x2dserver.slice/openvpn-server@a.service\n",
    )
    assert owners == {10: "openvpn-server@a.service", 12: "cgroup inode 99"}  # 11: charged to none
    assert "/proc/kpagecgroup" in memory.kpagecgroup_command([0x1000, 0x1FFF, 0x2000])
    assert memory.kpagecgroup_command([0x1000, 0x1FFF]).count("dd ") == 1  # one read per page


def test_the_sink_keeps_what_the_guest_sent(tmp_path: Path) -> None:
    with traffic_sink(tmp_path) as sink:
        assert sink.service.guest_ip == GUEST_SINK
        with socket.create_connection(("127.0.0.1", sink.service.host_port), timeout=5) as client:
            client.sendall(b"amnesiac-payload-1")
        deadline = time.monotonic() + 5
        while b"amnesiac-payload-1" not in sink.received.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.05)
    assert sink.received.read_bytes() == b"amnesiac-payload-1"


@pytest.mark.parametrize(
    ("expected", "reason"),
    [
        (Expectations(provider=HARNESS), "cannot read this target's RAM"),
        (
            Expectations(guest_memory=GuestMemory(qmp_socket="/x", dump_dir="/y", memory_mib=352)),
            "no reference provider",
        ),
        (
            Expectations(
                provider=HARNESS, guest_memory=GuestMemory(qmp_socket="/x", dump_dir="/y", memory_mib=1)
            ),
            "no reference provider",  # without a sink, the payload has nowhere to go
        ),
    ],
)
def test_the_check_says_why_it_cannot_run(expected: Expectations, reason: str) -> None:
    with pytest.raises(pytest.skip.Exception, match=reason):
        amnesia.session_forgotten(probe=None, expected=expected)  # type: ignore[arg-type]
