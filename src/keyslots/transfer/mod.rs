//! Attested transfer of a volume key from a source node to a target node, without a broker
//! (docs/keys.md, "Attested transfer"):
//!
//! 1. target, [`make_request`]: a fresh ephemeral X25519 key (its private half sealed to the target's own
//!    identity under the state dir, [`pending`]), a fresh nonce, and TEE evidence whose report data is
//!    the digest of the request's fields ([`TransferRequest::report_data`]), written as a request file;
//! 2. source, [`grant`]: the evidence verified against the operator's [`Expectation`], then one atomic
//!    header update adds a transfer slot (kind 3) holding the volume key HPKE-encrypted to the key;
//! 3. target, [`accept`]: the slot opened with the sealed private key, the target's own sealed slot
//!    added (one atomic update), the transfer slot removed from both copies (another), the pending
//!    key deleted. A crash leaves the old slot set or the new one at every step; `accept` again
//!    finishes the job.
//!
//! Replay: a request moves one volume once. The source records every request it granted under its
//! state dir ([`GRANTED_DIR`]), and refuses a request it granted before, or one whose transfer slot the
//! volume already holds; the target deletes its pending key once accepted, so a second grant of the
//! same request can never be opened.

pub mod expect;
pub mod pending;
pub mod request;

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use serde::Serialize;

pub use expect::{Expectation, Verified, verify};
pub use request::TransferRequest;

use super::recovery::{key_check, open_recovery_slot, seal_hpke_slot};
use super::{KeyslotError, ensure_sealed_slot};
use crate::attest::{AttestError, EvidenceKind, EvidenceSource, SampleEvidence};
use crate::clock::now_unix;
use crate::error::{Classify, Kind};
use crate::header::SlotKind;
use crate::keys::{DIGEST_LEN, KeyError};
use crate::sealing::{self, SealError, SealingSource};
use crate::volume::header_io::lock_device;
use crate::volume::seal::unseal_with;
use crate::volume::{VolumeError, Volumes, commit, commit_everywhere, read_header};

/// Where the source records the requests it granted, under its state dir.
pub const GRANTED_DIR: &str = "transfer/granted";
/// The oldest request a source grants.
pub const MAX_REQUEST_AGE_SECS: u64 = 24 * 3600;
/// How far in the future a request's time may be (clock skew between nodes).
pub const MAX_CLOCK_SKEW_SECS: u64 = 600;

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error(transparent)]
    Keyslot(#[from] KeyslotError),
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error(transparent)]
    Attest(#[from] AttestError),
    #[error(transparent)]
    Key(#[from] KeyError),
    /// SEV-SNP evidence refused by one of its checks, or an unusable chain file.
    #[error(transparent)]
    Snp(#[from] crate::attest::snp::SnpError),
    /// The request file is not a well-formed request.
    #[error("invalid transfer request: {reason}")]
    RequestFormat { reason: String },
    /// The request file cannot be read or written.
    #[error("transfer request file {path}: {reason}")]
    RequestFile { path: String, reason: String },
    /// An `--expect` that does not parse.
    #[error("invalid transfer expectation {text:?}: {reason}")]
    InvalidExpectation { text: String, reason: String },
    /// The evidence does not prove what the expectation demands.
    #[error("transfer request refused: {reason}")]
    EvidenceRejected { reason: String },
    /// The request is not for this volume, too old, or from the future.
    #[error("transfer request refused: {reason}")]
    NotApplicable { reason: String },
    /// The request was used before.
    #[error(
        "transfer request {id} was already granted ({place}); make a new request on the target"
    )]
    Replayed { id: String, place: &'static str },
    /// The volume holds no transfer slot for a request pending on this node.
    #[error(
        "no transfer slot of this volume is for a request pending on this node (and this node \
         does not open the volume)"
    )]
    NoTransferSlot,
    /// A transfer slot for a pending request of this node does not decrypt.
    #[error(
        "transfer slot {0} fails to decrypt with this node's pending key: the header was altered"
    )]
    SlotAuthentication(usize),
    /// A transfer slot's nonce is not its request's.
    #[error("transfer slot {0} carries another request's nonce: the header was altered")]
    NonceMismatch(usize),
    /// The key in the transfer slot is not the key the source granted.
    #[error(
        "the key in transfer slot {0} does not match the key check value the source printed: the \
         slot was written by someone who knows only the (public) request key, or this is not the \
         volume that was granted; refusing to use it"
    )]
    KeyMismatch(usize),
    /// A part of the protocol this build does not have.
    #[error("{what}")]
    Unsupported { what: String },
    /// The transfer state under the state dir is unusable.
    #[error("transfer state {path}: {reason}")]
    State { path: String, reason: String },
}

