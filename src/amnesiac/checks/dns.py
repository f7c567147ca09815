"""The DNS resolver answers but keeps no record of the names asked for."""

from __future__ import annotations

from amnesiac.checks.logging import canary, find_everywhere
from amnesiac.checks.meta import RUNNING, check
from amnesiac.checks.probe import Probe

LOCAL_NAME = "amnesiac.test"  # dns_resolver's local-data, answered without the internet


@check(
    claims=["no-dns-logging", "no-visited-resources"],
    rationale="The resolver answers queries (so it is the one in use), and a unique name asked "
    "of it is found in no file afterwards.",
    targets=RUNNING,
    not_applicable="the resolver does not run in an unpacked root",
)
def resolver_answers_without_logging(probe: Probe) -> None:
    # Asked again while refused, as a client's resolver does: unbound restarts every
    # dns_resolver_lifetime_seconds and refuses queries until the next process listens (up to
    # seconds under emulation). Bounded: 10 tries, 1 s apart.
    answer = probe.run(
        f"for try in $(seq 10); do getent ahostsv4 {LOCAL_NAME} && exit 0; sleep 1; done; exit 2"
    )
    assert answer.rc == 0 and answer.stdout.strip(), f"no answer for {LOCAL_NAME} in 10 tries"
    mark = canary()
    # A name under the local zone: answered at once (a name on the internet would be recursed
    # for, and without a network that is a wait for timeouts, not a better test of the log).
    probe.run(f"getent ahostsv4 {mark}.{LOCAL_NAME}; true")
    found = find_everywhere(probe, mark)
    assert found == [], f"the queried name was stored in {found}"


@check(
    claims=["no-dns-logging", "no-visited-resources"],
    rationale="unbound's effective configuration logs no queries, replies or local actions, has "
    "no log file and no statistics.",
)
def no_query_log(probe: Probe) -> None:
    options = ("log-queries", "log-replies", "log-local-actions", "log-servfail", "logfile", "verbosity",
               "extended-statistics", "statistics-interval")  # fmt: skip
    # One round trip: unbound-checkconf reads one option per run.
    result = probe.run(
        f'for o in {" ".join(options)}; do v=$(unbound-checkconf -o $o) || exit 1; echo "$o=$v"; done'
    )
    assert result.rc == 0, f"unbound-checkconf cannot read the configuration: {result.stdout} {result.stderr}"
    settings = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    wanted = {
        "log-queries": "no",
        "log-replies": "no",
        "log-local-actions": "no",
        "log-servfail": "no",
        "logfile": "",
        "extended-statistics": "no",
        "statistics-interval": "0",
    }
    wrong = {k: settings.get(k) for k, v in wanted.items() if settings.get(k) != v}
    assert wrong == {}, f"unbound records queries: {wrong}"
    assert int(settings.get("verbosity") or "0") <= 1, f"unbound verbosity {settings.get('verbosity')}"
