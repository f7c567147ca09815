"""What `amnesiac verify` checks: one backend per kind of target, behind one small protocol.

    qemu:BUILD_DIR            targets/qemu.py     boot the build in QEMU, verify over SSH
    ssh://user@host[:port]    targets/ssh.py      a live server
    chroot:ROOTFS_DIR         targets/chroot.py   an unpacked image root: build-time checks only
    podman://CONTAINER        targets/podman.py   a running container (molecule instances)
    --inventory FLEET         targets/inventory.py  every host of an Ansible inventory: ssh targets

A backend is a `Target` (base.py): it parses its form of `--target`, reaches the target for the
duration of a run (a `Connection`: how testinfra gets there, and the keys and devices the
verifier put there), reads its identity, and releases it. `TargetKind` is the table of
backends, as testinfra's BACKENDS: adding a kind is one module and one member there.
"""

from __future__ import annotations

from amnesiac.targets.base import Connection, ReachOptions, Target, TargetKind, forms, parse

__all__ = ["Connection", "ReachOptions", "Target", "TargetKind", "forms", "parse"]
