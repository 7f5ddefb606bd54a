//! The device-mapper stack of one sealed volume, built from its header:
//!
//! ```text
//! /dev/mapper/<name>            crypt      capi:authenc(hmac(sha256),xts(aes))-random, integrity:48:aead
//!   /dev/mapper/<name>-integrity  integrity  <backing device> at 1 MiB, tag 48, J|D, block_size:4096
//!     backing device              [header copies | integrity superblock, journal, tags and data ...]
//! ```
//! The crypt-only profile has no integrity layer: crypt sits on the backing device at the data offset.
//! Device names come from the caller; device-mapper UUIDs come from the volume UUID, so a stack can be
//! recognised (and a stale half of one cleaned up) from what the kernel reports alone.

use std::path::{Path, PathBuf};

use crate::dm::{
    CryptCipher, CryptKey, CryptTarget, DeviceInfo, DeviceMapper, DmError, DmName, IntegrityTarget,
    JournalMode, Target, TargetLine, tables_match,
};
use crate::error::{Classify, Kind};
use crate::header::{Header, Journal, Profile};
use crate::keyring::LogonKey;
use crate::keys::VolumeKey;

/// Bytes per device-mapper sector.
pub const SECTOR: u64 = 512;

/// Magic at the start of a dm-integrity superblock.
pub const INTEGRITY_MAGIC: &[u8; 8] = b"integrt\0";

#[derive(Debug, thiserror::Error)]
pub enum MappingError {
    #[error(transparent)]
    Dm(#[from] DmError),
    /// A device with our name exists but belongs to something else.
    #[error("device-mapper name {name} is already used by another device (uuid {found:?})")]
    NameInUse { name: String, found: Option<String> },
    /// The volume is already open under another name.
    #[error("the volume is already open as {0}")]
    OpenElsewhere(String),
    /// Something still holds the device open (a mount, a process).
    #[error("{0} is in use (mounted or held open); unmount it first")]
    Busy(String),
    /// The integrity superblock is missing: the format never completed, or the host wiped it.
    #[error(
        "no dm-integrity superblock at the data offset: the format never completed or the device was \
         altered; refusing to let the kernel format it afresh"
    )]
    MissingIntegritySuperblock,
    /// The integrity superblock disagrees with the header.
    #[error("dm-integrity superblock does not match the header: {0}")]
    IntegrityMismatch(String),
    #[error("kernel keyring: {0}")]
    Keyring(String),
}

impl Classify for MappingError {
    fn kind(&self) -> Kind {
        match self {
            MappingError::Busy(_)
            | MappingError::NameInUse { .. }
            | MappingError::OpenElsewhere(_) => Kind::Busy,
            MappingError::MissingIntegritySuperblock | MappingError::IntegrityMismatch(_) => {
                Kind::InvalidHeader
            }
            MappingError::Dm(e) => e.kind(),
            MappingError::Keyring(_) => Kind::Internal,
        }
    }
}

/// Prefix of the device-mapper name of every volume's stack.
pub const DM_NAME_PREFIX: &str = "sealcsi-";

/// Names of the devices of one stack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StackNames {
    pub crypt: DmName,
    pub integrity: DmName,
}

impl StackNames {
    /// The one naming rule: the stack of the volume known by `key` (its CSI volume id on a node, its
    /// UUID from the CLI) is `sealcsi-<key>`.
    pub fn for_volume(key: &str) -> Result<Self, DmError> {
        Self::new(&format!("{DM_NAME_PREFIX}{key}"))
    }

    /// Derives the lower device's name from the top one; fails if the result is not a valid dm name.
    pub fn new(name: &str) -> Result<Self, DmError> {
        Ok(Self {
            crypt: DmName::try_from(name)?,
            integrity: DmName::try_from(format!("{name}-integrity"))?,
        })
    }
}

/// device-mapper UUIDs for a volume's two devices.
pub fn dm_uuid(volume_uuid: &str, layer: &str) -> String {
    format!("SEALCSI-{volume_uuid}-{layer}")
}

/// The fields of a dm-integrity superblock that sealcsi checks before opening.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IntegritySuperblock {
    pub tag_size: u16,
    pub provided_data_sectors: u64,
    pub log2_sectors_per_block: u8,
}

