"""Building the image: plan → rootfs → configure → minimise → pack → manifest.

`build.build` runs the stages (the CLI's `amnesiac build`); `manifest.Manifest` is the one
reader of what a build made. Not named `build` itself: tools take a folder of that name for
output. Importing this package imports none of its modules, so reading a manifest does not
load Ansible.
"""
