//! Storage backends: the block device a volume lives on, either a block device as given or a
//! regular file attached to a loop device.
//!
//! All ioctls of this module live in [`sys`], each in a small safe function.
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod blockdev;
pub mod csi;
pub mod loopfile;

use std::path::{Path, PathBuf};

pub use blockdev::{BlockDevice, is_block_device};
pub use loopfile::LoopDevice;

/// Errors of the storage backends.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The path is neither a block device nor a regular file.
    #[error("{0} is neither a block device nor a regular file")]
    Unsupported(PathBuf),
    /// A filesystem operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// An ioctl failed.
    #[error("{op} on {path}: {source}")]
    Ioctl {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: nix::errno::Errno,
    },
    /// Loop devices are not usable (no loop driver, no /dev/loop-control).
    #[error("loop devices unavailable: {0}")]
    LoopUnavailable(String),
    /// No free loop device could be had after retries.
    #[error("no free loop device after {0} attempts")]
    NoFreeLoop(u32),
    /// The device is held (by a device-mapper mapping, a mount).
    #[error("{0} is in use")]
    Busy(PathBuf),
    /// The path is not a loop device.
    #[error("{0} is not a loop device")]
    NotLoop(PathBuf),
}

impl BackendError {
    pub(crate) fn io(op: &'static str, path: &Path, source: std::io::Error) -> Self {
        BackendError::Io {
            op,
            path: path.to_owned(),
            source,
        }
    }
    pub(crate) fn ioctl(op: &'static str, path: &Path, source: nix::errno::Errno) -> Self {
        BackendError::Ioctl {
            op,
            path: path.to_owned(),
            source,
        }
    }
}

/// Kernel structures and ioctls (linux/loop.h, linux/fs.h), each ioctl in a safe wrapper.
pub mod sys {
    use std::os::fd::{AsRawFd, BorrowedFd};

    use nix::errno::Errno;
    use nix::libc;

    /// `LO_NAME_SIZE`.
    pub const LO_NAME_SIZE: usize = 64;
    /// `LO_KEY_SIZE`.
    pub const LO_KEY_SIZE: usize = 32;
    pub const LO_FLAGS_READ_ONLY: u32 = 1;
    pub const LO_FLAGS_AUTOCLEAR: u32 = 4;
    pub const LO_FLAGS_PARTSCAN: u32 = 8;
    pub const LO_FLAGS_DIRECT_IO: u32 = 16;
    /// Major number of loop block devices.
    pub const LOOP_MAJOR: u32 = 7;

    /// `struct loop_info64` (232 bytes).
    #[repr(C)]
    #[derive(Clone, Copy)]
    pub struct LoopInfo64 {
        pub lo_device: u64,
        pub lo_inode: u64,
        pub lo_rdevice: u64,
        pub lo_offset: u64,
        pub lo_sizelimit: u64,
        pub lo_number: u32,
        pub lo_encrypt_type: u32,
        pub lo_encrypt_key_size: u32,
        pub lo_flags: u32,
        pub lo_file_name: [u8; LO_NAME_SIZE],
        pub lo_crypt_name: [u8; LO_NAME_SIZE],
        pub lo_encrypt_key: [u8; LO_KEY_SIZE],
        pub lo_init: [u64; 2],
    }

    impl Default for LoopInfo64 {
        fn default() -> Self {
            LoopInfo64 {
                lo_device: 0,
                lo_inode: 0,
                lo_rdevice: 0,
                lo_offset: 0,
                lo_sizelimit: 0,
                lo_number: 0,
                lo_encrypt_type: 0,
                lo_encrypt_key_size: 0,
                lo_flags: 0,
                lo_file_name: [0; LO_NAME_SIZE],
                lo_crypt_name: [0; LO_NAME_SIZE],
                lo_encrypt_key: [0; LO_KEY_SIZE],
                lo_init: [0; 2],
            }
        }
    }

    /// `struct loop_config` (304 bytes).
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    pub struct LoopConfig {
        pub fd: u32,
        pub block_size: u32,
        pub info: LoopInfo64,
        pub reserved: [u64; 8],
    }

    // Loop ioctls are plain numbers in linux/loop.h; they equal _IO('L', nr), computed here.
    pub const LOOP_CLR_FD: u32 = nix::request_code_none!(b'L', 0x01) as u32;
    pub const LOOP_SET_STATUS64: u32 = nix::request_code_none!(b'L', 0x04) as u32;
    pub const LOOP_GET_STATUS64: u32 = nix::request_code_none!(b'L', 0x05) as u32;
    pub const LOOP_CONFIGURE: u32 = nix::request_code_none!(b'L', 0x0A) as u32;
    pub const LOOP_CTL_GET_FREE: u32 = nix::request_code_none!(b'L', 0x82) as u32;
    pub const LOOP_SET_CAPACITY: u32 = nix::request_code_none!(b'L', 0x07) as u32;
    /// `BLKGETSIZE64` = _IOR(0x12, 114, size_t).
    pub const BLKGETSIZE64: u32 =
        nix::request_code_read!(0x12, 114, std::mem::size_of::<u64>()) as u32;
    /// `BLKSSZGET` = _IO(0x12, 104), writes an int.
    pub const BLKSSZGET: u32 = nix::request_code_none!(0x12, 104) as u32;

    mod raw {
        use super::*;
        nix::ioctl_none_bad!(loop_clr_fd, LOOP_CLR_FD);
        nix::ioctl_none_bad!(loop_ctl_get_free, LOOP_CTL_GET_FREE);
        nix::ioctl_none_bad!(loop_set_capacity, LOOP_SET_CAPACITY);
        nix::ioctl_write_ptr_bad!(loop_configure, LOOP_CONFIGURE, LoopConfig);
        nix::ioctl_read_bad!(loop_get_status64, LOOP_GET_STATUS64, LoopInfo64);
        nix::ioctl_write_ptr_bad!(loop_set_status64, LOOP_SET_STATUS64, LoopInfo64);
        nix::ioctl_read_bad!(blkgetsize64, BLKGETSIZE64, u64);
        nix::ioctl_read_bad!(blksszget, BLKSSZGET, libc::c_int);
    }

