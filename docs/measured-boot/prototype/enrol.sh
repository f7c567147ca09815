#!/bin/bash
# "Enrolment": fresh swtpm state, derive the AK public on the host over TCP (before first boot).
# usage: enrol.sh STATE_DIR OUT_DIR
set -euo pipefail
S=$1; O=$2; mkdir -p $S $O
PORT=${PORT:-2321}
swtpm_setup --tpm2 --tpmstate $S --createek --pcr-banks sha256 --overwrite > $O/swtpm_setup.log 2>&1 || { cat $O/swtpm_setup.log; exit 1; }
swtpm socket --tpm2 --tpmstate dir=$S --server type=tcp,port=$PORT,bindaddr=127.0.0.1 \
  --ctrl type=tcp,port=$((PORT+1)),bindaddr=127.0.0.1 --flags not-need-init,startup-clear &
SW=$!; trap 'kill $SW 2>/dev/null; wait $SW 2>/dev/null || true' EXIT
sleep 1
export TPM2TOOLS_TCTI="swtpm:host=127.0.0.1,port=$PORT"
tpm2_createprimary -Q -C e -g sha256 -G ecc256:ecdsa-sha256:null \
  -a 'fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|sign|noda' -c $O/ak.ctx
tpm2_readpublic -Q -c $O/ak.ctx -o $O/ak.pub.pem -f pem
tpm2_readpublic -c $O/ak.ctx -n $O/ak.name > $O/ak.readpublic.txt
tpm2_shutdown -c 2>/dev/null || true
cat $O/ak.pub.pem
