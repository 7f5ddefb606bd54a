//! Sealed volumes: format, open, close and inspect, on top of the header, the key hierarchy, the sealing
//! source and the device-mapper stack. This is the engine both the admin CLI and the CSI node service call.
//!
//! Safety rules enforced here:
//! - format refuses a device holding a sealcsi header, a dm-integrity superblock or any recognisable
//!   filesystem/partition/LUKS signature unless forced; open never formats;
//! - the header is written last, so an interrupted format never leaves a header that opens onto a
//!   half-initialised device, and open refuses a device without an integrity superblock instead of
//!   letting the kernel format one;
//! - open reads the device and writes nothing until the key has been unsealed.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::backend::{BackendError, BlockDevice};
use crate::devio;
use crate::dm::{DeviceMapper, DmError};
use crate::header::{
    self, COPY_OFFSETS, DATA_OFFSET, FsKind, HEADER_SIZE, Header, HeaderError, Keyslot, Profile,
    SlotKind,
};
use crate::init::{self, InitError, InitMode};
use crate::keys::{Kek, KeyError, NONCE_LEN, SALT_LEN, VolumeKey, random_bytes};
use crate::mapping::{self, IntegritySuperblock, MappingError, OpenOutcome, SECTOR, StackNames};
use crate::sealing::{SealError, SealingSource};

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
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

/// What kind of failure an error is, for the CLI's exit codes and the gRPC status codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The request itself is wrong.
    InvalidArgument,
    /// This node cannot unseal the volume.
    WrongIdentity,
    /// The header (or the integrity superblock it depends on) is missing, damaged, altered or unsupported.
    InvalidHeader,
    /// The device or name is in use.
    Busy,
    /// The operation would destroy data and was not forced.
    Refused,
    /// Anything else: kernel, I/O, tools.
    Internal,
}

