"""AppArmor profiles for the programs the image has, and no others.

Debian's apparmor package ships about a hundred profiles, most for programs a VPN server never
runs (browsers, Xorg, sbuild and its helpers, transmission). The root is new at every boot, so
apparmor.service compiles every one of them into an empty cache before any network service
starts: 7.6 s of the boot under emulation (benchmarks/README.md). A profile attaches to the
paths in its header; where none of those paths exists in the image it can confine nothing, and
its file goes. Kept whenever in doubt: a profile with no attachment (others reach it by name), one
whose attachment names a variable defined nowhere, or a file the parser here does not understand.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterable
from pathlib import Path

PROFILES = "etc/apparmor.d"
# A top-level profile's header: `profile NAME ATTACHMENT flags=(...) {`, or `ATTACHMENT {`.
NAMED = re.compile(r"^profile\s+(\"[^\"]*\"|\S+)(?:\s+(/\S*|\"/[^\"]*\"|@\{\S*))?", re.MULTILINE)
BARE = re.compile(r"^(/\S*)\s+(?:flags=\([^)]*\)\s*)?\{", re.MULTILINE)
# A variable's definition, `@{name} = a b` or `@{name} += c`, in a profile or in tunables/.
VARIABLE = re.compile(r"^\s*@\{(\w+)\}\s*\+?=\s*(.*?)\s*$", re.MULTILINE)
USE = re.compile(r"@\{(\w+)\}")


def prune(root: Path) -> list[str]:
    """Remove the profiles that can attach to nothing in `root`; the names of the files removed."""
    directory = root / PROFILES
    if not directory.is_dir():
        return []
    tunables = _variables(
        p.read_text(errors="replace") for p in sorted((directory / "tunables").rglob("*")) if p.is_file()
    )
    removed = []
    for path in sorted(p for p in directory.iterdir() if p.is_file() and not p.is_symlink()):
        text = path.read_text(errors="replace")
        attachments = _attachments(text, {**tunables, **_variables([text])})
        if attachments and not any(_exists(root, a) for a in attachments):
            path.unlink()
            removed.append(path.name)
    return removed


def _attachments(text: str, variables: dict[str, list[str]]) -> list[str] | None:
    """The paths the file's top-level profiles attach to; None where one of them attaches by
    name only or through a variable never defined, or the file holds no profile header (keep)."""
    found: list[str] = []
    for name, given in NAMED.findall(text):
        attachment = given or (name if name.startswith("/") else "")  # `profile /usr/bin/foo {`
        resolved = _substitute(attachment.strip('"'), variables)
        if not resolved:
            return None
        found.append(resolved)
    found += BARE.findall(text)
    return found or None


def _variables(texts: Iterable[str]) -> dict[str, list[str]]:
    """Each variable's values, `+=` adding to them."""
    values: dict[str, list[str]] = {}
    for text in texts:
        for name, value in VARIABLE.findall(text):
            values.setdefault(name, []).extend(v.strip('"') for v in value.split())
    return values


def _substitute(attachment: str, variables: dict[str, list[str]]) -> str | None:
    """The attachment with its variables written as alternations; None if one is unknown."""
    for _ in range(5):  # values may name variables in turn
        if "@{" not in attachment:
            return attachment or None
        if any(name not in variables for name in USE.findall(attachment)):
            return None
        attachment = USE.sub(lambda m: "{" + ",".join(variables[m.group(1)]) + "}", attachment)
    return None


def _exists(root: Path, attachment: str) -> bool:
    """Whether an AppArmor glob ({a,b} alternation, *, **, [...], ?) matches a path in `root`."""
    base = glob.escape(os.fspath(root))
    # glob.glob, not Path.glob: a last component that is a symlink counts as there (lexists), as
    # the image's absolute links (/etc/alternatives) would otherwise be followed into the build
    # host. A directory reached through such a link is looked up on the host (in the images none
    # is on a program's path).
    return any(glob.glob(base + p, recursive=True) for p in _alternatives(attachment))  # noqa: PTH207


def _alternatives(pattern: str) -> list[str]:
    """`/{,usr/}bin/x` -> ['/bin/x', '/usr/bin/x']: AppArmor's braces, nested, expanded."""
    start = pattern.find("{")
    if start < 0:
        return [pattern]
    depth, parts, last = 0, [], start + 1
    for index in range(start, len(pattern)):
        char = pattern[index]
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                parts.append(pattern[last:index])
                head, tail = pattern[:start], pattern[index + 1 :]
                return [alt for part in parts for alt in _alternatives(head + part + tail)]
        elif char == "," and depth == 1:
            parts.append(pattern[last:index])
            last = index + 1
    return [pattern]  # unbalanced: taken literally, as nothing will match it
