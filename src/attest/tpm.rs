//! TPM 2.0 quote evidence: `TPM2_Quote` over the node's sealing PCR selection, signed by an
//! attestation key (AK), with the caller's 64 bytes of report data as the qualifying data
//! (`extraData`), and its verification.
//!
//! The AK is a primary key of the endorsement hierarchy made from a fixed template (ECC NIST P-256,
//! restricted signing, ECDSA with SHA-256): the same key every time on one TPM, so a verifier pins it by
//! the SHA-256 of its marshalled `TPMT_PUBLIC` (`ak_sha256`). That pin is a statement of trust by the
//! operator (trust on first use, or from an inventory); this build does not check an EK certificate
//! chain or run TPM2_MakeCredential.
//!
//! Body (JSON): `{"ak_public": hex(TPMT_PUBLIC), "attest": hex(TPMS_ATTEST), "signature":
//! hex(TPMT_SIGNATURE)}`, each in TPM marshalled form.

use std::str::FromStr;

use p256::ecdsa::signature::Verifier;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tss_esapi::attributes::ObjectAttributesBuilder;
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::interface_types::structure_tags::AttestationType;
use tss_esapi::structures::{
    AttestInfo, Data, EccPoint, EccScheme, HashScheme, KeyDerivationFunctionScheme, Public,
    PublicBuilder, PublicEccParametersBuilder, Signature, SignatureScheme,
    SymmetricDefinitionObject,
};
use tss_esapi::traits::{Marshall, UnMarshall};
use tss_esapi::{Context, TctiNameConf};

use super::{AttestError, Evidence, EvidenceKind, EvidenceSource, ReportData};
use crate::sealing::tpm::{PcrSelection, PcrValue, pcr_digest};

/// The JSON body of TPM quote evidence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TpmQuoteBody {
    pub ak_public: String,
    pub attest: String,
    pub signature: String,
}

fn unavailable(reason: impl Into<String>) -> AttestError {
    AttestError::Unavailable {
        kind: EvidenceKind::Tpm,
        reason: reason.into(),
    }
}

fn malformed(reason: impl Into<String>) -> AttestError {
    AttestError::Malformed {
        kind: EvidenceKind::Tpm,
        reason: reason.into(),
    }
}

/// The AK template: ECC P-256, restricted signing, ECDSA-SHA256, empty unique (deterministic).
fn ak_template() -> tss_esapi::Result<Public> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_restricted(true)
        .with_sign_encrypt(true)
        .build()?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new()
                .with_symmetric(SymmetricDefinitionObject::Null)
                .with_ecc_scheme(EccScheme::EcDsa(HashScheme::new(HashingAlgorithm::Sha256)))
                .with_curve(EccCurve::NistP256)
                .with_key_derivation_function_scheme(KeyDerivationFunctionScheme::Null)
                .with_is_signing_key(true)
                .with_restricted(true)
                .build()?,
        )
        .with_ecc_unique_identifier(EccPoint::default())
        .build()
}

/// Quotes the TPM at `tcti` over `selection`.
#[derive(Debug, Clone)]
pub struct TpmQuoteEvidence {
    tcti: String,
    selection: PcrSelection,
}

impl TpmQuoteEvidence {
    pub fn new(tcti: impl Into<String>, selection: PcrSelection) -> Self {
        Self {
            tcti: tcti.into(),
            selection,
        }
    }

