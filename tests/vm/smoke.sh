#!/bin/bash
# Guest-side self test of the UML test bed. Run it with
#   tests/vm/run-in-guest.sh -- tests/vm/smoke.sh
# Proves: tools in PATH, dm targets, loop with direct I/O on /scratch, integrity (AEAD, J,
# 4 KiB) + crypt (authenc(hmac(sha256),xts(aes))-random) round trip, tamper detection,
# logon keys from the kernel keyring in a crypt table, mkfs.ext4/mkfs.xfs on a loop device.
set -euo pipefail

fail() { echo "smoke: FAIL: $*" >&2; exit 1; }
step() { echo "smoke: $*"; }

[ "${SEALCSI_IN_GUEST:-}" = 1 ] || fail "not in the guest; run: tests/vm/run-in-guest.sh -- tests/vm/smoke.sh"
[ -d "${SCRATCH:-}" ] || fail "SCRATCH is not set to a directory"
[ "${DM_DISABLE_UDEV:-}" = 1 ] || fail "DM_DISABLE_UDEV is not 1"

INT=smoke-int
CRYPT=smoke-crypt
WORK=$(mktemp -d /tmp/smoke.XXXXXX)
IMG=$SCRATCH/smoke-dm.img
PLAIN_IMG=$SCRATCH/smoke-plain.img
LOOP=
PLAIN_LOOP=

cleanup() {
    set +e
    umount "$WORK/mnt" 2>/dev/null
    dmsetup remove "$CRYPT" 2>/dev/null
    dmsetup remove "$INT" 2>/dev/null
    [ -n "$LOOP" ] && losetup -d "$LOOP" 2>/dev/null
    [ -n "$PLAIN_LOOP" ] && losetup -d "$PLAIN_LOOP" 2>/dev/null
    rm -rf "$WORK" "$IMG" "$PLAIN_IMG"
}
trap cleanup EXIT

# --- tools ------------------------------------------------------------------------------
for t in mkfs.ext4 mke2fs e2fsck dumpe2fs debugfs resize2fs mkfs.xfs xfs_repair xfs_growfs xfs_db \
    blkid dmsetup cryptsetup sha256sum dd mount umount losetup modprobe perl; do
    command -v "$t" >/dev/null || fail "$t not in PATH ($PATH)"
done
dd --version 2>/dev/null | grep -q 'coreutils' || fail "dd in PATH is not GNU coreutils dd: $(command -v dd)"
[ "$(cat /proc/sys/kernel/modprobe)" = /usr/sbin/modprobe ] || fail "/proc/sys/kernel/modprobe is not /usr/sbin/modprobe"
step "tools OK ($(uname -r))"

# --- targets ----------------------------------------------------------------------------
targets=$(dmsetup targets)
grep -q '^crypt ' <<<"$targets" || fail "dmsetup targets has no crypt: $targets"
grep -q '^integrity ' <<<"$targets" || fail "dmsetup targets has no integrity: $targets"
step "targets: $(awk '{print $1}' <<<"$targets" | tr '\n' ' ')"

# node for a mapping: /dev/mapper/NAME (made by dmsetup mknodes or from sysfs if absent)
node() {
    local name=$1 dev
    if [ ! -b "/dev/mapper/$name" ]; then
        dmsetup mknodes "$name" >/dev/null 2>&1 || true
    fi
    if [ ! -b "/dev/mapper/$name" ]; then
        dev=$(dmsetup info -c --noheadings -o major,minor "$name" | tr -d ' ') || fail "dmsetup info $name"
        mkdir -p /dev/mapper
        mknod "/dev/mapper/$name" b "${dev%%:*}" "${dev##*:}" || fail "mknod /dev/mapper/$name"
    fi
    echo "/dev/mapper/$name"
}

# --- loop device with direct I/O on /scratch ---------------------------------------------
truncate -s 1G "$IMG"
LOOP=$(losetup --direct-io=on --show -f "$IMG") || fail "losetup --direct-io=on on $IMG"
dio=$(cat "/sys/block/${LOOP#/dev/}/loop/dio")
[ "$dio" = 1 ] || fail "direct I/O not active on $LOOP (dio=$dio)"
step "loop $LOOP on $IMG with dio=1"

# --- integrity (AEAD, tag 48, journal, 4 KiB blocks) ----------------------------------------
# Load a one-block table first: the zeroed device gets formatted; status gives the usable size.
dmsetup create "$INT" --table "0 8 integrity $LOOP 0 48 J 2 fix_padding block_size:4096" \
    || fail "loading the integrity table (format)"
read -r _ _ _ mismatches provided _ < <(dmsetup status "$INT")
[ "$mismatches" = 0 ] || fail "integrity mismatches after format: $mismatches"
[[ $provided =~ ^[1-9][0-9]*$ ]] || fail "bad provided_data_sectors '$provided'"
dmsetup remove "$INT"
P=$provided
step "integrity formatted: provided_data_sectors=$P ($((P * 512 / 1048576)) MiB of 1024)"

