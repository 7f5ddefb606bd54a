//! What the source's operator expects of the target (`--expect`), and the verification of a request's
//! evidence against it. Verification has two halves, both required: the evidence's report data is the
//! digest of the request's own fields (so the key the slot is wrapped to is the one the TEE vouched
//! for), and the identity the evidence proves is the one expected.

use std::fmt;
use std::str::FromStr;

use super::TransferError;
use super::request::TransferRequest;
use crate::attest::snp::verify::verify_evidence;
use crate::attest::snp::{SnpChain, SnpExpectation};
use crate::attest::tpm::{QuoteExpectation, verify_quote};
use crate::attest::{EvidenceKind, SampleBody};
use crate::sealing::tpm::{PcrSelection, parse_expected_pcrs};

/// The operator's expectation of the target's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expectation {
    /// `sim:<identity>`: a simulated target with this identity string. Unsigned evidence: it checks the
    /// protocol, and protects nothing.
    Sim { identity: String },
    /// `tpm:<ak-sha256>:<bank>:<pcr>=<hex>,...`: a TPM quote signed by the attestation key whose
    /// marshalled public area has this SHA-256 (the operator's statement of trust in that AK), over
    /// exactly these PCRs with exactly these values.
    Tpm {
        quote: QuoteExpectation,
        text: String,
    },
    /// `snp:measurement=<96 hex>,policy=<hex>,tcb-min=<bl>.<tee>.<snp>.<ucode>[.<fmc>][,vmpl=<n>]
    /// [,debug=allow]`: an SEV-SNP report signed by a VCEK of the chain the operator gives
    /// ([`Expectation::with_snp_chain`]; `--vcek`, `--ask`, `--ark`), with this launch measurement,
    /// exactly this guest policy, a reported TCB at least this floor, and this VMPL (default 0).
    Snp {
        expect: SnpExpectation,
        /// Set by [`Expectation::with_snp_chain`]; verification refuses without it.
        chain: Option<Box<SnpChain>>,
        text: String,
    },
}

impl Expectation {
    /// Attaches the SNP certificate chain an `snp:` expectation is verified with.
    pub fn with_snp_chain(self, chain: SnpChain) -> Result<Self, TransferError> {
        match self {
            Expectation::Snp { expect, text, .. } => Ok(Expectation::Snp {
                expect,
                chain: Some(Box::new(chain)),
                text,
            }),
            other => Err(TransferError::InvalidExpectation {
                text: other.to_string(),
                reason: "a certificate chain (--vcek, --ask, --ark) is only for snp: expectations"
                    .into(),
            }),
        }
    }

    /// Whether the expectation is an SNP one (it then needs a chain).
    pub fn is_snp(&self) -> bool {
        matches!(self, Expectation::Snp { .. })
    }
}

impl fmt::Display for Expectation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expectation::Sim { identity } => write!(f, "sim:{identity}"),
            Expectation::Tpm { text, .. } | Expectation::Snp { text, .. } => f.write_str(text),
        }
    }
}

