"""Records a policy permits (CloudVPN's client IP and session times) never stay on the server."""

from __future__ import annotations

from amnesiac.checks.logging import find_everywhere
from amnesiac.checks.meta import Surface, check
from amnesiac.checks.plugin import not_applicable
from amnesiac.checks.probe import Probe

HOOK = "/usr/local/libexec/amnesiac/session-record"
CLIENT = "198.51.100.77"  # a documentation address: the fake client of the run below


@check(
    claims=[
        "session-records-off-server",
        "no-activity-logging",
        "no-pii-on-server",
        "data-volume-off-server",
    ],
    rationale="The disconnect hook sends the permitted fields off the server and writes no file; "
    "run as OpenVPN runs it, with a unique client address, that address is stored nowhere.",
)
def not_stored_locally(probe: Probe, kind: Surface) -> None:
    script = probe.run(f"cat {HOOK}")
    if script.rc != 0:
        not_applicable("this image sends no session records (no hook installed)")
    lines = [line for line in script.stdout.splitlines() if not line.lstrip().startswith("#")]
    writes = [line for line in lines if ">" in line and "/dev/udp/" not in line and "/dev/null" not in line]
    assert writes == [], f"the hook writes locally: {writes}"
    if kind is Surface.ROOTFS:
        return
    probe.run(
        f"script_type=client-disconnect trusted_ip={CLIENT} time_unix=1700000000 "
        f"setpriv --reuid=nobody --regid=nogroup --clear-groups {HOOK}"
    )
    found = find_everywhere(probe, CLIENT)
    assert found == [], f"the client's address was stored in {found}"
