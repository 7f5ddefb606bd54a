//! The sealed part of staging: the [`VolumeEngine`] trait the node core calls, and its real
//! implementation [`KernelEngine`] over [`Volumes`], a [`DeviceMapper`] and this node's sealing source.
//! The in-memory implementation for host tests is [`super::memory::MemoryEngine`].
//!
//! Every method is blocking (ioctls, mkfs): call from a blocking context.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::backend::{BackendError, LoopDevice};
use crate::dm::{DeviceMapper, DmError, DmName, Target, integrity_status};
use crate::error::{Classify, Kind};
use crate::header::{self, FsKind, Profile};
use crate::health::IntegrityFailures;
use crate::sealing::SealingSource;
use crate::volume::header_io::read_region;
use crate::volume::health::{self, Check, Condition};
use crate::volume::init::InitMode;
use crate::volume::mkfs::FsError;
use crate::volume::stack::{self, MappingError, SECTOR, StackNames, Workqueues};
use crate::volume::{self, FormatOptions, VolumeError, Volumes};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error(transparent)]
    Dm(#[from] DmError),
    #[error(transparent)]
    Mapping(#[from] MappingError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Fs(#[from] FsError),
    /// The record says the volume was formatted, and its header is gone: formatting again would hand the
    /// tenant an empty volume in place of its data.
    #[error(
        "volume was formatted (UUID {uuid}) but its device holds no sealcsi header any more: the header \
         was erased or the device replaced; refusing to format it again (its data would be lost). Restore \
         the header (a recovery copy) or delete the volume"
    )]
    HeaderGone { uuid: String },
    /// The operation needs the volume open on this node and it is not.
    #[error("volume device {0} is not open on this node (not staged)")]
    NotOpen(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl Classify for EngineError {
    fn kind(&self) -> Kind {
        match self {
            EngineError::Volume(e) => e.kind(),
            EngineError::Mapping(e) => e.kind(),
            EngineError::Dm(e) => e.kind(),
            EngineError::Backend(BackendError::Busy(_)) => Kind::Busy,
            EngineError::NotOpen(_) | EngineError::Fs(FsError::NoFilesystem(_)) => {
                Kind::FailedPrecondition
            }
            EngineError::HeaderGone { .. } => Kind::InvalidHeader,
            _ => Kind::Internal,
        }
    }
}

/// What staging the device produced.
#[derive(Debug, Clone, PartialEq)]
pub struct StagedDevice {
    /// The volume's UUID (from the authenticated header).
    pub uuid: [u8; 16],
    /// The top device node (`/dev/mapper/<dm name>`).
    pub device: PathBuf,
    /// The filesystem the header records (what was made at format time).
    pub fs: FsKind,
    /// Whether this call formatted the volume.
    pub formatted: bool,
    /// How long initialization took, when this call formatted the volume.
    pub init: Option<InitTiming>,
}

/// The phases of one volume initialization.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InitTiming {
    pub fast: bool,
    pub wipe_seconds: f64,
    pub mkfs_seconds: f64,
}

