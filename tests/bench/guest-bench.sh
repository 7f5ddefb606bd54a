#!/usr/bin/env bash
# The guest half of the benchmark set (issue 6). Runs INSIDE the user-mode Linux guest:
#   tests/vm/run-in-guest.sh --timeout 3600 -- bash tests/bench/guest-bench.sh [--tiny]
# (tests/bench/run.sh does that for you, after building target/release/sealcsi.)
#
# 1. provisioning: blank sparse file -> mounted ext4, for sealcsi fast init, sealcsi full init and the peer
#    configuration (cryptsetup LUKS2 --integrity hmac-sha256, which wipes, + mkfs.ext4 + mount);
# 2. data path: fio, O_DIRECT, seq 1 MiB and random 4 KiB read/write, through every stack, all stacks open
#    at once and visited round-robin (run r of every stack, then run r+1), so host noise hits all alike;
# 3. levers: variants of the AEAD stack (workqueue flags, journal vs direct, IV mode / tag size, sector
#    size, I/O depth) built the same way;
# 4. scale: N volumes staged (open + mount) at once with the real binary: time per stage, memory;
# 5. journal: the memory an open integrity device pins with the old default journal and the capped one.
# Raw records go to target/bench/guest.jsonl and target/bench/fio/; tests/bench/report.py turns them into
# the table and target/bench/results.json.
#
# Environment (the guest passes only SEALCSI_* through): SEALCSI_BIN (default target/release/sealcsi), SEALCSI_BENCH_WIPE_MAX_MIB (largest size at which the
# full-wipe stacks are really run; larger sizes are extrapolated from the two largest measured ones,
# default 4096: a 64 GiB wipe writes 64 GiB to the host disk and takes ~15 min here), SEALCSI_BENCH_RUNS,
# SEALCSI_BENCH_SEQ_MIB, SEALCSI_BENCH_RAND_MIB, SEALCSI_BENCH_SCALE_N, SEALCSI_BENCH_LEVERS (0/1),
# SEALCSI_BENCH_PARTS (default "prov data scale journal": which parts to run), SEALCSI_BENCH_OUT.
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD

TINY=0
for arg in "$@"; do
    case $arg in
        --tiny) TINY=1 ;;
        *) echo "usage: $0 [--tiny]" >&2; exit 2 ;;
    esac
done

if [ -z "${SEALCSI_IN_GUEST:-}" ]; then
    echo "guest-bench.sh runs inside the guest: tests/vm/run-in-guest.sh -- bash $0 $*" >&2
    exit 2
fi

BIN=${SEALCSI_BIN:-$REPO/target/release/sealcsi}
[ -x "$BIN" ] || { echo "no $BIN: cargo build --release first" >&2; exit 2; }
command -v fio >/dev/null || { echo "fio is not installed on the host (apt-get install fio)" >&2; exit 2; }

if [ "$TINY" = 1 ]; then
    PROV_SIZES_MIB=(256)
    WIPE_MAX_MIB=${SEALCSI_BENCH_WIPE_MAX_MIB:-256}
    RUNS=${SEALCSI_BENCH_RUNS:-1}
    SEQ_MIB=${SEALCSI_BENCH_SEQ_MIB:-16}
    RAND_MIB=${SEALCSI_BENCH_RAND_MIB:-2}
    SCALE_N=${SEALCSI_BENCH_SCALE_N:-3}
    LEVERS=${SEALCSI_BENCH_LEVERS:-0}
    # The peer's PBKDF (argon2id, ~2 s by design at luksFormat and at every open) is cut short in the tiny
    # configuration only: it is there to keep the script from rotting, not to measure.
    PBKDF=(--pbkdf pbkdf2 --pbkdf-force-iterations 1000)
else
    # 16 TiB less 1 MiB: the guest's scratch is ext4, whose largest file is 16 TiB less one block.
    PROV_SIZES_MIB=(1024 4096 65536 1048576 16777215)
    WIPE_MAX_MIB=${SEALCSI_BENCH_WIPE_MAX_MIB:-4096}
    RUNS=${SEALCSI_BENCH_RUNS:-5}
    SEQ_MIB=${SEALCSI_BENCH_SEQ_MIB:-128}
    RAND_MIB=${SEALCSI_BENCH_RAND_MIB:-32}
    SCALE_N=${SEALCSI_BENCH_SCALE_N:-100}
    LEVERS=${SEALCSI_BENCH_LEVERS:-1}
    PBKDF=()
