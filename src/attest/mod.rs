//! TEE evidence: a statement signed by this node's TEE (or, for `sample`, by nobody) that carries 64
//! bytes chosen by the caller (the *report data*). Callers bind what they need into those bytes: the
//! key-broker client binds its session nonce and ephemeral public key, the attested transfer binds the
//! target's ephemeral transfer key. Verifying evidence is the relying party's business (the KBS, or the
//! source side of a transfer), not this module's.
//!
//! Each kind of evidence is one implementation of [`EvidenceSource`]; the body is in the format the
//! matching Trustee verifier expects, so the same bytes serve the KBS and the transfer.

pub mod sample;
pub mod snp;
pub mod tdx;
pub mod tpm;
pub mod tsm;

pub use sample::{SampleBody, SampleEvidence};

use serde::{Deserialize, Serialize};

use crate::error::{Classify, Kind};

/// The number of caller bytes every kind of evidence binds.
pub const REPORT_DATA_LEN: usize = 64;

/// Report data: fixed size; shorter digests are zero-padded on the right by the caller.
pub type ReportData = [u8; REPORT_DATA_LEN];

/// Which TEE produced the evidence. The serde names are the `tee` strings of the KBS protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EvidenceKind {
    /// AMD SEV-SNP attestation report.
    Snp,
    /// Intel TDX quote.
    Tdx,
    /// TPM 2.0 quote.
    Tpm,
    /// Unsigned evidence: protects nothing; only with the simulated TEE.
    Sample,
}

/// Evidence as produced: its kind, the report data it binds, and its body in verifier format.
#[derive(Clone, PartialEq, Eq)]
pub struct Evidence {
    pub kind: EvidenceKind,
    pub report_data: ReportData,
    /// The body a verifier takes (JSON for `sample`, `snp` and `tdx` as Trustee's verifiers expect).
    pub body: Vec<u8>,
}

impl std::fmt::Debug for Evidence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Evidence")
            .field("kind", &self.kind)
            .field("report_data", &hex::encode(self.report_data))
            .field("body_len", &self.body.len())
            .finish()
    }
}

/// Errors of evidence collection.
#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    /// No device or interface for this kind of evidence on this node.
    #[error("{kind:?} evidence is unavailable: {reason}")]
    Unavailable { kind: EvidenceKind, reason: String },
    /// The TEE answered with something this module cannot use.
    #[error("{kind:?} evidence is malformed: {reason}")]
    Malformed { kind: EvidenceKind, reason: String },
}

impl Classify for AttestError {
    fn kind(&self) -> Kind {
        match self {
            AttestError::Unavailable { .. } => Kind::Unavailable,
            AttestError::Malformed { .. } => Kind::Internal,
        }
    }
}

/// A producer of evidence for this node's TEE.
pub trait EvidenceSource: Send + Sync {
    fn kind(&self) -> EvidenceKind;

    /// True for evidence nobody signs (`sample`); callers warn loudly.
    fn is_simulated(&self) -> bool {
        false
    }

    /// Fresh evidence binding `report_data`.
    fn evidence(&self, report_data: &ReportData) -> Result<Evidence, AttestError>;
}

/// The node's evidence of `kind`: `sample` naming `sim_identity`; SNP and TDX through configfs-tsm
/// ([`tsm`]), SNP falling back to `/dev/sev-guest`, TDX to `/dev/tdx_guest` and the host's quoting
/// service ([`tdx`]). A TPM quote ([`tpm`]) needs the node's TCTI and PCR
/// selection and is opened by its one caller, the attested transfer; none is offered to a key broker.
pub fn open(
    kind: EvidenceKind,
    sim_identity: &str,
) -> Result<Box<dyn EvidenceSource>, AttestError> {
    match kind {
        EvidenceKind::Sample => Ok(Box::new(SampleEvidence::new(sim_identity))),
        EvidenceKind::Snp => tsm_or(kind, || Ok(Box::new(tsm::SevGuestEvidence::open()?))),
        EvidenceKind::Tdx => tsm_or(kind, || Ok(Box::new(tdx::QgsEvidence::open()?))),
        EvidenceKind::Tpm => Err(AttestError::Unavailable {
            kind,
            reason: "TPM evidence is not offered to a key broker by this build".into(),
        }),
    }
}

/// configfs-tsm when the node has it, else `fallback`; when neither is there, the error names both.
fn tsm_or(
    kind: EvidenceKind,
    fallback: impl FnOnce() -> Result<Box<dyn EvidenceSource>, AttestError>,
) -> Result<Box<dyn EvidenceSource>, AttestError> {
    let tsm_error = match tsm::TsmEvidence::open(kind) {
        Ok(tsm) => return Ok(Box::new(tsm)),
        Err(e) => e,
    };
    fallback().map_err(|e| AttestError::Unavailable {
        kind,
        reason: format!("{tsm_error}; and the fallback: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_configfs_tsm_or_a_guest_device_the_error_names_both() {
        // This host is no confidential VM: neither configfs-tsm nor the guest devices exist.
        if std::path::Path::new(tsm::TSM_REPORT_DIR).exists() {
            eprintln!(
                "not run: this host has configfs-tsm ({})",
                tsm::TSM_REPORT_DIR
            );
            return;
        }
        for (kind, device) in [
            (EvidenceKind::Snp, "/dev/sev-guest"),
            (EvidenceKind::Tdx, "/dev/tdx_guest"),
        ] {
            if std::path::Path::new(device).exists() {
                eprintln!("not run for {kind:?}: this host has {device}");
                continue;
            }
            let err = open(kind, "unused")
                .err()
                .expect("no evidence on this host");
            let text = err.to_string();
            assert!(
                text.contains("configfs-tsm") && text.contains(device),
                "{text}"
            );
            assert_eq!(err.kind(), Kind::Unavailable);
        }
    }
}
