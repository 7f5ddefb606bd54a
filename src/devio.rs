//! Direct (O_DIRECT) I/O on block devices.
//!
//! Everything sealcsi reads or writes on a backing device bypasses the page cache: the device-mapper stack
//! reads and writes the same device below the cache, so a buffered read could return stale bytes (an old
//! header, or the integrity superblock from before the kernel formatted it).

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::Instant;

/// Alignment and granularity of every direct I/O: the largest logical block size we support.
pub const ALIGN: usize = 4096;

/// A heap buffer aligned for O_DIRECT.
pub struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes (`len` a non-zero multiple of [`ALIGN`]).
    pub fn zeroed(len: usize) -> Self {
        assert!(
            len > 0 && len.is_multiple_of(ALIGN),
            "direct I/O buffers are whole 4 KiB blocks"
        );
        let layout = Layout::from_size_align(len, ALIGN).expect("valid layout");
        // SAFETY: the layout has a non-zero size; a null return is handled below.
        let raw = unsafe { alloc_zeroed(layout) };
        let ptr =
            std::ptr::NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        Self { ptr, len }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr points to `len` initialised bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr points to `len` initialised bytes owned exclusively by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // Buffers may have held plaintext headers or data: clear before freeing.
        zeroize::Zeroize::zeroize(&mut **self);
        let layout = Layout::from_size_align(self.len, ALIGN).expect("valid layout");
        // SAFETY: allocated in `zeroed` with this exact layout.
        unsafe { dealloc(self.ptr.as_ptr(), layout) }
    }
}

fn open_direct(path: &Path, write: bool) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc_o_direct())
        .open(path)
}

const fn libc_o_direct() -> i32 {
    nix::fcntl::OFlag::O_DIRECT.bits()
}

fn check_aligned(offset: u64, len: usize) -> io::Result<()> {
    if !offset.is_multiple_of(ALIGN as u64) || !len.is_multiple_of(ALIGN) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("direct I/O at {offset}+{len} is not 4 KiB aligned"),
        ));
    }
    Ok(())
}

/// Reads `len` bytes at `offset` with O_DIRECT.
pub fn read_at(path: &Path, offset: u64, len: usize) -> io::Result<AlignedBuf> {
    check_aligned(offset, len)?;
    let file = open_direct(path, false)?;
    let mut buf = AlignedBuf::zeroed(len);
    file.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}

/// Writes `data` at `offset` with O_DIRECT and flushes the device's write cache before returning.
pub fn write_at(path: &Path, offset: u64, data: &[u8]) -> io::Result<()> {
    check_aligned(offset, data.len())?;
    let file = open_direct(path, true)?;
    let mut buf = AlignedBuf::zeroed(data.len());
    buf.copy_from_slice(data);
    file.write_all_at(&buf, offset)?;
    file.sync_all()
}

/// Writes zeros over `[offset, offset + len)` in large direct writes, then flushes.
/// `progress` is called with (bytes done, total) about once a second.
pub fn zero_range(
    path: &Path,
    offset: u64,
    len: u64,
    mut progress: impl FnMut(u64, u64),
) -> io::Result<()> {
    const CHUNK: usize = 4 << 20;
    check_aligned(offset, 0)?;
    check_aligned(len, 0)?;
    let file = open_direct(path, true)?;
    let zeros = AlignedBuf::zeroed(CHUNK);
    let mut done = 0u64;
    let mut last_report = Instant::now();
    while done < len {
        let n = (len - done).min(CHUNK as u64) as usize;
        file.write_all_at(&zeros[..n], offset + done)?;
        done += n as u64;
        if last_report.elapsed().as_secs() >= 1 {
            progress(done, len);
            last_report = Instant::now();
        }
    }
    progress(done, len);
    file.sync_all()
}

/// Size in bytes of a block device or regular file (seek to end works for both).
pub fn size_of(path: &Path) -> io::Result<u64> {
    use std::io::Seek;
    let mut file = File::open(path)?;
    file.seek(io::SeekFrom::End(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    // tmpfs refuses O_DIRECT, so these tests use a directory in the source tree (a disk filesystem).
    fn scratch() -> tempfile::TempDir {
        tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap()
    }

    #[test]
    fn write_then_read_back() {
        let dir = scratch();
        let path = dir.path().join("dev");
        std::fs::write(&path, vec![0xEE; 64 * 1024]).unwrap();
        let data = vec![0x42; 8192];
        write_at(&path, 4096, &data).unwrap();
        let back = read_at(&path, 0, 16384).unwrap();
        assert!(back[..4096].iter().all(|&b| b == 0xEE));
        assert_eq!(&back[4096..12288], &data[..]);
        assert!(back[12288..].iter().all(|&b| b == 0xEE));
        assert_eq!(size_of(&path).unwrap(), 64 * 1024);
    }

    #[test]
    fn zero_range_zeroes_exactly_the_range() {
        let dir = scratch();
        let path = dir.path().join("dev");
        std::fs::write(&path, vec![0xEE; 10 << 20]).unwrap();
        let mut calls = 0;
        zero_range(&path, 4096, (9 << 20) - 4096, |done, total| {
            calls += 1;
            assert!(done <= total);
        })
        .unwrap();
        assert!(calls >= 1);
        let all = std::fs::read(&path).unwrap();
        assert!(all[..4096].iter().all(|&b| b == 0xEE));
        assert!(all[4096..9 << 20].iter().all(|&b| b == 0));
        assert!(all[9 << 20..].iter().all(|&b| b == 0xEE));
    }

    #[test]
    fn misaligned_io_is_refused() {
        let dir = scratch();
        let path = dir.path().join("dev");
        std::fs::write(&path, vec![0; 8192]).unwrap();
        assert_eq!(
            read_at(&path, 1, 4096).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        assert_eq!(
            write_at(&path, 0, &[0; 100]).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
    }
}