impl IntegritySuperblock {
    /// Parses the first bytes of the integrity area (layout from the kernel's dm-integrity.c:
    /// magic[8], version u8, log2_interleave u8, tag size le16, journal sections le32,
    /// provided_data_sectors le64 at 16, flags le32, log2_sectors_per_block u8 at 28).
    pub fn parse(buf: &[u8]) -> Result<Self, MappingError> {
        if buf.len() < 32 || &buf[..8] != INTEGRITY_MAGIC {
            return Err(MappingError::MissingIntegritySuperblock);
        }
        Ok(Self {
            tag_size: u16::from_le_bytes([buf[10], buf[11]]),
            provided_data_sectors: u64::from_le_bytes(buf[16..24].try_into().expect("8 bytes")),
            log2_sectors_per_block: buf[28],
        })
    }

    /// Refuses a superblock that does not describe the mapping the header authenticates.
    pub fn check(&self, profile: Profile) -> Result<(), MappingError> {
        let want_log2 = (profile.sector_size() as u64 / SECTOR).trailing_zeros() as u8;
        if self.tag_size != profile.tag_size() {
            return Err(MappingError::IntegrityMismatch(format!(
                "tag size {} (header says {})",
                self.tag_size,
                profile.tag_size()
            )));
        }
        if self.log2_sectors_per_block != want_log2 {
            return Err(MappingError::IntegrityMismatch(format!(
                "block size 2^{} sectors (header says {})",
                self.log2_sectors_per_block,
                profile.sector_size()
            )));
        }
        if self.provided_data_sectors == 0 {
            return Err(MappingError::IntegrityMismatch("no data sectors".into()));
        }
        Ok(())
    }
}

fn journal_mode(journal: Journal) -> JournalMode {
    match journal {
        Journal::Journal => JournalMode::Journal,
        Journal::Direct => JournalMode::Direct,
    }
}

/// The largest dm-integrity journal sealcsi formats, in sectors (8 MiB). dm-integrity keeps the whole
/// journal in memory while the device is open, and its own default grows with the device (1/128 of
/// it) up to 64 MiB, reached at 8 GiB: 100 staged volumes of 8 GiB or more would pin 6.4 GiB of a
/// node's memory. The measurements behind the cap are in docs/benchmarks.md ("Journal size").
pub const MAX_JOURNAL_SECTORS: u64 = 16384;

/// The journal size a new integrity device on `device_bytes` is formatted with: the kernel's own
/// default (1/128 of the device), capped at [`MAX_JOURNAL_SECTORS`].
pub fn format_journal_sectors(device_bytes: u64) -> u64 {
    (device_bytes / SECTOR / 128).clamp(1, MAX_JOURNAL_SECTORS)
}

/// The integrity table line that makes the kernel format a new integrity device on `backing`
/// (`device_bytes` long) with a journal of [`format_journal_sectors`]; `provided_sectors` as in
/// [`integrity_line`].
pub fn format_integrity_line(
    backing: &Path,
    header: &Header,
    device_bytes: u64,
    provided_sectors: u64,
) -> Option<TargetLine> {
    let mut line = integrity_line(backing, header, provided_sectors)?;
    if let Target::Integrity(t) = &mut line.target {
        t.journal_sectors = Some(format_journal_sectors(device_bytes));
    }
    Some(line)
}

/// The integrity table line for a volume whose integrity device provides `provided_sectors`.
pub fn integrity_line(
    backing: &Path,
    header: &Header,
    provided_sectors: u64,
) -> Option<TargetLine> {
    let Profile::AeadHmacSha256 { journal } = header.profile else {
        return None;
    };
    Some(TargetLine {
        start: 0,
        length: provided_sectors,
        target: Target::Integrity(IntegrityTarget {
            device: backing.to_path_buf(),
            offset_sectors: header.data_offset / SECTOR,
            tag_size: u32::from(header.profile.tag_size()),
            mode: journal_mode(journal),
            block_size: header.profile.sector_size(),
            fix_padding: true,
            journal_sectors: None,
        }),
    })
}

