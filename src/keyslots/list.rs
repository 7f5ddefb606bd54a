//! Listing keyslots: their public facts and decoded bindings (no key needed).

use std::path::Path;

use serde::Serialize;

use super::KeyslotError;
use crate::header::{Keyslot, SlotKind, SourceKind};
use crate::sealing::snp::SnpBinding;
use crate::volume::{VolumeError, Volumes, read_header};

/// A keyslot's public facts.
#[derive(Debug, Clone, Serialize)]
pub struct SlotInfo {
    pub index: usize,
    /// "sealed", "recovery" or "transfer".
    pub kind: &'static str,
    /// The sealing source; null for a recovery slot.
    pub source: Option<SourceKind>,
    /// Sealed: the digest of the sealing secret (compare with `sealcsi volume identity`). Recovery: the
    /// SHA-256 fingerprint of the recipient's public key (transfer: of the request's ephemeral key).
    pub identity_digest: String,
    pub binding: String,
    /// The binding decoded, where its format is known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decoded: Option<BindingInfo>,
    pub created: u64,
}

/// A decoded binding.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum BindingInfo {
    Sim,
    Snp {
        policy: String,
        guest_field_select: String,
        guest_svn: u32,
        vmpl: u32,
        tcb_version: u64,
    },
    Recovery {
        hpke_suite: &'static str,
        encapsulated_key: String,
    },
    /// An attested-transfer slot: HPKE to a transfer request's ephemeral key, and that request's nonce.
    Transfer {
        hpke_suite: &'static str,
        encapsulated_key: String,
        request_nonce: String,
    },
    /// Sealed to a TPM PCR policy: `pcrs` as `bank:i,j,...`, the policy digest the sealed object requires.
    Tpm {
        pcrs: String,
        policy_digest: String,
    },
    /// Released by a key broker: the broker's name or URL and the resource path.
    Kbs {
        broker: String,
        resource: String,
    },
    /// The binding does not decode (a slot this build's source would not use).
    Invalid {
        reason: String,
    },
}

pub(super) fn decode_binding(slot: &Keyslot) -> Option<BindingInfo> {
    match slot.kind {
        SlotKind::Recovery => Some(BindingInfo::Recovery {
            hpke_suite: "DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20Poly1305",
            encapsulated_key: hex::encode(&slot.binding),
        }),
        SlotKind::Transfer => Some(BindingInfo::Transfer {
            hpke_suite: "DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20Poly1305",
            encapsulated_key: hex::encode(&slot.binding),
            request_nonce: hex::encode(slot.salt),
        }),
        SlotKind::Sealed(SourceKind::Sim) if slot.binding.is_empty() => Some(BindingInfo::Sim),
        SlotKind::Sealed(SourceKind::Snp) => Some(match SnpBinding::decode(&slot.binding) {
            Ok(b) => {
                let request = b.request();
                BindingInfo::Snp {
                    policy: b.policy.to_string(),
                    guest_field_select: format!("{:#x}", request.guest_field_select),
                    guest_svn: request.guest_svn,
                    vmpl: request.vmpl,
                    tcb_version: request.tcb_version,
                }
            }
            Err(e) => BindingInfo::Invalid {
                reason: e.to_string(),
            },
        }),
        SlotKind::Sealed(SourceKind::Sim) => Some(BindingInfo::Invalid {
            reason: "a sim slot has no binding".into(),
        }),
        SlotKind::Sealed(SourceKind::Kbs) => {
            Some(match crate::broker::KbsBinding::decode(&slot.binding) {
                Ok(b) => BindingInfo::Kbs {
                    broker: b.broker,
                    resource: b.resource.to_string(),
                },
                Err(e) => BindingInfo::Invalid { reason: e.0 },
            })
        }
        SlotKind::Sealed(SourceKind::Tpm) => Some(
            match crate::sealing::tpm::TpmBinding::decode(&slot.binding) {
                Ok(b) => BindingInfo::Tpm {
                    pcrs: b.selection.to_string(),
                    policy_digest: hex::encode(b.policy_digest),
                },
                Err(e) => BindingInfo::Invalid {
                    reason: e.to_string(),
                },
            },
        ),
    }
}

fn slot_info(index: usize, slot: &Keyslot) -> SlotInfo {
    SlotInfo {
        index,
        kind: match slot.kind {
            SlotKind::Sealed(_) => "sealed",
            SlotKind::Recovery => "recovery",
            SlotKind::Transfer => "transfer",
        },
        source: slot.source(),
        identity_digest: hex::encode(slot.identity_digest),
        binding: hex::encode(&slot.binding),
        decoded: decode_binding(slot),
        created: slot.created,
    }
}

/// The active keyslots of the volume on `device` (no key needed, nothing written).
pub fn list(device: &Path) -> Result<Vec<SlotInfo>, KeyslotError> {
    let active = read_header(device)?;
    Ok(active
        .header
        .active_slots()
        .map(|(i, s)| slot_info(i, s))
        .collect())
}

/// The slot this node unseals, if any (`None` when no slot is sealed to it).
pub fn this_node_slot(volumes: &Volumes, device: &Path) -> Result<Option<usize>, KeyslotError> {
    let active = read_header(device)?;
    match volumes.unseal(&active.header) {
        Ok((index, _)) => Ok(Some(index)),
        Err(VolumeError::WrongIdentity { .. } | VolumeError::NoKeyslots) => Ok(None),
        Err(e) => Err(e.into()),
    }
}
