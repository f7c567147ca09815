#!/bin/bash
# A test UKI: the image's initrd.img followed by the test overlay (the loader cannot add it, see REPORT.md)
# usage: test-uki.sh IMAGE_DIR OVERLAY_CPIO NAME [CMDLINE_SUFFIX]
set -euo pipefail
P=/work/mb-proto; IMG=$1; OVL=$2; NAME=$3; SUF=${4:-}
D=$P/out/$NAME.img; rm -rf $D; mkdir -p $D
cp $IMG/vmlinuz $IMG/boot.ipxe $IMG/manifest.json $D/
cat $IMG/initrd.img $OVL > $D/initrd.img   # both pieces are 512-byte padded cpio archives
$P/scripts/uki.sh $D $NAME "$SUF"
