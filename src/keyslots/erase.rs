//! Crypto-erase: every keyslot destroyed in both header copies.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::KeyslotError;
use crate::header::{self, Header, HeaderError};
use crate::volume::header_io::{self, lock_device};
use crate::volume::{VolumeError, commit_everywhere};

/// What `erase` did.
#[derive(Debug, Clone, Serialize)]
pub struct EraseReport {
    pub device: PathBuf,
    /// Keyslots that held a wrapped key in the winning copy.
    pub slots_destroyed: usize,
    /// True when neither copy could be decoded and both were zeroed whole.
    pub zeroed_damaged_header: bool,
}

/// Crypto-erase: writes headers without keyslots over BOTH copies (each write flushed), so no copy holds
/// a wrapped volume key and the data can never be decrypted again. Needs no key. If neither copy
/// decodes but the sealcsi magic is there, both copies are zeroed whole. A device without a sealcsi
/// header is refused.
///
/// A host that copied the header earlier can put it back: erase protects against everyone who did not.
pub fn erase(device: &Path) -> Result<EraseReport, KeyslotError> {
    let _lock = lock_device(device)?;
    let region = header_io::read_region(device)?;
    let report = match header::select(&region) {
        Ok(active) => {
            let slots_destroyed = active.header.active_slots().count();
            let mut new = active.header.clone();
            new.keyslots = Default::default();
            commit_everywhere(device, &active, new)?;
            EraseReport {
                device: device.to_path_buf(),
                slots_destroyed,
                zeroed_damaged_header: false,
            }
        }
        Err(e) if header::has_magic(&region) => {
            tracing::warn!(error = %e, "no header copy decodes; zeroing both copies");
            header_io::zero_header_copies(device)?;
            EraseReport {
                device: device.to_path_buf(),
                slots_destroyed: 0,
                zeroed_damaged_header: true,
            }
        }
        Err(source) => {
            return Err(VolumeError::Header {
                device: device.display().to_string(),
                source,
            }
            .into());
        }
    };
    verify_erased(device)?;
    Ok(report)
}

/// Reads both copies back: each must be a valid header without keyslots, or all zero.
fn verify_erased(device: &Path) -> Result<(), KeyslotError> {
    let region = header_io::read_region(device)?;
    for copy in region.chunks(header::HEADER_SIZE) {
        let clean = match Header::decode(copy) {
            Ok(h) => h.active_slots().next().is_none(),
            Err(HeaderError::NotSealcsi) => copy.iter().all(|&b| b == 0),
            Err(_) => false,
        };
        if !clean {
            return Err(VolumeError::Io {
                context: format!("verifying the erase of {}", device.display()),
                source: std::io::Error::other("a header copy still holds keyslots"),
            }
            .into());
        }
    }
    Ok(())
}
