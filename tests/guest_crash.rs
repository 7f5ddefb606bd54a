//! Crash consistency at every flush point: each workload runs on a volume whose backing device is
//! seen through dm-log-writes, which records every write, flush and FUA the stack sends to it in
//! completion order. The log is then replayed onto a fresh copy of the original backing file up
//! to every flush/FUA entry (and a few points between them: a crash with part of the unflushed
//! writes on the disk), and each state is checked: the volume opens with the same key, every
//! write acknowledged as durable before that point reads back identical, fsck is clean and the
//! kernel log gains no AEAD error. See docs/crash-consistency.md.
//!
//! The default is the reduced set (what CI runs through tests/run.sh); `SEALCSI_CRASH_FULL=1`
//! runs every workload. The guest tests need root, loop devices and device-mapper:
//!
//! ```text
//! cargo test --test guest_crash --no-run      # prints the test binary's path
//! tests/vm/run-in-guest.sh --timeout 1800 -- <binary> --ignored --test-threads=1 --nocapture
//! ```
//!
//! `SEALCSI_CRASH_ONLY=<label>,<label>` limits a run to the cases of those labels.
//!
//! The non-ignored tests (the log parser's property tests) run on the host in `cargo test`.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

mod common;
use common::{MIB, p};

#[path = "crash/logwrites.rs"]
mod logwrites;

#[cfg(test)]
#[path = "crash/logwrites_props.rs"]
mod logwrites_props;

#[path = "crash/harness.rs"]
mod harness;
use harness::{
    Bed, EXIT_INVALID_HEADER, Fs, Logged, PhasePoint, Tally, Tolerance, check_volume, full_set,
};
use logwrites::{Log, Op, Point, PointKind};

const KIB4: usize = 4096;

/// Points checked inside each run of unflushed writes: 1 in the reduced set, 3 in the full set.
fn between() -> usize {
    if full_set() { 3 } else { 1 }
}

// ---------------------------------------------------------------------------------------------
// The ledger: which marks precede a replay point
// ---------------------------------------------------------------------------------------------

/// The workload steps whose `begin:<n>` and `ack:<n>` marks lie before a point. A step's writes
/// are issued after its begin mark, and its ack mark is sent once its fsync (or O_SYNC write,
/// or fdatasync) returned: from the ack on, the step is acknowledged durable.
struct Progress {
    begun: HashSet<usize>,
    acked: HashSet<usize>,
}

impl Progress {
    fn at(log: &Log, point: &Point) -> Self {
        Self::from_marks(logwrites::marks_before(&log.entries, point.applied))
    }

    /// At a point of a phased log: every mark of the earlier phases, then those before the point.
    fn at_phase(logs: &[&Log], pp: &PhasePoint) -> Self {
        let earlier = logs[..pp.phase]
            .iter()
            .flat_map(|log| logwrites::marks_before(&log.entries, log.entries.len()));
        let here = logwrites::marks_before(&logs[pp.phase].entries, pp.point.applied);
        Self::from_marks(earlier.chain(here))
    }

    /// The steps begun and acknowledged, for a failure message.
    fn describe(&self) -> String {
        let sorted = |set: &HashSet<usize>| {
            let mut v: Vec<usize> = set.iter().copied().filter(|&s| s != 0).collect();
            v.sort_unstable();
            v
        };
        format!(
            "steps begun {:?}, acknowledged {:?}",
            sorted(&self.begun),
            sorted(&self.acked)
        )
    }

    fn from_marks<'m>(marks: impl IntoIterator<Item = &'m str>) -> Self {
        let mut begun = HashSet::from([0]);
        let mut acked = HashSet::from([0]);
        for m in marks {
            if let Some(n) = m.strip_prefix("begin:") {
                begun.insert(n.parse().expect("step number"));
            } else if let Some(n) = m.strip_prefix("ack:") {
                acked.insert(n.parse().expect("step number"));
            }
        }
        Progress { begun, acked }
    }

    /// The versions a crash at this point may show, oldest first: the last acknowledged one and
    /// every later one whose step had begun.
    fn allowed<'v, T>(&self, versions: &'v [(usize, T)]) -> &'v [(usize, T)] {
        let last_acked = versions
            .iter()
            .rposition(|(step, _)| self.acked.contains(step))
            .expect("step 0 is always acknowledged");
        let end = versions[last_acked + 1..]
            .iter()
            .position(|(step, _)| !self.begun.contains(step))
            .map_or(versions.len(), |i| last_acked + 1 + i);
        &versions[last_acked..end]
    }
}

/// Numbers workload steps and puts their marks into the log.
struct Steps<'a> {
    logged: &'a Logged<'a>,
    next: usize,
}

impl<'a> Steps<'a> {
    fn new(logged: &'a Logged<'a>) -> Self {
        Steps { logged, next: 1 }
    }
    fn begin(&mut self) -> usize {
        let step = self.next;
        self.next += 1;
        self.logged.mark(&format!("begin:{step}"));
        step
    }
    fn ack(&self, step: usize) {
        self.logged.mark(&format!("ack:{step}"));
    }
}

// ---------------------------------------------------------------------------------------------
// Data patterns and reads
// ---------------------------------------------------------------------------------------------

/// `len` bytes, distinct per (seed, offset), so a block from another version or place is noticed.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while out.len() < len {
        // xorshift64*
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A buffer aligned for O_DIRECT, without unsafe: over-allocate and slice.
struct Aligned {
    buf: Vec<u8>,
    off: usize,
}

impl Aligned {
    fn new(len: usize) -> Self {
        let buf = vec![0u8; len + KIB4];
        let off = buf.as_ptr().align_offset(KIB4);
        Aligned { buf, off }
    }
    fn get(&mut self, len: usize) -> &mut [u8] {
        &mut self.buf[self.off..self.off + len]
    }
}

fn open_direct(path: &Path, write: bool) -> File {
    OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(nix::libc::O_DIRECT)
        .open(path)
        .unwrap_or_else(|e| panic!("open {} with O_DIRECT: {e}", path.display()))
}

/// An unreadable block is what a torn AEAD block gives: EILSEQ with O_DIRECT, EIO buffered.
fn is_integrity_error(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(nix::libc::EIO) | Some(nix::libc::EILSEQ)
    )
}

/// Every replay point of `log` in the full set; in the reduced set the start, the end and an even
/// sample of the rest, `budget` in all.
fn points_for(log: &Log, budget: usize) -> Vec<Point> {
    let all = logwrites::replay_points(&log.entries, between());
    harness::select_points(all, budget, |pt| {
        matches!(pt.kind, PointKind::Start | PointKind::End)
    })
}

/// The reduced set's points per format and block case (file cases carry their own; keyslot
/// changes have few points and keep them all):
/// chosen so that the reduced set stays well inside CI's time (docs/crash-consistency.md).
const FORMAT_BUDGET: usize = 8;
const BLOCKS_BUDGET: usize = 8;

