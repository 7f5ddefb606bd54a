//! Guest test of docs/runbooks/image-upgrade-tpm.md with the real `sealcsi` binary, a real software TPM
//! (`swtpm`, started inside the guest on free local ports with its state in $SCRATCH), the real kernel
//! (dm-crypt over dm-integrity on a loop device) and ext4.
//!
//! A "boot" of an image is a power cycle of swtpm (PCRs reset, owner seed kept in its state directory)
//! followed by the image's measured-boot event log replayed into the PCRs. The old image measures a boot
//! loader into PCR 4 and a Secure Boot state into PCR 7; the new image measures the same, plus one more
//! PCR 7 event (say, a new db entry). A mis-predicted image measures another PCR 7 event.
//!
//! ```text
//! cargo test --test guest_tpm_runbook --no-run      # prints the test binary's path
//! tests/vm/run-in-guest.sh -- <binary> --ignored --test-threads=1 --nocapture
//! ```

use std::cell::RefCell;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

mod common;
use common::{BIN, MIB, Out, p, run, sh};
#[path = "common/swtpm.rs"]
mod swtpm;
use swtpm::Swtpm;

const EXIT_WRONG_IDENTITY: i32 = 3;
const EXIT_REFUSED: i32 = 6;

/// The PCRs the node seals to (the binary's default, `sha256:0,2,4,7`).
const PCRS: [u8; 4] = [0, 2, 4, 7];

/// Measured-boot event logs: (PCR, SHA-256 event digest) in extend order.
const OLD_IMAGE: &[(u8, [u8; 32])] = &[(4, [0x44; 32]), (7, [0x70; 32])];
/// The new image: the old chain plus one more PCR 7 event.
const NEW_EVENT: (u8, [u8; 32]) = (7, [0x71; 32]);
/// An image nobody predicted: another PCR 7 event.
const WRONG_EVENT: (u8, [u8; 32]) = (7, [0x99; 32]);

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

/// The node's TPM, with the guest's loopback up (swtpm listens on 127.0.0.1).
fn node_tpm(state: &Path) -> Swtpm {
    assert!(
        swtpm::installed_or_allowed_skip(),
        "the guest runbook needs swtpm"
    );
    ensure_loopback();
    Swtpm::start(state)
}

/// Boots an image: a power cycle, then its event log extended into the PCRs, as firmware would.
fn boot(tpm: &mut Swtpm, events: &[(u8, [u8; 32])]) {
    tpm.power_cycle();
    for (pcr, digest) in events {
        tpm.extend(*pcr, *digest);
    }
}

/// The node: its TPM, its sealcsi state directory, the disk, and what it opened and mounted.
struct Node {
    dir: PathBuf,
    state: PathBuf,
    tpm: Swtpm,
    disk: String,
    names: RefCell<Vec<String>>,
    mounts: RefCell<Vec<PathBuf>>,
}

