//! The guest harness of the crash-consistency suite: a backing file seen through dm-log-writes
//! (backing file -> loop -> log-writes, logging to a second loop device), sealcsi's stack on top,
//! and the replay of the recorded log onto a copy of the original backing file, checked point by
//! point.
#![allow(dead_code)]

use std::cell::{Cell, RefCell};
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use serde_json::Value;

use super::common::{BIN, Out, p, run, sh};
use super::logwrites::{self, Log, Point, PointKind, Replayer};

pub const AEAD_ERROR: &str = "INTEGRITY AEAD ERROR";
pub const EXIT_INVALID_HEADER: i32 = 4;
/// The simulated node every workload runs as (its sealing seed lives in the bed's state dir).
pub const IDENTITY: &str = "node-a";

/// One test's scratch directory and simulated node; undoes what it set up when dropped.
pub struct Bed {
    pub dir: PathBuf,
    pub state: PathBuf,
    names: RefCell<Vec<String>>,
    loops: RefCell<Vec<String>>,
    mounts: RefCell<Vec<PathBuf>>,
}

impl Bed {
    pub fn new(test: &str) -> Self {
        assert_eq!(
            std::env::var("SEALCSI_IN_GUEST").as_deref(),
            Ok("1"),
            "guest test: run it via tests/vm/run-in-guest.sh"
        );
        let root = PathBuf::from(std::env::var_os("SCRATCH").unwrap_or_else(|| "/scratch".into()));
        let dir = root.join(format!("guest-crash-{test}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        println!("== {test}");
        Bed {
            state: dir.join("state"),
            dir,
            names: RefCell::new(Vec::new()),
            loops: RefCell::new(Vec::new()),
            mounts: RefCell::new(Vec::new()),
        }
    }

    /// The sealcsi binary as the simulated node `identity`; the host's settings cannot leak in.
    pub fn sealcsi_as(&self, identity: &str, args: &[&str]) -> Out {
        let mut cmd = Command::new(BIN);
        cmd.env_remove("SEALCSI_TEE")
            .env_remove("SEALCSI_STATE_DIR")
            .env_remove("SEALCSI_SIM_IDENTITY")
            .env_remove("SEALCSI_LOG")
            .args(["--tee", "sim", "--state-dir"])
            .arg(&self.state)
            .args(["--sim-identity", identity])
            .args(args);
        run(
            cmd,
            format!("sealcsi --sim-identity {identity} {}", args.join(" ")),
        )
    }

    pub fn sealcsi(&self, args: &[&str]) -> Out {
        self.sealcsi_as(IDENTITY, args)
    }

    /// A sparse file of `size` bytes.
    pub fn file(&self, name: &str, size: u64) -> PathBuf {
        let path = self.dir.join(name);
        let _ = fs::remove_file(&path);
        File::create(&path).unwrap().set_len(size).unwrap();
        path
    }

    pub fn track_name(&self, name: &str) {
        self.names.borrow_mut().push(name.to_owned());
    }

    fn attach_loop(&self, file: &Path) -> String {
        let dev = sh("losetup", &["-f", "--show", p(file)])
            .ok()
            .stdout
            .trim()
            .to_owned();
        self.loops.borrow_mut().push(dev.clone());
        dev
    }

    fn detach_loop(&self, dev: &str) {
        sh("losetup", &["-d", dev]).ok();
        self.loops.borrow_mut().retain(|d| d != dev);
    }

    pub fn mount(&self, device: &Path, fs: &str) -> Result<PathBuf, String> {
        let mnt = self.dir.join("mnt");
        fs::create_dir_all(&mnt).unwrap();
        let out = sh("mount", &["-t", fs, p(device), p(&mnt)]);
        if out.code != 0 {
            return Err(format!("mount failed: {out}"));
        }
        self.mounts.borrow_mut().push(mnt.clone());
        Ok(mnt)
    }

    pub fn umount(&self, mnt: &Path) {
        sh("umount", &[p(mnt)]).ok();
        self.mounts.borrow_mut().retain(|m| m != mnt);
    }

    /// Closes a sealcsi mapping and detaches any loop device still holding `image`.
    pub fn close(&self, name: &str, image: Option<&Path>) {
        self.sealcsi(&["volume", "close", name]).ok();
        self.names.borrow_mut().retain(|n| n != name);
        if let Some(image) = image {
            detach_all(image);
        }
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        for mnt in self.mounts.borrow().iter().rev() {
            let _ = sh("umount", &["-l", p(mnt)]);
        }
        for name in self.names.borrow().iter().rev() {
            let _ = self.sealcsi(&["volume", "close", name]);
            let _ = sh("dmsetup", &["remove", "--retry", name]);
        }
        for dev in self.loops.borrow().iter().rev() {
            let _ = sh("losetup", &["-d", dev]);
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Detaches every loop device attached to `file` (sealcsi attaches image files itself).
pub fn detach_all(file: &Path) {
    let out = sh("losetup", &["-j", p(file)]).ok();
    for line in out.stdout.lines() {
        if let Some((dev, _)) = line.split_once(':') {
            let _ = sh("losetup", &["-d", dev]);
        }
    }
}

/// A sparse copy (`cp --sparse=always`): the replay's fresh copy of the original device.
pub fn sparse_copy(from: &Path, to: &Path) {
    let _ = fs::remove_file(to);
    sh("cp", &["--sparse=always", p(from), p(to)]).ok();
}

/// The kernel log since the last call (read and cleared, so that each check sees only its own
/// lines and a long run cannot wrap the ring buffer under a counter).
pub fn take_kernel_log() -> Vec<String> {
    sh("dmesg", &["-c"])
        .ok()
        .stdout
        .lines()
        .map(str::to_owned)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Recording
// ---------------------------------------------------------------------------------------------

/// A backing file behind dm-log-writes; `device` is what the workload formats or opens.
///
/// The log has one phase per table of the target: [`Logged::grow`] loads a new table over the grown
/// backing file that logs to a fresh log device, because a new log-writes instance starts its log
/// over at the first entry (and the old one, destroyed at the swap, finishes its own log with the
/// writes it had not yet logged and its end mark).
pub struct Logged<'a> {
    bed: &'a Bed,
    pub name: String,
    pub device: PathBuf,
    data_loop: String,
    /// Per phase: the log's loop device and file, and the backing device's size under its table.
    logs: RefCell<Vec<(String, PathBuf, u64)>>,
}

/// One phase of a recorded log: what one log-writes table logged, and the size of the backing
/// device under that table (the replay target is grown to it before the phase's first entry).
pub struct Phase {
    pub log: Log,
    pub file: PathBuf,
    pub device_bytes: u64,
}

/// Fails loudly if the target is missing rather than letting a workload run unlogged.
fn require_log_writes() {
    sh("modprobe", &["dm-log-writes"]).ok();
    assert!(
        Path::new("/sys/module/dm_log_writes").exists(),
        "dm-log-writes is not loaded in the guest kernel"
    );
}

impl<'a> Logged<'a> {
    /// Starts logging every write to `backing` into a sparse log file of `log_size` bytes.
    pub fn start(bed: &'a Bed, backing: &Path, log_size: u64) -> Self {
        require_log_writes();
        let name = format!("cc-lw-{}", bed.dir.file_name().unwrap().to_str().unwrap());
        let log_file = bed.file("writes.log", log_size);
        let data_loop = bed.attach_loop(backing);
        let log_loop = bed.attach_loop(&log_file);
        let (table, device_bytes) = log_table(&data_loop, &log_loop);
        sh("dmsetup", &["create", &name, "--table", &table]).ok();
        bed.track_name(&name);
        // No udev in the guest: make /dev/mapper/<name> ourselves.
        sh("dmsetup", &["mknodes", &name]).ok();
        let device = Path::new("/dev/mapper").join(&name);
        assert!(
            fs::metadata(&device).is_ok_and(|m| m.file_type().is_block_device()),
            "{} is not a block device",
            device.display()
        );
        Logged {
            bed,
            name,
            device,
            data_loop,
            logs: RefCell::new(vec![(log_loop, log_file, device_bytes)]),
        }
    }

    /// The backing file has grown (the caller set its length and synced it): makes the loop device
    /// re-read its size and swaps in a log-writes table of the new size that logs to a new log
    /// file of `log_size` bytes. The swap suspends the target, which waits for the writes in
    /// flight; the old table's destructor logs its unflushed writes and its end mark before the
    /// resume returns, so every write that reaches the backing file is in exactly one phase, in
    /// completion order.
    pub fn grow(&self, log_size: u64) {
        sh("losetup", &["-c", &self.data_loop]).ok();
        let n = self.logs.borrow().len();
        let log_file = self.bed.file(&format!("writes-{n}.log"), log_size);
        let log_loop = self.bed.attach_loop(&log_file);
        let (table, device_bytes) = log_table(&self.data_loop, &log_loop);
        sh("dmsetup", &["reload", &self.name, "--table", &table]).ok();
        sh("dmsetup", &["resume", &self.name]).ok();
        self.logs
            .borrow_mut()
            .push((log_loop, log_file, device_bytes));
    }

    pub fn dev(&self) -> &str {
        p(&self.device)
    }

    /// Inserts a label into the log, after every write that completed before it.
    pub fn mark(&self, label: &str) {
        sh("dmsetup", &["message", &self.name, "0", "mark", label]).ok();
    }

    /// Removes the target (which appends the end mark and writes the final super), detaches
    /// the loop devices and parses the log of a workload that never grew the device.
    pub fn finish(self) -> (Log, PathBuf) {
        let mut phases = self.finish_phases();
        assert_eq!(phases.len(), 1, "a grown device's log has several phases");
        let phase = phases.pop().unwrap();
        (phase.log, phase.file)
    }

    /// Like [`Logged::finish`], for a log of one or more phases (see [`Logged::grow`]).
    pub fn finish_phases(self) -> Vec<Phase> {
        sh("dmsetup", &["remove", "--retry", &self.name]).ok();
        self.bed.names.borrow_mut().retain(|n| *n != self.name);
        self.bed.detach_loop(&self.data_loop);
        let logs = self.logs.take();
        let mut phases = Vec::new();
        for (log_loop, log_file, device_bytes) in logs {
            self.bed.detach_loop(&log_loop);
            let file = File::open(&log_file).unwrap();
            let log = logwrites::parse(&file)
                .unwrap_or_else(|e| panic!("parsing {}: {e}", log_file.display()));
            assert!(
                matches!(log.entries.last().map(|e| &e.op), Some(logwrites::Op::Mark(m)) if m == logwrites::END_MARK),
                "the log does not end with the target's end mark: the log device filled up?"
            );
            print_summary(&log);
            phases.push(Phase {
                log,
                file: log_file,
                device_bytes,
            });
        }
        phases
    }
}

/// The log-writes table over all of `data_loop`, and the size in bytes it maps.
fn log_table(data_loop: &str, log_loop: &str) -> (String, u64) {
    let sectors: u64 = sh("blockdev", &["--getsz", data_loop])
        .ok()
        .stdout
        .trim()
        .parse()
        .expect("blockdev --getsz prints a number");
    (
        format!("0 {sectors} log-writes {data_loop} {log_loop}"),
        sectors * 512,
    )
}

fn print_summary(log: &Log) {
    let count = |f: u64| log.entries.iter().filter(|e| e.flags & f != 0).count();
    let bytes: u64 = log
        .entries
        .iter()
        .filter(|e| matches!(e.op, logwrites::Op::Write { .. }))
        .map(|e| e.nr_sectors * u64::from(log.sector_size))
        .sum();
    println!(
        "log: {} entries, {} flushes, {} FUA, {} marks, {} discards, {} MiB of writes",
        log.entries.len(),
        count(logwrites::FLUSH),
        count(logwrites::FUA),
        count(logwrites::MARK),
        count(logwrites::DISCARD),
        bytes >> 20
    );
}

// ---------------------------------------------------------------------------------------------
// Replaying
// ---------------------------------------------------------------------------------------------

/// What a replay run found.
#[derive(Default)]
pub struct Tally {
    pub points: usize,
    pub durable: usize,
    pub between: usize,
    pub failures: Vec<String>,
    pub seconds: f64,
}

impl Tally {
    pub fn line(&self, workload: &str) -> String {
        format!(
            "CRASH-RESULT {workload}: {} replay points ({} at flush/FUA, {} between), {} failures, {:.1}s",
            self.points,
            self.durable,
            self.between,
            self.failures.len(),
            self.seconds
        )
    }
}

/// SEALCSI_CRASH_FULL=1: every workload, every flush/FUA point and three points inside each run
/// of unflushed writes. Otherwise the reduced (CI) set: fewer workloads, one point inside each
/// run, and a sample of the points (see [`select_points`]).
pub fn full_set() -> bool {
    std::env::var("SEALCSI_CRASH_FULL").as_deref() == Ok("1")
}

/// The points to check: all of them in the full set; in the reduced set every point `keep`
/// insists on plus an evenly spaced sample of the rest, `budget` in all (or `keep`'s count if
/// that is more).
pub fn select_points<P>(all: Vec<P>, budget: usize, keep: impl Fn(&P) -> bool) -> Vec<P> {
    if full_set() || all.len() <= budget {
        return all;
    }
    let kept = all.iter().filter(|p| keep(p)).count();
    let others = all.len() - kept;
    let room = budget.saturating_sub(kept);
    let mut seen = 0;
    all.into_iter()
        .filter(|p| {
            if keep(p) {
                return true;
            }
            seen += 1;
            // Take the k-th of `others` when k * room / others crosses an integer.
            room > 0 && (seen * room) / others != ((seen - 1) * room) / others
        })
        .collect()
}

/// The replayed state at one point, for a check.
pub struct Images<'a> {
    replay: &'a Path,
    scratch: &'a Path,
    copied: Cell<bool>,
}

impl Images<'_> {
    /// A throw-away copy of the state, for checks that write (open, mount, format).
    pub fn writable(&self) -> &Path {
        if !self.copied.replace(true) {
            sparse_copy(self.replay, self.scratch);
        }
        self.scratch
    }

    /// The replayed state itself, for checks that only read (an open that must be refused reads
    /// the header and nothing else: tests/guest_volume.rs checks that it leaves the file as it
    /// was). Saves copying the image at each of the many points before format's header.
    pub fn read_only(&self) -> &Path {
        self.replay
    }
}

/// Replays `log` onto a fresh copy of `original` and calls `check` on a throw-away copy of the
/// state at every replay point (opening a volume replays dm-integrity's journal and mounting
/// replays the filesystem's, so checks must not touch the replay itself).
pub fn replay_each(
    bed: &Bed,
    original: &Path,
    log: &Log,
    log_file: &Path,
    points: &[Point],
    mut check: impl FnMut(&Point, &Images) -> Result<(), String>,
) -> Tally {
    let size = fs::metadata(original).unwrap().len();
    let points: Vec<PhasePoint> = points
        .iter()
        .map(|point| PhasePoint {
            phase: 0,
            point: point.clone(),
        })
        .collect();
    replay_phases(
        bed,
        original,
        &[(log, log_file, size)],
        &points,
        |pp, images| check(&pp.point, images),
    )
}

/// A replay point of a log of several phases ([`Logged::grow`]): every entry of the phases
/// before `phase` replayed, then the first `point.applied` entries of `phase`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PhasePoint {
    pub phase: usize,
    pub point: Point,
}

/// [`replay_each`] for a log of phases, each given as (log, log file, backing device size): the
/// replay target grows to a phase's device size before that phase's first entry (the backing
/// file grew, durably, before its table was loaded). `points` are in replay order.
pub fn replay_phases(
    bed: &Bed,
    original: &Path,
    phases: &[(&Log, &Path, u64)],
    points: &[PhasePoint],
    mut check: impl FnMut(&PhasePoint, &Images) -> Result<(), String>,
) -> Tally {
    let started = Instant::now();
    let replay = bed.dir.join("replay.img");
    let image = bed.dir.join("check.img");
    sparse_copy(original, &replay);
    let target = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&replay)
        .unwrap();
    let srcs: Vec<File> = phases
        .iter()
        .map(|(_, file, _)| File::open(file).unwrap())
        .collect();
    let grow_to = |size: u64| {
        if target.metadata().unwrap().len() < size {
            target.set_len(size).unwrap();
        }
    };
    let mut phase = 0;
    grow_to(phases[0].2);
    let mut replayer = Replayer::new(phases[0].0, &srcs[0], &target).unwrap();
    let mut tally = Tally::default();
    for pp in points {
        assert!(
            pp.phase >= phase && pp.phase < phases.len(),
            "points in order"
        );
        while phase < pp.phase {
            let all = phases[phase].0.entries.len();
            replayer
                .advance_to(all)
                .unwrap_or_else(|e| panic!("replaying phase {phase}: {e}"));
            phase += 1;
            grow_to(phases[phase].2);
            replayer = Replayer::new(phases[phase].0, &srcs[phase], &target).unwrap();
        }
        let point = &pp.point;
        replayer
            .advance_to(point.applied)
            .unwrap_or_else(|e| panic!("replaying up to entry {}: {e}", point.applied));
        let images = Images {
            replay: &replay,
            scratch: &image,
            copied: Cell::new(false),
        };
        tally.points += 1;
        match point.kind {
            PointKind::Durable => tally.durable += 1,
            PointKind::Between => tally.between += 1,
            PointKind::Start | PointKind::End => {}
        }
        if let Err(why) = check(pp, &images) {
            let at = if phases.len() > 1 {
                format!(" of phase {}", pp.phase)
            } else {
                String::new()
            };
            let msg = format!(
                "point {:?} after {} entries{at}: {why}",
                point.kind, point.applied
            );
            println!("FAILURE: {msg}");
            tally.failures.push(msg);
        }
        // Long full-set cases (thousands of points) show how far they got.
        if tally.points % 200 == 0 {
            println!(
                "progress: {} of {} points, {} failures, {:.0}s",
                tally.points,
                points.len(),
                tally.failures.len(),
                started.elapsed().as_secs_f64()
            );
        }
    }
    let _ = fs::remove_file(&image);
    let _ = fs::remove_file(&replay);
    tally.seconds = started.elapsed().as_secs_f64();
    tally
}

// ---------------------------------------------------------------------------------------------
// Checking one point
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Fs {
    Ext4,
    Xfs,
    None,
}

impl Fs {
    pub fn arg(self) -> &'static str {
        match self {
            Fs::Ext4 => "ext4",
            Fs::Xfs => "xfs",
            Fs::None => "none",
        }
    }
}

