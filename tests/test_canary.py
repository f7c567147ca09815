"""The canary session's pieces that need no booted server: what is searched for, how the time to
forget is read from the searches, who holds a page, the traffic sink, and the check's refusals."""

from __future__ import annotations

import ipaddress
import socket
import struct
import time
from pathlib import Path

import pytest

from amnesiac.boot import memory
from amnesiac.boot.sink import GUEST_SINK, traffic_sink
from amnesiac.canary import Canaries, Forgetting, Search
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


def _search(after: float | None, **hits: int) -> Search:
    return Search(after, 352 << 20, 1.0, {name: [0x1000] * count for name, count in hits.items()})


def test_the_time_to_forget_is_the_first_search_after_which_nothing_came_back() -> None:
    canaries = Canaries.fresh("amnesiac-canary-a")
    result = Forgetting(
        canaries,
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
    still = Forgetting(canaries, result.during, [_search(60.0, account=1)], 60.0, True)
    assert still.forgotten_after()["account"] is None
    assert list(still.kept()) == ["account"]


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
