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
// SAFETY: a shared AlignedBuf gives only `&[u8]` (no interior mutability), like a shared Vec<u8>.
unsafe impl Sync for AlignedBuf {}

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
    progress: impl FnMut(u64, u64),
) -> io::Result<()> {
    let zeros = ZeroWriter::open(path)?;
    zeros.zero(offset, len, progress)?;
    zeros.finish()
}

/// Zeros written over several ranges of one device with one open and ONE flush at the end
/// ([`ZeroWriter::finish`]): a flush goes down the whole stack to the backing store (measured in the
/// guest: tens of milliseconds each), and a fast initialization writes a dozen ranges or more.
/// Each write has completed when [`ZeroWriter::zero`] returns, so later reads see it; only its
/// durability waits for the flush.
pub struct ZeroWriter {
    file: File,
    zeros: AlignedBuf,
}

impl ZeroWriter {
    /// Bytes per write.
    const CHUNK: usize = 4 << 20;
    /// Writes in flight at once over a long range (one thread each, sharing the zeros): while one
    /// write waits for the device, another's crypto can run (docs/benchmarks.md, "Full init").
    const IN_FLIGHT: usize = 4;

    pub fn open(path: &Path) -> io::Result<Self> {
        Ok(Self {
            file: open_direct(path, true)?,
            zeros: AlignedBuf::zeroed(Self::CHUNK),
        })
    }

    /// Zeros `[offset, offset + len)`; `progress` gets (bytes done, `len`) about once a second.
    pub fn zero(
        &self,
        offset: u64,
        len: u64,
        mut progress: impl FnMut(u64, u64),
    ) -> io::Result<()> {
        check_aligned(offset, 0)?;
        check_aligned(len, 0)?;
        let range = Chunks::new(offset, len);
        let helpers = (range.count as usize).clamp(1, Self::IN_FLIGHT) - 1;
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..helpers)
                .map(|_| {
                    scope.spawn(|| {
                        while self.write_next(&range)? {}
                        Ok(())
                    })
                })
                .collect();
            // This thread writes too, and reports progress between its own writes.
            let mut last_report = Instant::now();
            let mine = loop {
                match self.write_next(&range) {
                    Ok(true) => {}
                    other => break other.map(drop),
                }
                if last_report.elapsed().as_secs() >= 1 {
                    progress(range.done(), len);
                    last_report = Instant::now();
                }
            };
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(io::Error::other("a zeroing thread panicked")))
                })
                .fold(mine, |acc, r| acc.and(r))
        })?;
        progress(range.done(), len);
        Ok(())
    }

    /// Writes the next chunk of `range` not yet taken; `false` when none is left (or a write of
    /// another thread failed: it reports its own error).
    fn write_next(&self, range: &Chunks) -> io::Result<bool> {
        let Some((at, n)) = range.take() else {
            return Ok(false);
        };
        if let Err(e) = self.file.write_all_at(&self.zeros[..n], at) {
            range.fail();
            return Err(e);
        }
        range.finished(n);
        Ok(true)
    }

    /// Flushes everything written to stable storage.
    pub fn finish(self) -> io::Result<()> {
        self.file.sync_all()
    }
}

/// The chunks of one range, handed out to the threads that zero it.
struct Chunks {
    offset: u64,
    len: u64,
    count: u64,
    next: std::sync::atomic::AtomicU64,
    done: std::sync::atomic::AtomicU64,
    failed: std::sync::atomic::AtomicBool,
}

impl Chunks {
    fn new(offset: u64, len: u64) -> Self {
        Self {
            offset,
            len,
            count: len.div_ceil(ZeroWriter::CHUNK as u64),
            next: 0.into(),
            done: 0.into(),
            failed: false.into(),
        }
    }

    /// The next chunk's device offset and length, unless all are taken or a write failed.
    fn take(&self) -> Option<(u64, usize)> {
        use std::sync::atomic::Ordering::Relaxed;
        if self.failed.load(Relaxed) {
            return None;
        }
        let i = self.next.fetch_add(1, Relaxed);
        if i >= self.count {
            return None;
        }
        let start = i * ZeroWriter::CHUNK as u64;
        let n = (self.len - start).min(ZeroWriter::CHUNK as u64) as usize;
        Some((self.offset + start, n))
    }

    fn finished(&self, n: usize) {
        self.done
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
    }

    fn fail(&self) {
        self.failed
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    fn done(&self) -> u64 {
        self.done.load(std::sync::atomic::Ordering::Relaxed)
    }
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
    fn zeros_in_flight_cover_every_chunk_of_several_ranges_once() {
        // More chunks than writes in flight, a partial last chunk, and two ranges on one writer.
        let dir = scratch();
        let path = dir.path().join("dev");
        let size = 40 << 20;
        std::fs::write(&path, vec![0xEE; size]).unwrap();
        let first = 4096..(4096 + (21 << 20) + 8192);
        let second = (30 << 20)..(38 << 20);
        let zeros = ZeroWriter::open(&path).unwrap();
        let mut last = 0;
        zeros
            .zero(
                first.start as u64,
                (first.end - first.start) as u64,
                |done, total| {
                    assert!(done <= total && done >= last);
                    last = done;
                },
            )
            .unwrap();
        assert_eq!(
            last,
            (first.end - first.start) as u64,
            "final progress is the whole range"
        );
        zeros
            .zero(
                second.start as u64,
                (second.end - second.start) as u64,
                |_, _| {},
            )
            .unwrap();
        zeros.finish().unwrap();
        let all = std::fs::read(&path).unwrap();
        for (i, &b) in all.iter().enumerate() {
            let want = if first.contains(&i) || second.contains(&i) {
                0
            } else {
                0xEE
            };
            assert_eq!(b, want, "byte {i}");
        }
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