/// The checker must not be vacuous: the original image (before the workload) checked against
/// the final ledger has to fail.
fn negative_control(bed: &Bed, original: &Path, check: impl FnOnce(&Path) -> Result<(), String>) {
    let image = bed.dir.join("control.img");
    harness::sparse_copy(original, &image);
    let outcome = check(&image);
    harness::detach_all(&image);
    let _ = fs::remove_file(&image);
    match outcome {
        Ok(()) => {
            panic!("negative control: the check accepted a volume missing every acknowledged write")
        }
        Err(why) => println!(
            "negative control refused, as it must: {}",
            why.lines().next().unwrap_or("")
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// Workload 1: volume format
// ---------------------------------------------------------------------------------------------

struct FormatCase {
    label: &'static str,
    size: u64,
    fs: Fs,
    args: &'static [&'static str],
}

/// The index of the first logged write that puts a sealcsi header magic into either header copy.
fn header_write(log: &Log, src: &File) -> usize {
    let unit = u64::from(log.sector_size);
    for e in &log.entries {
        let Op::Write { payload_offset } = e.op else {
            continue;
        };
        let (start, end) = (e.sector * unit, (e.sector + e.nr_sectors) * unit);
        for copy in [0u64, 4096] {
            if start <= copy && copy + 8 <= end {
                let mut magic = [0u8; 8];
                src.read_exact_at(&mut magic, payload_offset + copy - start)
                    .unwrap();
                if &magic == b"SEALCSI\0" {
                    return e.index;
                }
            }
        }
    }
    panic!("the format log has no header write");
}

fn format_workload(case: &FormatCase) -> Tally {
    let bed = Bed::new(case.label);
    let backing = bed.file("vol.img", case.size);
    let original = bed.dir.join("original.img");
    harness::sparse_copy(&backing, &original);
    let logged = Logged::start(&bed, &backing, 4 * case.size + 256 * MIB);
    let mut args = vec!["volume", "format", logged.dev(), "--fs", case.fs.arg()];
    args.extend_from_slice(case.args);
    bed.sealcsi(&args).ok();
    let (log, log_file) = logged.finish();
    let header_at = header_write(&log, &File::open(&log_file).unwrap());
    println!("header written by entry {header_at}");
    let all = logwrites::replay_points(&log.entries, between());
    let pre_header: Vec<usize> = all
        .iter()
        .map(|pt| pt.applied)
        .filter(|&n| n <= header_at)
        .collect();
    let last_before = pre_header.last().copied();
    // Format again at the last point before the header (the most written-over state), and in
    // the full set at every 16th point before it as well (each costs a whole format).
    let reformat_at: HashSet<usize> = pre_header
        .iter()
        .enumerate()
        .filter(|&(i, &n)| Some(n) == last_before || full_set() && i % 16 == 0)
        .map(|(_, &n)| n)
        .collect();
    // The reduced set samples the points before the header and keeps every one after it.
    let points = harness::select_points(all, FORMAT_BUDGET, |pt| {
        pt.applied == 0 || pt.applied > header_at || reformat_at.contains(&pt.applied)
    });
    harness::replay_each(
        &bed,
        &original,
        &log,
        &log_file,
        &points,
        |point, images| {
            if point.applied > header_at {
                let image = images.writable();
                return check_volume(&bed, image, case.fs, Tolerance::default(), |_| Ok(()));
            }
            no_header_yet(&bed, images.read_only())?;
            if reformat_at.contains(&point.applied) {
                format_again(&bed, images.writable(), case)?;
            }
            Ok(())
        },
    )
}

/// Before the header write, open must refuse with "no header" (exit 4) and open nothing.
fn no_header_yet(bed: &Bed, image: &Path) -> Result<(), String> {
    let out = bed.sealcsi(&["volume", "open", p(image), "--name", harness::CHECK_NAME]);
    harness::detach_all(image);
    if out.code != EXIT_INVALID_HEADER || !out.error_text().contains("header") {
        if out.code == 0 {
            bed.close(harness::CHECK_NAME, Some(image));
        }
        return Err(format!(
            "open before the header write: want exit 4 (no header): {out}"
        ));
    }
    Ok(())
}

fn format_again(bed: &Bed, image: &Path, case: &FormatCase) -> Result<(), String> {
    let mut args = vec![
        "volume",
        "format",
        p(image),
        "--fs",
        case.fs.arg(),
        "--force",
    ];
    args.extend_from_slice(case.args);
    let out = bed.sealcsi(&args);
    harness::detach_all(image);
    if out.code != 0 {
        return Err(format!("formatting again failed: {out}"));
    }
    check_volume(bed, image, case.fs, Tolerance::default(), |_| Ok(()))
}

const EXT4_SIZE: u64 = 64 * MIB;
/// mkfs.xfs needs 300 MiB of device; a 307 MiB AEAD image is the smallest that holds one (measured).
const XFS_SIZE: u64 = 320 * MIB;

const FORMAT_CASES: &[FormatCase] = &[
    FormatCase {
        label: "format-ext4-fast",
        size: EXT4_SIZE,
        fs: Fs::Ext4,
        args: &["--init", "fast"],
    },
    FormatCase {
        label: "format-ext4-full-crypt",
        size: EXT4_SIZE,
        fs: Fs::Ext4,
        args: &["--init", "full", "--integrity", "none"],
    },
    FormatCase {
        label: "format-xfs-fast",
        size: XFS_SIZE,
        fs: Fs::Xfs,
        args: &["--init", "fast"],
    },
    // The full set only from here on.
    FormatCase {
        label: "format-ext4-full",
        size: EXT4_SIZE,
        fs: Fs::Ext4,
        args: &["--init", "full"],
    },
    FormatCase {
        label: "format-ext4-fast-crypt",
        size: EXT4_SIZE,
        fs: Fs::Ext4,
        args: &["--init", "fast", "--integrity", "none"],
    },
    FormatCase {
        label: "format-xfs-fast-crypt",
        size: XFS_SIZE,
        fs: Fs::Xfs,
        args: &["--init", "fast", "--integrity", "none"],
    },
    FormatCase {
        label: "format-xfs-full",
        size: XFS_SIZE,
        fs: Fs::Xfs,
        args: &["--init", "full"],
    },
    FormatCase {
        label: "format-xfs-full-crypt",
        size: XFS_SIZE,
        fs: Fs::Xfs,
        args: &["--init", "full", "--integrity", "none"],
    },
];
const REDUCED_FORMAT_CASES: usize = 3;

/// Runs a set of cases, prints one result line per case, fails if any point failed.
fn run_cases<C>(
    cases: &[C],
    reduced: usize,
    label: impl Fn(&C) -> &str,
    run: impl Fn(&C) -> Tally,
) {
    let count = if full_set() { cases.len() } else { reduced };
    // SEALCSI_CRASH_ONLY=<a>,<b>: only the cases whose label equals one of them (re-running).
    let only = std::env::var("SEALCSI_CRASH_ONLY").unwrap_or_default();
    let wanted = |l: &str| only.is_empty() || only.split(',').any(|o| o == l);
    let mut lines = Vec::new();
    let mut failures = Vec::new();
    for case in cases[..count].iter().filter(|c| wanted(label(c))) {
        let tally = run(case);
        println!("{}", tally.line(label(case)));
        lines.push(tally.line(label(case)));
        failures.extend(
            tally
                .failures
                .iter()
                .map(|f| format!("{}: {f}", label(case))),
        );
    }
    println!("summary:\n{}", lines.join("\n"));
    assert!(
        failures.is_empty(),
        "{} replay point(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
#[ignore = "guest: needs device-mapper, run via tests/vm/run-in-guest.sh"]
fn guest_crash_format() {
    run_cases(
        FORMAT_CASES,
        REDUCED_FORMAT_CASES,
        |c| c.label,
        format_workload,
    );
}

// ---------------------------------------------------------------------------------------------
// Workload 2: files made durable with fsync, fdatasync, O_SYNC and directory fsyncs
// ---------------------------------------------------------------------------------------------

/// A file's content as a step left it (`None` = absent), tagged with the step.
type FileVersion = (usize, Option<Vec<u8>>);

/// Every version each path had.
#[derive(Default)]
struct FileLedger {
    versions: BTreeMap<&'static str, Vec<FileVersion>>,
}

impl FileLedger {
    fn record(&mut self, step: usize, path: &'static str, content: Option<Vec<u8>>) {
        self.versions
            .entry(path)
            .or_insert_with(|| vec![(0, None)])
            .push((step, content));
    }

    fn latest(&self, path: &str) -> Vec<u8> {
        self.versions[path]
            .last()
            .and_then(|(_, c)| c.clone())
            .expect("a present file")
    }

    /// Checks every path against what a crash at `progress` may show.
    fn check(&self, root: &Path, progress: &Progress) -> Result<(), String> {
        for (path, versions) in &self.versions {
            let allowed = progress.allowed(versions);
            check_file(&root.join(path), allowed).map_err(|e| format!("{path}: {e}"))?;
        }
        Ok(())
    }
}

/// One acknowledged version: exact. Several (a step in flight): the file may be absent only if
/// a version is, and each 4 KiB block must read as that block of some allowed version or as
/// zeros (an extending write whose size reached the disk before its data). Never other bytes, never
/// an integrity error (filesystems are refused over direct mode: `volume::check_format_options`).
fn check_file(path: &Path, allowed: &[FileVersion]) -> Result<(), String> {
    let may_be_absent = allowed.iter().any(|(_, c)| c.is_none());
    let contents: Vec<&Vec<u8>> = allowed.iter().filter_map(|(_, c)| c.as_ref()).collect();
    let file = match File::open(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return if may_be_absent {
                Ok(())
            } else {
                Err("acknowledged file is missing".into())
            };
        }
        Err(e) => return Err(format!("open: {e}")),
        Ok(f) => f,
    };
    if contents.is_empty() {
        return Err("exists, but its removal was acknowledged".into());
    }
    let len = file.metadata().map_err(|e| e.to_string())?.len() as usize;
    if allowed.len() == 1 {
        return read_exact_content(&file, len, contents[0]);
    }
    let longest = contents.iter().map(|c| c.len()).max().unwrap_or(0);
    if len > longest {
        return Err(format!("{len} bytes, longer than any version ({longest})"));
    }
    for at in (0..len).step_by(KIB4) {
        let n = KIB4.min(len - at);
        let mut buf = vec![0u8; n];
        match file.read_exact_at(&mut buf, at as u64) {
            Err(e) => return Err(format!("reading bytes at {at}: {e}")),
            Ok(()) => {
                let known = contents
                    .iter()
                    .any(|c| c.len() >= at + n && c[at..at + n] == buf[..]);
                if !known && buf.iter().any(|&b| b != 0) {
                    return Err(format!(
                        "bytes at {at} match no version written there (wrong data)"
                    ));
                }
            }
        }
    }
    Ok(())
}

fn read_exact_content(file: &File, len: usize, want: &[u8]) -> Result<(), String> {
    if len != want.len() {
        return Err(format!("acknowledged {} bytes, found {len}", want.len()));
    }
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, 0)
        .map_err(|e| format!("reading acknowledged data: {e}"))?;
    if buf != want {
        return Err("acknowledged data differs".into());
    }
    Ok(())
}

fn fsync_dir(dir: &Path) {
    File::open(dir).unwrap().sync_all().unwrap();
}

fn create_with(path: &Path, data: &[u8], custom_flags: i32) -> File {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(custom_flags)
        .open(path)
        .unwrap();
    f.write_all(data).unwrap();
    f
}

/// The file workload on a mounted volume; returns what it wrote, step by step.
fn file_steps(root: &Path, steps: &mut Steps) -> FileLedger {
    let mut ledger = FileLedger::default();

    // fsync of a new file, then of its directory.
    let s = steps.begin();
    let a = pattern(1, 48 * 1024);
    create_with(&root.join("a"), &a, 0).sync_all().unwrap();
    fsync_dir(root);
    ledger.record(s, "a", Some(a.clone()));
    steps.ack(s);

    // O_SYNC writes: each write is durable when it returns; the name needs the directory fsync.
    let s = steps.begin();
    let b = pattern(2, 48 * 1024);
    let mut f = create_with(&root.join("b"), &[], nix::libc::O_SYNC);
    for chunk in b.chunks(16 * 1024) {
        f.write_all(chunk).unwrap();
    }
    drop(f);
    fsync_dir(root);
    ledger.record(s, "b", Some(b));
    steps.ack(s);

    // fdatasync after an append (the size change must be durable too).
    let s = steps.begin();
    let mut a2 = a.clone();
    a2.extend_from_slice(&pattern(3, 32 * 1024));
    let f = OpenOptions::new()
        .append(true)
        .open(root.join("a"))
        .unwrap();
    (&f).write_all(&a2[a.len()..]).unwrap();
    f.sync_data().unwrap();
    ledger.record(s, "a", Some(a2));
    steps.ack(s);

    // An overwrite in place of an existing file, made durable with fdatasync.
    let s = steps.begin();
    let c = pattern(4, 64 * 1024);
    create_with(&root.join("c"), &c, 0).sync_all().unwrap();
    fsync_dir(root);
    ledger.record(s, "c", Some(c.clone()));
    steps.ack(s);
    let s = steps.begin();
    let mut c2 = c;
    let patch = pattern(5, 16 * 1024);
    c2[20 * 1024..36 * 1024].copy_from_slice(&patch);
    let f = OpenOptions::new().write(true).open(root.join("c")).unwrap();
    f.write_all_at(&patch, 20 * 1024).unwrap();
    f.sync_data().unwrap();
    ledger.record(s, "c", Some(c2));
    steps.ack(s);

    // Atomic replace: write a temporary file, fsync it, rename it, fsync the directory.
    let s = steps.begin();
    let d = pattern(6, 20 * 1024);
    create_with(&root.join("d.tmp"), &d, 0).sync_all().unwrap();
    fs::rename(root.join("d.tmp"), root.join("d")).unwrap();
    fsync_dir(root);
    ledger.record(s, "d.tmp", Some(d.clone()));
    ledger.record(s, "d.tmp", None);
    ledger.record(s, "d", Some(d));
    steps.ack(s);

    // A new directory: the file, the new directory and its parent are each fsynced.
    let s = steps.begin();
    fs::create_dir(root.join("sub")).unwrap();
    let e = pattern(7, 8 * 1024);
    create_with(&root.join("sub/e"), &e, 0).sync_all().unwrap();
    fsync_dir(&root.join("sub"));
    fsync_dir(root);
    ledger.record(s, "sub/e", Some(e));
    steps.ack(s);

    // An unlink made durable by the directory fsync.
    let s = steps.begin();
    fs::remove_file(root.join("b")).unwrap();
    fsync_dir(root);
    ledger.record(s, "b", None);
    steps.ack(s);

    // A bigger file (several extents, journal commits of its own).
    let s = steps.begin();
    let big = pattern(8, MIB as usize);
    create_with(&root.join("f"), &big, 0).sync_all().unwrap();
    fsync_dir(root);
    ledger.record(s, "f", Some(big));
    steps.ack(s);

    // Never acknowledged: a new file and an overwrite of `a`, left to writeback and unmount.
    let s = steps.begin();
    create_with(&root.join("g"), &pattern(9, 40 * 1024), 0);
    ledger.record(s, "g", Some(pattern(9, 40 * 1024)));
    let mut a3 = ledger.latest("a");
    let head = pattern(10, 8 * 1024);
    a3[..head.len()].copy_from_slice(&head);
    OpenOptions::new()
        .write(true)
        .open(root.join("a"))
        .unwrap()
        .write_all_at(&head, 0)
        .unwrap();
    ledger.record(s, "a", Some(a3));
    ledger
}

struct FilesCase {
    label: &'static str,
    size: u64,
    fs: Fs,
    /// Points in the reduced set (xfs checks cost about twice as much as ext4's).
    budget: usize,
}

/// Formats (unlogged), snapshots, then logs open → mount → the file steps → unmount → close.
fn files_workload(case: &FilesCase) -> Tally {
    let bed = Bed::new(case.label);
    let backing = bed.file("vol.img", case.size);
    bed.sealcsi(&["volume", "format", p(&backing), "--fs", case.fs.arg()])
        .ok();
    harness::detach_all(&backing);
    let original = bed.dir.join("original.img");
    harness::sparse_copy(&backing, &original);

    let logged = Logged::start(&bed, &backing, case.size + 256 * MIB);
    let name = "cc-work";
    bed.track_name(name);
    let report = bed
        .sealcsi(&["volume", "open", logged.dev(), "--name", name])
        .ok()
        .json();
    let device = report["device"]
        .as_str()
        .expect("open report has a device")
        .to_owned();
    let mnt = bed.mount(Path::new(&device), case.fs.arg()).unwrap();
    let mut steps = Steps::new(&logged);
    let ledger = file_steps(&mnt, &mut steps);
    bed.umount(&mnt);
    bed.close(name, None);
    let (log, log_file) = logged.finish();

    let tally = harness::replay_each(
        &bed,
        &original,
        &log,
        &log_file,
        &points_for(&log, case.budget),
        |point, images| {
            let image = images.writable();
            let progress = Progress::at(&log, point);
            check_volume(&bed, image, case.fs, Tolerance::default(), |root| {
                ledger.check(root, &progress)
            })
        },
    );
    let end = Progress::at(
        &log,
        &Point {
            applied: log.entries.len(),
            kind: PointKind::End,
        },
    );
    negative_control(&bed, &original, |image| {
        check_volume(&bed, image, case.fs, Tolerance::default(), |root| {
            ledger.check(root, &end)
        })
    });
    tally
}

const FILES_CASES: &[FilesCase] = &[
    FilesCase {
        label: "files-ext4",
        size: EXT4_SIZE,
        fs: Fs::Ext4,
        budget: 14,
    },
    FilesCase {
        label: "files-xfs",
        size: XFS_SIZE,
        fs: Fs::Xfs,
        budget: 10,
    },
];
const REDUCED_FILES_CASES: usize = 2;

#[test]
#[ignore = "guest: needs device-mapper, run via tests/vm/run-in-guest.sh"]
fn guest_crash_files() {
    run_cases(
        FILES_CASES,
        REDUCED_FILES_CASES,
        |c| c.label,
        files_workload,
    );
}

// ---------------------------------------------------------------------------------------------
// Workload 2b: raw blocks with O_DIRECT and fdatasync (block volume, exact per-block ledger)
// ---------------------------------------------------------------------------------------------

/// Blocks of the block volume the workload writes into.
const REGION_BLOCKS: u64 = 512;

/// Per block, every version it had: (step, seed); seed 0 = the zeros of format's full init.
struct BlockLedger {
    versions: Vec<Vec<(usize, u64)>>,
}

fn block_content(seed: u64, block: u64) -> Vec<u8> {
    if seed == 0 {
        vec![0u8; KIB4]
    } else {
        pattern(seed << 20 | block, KIB4)
    }
}

/// Eight acknowledged steps that each rewrite a scattered set of blocks (some blocks several
/// times), then one step that is never flushed.
fn block_steps(device: &Path, steps: &mut Steps) -> BlockLedger {
    let mut ledger = BlockLedger {
        versions: vec![vec![(0, 0)]; REGION_BLOCKS as usize],
    };
    let f = open_direct(device, true);
    let mut buf = Aligned::new(KIB4);
    for round in 1..=9u64 {
        let s = steps.begin();
        let seed = round;
        for i in 0..48u64 {
            let block = (i * 37 + round * 11) * (round + 3) % REGION_BLOCKS;
            buf.get(KIB4).copy_from_slice(&block_content(seed, block));
            f.write_all_at(buf.get(KIB4), block * KIB4 as u64).unwrap();
            ledger.versions[block as usize].push((s, seed));
        }
        if round < 9 {
            f.sync_data().unwrap();
            steps.ack(s);
        }
    }
    ledger
}

impl BlockLedger {
    /// Every block reads as one of its allowed versions; an integrity error only in direct mode
    /// and only on a block with a write in flight; an acknowledged block exactly.
    fn check(&self, device: &Path, progress: &Progress, direct: bool) -> Result<(), String> {
        let f = open_direct(device, false);
        let mut buf = Aligned::new(KIB4);
        let mut torn = 0;
        for block in 0..REGION_BLOCKS {
            let allowed = progress.allowed(&self.versions[block as usize]);
            match f.read_exact_at(buf.get(KIB4), block * KIB4 as u64) {
                Err(e) if direct && allowed.len() > 1 && is_integrity_error(&e) => torn += 1,
                Err(e) => return Err(format!("block {block}: {e} (allowed {allowed:?})")),
                Ok(()) => {
                    let data = buf.get(KIB4);
                    if !allowed
                        .iter()
                        .any(|&(_, seed)| block_content(seed, block) == data)
                    {
                        return Err(format!("block {block}: wrong data (allowed {allowed:?})"));
                    }
                }
            }
        }
        if torn > 0 {
            println!("  {torn} unflushed block(s) unreadable (direct mode)");
        }
        Ok(())
    }
}

fn blocks_workload(direct: bool) -> Tally {
    let label = if direct {
        "blocks-direct"
    } else {
        "blocks-journal"
    };
    let bed = Bed::new(label);
    let backing = bed.file("vol.img", 64 * MIB);
    let mut args = vec!["volume", "format", p(&backing), "--fs", "none"];
    if direct {
        args.extend_from_slice(&["--journal", "direct"]);
    }
    bed.sealcsi(&args).ok();
    harness::detach_all(&backing);
    let original = bed.dir.join("original.img");
    harness::sparse_copy(&backing, &original);

    let logged = Logged::start(&bed, &backing, 128 * MIB);
    let name = "cc-work";
    bed.track_name(name);
    let report = bed
        .sealcsi(&["volume", "open", logged.dev(), "--name", name])
        .ok()
        .json();
    let device = report["device"]
        .as_str()
        .expect("open report has a device")
        .to_owned();
    let mut steps = Steps::new(&logged);
    let ledger = block_steps(Path::new(&device), &mut steps);
    bed.close(name, None);
    let (log, log_file) = logged.finish();

    let tally = harness::replay_each(
        &bed,
        &original,
        &log,
        &log_file,
        &points_for(&log, BLOCKS_BUDGET),
        |point, images| {
            let image = images.writable();
            let progress = Progress::at(&log, point);
            let tolerance = Tolerance {
                aead_errors: direct,
            };
            check_volume(&bed, image, Fs::None, tolerance, |dev| {
                ledger.check(dev, &progress, direct)
            })
        },
    );
    let end = Progress::at(
        &log,
        &Point {
            applied: log.entries.len(),
            kind: PointKind::End,
        },
    );
    negative_control(&bed, &original, |image| {
        check_volume(&bed, image, Fs::None, Tolerance::default(), |dev| {
            ledger.check(dev, &end, direct)
        })
    });
    tally
}

#[test]
#[ignore = "guest: needs device-mapper, run via tests/vm/run-in-guest.sh"]
fn guest_crash_blocks() {
    run_cases(
        &[false, true],
        2,
        |d| {
            if *d {
                "blocks-direct"
            } else {
                "blocks-journal"
            }
        },
        |d| blocks_workload(*d),
    );
}

// ---------------------------------------------------------------------------------------------
// Workload 3: keyslot changes
// ---------------------------------------------------------------------------------------------

/// What `volume inspect` shows of the slots: sealed-slot digests and the recovery-slot count.
fn slot_view(inspect: &serde_json::Value) -> (Vec<String>, usize) {
    let slots = inspect["keyslots"].as_array().cloned().unwrap_or_default();
    let digests = slots
        .iter()
        .filter(|s| s["source"] == "sim")
        .filter_map(|s| s["identity_digest"].as_str().map(str::to_owned))
        .collect();
    let recovery = slots.iter().filter(|s| s["source"] != "sim").count();
    (digests, recovery)
}

/// A formatted ext4 volume holding a marker file (written through a normal open) that every replay
/// point must still show, and a copy of its file before the logged workload: (backing, original,
/// marker).
fn marked_volume(bed: &Bed, seed: u64) -> (PathBuf, PathBuf, Vec<u8>) {
    let backing = bed.file("vol.img", EXT4_SIZE);
    bed.sealcsi(&["volume", "format", p(&backing), "--fs", "ext4"])
        .ok();
    let name = "cc-work";
    bed.track_name(name);
    let report = bed
        .sealcsi(&["volume", "open", p(&backing), "--name", name])
        .ok()
        .json();
    let mnt = bed
        .mount(Path::new(report["device"].as_str().unwrap()), "ext4")
        .unwrap();
    let marker = pattern(seed, 12 * 1024);
    create_with(&mnt.join("marker"), &marker, 0)
        .sync_all()
        .unwrap();
    bed.umount(&mnt);
    bed.close(name, Some(&backing));
    let original = bed.dir.join("original.img");
    harness::sparse_copy(&backing, &original);
    (backing, original, marker)
}

/// The identity digest of the simulated node `identity`.
fn identity_digest(bed: &Bed, identity: &str) -> String {
    bed.sealcsi_as(identity, &["volume", "identity"])
        .ok()
        .json()["digest"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn marker_intact(root: &Path, marker: &[u8]) -> Result<(), String> {
    let found = fs::read(root.join("marker")).map_err(|e| format!("marker: {e}"))?;
    if found != marker {
        Err("marker differs".into())
    } else {
        Ok(())
    }
}

fn keyslots_workload() -> Tally {
    let bed = Bed::new("keyslots");
    let (backing, original, marker) = marked_volume(&bed, 42);
    let digest_b = identity_digest(&bed, "node-b");
    let private = bed.dir.join("recovery.key");
    let public = bed.dir.join("recovery.pub");
    bed.sealcsi(&[
        "recovery-keygen",
        "--private-key",
        p(&private),
        "--public-key",
        p(&public),
    ])
    .ok();

    let logged = Logged::start(&bed, &backing, 256 * MIB);
    let mut steps = Steps::new(&logged);
    let add = steps.begin();
    bed.sealcsi(&["volume", "add-slot", logged.dev(), "--for", "sim:node-b"])
        .ok();
    steps.ack(add);
    let recovery = steps.begin();
    bed.sealcsi(&[
        "volume",
        "add-recovery",
        logged.dev(),
        "--recovery-public-key",
        p(&public),
    ])
    .ok();
    steps.ack(recovery);
    let slots = bed.sealcsi(&["volume", "slots", logged.dev()]).ok().json();
    let b_index = slots["slots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["identity_digest"] == digest_b.as_str())
        .and_then(|s| s["index"].as_u64())
        .unwrap_or_else(|| panic!("no slot for node-b in {slots}"));
    let remove = steps.begin();
    bed.sealcsi(&[
        "volume",
        "remove-slot",
        logged.dev(),
        "--slot",
        &b_index.to_string(),
    ])
    .ok();
    steps.ack(remove);
    let (log, log_file) = logged.finish();

    harness::replay_each(
        &bed,
        &original,
        &log,
        &log_file,
        &points_for(&log, usize::MAX),
        |point, images| {
            let image = images.writable();
            let progress = Progress::at(&log, point);
            check_slots(&bed, image, &progress, &digest_b, [add, recovery, remove])?;
            check_volume(&bed, image, Fs::Ext4, Tolerance::default(), |root| {
                marker_intact(root, &marker)
            })
        },
    )
}

/// The slot set at a point: node-b's slot present from its ack until the removal begins, absent
/// (in both header copies) from the removal's ack on; the recovery slot present from its ack.
fn check_slots(
    bed: &Bed,
    image: &Path,
    progress: &Progress,
    digest_b: &str,
    [add, recovery, remove]: [usize; 3],
) -> Result<(), String> {
    let inspect = harness::inspect(bed, image)?;
    let (digests, recovery_slots) = slot_view(&inspect);
    let has_b = digests.iter().any(|d| d == digest_b);
    let done = |s: usize| progress.acked.contains(&s);
    let started = |s: usize| progress.begun.contains(&s);
    if done(add) && !started(remove) && !has_b {
        return Err(format!("node-b's acknowledged slot is missing: {inspect}"));
    }
    if (done(remove) || !started(add)) && has_b {
        return Err(format!("node-b has a slot it should not have: {inspect}"));
    }
    if done(recovery) && recovery_slots != 1 || !started(recovery) && recovery_slots != 0 {
        return Err(format!(
            "recovery slots: {recovery_slots} (acknowledged: {}): {inspect}",
            done(recovery)
        ));
    }
    if done(remove) {
        let raw = fs::read(image).map_err(|e| e.to_string())?;
        let needle = hex::decode(digest_b).unwrap();
        if raw[..8192].windows(needle.len()).any(|w| w == needle) {
            return Err("a header copy still holds node-b's removed slot".into());
        }
    }
    Ok(())
}

/// Workload 3b: an attested transfer (grant on the source, accept on the target) on the logged device.
/// The source's slot is never touched, so every point must open as the source with the marker intact;
/// the slot set must be the old one, or the new one, or (inside accept) the target's slot beside the
/// transfer slot, never a granted volume with neither.
fn transfer_workload() -> Tally {
    let bed = Bed::new("transfer");
    let (backing, original, marker) = marked_volume(&bed, 43);
    let digest_b = identity_digest(&bed, "node-b");
    let request = bed.dir.join("transfer.req");
    bed.sealcsi_as(
        "node-b",
        &["volume", "transfer-request", "--out", p(&request)],
    )
    .ok();

    let logged = Logged::start(&bed, &backing, 256 * MIB);
    let mut steps = Steps::new(&logged);
    let grant = steps.begin();
    let granted = bed
        .sealcsi(&[
            "volume",
            "transfer-grant",
            logged.dev(),
            "--request",
            p(&request),
            "--expect",
            "sim:node-b",
        ])
        .ok()
        .json();
    steps.ack(grant);
    let key_check = granted["key_check"].as_str().unwrap().to_owned();
    let accept = steps.begin();
    bed.sealcsi_as(
        "node-b",
        &[
            "volume",
            "transfer-accept",
            logged.dev(),
            "--key-check",
            &key_check,
        ],
    )
    .ok();
    steps.ack(accept);
    let (log, log_file) = logged.finish();

    harness::replay_each(
        &bed,
        &original,
        &log,
        &log_file,
        &points_for(&log, usize::MAX),
        |point, images| {
            let image = images.writable();
            let progress = Progress::at(&log, point);
            check_transfer_slots(&bed, image, &progress, &digest_b, [grant, accept])?;
            check_volume(&bed, image, Fs::Ext4, Tolerance::default(), |root| {
                marker_intact(root, &marker)
            })
        },
    )
}

fn check_transfer_slots(
    bed: &Bed,
    image: &Path,
    progress: &Progress,
    digest_b: &str,
    [grant, accept]: [usize; 2],
) -> Result<(), String> {
    let inspect = harness::inspect(bed, image)?;
    let slots = inspect["keyslots"].as_array().cloned().unwrap_or_default();
    let transfer = slots.iter().filter(|s| s["kind"] == "transfer").count();
    let has_b = slots
        .iter()
        .any(|s| s["kind"] == "sealed" && s["identity_digest"] == digest_b);
    let done = |s: usize| progress.acked.contains(&s);
    let started = |s: usize| progress.begun.contains(&s);
    let ok = if !started(grant) {
        transfer == 0 && !has_b
    } else if !done(grant) {
        transfer <= 1 && !has_b
    } else if !started(accept) {
        transfer == 1 && !has_b
    } else if !done(accept) {
        // Accept adds the target's slot before it removes the transfer slot.
        transfer <= 1 && (transfer == 1 || has_b)
    } else {
        transfer == 0 && has_b
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "slot set at this point: {transfer} transfer slot(s), node-b's slot {}: {inspect}",
            if has_b { "present" } else { "absent" }
        ))
    }
}

#[test]
#[ignore = "guest: needs device-mapper, run via tests/vm/run-in-guest.sh"]
fn guest_crash_transfer() {
    let tally = transfer_workload();
    harness::report("transfer", &tally);
}

#[test]
#[ignore = "guest: needs device-mapper, run via tests/vm/run-in-guest.sh"]
fn guest_crash_keyslots() {
    let tally = keyslots_workload();
    harness::report("keyslots", &tally);
}

// ---------------------------------------------------------------------------------------------
// Workload 4: online expansion (backing grow, integrity and crypt reload, filesystem resize)
// ---------------------------------------------------------------------------------------------

/// The engine NodeExpandVolume drives (the kernel device-mapper and this bed's simulated node).
fn kernel_engine(bed: &Bed) -> sealcsi::node::KernelEngine {
    let dm: std::sync::Arc<dyn sealcsi::dm::DeviceMapper> =
        std::sync::Arc::new(sealcsi::dm::KernelDm::new().expect("device-mapper"));
    let source = sealcsi::sealing::SimSource::open(&bed.state, harness::IDENTITY)
        .expect("the bed's simulated node");
    sealcsi::node::KernelEngine::new(dm, std::sync::Arc::new(source))
}

fn fs_kind(fs: Fs) -> sealcsi::header::FsKind {
    match fs {
        Fs::Ext4 => sealcsi::header::FsKind::Ext4,
        Fs::Xfs => sealcsi::header::FsKind::Xfs,
        Fs::None => sealcsi::header::FsKind::None,
    }
}

/// The size of the filesystem mounted at `mnt`, in bytes.
fn fs_bytes(mnt: &Path) -> u64 {
    let st = nix::sys::statvfs::statvfs(mnt).expect("statvfs");
    st.blocks() * st.fragment_size()
}

/// The CSI volume id the expansion workload's volume is bound to: an expansion acts only on the header
/// of the volume it expects (`Node::expand` passes the staged volume's).
const EXPAND_VOLUME_ID: &str = "crash-expand";

fn expand_expected(binding: &[u8; 32]) -> sealcsi::volume::Expected<'_> {
    sealcsi::volume::Expected {
        name: EXPAND_VOLUME_ID,
        binding,
        uuid: None,
    }
}

/// What `Node::expand` (NodeExpandVolume) does once the backing device is grown, in its order: the
/// mapping grows (integrity reload, then crypt), the new space from `from` on is initialized, then
/// the filesystem grows. Returns the new top size.
fn expand_stack(
    engine: &sealcsi::node::KernelEngine,
    dm_name: &str,
    backing: &Path,
    from: u64,
    fs: Fs,
    mnt: &Path,
) -> Result<u64, String> {
    use sealcsi::node::VolumeEngine;
    let device = engine
        .open_device(dm_name)
        .map_err(|e| e.to_string())?
        .ok_or("the volume is not open")?;
    let binding = sealcsi::header::volume_binding(EXPAND_VOLUME_ID);
    let bytes = engine
        .expand(dm_name, backing, expand_expected(&binding))
        .map_err(|e| format!("expanding the mapping: {e}"))?;
    engine
        .init_new_space(dm_name, from, bytes)
        .map_err(|e| format!("initializing the new space: {e}"))?;
    engine
        .grow_fs(fs_kind(fs), &device, mnt)
        .map_err(|e| format!("growing the filesystem: {e}"))?;
    Ok(bytes)
}

/// The backing file's part of `Store::grow_backing`: set the length, then sync it.
fn grow_file(path: &Path, bytes: u64) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    if f.metadata().unwrap().len() < bytes {
        f.set_len(bytes).unwrap();
    }
    f.sync_all().unwrap();
}

struct ExpandCase {
    label: &'static str,
    fs: Fs,
    size: u64,
    grown: u64,
    /// Points in the reduced set.
    budget: usize,
}

const EXPAND_CASES: &[ExpandCase] = &[
    ExpandCase {
        label: "expand-ext4",
        fs: Fs::Ext4,
        size: EXT4_SIZE,
        grown: EXT4_SIZE + 16 * MIB,
        budget: 10,
    },
    ExpandCase {
        label: "expand-xfs",
        fs: Fs::Xfs,
        size: XFS_SIZE,
        grown: XFS_SIZE + 32 * MIB,
        budget: 8,
    },
];
/// The reduced set runs expand-ext4 only (expand-xfs alone takes about 100 s of checks).
const REDUCED_EXPAND_CASES: usize = 1;

/// Everything a point's check needs besides the image and the progress.
#[derive(Clone, Copy)]
struct ExpandCheck<'a> {
    bed: &'a Bed,
    engine: &'a sealcsi::node::KernelEngine,
    case: &'a ExpandCase,
    sizes: &'a ExpandSizes,
    /// The step in which the mapping grows and its new space is initialized.
    expand_step: usize,
    resize_step: usize,
    ledger: &'a FileLedger,
}

