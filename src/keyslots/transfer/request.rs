//! The transfer request file (docs/format.md, "Transfer request"): what a target node hands to the
//! source. It is public (it holds no secret) and untrusted: the source parses it strictly, and trusts
//! nothing in it until the evidence it carries has been verified against the operator's expectation.

use sha2::{Digest, Sha256, Sha512};

use super::TransferError;
use crate::attest::{EvidenceKind, REPORT_DATA_LEN, ReportData};
use crate::keys::DIGEST_LEN;
use crate::keyslots::{RECOVERY_KEY_LEN, RecoveryPublicKey};

/// First 16 bytes of every request file.
pub const REQUEST_MAGIC: [u8; 16] = *b"SEALCSI-XFER-REQ";
/// The only request version this build reads and writes.
pub const REQUEST_VERSION: u16 = 1;
/// Length of the request nonce.
pub const REQUEST_NONCE_LEN: usize = 32;
/// The largest evidence body a request may carry.
pub const MAX_EVIDENCE_LEN: usize = 16 * 1024;
/// Label of the report-data digest (domain separation from every other use of the report data).
const REPORT_DATA_LABEL: &[u8] = b"sealcsi/v1/transfer-request";

/// Bytes 16..144 are the bound fields; 144..148 the evidence length; the evidence follows.
const BOUND_START: usize = 16;
const BOUND_END: usize = 144;
const FIXED_LEN: usize = 148;
const CHECKSUM_LEN: usize = 32;

/// A parsed (or about to be written) transfer request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferRequest {
    pub evidence_kind: EvidenceKind,
    /// Unix seconds at which the target made the request.
    pub created: u64,
    pub nonce: [u8; REQUEST_NONCE_LEN],
    /// The target's ephemeral X25519 public key: the transfer slot is HPKE-encrypted to it.
    pub public_key: RecoveryPublicKey,
    /// The one volume (UUID) the target asks for; `None`: any volume the source grants.
    pub volume: Option<[u8; 16]>,
    /// The target's sealing identity digest (its `volume identity`): the slot accept will add.
    pub target_identity: [u8; DIGEST_LEN],
    /// The evidence body, in the format of its kind's verifier.
    pub evidence: Vec<u8>,
}

fn kind_code(kind: EvidenceKind) -> u16 {
    match kind {
        EvidenceKind::Sample => 1,
        EvidenceKind::Snp => 2,
        EvidenceKind::Tpm => 3,
        EvidenceKind::Tdx => 4,
    }
}

fn kind_from_code(code: u16) -> Option<EvidenceKind> {
    Some(match code {
        1 => EvidenceKind::Sample,
        2 => EvidenceKind::Snp,
        3 => EvidenceKind::Tpm,
        4 => EvidenceKind::Tdx,
        _ => return None,
    })
}

fn format_error(reason: impl Into<String>) -> TransferError {
    TransferError::RequestFormat {
        reason: reason.into(),
    }
}

impl TransferRequest {
    /// The fixed part of the file (bytes 0..148) with the evidence length `evidence_len`.
    fn encode_fixed(&self, evidence_len: usize) -> [u8; FIXED_LEN] {
        let mut out = [0u8; FIXED_LEN];
        out[0..16].copy_from_slice(&REQUEST_MAGIC);
        out[16..18].copy_from_slice(&REQUEST_VERSION.to_le_bytes());
        out[18..20].copy_from_slice(&kind_code(self.evidence_kind).to_le_bytes());
        out[24..32].copy_from_slice(&self.created.to_le_bytes());
        out[32..64].copy_from_slice(&self.nonce);
        out[64..96].copy_from_slice(self.public_key.as_bytes());
        out[96..112].copy_from_slice(&self.volume.unwrap_or([0; 16]));
        out[112..144].copy_from_slice(&self.target_identity);
        out[144..148].copy_from_slice(&(evidence_len as u32).to_le_bytes());
        out
    }

    /// The report data the target's evidence must carry:
    /// `SHA-512("sealcsi/v1/transfer-request" || bytes 16..144 of the request file)`, i.e. the version,
    /// evidence kind, time, nonce, ephemeral public key, volume and target identity.
    pub fn report_data(&self) -> ReportData {
        let fixed = self.encode_fixed(self.evidence.len());
        let digest = Sha512::new()
            .chain_update(REPORT_DATA_LABEL)
            .chain_update(&fixed[BOUND_START..BOUND_END])
            .finalize();
        let mut out = [0u8; REPORT_DATA_LEN];
        out.copy_from_slice(&digest);
        out
    }