/// Which of dm-crypt's two workqueues a volume's crypt device bypasses: the `workqueues` option of
/// `sealcsi volume open` and of the StorageClass. A bypassed direction (`no_read_workqueue`,
/// `no_write_workqueue`) encrypts or decrypts inline, in the context that submitted the I/O; a queued
/// one hands the work to dm-crypt's kcryptd workers, which can overlap it with the I/O of other
/// requests and, on a multi-core node, run it on another CPU.
///
/// Tuning, not security: the data, tags and keys are the same either way, the header does not record
/// it, and a volume already open keeps the flags it was opened with. The default is the measured
/// choice of docs/benchmarks.md ("Workqueues").
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Workqueues {
    /// Both directions through the workqueues (the kernel's default, and cryptsetup's).
    #[default]
    Queued,
    /// Both inline (`no_read_workqueue no_write_workqueue`).
    Inline,
    /// Reads inline, writes queued (`no_read_workqueue`).
    ReadInline,
    /// Writes inline, reads queued (`no_write_workqueue`).
    WriteInline,
}

impl Workqueues {
    /// (`no_read_workqueue`, `no_write_workqueue`).
    pub fn bypassed(self) -> (bool, bool) {
        match self {
            Workqueues::Queued => (false, false),
            Workqueues::Inline => (true, true),
            Workqueues::ReadInline => (true, false),
            Workqueues::WriteInline => (false, true),
        }
    }

    /// What a crypt table (a live one, read back from the kernel) runs with.
    pub fn of(target: &CryptTarget) -> Self {
        match (target.no_read_workqueue, target.no_write_workqueue) {
            (false, false) => Workqueues::Queued,
            (true, true) => Workqueues::Inline,
            (true, false) => Workqueues::ReadInline,
            (false, true) => Workqueues::WriteInline,
        }
    }

    fn apply(self, target: &mut CryptTarget) {
        (target.no_read_workqueue, target.no_write_workqueue) = self.bypassed();
    }
}

/// The workqueue flags the open crypt device `names.crypt` runs with (what a reload must keep).
pub fn live_workqueues(
    dm: &dyn DeviceMapper,
    names: &StackNames,
) -> Result<Workqueues, MappingError> {
    match dm.table(&names.crypt)?.as_slice() {
        [
            TargetLine {
                target: Target::Crypt(t),
                ..
            },
        ] => Ok(Workqueues::of(t)),
        _ => Err(MappingError::Dm(DmError::InvalidTable(format!(
            "{} is not a single crypt line",
            names.crypt
        )))),
    }
}

/// The crypt table line over `lower` (the integrity device, or the backing device for crypt-only).
pub fn crypt_line(
    lower: &Path,
    header: &Header,
    length_sectors: u64,
    key: CryptKey,
    queues: Workqueues,
) -> Result<TargetLine, MappingError> {
    let (cipher, offset) = match header.profile {
        Profile::AeadHmacSha256 { .. } => (CryptCipher::AuthencHmacSha256XtsPlainRandom, 0),
        Profile::XtsOnly => (CryptCipher::AesXtsPlain64, header.data_offset / SECTOR),
    };
    let mut target = CryptTarget::new(
        cipher,
        key,
        lower.to_path_buf(),
        offset,
        header.profile.sector_size(),
    )
    .map_err(DmError::from)?;
    queues.apply(&mut target);
    Ok(TargetLine {
        start: 0,
        length: length_sectors,
        target: Target::Crypt(target),
    })
}

/// The crypt key for a table load, always through the kernel keyring: the table then carries only
/// `:<len>:logon:<description>`, never the key. A node without a usable keyring is refused (fail
/// closed) rather than given a hex key in the table, which device-mapper would keep in the table text
/// (and which the devicemapper crate logs at trace level). The returned logon key must live until the
/// table is loaded; dropping it afterwards invalidates it.
pub fn table_key(
    volume_uuid: &str,
    key: &VolumeKey,
) -> Result<(CryptKey, Option<LogonKey>), MappingError> {
    crate::keyring::require().map_err(|e| MappingError::Keyring(e.to_string()))?;
    // A fresh description per load: two loads never race on one key name.
    let mut nonce = [0u8; 8];
    crate::keys::random_bytes(&mut nonce).map_err(|e| MappingError::Keyring(e.to_string()))?;
    let description = format!("sealcsi:{volume_uuid}-{}", hex::encode(nonce));
    let logon = LogonKey::add(&description, key.expose())
        .map_err(|e| MappingError::Keyring(e.to_string()))?;
    Ok((CryptKey::Keyring { description }, Some(logon)))
}

