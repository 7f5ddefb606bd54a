//! Real-kernel tests of the kernel-facing layer: loop devices, device-mapper, the keyring.
//!
//! They need root, loop devices and device-mapper with dm-crypt/dm-integrity, so they are ignored
//! in a plain `cargo test`. Run them in the guest VM:
//!
//! ```text
//! cargo test --test guest_dm --no-run          # prints the test binary's path
//! tests/vm/run-in-guest.sh -- <binary> --ignored --test-threads=1
//! ```
//!
//! Files go to `$SCRATCH` (default /scratch), an ext4 filesystem in the guest.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use sealcsi::backend::{BlockDevice, LoopDevice, is_block_device};
use sealcsi::dm::{
    CryptCipher, CryptKey, CryptTarget, DeviceMapper, DmError, DmName, IntegrityTarget,
    JournalMode, KernelDm, Target, TargetLine, integrity_status, tables_match,
};
use sealcsi::keyring::{self, LogonKey};
use zeroize::Zeroizing;

const MIB: u64 = 1024 * 1024;

fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(std::env::var_os("SCRATCH").unwrap_or_else(|| "/scratch".into()));
    fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// A zero-filled (sparse) file of `size` bytes: sector 0 zeroed, so dm-integrity formats it.
fn zero_file(name: &str, size: u64) -> PathBuf {
    let path = scratch(name);
    let _ = fs::remove_file(&path);
    let f = File::create(&path).unwrap();
    f.set_len(size).unwrap();
    f.sync_all().unwrap();
    path
}

fn name(s: &str) -> DmName {
    DmName::try_from(s).unwrap()
}

/// A 1 MiB buffer aligned for O_DIRECT, without unsafe: over-allocate and slice.
struct Aligned {
    buf: Vec<u8>,
    off: usize,
}

impl Aligned {
    fn new(len: usize) -> Self {
        let buf = vec![0u8; len + 4096];
        let off = buf.as_ptr().align_offset(4096);
        Aligned { buf, off }
    }
    fn get(&mut self, len: usize) -> &mut [u8] {
        &mut self.buf[self.off..self.off + len]
    }
}

fn open_direct(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::libc::O_DIRECT)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn key96(seed: u8) -> Zeroizing<Vec<u8>> {
    Zeroizing::new(
        (0..96u8)
            .map(|i| i.wrapping_mul(7).wrapping_add(seed))
            .collect(),
    )
}

fn integrity_line(dev: &Path, length: u64) -> TargetLine {
    TargetLine {
        start: 0,
        length,
        target: Target::Integrity(IntegrityTarget {
            device: dev.to_owned(),
            offset_sectors: 0,
            tag_size: 48,
            mode: JournalMode::Journal,
            block_size: 4096,
            fix_padding: true,
            journal_sectors: None,
        }),
    }
}

/// Remove leftovers of an earlier failed run.
fn cleanup(dm: &KernelDm, names: &[&DmName]) {
    for n in names {
        let _ = dm.remove(n);
    }
}

/// The integrity device over `dev`: a short first load formats it (zeroed sector 0), its status
/// gives the provided sectors, then it is loaded again over all of them.
fn open_integrity(dm: &KernelDm, n: &DmName, dev: &Path) -> u64 {
    dm.create(n, &format!("SEALCSI-TEST-{n}"), &[integrity_line(dev, 8)])
        .unwrap();
    let st = dm.status(n).unwrap();
    assert_eq!(st.len(), 1);
    assert_eq!(st[0].2, "integrity");
    let provided = integrity_status(&st[0].3).unwrap().provided_data_sectors;
    dm.remove(n).unwrap();
    let provided = provided / 8 * 8;
    dm.create(
        n,
        &format!("SEALCSI-TEST-{n}"),
        &[integrity_line(dev, provided)],
    )
    .unwrap();
    provided
}

fn crypt_line(under: &Path, length: u64, key: CryptKey) -> TargetLine {
    let t = CryptTarget::new(
        CryptCipher::AuthencHmacSha256XtsPlainRandom,
        key,
        under.to_owned(),
        0,
        4096,
    )
    .unwrap();
    TargetLine {
        start: 0,
        length,
        target: Target::Crypt(t),
    }
}

