//! `sample` evidence: the unsigned JSON Trustee's sample verifier accepts (`svn`, `report_data` in
//! standard base64). It proves nothing and exists for development with the simulated TEE. sealcsi adds
//! the simulated identity string (`sealcsi_sim_identity`) so that a transfer between simulated nodes can
//! still name its target; verifiers that do not know the field ignore it.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};

use super::{AttestError, Evidence, EvidenceKind, EvidenceSource, REPORT_DATA_LEN, ReportData};

/// The JSON body of `sample` evidence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SampleBody {
    pub svn: String,
    pub report_data: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealcsi_sim_identity: Option<String>,
}

impl SampleBody {
    /// Parses a body and returns it with the report data it carries. Untrusted input: every field is
    /// checked, nothing panics.
    pub fn parse(body: &[u8]) -> Result<(SampleBody, ReportData), AttestError> {
        let malformed = |reason: String| AttestError::Malformed {
            kind: EvidenceKind::Sample,
            reason,
        };
        let parsed: SampleBody =
            serde_json::from_slice(body).map_err(|e| malformed(format!("not sample JSON: {e}")))?;
        let raw = STANDARD
            .decode(&parsed.report_data)
            .map_err(|e| malformed(format!("report_data is not base64: {e}")))?;
        let report_data: ReportData = raw.as_slice().try_into().map_err(|_| {
            malformed(format!(
                "report_data has {} bytes, not {REPORT_DATA_LEN}",
                raw.len()
            ))
        })?;
        Ok((parsed, report_data))
    }
}

/// Produces `sample` evidence naming a simulated identity.
#[derive(Debug, Clone)]
pub struct SampleEvidence {
    identity: String,
}

impl SampleEvidence {
    pub fn new(identity: impl Into<String>) -> Self {
        Self {
            identity: identity.into(),
        }
    }
}

impl EvidenceSource for SampleEvidence {
    fn kind(&self) -> EvidenceKind {
        EvidenceKind::Sample
    }

    fn is_simulated(&self) -> bool {
        true
    }

    fn evidence(&self, report_data: &ReportData) -> Result<Evidence, AttestError> {
        let body = SampleBody {
            svn: "1".to_owned(),
            report_data: STANDARD.encode(report_data),
            sealcsi_sim_identity: Some(self.identity.clone()),
        };
        let body = serde_json::to_vec(&body).map_err(|e| AttestError::Malformed {
            kind: EvidenceKind::Sample,
            reason: e.to_string(),
        })?;
        Ok(Evidence {
            kind: EvidenceKind::Sample,
            report_data: *report_data,
            body,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_evidence_round_trips_its_report_data_and_identity() {
        let data = [7u8; REPORT_DATA_LEN];
        let ev = SampleEvidence::new("node-a").evidence(&data).unwrap();
        let (body, parsed) = SampleBody::parse(&ev.body).unwrap();
        assert_eq!(parsed, data);
        assert_eq!(body.sealcsi_sim_identity.as_deref(), Some("node-a"));
        assert_eq!(body.svn, "1");
    }

    #[test]
    fn short_report_data_is_refused() {
        let body = br#"{"svn":"1","report_data":"AAAA"}"#;
        let err = SampleBody::parse(body).unwrap_err();
        assert!(err.to_string().contains("3 bytes"), "{err}");
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let _ = SampleBody::parse(&bytes);
        }
    }
}
