//! The controller core: node-local volumes as sparse backing files under `<state-dir>/volumes/`, each with
//! a small JSON record. No gRPC types here; `crate::csi::controller` is a thin layer over this.
//!
//! Idempotency comes from what is on disk: a volume's id is derived from its CreateVolume name
//! ([`volume_id_for`]), so a retried create finds the record of the first one.
//!
//! ```text
//! <state-dir>/volumes/<id>.img    the backing file (sparse; the sealed volume lives in it)
//! <state-dir>/volumes/<id>.json   the record: name, capacity, parameters, creation time
//! ```

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::dm::DeviceMapper;
use crate::header::{self, FsKind, HEADER_SIZE, Journal, Profile};

/// Smallest volume: what `Volumes::format` accepts (`volume::MIN_DEVICE_SIZE`).
pub const MIN_VOLUME_BYTES: u64 = 64 << 20;
/// Smallest volume that holds an xfs filesystem, with `integrity: hmac-sha256` (either journal mode).
/// mkfs.xfs (xfsprogs >= 5.19) refuses a filesystem under 300 MB; dm-integrity's tags and journal take
/// the rest. Measured in the test guest (Linux 6.1, xfsprogs 6.1): `volume format --fs xfs` succeeds on a
/// 307 MiB backing file and fails on 306 MiB.
pub const XFS_MIN_VOLUME_BYTES_AEAD: u64 = 307 << 20;
/// Smallest volume that holds an xfs filesystem with `integrity: none` (measured as above: 301 MiB
/// succeeds, 300 MiB fails; the header region takes the difference).
pub const XFS_MIN_VOLUME_BYTES_XTS: u64 = 301 << 20;
/// Size of a volume created without a capacity range.
pub const DEFAULT_VOLUME_BYTES: u64 = 1 << 30;
/// Volume sizes are whole MiB.
pub const SIZE_ALIGN: u64 = 1 << 20;
/// Bytes overwritten by a crypto-erase: both header copies.
pub const ERASE_BYTES: usize = 2 * HEADER_SIZE;
/// Prefix of every volume id.
pub const VOLUME_ID_PREFIX: &str = "sv-";
/// Prefix of the device-mapper name of a volume's stack.
pub const DM_NAME_PREFIX: &str = "sealcsi-";
/// StorageClass parameter keys with this prefix are the CO's (csi-provisioner's extra metadata), not ours.
pub const CO_PARAMETER_PREFIX: &str = "csi.storage.k8s.io/";

/// What a core error means to a caller, independent of any transport. `crate::csi::status` maps it to
/// a gRPC code, in one place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Meaning {
    NotFound,
    AlreadyExists,
    InvalidArgument,
    FailedPrecondition,
    Aborted,
    OutOfRange,
    ResourceExhausted,
    Unavailable,
    Internal,
}

/// Errors that know what they mean to a caller.
pub trait Meaningful: std::error::Error {
    fn meaning(&self) -> Meaning;
}

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// The request is malformed (bad parameter, bad capacity range).
    #[error("{0}")]
    InvalidArgument(String),
    /// No volume with this id.
    #[error("volume {0} does not exist")]
    NotFound(String),
    /// A volume of this name exists with different parameters or an incompatible size.
    #[error("volume {name} already exists with {what}")]
    AlreadyExists { name: String, what: String },
    /// The capacity asked for is outside what sealcsi supports.
    #[error("{0}")]
    OutOfRange(String),
    /// Not enough space in the state directory.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The volume is in a state that forbids the operation (staged, open).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A ListVolumes starting token this plugin did not hand out.
    #[error("invalid starting token {0:?}")]
    BadToken(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("volume record {path}: {reason}")]
    Record { path: String, reason: String },
    #[error(transparent)]
    Dm(#[from] crate::dm::DmError),
}

impl Meaningful for ProvisionError {
    fn meaning(&self) -> Meaning {
        match self {
            ProvisionError::InvalidArgument(_) => Meaning::InvalidArgument,
            ProvisionError::NotFound(_) => Meaning::NotFound,
            ProvisionError::AlreadyExists { .. } => Meaning::AlreadyExists,
            ProvisionError::OutOfRange(_) => Meaning::OutOfRange,
            ProvisionError::ResourceExhausted(_) => Meaning::ResourceExhausted,
            ProvisionError::FailedPrecondition(_) => Meaning::FailedPrecondition,
            ProvisionError::BadToken(_) => Meaning::Aborted,
            ProvisionError::Io { .. } | ProvisionError::Record { .. } | ProvisionError::Dm(_) => {
                Meaning::Internal
            }
        }
    }
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> ProvisionError {
    let context = context.into();
    move |source| ProvisionError::Io { context, source }
}

/// `integrity` parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IntegrityParam {
    HmacSha256,
    None,
}

/// `init` parameter (filesystem volumes; block volumes are always fully initialized).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InitParam {
    Fast,
    Full,
}

