#!/bin/busybox sh
# shellcheck shell=dash
# /init of the sealcsi UML test-bed initramfs (busybox ash, PID 1).
#
# Builds the guest root as an overlay: the HOST root filesystem (hostfs, read-only) as
# lower layer, a tmpfs as upper layer, so the guest sees every host binary and library at
# its usual path but cannot write into the host's system directories. Mounts everything
# (busybox processes are much cheaper to start in UML than dynamically linked host
# binaries), then switch_root into it and exec tests/vm/guest-run.sh (host bash), which
# loads modules, runs CMD, writes the status file and powers off.
#
# Kernel command line: sealcsi.rundir=<host dir of this run> sealcsi.runner=<guest-run.sh>
# $RUNDIR/guest.mounts: host directories to mount read-write at the same path, one a line.
# Any failure here powers the guest off; the host notices the missing status file and
# prints the console log.

/bin/busybox mkdir -p /bin /proc /sys /dev /host /newroot /upper
/bin/busybox --install -s /bin
export PATH=/bin

die() {
    echo "sealcsi-vm-init: FATAL: $*" >/dev/console
    poweroff -f
    sleep 5
    echo o >/proc/sysrq-trigger
    sleep 30
}

mount -t proc proc /proc || die "mount proc"
mount -t sysfs sysfs /sys || die "mount sysfs"
mount -t devtmpfs devtmpfs /dev 2>/dev/null || die "mount devtmpfs"
exec </dev/null >/dev/console 2>&1

RUNDIR=
RUNNER=
read -r cmdline </proc/cmdline
for word in $cmdline; do
    case "$word" in
        sealcsi.rundir=*) RUNDIR=${word#sealcsi.rundir=} ;;
        sealcsi.runner=*) RUNNER=${word#sealcsi.runner=} ;;
    esac
done
[ -n "$RUNDIR" ] || die "no sealcsi.rundir= on the kernel command line"
[ -n "$RUNNER" ] || die "no sealcsi.runner= on the kernel command line"

KVER=$(uname -r)
R=/newroot
mount -t hostfs -o ro,/ none /host || die "mount hostfs / (read-only)"
insmod "/host/usr/lib/uml/modules/$KVER/kernel/fs/overlayfs/overlay.ko" || die "insmod overlay"
mount -t tmpfs -o mode=0755 tmpfs /upper || die "mount tmpfs /upper"
mkdir -p /upper/u /upper/w
mount -t overlay overlay -o lowerdir=/host,upperdir=/upper/u,workdir=/upper/w $R \
    || die "mount overlay root"
# Scratch: ext4 the host made on a sparse file (ubd0). noinit_itable: never let ext4 zero
# inode tables in the background (that would fill the sparse file).
mkdir -p $R/scratch
mount -t ext4 -o noinit_itable /dev/ubda $R/scratch || die "mount /dev/ubda (scratch)"
chmod 1777 $R/scratch
for d in dev proc sys; do
    mount --move "/$d" "$R/$d" || die "move /$d"
done

mnt() { mount "$@" || die "mount $*"; }
mkdir -p $R/dev/pts $R/dev/shm
mnt -t devpts -o gid=5,mode=620,ptmxmode=666 devpts $R/dev/pts
mnt -t tmpfs -o mode=1777 tmpfs $R/dev/shm
mnt -t tmpfs -o mode=0755 tmpfs $R/run
mnt -t tmpfs -o mode=1777 tmpfs $R/tmp
mnt -t tmpfs -o mode=1777 tmpfs $R/var/tmp
mnt -t tmpfs -o mode=0700 tmpfs $R/root
mkdir -p $R/run/lock $R/run/sealcsi-vm/busybox
ln -s /proc/self/fd $R/dev/fd
ln -s /proc/self/fd/0 $R/dev/stdin
ln -s /proc/self/fd/1 $R/dev/stdout
ln -s /proc/self/fd/2 $R/dev/stderr
# busybox applets for whatever the host lacks (guest-run.sh puts this dir LAST in PATH).
# (links to /bin/busybox: in the new root that is the host's busybox-static).
/bin/busybox --install -s $R/run/sealcsi-vm/busybox
# /lib/modules/$KVER -> the UML package's modules (lives in the overlay's tmpfs layer).
mkdir -p $R/usr/lib/modules
ln -s "/usr/lib/uml/modules/$KVER" "$R/usr/lib/modules/$KVER"

# The repo (and the cargo target dir if elsewhere), read-write, at the host's paths. After
# the tmpfs mounts, so that a dir under /tmp or /root is not hidden by them (mkdir then
# makes the mount point inside the tmpfs; elsewhere it exists already in the overlay).
[ -r "/host$RUNDIR/guest.mounts" ] || die "cannot read $RUNDIR/guest.mounts"
while IFS= read -r d; do
    [ -n "$d" ] || continue
    mkdir -p "$R$d" || die "mkdir $d"
    mnt -t hostfs -o "$d" none "$R$d"
done <"/host$RUNDIR/guest.mounts"


# shellcheck disable=SC2093 # (die only runs if the exec itself fails)
exec switch_root $R /bin/bash "$RUNNER" "$RUNDIR"
die "switch_root failed"