fi

PARTS=" ${SEALCSI_BENCH_PARTS:-prov data scale journal} "
OUT=${SEALCSI_BENCH_OUT:-$REPO/target/bench}
RAW=$OUT/guest.jsonl
FIO_DIR=$OUT/fio
rm -rf "$FIO_DIR"
mkdir -p "$OUT" "$FIO_DIR"
: >"$RAW"
W=${SCRATCH:-/scratch}/bench
rm -rf "$W"
mkdir -p "$W/mnt"
STATE=$W/state
KEYFILE=$W/peer.key
head -c 64 /dev/urandom >"$KEYFILE"
export SEALCSI_TEE=sim SEALCSI_STATE_DIR=$STATE SEALCSI_SIM_IDENTITY=bench
MKFS=/usr/sbin/mkfs.ext4
LOSETUP=/usr/sbin/losetup
[ -x "$LOSETUP" ] || LOSETUP=/sbin/losetup

log() { echo "bench: $*" >&2; }
emit() { printf '%s\n' "$1" >>"$RAW"; }
# Closes whatever the benchmark left open (also on failure).
cleanup() {
    set +e
    for m in "$W"/mnt/*; do mountpoint -q "$m" 2>/dev/null && umount "$m"; done
    for n in $(dmsetup ls 2>/dev/null | awk '$1 ~ /^b-/ && $1 !~ /-integrity$|_dif$/ {print $1}'); do
        "$BIN" volume close "$n" >/dev/null 2>&1 || cryptsetup close "$n" 2>/dev/null || dmsetup remove "$n" 2>/dev/null
    done
    dmsetup ls 2>/dev/null | awk '$1 ~ /^b-/ {print $1}' | while read -r n; do dmsetup remove "$n" 2>/dev/null; done
    "$LOSETUP" -D 2>/dev/null
}
trap cleanup EXIT

# The dm table of a device with the key field cut (crypt lines: field 5).
table_redacted() {
    dmsetup table "$1" | awk '$3 == "crypt" { $5 = "<key>" } { print }'
}
json_str() { python3 -c 'import json,sys; print(json.dumps(sys.stdin.read().strip()))'; }

# Records the stack's whole dm table (top device and what it sits on) for the report.
record_tables() { # stack top-name [lower-name]
    local stack=$1 text=""
    shift
    for n in "$@"; do text+="$n: $(table_redacted "$n")"$'\n'; done
    emit "{\"kind\":\"table\",\"stack\":\"$stack\",\"table\":$(printf '%s' "$text" | json_str)}"
}

kernel=$(uname -r)
emit "{\"kind\":\"meta\",\"tiny\":$TINY,\"kernel\":\"$kernel $(uname -m)\",\"cryptsetup\":\"$(cryptsetup --version | head -1)\",\"fio\":\"$(fio --version)\",\"runs\":$RUNS,\"seq_mib\":$SEQ_MIB,\"rand_mib\":$RAND_MIB,\"wipe_max_mib\":$WIPE_MAX_MIB,\"scale_n\":$SCALE_N,\"date\":\"$(date -u +%Y-%m-%dT%H:%M:%SZ)\"}"
SECONDS=0
log "kernel $kernel, sealcsi $BIN, fio $(fio --version), tiny=$TINY"

# ---------------------------------------------------------------- 1. provisioning
# Each row: sparse file of S MiB -> mounted ext4 with a file written and synced. The clock covers loop
# attach, format/luksFormat (and its wipe), open, mkfs and mount.
usable() { echo ok >"$W/mnt/p/usable" && sync "$W/mnt/p/usable"; }
mem_available_kib() {
    sync
    echo 3 >/proc/sys/vm/drop_caches
    awk '/^MemAvailable:/ {print $2}' /proc/meminfo
}

prov_sealcsi() { # init size_mib
    local init=$1 size=$2 img=$W/prov.img t0 t1 t2 t3 report
    rm -f "$img"
    truncate -s "${size}M" "$img"
    mkdir -p "$W/mnt/p"
    t0=$EPOCHREALTIME
    report=$("$BIN" volume format "$img" --init "$init" --fs ext4 2>/dev/null)
    t1=$EPOCHREALTIME
    "$BIN" volume open "$img" --name b-prov >/dev/null 2>&1
    t2=$EPOCHREALTIME
    mount -t ext4 /dev/mapper/b-prov "$W/mnt/p"
    usable
    t3=$EPOCHREALTIME
    # The memory one staged volume pins: MemAvailable with the volume closed and open, caches dropped
    # (outside the clock).
    umount "$W/mnt/p"
    "$BIN" volume close b-prov >/dev/null 2>&1
    local avail_closed avail_open
    avail_closed=$(mem_available_kib)
    "$BIN" volume open "$img" --name b-prov >/dev/null 2>&1
    avail_open=$(mem_available_kib)
    mount -t ext4 /dev/mapper/b-prov "$W/mnt/p"
    # What the open pins: dm-integrity keeps its journal in memory (read from the live table).
    local journal
    journal=$(dmsetup table b-prov-integrity | sed -n 's/.*journal_sectors:\([0-9]*\).*/\1/p')
    local init_s mkfs_s
    init_s=$(sed -n 's/.*"init_seconds": \([0-9.e-]*\).*/\1/p' <<<"$report")
    mkfs_s=$(sed -n 's/.*"mkfs_seconds": \([0-9.e-]*\).*/\1/p' <<<"$report")
    emit "{\"kind\":\"prov\",\"stack\":\"sealcsi-$init\",\"size_mib\":$size,\"t\":[$t0,$t1,$t2,$t3],\"phases\":[\"format\",\"open\",\"mount\"],\"init_s\":${init_s:-null},\"mkfs_s\":${mkfs_s:-null},\"journal_sectors\":${journal:-null},\"open_mem_kib\":$((avail_closed - avail_open)),\"allocated_kib\":$(du -k "$img" | cut -f1)}"
    log "provision sealcsi-$init ${size} MiB: $(awk "BEGIN{print $t3-$t0}") s"
    umount "$W/mnt/p"
    "$BIN" volume close b-prov >/dev/null 2>&1
    rm -f "$img"
}