/// What the workload measured, for the checks: top sizes before and after, the grown filesystem.
struct ExpandSizes {
    old_top: u64,
    new_top: u64,
    grown_fs: u64,
}

/// Formats and snapshots the volume; then, logged: opens and mounts it (staged), writes and
/// acknowledges files, leaves one more step dirty, grows it online the way NodeExpandVolume does,
/// writes and acknowledges a file into the grown filesystem, unmounts and closes.
fn expand_workload(case: &ExpandCase) -> Tally {
    use sealcsi::node::VolumeEngine;
    let bed = Bed::new(case.label);
    let engine = kernel_engine(&bed);
    let backing = bed.file("vol.img", case.size);
    bed.sealcsi(&[
        "volume",
        "format",
        p(&backing),
        "--fs",
        case.fs.arg(),
        "--volume-id",
        EXPAND_VOLUME_ID,
    ])
    .ok();
    harness::detach_all(&backing);
    let original = bed.dir.join("original.img");
    harness::sparse_copy(&backing, &original);

    let logged = Logged::start(&bed, &backing, case.size + 256 * MIB);
    let name = "cc-work";
    bed.track_name(name);
    let report = bed
        .sealcsi(&["volume", "open", logged.dev(), "--name", name])
        .ok()
        .json();
    let device = PathBuf::from(report["device"].as_str().expect("open report has a device"));
    let mnt = bed.mount(&device, case.fs.arg()).unwrap();
    let mut steps = Steps::new(&logged);
    let mut ledger = FileLedger::default();

    let s = steps.begin();
    let a = pattern(31, 64 * 1024);
    create_with(&mnt.join("a"), &a, 0).sync_all().unwrap();
    fsync_dir(&mnt);
    ledger.record(s, "a", Some(a.clone()));
    steps.ack(s);
    let s = steps.begin();
    let b = pattern(32, MIB as usize);
    create_with(&mnt.join("b"), &b, 0).sync_all().unwrap();
    fsync_dir(&mnt);
    ledger.record(s, "b", Some(b));
    steps.ack(s);
    // Never acknowledged: dirty in the page cache while the volume grows.
    let s = steps.begin();
    let c = pattern(33, 40 * 1024);
    create_with(&mnt.join("c"), &c, 0);
    ledger.record(s, "c", Some(c));
    let mut a2 = a;
    let head = pattern(34, 8 * 1024);
    a2[..head.len()].copy_from_slice(&head);
    OpenOptions::new()
        .write(true)
        .open(mnt.join("a"))
        .unwrap()
        .write_all_at(&head, 0)
        .unwrap();
    ledger.record(s, "a", Some(a2));

    // NodeExpandVolume: the backing file grows (Store::grow_backing: set_len, sync), the loop
    // device re-reads its size (here: the log-writes device over it, a second log phase), ...
    let grow = steps.begin();
    grow_file(&backing, case.grown);
    logged.grow(case.grown * 2 + 256 * MIB);
    steps.ack(grow);
    // (The marks of `grow` bracket the swap: begin in the first phase, ack in the second.)
    // ... the pending init is recorded, the mapping grows and its new space is initialized, the
    // record is cleared ...
    let old_top = engine.size_bytes(name).unwrap();
    let expand = steps.begin();
    let binding = sealcsi::header::volume_binding(EXPAND_VOLUME_ID);
    let bytes = engine
        .expand(name, &logged.device, expand_expected(&binding))
        .unwrap_or_else(|e| panic!("expand: {e}"));
    engine
        .init_new_space(name, old_top, bytes)
        .unwrap_or_else(|e| panic!("init_new_space: {e}"));
    steps.ack(expand);
    // ... and the filesystem grows.
    let fs_before = fs_bytes(&mnt);
    let resize = steps.begin();
    engine
        .grow_fs(fs_kind(case.fs), &device, &mnt)
        .unwrap_or_else(|e| panic!("grow_fs: {e}"));
    steps.ack(resize);
    println!("steps: grow {grow}, expand {expand}, resize {resize}");
    let sizes = ExpandSizes {
        old_top,
        new_top: bytes,
        grown_fs: fs_bytes(&mnt),
    };
    println!(
        "expanded: top {} -> {} bytes, filesystem {fs_before} -> {} bytes",
        sizes.old_top, sizes.new_top, sizes.grown_fs
    );
    assert!(
        sizes.new_top > sizes.old_top && sizes.grown_fs > fs_before,
        "the volume or its filesystem did not grow"
    );

    // A file in the grown filesystem, acknowledged.
    let s = steps.begin();
    let d = pattern(35, 2 * MIB as usize);
    create_with(&mnt.join("d"), &d, 0).sync_all().unwrap();
    fsync_dir(&mnt);
    ledger.record(s, "d", Some(d));
    steps.ack(s);
    bed.umount(&mnt);
    bed.close(name, None);
    let phases = logged.finish_phases();

    let logs: Vec<&Log> = phases.iter().map(|ph| &ph.log).collect();
    let refs: Vec<(&Log, &Path, u64)> = phases
        .iter()
        .map(|ph| (&ph.log, ph.file.as_path(), ph.device_bytes))
        .collect();
    let mut all = Vec::new();
    for (phase, ph) in phases.iter().enumerate() {
        for point in logwrites::replay_points(&ph.log.entries, between()) {
            all.push(PhasePoint { phase, point });
        }
    }
    let points = harness::select_points(all, case.budget, |pp| {
        matches!(pp.point.kind, PointKind::Start | PointKind::End)
    });
    let at = ExpandCheck {
        bed: &bed,
        engine: &engine,
        case,
        sizes: &sizes,
        expand_step: expand,
        resize_step: resize,
        ledger: &ledger,
    };
    let tally = harness::replay_phases(&bed, &original, &refs, &points, |pp, images| {
        let progress = Progress::at_phase(&logs, pp);
        check_expanded(&at, images.writable(), &progress)
            .map_err(|why| format!("{why}\n--- at this point: {}", progress.describe()))
    });
    let last = phases.len() - 1;
    let end = Progress::at_phase(
        &logs,
        &PhasePoint {
            phase: last,
            point: Point {
                applied: phases[last].log.entries.len(),
                kind: PointKind::End,
            },
        },
    );
    negative_control(&bed, &original, |image| check_expanded(&at, image, &end));
    tally
}

