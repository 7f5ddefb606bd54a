//! Sealed volumes: format, open, close and inspect, on top of the header, the key hierarchy, the sealing
//! source and the device-mapper stack. This is the engine both the admin CLI and the CSI node service call.
//!
//! - [`header_io`]: every read and write of the header region (read, commit, crypto-erase, lock);
//! - [`seal`]: the one keyslot wrap and unwrap;
//! - [`content`]: what a device holds before format (the refusal rules);
//! - [`stack`]: the device-mapper stack of one volume;
//! - [`init`], [`mkfs`]: initialization of a new volume and the filesystem tools;
//! - [`inspect`], [`health`]: public facts and health, readable without a key.
//!
//! Safety rules enforced here:
//! - format refuses a device holding a sealcsi header, a dm-integrity superblock or any recognisable
//!   filesystem/partition/LUKS signature unless forced; open never formats;
//! - the header is written last, so an interrupted format never leaves a header that opens onto a
//!   half-initialised device, and open refuses a device without an integrity superblock instead of
//!   letting the kernel format one;
//! - open reads the device and writes nothing until the key has been unsealed.

pub mod content;
pub mod header_io;
pub mod health;
pub mod init;
pub mod inspect;
pub mod mkfs;
pub mod seal;
pub mod stack;
pub mod xfs;

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::backend::{BackendError, BlockDevice};
use crate::clock::now_unix;
use crate::devio;
use crate::dm::{DeviceMapper, DmError};
use crate::error::{Classify, Kind};
use crate::header::{
    BINDING_DIGEST_LEN, DATA_OFFSET, FsKind, Header, HeaderError, Journal, Keyslot, Profile,
    UNFINISHED_FORMAT_MAGIC,
};
use crate::keys::{KeyError, VolumeKey};
use crate::sealing::{SealError, SealingSource};
use init::{InitError, InitMode};
use stack::{MappingError, OpenOutcome, SECTOR, StackNames};

pub use content::{ensure_not_in_use, refuse_existing_content};
pub use header_io::{commit, commit_everywhere, read_header};
pub use health::Condition;
pub use inspect::{Inspection, inspect};

