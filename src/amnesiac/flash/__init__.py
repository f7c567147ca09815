"""`amnesiac flash`: publish images to PXE boot servers atomically, with rollback; boot media.

- `model` — the PXE root's layout, its state (the root boot.ipxe), the publish record, errors
- `candidate` — what a build holds and whether it may be published (artifacts, gate)
- `signing` — OpenSSH signatures over manifest.json (`ssh-keygen -Y sign/verify`)
- `store` — a PXE root on a local disk or over SSH, operation by operation
- `publish` — publish, list, roll back, prune, under the root's lock
- `usb` — an EFI-bootable image for a USB stick or a BMC's virtual media
- `command` — the command line's actions and output
"""