impl From<SealError> for TransferError {
    fn from(e: SealError) -> Self {
        TransferError::Volume(e.into())
    }
}

impl Classify for TransferError {
    fn kind(&self) -> Kind {
        match self {
            TransferError::Keyslot(e) => e.kind(),
            TransferError::Volume(e) => e.kind(),
            TransferError::Attest(e) => e.kind(),
            TransferError::Snp(e) => e.kind(),
            TransferError::RequestFormat { .. }
            | TransferError::RequestFile { .. }
            | TransferError::InvalidExpectation { .. } => Kind::InvalidArgument,
            TransferError::EvidenceRejected { .. }
            | TransferError::NotApplicable { .. }
            | TransferError::Replayed { .. } => Kind::Refused,
            TransferError::NoTransferSlot => Kind::WrongIdentity,
            TransferError::SlotAuthentication(_)
            | TransferError::NonceMismatch(_)
            | TransferError::KeyMismatch(_) => Kind::InvalidHeader,
            TransferError::Unsupported { .. } => Kind::Unavailable,
            TransferError::Key(_) | TransferError::State { .. } => Kind::Internal,
        }
    }
}

/// Which evidence a transfer request carries (follows `--tee`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EvidenceChoice {
    /// Sample evidence naming this simulated identity.
    Sim { identity: String },
    /// A TPM 2.0 quote through `tcti` over `selection` (the node's sealing PCRs).
    Tpm {
        tcti: String,
        selection: crate::sealing::tpm::PcrSelection,
    },
    /// An SEV-SNP attestation report.
    Snp,
}

/// The SEV-SNP evidence source for a transfer request: the same report source the key-broker client
/// uses (configfs-tsm, falling back to `/dev/sev-guest`; [`crate::attest::open`]), without the host's
/// certificate table (the source verifies with the chain its operator gives; the table would not fit
/// the request's evidence limit). Never run on SNP hardware.
pub fn snp_evidence_source() -> Result<Box<dyn EvidenceSource>, TransferError> {
    Ok(Box::new(ReportOnly(crate::attest::open(
        EvidenceKind::Snp,
        "",
    )?)))
}

/// SNP evidence with `cert_chain` null.
struct ReportOnly(Box<dyn EvidenceSource>);

impl EvidenceSource for ReportOnly {
    fn kind(&self) -> EvidenceKind {
        self.0.kind()
    }

    fn evidence(
        &self,
        report_data: &crate::attest::ReportData,
    ) -> Result<crate::attest::Evidence, AttestError> {
        let mut evidence = self.0.evidence(report_data)?;
        let mut body =
            crate::attest::snp::SnpEvidenceBody::decode(&evidence.body).map_err(|e| {
                AttestError::Malformed {
                    kind: EvidenceKind::Snp,
                    reason: e,
                }
            })?;
        body.cert_chain = None;
        evidence.body = body.to_json();
        Ok(evidence)
    }
}

/// The evidence source for `choice`.
pub fn evidence_source(choice: &EvidenceChoice) -> Result<Box<dyn EvidenceSource>, TransferError> {
    match choice {
        EvidenceChoice::Sim { identity } => Ok(Box::new(SampleEvidence::new(identity.clone()))),
        EvidenceChoice::Tpm { tcti, selection } => Ok(Box::new(
            crate::attest::tpm::TpmQuoteEvidence::new(tcti.clone(), selection.clone()),
        )),
        EvidenceChoice::Snp => snp_evidence_source(),
    }
}

