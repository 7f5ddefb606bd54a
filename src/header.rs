//! The sealcsi volume header: the on-disk format, byte for byte as docs/format.md describes it.
//!
//! The header comes from the untrusted host, so decoding is strict: fixed sizes, known versions, reserved
//! bytes zero, and the cipher/integrity/sector/key-length tuple must be one of the allow-listed profiles.
//! Integrity against accident (a torn write) comes from a SHA-256 checksum per copy; integrity against the
//! host comes from the keyslots: every field the mapping depends on is AAD of each keyslot's AES-GCM-SIV wrap.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::keys::{DIGEST_LEN, NONCE_LEN, SALT_LEN, WRAP_TAG_LEN};

/// Size of one header copy.
pub const HEADER_SIZE: usize = 4096;
/// Byte offsets of the two header copies on the device.
pub const COPY_OFFSETS: [u64; 2] = [0, HEADER_SIZE as u64];
/// Where the dm-integrity device starts: the header region is the first MiB.
pub const DATA_OFFSET: u64 = 1 << 20;
/// First bytes of every header copy.
pub const MAGIC: [u8; 8] = *b"SEALCSI\0";
/// The only format version this build reads and writes.
pub const FORMAT_VERSION: u16 = 1;
/// Number of keyslots in a header.
pub const KEYSLOTS: usize = 8;
/// Bytes of source-specific binding parameters a keyslot can hold.
pub const MAX_BINDING_LEN: usize = 128;

const FIXED_LEN: usize = 128;
const SLOT_LEN: usize = 384;
const SLOTS_START: usize = FIXED_LEN;
const SLOTS_END: usize = SLOTS_START + KEYSLOTS * SLOT_LEN;
const CHECKSUM_AT: usize = HEADER_SIZE - 32;
/// Length of the authenticated part of a keyslot (everything before the wrapped key).
const SLOT_META_LEN: usize = 224;
const WRAPPED_AREA: usize = 128;
const AAD_LABEL: &[u8] = b"sealcsi/v1/keyslot-aad";

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum HeaderError {
    /// Neither copy starts with the sealcsi magic.
    #[error("no sealcsi header on this device")]
    NotSealcsi,
    /// The magic is there but the version is one this build does not know.
    #[error("unsupported sealcsi header version {0} (this build reads version {FORMAT_VERSION})")]
    UnsupportedVersion(u16),
    /// A copy failed its checksum (damaged or torn write).
    #[error("header checksum mismatch")]
    Checksum,
    /// A field holds a value outside what the format allows.
    #[error("invalid header field {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    /// The buffer handed in is not the size of a header copy.
    #[error("header buffer is {0} bytes, expected {HEADER_SIZE}")]
    Size(usize),
}

fn invalid(field: &'static str, reason: impl Into<String>) -> HeaderError {
    HeaderError::Invalid {
        field,
        reason: reason.into(),
    }
}

/// Whether every block is authenticated (the `integrity` option of the CLI and the StorageClass).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Integrity {
    /// dm-integrity AEAD: every 4 KiB block authenticated (HMAC-SHA256).
    HmacSha256,
    /// dm-crypt only: confidentiality, no tamper detection.
    None,
}

/// How journal writes reach dm-integrity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Journal {
    /// Data and tags go through the journal: crash-safe.
    Journal,
    /// Direct writes: faster, but a crash can leave data and tag out of step (the block then reads as an error).
    Direct,
}

/// The allow-listed mapping profiles. Each fixes the cipher, integrity mode, tag size, sector size and key
/// length together, so a header can never ask for a combination nobody reviewed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Profile {
    /// dm-integrity (AEAD, tag 48) under dm-crypt `capi:authenc(hmac(sha256),xts(aes))-random`, 96-byte key.
    AeadHmacSha256 { journal: Journal },
    /// dm-crypt `aes-xts-plain64` alone: confidentiality without tamper detection, 64-byte key.
    XtsOnly,
}

const CIPHER_AUTHENC: u8 = 1;
const CIPHER_XTS: u8 = 2;
const INTEGRITY_NONE: u8 = 0;
const INTEGRITY_AEAD: u8 = 1;
const JOURNAL_NONE: u8 = 0;
const JOURNAL_J: u8 = 1;
const JOURNAL_D: u8 = 2;

impl Profile {
    pub const SECTOR_SIZE: u32 = 4096;

    /// The profile for an integrity choice and a journal mode (the journal applies to AEAD only).
    pub fn new(integrity: Integrity, journal: Journal) -> Self {
        match integrity {
            Integrity::HmacSha256 => Profile::AeadHmacSha256 { journal },
            Integrity::None => Profile::XtsOnly,
        }
    }

    /// The integrity journal mode, for profiles that have an integrity layer.
    pub fn journal(self) -> Option<Journal> {
        match self {
            Profile::AeadHmacSha256 { journal } => Some(journal),
            Profile::XtsOnly => None,
        }
    }

    pub fn key_len(self) -> usize {
        match self {
            Profile::AeadHmacSha256 { .. } => 96,
            Profile::XtsOnly => 64,
        }
    }

    pub fn tag_size(self) -> u16 {
        match self {
            Profile::AeadHmacSha256 { .. } => 48,
            Profile::XtsOnly => 0,
        }
    }

    pub fn sector_size(self) -> u32 {
        Self::SECTOR_SIZE
    }

    fn codes(self) -> (u8, u8, u8) {
        match self {
            Profile::AeadHmacSha256 {
                journal: Journal::Journal,
            } => (CIPHER_AUTHENC, INTEGRITY_AEAD, JOURNAL_J),
            Profile::AeadHmacSha256 {
                journal: Journal::Direct,
            } => (CIPHER_AUTHENC, INTEGRITY_AEAD, JOURNAL_D),
            Profile::XtsOnly => (CIPHER_XTS, INTEGRITY_NONE, JOURNAL_NONE),
        }
    }

    /// The allow-list: every field must agree with exactly one profile.
    fn from_fields(
        cipher: u8,
        integrity: u8,
        journal: u8,
        tag: u16,
        key_len: u16,
        sector: u32,
    ) -> Result<Self, HeaderError> {
        let profile = match (cipher, integrity, journal) {
            (CIPHER_AUTHENC, INTEGRITY_AEAD, JOURNAL_J) => Profile::AeadHmacSha256 {
                journal: Journal::Journal,
            },
            (CIPHER_AUTHENC, INTEGRITY_AEAD, JOURNAL_D) => Profile::AeadHmacSha256 {
                journal: Journal::Direct,
            },
            (CIPHER_XTS, INTEGRITY_NONE, JOURNAL_NONE) => Profile::XtsOnly,
            _ => {
                return Err(invalid(
                    "cipher/integrity/journal",
                    format!("combination {cipher}/{integrity}/{journal} is not allowed"),
                ));
            }
        };
        if tag != profile.tag_size() {
            return Err(invalid(
                "tag_size",
                format!("{tag} does not match the profile"),
            ));
        }
        if usize::from(key_len) != profile.key_len() {
            return Err(invalid(
                "key_len",
                format!("{key_len} does not match the cipher"),
            ));
        }
        if sector != profile.sector_size() {
            return Err(invalid("sector_size", format!("{sector} is not allowed")));
        }
        Ok(profile)
    }
}