    fn quote(&self, report_data: &ReportData) -> Result<TpmQuoteBody, AttestError> {
        let tpm_err = |what: &str| {
            let what = what.to_owned();
            move |e: tss_esapi::Error| unavailable(format!("{what}: {e}"))
        };
        let conf = TctiNameConf::from_str(&self.tcti)
            .map_err(|e| unavailable(format!("TCTI {:?} is not valid: {e}", self.tcti)))?;
        let mut ctx = Context::new(conf).map_err(tpm_err("connecting to the TPM"))?;
        let template = ak_template().map_err(tpm_err("building the AK template"))?;
        let ak = ctx
            .execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.create_primary(Hierarchy::Endorsement, template, None, None, None, None)
            })
            .map_err(tpm_err(
                "creating the attestation key (endorsement hierarchy)",
            ))?;
        let qualifying = Data::try_from(report_data.to_vec())
            .map_err(tpm_err("the report data as qualifying data"))?;
        let list = self
            .selection
            .tss_selection()
            .map_err(|e| malformed(e.to_string()))?;
        let (attest, signature) = ctx
            .execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.quote(
                    ak.key_handle,
                    qualifying,
                    SignatureScheme::EcDsa {
                        hash_scheme: HashScheme::new(HashingAlgorithm::Sha256),
                    },
                    list,
                )
            })
            .map_err(tpm_err("TPM2_Quote"))?;
        let enc =
            |r: tss_esapi::Result<Vec<u8>>| r.map(hex::encode).map_err(tpm_err("marshalling"));
        Ok(TpmQuoteBody {
            ak_public: enc(ak.out_public.marshall())?,
            attest: enc(attest.marshall())?,
            signature: enc(signature.marshall())?,
        })
    }
}

impl EvidenceSource for TpmQuoteEvidence {
    fn kind(&self) -> EvidenceKind {
        EvidenceKind::Tpm
    }

    fn evidence(&self, report_data: &ReportData) -> Result<Evidence, AttestError> {
        let body = self.quote(report_data)?;
        let body = serde_json::to_vec(&body).map_err(|e| malformed(e.to_string()))?;
        Ok(Evidence {
            kind: EvidenceKind::Tpm,
            report_data: *report_data,
            body,
        })
    }
}

/// What a verifier expects of a quote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuoteExpectation {
    /// SHA-256 of the trusted AK's marshalled `TPMT_PUBLIC`.
    pub ak_sha256: [u8; 32],
    pub selection: PcrSelection,
    /// The expected value of every selected PCR.
    pub values: Vec<PcrValue>,
}

/// The SHA-256 of the AK public key in a quote body (what `QuoteExpectation::ak_sha256` pins).
pub fn ak_fingerprint(body: &[u8]) -> Result<[u8; 32], AttestError> {
    let parsed: TpmQuoteBody =
        serde_json::from_slice(body).map_err(|e| malformed(format!("not quote JSON: {e}")))?;
    let ak = hex::decode(&parsed.ak_public).map_err(|e| malformed(format!("ak_public: {e}")))?;
    Ok(Sha256::digest(&ak).into())
}

