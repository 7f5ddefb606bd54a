//! Real-kernel tests of volume initialization (`sealcsi::volume::init`) on an AEAD integrity stack.
//!
//! Each test builds dm-integrity (AEAD, tag 48, journal, 4 KiB) under dm-crypt
//! `capi:authenc(hmac(sha256),xts(aes))-random` with `dmsetup` and a random key, on a sparse
//! loop file in `$SCRATCH`; initializes it; mounts, writes many files and directories, fsyncs,
//! unmounts, checks (`e2fsck -fn` / `xfs_repair -n`), remounts and reads everything back; and
//! asserts that the kernel log gained no "INTEGRITY AEAD ERROR" and no I/O error line.
//!
//! Ignored in a plain `cargo test` (they need root and device-mapper). Run them in the guest:
//!
//! ```text
//! cargo test --test guest_init --no-run          # prints the test binary's path
//! tests/vm/run-in-guest.sh -- <binary> --ignored --test-threads=1 --nocapture
//! ```

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use sealcsi::header::FsKind;
use sealcsi::volume::init::{InitMode, initialize};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

/// Runs a command, panics with its stderr if it fails, returns its stdout.
fn sh(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(std::env::var_os("SCRATCH").unwrap_or_else(|| "/scratch".into()));
    fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// Writes a marker line into the kernel log.
fn kmsg_mark(text: &str) {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open("/dev/kmsg")
        .unwrap();
    writeln!(f, "{text}").unwrap();
}

/// The kernel log after the last line containing `marker`.
fn kmsg_since(marker: &str) -> String {
    let log = sh("dmesg", &[]);
    let start = log
        .rfind(marker)
        .unwrap_or_else(|| panic!("marker {marker} not in the kernel log"));
    let rest = &log[start..];
    rest.split_once('\n')
        .map(|(_, r)| r.to_owned())
        .unwrap_or_default()
}

/// Kernel log lines that show a failed read or write, or an error of the filesystem.
fn bad_lines(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| {
            l.contains("AEAD ERROR")
                || l.contains("I/O error")
                || l.contains("callbacks suppressed")
                || l.contains("EXT4-fs error")
                || l.contains("EXT4-fs warning")
                || l.contains("ecksum")
                || (l.contains("XFS") && (l.contains("rror") || l.contains("orrupt")))
        })
        .collect()
}

/// The AEAD stack on a sparse loop file; torn down on drop.
struct Stack {
    img: PathBuf,
    loop_dev: String,
    int_name: String,
    crypt_name: String,
    dev: PathBuf,
    size: u64,
    mnt: PathBuf,
}

fn node(name: &str) -> PathBuf {
    let path = PathBuf::from(format!("/dev/mapper/{name}"));
    if !path.exists() {
        let _ = Command::new("dmsetup").args(["mknodes", name]).output();
    }
    if !path.exists() {
        let mm = sh(
            "dmsetup",
            &["info", "-c", "--noheadings", "-o", "major,minor", name],
        );
        let (maj, min) = mm.trim().split_once(':').unwrap();
        fs::create_dir_all("/dev/mapper").unwrap();
        sh(
            "mknod",
            &[path.to_str().unwrap(), "b", maj.trim(), min.trim()],
        );
    }
    path
}

impl Stack {
    fn new(name: &str, loop_size: u64) -> Self {
        let img = scratch(&format!("{name}.img"));
        let _ = fs::remove_file(&img);
        File::create(&img).unwrap().set_len(loop_size).unwrap(); // sparse: sector 0 is zero
        let loop_dev = sh(
            "losetup",
            &["--direct-io=on", "--show", "-f", img.to_str().unwrap()],
        )
        .trim()
        .to_owned();
        let int_name = format!("{name}-int");
        let crypt_name = format!("{name}-crypt");
        let mut stack = Stack {
            img,
            loop_dev,
            int_name,
            crypt_name,
            dev: PathBuf::new(),
            size: 0,
            mnt: PathBuf::from(format!("/tmp/{name}-mnt")),
        };
        // Load a one-block table: the kernel formats the zeroed device; status gives the size.
        let int_table = |len: u64| {
            format!(
                "0 {len} integrity {} 0 48 J 2 fix_padding block_size:4096",
                stack.loop_dev
            )
        };
        sh(
            "dmsetup",
            &["create", &stack.int_name, "--table", &int_table(8)],
        );
        let status = sh("dmsetup", &["status", &stack.int_name]);
        sh("dmsetup", &["remove", &stack.int_name]);
        let provided: u64 = status.split_whitespace().nth(4).unwrap().parse().unwrap();
        sh(
            "dmsetup",
            &["create", &stack.int_name, "--table", &int_table(provided)],
        );
        let int_dev = node(&stack.int_name);

        let mut key = [0u8; 96]; // 64-byte XTS key + 32-byte HMAC key
        getrandom::fill(&mut key).unwrap();
        let crypt_table = format!(
            "0 {provided} crypt capi:authenc(hmac(sha256),xts(aes))-random {} 0 {} 0 4 \
             integrity:48:aead sector_size:4096 no_read_workqueue no_write_workqueue",
            hex::encode(key),
            int_dev.display()
        );
        sh(
            "dmsetup",
            &["create", &stack.crypt_name, "--table", &crypt_table],
        );
        stack.dev = node(&stack.crypt_name);
        stack.size = provided * 512;
        fs::create_dir_all(&stack.mnt).unwrap();
        stack
    }

