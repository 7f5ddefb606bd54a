#!/bin/bash
# Guest side of tests/vm/run-in-guest.sh, PID 1 after switch_root (host bash on the overlay
# root that initramfs-init.sh built and mounted). Loads the kernel modules, runs CMD with
# the bed's environment, records its exit status in $RUNDIR/status (hostfs: the host reads
# it after UML exits), saves the kernel log and powers the guest off.
#
# Never returns (PID 1 exiting panics the kernel). A setup failure is written to
# $RUNDIR/bed-error and to the console (boot.log on the host).

RUNDIR=$1
exec </dev/null >/dev/console 2>&1

log() { echo "sealcsi-vm: $*"; }

power_off() {
    # busybox poweroff -f syncs, then reboot(POWER_OFF): UML exits.
    /bin/busybox poweroff -f
    sleep 2
    echo o >/proc/sysrq-trigger
    sleep 30
}

bed_fail() {
    log "FATAL: $*"
    echo "$*" >>"$RUNDIR/bed-error"
    dmesg >"$RUNDIR/dmesg.log" 2>&1
    power_off
}

# A clean environment: the kernel hands init any unknown "name=value" boot parameters.
for v in $(compgen -e); do unset "$v"; done
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/run/sealcsi-vm/busybox
export HOME=/root SEALCSI_IN_GUEST=1 DM_DISABLE_UDEV=1 SCRATCH=/scratch TERM=dumb LANG=C.UTF-8

: >"$RUNDIR/guest-started" || bed_fail "run dir $RUNDIR is not writable from the guest"
# shellcheck source=/dev/null
. "$RUNDIR/guest.env" || bed_fail "cannot read $RUNDIR/guest.env"

# --- kernel modules (one modprobe process: process creation is slow in UML) -----------
echo /usr/sbin/modprobe >/proc/sys/kernel/modprobe
modprobe -a -q "${SEALCSI_VM_MODULES_REQUIRED[@]}" "${SEALCSI_VM_MODULES_OPTIONAL[@]}"
missing=()
for m in "${SEALCSI_VM_MODULES_REQUIRED[@]}"; do
    [ -d "/sys/module/${m//-/_}" ] || missing+=("$m")
done
[ ${#missing[@]} -eq 0 ] || bed_fail "kernel modules not loaded: ${missing[*]}"

/bin/busybox ip link set lo up || log "note: could not bring lo up"
if [ -n "${SEALCSI_VM_HOSTNAME:-}" ]; then
    /bin/busybox hostname "$SEALCSI_VM_HOSTNAME" || bed_fail "cannot set the hostname"
fi
# --net: the UML vector interface vec0, attached to the host's tap device.
if [ -n "${SEALCSI_VM_NET_ADDR:-}" ]; then
    /bin/busybox ip link set vec0 up && /bin/busybox ip addr add "$SEALCSI_VM_NET_ADDR" dev vec0 \
        || bed_fail "cannot configure vec0 with $SEALCSI_VM_NET_ADDR"
    if [ -n "${SEALCSI_VM_NET_GW:-}" ]; then
        /bin/busybox ip route add default via "$SEALCSI_VM_NET_GW" || bed_fail "cannot add the default route"
    fi
fi

# --- run CMD ----------------------------------------------------------------------------
cd "$SEALCSI_VM_CWD" || bed_fail "cd $SEALCSI_VM_CWD"
log "running: ${SEALCSI_VM_CMD[*]}"
(
    # shellcheck source=/dev/null
    . "$RUNDIR/cmd.env"
    exec "${SEALCSI_VM_CMD[@]}"
) </dev/null >"$RUNDIR/stdout" 2>"$RUNDIR/stderr"
status=$?
log "command exited with status $status"

dmesg >"$RUNDIR/dmesg.log" 2>&1
echo "$status" >"$RUNDIR/status.tmp" && mv "$RUNDIR/status.tmp" "$RUNDIR/status"
power_off
