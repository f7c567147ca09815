"""Record the layer a role left in the image root (amnesiac.image.layers), on the controller.

Runs in Ansible's controller process with the play waiting, so the tree is exactly as the role
left it (handlers come at the end of the play, and none runs in a build); it never touches the
connection.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ansible.plugins.action import ActionBase


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _requires_connection = False

    def run(self, tmp: Any = None, task_vars: dict[str, Any] | None = None) -> dict[str, Any]:
        result = super().run(tmp, task_vars)
        from amnesiac.image import layers  # the interpreter running Ansible is amnesiac's

        args = self._task.args
        count = layers.record(Path(args["staging"]), Path(args["root"]), str(args["role"]))
        result.update(changed=False, paths=count, msg=f"{count} paths in the layer of {args['role']}")
        return result
