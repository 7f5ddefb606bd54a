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

/// A block device to put a volume on, held open for as long as this value lives.
///
/// For a file, the loop device it is attached to. The open descriptor matters: a loop device with
/// autoclear set (an open volume's) detaches the moment its last opener closes, so without it,
/// removing a stale device-mapper layer would pull the loop device out from under the new one.
/// A loop device attached by [`BlockDevice::open_path`] itself is detached again when the value is
/// dropped (an operation that failed leaves nothing attached) unless [`BlockDevice::keep_while_in_use`]
/// handed it to the mapping above it.
#[derive(Debug)]
pub struct BlockDevice {
    path: PathBuf,
    loop_dev: Option<LoopDevice>,
    /// True if this value attached the loop device (rather than finding it attached).
    attached_here: bool,
    holder: Option<File>,
}

impl BlockDevice {
    /// A block device path is used as is; a regular file is attached to a loop device, reusing an
    /// existing attachment of the same file (same device and inode), so that open is idempotent.
    pub fn open_path(path: &Path) -> Result<BlockDevice, BackendError> {
        let meta = fs::metadata(path).map_err(|e| BackendError::io("stat", path, e))?;
        let ft = meta.file_type();
        let (dev_path, loop_dev, attached_here) = if ft.is_block_device() {
            (path.to_owned(), None, false)
        } else if ft.is_file() {
            let (lo, attached_here) = LoopDevice::find_or_attach_reporting(path, false)?;
            (lo.path().to_owned(), Some(lo), attached_here)
        } else {
            return Err(BackendError::Unsupported(path.to_owned()));
        };
        let mut dev = BlockDevice {
            path: dev_path,
            loop_dev,
            attached_here,
            holder: None,
        };
        // On failure here, Drop detaches what was just attached.
        dev.holder = Some(dev.open()?);
        Ok(dev)
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

    /// Keep a file-backed device attached while something above it (the device-mapper stack) holds
    /// it open, and let the kernel detach it when that last user closes. Call only once the stack is
    /// up: with nothing holding it, the device detaches as soon as this value is gone.
    pub fn keep_while_in_use(mut self) -> Result<(), BackendError> {
        self.attached_here = false;
        match &self.loop_dev {
            Some(lo) => lo.set_autoclear(),
            None => Ok(()),
        }
    }

    /// Give the device back, detaching a loop device this value attached (errors reported, unlike
    /// the silent detach of Drop). A loop device found attached belongs to whoever attached it.
    pub fn release(mut self) -> Result<(), BackendError> {
        self.holder = None;
        let attached_here = std::mem::replace(&mut self.attached_here, false);
        match &self.loop_dev {
            Some(lo) if attached_here => lo.detach(),
            _ => Ok(()),
        }
    }
}

impl Drop for BlockDevice {
    fn drop(&mut self) {
        // Close our descriptor first: the kernel defers a detach while the device is open.
        self.holder = None;
        if !self.attached_here {
            return;
        }
        if let Some(lo) = &self.loop_dev
            && let Err(e) = lo.detach()
        {
            tracing::warn!(loop_dev = %lo.path().display(), error = %e, "could not detach the loop device");
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
