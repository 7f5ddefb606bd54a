//! What a device holds before sealcsi formats it: format refuses a device in use, or one holding a
//! sealcsi header, a dm-integrity superblock, or anything else recognisable, unless forced.

use std::path::Path;
use std::process::{Command, Stdio};

use super::VolumeError;
use super::header_io::{REGION_BYTES, read_bytes};
use crate::devio;
use crate::header::{self, DATA_OFFSET};

fn io_error(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> VolumeError {
    let context = context.into();
    move |source| VolumeError::Io { context, source }
}

/// A device that is mounted or held by device-mapper cannot be opened exclusively.
pub fn ensure_not_in_use(device: &Path) -> Result<(), VolumeError> {
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
pub fn refuse_existing_content(device: &Path) -> Result<(), VolumeError> {
    let refused = |found: String| VolumeError::Refused {
        device: device.display().to_string(),
        found,
    };
    let head = read_bytes(device, 0, DATA_OFFSET as usize + devio::ALIGN)
        .map_err(io_error(format!("reading {}", device.display())))?;
    if header::has_magic(&head) {
        let what = match header::select(&head[..REGION_BYTES]) {
            Ok(active) => format!("sealcsi volume {}", active.header.uuid_string()),
            Err(e) => format!("a sealcsi header ({e})"),
        };
        return Err(refused(what));
    }
    if header::is_unfinished_format(&head) {
        // Ours, and never a volume: what lies past the header region (a dm-integrity superblock, say)
        // is this unfinished format's own, not someone's data.
        tracing::info!(device = %device.display(), "finishing an interrupted sealcsi format");
        return Ok(());
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