    /// The request's id: SHA-256 of the ephemeral public key. It names the target's sealed private
    /// key, the source's used-request record and the transfer slot (its identity digest).
    pub fn id(&self) -> [u8; DIGEST_LEN] {
        self.public_key.fingerprint()
    }

    /// The file's bytes.
    pub fn encode(&self) -> Result<Vec<u8>, TransferError> {
        if self.evidence.len() > MAX_EVIDENCE_LEN {
            return Err(format_error(format!(
                "evidence of {} bytes is longer than {MAX_EVIDENCE_LEN}",
                self.evidence.len()
            )));
        }
        let mut out = Vec::with_capacity(FIXED_LEN + self.evidence.len() + CHECKSUM_LEN);
        out.extend_from_slice(&self.encode_fixed(self.evidence.len()));
        out.extend_from_slice(&self.evidence);
        let sum = Sha256::digest(&out);
        out.extend_from_slice(&sum);
        Ok(out)
    }

    /// Parses a request file. Untrusted input: every field is checked, nothing panics, and a file with
    /// a byte more or less than its lengths say is refused.
    pub fn decode(buf: &[u8]) -> Result<Self, TransferError> {
        if buf.len() < FIXED_LEN + CHECKSUM_LEN {
            return Err(format_error(format!(
                "{} bytes is shorter than any request",
                buf.len()
            )));
        }
        if buf[0..16] != REQUEST_MAGIC {
            return Err(format_error("not a sealcsi transfer request (magic)"));
        }
        let version = u16::from_le_bytes([buf[16], buf[17]]);
        if version != REQUEST_VERSION {
            return Err(format_error(format!(
                "request version {version} (this build reads version {REQUEST_VERSION})"
            )));
        }
        let evidence_len = u32::from_le_bytes(buf[144..148].try_into().expect("4 bytes")) as usize;
        if evidence_len > MAX_EVIDENCE_LEN {
            return Err(format_error(format!(
                "evidence length {evidence_len} is over {MAX_EVIDENCE_LEN}"
            )));
        }
        let total = FIXED_LEN + evidence_len + CHECKSUM_LEN;
        if buf.len() != total {
            return Err(format_error(format!(
                "{} bytes, but the evidence length says {total}",
                buf.len()
            )));
        }
        let body_end = FIXED_LEN + evidence_len;
        if Sha256::digest(&buf[..body_end]).as_slice() != &buf[body_end..] {
            return Err(format_error("checksum mismatch (damaged or truncated)"));
        }
        let code = u16::from_le_bytes([buf[18], buf[19]]);
        let evidence_kind = kind_from_code(code)
            .ok_or_else(|| format_error(format!("unknown evidence kind {code}")))?;
        if buf[20..24] != [0; 4] {
            return Err(format_error("reserved bytes 20..24 are not zero"));
        }
        let array = |at: usize| -> [u8; 32] { buf[at..at + 32].try_into().expect("32 bytes") };
        let volume: [u8; 16] = buf[96..112].try_into().expect("16 bytes");
        let public: [u8; RECOVERY_KEY_LEN] = array(64);
        if public == [0; RECOVERY_KEY_LEN] {
            return Err(format_error("the ephemeral public key is all zero"));
        }
        Ok(Self {
            evidence_kind,
            created: u64::from_le_bytes(buf[24..32].try_into().expect("8 bytes")),
            nonce: array(32),
            public_key: RecoveryPublicKey::from_bytes(public),
            volume: (volume != [0; 16]).then_some(volume),
            target_identity: array(112),
            evidence: buf[FIXED_LEN..body_end].to_vec(),
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn sample_request() -> TransferRequest {
        TransferRequest {
            evidence_kind: EvidenceKind::Sample,
            created: 1_800_000_000,
            nonce: [0x11; 32],
            public_key: RecoveryPublicKey::from_bytes([0x22; 32]),
            volume: Some([0x33; 16]),
            target_identity: [0x44; 32],
            evidence: b"{}".to_vec(),
        }
    }

    #[test]
    fn round_trip_and_documented_layout() {
        let r = sample_request();
        let buf = r.encode().unwrap();
        assert_eq!(buf.len(), 148 + 2 + 32);
        assert_eq!(&buf[0..16], b"SEALCSI-XFER-REQ");
        assert_eq!(&buf[16..20], &[1, 0, 1, 0], "version 1, kind 1 (sample)");
        assert_eq!(&buf[20..24], &[0; 4]);
        assert_eq!(&buf[24..32], &1_800_000_000u64.to_le_bytes());
        assert_eq!(&buf[32..64], &[0x11; 32]);
        assert_eq!(&buf[64..96], &[0x22; 32]);
        assert_eq!(&buf[96..112], &[0x33; 16]);
        assert_eq!(&buf[112..144], &[0x44; 32]);
        assert_eq!(&buf[144..148], &2u32.to_le_bytes());
        assert_eq!(&buf[148..150], b"{}");
        assert_eq!(&buf[150..], Sha256::digest(&buf[..150]).as_slice());
        assert_eq!(TransferRequest::decode(&buf).unwrap(), r);
        let expected: [u8; 64] = Sha512::new()
            .chain_update(b"sealcsi/v1/transfer-request")
            .chain_update(&buf[16..144])
            .finalize()
            .into();
        assert_eq!(r.report_data(), expected);
        let mut any = r.clone();
        any.volume = None;
        let buf = any.encode().unwrap();
        assert_eq!(&buf[96..112], &[0; 16]);
        assert_eq!(TransferRequest::decode(&buf).unwrap().volume, None);
    }

    #[test]
    fn the_report_data_binds_every_bound_field() {
        let r = sample_request();
        let base = r.report_data();
        let mut variants = Vec::new();
        let mut v = r.clone();
        v.public_key = RecoveryPublicKey::from_bytes([0x23; 32]);
        variants.push(v);
        let mut v = r.clone();
        v.nonce[0] ^= 1;
        variants.push(v);
        let mut v = r.clone();
        v.volume = None;
        variants.push(v);
        let mut v = r.clone();
        v.target_identity[31] ^= 1;
        variants.push(v);
        let mut v = r.clone();
        v.created += 1;
        variants.push(v);
        let mut v = r.clone();
        v.evidence_kind = EvidenceKind::Tpm;
        variants.push(v);
        for v in variants {
            assert_ne!(v.report_data(), base, "{v:?}");
        }
        // The evidence itself is not bound (it carries the report data).
        let mut v = r.clone();
        v.evidence = b"{\"x\":1}".to_vec();
        assert_eq!(v.report_data(), base);
    }

    #[test]
    fn malformed_requests_are_refused() {
        let good = sample_request().encode().unwrap();
        let reseal = |mut b: Vec<u8>| {
            let end = b.len() - 32;
            let sum = Sha256::digest(&b[..end]);
            b[end..].copy_from_slice(&sum);
            b
        };
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (good[..good.len() - 1].to_vec(), "evidence length says"),
            ([good.clone(), vec![0]].concat(), "evidence length says"),
            (good[..100].to_vec(), "shorter"),
            (
                {
                    let mut b = good.clone();
                    b[0] = b'X';
                    b
                },
                "magic",
            ),
            (
                {
                    let mut b = good.clone();
                    b[16] = 2;
                    reseal(b)
                },
                "version 2",
            ),
            (
                {
                    let mut b = good.clone();
                    b[18] = 9;
                    reseal(b)
                },
                "unknown evidence kind",
            ),
            (
                {
                    let mut b = good.clone();
                    b[21] = 1;
                    reseal(b)
                },
                "reserved",
            ),
            (
                {
                    let mut b = good.clone();
                    b[64..96].fill(0);
                    reseal(b)
                },
                "all zero",
            ),
            (
                {
                    let mut b = good.clone();
                    b[40] ^= 1;
                    b
                },
                "checksum",
            ),
            (
                {
                    let mut b = good.clone();
                    b[144..148].copy_from_slice(&(MAX_EVIDENCE_LEN as u32 + 1).to_le_bytes());
                    b
                },
                "over",
            ),
        ];
        for (buf, needle) in cases {
            let err = TransferRequest::decode(&buf).unwrap_err();
            assert!(err.to_string().contains(needle), "{needle}: {err}");
            assert_eq!(
                crate::error::Classify::kind(&err),
                crate::error::Kind::InvalidArgument
            );
        }
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = TransferRequest::decode(&bytes);
        }

        #[test]
        fn decode_of_mutated_valid_requests_never_panics_and_round_trips_when_accepted(
            evidence in proptest::collection::vec(any::<u8>(), 0..200),
            at in any::<usize>(),
            value in any::<u8>(),
        ) {
            let mut r = sample_request();
            r.evidence = evidence;
            let mut buf = r.encode().unwrap();
            let at = at % buf.len();
            buf[at] = value;
            // Re-seal the checksum so that the field checks themselves are exercised.
            let end = buf.len() - 32;
            let sum = Sha256::digest(&buf[..end]);
            buf[end..].copy_from_slice(&sum);
            if let Ok(parsed) = TransferRequest::decode(&buf) {
                prop_assert_eq!(parsed.encode().unwrap(), buf);
            }
        }
    }
}
