"""A role's template as Ansible renders it: the role's defaults and internal variables, then
overrides (shell scripts and unit files, which tests check without an Ansible run)."""

from __future__ import annotations

from pathlib import Path

import jinja2
import yaml

ROLES = Path(__file__).resolve().parent.parent / "roles"


def render(role: str, template: str, **overrides: object) -> str:
    directory = ROLES / role
    variables: dict[str, object] = {"ansible_managed": "test"}
    for name in ("defaults/main.yml", "vars/main.yml"):
        if (directory / name).is_file():
            variables.update(yaml.safe_load((directory / name).read_text()) or {})
    # Not HTML: Ansible renders role templates without autoescaping too.
    environment = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)  # noqa: S701
    text = (directory / "templates" / template).read_text()
    return environment.from_string(text).render({**variables, **overrides})
