//! blockback's state directory: small JSON records and sparse backing files, written atomically
//! (temporary file, fsync, rename, fsync of the directory), so the state survives a restart or a
//! SIGKILL at any point. This is the controller core; nothing here knows gRPC.
//!
//! Layout under `--state-dir DIR` (ids are `bbv-`/`bbs-` + 32 hex digits of SHA-256 of the CO's name,
//! so a name always maps to the same id and a create is idempotent by construction):
//!
//! ```text
//! DIR/volumes/<bbv-id>.json      VolumeRecord (the commit point of a create)
//! DIR/volumes/<bbv-id>.img       the volume's sparse backing file (its size is the capacity)
//! DIR/snapshots/<bbs-id>.json    SnapshotRecord
//! DIR/snapshots/<bbs-id>.img     a copy of the source volume's file at snapshot time
//! DIR/attachments/<bbv-id>.<hex(node-id)>.json   Attachment (ControllerPublish)
//! DIR/staged/<bbv-id>.json       StagedRecord (written before the loop device is attached)
//! DIR/stalled/<RpcName>          written when a `--fault stall:<RpcName>` call has done its work
//! ```

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::BbError;

/// Sizes are rounded up to this.
pub const MIB: u64 = 1 << 20;
/// The size of a volume created without a capacity range.
pub const DEFAULT_CAPACITY: u64 = 1 << 30;

/// What a volume was created from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// A copy of this snapshot's file.
    Snapshot(String),
    /// A copy of this volume's file (a clone).
    Volume(String),
}

/// `volumes/<id>.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub id: String,
    pub name: String,
    pub capacity_bytes: u64,
    pub source: Option<Source>,
    pub parameters: BTreeMap<String, String>,
}

/// `snapshots/<id>.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub id: String,
    pub name: String,
    pub source_volume_id: String,
    pub size_bytes: u64,
    pub created_unix_seconds: i64,
    pub created_nanos: i32,
}

/// `attachments/<volume>.<hex(node)>.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub volume_id: String,
    pub node_id: String,
    pub readonly: bool,
}

/// `staged/<volume>.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedRecord {
    pub volume_id: String,
    pub staging_target_path: PathBuf,
}

/// A CreateVolume request, without gRPC.
#[derive(Debug, Clone)]
pub struct CreateSpec {
    pub name: String,
    pub required_bytes: u64,
    /// 0: no limit.
    pub limit_bytes: u64,
    pub source: Option<Source>,
    pub parameters: BTreeMap<String, String>,
}

/// The state directory. One lock serializes every change (this is a test backend).
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    lock: Mutex<()>,
}

/// `prefix` + 32 hex digits of SHA-256(name).
fn derived_id(prefix: &str, name: &str) -> String {
    let digest = Sha256::digest(name.as_bytes());
    format!("{prefix}{}", hex::encode(&digest[..16]))
}

/// Whether `id` has the shape of an id with `prefix` (so it is safe as a file name).
fn valid_id(prefix: &str, id: &str) -> bool {
    id.strip_prefix(prefix).is_some_and(|h| {
        h.len() == 32
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// The volume id of a CO name.
pub fn volume_id(name: &str) -> String {
    derived_id("bbv-", name)
}

/// The snapshot id of a CO name.
pub fn snapshot_id(name: &str) -> String {
    derived_id("bbs-", name)
}

/// `n` rounded up to a MiB.
pub fn round_up(n: u64) -> u64 {
    n.div_ceil(MIB).saturating_mul(MIB)
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>, BbError> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| BbError::Record {
                path: path.to_owned(),
                source,
            }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(BbError::io("read", path, e)),
    }
}

fn sync_dir(dir: &Path) -> Result<(), BbError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| BbError::io("fsync", dir, e))
}

/// Writes `value` as JSON to `path` atomically.
fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), BbError> {
    let tmp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec_pretty(value).expect("records serialize");
    let mut f = File::create(&tmp).map_err(|e| BbError::io("create", &tmp, e))?;
    f.write_all(&bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| BbError::io("write", &tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| BbError::io("rename", path, e))?;
    sync_dir(path.parent().expect("records live in a directory"))
}

fn remove(path: &Path) -> Result<(), BbError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(BbError::io("remove", path, e)),
    }
}