/// `journal` parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JournalParam {
    Journal,
    Direct,
}

/// The StorageClass parameters sealcsi takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeParams {
    pub integrity: IntegrityParam,
    pub init: InitParam,
    pub journal: JournalParam,
}

impl Default for VolumeParams {
    fn default() -> Self {
        Self {
            integrity: IntegrityParam::HmacSha256,
            init: InitParam::Fast,
            journal: JournalParam::Journal,
        }
    }
}

/// The parameter keys, with their allowed values (first is the default).
pub const PARAMETERS: &[(&str, &[&str])] = &[
    ("integrity", &["hmac-sha256", "none"]),
    ("init", &["fast", "full"]),
    ("journal", &["journal", "direct"]),
];

fn allowed_keys() -> String {
    PARAMETERS
        .iter()
        .map(|(k, v)| format!("{k} ({})", v.join("|")))
        .collect::<Vec<_>>()
        .join(", ")
}

impl VolumeParams {
    /// Parses StorageClass parameters; unknown keys and values are refused, naming what is allowed. Keys
    /// under `csi.storage.k8s.io/` belong to the CO and are ignored.
    pub fn parse(params: &HashMap<String, String>) -> Result<Self, ProvisionError> {
        let mut out = VolumeParams::default();
        let mut keys: Vec<&String> = params.keys().collect();
        keys.sort();
        for key in keys {
            let value = params[key].as_str();
            if key.starts_with(CO_PARAMETER_PREFIX) {
                continue;
            }
            let bad_value = |allowed: &str| {
                ProvisionError::InvalidArgument(format!(
                    "parameter {key}: {value:?} is not one of {allowed}"
                ))
            };
            match key.as_str() {
                "integrity" => {
                    out.integrity = match value {
                        "hmac-sha256" => IntegrityParam::HmacSha256,
                        "none" => IntegrityParam::None,
                        _ => return Err(bad_value("hmac-sha256|none")),
                    }
                }
                "init" => {
                    out.init = match value {
                        "fast" => InitParam::Fast,
                        "full" => InitParam::Full,
                        _ => return Err(bad_value("fast|full")),
                    }
                }
                "journal" => {
                    out.journal = match value {
                        "journal" => JournalParam::Journal,
                        "direct" => JournalParam::Direct,
                        _ => return Err(bad_value("journal|direct")),
                    }
                }
                _ => {
                    return Err(ProvisionError::InvalidArgument(format!(
                        "unknown parameter {key:?}; allowed parameters: {}",
                        allowed_keys()
                    )));
                }
            }
        }
        if out.integrity == IntegrityParam::None && params.contains_key("journal") {
            return Err(ProvisionError::InvalidArgument(
                "parameter journal applies only to integrity=hmac-sha256".into(),
            ));
        }
        Ok(out)
    }

    /// The parameters as the volume context handed to the node (all keys, explicit values).
    pub fn to_map(self) -> HashMap<String, String> {
        let integrity = match self.integrity {
            IntegrityParam::HmacSha256 => "hmac-sha256",
            IntegrityParam::None => "none",
        };
        let init = match self.init {
            InitParam::Fast => "fast",
            InitParam::Full => "full",
        };
        let journal = match self.journal {
            JournalParam::Journal => "journal",
            JournalParam::Direct => "direct",
        };
        HashMap::from([
            ("integrity".to_string(), integrity.to_string()),
            ("init".to_string(), init.to_string()),
            ("journal".to_string(), journal.to_string()),
        ])
    }

    /// The mapping profile these parameters ask for.
    pub fn profile(self) -> Profile {
        match self.integrity {
            IntegrityParam::None => Profile::XtsOnly,
            IntegrityParam::HmacSha256 => Profile::AeadHmacSha256 {
                journal: match self.journal {
                    JournalParam::Journal => Journal::Journal,
                    JournalParam::Direct => Journal::Direct,
                },
            },
        }
    }
}

/// The on-disk record of one volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub version: u32,
    pub volume_id: String,
    pub name: String,
    /// Size of the backing file when last created or expanded (the file's size is the truth).
    pub capacity_bytes: u64,
    pub parameters: VolumeParams,
    /// Unix seconds.
    pub created: u64,
}

/// The content of `<id>.grow`: see [`Store::set_pending_init`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct PendingInit {
    from_bytes: u64,
}

/// A volume as the controller reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeInfo {
    pub record: VolumeRecord,
    pub capacity_bytes: u64,
    pub backing: PathBuf,
}

impl VolumeInfo {
    pub fn id(&self) -> &str {
        &self.record.volume_id
    }
}

/// Health as the controller sees it from the backing file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    Healthy,
    Abnormal(String),
}

/// How a volume may be accessed: only single-node modes exist (the volumes are local to one node).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessMode {
    SingleNodeWriter,
    SingleNodeReaderOnly,
    SingleNodeSingleWriter,
    SingleNodeMultiWriter,
}