/// The filesystem made at format time (a hint for staging; the filesystem itself is the truth).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum FsKind {
    /// No filesystem: a raw block volume.
    None,
    Ext4,
    Xfs,
}

impl FsKind {
    /// The name mount(2), the tools and CSI know the filesystem by.
    pub fn name(self) -> &'static str {
        match self {
            FsKind::Ext4 => "ext4",
            FsKind::Xfs => "xfs",
            FsKind::None => "none",
        }
    }

    /// A filesystem sealcsi makes, by its name (`none` is not a filesystem name).
    pub fn from_fs_name(name: &str) -> Option<Self> {
        match name {
            "ext4" => Some(FsKind::Ext4),
            "xfs" => Some(FsKind::Xfs),
            _ => None,
        }
    }

    fn code(self) -> u8 {
        match self {
            FsKind::None => 0,
            FsKind::Ext4 => 1,
            FsKind::Xfs => 2,
        }
    }

    fn from_code(code: u8) -> Result<Self, HeaderError> {
        match code {
            0 => Ok(FsKind::None),
            1 => Ok(FsKind::Ext4),
            2 => Ok(FsKind::Xfs),
            other => Err(invalid("fs", format!("unknown filesystem code {other}"))),
        }
    }
}

/// Which sealing mechanism produced the secret a keyslot is wrapped under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SourceKind {
    /// Simulated TEE: protects nothing, for development and tests.
    Sim,
    /// AMD SEV-SNP derived key.
    Snp,
    /// TPM 2.0 sealed secret.
    Tpm,
    /// A secret released by a key broker (Trustee KBS) after attestation (docs/keys.md).
    Kbs,
}

impl SourceKind {
    pub fn code(self) -> u16 {
        match self {
            SourceKind::Sim => 1,
            SourceKind::Snp => 2,
            SourceKind::Tpm => 3,
            SourceKind::Kbs => 4,
        }
    }

    fn from_code(code: u16) -> Result<Self, HeaderError> {
        match code {
            1 => Ok(SourceKind::Sim),
            2 => Ok(SourceKind::Snp),
            3 => Ok(SourceKind::Tpm),
            4 => Ok(SourceKind::Kbs),
            other => Err(invalid("keyslot.source", format!("unknown source {other}"))),
        }
    }
}

const SLOT_EMPTY: u8 = 0;
const SLOT_ACTIVE: u8 = 1;
const SLOT_KIND_SEALED: u8 = 1;
const SLOT_KIND_RECOVERY: u8 = 2;
const SLOT_KIND_TRANSFER: u8 = 3;
/// The `source` field of a recovery slot: no sealing source.
const SOURCE_NONE: u16 = 0;
/// Bytes of binding in a recovery slot: the HPKE encapsulated key (X25519 public value).
pub const RECOVERY_ENC_LEN: usize = 32;

/// What a keyslot's wrapped key is encrypted to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SlotKind {
    /// Kind 1: AES-256-GCM-SIV under a KEK derived from a sealing source's secret.
    Sealed(SourceKind),
    /// Kind 2: an escrow slot, HPKE-encrypted to an operator-held X25519 key (docs/format.md). No node
    /// unseals it; only `recover` with the operator's private key opens it.
    Recovery,
    /// Kind 3: an attested-transfer slot, HPKE-encrypted to the ephemeral X25519 key of a transfer
    /// request (docs/format.md); its salt field carries the request's nonce. Only `transfer-accept` on
    /// the node holding the request's sealed private key opens it.
    Transfer,
}

impl SlotKind {
    /// Whether the slot is HPKE-encrypted to an X25519 key (recovery, transfer) rather than sealed.
    pub fn is_hpke(self) -> bool {
        matches!(self, SlotKind::Recovery | SlotKind::Transfer)
    }
}

/// One wrapping of the volume key, sealed to one identity (or escrowed to a recovery key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keyslot {
    pub kind: SlotKind,
    pub created: u64,
    pub identity_digest: [u8; DIGEST_LEN],
    pub salt: [u8; SALT_LEN],
    pub nonce: [u8; NONCE_LEN],
    /// Source-specific parameters needed to ask for the same secret again (empty for `sim`); for a
    /// recovery slot, the 32-byte HPKE encapsulated key.
    pub binding: Vec<u8>,
    /// The volume key under AES-256-GCM-SIV (sealed) or the HPKE AEAD (recovery): ciphertext || 16-byte tag.
    pub wrapped: Vec<u8>,
}

impl Keyslot {
    /// The sealing source of a sealed slot; `None` for a recovery slot.
    pub fn source(&self) -> Option<SourceKind> {
        match self.kind {
            SlotKind::Sealed(source) => Some(source),
            SlotKind::Recovery | SlotKind::Transfer => None,
        }
    }
}

/// One decoded header copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub seqno: u64,
    pub uuid: [u8; 16],
    pub profile: Profile,
    pub fs: FsKind,
    pub data_offset: u64,
    pub created: u64,
    /// What this volume is bound to (the CSI volume it was made for: [`volume_binding`]), all zero when
    /// unbound (formatted by the CLI, or by a sealcsi before bindings). Authenticated like every fixed
    /// field, so the host cannot move a volume to another volume's place undetected.
    pub volume_binding: [u8; BINDING_DIGEST_LEN],
    pub keyslots: [Option<Keyslot>; KEYSLOTS],
}

/// Length of [`Header::volume_binding`].
pub const BINDING_DIGEST_LEN: usize = 32;
/// Where the volume binding sits in the fixed part (bytes 72..104, reserved before bindings existed).
const BINDING_AT: usize = 72;
const VOLUME_BINDING_LABEL: &[u8] = b"sealcsi/v1/volume-binding";

/// The binding of a volume made for the CSI volume `volume_id`: SHA-256 of a label and the id.
pub fn volume_binding(volume_id: &str) -> [u8; BINDING_DIGEST_LEN] {
    Sha256::new()
        .chain_update(VOLUME_BINDING_LABEL)
        .chain_update(volume_id.as_bytes())
        .finalize()
        .into()
}