#[test]
#[ignore = "guest: needs device-mapper, run via tests/vm/run-in-guest.sh"]
fn guest_dm_version() {
    let dm = KernelDm::new().expect("device-mapper in the guest");
    let (major, minor, _) = dm.version().unwrap();
    assert_eq!(major, 4, "dm ioctl interface major");
    assert!(minor >= 37, "driver 4.{minor}");
}

#[test]
#[ignore = "guest: needs device-mapper, run via tests/vm/run-in-guest.sh"]
fn guest_loop_attach_find_detach() {
    let file = zero_file("loop-afd.img", 16 * MIB);
    let canon = fs::canonicalize(&file).unwrap();
    assert_eq!(LoopDevice::find(&file).unwrap(), None);

    let lo = LoopDevice::attach(&file, false).unwrap();
    assert!(
        is_block_device(lo.path()),
        "{} is a block device",
        lo.path().display()
    );
    assert_eq!(lo.backing_file().unwrap(), canon);
    assert_eq!(
        lo.direct_io(),
        Some(true),
        "ext4 scratch supports O_DIRECT: loop must use it"
    );
    assert_eq!(lo.read_only(), Some(false));
    let ro = LoopDevice::attach(&file, true).unwrap();
    assert_ne!(ro.path(), lo.path());
    assert_eq!(ro.read_only(), Some(true));
    // Linux opens a read-only block device for writing; the write itself is refused.
    let w = File::options()
        .write(true)
        .open(ro.path())
        .and_then(|f| f.write_all_at(&[1u8; 4096], 0));
    assert!(w.is_err(), "write to a read-only loop device succeeded");
    ro.detach().unwrap();
    assert_eq!(LoopDevice::find(&file).unwrap().as_ref(), Some(&lo));
    assert_eq!(
        LoopDevice::find_by_path(lo.path()).unwrap().as_ref(),
        Some(&lo)
    );

    // Another file with the same name later is not the same file (inode compare).
    let other = zero_file("loop-afd-other.img", MIB);
    assert_eq!(LoopDevice::find(&other).unwrap(), None);

    // Writes through the loop device reach the file.
    let data = pattern(4096, 9);
    File::options()
        .write(true)
        .open(lo.path())
        .unwrap()
        .write_all_at(&data, 8192)
        .unwrap();
    File::options()
        .write(true)
        .open(lo.path())
        .unwrap()
        .sync_all()
        .unwrap();
    let mut back = vec![0u8; 4096];
    File::open(&file)
        .unwrap()
        .read_exact_at(&mut back, 8192)
        .unwrap();
    assert_eq!(back, data);

    lo.detach().unwrap();
    assert!(!lo.is_attached());
    assert_eq!(LoopDevice::find(&file).unwrap(), None);
    assert_eq!(LoopDevice::find_by_path(lo.path()).unwrap(), None);
    lo.detach().unwrap(); // idempotent
    fs::remove_file(&file).unwrap();
    fs::remove_file(&other).unwrap();
}

