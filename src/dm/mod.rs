//! Device-mapper mappings: typed tables ([`table`]), the [`DeviceMapper`] trait, its kernel
//! implementation ([`kernel::KernelDm`], ioctls through the `devicemapper` crate) and an in-memory
//! one for host tests ([`memory::MemoryDm`]).
//!
//! sealcsi needs no udev: the kernel makes `/dev/dm-N` (devtmpfs) but not `/dev/mapper/<name>`, so
//! [`kernel::KernelDm`] makes and removes those nodes itself. Where udev runs, sealcsi's devices carry
//! the DM udev flags that keep udev's disk and other rules (blkid) off them ([`udev`]).
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod kernel;
pub mod memory;
pub mod table;
pub mod udev;

use std::fmt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

pub use kernel::KernelDm;
pub use memory::MemoryDm;
pub use table::{
    CryptCipher, CryptKey, CryptTarget, IntegrityTarget, JournalMode, TableError, Target,
    TargetLine,
};

/// Where device nodes of mapped devices are expected.
pub const MAPPER_DIR: &str = "/dev/mapper";

/// Longest name the kernel takes (DM_NAME_LEN 128 with the NUL).
pub const MAX_NAME_LEN: usize = 127;
/// Longest uuid the kernel takes (DM_UUID_LEN 129 with the NUL).
pub const MAX_UUID_LEN: usize = 128;

/// Errors of device-mapper operations. Messages never contain table parameters.
#[derive(Debug, thiserror::Error)]
pub enum DmError {
    /// The device does not exist.
    #[error("device-mapper device {0} not found")]
    NotFound(String),
    /// The device is open (mounted, held by another mapping, an open fd).
    #[error("device-mapper device {0} is busy (open)")]
    Busy(String),
    /// A device with this name (or uuid) already exists.
    #[error("device-mapper device {0} already exists (name or uuid in use)")]
    AlreadyExists(String),
    /// The table was refused before reaching the kernel, or the kernel's table did not parse.
    #[error("invalid device-mapper table: {0}")]
    InvalidTable(String),
    /// A name or uuid that device-mapper (or sealcsi) does not accept.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// device-mapper is not usable here (no /dev/mapper/control, no dm-mod).
    #[error("device-mapper unavailable: {0}")]
    Unavailable(String),
    /// An ioctl failed. For table loads the kernel log (dmesg) has the target's reason.
    #[error("device-mapper {op} failed: {message}")]
    Kernel { op: &'static str, message: String },
    /// Filesystem work around the mapping (device nodes) failed.
    #[error("device node I/O: {0}")]
    Io(#[source] std::io::Error),
}

impl From<TableError> for DmError {
    fn from(e: TableError) -> Self {
        DmError::InvalidTable(e.to_string())
    }
}

/// A validated device-mapper name: 1..=127 bytes of `[A-Za-z0-9._+-]`, not `.` or `..`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DmName(String);

impl DmName {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `/dev/mapper/<name>`.
    pub fn node(&self) -> PathBuf {
        Path::new(MAPPER_DIR).join(&self.0)
    }
}

impl TryFrom<&str> for DmName {
    type Error = DmError;
    fn try_from(s: &str) -> Result<Self, DmError> {
        let ok_chars = s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._+-".contains(&b));
        if s.is_empty() || s.len() > MAX_NAME_LEN || !ok_chars || s == "." || s == ".." {
            return Err(DmError::InvalidArgument(format!(
                "device-mapper name must be 1..={MAX_NAME_LEN} characters of [A-Za-z0-9._+-], not . or .. (got {} bytes)",
                s.len()
            )));
        }
        Ok(DmName(s.to_owned()))
    }
}

impl TryFrom<String> for DmName {
    type Error = DmError;
    fn try_from(s: String) -> Result<Self, DmError> {
        DmName::try_from(s.as_str())
    }
}

impl fmt::Display for DmName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for DmName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DmName({:?})", self.0)
    }
}

