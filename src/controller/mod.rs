//! The controller core: creates, deletes, lists and sizes the node-local volumes of the [`Store`]. No
//! gRPC types here; `crate::csi::controller` is a thin layer over [`Provisioner`]. The node core never
//! imports this module.
//!
//! Idempotency comes from what is on disk: a volume's id is derived from its CreateVolume name
//! ([`VolumeId::for_name`]), so a retried create finds the record of the first one.

mod list;
pub mod stacked;

use std::fmt;
use std::sync::Arc;

use crate::clock::now_unix;
use crate::dm::{DeviceMapper, DmError};
use crate::error::{Classify, Kind};
use crate::header::FsKind;
use crate::store::sizing::{device_bytes_for_usable, usable_bytes_of_device, usable_for_range};
use crate::store::{Store, StoreError, VolumeId, VolumeInfo, VolumeParams, VolumeRecord};
use crate::volume::health::{self, Check, Condition};
use crate::volume::{VolumeError, header_io};
pub use list::Page;

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The request is malformed.
    #[error("{0}")]
    InvalidArgument(String),
    /// A volume of this name exists with different parameters or an incompatible size.
    #[error("volume {name} already exists with {what}")]
    AlreadyExists { name: String, what: String },
    /// The volume is in a state that forbids the operation (staged, open).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A ListVolumes starting token this plugin did not hand out.
    #[error("invalid starting token {0:?}")]
    BadToken(String),
    #[error(transparent)]
    Dm(#[from] DmError),
    /// The crypto-erase of a deleted volume failed.
    #[error(transparent)]
    Erase(#[from] VolumeError),
}

impl Classify for ControllerError {
    fn kind(&self) -> Kind {
        match self {
            ControllerError::Store(e) => e.kind(),
            ControllerError::InvalidArgument(_) => Kind::InvalidArgument,
            ControllerError::AlreadyExists { .. } => Kind::AlreadyExists,
            ControllerError::FailedPrecondition(_) => Kind::FailedPrecondition,
            ControllerError::BadToken(_) => Kind::Aborted,
            // Asking the kernel whether a volume is open, or erasing it, failed: nothing the caller did.
            ControllerError::Dm(_) | ControllerError::Erase(_) => Kind::Internal,
        }
    }
}

/// What [`Provisioner::create`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Created {
    New(VolumeInfo),
    Existing(VolumeInfo),
}

impl Created {
    pub fn info(&self) -> &VolumeInfo {
        match self {
            Created::New(v) | Created::Existing(v) => v,
        }
    }
}

/// The controller core.
pub struct Provisioner {
    store: Store,
    dm: Arc<dyn DeviceMapper>,
    /// The snapshots of ListVolumes walks in progress.
    walks: list::Walks,
}

impl fmt::Debug for Provisioner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Provisioner")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

