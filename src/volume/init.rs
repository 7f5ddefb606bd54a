//! Initializing a new volume: making every block the filesystem will read readable.
//!
//! On an AEAD integrity volume (dm-integrity without its own hash, under dm-crypt
//! `authenc(...)-random`) a block that was never written has no valid tag: reading it fails
//! (EILSEQ/EIO) and dm-crypt logs "INTEGRITY AEAD ERROR", the very line a tamper alarm watches.
//! [`InitMode::Full`] writes zeros over the whole device (time proportional to the size).
//! [`InitMode::Fast`] writes zeros only where something reads before anything writes, then
//! makes the filesystem; its cost does not grow with the size.
//!
//! # The fast recipe (measured in the guest kernel, Linux 6.1; see the guest_init tests)
//!
//! What must be pre-written, and why:
//!
//! * **The first [`FRONT`] bytes.** libblkid probes up to 4 MiB + 512 B from the start (mkfs's
//!   own existing-signature check, `mount` without `-t`, udev). ext4: mke2fs writes the 1 KiB
//!   primary superblock at byte 1024 and reads bytes 0..1024 of block 0; a partial write of a
//!   never-written block makes the page cache read it first.
//! * **The last [`BACK`] bytes.** libblkid probes up to 1.51 MiB before the end (RAID and ZFS
//!   labels live there).
//! * **ext4: the first block of every backup superblock group** (groups 1 and the powers of 3, 5
//!   and 7). mke2fs writes each 1 KiB backup superblock with a partial-block write, which reads
//!   the block first (measured: sector 262144 = block 32768 failed during mkfs without it).
//!   Logarithmic in the size (12 blocks at 64 GiB).
//! * **XFS: the first [`XFS_AG_HEAD`] bytes of every allocation group.** `xfs_repair` phase 1
//!   reads 128 KiB at each AG's superblock; mkfs writes the AG headers and btree roots (AG blocks
//!   0..8) but not the AG free list's reserved blocks or the free space after them (measured:
//!   AG block 9 of AG 1 failed, `xfs_repair -n` aborted "superblock read failed"). One per AG
//!   (4 AGs below 4 TiB).
//!
//! Everything else is written before it is read: mkfs writes its metadata with full-block
//! writes and zeroes the journal / log (fixed size, see [`super::mkfs`]); ext4 leaves inode tables
//! to the kernel's ext4lazyinit thread (the kernel and e2fsck never read inodes past a group's
//! `itable_unused`, and lazyinit zeroes with writes); uninitialized ext4 groups' bitmaps are
//! neither read by the kernel nor by e2fsprogs. The one remaining reader of never-written blocks
//! was the page-cache read-ahead of the tools' buffered reads, which [`super::mkfs`] turns off
//! while a tool runs.

use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracing::{debug, info};

use super::mkfs::{self as fstools, BLOCK_SIZE, EXT4_BLOCKS_PER_GROUP, FsError, XfsGeometry};
use crate::header::FsKind;

/// Pre-written at the start of the device.
pub const FRONT: u64 = 8 << 20;
/// Pre-written at the end of the device.
pub const BACK: u64 = 2 << 20;
/// Pre-written at the start of every XFS allocation group.
pub const XFS_AG_HEAD: u64 = 128 << 10;

/// How a new volume is initialized (the `init` option of the CLI and the StorageClass).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum InitMode {
    /// Pre-write what the filesystem reads before writing, then mkfs. Needs a filesystem.
    Fast,
    /// Zero the whole device, then mkfs (if any).
    Full,
}

/// What an initialization did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitReport {
    /// Bytes of zeros written before mkfs (the whole device for [`InitMode::Full`]).
    pub prewritten_bytes: u64,
    /// Time spent writing those zeros.
    pub wipe: Duration,
    /// Time spent in mkfs (zero when no filesystem was made).
    pub mkfs: Duration,
}

