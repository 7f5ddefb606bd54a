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
use crate::store::sizing::{MIN_VOLUME_BYTES, min_volume_bytes, size_for_range_min};
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

    /// Creates volume `name` (or finds the one a previous identical call created). `fs` is the filesystem
    /// the CO will stage it with, if it said: an xfs volume is at least [`min_volume_bytes`] (rounded up
    /// to it, or OUT_OF_RANGE when `limit` forbids that).
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
                        "capacity {} outside the requested range [{required}, {}]",
                        info.capacity_bytes,
                        if limit == 0 {
                            "unlimited".to_string()
                        } else {
                            limit.to_string()
                        }
                    ),
                });
            }
            return Ok(Created::Existing(info));
        }

        let min = min_volume_bytes(params, fs);
        let what = if min > MIN_VOLUME_BYTES {
            format!(
                "an xfs volume (mkfs.xfs makes no filesystem under 300 MB; with integrity={} that takes a \
                 volume of {} MiB)",
                params.to_map()["integrity"],
                min >> 20
            )
        } else {
            "a sealcsi volume".to_string()
        };
        let size = size_for_range_min(required, limit, min, &what)?;
        self.store
            .reserve(size, || format!("a volume of {size} bytes"))?;
        // A backing file without a record is the leftover of an interrupted create: nobody can have
        // staged it (staging needs the record), so it is emptied and reused.
        self.store.create_backing(&id, size)?;
        let record = VolumeRecord {
            version: 1,
            volume_id: id.to_string(),
            name: name.to_string(),
            capacity_bytes: size,
            parameters: params,
            created: now_unix(),
            formatted_uuid: None,
        };
        self.store.write_record(&record)?;
        tracing::info!(volume.id = %id, bytes = size, "created volume");
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

    /// Bytes a new volume may still take (GetCapacity): the store's budget, so CreateVolume agrees.
    pub fn capacity(&self) -> Result<u64, ControllerError> {
        Ok(self.store.budget()?.available())
    }

    /// Grows the backing file of `id` to fit the range; never shrinks. Returns the new size. The open
    /// mapping and the filesystem grow on the node (NodeExpandVolume, which also grows the file).
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
        assert_eq!(v.info().capacity_bytes, 307 * M);
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