/// What a check of an opened volume may tolerate.
#[derive(Clone, Copy, Default)]
pub struct Tolerance {
    /// Direct mode between durability points: blocks written since the last flush may be torn,
    /// so AEAD errors on them are allowed (the caller checks acknowledged data separately).
    pub aead_errors: bool,
}

/// The name the checks open replayed images under.
pub const CHECK_NAME: &str = "cc-check";

/// Opens `image` with the node's key; mounts it (which replays the filesystem journal), runs
/// `verify` on the mount point (or on the raw device for `Fs::None`), unmounts, runs the
/// read-only fsck, and closes. The kernel log must gain no AEAD error unless tolerated.
pub fn check_volume(
    bed: &Bed,
    image: &Path,
    fs: Fs,
    tolerance: Tolerance,
    verify: impl FnOnce(&Path) -> Result<(), String>,
) -> Result<(), String> {
    check_opened(bed, image, tolerance, |device| {
        mount_verify_fsck(bed, device, fs, verify)
    })
}

/// Opens `image` with the node's key as [`CHECK_NAME`], runs `body` on the open device, closes.
/// The kernel log must gain no AEAD error unless tolerated.
pub fn check_opened(
    bed: &Bed,
    image: &Path,
    tolerance: Tolerance,
    body: impl FnOnce(&Path) -> Result<(), String>,
) -> Result<(), String> {
    take_kernel_log();
    let out = bed.sealcsi(&["volume", "open", p(image), "--name", CHECK_NAME]);
    if out.code != 0 {
        return Err(format!("open failed: {out}"));
    }
    bed.track_name(CHECK_NAME);
    let report = out.json();
    let device = PathBuf::from(report["device"].as_str().expect("open report has a device"));
    // Read-ahead would read never-written blocks next to metadata (docs/init.md).
    sh("blockdev", &["--setra", "0", p(&device)]).ok();
    let result = body(&device);
    bed.close(CHECK_NAME, Some(image));
    let kernel = take_kernel_log();
    let aead: Vec<&str> = kernel
        .iter()
        .map(String::as_str)
        .filter(|l| l.contains(AEAD_ERROR))
        .collect();
    result.map_err(|why| format!("{why}\n--- kernel log:\n{}", relevant(&kernel)))?;
    if !aead.is_empty() && !tolerance.aead_errors {
        return Err(format!(
            "kernel log gained AEAD errors:\n{}",
            aead.join("\n")
        ));
    }
    Ok(())
}