/// Smallest backing device sealcsi formats: header region plus room for integrity metadata and data.
pub const MIN_DEVICE_SIZE: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("{device}: {source}")]
    Header {
        device: String,
        #[source]
        source: HeaderError,
    },
    /// No keyslot is sealed to this node's identity.
    #[error(
        "this node's identity ({kind:?}, digest {digest}) cannot unseal this volume: none of its {slots} \
         keyslot(s) is sealed to it (wrong node, changed image or policy, or a different simulated seed); \
         see `sealcsi volume inspect` for the identities it is sealed to"
    )]
    WrongIdentity {
        kind: crate::header::SourceKind,
        digest: String,
        slots: usize,
    },
    /// Every keyslot has been destroyed.
    #[error(
        "the volume has no keyslots (it was crypto-erased): its data cannot be opened by anyone"
    )]
    NoKeyslots,
    /// A keyslot for this identity exists but its wrap does not authenticate.
    #[error(
        "keyslot(s) {slots:?} are sealed to this node's identity but fail authentication: the header was \
         altered (cipher, sizes, UUID or keyslot metadata); refusing to open"
    )]
    HeaderAuthentication { slots: Vec<usize> },
    /// Format would destroy something.
    #[error("refusing to format {device}: it holds {found}; pass --force to destroy it")]
    Refused { device: String, found: String },
    #[error("invalid request: {0}")]
    InvalidArgument(String),
    #[error("{0}: device is in use (mounted, open, or part of a device-mapper stack)")]
    Busy(String),
    #[error(transparent)]
    Mapping(#[from] MappingError),
    #[error(transparent)]
    Dm(#[from] DmError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Seal(#[from] SealError),
    #[error(transparent)]
    Init(#[from] InitError),
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The device holds a sealcsi volume, but not the one asked for.
    #[error("refusing to open {device} as volume {expected}: {why}")]
    WrongVolume {
        device: String,
        expected: String,
        why: &'static str,
    },
    /// The stored sequence number is at its maximum: no update could win (a host-chosen value).
    #[error(
        "the header's sequence number is at its maximum, so no update can win: the header was altered"
    )]
    SeqnoExhausted,
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl Classify for VolumeError {
    fn kind(&self) -> Kind {
        match self {
            VolumeError::InvalidArgument(_) => Kind::InvalidArgument,
            VolumeError::WrongIdentity { .. } | VolumeError::NoKeyslots => Kind::WrongIdentity,
            VolumeError::Header { .. }
            | VolumeError::HeaderAuthentication { .. }
            | VolumeError::WrongVolume { .. }
            | VolumeError::SeqnoExhausted => Kind::InvalidHeader,
            VolumeError::Refused { .. } => Kind::Refused,
            VolumeError::Busy(_) => Kind::Busy,
            VolumeError::Mapping(e) => e.kind(),
            VolumeError::Dm(e) => e.kind(),
            VolumeError::Seal(SealError::Broker(e)) => e.kind(),
            VolumeError::Backend(_)
            | VolumeError::Seal(_)
            | VolumeError::Init(_)
            | VolumeError::Key(_)
            | VolumeError::Io { .. } => Kind::Internal,
        }
    }
}

fn io_error(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> VolumeError {
    let context = context.into();
    move |source| VolumeError::Io { context, source }
}

/// What `format` should build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FormatOptions {
    pub profile: Profile,
    pub fs: FsKind,
    pub init: InitMode,
    pub force: bool,
    /// What the volume is bound to ([`crate::header::volume_binding`]); all zero for none.
    pub volume_binding: [u8; BINDING_DIGEST_LEN],
}

#[derive(Debug, Clone, Serialize)]
pub struct FormatReport {
    pub uuid: String,
    pub device: PathBuf,
    pub data_bytes: u64,
    pub prewritten_bytes: u64,
    pub init_seconds: f64,
    pub mkfs_seconds: f64,
    pub total_seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct OpenReport {
    pub device: PathBuf,
    pub uuid: String,
    pub already_open: bool,
    /// The header this open authenticated (by unsealing its keyslot). Callers use this copy, never a
    /// second read of the device, which the host could answer with other bytes.
    #[serde(skip)]
    pub header: Header,
}

/// The sealed-volume engine: a device-mapper implementation and this node's sealing source.
pub struct Volumes<'a> {
    dm: &'a dyn DeviceMapper,
    source: &'a dyn SealingSource,
    /// The node's key broker, when configured: `kbs` slots open through it when no slot of the node's
    /// own source does.
    broker: Option<&'a dyn SealingSource>,
    /// The workqueue flags of the crypt devices this engine loads.
    workqueues: stack::Workqueues,
}

/// Usable data sectors behind the header region for a crypt-only volume (whole 4 KiB blocks).
pub fn crypt_only_sectors(device_size: u64) -> u64 {
    (device_size.saturating_sub(DATA_OFFSET) / devio::ALIGN as u64) * (devio::ALIGN as u64 / SECTOR)
}

/// The header the stack is built from while format writes (the wipe or the pre-writes, and mkfs): the
/// volume's own, but with the integrity layer in direct mode. Nothing format writes needs the journal's
/// crash consistency, because the volume has no header until all of it is flushed: a crash before that
/// leaves a device that does not open and is formatted again. Direct mode saves the journal's second
/// write of every block. The integrity superblock and its journal were already laid out by the
/// journaled probe mapping ([`Volumes::format_integrity`]), so every later open uses the journal as
/// the header says.
fn initialization_header(header: &Header) -> Header {
    let mut for_init = header.clone();
    if let Profile::AeadHmacSha256 { journal } = &mut for_init.profile {
        *journal = Journal::Direct;
    }
    for_init
}

/// Refuses option combinations sealcsi does not build, before anything is touched.
///
/// A filesystem over `journal: direct` is refused: without the integrity journal a crash can leave a
/// block whose data and tag disagree, the filesystem's own crash recovery then reads it, fails, and the
/// whole filesystem no longer mounts (docs/crash-consistency.md, "Findings"). Direct mode stays for raw
/// block volumes, whose users see exactly the unreadable blocks and nothing else.
pub fn check_format_options(opts: &FormatOptions) -> Result<(), VolumeError> {
    if opts.fs == FsKind::None && opts.init == InitMode::Fast {
        return Err(VolumeError::InvalidArgument(
            "fast init needs a filesystem (--fs ext4|xfs): block volumes are always fully wiped"
                .into(),
        ));
    }
    if opts.fs != FsKind::None && opts.profile.journal() == Some(Journal::Direct) {
        return Err(VolumeError::InvalidArgument(
            DIRECT_FILESYSTEM_REFUSED.into(),
        ));
    }
    Ok(())
}

/// Why a filesystem volume cannot use `journal: direct` (one text for the CLI and CSI).
pub const DIRECT_FILESYSTEM_REFUSED: &str = "journal direct is for raw block volumes only: without the \
     integrity journal a crash can leave blocks unreadable that the filesystem's own recovery needs, and \
     the filesystem would no longer mount (docs/crash-consistency.md); use journal: journal (the default) \
     for a filesystem";

impl<'a> Volumes<'a> {
    pub fn new(dm: &'a dyn DeviceMapper, source: &'a dyn SealingSource) -> Self {
        Self {
            dm,
            source,
            broker: None,
            workqueues: stack::Workqueues::default(),
        }
    }

    /// The same engine, loading crypt devices with `workqueues` (format's own mapping and every open).
    pub fn with_workqueues(mut self, workqueues: stack::Workqueues) -> Self {
        self.workqueues = workqueues;
        self
    }

    /// The same engine, also opening `kbs` keyslots through `broker`.
    pub fn with_broker(mut self, broker: Option<&'a dyn SealingSource>) -> Self {
        self.broker = broker;
        self
    }

    /// Creates a new sealed volume on `path` (a block device or a file, attached to a loop device).
    pub fn format(
        &self,
        path: &Path,
        opts: &FormatOptions,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<FormatReport, VolumeError> {
        let started = Instant::now();
        check_format_options(opts)?;
        let dev = BlockDevice::open_path(path)?;
        let size = dev.size_bytes()?;
        if size < MIN_DEVICE_SIZE {
            return Err(VolumeError::InvalidArgument(format!(
                "{} is {size} bytes; sealcsi needs at least {MIN_DEVICE_SIZE}",
                path.display()
            )));
        }
        ensure_not_in_use(dev.path())?;
        if !opts.force {
            refuse_existing_content(dev.path())?;
        }

        let uuid = *uuid::Uuid::new_v4().as_bytes();
        let mut header = Header::new(uuid, opts.profile, opts.fs, now_unix());
        header.volume_binding = opts.volume_binding;
        let key = VolumeKey::generate(opts.profile.key_len())?;
        // Zero the header region and the first block of the integrity area, so the kernel formats a fresh
        // integrity device (and nothing of an older volume survives at the front), and mark the device
        // as an unfinished format of ours: a retry after a failure from here on may format it again.
        let mut front = devio::AlignedBuf::zeroed((DATA_OFFSET as usize) + devio::ALIGN);
        front[..UNFINISHED_FORMAT_MAGIC.len()].copy_from_slice(&UNFINISHED_FORMAT_MAGIC);
        devio::write_at(dev.path(), 0, &front).map_err(io_error("clearing the header region"))?;

        let names = StackNames::for_volume(&format!("format-{}", header.uuid_string()))?;
        let built = self.build_and_initialize(&dev, size, &header, &key, opts, &names, progress);
        let closed = stack::close_stack(self.dm, &names);
        let (data_bytes, report) = built?;
        closed?;

        // Last step: the header. Until both copies are on disk the device does not open.
        header.keyslots[0] = Some(self.seal_keyslot(&header, &key)?);
        header_io::write_new_header(dev.path(), &header)?;
        let device = dev.path().to_path_buf();
        dev.release()?;
        Ok(FormatReport {
            uuid: header.uuid_string(),
            device,
            data_bytes,
            prewritten_bytes: report.prewritten_bytes,
            init_seconds: report.wipe.as_secs_f64(),
            mkfs_seconds: report.mkfs.as_secs_f64(),
            total_seconds: started.elapsed().as_secs_f64(),
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn build_and_initialize(
        &self,
        dev: &BlockDevice,
        size: u64,
        header: &Header,
        key: &VolumeKey,
        opts: &FormatOptions,
        names: &StackNames,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<(u64, init::InitReport), VolumeError> {
        let integrity = matches!(opts.profile, Profile::AeadHmacSha256 { .. });
        let data_sectors = if integrity {
            self.format_integrity(dev.path(), size, header, names)?
        } else {
            crypt_only_sectors(size)
        };
        let opened = stack::open_stack(
            self.dm,
            names,
            dev.path(),
            &initialization_header(header),
            data_sectors,
            key,
            self.workqueues,
        )?;
        let data_bytes = data_sectors * SECTOR;
        let report = init::initialize(
            opened.device(),
            data_bytes,
            opts.fs,
            opts.init,
            integrity,
            progress,
        )?;
        Ok((data_bytes, report))
    }

    /// Lets the kernel format the (zeroed) integrity area of `backing` (`device_bytes` long) through a
    /// one-block mapping, and returns the data sectors it provides.
    fn format_integrity(
        &self,
        backing: &Path,
        device_bytes: u64,
        header: &Header,
        names: &StackNames,
    ) -> Result<u64, VolumeError> {
        let probe = stack::format_integrity_line(
            backing,
            header,
            device_bytes,
            devio::ALIGN as u64 / SECTOR,
        )
        .expect("AEAD profile has an integrity layer");
        let uuid = stack::dm_uuid(&header.uuid_string(), "integrity");
        self.dm
            .create(&names.integrity, &uuid, std::slice::from_ref(&probe))?;
        let provided = self.dm.status(&names.integrity).and_then(|lines| {
            let (_, _, _, status) = lines.first().ok_or_else(|| {
                DmError::InvalidTable("integrity device reported no status line".into())
            })?;
            crate::dm::integrity_status(status)
        });
        self.dm.remove(&names.integrity)?;
        let provided = provided?.provided_data_sectors;
        let sb = header_io::read_integrity_superblock(backing)?
            .ok_or(MappingError::MissingIntegritySuperblock)?;
        sb.check(header.profile)?;
        if sb.provided_data_sectors != provided {
            return Err(MappingError::IntegrityMismatch(format!(
                "kernel reports {provided} data sectors, superblock {}",
                sb.provided_data_sectors
            ))
            .into());
        }
        Ok(provided)
    }

    /// Wraps `key` for this node's identity into a new keyslot of `header`.
    pub fn seal_keyslot(&self, header: &Header, key: &VolumeKey) -> Result<Keyslot, VolumeError> {
        seal::seal_for(self.source, header, key)
    }

    /// Finds a keyslot sealed to this node and unwraps the volume key.
    /// With a key broker configured, a volume no slot of the node's own source opens is tried through
    /// its `kbs` slots; the broker is asked only then, and only if such a slot exists.
    pub fn unseal(&self, header: &Header) -> Result<(usize, VolumeKey), VolumeError> {
        let local = seal::unseal_with(self.source, header);
        let Some(broker) = self.broker else {
            return local;
        };
        let has_kbs_slot = header
            .active_slots()
            .any(|(_, slot)| slot.kind == crate::header::SlotKind::Sealed(broker.kind()));
        match local {
            Err(VolumeError::WrongIdentity { .. }) if has_kbs_slot => {
                match seal::unseal_with(broker, header) {
                    // The broker's own identity (for the message) has no default binding: report
                    // the node's.
                    Err(VolumeError::Seal(SealError::Binding { .. })) => local,
                    other => other,
                }
            }
            other => other,
        }
    }

    /// Reads the header on `device`, unseals it (which authenticates every field) and checks it is the
    /// volume `expected` names. The one way a header read from the device becomes trusted: the host can
    /// answer every read differently, so each use of a header goes through this, never a bare read.
    pub fn unseal_expected(
        &self,
        device: &Path,
        expected: Option<Expected<'_>>,
    ) -> Result<(Header, VolumeKey), VolumeError> {
        let header = read_header(device)?.header;
        let (slot, key) = self.unseal(&header)?;
        if let Some(expected) = expected {
            expected.check(&header, device)?;
        }
        tracing::debug!(volume.uuid = %header.uuid_string(), keyslot = slot, "unsealed the volume key");
        Ok((header, key))
    }

    /// Opens the volume on `path` as /dev/mapper/`name`. Idempotent: an identical open stack is success,
    /// a stale half-made one is cleaned up first.
    pub fn open(&self, path: &Path, name: &str) -> Result<OpenReport, VolumeError> {
        self.open_as(path, name, None)
    }

    /// [`Self::open`] of the volume made for `expected` (`volume_id`, its binding): a device holding any
    /// other volume, or an unbound one, is refused after the unseal (which authenticates the binding)
    /// and before anything is built or written.
    pub fn open_as(
        &self,
        path: &Path,
        name: &str,
        expected: Option<Expected<'_>>,
    ) -> Result<OpenReport, VolumeError> {
        let names = StackNames::new(name)?;
        let dev = BlockDevice::open_path(path)?;
        let (header, key) = self.unseal_expected(dev.path(), expected)?;
        let data_sectors = match header.profile {
            Profile::AeadHmacSha256 { .. } => {
                let sb = header_io::read_integrity_superblock(dev.path())?
                    .ok_or(MappingError::MissingIntegritySuperblock)?;
                sb.check(header.profile)?;
                sb.provided_data_sectors
            }
            Profile::XtsOnly => crypt_only_sectors(dev.size_bytes()?),
        };
        let outcome = stack::open_stack(
            self.dm,
            &names,
            dev.path(),
            &header,
            data_sectors,
            &key,
            self.workqueues,
        )?;
        // The loop device (if we attached one) stays attached while the mapping holds it; it detaches
        // itself when the mapping is removed.
        dev.keep_while_in_use()?;
        Ok(OpenReport {
            device: outcome.device().to_path_buf(),
            uuid: header.uuid_string(),
            already_open: matches!(outcome, OpenOutcome::AlreadyOpen(_)),
            header,
        })
    }
}

/// Which volume an open must find (the node stages one volume id, never whatever the device holds).
#[derive(Debug, Clone, Copy)]
pub struct Expected<'a> {
    /// The name it is staged as (for messages).
    pub name: &'a str,
    /// Its binding ([`crate::header::volume_binding`] of its CSI volume id).
    pub binding: &'a [u8; BINDING_DIGEST_LEN],
    /// The UUID recorded when it was formatted, once it was.
    pub uuid: Option<[u8; 16]>,
}

impl Expected<'_> {
    /// Checks the authenticated `header` against what is expected.
    fn check(&self, header: &Header, device: &Path) -> Result<(), VolumeError> {
        check_binding(header, self.name, self.binding, device)?;
        match self.uuid {
            Some(uuid) if uuid != header.uuid => Err(VolumeError::WrongVolume {
                device: device.display().to_string(),
                expected: self.name.to_string(),
                why: "its UUID is not the one recorded when this volume was formatted",
            }),
            _ => Ok(()),
        }
    }
}

/// What a re-binding did with one keyslot of the copy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RebindSlot {
    pub slot: usize,
    /// `sealed:<source>`, `recovery` or `transfer`.
    pub kind: String,
    /// Whether the slot is in the re-bound header (re-wrapped under the new binding).
    pub kept: bool,
    /// Why it was kept or dropped.
    pub why: &'static str,
}

/// Re-makes an HPKE (recovery) slot for the re-bound header `new` with the volume key: `Ok(None)` when
/// the caller has no recipient key for it. Given by the caller (`crate::keyslots::recovery`); the
/// engine has no HPKE of its own.
pub type HpkeRewrap<'r> =
    &'r dyn Fn(&Header, &Keyslot, &VolumeKey) -> Result<Option<Keyslot>, String>;

fn slot_kind_name(slot: &Keyslot) -> String {
    match slot.kind {
        crate::header::SlotKind::Sealed(source) => format!(
            "sealed:{}",
            match source {
                crate::header::SourceKind::Sim => "sim",
                crate::header::SourceKind::Snp => "snp",
                crate::header::SourceKind::Tpm => "tpm",
                crate::header::SourceKind::Kbs => "kbs",
            }
        ),
        crate::header::SlotKind::Recovery => "recovery".into(),
        crate::header::SlotKind::Transfer => "transfer".into(),
    }
}

impl Volumes<'_> {
    /// The secret `slot` was sealed with, if this node (its source, or its key broker) can ask for it
    /// and the slot authenticates under `header` with it (so its binding was set by a holder of the
    /// volume key, not by whoever wrote the header).
    fn remake_secret(&self, header: &Header, slot: &Keyslot) -> Option<crate::keys::SealingSecret> {
        let source = [Some(self.source), self.broker]
            .into_iter()
            .flatten()
            .find(|s| slot.kind == crate::header::SlotKind::Sealed(s.kind()))?;
        let secret = source.secret(&slot.binding).ok()?;
        (secret.digest() == slot.identity_digest
            && seal::unwrap_slot(header, slot, &secret).is_ok())
        .then_some(secret)
    }

    /// Re-binds the volume on `device` from the volume id `source` (its binding `from`) to `target`'s
    /// binding `to`: for a restored or cloned copy, whose header still names the volume it was copied
    /// from. This node must unseal it first, which authenticates the header and so its binding: a header
    /// bound to anything but `from` is refused, unchanged. Every keyslot's wrap covers the binding, so
    /// every slot kept is re-wrapped under the new one, in its place:
    ///
    /// - a sealed slot this node (its sealing source or its key broker) can ask the secret of, and that
    ///   authenticates with it: re-sealed with the same binding (this node's own slot always is);
    /// - a sealed slot of another identity: dropped (its secret is not this node's to ask for);
    /// - a recovery slot: re-wrapped by `hpke` to the recipient whose fingerprint it records, if `hpke`
    ///   has that key, else dropped. The slot records only the fingerprint, and its fields are not
    ///   authenticated by this node's slot, so a public key is never taken from the header;
    /// - a transfer slot: dropped (a pending transfer is granted again).
    ///
    /// Both copies are replaced. `Ok(None)`: already bound to `to`. Safe to retry: a crash leaves either
    /// the old header or the new one in charge.
    pub fn rebind(
        &self,
        device: &Path,
        source: &str,
        from: &[u8; BINDING_DIGEST_LEN],
        to: &[u8; BINDING_DIGEST_LEN],
        hpke: HpkeRewrap<'_>,
    ) -> Result<Option<Vec<RebindSlot>>, VolumeError> {
        let _lock = header_io::lock_device(device)?;
        let active = header_io::read_header(device)?;
        if active.header.volume_binding == *to {
            return Ok(None);
        }
        let old = &active.header;
        let (index, key) = self.unseal(old)?;
        check_binding(old, source, from, device)?;
        let mut new = old.clone();
        new.volume_binding = *to;
        new.keyslots = Default::default();
        let mut report = Vec::new();
        for (i, slot) in old.active_slots() {
            let (remade, why) = match slot.kind {
                crate::header::SlotKind::Sealed(kind) => match self.remake_secret(old, slot) {
                    Some(secret) => (
                        Some(seal::seal_slot(
                            &new,
                            &key,
                            kind,
                            slot.binding.clone(),
                            &secret,
                        )?),
                        if i == index {
                            "this node's slot, re-sealed"
                        } else {
                            "this node can ask its secret: re-sealed"
                        },
                    ),
                    None => (None, "sealed to an identity this node is not"),
                },
                crate::header::SlotKind::Recovery => {
                    match hpke(&new, slot, &key).map_err(VolumeError::InvalidArgument)? {
                        Some(slot) => (Some(slot), "re-wrapped to its recovery public key"),
                        None => (
                            None,
                            "no recovery public key with its fingerprint was given",
                        ),
                    }
                }
                crate::header::SlotKind::Transfer => {
                    (None, "a pending transfer: grant it again for the copy")
                }
            };
            report.push(RebindSlot {
                slot: i,
                kind: slot_kind_name(slot),
                kept: remade.is_some(),
                why,
            });
            new.keyslots[i] = remade;
        }
        if new.keyslots[index].is_none() {
            // The slot that unsealed it always re-seals (its secret was just asked for).
            return Err(VolumeError::InvalidArgument(
                "this node's keyslot could not be re-sealed".into(),
            ));
        }
        header_io::commit_everywhere(device, &active, new)?;
        Ok(Some(report))
    }
}

/// Refuses a volume whose (authenticated) binding is not `binding`.
fn check_binding(
    header: &Header,
    volume_id: &str,
    binding: &[u8; BINDING_DIGEST_LEN],
    device: &Path,
) -> Result<(), VolumeError> {
    let why = if !header.is_bound() {
        "it is bound to no CSI volume (formatted by the CLI, or by a sealcsi from before volume bindings); \
         the node opens only volumes made for the volume id it stages"
    } else if header.volume_binding != *binding {
        "it was made for another volume: its authenticated binding names a different volume id (the \
         host may have swapped or copied backing files)"
    } else {
        return Ok(());
    };
    Err(VolumeError::WrongVolume {
        device: device.display().to_string(),
        expected: volume_id.to_string(),
        why,
    })
}

/// The device-mapper name a volume gets when the operator names none: derived from its UUID, so the
/// same volume always opens under the same name.
pub fn default_name(volume_uuid: &str) -> Result<String, VolumeError> {
    Ok(StackNames::for_volume(volume_uuid)?.crypt.to_string())
}

/// Closes /dev/mapper/`name` and its integrity device (no key needed). Returns false if nothing was open.
pub fn close(dm: &dyn DeviceMapper, name: &str) -> Result<bool, VolumeError> {
    let names = StackNames::new(name)?;
    Ok(stack::close_stack(dm, &names)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dm::MemoryDm;
    use crate::header::{Journal, SlotKind};
    use crate::keys::{NONCE_LEN, SALT_LEN};
    use crate::sealing::SimSource;

    fn aead() -> Profile {
        Profile::AeadHmacSha256 {
            journal: Journal::Journal,
        }
    }

    fn sealed(source: &dyn SealingSource) -> (Header, VolumeKey) {
        let dm = MemoryDm::default();
        let volumes = Volumes::new(&dm, source);
        let mut header = Header::new([7; 16], aead(), FsKind::Ext4, 1);
        let key = VolumeKey::generate(96).unwrap();
        header.keyslots[2] = Some(volumes.seal_keyslot(&header, &key).unwrap());
        (header, key)
    }

    #[test]
    fn unseal_returns_the_sealed_key() {
        let dir = tempfile::tempdir().unwrap();
        let source = SimSource::open(dir.path(), "img-1").unwrap();
        let (header, key) = sealed(&source);
        // Through the on-disk encoding, as open does.
        let header = Header::decode(&header.encode()).unwrap();
        let dm = MemoryDm::default();
        let (slot, unsealed) = Volumes::new(&dm, &source).unseal(&header).unwrap();
        assert_eq!(slot, 2);
        assert_eq!(unsealed.expose(), key.expose());
    }

    #[test]
    fn another_identity_is_refused_as_wrong_identity() {
        let dir = tempfile::tempdir().unwrap();
        let (header, _) = sealed(&SimSource::open(dir.path(), "img-1").unwrap());
        let other = SimSource::open(dir.path(), "img-2").unwrap();
        let dm = MemoryDm::default();
        let err = Volumes::new(&dm, &other).unseal(&header).unwrap_err();
        assert!(
            matches!(err, VolumeError::WrongIdentity { slots: 1, .. }),
            "{err:?}"
        );
        assert_eq!(err.kind(), Kind::WrongIdentity);
    }

    #[test]
    fn altered_authenticated_fields_are_refused_as_tampering() {
        let dir = tempfile::tempdir().unwrap();
        let source = SimSource::open(dir.path(), "img-1").unwrap();
        let (header, _) = sealed(&source);
        let dm = MemoryDm::default();
        let volumes = Volumes::new(&dm, &source);
        let mut alterations: Vec<Header> = Vec::new();
        let mut h = header.clone();
        h.profile = Profile::AeadHmacSha256 {
            journal: Journal::Direct,
        };
        alterations.push(h);
        let mut h = header.clone();
        h.uuid[15] ^= 1;
        alterations.push(h);
        let mut h = header.clone();
        h.fs = FsKind::Xfs;
        alterations.push(h);
        let mut h = header.clone();
        h.keyslots[2].as_mut().unwrap().created += 1;
        alterations.push(h);
        let mut h = header.clone();
        h.keyslots[2].as_mut().unwrap().wrapped[5] ^= 1;
        alterations.push(h);
        for altered in alterations {
            let err = volumes.unseal(&altered).unwrap_err();
            assert!(
                matches!(err, VolumeError::HeaderAuthentication { ref slots } if slots == &[2]),
                "{err:?}"
            );
            assert_eq!(err.kind(), Kind::InvalidHeader);
        }
        // The sequence number is not authenticated: updates bump it without touching the slots.
        let mut h = header.clone();
        h.seqno = 99;
        assert!(volumes.unseal(&h).is_ok());
    }

    #[test]
    fn recovery_slots_are_skipped_by_unseal() {
        let dir = tempfile::tempdir().unwrap();
        let source = SimSource::open(dir.path(), "img-1").unwrap();
        let (mut header, key) = sealed(&source);
        // A recovery slot whose digest happens to equal this node's: unseal must not try it as sealed.
        let mut escrow = header.keyslots[2].clone().unwrap();
        escrow.kind = SlotKind::Recovery;
        escrow.salt = [0; SALT_LEN];
        escrow.nonce = [0; NONCE_LEN];
        escrow.binding = vec![9; crate::header::RECOVERY_ENC_LEN];
        header.keyslots[0] = Some(escrow);
        let header = Header::decode(&header.encode()).unwrap();
        let dm = MemoryDm::default();
        let volumes = Volumes::new(&dm, &source);
        let (slot, unsealed) = volumes.unseal(&header).unwrap();
        assert_eq!((slot, unsealed.expose()), (2, key.expose()));
        let mut only_escrow = header.clone();
        only_escrow.keyslots[2] = None;
        let err = volumes.unseal(&only_escrow).unwrap_err();
        assert!(
            matches!(err, VolumeError::WrongIdentity { slots: 1, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn an_erased_volume_has_no_keyslots() {
        let dir = tempfile::tempdir().unwrap();
        let source = SimSource::open(dir.path(), "img-1").unwrap();
        let dm = MemoryDm::default();
        let header = Header::new([7; 16], aead(), FsKind::Ext4, 1);
        let err = Volumes::new(&dm, &source).unseal(&header).unwrap_err();
        assert!(matches!(err, VolumeError::NoKeyslots));
    }

    #[test]
    fn crypt_only_sectors_are_whole_blocks_after_the_header() {
        assert_eq!(crypt_only_sectors(DATA_OFFSET + 4096 * 10 + 100), 80);
    }

    #[test]
    fn fast_init_without_a_filesystem_is_an_invalid_argument() {
        let dir = tempfile::tempdir().unwrap();
        let source = SimSource::open(dir.path(), "img-1").unwrap();
        let dm = MemoryDm::default();
        let opts = FormatOptions {
            profile: aead(),
            fs: FsKind::None,
            init: InitMode::Fast,
            force: false,
            volume_binding: [0; BINDING_DIGEST_LEN],
        };
        let err = Volumes::new(&dm, &source)
            .format(Path::new("/nonexistent"), &opts, &mut |_, _| {})
            .unwrap_err();
        assert_eq!(err.kind(), Kind::InvalidArgument);
    }

    #[test]
    fn a_filesystem_over_direct_mode_is_refused_before_the_device_is_touched() {
        let dir = tempfile::tempdir().unwrap();
        let source = SimSource::open(dir.path(), "img-1").unwrap();
        let dm = MemoryDm::default();
        let device = dir.path().join("vol.img");
        std::fs::write(&device, vec![0xA5u8; 1 << 20]).unwrap();
        let direct = Profile::new(crate::header::Integrity::HmacSha256, Journal::Direct);
        for fs in [FsKind::Ext4, FsKind::Xfs] {
            let opts = FormatOptions {
                profile: direct,
                fs,
                init: InitMode::Full,
                force: true,
                volume_binding: [0; BINDING_DIGEST_LEN],
            };
            let err = Volumes::new(&dm, &source)
                .format(&device, &opts, &mut |_, _| {})
                .unwrap_err();
            assert_eq!(err.kind(), Kind::InvalidArgument);
            assert!(err.to_string().contains("raw block volumes only"), "{err}");
        }
        assert_eq!(std::fs::read(&device).unwrap(), vec![0xA5u8; 1 << 20]);
        let block = FormatOptions {
            profile: direct,
            fs: FsKind::None,
            init: InitMode::Full,
            force: false,
            volume_binding: [0; BINDING_DIGEST_LEN],
        };
        check_format_options(&block).unwrap();
    }

    #[test]
    fn only_a_volume_bound_to_the_staged_id_opens() {
        let mut header = Header::new([7; 16], aead(), FsKind::Ext4, 1);
        let mine = crate::header::volume_binding("sv-a");
        let dev = Path::new("/dev/x");
        let err = check_binding(&header, "sv-a", &mine, dev).unwrap_err();
        assert!(err.to_string().contains("bound to no CSI volume"), "{err}");
        header.volume_binding = crate::header::volume_binding("sv-b");
        let err = check_binding(&header, "sv-a", &mine, dev).unwrap_err();
        assert!(err.to_string().contains("made for another volume"), "{err}");
        assert_eq!(err.kind(), Kind::InvalidHeader);
        header.volume_binding = mine;
        check_binding(&header, "sv-a", &mine, dev).unwrap();
    }
}