fn put_u16(buf: &mut [u8], at: usize, v: u16) {
    buf[at..at + 2].copy_from_slice(&v.to_le_bytes());
}
fn put_u32(buf: &mut [u8], at: usize, v: u32) {
    buf[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(buf: &mut [u8], at: usize, v: u64) {
    buf[at..at + 8].copy_from_slice(&v.to_le_bytes());
}
fn get_u16(buf: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(buf[at..at + 2].try_into().expect("2-byte slice"))
}
fn get_u32(buf: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(buf[at..at + 4].try_into().expect("4-byte slice"))
}
fn get_u64(buf: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(buf[at..at + 8].try_into().expect("8-byte slice"))
}
fn array<const N: usize>(buf: &[u8], at: usize) -> [u8; N] {
    buf[at..at + N].try_into().expect("fixed-size slice")
}

fn require_zero(buf: &[u8], field: &'static str) -> Result<(), HeaderError> {
    if buf.iter().all(|&b| b == 0) {
        Ok(())
    } else {
        Err(invalid(field, "reserved bytes are not zero"))
    }
}

impl Header {
    /// A fresh header with no keyslots.
    pub fn new(uuid: [u8; 16], profile: Profile, fs: FsKind, created: u64) -> Self {
        Self {
            seqno: 1,
            uuid,
            profile,
            fs,
            data_offset: DATA_OFFSET,
            created,
            volume_binding: [0; BINDING_DIGEST_LEN],
            keyslots: Default::default(),
        }
    }

    /// Whether the volume was bound to a CSI volume at format.
    pub fn is_bound(&self) -> bool {
        self.volume_binding != [0; BINDING_DIGEST_LEN]
    }

    pub fn uuid_string(&self) -> String {
        uuid::Uuid::from_bytes(self.uuid).hyphenated().to_string()
    }

    pub fn active_slots(&self) -> impl Iterator<Item = (usize, &Keyslot)> {
        self.keyslots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|s| (i, s)))
    }

    fn encode_fixed(&self, out: &mut [u8]) {
        out[0..8].copy_from_slice(&MAGIC);
        put_u16(out, 8, FORMAT_VERSION);
        put_u16(out, 10, HEADER_SIZE as u16);
        put_u32(out, 12, 0);
        put_u64(out, 16, self.seqno);
        out[24..40].copy_from_slice(&self.uuid);
        let (cipher, integrity, journal) = self.profile.codes();
        out[40] = cipher;
        out[41] = integrity;
        out[42] = journal;
        out[43] = self.fs.code();
        put_u16(out, 44, self.profile.tag_size());
        put_u16(out, 46, self.profile.key_len() as u16);
        put_u32(out, 48, self.profile.sector_size());
        put_u64(out, 56, self.data_offset);
        put_u64(out, 64, self.created);
        out[BINDING_AT..BINDING_AT + BINDING_DIGEST_LEN].copy_from_slice(&self.volume_binding);
    }

    /// The additional authenticated data of a keyslot's wrap: a label, the header's fixed fields except the
    /// sequence number (which changes on every update), and the slot's own metadata (all but the wrapped key).
    /// Other slots are not covered, so adding or removing one never needs keys the node does not hold.
    pub fn keyslot_aad(&self, slot: &Keyslot) -> Vec<u8> {
        let mut fixed = [0u8; FIXED_LEN];
        self.encode_fixed(&mut fixed);
        let mut meta = [0u8; SLOT_META_LEN];
        encode_slot_meta(slot, &mut meta);
        let mut aad = Vec::with_capacity(AAD_LABEL.len() + FIXED_LEN + SLOT_META_LEN);
        aad.extend_from_slice(AAD_LABEL);
        aad.extend_from_slice(&fixed[0..16]);
        aad.extend_from_slice(&fixed[24..FIXED_LEN]);
        aad.extend_from_slice(&meta);
        aad
    }

    /// The 4096 bytes of one header copy, checksum included.
    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut out = [0u8; HEADER_SIZE];
        self.encode_fixed(&mut out[..FIXED_LEN]);
        for (i, slot) in self.keyslots.iter().enumerate() {
            if let Some(slot) = slot {
                let at = SLOTS_START + i * SLOT_LEN;
                encode_slot(slot, &mut out[at..at + SLOT_LEN]);
            }
        }
        let sum = Sha256::digest(&out[..CHECKSUM_AT]);
        out[CHECKSUM_AT..].copy_from_slice(&sum);
        out
    }

    /// Decodes one header copy, rejecting anything the format does not allow.
    pub fn decode(buf: &[u8]) -> Result<Self, HeaderError> {
        if buf.len() != HEADER_SIZE {
            return Err(HeaderError::Size(buf.len()));
        }
        if buf[0..8] != MAGIC {
            return Err(HeaderError::NotSealcsi);
        }
        let version = get_u16(buf, 8);
        if version != FORMAT_VERSION {
            return Err(HeaderError::UnsupportedVersion(version));
        }
        if Sha256::digest(&buf[..CHECKSUM_AT]).as_slice() != &buf[CHECKSUM_AT..] {
            return Err(HeaderError::Checksum);
        }
        let size = get_u16(buf, 10);
        if usize::from(size) != HEADER_SIZE {
            return Err(invalid("header_size", format!("{size}")));
        }
        let flags = get_u32(buf, 12);
        if flags != 0 {
            return Err(invalid("flags", format!("unknown flags {flags:#x}")));
        }
        let profile = Profile::from_fields(
            buf[40],
            buf[41],
            buf[42],
            get_u16(buf, 44),
            get_u16(buf, 46),
            get_u32(buf, 48),
        )?;
        require_zero(&buf[52..56], "reserved@52")?;
        let data_offset = get_u64(buf, 56);
        if data_offset != DATA_OFFSET {
            return Err(invalid(
                "data_offset",
                format!("{data_offset} (expected {DATA_OFFSET})"),
            ));
        }
        require_zero(
            &buf[BINDING_AT + BINDING_DIGEST_LEN..FIXED_LEN],
            "reserved@104",
        )?;
        require_zero(&buf[SLOTS_END..CHECKSUM_AT], "reserved@slots-end")?;
        let mut keyslots: [Option<Keyslot>; KEYSLOTS] = Default::default();
        for (i, slot) in keyslots.iter_mut().enumerate() {
            let at = SLOTS_START + i * SLOT_LEN;
            *slot = decode_slot(&buf[at..at + SLOT_LEN], profile)?;
        }
        Ok(Self {
            seqno: get_u64(buf, 16),
            uuid: array(buf, 24),
            profile,
            fs: FsKind::from_code(buf[43])?,
            data_offset,
            created: get_u64(buf, 64),
            volume_binding: array(buf, BINDING_AT),
            keyslots,
        })
    }
}

