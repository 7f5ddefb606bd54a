//! Guest tests of the keyslot lifecycle: each follows a runbook of docs/runbooks/ step by step with the
//! real `sealcsi` binary, the real kernel (dm-crypt over dm-integrity, loop devices) and ext4. Simulated
//! identities stand in for TEE launch identities: "old image" = `--sim-identity A`, "new image" = B,
//! "replacement node" = C, all sharing one simulator seed (one "machine").
//!
//! They need root, loop devices and device-mapper, so they are ignored in a plain `cargo test`:
//!
//! ```text
//! cargo test --test guest_keyslots --no-run      # prints the test binary's path
//! tests/vm/run-in-guest.sh -- <binary> --ignored --test-threads=1 --nocapture
//! ```

use std::cell::RefCell;
use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;
use common::{BIN, MIB, Out, p, run, sh};

const HEADER: usize = 4096;
const EXIT_USAGE: i32 = 2;
const EXIT_WRONG_IDENTITY: i32 = 3;
const EXIT_INVALID_HEADER: i32 = 4;
const EXIT_REFUSED: i32 = 6;

/// One test's scratch directory, the shared simulator state, and what it opened and mounted.
struct Fixture {
    dir: PathBuf,
    state: PathBuf,
    names: RefCell<Vec<String>>,
    mounts: RefCell<Vec<PathBuf>>,
}

