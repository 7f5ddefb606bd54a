//! Guest tests of the `sealcsi volume` CLI: the real binary, the real kernel (dm-crypt over
//! dm-integrity, loop devices), real filesystems.
//!
//! They need root, loop devices and device-mapper, so they are ignored in a plain `cargo test`.
//! Run them in the guest VM:
//!
//! ```text
//! cargo test --test guest_volume --no-run      # prints the test binary's path
//! tests/vm/run-in-guest.sh --timeout 1500 -- <binary> --ignored --test-threads=1 --nocapture
//! ```
//!
//! Every test has its own directory under `$SCRATCH` (default /scratch) holding its sparse backing
//! files and its simulated-TEE state dir, and its own device-mapper names (`gv<N>-...`). A
//! [`Fixture`] unmounts and closes whatever the test opened, even when the test panics.

use std::cell::RefCell;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest, Sha256};

mod common;
use common::{BIN, MIB, Out, p, run, sh, workqueue_flags};

const KIB4: usize = 4096;
const GIB: u64 = 1 << 30;
const AEAD_ERROR: &str = "INTEGRITY AEAD ERROR";
/// Exit codes of the CLI.
const EXIT_WRONG_IDENTITY: i32 = 3;
const EXIT_INVALID_HEADER: i32 = 4;
const EXIT_BUSY: i32 = 5;
const EXIT_REFUSED: i32 = 6;

// ---------------------------------------------------------------------------------------------
// Running commands
// ---------------------------------------------------------------------------------------------

/// The sealcsi binary with an explicit simulated node (state dir + identity); the environment
/// fallbacks are removed so the host's settings cannot leak in.
fn sealcsi_cmd(state: &Path, identity: &str, args: &[&str]) -> (Command, String) {
    let mut cmd = Command::new(BIN);
    cmd.env_remove("SEALCSI_TEE")
        .env_remove("SEALCSI_STATE_DIR")
        .env_remove("SEALCSI_SIM_IDENTITY")
        .env_remove("SEALCSI_LOG")
        .args(["--tee", "sim", "--state-dir"])
        .arg(state)
        .args(["--sim-identity", identity])
        .args(args);
    let what = format!(
        "sealcsi --tee sim --state-dir {} --sim-identity {identity} {}",
        state.display(),
        args.join(" ")
    );
    (cmd, what)
}

fn sealcsi_as(state: &Path, identity: &str, args: &[&str]) -> Out {
    let (cmd, what) = sealcsi_cmd(state, identity, args);
    run(cmd, what)
}

// ---------------------------------------------------------------------------------------------
// System state
// ---------------------------------------------------------------------------------------------

