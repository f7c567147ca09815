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
    answer = probe.run(f"getent ahostsv4 {LOCAL_NAME}")
    assert answer.rc == 0 and answer.stdout.strip(), f"the resolver did not answer for {LOCAL_NAME}"
    mark = canary()
    probe.run(f"getent ahostsv4 {mark}.{LOCAL_NAME}; getent ahostsv4 {mark}.example.com; true")
    found = find_everywhere(probe, mark)
    assert found == [], f"the queried name was stored in {found}"


@check(
    claims=["no-dns-logging", "no-visited-resources"],
    rationale="unbound's effective configuration logs no queries, replies or local actions, has "
    "no log file and no statistics.",
)
def no_query_log(probe: Probe) -> None:
    settings = {}
    for option in ("log-queries", "log-replies", "log-local-actions", "log-servfail", "logfile", "verbosity",
                   "extended-statistics", "statistics-interval"):  # fmt: skip
        result = probe.run(f"unbound-checkconf -o {option}")
        assert result.rc == 0, f"unbound-checkconf cannot read the configuration: {result.stderr}"
        settings[option] = result.stdout.strip()
    wanted = {
        "log-queries": "no",
        "log-replies": "no",
        "log-local-actions": "no",
        "log-servfail": "no",
        "logfile": "",
        "extended-statistics": "no",
        "statistics-interval": "0",
    }
    wrong = {k: settings[k] for k, v in wanted.items() if settings[k] != v}
    assert wrong == {}, f"unbound records queries: {wrong}"
    assert int(settings["verbosity"] or "0") <= 1, f"unbound verbosity {settings['verbosity']}"