/// Verifies a quote body: the AK is the pinned one, the signature over `TPMS_ATTEST` verifies with it
/// (ECDSA P-256, SHA-256), the attestation is a quote whose `extraData` is `report_data`, whose PCR
/// selection is the expected one and whose PCR digest is SHA-256 of the expected values. Untrusted
/// input: every field is checked, nothing panics. Returns why it refuses.
pub fn verify_quote(
    body: &[u8],
    expect: &QuoteExpectation,
    report_data: &ReportData,
) -> Result<(), String> {
    let parsed: TpmQuoteBody =
        serde_json::from_slice(body).map_err(|e| format!("not TPM quote JSON: {e}"))?;
    let bytes = |name: &str, text: &str| hex::decode(text).map_err(|e| format!("{name}: {e}"));
    let ak_bytes = bytes("ak_public", &parsed.ak_public)?;
    let attest_bytes = bytes("attest", &parsed.attest)?;
    let sig_bytes = bytes("signature", &parsed.signature)?;
    if <[u8; 32]>::from(Sha256::digest(&ak_bytes)) != expect.ak_sha256 {
        return Err("the quote is signed by an attestation key other than the trusted one".into());
    }
    let ak = Public::unmarshall(&ak_bytes).map_err(|e| format!("ak_public: {e}"))?;
    let Public::Ecc {
        object_attributes,
        parameters,
        unique,
        ..
    } = &ak
    else {
        return Err("the attestation key is not an ECC key".into());
    };
    if !object_attributes.restricted()
        || !object_attributes.sign_encrypt()
        || !object_attributes.fixed_tpm()
        || parameters.ecc_curve() != EccCurve::NistP256
    {
        return Err("the attestation key is not a restricted P-256 signing key of the TPM".into());
    }
    let coordinate = |v: &[u8]| -> Result<[u8; 32], String> {
        if v.len() > 32 {
            return Err("an AK coordinate is longer than 32 bytes".into());
        }
        let mut out = [0u8; 32];
        out[32 - v.len()..].copy_from_slice(v);
        Ok(out)
    };
    let point = p256::EncodedPoint::from_affine_coordinates(
        &coordinate(unique.x().value())?.into(),
        &coordinate(unique.y().value())?.into(),
        false,
    );
    let key = p256::ecdsa::VerifyingKey::from_encoded_point(&point)
        .map_err(|e| format!("the AK is not a P-256 point: {e}"))?;
    let signature = Signature::unmarshall(&sig_bytes).map_err(|e| format!("signature: {e}"))?;
    let Signature::EcDsa(ecc) = signature else {
        return Err("the quote signature is not ECDSA".into());
    };
    if ecc.hashing_algorithm() != HashingAlgorithm::Sha256 {
        return Err("the quote signature does not use SHA-256".into());
    }
    let sig = p256::ecdsa::Signature::from_scalars(
        coordinate(ecc.signature_r().value())?,
        coordinate(ecc.signature_s().value())?,
    )
    .map_err(|e| format!("signature: {e}"))?;
    key.verify(&attest_bytes, &sig)
        .map_err(|_| "the quote signature does not verify with the attestation key".to_owned())?;
    // Only now is TPMS_ATTEST the TPM's statement.
    let attest = tss_esapi::structures::Attest::unmarshall(&attest_bytes)
        .map_err(|e| format!("attest: {e}"))?;
    if attest.attestation_type() != AttestationType::Quote {
        return Err("the attestation is not a quote".into());
    }
    if attest.extra_data().value() != report_data.as_slice() {
        return Err(
            "the quote's qualifying data is not the request's report data (a forged or altered \
             request)"
                .into(),
        );
    }
    let AttestInfo::Quote { info } = attest.attested() else {
        return Err("the attestation is not a quote".into());
    };
    let expected_list = expect
        .selection
        .tss_selection()
        .map_err(|e| e.to_string())?;
    if *info.pcr_selection() != expected_list {
        return Err(format!(
            "the quote covers other PCRs than the expected {}",
            expect.selection
        ));
    }
    if info.pcr_digest().value() != pcr_digest(&expect.values).as_slice() {
        return Err("the quoted PCR values are not the expected ones".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn expectation() -> QuoteExpectation {
        let selection = PcrSelection::default();
        let values = selection.pcrs().iter().map(|&i| (i, [0u8; 32])).collect();
        QuoteExpectation {
            ak_sha256: [0; 32],
            selection,
            values,
        }
    }

    proptest! {
        #[test]
        fn verify_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            prop_assert!(verify_quote(&bytes, &expectation(), &[0; 64]).is_err());
        }

        #[test]
        fn verify_never_panics_on_arbitrary_marshalled_fields(
            ak in proptest::collection::vec(any::<u8>(), 0..200),
            attest in proptest::collection::vec(any::<u8>(), 0..200),
            signature in proptest::collection::vec(any::<u8>(), 0..120),
        ) {
            let mut expect = expectation();
            // Pin the random AK, so parsing goes past the pin check into the TPM structures.
            expect.ak_sha256 = Sha256::digest(&ak).into();
            let body = serde_json::to_vec(&TpmQuoteBody {
                ak_public: hex::encode(&ak),
                attest: hex::encode(&attest),
                signature: hex::encode(&signature),
            })
            .unwrap();
            prop_assert!(verify_quote(&body, &expect, &[0; 64]).is_err());
            let _ = ak_fingerprint(&body);
        }
    }
}