impl Fixture {
    fn new(test: &str) -> Self {
        assert_eq!(
            std::env::var("SEALCSI_IN_GUEST").as_deref(),
            Ok("1"),
            "guest test: run it via tests/vm/run-in-guest.sh"
        );
        let root = PathBuf::from(std::env::var_os("SCRATCH").unwrap_or_else(|| "/scratch".into()));
        let dir = root.join(format!("guest-keyslots-{test}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        println!("== {test}");
        Fixture {
            state: dir.join("state"),
            dir,
            names: RefCell::new(Vec::new()),
            mounts: RefCell::new(Vec::new()),
        }
    }

    fn command(&self, identity: &str, args: &[&str]) -> (Command, String) {
        let mut cmd = Command::new(BIN);
        cmd.env_remove("SEALCSI_TEE")
            .env_remove("SEALCSI_STATE_DIR")
            .env_remove("SEALCSI_SIM_IDENTITY")
            .env_remove("SEALCSI_LOG")
            .args(["--tee", "sim", "--state-dir"])
            .arg(&self.state)
            .args(["--sim-identity", identity])
            .args(args);
        let what = format!("sealcsi --sim-identity {identity} {}", args.join(" "));
        (cmd, what)
    }

    /// Runs the binary as the simulated node `identity`.
    fn as_(&self, identity: &str, args: &[&str]) -> Out {
        let (cmd, what) = self.command(identity, args);
        run(cmd, what)
    }

    fn file(&self, name: &str) -> PathBuf {
        let path = self.dir.join(name);
        let f = fs::File::create(&path).unwrap();
        f.set_len(64 * MIB).unwrap();
        path
    }

    /// Formats `file` as `identity` (ext4) and writes a marker file into it.
    fn format_with_data(&self, identity: &str, file: &Path, marker: &str) {
        self.as_(identity, &["volume", "format", p(file)]).ok();
        let mnt = self.mount_as(identity, file, "fmt");
        fs::write(mnt.join("marker"), marker).unwrap();
        self.unmount_close(&mnt, "fmt");
    }

    fn name(&self, tag: &str) -> String {
        let name = format!(
            "gk-{}-{tag}",
            self.dir.file_name().unwrap().to_str().unwrap()
        );
        name.chars().take(100).collect()
    }

    fn try_open(&self, identity: &str, file: &Path, tag: &str) -> Out {
        let name = self.name(tag);
        self.names.borrow_mut().push(name.clone());
        self.as_(identity, &["volume", "open", p(file), "--name", &name])
    }

    fn mount_as(&self, identity: &str, file: &Path, tag: &str) -> PathBuf {
        let report = self.try_open(identity, file, tag).ok().json();
        let device = report["device"].as_str().expect("device").to_owned();
        let mnt = self.dir.join(format!("mnt-{tag}"));
        fs::create_dir_all(&mnt).unwrap();
        sh("mount", &[&device, p(&mnt)]).ok();
        self.mounts.borrow_mut().push(mnt.clone());
        mnt
    }

    fn unmount_close(&self, mnt: &Path, tag: &str) {
        sh("umount", &[p(mnt)]).ok();
        self.mounts.borrow_mut().retain(|m| m != mnt);
        let name = self.name(tag);
        self.as_("A", &["volume", "close", &name]).ok();
        self.names.borrow_mut().retain(|n| *n != name);
    }

    /// Opens as `identity`, checks the marker, closes.
    #[track_caller]
    fn assert_data(&self, identity: &str, file: &Path, marker: &str) {
        let mnt = self.mount_as(identity, file, "check");
        assert_eq!(fs::read_to_string(mnt.join("marker")).unwrap(), marker);
        self.unmount_close(&mnt, "check");
    }

    #[track_caller]
    fn assert_cannot_open(&self, identity: &str, file: &Path) {
        self.try_open(identity, file, "denied")
            .exit(EXIT_WRONG_IDENTITY);
    }

    fn digest(&self, identity: &str) -> String {
        self.as_(identity, &["volume", "identity"]).ok().json()["digest"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// `volume slots` as `identity`.
    fn slots(&self, identity: &str, file: &Path) -> Value {
        self.as_(identity, &["volume", "slots", p(file)])
            .ok()
            .json()
    }

    /// The index of the sealed slot whose digest is `identity`'s.
    fn slot_of(&self, identity: &str, file: &Path) -> Option<usize> {
        let digest = self.digest(identity);
        self.slots(identity, file)["slots"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["kind"] == "sealed" && s["identity_digest"] == digest.as_str())
            .map(|s| s["index"].as_u64().unwrap() as usize)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        for mnt in self.mounts.borrow().iter().rev() {
            let _ = sh("umount", &["-l", p(mnt)]);
        }
        for name in self.names.borrow().iter().rev() {
            let _ = self.as_("A", &["volume", "close", name]);
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Both header copies of `file`, read from the disk.
fn header_copies(file: &Path) -> Vec<Vec<u8>> {
    let _ = sh("sync", &[]);
    let _ = fs::write("/proc/sys/vm/drop_caches", "3");
    let mut buf = vec![0u8; 2 * HEADER];
    fs::File::open(file).unwrap().read_exact(&mut buf).unwrap();
    buf.chunks(HEADER).map(<[u8]>::to_vec).collect()
}

/// Runbooks image-upgrade-snp.md and image-upgrade-tpm.md, with sim identities: the old image (A)
/// pre-authorises the new one (B), the node boots B, B removes A's slot.
#[test]
#[ignore = "guest: needs device-mapper, run via tests/vm/run-in-guest.sh"]
fn guest_keyslots_image_upgrade() {
    let fx = Fixture::new("upgrade");
    let file = fx.file("vol");
    fx.format_with_data("A", &file, "before the upgrade");

    // Step 1, on the old image: add a slot for the new image. Idempotent.
    let added = fx
        .as_("A", &["volume", "add-slot", p(&file), "--for", "sim:B"])
        .ok()
        .json();
    assert_eq!(
        (added["slot"].as_u64(), added["changed"].as_bool()),
        (Some(1), Some(true)),
        "{added}"
    );
    let again = fx
        .as_("A", &["volume", "add-slot", p(&file), "--for", "sim:B"])
        .ok()
        .json();
    assert_eq!(again["changed"], Value::Bool(false), "{again}");
    // Bad targets are usage errors.
    fx.as_("A", &["volume", "add-slot", p(&file), "--for", "nope"])
        .exit(EXIT_USAGE);

    // Step 2, boot the new image: it opens the volume through its own slot.
    assert_eq!(fx.slots("B", &file)["this_node_slot"], Value::from(1));
    fx.assert_data("B", &file, "before the upgrade");

    // Step 3, on the new image: remove the old image's slot.
    let a_slot = fx.slot_of("A", &file).expect("A's slot");
    assert_eq!(a_slot, 0);
    fx.as_(
        "B",
        &[
            "volume",
            "remove-slot",
            p(&file),
            "--slot",
            &a_slot.to_string(),
        ],
    )
    .ok();
    fx.assert_cannot_open("A", &file);
    fx.assert_data("B", &file, "before the upgrade");
    // B's slot is now the last: removing it is refused without --force; a missing slot is refused.
    fx.as_("B", &["volume", "remove-slot", p(&file), "--slot", "1"])
        .exit(EXIT_REFUSED);
    fx.as_("B", &["volume", "remove-slot", p(&file), "--slot", "0"])
        .exit(EXIT_USAGE);
    // A cannot add itself back.
    fx.as_("A", &["volume", "add-slot", p(&file), "--for", "current"])
        .exit(EXIT_WRONG_IDENTITY);
}

/// Runbook disaster-recovery.md: escrow to an operator key, lose the node, recover on a new node.
#[test]
#[ignore = "guest: needs device-mapper, run via tests/vm/run-in-guest.sh"]
fn guest_keyslots_disaster_recovery() {
    let fx = Fixture::new("recovery");
    let file = fx.file("vol");
    fx.format_with_data("A", &file, "escrowed");
    let private = fx.dir.join("recovery.key");
    let public = fx.dir.join("recovery.pub");

    // Step 1, operator workstation: a key pair. The private key is 0600 and never printed.
    let keygen = fx
        .as_(
            "A",
            &[
                "recovery-keygen",
                "--private-key",
                p(&private),
                "--public-key",
                p(&public),
            ],
        )
        .ok();
    assert_eq!(
        fs::metadata(&private).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let secret_hex = fs::read_to_string(&private).unwrap();
    let secret_hex = secret_hex.split_whitespace().last().unwrap().to_owned();
    assert!(!keygen.stdout.contains(&secret_hex) && !keygen.stderr.contains(&secret_hex));
    // It never overwrites.
    fx.as_(
        "A",
        &[
            "recovery-keygen",
            "--private-key",
            p(&private),
            "--public-key",
            p(&fx.dir.join("other.pub")),
        ],
    )
    .exit(EXIT_USAGE);

    // Step 2, on the node: escrow the volume key.
    let escrow = fx
        .as_(
            "A",
            &[
                "volume",
                "add-recovery",
                p(&file),
                "--recovery-public-key",
                p(&public),
            ],
        )
        .ok()
        .json();
    let key_check = escrow["key_check"].as_str().unwrap().to_owned();
    assert_eq!(escrow["slot"], Value::from(1), "{escrow}");
    assert_eq!(
        escrow["fingerprint"],
        keygen.json()["fingerprint"],
        "{escrow}"
    );

    // The disaster: the node's slot is gone (its TEE identity is lost). Removing the node's last slot
    // needs --force even though the escrow slot remains.
    fx.as_("A", &["volume", "remove-slot", p(&file), "--slot", "0"])
        .exit(EXIT_REFUSED);
    fx.as_(
        "A",
        &["volume", "remove-slot", p(&file), "--slot", "0", "--force"],
    )
    .ok();
    fx.assert_cannot_open("A", &file);
    fx.assert_cannot_open("C", &file);

    // Step 3, on the replacement node C: recover with the private key and the key check.
    let recover = |extra: &[&str]| {
        let mut args = vec![
            "volume",
            "recover",
            p(&file),
            "--recovery-private-key",
            p(&private),
        ];
        args.extend_from_slice(extra);
        fx.as_("C", &args)
    };
    recover(&[]).exit(EXIT_USAGE);
    recover(&["--key-check", &"00".repeat(32)]).exit(EXIT_INVALID_HEADER);
    let done = recover(&["--key-check", &key_check]).ok().json();
    assert_eq!(
        (done["recovery_slot"].as_u64(), done["created"].as_bool()),
        (Some(1), Some(true)),
        "{done}"
    );
    let again = recover(&["--key-check", &key_check]).ok().json();
    assert_eq!(again["created"], Value::Bool(false), "{again}");
    fx.assert_data("C", &file, "escrowed");
    fx.assert_cannot_open("A", &file);
}

/// Runbook retire-node.md, both ways: remove the retiring node's slot from a node that stays, then
/// crypto-erase a volume nobody should read again.
#[test]
#[ignore = "guest: needs device-mapper, run via tests/vm/run-in-guest.sh"]
fn guest_keyslots_retire_node_and_erase() {
    let fx = Fixture::new("retire");
    let file = fx.file("vol");
    fx.format_with_data("A", &file, "shared");
    fx.as_("A", &["volume", "add-slot", p(&file), "--for", "sim:B"])
        .ok();
    let private = fx.dir.join("r.key");
    let public = fx.dir.join("r.pub");
    fx.as_(
        "A",
        &[
            "recovery-keygen",
            "--private-key",
            p(&private),
            "--public-key",
            p(&public),
        ],
    )
    .ok();
    fx.as_(
        "A",
        &[
            "volume",
            "add-recovery",
            p(&file),
            "--recovery-public-key",
            p(&public),
        ],
    )
    .ok();

    // Retire A: B removes A's slot; A is locked out, B keeps the data.
    let a_slot = fx.slot_of("A", &file).unwrap().to_string();
    fx.as_("B", &["volume", "remove-slot", p(&file), "--slot", &a_slot])
        .ok();
    fx.assert_cannot_open("A", &file);
    fx.assert_data("B", &file, "shared");
    let wrapped_a_gone = fx.slots("B", &file)["slots"].as_array().unwrap().len();
    assert_eq!(wrapped_a_gone, 2, "B's slot and the escrow slot remain");

    // Erase: refused without --force, then every copy loses every slot.
    fx.as_("B", &["volume", "erase", p(&file)])
        .exit(EXIT_REFUSED);
    let erased = fx.as_("B", &["volume", "erase", p(&file), "--force"]).ok();
    assert!(
        erased.stderr.contains("never be decrypted again"),
        "{erased}"
    );
    for identity in ["A", "B", "C"] {
        fx.assert_cannot_open(identity, &file);
    }
    fx.as_(
        "C",
        &[
            "volume",
            "recover",
            p(&file),
            "--recovery-private-key",
            p(&private),
            "--unverified",
        ],
    )
    .exit(EXIT_WRONG_IDENTITY);
    for (copy, bytes) in header_copies(&file).iter().enumerate() {
        assert_eq!(&bytes[0..8], b"SEALCSI\0", "copy {copy} is still a header");
        assert!(
            bytes[128..128 + 8 * 384].iter().all(|&b| b == 0),
            "header copy {copy} still holds keyslot bytes"
        );
    }
    assert_eq!(
        fx.slots("B", &file)["slots"].as_array().map(Vec::len),
        Some(0)
    );
}

/// Crash safety with the real binary: `add-slot` is killed with SIGKILL at delays spread over its
/// run time (the test process is the killer; the guest itself is not hard-stopped, so this checks the
/// process-level crash, and the host unit test covers torn sector writes). After every kill the
/// volume holds the old slot set (A only) or the new one (A and B), never anything else.
#[test]
#[ignore = "guest: needs device-mapper, run via tests/vm/run-in-guest.sh"]
fn guest_keyslots_crash_during_add_slot() {
    let fx = Fixture::new("crash");
    let file = fx.file("vol");
    fx.format_with_data("A", &file, "survives");

    // How long one add-slot takes here.
    let started = Instant::now();
    fx.as_("A", &["volume", "add-slot", p(&file), "--for", "sim:B"])
        .ok();
    let full = started.elapsed();
    fx.as_("A", &["volume", "remove-slot", p(&file), "--slot", "1"])
        .ok();
    println!("one add-slot takes {full:?}");

    let rounds = 40u32;
    let (mut old, mut new) = (0, 0);
    for round in 0..rounds {
        // Spread over 0..1.5x the measured run time, so kills land before, during and after the write.
        let delay =
            full * 3 * round / (2 * rounds) + Duration::from_micros(u64::from(round) * 137 % 1000);
        let (mut cmd, _) = fx.command("A", &["volume", "add-slot", p(&file), "--for", "sim:B"]);
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        let _ = child.kill();
        let _ = child.wait();

        let slots = fx.slots("A", &file);
        assert_eq!(
            slots["this_node_slot"],
            Value::from(0),
            "round {round}: A lost its slot: {slots}"
        );
        let listed = slots["slots"].as_array().unwrap().len();
        let b = fx.slots("B", &file)["this_node_slot"].clone();
        match listed {
            1 => {
                assert_eq!(b, Value::Null, "round {round}");
                old += 1;
            }
            2 => {
                assert_eq!(b, Value::from(1), "round {round}: B's slot does not open");
                new += 1;
                fx.as_("A", &["volume", "remove-slot", p(&file), "--slot", "1"])
                    .ok();
            }
            n => panic!("round {round}: {n} slots: {slots}"),
        }
    }
    println!("after {rounds} kills: {old} left the old slot set, {new} the new one");
    assert!(
        old > 0 && new > 0,
        "the kills did not cover both outcomes ({old} old, {new} new): widen the delays"
    );
    fx.assert_data("A", &file, "survives");
}

/// SIGKILLs `args` (run as `identity`) after each of `rounds` delays spread over 0..1.5x `full` (its
/// measured run time), and after every kill calls `check`, which says whether the old (false) or the
/// new (true) slot set is on the disk, asserts that the identities of that set open the volume, and
/// restores the old set. Returns (old, new) counts; both must be non-zero.
fn kill_at_delays(
    fx: &Fixture,
    identity: &str,
    args: &[&str],
    full: Duration,
    rounds: u32,
    mut check: impl FnMut(u32) -> bool,
) -> (u32, u32) {
    let (mut old, mut new) = (0, 0);
    for round in 0..rounds {
        let delay =
            full * 3 * round / (2 * rounds) + Duration::from_micros(u64::from(round) * 137 % 1000);
        let (mut cmd, _) = fx.command(identity, args);
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        let _ = child.kill();
        let _ = child.wait();
        if check(round) {
            new += 1;
        } else {
            old += 1;
        }
    }
    (old, new)
}

/// Crash safety of `remove-slot` and `recover` with the real binary, as for add-slot above: SIGKILL at
/// delays spread over the command's run time, then the volume must hold the old or the new slot set,
/// and the identities of that set must open it (never neither).
///
/// - `remove-slot`: the new image B removes the old image A's slot (image-upgrade runbook step 6).
///   Old set: A and B open. New set: B opens, A is refused. B opens in every case.
/// - `recover`: a replacement node C recovers through the escrow slot while A still has its slot. Old
///   set: A opens, C does not, the escrow slot is intact. New set: A and C open. A opens in every case.
#[test]
#[ignore = "guest: needs device-mapper, run via tests/vm/run-in-guest.sh"]
fn guest_keyslots_crash_during_remove_slot_and_recover() {
    let fx = Fixture::new("crash-rm-rec");
    let file = fx.file("vol");
    fx.format_with_data("A", &file, "survives");
    fx.as_("A", &["volume", "add-slot", p(&file), "--for", "sim:B"])
        .ok();
    let rounds = 40u32;
    let slot_count = |slots: &Value| -> usize { slots["slots"].as_array().map_or(0, Vec::len) };

    // --- remove-slot: B removes A's slot 0. ---
    let remove_a: &[&str] = &["volume", "remove-slot", p(&file), "--slot", "0"];
    let restore_a = || {
        let added = fx
            .as_("B", &["volume", "add-slot", p(&file), "--for", "sim:A"])
            .ok()
            .json();
        assert_eq!(added["slot"], Value::from(0), "{added}");
    };
    let started = Instant::now();
    fx.as_("B", remove_a).ok();
    let full = started.elapsed();
    restore_a();
    println!("one remove-slot takes {full:?}");
    let (old, new) = kill_at_delays(&fx, "B", remove_a, full, rounds, |round| {
        let b = fx.slots("B", &file);
        assert_eq!(
            b["this_node_slot"],
            Value::from(1),
            "round {round}: B lost its slot: {b}"
        );
        let a = fx.slots("A", &file)["this_node_slot"].clone();
        match slot_count(&b) {
            2 => {
                assert_eq!(a, Value::from(0), "round {round}: A's slot does not open");
                false
            }
            1 => {
                assert_eq!(a, Value::Null, "round {round}: A still opens");
                fx.assert_cannot_open("A", &file);
                restore_a();
                true
            }
            n => panic!("round {round}: {n} slots: {b}"),
        }
    });
    println!("remove-slot, after {rounds} kills: {old} left the old slot set, {new} the new one");
    assert!(
        old > 0 && new > 0,
        "the kills did not cover both outcomes ({old} old, {new} new): widen the delays"
    );
    fx.assert_data("A", &file, "survives");
    fx.assert_data("B", &file, "survives");

    // --- recover: C recovers through the escrow slot (index 2); A keeps slot 0, B's slot goes. ---
    fx.as_("A", &["volume", "remove-slot", p(&file), "--slot", "1"])
        .ok();
    let private = fx.dir.join("r.key");
    let public = fx.dir.join("r.pub");
    fx.as_(
        "A",
        &[
            "recovery-keygen",
            "--private-key",
            p(&private),
            "--public-key",
            p(&public),
        ],
    )
    .ok();
    let escrow = fx
        .as_(
            "A",
            &[
                "volume",
                "add-recovery",
                p(&file),
                "--recovery-public-key",
                p(&public),
            ],
        )
        .ok()
        .json();
    let escrow_slot = escrow["slot"].as_u64().unwrap();
    assert_eq!(escrow_slot, 1, "{escrow}");
    let key_check = escrow["key_check"].as_str().unwrap().to_owned();
    let recover: &[&str] = &[
        "volume",
        "recover",
        p(&file),
        "--recovery-private-key",
        p(&private),
        "--key-check",
        &key_check,
    ];
    let remove_c = || {
        fx.as_("A", &["volume", "remove-slot", p(&file), "--slot", "2"])
            .ok();
    };
    let started = Instant::now();
    let done = fx.as_("C", recover).ok().json();
    let full = started.elapsed();
    assert_eq!(
        (done["slot"].as_u64(), done["created"].as_bool()),
        (Some(2), Some(true)),
        "{done}"
    );
    remove_c();
    println!("one recover takes {full:?}");
    let (old, new) = kill_at_delays(&fx, "C", recover, full, rounds, |round| {
        let a = fx.slots("A", &file);
        assert_eq!(
            a["this_node_slot"],
            Value::from(0),
            "round {round}: A lost its slot: {a}"
        );
        let escrowed = &a["slots"][1];
        assert_eq!(
            (escrowed["index"].as_u64(), escrowed["kind"].as_str()),
            (Some(escrow_slot), Some("recovery")),
            "round {round}: the escrow slot is gone: {a}"
        );
        let c = fx.slots("C", &file)["this_node_slot"].clone();
        match slot_count(&a) {
            2 => {
                assert_eq!(c, Value::Null, "round {round}: C opens without a slot");
                false
            }
            3 => {
                assert_eq!(c, Value::from(2), "round {round}: C's slot does not open");
                remove_c();
                true
            }
            n => panic!("round {round}: {n} slots: {a}"),
        }
    });
    println!("recover, after {rounds} kills: {old} left the old slot set, {new} the new one");
    assert!(
        old > 0 && new > 0,
        "the kills did not cover both outcomes ({old} old, {new} new): widen the delays"
    );
    // The escrow still works after all that, and everyone in the final set reads the data.
    fx.as_("C", recover).ok();
    fx.assert_data("C", &file, "survives");
    fx.assert_data("A", &file, "survives");
}
