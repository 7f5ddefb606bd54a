//! [`DeviceMapper`] on the real kernel, through the `devicemapper` crate's ioctls, except resume and
//! remove, which carry sealcsi's udev flags and are issued by [`super::udev`].
//!
//! Blocking: call from a blocking context (`spawn_blocking`), not from an async task.
//!
//! Secret hygiene: tables are loaded with DM_SECURE_DATA (the kernel wipes its copy of the ioctl
//! buffer). The `devicemapper` crate copies the parameters into its own buffers, which it does not
//! wipe, and logs the whole table at `trace` level through the `log` crate: keep the `devicemapper`
//! log target below trace, and prefer [`CryptKey::Keyring`](super::CryptKey) keys, which put no
//! secret into the table at all.
#![deny(clippy::undocumented_unsafe_blocks)]

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use devicemapper::{DM, DevId, DmFlags, DmOptions};
use nix::sys::stat::{Mode, SFlag, makedev, mknod};
use tracing::{debug, warn};
use zeroize::Zeroizing;

use super::table::{self, TargetLine};
use super::{DeviceInfo, DeviceMapper, DmError, DmName, MAPPER_DIR, check_uuid};

/// The control node device-mapper is driven through.
pub const CONTROL: &str = "/dev/mapper/control";

/// Device-mapper through the kernel's ioctl interface.
pub struct KernelDm {
    dm: DM,
}

impl std::fmt::Debug for KernelDm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KernelDm")
    }
}

/// The errno of a failed ioctl, if that is what the error is.
fn errno_of(e: &devicemapper::DmError) -> Option<i32> {
    match e {
        devicemapper::DmError::Core(devicemapper::errors::Error::Ioctl(_, _, _, errno)) => {
            Some(**errno as i32)
        }
        _ => None,
    }
}

fn kernel_err(op: &'static str, e: &devicemapper::DmError) -> DmError {
    let message = match errno_of(e) {
        Some(errno) => {
            let hint = if op == "table load" {
                " (the kernel log names the reason)"
            } else {
                ""
            };
            format!("{}{hint}", io::Error::from_raw_os_error(errno))
        }
        // The crate's other errors carry no table parameters either (headers, argument checks).
        None => e.to_string(),
    };
    DmError::Kernel { op, message }
}

fn errno_err(op: &'static str, errno: nix::errno::Errno) -> DmError {
    DmError::Kernel {
        op,
        message: io::Error::from(errno).to_string(),
    }
}

/// How often, and how far apart, a remove that finds the device open is tried.
const REMOVE_TRIES: u32 = 5;
const REMOVE_RETRY_DELAY: std::time::Duration = std::time::Duration::from_millis(200);

fn dm_name(name: &DmName) -> Result<&devicemapper::DmName, DmError> {
    devicemapper::DmName::new(name.as_str()).map_err(|e| DmError::InvalidArgument(e.to_string()))
}

/// The control node, made from sysfs if devtmpfs did not make it.
fn ensure_control_node() -> Result<(), DmError> {
    if Path::new(CONTROL).exists() {
        return Ok(());
    }
    let dev = fs::read_to_string("/sys/class/misc/device-mapper/dev").map_err(|_| {
        DmError::Unavailable(format!("{CONTROL} is missing and dm-mod is not loaded"))
    })?;
    let (major, minor) = super::device_number(Path::new(dev.trim())).map_err(|_| {
        DmError::Unavailable(format!(
            "unexpected device-mapper misc dev {:?}",
            dev.trim()
        ))
    })?;
    fs::create_dir_all(MAPPER_DIR).map_err(DmError::Io)?;
    mknod(
        CONTROL,
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(0o600),
        makedev(u64::from(major), u64::from(minor)),
    )
    .map_err(|e| DmError::Unavailable(format!("cannot make {CONTROL}: {e}")))?;
    Ok(())
}

