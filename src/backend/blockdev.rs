//! The block device a volume lives on: a block device path as given, or a regular file behind a
//! loop device.
#![deny(clippy::undocumented_unsafe_blocks)]

use std::fs::{self, File, OpenOptions};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::loopfile::LoopDevice;
use super::{BackendError, sys};

/// Whether `path` is (or links to) a block device.
pub fn is_block_device(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device())
}

/// A block device to put a volume on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDevice {
    path: PathBuf,
    /// Set when the volume is a file: the loop device it is attached to (attached now or found
    /// attached from an earlier open), which [`BlockDevice::release`] detaches.
    loop_dev: Option<LoopDevice>,
}

impl BlockDevice {
    /// A block device path is used as is; a regular file is attached to a loop device, reusing an
    /// existing attachment of the same file (same device and inode), so that open is idempotent.
    pub fn open_path(path: &Path) -> Result<BlockDevice, BackendError> {
        let meta = fs::metadata(path).map_err(|e| BackendError::io("stat", path, e))?;
        let ft = meta.file_type();
        if ft.is_block_device() {
            return Ok(BlockDevice {
                path: path.to_owned(),
                loop_dev: None,
            });
        }
        if ft.is_file() {
            let lo = LoopDevice::find_or_attach(path, false)?;
            return Ok(BlockDevice {
                path: lo.path().to_owned(),
                loop_dev: Some(lo),
            });
        }
        Err(BackendError::Unsupported(path.to_owned()))
    }

    /// The block device path (`/dev/loopN` for a file).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The loop device, if the volume is a file.
    pub fn loop_device(&self) -> Option<&LoopDevice> {
        self.loop_dev.as_ref()
    }

    fn open(&self) -> Result<File, BackendError> {
        OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_CLOEXEC)
            .open(&self.path)
            .map_err(|e| BackendError::io("open", &self.path, e))
    }

    /// Size in bytes (BLKGETSIZE64).
    pub fn size_bytes(&self) -> Result<u64, BackendError> {
        let f = self.open()?;
        sys::blkgetsize64(f.as_fd()).map_err(|e| BackendError::ioctl("BLKGETSIZE64", &self.path, e))
    }

    /// Logical block size in bytes (BLKSSZGET).
    pub fn logical_block_size(&self) -> Result<u32, BackendError> {
        let f = self.open()?;
        sys::blksszget(f.as_fd()).map_err(|e| BackendError::ioctl("BLKSSZGET", &self.path, e))
    }

    /// Keep a file-backed device attached while something above it (the device-mapper stack) holds it
    /// open, and let the kernel detach it when that last user closes. Call only once the stack is up:
    /// with nothing holding it, the device detaches at once.
    pub fn keep_while_in_use(self) -> Result<(), BackendError> {
        match &self.loop_dev {
            Some(lo) => lo.set_autoclear(),
            None => Ok(()),
        }
    }

    /// Give the device back: detaches the loop device of a file-backed volume (Busy while a
    /// mapping still holds it); nothing to do for a block device.
    pub fn release(self) -> Result<(), BackendError> {
        match &self.loop_dev {
            Some(lo) => lo.detach(),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_block_device_on_host_paths() {
        let f = tempfile::NamedTempFile::new().unwrap();
        assert!(!is_block_device(f.path()));
        assert!(!is_block_device(Path::new("/nonexistent")));
        assert!(!is_block_device(Path::new("/dev/null")));
    }

    #[test]
    fn open_path_refuses_other_file_types() {
        let d = tempfile::tempdir().unwrap();
        assert!(matches!(
            BlockDevice::open_path(d.path()),
            Err(BackendError::Unsupported(_))
        ));
        assert!(matches!(
            BlockDevice::open_path(Path::new("/dev/null")),
            Err(BackendError::Unsupported(_))
        ));
        assert!(matches!(
            BlockDevice::open_path(&d.path().join("x")),
            Err(BackendError::Io { .. })
        ));
    }
}