/// What [`open_stack`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenOutcome {
    Created(PathBuf),
    AlreadyOpen(PathBuf),
}

impl OpenOutcome {
    pub fn device(&self) -> &Path {
        match self {
            OpenOutcome::Created(p) | OpenOutcome::AlreadyOpen(p) => p,
        }
    }
}

fn expect_ours(info: &DeviceInfo, uuid: &str) -> Result<(), MappingError> {
    if info.uuid.as_deref() == Some(uuid) {
        Ok(())
    } else {
        Err(MappingError::NameInUse {
            name: info.name.to_string(),
            found: info.uuid.clone(),
        })
    }
}

/// Opens (or finds already open) the stack of `header` on `backing`, whose integrity superblock says
/// `provided_sectors` (ignored for crypt-only; `data_sectors` is used there), its crypt device with
/// `queues`. A stack already open with other workqueue flags is the same open: it keeps its flags.
pub fn open_stack(
    dm: &dyn DeviceMapper,
    names: &StackNames,
    backing: &Path,
    header: &Header,
    data_sectors: u64,
    key: &VolumeKey,
    queues: Workqueues,
) -> Result<OpenOutcome, MappingError> {
    let volume_uuid = header.uuid_string();
    let crypt_uuid = dm_uuid(&volume_uuid, "crypt");
    let integrity_uuid = dm_uuid(&volume_uuid, "integrity");
    refuse_if_open_elsewhere(dm, names, &crypt_uuid)?;

    let integrity = integrity_line(backing, header, data_sectors);
    if let Some(info) = dm.info(&names.crypt)? {
        expect_ours(&info, &crypt_uuid)?;
        if crypt_matches_live(dm, names, header, integrity.as_ref(), backing)? {
            return Ok(OpenOutcome::AlreadyOpen(info.node));
        }
        return Err(MappingError::NameInUse {
            name: names.crypt.to_string(),
            found: info.uuid,
        });
    }

    // No crypt device: an integrity device left alone is a half-made stack from a crash. Nothing can be
    // using it (only our crypt device would), so it is removed and rebuilt.
    if let Some(info) = dm.info(&names.integrity)? {
        expect_ours(&info, &integrity_uuid)?;
        if info.open_count > 0 {
            return Err(MappingError::Busy(info.node.display().to_string()));
        }
        tracing::warn!(dm.name = %names.integrity, "removing a stale integrity device left by an interrupted open");
        dm.remove(&names.integrity)?;
    }

    let lower = match &integrity {
        Some(line) => lower_device(&dm.create(
            &names.integrity,
            &integrity_uuid,
            std::slice::from_ref(line),
        )?),
        None => backing.to_path_buf(),
    };
    let (table_key, logon) = table_key(&volume_uuid, key)?;
    let crypt = crypt_line(&lower, header, data_sectors, table_key, queues)?;
    let created = dm.create(&names.crypt, &crypt_uuid, std::slice::from_ref(&crypt));
    drop(logon); // the kernel copied the key at table load
    match created {
        Ok(info) => Ok(OpenOutcome::Created(info.node)),
        Err(e) => {
            if integrity.is_some()
                && let Err(cleanup) = dm.remove(&names.integrity)
            {
                tracing::warn!(dm.name = %names.integrity, error = %cleanup, "could not roll back the integrity device");
            }
            Err(e.into())
        }
    }
}

/// A device-mapper device as the lower device of a table line: its `major:minor`, which the kernel
/// resolves without a path. A /dev/mapper path would depend on a node that udev may be replacing at
/// that moment (seen: concurrent stages failed with "crypt: Device lookup failed (-ENODEV)"), or that a
/// container's /dev may not show.
pub fn lower_device(info: &DeviceInfo) -> PathBuf {
    PathBuf::from(format!("{}:{}", info.major, info.minor))
}

/// Refuses to open a volume whose stack is already up under another name: two crypt mappings over one
/// integrity device would corrupt it.
fn refuse_if_open_elsewhere(
    dm: &dyn DeviceMapper,
    names: &StackNames,
    crypt_uuid: &str,
) -> Result<(), MappingError> {
    for info in dm.list()? {
        if info.uuid.as_deref() == Some(crypt_uuid) && info.name != names.crypt {
            return Err(MappingError::OpenElsewhere(info.node.display().to_string()));
        }
    }
    Ok(())
}