/// The sealed-volume operations of the node core.
pub trait VolumeEngine: Send + Sync {
    /// Opens the sealed volume in `backing` as `dm_name`. A device without a sealcsi header and without
    /// any other signature is formatted first with `format` (never forced), unless `formatted` says the
    /// volume was formatted already (with that UUID): then a missing header is an error, never a reason to
    /// format, and a header with another UUID is refused. A header that does not unseal here is an error
    /// too. Idempotent: an open volume is success (and keeps the workqueue flags it was opened with).
    /// The crypt device is loaded with `workqueues`.
    fn stage_device(
        &self,
        backing: &Path,
        dm_name: &str,
        format: &FormatOptions,
        formatted: Option<[u8; 16]>,
        workqueues: Workqueues,
    ) -> Result<StagedDevice, EngineError>;
    /// Re-binds the (closed) volume on `backing` from volume id `source`'s binding `from` to `to`
    /// (`crate::volume::Volumes::rebind`; recovery slots for one of `recipients` are re-wrapped to it);
    /// what became of each keyslot, or `None` if it is bound to `to` already.
    fn rebind(
        &self,
        backing: &Path,
        source: &str,
        from: &[u8; header::BINDING_DIGEST_LEN],
        to: &[u8; header::BINDING_DIGEST_LEN],
        recipients: &[crate::keyslots::RecoveryPublicKey],
    ) -> Result<Option<Vec<crate::volume::RebindSlot>>, EngineError>;
    /// The top device node if `dm_name` is open.
    fn open_device(&self, dm_name: &str) -> Result<Option<PathBuf>, EngineError>;
    /// Closes `dm_name` (and its integrity device); `false` if nothing was open.
    fn close(&self, dm_name: &str) -> Result<bool, EngineError>;
    /// Health: integrity mismatches counted, and whether the header still decodes and unseals.
    fn condition(&self, dm_name: &str, backing: &Path) -> Result<Condition, EngineError>;
    /// Size in bytes of the open top device.
    fn size_bytes(&self, dm_name: &str) -> Result<u64, EngineError>;
    /// Makes the open mapping take the backing file's (grown) size; returns the new top size in bytes.
    /// The header it re-reads must be `expected`'s, authenticated, or nothing is changed. Does not
    /// initialize the new space: see [`VolumeEngine::init_new_space`].
    fn expand(
        &self,
        dm_name: &str,
        backing: &Path,
        expected: volume::Expected<'_>,
    ) -> Result<u64, EngineError>;
    /// Initializes bytes `from..to` of the open top device after it grew, where the profile needs it
    /// (AEAD: never-written blocks have no valid tag and read as errors, so they are written with zeros
    /// once). Idempotent: it only ever covers space no filesystem or user has been given yet.
    fn init_new_space(&self, dm_name: &str, from: u64, to: u64) -> Result<(), EngineError>;
    /// Grows the filesystem on `device`, mounted at `mount_point`.
    fn grow_fs(&self, fs: FsKind, device: &Path, mount_point: &Path) -> Result<(), EngineError>;
    /// `Err(what is missing)` unless the sealing source answers.
    fn probe_source(&self) -> Result<(), String>;
    /// Integrity failures counted for the open volume `dm_name` since it was opened
    /// ([`crate::health`]); `None` where they are not counted.
    fn integrity_failures(&self, dm_name: &str) -> Option<u64> {
        let _ = dm_name;
        None
    }
}

/// The devices of the stack `names`, for [`IntegrityFailures`].
fn stack_devices(names: &StackNames) -> [&DmName; 2] {
    [&names.crypt, &names.integrity]
}

/// The failures counted for `dm_name`, if counted.
pub fn failures_of(failures: Option<&IntegrityFailures>, dm_name: &str) -> Option<u64> {
    let failures = failures?;
    let names = StackNames::new(dm_name).ok()?;
    failures.count(&stack_devices(&names)).ok()
}

/// Announces a just opened stack (its counts restart), if failures are counted.
pub fn announce_opened(failures: Option<&IntegrityFailures>, names: &StackNames) {
    if let Some(failures) = failures {
        failures.opened(&stack_devices(names));
    }
}

/// The condition problem of the failures counted for `names`, if any.
pub fn failure_problem(
    failures: Option<&IntegrityFailures>,
    names: &StackNames,
) -> Result<Option<String>, EngineError> {
    match failures {
        Some(f) => Ok(f.problem(&stack_devices(names))?),
        None => Ok(None),
    }
}

/// Integrity mismatches the integrity device counted, if it exists and reports any.
pub fn integrity_problem(
    dm: &dyn DeviceMapper,
    names: &StackNames,
) -> Result<Option<String>, EngineError> {
    if dm.info(&names.integrity)?.is_none() {
        return Ok(None);
    }
    let lines = dm.status(&names.integrity)?;
    let Some((_, _, _, status)) = lines.first() else {
        return Ok(None);
    };
    let st = integrity_status(status)?;
    Ok((st.mismatches > 0).then(|| {
        format!(
            "dm-integrity counted {} tag mismatch(es): blocks of this volume were altered or damaged \
             outside the node",
            st.mismatches
        )
    }))
}

/// Total length in bytes of the device-mapper device `name`, from its status (no keys read).
pub fn dm_size_bytes(dm: &dyn DeviceMapper, name: &DmName) -> Result<u64, EngineError> {
    match dm.status(name) {
        Ok(lines) => Ok(lines.iter().map(|(_, len, _, _)| len * SECTOR).sum()),
        Err(DmError::NotFound(_)) => Err(EngineError::NotOpen(name.to_string())),
        Err(e) => Err(e.into()),
    }
}

/// The engine on the real kernel.
pub struct KernelEngine {
    dm: Arc<dyn DeviceMapper>,
    source: Arc<dyn SealingSource>,
    /// The node's key broker (`--kbs-url`): `kbs` slots open through it.
    broker: Option<Arc<dyn SealingSource>>,
    /// Integrity failures from the kernel log, where it can be read.
    failures: Option<Arc<IntegrityFailures>>,
}

impl std::fmt::Debug for KernelEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KernelEngine")
    }
}