/// Errors from initializing a volume.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// Fast initialization relies on the filesystem's layout; a raw block volume has none.
    #[error(
        "fast initialization needs a filesystem (ext4 or xfs); use full initialization for raw block volumes"
    )]
    FastNeedsFilesystem,
    /// The size given is not usable (zero, or not whole 4 KiB blocks, or larger than the device).
    #[error("bad volume size {size} bytes for {device}: {reason}")]
    BadSize {
        device: PathBuf,
        size: u64,
        reason: String,
    },
    /// Writing zeros through the device failed.
    #[error("writing zeros to {device} at byte {offset} (+{len}): {source}")]
    Zero {
        device: PathBuf,
        offset: u64,
        len: u64,
        #[source]
        source: io::Error,
    },
    /// mke2fs would place a backup superblock where the plan does not pre-write (a different
    /// e2fsprogs than this recipe was measured with); nothing was written.
    #[error("mke2fs would write a backup superblock at block {block}, outside the pre-write plan")]
    PlanMismatch { block: u64 },
    /// Running a filesystem tool failed.
    #[error(transparent)]
    Fs(#[from] FsError),
}

/// The filesystem layout a plan is computed for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// ext4 as [`super::mkfs::mkfs_args`] makes it: 4 KiB blocks, 32768 blocks per group,
    /// sparse_super.
    Ext4,
    /// XFS with the allocation groups `mkfs.xfs -N` reports.
    Xfs(XfsGeometry),
}

