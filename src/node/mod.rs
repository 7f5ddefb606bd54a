//! The node core: stage, unstage, publish, unpublish, stats and expansion of sealed volumes on this node.
//! No gRPC types here; `crate::csi::node` is a thin layer over [`NodeCore`].
//!
//! - [`capability`]: how a volume is accessed, in core terms;
//! - [`engine`]: the sealed part (open/format/close/condition/resize of the device-mapper stack);
//! - [`mount`]: mounts and the kernel's mount table;
//! - [`memory`]: the in-memory engine for host tests.
//!
//! Idempotency comes from observed state: what is mounted where (/proc/self/mountinfo), which
//! device-mapper devices exist. Device names are derived from the volume id.
//!
//! Every method blocks (ioctls, mkfs, mount): call from a blocking context.

pub mod capability;
pub mod engine;
pub mod memory;
pub mod mount;
pub mod stacked;

use std::fs;
use std::io;
use std::path::Path;
use std::sync::Arc;

use crate::error::{Classify, Kind};
use crate::header::FsKind;
use crate::store::{Store, StoreError, VolumeId, VolumeInfo};
use crate::volume::init::InitMode;
use crate::volume::{Condition, FormatOptions};
use capability::{AccessMode, AccessType, Capability};
pub use engine::{EngineError, KernelEngine, StagedDevice, VolumeEngine};
pub use memory::MemoryEngine;
pub use mount::{
    BindFlags, MemoryMounter, MountError, MountInfo, MountPlace, Mounter, SystemMounter,
};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Mount(#[from] MountError),
    /// The backend driver of a stacked volume failed (its gRPC code kept).
    #[error(transparent)]
    Backend(#[from] crate::backend::csi::BackendCallError),
    #[error("{0}")]
    InvalidArgument(String),
    /// The volume is not in the state the call needs (not staged, still in use).
    #[error("{0}")]
    FailedPrecondition(String),
    /// Something incompatible is already at the path.
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

impl Classify for NodeError {
    fn kind(&self) -> Kind {
        match self {
            NodeError::Store(e) => e.kind(),
            NodeError::Engine(e) => e.kind(),
            NodeError::Backend(e) => e.kind(),
            NodeError::Mount(MountError::BadOption(_)) => Kind::InvalidArgument,
            NodeError::Mount(e) if e.is_busy() => Kind::Busy,
            NodeError::Mount(_) => Kind::Internal,
            NodeError::InvalidArgument(_) => Kind::InvalidArgument,
            NodeError::FailedPrecondition(_) => Kind::FailedPrecondition,
            NodeError::AlreadyExists(_) => Kind::AlreadyExists,
            NodeError::NotFound(_) => Kind::NotFound,
            NodeError::Io { .. } => Kind::Internal,
        }
    }
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> NodeError {
    let context = context.into();
    move |source| NodeError::Io { context, source }
}

/// An unstage or unpublish that found neither a record nor anything to undo names no volume here.
fn unknown_unless(found: bool, volume_id: &VolumeId) -> Result<(), NodeError> {
    if found {
        Ok(())
    } else {
        Err(NodeError::NotFound(format!(
            "volume {volume_id} does not exist"
        )))
    }
}

/// The metadata of a volume path the CO named (NOT_FOUND when there is nothing there).
fn volume_path_metadata(volume_path: &Path) -> Result<fs::Metadata, NodeError> {
    fs::metadata(volume_path).map_err(|_| {
        NodeError::NotFound(format!(
            "volume path {} does not exist",
            volume_path.display()
        ))
    })
}

/// Usage of a published volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    Filesystem {
        total_bytes: u64,
        available_bytes: u64,
        used_bytes: u64,
        total_inodes: u64,
        available_inodes: u64,
        used_inodes: u64,
    },
    Block {
        total_bytes: u64,
    },
}

/// What NodeGetVolumeStats reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeStats {
    pub usage: Usage,
    pub condition: Condition,
}

/// The node core.
pub struct NodeCore {
    store: Store,
    engine: Arc<dyn VolumeEngine>,
    mounter: Arc<dyn Mounter>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
    /// The backend driver of a stacked node ([`stacked`]); `None`: node-local volume files.
    backend: Option<Arc<dyn crate::backend::csi::CsiBackend>>,
    /// The backend's node capabilities, asked once.
    backend_caps: std::sync::OnceLock<std::collections::BTreeSet<crate::backend::csi::NodeCap>>,
}

impl std::fmt::Debug for NodeCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeCore")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