impl AsRef<str> for DmName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// Check a device-mapper uuid: 1..=128 printable ASCII bytes without spaces.
pub fn check_uuid(uuid: &str) -> Result<(), DmError> {
    if uuid.is_empty() || uuid.len() > MAX_UUID_LEN || !uuid.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(DmError::InvalidArgument(format!(
            "device-mapper uuid must be 1..={MAX_UUID_LEN} printable characters without spaces"
        )));
    }
    Ok(())
}

/// What device-mapper says about one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub name: DmName,
    pub uuid: Option<String>,
    /// `/dev/mapper/<name>`.
    pub node: PathBuf,
    pub major: u32,
    pub minor: u32,
    pub open_count: u32,
    pub suspended: bool,
}

/// The device-mapper operations sealcsi needs. One kernel implementation, one in-memory.
pub trait DeviceMapper: Send + Sync {
    /// Create `name` with `uuid`, load `table` with DM_SECURE_DATA (tables may carry keys), resume,
    /// and make sure /dev/mapper/<name> exists (mknod from the device number; removed by remove()).
    /// On any failure after the device was created, it is removed again.
    fn create(
        &self,
        name: &DmName,
        uuid: &str,
        table: &[TargetLine],
    ) -> Result<DeviceInfo, DmError>;
    /// Remove; Ok(()) if it does not exist (idempotent); Busy if open. Retries briefly on EBUSY.
    fn remove(&self, name: &DmName) -> Result<(), DmError>;
    fn info(&self, name: &DmName) -> Result<Option<DeviceInfo>, DmError>;
    /// The live table parsed back into typed lines. Devices come back as `major:minor`, the crypt
    /// key as the kernel shows it (`:96:logon:desc` or hex). See [`tables_match`].
    fn table(&self, name: &DmName) -> Result<Vec<TargetLine>, DmError>;
    /// Raw status lines (start, length, target type, status string).
    fn status(&self, name: &DmName) -> Result<Vec<(u64, u64, String, String)>, DmError>;
    fn list(&self) -> Result<Vec<DeviceInfo>, DmError>;
    /// Driver version, also the "is device-mapper usable" probe.
    fn version(&self) -> Result<(u32, u32, u32), DmError>;
    /// Replace the live table of existing device `name` (load into the inactive slot with
    /// DM_SECURE_DATA, then resume, which suspends, swaps and resumes): how a mapping is resized.
    /// NotFound if the device does not exist; on failure the live table stays.
    fn reload(&self, name: &DmName, table: &[TargetLine]) -> Result<DeviceInfo, DmError>;
}

/// dm-integrity's status line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IntegrityStatus {
    /// Tag mismatches dm-integrity saw itself. Stays 0 in AEAD mode: dm-crypt checks the tags
    /// there (failures appear as EILSEQ/EIO and "INTEGRITY AEAD ERROR" in the kernel log).
    pub mismatches: u64,
    /// Usable data sectors (512-byte) the formatted device provides.
    pub provided_data_sectors: u64,
    /// Progress of a recalculation, if one runs (`-` otherwise).
    pub recalc_sector: Option<u64>,
}

/// Parse dm-integrity's status: `<mismatches> <provided_data_sectors> <recalc_sector|->`.
pub fn integrity_status(status: &str) -> Result<IntegrityStatus, DmError> {
    let bad = || {
        DmError::InvalidTable(format!(
            "unexpected integrity status ({} bytes)",
            status.len()
        ))
    };
    let num = |t: &str| -> Result<u64, DmError> {
        if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        t.parse().map_err(|_| bad())
    };
    let tokens: Vec<&str> = status.split_ascii_whitespace().collect();
    let [m, p, r] = tokens.as_slice() else {
        return Err(bad());
    };
    Ok(IntegrityStatus {
        mismatches: num(m)?,
        provided_data_sectors: num(p)?,
        recalc_sector: if *r == "-" { None } else { Some(num(r)?) },
    })
}

