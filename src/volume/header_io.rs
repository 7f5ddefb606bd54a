//! Every read and write of a volume's header region: the one read, the one commit (atomic update), the
//! one crypto-erase primitive, and the per-device lock that serialises header changes.
//!
//! Reads and writes bypass the page cache where the device allows it (O_DIRECT: the device-mapper stack
//! works below the cache, so a buffered read could return stale bytes); on a filesystem that refuses
//! O_DIRECT (tmpfs holding a test's backing file) they fall back to ordinary I/O followed by a flush.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::VolumeError;
use super::stack::IntegritySuperblock;
use crate::devio;
use crate::header::{self, COPY_OFFSETS, DATA_OFFSET, HEADER_SIZE, Header};

/// Bytes of the header region: both header copies. A crypto-erase zeroes exactly these.
pub const REGION_BYTES: usize = 2 * HEADER_SIZE;

fn io_error(context: String) -> impl FnOnce(io::Error) -> VolumeError {
    move |source| VolumeError::Io { context, source }
}

/// O_DIRECT is refused by filesystems without direct I/O support (EINVAL at open).
fn direct_io_refused(e: &io::Error) -> bool {
    e.raw_os_error() == Some(nix::libc::EINVAL)
}

/// Reads `len` bytes at `offset` (both 4 KiB aligned), bypassing the page cache where possible.
pub fn read_bytes(path: &Path, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    match devio::read_at(path, offset, len) {
        Ok(buf) => Ok(buf.to_vec()),
        Err(e) if direct_io_refused(&e) => {
            let mut buf = vec![0u8; len];
            File::open(path)?.read_exact_at(&mut buf, offset)?;
            Ok(buf)
        }
        Err(e) => Err(e),
    }
}

/// Writes `data` at `offset` (both 4 KiB aligned) and flushes it to the device before returning.
fn write_bytes(path: &Path, offset: u64, data: &[u8]) -> io::Result<()> {
    match devio::write_at(path, offset, data) {
        Err(e) if direct_io_refused(&e) => {
            let f = OpenOptions::new().write(true).open(path)?;
            f.write_all_at(data, offset)?;
            f.sync_all()
        }
        other => other,
    }
}

/// Both header copies, as stored (nothing decoded).
pub fn read_region(device: &Path) -> Result<Vec<u8>, VolumeError> {
    read_bytes(device, 0, REGION_BYTES).map_err(io_error(format!(
        "reading the header region of {}",
        device.display()
    )))
}

/// Reads both header copies and picks the winner.
pub fn read_header(device: &Path) -> Result<header::Active, VolumeError> {
    let region = read_region(device)?;
    header::select(&region).map_err(|source| VolumeError::Header {
        device: device.display().to_string(),
        source,
    })
}

/// Writes `header` over both copies (a new volume's first header; format writes it last).
pub fn write_new_header(device: &Path, header: &Header) -> Result<(), VolumeError> {
    for (copy, offset) in COPY_OFFSETS.iter().enumerate() {
        write_bytes(device, *offset, &header.encode())
            .map_err(io_error(format!("writing header copy {copy}")))?;
    }
    Ok(())
}

/// Replaces the header atomically and reads it back: the new header (sequence number
/// `active.header.seqno + 1`) goes over the copy that did not win and is flushed; only then does it win.
/// A crash mid-write leaves a copy that fails its checksum, and the old header stays in charge.
pub fn commit(
    device: &Path,
    active: &header::Active,
    mut new: Header,
) -> Result<Header, VolumeError> {
    // The host chooses the stored sequence number: at the maximum no update could ever win.
    new.seqno = active
        .header
        .seqno
        .checked_add(1)
        .ok_or(VolumeError::SeqnoExhausted)?;
    let copy = active.inactive_copy();
    write_bytes(device, COPY_OFFSETS[copy], &new.encode())
        .map_err(io_error(format!("writing header copy {copy}")))?;
    let now = read_header(device)?;
    if now.header != new {
        return Err(VolumeError::Io {
            context: format!("verifying the header update of {}", device.display()),
            source: io::Error::other("the header read back is not the one written"),
        });
    }
    Ok(new)
}

/// Commits `new`, then writes the same content over the other copy as well, so that no copy keeps what
/// `new` removed. Each write is an ordinary [`commit`]: a crash between them leaves `new` in charge.
pub fn commit_everywhere(
    device: &Path,
    active: &header::Active,
    new: Header,
) -> Result<Header, VolumeError> {
    commit(device, active, new.clone())?;
    let now = read_header(device)?;
    commit(device, &now, new)
}