/// Make `/dev/mapper/<name>` a block node for (major, minor), replacing a stale one. Where udev runs,
/// its device-mapper rules make the same path a symlink to `../dm-N`: one that leads to this device is
/// kept (either may come first: udev does not replace a node it did not make, and sealcsi keeps udev's
/// link), so both end with a working /dev/mapper/<name>.
fn ensure_node(name: &DmName, major: u32, minor: u32) -> Result<(), DmError> {
    let node = name.node();
    let want = makedev(u64::from(major), u64::from(minor));
    match fs::symlink_metadata(&node) {
        Ok(m) if m.file_type().is_block_device() && m.rdev() == want => return Ok(()),
        Ok(m)
            if m.file_type().is_symlink()
                && fs::metadata(&node)
                    .is_ok_and(|t| t.file_type().is_block_device() && t.rdev() == want) =>
        {
            return Ok(());
        }
        Ok(_) => {
            warn!(node = %node.display(), "replacing stale device node");
            fs::remove_file(&node).map_err(DmError::Io)?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(DmError::Io(e)),
    }
    fs::create_dir_all(MAPPER_DIR).map_err(DmError::Io)?;
    match mknod(&node, SFlag::S_IFBLK, Mode::from_bits_truncate(0o600), want) {
        Ok(()) => Ok(()),
        // udev (where there is one) may have made it meanwhile.
        Err(nix::errno::Errno::EEXIST) => Ok(()),
        Err(e) => Err(DmError::Io(io::Error::from(e))),
    }
}

/// Remove `/dev/mapper/<name>` if it is a block device node (never anything else). A symlink is
/// udev's: udev removes it on the device's "remove" uevent.
fn remove_node(name: &DmName) -> Result<(), DmError> {
    let node = name.node();
    match fs::symlink_metadata(&node) {
        Ok(m) if m.file_type().is_symlink() => Ok(()),
        Ok(m) if m.file_type().is_block_device() => match fs::remove_file(&node) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(DmError::Io(e)),
        },
        Ok(_) => {
            warn!(node = %node.display(), "not removing non-device file in /dev/mapper");
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(DmError::Io(e)),
    }
}

impl KernelDm {
    /// Open `/dev/mapper/control` (making the node from sysfs if needed). Fails with
    /// [`DmError::Unavailable`] where device-mapper is absent.
    pub fn new() -> Result<Self, DmError> {
        ensure_control_node()?;
        let dm = DM::new().map_err(|e| DmError::Unavailable(e.to_string()))?;
        Ok(KernelDm { dm })
    }

    fn convert(&self, name: &DmName, info: &devicemapper::DeviceInfo) -> DeviceInfo {
        let dev = info.device();
        DeviceInfo {
            name: name.clone(),
            uuid: info.uuid().map(|u| u.to_string()).filter(|u| !u.is_empty()),
            node: name.node(),
            major: dev.major,
            minor: dev.minor,
            open_count: u32::try_from(info.open_count()).unwrap_or(0),
            suspended: info.flags().contains(DmFlags::DM_SUSPEND),
        }
    }

    /// Table load + resume + node; the device exists already.
    fn load_and_resume(&self, name: &DmName, table: &[TargetLine]) -> Result<DeviceInfo, DmError> {
        let id = DevId::Name(dm_name(name)?);
        // The crate wants plain Strings: wipe them on every path out of here.
        struct Wipe(Vec<(u64, u64, String, String)>);
        impl Drop for Wipe {
            fn drop(&mut self) {
                table::wipe_strings(&mut self.0);
            }
        }
        let raw = Wipe(
            table
                .iter()
                .map(|l| {
                    let (s, len, ty, params) = l.to_raw();
                    // One copy into a String sized exactly, no reallocation.
                    let mut p = String::with_capacity(params.len());
                    p.push_str(&params);
                    (s, len, ty.to_owned(), p)
                })
                .collect(),
        );
        self.dm
            .table_load(
                &id,
                &raw.0,
                DmOptions::default().set_flags(DmFlags::DM_SECURE_DATA),
            )
            .map_err(|e| kernel_err("table load", &e))?;
        drop(raw);
        // Resumed with sealcsi's udev flags (super::udev), not through the crate, which would wait for udev.
        super::udev::resume(self.dm.file(), name).map_err(|e| errno_err("resume", e))?;
        let info = self
            .dm
            .device_info(&id)
            .map_err(|e| kernel_err("info", &e))?;
        let info = self.convert(name, &info);
        ensure_node(name, info.major, info.minor)?;
        Ok(info)
    }
}

impl DeviceMapper for KernelDm {
    fn create(
        &self,
        name: &DmName,
        uuid: &str,
        table: &[TargetLine],
    ) -> Result<DeviceInfo, DmError> {
        table::validate_table(table)?;
        check_uuid(uuid)?;
        let uuid_dm =
            devicemapper::DmUuid::new(uuid).map_err(|e| DmError::InvalidArgument(e.to_string()))?;
        debug!(dm.name = %name, dm.uuid = uuid, lines = table.len(), "creating device-mapper device");
        self.dm
            .device_create(dm_name(name)?, Some(uuid_dm), DmOptions::default())
            .map_err(|e| {
                if errno_of(&e) == Some(nix::libc::EBUSY) {
                    DmError::AlreadyExists(name.to_string())
                } else {
                    kernel_err("create", &e)
                }
            })?;
        match self.load_and_resume(name, table) {
            Ok(info) => Ok(info),
            Err(err) => {
                if let Err(e) = self.remove(name) {
                    warn!(dm.name = %name, error = %e, "could not roll back half-made device");
                }
                Err(err)
            }
        }
    }

    fn remove(&self, name: &DmName) -> Result<(), DmError> {
        // With sealcsi's udev flags (super::udev). EBUSY is retried (5 tries, 200 ms apart): covers a
        // just-closed fd, and a udev worker that still has the device open.
        let mut tries = 0;
        loop {
            tries += 1;
            match super::udev::remove(self.dm.file(), name) {
                Ok(()) | Err(nix::errno::Errno::ENXIO) => break,
                Err(nix::errno::Errno::EBUSY) if tries < REMOVE_TRIES => {
                    std::thread::sleep(REMOVE_RETRY_DELAY);
                }
                Err(nix::errno::Errno::EBUSY) => return Err(DmError::Busy(name.to_string())),
                Err(e) => return Err(errno_err("remove", e)),
            }
        }
        remove_node(name)
    }

    fn info(&self, name: &DmName) -> Result<Option<DeviceInfo>, DmError> {
        match self.dm.device_info(&DevId::Name(dm_name(name)?)) {
            Ok(info) => Ok(Some(self.convert(name, &info))),
            Err(e) if errno_of(&e) == Some(nix::libc::ENXIO) => Ok(None),
            Err(e) => Err(kernel_err("info", &e)),
        }
    }

    fn table(&self, name: &DmName) -> Result<Vec<TargetLine>, DmError> {
        let id = DevId::Name(dm_name(name)?);
        let (_, lines) = self
            .dm
            .table_status(
                &id,
                DmOptions::default().set_flags(DmFlags::DM_STATUS_TABLE),
            )
            .map_err(|e| match errno_of(&e) {
                Some(nix::libc::ENXIO) => DmError::NotFound(name.to_string()),
                _ => kernel_err("table status", &e),
            })?;
        lines
            .into_iter()
            .map(|(start, length, ty, params)| {
                let params = Zeroizing::new(params);
                TargetLine::from_raw(start, length, &ty, &params).map_err(DmError::from)
            })
            .collect()
    }

    fn status(&self, name: &DmName) -> Result<Vec<(u64, u64, String, String)>, DmError> {
        let id = DevId::Name(dm_name(name)?);
        let (_, lines) = self
            .dm
            .table_status(&id, DmOptions::default().set_flags(DmFlags::DM_NOFLUSH))
            .map_err(|e| match errno_of(&e) {
                Some(nix::libc::ENXIO) => DmError::NotFound(name.to_string()),
                _ => kernel_err("status", &e),
            })?;
        Ok(lines)
    }

    fn list(&self) -> Result<Vec<DeviceInfo>, DmError> {
        let devices = self.dm.list_devices().map_err(|e| kernel_err("list", &e))?;
        let mut out = Vec::with_capacity(devices.len());
        for (name, _, _) in devices {
            let name = name.to_string();
            // Names sealcsi would not make are not ours: skip them rather than fail the listing.
            let Ok(name) = DmName::try_from(name.as_str()) else {
                debug!(dm.name = %name, "skipping device with a name outside sealcsi's rules");
                continue;
            };
            // Removed between list and info: skip.
            if let Some(info) = self.info(&name)? {
                out.push(info);
            }
        }
        Ok(out)
    }

    fn version(&self) -> Result<(u32, u32, u32), DmError> {
        self.dm.version().map_err(|e| kernel_err("version", &e))
    }

    fn reload(&self, name: &DmName, table: &[TargetLine]) -> Result<DeviceInfo, DmError> {
        table::validate_table(table)?;
        if self.info(name)?.is_none() {
            return Err(DmError::NotFound(name.to_string()));
        }
        debug!(dm.name = %name, lines = table.len(), "reloading device-mapper table");
        self.load_and_resume(name, table).inspect_err(|_| {
            // A table loaded but not swapped in stays in the inactive slot: drop it.
            let id = DevId::Name(match dm_name(name) {
                Ok(n) => n,
                Err(_) => return,
            });
            if let Err(e) = self.dm.table_clear(&id) {
                warn!(dm.name = %name, error = %kernel_err("table clear", &e), "could not clear the inactive table");
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_fails_cleanly_without_device_mapper() {
        // On this host (and any without dm-mod) this must be a clean Unavailable, not a panic.
        if Path::new(CONTROL).exists() {
            return;
        }
        match KernelDm::new() {
            Err(DmError::Unavailable(msg)) => assert!(!msg.is_empty()),
            other => panic!("expected Unavailable, got {other:?}"),
        }
    }
}
