"""What a check declares about itself: the claims it verifies, why, and where it can run."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from functools import cache
from typing import Any, TypeVar

from amnesiac.checks import MODULES


class Surface(StrEnum):
    """What a target lets a check see; each kind of target has one (targets.TargetKind), and
    each sees a different part of the truth."""

    ROOTFS = "rootfs"  # an unpacked image root: files only, nothing runs
    CONTAINER = "container"  # a systemd container (molecule): services run, the kernel is the host's
    BOOTED = "booted"  # the image booted in QEMU, or a live server over SSH: everything


ALL_TARGETS = frozenset(Surface)
RUNNING = frozenset({Surface.CONTAINER, Surface.BOOTED})
KERNEL = frozenset({Surface.BOOTED})

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class CheckMeta:
    id: str  # <module>.<function>
    claims: tuple[str, ...]
    rationale: str
    targets: frozenset[Surface]
    # Why the check cannot run on the other kinds of target (shown as "not applicable").
    not_applicable: str
    # Run on every target whatever the policy names: the integrity of the target itself.
    integrity: bool = False
    # It watches permitted records leave for the provider's endpoint and nothing else leave or
    # stay: the only kind of check that can verify a claim with `permits` (report.claim_status).
    observes_records: bool = False
    # It resets the target: it runs after every other check of the run (checks.plugin).
    resets: bool = False

    def reason_not_applicable(self, kind: Surface) -> str | None:
        if kind in self.targets:
            return None
        kinds = ", ".join(sorted(t.value for t in self.targets))
        return f"runs on {kinds} targets, not on a {kind.value}: {self.not_applicable}"


ATTRIBUTE = "__amnesiac_check__"


def check(
    *,
    claims: Iterable[str],
    rationale: str,
    targets: Iterable[Surface] = ALL_TARGETS,
    not_applicable: str = "",
    integrity: bool = False,
    observes_records: bool = False,
    resets: bool = False,
) -> Callable[[F], F]:
    """Mark a function as a claim check. Its id is `<module>.<function name>`."""

    def mark(func: F) -> F:
        module = func.__module__.rsplit(".", 1)[-1]
        meta = CheckMeta(
            id=f"{module}.{func.__name__}",
            claims=tuple(claims),
            rationale=" ".join(rationale.split()),
            targets=frozenset(targets),
            not_applicable=" ".join(not_applicable.split()),
            integrity=integrity,
            observes_records=observes_records,
            resets=resets,
        )
        if not meta.claims:
            raise ValueError(f"check {meta.id} names no claim")
        if meta.targets != ALL_TARGETS and not meta.not_applicable:
            raise ValueError(f"check {meta.id} must say why it cannot run on every kind of target")
        setattr(func, ATTRIBUTE, meta)
        return func

    return mark


def meta_of(obj: object) -> CheckMeta | None:
    meta = getattr(obj, ATTRIBUTE, None)
    return meta if isinstance(meta, CheckMeta) else None


def integrity_checks() -> tuple[str, ...]:
    """The checks verify runs on every target (`@check(integrity=True)`), in catalogue order."""
    return tuple(i for i, meta in catalogue().items() if meta.integrity)


@cache
def catalogue() -> Mapping[str, CheckMeta]:
    """Every check the suite ships, by id (imports the check modules)."""
    found: dict[str, CheckMeta] = {}
    for name in MODULES:
        module = importlib.import_module(f"amnesiac.checks.{name}")
        for obj in vars(module).values():
            if (meta := meta_of(obj)) is not None:
                found[meta.id] = meta
    return found
