//! `volume inspect`: a volume's public facts, readable without any key.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::VolumeError;
use super::header_io::{read_header, read_integrity_superblock};
use crate::backend::BlockDevice;
use crate::header::{self, FsKind, Profile, SlotKind};

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
                    SlotKind::Transfer => "transfer",
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
