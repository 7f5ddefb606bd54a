//! Sealing sources: where the 32-byte secret bound to this node's TEE identity comes from.
//!
//! A source answers two questions: "what is my secret for this binding?" and "which binding do new keyslots
//! use?". The public identity of a secret is its digest (see [`SealingSecret::digest`]), so the same code
//! finds the right keyslot for every kind of source. Hardware sources (SEV-SNP, TPM) implement the same trait.

mod sim;

use std::path::Path;

use serde::Serialize;

pub use crate::header::SourceKind;
use crate::keys::SealingSecret;
pub use sim::SimSource;

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

/// Builds the source the operator asked for. Only `sim` exists in this build; the others refuse clearly
/// rather than fall back, because a node must never silently run on a simulated identity.
pub fn open_source(
    choice: TeeChoice,
    state_dir: &Path,
    sim_identity: Option<&str>,
) -> Result<Box<dyn SealingSource>, SealError> {
    match choice {
        TeeChoice::Sim => Ok(Box::new(SimSource::open(
            state_dir,
            sim_identity.unwrap_or(sim::DEFAULT_IDENTITY),
        )?)),
        TeeChoice::Snp => Err(SealError::Unavailable {
            kind: SourceKind::Snp,
            reason: "the SEV-SNP source is not implemented in this build".into(),
        }),
        TeeChoice::Tpm => Err(SealError::Unavailable {
            kind: SourceKind::Tpm,
            reason: "the TPM source is not implemented in this build".into(),
        }),
        TeeChoice::Auto => Err(SealError::Unavailable {
            kind: SourceKind::Snp,
            reason:
                "no hardware sealing source is available in this build; pass --tee sim explicitly \
                     for a simulated (unprotected) identity"
                    .into(),
        }),
    }
}
