//! Sealing sources: where the 32-byte secret bound to this node's TEE identity comes from.
//!
//! A source answers two questions: "what is my secret for this binding?" and "which binding do new keyslots
//! use?". The public identity of a secret is its digest (see [`SealingSecret::digest`]), so the same code
//! finds the right keyslot for every kind of source. Hardware sources (SEV-SNP, TPM) implement the same trait.

mod sim;
pub mod snp;
pub mod tpm;

use std::path::{Path, PathBuf};

use serde::Serialize;

pub use crate::header::SourceKind;
use crate::keys::SealingSecret;
pub use sim::SimSource;
pub use snp::{SnpPolicy, SnpSource};
pub use tpm::{PcrBank, PcrSelection, TpmSource};

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// The sealing source could not be reached or refused to answer.
    #[error("sealing source {kind:?} is unavailable: {reason}")]
    Unavailable { kind: SourceKind, reason: String },
    /// The source's persistent state (e.g. the simulator seed) is unusable.
    #[error("sealing state {path}: {reason}")]
    State { path: String, reason: String },
    /// A keyslot's binding parameters are not understood by this source.
    #[error("keyslot binding is not valid for source {kind:?}: {reason}")]
    Binding { kind: SourceKind, reason: String },
}

/// A source of TEE-bound secrets.
pub trait SealingSource: Send + Sync {
    fn kind(&self) -> SourceKind;

    /// True for sources that protect nothing (the simulator); callers warn loudly.
    fn is_simulated(&self) -> bool {
        false
    }

    /// The binding parameters recorded in a new keyslot (empty when the source has only one way to bind).
    fn default_binding(&self) -> Vec<u8>;

    /// The secret for `binding`, as recorded in a keyslot.
    fn secret(&self, binding: &[u8]) -> Result<SealingSecret, SealError>;

    /// A human-readable description of what the secret is bound to (no secret material).
    fn describe(&self) -> String;
}

/// This node's sealing identity as shown to operators.
#[derive(Debug, Clone, Serialize)]
pub struct Identity {
    pub kind: SourceKind,
    /// Hex of the identity digest for the default binding: a keyslot with this digest opens here.
    pub digest: String,
    pub description: String,
    pub simulated: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warning: Option<&'static str>,
}

/// The warning every simulated identity carries.
pub const SIM_WARNING: &str =
    "SIMULATED TEE: the sealing secret is a file on this node's disk; this protects nothing";

/// The identity of `source` for its default binding.
pub fn identity(source: &dyn SealingSource) -> Result<Identity, SealError> {
    let secret = source.secret(&source.default_binding())?;
    Ok(Identity {
        kind: source.kind(),
        digest: hex::encode(secret.digest()),
        description: source.describe(),
        simulated: source.is_simulated(),
        warning: source.is_simulated().then_some(SIM_WARNING),
    })
}

/// Which source the operator asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TeeChoice {
    Sim,
    Snp,
    Tpm,
    Auto,
}

/// What `open_source` needs besides the choice; `None` fields take the documented defaults.
#[derive(Debug, Clone)]
pub struct SourceOptions {
    /// Node-local state: the simulator seed, the TPM's sealed objects (`<state_dir>/tpm/`).
    pub state_dir: PathBuf,
    /// For `sim`: the string standing in for a launch measurement (default `sim-default`).
    pub sim_identity: Option<String>,
    /// For `tpm`: the TCTI (default `device:/dev/tpmrm0`). Setting it also makes `auto` choose the TPM.
    pub tpm_tcti: Option<String>,
    /// For `tpm`: the PCRs new keyslots are sealed to (default `sha256:0,2,4,7`).
    pub tpm_pcrs: Option<PcrSelection>,
    /// For `snp`: the launch fields new keyslots bind to (default `strict`).
    pub snp_policy: Option<SnpPolicy>,
}

impl SourceOptions {
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        Self {
            state_dir: state_dir.into(),
            sim_identity: None,
            tpm_tcti: None,
            tpm_pcrs: None,
            snp_policy: None,
        }
    }
}

pub use snp::SEV_GUEST_DEVICE;

/// Builds the source the operator asked for. `auto` probes for hardware: SEV-SNP (`/dev/sev-guest`), then a
/// TPM (`/dev/tpmrm0`, or an explicitly configured TCTI). It never falls back to `sim`: a node must not
/// silently run on a simulated identity.
pub fn open_source(
    choice: TeeChoice,
    opts: &SourceOptions,
) -> Result<Box<dyn SealingSource>, SealError> {
    match choice {
        TeeChoice::Sim => Ok(Box::new(SimSource::open(
            &opts.state_dir,
            opts.sim_identity
                .as_deref()
                .unwrap_or(sim::DEFAULT_IDENTITY),
        )?)),
        TeeChoice::Snp => open_snp(opts),
        TeeChoice::Tpm => open_tpm(opts),
        TeeChoice::Auto => {
            if Path::new(SEV_GUEST_DEVICE).exists() {
                open_snp(opts)
            } else if opts.tpm_tcti.is_some() || Path::new(tpm::DEFAULT_DEVICE).exists() {
                open_tpm(opts)
            } else {
                Err(SealError::Unavailable {
                    kind: SourceKind::Snp,
                    reason: format!(
                        "no hardware sealing source found (no {SEV_GUEST_DEVICE}, no {}, no TPM TCTI \
                         configured); pass --tee sim explicitly for a simulated (unprotected) identity",
                        tpm::DEFAULT_DEVICE
                    ),
                })
            }
        }
    }
}

fn open_tpm(opts: &SourceOptions) -> Result<Box<dyn SealingSource>, SealError> {
    let selection = opts.tpm_pcrs.clone().unwrap_or_default();
    Ok(Box::new(TpmSource::open(
        &opts.state_dir,
        opts.tpm_tcti.as_deref(),
        &selection,
    )?))
}

fn open_snp(opts: &SourceOptions) -> Result<Box<dyn SealingSource>, SealError> {
    Ok(Box::new(SnpSource::open(
        opts.snp_policy.unwrap_or(SnpPolicy::Strict),
    )?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(choice: TeeChoice, opts: &SourceOptions) -> SealError {
        match open_source(choice, opts) {
            Ok(source) => panic!("{choice:?} opened {}", source.describe()),
            Err(e) => e,
        }
    }

    #[test]
    fn auto_never_falls_back_to_sim() {
        if Path::new(SEV_GUEST_DEVICE).exists() || Path::new(tpm::DEFAULT_DEVICE).exists() {
            eprintln!("skipped: this machine has TEE hardware, auto would use it");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let err = refused(TeeChoice::Auto, &SourceOptions::new(dir.path()));
        assert!(err.to_string().contains("--tee sim"), "{err}");
        assert!(!dir.path().join("sim-seed").exists());
    }

    #[test]
    fn explicit_tpm_without_a_tpm_is_unavailable() {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = SourceOptions::new(dir.path());
        opts.tpm_tcti = Some("device:/nonexistent/tpmrm0".into());
        let err = refused(TeeChoice::Tpm, &opts);
        assert!(
            matches!(
                err,
                SealError::Unavailable {
                    kind: SourceKind::Tpm,
                    ..
                }
            ),
            "{err}"
        );
        // auto with an explicit TCTI tries the TPM too, and fails the same way.
        if !Path::new(SEV_GUEST_DEVICE).exists() {
            assert!(matches!(
                refused(TeeChoice::Auto, &opts),
                SealError::Unavailable {
                    kind: SourceKind::Tpm,
                    ..
                }
            ));
        }
    }
}
