"""The firewall records nothing about clients: no log rules, no per-client counters."""

from __future__ import annotations

from amnesiac.checks.meta import Surface, check
from amnesiac.checks.probe import Probe

PROBE_TABLE = "amnesiac_probe"


def _ruleset(probe: Probe, kind: Surface) -> str:
    if kind is Surface.BOOTED:
        result = probe.run("nft list ruleset")
        assert result.rc == 0, "cannot list the nftables ruleset"
        assert "table" in result.stdout, "positive control: no ruleset is loaded at all"
    else:
        result = probe.run("cat /etc/nftables.conf")
        assert result.rc == 0, "no /etc/nftables.conf"
    return str(result.stdout)


def _statements(ruleset: str) -> list[list[str]]:
    return [
        line.split() for line in ruleset.splitlines() if line.strip() and not line.lstrip().startswith("#")
    ]


@check(
    claims=["no-traffic-logging", "no-ip-logging", "no-mac-logging", "no-visited-resources"],
    rationale="The ruleset has no log statement, and on a booted server the kernel refuses to "
    "load one (the logging modules are not in the image and module loading is locked).",
)
def no_log_rules(probe: Probe, kind: Surface) -> None:
    logging = [" ".join(words) for words in _statements(_ruleset(probe, kind)) if "log" in words]
    assert logging == [], f"rules that log: {logging}"
    if kind is not Surface.BOOTED:
        return
    # The table and chain must be accepted (positive control: nftables works and root may
    # change the ruleset), so that only the log statement can be what the kernel refuses.
    attempt = probe.run(
        f"nft add table inet {PROBE_TABLE} && nft add chain inet {PROBE_TABLE} c || "
        "{ echo 'amnesiac: probe table refused'; exit 3; }; "
        f"nft add rule inet {PROBE_TABLE} c log prefix amnesiac-probe 2>&1; rc=$?; "
        f"nft delete table inet {PROBE_TABLE} 2>/dev/null; exit $rc"
    )
    assert "probe table refused" not in attempt.stdout, "positive control: nft could not add a plain table"
    assert attempt.rc != 0, "the kernel accepted a log rule"


@check(
    claims=[
        "no-traffic-logging",
        "no-ip-logging",
        "no-bandwidth-logging",
        "no-visited-resources",
        "data-volume-off-server",
    ],
    rationale="No set, meter, named counter or quota is filled from packets, so the firewall "
    "holds no list of client addresses or per-client byte counts.",
)
def no_per_client_counters(probe: Probe, kind: Surface) -> None:
    statements = _statements(_ruleset(probe, kind))
    recorders = [
        " ".join(w) for w in statements
        if ({"meter", "quota"} & set(w)) or (w[:1] == ["counter"] and len(w) > 1 and w[1] not in ("packets",))
        or ("flags" in w and "dynamic" in " ".join(w)) or w[:1] in (["add"], ["update"])
    ]  # fmt: skip
    assert recorders == [], f"stateful recorders in the ruleset: {recorders}"
