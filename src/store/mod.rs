//! The volume store: node-local volumes as sparse backing files under `<state-dir>/volumes/`, each with
//! a small JSON record. The controller core creates and deletes them; the node core reads them and
//! grows them. Neither knows the other: both know only the store.
//!
//! ```text
//! <state-dir>/volumes/<id>.img    the backing file (sparse; the sealed volume lives in it)
//! <state-dir>/volumes/<id>.json   the record: name, sizes, parameters, creation time (docs/format.md,
//!                                 "Node-local volume record")
//! <state-dir>/volumes/<id>.grow   an expansion whose new space is not initialized yet
//! ```
//!
//! - [`id`]: volume ids and the names derived from them;
//! - [`params`]: the StorageClass parameters recorded with each volume;
//! - [`sizing`]: sizes, minimums and capacity ranges, usable size vs. device size.
//!
//! A volume's capacity is its usable size (what the top dm-crypt device offers at least); its backing
//! file is [`sizing::device_bytes_for_usable`] of that. Records written before this rule (no
//! `device_bytes`) hold the backing file's size in `capacity_bytes`: their capacity is what that file
//! offers ([`sizing::usable_bytes_of_device`]). Records are never rewritten on read; an expansion writes
//! the current form.

pub mod id;
pub mod params;
pub mod sizing;
pub mod stacked;

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Classify, Kind};
pub use id::VolumeId;
pub use params::VolumeParams;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The request is malformed (bad parameter, bad capacity range).
    #[error("{0}")]
    InvalidArgument(String),
    /// No volume with this id.
    #[error("volume {0} does not exist")]
    NotFound(String),
    /// The capacity asked for is outside what sealcsi supports.
    #[error("{0}")]
    OutOfRange(String),
    /// Not enough space in the state directory.
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("volume record {path}: {reason}")]
    Record { path: String, reason: String },
}

impl Classify for StoreError {
    fn kind(&self) -> Kind {
        match self {
            StoreError::InvalidArgument(_) => Kind::InvalidArgument,
            StoreError::NotFound(_) => Kind::NotFound,
            StoreError::OutOfRange(_) => Kind::OutOfRange,
            StoreError::ResourceExhausted(_) => Kind::ResourceExhausted,
            StoreError::Io { .. } | StoreError::Record { .. } => Kind::Internal,
        }
    }
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> StoreError {
    let context = context.into();
    move |source| StoreError::Io { context, source }
}

/// The on-disk record of one volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub version: u32,
    pub volume_id: String,
    pub name: String,
    /// The usable size the volume was created or expanded to (what CSI's `capacity_bytes` reports)
    /// when [`Self::device_bytes`] is present. In a legacy record (written before sizes had two
    /// meanings, no `device_bytes`): the backing file's size.
    pub capacity_bytes: u64,
    pub parameters: VolumeParams,
    /// Unix seconds.
    pub created: u64,
    /// The UUID of the volume's header, recorded by the node once the volume was formatted (or first
    /// opened). From then on the node never formats it again, and opens only a header with this UUID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub formatted_uuid: Option<String>,
    /// The backing file's size when last created or expanded
    /// ([`sizing::device_bytes_for_usable`] of `capacity_bytes`). Absent in legacy records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_bytes: Option<u64>,
}

impl VolumeRecord {
    /// [`Self::formatted_uuid`] as bytes; a value that does not parse counts as formatted with an
    /// unknown UUID (never a reason to format).
    pub fn formatted(&self) -> Option<[u8; 16]> {
        self.formatted_uuid
            .as_deref()
            .map(|u| uuid::Uuid::parse_str(u).map_or([0xff; 16], |u| *u.as_bytes()))
    }
}

/// The content of `<id>.grow`: see [`Store::set_pending_init`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct PendingInit {
    from_bytes: u64,
}

/// A recorded volume with its current sizes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeInfo {
    pub record: VolumeRecord,
    /// The usable size: what the volume offers at least (CSI's `capacity_bytes`).
    pub capacity_bytes: u64,
    /// The backing file's size today (what the volume takes of the budget).
    pub device_bytes: u64,
    pub backing: PathBuf,
}