impl Provisioner {
    /// `dm` is used to tell whether a volume is open on this node (its mapping exists).
    pub fn new(store: Store, dm: Arc<dyn DeviceMapper>) -> Self {
        Self {
            store,
            dm,
            walks: list::Walks::default(),
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Creates volume `name` (or finds the one a previous identical call created). Its capacity is the
    /// usable size for the range ([`usable_for_range`]), its backing file the device size for that
    /// ([`device_bytes_for_usable`]), which is what the budget reserves. `fs` is the filesystem the CO
    /// will stage it with, if it said: an xfs volume is at least
    /// [`crate::store::sizing::XFS_MIN_USABLE_BYTES`] (rounded up to it, or OUT_OF_RANGE when `limit`
    /// forbids that).
    pub fn create(
        &self,
        name: &str,
        required: u64,
        limit: u64,
        params: VolumeParams,
        fs: Option<FsKind>,
    ) -> Result<Created, ControllerError> {
        if name.is_empty() {
            return Err(ControllerError::InvalidArgument(
                "volume name is empty".into(),
            ));
        }
        let id = VolumeId::for_name(name);
        if let Some(record) = self.store.record(&id)? {
            if record.name != name {
                return Err(ControllerError::AlreadyExists {
                    name: name.into(),
                    what: format!("a name hashing to the same id ({id})"),
                });
            }
            if record.parameters != params {
                return Err(ControllerError::AlreadyExists {
                    name: name.into(),
                    what: format!("different parameters ({:?})", record.parameters),
                });
            }
            let info = self.store.get(&id)?;
            let fits =
                info.capacity_bytes >= required && (limit == 0 || info.capacity_bytes <= limit);
            if !fits {
                return Err(ControllerError::AlreadyExists {
                    name: name.into(),
                    what: format!(
                        "capacity {} outside the requested range [{required}, {}]{}",
                        info.capacity_bytes,
                        if limit == 0 {
                            "unlimited".to_string()
                        } else {
                            limit.to_string()
                        },
                        if info.record.device_bytes.is_none() {
                            " (made by an earlier release, which counted the backing file's size as \
                             the capacity)"
                        } else {
                            ""
                        }
                    ),
                });
            }
            return Ok(Created::Existing(info));
        }

        let usable = usable_for_range(params, fs, required, limit)?;
        let device = device_bytes_for_usable(params, usable);
        self.store.reserve(device, || {
            format!("a volume of {usable} bytes (a backing file of {device} bytes)")
        })?;
        // A backing file without a record is the leftover of an interrupted create: nobody can have
        // staged it (staging needs the record), so it is emptied and reused.
        self.store.create_backing(&id, device)?;
        let record = VolumeRecord {
            version: 1,
            volume_id: id.to_string(),
            name: name.to_string(),
            capacity_bytes: usable,
            parameters: params,
            created: now_unix(),
            formatted_uuid: None,
            device_bytes: Some(device),
        };
        self.store.write_record(&record)?;
        tracing::info!(volume.id = %id, bytes = usable, backing.bytes = device, "created volume");
        Ok(Created::New(self.store.get(&id)?))
    }

    /// Why `id` cannot be deleted or changed now, if it is open on this node.
    fn open_on_node(&self, id: &VolumeId) -> Result<Option<String>, ControllerError> {
        let names = id.stack_names();
        for dev in [&names.crypt, &names.integrity] {
            if self.dm.info(dev)?.is_some() {
                return Ok(Some(format!(
                    "volume {id} is staged on this node (device-mapper device {dev} exists); \
                     unstage it first"
                )));
            }
        }
        Ok(None)
    }

    /// Deletes `id`: crypto-erase (both header copies zeroed and synced), then the file, then the
    /// record. Deleting a volume that does not exist succeeds.
    pub fn delete(&self, id: &VolumeId) -> Result<(), ControllerError> {
        if !self.store.exists(id) {
            return Ok(());
        }
        if let Some(why) = self.open_on_node(id)? {
            return Err(ControllerError::FailedPrecondition(why));
        }
        let backing = self.store.backing_path(id);
        if backing.exists() {
            header_io::zero_header_copies(&backing)?;
        }
        self.store.remove(id)?;
        tracing::info!(volume.id = %id, "deleted volume (crypto-erased)");
        Ok(())
    }

    /// The largest usable size a new volume with `params` may still get (GetCapacity): what a backing
    /// file of the store's whole remaining budget offers, so CreateVolume agrees (a request of at most
    /// this many bytes fits).
    pub fn capacity(&self, params: VolumeParams) -> Result<u64, ControllerError> {
        Ok(usable_bytes_of_device(
            params,
            self.store.budget()?.available(),
        ))
    }

    /// Grows `id` to fit the range: its usable size, its backing file by the overhead; never shrinks.
    /// Returns the new usable size. The open mapping and the filesystem grow on the node
    /// (NodeExpandVolume, which also grows the file).
    pub fn expand(&self, id: &VolumeId, required: u64, limit: u64) -> Result<u64, ControllerError> {
        Ok(self.store.grow_backing(id, required, limit)?)
    }

    /// What the backing file's header region says about the volume's health (no key needed).
    pub fn condition(&self, volume: &VolumeInfo) -> Condition {
        match header_io::read_region(&volume.backing) {
            Ok(region) => Condition::from_problems(
                health::header_problem(&region, Check::Public)
                    .into_iter()
                    .collect(),
            ),
            Err(e) => Condition::Abnormal(format!(
                "cannot read the header region of the backing file: {e}"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dm::{MemoryDm, TargetLine};
    use crate::volume::header_io::REGION_BYTES;
    use std::os::unix::fs::FileExt;

    fn provisioner() -> (tempfile::TempDir, Arc<MemoryDm>, Provisioner) {
        let dir = tempfile::tempdir().unwrap();
        let dm = Arc::new(MemoryDm::new());
        let p = Provisioner::new(Store::open(dir.path()).unwrap(), dm.clone());
        (dir, dm, p)
    }

    fn id(v: &VolumeInfo) -> VolumeId {
        VolumeId::parse(v.id()).unwrap()
    }

    #[test]
    fn a_paged_walk_continues_in_its_snapshot_and_an_unknown_walk_rereads() {
        const M: u64 = 1 << 20;
        let (_d, _dm, p) = provisioner();
        let make = |name: &str| {
            p.create(name, 64 * M, 0, VolumeParams::default(), None)
                .unwrap()
        };
        for i in 0..6 {
            make(&format!("pvc-{i}"));
        }
        let first = p.list(2, "").unwrap();
        assert_eq!(first.volumes.len(), 2);
        // Volumes made during the walk: the walk does not re-read the directory, so it never sees
        // them (whatever their place in id order); the next walk does.
        let added: Vec<VolumeId> = (0..4)
            .map(|i| id(make(&format!("late-{i}")).info()))
            .collect();
        let mut seen: Vec<VolumeId> = first.volumes.iter().map(id).collect();
        let mut token = first.next_token;
        while !token.is_empty() {
            let page = p.list(2, &token).unwrap();
            seen.extend(page.volumes.iter().map(id));
            token = page.next_token;
        }
        assert_eq!(seen.len(), 6, "{seen:?}");
        assert!(added.iter().all(|a| !seen.contains(a)));
        assert_eq!(p.list(0, "").unwrap().volumes.len(), 10);
        // A token whose walk is no longer kept continues from a fresh read, in id order.
        let ids = p.store.ids().unwrap();
        let stale = format!("v2:999999:{}", ids[8]);
        let rest: Vec<VolumeId> = p.list(0, &stale).unwrap().volumes.iter().map(id).collect();
        assert_eq!(rest, ids[8..].to_vec());
    }

    #[test]
    fn xfs_volumes_are_rounded_up_to_their_minimum() {
        const M: u64 = 1 << 20;
        let (_d, _dm, p) = provisioner();
        let v = p
            .create("x", 100 * M, 0, VolumeParams::default(), Some(FsKind::Xfs))
            .unwrap();
        assert_eq!(v.info().capacity_bytes, 300 * M);
        assert_eq!(v.info().device_bytes, 312 * M);
    }

    #[test]
    fn a_volume_offers_at_least_what_was_asked_and_reserves_its_whole_file() {
        const M: u64 = 1 << 20;
        let (_d, _dm, p) = provisioner();
        let before = p.store().budget().unwrap().committed;
        let v = p
            .create("v", 64 * M, 0, VolumeParams::default(), None)
            .unwrap()
            .info()
            .clone();
        assert_eq!(
            v.capacity_bytes,
            64 * M,
            "the usable size is what was asked"
        );
        assert_eq!(v.record.capacity_bytes, 64 * M);
        let device = device_bytes_for_usable(VolumeParams::default(), 64 * M);
        assert_eq!(device, 71 * M);
        assert_eq!(v.device_bytes, device);
        assert_eq!(v.record.device_bytes, Some(device));
        assert_eq!(std::fs::metadata(&v.backing).unwrap().len(), device);
        assert_eq!(p.store().budget().unwrap().committed - before, device);
        // A range whose limit is the request: exactly that, not the file's size.
        let w = p
            .create("w", 100 * M, 100 * M, VolumeParams::default(), None)
            .unwrap();
        assert_eq!(w.info().capacity_bytes, 100 * M);
        assert!(w.info().device_bytes > 100 * M);
        // The smallest volume (a request of one byte) is what a 64 MiB file offers.
        let tiny = p.create("t", 1, 0, VolumeParams::default(), None).unwrap();
        assert_eq!(tiny.info().capacity_bytes, 57 * M);
        assert_eq!(tiny.info().device_bytes, 64 * M);
    }

    #[test]
    fn get_capacity_is_what_a_new_volume_could_offer() {
        let (_d, _dm, p) = provisioner();
        let params = VolumeParams::default();
        let available = p.store().budget().unwrap().available();
        let capacity = p.capacity(params).unwrap();
        assert!(capacity < available, "the overhead is not offered");
        assert!(device_bytes_for_usable(params, capacity) <= available);
        assert_eq!(capacity, usable_bytes_of_device(params, available));
    }

    #[test]
    fn a_legacy_volume_is_reported_as_what_its_file_offers() {
        const M: u64 = 1 << 20;
        let (_d, _dm, p) = provisioner();
        let v = p
            .create("v", 64 * M, 0, VolumeParams::default(), None)
            .unwrap()
            .info()
            .clone();
        // Make it what the previous release wrote for the same claim: a 64 MiB file, recorded as such.
        let mut record = v.record.clone();
        record.capacity_bytes = 64 * M;
        record.device_bytes = None;
        p.store().write_record(&record).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&v.backing)
            .unwrap()
            .set_len(64 * M)
            .unwrap();
        let listed = p.list(0, "").unwrap().volumes;
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].capacity_bytes, 57 * M);
        // A retried create of the 64 MiB claim is not told a volume below the request fits.
        let e = p
            .create("v", 64 * M, 0, VolumeParams::default(), None)
            .unwrap_err();
        assert_eq!(e.kind(), Kind::AlreadyExists);
        assert!(e.to_string().contains("earlier release"), "{e}");
        // Expansion to its claim gives it the space, in the current form.
        assert_eq!(p.expand(&id(&v), 64 * M, 0).unwrap(), 64 * M);
        let grown = p.store().get(&id(&v)).unwrap();
        assert_eq!(grown.device_bytes, 71 * M);
        assert_eq!(
            p.create("v", 64 * M, 0, VolumeParams::default(), None)
                .unwrap(),
            Created::Existing(grown)
        );
        // Deleting it gives its whole file back to the budget.
        let committed = p.store().budget().unwrap().committed;
        p.delete(&id(&v)).unwrap();
        assert_eq!(committed - p.store().budget().unwrap().committed, 71 * M);
    }

    #[test]
    fn create_is_idempotent_and_conflicts_are_refused() {
        let (_d, _dm, p) = provisioner();
        let params = VolumeParams::default();
        let a = p.create("v", 64 << 20, 0, params, None).unwrap();
        assert!(matches!(a, Created::New(_)));
        let b = p.create("v", 64 << 20, 0, params, None).unwrap();
        assert_eq!(b, Created::Existing(a.info().clone()));
        let e = p.create("v", 128 << 20, 0, params, None).unwrap_err();
        assert_eq!(e.kind(), Kind::AlreadyExists);
        let other = VolumeParams {
            init: crate::volume::init::InitMode::Full,
            ..params
        };
        assert_eq!(
            p.create("v", 64 << 20, 0, other, None).unwrap_err().kind(),
            Kind::AlreadyExists
        );
        assert_eq!(
            p.store().get(&id(a.info())).unwrap().capacity_bytes,
            64 << 20
        );
    }

    #[test]
    fn delete_erases_both_header_copies_and_refuses_open_volumes() {
        let (_d, dm, p) = provisioner();
        let v = p
            .create("v", 0, 64 << 20, VolumeParams::default(), None)
            .unwrap()
            .info()
            .clone();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&v.backing)
            .unwrap()
            .write_all_at(&[0xAB; REGION_BYTES + 10], 0)
            .unwrap();
        let name = id(&v).stack_names().crypt;
        let line: Vec<TargetLine> = vec![TargetLine {
            start: 0,
            length: 8,
            target: crate::dm::Target::Integrity(crate::dm::IntegrityTarget {
                device: v.backing.clone(),
                offset_sectors: 2048,
                tag_size: 48,
                mode: crate::dm::JournalMode::Journal,
                block_size: 4096,
                fix_padding: true,
                journal_sectors: None,
            }),
        }];
        dm.create(&name, "SEALCSI-x", &line).unwrap();
        assert_eq!(
            p.delete(&id(&v)).unwrap_err().kind(),
            Kind::FailedPrecondition
        );
        dm.remove(&name).unwrap();
        header_io::zero_header_copies(&v.backing).unwrap();
        let data = std::fs::read(&v.backing).unwrap();
        assert!(data[..REGION_BYTES].iter().all(|&b| b == 0));
        assert_eq!(data[REGION_BYTES], 0xAB);
        p.delete(&id(&v)).unwrap();
        assert!(!v.backing.exists());
        p.delete(&id(&v)).unwrap();
        assert_eq!(p.store().get(&id(&v)).unwrap_err().kind(), Kind::NotFound);
    }

    #[test]
    fn list_pages_in_stable_order() {
        let (_d, _dm, p) = provisioner();
        for i in 0..5 {
            p.create(&format!("v{i}"), 0, 64 << 20, VolumeParams::default(), None)
                .unwrap();
        }
        let mut seen = Vec::new();
        let mut token = String::new();
        loop {
            let page = p.list(2, &token).unwrap();
            assert!(page.volumes.len() <= 2);
            seen.extend(page.volumes.iter().map(|v| v.id().to_string()));
            if page.next_token.is_empty() {
                break;
            }
            token = page.next_token;
        }
        let mut sorted = seen.clone();
        sorted.sort();
        assert_eq!(seen, sorted);
        assert_eq!(seen.len(), 5);
        assert_eq!(p.list(0, "").unwrap().volumes.len(), 5);
        assert_eq!(p.list(1, "garbage").unwrap_err().kind(), Kind::Aborted);
    }

    #[test]
    fn condition_reads_the_header_region() {
        let (_d, _dm, p) = provisioner();
        let v = p
            .create("v", 64 << 20, 0, VolumeParams::default(), None)
            .unwrap()
            .info()
            .clone();
        assert_eq!(p.condition(&v), Condition::Healthy);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&v.backing)
            .unwrap()
            .write_all_at(b"junk", 100)
            .unwrap();
        assert!(matches!(p.condition(&v), Condition::Abnormal(_)));
    }
}