/// Names of all device-mapper devices.
fn dm_names() -> Vec<String> {
    let out = sh("dmsetup", &["ls"]).ok();
    out.stdout
        .lines()
        .filter(|l| !l.contains("No devices found"))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// Loop devices attached to `file` (`losetup -j` output).
fn loops_of(file: &Path) -> String {
    sh("losetup", &["-j", p(file)])
        .ok()
        .stdout
        .trim()
        .to_owned()
}

#[track_caller]
fn assert_stack_absent(name: &str) {
    let names = dm_names();
    let integrity = format!("{name}-integrity");
    assert!(
        !names.iter().any(|n| n == name || *n == integrity),
        "device-mapper still has {name} or {integrity}: {names:?}"
    );
}

fn drop_caches() {
    let _ = sh("sync", &[]);
    let _ = fs::write("/proc/sys/vm/drop_caches", "3");
}

/// SHA-256 (hex) of a whole file, read from the disk (not from a stale page cache).
fn sha256_file(path: &Path) -> String {
    drop_caches();
    let out = sh("sha256sum", &[p(path)]).ok();
    out.stdout
        .split_whitespace()
        .next()
        .expect("sha256sum output")
        .to_owned()
}

fn aead_error_lines() -> Vec<String> {
    let out = sh("dmesg", &[]).ok();
    out.stdout
        .lines()
        .filter(|l| l.contains(AEAD_ERROR))
        .map(str::to_owned)
        .collect()
}

/// Watches the kernel log for new "INTEGRITY AEAD ERROR" lines, phase by phase.
struct AeadWatch {
    seen: usize,
    new: Vec<String>,
}

impl AeadWatch {
    fn start() -> Self {
        AeadWatch {
            seen: aead_error_lines().len(),
            new: Vec::new(),
        }
    }

    /// Records the lines that appeared since the last call, labelled with `phase`.
    fn phase(&mut self, phase: &str) {
        let lines = aead_error_lines();
        for line in lines.iter().skip(self.seen) {
            println!("kernel log during {phase}: {line}");
            self.new.push(format!("during {phase}: {line}"));
        }
        self.seen = lines.len();
    }

    /// A soft failure of `fx` for every new line seen.
    fn report(&self, fx: &Fixture) {
        if !self.new.is_empty() {
            fx.soft_fail(format!(
                "the kernel log gained {} '{AEAD_ERROR}' line(s) (reads of blocks nobody wrote?):\n{}",
                self.new.len(),
                self.new.join("\n")
            ));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The per-test fixture
// ---------------------------------------------------------------------------------------------

/// A test's scratch directory, simulated node and the devices it opened; cleans up on drop.
struct Fixture {
    dir: PathBuf,
    state: PathBuf,
    identity: String,
    names: RefCell<Vec<String>>,
    mounts: RefCell<Vec<PathBuf>>,
    files: RefCell<Vec<PathBuf>>,
    /// Failures recorded without stopping the test, so that its later steps still run.
    soft: RefCell<Vec<String>>,
}

impl Fixture {
    fn new(test: &str) -> Self {
        assert_eq!(
            std::env::var("SEALCSI_IN_GUEST").as_deref(),
            Ok("1"),
            "guest test: run it via tests/vm/run-in-guest.sh"
        );
        let root = PathBuf::from(std::env::var_os("SCRATCH").unwrap_or_else(|| "/scratch".into()));
        let dir = root.join(format!("guest-volume-{test}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        println!("== {test}");
        Fixture {
            state: dir.join("state"),
            dir,
            identity: "node-a".to_owned(),
            names: RefCell::new(Vec::new()),
            mounts: RefCell::new(Vec::new()),
            files: RefCell::new(Vec::new()),
            soft: RefCell::new(Vec::new()),
        }
    }

    /// A sparse file of `size` bytes.
    fn file(&self, name: &str, size: u64) -> PathBuf {
        let path = self.dir.join(name);
        let _ = fs::remove_file(&path);
        let f = File::create(&path).unwrap();
        f.set_len(size).unwrap();
        f.sync_all().unwrap();
        self.files.borrow_mut().push(path.clone());
        path
    }

    /// Records a failure and lets the test go on; [`Fixture::finish`] fails the test.
    fn soft_fail(&self, msg: String) {
        println!("SOFT FAILURE: {msg}");
        self.soft.borrow_mut().push(msg);
    }

    /// The file must not be attached to any loop device (soft check).
    fn expect_detached(&self, file: &Path, when: &str) {
        let loops = loops_of(file);
        if !loops.is_empty() {
            self.soft_fail(format!(
                "{when}: {} is still attached to a loop device: {loops}",
                file.display()
            ));
        }
    }

    /// Fails the test if any soft check failed.
    fn finish(&self) {
        let soft = self.soft.borrow();
        assert!(
            soft.is_empty(),
            "{} check(s) failed:\n{}",
            soft.len(),
            soft.join("\n")
        );
    }

    fn sealcsi(&self, args: &[&str]) -> Out {
        sealcsi_as(&self.state, &self.identity, args)
    }

    /// Formats `file` and returns the JSON report.
    fn format(&self, file: &Path, extra: &[&str]) -> Value {
        let mut args = vec!["volume", "format", p(file)];
        args.extend_from_slice(extra);
        let report = self.sealcsi(&args).ok().json();
        assert!(
            report["uuid"].as_str().is_some_and(|u| u.len() == 36),
            "format report without a uuid: {report}"
        );
        report
    }

    /// Remembers a dm name for cleanup.
    fn track(&self, name: &str) {
        let mut names = self.names.borrow_mut();
        if !names.iter().any(|n| n == name) {
            names.push(name.to_owned());
        }
    }

    /// Runs `volume open` (the outcome unchecked) and tracks the name.
    fn try_open(&self, file: &Path, name: &str) -> Out {
        self.track(name);
        self.sealcsi(&["volume", "open", p(file), "--name", name])
    }

    /// Opens `file` as /dev/mapper/`name` (fresh open) and returns the device.
    #[track_caller]
    fn open(&self, file: &Path, name: &str) -> PathBuf {
        let report = self.try_open(file, name).ok().json();
        let device = PathBuf::from(report["device"].as_str().expect("open report has a device"));
        assert_eq!(
            device,
            Path::new("/dev/mapper").join(name),
            "open report: {report}"
        );
        assert_eq!(
            report["already_open"],
            Value::Bool(false),
            "open report: {report}"
        );
        assert!(
            fs::metadata(&device).is_ok_and(|m| m.file_type().is_block_device()),
            "{} is not a block device after open",
            device.display()
        );
        device
    }

    /// Closes `name`; returns the `closed` field.
    #[track_caller]
    fn close(&self, name: &str) -> bool {
        let report = self.sealcsi(&["volume", "close", name]).ok().json();
        assert_eq!(report["name"], Value::from(name), "close report: {report}");
        report["closed"]
            .as_bool()
            .expect("close report has closed: bool")
    }

    fn mount(&self, device: &Path) -> PathBuf {
        let mnt = self.dir.join("mnt");
        fs::create_dir_all(&mnt).unwrap();
        sh("mount", &[p(device), p(&mnt)]).ok();
        self.mounts.borrow_mut().push(mnt.clone());
        mnt
    }

    fn umount(&self, mnt: &Path) {
        sh("umount", &[p(mnt)]).ok();
        self.mounts.borrow_mut().retain(|m| m != mnt);
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let mut mounted = false;
        for mnt in self.mounts.borrow().iter().rev() {
            if sh("umount", &[p(mnt)]).code != 0 && sh("umount", &["-l", p(mnt)]).code != 0 {
                mounted = true;
            }
        }
        for name in self.names.borrow().iter().rev() {
            let _ = self.sealcsi(&["volume", "close", name]);
            for n in [name.clone(), format!("{name}-integrity")] {
                if dm_names().contains(&n) {
                    eprintln!(
                        "cleanup: `sealcsi volume close {name}` left {n}; removing it with dmsetup"
                    );
                    let _ = sh("dmsetup", &["remove", "--retry", &n]);
                }
            }
        }
        for file in self.files.borrow().iter() {
            for line in loops_of(file).lines() {
                if let Some((dev, _)) = line.split_once(':') {
                    let _ = sh("losetup", &["-d", dev]);
                }
            }
        }
        if !mounted {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Direct I/O and patterns
// ---------------------------------------------------------------------------------------------

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

fn device_size(f: &mut File) -> u64 {
    let size = f.seek(SeekFrom::End(0)).unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    size
}

/// The 4 KiB of pattern `seed` for block `block`: distinct per block, so a block served from the
/// wrong place is noticed too.
fn pattern_block(seed: u64, block: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(KIB4);
    let mut x =
        seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ block.wrapping_mul(0xD1B5_4A32_D192_ED03);
    for _ in 0..KIB4 / 8 {
        // splitmix64
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out
}

/// Writes pattern `seed` over blocks `0..blocks` of `device` with O_DIRECT, 1 MiB at a time.
fn write_pattern(device: &Path, seed: u64, blocks: u64) {
    let f = open_direct(device, true);
    let mut buf = Aligned::new(MIB as usize);
    let per_chunk = MIB / KIB4 as u64;
    let mut block = 0;
    while block < blocks {
        let n = per_chunk.min(blocks - block);
        let chunk = buf.get(n as usize * KIB4);
        for i in 0..n {
            let at = i as usize * KIB4;
            chunk[at..at + KIB4].copy_from_slice(&pattern_block(seed, block + i));
        }
        f.write_all_at(chunk, block * KIB4 as u64)
            .unwrap_or_else(|e| panic!("writing blocks at {block} of {}: {e}", device.display()));
        block += n;
    }
    f.sync_all().unwrap();
}

/// Reads one 4 KiB block with O_DIRECT.
fn read_block(f: &File, block: u64) -> std::io::Result<Vec<u8>> {
    let mut buf = Aligned::new(KIB4);
    let b = buf.get(KIB4);
    f.read_exact_at(b, block * KIB4 as u64)?;
    Ok(b.to_vec())
}

/// Reads every block of `device` with O_DIRECT (1 MiB at a time, block by block where a chunk
/// fails) and checks each against `expected(block)`. Returns the blocks that failed to read (with
/// their errno); panics on a block that reads but differs.
fn scan_device(device: &Path, expected: &dyn Fn(u64) -> Vec<u8>) -> Vec<(u64, i32)> {
    let mut f = open_direct(device, false);
    let size = device_size(&mut f);
    let blocks = size / KIB4 as u64;
    let per_chunk = MIB / KIB4 as u64;
    let mut buf = Aligned::new(MIB as usize);
    let mut failed = Vec::new();
    let mut block = 0;
    while block < blocks {
        let n = per_chunk.min(blocks - block);
        let chunk = buf.get(n as usize * KIB4);
        let whole = f.read_exact_at(chunk, block * KIB4 as u64).is_ok();
        for i in 0..n {
            let b = block + i;
            let data = if whole {
                chunk[i as usize * KIB4..(i as usize + 1) * KIB4].to_vec()
            } else {
                match read_block(&f, b) {
                    Ok(data) => data,
                    Err(e) => {
                        failed.push((b, e.raw_os_error().unwrap_or(-1)));
                        continue;
                    }
                }
            };
            assert!(
                data == expected(b),
                "block {b} of {} read successfully but holds different data",
                device.display()
            );
        }
        block += n;
    }
    failed
}

// ---------------------------------------------------------------------------------------------
// Backing-file surgery
// ---------------------------------------------------------------------------------------------

fn read_file_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let f = open_direct(path, false);
    let mut buf = Aligned::new(len);
    let b = buf.get(len);
    f.read_exact_at(b, offset).unwrap();
    b.to_vec()
}

fn write_file_at(path: &Path, offset: u64, data: &[u8]) {
    let f = open_direct(path, true);
    let mut buf = Aligned::new(data.len());
    let b = buf.get(data.len());
    b.copy_from_slice(data);
    f.write_all_at(b, offset).unwrap();
    f.sync_all().unwrap();
    drop_caches();
}

/// Flips bit 0 of the byte at `offset` of `path` (read-modify-write of its 4 KiB block).
fn flip_bit(path: &Path, offset: u64) {
    let block = offset / KIB4 as u64 * KIB4 as u64;
    let mut data = read_file_at(path, block, KIB4);
    data[(offset - block) as usize] ^= 1;
    write_file_at(path, block, &data);
}

/// Where dm-integrity keeps things, from its superblock at the data offset (the arithmetic of
/// tests/vm/smoke.sh, after the kernel's dm-integrity.c). Sector numbers are relative to the start
/// of the integrity area (backing byte 1 MiB).
#[derive(Debug)]
struct IntegrityLayout {
    tag_size: u64,
    sectors_per_block: u64,
    log2_interleave: u32,
    /// Superblock plus journal.
    initial_sectors: u64,
    /// Sectors of tags in front of each interleave area's data.
    metadata_run: u64,
}

impl IntegrityLayout {
    fn read(backing: &Path) -> Self {
        drop_caches();
        let sb = read_file_at(backing, MIB, KIB4);
        assert_eq!(
            &sb[..8],
            b"integrt\0",
            "no dm-integrity superblock at 1 MiB"
        );
        let log2_interleave = u32::from(sb[9]);
        let tag_size = u64::from(u16::from_le_bytes([sb[10], sb[11]]));
        let journal_sections = u64::from(u32::from_le_bytes(sb[12..16].try_into().unwrap()));
        let log2_spb = u32::from(sb[28]);
        assert_eq!(tag_size, 48, "superblock tag size");
        assert_eq!(log2_spb, 3, "superblock: not 4 KiB blocks");
        let spb = 1u64 << log2_spb;
        let entry = (8 + 8 * spb + tag_size).div_ceil(8) * 8;
        let section_sectors = (504 / entry) * 8 * spb + 8;
        let initial_sectors = 8 + section_sectors * journal_sections;
        let metadata_run = (tag_size << (log2_interleave - log2_spb)).div_ceil(4096) * 8;
        let layout = IntegrityLayout {
            tag_size,
            sectors_per_block: spb,
            log2_interleave,
            initial_sectors,
            metadata_run,
        };
        assert_eq!(
            ((initial_sectors + metadata_run) * 512) % KIB4 as u64,
            0,
            "{layout:?}"
        );
        println!("dm-integrity layout: {layout:?}");
        layout
    }

    #[track_caller]
    fn check_area0(&self, block: u64) {
        assert!(
            (block + 1) * self.sectors_per_block <= 1 << self.log2_interleave,
            "block {block} is not in the first interleave area"
        );
    }

    /// Backing-file byte offset of logical block `block`'s data (first area only).
    fn data_offset(&self, block: u64) -> u64 {
        self.check_area0(block);
        MIB + (self.initial_sectors + self.metadata_run + block * self.sectors_per_block) * 512
    }

    /// Backing-file byte offset of logical block `block`'s tag (first area only).
    fn tag_offset(&self, block: u64) -> u64 {
        self.check_area0(block);
        MIB + self.initial_sectors * 512 + block * self.tag_size
    }
}

// ---------------------------------------------------------------------------------------------
// Shared scenarios
// ---------------------------------------------------------------------------------------------

/// Format with a filesystem → open → mount → 8 MiB random + fsync → close → reopen → same data →
/// fsck clean → close; the kernel log gains no AEAD errors.
fn filesystem_roundtrip(test: &str, name: &str, format_args: &[&str], fsck: &[&str]) {
    let fx = Fixture::new(test);
    let mut watch = AeadWatch::start();
    let file = fx.file("vol.img", GIB);
    let report = fx.format(&file, format_args);
    println!("format report: {report}");
    watch.phase("format");
    fx.expect_detached(&file, "after format");
    let uuid = report["uuid"].as_str().unwrap().to_owned();
    assert!(
        !dm_names().iter().any(|n| n.contains(&uuid)),
        "format left device-mapper devices: {:?}",
        dm_names()
    );

    let device = fx.open(&file, name);
    let mnt = fx.mount(&device);
    let mut data = vec![0u8; 8 * MIB as usize];
    File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut data)
        .unwrap();
    let path = mnt.join("random.bin");
    let mut f = File::create(&path).unwrap();
    f.write_all(&data).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let want = sha256_file(&path);
    assert_eq!(want, hex::encode(Sha256::digest(&data)));
    fx.umount(&mnt);
    watch.phase("first mount, write, umount");
    assert!(
        fx.close(name),
        "close of an open volume reported closed=false"
    );
    assert_stack_absent(name);
    fx.expect_detached(&file, "after close");

    let device = fx.open(&file, name);
    let mnt = fx.mount(&device);
    assert_eq!(
        sha256_file(&mnt.join("random.bin")),
        want,
        "data changed across close/open"
    );
    fx.umount(&mnt);
    watch.phase("second mount, read, umount");
    // A fast-initialized volume has never-written blocks right after its metadata. A buffered reader
    // of the raw device with the default 128 KiB read-ahead reads into them, and dm-crypt logs an
    // AEAD error for each (a false tamper alarm). The documented way to check a volume, and what
    // sealcsi's own fsck does, is with read-ahead off.
    sh("blockdev", &["--setra", "0", p(&device)]).ok();
    let mut args = fsck.to_vec();
    args.push(p(&device));
    let fsck_out = sh(args[0], &args[1..]);
    watch.phase(&args.join(" "));
    fsck_out.ok();
    assert!(fx.close(name));
    assert_stack_absent(name);
    fx.expect_detached(&file, "after the final close");
    watch.report(&fx);
    fx.finish();
}

/// A 128 MiB block volume with pattern 7 over blocks 0..2000, closed; returns its backing file and
/// dm-integrity layout.
fn tamper_setup(fx: &Fixture, name: &str) -> (PathBuf, IntegrityLayout) {
    let file = fx.file("vol.img", 128 * MIB);
    fx.format(&file, &["--fs", "none"]);
    let device = fx.open(&file, name);
    write_pattern(&device, 7, 2000);
    assert!(fx.close(name));
    let layout = IntegrityLayout::read(&file);
    (file, layout)
}

fn tamper_expected(block: u64) -> Vec<u8> {
    if block < 2000 {
        pattern_block(7, block)
    } else {
        vec![0; KIB4]
    }
}

#[track_caller]
fn assert_integrity_errno(block: u64, result: std::io::Result<Vec<u8>>) {
    match result {
        Ok(_) => panic!("reading tampered block {block} SUCCEEDED"),
        Err(e) => {
            let errno = e.raw_os_error();
            assert!(
                errno == Some(nix::libc::EILSEQ) || errno == Some(nix::libc::EIO),
                "reading tampered block {block} failed with {e} (errno {errno:?}), not EILSEQ/EIO"
            );
            println!("block {block}: read fails as it must: {e}");
        }
    }
}

#[track_caller]
fn assert_block_intact(f: &File, block: u64) {
    let data = read_block(f, block).unwrap_or_else(|e| panic!("reading intact block {block}: {e}"));
    assert!(
        data == tamper_expected(block),
        "block {block} reads but differs from the pattern"
    );
}

/// Format options for a small, quick AEAD volume.
const BLOCK_VOLUME: &[&str] = &["--fs", "none"];

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
#[ignore = "guest: needs device-mapper, run via tests/vm/run-in-guest.sh"]
fn guest_volume_ext4_fast_roundtrip() {
    filesystem_roundtrip("ext4", "gv1-ext4", &["--fs", "ext4"], &["e2fsck", "-fn"]);
}

#[test]
#[ignore = "guest: needs device-mapper, run via tests/vm/run-in-guest.sh"]
fn guest_volume_xfs_fast_roundtrip() {
    filesystem_roundtrip("xfs", "gv2-xfs", &["--fs", "xfs"], &["xfs_repair", "-n"]);
}

#[test]
#[ignore = "guest: needs device-mapper, run via tests/vm/run-in-guest.sh"]
fn guest_volume_block_full_wipe_roundtrip() {
    let fx = Fixture::new("block");
    let name = "gv3-block";
    let file = fx.file("vol.img", 256 * MIB);
    let report = fx.format(&file, &["--fs", "none"]);
    println!("format report: {report}");
    let device = fx.open(&file, name);
    // Full wipe: every block of the device reads (a never-written AEAD block would fail), as zeros.
    let failed = scan_device(&device, &|_| vec![0; KIB4]);
    assert!(
        failed.is_empty(),
        "--fs none left unreadable (never written) blocks: {failed:?}"
    );

    let blocks = 64 * MIB / KIB4 as u64;
    write_pattern(&device, 3, blocks);
    assert!(fx.close(name));
    let device = fx.open(&file, name);
    let f = open_direct(&device, false);
    let mut buf = Aligned::new(MIB as usize);
    for mib in 0..64u64 {
        let chunk = buf.get(MIB as usize);
        f.read_exact_at(chunk, mib * MIB)
            .unwrap_or_else(|e| panic!("reading MiB {mib} back: {e}"));
        let per = MIB / KIB4 as u64;
        for i in 0..per {
            let at = i as usize * KIB4;
            assert!(
                chunk[at..at + KIB4] == pattern_block(3, mib * per + i)[..],
                "block {} differs after close/reopen",
                mib * per + i
            );
        }
    }
    drop(f);
    assert!(fx.close(name));
    fx.expect_detached(&file, "after the final close");
    fx.finish();
}

#[test]
#[ignore = "guest: needs device-mapper, run via tests/vm/run-in-guest.sh"]
fn guest_volume_open_takes_the_workqueue_choice_and_an_open_volume_keeps_its_own() {
    let fx = Fixture::new("workqueues");
    let name = "gv-wq";
    let file = fx.file("vol.img", 128 * MIB);
    fx.format(&file, &["--fs", "ext4"]);
    for (choice, flags) in [
        ("inline", &["no_read_workqueue", "no_write_workqueue"][..]),
        ("read-inline", &["no_read_workqueue"][..]),
        ("write-inline", &["no_write_workqueue"][..]),
        ("queued", &[][..]),
    ] {
        fx.track(name);
        fx.sealcsi(&[
            "volume",
            "open",
            p(&file),
            "--name",
            name,
            "--workqueues",
            choice,
        ])
        .ok();
        assert_eq!(workqueue_flags(name), flags, "--workqueues {choice}");
        assert!(fx.close(name));
    }
    // The default is the measured choice (docs/benchmarks.md): both queued.
    fx.open(&file, name);
    assert_eq!(workqueue_flags(name), Vec::<String>::new());
    // Opening again with another choice is the same open: success, flags unchanged.
    let again = fx
        .sealcsi(&[
            "volume",
            "open",
            p(&file),
            "--name",
            name,
            "--workqueues",
            "inline",
        ])
        .ok()
        .json();
    assert_eq!(again["already_open"], Value::Bool(true), "{again}");
    assert_eq!(workqueue_flags(name), Vec::<String>::new());
    let bad = fx.sealcsi(&[
        "volume",
        "open",
        p(&file),
        "--name",
        name,
        "--workqueues",
        "off",
    ]);
    assert_eq!(bad.code, 2, "a bad value is a usage error: {bad}");
    assert!(fx.close(name));
    fx.expect_detached(&file, "after the final close");
    fx.finish();
}

/// `journal_sectors` of the live integrity table `dm_name`.
fn journal_sectors(dm_name: &str) -> u64 {
    let table = sh("dmsetup", &["table", dm_name]).ok().stdout;
    table
        .split_whitespace()
        .find_map(|w| w.strip_prefix("journal_sectors:"))
        .unwrap_or_else(|| panic!("no journal_sectors in {table}"))
        .parse()
        .unwrap()
}

#[test]
#[ignore = "guest: needs device-mapper, run via tests/vm/run-in-guest.sh"]
fn guest_volume_integrity_journal_is_capped_at_8_mib() {
    // dm-integrity keeps its journal in memory; its own default is 1/128 of the device, up to 64 MiB.
    let fx = Fixture::new("journal");
    let name = "gv-journal";
    for (size, at_most, at_least) in [(256 * MIB, 4096, 2048), (16 << 30, 16384, 8192)] {
        let file = fx.file(&format!("vol-{size}.img"), size);
        fx.format(&file, &["--fs", "ext4"]);
        fx.open(&file, name);
        let sectors = journal_sectors(&format!("{name}-integrity"));
        assert!(
            (at_least..=at_most).contains(&sectors),
            "{size}-byte device: journal of {sectors} sectors, want {at_least}..={at_most}"
        );
        assert!(fx.close(name));
    }
    fx.finish();
}

#[test]
#[ignore = "guest: needs device-mapper, run via tests/vm/run-in-guest.sh"]
fn guest_volume_crypt_only_ext4_roundtrip() {
    filesystem_roundtrip(
        "crypt-only",
        "gv4-xts",
        &["--integrity", "none", "--fs", "ext4"],
        &["e2fsck", "-fn"],
    );
}

#[test]
#[ignore = "guest: needs device-mapper, run via tests/vm/run-in-guest.sh"]
fn guest_volume_wrong_identity() {
    let fx = Fixture::new("identity");
    let name = "gv5-ident";
    let file = fx.file("vol.img", 96 * MIB);
    let state_a = fx.dir.join("state-a");
    let args_format = ["volume", "format", p(&file), "--fs", "none"];
    sealcsi_as(&state_a, "identity-A", &args_format).ok();
    let before = sha256_file(&file);
    fx.track(name);

    let open = ["volume", "open", p(&file), "--name", name];
    let out = sealcsi_as(&state_a, "identity-B", &open).exit(EXIT_WRONG_IDENTITY);
    out.error_mentions("identity");
    println!("other identity string: {}", out.error_text().trim());
    assert_stack_absent(name);
    fx.expect_detached(&file, "after an open refused for another identity string");

    let state_b = fx.dir.join("state-b");
    let out = sealcsi_as(&state_b, "identity-A", &open).exit(EXIT_WRONG_IDENTITY);
    out.error_mentions("identity");
    assert_stack_absent(name);
    fx.expect_detached(&file, "after an open refused for another seed");

    assert_eq!(
        sha256_file(&file),
        before,
        "a refused open changed the backing file"
    );
    // The right node still opens it.
    sealcsi_as(&state_a, "identity-A", &open).ok();
    sealcsi_as(&state_a, "identity-A", &["volume", "close", name]).ok();
    assert_stack_absent(name);
    fx.expect_detached(&file, "after the final close");
    fx.finish();
}

#[test]
#[ignore = "guest: needs device-mapper, run via tests/vm/run-in-guest.sh"]
fn guest_volume_tampered_data_block() {
    let fx = Fixture::new("tamper-data");
    let name = "gv6-tdata";
    let (file, layout) = tamper_setup(&fx, name);
    let off = layout.data_offset(5);
    let backing = read_file_at(&file, off, KIB4);
    assert!(
        backing.iter().any(|&b| b != 0),
        "backing data of block 5 is zeros: layout wrong"
    );
    // Ciphertext, not plaintext, is on the disk.
    assert!(
        backing != pattern_block(7, 5),
        "block 5 is stored in plaintext"
    );
    flip_bit(&file, off + 100);
    println!(
        "flipped a bit at backing byte {} (logical block 5)",
        off + 100
    );

    let device = fx.open(&file, name);
    let f = open_direct(&device, false);
    assert_block_intact(&f, 4);
    assert_integrity_errno(5, read_block(&f, 5));
    assert_block_intact(&f, 6);
    drop(f);
    let failed = scan_device(&device, &tamper_expected);
    println!("whole-device scan: blocks that fail to read: {failed:?}");
    assert!(
        failed.iter().any(|&(b, _)| b == 5),
        "the scan read block 5: {failed:?}"
    );
    if failed.len() != 1 {
        println!("NOTE: more blocks than the tampered one fail to read: {failed:?}");
    }
    assert!(fx.close(name));
    fx.finish();
}

#[test]
#[ignore = "guest: needs device-mapper, run via tests/vm/run-in-guest.sh"]
fn guest_volume_tampered_tag() {
    let fx = Fixture::new("tamper-tag");
    let name = "gv7-ttag";
    let (file, layout) = tamper_setup(&fx, name);
    let off = layout.tag_offset(7);
    let meta = read_file_at(&file, off / KIB4 as u64 * KIB4 as u64, KIB4);
    let at = (off % KIB4 as u64) as usize;
    assert!(
        meta[at..at + 48].iter().any(|&b| b != 0),
        "tag of block 7 at backing byte {off} is zeros: layout wrong"
    );
    flip_bit(&file, off);
    println!("flipped a bit at backing byte {off} (tag of logical block 7)");

    let device = fx.open(&file, name);
    let f = open_direct(&device, false);
    assert_block_intact(&f, 6);
    assert_integrity_errno(7, read_block(&f, 7));
    assert_block_intact(&f, 8);
    drop(f);
    let failed = scan_device(&device, &tamper_expected);
    println!("whole-device scan: blocks that fail to read: {failed:?}");
    assert!(
        failed.iter().any(|&(b, _)| b == 7),
        "the scan read block 7: {failed:?}"
    );
    assert!(fx.close(name));
    fx.finish();
}

/// Both header copies of `region` (8192 bytes) with `edit` applied and checksums recomputed.
fn edit_both_copies(region: &[u8], edit: impl Fn(&mut [u8])) -> Vec<u8> {
    let mut out = region.to_vec();
    for copy in out.chunks_mut(4096) {
        edit(copy);
        let sum = Sha256::digest(&copy[..4064]);
        copy[4064..].copy_from_slice(&sum);
    }
    out
}

/// An open that must fail with `code` and leave nothing behind.
#[track_caller]
fn refused_open(fx: &Fixture, file: &Path, name: &str, code: i32, mention: &str) {
    let before = sha256_file(file);
    let out = fx.try_open(file, name).exit(code);
    out.error_mentions(mention);
    println!("refused open: {}", out.error_text().trim());
    assert_stack_absent(name);
    fx.expect_detached(file, "after a refused open");
    assert_eq!(
        sha256_file(file),
        before,
        "a refused open changed the backing file"
    );
}

#[test]
#[ignore = "guest: needs device-mapper, run via tests/vm/run-in-guest.sh"]
fn guest_volume_tampered_header() {
    let fx = Fixture::new("tamper-header");
    let name = "gv8-thdr";
    let file = fx.file("vol.img", 80 * MIB);
    fx.format(&file, BLOCK_VOLUME);
    drop_caches();
    let original = read_file_at(&file, 0, 8192);

    // (a) the uuid (authenticated, checksum fixed): authentication fails.
    write_file_at(&file, 0, &edit_both_copies(&original, |c| c[24] ^= 0xff));
    refused_open(&fx, &file, name, EXIT_INVALID_HEADER, "authentication");

    // (b) tag size 28 (an invalid profile, checksum fixed).
    write_file_at(
        &file,
        0,
        &edit_both_copies(&original, |c| {
            c[44..46].copy_from_slice(&28u16.to_le_bytes())
        }),
    );
    refused_open(
        &fx,
        &file,
        name,
        EXIT_INVALID_HEADER,
        "invalid header field",
    );

    // (c) copy 0 damaged (checksum not fixed): copy 1 wins.
    let mut damaged = original.clone();
    damaged[200] ^= 0x40;
    write_file_at(&file, 0, &damaged);
    let device = fx.open(&file, name);
    let f = open_direct(&device, false);
    read_block(&f, 0).expect("reading block 0 of a volume opened from header copy 1");
    drop(f);
    assert!(fx.close(name));
    let inspect = fx.sealcsi(&["volume", "inspect", p(&file)]).ok().json();
    println!("inspect with copy 0 damaged: {inspect}");
    assert_eq!(inspect["active_copy"], Value::from(1), "inspect: {inspect}");
    assert!(
        inspect["other_copy_problem"]
            .as_str()
            .is_some_and(|s| !s.is_empty()),
        "inspect does not report the damaged copy: {inspect}"
    );
    fx.finish();
}

#[test]
#[ignore = "guest: needs device-mapper, run via tests/vm/run-in-guest.sh"]
fn guest_volume_open_close_idempotent() {
    let fx = Fixture::new("idempotent");
    let name = "gv9-idem";
    let other = "gv9-other";
    let file = fx.file("vol.img", 80 * MIB);
    fx.format(&file, BLOCK_VOLUME);
    let device = fx.open(&file, name);

    let again = fx.try_open(&file, name).ok().json();
    assert_eq!(
        again["already_open"],
        Value::Bool(true),
        "second open: {again}"
    );
    assert_eq!(
        again["device"].as_str(),
        Some(p(&device)),
        "second open: {again}"
    );

    fx.try_open(&file, other).exit(EXIT_BUSY);
    assert_stack_absent(other);

    assert!(fx.close(name), "first close reported closed=false");
    let second = fx.sealcsi(&["volume", "close", name]).ok().json();
    assert_eq!(
        second["closed"],
        Value::Bool(false),
        "second close: {second}"
    );
    assert_stack_absent(name);
    fx.expect_detached(&file, "after close");

    // A half-open stack: the crypt device gone, the integrity device left.
    let device = fx.open(&file, name);
    write_pattern(&device, 9, 256);
    sh("dmsetup", &["remove", name]).ok();
    let names = dm_names();
    assert!(
        !names.iter().any(|n| n == name) && names.contains(&format!("{name}-integrity")),
        "dmsetup ls after removing only {name}: {names:?}"
    );
    let report = fx.try_open(&file, name).ok().json();
    assert_eq!(
        report["device"].as_str(),
        Some(p(&device)),
        "open over a stale stack: {report}"
    );
    assert_eq!(
        report["already_open"],
        Value::Bool(false),
        "open over a stale stack: {report}"
    );
    let f = open_direct(&device, false);
    for block in 0..256 {
        let data =
            read_block(&f, block).unwrap_or_else(|e| panic!("block {block} after reopen: {e}"));
        assert!(
            data == pattern_block(9, block),
            "block {block} differs after the stale reopen"
        );
    }
    drop(f);
    assert!(fx.close(name));
    assert_stack_absent(name);
    fx.expect_detached(&file, "after the final close");
    fx.finish();
}

#[test]
#[ignore = "guest: needs device-mapper, run via tests/vm/run-in-guest.sh"]
fn guest_volume_format_safety() {
    let fx = Fixture::new("safety");
    let name = "gv10-safe";

    // An already formatted volume is not formatted over.
    let file = fx.file("sealed.img", 80 * MIB);
    fx.format(&file, BLOCK_VOLUME);
    let before = sha256_file(&file);
    let out = fx
        .sealcsi(&["volume", "format", p(&file), "--fs", "none"])
        .exit(EXIT_REFUSED);
    println!("format over a volume: {}", out.error_text().trim());
    assert_eq!(
        sha256_file(&file),
        before,
        "a refused format changed the file"
    );
    fx.expect_detached(&file, "after a refused format");

    // A plain ext4 is refused; --force formats it.
    let plain = fx.file("plain.img", 80 * MIB);
    sh("mkfs.ext4", &["-F", "-q", p(&plain)]).ok();
    fx.sealcsi(&["volume", "format", p(&plain), "--fs", "none"])
        .exit(EXIT_REFUSED);
    fx.format(&plain, &["--fs", "none", "--force"]);
    let inspect = fx.sealcsi(&["volume", "inspect", p(&plain)]).ok().json();
    assert_eq!(
        inspect["keyslots"].as_array().map(Vec::len),
        Some(1),
        "{inspect}"
    );

    // Header region zeroed after a format (a format killed before its header write).
    let file = fx.file("noheader.img", 80 * MIB);
    fx.format(&file, BLOCK_VOLUME);
    write_file_at(&file, 0, &vec![0u8; MIB as usize]);
    refused_open(&fx, &file, name, EXIT_INVALID_HEADER, "no sealcsi header");
    // Its data area is still there (the integrity superblock at 1 MiB, no unfinished-format marker): a
    // blanked header is never taken for an unfinished format.
    let before = sha256_file(&file);
    fx.sealcsi(&["volume", "format", p(&file), "--fs", "none"])
        .exit(EXIT_REFUSED)
        .error_mentions("dm-integrity superblock");
    assert_eq!(
        sha256_file(&file),
        before,
        "a refused format changed the file"
    );

    // Integrity superblock zeroed: open must refuse, and the kernel must not format it.
    let file = fx.file("nosb.img", 80 * MIB);
    fx.format(&file, BLOCK_VOLUME);
    write_file_at(&file, MIB, &[0u8; KIB4]);
    refused_open(&fx, &file, name, EXIT_INVALID_HEADER, "integrity");

    // A format killed mid-way.
    let file = fx.file("killed.img", 2 * GIB);
    let leftovers = |names: &[String]| -> Vec<String> {
        names
            .iter()
            .filter(|n| n.starts_with("sealcsi-format-"))
            .cloned()
            .collect()
    };
    let old = leftovers(&dm_names());
    let (mut cmd, what) = sealcsi_cmd(
        &fx.state,
        &fx.identity,
        &[
            "volume",
            "format",
            p(&file),
            "--fs",
            "none",
            "--init",
            "full",
        ],
    );
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {what}: {e}"));
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "{what} finished within 1.5 s"
    );
    child.kill().unwrap();
    let status = child.wait().unwrap();
    println!(
        "killed the format after {:.2}s: {status}",
        started.elapsed().as_secs_f64()
    );
    let new: Vec<String> = leftovers(&dm_names())
        .into_iter()
        .filter(|n| !old.contains(n))
        .collect();
    println!("leftover devices: {new:?}");
    let crypt: Vec<&String> = new.iter().filter(|n| !n.ends_with("-integrity")).collect();
    for n in &crypt {
        fx.track(n);
    }
    assert_eq!(
        crypt.len(),
        1,
        "expected one leftover sealcsi-format-* crypt device: {new:?}"
    );
    let crypt = crypt[0].clone();
    assert!(
        new.contains(&format!("{crypt}-integrity")),
        "expected the leftover integrity device too: {new:?}"
    );
    fx.try_open(&file, name).exit(EXIT_INVALID_HEADER);
    assert_stack_absent(name);
    assert!(
        fx.close(&crypt),
        "close of the leftover format stack reported closed=false"
    );
    assert_stack_absent(&crypt);
    let loops = loops_of(&file);
    if !loops.is_empty() {
        println!(
            "NOTE: after closing the leftover format stack the file is still attached: {loops}"
        );
    }
    // The killed format left its unfinished-format marker and no header: the device never held a
    // volume (no key of it was ever stored), so a format finishes over it without --force. A CSI stage
    // retried after a failed format depends on this.
    fx.format(&file, &["--fs", "ext4"]);
    let device = fx.open(&file, name);
    let f = open_direct(&device, false);
    read_block(&f, 0).expect("block 0 of the re-formatted volume");
    drop(f);
    assert!(fx.close(name));
    fx.expect_detached(&file, "after the final close");
    fx.finish();
}

fn timing_line(label: &str, report: &Value) -> String {
    let secs = |k: &str| report[k].as_f64().unwrap_or(f64::NAN);
    format!(
        "{label} total={:.2}s init={:.2}s mkfs={:.2}s prewritten={}MiB data={}MiB",
        secs("total_seconds"),
        secs("init_seconds"),
        secs("mkfs_seconds"),
        report["prewritten_bytes"].as_u64().unwrap_or(0) >> 20,
        report["data_bytes"].as_u64().unwrap_or(0) >> 20,
    )
}

#[test]
#[ignore = "guest: needs device-mapper, run via tests/vm/run-in-guest.sh"]
fn guest_volume_format_timing() {
    let fx = Fixture::new("timing");
    let mut lines = Vec::new();
    for (label, size, extra) in [
        ("FASTINIT 1GiB", GIB, &[][..]),
        ("FASTINIT 16GiB", 16 * GIB, &[][..]),
        ("FULLINIT 1GiB", GIB, &["--init", "full"][..]),
    ] {
        let file = fx.file("timing.img", size);
        let mut args = vec!["--fs", "ext4"];
        args.extend_from_slice(extra);
        let started = Instant::now();
        let report = fx.format(&file, &args);
        let line = format!(
            "{} wall={:.2}s",
            timing_line(label, &report),
            started.elapsed().as_secs_f64()
        );
        println!("{line}");
        lines.push(line);
    }
    println!("timing summary:\n{}", lines.join("\n"));
    fx.finish();
}

#[test]
#[ignore = "guest: needs device-mapper, run via tests/vm/run-in-guest.sh"]
fn guest_volume_inspect_needs_no_key() {
    let fx = Fixture::new("inspect");
    let file = fx.file("vol.img", 128 * MIB);
    let report = fx.format(&file, &["--fs", "ext4"]);
    let identity = fx.sealcsi(&["volume", "identity"]).ok().json();
    println!("identity: {identity}");
    let digest = identity["digest"]
        .as_str()
        .expect("identity digest")
        .to_owned();
    assert_eq!(digest.len(), 64, "{identity}");
    assert_eq!(identity["simulated"], Value::Bool(true), "{identity}");

    let other = fx.dir.join("other-state");
    let out = sealcsi_as(&other, "someone-else", &["volume", "inspect", p(&file)]).ok();
    let inspect = out.json();
    println!("inspect: {inspect}");
    assert!(
        !other.join("sim-seed").exists(),
        "inspect created a sealing seed: it should need no key"
    );
    assert_eq!(inspect["uuid"], report["uuid"], "{inspect}");
    let slots = inspect["keyslots"].as_array().expect("keyslots array");
    assert_eq!(slots.len(), 1, "{inspect}");
    assert_eq!(
        slots[0]["identity_digest"].as_str(),
        Some(digest.as_str()),
        "{inspect}"
    );
    assert_eq!(slots[0]["source"], Value::from("sim"), "{inspect}");
    assert_eq!(inspect["filesystem"], Value::from("ext4"), "{inspect}");
    assert_eq!(
        inspect["profile"],
        serde_json::json!({"aead-hmac-sha256": {"journal": "journal"}}),
        "{inspect}"
    );
    assert_eq!(
        inspect["cipher"],
        Value::from("capi:authenc(hmac(sha256),xts(aes))-random"),
        "{inspect}"
    );
    assert_eq!(inspect["tag_size"], Value::from(48), "{inspect}");
    assert_eq!(inspect["sector_size"], Value::from(4096), "{inspect}");
    assert_eq!(inspect["key_bytes"], Value::from(96), "{inspect}");
    assert_eq!(inspect["seqno"], Value::from(1), "{inspect}");
    assert!(
        inspect["integrity_superblock"]["provided_data_sectors"]
            .as_u64()
            .is_some_and(|n| n > 0),
        "{inspect}"
    );
    assert!(
        inspect.get("other_copy_problem").is_none_or(Value::is_null),
        "{inspect}"
    );

    let zeros = fx.file("zeros.img", 64 * MIB);
    let out = sealcsi_as(&other, "someone-else", &["volume", "inspect", p(&zeros)])
        .exit(EXIT_INVALID_HEADER);
    out.error_mentions("no sealcsi header");
    fx.finish();
}
