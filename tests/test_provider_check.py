"""The provider check's judgement, the records a build derives from a policy, and the agent's
script as rendered: what can be decided without a booted server (the boot tier runs the real
session, tests/boot/test_verify.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from amnesiac import policy
from amnesiac.checks.expectations import PermittedRecord, ProviderHarness
from amnesiac.checks.provider import REDIRECT, _judge, _unit_settings
from amnesiac.checks.vpn_confinement import management_problem
from amnesiac.image.plan import make_plan, permitted_record_vars
from amnesiac.policy import RECORDS_VAR
from amnesiac.provider.service import Request
from tests import role_templates

REPO = Path(__file__).resolve().parent.parent
HARNESS = ProviderHarness(
    journal="/nonexistent",
    node="node-a",
    netns="ns",
    openvpn_host="198.18.0.2",
    openvpn_port=1194,
    openvpn_proto="udp",
    account="amnesiac-canary-x",
    password="not-a-secret",  # noqa: S106 - a test account
)
SESSION = PermittedRecord(
    record="session", events=["disconnect"], fields=["client_ip", "session_start", "session_end"]
)
COUNTER = PermittedRecord(
    record="device-counter", events=["connect", "disconnect"], fields=["account", "device_count"]
)


def request(path: str, *fields: tuple[str, str], cn: str = "node-a", tls: str = "TLSv1.3") -> Request:
    return Request(
        time=0.0, method="POST", path=path, fields=tuple(fields), status=204, client_cn=cn, tls_version=tls
    )


AUTH = request("/v1/auth", ("username", "amnesiac-canary-x"), ("password", "<redacted>"))


def test_exactly_the_permitted_fields_at_their_events_pass() -> None:
    seen = [
        AUTH,
        request("/v1/records/device-counter", ("event", "connect"), ("account", "a")),
        request(
            "/v1/records/session",
            ("event", "disconnect"),
            ("client_ip", "198.18.0.1"),
            ("session_start", "1"),
            ("session_end", "2"),
        ),
        request("/v1/records/device-counter", ("event", "disconnect"), ("account", "a")),
    ]
    assert _judge(seen, [SESSION, COUNTER], HARNESS) == []


def auth(*extra: tuple[str, str], cn: str = "node-a", tls: str = "TLSv1.3") -> Request:
    return request("/v1/auth", ("username", "u"), ("password", "p"), *extra, cn=cn, tls=tls)


DIFFERENCES = {
    "extra field": (
        [AUTH, request("/v1/records/session", ("event", "disconnect"), ("client_ip", "x"),
                       ("session_start", "1"), ("session_end", "2"), ("account", "a"))],
        "fields not permitted ['account']",
    ),
    "missing record": ([AUTH], "record session was never received at disconnect"),
    "wrong event": (
        [AUTH, request("/v1/records/session", ("event", "connect"), ("client_ip", "x"))],
        "record session sent at connect, permitted at ['disconnect']",
    ),
    "unknown record": (
        [AUTH, request("/v1/records/audit", ("event", "connect"))],
        "permits no record for: POST /v1/records/audit",
    ),
    "auth extra": ([auth(("client_ip", "x"))], "auth request carried ['username', 'password', 'client_ip']"),
    "other node": ([auth(cn="other")], "without the node's certificate"),
    "old tls": ([auth(tls="TLSv1.1")], "came over TLSv1.1"),
    "no auth": ([], "never asked about the account"),
}  # fmt: skip


@pytest.mark.parametrize(("seen", "problem"), DIFFERENCES.values(), ids=DIFFERENCES.keys())
def test_every_difference_from_the_policy_is_named(seen: list[Request], problem: str) -> None:
    problems = _judge(seen, [SESSION], HARNESS)
    assert any(problem in p for p in problems), problems


def test_counted_fields_are_never_expected_from_the_node() -> None:
    seen = [
        AUTH,
        *(request("/v1/records/device-counter", ("event", e), ("account", "a")) for e in COUNTER.events),
    ]
    assert _judge(seen, [COUNTER], HARNESS) == []


def test_management_is_allowed_only_on_loopback_tcp() -> None:
    assert management_problem(["127.0.0.1", "7505", "/etc/openvpn/server/management/password"]) is None
    assert management_problem(["::1", "7505"]) is None
    assert management_problem(["/run/openvpn/management.sock", "unix"]) is not None
    assert management_problem(["0.0.0.0", "7505"]) is not None  # noqa: S104 - the case refused


def test_the_build_derives_the_agents_records_from_permits() -> None:
    loaded = policy.load(REPO / "policies/cloudvpn.yml")
    records = permitted_record_vars(loaded)[RECORDS_VAR]
    assert records == [
        {
            "record": "session",
            "events": ["disconnect"],
            "fields": ["client_ip", "session_start", "session_end"],
        },
        {"record": "monthly-volume", "events": ["disconnect"], "fields": ["account", "data_volume"]},
    ]
    assert make_plan(loaded).var(RECORDS_VAR) == records
    assert (
        permitted_record_vars(policy.load(REPO / "policies/ovpn.yml"))[RECORDS_VAR][0]["record"]
        == "device-counter"
    )


def render_agent(**overrides: object) -> str:
    """The agent as the role renders it: its defaults and internal variables, then `overrides`."""
    return role_templates.render("provider_agent", "provider-agent.sh.j2", **overrides)


@pytest.mark.parametrize("local_copy", [False, True])
def test_the_agent_is_valid_bash_and_writes_only_when_told_to(local_copy: bool, tmp_path: Path) -> None:
    script = render_agent(provider_agent_records=[SESSION.model_dump()], provider_agent_local_copy=local_copy)
    (tmp_path / "agent").write_text(script)
    subprocess.run(["bash", "-n", str(tmp_path / "agent")], check=True)
    code = [line for line in script.splitlines() if not line.lstrip().startswith("#")]
    writes = [target for line in code for target in REDIRECT.findall(line) if target != "/dev/null"]
    assert writes == (["/var/lib/amnesiac-provider-records/copy"] if local_copy else [])
    assert '"session|disconnect|client_ip session_start session_end"' in script


def test_unit_settings_read_unit_files_and_systemctl_show() -> None:
    text = "[Service]\n# ReadWritePaths=/x\nDynamicUser=yes\nProtectSystem=strict\nProtectSystem=full\n"
    assert _unit_settings(text) == {"DynamicUser": "yes", "ProtectSystem": "full"}