/// Copies `from` to a new file `to` of `len` bytes, leaving holes where `from` reads as zeros.
fn sparse_copy(from: &Path, to: &Path, len: u64) -> Result<(), BbError> {
    let mut src = File::open(from).map_err(|e| BbError::io("open", from, e))?;
    let mut dst = File::create(to).map_err(|e| BbError::io("create", to, e))?;
    let mut buf = vec![0u8; MIB as usize];
    let err = |e| BbError::io("copy to", to, e);
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            match src.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(BbError::io("read", from, e)),
            }
        }
        if filled == 0 {
            break;
        }
        if buf[..filled].iter().all(|&b| b == 0) {
            dst.seek(SeekFrom::Current(filled as i64)).map_err(err)?;
        } else {
            dst.write_all(&buf[..filled]).map_err(err)?;
        }
        if filled < buf.len() {
            break;
        }
    }
    dst.set_len(len).map_err(err)?;
    dst.sync_all().map_err(err)
}

fn now() -> (i64, i32) {
    let d = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_secs() as i64, d.subsec_nanos() as i32)
}

impl Store {
    /// Opens (creating) the state directory.
    pub fn open(dir: &Path) -> Result<Store, BbError> {
        for sub in ["volumes", "snapshots", "attachments", "staged", "stalled"] {
            let d = dir.join(sub);
            fs::create_dir_all(&d).map_err(|e| BbError::io("create", &d, e))?;
        }
        let dir = fs::canonicalize(dir).map_err(|e| BbError::io("resolve", dir, e))?;
        Ok(Store {
            dir,
            lock: Mutex::new(()),
        })
    }

    fn locked(&self) -> MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn volume_json(&self, id: &str) -> PathBuf {
        self.dir.join("volumes").join(format!("{id}.json"))
    }

    /// The backing file of volume `id`.
    pub fn volume_file(&self, id: &str) -> PathBuf {
        self.dir.join("volumes").join(format!("{id}.img"))
    }

    fn snapshot_json(&self, id: &str) -> PathBuf {
        self.dir.join("snapshots").join(format!("{id}.json"))
    }

    fn snapshot_file(&self, id: &str) -> PathBuf {
        self.dir.join("snapshots").join(format!("{id}.img"))
    }

    fn attachment_json(&self, volume_id: &str, node_id: &str) -> PathBuf {
        self.dir
            .join("attachments")
            .join(format!("{volume_id}.{}.json", hex::encode(node_id)))
    }

    fn staged_json(&self, volume_id: &str) -> PathBuf {
        self.dir.join("staged").join(format!("{volume_id}.json"))
    }

    /// The volume `id`, if it exists.
    pub fn volume(&self, id: &str) -> Result<Option<VolumeRecord>, BbError> {
        if !valid_id("bbv-", id) {
            return Ok(None);
        }
        read_json(&self.volume_json(id))
    }

    /// The volume `id`, or NOT_FOUND.
    pub fn existing_volume(&self, id: &str) -> Result<VolumeRecord, BbError> {
        self.volume(id)?
            .ok_or_else(|| BbError::NotFound(format!("volume {id:?} does not exist")))
    }

    /// The snapshot `id`, if it exists.
    pub fn snapshot(&self, id: &str) -> Result<Option<SnapshotRecord>, BbError> {
        if !valid_id("bbs-", id) {
            return Ok(None);
        }
        read_json(&self.snapshot_json(id))
    }

