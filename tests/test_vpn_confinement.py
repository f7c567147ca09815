"""OpenVPN's configuration read as OpenVPN reads it: a server is its file and what it includes."""

from __future__ import annotations

from amnesiac.checks.vpn_confinement import server_configs

SERVER = "/etc/openvpn/server/server.conf"
SNIPPET = "/etc/openvpn/server/session-records.conf"


def test_an_included_snippet_is_part_of_its_server_not_a_server() -> None:
    texts = {
        SERVER: "dev tun\nverb 0\nlog /dev/null\nconfig /etc/openvpn/server/session-records.conf\n",
        SNIPPET: "# hook\nscript-security 2\nclient-disconnect /usr/local/lib/amnesiac/hook\n",
    }
    servers = server_configs(texts)
    assert list(servers) == [SERVER]  # CloudVPN's snippet was taken for a server without a log
    names = [name for name, _ in servers[SERVER]]
    assert "client-disconnect" in names and ("log", ["/dev/null"]) in servers[SERVER]


def test_what_a_snippet_adds_counts_against_its_server() -> None:
    texts = {
        SERVER: "log /dev/null\nconfig session-records.conf\n",
        SNIPPET: "status /run/openvpn/status.log\nlog /var/log/openvpn.log\n",
    }
    directives = server_configs(texts)[SERVER]
    assert ("status", ["/run/openvpn/status.log"]) in directives
    assert [args for name, args in directives if name == "log"] == [["/dev/null"], ["/var/log/openvpn.log"]]


def test_two_servers_and_an_include_loop() -> None:
    texts = {
        SERVER: "log /dev/null\nconfig other.conf\n",
        "/etc/openvpn/server/other.conf": "config server.conf\n",  # a loop: read once each
        "/etc/openvpn/server/udp.conf": "; comment\nlog /dev/null\n",
    }
    servers = server_configs(texts)
    # Every file is included by another in a loop: none is a server of its own but udp.conf.
    assert list(servers) == ["/etc/openvpn/server/udp.conf"]