impl FromStr for Expectation {
    type Err = TransferError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = |reason: &str| TransferError::InvalidExpectation {
            text: text.to_owned(),
            reason: reason.to_owned(),
        };
        let (kind, rest) = text.split_once(':').ok_or_else(|| {
            invalid(
                "expected sim:<identity>, tpm:<ak-sha256>:<bank>:<pcr>=<hex>,... or \
                 snp:measurement=<hex>,policy=<hex>,tcb-min=<bl>.<tee>.<snp>.<ucode>",
            )
        })?;
        match kind {
            "sim" if rest.is_empty() => Err(invalid("the simulated identity is empty")),
            "sim" => Ok(Expectation::Sim {
                identity: rest.to_owned(),
            }),
            "tpm" => {
                let (ak, pcrs) = rest
                    .split_once(':')
                    .ok_or_else(|| invalid("expected tpm:<ak-sha256>:<bank>:<pcr>=<hex>,..."))?;
                let mut ak_sha256 = [0u8; 32];
                hex::decode_to_slice(ak, &mut ak_sha256)
                    .map_err(|_| invalid("the AK fingerprint is 64 hex digits"))?;
                let (bank, values) =
                    parse_expected_pcrs(pcrs).map_err(|e| invalid(&e.to_string()))?;
                let indices: Vec<u8> = values.iter().map(|(i, _)| *i).collect();
                let selection =
                    PcrSelection::new(bank, &indices).map_err(|e| invalid(&e.to_string()))?;
                if selection.pcrs().len() != values.len() {
                    return Err(invalid("a PCR is named twice"));
                }
                Ok(Expectation::Tpm {
                    quote: QuoteExpectation {
                        ak_sha256,
                        selection,
                        values,
                    },
                    text: text.to_owned(),
                })
            }
            "snp" => Ok(Expectation::Snp {
                expect: rest.parse().map_err(|e: String| invalid(&e))?,
                chain: None,
                text: text.to_owned(),
            }),
            _ => Err(invalid("the kind is sim, tpm or snp")),
        }
    }
}

/// What the verification established about the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// Whether the evidence is unsigned (sample): true means nothing was proven.
    pub simulated: bool,
    /// The identity that was checked, as the operator wrote it.
    pub identity: String,
}

fn rejected(reason: impl Into<String>) -> TransferError {
    TransferError::EvidenceRejected {
        reason: reason.into(),
    }
}