    fn records<T: for<'de> Deserialize<'de>>(&self, sub: &str) -> Result<Vec<T>, BbError> {
        let dir = self.dir.join(sub);
        let mut names: Vec<PathBuf> = fs::read_dir(&dir)
            .map_err(|e| BbError::io("list", &dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        names.sort();
        let mut out = Vec::new();
        for p in names {
            if let Some(r) = read_json(&p)? {
                out.push(r);
            }
        }
        Ok(out)
    }

    /// Every volume, by id.
    pub fn volumes(&self) -> Result<Vec<VolumeRecord>, BbError> {
        self.records("volumes")
    }

    /// Every snapshot, by id.
    pub fn snapshots(&self) -> Result<Vec<SnapshotRecord>, BbError> {
        self.records("snapshots")
    }

    /// Creates the volume, or returns the one of the same name if compatible (`false`: existed).
    pub fn create_volume(&self, spec: &CreateSpec) -> Result<(VolumeRecord, bool), BbError> {
        let _l = self.locked();
        let id = volume_id(&spec.name);
        if let Some(v) = self.volume(&id)? {
            let fits = v.capacity_bytes >= spec.required_bytes
                && (spec.limit_bytes == 0 || v.capacity_bytes <= spec.limit_bytes);
            if !fits {
                return Err(BbError::AlreadyExists(format!(
                    "volume {:?} exists with {} bytes, outside the requested range",
                    spec.name, v.capacity_bytes
                )));
            }
            if v.source != spec.source {
                return Err(BbError::AlreadyExists(format!(
                    "volume {:?} exists with another content source ({:?})",
                    spec.name, v.source
                )));
            }
            return Ok((v, false));
        }
        let (source_file, source_size) = match &spec.source {
            None => (None, 0),
            Some(Source::Snapshot(sid)) => {
                let s = self.snapshot(sid)?.ok_or_else(|| {
                    BbError::NotFound(format!("source snapshot {sid:?} does not exist"))
                })?;
                (Some(self.snapshot_file(sid)), s.size_bytes)
            }
            Some(Source::Volume(vid)) => {
                let v = self.volume(vid)?.ok_or_else(|| {
                    BbError::NotFound(format!("source volume {vid:?} does not exist"))
                })?;
                (Some(self.volume_file(vid)), v.capacity_bytes)
            }
        };
        let wanted = if spec.required_bytes > 0 {
            spec.required_bytes
        } else if source_size > 0 {
            source_size
        } else if spec.limit_bytes > 0 {
            spec.limit_bytes.min(DEFAULT_CAPACITY)
        } else {
            DEFAULT_CAPACITY
        };
        let capacity = round_up(wanted);
        if spec.limit_bytes > 0 && capacity > spec.limit_bytes {
            return Err(BbError::OutOfRange(format!(
                "{wanted} bytes rounded up to whole MiB ({capacity}) exceed the limit of {} bytes",
                spec.limit_bytes
            )));
        }
        if capacity < source_size {
            return Err(BbError::OutOfRange(format!(
                "{capacity} bytes are smaller than the source's {source_size}"
            )));
        }
        let file = self.volume_file(&id);
        let tmp = file.with_extension("img.tmp");
        match source_file {
            Some(from) => sparse_copy(&from, &tmp, capacity)?,
            None => {
                let f = File::create(&tmp).map_err(|e| BbError::io("create", &tmp, e))?;
                f.set_len(capacity)
                    .and_then(|()| f.sync_all())
                    .map_err(|e| BbError::io("size", &tmp, e))?;
            }
        }
        fs::rename(&tmp, &file).map_err(|e| BbError::io("rename", &file, e))?;
        let record = VolumeRecord {
            id: id.clone(),
            name: spec.name.clone(),
            capacity_bytes: capacity,
            source: spec.source.clone(),
            parameters: spec.parameters.clone(),
        };
        write_json(&self.volume_json(&id), &record)?;
        Ok((record, true))
    }

    /// Deletes the volume; OK if it does not exist. FAILED_PRECONDITION while attached or staged.
    pub fn delete_volume(&self, id: &str) -> Result<(), BbError> {
        let _l = self.locked();
        if !valid_id("bbv-", id) {
            return Ok(());
        }
        let nodes = self.attachments_of(id)?;
        if !nodes.is_empty() {
            return Err(BbError::FailedPrecondition(format!(
                "volume {id} is still published to node(s) {nodes:?}"
            )));
        }
        if self.staged(id)?.is_some() {
            return Err(BbError::FailedPrecondition(format!(
                "volume {id} is still staged"
            )));
        }
        remove(&self.volume_json(id))?;
        sync_dir(&self.dir.join("volumes"))?;
        remove(&self.volume_file(id))
    }

    /// Grows the volume's file to `required_bytes` rounded up (never shrinks); returns the capacity.
    pub fn expand_volume(
        &self,
        id: &str,
        required_bytes: u64,
        limit_bytes: u64,
    ) -> Result<u64, BbError> {
        let _l = self.locked();
        let mut v = self.existing_volume(id)?;
        let capacity = round_up(required_bytes);
        if limit_bytes > 0 && capacity > limit_bytes {
            return Err(BbError::OutOfRange(format!(
                "{required_bytes} bytes rounded up to whole MiB ({capacity}) exceed the limit of {limit_bytes} bytes"
            )));
        }
        if capacity <= v.capacity_bytes {
            return Ok(v.capacity_bytes);
        }
        let file = self.volume_file(id);
        let f = OpenOptions::new()
            .write(true)
            .open(&file)
            .map_err(|e| BbError::io("open", &file, e))?;
        f.set_len(capacity)
            .and_then(|()| f.sync_all())
            .map_err(|e| BbError::io("grow", &file, e))?;
        v.capacity_bytes = capacity;
        write_json(&self.volume_json(id), &v)?;
        Ok(capacity)
    }

    /// Creates a snapshot of `source_volume_id` (a copy of its file), or returns the one of the same
    /// name if it has the same source (`false`: existed).
    pub fn create_snapshot(
        &self,
        name: &str,
        source_volume_id: &str,
    ) -> Result<(SnapshotRecord, bool), BbError> {
        let _l = self.locked();
        let id = snapshot_id(name);
        if let Some(s) = self.snapshot(&id)? {
            if s.source_volume_id != source_volume_id {
                return Err(BbError::AlreadyExists(format!(
                    "snapshot {name:?} exists for another volume ({})",
                    s.source_volume_id
                )));
            }
            return Ok((s, false));
        }
        let v = self.existing_volume(source_volume_id)?;
        let file = self.snapshot_file(&id);
        let tmp = file.with_extension("img.tmp");
        sparse_copy(&self.volume_file(source_volume_id), &tmp, v.capacity_bytes)?;
        fs::rename(&tmp, &file).map_err(|e| BbError::io("rename", &file, e))?;
        let (secs, nanos) = now();
        let record = SnapshotRecord {
            id: id.clone(),
            name: name.to_string(),
            source_volume_id: source_volume_id.to_string(),
            size_bytes: v.capacity_bytes,
            created_unix_seconds: secs,
            created_nanos: nanos,
        };
        write_json(&self.snapshot_json(&id), &record)?;
        Ok((record, true))
    }

    /// Deletes the snapshot; OK if it does not exist.
    pub fn delete_snapshot(&self, id: &str) -> Result<(), BbError> {
        let _l = self.locked();
        if !valid_id("bbs-", id) {
            return Ok(());
        }
        remove(&self.snapshot_json(id))?;
        sync_dir(&self.dir.join("snapshots"))?;
        remove(&self.snapshot_file(id))
    }

    /// Records that volume `volume_id` is attached to `node_id`. ALREADY_EXISTS if attached there
    /// with the other read-only flag.
    pub fn attach(&self, volume_id: &str, node_id: &str, readonly: bool) -> Result<(), BbError> {
        let _l = self.locked();
        self.existing_volume(volume_id)?;
        let path = self.attachment_json(volume_id, node_id);
        if let Some(a) = read_json::<Attachment>(&path)? {
            if a.readonly != readonly {
                return Err(BbError::AlreadyExists(format!(
                    "volume {volume_id} is published to {node_id:?} with readonly={}",
                    a.readonly
                )));
            }
            return Ok(());
        }
        write_json(
            &path,
            &Attachment {
                volume_id: volume_id.to_string(),
                node_id: node_id.to_string(),
                readonly,
            },
        )
    }

    /// Removes the attachment; OK if there is none.
    pub fn detach(&self, volume_id: &str, node_id: &str) -> Result<(), BbError> {
        let _l = self.locked();
        if !valid_id("bbv-", volume_id) {
            return Ok(());
        }
        remove(&self.attachment_json(volume_id, node_id))
    }

    /// The nodes volume `volume_id` is attached to.
    pub fn attachments_of(&self, volume_id: &str) -> Result<Vec<String>, BbError> {
        Ok(self
            .records::<Attachment>("attachments")?
            .into_iter()
            .filter(|a| a.volume_id == volume_id)
            .map(|a| a.node_id)
            .collect())
    }

    /// The staging record of `volume_id`, if staged (or being staged).
    pub fn staged(&self, volume_id: &str) -> Result<Option<StagedRecord>, BbError> {
        if !valid_id("bbv-", volume_id) {
            return Ok(None);
        }
        read_json(&self.staged_json(volume_id))
    }

    /// Writes the staging record.
    pub fn put_staged(&self, record: &StagedRecord) -> Result<(), BbError> {
        write_json(&self.staged_json(&record.volume_id), record)
    }

    /// Removes the staging record; OK if there is none.
    pub fn remove_staged(&self, volume_id: &str) -> Result<(), BbError> {
        if !valid_id("bbv-", volume_id) {
            return Ok(());
        }
        remove(&self.staged_json(volume_id))
    }

    /// Marks that a stalled call (`--fault stall:<rpc>`) has done its work.
    pub fn mark_stalled(&self, rpc: &str) -> Result<(), BbError> {
        let path = self.dir.join("stalled").join(rpc);
        fs::write(&path, b"").map_err(|e| BbError::io("write", &path, e))
    }

    /// Bytes free for unprivileged use on the state directory's filesystem.
    pub fn free_bytes(&self) -> Result<u64, BbError> {
        let st = nix::sys::statvfs::statvfs(&self.dir)
            .map_err(|e| BbError::io("statvfs", &self.dir, e.into()))?;
        Ok(st.blocks_available() as u64 * st.fragment_size() as u64)
    }
}