    fn mount(&self, fs: FsKind) {
        let t = if fs == FsKind::Ext4 { "ext4" } else { "xfs" };
        sh(
            "mount",
            &[
                "-t",
                t,
                self.dev.to_str().unwrap(),
                self.mnt.to_str().unwrap(),
            ],
        );
    }

    fn umount(&self) {
        sh("umount", &[self.mnt.to_str().unwrap()]);
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mnt).output();
        let _ = Command::new("dmsetup")
            .args(["remove", &self.crypt_name])
            .output();
        let _ = Command::new("dmsetup")
            .args(["remove", &self.int_name])
            .output();
        let _ = Command::new("losetup")
            .args(["-d", &self.loop_dev])
            .output();
        let _ = fs::remove_file(&self.img);
        let _ = fs::remove_dir(&self.mnt);
    }
}

/// Deterministic file contents.
fn content(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

const DIRS: u64 = 48;
const FILES_PER_DIR: u64 = 24;
/// Small files in one directory: more than an ext4 block group's inodes (8032 at 1 GiB, 8144
/// at 16 GiB), so inodes are allocated in several groups even where Orlov keeps every
/// directory in group 0 (one flex group at 1 GiB).
const MANY: u64 = 8400;

/// Writes a 24 MiB file and DIRS directories of FILES_PER_DIR files, each fsynced.
/// Then MANY small files in one directory. Returns a sample of the inode numbers.
fn write_tree(root: &Path) -> Vec<u64> {
    let mut f = File::create(root.join("big")).unwrap();
    f.write_all(&content(u64::MAX, 24 * MIB as usize)).unwrap();
    f.sync_all().unwrap();
    let mut inos = Vec::new();
    for d in 0..DIRS {
        let dir = root.join(format!("d{d}"));
        fs::create_dir(&dir).unwrap();
        inos.push(fs::metadata(&dir).unwrap().ino());
        for i in 0..FILES_PER_DIR {
            let seed = d * 1000 + i;
            let mut f = File::create(dir.join(format!("f{i}"))).unwrap();
            f.write_all(&content(seed, 100 + (seed as usize * 977) % 20000))
                .unwrap();
            f.sync_all().unwrap();
        }
        File::open(&dir).unwrap().sync_all().unwrap();
    }
    let many = root.join("many");
    fs::create_dir(&many).unwrap();
    for i in 0..MANY {
        let path = many.join(format!("m{i}"));
        fs::write(&path, format!("many {i}\n")).unwrap();
        if i % 1000 == 999 {
            inos.push(fs::metadata(&path).unwrap().ino());
        }
    }
    nix::unistd::sync();
    File::open(root).unwrap().sync_all().unwrap();
    inos
}

fn check_tree(root: &Path) {
    assert_eq!(
        fs::read(root.join("big")).unwrap(),
        content(u64::MAX, 24 * MIB as usize)
    );
    for d in 0..DIRS {
        for i in 0..FILES_PER_DIR {
            let seed = d * 1000 + i;
            let got = fs::read(root.join(format!("d{d}/f{i}"))).unwrap();
            assert!(
                got == content(seed, 100 + (seed as usize * 977) % 20000),
                "d{d}/f{i} differs"
            );
        }
    }
}

/// Block groups (ext4) or allocation groups (XFS) the inodes live in, from the superblock.
fn inode_groups(fs: FsKind, dev: &Path, inos: &[u64]) -> BTreeSet<u64> {
    let sb = sealcsi::devio::read_at(dev, 0, 4096).unwrap();
    match fs {
        FsKind::Ext4 => {
            let ipg = u32::from_le_bytes(sb[1024 + 40..1024 + 44].try_into().unwrap()) as u64;
            inos.iter().map(|i| (i - 1) / ipg).collect()
        }
        _ => {
            let shift = sb[123] as u32 + sb[124] as u32; // sb_inopblog + sb_agblklog
            inos.iter().map(|i| i >> shift).collect()
        }
    }
}

fn exercise(test: &str, fs_kind: FsKind, loop_size: u64, mode: InitMode) {
    let stack = Stack::new(test, loop_size);
    // The detector works: a never-written block fails to read (logged before the marker).
    assert!(
        sealcsi::devio::read_at(&stack.dev, stack.size / 2 / 4096 * 4096, 4096).is_err(),
        "a never-written block read fine: this is not an AEAD integrity stack"
    );
    let marker = format!("sealcsi-test: begin {test} {}", std::process::id());
    kmsg_mark(&marker);

    let t = Instant::now();
    let report = initialize(&stack.dev, stack.size, fs_kind, mode, true, &mut |_, _| {}).unwrap();
    let init_time = t.elapsed();

    // What udev and `mount` without -t would do: probe every known signature.
    sh("blkid", &["-p", "-o", "udev", stack.dev.to_str().unwrap()]);

    stack.mount(fs_kind);
    let inos = write_tree(&stack.mnt);
    let groups = inode_groups(fs_kind, &stack.dev, &inos);
    stack.umount();
    let t = Instant::now();
    sealcsi::volume::mkfs::fsck_check(fs_kind, &stack.dev).unwrap();
    let fsck_time = t.elapsed();
    stack.mount(fs_kind);
    check_tree(&stack.mnt);
    stack.umount();
    sealcsi::volume::mkfs::fsck_check(fs_kind, &stack.dev).unwrap();

    let log = kmsg_since(&marker);
    let bad = bad_lines(&log);
    println!(
        "{test}: {:?} {:?} device {} MiB: prewritten {} KiB in {:.2}s, mkfs {:.2}s, init total {:.2}s; \
         fsck {:.2}s; inodes in groups {:?}; bad kernel log lines: {}",
        fs_kind,
        mode,
        stack.size / MIB,
        report.prewritten_bytes / 1024,
        report.wipe.as_secs_f64(),
        report.mkfs.as_secs_f64(),
        init_time.as_secs_f64(),
        fsck_time.as_secs_f64(),
        groups,
        bad.len()
    );
    assert!(bad.is_empty(), "kernel log after init:\n{}", bad.join("\n"));
    assert!(
        groups.len() >= 2,
        "all inodes landed in one group: {groups:?}"
    );
    if mode == InitMode::Fast {
        assert!(report.prewritten_bytes < 16 * MIB, "{report:?}");
    } else {
        assert_eq!(report.prewritten_bytes, stack.size);
    }
}

#[test]
#[ignore = "guest: needs device-mapper, run via tests/vm/run-in-guest.sh"]
fn guest_init_ext4_fast_1g() {
    exercise("gi-e1", FsKind::Ext4, GIB, InitMode::Fast);
}

#[test]
#[ignore = "guest: needs device-mapper, run via tests/vm/run-in-guest.sh"]
fn guest_init_ext4_fast_16g() {
    exercise("gi-e16", FsKind::Ext4, 16 * GIB, InitMode::Fast);
}

#[test]
#[ignore = "guest: needs device-mapper, run via tests/vm/run-in-guest.sh"]
fn guest_init_ext4_fast_64g() {
    exercise("gi-e64", FsKind::Ext4, 64 * GIB, InitMode::Fast);
}

#[test]
#[ignore = "guest: needs device-mapper, run via tests/vm/run-in-guest.sh"]
fn guest_init_xfs_fast_1g() {
    exercise("gi-x1", FsKind::Xfs, GIB, InitMode::Fast);
}

#[test]
#[ignore = "guest: needs device-mapper, run via tests/vm/run-in-guest.sh"]
fn guest_init_xfs_fast_16g() {
    exercise("gi-x16", FsKind::Xfs, 16 * GIB, InitMode::Fast);
}

#[test]
#[ignore = "guest: needs device-mapper, run via tests/vm/run-in-guest.sh"]
fn guest_init_xfs_fast_64g() {
    exercise("gi-x64", FsKind::Xfs, 64 * GIB, InitMode::Fast);
}

#[test]
#[ignore = "guest: needs device-mapper, run via tests/vm/run-in-guest.sh"]
fn guest_init_ext4_full_1g() {
    exercise("gi-ef1", FsKind::Ext4, GIB, InitMode::Full);
}