/// An existing crypt device is "the same open" when its cipher, geometry and lower device match what we
/// would load; the key itself is not compared (the kernel shows a fresh keyring description or hex),
/// nor are the workqueue flags (tuning: a node restarted with another default must still find the
/// volumes it staged before).
fn crypt_matches_live(
    dm: &dyn DeviceMapper,
    names: &StackNames,
    header: &Header,
    integrity: Option<&TargetLine>,
    backing: &Path,
) -> Result<bool, MappingError> {
    if let Some(wanted) = integrity {
        let live = dm.table(&names.integrity)?;
        if !tables_match(std::slice::from_ref(wanted), &live)? {
            return Ok(false);
        }
    }
    let lower = match integrity {
        Some(_) => match dm.info(&names.integrity)? {
            Some(info) => lower_device(&info),
            None => return Ok(false),
        },
        None => backing.to_path_buf(),
    };
    let live = dm.table(&names.crypt)?;
    let [line] = live.as_slice() else {
        return Ok(false);
    };
    let Target::Crypt(live_crypt) = &line.target else {
        return Ok(false);
    };
    let mut wanted = crypt_line(
        &lower,
        header,
        line.length,
        live_crypt.key.clone(),
        Workqueues::of(live_crypt),
    )?;
    wanted.length = line.length;
    Ok(tables_match(&[wanted], &live)?)
}

/// How long a close waits for a device's last opener to let go before it calls the device busy: udev
/// opens a device briefly after a write to it is closed (its "watch" of block devices), and a format
/// closes its mapping right after writing to it (seen: a stage refused as "in use" at load 7).
const CLOSE_WAIT_TRIES: u32 = 30;
const CLOSE_WAIT_STEP: std::time::Duration = std::time::Duration::from_millis(100);

/// Removes the stack named `names`; absent devices are fine (close is idempotent).
pub fn close_stack(dm: &dyn DeviceMapper, names: &StackNames) -> Result<bool, MappingError> {
    let mut removed = false;
    for name in [&names.crypt, &names.integrity] {
        if wait_unused(dm, name)? {
            dm.remove(name)?;
            removed = true;
        }
    }
    Ok(removed)
}