fn encode_slot_meta(slot: &Keyslot, out: &mut [u8]) {
    out[0] = SLOT_ACTIVE;
    let (kind, source) = match slot.kind {
        SlotKind::Sealed(source) => (SLOT_KIND_SEALED, source.code()),
        SlotKind::Recovery => (SLOT_KIND_RECOVERY, SOURCE_NONE),
        SlotKind::Transfer => (SLOT_KIND_TRANSFER, SOURCE_NONE),
    };
    out[1] = kind;
    put_u16(out, 2, source);
    put_u16(out, 4, slot.binding.len() as u16);
    put_u16(out, 6, slot.wrapped.len() as u16);
    put_u64(out, 8, slot.created);
    out[16..48].copy_from_slice(&slot.identity_digest);
    out[48..80].copy_from_slice(&slot.salt);
    out[80..92].copy_from_slice(&slot.nonce);
    out[96..96 + slot.binding.len()].copy_from_slice(&slot.binding);
}

fn encode_slot(slot: &Keyslot, out: &mut [u8]) {
    encode_slot_meta(slot, &mut out[..SLOT_META_LEN]);
    out[SLOT_META_LEN..SLOT_META_LEN + slot.wrapped.len()].copy_from_slice(&slot.wrapped);
}

fn decode_slot(buf: &[u8], profile: Profile) -> Result<Option<Keyslot>, HeaderError> {
    match buf[0] {
        SLOT_EMPTY => {
            require_zero(buf, "keyslot (empty)")?;
            return Ok(None);
        }
        SLOT_ACTIVE => {}
        other => return Err(invalid("keyslot.state", format!("unknown state {other}"))),
    }
    let kind = match buf[1] {
        SLOT_KIND_SEALED => SlotKind::Sealed(SourceKind::from_code(get_u16(buf, 2))?),
        code @ (SLOT_KIND_RECOVERY | SLOT_KIND_TRANSFER) => {
            let source = get_u16(buf, 2);
            if source != SOURCE_NONE {
                return Err(invalid(
                    "keyslot.source",
                    format!("{source} in an HPKE slot (must be 0)"),
                ));
            }
            if code == SLOT_KIND_RECOVERY {
                SlotKind::Recovery
            } else {
                SlotKind::Transfer
            }
        }
        other => return Err(invalid("keyslot.kind", format!("unknown kind {other}"))),
    };
    let binding_len = usize::from(get_u16(buf, 4));
    if binding_len > MAX_BINDING_LEN {
        return Err(invalid("keyslot.binding_len", format!("{binding_len}")));
    }
    if kind.is_hpke() && binding_len != RECOVERY_ENC_LEN {
        return Err(invalid(
            "keyslot.binding_len",
            format!("{binding_len} in an HPKE slot (must be {RECOVERY_ENC_LEN})"),
        ));
    }
    match kind {
        // HPKE needs no salt or nonce of ours: both stay zero, so nothing is left for a host to vary.
        SlotKind::Recovery => require_zero(&buf[48..92], "keyslot.salt/nonce (recovery)")?,
        // The salt field carries the transfer request's nonce (authenticated); the nonce stays zero.
        SlotKind::Transfer => require_zero(&buf[80..92], "keyslot.nonce (transfer)")?,
        SlotKind::Sealed(_) => {}
    }
    let wrapped_len = usize::from(get_u16(buf, 6));
    if wrapped_len != profile.key_len() + WRAP_TAG_LEN {
        return Err(invalid(
            "keyslot.wrapped_len",
            format!(
                "{wrapped_len} does not fit a {}-byte key",
                profile.key_len()
            ),
        ));
    }
    require_zero(&buf[92..96], "keyslot.reserved@92")?;
    require_zero(
        &buf[96 + binding_len..SLOT_META_LEN],
        "keyslot.binding padding",
    )?;
    require_zero(
        &buf[SLOT_META_LEN + wrapped_len..SLOT_META_LEN + WRAPPED_AREA],
        "keyslot.wrapped padding",
    )?;
    require_zero(&buf[SLOT_META_LEN + WRAPPED_AREA..], "keyslot.reserved@352")?;
    Ok(Some(Keyslot {
        kind,
        created: get_u64(buf, 8),
        identity_digest: array(buf, 16),
        salt: array(buf, 48),
        nonce: array(buf, 80),
        binding: buf[96..96 + binding_len].to_vec(),
        wrapped: buf[SLOT_META_LEN..SLOT_META_LEN + wrapped_len].to_vec(),
    }))
}

/// The result of reading both copies: the winning header and which copy it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Active {
    pub header: Header,
    pub copy: usize,
    /// Why the other copy lost, if it was unreadable (a torn write or damage worth reporting).
    pub other_copy_error: Option<HeaderError>,
}

impl Active {
    /// The copy an update must overwrite: never the one that currently wins.
    pub fn inactive_copy(&self) -> usize {
        1 - self.copy
    }
}

/// Picks the valid copy with the highest sequence number from the first `2 * HEADER_SIZE` bytes of a device.
pub fn select(region: &[u8]) -> Result<Active, HeaderError> {
    if region.len() != 2 * HEADER_SIZE {
        return Err(HeaderError::Size(region.len()));
    }
    let copies = [
        Header::decode(&region[..HEADER_SIZE]),
        Header::decode(&region[HEADER_SIZE..]),
    ];
    match copies {
        [Ok(a), Ok(b)] => {
            let copy = if b.seqno > a.seqno { 1 } else { 0 };
            let header = if copy == 1 { b } else { a };
            Ok(Active {
                header,
                copy,
                other_copy_error: None,
            })
        }
        [Ok(header), Err(e)] => Ok(Active {
            header,
            copy: 0,
            other_copy_error: Some(e),
        }),
        [Err(e), Ok(header)] => Ok(Active {
            header,
            copy: 1,
            other_copy_error: Some(e),
        }),
        // Report the more telling error: a damaged sealcsi header beats "no header at all".
        [Err(HeaderError::NotSealcsi), Err(e)] | [Err(e), Err(_)] => Err(e),
    }
}