# The unencrypted floor (issue 14): loop device + mkfs.ext4 (its defaults) + mount + the same file.
prov_floor() { # size_mib
    local size=$1 img=$W/prov.img t0 t1 t2 t3 loop
    rm -f "$img"
    truncate -s "${size}M" "$img"
    mkdir -p "$W/mnt/p"
    t0=$EPOCHREALTIME
    loop=$("$LOSETUP" --direct-io=on -f --show "$img")
    t1=$EPOCHREALTIME
    "$MKFS" -q -F "$loop"
    t2=$EPOCHREALTIME
    mount -t ext4 "$loop" "$W/mnt/p"
    usable
    t3=$EPOCHREALTIME
    emit "{\"kind\":\"prov\",\"stack\":\"floor\",\"size_mib\":$size,\"t\":[$t0,$t1,$t2,$t3],\"phases\":[\"losetup\",\"mkfs\",\"mount\"],\"allocated_kib\":$(du -k "$img" | cut -f1)}"
    log "provision floor ${size} MiB: $(awk "BEGIN{print $t3-$t0}") s"
    umount "$W/mnt/p"
    "$LOSETUP" -d "$loop"
    rm -f "$img"
}

prov_peer() { # size_mib
    local size=$1 img=$W/prov.img t0 t1 t2 t3 t4 loop
    rm -f "$img"
    truncate -s "${size}M" "$img"
    mkdir -p "$W/mnt/p"
    t0=$EPOCHREALTIME
    loop=$("$LOSETUP" --direct-io=on -f --show "$img")
    cryptsetup luksFormat --type luks2 --integrity hmac-sha256 --cipher aes-xts-plain64 --key-size 512 \
        --sector-size 4096 --batch-mode "${PBKDF[@]}" --key-file "$KEYFILE" "$loop" >/dev/null 2>&1
    t1=$EPOCHREALTIME
    cryptsetup open --key-file "$KEYFILE" "$loop" b-prov
    t2=$EPOCHREALTIME
    "$MKFS" -q -F /dev/mapper/b-prov
    t3=$EPOCHREALTIME
    mount -t ext4 /dev/mapper/b-prov "$W/mnt/p"
    usable
    t4=$EPOCHREALTIME
    emit "{\"kind\":\"prov\",\"stack\":\"luks2-integrity\",\"size_mib\":$size,\"t\":[$t0,$t1,$t2,$t3,$t4],\"phases\":[\"luksFormat+wipe\",\"open\",\"mkfs\",\"mount\"],\"allocated_kib\":$(du -k "$img" | cut -f1)}"
    log "provision luks2-integrity ${size} MiB: $(awk "BEGIN{print $t4-$t0}") s"
    umount "$W/mnt/p"
    cryptsetup close b-prov
    "$LOSETUP" -d "$loop"
    rm -f "$img"
}

