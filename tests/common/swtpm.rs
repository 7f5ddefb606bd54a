//! A software TPM (`swtpm`) for the TPM tests: started on free local ports with a private state
//! directory, power-cycled on demand, killed and reaped on drop. Shared by tests/tpm.rs (host) and the
//! guest runbook suite (each includes this file with `#[path]`).
#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};
use tss_esapi::handles::PcrHandle;
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{Digest, DigestValues, PcrSelectionListBuilder, PcrSlot};
use tss_esapi::{Context, TctiNameConf};

/// Whether swtpm is installed. Without it a TPM test fails, unless `SEALCSI_ALLOW_SKIP` names `tpm`
/// (then it is skipped, loudly): CI must never set it, so a missing swtpm cannot pass for success.
pub fn installed_or_allowed_skip() -> bool {
    let installed = Command::new("swtpm")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if installed {
        return true;
    }
    let allowed =
        std::env::var("SEALCSI_ALLOW_SKIP").is_ok_and(|v| v.split(',').any(|w| w.trim() == "tpm"));
    assert!(
        allowed,
        "swtpm is not installed (apt-get install swtpm swtpm-tools; tests/install-deps.sh); \
         set SEALCSI_ALLOW_SKIP=tpm to skip the TPM tests on purpose"
    );
    eprintln!("SKIPPED (SEALCSI_ALLOW_SKIP=tpm): swtpm is not installed");
    false
}

/// A port P such that P and P+1 are both free (the swtpm TCTI uses P for commands, P+1 for control).
fn free_port_pair() -> u16 {
    loop {
        let a = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = a.local_addr().unwrap().port();
        if port < u16::MAX && TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
}

/// The handle of a PCR the tests extend.
pub fn pcr_handle(pcr: u8) -> PcrHandle {
    match pcr {
        0 => PcrHandle::Pcr0,
        2 => PcrHandle::Pcr2,
        4 => PcrHandle::Pcr4,
        7 => PcrHandle::Pcr7,
        other => panic!("no handle for PCR {other} in these tests"),
    }
}

/// One extend computed in software: new = SHA-256(old ‖ event digest).
pub fn extended(old: [u8; 32], event: [u8; 32]) -> [u8; 32] {
    Sha256::new()
        .chain_update(old)
        .chain_update(event)
        .finalize()
        .into()
}

/// A swtpm on a persistent state directory.
pub struct Swtpm {
    child: Option<Child>,
    state: PathBuf,
    port: u16,
}

impl Swtpm {
    /// Starts swtpm on `state` (created if needed).
    pub fn start(state: &Path) -> Self {
        std::fs::create_dir_all(state).unwrap();
        let mut tpm = Self {
            child: None,
            state: state.to_owned(),
            port: 0,
        };
        tpm.power_cycle();
        tpm
    }

    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// A power cycle: stops swtpm (SIGKILL: a power cut; swtpm keeps seeds and NV in its state
    /// directory as they change) and starts it again on the same state, PCRs reset to zero.
    pub fn power_cycle(&mut self) {
        self.stop();
        for _ in 0..5 {
            let port = free_port_pair();
            let mut child = Command::new("swtpm")
                .arg("socket")
                .arg("--tpmstate")
                .arg(format!("dir={}", self.state.display()))
                .arg("--tpm2")
                .args([
                    "--server",
                    &format!("type=tcp,port={port},bindaddr=127.0.0.1"),
                ])
                .args([
                    "--ctrl",
                    &format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1),
                ])
                .args(["--flags", "not-need-init,startup-clear"])
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("spawning swtpm");
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Some(status) = child.try_wait().unwrap() {
                    eprintln!("swtpm exited early ({status}), retrying on other ports");
                    break;
                }
                if TcpStream::connect(("127.0.0.1", port)).is_ok()
                    && TcpStream::connect(("127.0.0.1", port + 1)).is_ok()
                {
                    self.child = Some(child);
                    self.port = port;
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("swtpm did not start");
    }

    pub fn context(&self) -> Context {
        Context::new(TctiNameConf::from_str(&self.tcti()).unwrap()).unwrap()
    }

    /// TPM2_PCR_Extend(pcr, SHA-256 bank, digest), as firmware measuring a boot event would.
    pub fn extend(&self, pcr: u8, digest: [u8; 32]) {
        let mut values = DigestValues::new();
        values.set(
            HashingAlgorithm::Sha256,
            Digest::try_from(digest.to_vec()).unwrap(),
        );
        self.context()
            .execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.pcr_extend(pcr_handle(pcr), values)
            })
            .unwrap();
    }

    /// The current value of one PCR of the SHA-256 bank (TPM2_PCR_Read, as `tpm2_pcrread` does).
    pub fn read(&self, pcr: u8) -> [u8; 32] {
        let slot = PcrSlot::try_from(1u32 << pcr).unwrap();
        let list = PcrSelectionListBuilder::new()
            .with_selection(HashingAlgorithm::Sha256, &[slot])
            .build()
            .unwrap();
        let (_, _, digests) = self
            .context()
            .execute_without_session(|ctx| ctx.pcr_read(list))
            .unwrap();
        assert_eq!(digests.len(), 1, "PCR {pcr} has no sha256 value");
        digests.value()[0].value().try_into().unwrap()
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        self.stop();
    }
}
