#!/bin/bash
# Reproduce the measured-boot + attestation prototype end to end (one QEMU at a time, TCG, loopback only).
# Needs: apt-get install -y swtpm swtpm-tools tpm2-tools sbsigntool mmdebstrap qemu-system-x86 ovmf busybox-static
set -euo pipefail
P=/work/mb-proto; cd $P; IMG=${IMG:-/work/main/build/ovpn}
# 1. trixie tools chroot (ukify, systemd-measure, stub, tpm2-tools for the overlay)
[ -x tools-root/usr/bin/ukify ] || mmdebstrap --variant=apt --include=systemd-ukify,systemd-boot-efi,systemd,tpm2-tools,binutils trixie tools-root http://deb.debian.org/debian
# 2. production UKI + PCR 11 prediction
scripts/uki.sh $IMG ovpn
# 3. test overlay (SSH key + tpm2-tools in a private lib dir) and the test UKI that embeds it
[ -f keys/id ] || { mkdir -p keys; ssh-keygen -q -t ed25519 -N '' -f keys/id; }
rm -rf ovl-tpm; mkdir -p ovl-tpm/lib ovl-tpm/bin
for l in $(chroot tools-root sh -c "ldd /usr/bin/tpm2" | awk '/=>/{print $3}' | grep -v -E 'libc.so.6|ld-linux'); do cp -L tools-root$l ovl-tpm/lib/; done
cp -L tools-root/usr/lib/x86_64-linux-gnu/libtss2-tcti-device.so.0 ovl-tpm/lib/; cp tools-root/usr/bin/tpm2 ovl-tpm/lib/tpm2
printf '#!/bin/sh\nLD_LIBRARY_PATH=/usr/local/lib/mbtpm exec /usr/local/lib/mbtpm/tpm2 "$@"\n' > ovl-tpm/bin/tpm2; chmod 755 ovl-tpm/bin/tpm2
/work/main/.venv/bin/python scripts/overlay.py out/overlay-tpm.cpio keys/id.pub ovl-tpm/lib usr/local/lib/mbtpm ovl-tpm/bin usr/local/bin
scripts/test-uki.sh $IMG out/overlay-tpm.cpio ovpn-test
scripts/test-uki.sh $IMG out/overlay-tpm.cpio ovpn-test-space " "     # negative: one byte more in .cmdline
# 4. enrolment: fresh TPM, AK public derived on the host over TCP, before first boot
rm -rf run/tpmA run/enrolA; scripts/enrol.sh run/tpmA run/enrolA
exp() { awk '/phase=<none>/{print $2}' out/$1.pcr11.txt | sed 's/11:sha256=//'; }
# 5. boot (OVMF + swtpm, QEMU -kernel), re-derive AK in the guest, quote with a fresh nonce, verify
python3 scripts/boot.py --mode direct --uki out/ovpn-test.efi --tpm-state run/tpmA --run run/att-pos \
  --ssh-key keys/id --guest-script scripts/guest-attest.sh --fetch /run/att
scripts/verify.sh run/enrolA run/att-pos/fetched $(cat run/att-pos/nonce.hex) $(exp ovpn-test)          # PASS
python3 scripts/boot.py --mode direct --uki out/ovpn-test-space.efi --tpm-state run/tpmA --run run/att-neg \
  --ssh-key keys/id --guest-script scripts/guest-attest.sh --fetch /run/att
scripts/verify.sh run/enrolA run/att-neg/fetched $(cat run/att-neg/nonce.hex) $(exp ovpn-test) || true  # FAIL (PCR mismatch)
# 6. Secure Boot with a provider key (sbsign + virt-fw-vars), loader command line ignored
mkdir -p sb; [ -f sb/db.key ] || openssl req -new -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=amnesiac proto provider SB key/" -keyout sb/db.key -out sb/db.crt
sbsign --key sb/db.key --cert sb/db.crt --output out/ovpn-test.signed.efi out/ovpn-test.efi
[ -x venv/bin/virt-fw-vars ] || { python3 -m venv venv; venv/bin/pip -q install virt-firmware; }
G=$(cat /proc/sys/kernel/random/uuid)
venv/bin/virt-fw-vars -i /usr/share/OVMF/OVMF_VARS_4M.fd -o sb/vars-sb.fd --set-pk $G sb/db.crt --add-kek $G sb/db.crt --add-db $G sb/db.crt --secure-boot
python3 scripts/boot.py --mode direct --uki out/ovpn-test.signed.efi --code /usr/share/OVMF/OVMF_CODE_4M.secboot.fd --vars sb/vars-sb.fd \
  --append "console=ttyS0,115200n8 amnesiac.proto=loader-cmdline" --tpm-state run/tpmA --run run/sb \
  --ssh-key keys/id --guest-script scripts/guest-attest.sh --fetch /run/att
scripts/verify.sh run/enrolA run/sb/fetched $(cat run/sb/nonce.hex) $(exp ovpn-test)