# What of luksFormat is not the wipe (PBKDF benchmark, header, integrity format): luksFormat with
# --integrity-no-wipe at the smallest size, so the report can split the peer's time.
prov_peer_nowipe() {
    local size=$1 img=$W/prov.img t0 t1 loop
    truncate -s "${size}M" "$img"
    loop=$("$LOSETUP" --direct-io=on -f --show "$img")
    t0=$EPOCHREALTIME
    cryptsetup luksFormat --type luks2 --integrity hmac-sha256 --cipher aes-xts-plain64 --key-size 512 \
        --sector-size 4096 --batch-mode "${PBKDF[@]}" --integrity-no-wipe --key-file "$KEYFILE" "$loop" >/dev/null 2>&1
    t1=$EPOCHREALTIME
    emit "{\"kind\":\"prov_nowipe\",\"stack\":\"luks2-integrity\",\"size_mib\":$size,\"t\":[$t0,$t1]}"
    "$LOSETUP" -d "$loop"
    rm -f "$img"
}

if [[ $PARTS == *" prov "* ]]; then
log "== provisioning: sizes ${PROV_SIZES_MIB[*]} MiB (full wipes up to $WIPE_MAX_MIB MiB)"
prov_peer_nowipe "${PROV_SIZES_MIB[0]}"
for size in "${PROV_SIZES_MIB[@]}"; do
    prov_floor "$size"
    prov_sealcsi fast "$size"
    if [ "$size" -le "$WIPE_MAX_MIB" ]; then
        prov_sealcsi full "$size"
        prov_peer "$size"
    fi
done
fi

# ---------------------------------------------------------------- 2. data path + 3. levers
DEV_MIB=$((SEQ_MIB * 5 / 4 + 64))
STACKS=()
declare -A DEV

new_loop() { # name -> loop device over a fresh sparse file of DEV_MIB
    local img=$W/$1.img
    rm -f "$img"
    truncate -s "${DEV_MIB}M" "$img"
    "$LOSETUP" --direct-io=on -f --show "$img"
}

add_stack() { STACKS+=("$1"); DEV[$1]=$2; }

setup_raw() {
    local loop
    loop=$(new_loop raw)
    add_stack raw "$loop"
    emit "{\"kind\":\"table\",\"stack\":\"raw\",\"table\":\"loop device, direct-io=on, over a file on the guest's scratch ext4\"}"
}

setup_sealcsi() { # stack-name format-args...
    local name=$1 img=$W/$1.img
    shift
    rm -f "$img"
    truncate -s "${DEV_MIB}M" "$img"
    "$BIN" volume format "$img" --fs none "$@" >/dev/null 2>&1
    "$BIN" volume open "$img" --name "b-$name" >/dev/null 2>&1
    add_stack "$name" "/dev/mapper/b-$name"
    if dmsetup info "b-$name-integrity" >/dev/null 2>&1; then
        record_tables "$name" "b-$name" "b-$name-integrity"
    else
        record_tables "$name" "b-$name"
    fi
}