    /// LOOP_CTL_GET_FREE on /dev/loop-control: the number of a free loop device (made if needed).
    pub fn loop_ctl_get_free(control: BorrowedFd<'_>) -> Result<u32, Errno> {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and only returns an int; the fd is valid for
        // the borrow.
        let n = unsafe { raw::loop_ctl_get_free(control.as_raw_fd()) }?;
        u32::try_from(n).map_err(|_| Errno::EINVAL)
    }

    /// LOOP_CONFIGURE: bind the backing file and set status in one call (Linux >= 5.8).
    pub fn loop_configure(dev: BorrowedFd<'_>, config: &LoopConfig) -> Result<(), Errno> {
        // SAFETY: the kernel reads one `struct loop_config` (same #[repr(C)] layout, size checked
        // by a test) from the pointer, which is valid for the call.
        unsafe { raw::loop_configure(dev.as_raw_fd(), config) }.map(drop)
    }

    /// LOOP_CLR_FD: unbind the backing file (deferred by the kernel while others hold the device).
    pub fn loop_clr_fd(dev: BorrowedFd<'_>) -> Result<(), Errno> {
        // SAFETY: LOOP_CLR_FD takes no argument; the fd is valid for the borrow.
        unsafe { raw::loop_clr_fd(dev.as_raw_fd()) }.map(drop)
    }

    /// LOOP_SET_CAPACITY: re-read the backing file's size (after it grew).
    pub fn loop_set_capacity(dev: BorrowedFd<'_>) -> Result<(), Errno> {
        // SAFETY: LOOP_SET_CAPACITY takes no argument; the fd is valid for the borrow.
        unsafe { raw::loop_set_capacity(dev.as_raw_fd()) }.map(drop)
    }

    /// LOOP_GET_STATUS64: the binding's status; ENXIO if the device is not bound.
    pub fn loop_get_status64(dev: BorrowedFd<'_>) -> Result<LoopInfo64, Errno> {
        let mut info = LoopInfo64::default();
        // SAFETY: the kernel writes one `struct loop_info64` into `info`, a valid, exclusively
        // borrowed value of that exact layout.
        unsafe { raw::loop_get_status64(dev.as_raw_fd(), &mut info) }?;
        Ok(info)
    }

    /// LOOP_SET_STATUS64: change a binding's settable flags (AUTOCLEAR, PARTSCAN) and status.
    pub fn loop_set_status64(dev: BorrowedFd<'_>, info: &LoopInfo64) -> Result<(), Errno> {
        // SAFETY: the kernel reads one `struct loop_info64` (same #[repr(C)] layout, size checked
        // by a test) from the pointer, which is valid for the call.
        unsafe { raw::loop_set_status64(dev.as_raw_fd(), info) }.map(drop)
    }

    /// BLKGETSIZE64: size of a block device in bytes.
    pub fn blkgetsize64(dev: BorrowedFd<'_>) -> Result<u64, Errno> {
        let mut size = 0u64;
        // SAFETY: the kernel writes one u64 into `size`, valid and exclusively borrowed.
        unsafe { raw::blkgetsize64(dev.as_raw_fd(), &mut size) }?;
        Ok(size)
    }

    /// BLKSSZGET: logical block size of a block device in bytes.
    pub fn blksszget(dev: BorrowedFd<'_>) -> Result<u32, Errno> {
        let mut size: libc::c_int = 0;
        // SAFETY: the kernel writes one int into `size`, valid and exclusively borrowed.
        unsafe { raw::blksszget(dev.as_raw_fd(), &mut size) }?;
        u32::try_from(size).map_err(|_| Errno::EINVAL)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn ioctl_numbers_match_kernel_headers() {
            assert_eq!(LOOP_CLR_FD, 0x4C01);
            assert_eq!(LOOP_SET_STATUS64, 0x4C04);
            assert_eq!(LOOP_GET_STATUS64, 0x4C05);
            assert_eq!(LOOP_CONFIGURE, 0x4C0A);
            assert_eq!(LOOP_CTL_GET_FREE, 0x4C82);
            assert_eq!(LOOP_SET_CAPACITY, 0x4C07);
            assert_eq!(BLKGETSIZE64, 0x8008_1272);
            assert_eq!(BLKSSZGET, 0x1268);
        }

        #[test]
        fn struct_layouts_match_kernel_headers() {
            assert_eq!(std::mem::size_of::<LoopInfo64>(), 232);
            assert_eq!(std::mem::size_of::<LoopConfig>(), 304);
            assert_eq!(std::mem::offset_of!(LoopInfo64, lo_flags), 52);
            assert_eq!(std::mem::offset_of!(LoopInfo64, lo_file_name), 56);
            assert_eq!(std::mem::offset_of!(LoopInfo64, lo_init), 216);
            assert_eq!(std::mem::offset_of!(LoopConfig, info), 8);
            assert_eq!(std::mem::offset_of!(LoopConfig, reserved), 240);
        }

        #[test]
        fn ioctls_on_a_regular_file_fail_cleanly() {
            let f = tempfile::tempfile().unwrap();
            use std::os::fd::AsFd;
            assert_eq!(blkgetsize64(f.as_fd()), Err(Errno::ENOTTY));
            assert_eq!(blksszget(f.as_fd()), Err(Errno::ENOTTY));
            assert!(loop_get_status64(f.as_fd()).is_err());
        }
    }
}