/// The first 8 bytes a format writes, at offset 0, before anything else of the volume: "sealcsi began
/// a format here". The header (written last) replaces it. A device that carries it and no header copy
/// never held a volume: no key of it was ever stored, so nothing on it can be read by anyone, and a
/// format may finish over it without --force (docs/format.md, "Unfinished format").
pub const UNFINISHED_FORMAT_MAGIC: [u8; 8] = *b"SEALFMT\0";

/// True if `region` is what an interrupted format leaves: the unfinished-format marker at offset 0 and
/// no header magic in either copy.
pub fn is_unfinished_format(region: &[u8]) -> bool {
    region.get(..UNFINISHED_FORMAT_MAGIC.len()) == Some(&UNFINISHED_FORMAT_MAGIC[..])
        && !has_magic(region)
}

/// True if the region carries the sealcsi magic in either copy, valid or not: such a device is never
/// formatted over without --force.
pub fn has_magic(region: &[u8]) -> bool {
    COPY_OFFSETS.iter().any(|&off| {
        let off = off as usize;
        region.get(off..off + MAGIC.len()) == Some(&MAGIC[..])
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn an_unfinished_format_is_the_marker_without_any_header_copy() {
        let mut region = vec![0u8; 2 * HEADER_SIZE];
        assert!(!is_unfinished_format(&region));
        region[..8].copy_from_slice(&UNFINISHED_FORMAT_MAGIC);
        assert!(is_unfinished_format(&region));
        // Once a header copy is written (copy 1 first, say), the device holds a volume.
        region[HEADER_SIZE..HEADER_SIZE + 8].copy_from_slice(&MAGIC);
        assert!(!is_unfinished_format(&region));
        assert!(!is_unfinished_format(&UNFINISHED_FORMAT_MAGIC[..4]));
    }

    pub(crate) fn sample_slot(key_len: usize) -> Keyslot {
        Keyslot {
            kind: SlotKind::Sealed(SourceKind::Sim),
            created: 1_700_000_000,
            identity_digest: [3; DIGEST_LEN],
            salt: [4; SALT_LEN],
            nonce: [5; NONCE_LEN],
            binding: vec![6; 10],
            wrapped: vec![7; key_len + WRAP_TAG_LEN],
        }
    }

    fn sample() -> Header {
        let profile = Profile::AeadHmacSha256 {
            journal: Journal::Journal,
        };
        let mut h = Header::new([9; 16], profile, FsKind::Ext4, 1_700_000_000);
        h.keyslots[0] = Some(sample_slot(profile.key_len()));
        h
    }

    /// Rewrites the checksum, as an attacker who edits a header would.
    fn reseal_checksum(buf: &mut [u8; HEADER_SIZE]) {
        let sum = Sha256::digest(&buf[..CHECKSUM_AT]);
        buf[CHECKSUM_AT..].copy_from_slice(&sum);
    }

    fn mutated(at: usize, value: u8) -> Result<Header, HeaderError> {
        let mut buf = sample().encode();
        buf[at] = value;
        reseal_checksum(&mut buf);
        Header::decode(&buf)
    }

    #[test]
    fn round_trip() {
        let h = sample();
        assert_eq!(Header::decode(&h.encode()).unwrap(), h);
    }

    #[test]
    fn the_volume_binding_is_stored_at_72_and_authenticated() {
        let mut h = sample();
        assert!(!h.is_bound());
        h.volume_binding = volume_binding("sv-0123");
        assert!(h.is_bound());
        assert_ne!(volume_binding("sv-0123"), volume_binding("sv-0124"));
        let buf = h.encode();
        assert_eq!(&buf[72..104], &volume_binding("sv-0123"));
        assert_eq!(Header::decode(&buf).unwrap(), h);
        let slot = h.keyslots[0].clone().unwrap();
        let mut other = h.clone();
        other.volume_binding = volume_binding("sv-0124");
        assert_ne!(h.keyslot_aad(&slot), other.keyslot_aad(&slot));
    }

    #[test]
    fn layout_is_as_documented() {
        let buf = sample().encode();
        assert_eq!(&buf[0..8], b"SEALCSI\0");
        assert_eq!(get_u16(&buf, 8), 1);
        assert_eq!(get_u16(&buf, 10), 4096);
        assert_eq!(get_u64(&buf, 16), 1);
        assert_eq!(&buf[24..40], &[9; 16]);
        assert_eq!(&buf[40..44], &[1, 1, 1, 1]);
        assert_eq!(get_u16(&buf, 44), 48);
        assert_eq!(get_u16(&buf, 46), 96);
        assert_eq!(get_u32(&buf, 48), 4096);
        assert_eq!(get_u64(&buf, 56), 1 << 20);
        assert_eq!(buf[128], 1, "slot 0 state");
        assert_eq!(get_u16(&buf, 128 + 6), 112, "slot 0 wrapped length");
        assert_eq!(&buf[128 + 224..128 + 224 + 112], &[7; 112][..]);
        assert_eq!(buf[128 + 384], 0, "slot 1 empty");
        assert_eq!(&buf[4064..], Sha256::digest(&buf[..4064]).as_slice());
    }

    #[test]
    fn rejects_wrong_magic_version_and_checksum() {
        let mut buf = sample().encode();
        buf[0] = b'X';
        assert_eq!(Header::decode(&buf), Err(HeaderError::NotSealcsi));
        assert_eq!(mutated(8, 2), Err(HeaderError::UnsupportedVersion(2)));
        let mut buf = sample().encode();
        buf[100] = 1;
        assert_eq!(Header::decode(&buf), Err(HeaderError::Checksum));
        assert_eq!(Header::decode(&buf[..100]), Err(HeaderError::Size(100)));
    }

    #[test]
    fn rejects_profiles_outside_the_allow_list() {
        // Cipher authenc with the crypt-only key length: the kernel would silently run AES-128-XTS.
        let mut buf = sample().encode();
        put_u16(&mut buf, 46, 64);
        reseal_checksum(&mut buf);
        assert!(matches!(
            Header::decode(&buf),
            Err(HeaderError::Invalid {
                field: "key_len",
                ..
            })
        ));
        // Truncated HMAC tag.
        let mut buf = sample().encode();
        put_u16(&mut buf, 44, 28);
        reseal_checksum(&mut buf);
        assert!(matches!(
            Header::decode(&buf),
            Err(HeaderError::Invalid {
                field: "tag_size",
                ..
            })
        ));
        // 512-byte sectors.
        let mut buf = sample().encode();
        put_u32(&mut buf, 48, 512);
        reseal_checksum(&mut buf);
        assert!(matches!(
            Header::decode(&buf),
            Err(HeaderError::Invalid {
                field: "sector_size",
                ..
            })
        ));
        // XTS cipher claiming AEAD integrity, integrity off under authenc, unknown journal.
        for (at, v) in [(40, 2), (41, 0), (42, 3), (40, 9)] {
            assert!(
                matches!(
                    mutated(at, v),
                    Err(HeaderError::Invalid {
                        field: "cipher/integrity/journal",
                        ..
                    })
                ),
                "byte {at} = {v}"
            );
        }
    }

    #[test]
    fn rejects_bad_fields() {
        assert!(matches!(
            mutated(12, 1),
            Err(HeaderError::Invalid { field: "flags", .. })
        ));
        assert!(matches!(
            mutated(43, 7),
            Err(HeaderError::Invalid { field: "fs", .. })
        ));
        assert!(matches!(
            mutated(57, 0x20),
            Err(HeaderError::Invalid {
                field: "data_offset",
                ..
            })
        ));
        assert!(matches!(
            mutated(11, 0x20),
            Err(HeaderError::Invalid {
                field: "header_size",
                ..
            })
        ));
        assert!(matches!(
            mutated(110, 1),
            Err(HeaderError::Invalid {
                field: "reserved@104",
                ..
            })
        ));
        assert!(matches!(
            mutated(53, 1),
            Err(HeaderError::Invalid {
                field: "reserved@52",
                ..
            })
        ));
        assert!(matches!(
            mutated(4000, 1),
            Err(HeaderError::Invalid {
                field: "reserved@slots-end",
                ..
            })
        ));
    }

    #[test]
    fn rejects_bad_keyslots() {
        let s = SLOTS_START;
        assert!(matches!(
            mutated(s, 2),
            Err(HeaderError::Invalid {
                field: "keyslot.state",
                ..
            })
        ));
        // Kind 2 (recovery) exists since the escrow slot, 3 (transfer) since attested transfer; 4 is
        // the first unknown kind.
        assert!(matches!(
            mutated(s + 1, 4),
            Err(HeaderError::Invalid {
                field: "keyslot.kind",
                ..
            })
        ));
        assert!(matches!(
            mutated(s + 2, 9),
            Err(HeaderError::Invalid {
                field: "keyslot.source",
                ..
            })
        ));
        assert!(matches!(
            mutated(s + 4, 200),
            Err(HeaderError::Invalid {
                field: "keyslot.binding_len",
                ..
            })
        ));
        assert!(matches!(
            mutated(s + 6, 80),
            Err(HeaderError::Invalid {
                field: "keyslot.wrapped_len",
                ..
            })
        ));
        assert!(matches!(
            mutated(s + 93, 1),
            Err(HeaderError::Invalid {
                field: "keyslot.reserved@92",
                ..
            })
        ));
        assert!(matches!(
            mutated(s + 200, 1),
            Err(HeaderError::Invalid {
                field: "keyslot.binding padding",
                ..
            })
        ));
        assert!(matches!(
            mutated(s + 340, 1),
            Err(HeaderError::Invalid {
                field: "keyslot.wrapped padding",
                ..
            })
        ));
        assert!(matches!(
            mutated(s + 360, 1),
            Err(HeaderError::Invalid {
                field: "keyslot.reserved@352",
                ..
            })
        ));
        // An empty slot must be entirely zero.
        assert!(matches!(
            mutated(s + SLOT_LEN + 5, 1),
            Err(HeaderError::Invalid {
                field: "keyslot (empty)",
                ..
            })
        ));
    }

    #[test]
    fn aad_covers_mapping_fields_but_not_seqno() {
        let h = sample();
        let slot = h.keyslots[0].clone().unwrap();
        let aad = h.keyslot_aad(&slot);
        let mut bumped = h.clone();
        bumped.seqno += 5;
        bumped.keyslots[3] = Some(sample_slot(96));
        assert_eq!(
            bumped.keyslot_aad(&slot),
            aad,
            "seqno and other slots are not in the AAD"
        );
        let mut journal = h.clone();
        journal.profile = Profile::AeadHmacSha256 {
            journal: Journal::Direct,
        };
        assert_ne!(journal.keyslot_aad(&slot), aad);
        let mut uuid = h.clone();
        uuid.uuid[0] ^= 1;
        assert_ne!(uuid.keyslot_aad(&slot), aad);
        let mut fs = h.clone();
        fs.fs = FsKind::Xfs;
        assert_ne!(fs.keyslot_aad(&slot), aad);
        let mut other = slot.clone();
        other.binding.push(1);
        assert_ne!(h.keyslot_aad(&other), aad);
        let mut wrapped = slot.clone();
        wrapped.wrapped[0] ^= 1;
        assert_eq!(
            h.keyslot_aad(&wrapped),
            aad,
            "the wrapped bytes are authenticated by the tag itself"
        );
    }

    fn recovery_slot(key_len: usize) -> Keyslot {
        Keyslot {
            kind: SlotKind::Recovery,
            created: 1_700_000_002,
            identity_digest: [0xD1; DIGEST_LEN],
            salt: [0; SALT_LEN],
            nonce: [0; NONCE_LEN],
            binding: vec![0xE2; RECOVERY_ENC_LEN],
            wrapped: vec![0xC3; key_len + WRAP_TAG_LEN],
        }
    }

    fn with_recovery() -> Header {
        let mut h = sample();
        h.keyslots[5] = Some(recovery_slot(h.profile.key_len()));
        h
    }

    fn mutated_recovery(at: usize, value: u8) -> Result<Header, HeaderError> {
        let mut buf = with_recovery().encode();
        buf[SLOTS_START + 5 * SLOT_LEN + at] = value;
        reseal_checksum(&mut buf);
        Header::decode(&buf)
    }

    #[test]
    fn recovery_slot_round_trips_with_the_documented_layout() {
        let h = with_recovery();
        let buf = h.encode();
        assert_eq!(Header::decode(&buf).unwrap(), h);
        let s = SLOTS_START + 5 * SLOT_LEN;
        assert_eq!(&buf[s..s + 2], &[1, 2], "state active, kind 2 (recovery)");
        assert_eq!(get_u16(&buf, s + 2), 0, "source 0: none");
        assert_eq!(
            get_u16(&buf, s + 4),
            32,
            "binding = 32-byte encapsulated key"
        );
        assert_eq!(get_u16(&buf, s + 6), 96 + 16, "wrapped = key + 16-byte tag");
        assert_eq!(get_u64(&buf, s + 8), 1_700_000_002);
        assert_eq!(&buf[s + 16..s + 48], &[0xD1; 32], "recipient key hash");
        assert!(
            buf[s + 48..s + 96].iter().all(|&b| b == 0),
            "salt, nonce, reserved"
        );
        assert_eq!(&buf[s + 96..s + 128], &[0xE2; 32]);
        assert!(buf[s + 128..s + 224].iter().all(|&b| b == 0));
        assert_eq!(&buf[s + 224..s + 336], &[0xC3; 112][..]);
        let slot = h.keyslots[5].as_ref().unwrap();
        assert_eq!(slot.source(), None);
        assert_eq!(
            h.keyslots[0].as_ref().unwrap().source(),
            Some(SourceKind::Sim)
        );
    }

    #[test]
    fn transfer_slot_round_trips_with_the_documented_layout_and_strict_fields() {
        let mut h = sample();
        let mut slot = recovery_slot(h.profile.key_len());
        slot.kind = SlotKind::Transfer;
        slot.salt = [0x5A; SALT_LEN];
        h.keyslots[2] = Some(slot);
        let buf = h.encode();
        assert_eq!(Header::decode(&buf).unwrap(), h);
        let s = SLOTS_START + 2 * SLOT_LEN;
        assert_eq!(&buf[s..s + 2], &[1, 3], "state active, kind 3 (transfer)");
        assert_eq!(get_u16(&buf, s + 2), 0, "source 0: none");
        assert_eq!(get_u16(&buf, s + 4), 32, "binding = encapsulated key");
        assert_eq!(&buf[s + 48..s + 80], &[0x5A; 32], "salt = request nonce");
        assert!(
            buf[s + 80..s + 96].iter().all(|&b| b == 0),
            "nonce, reserved"
        );
        assert_eq!(h.keyslots[2].as_ref().unwrap().source(), None);
        let mutated = |at: usize, value: u8| {
            let mut b = buf;
            b[s + at] = value;
            reseal_checksum(&mut b);
            match Header::decode(&b) {
                Err(HeaderError::Invalid { field, .. }) => field,
                other => panic!("expected an invalid field, got {other:?}"),
            }
        };
        assert_eq!(mutated(2, 1), "keyslot.source");
        assert_eq!(mutated(4, 31), "keyslot.binding_len");
        assert_eq!(mutated(80, 1), "keyslot.nonce (transfer)");
        assert_eq!(mutated(91, 1), "keyslot.nonce (transfer)");
    }

    #[test]
    fn rejects_bad_recovery_slots() {
        let field = |r: Result<Header, HeaderError>| match r {
            Err(HeaderError::Invalid { field, .. }) => field,
            other => panic!("expected an invalid field, got {other:?}"),
        };
        // A source in a recovery slot.
        assert_eq!(field(mutated_recovery(2, 1)), "keyslot.source");
        // Binding length other than 32 (shorter and longer).
        assert_eq!(field(mutated_recovery(4, 31)), "keyslot.binding_len");
        assert_eq!(field(mutated_recovery(4, 33)), "keyslot.binding_len");
        assert_eq!(field(mutated_recovery(4, 0)), "keyslot.binding_len");
        // Salt or nonce set.
        assert_eq!(
            field(mutated_recovery(48, 1)),
            "keyslot.salt/nonce (recovery)"
        );
        assert_eq!(
            field(mutated_recovery(91, 1)),
            "keyslot.salt/nonce (recovery)"
        );
        // A wrapped length that does not fit the profile's key.
        assert_eq!(field(mutated_recovery(6, 80)), "keyslot.wrapped_len");
        // Unknown kinds are still refused (a reader that predates a kind refuses the header).
        assert_eq!(field(mutated_recovery(1, 4)), "keyslot.kind");
        assert_eq!(field(mutated_recovery(1, 0)), "keyslot.kind");
        // A sealed slot relabelled as recovery keeps its source and salt: refused.
        let mut buf = sample().encode();
        buf[SLOTS_START + 1] = 2;
        reseal_checksum(&mut buf);
        assert_eq!(field(Header::decode(&buf)), "keyslot.source");
    }

    #[test]
    fn aad_covers_the_slot_kind() {
        let h = with_recovery();
        let slot = h.keyslots[5].clone().unwrap();
        let mut as_sealed = slot.clone();
        as_sealed.kind = SlotKind::Sealed(SourceKind::Sim);
        assert_ne!(h.keyslot_aad(&slot), h.keyslot_aad(&as_sealed));
    }

    fn region(a: Option<&Header>, b: Option<&Header>) -> Vec<u8> {
        let mut out = vec![0u8; 2 * HEADER_SIZE];
        if let Some(a) = a {
            out[..HEADER_SIZE].copy_from_slice(&a.encode());
        }
        if let Some(b) = b {
            out[HEADER_SIZE..].copy_from_slice(&b.encode());
        }
        out
    }

    #[test]
    fn select_prefers_highest_valid_seqno() {
        let a = sample();
        let mut b = sample();
        b.seqno = 2;
        let active = select(&region(Some(&a), Some(&b))).unwrap();
        assert_eq!(
            (active.copy, active.header.seqno, active.inactive_copy()),
            (1, 2, 0)
        );
        let active = select(&region(Some(&b), Some(&a))).unwrap();
        assert_eq!((active.copy, active.header.seqno), (0, 2));
    }

    #[test]
    fn select_survives_a_torn_copy() {
        let a = sample();
        let mut b = sample();
        b.seqno = 2;
        let mut torn = region(Some(&a), Some(&b));
        // The newer copy was being written when power failed: its second half is still zeros.
        torn[HEADER_SIZE + 2048..].fill(0);
        let active = select(&torn).unwrap();
        assert_eq!((active.copy, active.header.seqno), (0, 1));
        assert_eq!(active.other_copy_error, Some(HeaderError::Checksum));
    }

    #[test]
    fn select_reports_missing_or_damaged_headers() {
        assert_eq!(select(&region(None, None)), Err(HeaderError::NotSealcsi));
        let mut damaged = region(Some(&sample()), None);
        damaged[50] ^= 1;
        assert_eq!(select(&damaged), Err(HeaderError::Checksum));
        assert!(has_magic(&damaged));
        assert!(!has_magic(&region(None, None)));
        assert_eq!(select(&[0u8; 10]), Err(HeaderError::Size(10)));
    }

    /// The seeds are written by fuzz/make-seeds.py from docs/format.md alone: decoding them checks that
    /// the document describes the format this code reads.
    #[test]
    fn decodes_headers_written_from_the_document() {
        let aead = Header::decode(include_bytes!(
            "../fuzz/seeds/header/aead-journal-2slots.bin"
        ))
        .unwrap();
        assert_eq!(
            aead.profile,
            Profile::AeadHmacSha256 {
                journal: Journal::Journal
            }
        );
        assert_eq!(
            (aead.fs, aead.seqno, aead.created),
            (FsKind::Ext4, 1, 1_700_000_000)
        );
        assert_eq!(aead.uuid, core::array::from_fn(|i| i as u8));
        let slots: Vec<_> = aead.active_slots().map(|(i, s)| (i, s.kind)).collect();
        assert_eq!(
            slots,
            vec![
                (0, SlotKind::Sealed(SourceKind::Sim)),
                (3, SlotKind::Sealed(SourceKind::Tpm))
            ]
        );
        let slot = aead.keyslots[0].as_ref().unwrap();
        assert_eq!(
            (slot.binding.as_slice(), slot.wrapped.len()),
            (&[1u8, 2, 3][..], 112)
        );
        assert_eq!(
            (slot.identity_digest, slot.salt, slot.nonce),
            ([0x11; 32], [0x22; 32], [0x33; 12])
        );

        let xts =
            Header::decode(include_bytes!("../fuzz/seeds/header/xts-only-1slot.bin")).unwrap();
        assert_eq!(
            (xts.profile, xts.fs, xts.seqno),
            (Profile::XtsOnly, FsKind::Xfs, 7)
        );
        assert_eq!(
            xts.keyslots[1].as_ref().unwrap().source(),
            Some(SourceKind::Snp)
        );

        let recovery = Header::decode(include_bytes!(
            "../fuzz/seeds/header/aead-recovery-slot.bin"
        ))
        .unwrap();
        let slot = recovery.keyslots[5].as_ref().unwrap();
        assert_eq!(slot.kind, SlotKind::Recovery);
        assert_eq!(
            (slot.binding.as_slice(), slot.wrapped.len()),
            (&[0x55u8; 32][..], 112)
        );
        assert_eq!(recovery.active_slots().count(), 3);

        let active = select(include_bytes!("../fuzz/seeds/header/region-two-copies.bin")).unwrap();
        assert_eq!((active.copy, active.header.seqno), (1, 2));
        assert_eq!(
            active.header.profile,
            Profile::AeadHmacSha256 {
                journal: Journal::Direct
            }
        );
    }

    fn arb_sealed_slot(key_len: usize) -> impl Strategy<Value = Keyslot> {
        (
            prop_oneof![
                Just(SourceKind::Sim),
                Just(SourceKind::Snp),
                Just(SourceKind::Tpm),
                Just(SourceKind::Kbs)
            ],
            any::<u64>(),
            any::<[u8; 32]>(),
            any::<[u8; 32]>(),
            any::<[u8; 12]>(),
            proptest::collection::vec(any::<u8>(), 0..=MAX_BINDING_LEN),
            proptest::collection::vec(any::<u8>(), key_len + WRAP_TAG_LEN),
        )
            .prop_map(
                |(source, created, identity_digest, salt, nonce, binding, wrapped)| Keyslot {
                    kind: SlotKind::Sealed(source),
                    created,
                    identity_digest,
                    salt,
                    nonce,
                    binding,
                    wrapped,
                },
            )
    }

    fn arb_recovery_slot(key_len: usize) -> impl Strategy<Value = Keyslot> {
        (
            any::<u64>(),
            any::<[u8; 32]>(),
            any::<[u8; RECOVERY_ENC_LEN]>(),
            proptest::collection::vec(any::<u8>(), key_len + WRAP_TAG_LEN),
        )
            .prop_map(|(created, identity_digest, enc, wrapped)| Keyslot {
                kind: SlotKind::Recovery,
                created,
                identity_digest,
                salt: [0; SALT_LEN],
                nonce: [0; NONCE_LEN],
                binding: enc.to_vec(),
                wrapped,
            })
    }

    fn arb_transfer_slot(key_len: usize) -> impl Strategy<Value = Keyslot> {
        (
            any::<u64>(),
            any::<[u8; 32]>(),
            any::<[u8; 32]>(),
            any::<[u8; RECOVERY_ENC_LEN]>(),
            proptest::collection::vec(any::<u8>(), key_len + WRAP_TAG_LEN),
        )
            .prop_map(|(created, identity_digest, salt, enc, wrapped)| Keyslot {
                kind: SlotKind::Transfer,
                created,
                identity_digest,
                salt,
                nonce: [0; NONCE_LEN],
                binding: enc.to_vec(),
                wrapped,
            })
    }

    fn arb_slot(key_len: usize) -> impl Strategy<Value = Keyslot> {
        prop_oneof![
            3 => arb_sealed_slot(key_len),
            1 => arb_recovery_slot(key_len),
            1 => arb_transfer_slot(key_len),
        ]
    }

    fn arb_header() -> impl Strategy<Value = Header> {
        let profile = prop_oneof![
            Just(Profile::XtsOnly),
            Just(Profile::AeadHmacSha256 {
                journal: Journal::Journal
            }),
            Just(Profile::AeadHmacSha256 {
                journal: Journal::Direct
            }),
        ];
        let fs = prop_oneof![Just(FsKind::None), Just(FsKind::Ext4), Just(FsKind::Xfs)];
        (profile, fs, any::<u64>(), any::<[u8; 16]>(), any::<u64>()).prop_flat_map(
            |(profile, fs, seqno, uuid, created)| {
                proptest::collection::vec(
                    proptest::option::of(arb_slot(profile.key_len())),
                    KEYSLOTS,
                )
                .prop_map(move |slots| {
                    let mut h = Header::new(uuid, profile, fs, created);
                    h.seqno = seqno;
                    for (i, s) in slots.into_iter().enumerate() {
                        h.keyslots[i] = s;
                    }
                    h
                })
            },
        )
    }

    proptest! {
        #[test]
        fn prop_round_trip(h in arb_header()) {
            prop_assert_eq!(Header::decode(&h.encode()).unwrap(), h);
        }

        #[test]
        fn prop_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2 * HEADER_SIZE + 8)) {
            let _ = Header::decode(&bytes);
            let _ = select(&bytes);
        }

        /// Arbitrary edits with a fixed-up checksum (what a hostile host can do) either fail to decode or
        /// decode to a header that re-encodes to exactly the edited bytes: nothing is silently normalised.
        #[test]
        fn prop_edits_are_rejected_or_exact(h in arb_header(), at in 0usize..CHECKSUM_AT, v in any::<u8>()) {
            let mut buf = h.encode();
            buf[at] = v;
            reseal_checksum(&mut buf);
            if let Ok(decoded) = Header::decode(&buf) {
                prop_assert_eq!(decoded.encode(), buf);
            }
        }
    }
}
