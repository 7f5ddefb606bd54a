//! In-memory [`DeviceMapper`] for host tests of the layers above. It validates tables exactly as
//! [`KernelDm`](super::KernelDm) does before the kernel sees them, keeps names and uuids unique,
//! and lets tests simulate open devices and ioctl failures. Never what a user runs: it maps nothing.
#![deny(clippy::undocumented_unsafe_blocks)]

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use super::table::{self, Target, TargetLine};
use super::{DeviceInfo, DeviceMapper, DmError, DmName, check_uuid};

/// Major number device-mapper devices get in [`MemoryDm`].
pub const MEMORY_DM_MAJOR: u32 = 253;

/// An operation of [`MemoryDm`], for [`MemoryDm::fail_next`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum MemoryOp {
    Create,
    Remove,
    Info,
    Table,
    Status,
    List,
    Version,
    Reload,
}

#[derive(Debug)]
struct Device {
    uuid: String,
    minor: u32,
    table: Vec<TargetLine>,
    open_count: u32,
    suspended: bool,
}

#[derive(Debug, Default)]
struct State {
    devices: BTreeMap<String, Device>,
    fail: Vec<MemoryOp>,
}

/// The in-memory device-mapper.
#[derive(Debug, Default)]
pub struct MemoryDm {
    state: Mutex<State>,
}

impl MemoryDm {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A test that panicked while holding the lock must not poison the others' view.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Simulate holders of the device (a mount, a mapping above): remove() then fails with Busy.
    pub fn set_open_count(&self, name: &DmName, open_count: u32) -> Result<(), DmError> {
        let mut st = self.lock();
        let dev = st
            .devices
            .get_mut(name.as_str())
            .ok_or_else(|| DmError::NotFound(name.to_string()))?;
        dev.open_count = open_count;
        Ok(())
    }

    /// Make the next call of `op` fail with [`DmError::Kernel`] (once per call of this fn).
    pub fn fail_next(&self, op: MemoryOp) {
        self.lock().fail.push(op);
    }

    fn check_fail(st: &mut State, op: MemoryOp, name: &'static str) -> Result<(), DmError> {
        if let Some(i) = st.fail.iter().position(|o| *o == op) {
            st.fail.remove(i);
            return Err(DmError::Kernel {
                op: name,
                message: "injected failure (MemoryDm)".into(),
            });
        }
        Ok(())
    }

    fn info_of(name: &str, dev: &Device) -> DeviceInfo {
        let name = DmName::try_from(name).expect("stored names were validated");
        DeviceInfo {
            node: name.node(),
            name,
            uuid: Some(dev.uuid.clone()),
            major: MEMORY_DM_MAJOR,
            minor: dev.minor,
            open_count: dev.open_count,
            suspended: dev.suspended,
        }
    }
}

impl DeviceMapper for MemoryDm {
    fn create(
        &self,
        name: &DmName,
        uuid: &str,
        table: &[TargetLine],
    ) -> Result<DeviceInfo, DmError> {
        table::validate_table(table)?;
        check_uuid(uuid)?;
        let mut st = self.lock();
        if st.devices.contains_key(name.as_str()) || st.devices.values().any(|d| d.uuid == uuid) {
            return Err(DmError::AlreadyExists(name.to_string()));
        }
        // A failure here stands for a refused table load: like the kernel impl, nothing remains.
        Self::check_fail(&mut st, MemoryOp::Create, "table load")?;
        // As the kernel: the lowest free minor, so minors are reused.
        let minor = (0..)
            .find(|m| !st.devices.values().any(|d| d.minor == *m))
            .expect("fewer than 2^32 devices");
        let dev = Device {
            uuid: uuid.to_owned(),
            minor,
            table: table.to_vec(),
            open_count: 0,
            suspended: false,
        };
        let info = Self::info_of(name.as_str(), &dev);
        st.devices.insert(name.as_str().to_owned(), dev);
        Ok(info)
    }

    fn remove(&self, name: &DmName) -> Result<(), DmError> {
        let mut st = self.lock();
        Self::check_fail(&mut st, MemoryOp::Remove, "remove")?;
        match st.devices.get(name.as_str()) {
            None => Ok(()),
            Some(d) if d.open_count > 0 => Err(DmError::Busy(name.to_string())),
            Some(_) => {
                st.devices.remove(name.as_str());
                Ok(())
            }
        }
    }

    fn info(&self, name: &DmName) -> Result<Option<DeviceInfo>, DmError> {
        let mut st = self.lock();
        Self::check_fail(&mut st, MemoryOp::Info, "info")?;
        Ok(st
            .devices
            .get(name.as_str())
            .map(|d| Self::info_of(name.as_str(), d)))
    }

    fn table(&self, name: &DmName) -> Result<Vec<TargetLine>, DmError> {
        let mut st = self.lock();
        Self::check_fail(&mut st, MemoryOp::Table, "table status")?;
        st.devices
            .get(name.as_str())
            .map(|d| d.table.clone())
            .ok_or_else(|| DmError::NotFound(name.to_string()))
    }

    fn status(&self, name: &DmName) -> Result<Vec<(u64, u64, String, String)>, DmError> {
        let mut st = self.lock();
        Self::check_fail(&mut st, MemoryOp::Status, "status")?;
        let dev = st
            .devices
            .get(name.as_str())
            .ok_or_else(|| DmError::NotFound(name.to_string()))?;
        Ok(dev
            .table
            .iter()
            .map(|l| {
                let status = match &l.target {
                    // No superblock here: report the mapped length as the provided sectors.
                    Target::Integrity(_) => format!("0 {} -", l.length),
                    Target::Crypt(_) => String::new(),
                };
                (l.start, l.length, l.target.target_type().to_owned(), status)
            })
            .collect())
    }