impl VolumeError {
    pub fn class(&self) -> ErrorClass {
        match self {
            VolumeError::InvalidArgument(_) => ErrorClass::InvalidArgument,
            VolumeError::WrongIdentity { .. } | VolumeError::NoKeyslots => {
                ErrorClass::WrongIdentity
            }
            VolumeError::Header { .. } | VolumeError::HeaderAuthentication { .. } => {
                ErrorClass::InvalidHeader
            }
            VolumeError::Refused { .. } => ErrorClass::Refused,
            VolumeError::Busy(_) => ErrorClass::Busy,
            VolumeError::Mapping(e) => match e {
                MappingError::Busy(_)
                | MappingError::NameInUse { .. }
                | MappingError::OpenElsewhere(_) => ErrorClass::Busy,
                MappingError::MissingIntegritySuperblock | MappingError::IntegrityMismatch(_) => {
                    ErrorClass::InvalidHeader
                }
                MappingError::Dm(DmError::InvalidArgument(_)) => ErrorClass::InvalidArgument,
                MappingError::Dm(DmError::Busy(_)) => ErrorClass::Busy,
                _ => ErrorClass::Internal,
            },
            VolumeError::Dm(DmError::InvalidArgument(_)) => ErrorClass::InvalidArgument,
            VolumeError::Dm(DmError::Busy(_)) => ErrorClass::Busy,
            _ => ErrorClass::Internal,
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
}

/// The sealed-volume engine: a device-mapper implementation and this node's sealing source.
pub struct Volumes<'a> {
    dm: &'a dyn DeviceMapper,
    source: &'a dyn SealingSource,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Reads both header copies and picks the winner.
pub fn read_header(device: &Path) -> Result<header::Active, VolumeError> {
    let region = devio::read_at(device, 0, 2 * HEADER_SIZE).map_err(io_error(format!(
        "reading the header of {}",
        device.display()
    )))?;
    header::select(&region).map_err(|source| VolumeError::Header {
        device: device.display().to_string(),
        source,
    })
}

/// The device-mapper name a volume gets when the operator names none: derived from its UUID, so the
/// same volume always opens under the same name.
pub fn default_name(volume_uuid: &str) -> String {
    format!("sealcsi-{volume_uuid}")
}

/// Replaces the header atomically: the new header (sequence number `active.header.seqno + 1`) goes over
/// the copy that did not win, and is flushed; only then does it win. A crash mid-write leaves a copy
/// that fails its checksum, and the old header stays in charge.
pub fn write_header_update(
    device: &Path,
    active: &header::Active,
    mut new: Header,
) -> Result<Header, VolumeError> {
    new.seqno = active.header.seqno + 1;
    let copy = active.inactive_copy();
    devio::write_at(device, COPY_OFFSETS[copy], &new.encode())
        .map_err(io_error(format!("writing header copy {copy}")))?;
    Ok(new)
}

/// Reads the dm-integrity superblock at the data offset; `None` if there is none.
fn read_integrity_superblock(device: &Path) -> Result<Option<IntegritySuperblock>, VolumeError> {
    let buf = devio::read_at(device, DATA_OFFSET, devio::ALIGN)
        .map_err(io_error(format!("reading {}", device.display())))?;
    match IntegritySuperblock::parse(&buf) {
        Ok(sb) => Ok(Some(sb)),
        Err(MappingError::MissingIntegritySuperblock) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Usable data sectors behind the header region for a crypt-only volume (whole 4 KiB blocks).
pub fn crypt_only_sectors(device_size: u64) -> u64 {
    (device_size.saturating_sub(DATA_OFFSET) / devio::ALIGN as u64) * (devio::ALIGN as u64 / SECTOR)
}

impl<'a> Volumes<'a> {
    pub fn new(dm: &'a dyn DeviceMapper, source: &'a dyn SealingSource) -> Self {
        Self { dm, source }
    }

    /// Creates a new sealed volume on `path` (a block device or a file, attached to a loop device).
    pub fn format(
        &self,
        path: &Path,
        opts: &FormatOptions,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<FormatReport, VolumeError> {
        let started = Instant::now();
        if opts.fs == FsKind::None && opts.init == InitMode::Fast {
            return Err(VolumeError::InvalidArgument(
                "fast init needs a filesystem (--fs ext4|xfs): block volumes are always fully wiped".into(),
            ));
        }
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
        let key = VolumeKey::generate(opts.profile.key_len())?;
        // Zero the header region and the first block of the integrity area, so the kernel formats a fresh
        // integrity device (and nothing of an older volume survives at the front).
        let zeros = devio::AlignedBuf::zeroed((DATA_OFFSET as usize) + devio::ALIGN);
        devio::write_at(dev.path(), 0, &zeros).map_err(io_error("clearing the header region"))?;

        let names = StackNames::new(&format!("sealcsi-format-{}", header.uuid_string()))?;
        let built = self.build_and_initialize(&dev, size, &header, &key, opts, &names, progress);
        let closed = mapping::close_stack(self.dm, &names);
        let (data_bytes, report) = built?;
        closed?;

        // Last step: the header. Until both copies are on disk the device does not open.
        header.keyslots[0] = Some(self.seal_keyslot(&header, &key)?);
        for (copy, offset) in COPY_OFFSETS.iter().enumerate() {
            devio::write_at(dev.path(), *offset, &header.encode())
                .map_err(io_error(format!("writing header copy {copy}")))?;
        }
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
            self.format_integrity(dev.path(), header, names)?
        } else {
            crypt_only_sectors(size)
        };
        let opened = mapping::open_stack(self.dm, names, dev.path(), header, data_sectors, key)?;
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

    /// Lets the kernel format the (zeroed) integrity area through a one-block mapping, and returns the
    /// data sectors it provides.
    fn format_integrity(
        &self,
        backing: &Path,
        header: &Header,
        names: &StackNames,
    ) -> Result<u64, VolumeError> {
        let probe = mapping::integrity_line(backing, header, devio::ALIGN as u64 / SECTOR)
            .expect("AEAD profile has an integrity layer");
        let uuid = mapping::dm_uuid(&header.uuid_string(), "integrity");
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
        let sb =
            read_integrity_superblock(backing)?.ok_or(MappingError::MissingIntegritySuperblock)?;
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
        let binding = self.source.default_binding();
        let secret = self.source.secret(&binding)?;
        let mut slot = Keyslot {
            kind: SlotKind::Sealed(self.source.kind()),
            created: now_unix(),
            identity_digest: secret.digest(),
            salt: [0; SALT_LEN],
            nonce: [0; NONCE_LEN],
            binding,
            wrapped: vec![0; key.len() + crate::keys::WRAP_TAG_LEN],
        };
        random_bytes(&mut slot.salt)?;
        random_bytes(&mut slot.nonce)?;
        let kek = Kek::derive(&secret, &slot.salt, &header.uuid, &slot.identity_digest);
        slot.wrapped = kek.wrap(&slot.nonce, &header.keyslot_aad(&slot), key);
        Ok(slot)
    }

    /// Finds a keyslot sealed to this node and unwraps the volume key.
    pub fn unseal(&self, header: &Header) -> Result<(usize, VolumeKey), VolumeError> {
        let mut active = 0;
        let mut failed = Vec::new();
        for (index, slot) in header.active_slots() {
            active += 1;
            // Slots of other sources, and recovery (escrow) slots, are for someone else.
            if slot.kind != SlotKind::Sealed(self.source.kind()) {
                continue;
            }
            let secret = match self.source.secret(&slot.binding) {
                Ok(secret) => secret,
                // A binding this node cannot satisfy is a slot for someone else.
                Err(SealError::Binding { .. }) => continue,
                Err(e) => return Err(e.into()),
            };
            if secret.digest() != slot.identity_digest {
                continue;
            }
            let kek = Kek::derive(&secret, &slot.salt, &header.uuid, &slot.identity_digest);
            match kek.unwrap(&slot.nonce, &header.keyslot_aad(slot), &slot.wrapped) {
                Ok(key) if key.len() == header.profile.key_len() => return Ok((index, key)),
                _ => failed.push(index),
            }
        }
        if active == 0 {
            return Err(VolumeError::NoKeyslots);
        }
        if !failed.is_empty() {
            return Err(VolumeError::HeaderAuthentication { slots: failed });
        }
        let identity = crate::sealing::identity(self.source)?;
        Err(VolumeError::WrongIdentity {
            kind: identity.kind,
            digest: identity.digest,
            slots: active,
        })
    }

    /// Opens the volume on `path` as /dev/mapper/`name`. Idempotent: an identical open stack is success,
    /// a stale half-made one is cleaned up first.
    pub fn open(&self, path: &Path, name: &str) -> Result<OpenReport, VolumeError> {
        let names = StackNames::new(name)?;
        let dev = BlockDevice::open_path(path)?;
        let header = read_header(dev.path())?.header;
        let (slot, key) = self.unseal(&header)?;
        tracing::debug!(volume.uuid = %header.uuid_string(), keyslot = slot, "unsealed the volume key");
        let data_sectors = match header.profile {
            Profile::AeadHmacSha256 { .. } => {
                let sb = read_integrity_superblock(dev.path())?
                    .ok_or(MappingError::MissingIntegritySuperblock)?;
                sb.check(header.profile)?;
                sb.provided_data_sectors
            }
            Profile::XtsOnly => crypt_only_sectors(dev.size_bytes()?),
        };
        let outcome =
            mapping::open_stack(self.dm, &names, dev.path(), &header, data_sectors, &key)?;
        // The loop device (if we attached one) stays attached while the mapping holds it; it detaches
        // itself when the mapping is removed.
        dev.keep_while_in_use()?;
        Ok(OpenReport {
            device: outcome.device().to_path_buf(),
            uuid: header.uuid_string(),
            already_open: matches!(outcome, OpenOutcome::AlreadyOpen(_)),
        })
    }
}

/// Closes /dev/mapper/`name` and its integrity device (no key needed). Returns false if nothing was open.
pub fn close(dm: &dyn DeviceMapper, name: &str) -> Result<bool, VolumeError> {
    let names = StackNames::new(name)?;
    Ok(mapping::close_stack(dm, &names)?)
}

/// A device that is mounted or held by device-mapper cannot be opened exclusively.
fn ensure_not_in_use(device: &Path) -> Result<(), VolumeError> {
    use std::os::unix::fs::OpenOptionsExt;
    if !crate::backend::is_block_device(device) {
        return Ok(());
    }
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_EXCL.bits())
        .open(device)
    {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(nix::libc::EBUSY) => {
            Err(VolumeError::Busy(device.display().to_string()))
        }
        Err(e) => Err(io_error(format!("opening {}", device.display()))(e)),
    }
}

/// Signatures sealcsi recognises itself, so the check does not depend on blkid being installed.
const KNOWN_SIGNATURES: &[(&str, u64, &[u8])] = &[
    ("a LUKS header", 0, b"LUKS\xba\xbe"),
    ("a LUKS2 secondary header", 0x4000, b"SKUL\xba\xbe"),
    ("an XFS filesystem", 0, b"XFSB"),
    ("an ext2/3/4 filesystem", 1080, &[0x53, 0xEF]),
    ("a dm-integrity superblock", 0, b"integrt\0"),
    (
        "a dm-integrity superblock (an incomplete sealcsi format?)",
        DATA_OFFSET,
        b"integrt\0",
    ),
];

/// Refuses a device that holds anything recognisable: our header, a filesystem, LUKS, a partition table.
fn refuse_existing_content(device: &Path) -> Result<(), VolumeError> {
    let refused = |found: String| VolumeError::Refused {
        device: device.display().to_string(),
        found,
    };
    let head = devio::read_at(device, 0, DATA_OFFSET as usize + devio::ALIGN)
        .map_err(io_error(format!("reading {}", device.display())))?;
    if header::has_magic(&head) {
        let what = match header::select(&head[..2 * HEADER_SIZE]) {
            Ok(active) => format!("sealcsi volume {}", active.header.uuid_string()),
            Err(e) => format!("a sealcsi header ({e})"),
        };
        return Err(refused(what));
    }
    for (what, offset, magic) in KNOWN_SIGNATURES {
        let at = *offset as usize;
        if head.get(at..at + magic.len()) == Some(*magic) {
            return Err(refused((*what).to_string()));
        }
    }
    if let Some(found) = blkid_signature(device)? {
        return Err(refused(found));
    }
    Ok(())
}

/// Asks blkid's low-level prober about every signature it knows (filesystems, RAID, partition tables).
/// blkid exits 2 when it finds nothing; a missing blkid leaves only the built-in checks, with a warning.
fn blkid_signature(device: &Path) -> Result<Option<String>, VolumeError> {
    let output = match Command::new("blkid")
        .args(["-p", "-o", "export"])
        .arg(device)
        .stdin(Stdio::null())
        .output()
    {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::warn!("blkid not found: only sealcsi's built-in signature checks were made");
            return Ok(None);
        }
        Err(e) => return Err(io_error("running blkid")(e)),
    };
    if output.status.code() == Some(2) {
        return Ok(None);
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let found: Vec<&str> = text
        .lines()
        .filter_map(|line| {
            line.strip_prefix("TYPE=")
                .or_else(|| line.strip_prefix("PTTYPE="))
        })
        .collect();
    if output.status.success() && !found.is_empty() {
        return Ok(Some(format!("a {} signature (blkid)", found.join(", "))));
    }
    if output.status.success() {
        return Ok(None);
    }
    // Ambiguous probes (several signatures) make blkid fail; that is content too.
    Ok(Some(format!(
        "content blkid could not identify unambiguously ({})",
        String::from_utf8_lossy(&output.stderr).trim()
    )))
}

/// Public facts about a volume, readable without any key.
#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    pub device: PathBuf,
    pub device_bytes: u64,
    pub format_version: u16,
    pub uuid: String,
    pub seqno: u64,
    pub active_copy: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub other_copy_problem: Option<String>,
    pub profile: Profile,
    pub cipher: &'static str,
    pub integrity: &'static str,
    pub tag_size: u16,
    pub sector_size: u32,
    pub key_bytes: usize,
    pub data_offset: u64,
    pub filesystem: FsKind,
    pub created: u64,
    pub integrity_superblock: Option<IntegrityFacts>,
    pub keyslots: Vec<SlotFacts>,
}

#[derive(Debug, Clone, Serialize)]
pub struct IntegrityFacts {
    pub provided_data_sectors: u64,
    pub tag_size: u16,
}

#[derive(Debug, Clone, Serialize)]
pub struct SlotFacts {
    pub slot: usize,
    /// "sealed" (to a sealing source) or "recovery" (escrowed to an operator's key).
    pub kind: &'static str,
    /// The sealing source; null for a recovery slot.
    pub source: Option<crate::header::SourceKind>,
    pub identity_digest: String,
    pub binding: String,
    pub created: u64,
}

/// Reads the public fields of the volume on `path` (no key needed, nothing written).
pub fn inspect(path: &Path) -> Result<Inspection, VolumeError> {
    let dev = BlockDevice::open_path(path)?;
    let device_bytes = dev.size_bytes()?;
    let active = read_header(dev.path())?;
    let h = &active.header;
    let (cipher, integrity) = match h.profile {
        Profile::AeadHmacSha256 { .. } => (
            "capi:authenc(hmac(sha256),xts(aes))-random",
            "aead-hmac-sha256",
        ),
        Profile::XtsOnly => ("aes-xts-plain64", "none"),
    };
    let integrity_superblock = match h.profile {
        Profile::AeadHmacSha256 { .. } => {
            read_integrity_superblock(dev.path())?.map(|sb| IntegrityFacts {
                provided_data_sectors: sb.provided_data_sectors,
                tag_size: sb.tag_size,
            })
        }
        Profile::XtsOnly => None,
    };
    let report = Inspection {
        device: path.to_path_buf(),
        device_bytes,
        format_version: header::FORMAT_VERSION,
        uuid: h.uuid_string(),
        seqno: h.seqno,
        active_copy: active.copy,
        other_copy_problem: active.other_copy_error.as_ref().map(ToString::to_string),
        profile: h.profile,
        cipher,
        integrity,
        tag_size: h.profile.tag_size(),
        sector_size: h.profile.sector_size(),
        key_bytes: h.profile.key_len(),
        data_offset: h.data_offset,
        filesystem: h.fs,
        created: h.created,
        integrity_superblock,
        keyslots: h
            .active_slots()
            .map(|(slot, s)| SlotFacts {
                slot,
                kind: match s.kind {
                    SlotKind::Sealed(_) => "sealed",
                    SlotKind::Recovery => "recovery",
                },
                source: s.source(),
                identity_digest: hex::encode(s.identity_digest),
                binding: hex::encode(&s.binding),
                created: s.created,
            })
            .collect(),
    };
    dev.release()?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dm::MemoryDm;
    use crate::header::Journal;
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
        assert_eq!(err.class(), ErrorClass::WrongIdentity);
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
            assert_eq!(err.class(), ErrorClass::InvalidHeader);
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
    fn header_updates_alternate_copies_and_survive_a_torn_write() {
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let dev = dir.path().join("dev");
        std::fs::write(&dev, vec![0u8; 64 * 1024]).unwrap();
        let mut header = Header::new([7; 16], aead(), FsKind::Ext4, 1);
        for (copy, offset) in COPY_OFFSETS.iter().enumerate() {
            devio::write_at(&dev, *offset, &header.encode()).unwrap();
            assert_eq!(read_header(&dev).unwrap().copy, 0, "copy {copy}");
        }
        for expected_copy in [1, 0, 1] {
            let active = read_header(&dev).unwrap();
            header.fs = if header.fs == FsKind::Ext4 {
                FsKind::Xfs
            } else {
                FsKind::Ext4
            };
            let written = write_header_update(&dev, &active, header.clone()).unwrap();
            let now = read_header(&dev).unwrap();
            assert_eq!(
                (now.copy, now.header.seqno),
                (expected_copy, active.header.seqno + 1)
            );
            assert_eq!(now.header, written);
        }
        // A torn update: the new copy is half written. The previous header stays in charge.
        let active = read_header(&dev).unwrap();
        let mut next = active.header.clone();
        next.seqno += 1;
        let mut torn = next.encode();
        torn[2048..].fill(0);
        devio::write_at(&dev, COPY_OFFSETS[active.inactive_copy()], &torn).unwrap();
        let after = read_header(&dev).unwrap();
        assert_eq!(after.header, active.header);
        assert!(after.other_copy_error.is_some());
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
        };
        let err = Volumes::new(&dm, &source)
            .format(Path::new("/nonexistent"), &opts, &mut |_, _| {})
            .unwrap_err();
        assert_eq!(err.class(), ErrorClass::InvalidArgument);
    }
}
