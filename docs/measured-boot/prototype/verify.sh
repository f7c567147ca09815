#!/bin/bash
# Host-side verification of a quote: signature by the enrolled AK, fresh nonce, PCR 11 == prediction.
# usage: verify.sh ENROL_DIR FETCHED_DIR NONCE_HEX EXPECTED_PCR11_HEX [EXPECTED_PCR12_HEX]
set -uo pipefail
E=$1; F=$2; N=$3; X11=${4,,}; X12=${5:-0000000000000000000000000000000000000000000000000000000000000000}
out=$(tpm2_checkquote -u $E/ak.pub.pem -m $F/quote.msg -s $F/quote.sig -f $F/quote.pcrs -g sha256 -q $N 2>&1); rc=$?
echo "$out"
echo "tpm2_checkquote rc=$rc (signature by enrolled AK, nonce, PCR digest)"
[ $rc -eq 0 ] || { echo "VERDICT: FAIL (quote does not verify)"; exit 1; }
got11=$(echo "$out" | awk '/sha256:/{f=1} f && $1=="11:"{print tolower($2); exit}' | sed 's/^0x//')
got12=$(echo "$out" | awk '/sha256:/{f=1} f && $1=="12:"{print tolower($2); exit}' | sed 's/^0x//')
echo "PCR11 quoted=$got11 expected=$X11"
echo "PCR12 quoted=$got12 expected=$X12"
if [ "$got11" = "$X11" ] && [ "$got12" = "${X12,,}" ]; then echo "VERDICT: PASS"; else echo "VERDICT: FAIL (PCR mismatch)"; exit 2; fi