/// What `transfer-request` wrote.
#[derive(Debug, Clone, Serialize)]
pub struct RequestReport {
    pub request_file: PathBuf,
    /// SHA-256 of the ephemeral public key: names the request everywhere.
    pub request_id: String,
    pub evidence: EvidenceKind,
    /// This node's identity digest: the slot `transfer-accept` will add.
    pub target_identity: String,
    /// The volume the request is limited to, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub volume_uuid: Option<String>,
    /// Where the sealed ephemeral key waits for `transfer-accept`.
    pub pending_key: PathBuf,
    /// TPM evidence: SHA-256 of the attestation key's public area, for the source's `--expect tpm:`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ak_sha256: Option<String>,
}

fn uuid_string(uuid: &[u8; 16]) -> String {
    uuid::Uuid::from_bytes(*uuid).hyphenated().to_string()
}

/// Makes a transfer request on the target: the sealed ephemeral key under `state_dir`, the evidence
/// from `evidence`, the request file at `out` (created new, never overwritten). `volume` limits the
/// request to one volume UUID.
pub fn make_request(
    node: &dyn SealingSource,
    evidence: &dyn EvidenceSource,
    state_dir: &Path,
    volume: Option<[u8; 16]>,
    out: &Path,
) -> Result<RequestReport, TransferError> {
    let identity = sealing::identity(node)?;
    let mut target_identity = [0u8; DIGEST_LEN];
    hex::decode_to_slice(&identity.digest, &mut target_identity).map_err(|e| {
        TransferError::State {
            path: state_dir.display().to_string(),
            reason: format!("identity digest: {e}"),
        }
    })?;
    if out.exists() {
        return Err(TransferError::RequestFile {
            path: out.display().to_string(),
            reason: "exists; a request file is never overwritten".into(),
        });
    }
    let mut nonce = [0u8; request::REQUEST_NONCE_LEN];
    crate::keys::random_bytes(&mut nonce)?;
    let (public_key, pending_path) = pending::create(node, state_dir, &nonce)?;
    let mut req = TransferRequest {
        evidence_kind: evidence.kind(),
        created: now_unix(),
        nonce,
        public_key,
        volume,
        target_identity,
        evidence: Vec::new(),
    };
    let written = evidence
        .evidence(&req.report_data())
        .map_err(TransferError::from)
        .and_then(|ev| {
            req.evidence = ev.body;
            req.encode()
        })
        .and_then(|bytes| {
            pending::write_new_durable(out, 0o644, &bytes).map_err(|e| TransferError::RequestFile {
                path: out.display().to_string(),
                reason: e.to_string(),
            })
        });
    if let Err(e) = written {
        // No pending key without its request.
        let _ = pending::remove(state_dir, &req.id());
        return Err(e);
    }
    Ok(RequestReport {
        request_file: out.to_path_buf(),
        request_id: hex::encode(req.id()),
        evidence: req.evidence_kind,
        target_identity: identity.digest,
        volume_uuid: volume.as_ref().map(uuid_string),
        pending_key: pending_path,
        ak_sha256: match req.evidence_kind {
            EvidenceKind::Tpm => Some(hex::encode(crate::attest::tpm::ak_fingerprint(
                &req.evidence,
            )?)),
            _ => None,
        },
    })
}

