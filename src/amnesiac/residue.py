"""Where a session's canaries remain, as the running server itself shows them: its journal and
kernel log, connection tracking, socket tables, WireGuard's peers, every process's environment and
command line, and the files of every tmpfs written since the session began.

The whole-RAM search (amnesiac.canary) finds every copy but can name only the page that holds it;
these views name the table or the process. The canaries never reach the server in clear: the
command carries them as `\\xNN` escapes that the server's shell expands inside its own processes,
which exit when the command ends (their memory then cleared by the image's freed-memory control),
and what comes back names the view and the matched text in hex. On an image without that control
the decoded copies stay in freed pages charged to the verifier's login (ssh.service): such an
image fails anyway, and the negative control (a string never sent) is never given to the views.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping

# A view: its name, and the command printing what it shows (stderr dropped: a view the server
# does not have, such as WireGuard's on an OpenVPN-only image, shows nothing).
VIEWS = (
    ("journal", "journalctl -q --no-pager -o export"),
    ("kernel log", "dmesg"),
    ("connection tracking", "cat /proc/net/nf_conntrack"),
    ("socket table", "ss -tuanpeH"),
    ("WireGuard peers", "wg show all dump"),
)
# Processes and files name themselves: `grep -H` prints the path, the script below the process.
SCRIPT = r"""
set -u
patterns() { printf '%b\n' PATTERNS; }
# One line per match: the view, a tab, the matched text in hex.
hex() { printf '%s' "$1" | od -An -tx1 | tr -d ' \n'; echo; }
show() { grep -aoF -f <(patterns) | while IFS= read -r m; do printf '%s\t' "$1"; hex "$m"; done; }
VIEWS_RUN
# Environments and command lines: the process by its name and its systemd unit.
grep -aoHF -f <(patterns) /proc/[0-9]*/environ /proc/[0-9]*/cmdline 2> /dev/null | while IFS= read -r m; do
    file=${m%%:*} pid=${file#/proc/} pid=${pid%%/*}
    unit=$(grep -o '[^/]*\.service' "/proc/$pid/cgroup" 2> /dev/null | tail -1)
    printf 'process %s (%s, %s)\t' "$(cat "/proc/$pid/comm" 2> /dev/null)" "${file##*/}" "${unit:-no service}"
    hex "${m#*:}"
done
# Files of every tmpfs changed since the session began: nothing older can hold its canaries.
mapfile -d '' files < <(findmnt -rn -t tmpfs,ramfs -o TARGET | while read -r mnt; do
    find "$mnt" -xdev -type f -newerct "@SINCE" -print0 2> /dev/null; done)
if ((${#files[@]})); then
    grep -aoHF -f <(patterns) -- "${files[@]}" 2> /dev/null | while IFS= read -r m; do
        printf 'file %s\t' "${m%%:*}"; hex "${m#*:}"
    done
fi
true
"""


def command(needles: Mapping[str, bytes], since: int) -> str:
    """The shell command that shows where the text `needles` are, among files changed since the
    server's clock read `since` (seconds since the epoch)."""
    escaped = [escaped_bytes(value) for value in needles.values() if _is_text(value)]
    views = "\n".join(f"{run} 2> /dev/null | show {shlex.quote(name)}" for name, run in VIEWS)
    script = (
        SCRIPT.replace("PATTERNS", " ".join(shlex.quote(e) for e in escaped))
        .replace("VIEWS_RUN", views)
        .replace("SINCE", str(int(since)))
    )
    return f"bash -c {shlex.quote(script)}"


def escaped_bytes(value: bytes) -> str:
    """`value` as `\\xNN` escapes, which the server's printf expands: the bytes never travel in clear."""
    return "".join(f"\\x{b:02x}" for b in value)


def parse(output: str, needles: Mapping[str, bytes]) -> dict[str, dict[str, int]]:
    """Per canary, the views showing it and how often. A match counts for every canary it holds
    (an address:port is also the address)."""
    found: dict[str, dict[str, int]] = {}
    for line in output.splitlines():
        view, _, hexed = line.rpartition("\t")
        try:
            text = bytes.fromhex(hexed)
        except ValueError:
            continue
        if not view or not text:
            continue
        for name, needle in needles.items():
            if _is_text(needle) and needle in text:
                views = found.setdefault(name, {})
                views[view] = views.get(view, 0) + 1
    return found


def _is_text(value: bytes) -> bool:
    """Only printable canaries can show in text views (not a sockaddr or a conntrack tuple)."""
    return value.isascii() and value.decode().isprintable() and b"\n" not in value
