//! Guest tests of the attested transfer: docs/runbooks/migrate-volume.md, section (b) (a node-local
//! volume), step by step with the real `sealcsi` binary, the real kernel (dm-crypt over dm-integrity,
//! loop devices) and ext4. Two simulated nodes: node A (`--sim-identity node-a`, state dir `a/`) and
//! node B (`--sim-identity node-b`, state dir `b/`), so A and B have different simulator seeds, as two
//! machines would. The TPM variant gives each node its own swtpm (`--tee tpm`).
//!
//! They need root, loop devices and device-mapper, so they are ignored in a plain `cargo test`:
//!
//! ```text
//! cargo test --test guest_transfer --no-run      # prints the test binary's path
//! tests/vm/run-in-guest.sh -- <binary> --ignored --test-threads=1 --nocapture
//! ```

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use sha2::{Digest, Sha256};

mod common;
use common::{BIN, MIB, Out, p, run, sh};

#[path = "common/swtpm.rs"]
mod swtpm;
use swtpm::Swtpm;

const EXIT_WRONG_IDENTITY: i32 = 3;
const EXIT_INVALID_HEADER: i32 = 4;
const EXIT_REFUSED: i32 = 6;

/// A simulated node: its identity string and its own state dir.
#[derive(Clone, Copy)]
struct Node {
    identity: &'static str,
    state: &'static str,
}

const A: Node = Node {
    identity: "node-a",
    state: "a",
};
const B: Node = Node {
    identity: "node-b",
    state: "b",
};

