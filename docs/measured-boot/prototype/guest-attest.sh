# runs as root in the guest (stdin of `ssh ... sh -s`); @NONCE@ is replaced by the host
exec 2>&1
D=/run/att; mkdir -p $D
echo "== cmdline"; cat /proc/cmdline
echo "== overlay: $(ls -la /root/.ssh/authorized_keys)"
echo "== PCRs (sysfs, sha256)"
for i in 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15; do echo "$i $(cat /sys/class/tpm/tpm0/pcr-sha256/$i)"; done | tee $D/pcrs-sysfs.txt
cp /sys/kernel/security/tpm0/binary_bios_measurements $D/eventlog.bin 2>/dev/null || echo "no event log"
echo "== stub EFI variables"; ls /sys/firmware/efi/efivars/ | grep -E 'Stub|Loader' 
echo "== pcrphase units"
for u in systemd-pcrphase-initrd systemd-pcrphase-sysinit systemd-pcrphase systemd-pcrmachine systemd-pcrfs-root; do echo "$u: $(systemctl is-active $u.service) $(systemctl show -p ConditionResult --value $u.service)"; done
journalctl -b -u systemd-pcrphase.service -u systemd-pcrphase-sysinit.service -u systemd-pcrmachine.service --no-pager 2>/dev/null | tail -8
ls /usr/lib/x86_64-linux-gnu/ | grep -c tss2
if [ -x /usr/local/bin/tpm2 ] || command -v tpm2 >/dev/null; then
  export TPM2TOOLS_TCTI=device:/dev/tpmrm0
  echo "== AK re-derived (primary, endorsement hierarchy, fixed template)"
  t=$(date +%s.%N)
  tpm2 createprimary -Q -C e -g sha256 -G ecc256:ecdsa-sha256:null \
    -a 'fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|sign|noda' -c $D/ak.ctx
  tpm2 readpublic -Q -c $D/ak.ctx -o $D/ak.guest.pem -f pem
  tpm2 quote -c $D/ak.ctx -l sha256:0,1,2,3,4,5,6,7,9,11,12,13,14,15 -q @NONCE@ \
    -m $D/quote.msg -s $D/quote.sig -o $D/quote.pcrs -g sha256 > $D/quote.yaml
  echo "createprimary+quote took $(echo "$(date +%s.%N) - $t" | busybox bc 2>/dev/null || echo ?) s"
  cat $D/ak.guest.pem
fi
ls -l $D