impl NodeCore {
    pub fn new(store: Store, engine: Arc<dyn VolumeEngine>, mounter: Arc<dyn Mounter>) -> Self {
        Self {
            store,
            engine,
            mounter,
            metrics: None,
            backend: None,
            backend_caps: std::sync::OnceLock::new(),
        }
    }

    /// Stacks this node over `backend` ([`stacked`]).
    pub fn with_backend(mut self, backend: Arc<dyn crate::backend::csi::CsiBackend>) -> Self {
        self.backend = Some(backend);
        self
    }

    /// Records initialization times and unseal failures in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    fn record_stage(&self, result: &Result<engine::StagedDevice, EngineError>) {
        let Some(metrics) = &self.metrics else { return };
        match result {
            Ok(staged) => {
                if let Some(t) = staged.init {
                    metrics.observe_init(t.fast, t.wipe_seconds, t.mkfs_seconds);
                }
            }
            Err(EngineError::Volume(e)) => {
                use crate::metrics::UnsealFailure;
                let reason = match e.kind() {
                    Kind::WrongIdentity => Some(UnsealFailure::WrongIdentity),
                    Kind::InvalidHeader => Some(UnsealFailure::InvalidHeader),
                    _ if matches!(e, crate::volume::VolumeError::Seal(_)) => {
                        Some(UnsealFailure::SourceUnavailable)
                    }
                    _ => None,
                };
                if let Some(reason) = reason {
                    metrics.unseal_failed(reason);
                }
            }
            Err(_) => {}
        }
    }

    pub fn engine(&self) -> &Arc<dyn VolumeEngine> {
        &self.engine
    }

    fn volume(&self, volume_id: &VolumeId) -> Result<VolumeInfo, NodeError> {
        Ok(self.store.get(volume_id)?)
    }

    /// Opens the volume (formatting a new one) and, for a filesystem, mounts it at `staging`.
    pub fn stage(
        &self,
        volume_id: &VolumeId,
        staging: &Path,
        cap: &Capability,
    ) -> Result<(), NodeError> {
        let vol = self.volume(volume_id)?;
        let dm = volume_id.stack_names().crypt.to_string();
        let node = volume_id.device_node();
        if matches!(cap.access, AccessType::Mount { .. })
            && let Some(m) = self.mounter.mounted_at(staging)?
        {
            if Path::new(&m.source) == node && self.engine.open_device(&dm)?.is_some() {
                return Ok(());
            }
            return Err(NodeError::AlreadyExists(format!(
                "{} already has a mount of {} (not this volume)",
                staging.display(),
                m.source
            )));
        }
        let params = vol.record.parameters;
        // Bound at format and checked at every open: another volume's file in this one's place is refused.
        let volume_binding = crate::header::volume_binding(volume_id.as_str());
        let format = match &cap.access {
            AccessType::Block => FormatOptions {
                profile: params.profile(),
                fs: FsKind::None,
                init: InitMode::Full,
                force: false,
                volume_binding,
            },
            AccessType::Mount { fs, .. } => FormatOptions {
                profile: params.profile(),
                fs: fs.unwrap_or(FsKind::Ext4),
                init: params.init,
                force: false,
                volume_binding,
            },
        };
        let was_open = self.engine.open_device(&dm)?.is_some();
        let staged = self.engine.stage_device(
            &vol.backing,
            &dm,
            &format,
            vol.record.formatted(),
            params.workqueues,
        );
        self.record_stage(&staged);
        let staged = staged?;
        if vol.record.formatted_uuid.is_none() {
            self.record_formatted(&vol, staged.uuid)?;
        }
        tracing::info!(volume.id = %volume_id, device = %staged.device.display(), formatted = staged.formatted, "volume open");
        if let Err(e) = self.finish_pending_init(volume_id, &dm) {
            if !was_open {
                self.close_quietly(volume_id, &dm);
            }
            return Err(e);
        }
        let AccessType::Mount { fs, flags } = &cap.access else {
            return Ok(());
        };
        let mismatch = match (staged.fs, fs) {
            (FsKind::None, _) => Some(
                "it was created as a raw block volume; it has no filesystem to mount".to_string(),
            ),
            (have, Some(want)) if have != *want => Some(format!(
                "it holds {}, the capability asks for {}",
                have.name(),
                want.name()
            )),
            _ => None,
        };
        if let Some(why) = mismatch {
            if !was_open {
                self.close_quietly(volume_id, &dm);
            }
            return Err(NodeError::InvalidArgument(format!(
                "cannot mount volume {volume_id}: {why}"
            )));
        }
        fs::create_dir_all(staging).map_err(io_err(format!("creating {}", staging.display())))?;
        // nosuid,nodev unless the CO's mount_flags say suid/dev (mount::secure_options).
        let mut options = mount::secure_options(flags);
        if cap.mode.read_only() {
            options.push("ro".into());
        }
        self.mounter
            .mount(&staged.device, staging, staged.fs.name(), &options)?;
        Ok(())
    }

    /// Records that the volume holds a sealcsi volume with `uuid`: never formatted again.
    fn record_formatted(&self, vol: &VolumeInfo, uuid: [u8; 16]) -> Result<(), NodeError> {
        let mut record = vol.record.clone();
        record.formatted_uuid = Some(uuid::Uuid::from_bytes(uuid).to_string());
        Ok(self.store.write_record(&record)?)
    }

    fn close_quietly(&self, volume_id: &VolumeId, dm: &str) {
        if let Err(e) = self.engine.close(dm) {
            tracing::warn!(volume.id = %volume_id, error = %e, "could not close the volume after a failed stage");
        }
    }

    /// Unmounts the staging path (if our volume is mounted there) and closes the volume.
    pub fn unstage(&self, volume_id: &VolumeId, staging: &Path) -> Result<(), NodeError> {
        let known = self.store.record(volume_id)?.is_some();
        let dm = volume_id.stack_names().crypt.to_string();
        let node = volume_id.device_node();
        let mut acted = false;
        if let Some(m) = self.mounter.mounted_at(staging)? {
            if Path::new(&m.source) != node {
                return Err(NodeError::FailedPrecondition(format!(
                    "{} holds a mount of {}, not of volume {volume_id}",
                    staging.display(),
                    m.source
                )));
            }
            let elsewhere: Vec<String> = self
                .mounter
                .mount_points_of(&m)?
                .into_iter()
                .filter(|place| !place.shows_at(&m.mount_point))
                .map(|place| place.path().display().to_string())
                .collect();
            if !elsewhere.is_empty() {
                return Err(NodeError::FailedPrecondition(format!(
                    "volume {volume_id} is still published at {}; unpublish it first",
                    elsewhere.join(", ")
                )));
            }
            self.mounter.umount(staging)?;
            acted = true;
        }
        match self.engine.close(&dm) {
            Ok(closed) => acted |= closed,
            Err(e) if e.kind() == Kind::Busy => {
                return Err(NodeError::FailedPrecondition(format!(
                    "volume {volume_id} is still in use (published somewhere?): {e}"
                )));
            }
            Err(e) => return Err(e.into()),
        }
        unknown_unless(known || acted, volume_id)
    }

    /// Bind-mounts the staged volume (filesystem) or its device node (block) at `target`.
    pub fn publish(
        &self,
        volume_id: &VolumeId,
        staging: &Path,
        target: &Path,
        cap: &Capability,
        readonly: bool,
    ) -> Result<(), NodeError> {
        self.volume(volume_id)?;
        let node = volume_id.device_node();
        let ro = readonly || cap.mode.read_only();
        match &cap.access {
            AccessType::Mount { flags, .. } => {
                let bind_flags = mount::BindFlags::filesystem(flags, ro)?;
                let staged = self
                    .mounter
                    .mounted_at(staging)?
                    .filter(|m| Path::new(&m.source) == node)
                    .ok_or_else(|| {
                        NodeError::FailedPrecondition(format!(
                            "volume {volume_id} is not staged at {}",
                            staging.display()
                        ))
                    })?;
                if let Some(m) = self.mounter.mounted_at(target)? {
                    if m.same_filesystem(&staged) && m.read_only() == ro {
                        return Ok(());
                    }
                    return Err(NodeError::AlreadyExists(format!(
                        "{} is already mounted with {} ({})",
                        target.display(),
                        m.source,
                        if m.read_only() {
                            "read-only"
                        } else {
                            "read-write"
                        }
                    )));
                }
                if cap.mode == AccessMode::SingleNodeSingleWriter && !ro {
                    let places = self.mounter.mount_points_of(&staged)?;
                    let others = places
                        .into_iter()
                        .filter(|p| !p.shows_at(staging))
                        .collect();
                    self.refuse_second_writer(volume_id, others, target)?;
                }
                fs::create_dir_all(target)
                    .map_err(io_err(format!("creating {}", target.display())))?;
                self.mounter.bind(staging, target, bind_flags)?;
            }
            AccessType::Block => {
                let device = self
                    .engine
                    .open_device(volume_id.stack_names().crypt.as_str())?
                    .ok_or_else(|| {
                        NodeError::FailedPrecondition(format!(
                            "volume {volume_id} is not staged on this node"
                        ))
                    })?;
                if let Some(m) = self.mounter.mounted_at(target)? {
                    if self.mounter.is_bind_of(target, &device)? && m.read_only() == ro {
                        return Ok(());
                    }
                    return Err(NodeError::AlreadyExists(format!(
                        "{} is already mounted with something else",
                        target.display()
                    )));
                }
                if let Some(parent) = target.parent() {
                    fs::create_dir_all(parent)
                        .map_err(io_err(format!("creating {}", parent.display())))?;
                }
                if target.is_dir() {
                    return Err(NodeError::InvalidArgument(format!(
                        "target path {} of a block volume is a directory",
                        target.display()
                    )));
                }
                if cap.mode == AccessMode::SingleNodeSingleWriter && !ro {
                    let writers = self.mounter.binds_of_device(&device)?;
                    self.refuse_second_writer(volume_id, writers, target)?;
                }
                fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(target)
                    .map_err(io_err(format!("creating {}", target.display())))?;
                self.mounter
                    .bind(&device, target, mount::BindFlags::block(ro))?;
            }
        }
        Ok(())
    }

    /// SINGLE_NODE_SINGLE_WRITER: a volume is published read-write at one target path at a time (CSI
    /// spec, AccessMode); a second read-write publish elsewhere is FAILED_PRECONDITION. Read-only
    /// publishes add no writer and stay allowed. `published` are the volume's other mount points (bind
    /// mounts of its filesystem, or of its device node for a block volume).
    fn refuse_second_writer(
        &self,
        volume_id: &VolumeId,
        published: Vec<MountPlace>,
        target: &Path,
    ) -> Result<(), NodeError> {
        for place in published {
            if place.shows_at(target) {
                continue;
            }
            let writable = self
                .mounter
                .mounted_at(place.path())?
                .is_some_and(|m| !m.read_only());
            if writable {
                return Err(NodeError::FailedPrecondition(format!(
                    "volume {volume_id} has the access mode SINGLE_NODE_SINGLE_WRITER and is already \
                     published read-write at {}",
                    place.path().display()
                )));
            }
        }
        Ok(())
    }

    /// Unmounts `target` and removes it.
    pub fn unpublish(&self, volume_id: &VolumeId, target: &Path) -> Result<(), NodeError> {
        let known = self.store.record(volume_id)?.is_some();
        let mut acted = false;
        // Bind mounts can stack when a CO retried a publish that half-succeeded: remove them all.
        for _ in 0..16 {
            if self.mounter.mounted_at(target)?.is_none() {
                break;
            }
            self.mounter.umount(target)?;
            acted = true;
        }
        let removed = match fs::symlink_metadata(target) {
            Ok(m) if m.is_dir() => fs::remove_dir(target),
            Ok(_) => fs::remove_file(target),
            Err(e) => Err(e),
        };
        match removed {
            Ok(()) => acted = true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(format!("removing {}", target.display()))(e)),
        }
        unknown_unless(known || acted, volume_id)
    }

    /// Usage and health of the volume published (or staged) at `volume_path`.
    pub fn stats(
        &self,
        volume_id: &VolumeId,
        volume_path: &Path,
    ) -> Result<VolumeStats, NodeError> {
        let vol = self.volume(volume_id)?;
        let dm = volume_id.stack_names().crypt.to_string();
        let meta = volume_path_metadata(volume_path)?;
        if self.mounter.mounted_at(volume_path)?.is_none() {
            return Err(NodeError::NotFound(format!(
                "volume {volume_id} is not mounted at {}",
                volume_path.display()
            )));
        }
        let usage = if meta.is_dir() {
            let st = nix::sys::statvfs::statvfs(volume_path).map_err(|e| NodeError::Io {
                context: format!("statvfs {}", volume_path.display()),
                source: e.into(),
            })?;
            let frsize = st.fragment_size() as u64;
            let (blocks, bfree, bavail) = (
                st.blocks() as u64,
                st.blocks_free() as u64,
                st.blocks_available() as u64,
            );
            let (files, ffree) = (st.files() as u64, st.files_free() as u64);
            Usage::Filesystem {
                total_bytes: blocks * frsize,
                available_bytes: bavail * frsize,
                used_bytes: blocks.saturating_sub(bfree) * frsize,
                total_inodes: files,
                available_inodes: ffree,
                used_inodes: files.saturating_sub(ffree),
            }
        } else {
            Usage::Block {
                total_bytes: self.engine.size_bytes(&dm)?,
            }
        };
        let condition = match self.engine.condition(&dm, &vol.backing) {
            Ok(c) => c,
            Err(e) => Condition::Abnormal(format!("cannot check the volume: {e}")),
        };
        Ok(VolumeStats { usage, condition })
    }

    /// Grows the volume to the capacity range (`0` = unset: to the backing file's current size): the
    /// backing file (never shrunk), the open mapping (loop, integrity, crypt), the new space's
    /// initialization, and the filesystem mounted at `volume_path` (if it is one). Returns the volume's new
    /// size in bytes (of the top device).
    ///
    /// Safe to retry after a crash at any step. The file, the loop device and the mapping grow only when
    /// they are smaller than what lies under them, so a retry redoes whatever is missing; the new space is
    /// recorded as pending ([`Store::set_pending_init`]) before the mapping grows and forgotten only after
    /// it is initialized, so a retry that finds the mapping already grown still initializes it. The
    /// filesystem grows last, never over uninitialized space.
    pub fn expand(
        &self,
        volume_id: &VolumeId,
        volume_path: &Path,
        required: u64,
        limit: u64,
    ) -> Result<u64, NodeError> {
        let vol = self.volume(volume_id)?;
        let dm = volume_id.stack_names().crypt.to_string();
        let meta = volume_path_metadata(volume_path)?;
        let device = self.engine.open_device(&dm)?.ok_or_else(|| {
            NodeError::FailedPrecondition(format!("volume {volume_id} is not staged on this node"))
        })?;
        let mount = if meta.is_dir() {
            let m = self.mounter.mounted_at(volume_path)?.ok_or_else(|| {
                NodeError::NotFound(format!(
                    "volume {volume_id} is not mounted at {}",
                    volume_path.display()
                ))
            })?;
            let fs = FsKind::from_fs_name(&m.fs_type).ok_or_else(|| {
                NodeError::FailedPrecondition(format!(
                    "{} holds {}, not ext4 or xfs",
                    volume_path.display(),
                    m.fs_type
                ))
            })?;
            Some(fs)
        } else {
            None
        };
        // A stacked volume's device is the backend's (grown by it): only a volume file grows here, to the
        // device size for the new usable size (`capacity`, what the controller reports).
        let capacity = if self.is_stacked() {
            0
        } else {
            self.store.grow_backing(volume_id, required, limit)?
        };
        let before = self.engine.size_bytes(&dm)?;
        let from = match self.store.pending_init(volume_id)? {
            Some(pending) => pending.min(before),
            None => before,
        };
        self.store.set_pending_init(volume_id, from)?;
        let binding = crate::header::volume_binding(volume_id.as_str());
        let expected = crate::volume::Expected {
            name: volume_id.as_str(),
            binding: &binding,
            uuid: vol.record.formatted(),
        };
        let bytes = self.engine.expand(&dm, &vol.backing, expected)?;
        self.engine.init_new_space(&dm, from, bytes)?;
        self.store.clear_pending_init(volume_id)?;
        if let Some(fs) = mount {
            self.engine.grow_fs(fs, &device, volume_path)?;
        }
        if bytes < required {
            // A stacked volume's device is the backend's: a backend that only records the new size
            // (the reference hostpath driver does, for block volumes) leaves it as it was. Success would
            // make the CO report a size the volume does not have.
            return Err(NodeError::FailedPrecondition(format!(
                "volume {volume_id} offers {bytes} bytes after the expansion, less than the {required} \
                 asked: the device under it did not grow enough"
            )));
        }
        tracing::info!(volume.id = %volume_id, bytes, capacity.bytes = capacity, "volume expanded");
        Ok(bytes)
    }

    /// Finishes the initialization of new space that an interrupted expansion left (see [`Self::expand`]),
    /// before the just opened volume is handed to anyone.
    fn finish_pending_init(&self, volume_id: &VolumeId, dm: &str) -> Result<(), NodeError> {
        let Some(from) = self.store.pending_init(volume_id)? else {
            return Ok(());
        };
        let to = self.engine.size_bytes(dm)?;
        tracing::info!(volume.id = %volume_id, from, to, "initializing the new space of an interrupted expansion");
        self.engine.init_new_space(dm, from, to)?;
        self.store.clear_pending_init(volume_id)?;
        Ok(())
    }
}