/// Groups holding a backup superblock under sparse_super: 1 and the powers of 3, 5 and 7,
/// for a filesystem of `blocks` blocks. A superset when mke2fs drops a too-small last group
/// (one block more is written then; harmless).
pub fn ext4_backup_groups(blocks: u64) -> Vec<u64> {
    let groups = blocks.div_ceil(EXT4_BLOCKS_PER_GROUP);
    let mut out = Vec::new();
    for base in [3u64, 5, 7] {
        let mut g = 1u64;
        while g < groups {
            out.push(g);
            g = match g.checked_mul(base) {
                Some(n) => n,
                None => break,
            };
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// Sorts, clips to `[0, end)`, drops empty ranges and merges overlapping or touching ones.
fn coalesce(mut ranges: Vec<Range<u64>>, end: u64) -> Vec<Range<u64>> {
    for r in &mut ranges {
        r.start = r.start.min(end);
        r.end = r.end.min(end);
    }
    ranges.retain(|r| r.start < r.end);
    ranges.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// `ranges` minus `cut` (both sorted and disjoint).
fn subtract(ranges: &[Range<u64>], cut: &[Range<u64>]) -> Vec<Range<u64>> {
    let mut out = Vec::new();
    for r in ranges {
        let mut start = r.start;
        for c in cut.iter().filter(|c| c.start < r.end && c.end > r.start) {
            if c.start > start {
                out.push(start..c.start);
            }
            start = start.max(c.end);
        }
        if start < r.end {
            out.push(start..r.end);
        }
    }
    out
}

/// The byte ranges to zero before mkfs on a never-written AEAD volume of `size_bytes`
/// (sorted, disjoint, 4 KiB aligned, inside the device). See the module docs for each region.
pub fn fast_plan(layout: &Layout, size_bytes: u64) -> Vec<Range<u64>> {
    let end = size_bytes / BLOCK_SIZE * BLOCK_SIZE;
    let mut ranges = base_plan(size_bytes);
    match layout {
        Layout::Ext4 => {
            let blocks = end / BLOCK_SIZE;
            for g in ext4_backup_groups(blocks) {
                let start = g * EXT4_BLOCKS_PER_GROUP * BLOCK_SIZE;
                ranges.push(start..start + BLOCK_SIZE);
            }
        }
        Layout::Xfs(geo) => {
            let ag_bytes = geo.ag_blocks * geo.block_size;
            for ag in 1..geo.ag_count {
                let start = ag * ag_bytes;
                // AG starts are block aligned; the block size is a multiple of 4 KiB.
                ranges.push(start..start + XFS_AG_HEAD);
            }
        }
    }
    coalesce(ranges, end)
}

/// The layout-independent part of [`fast_plan`]: the first [`FRONT`] and last [`BACK`] bytes.
fn base_plan(size_bytes: u64) -> Vec<Range<u64>> {
    let end = size_bytes / BLOCK_SIZE * BLOCK_SIZE;
    coalesce(vec![0..FRONT, end.saturating_sub(BACK)..end], end)
}

/// [`fast_plan`] for the layout mkfs will make on `device` (asked with a dry run).
fn layout_plan(device: &Path, size_bytes: u64, fs: FsKind) -> Result<Vec<Range<u64>>, InitError> {
    let text = fstools::dry_run(fs, device, size_bytes, true)?;
    match fs {
        FsKind::Ext4 => {
            let backups = fstools::parse_ext4_backups(&text)?;
            // mke2fs may shrink the blocks per group of a small filesystem (to fit its inode tables:
            // seen at 132 MiB, backups at block 32728), so the blocks it reports are pre-written too.
            let mut ranges = fast_plan(&Layout::Ext4, size_bytes);
            ranges.extend(backups.iter().map(|b| {
                b.saturating_mul(BLOCK_SIZE)..b.saturating_add(1).saturating_mul(BLOCK_SIZE)
            }));
            let plan = coalesce(ranges, size_bytes / BLOCK_SIZE * BLOCK_SIZE);
            // Still refuses a backup the plan cannot cover (beyond the device).
            check_ext4_backups(&plan, &backups)?;
            Ok(plan)
        }
        FsKind::Xfs => Ok(fast_plan(
            &Layout::Xfs(fstools::parse_xfs_geometry(&text)?),
            size_bytes,
        )),
        FsKind::None => Err(InitError::FastNeedsFilesystem),
    }
}

/// Checks that every backup superblock mke2fs reports lies inside the plan.
fn check_ext4_backups(plan: &[Range<u64>], backups: &[u64]) -> Result<(), InitError> {
    for &block in backups {
        let at = block * BLOCK_SIZE;
        if !plan
            .iter()
            .any(|r| r.start <= at && at + BLOCK_SIZE <= r.end)
        {
            return Err(InitError::PlanMismatch { block });
        }
    }
    Ok(())
}

fn zero(
    zeros: &crate::devio::ZeroWriter,
    device: &Path,
    range: &Range<u64>,
    done_before: u64,
    total: u64,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), InitError> {
    let len = range.end - range.start;
    zeros
        .zero(range.start, len, |done, _| {
            progress(done_before + done, total)
        })
        .map_err(|source| zero_error(device, range.start, len, source))
}

fn zero_error(device: &Path, offset: u64, len: u64, source: io::Error) -> InitError {
    InitError::Zero {
        device: device.to_owned(),
        offset,
        len,
        source,
    }
}

/// Initializes a new volume.
///
/// `device` is the OPEN crypt device (e.g. /dev/mapper/x) of `size_bytes`; `integrity` false =
/// crypt-only (never-written blocks read as garbage, not errors: no pre-write needed). Fast
/// requires `fs != None`. Full: zero the whole device, then mkfs if `fs != None`. Fast: zero the
/// [`fast_plan`], then mkfs. Zeros are written through the device with O_DIRECT.
/// `progress` gets (bytes zeroed, bytes to zero).
pub fn initialize(
    device: &Path,
    size_bytes: u64,
    fs: FsKind,
    mode: InitMode,
    integrity: bool,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<InitReport, InitError> {
    let bad_size = |reason: &str| InitError::BadSize {
        device: device.to_owned(),
        size: size_bytes,
        reason: reason.to_owned(),
    };
    if mode == InitMode::Fast && fs == FsKind::None {
        return Err(InitError::FastNeedsFilesystem);
    }
    if size_bytes == 0 || !size_bytes.is_multiple_of(BLOCK_SIZE) {
        return Err(bad_size("not a positive multiple of 4096"));
    }
    let actual = crate::devio::size_of(device).map_err(|source| {
        InitError::Fs(FsError::Device {
            what: "size",
            device: device.to_owned(),
            source,
        })
    })?;
    if size_bytes > actual {
        return Err(bad_size(&format!("the device has only {actual} bytes")));
    }

    let started = Instant::now();
    let zeros = crate::devio::ZeroWriter::open(device)
        .map_err(|source| zero_error(device, 0, size_bytes, source))?;
    let mut written = 0;
    match (mode, integrity) {
        (InitMode::Full, _) => {
            let all = Range {
                start: 0,
                end: size_bytes,
            };
            zero(&zeros, device, &all, 0, size_bytes, progress)?;
            written = size_bytes;
        }
        (InitMode::Fast, false) => {}
        (InitMode::Fast, true) => {
            // Front and back first: they hold everything the dry run itself reads (mke2fs -n
            // reads the superblock area and probes signatures) and do not depend on the layout.
            let base = base_plan(size_bytes);
            let base_total: u64 = base.iter().map(|r| r.end - r.start).sum();
            for range in &base {
                zero(&zeros, device, range, written, base_total, progress)?;
                written += range.end - range.start;
            }
            let rest = subtract(&layout_plan(device, size_bytes, fs)?, &base);
            let total = base_total + rest.iter().map(|r| r.end - r.start).sum::<u64>();
            debug!(device = %device.display(), ranges = base.len() + rest.len(), bytes = total, "pre-write plan");
            for range in &rest {
                zero(&zeros, device, range, written, total, progress)?;
                written += range.end - range.start;
            }
        }
    }
    // One flush for all of it (mkfs flushes again at its end).
    zeros
        .finish()
        .map_err(|source| zero_error(device, 0, size_bytes, source))?;
    let wipe = started.elapsed();

    let started = Instant::now();
    if fs != FsKind::None {
        fstools::mkfs(fs, device, mode == InitMode::Fast)?;
    }
    let mkfs = started.elapsed();
    info!(device = %device.display(), ?mode, prewritten = written, ?wipe, ?mkfs, "volume initialized");
    Ok(InitReport {
        prewritten_bytes: written,
        wipe,
        mkfs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;

    fn well_formed(plan: &[Range<u64>], size: u64) {
        let end = size / 4096 * 4096;
        for (i, r) in plan.iter().enumerate() {
            assert!(r.start < r.end, "empty range {r:?}");
            assert_eq!(r.start % 4096, 0, "{r:?}");
            assert_eq!(r.end % 4096, 0, "{r:?}");
            assert!(r.end <= end, "{r:?} beyond {end}");
            if i > 0 {
                assert!(
                    plan[i - 1].end < r.start,
                    "not coalesced: {:?} {r:?}",
                    plan[i - 1]
                );
            }
        }
    }

    fn covers(plan: &[Range<u64>], r: Range<u64>) -> bool {
        plan.iter().any(|p| p.start <= r.start && r.end <= p.end)
    }

    #[test]
    fn backup_groups_follow_sparse_super() {
        assert_eq!(ext4_backup_groups(32768), Vec::<u64>::new());
        assert_eq!(ext4_backup_groups(32769), vec![1]);
        // 1 GiB AEAD volume: 257073 blocks, 8 groups.
        assert_eq!(ext4_backup_groups(257073), vec![1, 3, 5, 7]);
        // 16 GiB: matches what mke2fs -n printed (see fs.rs tests).
        let b: Vec<u64> = ext4_backup_groups(4129503)
            .iter()
            .map(|g| g * 32768)
            .collect();
        assert_eq!(
            b,
            vec![
                32768, 98304, 163840, 229376, 294912, 819200, 884736, 1605632, 2654208, 4096000
            ]
        );
        assert!(ext4_backup_groups(u64::MAX / 4096).len() > 10);
    }

    #[test]
    fn ext4_plan_at_1g() {
        let size = 1052971008; // crypt size of a 1 GiB loop file under integrity (tag 48, 4K)
        let plan = fast_plan(&Layout::Ext4, size);
        well_formed(&plan, size);
        assert_eq!(plan[0], 0..FRONT);
        assert_eq!(*plan.last().unwrap(), size - BACK..size);
        for g in [1u64, 3, 5, 7] {
            let at = g * 32768 * 4096;
            assert!(covers(&plan, at..at + 4096), "group {g}");
        }
        assert_eq!(plan.len(), 6);
        let total: u64 = plan.iter().map(|r| r.end - r.start).sum();
        assert_eq!(total, FRONT + BACK + 4 * 4096);
    }

    #[test]
    fn ext4_plan_stays_small_as_the_size_grows() {
        let mut last = 0;
        for size in [GIB, 16 * GIB, 64 * GIB, 1024 * GIB, 16384 * GIB] {
            let plan = fast_plan(&Layout::Ext4, size);
            well_formed(&plan, size);
            let total: u64 = plan.iter().map(|r| r.end - r.start).sum();
            assert!(total < FRONT + BACK + MIB, "{size}: {total}");
            assert!(total >= last);
            last = total;
        }
    }

    #[test]
    fn xfs_plan_has_every_ag_head() {
        let geo = XfsGeometry {
            ag_count: 4,
            ag_blocks: 1032376,
            block_size: 4096,
        };
        let size = 16914444288;
        let plan = fast_plan(&Layout::Xfs(geo), size);
        well_formed(&plan, size);
        for ag in 0..4u64 {
            let at = ag * 1032376 * 4096;
            assert!(covers(&plan, at..at + XFS_AG_HEAD), "ag {ag}");
        }
        assert_eq!(plan.len(), 5); // AG 0 head is inside FRONT
    }

    #[test]
    fn tiny_devices_are_clipped_and_merged() {
        let plan = fast_plan(&Layout::Ext4, 5 * MIB + 100);
        assert_eq!(plan, vec![0..5 * MIB]);
        let plan = fast_plan(&Layout::Ext4, 4096);
        assert_eq!(plan, vec![0..4096]);
        let geo = XfsGeometry {
            ag_count: 4,
            ag_blocks: 19200,
            block_size: 4096,
        };
        let size = 4 * 19200 * 4096;
        let plan = fast_plan(&Layout::Xfs(geo), size);
        well_formed(&plan, size);
    }

    #[test]
    fn coalesce_merges_touching_and_overlapping() {
        assert_eq!(
            coalesce(vec![8..12, 0..4, 4..6, 10..20, 30..40, 50..60], 55),
            vec![0..6, 8..20, 30..40, 50..55]
        );
    }

    #[test]
    fn subtract_cuts_out_what_is_done() {
        assert_eq!(
            subtract(&[0..10, 20..30, 40..50], &[0..5, 25..45]),
            vec![5..10, 20..25, 45..50]
        );
        let one = [Range { start: 0, end: 10 }];
        assert_eq!(subtract(&one, &[]), one.to_vec());
        assert_eq!(subtract(&one, &one), Vec::<Range<u64>>::new());
        assert_eq!(subtract(&one, &[2..4, 6..8]), vec![0..2, 4..6, 8..10]);
    }

    #[test]
    fn backups_outside_the_plan_are_refused() {
        let plan = fast_plan(&Layout::Ext4, 16 * GIB);
        assert!(check_ext4_backups(&plan, &[32768, 98304]).is_ok());
        assert!(matches!(
            check_ext4_backups(&plan, &[32768, 40000]),
            Err(InitError::PlanMismatch { block: 40000 })
        ));
    }

    #[test]
    fn fast_without_filesystem_is_refused() {
        let e = initialize(
            Path::new("/nonexistent"),
            GIB,
            FsKind::None,
            InitMode::Fast,
            true,
            &mut |_, _| {},
        )
        .unwrap_err();
        assert!(matches!(e, InitError::FastNeedsFilesystem));
    }

    // tmpfs refuses O_DIRECT: use a directory on a disk filesystem.
    fn scratch() -> tempfile::TempDir {
        tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap()
    }

    #[test]
    fn full_without_filesystem_zeroes_everything() {
        let dir = scratch();
        let dev = dir.path().join("dev");
        std::fs::write(&dev, vec![0xAA; 3 * 1024 * 1024]).unwrap();
        let mut last = (0, 0);
        let r = initialize(
            &dev,
            2 * MIB,
            FsKind::None,
            InitMode::Full,
            true,
            &mut |d, t| last = (d, t),
        )
        .unwrap();
        assert_eq!(r.prewritten_bytes, 2 * MIB);
        assert_eq!(last, (2 * MIB, 2 * MIB));
        let data = std::fs::read(&dev).unwrap();
        assert!(data[..2 << 20].iter().all(|&b| b == 0));
        assert!(data[2 << 20..].iter().all(|&b| b == 0xAA));
    }

    #[test]
    fn bad_sizes_are_refused() {
        let dir = scratch();
        let dev = dir.path().join("dev");
        std::fs::write(&dev, vec![0; 8192]).unwrap();
        for size in [0, 4095, 12288] {
            let e = initialize(
                &dev,
                size,
                FsKind::None,
                InitMode::Full,
                true,
                &mut |_, _| {},
            )
            .unwrap_err();
            assert!(matches!(e, InitError::BadSize { .. }), "{size}: {e}");
        }
    }
}
