//! udev and sealcsi's devices.
//!
//! A node's systemd-udevd probes every device-mapper device that appears or changes (blkid, by-uuid
//! links, other rules acting on what blkid finds). On a sealed volume that is a reader of blocks nobody
//! wrote (a fast-initialized AEAD volume fails those reads: false integrity failures in the kernel log)
//! and a publisher of what is inside (filesystem type, UUID, label) to every rule on the node. The
//! device-mapper udev rules (lvm2's 10-dm.rules and 13-dm-disk.rules, Debian's 55-dm.rules and
//! 60-persistent-storage-dm.rules) skip a device whose uevent carries the DM udev flags in its cookie:
//! sealcsi sets [`DM_UDEV_DISABLE_DISK_RULES_FLAG`](devicemapper_sys::DM_UDEV_DISABLE_DISK_RULES_FLAG)
//! (no blkid, no /dev/disk links), `DISABLE_OTHER_RULES` (no rule outside device-mapper's acts on
//! it; systemd marks it not ready) and `DISABLE_SUBSYSTEM_RULES` (sealcsi is the subsystem and has no
//! rules), plus `PRIMARY_SOURCE` (a real activation, so that udev keeps these flags in its database for
//! the synthetic events that follow: watch, `udevadm trigger`). The device-mapper rules still make
//! `/dev/mapper/<name>` (a symlink); [`super::kernel`] makes that node itself too and accepts udev's.
//!
//! The flags travel in the `event_nr` of the ioctls whose uevents udev sees: DM_DEV_SUSPEND (resume,
//! the "change" uevent) and DM_DEV_REMOVE ("remove"); the kernel puts them into the uevent as
//! `DM_COOKIE`. (DM_DEV_CREATE takes no cookie: the kernel's "add" uevent carries none, and the rules
//! treat an "add" without a primary source as not yet active and skip it.)
//!
//! sealcsi does not wait for udev. Its cookies carry flags only (the low 16 bits, the semaphore part of
//! libdevmapper's cookie, are 0: libdevmapper's convention for a cookie that carries flags and no
//! notification), so no SysV semaphore is made and nothing blocks: a waiting ioctl hangs forever when udev runs outside the
//! plugin's IPC namespace (the usual CSI DaemonSet: the host's udevd cannot reach the pod's
//! semaphore), or when its rules never call `udevcomplete`. Nothing sealcsi does needs udev's work: it
//! opens devices by number and makes its own /dev/mapper node. That is also why these two ioctls are
//! issued here and not through the `devicemapper` crate: when /run/udev/control exists the crate adds a
//! semaphore cookie and waits on it, and when it does not the crate clears `event_nr`, flags included.
#![deny(clippy::undocumented_unsafe_blocks)]

use std::fs::File;
use std::mem::size_of;
use std::os::fd::AsRawFd;

use devicemapper_sys as sys;
use nix::errno::Errno;

use super::DmName;

/// The DM udev flags of every sealcsi device (see the module documentation).
pub const UDEV_FLAGS: u32 = sys::DM_UDEV_DISABLE_SUBSYSTEM_RULES_FLAG
    | sys::DM_UDEV_DISABLE_DISK_RULES_FLAG
    | sys::DM_UDEV_DISABLE_OTHER_RULES_FLAG
    | sys::DM_UDEV_PRIMARY_SOURCE_FLAG;

/// The cookie sealcsi passes: the flags in the high 16 bits, no semaphore (low 16 bits zero).
pub const COOKIE: u32 = UDEV_FLAGS << sys::DM_UDEV_FLAGS_SHIFT;

/// A header-only request for device `name`.
fn header(name: &DmName, flags: u32) -> sys::dm_ioctl {
    let size = u32::try_from(size_of::<sys::dm_ioctl>()).expect("dm_ioctl is small");
    let mut hdr = sys::dm_ioctl {
        // Interface 4.0.0: the kernel accepts any major-4 caller asking for no newer minor.
        version: [4, 0, 0],
        data_size: size,
        data_start: size,
        flags,
        event_nr: COOKIE,
        ..Default::default()
    };
    // DmName is at most 127 bytes (checked): the field keeps its terminating NUL.
    for (dst, src) in hdr.name.iter_mut().zip(name.as_str().bytes()) {
        *dst = src as std::ffi::c_char;
    }
    hdr
}

/// The ioctl request number of device-mapper command `cmd` (`_IOWR(0xfd, cmd, struct dm_ioctl)`).
fn request(cmd: u32) -> nix::sys::ioctl::ioctl_num_type {
    nix::request_code_readwrite!(sys::DM_IOCTL, cmd, size_of::<sys::dm_ioctl>())
        as nix::sys::ioctl::ioctl_num_type
}

fn ioctl(control: &File, cmd: u32, hdr: &mut sys::dm_ioctl) -> Result<(), Errno> {
    // SAFETY: `hdr` is an initialized dm_ioctl borrowed exclusively for the call, and its data_size
    // is its own size: the kernel reads and writes at most that many bytes at the pointer.
    let r =
        unsafe { nix::libc::ioctl(control.as_raw_fd(), request(cmd), hdr as *mut sys::dm_ioctl) };
    Errno::result(r).map(drop)
}

/// Resumes `name` (swaps a loaded inactive table in) with sealcsi's udev flags; does not wait for udev.
pub fn resume(control: &File, name: &DmName) -> Result<(), Errno> {
    ioctl(control, sys::DM_DEV_SUSPEND_CMD, &mut header(name, 0))
}

/// Removes `name` with sealcsi's udev flags; does not wait for udev.
pub fn remove(control: &File, name: &DmName) -> Result<(), Errno> {
    ioctl(control, sys::DM_DEV_REMOVE_CMD, &mut header(name, 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cookie_carries_flags_only() {
        // DISABLE_SUBSYSTEM (0x02) | DISABLE_DISK (0x04) | DISABLE_OTHER (0x08) | PRIMARY_SOURCE (0x40),
        // as libdevmapper defines them, in the high half; no semaphore in the low half.
        assert_eq!(COOKIE, 0x004e_0000);
        assert_eq!(COOKIE & 0xffff, 0);
        assert_eq!(
            sys::DM_UDEV_DISABLE_DM_RULES_FLAG & UDEV_FLAGS,
            0,
            "udev still makes /dev/mapper links"
        );
    }

    #[test]
    fn request_numbers_are_the_kernels() {
        // _IOWR(0xfd, n, 312 bytes), as <linux/dm-ioctl.h> defines DM_DEV_SUSPEND and DM_DEV_REMOVE.
        assert_eq!(size_of::<sys::dm_ioctl>(), 312);
        assert_eq!(request(sys::DM_DEV_SUSPEND_CMD) as u64, 0xc138_fd06);
        assert_eq!(request(sys::DM_DEV_REMOVE_CMD) as u64, 0xc138_fd04);
    }

    #[test]
    fn the_header_names_the_device_and_keeps_a_nul() {
        let name = DmName::try_from("n".repeat(127)).unwrap();
        let hdr = header(&name, 0);
        assert_eq!(hdr.name[126], b'n' as std::ffi::c_char);
        assert_eq!(hdr.name[127], 0);
        assert_eq!(hdr.event_nr, COOKIE);
        assert_eq!(hdr.data_size as usize, size_of::<sys::dm_ioctl>());
    }
}