#[test]
#[ignore = "guest: needs device-mapper, run via tests/vm/run-in-guest.sh"]
fn guest_blockdevice_open_path_is_idempotent() {
    let file = zero_file("bd-idem.img", 32 * MIB);
    let a = BlockDevice::open_path(&file).unwrap();
    let b = BlockDevice::open_path(&file).unwrap();
    assert_eq!(a.path(), b.path(), "second open reuses the attachment");
    assert!(a.loop_device().is_some());
    assert_eq!(a.size_bytes().unwrap(), 32 * MIB);
    assert_eq!(a.logical_block_size().unwrap(), 512);

    // The loop device path itself is a block device: used as is, not owned.
    let raw = BlockDevice::open_path(a.path()).unwrap();
    assert_eq!(raw.path(), a.path());
    assert!(raw.loop_device().is_none());
    raw.release().unwrap();
    assert!(
        LoopDevice::find(&file).unwrap().is_some(),
        "releasing a plain block device detaches nothing"
    );

    // `b` found the attachment `a` made: releasing or dropping it leaves the device attached.
    drop(b);
    assert!(
        LoopDevice::find(&file).unwrap().is_some(),
        "b did not attach, so b does not detach"
    );
    a.release().unwrap();
    assert_eq!(
        LoopDevice::find(&file).unwrap(),
        None,
        "release detached the loop device a attached"
    );

    // Dropped without release (an operation that failed): what it attached is detached.
    let c = BlockDevice::open_path(&file).unwrap();
    assert!(LoopDevice::find(&file).unwrap().is_some());
    drop(c);
    assert_eq!(
        LoopDevice::find(&file).unwrap(),
        None,
        "drop detached the loop device"
    );

    // Handed to a user above it: stays while used, detaches when the last user closes.
    let d = BlockDevice::open_path(&file).unwrap();
    let user = fs::File::open(d.path()).unwrap();
    d.keep_while_in_use().unwrap();
    assert!(
        LoopDevice::find(&file).unwrap().is_some(),
        "kept while in use"
    );
    drop(user);
    for _ in 0..100 {
        if LoopDevice::find(&file).unwrap().is_none() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(
        LoopDevice::find(&file).unwrap(),
        None,
        "autoclear detached it after the last user"
    );
    fs::remove_file(&file).unwrap();
}

#[test]
#[ignore = "guest: needs device-mapper, run via tests/vm/run-in-guest.sh"]
fn guest_integrity_crypt_stack() {
    let dm = KernelDm::new().unwrap();
    let (ni, nc) = (name("sealcsi-test-i"), name("sealcsi-test-c"));
    cleanup(&dm, &[&nc, &ni]);
    let file = zero_file("stack.img", 64 * MIB);
    let bd = BlockDevice::open_path(&file).unwrap();

    let provided = open_integrity(&dm, &ni, bd.path());
    assert!(
        provided > 50 * MIB / 512,
        "provided {provided} sectors of 64 MiB"
    );
    let inode = ni.node();
    assert!(
        is_block_device(&inode),
        "{} made without udev",
        inode.display()
    );

    let use_keyring = keyring::available();
    eprintln!("logon keys available: {use_keyring}");
    let key = key96(1);
    let (ckey, logon) = if use_keyring {
        let k = LogonKey::add("sealcsi:guest-stack", &key).unwrap();
        (
            CryptKey::Keyring {
                description: "sealcsi:guest-stack".into(),
            },
            Some(k),
        )
    } else {
        (CryptKey::Hex(key.clone()), None)
    };
    let cline = crypt_line(&inode, provided, ckey.clone());
    let info = dm
        .create(&nc, "SEALCSI-TEST-c", std::slice::from_ref(&cline))
        .unwrap();
    drop(logon); // the mapping holds its own copy of the key
    assert_eq!(info.node, nc.node());
    assert!(is_block_device(&info.node));
    assert!(!info.suspended);
    assert_eq!(info.uuid.as_deref(), Some("SEALCSI-TEST-c"));

    // 1 MiB through the crypt device with O_DIRECT, read back.
    let data = pattern(MIB as usize, 3);
    let mut buf = Aligned::new(MIB as usize);
    {
        let f = open_direct(&info.node);
        buf.get(MIB as usize).copy_from_slice(&data);
        f.write_all_at(buf.get(MIB as usize), 0).unwrap();
        f.sync_all().unwrap();
        buf.get(MIB as usize).fill(0);
        f.read_exact_at(buf.get(MIB as usize), 0).unwrap();
        assert!(buf.get(MIB as usize) == &data[..], "read back differs");
    }
    // Ciphertext on the file is not the plaintext.
    assert!(
        !fs::read(&file)
            .unwrap()
            .windows(64)
            .any(|w| w == &data[..64]),
        "plaintext on disk"
    );

    // The tables read back typed and equal what was loaded (devices by number).
    let live_c = dm.table(&nc).unwrap();
    let live_i = dm.table(&ni).unwrap();
    assert!(
        tables_match(std::slice::from_ref(&cline), &live_c).unwrap(),
        "crypt table {live_c:?}"
    );
    assert!(
        tables_match(&[integrity_line(bd.path(), provided)], &live_i).unwrap(),
        "integrity table {live_i:?}"
    );
    if use_keyring {
        let Target::Crypt(c) = &live_c[0].target else {
            panic!("not crypt")
        };
        assert_eq!(
            c.key,
            CryptKey::Keyring {
                description: "sealcsi:guest-stack".into()
            }
        );
    }

    let st = integrity_status(&dm.status(&ni).unwrap()[0].3).unwrap();
    assert_eq!(st.mismatches, 0);
    assert_eq!(st.provided_data_sectors / 8 * 8, provided);

    // The crypt device holds the integrity device: removing that is Busy, and leaves it in place.
    assert_eq!(dm.info(&ni).unwrap().unwrap().open_count, 1);
    assert!(matches!(dm.remove(&ni), Err(DmError::Busy(_))));
    assert!(dm.info(&ni).unwrap().is_some());
    let listed: Vec<String> = dm
        .list()
        .unwrap()
        .into_iter()
        .map(|d| d.name.to_string())
        .collect();
    assert!(
        listed.contains(&"sealcsi-test-i".to_owned())
            && listed.contains(&"sealcsi-test-c".to_owned())
    );

    // Creating an existing name is AlreadyExists and leaves the device alone.
    assert!(matches!(
        dm.create(&nc, "SEALCSI-TEST-c2", std::slice::from_ref(&cline)),
        Err(DmError::AlreadyExists(_))
    ));
    assert!(dm.info(&nc).unwrap().is_some());

    dm.remove(&nc).unwrap();
    dm.remove(&ni).unwrap();
    assert!(dm.info(&nc).unwrap().is_none() && dm.info(&ni).unwrap().is_none());
    assert!(!nc.node().exists() && !ni.node().exists(), "nodes removed");
    dm.remove(&nc).unwrap();
    dm.remove(&ni).unwrap();

    // Reopen with the same key: the data is there. Then with another key: reads fail (AEAD).
    for (seed, must_match) in [(1u8, true), (2u8, false)] {
        open_integrity(&dm, &ni, bd.path());
        let key = key96(seed);
        let (ckey, logon) = if use_keyring {
            let k = LogonKey::add("sealcsi:guest-stack", &key).unwrap();
            (
                CryptKey::Keyring {
                    description: "sealcsi:guest-stack".into(),
                },
                Some(k),
            )
        } else {
            (CryptKey::Hex(key.clone()), None)
        };
        dm.create(&nc, "SEALCSI-TEST-c", &[crypt_line(&inode, provided, ckey)])
            .unwrap();
        drop(logon);
        let f = open_direct(&nc.node());
        let r = f.read_exact_at(buf.get(MIB as usize), 0);
        drop(f);
        if must_match {
            r.unwrap();
            assert!(buf.get(MIB as usize) == &data[..], "data after reopen");
        } else {
            let e = r.expect_err("wrong key must not read");
            assert!(
                e.raw_os_error() == Some(nix::libc::EILSEQ)
                    || e.raw_os_error() == Some(nix::libc::EIO),
                "{e}"
            );
        }
        dm.remove(&nc).unwrap();
        dm.remove(&ni).unwrap();
    }

    bd.release().unwrap();
    fs::remove_file(&file).unwrap();
}

#[test]
#[ignore = "guest: needs device-mapper, run via tests/vm/run-in-guest.sh"]
fn guest_failed_create_leaves_no_device() {
    let dm = KernelDm::new().unwrap();
    let n = name("sealcsi-test-bad");
    cleanup(&dm, &[&n]);
    let file = zero_file("bad.img", 16 * MIB);
    let bd = BlockDevice::open_path(&file).unwrap();

    // Refused by our validation: the kernel would take it (64-byte key for authenc).
    let weak = CryptTarget {
        key: CryptKey::Hex(Zeroizing::new(vec![1; 64])),
        key_len: 64,
        ..CryptTarget::new(
            CryptCipher::AuthencHmacSha256XtsPlainRandom,
            CryptKey::Hex(key96(0)),
            bd.path().to_owned(),
            0,
            4096,
        )
        .unwrap()
    };
    let r = dm.create(
        &n,
        "SEALCSI-TEST-bad",
        &[TargetLine {
            start: 0,
            length: 8,
            target: Target::Crypt(weak),
        }],
    );
    assert!(matches!(r, Err(DmError::InvalidTable(_))), "{r:?}");
    assert!(dm.info(&n).unwrap().is_none());

    // Valid for us, refused by the kernel at table load (no such device): rolled back.
    let r = dm.create(
        &n,
        "SEALCSI-TEST-bad",
        &[integrity_line(Path::new("/dev/sealcsi-no-such-dev"), 8)],
    );
    match &r {
        Err(DmError::Kernel { op, .. }) => assert_eq!(*op, "table load"),
        other => panic!("expected a kernel table load error, got {other:?}"),
    }
    assert!(
        dm.info(&n).unwrap().is_none(),
        "device left behind after failed load"
    );
    assert!(!n.node().exists());

    // Refused by the kernel: a keyring key that does not exist (ENOKEY at load).
    let line = TargetLine {
        start: 0,
        length: 8,
        target: Target::Crypt(
            CryptTarget::new(
                CryptCipher::AesXtsPlain64,
                CryptKey::Keyring {
                    description: "sealcsi:absent-key".into(),
                },
                bd.path().to_owned(),
                0,
                4096,
            )
            .unwrap(),
        ),
    };
    assert!(matches!(
        dm.create(&n, "SEALCSI-TEST-bad", &[line]),
        Err(DmError::Kernel { .. })
    ));
    assert!(dm.info(&n).unwrap().is_none());
    assert!(!dm.list().unwrap().iter().any(|d| d.name == n));

    bd.release().unwrap();
    fs::remove_file(&file).unwrap();
}

/// The process keyring is shared only with threads created after it exists. Shows the trap, then
/// the remedy (ensure_process_keyring before spawning).
#[test]
#[ignore = "guest: needs device-mapper, run via tests/vm/run-in-guest.sh"]
fn guest_logon_key_across_threads() {
    // Not keyring::available() here: it makes the process keyring on this thread.
    if !Path::new("/proc/keys").exists() {
        eprintln!("kernel keyring unavailable: skipped");
        return;
    }
    let dm = KernelDm::new().unwrap();
    let n = name("sealcsi-test-kt");
    cleanup(&dm, &[&n]);
    let file = zero_file("kt.img", 16 * MIB);
    let bd = BlockDevice::open_path(&file).unwrap();
    let line = |desc: &str| TargetLine {
        start: 0,
        length: 16 * MIB / 512,
        target: Target::Crypt(
            CryptTarget::new(
                CryptCipher::AesXtsPlain64,
                CryptKey::Keyring {
                    description: desc.into(),
                },
                bd.path().to_owned(),
                0,
                4096,
            )
            .unwrap(),
        ),
    };

    // Run in a fresh thread, so that this thread's keyrings are only what this test makes.
    std::thread::scope(|s| {
        s.spawn(|| {
            let had = keyring::process_keyring_id();
            eprintln!("process keyring before: {had:?}");
            if had.is_none() {
                // Another thread creates the process keyring: this thread does not see it.
                let (tx, rx) = std::sync::mpsc::channel();
                let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
                let h = std::thread::spawn(move || {
                    let k = LogonKey::add("sealcsi:kt-late", &[5u8; 64]).unwrap();
                    tx.send(k.serial()).unwrap();
                    done_rx.recv().unwrap();
                    drop(k);
                });
                rx.recv().unwrap();
                let r = dm.create(&n, "SEALCSI-TEST-kt", &[line("sealcsi:kt-late")]);
                eprintln!("late process keyring, load from an older thread: {r:?}");
                assert!(
                    matches!(r, Err(DmError::Kernel { .. })),
                    "trap not reproduced: {r:?}"
                );
                assert!(dm.info(&n).unwrap().is_none());
                done_tx.send(()).unwrap();
                h.join().unwrap();
            }
            // Remedy: make the process keyring first, then spawn.
            keyring::ensure_process_keyring().unwrap();
            let k = std::thread::spawn(|| LogonKey::add("sealcsi:kt-early", &[6u8; 64]).unwrap())
                .join()
                .unwrap();
            let info = dm
                .create(&n, "SEALCSI-TEST-kt", &[line("sealcsi:kt-early")])
                .unwrap();
            drop(k);
            assert!(is_block_device(&info.node));
            assert!(tables_match(&[line("sealcsi:kt-early")], &dm.table(&n).unwrap()).unwrap());
            dm.remove(&n).unwrap();
        });
    });
    bd.release().unwrap();
    fs::remove_file(&file).unwrap();
}

#[test]
#[ignore = "guest: needs device-mapper, run via tests/vm/run-in-guest.sh"]
fn guest_remove_absent_is_ok_and_info_none() {
    let dm = KernelDm::new().unwrap();
    let n = name("sealcsi-test-never");
    dm.remove(&n).unwrap();
    assert!(dm.info(&n).unwrap().is_none());
    assert!(matches!(dm.table(&n), Err(DmError::NotFound(_))));
    assert!(matches!(dm.status(&n), Err(DmError::NotFound(_))));
}

/// The kernel's device-mapper, with /dev/mapper/<name> of every integrity device it creates deleted as
/// soon as the device is up: what udev's rules can do to a node at any moment (replace it with their own
/// link). Only tables refer to a lower device, and they must not depend on its path. (The top device's
/// node is what users open, and stays.)
struct NodesVanish(KernelDm);

impl DeviceMapper for NodesVanish {
    fn create(
        &self,
        n: &DmName,
        uuid: &str,
        table: &[TargetLine],
    ) -> Result<sealcsi::dm::DeviceInfo, DmError> {
        let info = self.0.create(n, uuid, table)?;
        if n.as_str().ends_with("-integrity") {
            fs::remove_file(n.node()).unwrap();
        }
        Ok(info)
    }
    fn remove(&self, n: &DmName) -> Result<(), DmError> {
        self.0.remove(n)
    }
    fn info(&self, n: &DmName) -> Result<Option<sealcsi::dm::DeviceInfo>, DmError> {
        self.0.info(n)
    }
    fn table(&self, n: &DmName) -> Result<Vec<TargetLine>, DmError> {
        self.0.table(n)
    }
    fn status(&self, n: &DmName) -> Result<Vec<(u64, u64, String, String)>, DmError> {
        self.0.status(n)
    }
    fn list(&self) -> Result<Vec<sealcsi::dm::DeviceInfo>, DmError> {
        self.0.list()
    }
    fn version(&self) -> Result<(u32, u32, u32), DmError> {
        self.0.version()
    }
    fn reload(&self, n: &DmName, table: &[TargetLine]) -> Result<sealcsi::dm::DeviceInfo, DmError> {
        self.0.reload(n, table)
    }
}

/// Concurrent stages on a node running udevd failed with "crypt: Device lookup failed (-ENODEV)": the
/// crypt table named its integrity device by its /dev/mapper path, and that node was not there at the
/// moment of the load. Tables name lower devices by `major:minor` now: format and open succeed with
/// every integrity device's /dev/mapper node gone right after the device is made.
#[test]
#[ignore = "guest: needs root, loop devices and device-mapper (tests/vm/run-in-guest.sh)"]
fn guest_stack_does_not_depend_on_dev_mapper_nodes() {
    use sealcsi::header::{FsKind, Journal, Profile};
    use sealcsi::volume::init::InitMode;
    use sealcsi::volume::{FormatOptions, Volumes};
    let file = zero_file("nodes-vanish.img", 96 * MIB);
    let dm = NodesVanish(KernelDm::new().unwrap());
    let source =
        sealcsi::sealing::SimSource::open(&scratch("nodes-vanish-state"), "node-a").unwrap();
    let volumes = Volumes::new(&dm, &source);
    let opts = FormatOptions {
        profile: Profile::AeadHmacSha256 {
            journal: Journal::Journal,
        },
        fs: FsKind::None,
        init: InitMode::Full,
        force: false,
        volume_binding: [0; 32],
    };
    volumes.format(&file, &opts, &mut |_, _| {}).unwrap();
    let opened = volumes.open(&file, "nodes-vanish").unwrap();
    let crypt = dm.table(&name("nodes-vanish")).unwrap();
    let integrity = dm.info(&name("nodes-vanish-integrity")).unwrap().unwrap();
    assert_eq!(
        crypt[0].target.device(),
        Path::new(&format!("{}:{}", integrity.major, integrity.minor))
    );
    assert!(
        !name("nodes-vanish-integrity").node().exists(),
        "this test's dm removed the node"
    );
    assert!(opened.device.exists());
    sealcsi::volume::close(&dm, "nodes-vanish").unwrap();
    assert!(dm.info(&name("nodes-vanish")).unwrap().is_none());
}
