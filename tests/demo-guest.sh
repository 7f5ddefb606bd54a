#!/usr/bin/env bash
# The end-to-end demo, run INSIDE the guest kernel by tests/demo.sh: format a sealed volume on a
# sparse file, write through it, show the host sees only ciphertext, show another identity is refused,
# flip one byte of the data on the "host" side and show the read fails instead of returning other data.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=tests/vm/integrity-layout.sh
. tests/vm/integrity-layout.sh

SEALCSI=${SEALCSI:-target/debug/sealcsi}
work=$(mktemp -d "${SCRATCH:-/tmp}/demo.XXXXXX")
export SEALCSI_TEE=sim SEALCSI_STATE_DIR=$work/state SEALCSI_SIM_IDENTITY=demo-image-v1
img=$work/volume.img
mnt=$work/mnt
name=sealcsi-demo
say() { printf '\n\033[1m## %s\033[0m\n' "$*"; }
cleanup() { umount "$mnt" 2>/dev/null || true; "$SEALCSI" volume close "$name" >/dev/null 2>&1 || true; }
trap cleanup EXIT

say "This node's sealing identity"
"$SEALCSI" volume identity

say "Format a 1 GiB sealed volume (sparse file, dm-integrity AEAD + dm-crypt, ext4, fast init)"
truncate -s 1G "$img"
"$SEALCSI" volume format "$img"

say "Inspect the header: public fields only, no key needed"
"$SEALCSI" volume inspect "$img"

say "Open, mount, write"
"$SEALCSI" volume open "$img" --name "$name"
mkdir -p "$mnt"
mount /dev/mapper/$name "$mnt"
secret="the quarterly numbers are sealed"
for i in $(seq 1 64); do echo "$secret $i"; done > "$mnt/report.txt"
sync
block=$(debugfs -R "bmap /report.txt 0" /dev/mapper/$name 2>/dev/null)
echo "wrote $mnt/report.txt (ext4 block $block): $(head -n1 "$mnt/report.txt")"
umount "$mnt"
"$SEALCSI" volume close "$name"

say "What the host sees: the plaintext is nowhere in the backing file"
if grep -q "$secret" "$img"; then echo "FAIL: plaintext found on the backing file"; exit 1; fi
echo "grep for the plaintext in $img: not found (only ciphertext and tags)"

say "Another identity (a different image) cannot open it"
set +e
SEALCSI_SIM_IDENTITY=demo-image-v2 "$SEALCSI" volume open "$img" --name "$name"
rc=$?
set -e
echo "exit code $rc (3 = wrong identity)"
[ "$rc" = 3 ] || { echo "FAIL: expected exit code 3"; exit 1; }

say "The host flips one bit of the file's data block"
read -r data_off _ < <(integrity_locate "$img" $((1 << 20)) "$block")
flip_bit "$img" "$data_off"
echo "flipped bit 0 of byte $data_off of $img (ext4 block $block)"

say "Reading it back fails: tampering is detected, never returned as data"
"$SEALCSI" volume open "$img" --name "$name"
mount -o ro /dev/mapper/$name "$mnt"
echo 3 > /proc/sys/vm/drop_caches
set +e
head -n1 "$mnt/report.txt"
rc=$?
set -e
echo "read exit code $rc"
[ "$rc" != 0 ] || { echo "FAIL: the tampered block was read"; exit 1; }
dmesg | grep "INTEGRITY AEAD ERROR" | tail -n 2
umount "$mnt"
"$SEALCSI" volume close "$name"
say "Demo complete"
