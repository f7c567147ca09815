"""Bad input costs nothing: whatever bytes a policy file holds, `policy.load` answers with a
PolicyError (one line, file and line) or a policy, quickly and in bounded memory.

The property tests mutate the shipped policies (their data, their text, their bytes) and feed
the result to the loader; Hypothesis runs derandomized with no example database, so every run
tries the same examples. The bomb tests run in a child process under a 500 MB address-space
limit and report its time and peak memory.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

from amnesiac import policy
from amnesiac.errors import PolicyError
from amnesiac.roles import Role, catalog

POLICIES = Path(__file__).resolve().parent.parent / "policies"
SHIPPED = {p.name: p.read_text(encoding="utf-8") for p in sorted(POLICIES.glob("*.yml"))}
DATA = {name: yaml.safe_load(text) for name, text in SHIPPED.items()}


class Dumper(getattr(yaml, "CSafeDumper", yaml.SafeDumper)):  # type: ignore[misc]
    """libyaml's dumper (8 times faster), writing a value met twice out again: the data tests
    are about values, and the loader's refusal of aliases has tests of its own."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


FUZZ = settings(
    derandomize=True,  # the same examples on every run: CI is reproducible
    database=None,
    deadline=timedelta(seconds=2),  # one load; a shipped policy loads in about 10 ms
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def place(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder like policies/: the shipped source texts, and a policy file the tests overwrite."""
    root = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(POLICIES / "sources", root / "sources")
    return root / "policy.yml"


@pytest.fixture(scope="module")
def roles() -> Mapping[str, Role]:
    return catalog()


def load_bytes(path: Path, data: bytes, roles: Mapping[str, Role]) -> None:
    """Only a policy or a PolicyError may come out; the message is one printable line."""
    path.write_bytes(data)
    try:
        policy.load(path, roles)
    except PolicyError as exc:
        message = str(exc)
        assert message.startswith(f"{path}"), message
        assert "\n" not in message and "\r" not in message, message
        message.encode("utf-8")  # no lone surrogate: the CLI can print it
        assert exc.line is None or exc.line >= 1
        assert exc.exit_code == 2


# --- mutating the data ------------------------------------------------------------------------

STRINGS = st.sampled_from(
    [
        "",
        " ",
        "\n",
        "1",
        "true",
        "technical",
        "organisational",
        "counter",  # the permitted-record vocabulary: kinds, retention, fields, endpoints
        "while connected",
        "90 days",
        "0 days",
        "client_ip",
        "session-collector",
        "no-disk-storage",
        "no-such-claim",
        "storage.no_swap",
        "storage.no_such_check",
        "telepathy.reads_minds",
        "ram_root",
        "ram_root_tmpfs_size_mib",
        "en",
        "000_d798bf4cf2f8203c.txt",
        "../ovpn.yml",
        "/dev/zero",
        "OVPN [/] policy [/red]",
        "\x1b[31mred",
        "\x00",
        "\u202eevil",
        "\ud800",
    ]
)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-2, max_value=2)
    | st.floats()
    | STRINGS
    | st.text(max_size=12)
)
VALUES = st.recursive(
    SCALARS,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(STRINGS | st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=6,
)


def _slots(node: Any, found: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    """Every (container, key or index) in the tree, parents before children."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        found.append((node, key))
        _slots(value, found)
    return found


def _mutate(data: Any, draw: st.DrawFn) -> Any:
    slots = _slots(data, [])
    # Counted from the end: Hypothesis leans towards small draws, and the first slots are the
    # header's few keys, while the claims are most of a policy.
    container, key = slots[-1 - draw(st.integers(min_value=0, max_value=len(slots) - 1))]
    operation = draw(st.sampled_from(["delete", "replace", "duplicate", "rename", "retype", "wrap"]))
    value = json.loads(json.dumps(container[key]))  # a copy: the dumper would write an alias
    if operation == "delete":
        del container[key]
    elif operation == "replace":
        container[key] = draw(VALUES)
    elif operation == "duplicate":
        if isinstance(container, list):
            container.insert(key, value)
        else:
            container[f"{key}2"] = value
    elif operation == "rename" and isinstance(container, dict):
        container[draw(STRINGS | st.text(max_size=6))] = container.pop(key)
    elif operation == "retype":
        container[key] = [value] if not isinstance(value, list) else {"x": value} if value else str(value)
    else:  # wrap the whole thing once more
        container[key] = {key: value} if isinstance(container, dict) else [value, value]
    return data


@st.composite
def mutated_data(draw: st.DrawFn) -> bytes:
    name = draw(st.sampled_from(sorted(DATA)))
    data = json.loads(json.dumps(DATA[name]))  # a deep copy
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        if not _slots(data, []):
            break
        data = _mutate(data, draw)
    try:
        return yaml.dump(data, Dumper=Dumper, allow_unicode=False, sort_keys=False).encode("ascii")
    except UnicodeEncodeError:
        # A lone surrogate as a mapping key: the emitter cannot write it, so no file holds it.
        reject()


@settings(FUZZ, max_examples=100)
@given(mutated_data())
def test_mutated_data_gives_only_policy_errors(place: Path, roles: Mapping[str, Role], data: bytes) -> None:
    load_bytes(place, data, roles)


# --- mutating the text ------------------------------------------------------------------------

SNIPPETS = st.sampled_from(
    [
        "&a ",
        "*a",
        "&a [*a, *a, *a]",
        "!!python/object/apply:os.system ['true'] ",
        "!!python/name:os.system ",
        "!!bool ",
        "!!int ",
        "!!float ",
        "!!binary ",
        "!!timestamp ",
        "!!set ",
        "!!omap ",
        "!custom ",
        "<<: ",
        "? ",
        "- ",
        ": ",
        "[",
        "]",
        "{",
        "}",
        "'",
        '"',
        '"\\ud800"',
        '"\\e[2J"',
        "\t",
        "%YAML 1.1\n---\n",
        "%TAG ! tag:yaml.org,2002:python/\n",
        "---\n",
        "...\n",
        "|\n",
        ">-\n",
        "#",
        "\x00",
        "\x85",
        "\u2028",
        "\ufeff",
        "[" * 50,
        "2018-02-10",
        "9" * 5000,
        "~",
        "yes",
        "1.0",
    ]
)


@st.composite
def mutated_text(draw: st.DrawFn) -> bytes:
    lines = SHIPPED[draw(st.sampled_from(sorted(SHIPPED)))].splitlines(keepends=True)
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        i = draw(st.integers(min_value=0, max_value=len(lines) - 1))
        operation = draw(
            st.sampled_from(["truncate", "delete", "duplicate", "swap", "indent", "insert", "replace"])
        )
        line = lines[i]
        if operation == "truncate":
            lines = [*lines[:i], line[: draw(st.integers(min_value=0, max_value=len(line)))]]
        elif operation == "delete":
            del lines[i]
        elif operation == "duplicate":
            lines.insert(i, line)
        elif operation == "swap":
            j = draw(st.integers(min_value=0, max_value=len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif operation == "indent":
            lines[i] = draw(st.sampled_from(["", " ", "  ", "    ", "\t"])) + line.lstrip(" ")
        else:
            at = draw(st.integers(min_value=0, max_value=len(line)))
            new = draw(SNIPPETS | st.text(max_size=8))
            end = at if operation == "insert" else min(len(line), at + draw(st.integers(0, 12)))
            lines[i] = line[:at] + new + line[end:]
        if not lines:
            break
    return "".join(lines).encode("utf-8", errors="surrogatepass")


@settings(FUZZ, max_examples=120)
@given(mutated_text())
def test_mutated_text_gives_only_policy_errors(place: Path, roles: Mapping[str, Role], data: bytes) -> None:
    load_bytes(place, data, roles)


# --- raw bytes --------------------------------------------------------------------------------


@st.composite
def mutated_bytes(draw: st.DrawFn) -> bytes:
    data = bytearray(SHIPPED[draw(st.sampled_from(sorted(SHIPPED)))].encode("utf-8"))
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        at = draw(st.integers(min_value=0, max_value=len(data)))
        data[at : at + draw(st.integers(0, 3))] = draw(st.binary(min_size=1, max_size=4))
    return bytes(data)


@settings(FUZZ, max_examples=60)
@given(st.binary(max_size=512) | mutated_bytes())
def test_raw_bytes_give_only_policy_errors(place: Path, roles: Mapping[str, Role], data: bytes) -> None:
    load_bytes(place, data, roles)


def test_shipped_policies_survive_the_round_trip(place: Path, roles: Mapping[str, Role]) -> None:
    """The harness itself: an unmutated shipped policy, dumped as the mutators dump it, loads."""
    for name, data in DATA.items():
        dumped = yaml.dump(data, Dumper=Dumper, allow_unicode=False, sort_keys=False)
        (place.parent / name).write_text(dumped)
        assert policy.load(place.parent / name, roles).id == data["policy"]["id"]


# --- bombs: refused at once, in bounded memory ------------------------------------------------

BILLION_LAUGHS = """\
schema: 2
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
claims: [*i]
"""

CHILD = textwrap.dedent(
    """
    import json, resource, sys, time
    limit = 500 * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    from amnesiac import policy
    from amnesiac.errors import PolicyError
    results = []
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for path in sys.argv[1:]:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        try:
            policy.load(path, {})
            outcome, message = "loaded", ""
        except PolicyError as exc:
            outcome, message = "PolicyError", str(exc)
        except BaseException as exc:
            outcome, message = type(exc).__name__, str(exc)[:200]
        seconds = time.perf_counter() - start
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        results.append({"path": path, "outcome": outcome, "message": message,
                        "seconds": seconds, "maxrss_growth_kib": grown})
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"baseline_kib": baseline, "peak_kib": peak, "results": results}))
    """
)


def test_bombs_are_refused_quickly_in_bounded_memory(tmp_path: Path) -> None:
    import os

    (tmp_path / "sources").mkdir()
    bomb = tmp_path / "billion-laughs.yml"
    bomb.write_text(BILLION_LAUGHS)
    recursive = tmp_path / "recursive.yml"
    recursive.write_text("schema: 1\nclaims: &c [*c]\n")
    huge = tmp_path / "huge.yml"
    with huge.open("wb") as f:
        f.truncate(100 * 1024 * 1024)  # 100 MB (sparse): refused from its size
    fifo = tmp_path / "policy.fifo"
    os.mkfifo(fifo)  # no writer: opening it for reading would block
    many = tmp_path / "many-values.yml"  # just under the size limit, as many values as fit
    many.write_bytes(b"- 0\n" * (policy.MAX_BYTES // 4))
    deep = tmp_path / "deep.yml"
    deep.write_bytes(b"[" * policy.MAX_BYTES)
    long = tmp_path / "long-scalar.yml"
    long.write_bytes(b"schema: 1\npolicy: " + b"x" * (policy.MAX_BYTES - 32) + b"\n")
    paths = [bomb, recursive, huge, fifo, many, deep, long, Path("/dev/zero"), Path("/dev/urandom")]

    child = subprocess.run(
        [sys.executable, "-c", CHILD, *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert child.returncode == 0, child.stderr
    measured = json.loads(child.stdout)
    results = measured["results"]
    report = "\n".join(
        f"{r['path']}: {r['outcome']} in {r['seconds']:.3f} s, +{r['maxrss_growth_kib']} KiB: {r['message']}"
        for r in results
    )
    report += f"\npeak RSS {measured['peak_kib']} KiB, {measured['baseline_kib']} KiB after imports"

    print(report)
    for r in results:
        assert r["outcome"] == "PolicyError", report
        assert r["seconds"] < 10, report  # about 0.5 s for the 4 MiB files on an idle machine
        assert r["maxrss_growth_kib"] < 150 * 1024, report
    assert measured["peak_kib"] - measured["baseline_kib"] < 150 * 1024, report
    by_name = {Path(r["path"]).name: r["message"] for r in results}
    assert "anchor &a is not allowed" in by_name["billion-laughs.yml"]
    assert "too large" in by_name["huge.yml"]
    assert "a FIFO" in by_name["policy.fifo"]
    assert "a character device" in by_name["zero"]
    assert f"more than {policy.MAX_NODES} values" in by_name["many-values.yml"]
