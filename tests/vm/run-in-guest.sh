#!/usr/bin/env bash
# Run a command inside a user-mode-linux guest with device-mapper (dm-crypt, dm-integrity),
# loop devices and a fresh scratch file system. See tests/vm/README.md.
#
#   tests/vm/run-in-guest.sh [--mem 2G] [--timeout SECONDS] [--scratch-size 200G] [--keep]
#                            [--net tap:IFNAME:ADDR/PREFIX[:GATEWAY]] [--hostname NAME] -- CMD [ARGS...]
#
# Exit status: CMD's exit status; 124 on timeout; 125 on any failure of the bed itself.
set -euo pipefail

prog=run-in-guest
die() { echo "$prog: ERROR: $*" >&2; exit 125; }
usage() {
    sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 125
}

MEM=2G
TIMEOUT=1200
SCRATCH_SIZE=200G
KEEP=0
NET=
GUEST_HOSTNAME=
while [ $# -gt 0 ]; do
    case "$1" in
        --mem) [ $# -ge 2 ] || usage; MEM=$2; shift 2 ;;
        --mem=*) MEM=${1#*=}; shift ;;
        --timeout) [ $# -ge 2 ] || usage; TIMEOUT=$2; shift 2 ;;
        --timeout=*) TIMEOUT=${1#*=}; shift ;;
        --scratch-size) [ $# -ge 2 ] || usage; SCRATCH_SIZE=$2; shift 2 ;;
        --scratch-size=*) SCRATCH_SIZE=${1#*=}; shift ;;
        --keep) KEEP=1; shift ;;
        --net) [ $# -ge 2 ] || usage; NET=$2; shift 2 ;;
        --net=*) NET=${1#*=}; shift ;;
        --hostname) [ $# -ge 2 ] || usage; GUEST_HOSTNAME=$2; shift 2 ;;
        --hostname=*) GUEST_HOSTNAME=${1#*=}; shift ;;
        -h|--help) usage ;;
        --) shift; break ;;
        -*) echo "$prog: unknown option $1" >&2; usage ;;
        *) break ;;
    esac
done
[ $# -gt 0 ] || { echo "$prog: no command given" >&2; usage; }
if ! [[ $TIMEOUT =~ ^[1-9][0-9]*$ ]]; then die "--timeout wants a positive number of seconds, got '$TIMEOUT'"; fi
[[ $MEM =~ ^[0-9]+[KMG]?$ ]] || die "--mem wants e.g. 1G or 2048M, got '$MEM'"
[[ $SCRATCH_SIZE =~ ^[0-9]+[KMGT]?$ ]] || die "--scratch-size wants e.g. 200G, got '$SCRATCH_SIZE'"
# --net: the guest's interface vec0 is attached to a tap device of the caller's network namespace
# (it must exist and be up; the caller owns its address and routes), with a static address.
NET_IF= NET_ADDR= NET_GW=
if [ -n "$NET" ]; then
    re='^tap:([A-Za-z0-9_.-]{1,15}):([0-9]{1,3}(\.[0-9]{1,3}){3}/[0-9]{1,2})(:([0-9]{1,3}(\.[0-9]{1,3}){3}))?$'
    [[ $NET =~ $re ]] || die "--net wants tap:IFNAME:ADDR/PREFIX[:GATEWAY], e.g. tap:sctap0:10.203.0.2/24:10.203.0.1; got '$NET'"
    NET_IF=${BASH_REMATCH[1]} NET_ADDR=${BASH_REMATCH[2]} NET_GW=${BASH_REMATCH[5]}
    [ -e "/sys/class/net/$NET_IF" ] || die "--net: no network interface $NET_IF in this network namespace (create it first: ip tuntap add dev $NET_IF mode tap)"
    [ -c /dev/net/tun ] || die "--net: /dev/net/tun is missing"
fi
if [ -n "$GUEST_HOSTNAME" ] && ! [[ $GUEST_HOSTNAME =~ ^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$ ]]; then
    die "--hostname wants a lower-case DNS name, got '$GUEST_HOSTNAME'"
fi

# ---------------------------------------------------------------------------------------------
UML=${SEALCSI_VM_KERNEL:-/usr/bin/linux.uml}
VMDIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
REPO=$(cd "$VMDIR/../.." && pwd -P)
OUT=$REPO/target/vm
BUSYBOX=
for b in /bin/busybox /usr/bin/busybox; do
    [ -x "$b" ] && { BUSYBOX=$b; break; }
done

[ -x "$UML" ] || die "$UML not found (apt-get install user-mode-linux)"
[ -n "$BUSYBOX" ] || die "busybox not found (apt-get install busybox-static)"
for tool in cpio gzip mke2fs truncate tail sha256sum; do
    command -v "$tool" >/dev/null || die "$tool not found on the host"
done
if ! compgen -G '/usr/lib/uml/modules/*/modules.dep' >/dev/null; then
    die "no UML modules in /usr/lib/uml/modules (apt-get install user-mode-linux)"
fi

# hostfs takes the path as its mount data and the kernel command line is split on blanks.
case "$REPO" in *[[:space:],]*) die "repo path '$REPO' contains blanks or commas; hostfs cannot mount it" ;; esac