fn mount_verify_fsck(
    bed: &Bed,
    device: &Path,
    fs: Fs,
    verify: impl FnOnce(&Path) -> Result<(), String>,
) -> Result<(), String> {
    if fs == Fs::None {
        return verify(device);
    }
    with_mount(bed, device, fs, verify)?;
    fsck(device, fs)
}

/// Mounts `device`, runs `f` on the mount point, unmounts (whatever `f` returned).
pub fn with_mount<R>(
    bed: &Bed,
    device: &Path,
    fs: Fs,
    f: impl FnOnce(&Path) -> Result<R, String>,
) -> Result<R, String> {
    let mnt = bed.mount(device, fs.arg())?;
    let result = f(&mnt);
    bed.umount(&mnt);
    result
}

/// The read-only fsck of an unmounted filesystem (`e2fsck -fn`, `xfs_repair -n`): clean or why not.
pub fn fsck(device: &Path, fs: Fs) -> Result<(), String> {
    let out = match fs {
        Fs::Ext4 => sh("e2fsck", &["-fn", p(device)]),
        Fs::Xfs => sh("xfs_repair", &["-n", p(device)]),
        Fs::None => return Ok(()),
    };
    if out.code != 0 {
        return Err(format!("fsck not clean: {out}"));
    }
    Ok(())
}

/// The kernel log lines that explain a failed check (filesystem, journal, integrity, I/O).
fn relevant(kernel: &[String]) -> String {
    const WORDS: [&str; 7] = [
        "EXT4",
        "XFS",
        "JBD2",
        "AEAD",
        "I/O error",
        "integrity",
        "crypt",
    ];
    let lines: Vec<&str> = kernel
        .iter()
        .filter(|l| WORDS.iter().any(|w| l.contains(w)))
        .map(String::as_str)
        .take(20)
        .collect();
    lines.join("\n")
}

/// `volume inspect` of an image (needs no key).
pub fn inspect(bed: &Bed, image: &Path) -> Result<Value, String> {
    let out = bed.sealcsi(&["volume", "inspect", p(image)]);
    detach_all(image);
    if out.code != 0 {
        return Err(format!("inspect failed: {out}"));
    }
    Ok(out.json())
}

/// Prints the tally line and fails the test if any point failed.
pub fn report(workload: &str, tally: &Tally) {
    println!("{}", tally.line(workload));
    assert!(
        tally.failures.is_empty(),
        "{workload}: {} of {} replay points failed:\n{}",
        tally.failures.len(),
        tally.points,
        tally.failures.join("\n")
    );
}