setup_luks() { # stack-name integrity(yes|no) open-args...
    local name=$1 integ=$2 loop fmt=()
    shift 2
    loop=$(new_loop "$name")
    [ "$integ" = yes ] && fmt=(--integrity hmac-sha256)
    cryptsetup luksFormat --type luks2 "${fmt[@]}" --cipher aes-xts-plain64 --key-size 512 --sector-size 4096 \
        --batch-mode "${PBKDF[@]}" --key-file "$KEYFILE" "$loop" >/dev/null 2>&1
    cryptsetup open --key-file "$KEYFILE" "$@" "$loop" "b-$name"
    add_stack "$name" "/dev/mapper/b-$name"
    if [ "$integ" = yes ]; then record_tables "$name" "b-$name" "b-${name}_dif"; else record_tables "$name" "b-$name"; fi
}

# A hand-built AEAD stack with dmsetup, the tables of docs/format.md with one thing changed.
# wq says which dm-crypt workqueues are bypassed: inline (no_read_workqueue no_write_workqueue, sealcsi's
# flags until issue 14), queued (neither: the kernel's and cryptsetup's default), read-inline
# (no_read_workqueue only), write-inline (no_write_workqueue only). Extra dm-integrity options (journal
# tuning) follow; the device is formatted with them. No wipe: fio writes the measured region before it
# reads it.
setup_manual() { # stack-name journal(J|D) iv(random|plain64) tag block wq [integrity-option...]
    local name=$1 mode=$2 iv=$3 tag=$4 block=$5 wq=$6 loop provided key opts
    shift 6
    local iopts=("fix_padding" "block_size:$block" "$@")
    loop=$(new_loop "$name")
    dd if=/dev/zero of="$loop" bs=1M count=1 oflag=direct status=none
    dmsetup create "b-$name-integrity" --table "0 8 integrity $loop 0 $tag $mode ${#iopts[@]} ${iopts[*]}"
    provided=$(dmsetup status "b-$name-integrity" | awk '{print $5}')
    dmsetup remove "b-$name-integrity"
    dmsetup create "b-$name-integrity" --table "0 $provided integrity $loop 0 $tag $mode ${#iopts[@]} ${iopts[*]}"
    key=$(head -c 96 /dev/urandom | od -An -tx1 -v | tr -d ' \n')
    case $wq in
        inline) opts="4 integrity:$tag:aead sector_size:$block no_read_workqueue no_write_workqueue" ;;
        queued) opts="2 integrity:$tag:aead sector_size:$block" ;;
        read-inline) opts="3 integrity:$tag:aead sector_size:$block no_read_workqueue" ;;
        write-inline) opts="3 integrity:$tag:aead sector_size:$block no_write_workqueue" ;;
        *) log "setup_manual: bad wq $wq"; return 2 ;;
    esac
    dmsetup create "b-$name" --table "0 $provided crypt capi:authenc(hmac(sha256),xts(aes))-$iv $key 0 /dev/mapper/b-$name-integrity 0 $opts"
    add_stack "$name" "/dev/mapper/b-$name"
    record_tables "$name" "b-$name" "b-$name-integrity"
}