/// The crypto-erase primitive: zeroes both header copies (as much of them as the device holds) and
/// flushes. Without them the volume key is gone for good.
pub fn zero_header_copies(device: &Path) -> Result<(), VolumeError> {
    let context = format!("crypto-erasing {}", device.display());
    let len = devio::size_of(device).map_err(io_error(context.clone()))?;
    if len >= REGION_BYTES as u64 {
        return write_bytes(device, 0, &vec![0u8; REGION_BYTES]).map_err(io_error(context));
    }
    // A device shorter than the region (a truncated file) has no whole copy; zero what is there.
    let f = OpenOptions::new()
        .write(true)
        .open(device)
        .map_err(io_error(context.clone()))?;
    f.write_all_at(&vec![0u8; len as usize], 0)
        .and_then(|()| f.sync_all())
        .map_err(io_error(context))
}

/// The dm-integrity superblock at the data offset; `None` if there is none.
pub fn read_integrity_superblock(
    device: &Path,
) -> Result<Option<IntegritySuperblock>, VolumeError> {
    let buf = read_bytes(device, DATA_OFFSET, devio::ALIGN)
        .map_err(io_error(format!("reading {}", device.display())))?;
    match IntegritySuperblock::parse(&buf) {
        Ok(sb) => Ok(Some(sb)),
        Err(super::stack::MappingError::MissingIntegritySuperblock) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Holds an exclusive `flock` on the device for the length of one header change.
pub struct DeviceLock(#[allow(dead_code)] nix::fcntl::Flock<File>);

/// Serialises header changes of one device between processes.
pub fn lock_device(device: &Path) -> Result<DeviceLock, VolumeError> {
    let file = File::open(device).map_err(io_error(format!("opening {}", device.display())))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map(DeviceLock)
        .map_err(|(_, errno)| VolumeError::Io {
            context: format!("locking {}", device.display()),
            source: io::Error::from(errno),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::header::{FsKind, Journal, Profile};

    fn aead() -> Profile {
        Profile::AeadHmacSha256 {
            journal: Journal::Journal,
        }
    }

    fn device() -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let dev = dir.path().join("dev");
        std::fs::write(&dev, vec![0u8; 64 * 1024]).unwrap();
        (dir, dev)
    }

    #[test]
    fn header_updates_alternate_copies_and_survive_a_torn_write() {
        let (_dir, dev) = device();
        let mut header = Header::new([7; 16], aead(), FsKind::Ext4, 1);
        write_new_header(&dev, &header).unwrap();
        assert_eq!(read_header(&dev).unwrap().copy, 0);
        for expected_copy in [1, 0, 1] {
            let active = read_header(&dev).unwrap();
            header.fs = if header.fs == FsKind::Ext4 {
                FsKind::Xfs
            } else {
                FsKind::Ext4
            };
            let written = commit(&dev, &active, header.clone()).unwrap();
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
    fn a_header_at_the_last_sequence_number_is_refused_without_writing() {
        let (_dir, dev) = device();
        let mut header = Header::new([7; 16], aead(), FsKind::Ext4, 1);
        header.seqno = u64::MAX;
        write_new_header(&dev, &header).unwrap();
        let before = std::fs::read(&dev).unwrap();
        let active = read_header(&dev).unwrap();
        let err = commit(&dev, &active, header.clone()).unwrap_err();
        assert!(matches!(err, VolumeError::SeqnoExhausted), "{err:?}");
        assert_eq!(std::fs::read(&dev).unwrap(), before);
    }

    #[test]
    fn crypto_erase_zeroes_both_copies_and_nothing_else() {
        let (_dir, dev) = device();
        std::fs::write(&dev, vec![0xAB; REGION_BYTES + 4096]).unwrap();
        zero_header_copies(&dev).unwrap();
        let data = std::fs::read(&dev).unwrap();
        assert!(data[..REGION_BYTES].iter().all(|&b| b == 0));
        assert!(data[REGION_BYTES..].iter().all(|&b| b == 0xAB));
        // A file shorter than the region is zeroed whole, not grown.
        std::fs::write(&dev, vec![0xAB; 100]).unwrap();
        zero_header_copies(&dev).unwrap();
        assert_eq!(std::fs::read(&dev).unwrap(), vec![0u8; 100]);
    }

    #[test]
    fn reads_fall_back_where_direct_io_is_refused() {
        // /dev/shm is tmpfs on Linux: O_DIRECT opens fail there with EINVAL.
        let dir = tempfile::tempdir_in("/dev/shm").expect("a tmpfs at /dev/shm");
        let dev = dir.path().join("dev");
        std::fs::write(&dev, vec![0u8; 64 * 1024]).unwrap();
        let header = Header::new([9; 16], aead(), FsKind::Xfs, 1);
        write_new_header(&dev, &header).unwrap();
        assert_eq!(read_header(&dev).unwrap().header, header);
    }
}
