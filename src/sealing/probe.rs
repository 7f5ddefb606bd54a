//! What this machine is: probes for TEE devices and confidential-VM evidence, under a root directory so
//! host tests can build a fake `/dev`, `/sys` and `/proc` in a temporary directory.
//!
//! Why it matters: `--tee auto` must not trust a TPM on a confidential VM (CVM) without being told to.
//! A CVM's vTPM is either inside the TEE (an SVSM at VMPL0, e.g. coconut-svsm's vTPM, or a paravisor
//! such as Azure's) or emulated by the host (QEMU with a host-side swtpm); the guest cannot tell which
//! from the TPM device alone, and a host-emulated vTPM hands the host every sealed secret.
//!
//! Evidence that this is a CVM guest, each set up only by the guest kernel for a guest of that kind:
//! - `/dev/sev-guest`: the SEV-SNP guest driver (it needs the SNP secrets page);
//! - `/dev/tdx_guest`: the TDX guest driver;
//! - `/sys/kernel/config/tsm/report`: the configfs-tsm attestation-report interface (Linux 6.7+),
//!   registered by the sev-guest or tdx-guest driver (needs configfs mounted);
//! - the `tdx_guest` flag in `/proc/cpuinfo` (X86_FEATURE_TDX_GUEST, set only inside a TD).
//!
//! Not used: the `sev`/`sev_es`/`sev_snp` cpuinfo flags, which a bare-metal EPYC host also shows (a
//! node with a physical TPM on such a host is not a CVM).

use std::path::PathBuf;

/// The SEV-SNP guest device (the SNP source's device).
pub const SEV_GUEST: &str = super::snp::SEV_GUEST_DEVICE;
/// The TDX guest device.
pub const TDX_GUEST: &str = "/dev/tdx_guest";
/// The configfs-tsm report directory.
pub const TSM_REPORT: &str = "/sys/kernel/config/tsm/report";
/// Where CPU flags are listed.
pub const CPUINFO: &str = "/proc/cpuinfo";
/// The kernel's TPM resource manager (the TPM source's default device).
pub const TPM_DEVICE: &str = super::tpm::DEFAULT_DEVICE;

/// Probes under a root directory (`/` on a real node).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    root: PathBuf,
}

impl Default for Probe {
    fn default() -> Self {
        Self::host()
    }
}

impl Probe {
    /// This machine.
    pub fn host() -> Self {
        Self::under("/")
    }

    /// A tree rooted at `root` (tests).
    pub fn under(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// `absolute` (e.g. `/dev/sev-guest`) under the root.
    pub fn path(&self, absolute: &str) -> PathBuf {
        self.root.join(absolute.trim_start_matches('/'))
    }

    fn exists(&self, absolute: &str) -> bool {
        self.path(absolute).exists()
    }

    pub fn snp_device(&self) -> bool {
        self.exists(SEV_GUEST)
    }

    pub fn tpm_device(&self) -> bool {
        self.exists(TPM_DEVICE)
    }

    /// The first piece of evidence that this is a confidential VM, as a sentence; `None` if there is none.
    pub fn cvm_evidence(&self) -> Option<String> {
        for (path, what) in [
            (SEV_GUEST, "SEV-SNP guest device"),
            (TDX_GUEST, "TDX guest device"),
            (TSM_REPORT, "configfs-tsm attestation report interface"),
        ] {
            if self.exists(path) {
                return Some(format!("{what} {path} present"));
            }
        }
        self.cpuinfo_has_flag("tdx_guest")
            .then(|| format!("CPU flag tdx_guest in {CPUINFO}"))
    }

    fn cpuinfo_has_flag(&self, flag: &str) -> bool {
        let Ok(text) = std::fs::read_to_string(self.path(CPUINFO)) else {
            return false;
        };
        text.lines()
            .filter_map(|line| line.split_once(':'))
            .filter(|(key, _)| key.trim() == "flags")
            .any(|(_, flags)| flags.split_whitespace().any(|f| f == flag))
    }
}

/// Test helper: creates `absolute` (as an empty file) under `root`.
#[cfg(test)]
pub fn touch(root: &std::path::Path, absolute: &str) {
    let path = root.join(absolute.trim_start_matches('/'));
    std::fs::create_dir_all(path.parent().expect("an absolute path has a parent")).unwrap();
    std::fs::write(path, b"").unwrap();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_piece_of_evidence_is_found_under_the_root() {
        for path in [SEV_GUEST, TDX_GUEST] {
            let dir = tempfile::tempdir().unwrap();
            touch(dir.path(), path);
            let evidence = Probe::under(dir.path()).cvm_evidence().unwrap();
            assert!(evidence.contains(path), "{evidence}");
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(Probe::under(dir.path()).path(TSM_REPORT)).unwrap();
        assert!(
            Probe::under(dir.path())
                .cvm_evidence()
                .unwrap()
                .contains("configfs-tsm")
        );
    }

    #[test]
    fn cpuinfo_tdx_guest_counts_and_sev_snp_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let probe = Probe::under(dir.path());
        touch(dir.path(), CPUINFO);
        std::fs::write(
            probe.path(CPUINFO),
            "processor\t: 0\nflags\t\t: fpu sev sev_es sev_snp hypervisor\n",
        )
        .unwrap();
        assert_eq!(probe.cvm_evidence(), None, "an EPYC host shows these too");
        std::fs::write(
            probe.path(CPUINFO),
            "processor\t: 0\nflags\t\t: fpu tdx_guest hypervisor\n",
        )
        .unwrap();
        assert!(probe.cvm_evidence().unwrap().contains("tdx_guest"));
    }

    #[test]
    fn an_empty_tree_is_not_a_cvm_and_has_no_devices() {
        let dir = tempfile::tempdir().unwrap();
        let probe = Probe::under(dir.path());
        assert_eq!(probe.cvm_evidence(), None);
        assert!(!probe.snp_device() && !probe.tpm_device());
        assert_eq!(Probe::host().path("/dev/x"), std::path::Path::new("/dev/x"));
    }
}
