//! Guest tests of the `kbs` keyslot with the real `sealcsi` binary and the real kernel: the KBS test
//! double (tests/kbs_double) runs inside this test process on the guest's loopback. Node A formats a
//! volume and adds a kbs slot; node B (another simulated identity, no slot of its own) opens it through
//! the broker: the slot is policy-bound, not node-bound. A broker that is down, or whose policy denies,
//! is a clear error and changes nothing.
//!
//! ```text
//! cargo test --test guest_kbs --no-run      # prints the test binary's path
//! tests/vm/run-in-guest.sh -- <binary> --ignored --test-threads=1 --nocapture
//! ```

mod common;
#[path = "kbs_double/mod.rs"]
mod kbs_double;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{BIN, MIB, Out, p, run};
use kbs_double::{KbsDouble, Policy};

const EXIT_WRONG_IDENTITY: i32 = 3;
const EXIT_INTERNAL: i32 = 1;
const RESOURCE: &str = "default/sealcsi/guest-kbs";

struct Fixture {
    dir: PathBuf,
    state: PathBuf,
}

impl Fixture {
    fn new(test: &str) -> Self {
        assert_eq!(
            std::env::var("SEALCSI_IN_GUEST").as_deref(),
            Ok("1"),
            "guest test: run it via tests/vm/run-in-guest.sh"
        );
        let root = PathBuf::from(std::env::var_os("SCRATCH").unwrap_or_else(|| "/scratch".into()));
        let dir = root.join(format!("guest-kbs-{test}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        println!("== {test}");
        Fixture {
            state: dir.join("state"),
            dir,
        }
    }

    /// The binary as simulated node `identity`, with the broker at `kbs` when given.
    fn as_(&self, identity: &str, kbs: Option<&str>, args: &[&str]) -> Out {
        let mut cmd = Command::new(BIN);
        cmd.env_remove("SEALCSI_TEE")
            .env_remove("SEALCSI_STATE_DIR")
            .env_remove("SEALCSI_SIM_IDENTITY")
            .env_remove("SEALCSI_KBS_URL")
            .args(["--tee", "sim", "--state-dir"])
            .arg(&self.state)
            .args(["--sim-identity", identity]);
        if let Some(url) = kbs {
            cmd.args(["--kbs-url", url, "--kbs-insecure-http"]);
        }
        cmd.args(args);
        let what = format!("sealcsi --sim-identity {identity} {}", args.join(" "));
        run(cmd, what)
    }

    fn file(&self) -> PathBuf {
        let path = self.dir.join("vol.img");
        fs::File::create(&path).unwrap().set_len(64 * MIB).unwrap();
        path
    }

    /// Formats as A and adds a kbs slot for RESOURCE.
    fn volume_with_kbs_slot(&self, url: &str) -> PathBuf {
        let file = self.file();
        self.as_("A", None, &["volume", "format", p(&file)]).ok();
        let added = self
            .as_(
                "A",
                Some(url),
                &[
                    "volume",
                    "add-slot",
                    p(&file),
                    "--for",
                    &format!("kbs:{RESOURCE}"),
                ],
            )
            .ok()
            .json();
        assert_eq!(added["changed"], true, "{added}");
        let slots = self
            .as_("A", None, &["volume", "slots", p(&file)])
            .ok()
            .json();
        let kinds: Vec<String> = slots["slots"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["source"].to_string())
            .collect();
        assert!(kinds.iter().any(|k| k.contains("kbs")), "{slots}");
        file
    }

    fn open_close(&self, identity: &str, url: Option<&str>, file: &Path) -> Out {
        let name = format!("gkbs-{identity}");
        let out = self.as_(identity, url, &["volume", "open", p(file), "--name", &name]);
        if out.code == 0 {
            self.as_(identity, None, &["volume", "close", &name]).ok();
        }
        out
    }
}

fn double_with_secret() -> KbsDouble {
    let double = KbsDouble::start(0);
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).unwrap();
    double.put_resource(RESOURCE, &secret);
    double.set_policy(&Policy::allow_sample());
    double
}

#[test]
#[ignore = "guest: needs root, loop devices and device-mapper"]
fn a_second_node_opens_through_the_broker_policy_bound_not_node_bound() {
    let fx = Fixture::new("second-node");
    let double = double_with_secret();
    let url = double.url();
    let file = fx.volume_with_kbs_slot(&url);

    // Node B has no slot: without the broker it cannot open; with it, it does.
    fx.open_close("B", None, &file).exit(EXIT_WRONG_IDENTITY);
    let out = fx.open_close("B", Some(&url), &file).ok();
    assert!(
        out.stderr.contains("SAMPLE EVIDENCE"),
        "sample evidence not announced: {out}"
    );
    assert!(
        double
            .log()
            .iter()
            .any(|l| l == &format!("GET /kbs/v0/resource/{RESOURCE} -> 200")),
        "{:?}",
        double.log()
    );
}

#[test]
#[ignore = "guest: needs root, loop devices and device-mapper"]
fn broker_down_or_denying_is_a_clear_error_and_changes_nothing() {
    let fx = Fixture::new("down-deny");
    let mut double = double_with_secret();
    let url = double.url();
    let file = fx.volume_with_kbs_slot(&url);
    let before = fs::read(&file).unwrap();

    double.set_policy(&Policy::deny_all());
    let out = fx
        .open_close("B", Some(&url), &file)
        .exit(EXIT_WRONG_IDENTITY);
    out.error_mentions("policy denies");

    double.stop();
    let out = fx.open_close("B", Some(&url), &file).exit(EXIT_INTERNAL);
    out.error_mentions("unreachable (step auth");

    assert!(fs::read(&file).unwrap() == before, "the volume changed");
    // Node A still opens with its own slot, broker or not.
    fx.open_close("A", Some(&url), &file).ok();
}