MOUNTS=("$REPO")
if [ -n "${CARGO_TARGET_DIR:-}" ]; then
    mkdir -p "$CARGO_TARGET_DIR"
    tdir=$(cd "$CARGO_TARGET_DIR" && pwd -P)
    case "$tdir/" in
        "$REPO"/*) ;;
        *[[:space:],]*) die "CARGO_TARGET_DIR '$tdir' contains blanks or commas" ;;
        *) MOUNTS+=("$tdir") ;;
    esac
fi

mkdir -p "$OUT"
# Prune run dirs older than a day (left by --keep, failures or killed runs).
find "$OUT" -maxdepth 1 -name 'run.*' -type d -mmin +1440 -exec rm -rf {} + 2>/dev/null || true

# --- initramfs (busybox + /init), cached by content ------------------------------------------
key=$( { sha256sum "$VMDIR/initramfs-init.sh" "$BUSYBOX" | cut -d' ' -f1; echo v1; } | sha256sum | cut -c1-16)
INITRD=$OUT/initramfs-$key.cpio.gz
if [ ! -s "$INITRD" ]; then
    stage=$(mktemp -d "$OUT/initramfs-stage.XXXXXX")
    mkdir -p "$stage/bin" "$stage/dev" "$stage/proc" "$stage/sys"
    cp "$BUSYBOX" "$stage/bin/busybox"
    cp "$VMDIR/initramfs-init.sh" "$stage/init"
    chmod 0755 "$stage/init" "$stage/bin/busybox"
    (cd "$stage" && find . | LC_ALL=C sort | cpio -o -H newc --owner=0:0 --quiet | gzip -1) >"$stage.cpio.gz" \
        || { rm -rf "$stage" "$stage.cpio.gz"; die "building the initramfs failed"; }
    mv -f "$stage.cpio.gz" "$INITRD"
    rm -rf "$stage"
    # drop stale cached images
    find "$OUT" -maxdepth 1 -name 'initramfs-*.cpio.gz' ! -name "${INITRD##*/}" -mmin +60 -delete 2>/dev/null || true
fi

# --- LD_PRELOAD shim for UML 6.1 on hosts with a big XSAVE area (AVX-512/AMX), cached -------
# Without it the first guest process dies: "userspace - ptrace set fp regs failed, errno = 14".
shim_key=$(sha256sum "$VMDIR/uml-xstate-shim.c" | cut -c1-16)
SHIM=$OUT/uml-xstate-shim-$shim_key.so
if [ ! -s "$SHIM" ]; then
    CC_BIN=${CC:-cc}
    command -v "$CC_BIN" >/dev/null || die "a C compiler ($CC_BIN) is needed to build the UML xstate shim (apt-get install gcc)"
    "$CC_BIN" -O2 -shared -fPIC -o "$SHIM.tmp.$$" "$VMDIR/uml-xstate-shim.c" -ldl >"$OUT/shim-build.log" 2>&1 \
        || die "building the UML xstate shim failed: $(cat "$OUT/shim-build.log")"
    mv -f "$SHIM.tmp.$$" "$SHIM"
fi