log "provisioning done at ${SECONDS}s"
if [[ $PARTS == *" data "* ]]; then
log "== data path: stacks of $DEV_MIB MiB, $SEQ_MIB MiB sequential / $RAND_MIB MiB random per case, $RUNS runs"
setup_raw
setup_sealcsi sealcsi-J
setup_sealcsi sealcsi-D --journal direct
setup_sealcsi sealcsi-crypt --integrity none
setup_luks luks2-integrity yes
setup_luks luks2-plain no
# Levers (not in the tiny configuration).
if [ "$LEVERS" = 1 ]; then
setup_luks luks2-integrity-nowq yes --perf-no_read_workqueue --perf-no_write_workqueue
setup_luks luks2-plain-nowq no --perf-no_read_workqueue --perf-no_write_workqueue
setup_manual man-J-wq J random 48 4096 queued
setup_manual man-J-plain64-tag32 J plain64 32 4096 inline
setup_manual man-J-512 J random 48 512 inline
setup_manual man-D-wq D random 48 4096 queued
# Which workqueue, per journal mode (issue 14: the flags become a measured choice).
setup_manual man-J-rin J random 48 4096 read-inline
setup_manual man-J-win J random 48 4096 write-inline
setup_manual man-J-inline J random 48 4096 inline
setup_manual man-D-rin D random 48 4096 read-inline
setup_manual man-D-inline D random 48 4096 inline
# dm-integrity journal tuning, each against man-J-wq (the device here is small: the kernel's default
# journal is 1/128 of it, ~1.7 MiB; a volume of 8 GiB or more gets 64 MiB).
setup_manual man-J-wq-js8m J random 48 4096 queued journal_sectors:16384
setup_manual man-J-wq-js64m J random 48 4096 queued journal_sectors:131072
setup_manual man-J-wq-buf1k J random 48 4096 queued buffer_sectors:1024
setup_manual man-J-wq-ct1s J random 48 4096 queued commit_time:1000
setup_manual man-J-wq-wm90 J random 48 4096 queued journal_watermark:90
# The peer in direct mode: luksFormat --integrity-no-journal is an open-time flag.
LUKSD_LOOP=$(new_loop luks2-integrity-D)
cryptsetup luksFormat --type luks2 --integrity hmac-sha256 --cipher aes-xts-plain64 --key-size 512 --sector-size 4096 \
    --batch-mode "${PBKDF[@]}" --integrity-no-wipe --key-file "$KEYFILE" "$LUKSD_LOOP" >/dev/null 2>&1
cryptsetup open --integrity-no-journal --key-file "$KEYFILE" "$LUKSD_LOOP" b-luks2-integrity-D
add_stack luks2-integrity-D /dev/mapper/b-luks2-integrity-D
record_tables luks2-integrity-D b-luks2-integrity-D b-luks2-integrity-D_dif
fi

# workload: name rw bs io-mib iodepth
WORKLOADS=(
    "seqwrite1m write 1M $SEQ_MIB 1"
    "seqread1m read 1M $SEQ_MIB 1"
    "randwrite4k randwrite 4k $RAND_MIB 1"
    "randread4k randread 4k $RAND_MIB 1"
)
# Queue depth 16: on every stack compared with the peer and the workqueue and journal levers (not the
# IV, tag and sector-size levers).
QD_STACKS=" raw sealcsi-J sealcsi-D sealcsi-crypt luks2-integrity luks2-integrity-D luks2-plain "
QD_STACKS+=" luks2-integrity-nowq man-J-wq man-D-wq man-J-rin man-J-win man-J-inline man-D-rin man-D-inline "
QD_STACKS+=" man-J-wq-js8m man-J-wq-js64m man-J-wq-buf1k man-J-wq-ct1s man-J-wq-wm90 "
[ "$LEVERS" = 1 ] || QD_STACKS=""
QD_WORKLOADS=(
    "seqwrite1m-qd16 write 1M $SEQ_MIB 16"
    "seqread1m-qd16 read 1M $SEQ_MIB 16"
    "randwrite4k-qd16 randwrite 4k $RAND_MIB 16"
    "randread4k-qd16 randread 4k $RAND_MIB 16"
)

run_fio() { # stack workload-spec run
    local stack=$1 run=$3 name rw bs mib qd
    read -r name rw bs mib qd <<<"$2"
    fio --name="$name" --filename="${DEV[$stack]}" --direct=1 --ioengine=libaio --iodepth="$qd" \
        --rw="$rw" --bs="$bs" --size="${SEQ_MIB}M" --io_size="${mib}M" --offset=0 --randrepeat=1 \
        --norandommap --output-format=json --output="$FIO_DIR/$stack.$name.$run.json" >/dev/null 2>"$FIO_DIR/$stack.$name.$run.err" ||
        { log "fio failed: $stack $name run $run: $(tail -3 "$FIO_DIR/$stack.$name.$run.err")"; return 1; }
}

for run in $(seq 1 "$RUNS"); do
    log "data path run $run/$RUNS"
    for stack in "${STACKS[@]}"; do
        for wl in "${WORKLOADS[@]}"; do run_fio "$stack" "$wl" "$run"; done
        if [[ $QD_STACKS == *" $stack "* ]]; then
            for wl in "${QD_WORKLOADS[@]}"; do run_fio "$stack" "$wl" "$run"; done
        fi
    done
done
cleanup
trap cleanup EXIT
fi

