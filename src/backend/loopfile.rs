//! Loop devices: a regular file attached to `/dev/loopN`, without losetup or udev.
//!
//! Attachments are found again from kernel state (the backing file's device and inode as
//! LOOP_GET_STATUS64 reports them), so opening the same file twice reuses one loop device.
#![deny(clippy::undocumented_unsafe_blocks)]

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::thread::sleep;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::stat::{Mode, SFlag, makedev, mknod};
use tracing::{debug, warn};

use super::BackendError;
use super::sys::{self, LO_FLAGS_DIRECT_IO, LO_FLAGS_READ_ONLY, LOOP_MAJOR, LoopConfig};

/// The loop control node.
pub const LOOP_CONTROL: &str = "/dev/loop-control";
/// Attempts to grab a free loop device when others race for the same one.
const ATTACH_ATTEMPTS: u32 = 16;

/// Serializes find-or-attach within this process (two stagings of one file must not both attach).
static ATTACH_LOCK: Mutex<()> = Mutex::new(());

/// A loop block device `/dev/loopN`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopDevice {
    path: PathBuf,
    number: u32,
}

fn sys_dir(number: u32) -> PathBuf {
    PathBuf::from(format!("/sys/block/loop{number}"))
}

/// "M:m\n" from sysfs.
fn read_devno(path: &Path) -> Option<(u64, u64)> {
    let s = fs::read_to_string(path).ok()?;
    let (a, b) = s.trim().split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// Make a device node if devtmpfs did not. `Ok(())` if it exists with the right number.
fn ensure_node(node: &Path, kind: SFlag, major: u64, minor: u64) -> Result<(), BackendError> {
    let want = makedev(major, minor);
    match fs::metadata(node) {
        Ok(m) if m.rdev() == want => return Ok(()),
        Ok(_) => {
            return Err(BackendError::io(
                "unexpected device number at",
                node,
                io::Error::other("node exists with another device number"),
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(BackendError::io("stat", node, e)),
    }
    match mknod(node, kind, Mode::from_bits_truncate(0o600), want) {
        Ok(()) | Err(Errno::EEXIST) => Ok(()),
        Err(e) => Err(BackendError::io("mknod", node, e.into())),
    }
}

fn open_control() -> Result<File, BackendError> {
    let control = Path::new(LOOP_CONTROL);
    if !control.exists() {
        let (ma, mi) =
            read_devno(Path::new("/sys/class/misc/loop-control/dev")).ok_or_else(|| {
                BackendError::LoopUnavailable(format!("{LOOP_CONTROL} missing and no loop driver"))
            })?;
        ensure_node(control, SFlag::S_IFCHR, ma, mi)?;
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::libc::O_CLOEXEC)
        .open(control)
        .map_err(|e| BackendError::LoopUnavailable(format!("open {LOOP_CONTROL}: {e}")))
}

fn same_file(info: &sys::LoopInfo64, meta: &fs::Metadata) -> bool {
    info.lo_inode == meta.ino() && info.lo_device == meta.dev()
}

impl LoopDevice {
    fn from_number(number: u32) -> Result<LoopDevice, BackendError> {
        let lo = LoopDevice {
            path: PathBuf::from(format!("/dev/loop{number}")),
            number,
        };
        let (ma, mi) = read_devno(&sys_dir(number).join("dev"))
            .unwrap_or((u64::from(LOOP_MAJOR), u64::from(number)));
        ensure_node(&lo.path, SFlag::S_IFBLK, ma, mi)?;
        Ok(lo)
    }

    fn open(&self, write: bool) -> Result<File, BackendError> {
        OpenOptions::new()
            .read(true)
            .write(write)
            .custom_flags(nix::libc::O_CLOEXEC)
            .open(&self.path)
            .map_err(|e| BackendError::io("open", &self.path, e))
    }

    /// Attach `file` to a free loop device, with direct I/O (falling back to buffered if the
    /// backing filesystem refuses). Always a new attachment: see [`Self::find_or_attach`].
    pub fn attach(file: &Path, read_only: bool) -> Result<LoopDevice, BackendError> {
        let file = fs::canonicalize(file).map_err(|e| BackendError::io("resolve", file, e))?;
        let backing = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(nix::libc::O_CLOEXEC)
            .open(&file)
            .map_err(|e| BackendError::io("open", &file, e))?;
        let meta = backing
            .metadata()
            .map_err(|e| BackendError::io("stat", &file, e))?;
        if !meta.file_type().is_file() {
            return Err(BackendError::Unsupported(file));
        }
        let control = open_control()?;

        let fd = u32::try_from(std::os::fd::AsRawFd::as_raw_fd(&backing))
            .map_err(|_| BackendError::io("fd of", &file, io::Error::other("negative fd")))?;
        let mut config = LoopConfig {
            fd,
            ..LoopConfig::default()
        };
        config.info.lo_flags = LO_FLAGS_DIRECT_IO | if read_only { LO_FLAGS_READ_ONLY } else { 0 };
        let name = file.as_os_str().as_bytes();
        let n = name.len().min(sys::LO_NAME_SIZE - 1);
        config.info.lo_file_name[..n].copy_from_slice(&name[..n]);

        for attempt in 1..=ATTACH_ATTEMPTS {
            let number = sys::loop_ctl_get_free(control.as_fd()).map_err(|e| {
                BackendError::ioctl("LOOP_CTL_GET_FREE", Path::new(LOOP_CONTROL), e)
            })?;
            let lo = LoopDevice::from_number(number)?;
            let dev = lo.open(!read_only)?;
            match sys::loop_configure(dev.as_fd(), &config) {
                Ok(()) => {}
                // Another attacher took this device between GET_FREE and CONFIGURE.
                Err(Errno::EBUSY) => {
                    debug!(loop_dev = %lo.path.display(), attempt, "loop device taken meanwhile, retrying");
                    sleep(Duration::from_millis(10 * u64::from(attempt)));
                    continue;
                }
                Err(Errno::EINVAL) if config.info.lo_flags & LO_FLAGS_DIRECT_IO != 0 => {
                    warn!(file = %file.display(), "loop direct I/O refused, attaching with buffered I/O");
                    config.info.lo_flags &= !LO_FLAGS_DIRECT_IO;
                    continue;
                }
                Err(e) => return Err(BackendError::ioctl("LOOP_CONFIGURE", &lo.path, e)),
            }
            match sys::loop_get_status64(dev.as_fd()) {
                Ok(info)
                    if config.info.lo_flags & LO_FLAGS_DIRECT_IO != 0
                        && info.lo_flags & LO_FLAGS_DIRECT_IO == 0 =>
                {
                    // The kernel silently falls back when the backing fs cannot do O_DIRECT.
                    warn!(file = %file.display(), loop_dev = %lo.path.display(), "loop device runs without direct I/O");
                }
                Ok(_) => {}
                Err(e) => {
                    warn!(loop_dev = %lo.path.display(), error = %e, "LOOP_GET_STATUS64 after attach failed")
                }
            }
            debug!(file = %file.display(), loop_dev = %lo.path.display(), "attached loop device");
            return Ok(lo);
        }
        Err(BackendError::NoFreeLoop(ATTACH_ATTEMPTS))
    }

    /// The loop device `file` is attached to (the lowest-numbered if several), from kernel state.
    pub fn find(file: &Path) -> Result<Option<LoopDevice>, BackendError> {
        let meta = fs::metadata(file).map_err(|e| BackendError::io("stat", file, e))?;
        let entries = match fs::read_dir("/sys/block") {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(BackendError::io("list", Path::new("/sys/block"), e)),
        };
        let mut numbers: Vec<u32> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str()?.strip_prefix("loop")?.parse().ok())
            .collect();
        numbers.sort_unstable();
        for number in numbers {
            // Only bound devices have loop/backing_file.
            if !sys_dir(number).join("loop/backing_file").exists() {
                continue;
            }
            let lo = LoopDevice::from_number(number)?;
            let Ok(dev) = lo.open(false) else { continue };
            match sys::loop_get_status64(dev.as_fd()) {
                Ok(info) if same_file(&info, &meta) => return Ok(Some(lo)),
                Ok(_) | Err(Errno::ENXIO) => {}
                Err(e) => return Err(BackendError::ioctl("LOOP_GET_STATUS64", &lo.path, e)),
            }
        }
        Ok(None)
    }

    /// [`Self::find`], else [`Self::attach`], atomically within this process.
    pub fn find_or_attach(file: &Path, read_only: bool) -> Result<LoopDevice, BackendError> {
        Self::find_or_attach_reporting(file, read_only).map(|(lo, _)| lo)
    }

    /// [`Self::find_or_attach`], also saying whether it attached (true) or found (false) the device.
    pub fn find_or_attach_reporting(
        file: &Path,
        read_only: bool,
    ) -> Result<(LoopDevice, bool), BackendError> {
        let _guard = ATTACH_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        match Self::find(file)? {
            Some(lo) => Ok((lo, false)),
            None => Self::attach(file, read_only).map(|lo| (lo, true)),
        }
    }

    /// The loop device at `dev` (any node of it) if it is bound to a file; `Ok(None)` if unbound;
    /// [`BackendError::NotLoop`] if `dev` is not a whole loop device.
    pub fn find_by_path(dev: &Path) -> Result<Option<LoopDevice>, BackendError> {
        let meta = fs::metadata(dev).map_err(|e| BackendError::io("stat", dev, e))?;
        let rdev = meta.rdev();
        if !meta.file_type().is_block_device()
            || nix::sys::stat::major(rdev) != u64::from(LOOP_MAJOR)
        {
            return Err(BackendError::NotLoop(dev.to_owned()));
        }
        let link = format!(
            "/sys/dev/block/{}:{}",
            nix::sys::stat::major(rdev),
            nix::sys::stat::minor(rdev)
        );
        let target =
            fs::read_link(&link).map_err(|e| BackendError::io("resolve", Path::new(&link), e))?;
        let number = target
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("loop"))
            .and_then(|n| n.parse::<u32>().ok())
            .ok_or_else(|| BackendError::NotLoop(dev.to_owned()))?;
        let lo = LoopDevice::from_number(number)?;
        Ok(lo.is_attached().then_some(lo))
    }

    /// Lets the kernel detach this device by itself when its last user (the device-mapper stack
    /// over it) closes it, so that closing a volume needs no bookkeeping of who attached what.
    pub fn set_autoclear(&self) -> Result<(), BackendError> {
        let dev = self.open(false)?;
        let mut info = sys::loop_get_status64(dev.as_fd())
            .map_err(|e| BackendError::ioctl("LOOP_GET_STATUS64", &self.path, e))?;
        if info.lo_flags & sys::LO_FLAGS_AUTOCLEAR != 0 {
            return Ok(());
        }
        info.lo_flags |= sys::LO_FLAGS_AUTOCLEAR;
        sys::loop_set_status64(dev.as_fd(), &info)
            .map_err(|e| BackendError::ioctl("LOOP_SET_STATUS64", &self.path, e))
    }

    /// Makes the device take the backing file's current size (LOOP_SET_CAPACITY), after the file grew.
    pub fn set_capacity(&self) -> Result<(), BackendError> {
        let dev = self.open(false)?;
        sys::loop_set_capacity(dev.as_fd())
            .map_err(|e| BackendError::ioctl("LOOP_SET_CAPACITY", &self.path, e))
    }

    /// Whether the kernel will detach this device when its last user closes it.
    pub fn autoclear(&self) -> Option<bool> {
        let s = fs::read_to_string(sys_dir(self.number).join("loop/autoclear")).ok()?;
        Some(s.trim() == "1")
    }

    /// Whether a file is bound to this device now.
    pub fn is_attached(&self) -> bool {
        sys_dir(self.number).join("loop/backing_file").exists()
    }

    /// Detach the backing file. `Ok(())` if already detached; [`BackendError::Busy`] while a
    /// mapping (or partition, mount) holds the device, instead of the kernel's deferred detach.
    pub fn detach(&self) -> Result<(), BackendError> {
        if !self.is_attached() {
            return Ok(());
        }
        let holders = fs::read_dir(sys_dir(self.number).join("holders"))
            .map(|d| d.filter_map(|e| e.ok()).count())
            .unwrap_or(0);
        if holders > 0 {
            return Err(BackendError::Busy(self.path.clone()));
        }
        {
            let dev = self.open(false)?;
            let mut tries = 0;
            loop {
                match sys::loop_clr_fd(dev.as_fd()) {
                    Ok(()) | Err(Errno::ENXIO) => break,
                    Err(Errno::EBUSY) if tries < 20 => {
                        tries += 1;
                        sleep(Duration::from_millis(50));
                    }
                    Err(Errno::EBUSY) => return Err(BackendError::Busy(self.path.clone())),
                    Err(e) => return Err(BackendError::ioctl("LOOP_CLR_FD", &self.path, e)),
                }
            }
            // The kernel finishes the detach when the last opener (this fd) closes.
        }
        for _ in 0..100 {
            if !self.is_attached() {
                return Ok(());
            }
            sleep(Duration::from_millis(10));
        }
        Err(BackendError::Busy(self.path.clone()))
    }

    /// Whether the kernel runs this loop device with direct I/O (sysfs `loop/dio`); `None` if
    /// unknown (not attached).
    pub fn direct_io(&self) -> Option<bool> {
        let s = fs::read_to_string(sys_dir(self.number).join("loop/dio")).ok()?;
        Some(s.trim() == "1")
    }

    /// Whether the device is read-only (sysfs `ro`).
    pub fn read_only(&self) -> Option<bool> {
        let s = fs::read_to_string(sys_dir(self.number).join("ro")).ok()?;
        Some(s.trim() == "1")
    }

    /// `/dev/loopN`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// N.
    pub fn number(&self) -> u32 {
        self.number
    }

    /// The backing file as the kernel records it (sysfs `loop/backing_file`).
    pub fn backing_file(&self) -> Result<PathBuf, BackendError> {
        let p = sys_dir(self.number).join("loop/backing_file");
        let s = fs::read(&p).map_err(|e| BackendError::io("read", &p, e))?;
        let s = s.strip_suffix(b"\n").unwrap_or(&s);
        Ok(PathBuf::from(std::ffi::OsStr::from_bytes(s)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn find_by_path_rejects_non_loop_devices() {
        let f = tempfile::NamedTempFile::new().unwrap();
        assert!(matches!(
            LoopDevice::find_by_path(f.path()),
            Err(BackendError::NotLoop(_))
        ));
        assert!(matches!(
            LoopDevice::find_by_path(Path::new("/nonexistent")),
            Err(BackendError::Io { .. })
        ));
    }

    #[test]
    fn find_returns_none_for_an_unattached_file() {
        let f = tempfile::NamedTempFile::new().unwrap();
        assert_eq!(LoopDevice::find(f.path()).unwrap(), None);
    }

    #[test]
    fn attach_refuses_what_is_not_a_file() {
        let d = tempfile::tempdir().unwrap();
        // A directory: refused before any loop device is touched (open of a dir for writing fails).
        assert!(LoopDevice::attach(d.path(), false).is_err());
        assert!(LoopDevice::attach(&d.path().join("missing"), false).is_err());
    }
}
