//! Keeping key material off the disk: no core dumps, and key buffers that are neither dumped nor (where
//! the memlock limit allows) swapped.
//!
//! The threat model's host owns the disk and reads swap and crash dumps. Two measures:
//!
//! - [`harden_process`], first thing in `main` (CLI and plugin): `PR_SET_DUMPABLE 0` (no core dump, no
//!   ptrace attach or /proc/<pid>/mem by other non-root processes of the same user) and
//!   `RLIMIT_CORE 0` (no core file even if something makes the process dumpable again, e.g. an
//!   execve; the limit is inherited by children such as mkfs).
//! - [`SecretBuf`], the storage of `keys::{VolumeKey, Kek, SealingSecret}`: its own page-aligned
//!   anonymous mapping, `MADV_DONTDUMP` (left out of any core dump), `MADV_WIPEONFORK` (a forked child
//!   sees zeros), `mlock` (never written to swap) when RLIMIT_MEMLOCK allows, zeroed before unmapping.
//!
//! Limits, honestly: `mlock` is best effort: a container with a tiny RLIMIT_MEMLOCK and without
//! CAP_IPC_LOCK gets unlocked pages ([`SecretBuf::is_locked`] says which; the DONTDUMP and wipe-on-fork
//! still apply). Only the bytes in a `SecretBuf` are covered: transient copies elsewhere are not,
//! namely the sealing sources' own buffers (TPM response structures, the SNP derived-key ioctl reply),
//! the stack frames of HKDF and the ciphers (their key schedules are zeroized on drop through the
//! crates' `zeroize` features, but moves of small arrays may leave stack residue), and the kernel's
//! copies (the keyring payload, dm-crypt's key). A hibernation image of the whole VM, or the host
//! reading guest memory on a non-confidential VM, is outside what a process can prevent.
#![deny(clippy::undocumented_unsafe_blocks)]

use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::libc;

#[derive(Debug, thiserror::Error)]
pub enum HardeningError {
    #[error("prctl(PR_SET_DUMPABLE, 0) failed: {0}")]
    Dumpable(#[source] std::io::Error),
    #[error("setrlimit(RLIMIT_CORE, 0) failed: {0}")]
    CoreLimit(#[source] std::io::Error),
    /// The anonymous mapping for a secret could not be made (out of memory or address space).
    #[error("cannot map {len} bytes for key material: {source}")]
    Map {
        len: usize,
        #[source]
        source: std::io::Error,
    },
}

/// Makes the process non-dumpable and sets its core-file size limit (soft and hard) to 0. Call first
/// thing in `main`, before any key is read and before threads are spawned.
pub fn harden_process() -> Result<(), HardeningError> {
    let no_core = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads the `rlimit` struct we pass (valid for the call) and writes nothing.
    let r = unsafe { libc::setrlimit(libc::RLIMIT_CORE, &no_core) };
    if r != 0 {
        return Err(HardeningError::CoreLimit(std::io::Error::last_os_error()));
    }
    nix::sys::prctl::set_dumpable(false).map_err(|e| HardeningError::Dumpable(e.into()))?;
    Ok(())
}

/// Whether the process is non-dumpable and may write no core file (what [`harden_process`] sets).
pub fn is_hardened() -> bool {
    let mut limit = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: getrlimit writes one `rlimit` into the struct we own, valid for the call.
    let r = unsafe { libc::getrlimit(libc::RLIMIT_CORE, &mut limit) };
    r == 0 && limit.rlim_cur == 0 && nix::sys::prctl::get_dumpable().is_ok_and(|d| !d)
}

/// Whether an `mlock` of a secret has failed (warned about once per process).
static LOCK_FAILED: AtomicBool = AtomicBool::new(false);

fn page_size() -> usize {
    // SAFETY: sysconf takes an integer and reads no memory.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(p).ok().filter(|&p| p > 0).unwrap_or(4096)
}

/// A fixed-length buffer for key material in its own anonymous mapping (see the module comment):
/// excluded from core dumps, wiped in forked children, locked against swap where allowed, zeroed on
/// drop. Derefs to `[u8]`; never printed.
pub struct SecretBuf {
    ptr: NonNull<u8>,
    len: usize,
    map_len: usize,
    locked: bool,
}

// SAFETY: SecretBuf owns its mapping exclusively (like a Box<[u8]>); shared access is only through
// &self (reads), mutation through &mut self.
unsafe impl Send for SecretBuf {}
// SAFETY: as above: &SecretBuf gives only shared reads of the bytes.
unsafe impl Sync for SecretBuf {}

impl SecretBuf {
    /// `len` zero bytes.
    pub fn zeroed(len: usize) -> Result<Self, HardeningError> {
        let page = page_size();
        // At least one page, so that even an empty key has a valid, page-aligned mapping of its own.
        let map_len = len.max(1).div_ceil(page) * page;
        // SAFETY: an anonymous private mapping at an address of the kernel's choosing: no existing
        // memory is affected; the result is checked against MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(HardeningError::Map {
                len,
                source: std::io::Error::last_os_error(),
            });
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| HardeningError::Map {
            len,
            source: std::io::Error::other("mmap returned NULL"),
        })?;
        // SAFETY: [p, p + map_len) is the mapping just made and owned by us; madvise changes only how
        // the kernel treats those pages (dump, fork) and reads no memory. Failures are tolerated: the
        // advice is hardening, not correctness (MADV_WIPEONFORK needs Linux 4.14).
        unsafe {
            libc::madvise(p, map_len, libc::MADV_DONTDUMP);
            libc::madvise(p, map_len, libc::MADV_WIPEONFORK);
        }
        // SAFETY: as above; mlock pins our own mapping's pages. It fails (EPERM/ENOMEM) past
        // RLIMIT_MEMLOCK without CAP_IPC_LOCK: then the pages stay swappable, which is recorded.
        let locked = unsafe { libc::mlock(p, map_len) } == 0;
        if !locked && !LOCK_FAILED.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                error = %std::io::Error::last_os_error(),
                "cannot lock key material in memory (RLIMIT_MEMLOCK); it may be swapped out, though \
                 never dumped"
            );
        }
        Ok(Self {
            ptr,
            len,
            map_len,
            locked,
        })
    }

    /// A copy of `bytes` (the caller zeroizes its own copy).
    pub fn copy_from(bytes: &[u8]) -> Result<Self, HardeningError> {
        let mut buf = Self::zeroed(bytes.len())?;
        buf.copy_from_slice(bytes);
        Ok(buf)
    }

    /// Whether the pages are locked in memory (cannot be swapped out).
    pub fn is_locked(&self) -> bool {
        self.locked
    }

    /// Whether the pages are excluded from core dumps (`VmFlags: dd` in /proc/self/smaps). Reads
    /// /proc; for tests and diagnostics.
    pub fn is_excluded_from_dumps(&self) -> bool {
        let start = self.ptr.as_ptr() as usize;
        let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
            return false;
        };
        let mut in_ours = false;
        for line in smaps.lines() {
            // A mapping's header line starts with `lo-hi ` in hex; its VmFlags line comes later.
            let range = line
                .split(' ')
                .next()
                .and_then(|r| r.split_once('-'))
                .and_then(|(lo, hi)| {
                    Some((
                        usize::from_str_radix(lo, 16).ok()?,
                        usize::from_str_radix(hi, 16).ok()?,
                    ))
                });
            if let Some((lo, hi)) = range {
                in_ours = lo <= start && start < hi;
            } else if in_ours && let Some(flags) = line.strip_prefix("VmFlags:") {
                return flags.split_whitespace().any(|f| f == "dd");
            }
        }
        false
    }
}