impl KernelEngine {
    pub fn new(dm: Arc<dyn DeviceMapper>, source: Arc<dyn SealingSource>) -> Self {
        Self {
            dm,
            source,
            broker: None,
            failures: None,
        }
    }

    /// The same engine, reporting the integrity failures `failures` counts in its conditions.
    pub fn with_integrity_failures(mut self, failures: Option<Arc<IntegrityFailures>>) -> Self {
        self.failures = failures;
        self
    }

    /// The same engine, also opening `kbs` keyslots through `broker`.
    pub fn with_broker(mut self, broker: Option<Arc<dyn SealingSource>>) -> Self {
        self.broker = broker;
        self
    }

    fn volumes(&self) -> Volumes<'_> {
        Volumes::new(&*self.dm, &*self.source).with_broker(self.broker.as_deref())
    }
}

impl VolumeEngine for KernelEngine {
    fn stage_device(
        &self,
        backing: &Path,
        dm_name: &str,
        format: &FormatOptions,
        formatted: Option<[u8; 16]>,
        workqueues: Workqueues,
    ) -> Result<StagedDevice, EngineError> {
        let names = StackNames::new(dm_name)?;
        let volumes = self.volumes().with_workqueues(workqueues);
        let mut init = None;
        let was_open = self.dm.info(&names.crypt)?.is_some();
        if !was_open && !header::has_magic(&read_region(backing)?) {
            if let Some(uuid) = formatted {
                return Err(EngineError::HeaderGone {
                    uuid: uuid::Uuid::from_bytes(uuid).to_string(),
                });
            }
            // Never a sealcsi volume. Format refuses (force is never set here) if anything else is there.
            let opts = FormatOptions {
                force: false,
                ..*format
            };
            let report = volumes.format(backing, &opts, &mut |_, _| {})?;
            tracing::info!(volume.uuid = %report.uuid, seconds = report.total_seconds, "formatted new sealed volume");
            init = Some(InitTiming {
                fast: opts.init == InitMode::Fast,
                wipe_seconds: report.init_seconds,
                mkfs_seconds: report.mkfs_seconds,
            });
        }
        let expected = volume::Expected {
            name: dm_name,
            binding: &format.volume_binding,
            uuid: formatted,
        };
        let report = volumes.open_as(backing, dm_name, Some(expected))?;
        if !was_open {
            announce_opened(self.failures.as_deref(), &names);
        }
        // The header open authenticated, never a second read the host could answer differently.
        Ok(StagedDevice {
            uuid: report.header.uuid,
            device: report.device,
            fs: report.header.fs,
            formatted: init.is_some(),
            init,
        })
    }

    fn rebind(
        &self,
        backing: &Path,
        source: &str,
        from: &[u8; header::BINDING_DIGEST_LEN],
        to: &[u8; header::BINDING_DIGEST_LEN],
        recipients: &[crate::keyslots::RecoveryPublicKey],
    ) -> Result<Option<Vec<crate::volume::RebindSlot>>, EngineError> {
        let hpke = crate::keyslots::rewrap_recovery(recipients);
        Ok(self.volumes().rebind(backing, source, from, to, &hpke)?)
    }

    fn open_device(&self, dm_name: &str) -> Result<Option<PathBuf>, EngineError> {
        let name = DmName::try_from(dm_name)?;
        Ok(self.dm.info(&name)?.map(|i| i.node))
    }

    fn close(&self, dm_name: &str) -> Result<bool, EngineError> {
        Ok(volume::close(&*self.dm, dm_name)?)
    }

    fn condition(&self, dm_name: &str, backing: &Path) -> Result<Condition, EngineError> {
        let names = StackNames::new(dm_name)?;
        let mut problems = Vec::new();
        problems.extend(integrity_problem(&*self.dm, &names)?);
        problems.extend(failure_problem(self.failures.as_deref(), &names)?);
        let region = read_region(backing)?;
        let vols = self.volumes();
        let unseal = |h: &header::Header| vols.unseal(h).map(drop).map_err(|e| e.to_string());
        problems.extend(health::header_problem(&region, Check::Unseal(&unseal)));
        Ok(Condition::from_problems(problems))
    }

    fn size_bytes(&self, dm_name: &str) -> Result<u64, EngineError> {
        dm_size_bytes(&*self.dm, &DmName::try_from(dm_name)?)
    }