/// Reads and parses a request file.
pub fn read_request(path: &Path) -> Result<TransferRequest, TransferError> {
    let bytes = fs::read(path).map_err(|e| TransferError::RequestFile {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    TransferRequest::decode(&bytes)
}

/// What `transfer-grant` did.
#[derive(Debug, Clone, Serialize)]
pub struct GrantReport {
    /// The transfer slot added.
    pub slot: usize,
    pub volume_uuid: String,
    pub request_id: String,
    /// The identity the target's evidence proved (as expected), and whether that proof is simulated.
    pub verified: String,
    pub simulated: bool,
    /// The target's identity digest (from the request, vouched for by the evidence).
    pub target_identity: String,
    /// Commitment to the volume key: give it to the target's operator; `transfer-accept --key-check`
    /// refuses a transfer slot a host forged with the (public) request key.
    pub key_check: String,
    /// The source's record of this grant (replays are refused).
    pub record: PathBuf,
}

fn granted_path(state_dir: &Path, id: &[u8; DIGEST_LEN]) -> PathBuf {
    state_dir.join(GRANTED_DIR).join(hex::encode(id))
}

/// Grants `request` on the source: verifies the evidence against `expect`, checks that the request
/// applies (volume, age) and was never used, then adds the transfer slot in one atomic header update.
/// On refusal nothing is written (neither the device nor the state dir).
pub fn grant(
    volumes: &Volumes,
    device: &Path,
    request: &TransferRequest,
    expect: &Expectation,
    state_dir: &Path,
) -> Result<GrantReport, TransferError> {
    let verified = verify(expect, request)?;
    let now = now_unix();
    if request.created > now.saturating_add(MAX_CLOCK_SKEW_SECS) {
        return Err(TransferError::NotApplicable {
            reason: format!(
                "it was made at {} (unix), in the future of this node's clock ({now})",
                request.created
            ),
        });
    }
    if now.saturating_sub(request.created) > MAX_REQUEST_AGE_SECS {
        return Err(TransferError::NotApplicable {
            reason: format!(
                "it is older than {MAX_REQUEST_AGE_SECS} s; make a fresh request on the target"
            ),
        });
    }
    let id = request.id();
    let id_hex = hex::encode(id);
    let record = granted_path(state_dir, &id);
    let _lock = lock_device(device)?;
    let active = read_header(device)?;
    let header = &active.header;
    if let Some(volume) = request.volume
        && volume != header.uuid
    {
        return Err(TransferError::NotApplicable {
            reason: format!(
                "it asks for volume {}, and this is volume {}",
                uuid_string(&volume),
                header.uuid_string()
            ),
        });
    }
    if header
        .active_slots()
        .any(|(_, s)| s.kind == SlotKind::Transfer && s.identity_digest == id)
    {
        return Err(TransferError::Replayed {
            id: id_hex,
            place: "this volume holds its transfer slot",
        });
    }
    if record.exists() {
        return Err(TransferError::Replayed {
            id: id_hex,
            place: "this node's record of granted requests",
        });
    }
    let (_, key) = volumes.unseal(header)?;
    let index = header
        .keyslots
        .iter()
        .position(Option::is_none)
        .ok_or(KeyslotError::Full)?;
    let mut new = header.clone();
    new.keyslots[index] = Some(seal_hpke_slot(
        header,
        &key,
        &request.public_key,
        SlotKind::Transfer,
        request.nonce,
    )?);
    // Claim the request first (create_new: two grants of one request cannot both pass), then commit;
    // a failed commit releases the claim.
    let entry = serde_json::json!({
        "volume_uuid": header.uuid_string(),
        "granted_at": now,
        "verified": verified.identity,
    });
    pending::write_new_durable(&record, 0o644, entry.to_string().as_bytes()).map_err(|e| {
        if e.kind() == ErrorKind::AlreadyExists {
            TransferError::Replayed {
                id: id_hex.clone(),
                place: "this node's record of granted requests",
            }
        } else {
            TransferError::State {
                path: record.display().to_string(),
                reason: e.to_string(),
            }
        }
    })?;
    if let Err(e) = commit(device, &active, new) {
        let _ = fs::remove_file(&record);
        return Err(e.into());
    }
    tracing::info!(device = %device.display(), keyslot = index, request = %id_hex, "granted a transfer");
    Ok(GrantReport {
        slot: index,
        volume_uuid: header.uuid_string(),
        request_id: id_hex,
        verified: verified.identity,
        simulated: verified.simulated,
        target_identity: hex::encode(request.target_identity),
        key_check: hex::encode(key_check(header, &key)),
        record,
    })
}

/// What `transfer-accept` did.
#[derive(Debug, Clone, Serialize)]
pub struct AcceptReport {
    /// This node's slot (added, or found).
    pub slot: usize,
    /// The transfer slot removed; `None` when an earlier run had already removed it.
    pub transfer_slot: Option<usize>,
    pub request_id: Option<String>,
    pub volume_uuid: String,
    /// Whether the key was checked against the source's key check value.
    pub key_checked: bool,
}

/// How far [`accept_steps`] goes (tests stop it between the atomic updates, as a crash would).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Step {
    AddOwnSlot,
    RemoveTransferSlot,
    DeletePendingKey,
}

/// Accepts a granted transfer on the target. Idempotent: run again after a crash, it finishes.
pub fn accept(
    node: &dyn SealingSource,
    device: &Path,
    state_dir: &Path,
    expected_key_check: Option<&[u8; 32]>,
) -> Result<AcceptReport, TransferError> {
    accept_steps(
        node,
        device,
        state_dir,
        expected_key_check,
        Step::DeletePendingKey,
    )
}

fn accept_steps(
    node: &dyn SealingSource,
    device: &Path,
    state_dir: &Path,
    expected_key_check: Option<&[u8; 32]>,
    last: Step,
) -> Result<AcceptReport, TransferError> {
    let _lock = lock_device(device)?;
    let active = read_header(device)?;
    let header = &active.header;
    let mut found = None;
    for (index, slot) in header.active_slots() {
        if slot.kind != SlotKind::Transfer {
            continue;
        }
        let Some((private, nonce)) = pending::load(node, state_dir, &slot.identity_digest)? else {
            continue;
        };
        if nonce != slot.salt {
            return Err(TransferError::NonceMismatch(index));
        }
        let key = open_recovery_slot(header, slot, &private)
            .map_err(|_| TransferError::SlotAuthentication(index))?;
        found = Some((index, slot.identity_digest, key));
        break;
    }
    let Some((transfer_slot, id, key)) = found else {
        // An earlier accept finished its header updates (or there is nothing for this node).
        return match unseal_with(node, header) {
            Ok((slot, _)) => Ok(AcceptReport {
                slot,
                transfer_slot: None,
                request_id: None,
                volume_uuid: header.uuid_string(),
                key_checked: false,
            }),
            Err(VolumeError::WrongIdentity { .. } | VolumeError::NoKeyslots) => {
                Err(TransferError::NoTransferSlot)
            }
            Err(e) => Err(e.into()),
        };
    };
    if let Some(expected) = expected_key_check
        && *expected != key_check(header, &key)
    {
        return Err(TransferError::KeyMismatch(transfer_slot));
    }
    // Step 1: this node's own sealed slot, in one atomic update.
    let binding = node.default_binding();
    let secret = node.secret(&binding)?;
    let (slot, new) = ensure_sealed_slot(header, &key, node.kind(), binding, &secret)?;
    if let Some(new) = new {
        commit(device, &active, new)?;
    }
    let report = AcceptReport {
        slot,
        transfer_slot: Some(transfer_slot),
        request_id: Some(hex::encode(id)),
        volume_uuid: header.uuid_string(),
        key_checked: expected_key_check.is_some(),
    };
    if last == Step::AddOwnSlot {
        return Ok(report);
    }
    // Step 2: the transfer slot out of both copies.
    let active = read_header(device)?;
    let mut new = active.header.clone();
    new.keyslots[transfer_slot] = None;
    commit_everywhere(device, &active, new)?;
    if last == Step::RemoveTransferSlot {
        return Ok(report);
    }
    // Step 3: the ephemeral key is no longer needed.
    pending::remove(state_dir, &id)?;
    tracing::info!(device = %device.display(), keyslot = slot, "accepted a transfer");
    Ok(report)
}

#[cfg(test)]
mod tests;