/// The usable size of a volume with `record` whose backing file is `file_bytes` long: the recorded usable
/// size, or for a legacy record what the file offers. Never more than the file offers (a file shorter
/// than recorded, which sealcsi never makes, is reported as what it is).
pub fn usable_bytes(record: &VolumeRecord, file_bytes: u64) -> u64 {
    let offered = sizing::usable_bytes_of_device(record.parameters, file_bytes);
    match record.device_bytes {
        Some(_) => record.capacity_bytes.min(offered),
        None => offered,
    }
}

impl VolumeInfo {
    pub fn id(&self) -> &str {
        &self.record.volume_id
    }
}

/// Free bytes (for unprivileged users) of the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> Result<u64, StoreError> {
    let st = nix::sys::statvfs::statvfs(path).map_err(|e| StoreError::Io {
        context: format!("statvfs {}", path.display()),
        source: e.into(),
    })?;
    Ok((st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64))
}

/// The volume store.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
    overcommit: f64,
    /// What the backing files were promised and take, as of the last pass over them, plus what was
    /// reserved since: so that a create checks the budget without stat-ing every volume (O(1), not
    /// O(n) per create). Shared by the clones of this store in one process.
    ledger: Arc<Mutex<Option<Ledger>>>,
}

/// The two sums of [`Store::budget`] that need a pass over the backing files.
///
/// Between passes the ledger errs on the safe side only: reservations are added at once; a leftover
/// file reused by a create is counted twice until the next pass (so less is promised); tenants filling their sparse files lower `free` by what `allocated` does not yet count, which also
/// promises less. A deletion subtracts what the file was promised and took. A pass is made after
/// [`LEDGER_MAX_AGE`] and on every [`Store::budget`] call (GetCapacity stays exact).
#[derive(Debug, Clone, Copy)]
struct Ledger {
    committed: u64,
    allocated: u64,
    passed_at: Instant,
}

/// How long the ledger is trusted before the next reservation makes a new pass.
const LEDGER_MAX_AGE: Duration = Duration::from_secs(30);

/// What the store may still promise, and why.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    /// Free bytes of the state directory's filesystem.
    pub free: u64,
    /// Bytes the backing files occupy on disk today.
    pub allocated: u64,
    /// Bytes promised: the sum of the backing files' sizes.
    pub committed: u64,
    pub overcommit: f64,
}

impl Budget {
    /// Bytes a new volume (or a growth) may still take: (free + allocated) × overcommit − committed.
    /// Backing files are sparse, so what they were promised is not yet taken from `free`; counting it
    /// keeps tenants from promising more than the disk holds (at the default ratio of 1.0).
    pub fn available(&self) -> u64 {
        let capacity = (self.free.saturating_add(self.allocated)) as f64 * self.overcommit;
        (capacity as u64).saturating_sub(self.committed)
    }

    fn refuse(&self, what: String, dir: &Path) -> StoreError {
        StoreError::ResourceExhausted(format!(
            "{what} does not fit: {} bytes left to promise in {} ({} free, {} promised to existing \
             volumes, overcommit ratio {})",
            self.available(),
            dir.display(),
            self.free,
            self.committed,
            self.overcommit
        ))
    }
}

impl Store {
    /// Opens (creating) `<state_dir>/volumes`.
    pub fn open(state_dir: &Path) -> Result<Self, StoreError> {
        let dir = state_dir.join("volumes");
        fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
        Ok(Self {
            dir,
            overcommit: 1.0,
            ledger: Arc::default(),
        })
    }

    /// How many times the disk the volumes may be promised (sparse files; default 1.0: never more than
    /// the disk holds). Values below or at zero, or not finite, are an invalid argument.
    pub fn with_overcommit(mut self, ratio: f64) -> Result<Self, StoreError> {
        if !ratio.is_finite() || ratio <= 0.0 {
            return Err(StoreError::InvalidArgument(format!(
                "overcommit ratio {ratio} is not a positive number"
            )));
        }
        self.overcommit = ratio;
        Ok(self)
    }