    fn expand(
        &self,
        dm_name: &str,
        backing: &Path,
        expected: volume::Expected<'_>,
    ) -> Result<u64, EngineError> {
        let names = StackNames::new(dm_name)?;
        let old_bytes = dm_size_bytes(&*self.dm, &names.crypt)?;
        // Read again here (a later RPC, maybe another process), so authenticated and checked before any
        // of it is used (the profile below, the crypt table's key): a header the host put there since
        // the open, even another volume's that unseals on this node, is never acted on.
        let (header, key) = self.volumes().unseal_expected(backing, Some(expected))?;
        // A volume file's loop device (found by its file), or a block device as given (a stacked
        // volume's backend device); a loop device re-reads its file's size either way.
        let lower_device = if crate::backend::is_block_device(backing) {
            if let Ok(Some(lo)) = LoopDevice::find_by_path(backing) {
                lo.set_capacity()?;
            }
            backing.to_path_buf()
        } else {
            let lo = LoopDevice::find(backing)?.ok_or_else(|| {
                EngineError::NotOpen(format!("loop device of {}", backing.display()))
            })?;
            lo.set_capacity()?;
            lo.path().to_path_buf()
        };
        let device_bytes =
            crate::devio::size_of(&lower_device).map_err(|source| EngineError::Io {
                context: format!("size of {}", lower_device.display()),
                source,
            })?;
        let (lower, data_sectors) = match header.profile {
            Profile::AeadHmacSha256 { .. } => {
                let mut live = self.dm.table(&names.integrity)?;
                let [line] = live.as_mut_slice() else {
                    return Err(DmError::InvalidTable(
                        "integrity device has more than one line".into(),
                    )
                    .into());
                };
                line.target.set_device(lower_device.clone());
                // The integrity target computes the data sectors the grown device provides when its table
                // is loaded and records them in its superblock on resume; then map all of them.
                self.dm
                    .reload(&names.integrity, std::slice::from_ref(line))?;
                let status = self.dm.status(&names.integrity)?;
                let provided = status
                    .first()
                    .map(|(_, _, _, s)| integrity_status(s))
                    .transpose()?
                    .map_or(line.length, |s| s.provided_data_sectors);
                if provided > line.length {
                    line.length = provided;
                    self.dm
                        .reload(&names.integrity, std::slice::from_ref(line))?;
                }
                let info = self
                    .dm
                    .info(&names.integrity)?
                    .ok_or_else(|| EngineError::NotOpen(names.integrity.to_string()))?;
                (stack::lower_device(&info), provided)
            }
            Profile::XtsOnly => (
                lower_device.clone(),
                volume::crypt_only_sectors(device_bytes),
            ),
        };
        if data_sectors * SECTOR <= old_bytes {
            return Ok(old_bytes);
        }
        // The grown table keeps the workqueue flags the volume was opened with.
        let workqueues = stack::live_workqueues(&*self.dm, &names)?;
        let (table_key, logon) = stack::table_key(&header.uuid_string(), &key)?;
        let crypt = stack::crypt_line(&lower, &header, data_sectors, table_key, workqueues)?;
        debug_assert!(matches!(crypt.target, Target::Crypt(_)));
        let reloaded = self.dm.reload(&names.crypt, std::slice::from_ref(&crypt));
        drop(logon);
        reloaded?;
        Ok(data_sectors * SECTOR)
    }

    fn init_new_space(&self, dm_name: &str, from: u64, to: u64) -> Result<(), EngineError> {
        let names = StackNames::new(dm_name)?;
        // What the kernel runs decides, not a header the host could rewrite: only an AEAD stack has an
        // integrity device, and only AEAD space reads as errors until it is written once.
        if self.dm.info(&names.integrity)?.is_none() || to <= from {
            return Ok(());
        }
        let size = dm_size_bytes(&*self.dm, &names.crypt)?;
        let to = to.min(size);
        if to <= from {
            return Ok(());
        }
        // Blocks never written have no valid tag and read as errors: write the new space once, so the
        // filesystem's resize (and anyone after it) reads zeros there. zero_range syncs before it returns.
        crate::devio::zero_range(&names.crypt.node(), from, to - from, |_, _| {}).map_err(
            |source| EngineError::Io {
                context: format!(
                    "initializing bytes {from}..{to} of {}",
                    names.crypt.node().display()
                ),
                source,
            },
        )
    }

    fn grow_fs(&self, fs: FsKind, device: &Path, mount_point: &Path) -> Result<(), EngineError> {
        crate::volume::mkfs::grow(fs, device, mount_point)?;
        Ok(())
    }

    fn integrity_failures(&self, dm_name: &str) -> Option<u64> {
        failures_of(self.failures.as_deref(), dm_name)
    }

    fn probe_source(&self) -> Result<(), String> {
        self.source
            .secret(&self.source.default_binding())
            .map(drop)
            .map_err(|e| format!("sealing source: {e}"))
    }
}