impl AccessMode {
    pub fn read_only(self) -> bool {
        self == AccessMode::SingleNodeReaderOnly
    }
}

/// Block device or mounted filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessType {
    Block,
    /// `fs` is `None` when the CO left the choice to the plugin (ext4 for a new volume, else what the
    /// volume was formatted with).
    Mount {
        fs: Option<FsKind>,
        flags: Vec<String>,
    },
}

/// A volume capability in core terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capability {
    pub access: AccessType,
    pub mode: AccessMode,
}

/// The filesystem named by a CSI `fs_type` (`""` = plugin's choice).
pub fn parse_fs_type(fs_type: &str) -> Result<Option<FsKind>, ProvisionError> {
    match fs_type {
        "" => Ok(None),
        "ext4" => Ok(Some(FsKind::Ext4)),
        "xfs" => Ok(Some(FsKind::Xfs)),
        other => Err(ProvisionError::InvalidArgument(format!(
            "fs_type {other:?} is not supported (ext4 or xfs)"
        ))),
    }
}

/// The name mount(2) and the tools know a filesystem by.
pub fn fs_name(fs: FsKind) -> &'static str {
    match fs {
        FsKind::Ext4 => "ext4",
        FsKind::Xfs => "xfs",
        FsKind::None => "none",
    }
}

/// The volume id for a CreateVolume name: `sv-` + the first 32 hex digits of SHA-256(name).
pub fn volume_id_for(name: &str) -> String {
    let digest = Sha256::digest(name.as_bytes());
    format!("{VOLUME_ID_PREFIX}{}", &hex::encode(digest)[..32])
}