    /// What the store has promised and may still promise: one pass over the backing files (which also
    /// refreshes the ledger reservations use).
    pub fn budget(&self) -> Result<Budget, StoreError> {
        let mut ledger = self.ledger();
        let budget = self.pass()?;
        *ledger = Some(Ledger {
            committed: budget.committed,
            allocated: budget.allocated,
            passed_at: Instant::now(),
        });
        Ok(budget)
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, Option<Ledger>> {
        self.ledger.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn pass(&self) -> Result<Budget, StoreError> {
        use std::os::unix::fs::MetadataExt;
        let mut budget = Budget {
            free: free_bytes(&self.dir)?,
            allocated: 0,
            committed: 0,
            overcommit: self.overcommit,
        };
        let entries =
            fs::read_dir(&self.dir).map_err(io_err(format!("listing {}", self.dir.display())))?;
        for entry in entries.filter_map(Result::ok) {
            let is_backing = entry
                .file_name()
                .to_str()
                .is_some_and(|n| n.ends_with(".img"));
            if let (true, Ok(meta)) = (is_backing, entry.metadata()) {
                budget.committed += meta.len();
                budget.allocated += meta.blocks() * 512;
            }
        }
        Ok(budget)
    }

    /// Refuses to promise `bytes` more than the budget allows (`what` names them in the error), or
    /// counts them as promised. Concurrent reservations are serialized: two cannot both take the last
    /// bytes.
    pub fn reserve(&self, bytes: u64, what: impl FnOnce() -> String) -> Result<(), StoreError> {
        let mut ledger = self.ledger();
        let current = match *ledger {
            Some(l) if l.passed_at.elapsed() < LEDGER_MAX_AGE => l,
            _ => {
                let b = self.pass()?;
                Ledger {
                    committed: b.committed,
                    allocated: b.allocated,
                    passed_at: Instant::now(),
                }
            }
        };
        let budget = Budget {
            free: free_bytes(&self.dir)?,
            allocated: current.allocated,
            committed: current.committed,
            overcommit: self.overcommit,
        };
        if bytes > budget.available() {
            *ledger = Some(current);
            return Err(budget.refuse(what(), &self.dir));
        }
        *ledger = Some(Ledger {
            committed: current.committed.saturating_add(bytes),
            ..current
        });
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The backing file of `id` (whether or not it exists).
    pub fn backing_path(&self, id: &VolumeId) -> PathBuf {
        self.dir.join(format!("{id}.img"))
    }

    fn record_path(&self, id: &VolumeId) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    fn pending_init_path(&self, id: &VolumeId) -> PathBuf {
        self.dir.join(format!("{id}.grow"))
    }

    /// Reads a JSON file of the store; `None` if it does not exist.
    fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, StoreError> {
        let text = match fs::read(path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(format!("reading {}", path.display()))(e)),
        };
        serde_json::from_slice(&text)
            .map(Some)
            .map_err(|e| StoreError::Record {
                path: path.display().to_string(),
                reason: e.to_string(),
            })
    }

    /// The one atomic write of the store: temporary file, fsync, rename over `path`, fsync of the
    /// directory. A crash leaves the old content or the new, never a mix.
    fn write_json_atomically(&self, path: &Path, value: &impl Serialize) -> Result<(), StoreError> {
        let text = serde_json::to_vec_pretty(value).map_err(|e| StoreError::Record {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("record");
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let ctx = format!("writing {}", tmp.display());
        let mut f = File::create(&tmp).map_err(io_err(ctx.clone()))?;
        f.write_all(&text).map_err(io_err(ctx.clone()))?;
        f.sync_all().map_err(io_err(ctx))?;
        fs::rename(&tmp, path).map_err(io_err(format!("renaming to {}", path.display())))?;
        self.sync_dir()
    }

    fn sync_dir(&self) -> Result<(), StoreError> {
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(format!("fsync {}", self.dir.display())))
    }

    /// Removes `path`; an absent file is fine.
    fn remove_if_present(path: &Path) -> Result<(), StoreError> {
        match fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(format!("removing {}", path.display()))(e)),
        }
    }

    /// The record of `id`, `None` if there is none.
    pub fn record(&self, id: &VolumeId) -> Result<Option<VolumeRecord>, StoreError> {
        let path = self.record_path(id);
        let Some(record) = Self::read_json::<VolumeRecord>(&path)? else {
            return Ok(None);
        };
        if record.volume_id != id.as_str() {
            return Err(StoreError::Record {
                path: path.display().to_string(),
                reason: format!("holds volume id {}", record.volume_id),
            });
        }
        Ok(Some(record))
    }

    /// The volume `id` with its current size, or NotFound.
    pub fn get(&self, id: &VolumeId) -> Result<VolumeInfo, StoreError> {
        let record = self
            .record(id)?
            .ok_or_else(|| StoreError::NotFound(id.to_string()))?;
        let backing = self.backing_path(id);
        let device_bytes = match fs::metadata(&backing) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::Record {
                    path: backing.display().to_string(),
                    reason: "the backing file of a recorded volume is missing".into(),
                });
            }
            Err(e) => return Err(io_err(format!("stat {}", backing.display()))(e)),
        };
        Ok(VolumeInfo {
            capacity_bytes: usable_bytes(&record, device_bytes),
            device_bytes,
            record,
            backing,
        })
    }

    /// Creates (or empties) the sparse backing file of `id` at `size` bytes, durably.
    pub fn create_backing(&self, id: &VolumeId, size: u64) -> Result<PathBuf, StoreError> {
        let backing = self.backing_path(id);
        let ctx = format!("creating {}", backing.display());
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&backing)
            .map_err(io_err(ctx.clone()))?;
        f.set_len(size).map_err(io_err(ctx.clone()))?;
        f.sync_all().map_err(io_err(ctx))?;
        Ok(backing)
    }

    /// Writes `record` atomically.
    pub fn write_record(&self, record: &VolumeRecord) -> Result<(), StoreError> {
        let id = VolumeId::parse(&record.volume_id).ok_or_else(|| {
            StoreError::InvalidArgument(format!("{:?} is not a volume id", record.volume_id))
        })?;
        self.write_json_atomically(&self.record_path(&id), record)
    }

    /// Whether anything of `id` is on disk (its record or its backing file).
    pub fn exists(&self, id: &VolumeId) -> bool {
        self.backing_path(id).exists() || self.record_path(id).exists()
    }

    /// Removes everything of `id`: the backing file (the caller crypto-erased it), a pending-init marker,
    /// then the record, and syncs the directory. Removing what is absent is fine.
    pub fn remove(&self, id: &VolumeId) -> Result<(), StoreError> {
        use std::os::unix::fs::MetadataExt;
        let backing = self.backing_path(id);
        let held = fs::metadata(&backing)
            .ok()
            .map(|m| (m.len(), m.blocks() * 512));
        Self::remove_if_present(&backing)?;
        if let (Some((len, taken)), Some(l)) = (held, self.ledger().as_mut()) {
            l.committed = l.committed.saturating_sub(len);
            l.allocated = l.allocated.saturating_sub(taken);
        }
        Self::remove_if_present(&self.pending_init_path(id))?;
        Self::remove_if_present(&self.record_path(id))?;
        self.sync_dir()
    }

    /// Grows the volume `id` to fit the capacity range (`0` = unset): its usable size to what the range
    /// asks ([`sizing::usable_for_range`]), its backing file to the device size for that
    /// ([`sizing::device_bytes_for_usable`]); never shrinks. Returns the usable size. Asking for no more
    /// than the current usable size is success at that size, unless the volume is already above `limit`
    /// (OUT_OF_RANGE: sealcsi never shrinks).
    pub fn grow_backing(
        &self,
        id: &VolumeId,
        required: u64,
        limit: u64,
    ) -> Result<u64, StoreError> {
        let info = self.get(id)?;
        if limit != 0 && limit < required {
            return Err(StoreError::InvalidArgument(format!(
                "capacity range: limit_bytes {limit} is smaller than required_bytes {required}"
            )));
        }
        if required <= info.capacity_bytes {
            if limit != 0 && info.capacity_bytes > limit {
                return Err(StoreError::OutOfRange(format!(
                    "volume is {} bytes, above limit_bytes {limit}; sealcsi never shrinks a volume",
                    info.capacity_bytes
                )));
            }
            return Ok(info.capacity_bytes);
        }
        let params = info.record.parameters;
        let usable = sizing::usable_for_range(params, None, required, limit)?;
        // A file already larger (an interrupted growth, a legacy volume) is never shrunk.
        let device = sizing::device_bytes_for_usable(params, usable).max(info.device_bytes);
        let grow = device - info.device_bytes;
        self.reserve(grow, || format!("growing by {grow} bytes"))?;
        let ctx = format!("growing {}", info.backing.display());
        let f = OpenOptions::new()
            .write(true)
            .open(&info.backing)
            .map_err(io_err(ctx.clone()))?;
        f.set_len(device).map_err(io_err(ctx.clone()))?;
        f.sync_all().map_err(io_err(ctx))?;
        let mut record = info.record;
        record.capacity_bytes = usable;
        record.device_bytes = Some(device);
        self.write_record(&record)?;
        tracing::info!(volume.id = %id, bytes = usable, backing.bytes = device, "expanded volume backing file");
        Ok(usable)
    }

    /// Where the not yet initialized new space of `id` starts (a byte offset in its top device), if an
    /// expansion was interrupted before initializing it ([`Store::set_pending_init`]).
    pub fn pending_init(&self, id: &VolumeId) -> Result<Option<u64>, StoreError> {
        Ok(Self::read_json::<PendingInit>(&self.pending_init_path(id))?.map(|p| p.from_bytes))
    }

    /// Records, durably, that the top device of `id` is about to grow and everything from `from_bytes`
    /// on must be initialized before anyone uses it. Written before the mapping grows and cleared
    /// ([`Store::clear_pending_init`]) only once the new space is initialized, so a retry after a crash
    /// anywhere in between knows what is left to do even when the mapping has already grown.
    pub fn set_pending_init(&self, id: &VolumeId, from_bytes: u64) -> Result<(), StoreError> {
        self.write_json_atomically(&self.pending_init_path(id), &PendingInit { from_bytes })
    }

    /// The new space of `id` is initialized: forget the pending record.
    pub fn clear_pending_init(&self, id: &VolumeId) -> Result<(), StoreError> {
        let path = self.pending_init_path(id);
        if !path.exists() {
            return Ok(());
        }
        Self::remove_if_present(&path)?;
        self.sync_dir()
    }

    /// Every recorded volume id, sorted.
    pub fn ids(&self) -> Result<Vec<VolumeId>, StoreError> {
        let mut ids: Vec<VolumeId> = fs::read_dir(&self.dir)
            .map_err(io_err(format!("listing {}", self.dir.display())))?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                VolumeId::parse(name.strip_suffix(".json")?)
            })
            .collect();
        ids.sort();
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: u64 = 1 << 20;

    /// A store with one volume `v`: usable 64 MiB on its 71 MiB backing file (the current rule), or with
    /// `legacy` a record of the previous release: a 64 MiB backing file recorded as capacity 64 MiB.
    fn store_with(legacy: bool) -> (tempfile::TempDir, Store, VolumeId) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let id = VolumeId::for_name("v");
        let device = if legacy { 64 * M } else { 71 * M };
        store.create_backing(&id, device).unwrap();
        store
            .write_record(&VolumeRecord {
                version: 1,
                volume_id: id.to_string(),
                name: "v".into(),
                capacity_bytes: 64 * M,
                parameters: VolumeParams::default(),
                created: 1,
                formatted_uuid: None,
                device_bytes: (!legacy).then_some(device),
            })
            .unwrap();
        (dir, store, id)
    }

    fn store() -> (tempfile::TempDir, Store, VolumeId) {
        store_with(false)
    }

    #[test]
    fn pending_init_records_survive_until_cleared_and_removal() {
        let (_d, s, id) = store();
        assert_eq!(s.pending_init(&id).unwrap(), None);
        s.set_pending_init(&id, 5 << 20).unwrap();
        assert_eq!(s.pending_init(&id).unwrap(), Some(5 << 20));
        s.clear_pending_init(&id).unwrap();
        s.clear_pending_init(&id).unwrap();
        assert_eq!(s.pending_init(&id).unwrap(), None);
        s.set_pending_init(&id, 1).unwrap();
        assert_eq!(s.ids().unwrap(), vec![id.clone()]);
        s.remove(&id).unwrap();
        assert_eq!(s.pending_init(&id).unwrap(), None);
        assert_eq!(std::fs::read_dir(s.dir()).unwrap().count(), 0);
    }

    #[test]
    fn grow_never_shrinks_and_grows_the_file_by_the_overhead() {
        let (_d, s, id) = store();
        assert_eq!(s.get(&id).unwrap().capacity_bytes, 64 * M);
        assert_eq!(s.get(&id).unwrap().device_bytes, 71 * M);
        assert_eq!(s.grow_backing(&id, 32 * M, 0).unwrap(), 64 * M);
        assert_eq!(s.grow_backing(&id, 64 * M, 64 * M).unwrap(), 64 * M);
        assert_eq!(s.grow_backing(&id, 100 * M, 0).unwrap(), 100 * M);
        let v = s.get(&id).unwrap();
        assert_eq!(v.record.capacity_bytes, 100 * M);
        assert_eq!(v.capacity_bytes, 100 * M);
        let device = sizing::device_bytes_for_usable(VolumeParams::default(), 100 * M);
        assert_eq!(v.record.device_bytes, Some(device));
        assert_eq!(v.device_bytes, device);
        assert_eq!(std::fs::metadata(&v.backing).unwrap().len(), device);
        assert!(device > 100 * M);
        assert_eq!(
            s.grow_backing(&id, 64 * M, 80 * M).unwrap_err().kind(),
            Kind::OutOfRange
        );
        // Idempotent: the same range again changes nothing.
        assert_eq!(s.grow_backing(&id, 100 * M, 0).unwrap(), 100 * M);
        assert_eq!(s.get(&id).unwrap(), v);
    }

    #[test]
    fn legacy_records_report_what_their_file_offers_and_are_not_rewritten_on_read() {
        let (_d, s, id) = store_with(true);
        let path = s.record_path(&id);
        let before = std::fs::read(&path).unwrap();
        assert!(!String::from_utf8_lossy(&before).contains("device_bytes"));
        let v = s.get(&id).unwrap();
        let offered = sizing::usable_bytes_of_device(VolumeParams::default(), 64 * M);
        assert_eq!(offered, 57 * M);
        assert_eq!(
            v.capacity_bytes, offered,
            "not the 64 MiB the old record claims"
        );
        assert_eq!(v.device_bytes, 64 * M);
        assert_eq!(v.record.capacity_bytes, 64 * M);
        assert_eq!(
            s.budget().unwrap().committed,
            64 * M,
            "the file is what is promised"
        );
        assert_eq!(
            std::fs::read(&path).unwrap(),
            before,
            "a read rewrites nothing"
        );
        // What it offers already satisfies a smaller request: nothing grows.
        assert_eq!(s.grow_backing(&id, 50 * M, 0).unwrap(), 57 * M);
        assert_eq!(std::fs::read(&path).unwrap(), before);
        // Asking for the 64 MiB it was created for grows the file to the current rule's size and writes
        // the current record.
        assert_eq!(s.grow_backing(&id, 64 * M, 0).unwrap(), 64 * M);
        let v = s.get(&id).unwrap();
        assert_eq!(v.device_bytes, 71 * M);
        assert_eq!(v.record.device_bytes, Some(71 * M));
        assert_eq!(v.capacity_bytes, 64 * M);
        assert_eq!(s.budget().unwrap().committed, 71 * M);
    }

    #[test]
    fn a_file_shorter_than_recorded_is_reported_as_what_it_offers() {
        let (_d, s, id) = store();
        std::fs::OpenOptions::new()
            .write(true)
            .open(s.backing_path(&id))
            .unwrap()
            .set_len(64 * M)
            .unwrap();
        assert_eq!(s.get(&id).unwrap().capacity_bytes, 57 * M);
    }

    #[test]
    fn records_of_the_previous_release_read_as_legacy() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let id = VolumeId::for_name("pvc-1");
        // Byte for byte what the previous release wrote for a 64 MiB claim.
        let json = format!(
            r#"{{"version":1,"volume_id":"{id}","name":"pvc-1","capacity_bytes":67108864,
            "parameters":{{"integrity":"none","init":"fast","journal":"journal"}},"created":5}}"#
        );
        std::fs::write(s.record_path(&id), json).unwrap();
        s.create_backing(&id, 64 * M).unwrap();
        let v = s.get(&id).unwrap();
        assert_eq!(v.record.device_bytes, None);
        assert_eq!(
            v.capacity_bytes,
            59 * M,
            "64 MiB less the header region and slack"
        );
        // The current form names both sizes.
        let (_d, s, id) = store();
        let text = std::fs::read_to_string(s.record_path(&id)).unwrap();
        assert!(text.contains("\"capacity_bytes\": 67108864"), "{text}");
        assert!(text.contains("\"device_bytes\": 74448896"), "{text}");
    }

    #[test]
    fn reservations_count_at_once_and_deletions_give_back_what_they_held() {
        let (_d, s, id) = store();
        let available = s.budget().unwrap().available();
        // Two reservations that fit alone but not together: the second is refused although no file
        // exists for the first yet (the budget check does not wait for a pass over the files).
        let half = available / 2 + 1;
        s.reserve(half, || "first".into()).unwrap();
        let err = s.reserve(half, || "second".into()).unwrap_err();
        assert_eq!(err.kind(), Kind::ResourceExhausted);
        // Removing the volume gives its promise (its 71 MiB file) back without a new pass: 32 MiB more
        // than was left now fit (a margin for other writers on this filesystem).
        s.remove(&id).unwrap();
        s.reserve((available - half) + (32 << 20), || "third".into())
            .unwrap();
    }

    #[test]
    fn promises_never_exceed_the_disk_times_the_overcommit_ratio() {
        let (_d, s, id) = store();
        let budget = s.budget().unwrap();
        assert_eq!(
            budget.committed,
            71 * M,
            "the sparse 71 MiB backing file is promised"
        );
        assert!(budget.available() + (71 * M) <= budget.free + budget.allocated);
        // A ratio that leaves room for exactly 32 MiB more than is promised.
        let room = (budget.committed + (32 << 20)) as f64 / (budget.free + budget.allocated) as f64;
        let tight = s.clone().with_overcommit(room).unwrap();
        let err = tight.grow_backing(&id, 128 << 20, 0).unwrap_err();
        assert_eq!(err.kind(), Kind::ResourceExhausted, "{err}");
        assert!(err.to_string().contains("overcommit ratio"), "{err}");
        assert_eq!(tight.get(&id).unwrap().device_bytes, 71 * M, "nothing grew");
        // 90 MiB usable takes a 97 MiB file: 26 MiB more, within the room.
        assert_eq!(tight.grow_backing(&id, 90 * M, 0).unwrap(), 90 * M);
        assert_eq!(tight.get(&id).unwrap().device_bytes, 97 * M);
        assert!(s.clone().with_overcommit(0.0).is_err());
        assert!(s.clone().with_overcommit(f64::NAN).is_err());
    }

    #[test]
    fn a_record_holding_another_id_is_refused() {
        let (_d, s, id) = store();
        let other = VolumeId::for_name("w");
        std::fs::copy(s.record_path(&id), s.record_path(&other)).unwrap();
        assert!(matches!(s.record(&other), Err(StoreError::Record { .. })));
    }
}
