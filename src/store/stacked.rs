//! What the controller and the node of a stacked sealcsi (`--backend csi:...`, docs/stacked.md) share:
//! how StorageClass parameters split between sealcsi and the backend, what the volume context holds,
//! and the node-local id of a stacked volume.
//!
//! Volume context of a stacked volume (made by the controller, read by the node):
//! - `integrity`, `init`, `journal`: sealcsi's parameters, explicit values ([`VolumeParams::to_map`]);
//! - `backend.<key>`: the backend's volume context, each key prefixed [`BACKEND_CONTEXT_PREFIX`];
//! - [`CONTEXT_SOURCE_VOLUME`]: for a restored or cloned volume, the id of the volume whose ciphertext it
//!   holds.

use std::collections::HashMap;

use super::params::CO_PARAMETER_PREFIX;
use super::{Store, StoreError, VolumeId, VolumeParams, VolumeRecord};
use crate::backend::csi::Map;

/// StorageClass parameters with this prefix are the backend's (passed on without it).
pub const BACKEND_PARAMETER_PREFIX: &str = "backend.";
/// Volume context keys with this prefix are the backend's volume context (passed back without it).
pub const BACKEND_CONTEXT_PREFIX: &str = "backend.";
/// Volume context: the sealcsi volume id whose ciphertext a restored or cloned volume holds (its header
/// is bound to that id; the node re-binds it to the new id on the first stage).
pub const CONTEXT_SOURCE_VOLUME: &str = "stacked.sealcsi.io/source-volume";

/// sealcsi's parameters and the backend's, split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitParameters {
    pub sealcsi: VolumeParams,
    pub backend: Map,
}

/// Splits StorageClass parameters (see the module docs).
pub fn split_parameters(params: &HashMap<String, String>) -> Result<SplitParameters, StoreError> {
    let mut own = HashMap::new();
    let mut backend = Map::new();
    for (k, v) in params {
        if let Some(key) = k.strip_prefix(BACKEND_PARAMETER_PREFIX) {
            if key.is_empty() {
                return Err(StoreError::InvalidArgument(format!(
                    "parameter {k:?} names no backend parameter"
                )));
            }
            backend.insert(key.to_string(), v.clone());
        } else if k.starts_with(CO_PARAMETER_PREFIX) {
            backend.insert(k.clone(), v.clone());
        } else {
            own.insert(k.clone(), v.clone());
        }
    }
    Ok(SplitParameters {
        sealcsi: VolumeParams::parse(&own)?,
        backend,
    })
}

/// The backend's part of a sealcsi volume context.
pub fn backend_context(context: &HashMap<String, String>) -> Map {
    context
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix(BACKEND_CONTEXT_PREFIX)
                .map(|k| (k.to_string(), v.clone()))
        })
        .collect()
}

/// sealcsi's own parameters in a volume context it made: the backend's keys, the provenance and every
/// prefixed key (`domain/name`) left out. sealcsi's own keys are bare names; prefixed ones belong to
/// someone else: the CO adds its own to the context it passes back (Kubernetes' external-provisioner
/// puts `storage.kubernetes.io/csiProvisionerIdentity` in every volume it provisions).
pub fn sealcsi_context(context: &HashMap<String, String>) -> Result<VolumeParams, StoreError> {
    let own: HashMap<String, String> = context
        .iter()
        .filter(|(k, _)| !k.starts_with(BACKEND_CONTEXT_PREFIX) && !k.contains('/'))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    VolumeParams::parse(&own)
}

/// The node-local id of the stacked volume with CSI id `csi_id` (the backend's id): names its record,
/// the path the backend publishes its device at, and its device-mapper stack. Deterministic, so a retry
/// after a crash finds everything the first attempt made.
pub fn local_id(csi_id: &str) -> VolumeId {
    VolumeId::for_name(&format!("stacked:{csi_id}"))
}

/// Whether `record` is the node-local record of a stacked volume (its id is [`local_id`] of the CSI id
/// it keeps as its name; a node-local volume's id is derived from its name without the `stacked:`
/// prefix, so the two never collide).
pub fn is_stacked_record(record: &VolumeRecord) -> bool {
    local_id(&record.name).as_str() == record.volume_id
}

impl Store {
    /// Removes the node-local record of the stacked volume `id` and its pending-init marker, and syncs
    /// the directory; `false` if there was no record. Never touches `<id>.img`: that path is the
    /// backend's publish target, not sealcsi's file ([`Store::remove`] is for node-local volumes).
    pub fn remove_stacked_record(&self, id: &VolumeId) -> Result<bool, StoreError> {
        let had = self.record_path(id).exists();
        Self::remove_if_present(&self.pending_init_path(id))?;
        Self::remove_if_present(&self.record_path(id))?;
        self.sync_dir()?;
        Ok(had)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cos_own_context_keys_are_not_sealcsi_parameters() {
        let context: HashMap<String, String> = [
            ("integrity", "hmac-sha256"),
            ("init", "fast"),
            ("journal", "journal"),
            ("backend.hostpath/kind", "block"),
            (CONTEXT_SOURCE_VOLUME, "vol-1"),
            // What Kubernetes' external-provisioner adds to every volume it provisions.
            (
                "storage.kubernetes.io/csiProvisionerIdentity",
                "1764617000000-1234-sealcsi.io",
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let params = sealcsi_context(&context).unwrap();
        assert_eq!(params, VolumeParams::parse(&HashMap::new()).unwrap());
        // A bare key that is not sealcsi's is still refused: that context was not made by sealcsi.
        let mut wrong = context;
        wrong.insert("intgrity".into(), "none".into());
        assert!(sealcsi_context(&wrong).is_err());
    }
}