/// Whether `id` has the shape of a volume id this plugin makes (anything else cannot exist here).
pub fn is_volume_id(id: &str) -> bool {
    id.strip_prefix(VOLUME_ID_PREFIX).is_some_and(|h| {
        h.len() == 32
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// The device-mapper name of a volume's (top) device: `sealcsi-<volume id>`.
pub fn dm_name_for(volume_id: &str) -> String {
    format!("{DM_NAME_PREFIX}{volume_id}")
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn round_up(n: u64, to: u64) -> u64 {
    n.div_ceil(to).saturating_mul(to)
}

/// The smallest volume that can hold what it is created for: [`MIN_VOLUME_BYTES`], or more for an xfs
/// filesystem ([`XFS_MIN_VOLUME_BYTES_AEAD`], [`XFS_MIN_VOLUME_BYTES_XTS`]).
pub fn min_volume_bytes(params: VolumeParams, fs: Option<FsKind>) -> u64 {
    match (fs, params.integrity) {
        (Some(FsKind::Xfs), IntegrityParam::HmacSha256) => XFS_MIN_VOLUME_BYTES_AEAD,
        (Some(FsKind::Xfs), IntegrityParam::None) => XFS_MIN_VOLUME_BYTES_XTS,
        _ => MIN_VOLUME_BYTES,
    }
}

/// The size a volume gets for a capacity range (`0` = unset, as in CSI).
pub fn size_for_range(required: u64, limit: u64) -> Result<u64, ProvisionError> {
    size_for_range_min(required, limit, MIN_VOLUME_BYTES, "a sealcsi volume")
}

/// [`size_for_range`] for a volume of at least `min` bytes (`what` names it in errors). A range below the
/// minimum is rounded up to it when the limit allows (CSI lets a volume exceed `required_bytes`).
pub fn size_for_range_min(
    required: u64,
    limit: u64,
    min: u64,
    what: &str,
) -> Result<u64, ProvisionError> {
    let min = min.max(MIN_VOLUME_BYTES);
    if limit != 0 && limit < required {
        return Err(ProvisionError::InvalidArgument(format!(
            "capacity range: limit_bytes {limit} is smaller than required_bytes {required}"
        )));
    }
    let size = if required == 0 {
        let size = DEFAULT_VOLUME_BYTES.max(min);
        if limit != 0 {
            size.min(limit / SIZE_ALIGN * SIZE_ALIGN)
        } else {
            size
        }
    } else {
        round_up(required.max(min), SIZE_ALIGN)
    };
    if limit != 0 && size > limit {
        // Rounding up to whole MiB crossed the limit: use the largest whole MiB within it.
        let within = limit / SIZE_ALIGN * SIZE_ALIGN;
        if within >= required.max(min) {
            return Ok(within);
        }
        return Err(ProvisionError::OutOfRange(format!(
            "capacity range [{required}, {limit}] allows no volume: {what} needs at least {min} bytes \
             ({} MiB), and sealcsi volumes are whole MiB",
            min >> 20
        )));
    }
    if size < min {
        return Err(ProvisionError::OutOfRange(format!(
            "capacity limit {limit} is below the smallest size of {what} ({min} bytes, {} MiB)",
            min >> 20
        )));
    }
    Ok(size)
}

/// Free bytes (for unprivileged users) of the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> Result<u64, ProvisionError> {
    let st = nix::sys::statvfs::statvfs(path).map_err(|e| ProvisionError::Io {
        context: format!("statvfs {}", path.display()),
        source: e.into(),
    })?;
    Ok((st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64))
}

/// The volume store: records and backing files under `<state-dir>/volumes/`. Shared by the controller
/// and the node core (the volumes are local to this node).
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// Opens (creating) `<state_dir>/volumes`.
    pub fn open(state_dir: &Path) -> Result<Self, ProvisionError> {
        let dir = state_dir.join("volumes");
        fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
        Ok(Self { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn checked<'a>(&self, volume_id: &'a str) -> Result<&'a str, ProvisionError> {
        if is_volume_id(volume_id) {
            Ok(volume_id)
        } else {
            Err(ProvisionError::NotFound(volume_id.to_string()))
        }
    }

    /// The backing file of `volume_id` (whether or not it exists).
    pub fn backing_path(&self, volume_id: &str) -> PathBuf {
        self.dir.join(format!("{volume_id}.img"))
    }

    fn record_path(&self, volume_id: &str) -> PathBuf {
        self.dir.join(format!("{volume_id}.json"))
    }

    /// The record of `volume_id`, `None` if there is none. Ids of a foreign shape are `None` too.
    pub fn record(&self, volume_id: &str) -> Result<Option<VolumeRecord>, ProvisionError> {
        if !is_volume_id(volume_id) {
            return Ok(None);
        }
        let path = self.record_path(volume_id);
        let text = match fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(format!("reading {}", path.display()))(e)),
        };
        let record: VolumeRecord =
            serde_json::from_slice(&text).map_err(|e| ProvisionError::Record {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
        if record.volume_id != volume_id {
            return Err(ProvisionError::Record {
                path: path.display().to_string(),
                reason: format!("holds volume id {}", record.volume_id),
            });
        }
        Ok(Some(record))
    }

    /// The volume `volume_id` with its current size, or NotFound.
    pub fn get(&self, volume_id: &str) -> Result<VolumeInfo, ProvisionError> {
        let id = self.checked(volume_id)?;
        let record = self
            .record(id)?
            .ok_or_else(|| ProvisionError::NotFound(id.to_string()))?;
        let backing = self.backing_path(id);
        let capacity_bytes = match fs::metadata(&backing) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(ProvisionError::Record {
                    path: backing.display().to_string(),
                    reason: "the backing file of a recorded volume is missing".into(),
                });
            }
            Err(e) => return Err(io_err(format!("stat {}", backing.display()))(e)),
        };
        Ok(VolumeInfo {
            record,
            capacity_bytes,
            backing,
        })
    }

    /// Writes `record` atomically: temporary file, fsync, rename, fsync of the directory.
    fn write_record(&self, record: &VolumeRecord) -> Result<(), ProvisionError> {
        let path = self.record_path(&record.volume_id);
        let tmp = self.dir.join(format!(".{}.json.tmp", record.volume_id));
        let text = serde_json::to_vec_pretty(record).map_err(|e| ProvisionError::Record {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        let ctx = format!("writing {}", tmp.display());
        let mut f = File::create(&tmp).map_err(io_err(ctx.clone()))?;
        f.write_all(&text).map_err(io_err(ctx.clone()))?;
        f.sync_all().map_err(io_err(ctx))?;
        fs::rename(&tmp, &path).map_err(io_err(format!("renaming to {}", path.display())))?;
        self.sync_dir()
    }

    fn sync_dir(&self) -> Result<(), ProvisionError> {
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(format!("fsync {}", self.dir.display())))
    }

    /// Grows the backing file of `volume_id` to fit the capacity range (`0` = unset); never shrinks.
    /// Returns the file's size. Asking for no more than the current size is success at that size, unless
    /// the volume is already above `limit` (OUT_OF_RANGE: sealcsi never shrinks).
    pub fn grow_backing(
        &self,
        volume_id: &str,
        required: u64,
        limit: u64,
    ) -> Result<u64, ProvisionError> {
        let info = self.get(volume_id)?;
        if limit != 0 && limit < required {
            return Err(ProvisionError::InvalidArgument(format!(
                "capacity range: limit_bytes {limit} is smaller than required_bytes {required}"
            )));
        }
        if required <= info.capacity_bytes {
            if limit != 0 && info.capacity_bytes > limit {
                return Err(ProvisionError::OutOfRange(format!(
                    "volume is {} bytes, above limit_bytes {limit}; sealcsi never shrinks a volume",
                    info.capacity_bytes
                )));
            }
            return Ok(info.capacity_bytes);
        }
        let size = size_for_range(required, limit)?;
        let grow = size - info.capacity_bytes;
        let free = free_bytes(&self.dir)?;
        if grow > free {
            return Err(ProvisionError::ResourceExhausted(format!(
                "growing by {grow} bytes does not fit: {free} bytes free in {}",
                self.dir.display()
            )));
        }
        let ctx = format!("growing {}", info.backing.display());
        let f = OpenOptions::new()
            .write(true)
            .open(&info.backing)
            .map_err(io_err(ctx.clone()))?;
        f.set_len(size).map_err(io_err(ctx.clone()))?;
        f.sync_all().map_err(io_err(ctx))?;
        let mut record = info.record;
        record.capacity_bytes = size;
        self.write_record(&record)?;
        tracing::info!(volume.id = %volume_id, bytes = size, "expanded volume backing file");
        Ok(size)
    }

    /// The file recording an expansion whose new space is not initialized yet.
    fn pending_init_path(&self, volume_id: &str) -> PathBuf {
        self.dir.join(format!("{volume_id}.grow"))
    }

    /// Where the not yet initialized new space of `volume_id` starts (a byte offset in its top device),
    /// if an expansion was interrupted before initializing it ([`Store::set_pending_init`]).
    pub fn pending_init(&self, volume_id: &str) -> Result<Option<u64>, ProvisionError> {
        let path = self.pending_init_path(self.checked(volume_id)?);
        let text = match fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(format!("reading {}", path.display()))(e)),
        };
        let pending: PendingInit =
            serde_json::from_slice(&text).map_err(|e| ProvisionError::Record {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
        Ok(Some(pending.from_bytes))
    }

    /// Records, durably, that the top device of `volume_id` is about to grow and everything from
    /// `from_bytes` on must be initialized before anyone uses it. Written before the mapping grows and
    /// cleared ([`Store::clear_pending_init`]) only once the new space is initialized, so a retry after a
    /// crash anywhere in between knows what is left to do even when the mapping has already grown.
    pub fn set_pending_init(&self, volume_id: &str, from_bytes: u64) -> Result<(), ProvisionError> {
        let id = self.checked(volume_id)?;
        let path = self.pending_init_path(id);
        let tmp = self.dir.join(format!(".{id}.grow.tmp"));
        let text = serde_json::to_vec(&PendingInit { from_bytes }).map_err(|e| {
            ProvisionError::Record {
                path: path.display().to_string(),
                reason: e.to_string(),
            }
        })?;
        let ctx = format!("writing {}", tmp.display());
        let mut f = File::create(&tmp).map_err(io_err(ctx.clone()))?;
        f.write_all(&text).map_err(io_err(ctx.clone()))?;
        f.sync_all().map_err(io_err(ctx))?;
        fs::rename(&tmp, &path).map_err(io_err(format!("renaming to {}", path.display())))?;
        self.sync_dir()
    }

    /// The new space of `volume_id` is initialized: forget the pending record.
    pub fn clear_pending_init(&self, volume_id: &str) -> Result<(), ProvisionError> {
        let path = self.pending_init_path(self.checked(volume_id)?);
        match fs::remove_file(&path) {
            Ok(()) => self.sync_dir(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(format!("removing {}", path.display()))(e)),
        }
    }

    /// Every recorded volume id, sorted.
    pub fn ids(&self) -> Result<Vec<String>, ProvisionError> {
        let mut ids: Vec<String> = fs::read_dir(&self.dir)
            .map_err(io_err(format!("listing {}", self.dir.display())))?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let id = name.strip_suffix(".json")?;
                is_volume_id(id).then(|| id.to_string())
            })
            .collect();
        ids.sort();
        Ok(ids)
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

/// One page of [`Provisioner::list`].
#[derive(Debug, Clone)]
pub struct Page {
    pub volumes: Vec<VolumeInfo>,
    /// Empty when this was the last page.
    pub next_token: String,
}

/// The controller core.
pub struct Provisioner {
    store: Store,
    dm: Arc<dyn DeviceMapper>,
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
        Self { store, dm }
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
    ) -> Result<Created, ProvisionError> {
        if name.is_empty() {
            return Err(ProvisionError::InvalidArgument(
                "volume name is empty".into(),
            ));
        }
        let id = volume_id_for(name);
        if let Some(record) = self.store.record(&id)? {
            if record.name != name {
                return Err(ProvisionError::AlreadyExists {
                    name: name.into(),
                    what: format!("a name hashing to the same id ({id})"),
                });
            }
            if record.parameters != params {
                return Err(ProvisionError::AlreadyExists {
                    name: name.into(),
                    what: format!("different parameters ({:?})", record.parameters),
                });
            }
            let info = self.store.get(&id)?;
            let fits =
                info.capacity_bytes >= required && (limit == 0 || info.capacity_bytes <= limit);
            if !fits {
                return Err(ProvisionError::AlreadyExists {
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
        let free = free_bytes(&self.store.dir)?;
        if size > free {
            return Err(ProvisionError::ResourceExhausted(format!(
                "volume of {size} bytes does not fit: {free} bytes free in {}",
                self.store.dir.display()
            )));
        }
        // A backing file without a record is the leftover of an interrupted create: nobody can have
        // staged it (staging needs the record), so it is emptied and reused.
        let backing = self.store.backing_path(&id);
        let ctx = format!("creating {}", backing.display());
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&backing)
            .map_err(io_err(ctx.clone()))?;
        f.set_len(size).map_err(io_err(ctx.clone()))?;
        f.sync_all().map_err(io_err(ctx))?;
        let record = VolumeRecord {
            version: 1,
            volume_id: id.clone(),
            name: name.to_string(),
            capacity_bytes: size,
            parameters: params,
            created: now_unix(),
        };
        self.store.write_record(&record)?;
        tracing::info!(volume.id = %id, bytes = size, "created volume");
        Ok(Created::New(self.store.get(&id)?))
    }

    /// Why `volume_id` cannot be deleted or changed now, if it is open on this node.
    fn open_on_node(&self, volume_id: &str) -> Result<Option<String>, ProvisionError> {
        let name = dm_name_for(volume_id);
        for dev in [name.clone(), format!("{name}-integrity")] {
            let dm_name = crate::dm::DmName::try_from(dev.as_str())?;
            if self.dm.info(&dm_name)?.is_some() {
                return Ok(Some(format!(
                    "volume {volume_id} is staged on this node (device-mapper device {dev} exists); \
                     unstage it first"
                )));
            }
        }
        Ok(None)
    }

    /// Deletes `volume_id`: crypto-erase (both header copies zeroed and synced), then the file, then the
    /// record. Deleting a volume that does not exist succeeds.
    pub fn delete(&self, volume_id: &str) -> Result<(), ProvisionError> {
        if !is_volume_id(volume_id) {
            return Ok(());
        }
        let backing = self.store.backing_path(volume_id);
        let record = self.store.record_path(volume_id);
        let has_backing = backing.exists();
        if !has_backing && !record.exists() {
            return Ok(());
        }
        if let Some(why) = self.open_on_node(volume_id)? {
            return Err(ProvisionError::FailedPrecondition(why));
        }
        if has_backing {
            crypto_erase(&backing)?;
            fs::remove_file(&backing).map_err(io_err(format!("removing {}", backing.display())))?;
        }
        self.store.clear_pending_init(volume_id)?;
        match fs::remove_file(&record) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(format!("removing {}", record.display()))(e)),
        }
        self.store.sync_dir()?;
        tracing::info!(volume.id = %volume_id, "deleted volume (crypto-erased)");
        Ok(())
    }

    /// One page of volumes in id order. `starting_token` is what a previous page returned as `next_token`
    /// (empty for the first page); `max_entries` 0 means all.
    pub fn list(&self, max_entries: usize, starting_token: &str) -> Result<Page, ProvisionError> {
        let ids = self.store.ids()?;
        let start = if starting_token.is_empty() {
            0
        } else {
            let from = decode_token(starting_token)?;
            ids.partition_point(|id| id.as_str() < from.as_str())
        };
        let end = if max_entries == 0 {
            ids.len()
        } else {
            (start + max_entries).min(ids.len())
        };
        let mut volumes = Vec::with_capacity(end - start);
        for id in &ids[start..end] {
            match self.store.get(id) {
                Ok(v) => volumes.push(v),
                // Deleted between listing and reading: not part of the page.
                Err(ProvisionError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        let next_token = ids.get(end).map(|id| encode_token(id)).unwrap_or_default();
        Ok(Page {
            volumes,
            next_token,
        })
    }

    /// Free bytes in the state directory's filesystem.
    pub fn capacity(&self) -> Result<u64, ProvisionError> {
        free_bytes(&self.store.dir)
    }

    /// Grows the backing file of `volume_id` to fit the range; never shrinks. Returns the new size. The
    /// open mapping and the filesystem grow on the node (NodeExpandVolume, which also grows the file).
    pub fn expand(
        &self,
        volume_id: &str,
        required: u64,
        limit: u64,
    ) -> Result<u64, ProvisionError> {
        self.store.grow_backing(volume_id, required, limit)
    }

    /// What the backing file says about the volume's health (no key needed).
    pub fn condition(&self, volume: &VolumeInfo) -> Condition {
        backing_condition(&volume.backing)
    }
}

/// Health from the backing file's header region: a volume not yet formatted (all zero) is healthy; a
/// header that is present must decode in both copies.
pub fn backing_condition(backing: &Path) -> Condition {
    let mut region = vec![0u8; ERASE_BYTES];
    let read = File::open(backing).and_then(|f| f.read_exact_at(&mut region, 0));
    if let Err(e) = read {
        return Condition::Abnormal(format!(
            "cannot read the header region of the backing file: {e}"
        ));
    }
    if !header::has_magic(&region) {
        if region.iter().all(|&b| b == 0) {
            return Condition::Healthy;
        }
        return Condition::Abnormal(
            "the header region holds data that is not a sealcsi header".into(),
        );
    }
    match header::select(&region) {
        Ok(active) => match &active.other_copy_error {
            None => Condition::Healthy,
            Some(e) => Condition::Abnormal(format!(
                "header copy {} is damaged ({e}); copy {} is intact",
                active.inactive_copy(),
                active.copy
            )),
        },
        Err(e) => Condition::Abnormal(format!("the volume header no longer decodes: {e}")),
    }
}

/// Overwrites both header copies with zeros and syncs: without them the volume key is gone for good.
pub fn crypto_erase(backing: &Path) -> Result<(), ProvisionError> {
    let ctx = format!("crypto-erasing {}", backing.display());
    let f = OpenOptions::new()
        .write(true)
        .open(backing)
        .map_err(io_err(ctx.clone()))?;
    let len = f.metadata().map_err(io_err(ctx.clone()))?.len();
    let n = (ERASE_BYTES as u64).min(len) as usize;
    f.write_all_at(&vec![0u8; n], 0)
        .map_err(io_err(ctx.clone()))?;
    f.sync_all().map_err(io_err(ctx))?;
    Ok(())
}

const TOKEN_PREFIX: &str = "v1:";

fn encode_token(next_id: &str) -> String {
    format!("{TOKEN_PREFIX}{next_id}")
}

fn decode_token(token: &str) -> Result<String, ProvisionError> {
    token
        .strip_prefix(TOKEN_PREFIX)
        .filter(|id| is_volume_id(id))
        .map(str::to_string)
        .ok_or_else(|| ProvisionError::BadToken(token.to_string()))
}

/// Parameters as a sorted map, for logs and volume contexts (no secrets are ever parameters here).
pub fn sorted(params: &HashMap<String, String>) -> BTreeMap<&str, &str> {
    params
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dm::{MemoryDm, TargetLine};

    fn params(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn provisioner() -> (tempfile::TempDir, Arc<MemoryDm>, Provisioner) {
        let dir = tempfile::tempdir().unwrap();
        let dm = Arc::new(MemoryDm::new());
        let p = Provisioner::new(Store::open(dir.path()).unwrap(), dm.clone());
        (dir, dm, p)
    }

    #[test]
    fn ids_are_deterministic_and_checked() {
        let id = volume_id_for("pvc-1");
        assert_eq!(id, volume_id_for("pvc-1"));
        assert_ne!(id, volume_id_for("pvc-2"));
        assert!(is_volume_id(&id));
        assert_eq!(id.len(), 35);
        for bad in [
            "",
            "sv-",
            "sv-XYZ",
            "../etc",
            "sv-0123456789abcdef0123456789abcdeg",
        ] {
            assert!(!is_volume_id(bad), "{bad}");
        }
        assert!(crate::dm::DmName::try_from(format!("{}-integrity", dm_name_for(&id))).is_ok());
    }

    #[test]
    fn parameters_parse_and_refuse_unknown_keys() {
        assert_eq!(
            VolumeParams::parse(&params(&[])).unwrap(),
            VolumeParams::default()
        );
        let p = VolumeParams::parse(&params(&[("integrity", "none"), ("init", "full")])).unwrap();
        assert_eq!(p.profile(), Profile::XtsOnly);
        assert_eq!(p.init, InitParam::Full);
        let p = VolumeParams::parse(&params(&[("journal", "direct")])).unwrap();
        assert_eq!(
            p.profile(),
            Profile::AeadHmacSha256 {
                journal: Journal::Direct
            }
        );
        let err = VolumeParams::parse(&params(&[("fs", "ext4")]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"fs\"")
                && err.contains("integrity")
                && err.contains("init")
                && err.contains("journal"),
            "{err}"
        );
        assert!(VolumeParams::parse(&params(&[("init", "slow")])).is_err());
        assert!(
            VolumeParams::parse(&params(&[("integrity", "none"), ("journal", "direct")])).is_err()
        );
        // The CO's own keys are not ours to judge.
        VolumeParams::parse(&params(&[("csi.storage.k8s.io/pvc/name", "x")])).unwrap();
        let round = VolumeParams::parse(&p.to_map()).unwrap();
        assert_eq!(round, p);
    }

    #[test]
    fn sizes_follow_the_range() {
        const M: u64 = 1 << 20;
        assert_eq!(size_for_range(0, 0).unwrap(), DEFAULT_VOLUME_BYTES);
        assert_eq!(size_for_range(1, 0).unwrap(), MIN_VOLUME_BYTES);
        assert_eq!(size_for_range(100 * M + 1, 0).unwrap(), 101 * M);
        assert_eq!(
            size_for_range(100 * M + 1, 100 * M + 10)
                .unwrap_err()
                .meaning(),
            Meaning::OutOfRange
        );
        assert_eq!(size_for_range(100 * M, 200 * M + 5).unwrap(), 100 * M);
        assert_eq!(size_for_range(0, 100 * M + 5).unwrap(), 100 * M);
        assert_eq!(
            size_for_range(10, 5).unwrap_err().meaning(),
            Meaning::InvalidArgument
        );
        assert_eq!(
            size_for_range(0, M).unwrap_err().meaning(),
            Meaning::OutOfRange
        );
    }

    #[test]
    fn xfs_volumes_have_their_own_minimum() {
        const M: u64 = 1 << 20;
        let aead = VolumeParams::default();
        let xts = VolumeParams {
            integrity: IntegrityParam::None,
            ..aead
        };
        assert_eq!(min_volume_bytes(aead, None), MIN_VOLUME_BYTES);
        assert_eq!(min_volume_bytes(aead, Some(FsKind::Ext4)), MIN_VOLUME_BYTES);
        assert_eq!(min_volume_bytes(aead, Some(FsKind::Xfs)), 307 * M);
        assert_eq!(min_volume_bytes(xts, Some(FsKind::Xfs)), 301 * M);
        assert_eq!(size_for_range_min(1, 0, 307 * M, "x").unwrap(), 307 * M);
        assert_eq!(
            size_for_range_min(0, 0, 307 * M, "x").unwrap(),
            DEFAULT_VOLUME_BYTES
        );
        assert_eq!(
            size_for_range_min(0, 310 * M, 307 * M, "x").unwrap(),
            310 * M
        );
        let e = size_for_range_min(100 * M, 300 * M, 307 * M, "an xfs volume").unwrap_err();
        assert_eq!(e.meaning(), Meaning::OutOfRange);
        assert!(e.to_string().contains("an xfs volume"), "{e}");
        let (_d, _dm, p) = provisioner();
        let v = p.create("x", 100 * M, 0, aead, Some(FsKind::Xfs)).unwrap();
        assert_eq!(v.info().capacity_bytes, 307 * M);
    }

    #[test]
    fn pending_init_records_survive_until_cleared_and_deletion() {
        let (_d, _dm, p) = provisioner();
        let v = p
            .create("v", 64 << 20, 0, VolumeParams::default(), None)
            .unwrap()
            .info()
            .clone();
        let s = p.store();
        assert_eq!(s.pending_init(v.id()).unwrap(), None);
        s.set_pending_init(v.id(), 5 << 20).unwrap();
        assert_eq!(s.pending_init(v.id()).unwrap(), Some(5 << 20));
        s.clear_pending_init(v.id()).unwrap();
        s.clear_pending_init(v.id()).unwrap();
        assert_eq!(s.pending_init(v.id()).unwrap(), None);
        s.set_pending_init(v.id(), 1).unwrap();
        assert_eq!(s.ids().unwrap(), vec![v.id().to_string()]);
        p.delete(v.id()).unwrap();
        assert_eq!(s.pending_init(v.id()).unwrap(), None);
        assert_eq!(std::fs::read_dir(s.dir()).unwrap().count(), 0);
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
        assert_eq!(e.meaning(), Meaning::AlreadyExists);
        let other = VolumeParams {
            init: InitParam::Full,
            ..params
        };
        assert_eq!(
            p.create("v", 64 << 20, 0, other, None)
                .unwrap_err()
                .meaning(),
            Meaning::AlreadyExists
        );
        assert_eq!(
            p.store().get(a.info().id()).unwrap().capacity_bytes,
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
            .write_all_at(&[0xAB; ERASE_BYTES + 10], 0)
            .unwrap();
        let name = crate::dm::DmName::try_from(dm_name_for(v.id())).unwrap();
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
            p.delete(v.id()).unwrap_err().meaning(),
            Meaning::FailedPrecondition
        );
        dm.remove(&name).unwrap();
        crypto_erase(&v.backing).unwrap();
        let data = std::fs::read(&v.backing).unwrap();
        assert!(data[..ERASE_BYTES].iter().all(|&b| b == 0));
        assert_eq!(data[ERASE_BYTES], 0xAB);
        p.delete(v.id()).unwrap();
        assert!(!v.backing.exists());
        p.delete(v.id()).unwrap();
        assert_eq!(
            p.store().get(v.id()).unwrap_err().meaning(),
            Meaning::NotFound
        );
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
        assert_eq!(
            p.list(1, "garbage").unwrap_err().meaning(),
            Meaning::Aborted
        );
    }

    #[test]
    fn expand_grows_and_never_shrinks() {
        let (_d, _dm, p) = provisioner();
        let v = p
            .create("v", 64 << 20, 0, VolumeParams::default(), None)
            .unwrap()
            .info()
            .clone();
        assert_eq!(p.expand(v.id(), 32 << 20, 0).unwrap(), 64 << 20);
        assert_eq!(p.expand(v.id(), 100 << 20, 0).unwrap(), 100 << 20);
        assert_eq!(std::fs::metadata(&v.backing).unwrap().len(), 100 << 20);
        assert_eq!(
            p.expand(v.id(), 64 << 20, 80 << 20).unwrap_err().meaning(),
            Meaning::OutOfRange
        );
        assert_eq!(
            p.expand("sv-0000", 1, 0).unwrap_err().meaning(),
            Meaning::NotFound
        );
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