/// At one point: the volume opens with the node's key at the old or the new size (the new one once
/// the mapping's growth was acknowledged), the filesystem mounts and every file reads back as the
/// ledger allows, fsck is clean (inside xfs_growfs: clean but for secondary superblocks behind the
/// primary, see [`xfs_secondaries_behind`]); then NodeExpandVolume retried on that state (file grown, mapping
/// grown, new space initialized from where the node's pending-init record would say, filesystem
/// grown) completes at the workload's sizes, the files are still as allowed and fsck is clean. No
/// AEAD error in the kernel log anywhere.
fn check_expanded(at: &ExpandCheck, image: &Path, progress: &Progress) -> Result<(), String> {
    use sealcsi::node::VolumeEngine;
    let ExpandCheck {
        bed,
        engine,
        case,
        sizes,
        expand_step,
        resize_step,
        ledger,
    } = *at;
    let check = harness::CHECK_NAME;
    harness::check_opened(bed, image, Tolerance::default(), |device| {
        let top = engine.size_bytes(check).map_err(|e| e.to_string())?;
        if top != sizes.old_top && top != sizes.new_top {
            return Err(format!(
                "opens at {top} bytes, neither the old size ({}) nor the new ({})",
                sizes.old_top, sizes.new_top
            ));
        }
        if progress.acked.contains(&expand_step) && top != sizes.new_top {
            return Err(format!(
                "opens at {top} bytes after the growth of the mapping was acknowledged ({})",
                sizes.new_top
            ));
        }
        // The state the crash left (after the filesystem's journal replay at mount).
        harness::with_mount(bed, device, case.fs, |mnt| ledger.check(mnt, progress))?;
        let growing_fs =
            progress.begun.contains(&resize_step) && !progress.acked.contains(&resize_step);
        match harness::fsck(device, case.fs) {
            Ok(()) => {}
            // Inside xfs_growfs, between the kernel's commit of the new geometry and its rewrite of
            // the secondary superblocks, xfs_repair refuses the disagreement (the kernel mounts and
            // uses the filesystem). The growth was not acknowledged, so the CO retries it, and the
            // retry must leave fsck clean (checked below). Nothing else is allowed there either.
            Err(why) if growing_fs && xfs_secondaries_behind(case.fs, &why) => {
                println!("inside the filesystem's growth, before the retry: {why}");
            }
            Err(why) => return Err(why),
        }
        // The retry. Node::expand records the pending init before the mapping grows and clears it
        // once the new space is initialized: inside that window the record says the old size.
        let pending =
            progress.begun.contains(&expand_step) && !progress.acked.contains(&expand_step);
        grow_file(image, case.grown);
        let from = if pending { sizes.old_top.min(top) } else { top };
        harness::with_mount(bed, device, case.fs, |mnt| {
            let bytes = expand_stack(engine, check, image, from, case.fs, mnt)
                .map_err(|e| format!("retried expansion: {e}"))?;
            let grown_fs = fs_bytes(mnt);
            if bytes != sizes.new_top || grown_fs != sizes.grown_fs {
                return Err(format!(
                    "retried expansion: top {bytes} bytes, filesystem {grown_fs}; the workload's: \
                     {}, {}",
                    sizes.new_top, sizes.grown_fs
                ));
            }
            ledger
                .check(mnt, progress)
                .map_err(|e| format!("after the retried expansion: {e}"))
        })?;
        harness::fsck(device, case.fs).map_err(|e| format!("after the retried expansion: {e}"))
    })
}

/// xfs_repair's refusal of a primary superblock newer than the secondaries (and nothing else).
fn xfs_secondaries_behind(fs: Fs, fsck_output: &str) -> bool {
    fs == Fs::Xfs && fsck_output.contains("Primary superblock would have been modified")
}

#[test]
#[ignore = "guest: needs device-mapper, run via tests/vm/run-in-guest.sh"]
fn guest_crash_expand() {
    run_cases(
        EXPAND_CASES,
        REDUCED_EXPAND_CASES,
        |c| c.label,
        expand_workload,
    );
}