impl Node {
    fn new(test: &str) -> Self {
        assert_eq!(
            std::env::var("SEALCSI_IN_GUEST").as_deref(),
            Ok("1"),
            "guest test: run it via tests/vm/run-in-guest.sh"
        );
        let root = PathBuf::from(std::env::var_os("SCRATCH").unwrap_or_else(|| "/scratch".into()));
        let dir = root.join(format!("guest-tpm-{test}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        println!("== {test}");
        let file = dir.join("disk.img");
        fs::File::create(&file).unwrap().set_len(64 * MIB).unwrap();
        // The node's disk, as a block device.
        let disk = sh("losetup", &["-f", "--show", p(&file)])
            .ok()
            .stdout
            .trim()
            .to_owned();
        Node {
            tpm: node_tpm(&dir.join("swtpm")),
            state: dir.join("state"),
            dir,
            disk,
            names: RefCell::new(Vec::new()),
            mounts: RefCell::new(Vec::new()),
        }
    }

    /// `sealcsi --tee tpm ARGS` on this node, reaching its TPM through the swtpm TCTI.
    fn sealcsi(&self, args: &[&str]) -> Out {
        let mut cmd = Command::new(BIN);
        for var in [
            "SEALCSI_TEE",
            "SEALCSI_STATE_DIR",
            "SEALCSI_TPM_TCTI",
            "SEALCSI_TPM_PCRS",
            "SEALCSI_SIM_IDENTITY",
            "SEALCSI_LOG",
        ] {
            cmd.env_remove(var);
        }
        // tpm2-tss logs every refused unseal (a slot for another PCR state) to stderr: docs/keys.md.
        cmd.env("TSS2_LOG", "all+NONE")
            .args([
                "--tee",
                "tpm",
                "--tpm-tcti",
                &self.tpm.tcti(),
                "--state-dir",
            ])
            .arg(&self.state)
            .args(args);
        run(cmd, format!("sealcsi --tee tpm {}", args.join(" ")))
    }

    fn name(&self, tag: &str) -> String {
        format!("gtpm-runbook-{tag}")
    }

    fn try_open(&self, tag: &str) -> Out {
        let name = self.name(tag);
        self.names.borrow_mut().push(name.clone());
        self.sealcsi(&["volume", "open", &self.disk, "--name", &name])
    }

    fn mount(&self, tag: &str) -> PathBuf {
        let report = self.try_open(tag).ok().json();
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
        self.sealcsi(&["volume", "close", &name]).ok();
        self.names.borrow_mut().retain(|n| *n != name);
    }

    /// Opens, checks the data, closes.
    #[track_caller]
    fn assert_data(&self, marker: &str) {
        let mnt = self.mount("check");
        assert_eq!(fs::read_to_string(mnt.join("marker")).unwrap(), marker);
        assert_eq!(fs::read(mnt.join("payload")).unwrap(), payload());
        self.unmount_close(&mnt, "check");
    }

    #[track_caller]
    fn assert_cannot_open(&self) -> Out {
        self.try_open("denied").exit(EXIT_WRONG_IDENTITY)
    }

    fn slots(&self) -> Value {
        self.sealcsi(&["volume", "slots", &self.disk]).ok().json()
    }

    fn pcr_values(&self) -> Vec<(u8, [u8; 32])> {
        PCRS.iter().map(|&pcr| (pcr, self.tpm.read(pcr))).collect()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        for mnt in self.mounts.borrow().iter().rev() {
            let _ = sh("umount", &["-l", p(mnt)]);
        }
        for name in self.names.borrow().iter().rev() {
            let _ = self.sealcsi(&["volume", "close", name]);
        }
        let _ = sh("losetup", &["-d", &self.disk]);
        self.tpm.stop();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// 4 MiB of deterministic bytes.
fn payload() -> Vec<u8> {
    (0..4 * MIB as usize)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1])
        .collect()
}

fn indices(slots: &Value) -> Vec<u64> {
    slots["slots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["index"].as_u64().unwrap())
        .collect()
}

/// docs/runbooks/image-upgrade-tpm.md, step by step.
#[test]
#[ignore = "guest: needs device-mapper, run via tests/vm/run-in-guest.sh"]
fn guest_tpm_runbook_image_upgrade_with_preauthorized_pcrs() {
    let mut node = Node::new("upgrade");
    let new_image: Vec<(u8, [u8; 32])> = OLD_IMAGE.iter().copied().chain([NEW_EVENT]).collect();
    let wrong_image: Vec<(u8, [u8; 32])> = OLD_IMAGE.iter().copied().chain([WRONG_EVENT]).collect();

    // The node runs the old image; its volume is sealed to the old image's PCR values.
    boot(&mut node.tpm, OLD_IMAGE);
    node.sealcsi(&["volume", "format", &node.disk]).ok();
    let mnt = node.mount("fmt");
    fs::write(mnt.join("marker"), "before the upgrade").unwrap();
    fs::write(mnt.join("payload"), payload()).unwrap();
    node.unmount_close(&mnt, "fmt");
    let old_identity = node.sealcsi(&["volume", "identity"]).ok().json();
    let before = node.slots();
    assert_eq!(before["this_node_slot"], Value::from(0), "{before}");
    assert_eq!(indices(&before), [0]);
    // The old image's slot, to remove in step 6 (`volume slots` on the old image: this_node_slot).
    let old_slot = before["this_node_slot"].as_u64().unwrap();
    assert_eq!(
        before["slots"][0]["identity_digest"], old_identity["digest"],
        "{before}\n{old_identity}"
    );

    // Step 1: predict the new image's values for PCRs 0,2,4,7: its event log replayed over the PCRs
    // the old image's chain left (only PCR 7 gets one more event; 0, 2, 4 keep their values).
    let old_values = node.pcr_values();
    let predicted: Vec<(u8, [u8; 32])> = old_values
        .iter()
        .map(|&(pcr, value)| {
            if pcr == NEW_EVENT.0 {
                (pcr, swtpm::extended(value, NEW_EVENT.1))
            } else {
                (pcr, value)
            }
        })
        .collect();
    assert_eq!(
        old_values[3].1,
        swtpm::extended([0; 32], OLD_IMAGE[1].1),
        "PCR 7 of the old image: one extend from zero"
    );
    let spec = predicted
        .iter()
        .map(|(pcr, value)| format!("{pcr}={}", hex::encode(value)))
        .collect::<Vec<_>>()
        .join(",");
    let target = format!("tpm-pcrs:sha256:{spec}");

    // Step 2, on the old image: add a slot for those values. `volume slots` lists it; the old image
    // still opens through its own slot, not through the new one.
    let added = node
        .sealcsi(&["volume", "add-slot", &node.disk, "--for", &target])
        .ok()
        .json();
    assert_eq!(
        (added["slot"].as_u64(), added["changed"].as_bool()),
        (Some(1), Some(true)),
        "{added}"
    );
    assert_eq!(added["for"], Value::from(target.as_str()), "{added}");
    let listed = node.slots();
    assert_eq!(indices(&listed), [0, 1], "{listed}");
    assert_eq!(listed["slots"][1]["source"], "tpm", "{listed}");
    assert_eq!(listed["this_node_slot"], Value::from(old_slot), "{listed}");
    // Not idempotent (each run seals a new secret): a repeat adds another slot, which the runbook says
    // to remove.
    let again = node
        .sealcsi(&["volume", "add-slot", &node.disk, "--for", &target])
        .ok()
        .json();
    assert_eq!(
        (again["slot"].as_u64(), again["changed"].as_bool()),
        (Some(2), Some(true)),
        "{again}"
    );
    node.sealcsi(&["volume", "remove-slot", &node.disk, "--slot", "2"])
        .ok();
    assert_eq!(indices(&node.slots()), [0, 1]);
    node.assert_data("before the upgrade");

    // Step 4's failure branch first: an image whose PCRs were not predicted cannot open the volume
    // (exit 3); booting the old image again loses nothing.
    boot(&mut node.tpm, &wrong_image);
    assert_eq!(node.slots()["this_node_slot"], Value::Null);
    node.assert_cannot_open();
    boot(&mut node.tpm, OLD_IMAGE);
    assert_eq!(node.slots()["this_node_slot"], Value::from(old_slot));
    node.assert_data("before the upgrade");

    // Step 3: drain (nothing is open) and reboot into the new image; the PCRs hold the prediction.
    boot(&mut node.tpm, &new_image);
    assert_eq!(node.pcr_values(), predicted);

    // Step 4, on the new image: `volume slots` shows this_node_slot not null (the pre-authorized slot),
    // and `volume open` works: the data is intact.
    let upgraded = node.slots();
    assert_eq!(upgraded["this_node_slot"], Value::from(1), "{upgraded}");
    let mnt = node.mount("new");
    assert_eq!(
        fs::read_to_string(mnt.join("marker")).unwrap(),
        "before the upgrade"
    );
    assert_eq!(fs::read(mnt.join("payload")).unwrap(), payload());
    fs::write(mnt.join("marker"), "after the upgrade").unwrap();
    node.unmount_close(&mnt, "new");
    // The new image's identity (the live PCRs) differs from the old one's.
    let new_identity = node.sealcsi(&["volume", "identity"]).ok().json();
    assert_ne!(new_identity["digest"], old_identity["digest"]);

    // Step 6's refusal: the pre-authorized slot is the only one the new image opens, so removing it
    // is refused (exit 6).
    node.sealcsi(&["volume", "remove-slot", &node.disk, "--slot", "1"])
        .exit(EXIT_REFUSED);

    // Step 5 (optional): re-seal to the live PCRs.
    let resealed = node
        .sealcsi(&["volume", "add-slot", &node.disk, "--for", "current"])
        .ok()
        .json();
    assert_eq!(
        (resealed["slot"].as_u64(), resealed["changed"].as_bool()),
        (Some(2), Some(true)),
        "{resealed}"
    );
    assert_eq!(
        node.slots()["slots"][2]["identity_digest"],
        new_identity["digest"]
    );

    // Step 6, on the new image: remove the old image's slot.
    let removed = node
        .sealcsi(&[
            "volume",
            "remove-slot",
            &node.disk,
            "--slot",
            &old_slot.to_string(),
        ])
        .ok()
        .json();
    assert_eq!(removed["slot"].as_u64(), Some(old_slot), "{removed}");
    let after = node.slots();
    assert_eq!(indices(&after), [1, 2], "{after}");
    assert_eq!(after["this_node_slot"], Value::from(1), "{after}");
    node.assert_data("after the upgrade");

    // A reboot into the old image (PCRs back to its values): it is no longer authorized.
    boot(&mut node.tpm, OLD_IMAGE);
    assert_eq!(node.pcr_values(), old_values);
    assert_eq!(node.slots()["this_node_slot"], Value::Null);
    let denied = node.assert_cannot_open();
    assert!(denied.stderr.contains("identity"), "{denied}");
    node.sealcsi(&["volume", "add-slot", &node.disk, "--for", "current"])
        .exit(EXIT_WRONG_IDENTITY);

    // The new image, after another power cycle, still opens.
    boot(&mut node.tpm, &new_image);
    assert_eq!(node.slots()["this_node_slot"], Value::from(1));
    node.assert_data("after the upgrade");
}
