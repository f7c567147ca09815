#!/bin/bash
# Build a UKI from an amnesiac image dir with trixie's ukify (in the tools chroot) and predict PCR 11.
# usage: uki.sh IMAGE_DIR OUT_NAME [EXTRA_CMDLINE_SUFFIX]
# writes /work/mb-proto/out/OUT_NAME.efi and OUT_NAME.pcr11.txt
set -euo pipefail
P=/work/mb-proto; T=$P/tools-root; IMG=$1; NAME=$2; SUFFIX=${3:-}
mkdir -p $P/out $T/w/$NAME
cp $IMG/vmlinuz $IMG/initrd.img $T/w/$NAME/
# the image's own os-release (from the rootfs cache the image was built from)
tar xOf ${ROOTFS_TAR:-/work/main/build/cache/rootfs-trixie-0573ad0e9c805d33.tar} ./usr/lib/os-release > $T/w/$NAME/os-release
# the command line of boot.ipxe minus initrd=initrd.img, no trailing newline
printf '%s%s' "$(sed -n 's/^kernel vmlinuz initrd=initrd.img //p' $IMG/boot.ipxe)" "$SUFFIX" > $T/w/$NAME/cmdline
KREL=$(python3 -c "import json,sys;print(json.load(open('$IMG/manifest.json'))['image']['kernel_release'])")
chroot $T ukify build --linux /w/$NAME/vmlinuz --initrd /w/$NAME/initrd.img --cmdline @/w/$NAME/cmdline \
  --os-release @/w/$NAME/os-release --uname "$KREL" --pcr-banks sha256 --output /w/$NAME/uki.efi ${UKIFY_EXTRA:-} >&2
# predict PCR 11 from the sections actually in the UKI
chroot $T sh -c "cd /w/$NAME && for s in osrel cmdline uname sbat linux initrd; do objcopy -O binary --only-section=.\$s uki.efi sec.\$s; done"
M="/usr/lib/systemd/systemd-measure calculate --linux=/w/$NAME/sec.linux --initrd=/w/$NAME/sec.initrd --cmdline=/w/$NAME/sec.cmdline --osrel=/w/$NAME/sec.osrel --uname=/w/$NAME/sec.uname --sbat=/w/$NAME/sec.sbat --bank=sha256"
{
  for ph in "" sysinit sysinit:ready enter-initrd:leave-initrd:sysinit:ready; do
    echo "phase=${ph:-<none>} $(chroot $T $M --phase="$ph" 2>/dev/null | grep '^11:' || chroot $T $M | grep '^11:')"
  done
} | tee $P/out/$NAME.pcr11.txt
mv $T/w/$NAME/uki.efi $P/out/$NAME.efi
rm -rf $T/w/$NAME
ls -l $P/out/$NAME.efi