# ---------------------------------------------------------------- 4. scale
# SCALE_N AEAD volumes (64 MiB, ext4, fast init) formatted first, then staged one after another the way
# NodeStage does (unseal + open the stack + mount) and all left staged; memory is read before and after.
log "data path done at ${SECONDS}s"
if [[ $PARTS == *" scale "* ]]; then
log "== scale: $SCALE_N volumes staged at once"
mkdir -p "$W/scale"
for i in $(seq 1 "$SCALE_N"); do
    truncate -s 64M "$W/scale/v$i.img"
    "$BIN" volume format "$W/scale/v$i.img" --fs ext4 >/dev/null 2>&1
done
sync
echo 3 >/proc/sys/vm/drop_caches
mem_before=$(awk '/^MemAvailable:/ {a=$2} /^Slab:/ {s=$2} /^MemFree:/ {f=$2} END {print a, s, f}' /proc/meminfo)
stage_times=()
for i in $(seq 1 "$SCALE_N"); do
    mkdir -p "$W/mnt/s$i"
    t0=$EPOCHREALTIME
    "$BIN" volume open "$W/scale/v$i.img" --name "b-s$i" >/dev/null 2>&1
    mount -t ext4 "/dev/mapper/b-s$i" "$W/mnt/s$i"
    t1=$EPOCHREALTIME
    stage_times+=("[$t0,$t1]")
done
sync
echo 3 >/proc/sys/vm/drop_caches
mem_after=$(awk '/^MemAvailable:/ {a=$2} /^Slab:/ {s=$2} /^MemFree:/ {f=$2} END {print a, s, f}' /proc/meminfo)
read -r avail0 slab0 free0 <<<"$mem_before"
read -r avail1 slab1 free1 <<<"$mem_after"
emit "{\"kind\":\"scale\",\"n\":$SCALE_N,\"volume_mib\":64,\"stage\":[$(IFS=,; echo "${stage_times[*]}")],\"mem_available_kib\":[$avail0,$avail1],\"slab_kib\":[$slab0,$slab1],\"mem_free_kib\":[$free0,$free1],\"integrity_table\":$(table_redacted b-s1-integrity | json_str)}"
t0=$EPOCHREALTIME
for i in $(seq 1 "$SCALE_N"); do
    umount "$W/mnt/s$i"
    "$BIN" volume close "b-s$i" >/dev/null 2>&1
done
t1=$EPOCHREALTIME
emit "{\"kind\":\"scale_teardown\",\"n\":$SCALE_N,\"t\":[$t0,$t1]}"
fi
log "scale done at ${SECONDS}s"

# 5. journal memory, old against new (issue 14): the memory an open dm-integrity device pins with the
# journal the kernel's default gave a 16 GiB volume before the cap (1/128 of the device, 64 MiB at
# most: 131072 sectors) and with the cap (16384 sectors, 8 MiB). The same table sealcsi loads (tag 48,
# journal mode, 4 KiB blocks) on a blank sparse file, which the kernel formats at load; MemAvailable
# with caches dropped, before the load and after.
if [[ $PARTS == *" journal "* ]]; then
log "== journal memory: 131072 sectors (before the cap) against 16384 (after), 16 GiB"
for journal in 131072 16384 131072 16384; do
    img=$W/journal.img
    rm -f "$img"
    truncate -s 16G "$img"
    loop=$("$LOSETUP" --direct-io=on -f --show "$img")
    before=$(mem_available_kib)
    dmsetup create b-journal --table "0 8 integrity $loop 0 48 J 3 fix_padding block_size:4096 journal_sectors:$journal"
    after=$(mem_available_kib)
    emit "{\"kind\":\"journal_mem\",\"journal_sectors\":$journal,\"device_mib\":16384,\"pinned_kib\":$((before - after)),\"table\":$(dmsetup table b-journal | json_str)}"
    log "journal_sectors:$journal pins $((before - after)) KiB"
    dmsetup remove b-journal
    "$LOSETUP" -d "$loop"
    rm -f "$img"
done
fi
cleanup
trap - EXIT
rm -rf "$W"

python3 "$REPO/tests/bench/report.py" --guest-only --out "$OUT"
