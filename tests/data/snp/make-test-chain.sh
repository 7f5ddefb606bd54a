#!/usr/bin/env bash
# TEST-ONLY DATA. Makes a certificate chain shaped like AMD's SEV-SNP chain, signed by keys made here
# (nothing of AMD's): an ARK and an ASK (RSA-4096, RSA-PSS with SHA-384 and a 48-byte salt, the ARK
# self-signed) and a VCEK (EC P-384, signed by the ASK) carrying AMD's VCEK extensions (docs/keys.md,
# "SNP expectation"): the TCB it is issued for and the chip's hwID. Plus the keys the host tests use to
# build refusals: a second root with its own ASK ("other-ark", "other-ask") and a VCEK signed by that
# other ASK ("rogue-vcek"). The VCEK's private key is committed because the tests sign reports with it.
# Run once by hand (openssl 3); the outputs are committed. Never use any of these outside tests.
set -euo pipefail
cd "$(dirname "$0")"
pss=(-sigopt rsa_padding_mode:pss -sigopt rsa_pss_saltlen:48 -sigopt rsa_mgf1_md:sha384 -sha384)
days=36500
# The TCB the test VCEK is issued for (bootloader 3, tee 0, snp 8, microcode 115) and its hwID (the
# report's CHIP_ID): must match tests/common/snp.rs (the report builder of the host tests).
hwid=$(printf '5c%.0s' $(seq 64))
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

root() { # name cn
  openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:4096 -out "$tmp/$1.key" 2>/dev/null
  openssl req -new -x509 -key "$tmp/$1.key" -subj "/OU=Engineering/O=TEST ONLY/CN=$2" -days $days \
    "${pss[@]}" -addext basicConstraints=critical,CA:true -addext keyUsage=critical,keyCertSign,cRLSign \
    -out "$1.pem"
}
intermediate() { # name cn issuer
  openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:4096 -out "$tmp/$1.key" 2>/dev/null
  openssl req -new -key "$tmp/$1.key" -subj "/OU=Engineering/O=TEST ONLY/CN=$2" -out "$tmp/$1.csr"
  printf 'basicConstraints=critical,CA:true\nkeyUsage=critical,keyCertSign,cRLSign\n' >"$tmp/$1.ext"
  openssl x509 -req -in "$tmp/$1.csr" -CA "$3.pem" -CAkey "$tmp/$3.key" -set_serial 0x$RANDOM \
    -days $days "${pss[@]}" -extfile "$tmp/$1.ext" -out "$1.pem"
}
vcek() { # name issuer
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-384 -out "$1.key.pem"
  openssl req -new -key "$1.key.pem" -subj "/OU=Engineering/O=TEST ONLY/CN=VCEK" -out "$tmp/$1.csr"
  cat >"$tmp/$1.ext" <<EXT
1.3.6.1.4.1.3704.1.1=ASN1:IA5STRING:Milan
1.3.6.1.4.1.3704.1.3.1=ASN1:INTEGER:3
1.3.6.1.4.1.3704.1.3.2=ASN1:INTEGER:0
1.3.6.1.4.1.3704.1.3.3=ASN1:INTEGER:8
1.3.6.1.4.1.3704.1.3.8=ASN1:INTEGER:115
1.3.6.1.4.1.3704.1.4=ASN1:FORMAT:HEX,OCTETSTRING:$hwid
EXT
  openssl x509 -req -in "$tmp/$1.csr" -CA "$2.pem" -CAkey "$tmp/$2.key" -set_serial 0x$RANDOM \
    -days $days "${pss[@]}" -extfile "$tmp/$1.ext" -out "$1.pem"
}
root ark ARK-Milan
intermediate ask SEV-Milan ark
vcek vcek ask
root other-ark ARK-Milan
intermediate other-ask SEV-Milan other-ark
vcek rogue-vcek other-ask
rm -f rogue-vcek.key.pem
openssl x509 -in vcek.pem -outform DER -out vcek.der