/// The (major, minor) of a device given as the kernel's `major:minor` or as a block device path.
pub fn device_number(device: &Path) -> Result<(u32, u32), DmError> {
    if let Some(s) = device.to_str()
        && let Some((a, b)) = s.split_once(':')
        && let (Ok(a), Ok(b)) = (a.parse::<u32>(), b.parse::<u32>())
    {
        return Ok((a, b));
    }
    let meta = std::fs::metadata(device).map_err(DmError::Io)?;
    if !meta.file_type().is_block_device() {
        return Err(DmError::InvalidArgument(format!(
            "{} is not a block device",
            device.display()
        )));
    }
    let rdev = meta.rdev();
    Ok((
        nix::sys::stat::major(rdev) as u32,
        nix::sys::stat::minor(rdev) as u32,
    ))
}

/// Whether the live table `live` (as [`DeviceMapper::table`] returns it) is the table `wanted`:
/// devices compared by device number, everything else (keys included) exactly. Use it to make
/// create idempotent from observed state.
pub fn tables_match(wanted: &[TargetLine], live: &[TargetLine]) -> Result<bool, DmError> {
    if wanted.len() != live.len() {
        return Ok(false);
    }
    for (w, l) in wanted.iter().zip(live) {
        let (mut w, mut l) = (w.clone(), l.clone());
        for line in [&mut w, &mut l] {
            let (a, b) = device_number(line.target.device())?;
            line.target.set_device(PathBuf::from(format!("{a}:{b}")));
        }
        if w != l {
            return Ok(false);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "sealcsi-pvc_1.x+y", &"n".repeat(127)] {
            assert_eq!(DmName::try_from(ok).unwrap().as_str(), ok);
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a b",
            "é",
            "a:b",
            &"n".repeat(128),
            "control\0",
        ] {
            assert!(DmName::try_from(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            DmName::try_from("x").unwrap().node(),
            PathBuf::from("/dev/mapper/x")
        );
    }

    #[test]
    fn uuids() {
        assert!(check_uuid("SEALCSI-abc-123").is_ok());
        assert!(check_uuid("").is_err());
        assert!(check_uuid("a b").is_err());
        assert!(check_uuid(&"u".repeat(129)).is_err());
    }

    #[test]
    fn integrity_status_parses() {
        assert_eq!(
            integrity_status("0 2064384 -").unwrap(),
            IntegrityStatus {
                mismatches: 0,
                provided_data_sectors: 2064384,
                recalc_sector: None
            }
        );
        assert_eq!(integrity_status("3 8 16").unwrap().recalc_sector, Some(16));
        for bad in [
            "",
            "0 1",
            "0 1 - x",
            "a 1 -",
            "0 -1 -",
            "0 1 x",
            "99999999999999999999 1 -",
        ] {
            assert!(integrity_status(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn device_numbers() {
        assert_eq!(device_number(Path::new("253:7")).unwrap(), (253, 7));
        assert!(device_number(Path::new("/nonexistent/device")).is_err());
        assert!(device_number(Path::new("/")).is_err());
    }

    #[test]
    fn tables_match_by_device_number() {
        let line = |dev: &str, tag| TargetLine {
            start: 0,
            length: 8,
            target: Target::Integrity(IntegrityTarget {
                device: dev.into(),
                offset_sectors: 0,
                tag_size: tag,
                mode: JournalMode::Journal,
                block_size: 4096,
                fix_padding: true,
                journal_sectors: None,
            }),
        };
        assert!(tables_match(&[line("7:0", 48)], &[line("7:0", 48)]).unwrap());
        assert!(!tables_match(&[line("7:0", 48)], &[line("7:1", 48)]).unwrap());
        assert!(!tables_match(&[line("7:0", 48)], &[line("7:0", 32)]).unwrap());
        assert!(!tables_match(&[line("7:0", 48)], &[]).unwrap());
    }
}