    fn list(&self) -> Result<Vec<DeviceInfo>, DmError> {
        let mut st = self.lock();
        Self::check_fail(&mut st, MemoryOp::List, "list")?;
        Ok(st
            .devices
            .iter()
            .map(|(n, d)| Self::info_of(n, d))
            .collect())
    }

    fn version(&self) -> Result<(u32, u32, u32), DmError> {
        let mut st = self.lock();
        Self::check_fail(&mut st, MemoryOp::Version, "version")?;
        Ok((4, 47, 0))
    }

    fn reload(&self, name: &DmName, table: &[TargetLine]) -> Result<DeviceInfo, DmError> {
        table::validate_table(table)?;
        let mut st = self.lock();
        Self::check_fail(&mut st, MemoryOp::Reload, "table load")?;
        let dev = st
            .devices
            .get_mut(name.as_str())
            .ok_or_else(|| DmError::NotFound(name.to_string()))?;
        dev.table = table.to_vec();
        Ok(Self::info_of(name.as_str(), dev))
    }
}

#[cfg(test)]
mod tests {
    use super::super::integrity_status;
    use super::super::table::{CryptCipher, CryptKey, CryptTarget, IntegrityTarget, JournalMode};
    use super::*;

    fn name(s: &str) -> DmName {
        DmName::try_from(s).unwrap()
    }

    fn table() -> Vec<TargetLine> {
        vec![TargetLine {
            start: 0,
            length: 1024,
            target: Target::Integrity(IntegrityTarget {
                device: "/dev/loop0".into(),
                offset_sectors: 0,
                tag_size: 48,
                mode: JournalMode::Journal,
                block_size: 4096,
                fix_padding: true,
                journal_sectors: None,
            }),
        }]
    }

    #[test]
    fn lifecycle() {
        let dm = MemoryDm::new();
        let n = name("vol-i");
        assert_eq!(dm.info(&n).unwrap(), None);
        let info = dm.create(&n, "SEALCSI-1", &table()).unwrap();
        assert_eq!(info.node, std::path::PathBuf::from("/dev/mapper/vol-i"));
        assert_eq!(dm.info(&n).unwrap(), Some(info));
        assert_eq!(dm.table(&n).unwrap(), table());
        let st = dm.status(&n).unwrap();
        assert_eq!(
            integrity_status(&st[0].3).unwrap().provided_data_sectors,
            1024
        );
        assert!(matches!(
            dm.create(&n, "SEALCSI-2", &table()),
            Err(DmError::AlreadyExists(_))
        ));
        assert!(matches!(
            dm.create(&name("other"), "SEALCSI-1", &table()),
            Err(DmError::AlreadyExists(_))
        ));
        assert_eq!(dm.list().unwrap().len(), 1);
        dm.set_open_count(&n, 1).unwrap();
        assert!(matches!(dm.remove(&n), Err(DmError::Busy(_))));
        dm.set_open_count(&n, 0).unwrap();
        dm.remove(&n).unwrap();
        dm.remove(&n).unwrap();
        assert!(matches!(dm.table(&n), Err(DmError::NotFound(_))));
    }

    #[test]
    fn refuses_bad_tables_and_leaves_nothing() {
        let dm = MemoryDm::new();
        let n = name("x");
        let bad = vec![TargetLine {
            start: 0,
            length: 8,
            target: Target::Crypt(CryptTarget {
                cipher: CryptCipher::AuthencHmacSha256XtsPlainRandom,
                key: CryptKey::Hex(zeroize::Zeroizing::new(vec![0; 64])),
                key_len: 64,
                iv_offset: 0,
                device: "/dev/mapper/i".into(),
                offset_sectors: 0,
                integrity_tag_size: Some(48),
                sector_size: 4096,
                no_read_workqueue: true,
                no_write_workqueue: true,
            }),
        }];
        assert!(matches!(
            dm.create(&n, "U", &bad),
            Err(DmError::InvalidTable(_))
        ));
        dm.fail_next(MemoryOp::Create);
        assert!(matches!(
            dm.create(&n, "U", &table()),
            Err(DmError::Kernel { .. })
        ));
        assert_eq!(dm.info(&n).unwrap(), None);
        dm.create(&n, "U", &table()).unwrap();
    }

    #[test]
    fn reload_replaces_the_table_of_an_existing_device() {
        let dm = MemoryDm::new();
        let n = name("r");
        let mut bigger = table();
        bigger[0].length = 2048;
        assert!(matches!(dm.reload(&n, &bigger), Err(DmError::NotFound(_))));
        dm.create(&n, "R", &table()).unwrap();
        dm.fail_next(MemoryOp::Reload);
        assert!(dm.reload(&n, &bigger).is_err());
        assert_eq!(dm.table(&n).unwrap(), table());
        dm.reload(&n, &bigger).unwrap();
        assert_eq!(dm.table(&n).unwrap(), bigger);
        assert_eq!(
            integrity_status(&dm.status(&n).unwrap()[0].3)
                .unwrap()
                .provided_data_sectors,
            2048
        );
    }
}
