"""no_logs' receive-buffer control as the role renders it: valid bash, silent, never in a
container. Whether it frees what it should is measured on a booted image, where it has network
cards to rebind (amnesia.session_forgotten's packet headers, boot tier)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests import role_templates


def _render(name: str) -> str:
    return role_templates.render("no_logs", name)


def test_the_flush_script_is_valid_bash_and_rebinds_only_through_sysfs(tmp_path: Path) -> None:
    script = tmp_path / "flush-receive-buffers"
    script.write_text(_render("flush-receive-buffers.sh.j2"))
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert '> "$driver/unbind"' in text and '> "$driver/bind"' in text
    assert "sleep 2" in text  # no_logs_receive_buffers_interval


def test_the_unit_says_nothing_and_skips_containers() -> None:
    unit = _render("amnesiac-receive-buffers.service.j2")
    for line in ("ConditionVirtualization=!container", "StandardOutput=null", "StandardError=null",
                 "CapabilityBoundingSet=CAP_NET_ADMIN"):  # fmt: skip
        assert line in unit.splitlines(), line


# Each look: OpenVPN's main PID (empty: not running) and how many WireGuard endpoints there are.
SESSIONS = [
    ("100", 0),  # idle
    ("100", 1),  # a WireGuard client is up
    ("200", 1),  # OpenVPN's last session ended (a fresh process) while it still is
    ("200", 1),
    ("200", 0),  # the agent forgot the quiet peer's endpoint: nothing is up any more
    ("200", 0),
    ("", 0),  # OpenVPN exits after its next session...
    ("300", 0),  # ...and is fresh again
]


def test_the_cards_are_rebound_only_when_no_session_is_left_up(tmp_path: Path) -> None:
    """Run against a fake sysfs, systemctl and wg: a rebind in the middle of a WireGuard session
    dropped its packets (the IVPN image's canary session), so an ended OpenVPN session waits for
    the last WireGuard endpoint to go."""
    text = _render("flush-receive-buffers.sh.j2")
    assert text.count("/sys/class/net/*/device") == 1
    card = tmp_path / "devices/0000:00:03.0"
    driver = tmp_path / "drivers/virtio-pci"
    for directory in (card, driver, tmp_path / "net/eth0"):
        directory.mkdir(parents=True)
    (card / "driver").symlink_to(driver)
    (tmp_path / "net/eth0/device").symlink_to(card)
    script = tmp_path / "flush-receive-buffers"
    script.write_text(text.replace("/sys/class/net", str(tmp_path / "net")))
    bin_dir, step, rebound = tmp_path / "bin", tmp_path / "step", tmp_path / "rebound"
    bin_dir.mkdir()
    step.write_text("0")
    rebound.write_text("")
    scenario = "\n".join(f"{pid or '-'} {endpoints}" for pid, endpoints in SESSIONS)
    fakes = {
        # The look the script is at: the step'th line of the scenario.
        "look": f'sed -n "$(( $(cat {step}) + 1 ))p" <<< "{scenario}"',
        "systemctl": 'read -r pid _ < <(look); [[ $pid == - ]] && exit 0\n'
        'case $1 in list-units) echo "openvpn-server@udp.service loaded active running";; '
        "show) echo $pid;; esac",
        # As wg prints them: an interface without peers is its name alone.
        "wg": 'read -r _ n < <(look); ((n)) || printf "wg0\\t\\n"; '
        'for ((i = 0; i < n; i++)); do printf "wg0\\tkey%d=\\t198.18.0.9:5%d\\n" $i $i; done',
        # Between two looks: note whether the card was rebound, then go on to the next look.
        "sleep": f'n=$(cat {step}); [[ -s {driver}/bind ]] && echo $n >> {rebound}; rm -f {driver}/*bind\n'
        f'echo $((n + 1)) > {step}; (( n + 1 < {len(SESSIONS)} )) || kill $PPID',
    }  # fmt: skip
    for name, body in fakes.items():
        fake = bin_dir / name
        fake.write_text(f"#!/bin/bash\n{body}\n")
        fake.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    subprocess.run(["bash", str(script)], env=env, timeout=30, check=False)
    assert rebound.read_text().split() == ["4", "7"]