# --- per-run directory ----------------------------------------------------------------------
RUNDIR=$(mktemp -d "$OUT/run.XXXXXXXX")
UMID=sealcsi-${RUNDIR##*/run.}
SCRATCH_IMG=$RUNDIR/scratch.img
BOOTLOG=$RUNDIR/boot.log
: >"$RUNDIR/stdout"
: >"$RUNDIR/stderr"

UML_PID=
WATCHDOG_PID=
TAIL_PIDS=()

kill_uml() {
    # UML runs in its own session/process group (setsid): kill the whole group, then any
    # straggler that still carries our unique umid on its command line.
    if [ -n "$UML_PID" ]; then
        kill -KILL -- "-$UML_PID" 2>/dev/null || true
    fi
    local p
    for p in $(pgrep -f -- "umid=$UMID " 2>/dev/null || true); do
        kill -KILL "$p" 2>/dev/null || true
    done
}

# shellcheck disable=SC2317 # (invoked by the EXIT trap)
cleanup() {
    local rc=$?
    set +e
    kill_uml
    [ -n "$WATCHDOG_PID" ] && kill "$WATCHDOG_PID" 2>/dev/null
    rm -f "$SCRATCH_IMG"
    rm -rf "$RUNDIR/uml" "$RUNDIR/mem"
    if [ "$KEEP" = 0 ] && [ "$rc" = 0 ]; then
        rm -rf "$RUNDIR"
    fi
    return "$rc"
}
trap cleanup EXIT
trap 'echo "$prog: interrupted" >&2; exit 130' INT TERM HUP

# Scratch disk: sparse file, ext4 made on the host (needs no kernel support).
truncate -s "$SCRATCH_SIZE" "$SCRATCH_IMG" || die "cannot create $SCRATCH_IMG"
mke2fs -q -F -t ext4 -T largefile -L scratch -E nodiscard,lazy_itable_init=1,lazy_journal_init=1 \
    "$SCRATCH_IMG" >"$RUNDIR/mke2fs.log" 2>&1 || die "mke2fs on $SCRATCH_IMG failed: $(cat "$RUNDIR/mke2fs.log")"

# Guest RAM is a file in TMPDIR (UML's default: /dev/shm). Docker's /dev/shm is often tiny:
# use it only if it has room for all of the guest RAM, otherwise a dir on disk.
mem_kib() {
    local n=${1%[KMG]} u=${1##*[0-9]}
    case "$u" in K) echo "$n" ;; M) echo $((n * 1024)) ;; G) echo $((n * 1024 * 1024)) ;; *) echo $((n / 1024)) ;; esac
}
need=$(mem_kib "$MEM")
UML_TMP=$RUNDIR/mem
if [ -d /dev/shm ] && [ -w /dev/shm ]; then
    avail=$(df -Pk /dev/shm 2>/dev/null | awk 'NR==2 {print $4}')
    if [ -n "$avail" ] && [ "$avail" -gt $((need + 262144)) ]; then UML_TMP=/dev/shm; fi
fi
mkdir -p "$UML_TMP" "$RUNDIR/uml"

# --- what the guest runs ----------------------------------------------------------------------
{
    printf 'SEALCSI_VM_CWD=%q\n' "$REPO"
    printf 'SEALCSI_VM_CMD=('; printf '%q ' "$@"; printf ')\n'
    printf 'SEALCSI_VM_MODULES_REQUIRED=(%s)\n' \
        "dm-mod dm-bufio dm-crypt dm-integrity loop xts authenc hmac gcm ghash-generic cbc ecb ctr seqiv"
    printf 'SEALCSI_VM_MODULES_OPTIONAL=(%s)\n' \
        "essiv chacha20poly1305 chacha_generic poly1305_generic sha512_generic sha3_generic crc32_generic echainiv cryptd af_alg algif_skcipher algif_hash algif_aead dm-zero dm-delay dm-flakey dm-dust dm-log-writes"
    printf 'SEALCSI_VM_NET_ADDR=%q\nSEALCSI_VM_NET_GW=%q\nSEALCSI_VM_HOSTNAME=%q\n' "$NET_ADDR" "$NET_GW" "$GUEST_HOSTNAME"
} >"$RUNDIR/guest.env"
printf '%s\n' "${MOUNTS[@]}" >"$RUNDIR/guest.mounts"
{
    while IFS= read -r name; do
        case "$name" in
            SEALCSI_VM_*|SEALCSI_IN_GUEST) ;;
            SEALCSI_*|RUST_*) printf 'export %s=%q\n' "$name" "${!name}" ;;
        esac
    done < <(compgen -e)
} >"$RUNDIR/cmd.env"