struct Fixture {
    dir: PathBuf,
    /// Nodes that use a TPM (swtpm) instead of the simulated TEE: state dir -> TCTI.
    tctis: RefCell<HashMap<&'static str, String>>,
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
        let dir = root.join(format!("guest-transfer-{test}"));
        let _ = fs::remove_dir_all(&dir);
        for node in [A, B] {
            fs::create_dir_all(dir.join(node.state)).unwrap();
        }
        println!("== {test}");
        Fixture {
            dir,
            tctis: RefCell::new(HashMap::new()),
            names: RefCell::new(Vec::new()),
            mounts: RefCell::new(Vec::new()),
        }
    }

    /// Runs the binary on `node`.
    fn on(&self, node: Node, args: &[&str]) -> Out {
        let mut cmd = Command::new(BIN);
        cmd.env_remove("SEALCSI_TEE")
            .env_remove("SEALCSI_STATE_DIR")
            .env_remove("SEALCSI_SIM_IDENTITY")
            .env_remove("SEALCSI_LOG")
            .env_remove("SEALCSI_TPM_TCTI")
            .env_remove("SEALCSI_TPM_PCRS")
            .arg("--state-dir")
            .arg(self.dir.join(node.state));
        let what = match self.tctis.borrow().get(node.state) {
            Some(tcti) => {
                // tpm2-tss logs refused unseals (slots for another TPM) to stderr: docs/keys.md.
                cmd.env("TSS2_LOG", "all+NONE")
                    .args(["--tee", "tpm", "--tpm-tcti", tcti]);
                format!("sealcsi [tpm {}] {}", node.state, args.join(" "))
            }
            None => {
                cmd.args(["--tee", "sim", "--sim-identity", node.identity]);
                format!("sealcsi [{}] {}", node.identity, args.join(" "))
            }
        };
        cmd.args(args);
        run(cmd, what)
    }

    /// A node's path (its "disk").
    fn path(&self, node: Node, name: &str) -> PathBuf {
        self.dir.join(node.state).join(name)
    }

    fn name(&self, tag: &str) -> String {
        format!("gt-{tag}")
    }

    fn mount(&self, node: Node, file: &Path, tag: &str) -> PathBuf {
        let name = self.name(tag);
        self.names.borrow_mut().push(name.clone());
        let report = self
            .on(node, &["volume", "open", p(file), "--name", &name])
            .ok()
            .json();
        let device = report["device"].as_str().expect("device").to_owned();
        let mnt = self.dir.join(format!("mnt-{tag}"));
        fs::create_dir_all(&mnt).unwrap();
        sh("mount", &[&device, p(&mnt)]).ok();
        self.mounts.borrow_mut().push(mnt.clone());
        mnt
    }

    fn unmount_close(&self, node: Node, mnt: &Path, tag: &str) {
        sh("umount", &[p(mnt)]).ok();
        self.mounts.borrow_mut().retain(|m| m != mnt);
        let name = self.name(tag);
        self.on(node, &["volume", "close", &name]).ok();
        self.names.borrow_mut().retain(|n| *n != name);
    }

    /// The bytes of a file, after a sync (the header writes are O_DIRECT; this reads what the disk has).
    fn bytes(&self, file: &Path) -> Vec<u8> {
        let _ = sh("sync", &[]);
        fs::read(file).unwrap()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        for mnt in self.mounts.borrow().iter().rev() {
            let _ = sh("umount", &["-l", p(mnt)]);
        }
        for name in self.names.borrow().iter().rev() {
            let _ = self.on(A, &["volume", "close", name]);
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A copy of request `from` with another ephemeral public key (bytes 64..96) and a valid checksum: the
/// evidence no longer binds the key (docs/format.md, "Transfer request file").
fn forge_key(from: &Path, to: &Path) {
    let mut bytes = fs::read(from).unwrap();
    bytes[64..96].copy_from_slice(&[0x77; 32]);
    let end = bytes.len() - 32;
    let sum = Sha256::digest(&bytes[..end]);
    bytes[end..].copy_from_slice(&sum);
    fs::write(to, bytes).unwrap();
}

/// migrate-volume.md (b), node-local volume, with two simulated nodes; and the refusals: a request from
/// an identity the expectation does not name, a forged request, a replayed request, a wrong key check.
/// Every refusal leaves the volume file byte for byte as it was.
#[test]
#[ignore = "guest: needs device-mapper, run via tests/vm/run-in-guest.sh"]
fn guest_transfer_node_local_runbook_sim() {
    let fx = Fixture::new("node-local-sim");
    // Node A has a volume with data (what the CSI node made for a PVC: a file under its state dir).
    let on_a = fx.path(A, "sv-vol.img");
    fs::File::create(&on_a).unwrap().set_len(64 * MIB).unwrap();
    fx.on(A, &["volume", "format", p(&on_a)]).ok();
    let mnt = fx.mount(A, &on_a, "a");
    fs::write(mnt.join("marker"), "written on node A").unwrap();
    fx.unmount_close(A, &mnt, "a");
    let uuid = fx.on(A, &["volume", "inspect", p(&on_a)]).ok().json()["uuid"]
        .as_str()
        .unwrap()
        .to_owned();

    // Step 1, on B: the transfer request (for this volume only).
    let request = fx.path(B, "request.bin");
    let made = fx
        .on(
            B,
            &[
                "volume",
                "transfer-request",
                "--out",
                p(&request),
                "--volume-uuid",
                &uuid,
            ],
        )
        .ok();
    assert!(
        made.stderr.contains("WARNING"),
        "sample evidence warns: {made}"
    );
    let made = made.json();
    let b_digest = fx.on(B, &["volume", "identity"]).ok().json()["digest"].clone();
    assert_eq!(made["target_identity"], b_digest, "{made}");
    assert_eq!(made["volume_uuid"].as_str(), Some(uuid.as_str()));
    // The request exists once.
    fx.on(B, &["volume", "transfer-request", "--out", p(&request)])
        .exit(2);

    // Refusals on A, each leaving the volume file as it was.
    let before = fx.bytes(&on_a);
    fx.on(
        A,
        &[
            "volume",
            "transfer-grant",
            p(&on_a),
            "--request",
            p(&request),
            "--expect",
            "sim:node-c",
        ],
    )
    .exit(EXIT_REFUSED)
    .error_mentions("not the expected");
    let forged = fx.path(B, "forged.bin");
    forge_key(&request, &forged);
    fx.on(
        A,
        &[
            "volume",
            "transfer-grant",
            p(&on_a),
            "--request",
            p(&forged),
            "--expect",
            "sim:node-b",
        ],
    )
    .exit(EXIT_REFUSED)
    .error_mentions("does not bind");
    assert_eq!(fx.bytes(&on_a), before, "refusals change nothing");

    // Step 2, on A: the grant.
    let grant_args = [
        "volume",
        "transfer-grant",
        p(&on_a),
        "--request",
        p(&request),
        "--expect",
        "sim:node-b",
    ];
    let granted = fx.on(A, &grant_args).ok().json();
    let key_check = granted["key_check"].as_str().unwrap().to_owned();
    assert_eq!(granted["volume_uuid"].as_str(), Some(uuid.as_str()));
    let slots = fx.on(A, &["volume", "slots", p(&on_a)]).ok().json();
    let transfer_slot = &slots["slots"][granted["slot"].as_u64().unwrap() as usize];
    assert_eq!(transfer_slot["kind"], "transfer", "{slots}");
    // A replayed request is refused, nothing changed.
    let after_grant = fx.bytes(&on_a);
    fx.on(A, &grant_args)
        .exit(EXIT_REFUSED)
        .error_mentions("already granted");
    assert_eq!(fx.bytes(&on_a), after_grant);

    // Step 3: copy the ciphertext file to B (sparse-aware: `cp --sparse=always`; across machines,
    // `rsync --sparse`).
    let on_b = fx.path(B, "sv-vol.img");
    sh("cp", &["--sparse=always", p(&on_a), p(&on_b)]).ok();

    // Step 4, on B: accept. A wrong key check is refused with nothing changed.
    let copied = fx.bytes(&on_b);
    fx.on(
        B,
        &[
            "volume",
            "transfer-accept",
            p(&on_b),
            "--key-check",
            &"00".repeat(32),
        ],
    )
    .exit(EXIT_INVALID_HEADER);
    assert_eq!(fx.bytes(&on_b), copied);
    let accepted = fx
        .on(
            B,
            &[
                "volume",
                "transfer-accept",
                p(&on_b),
                "--key-check",
                &key_check,
            ],
        )
        .ok()
        .json();
    assert_eq!(accepted["key_checked"], Value::Bool(true), "{accepted}");
    let slots = fx.on(B, &["volume", "slots", p(&on_b)]).ok().json();
    assert_eq!(slots["this_node_slot"], accepted["slot"], "{slots}");
    assert!(
        slots["slots"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["kind"] != "transfer"),
        "the transfer slot is gone: {slots}"
    );
    // Accept again: idempotent.
    fx.on(
        B,
        &[
            "volume",
            "transfer-accept",
            p(&on_b),
            "--key-check",
            &key_check,
        ],
    )
    .ok();

    // Step 5, on B: open reads A's data.
    let mnt = fx.mount(B, &on_b, "b");
    assert_eq!(
        fs::read_to_string(mnt.join("marker")).unwrap(),
        "written on node A"
    );
    fx.unmount_close(B, &mnt, "b");

    // Step 6, on B: A's slot is removable; A can no longer open B's copy.
    let a_slot = slots["slots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["kind"] == "sealed" && s["index"] != accepted["slot"])
        .map(|s| s["index"].as_u64().unwrap())
        .expect("A's slot");
    fx.on(
        B,
        &[
            "volume",
            "remove-slot",
            p(&on_b),
            "--slot",
            &a_slot.to_string(),
        ],
    )
    .ok();
    let name = fx.name("denied");
    fx.on(A, &["volume", "open", p(&on_b), "--name", &name])
        .exit(EXIT_WRONG_IDENTITY);
    let mnt = fx.mount(B, &on_b, "b2");
    assert_eq!(
        fs::read_to_string(mnt.join("marker")).unwrap(),
        "written on node A"
    );
    fx.unmount_close(B, &mnt, "b2");

    // The request stays used on A, whatever A's volume looks like now.
    let after = fx.bytes(&on_a);
    fx.on(A, &grant_args)
        .exit(EXIT_REFUSED)
        .error_mentions("already granted");
    assert_eq!(fx.bytes(&on_a), after);
}

/// Brings the guest's loopback interface up if it is down (swtpm listens on 127.0.0.1).
fn ensure_loopback() {
    let flags = fs::read_to_string("/sys/class/net/lo/flags").unwrap_or_default();
    let up =
        u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).is_ok_and(|f| f & 1 == 1);
    if up {
        return;
    }
    if sh("ip", &["link", "set", "lo", "up"]).code != 0 {
        sh("busybox", &["ifconfig", "lo", "up"]).ok();
    }
}

/// migrate-volume.md (b) with TPM nodes: A and B each have their own swtpm. B's quote is checked
/// against B's attestation key and the PCR values of a fresh TPM (all zero); a request checked against
/// other PCR values, or A's key, is refused with the file unchanged.
#[test]
#[ignore = "guest: needs device-mapper, run via tests/vm/run-in-guest.sh"]
fn guest_transfer_node_local_runbook_tpm() {
    assert!(swtpm::installed_or_allowed_skip(), "this test needs swtpm");
    ensure_loopback();
    let fx = Fixture::new("node-local-tpm");
    let tpm_a = Swtpm::start(&fx.dir.join("swtpm-a"));
    let tpm_b = Swtpm::start(&fx.dir.join("swtpm-b"));
    fx.tctis.borrow_mut().insert(A.state, tpm_a.tcti());
    fx.tctis.borrow_mut().insert(B.state, tpm_b.tcti());

    let on_a = fx.path(A, "sv-vol.img");
    fs::File::create(&on_a).unwrap().set_len(64 * MIB).unwrap();
    fx.on(A, &["volume", "format", p(&on_a)]).ok();
    let mnt = fx.mount(A, &on_a, "ta");
    fs::write(mnt.join("marker"), "written on TPM node A").unwrap();
    fx.unmount_close(A, &mnt, "ta");

    let request = fx.path(B, "request.bin");
    let made = fx
        .on(B, &["volume", "transfer-request", "--out", p(&request)])
        .ok()
        .json();
    assert_eq!(made["evidence"], "tpm", "{made}");
    let ak_b = made["ak_sha256"].as_str().expect("ak_sha256").to_owned();
    let zeros = "00".repeat(32);
    let ones = "11".repeat(32);
    let expect =
        |ak: &str, pcr7: &str| format!("tpm:{ak}:sha256:0={zeros},2={zeros},4={zeros},7={pcr7}");
    let grant = |expect: &str| {
        fx.on(
            A,
            &[
                "volume",
                "transfer-grant",
                p(&on_a),
                "--request",
                p(&request),
                "--expect",
                expect,
            ],
        )
    };
    let before = fx.bytes(&on_a);
    grant(&expect(&ak_b, &ones))
        .exit(EXIT_REFUSED)
        .error_mentions("PCR values");
    grant(&expect(&"ab".repeat(32), &zeros))
        .exit(EXIT_REFUSED)
        .error_mentions("trusted one");
    assert_eq!(fx.bytes(&on_a), before, "refusals change nothing");
    let granted = grant(&expect(&ak_b, &zeros)).ok().json();
    assert_eq!(granted["simulated"], Value::Bool(false), "{granted}");
    let key_check = granted["key_check"].as_str().unwrap().to_owned();
    grant(&expect(&ak_b, &zeros))
        .exit(EXIT_REFUSED)
        .error_mentions("already granted");

    let on_b = fx.path(B, "sv-vol.img");
    sh("cp", &["--sparse=always", p(&on_a), p(&on_b)]).ok();
    fx.on(
        B,
        &[
            "volume",
            "transfer-accept",
            p(&on_b),
            "--key-check",
            &key_check,
        ],
    )
    .ok();
    let mnt = fx.mount(B, &on_b, "tb");
    assert_eq!(
        fs::read_to_string(mnt.join("marker")).unwrap(),
        "written on TPM node A"
    );
    fx.unmount_close(B, &mnt, "tb");
    drop((tpm_a, tpm_b));
}