KEY=$(head -c 96 /dev/urandom | od -An -v -tx1 | tr -d ' \n')
[ ${#KEY} = 192 ] || fail "key generation"
int_table="0 $P integrity $LOOP 0 48 J 2 fix_padding block_size:4096"
crypt_table() { # key-spec
    echo "0 $P crypt capi:authenc(hmac(sha256),xts(aes))-random $1 0 /dev/mapper/$INT 0 4 integrity:48:aead sector_size:4096 no_read_workqueue no_write_workqueue"
}
open_dm() { # key-spec
    dmsetup create "$INT" --table "$int_table" || fail "loading the integrity table"
    node "$INT" >/dev/null
    dmsetup create "$CRYPT" --table "$(crypt_table "$1")" || fail "loading the crypt table"
    node "$CRYPT" >/dev/null
}
close_dm() {
    dmsetup remove "$CRYPT" || fail "dmsetup remove $CRYPT"
    dmsetup remove "$INT" || fail "dmsetup remove $INT"
}
open_dm "$KEY"
DEV=/dev/mapper/$CRYPT
tbl=$(dmsetup table "$CRYPT")
for o in ' 4 ' ' integrity:48:aead' ' sector_size:4096' ' no_read_workqueue' ' no_write_workqueue'; do
    [[ $tbl == *"$o"* ]] || fail "crypt table lacks '$o': ${tbl//$KEY/<key>}"
done
step "integrity+crypt mapped: $(dmsetup ls | tr '\n' ' ')"

# --- write 4 MiB, read back --------------------------------------------------------------
head -c $((4 << 20)) /dev/urandom >"$WORK/data"
want=$(sha256sum <"$WORK/data" | cut -d' ' -f1)
dd if="$WORK/data" of="$DEV" bs=1M count=4 oflag=direct conv=fsync status=none || fail "write through $DEV"
got=$(dd if="$DEV" bs=1M count=4 iflag=direct status=none | sha256sum | cut -d' ' -f1)
[ "$got" = "$want" ] || fail "read-back sha256 differs: $got != $want"
step "4 MiB written and read back with O_DIRECT, sha256 OK"

# --- tamper: flip a byte of logical block 5 in the backing file -------------------------
close_dm # suspend writes the journal back to the data area
sb=$(dd if="$IMG" bs=4096 count=1 iflag=direct status=none | od -An -v -tu1 -N 32)
read -r -d "" -a b <<<"$sb" || true
magic=$(printf '%02x' "${b[@]:0:8}")
[ "$magic" = 696e746567727400 ] || fail "no dm-integrity superblock (magic $magic)"
u32() { echo $(( b[$1] | b[$1+1] << 8 | b[$1+2] << 16 | b[$1+3] << 24 )); }
log2_interleave=${b[9]}
tag_size=$(( b[10] | b[11] << 8 ))
journal_sections=$(u32 12)
log2_spb=${b[28]}
[ "$tag_size" = 48 ] || fail "superblock: tag_size=$tag_size"
[ "$log2_spb" = 3 ] || fail "superblock: tag_size=$tag_size log2_sectors_per_block=$log2_spb"
# dm-integrity layout (drivers/md/dm-integrity.c, calculate_device_limits/get_data_sector):
# journal entry = roundup(8 + 8 * sectors_per_block + tag_size, 8); 504 usable bytes per journal sector
spb=$((1 << log2_spb))
entry=$(( (8 + 8 * spb + tag_size + 7) / 8 * 8 ))
section_sectors=$(( (504 / entry) * 8 * spb + 8 ))
initial=$(( 8 + section_sectors * journal_sections ))
# shellcheck disable=SC2017 # (integer round-up to 4 KiB on purpose)
metadata_run=$(( ( (tag_size << (log2_interleave - log2_spb)) + 4095) / 4096 * 8 ))
data0=$(( initial + metadata_run )) # sector of logical sector 0 (area 0, offset 0)
blk=$(( (data0 + 5 * spb) * 512 / 4096 ))
[ $(( (data0 * 512) % 4096 )) = 0 ] || fail "data area not 4 KiB aligned (sector $data0)"
step "layout: journal_sections=$journal_sections initial=$initial metadata_run=$metadata_run data starts at sector $data0"
echo 3 >/proc/sys/vm/drop_caches
dd if="$IMG" of="$WORK/blk" bs=4096 skip="$blk" count=1 iflag=direct status=none
cmp -s "$WORK/blk" <(head -c 4096 /dev/zero) && fail "backing block $blk (logical block 5) is all zeros: layout computed wrongly"
off=100
old=$(od -An -tu1 -j $off -N 1 "$WORK/blk" | tr -d ' ')
printf '%b' "\\$(printf %03o $(( old ^ 0x01 )))" | dd of="$WORK/blk" bs=1 seek=$off conv=notrunc status=none
dd if="$WORK/blk" of="$IMG" bs=4096 seek="$blk" count=1 oflag=direct conv=notrunc,fsync status=none \
    || fail "writing the flipped block"
echo 3 >/proc/sys/vm/drop_caches
step "flipped bit 0 of byte $off of backing block $blk (logical block 5)"

open_dm "$KEY"
dd if="$DEV" of=/dev/null bs=4096 skip=4 count=1 iflag=direct status=none || fail "reading intact block 4 failed"
if dd if="$DEV" of="$WORK/bad" bs=4096 skip=5 count=1 iflag=direct status=none 2>"$WORK/dd.err"; then
    fail "reading the tampered block 5 SUCCEEDED"
fi
step "read of tampered block fails as it must: $(tr '\n' ' ' <"$WORK/dd.err")"
dd if="$DEV" of=/dev/null bs=4096 skip=6 count=1000 iflag=direct status=none || fail "reading blocks 6..1005 failed"
dmesg | grep -q 'INTEGRITY AEAD ERROR' || fail "no 'INTEGRITY AEAD ERROR' in the kernel log"
step "kernel log: $(dmesg | grep 'INTEGRITY AEAD ERROR' | tail -n1)"
close_dm

# --- logon key from the kernel keyring ---------------------------------------------------
[ -e /proc/keys ] || fail "/proc/keys does not exist"
# add_key(2) is syscall 248 on x86_64; KEY_SPEC_USER_KEYRING = -4.
keyid=$(perl -e 'my ($type, $desc, $k) = ("logon", "sealcsi:smoke", pack("H*", $ARGV[0]));
    my $id = syscall(248, $type, $desc, $k, length($k), -4);
    die "add_key: $!\n" if $id < 0; print $id' "$KEY") || fail "add_key(logon) failed"
grep -q 'logon.*sealcsi:smoke' /proc/keys || fail "logon key not in /proc/keys"
open_dm ":96:logon:sealcsi:smoke"
dmsetup table "$CRYPT" | grep -q ' :96:logon:sealcsi:smoke ' || fail "crypt table does not show the logon key spec"
got=$(dd if="$DEV" bs=4096 count=4 iflag=direct status=none | sha256sum | cut -d' ' -f1)
want=$(head -c 16384 "$WORK/data" | sha256sum | cut -d' ' -f1)
[ "$got" = "$want" ] || fail "data read with the logon-key table differs"
close_dm
step "logon key $keyid (:96:logon:sealcsi:smoke) works in a crypt table"
# a missing key must be refused
if dmsetup create "$INT" --table "$int_table" && node "$INT" >/dev/null &&
    dmsetup create "$CRYPT" --table "$(crypt_table ":96:logon:sealcsi:absent")" 2>/dev/null; then
    fail "a crypt table naming a missing logon key was accepted"
fi
dmsetup remove "$CRYPT" 2>/dev/null || true
dmsetup remove "$INT"
perl -e 'syscall(250, 3, $ARGV[0] + 0) == 0 or die "revoke: $!\n"' "$keyid" || fail "keyctl revoke"  # KEYCTL_REVOKE
step "missing logon key refused"
losetup -d "$LOOP"
LOOP=

# --- mkfs on a plain loop device ------------------------------------------------------------
truncate -s 512M "$PLAIN_IMG"
PLAIN_LOOP=$(losetup --direct-io=on --show -f "$PLAIN_IMG")
mkdir -p "$WORK/mnt"
mkfs.ext4 -q -F -E nodiscard "$PLAIN_LOOP" || fail "mkfs.ext4 on $PLAIN_LOOP"
[ "$(blkid -o value -s TYPE "$PLAIN_LOOP")" = ext4 ] || fail "blkid does not see ext4"
mount "$PLAIN_LOOP" "$WORK/mnt" || fail "mount ext4"
echo hello >"$WORK/mnt/f" || fail "write to ext4"
umount "$WORK/mnt" || fail "umount ext4"
e2fsck -fn "$PLAIN_LOOP" >/dev/null 2>&1 || fail "e2fsck -fn"
step "ext4 OK"
mkfs.xfs -q -f "$PLAIN_LOOP" || fail "mkfs.xfs on $PLAIN_LOOP"
[ "$(blkid -o value -s TYPE "$PLAIN_LOOP")" = xfs ] || fail "blkid does not see xfs"
mount "$PLAIN_LOOP" "$WORK/mnt" || fail "mount xfs"
echo hello >"$WORK/mnt/f" || fail "write to xfs"
umount "$WORK/mnt" || fail "umount xfs"
xfs_repair -n "$PLAIN_LOOP" >/dev/null 2>&1 || fail "xfs_repair -n"
step "xfs OK"

step "PASS"