# --- boot -------------------------------------------------------------------------------------
NET_ARGS=()
[ -z "$NET_IF" ] || NET_ARGS=("vec0:transport=tap,ifname=$NET_IF")
START=$SECONDS
# setsid: UML and every helper it forks share one new process group we can kill as a whole.
# stdin </dev/null and con0=null,fd:1: works without a tty; the console (kernel + bed
# messages) goes to boot.log, CMD's stdout/stderr go to files streamed below.
TMPDIR=$UML_TMP LD_PRELOAD=$SHIM setsid "$UML" \
    mem="$MEM" initrd="$INITRD" ubd0="$SCRATCH_IMG" \
    con0=null,fd:1 con=null ssl=null "${NET_ARGS[@]}" \
    umid="$UMID" uml_dir="$RUNDIR/uml" \
    loglevel=4 panic=1 \
    sealcsi.rundir="$RUNDIR" sealcsi.runner="$VMDIR/guest-run.sh" \
    </dev/null >"$BOOTLOG" 2>&1 &
UML_PID=$!

# Stream CMD's output while it runs (hostfs writes go straight through to the host file).
tail -c +1 -s 0.2 --pid="$UML_PID" -f "$RUNDIR/stdout" &
TAIL_PIDS+=($!)
tail -c +1 -s 0.2 --pid="$UML_PID" -f "$RUNDIR/stderr" >&2 &
TAIL_PIDS+=($!)

(
    deadline=$((SECONDS + TIMEOUT))
    while [ "$SECONDS" -lt "$deadline" ]; do
        sleep 0.5
        kill -0 "$UML_PID" 2>/dev/null || exit 0
    done
    : >"$RUNDIR/timed-out"
    kill -KILL -- "-$UML_PID" 2>/dev/null
) &
WATCHDOG_PID=$!

set +e
wait "$UML_PID" 2>/dev/null   # (no "Killed" job notice from bash)
uml_rc=$?
kill "$WATCHDOG_PID" 2>/dev/null
wait "$WATCHDOG_PID" 2>/dev/null
WATCHDOG_PID=
kill_uml   # helpers that outlived the main UML process, if any
UML_PID=
wait "${TAIL_PIDS[@]}" 2>/dev/null
set -e
ELAPSED=$((SECONDS - START))

# The guest's kernel log: $OUT/dmesg.log (the latest run) and $RUNDIR/dmesg.log (kept on failure).
if [ -s "$RUNDIR/dmesg.log" ]; then
    cp "$RUNDIR/dmesg.log" "$OUT/dmesg.log.tmp.$$" && mv -f "$OUT/dmesg.log.tmp.$$" "$OUT/dmesg.log"
    echo "$prog: guest kernel log in $OUT/dmesg.log" >&2
fi

show_bootlog() {
    echo "$prog: --- last lines of the guest console ($BOOTLOG) ---" >&2
    tail -n 40 "$BOOTLOG" >&2
    echo "$prog: --- end ---" >&2
}

if [ -e "$RUNDIR/timed-out" ]; then
    KEEP=1
    echo "$prog: ERROR: timed out after ${TIMEOUT}s; the guest was killed (logs kept in $RUNDIR)" >&2
    show_bootlog
    exit 124
fi
if [ -s "$RUNDIR/bed-error" ]; then
    KEEP=1
    echo "$prog: ERROR: guest setup failed: $(cat "$RUNDIR/bed-error")" >&2
    show_bootlog
    exit 125
fi
if [ ! -s "$RUNDIR/status" ]; then
    KEEP=1
    echo "$prog: ERROR: the guest exited (UML status $uml_rc after ${ELAPSED}s) without reporting the command's status (boot failure or guest crash; logs kept in $RUNDIR)" >&2
    show_bootlog
    exit 125
fi
status=$(cat "$RUNDIR/status")
[[ $status =~ ^[0-9]+$ ]] || die "bad status file content '$status'"
[ "${SEALCSI_VM_VERBOSE:-0}" = 0 ] || echo "$prog: command exited with $status; guest ran ${ELAPSED}s" >&2
if [ "$status" != 0 ]; then
    echo "$prog: command exited with status $status (run dir kept: $RUNDIR, kernel log $RUNDIR/dmesg.log)" >&2
    KEEP=1
fi
exit "$status"