/// Verifies `request`'s evidence against `expect`.
pub fn verify(expect: &Expectation, request: &TransferRequest) -> Result<Verified, TransferError> {
    let bound = request.report_data();
    match expect {
        Expectation::Sim { identity } => {
            if request.evidence_kind != EvidenceKind::Sample {
                return Err(rejected(format!(
                    "the request carries {:?} evidence; the expectation {expect} needs sample \
                     evidence",
                    request.evidence_kind
                )));
            }
            let (body, report_data) = SampleBody::parse(&request.evidence)
                .map_err(|e| rejected(format!("the evidence does not parse: {e}")))?;
            if report_data != bound {
                return Err(rejected(
                    "the evidence's report data does not bind the request (its key, nonce, volume \
                     and identity): a forged or altered request",
                ));
            }
            match body.sealcsi_sim_identity.as_deref() {
                Some(got) if got == identity => Ok(Verified {
                    simulated: true,
                    identity: expect.to_string(),
                }),
                Some(got) => Err(rejected(format!(
                    "the target is simulated identity {got:?}, not the expected {identity:?}"
                ))),
                None => Err(rejected("the sample evidence names no simulated identity")),
            }
        }
        Expectation::Tpm { quote, .. } => {
            if request.evidence_kind != EvidenceKind::Tpm {
                return Err(rejected(format!(
                    "the request carries {:?} evidence; the expectation needs a TPM quote",
                    request.evidence_kind
                )));
            }
            verify_quote(&request.evidence, quote, &bound).map_err(rejected)?;
            Ok(Verified {
                simulated: false,
                identity: expect.to_string(),
            })
        }
        Expectation::Snp {
            expect: snp,
            chain,
            text,
        } => {
            if request.evidence_kind != EvidenceKind::Snp {
                return Err(rejected(format!(
                    "the request carries {:?} evidence; the expectation needs an SEV-SNP report",
                    request.evidence_kind
                )));
            }
            let chain = chain
                .as_ref()
                .ok_or_else(|| TransferError::InvalidExpectation {
                    text: text.clone(),
                    reason: "an snp: expectation needs the VCEK (--vcek; --ask and --ark too for \
                             a root other than AMD's)"
                        .into(),
                })?;
            let verified = verify_evidence(&request.evidence, snp, chain, &bound)?;
            tracing::info!(
                root = %verified.root,
                reported_tcb = %verified.reported_tcb,
                chip_id = %verified.chip_id,
                "verified SEV-SNP evidence"
            );
            Ok(Verified {
                simulated: false,
                identity: format!("{text} (chain root: {})", verified.root),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::request::tests::sample_request;
    use super::*;
    use crate::attest::{EvidenceSource, SampleEvidence};
    use crate::error::{Classify, Kind};

    fn with_sample(identity: &str) -> TransferRequest {
        let mut r = sample_request();
        r.evidence = SampleEvidence::new(identity)
            .evidence(&r.report_data())
            .unwrap()
            .body;
        r
    }

    #[test]
    fn parses_expectations() {
        assert_eq!(
            "sim:node-b".parse::<Expectation>().unwrap(),
            Expectation::Sim {
                identity: "node-b".into()
            }
        );
        assert_eq!(
            "sim:a:b".parse::<Expectation>().unwrap().to_string(),
            "sim:a:b"
        );
        for bad in ["", "sim", "sim:", "kbs:x"] {
            let err = bad.parse::<Expectation>().unwrap_err();
            assert_eq!(err.kind(), Kind::InvalidArgument, "{bad}: {err}");
        }
        let err = "snp:x".parse::<Expectation>().unwrap_err();
        assert_eq!(err.kind(), Kind::InvalidArgument, "{err}");
        let snp = format!("snp:{}", crate::attest::snp::testing::expectation_text());
        let parsed = snp.parse::<Expectation>().unwrap();
        assert!(parsed.is_snp());
        assert_eq!(parsed.to_string(), snp);
        let ak = "ab".repeat(32);
        let ok = format!(
            "tpm:{ak}:sha256:0={},7={}",
            "00".repeat(32),
            "11".repeat(32)
        );
        match ok.parse::<Expectation>().unwrap() {
            Expectation::Tpm { quote, text } => {
                assert_eq!(text, ok);
                assert_eq!(quote.ak_sha256, [0xab; 32]);
                assert_eq!(quote.selection.pcrs(), vec![0, 7]);
                assert_eq!(quote.values, vec![(0, [0; 32]), (7, [0x11; 32])]);
            }
            other => panic!("{other:?}"),
        }
        for bad in [
            "tpm:x".to_owned(),
            format!("tpm:{ak}"),
            format!("tpm:abcd:sha256:0={}", "00".repeat(32)),
            format!("tpm:{ak}:sha256:0=00"),
            format!("tpm:{ak}:sha256:0={0},0={0}", "00".repeat(32)),
        ] {
            let err = bad.parse::<Expectation>().unwrap_err();
            assert_eq!(err.kind(), Kind::InvalidArgument, "{bad}: {err}");
        }
    }

    #[test]
    fn accepts_the_expected_identity_bound_to_the_request() {
        let r = with_sample("node-b");
        let v = verify(&"sim:node-b".parse().unwrap(), &r).unwrap();
        assert!(v.simulated);
    }

    #[test]
    fn refuses_other_identities_unbound_keys_and_other_kinds() {
        let expect: Expectation = "sim:node-b".parse().unwrap();
        let err = verify(&expect, &with_sample("node-c")).unwrap_err();
        assert!(err.to_string().contains("node-c"), "{err}");
        assert_eq!(err.kind(), Kind::Refused);
        // Evidence made for one key, request carrying another.
        let mut forged = with_sample("node-b");
        forged.public_key = crate::keyslots::RecoveryPublicKey::from_bytes([0x99; 32]);
        let err = verify(&expect, &forged).unwrap_err();
        assert!(err.to_string().contains("does not bind"), "{err}");
        let mut other = with_sample("node-b");
        other.evidence_kind = EvidenceKind::Tpm;
        assert_eq!(verify(&expect, &other).unwrap_err().kind(), Kind::Refused);
        let mut garbage = with_sample("node-b");
        garbage.evidence = b"not json".to_vec();
        assert_eq!(verify(&expect, &garbage).unwrap_err().kind(), Kind::Refused);
    }
}
