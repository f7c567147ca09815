"""From a policy to a build plan: suite, packages, roles and their variables."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from amnesiac import paths
from amnesiac.policy import RECORDS_VAR, Policy
from amnesiac.roles import Role, catalog

# mmdebstrap variant: Essential plus apt, which the roles' package tasks (and molecule) use.
VARIANT = "apt"


def read_list(path: Path) -> list[str]:
    """A plain list file: one item per line, '#' comments and blank lines ignored."""
    items = []
    for line in path.read_text().splitlines():
        item = line.split("#", 1)[0].strip()
        if item:
            items.append(item)
    return items


@dataclass(frozen=True)
class BuildPlan:
    policy: Policy
    suite: str
    mirror: str
    roles: tuple[str, ...]
    role_vars: Mapping[str, Any]  # what the policy sets; role defaults apply to the rest
    packages: tuple[str, ...]
    source_date_epoch: int | None = None
    extra_vars: Mapping[str, Any] = field(default_factory=dict)

    def effective_vars(self, roles: Mapping[str, Role] | None = None) -> dict[str, dict[str, Any]]:
        """Each applied role with every variable's value: its default unless the policy sets it."""
        cat = roles or catalog()
        merged = {**self.role_vars, **self.extra_vars}
        return {
            name: {var: merged.get(var, spec.default) for var, spec in sorted(cat[name].variables.items())}
            for name in self.roles
        }

    def variables(self) -> dict[str, Any]:
        """Every role variable of the catalogue with the value this build gives it (set or
        default), and the extra variables: what a role may read."""
        values = {var: spec.default for role in catalog().values() for var, spec in role.variables.items()}
        return {**values, **self.role_vars, **self.extra_vars}

    def var(self, name: str) -> Any:
        values = self.variables()
        if name not in values:
            raise KeyError(f"no role declares {name}")
        return values[name]

    def rootfs_key(self, mmdebstrap_version: str) -> str:
        """The rootfs cache key: everything that changes what mmdebstrap produces."""
        inputs = {
            "format": 2,  # 2: busybox set aside and purged (rootfs.SET_ASIDE_BUSYBOX)
            "suite": self.suite,
            # The epoch the root was made with (None: its archive's Release date): it is in the
            # root, /etc/shadow's last-change days for one.
            "source_date_epoch": self.source_date_epoch,
            "mirror": self.mirror,
            "variant": VARIANT,
            "packages": sorted(self.packages),
            "mmdebstrap": mmdebstrap_version,
        }
        return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def make_plan(
    policy: Policy,
    *,
    source_date_epoch: int | None = None,
    extra_vars: Mapping[str, Any] | None = None,
    suite: str | None = None,
) -> BuildPlan:
    cat = catalog()
    roles = tuple(policy.roles())
    role_vars = {**policy.role_vars(), **permitted_record_vars(policy)}
    merged = {**role_vars, **(extra_vars or {})}
    packages = set(read_list(paths.image_dir() / "packages.txt"))
    for name in roles:
        # `<role>_packages` as the policy or --var sets it: mmdebstrap installs them all up
        # front, so the roles' package tasks need no network inside the chroot.
        packages.update(merged.get(f"{name}_packages", cat[name].packages))
    return BuildPlan(
        policy=policy,
        suite=suite or policy.image.suite,
        mirror=policy.image.mirror,
        roles=roles,
        role_vars=role_vars,
        packages=tuple(sorted(packages)),
        source_date_epoch=source_date_epoch,
        extra_vars=dict(extra_vars or {}),
    )


# The role that sends permitted records; the build fills its RECORDS_VAR from `permits`.
RECORDS_ROLE = "provider_agent"


def permitted_record_vars(policy: Policy) -> dict[str, Any]:
    """What the records role sends, derived from the policy's `permits` and never written by hand:
    a field the policy does not permit cannot reach the agent through a typo in a control."""
    if RECORDS_ROLE not in policy.roles():
        return {}
    records = [
        {"record": r.record, "events": [e.value for e in r.events], "fields": [f.value for f in r.fields]}
        for r in policy.permitted_records()
    ]
    return {RECORDS_VAR: records}