impl std::ops::Deref for SecretBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr points to our mapping of map_len >= len bytes, initialised (zero-filled by
        // mmap, then only written through &mut), alive until drop; &self prevents concurrent mutation.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for SecretBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, and &mut self makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for SecretBuf {
    fn drop(&mut self) {
        // Volatile zeroing (not optimised away) of the whole mapping before it goes back to the kernel.
        zeroize::Zeroize::zeroize(&mut **self);
        // SAFETY: the mapping is ours, made in `zeroed` with map_len, and no reference into it outlives
        // `self`; munlock on unlocked pages is harmless.
        unsafe {
            if self.locked {
                libc::munlock(self.ptr.as_ptr().cast(), self.map_len);
            }
            libc::munmap(self.ptr.as_ptr().cast(), self.map_len);
        }
    }
}

impl std::fmt::Debug for SecretBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretBuf(<{} bytes redacted>)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_buffers_are_page_aligned_dontdump_and_zeroed() {
        let mut b = SecretBuf::copy_from(&[0xA5; 96]).unwrap();
        assert_eq!(b.len(), 96);
        assert!(b.iter().all(|&x| x == 0xA5));
        assert_eq!(b.ptr.as_ptr() as usize % page_size(), 0);
        b[0] = 1;
        assert_eq!(b[0], 1);
        assert!(
            b.is_excluded_from_dumps(),
            "MADV_DONTDUMP must show as `dd` in /proc/self/smaps"
        );
        // Locking depends on RLIMIT_MEMLOCK here; either way it is reported, and one 4 KiB page is
        // within every default limit (64 KiB or 8 MiB) unless the host set it to 0.
        let _ = b.is_locked();
        assert!(!format!("{b:?}").contains("165"));
        let empty = SecretBuf::zeroed(0).unwrap();
        assert!(empty.is_empty());
    }

    #[test]
    fn an_ordinary_heap_allocation_is_not_dontdump() {
        // The smaps check itself must be able to say no.
        let v = vec![0u8; 1 << 20];
        let fake = std::mem::ManuallyDrop::new(SecretBuf {
            ptr: NonNull::new(v.as_ptr() as *mut u8).unwrap(),
            len: v.len(),
            map_len: v.len(),
            locked: false,
        });
        assert!(!fake.is_excluded_from_dumps());
    }
}