/// `false` if `name` does not exist; `true` once nothing holds it open; [`MappingError::Busy`] if
/// something still does after [`CLOSE_WAIT_TRIES`] looks (a mount, a process: not a passing udev).
fn wait_unused(dm: &dyn DeviceMapper, name: &DmName) -> Result<bool, MappingError> {
    let mut looks = 1;
    loop {
        let Some(info) = dm.info(name)? else {
            return Ok(false);
        };
        if info.open_count == 0 {
            return Ok(true);
        }
        if looks == CLOSE_WAIT_TRIES {
            return Err(MappingError::Busy(info.node.display().to_string()));
        }
        looks += 1;
        std::thread::sleep(CLOSE_WAIT_STEP);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::header::FsKind;

    fn sb(tag: u16, provided: u64, log2: u8) -> Vec<u8> {
        let mut buf = vec![0u8; 4096];
        buf[..8].copy_from_slice(INTEGRITY_MAGIC);
        buf[10..12].copy_from_slice(&tag.to_le_bytes());
        buf[16..24].copy_from_slice(&provided.to_le_bytes());
        buf[28] = log2;
        buf
    }

    fn aead() -> Profile {
        Profile::AeadHmacSha256 {
            journal: Journal::Journal,
        }
    }

    #[test]
    fn superblock_parse_and_check() {
        let parsed = IntegritySuperblock::parse(&sb(48, 1000, 3)).unwrap();
        assert_eq!(parsed.provided_data_sectors, 1000);
        parsed.check(aead()).unwrap();
        assert!(matches!(
            IntegritySuperblock::parse(&sb(28, 1000, 3))
                .unwrap()
                .check(aead()),
            Err(MappingError::IntegrityMismatch(_))
        ));
        assert!(matches!(
            IntegritySuperblock::parse(&sb(48, 1000, 0))
                .unwrap()
                .check(aead()),
            Err(MappingError::IntegrityMismatch(_))
        ));
        assert!(matches!(
            IntegritySuperblock::parse(&vec![0u8; 4096]),
            Err(MappingError::MissingIntegritySuperblock)
        ));
    }

    #[test]
    fn tables_follow_the_profile() {
        let header = Header::new([1; 16], aead(), FsKind::Ext4, 0);
        let line = integrity_line(Path::new("/dev/loop0"), &header, 2000).unwrap();
        assert_eq!(
            line.target.params().as_str(),
            "/dev/loop0 2048 48 J 2 fix_padding block_size:4096"
        );
        let keyring = || CryptKey::Keyring {
            description: "sealcsi:x".into(),
        };
        let crypt = crypt_line(
            Path::new("/dev/mapper/v-integrity"),
            &header,
            2000,
            keyring(),
            Workqueues::Inline,
        )
        .unwrap();
        assert_eq!(
            crypt.target.params().as_str(),
            "capi:authenc(hmac(sha256),xts(aes))-random :96:logon:sealcsi:x 0 /dev/mapper/v-integrity 0 4 \
             integrity:48:aead sector_size:4096 no_read_workqueue no_write_workqueue"
        );
        let xts = Header::new([1; 16], Profile::XtsOnly, FsKind::Ext4, 0);
        assert!(integrity_line(Path::new("/dev/loop0"), &xts, 2000).is_none());
        let crypt = crypt_line(
            Path::new("/dev/loop0"),
            &xts,
            2000,
            keyring(),
            Workqueues::Inline,
        )
        .unwrap();
        assert_eq!(
            crypt.target.params().as_str(),
            "aes-xts-plain64 :64:logon:sealcsi:x 0 /dev/loop0 2048 3 sector_size:4096 no_read_workqueue \
             no_write_workqueue"
        );
    }

    #[test]
    fn format_journal_is_the_kernels_default_capped() {
        // 1/128 of the device below the cap, as dm-integrity's own default.
        assert_eq!(format_journal_sectors(64 << 20), 1024);
        assert_eq!(format_journal_sectors(1 << 30), 16384);
        assert_eq!(format_journal_sectors(16 << 40), MAX_JOURNAL_SECTORS);
        let header = Header::new([1; 16], aead(), FsKind::Ext4, 0);
        let line = format_integrity_line(Path::new("/dev/loop0"), &header, 64 << 30, 8).unwrap();
        assert_eq!(
            line.target.params().as_str(),
            "/dev/loop0 2048 48 J 3 fix_padding block_size:4096 journal_sectors:16384"
        );
        let xts = Header::new([1; 16], Profile::XtsOnly, FsKind::Ext4, 0);
        assert!(format_integrity_line(Path::new("/dev/loop0"), &xts, 1 << 30, 8).is_none());
    }

    #[test]
    fn workqueue_choice_sets_exactly_its_flags() {
        let header = Header::new([1; 16], aead(), FsKind::Ext4, 0);
        let key = || CryptKey::Keyring {
            description: "sealcsi:x".into(),
        };
        let options = |q| {
            let line = crypt_line(Path::new("/dev/x"), &header, 8, key(), q).unwrap();
            let text = line.target.params().to_string();
            text.split_once(" 0 /dev/x 0 ").unwrap().1.to_string()
        };
        assert_eq!(
            options(Workqueues::Queued),
            "2 integrity:48:aead sector_size:4096"
        );
        assert_eq!(
            options(Workqueues::ReadInline),
            "3 integrity:48:aead sector_size:4096 no_read_workqueue"
        );
        assert_eq!(
            options(Workqueues::WriteInline),
            "3 integrity:48:aead sector_size:4096 no_write_workqueue"
        );
        for q in [
            Workqueues::Queued,
            Workqueues::Inline,
            Workqueues::ReadInline,
            Workqueues::WriteInline,
        ] {
            let line = crypt_line(Path::new("/dev/x"), &header, 8, key(), q).unwrap();
            let Target::Crypt(t) = &line.target else {
                panic!("not crypt")
            };
            assert_eq!(Workqueues::of(t), q, "round trip of {q:?}");
        }
    }

    #[test]
    fn names_derive_and_validate() {
        let names = StackNames::new("vol1").unwrap();
        assert_eq!(names.integrity.as_str(), "vol1-integrity");
        assert!(StackNames::new("bad/name").is_err());
        assert!(
            StackNames::new(&"x".repeat(120)).is_err(),
            "integrity name would exceed 127 bytes"
        );
    }
}
