//! The controller core of a stacked sealcsi (`--backend csi:...`): every volume is a raw BLOCK volume of
//! the backend CSI driver, sized so the sealed stack on it holds at least what the user asked for. No
//! gRPC types here; the backend is a [`CsiBackend`] and `crate::csi::stacked` is the thin edge.
//!
//! - **Ids.** A sealcsi volume id is the backend's volume id, unchanged (it already fits the CSI
//!   limits); a snapshot id is the backend's snapshot id. Nothing is stored on the controller.
//! - **Parameters.** StorageClass keys prefixed `backend.` go to the backend without the prefix; the CO's
//!   `csi.storage.k8s.io/*` keys go to it as they are; every other key is sealcsi's own
//!   ([`VolumeParams`]).
//! - **Volume context** (what the node gets): sealcsi's parameters (explicit values), the backend's
//!   context with every key prefixed `backend.`, and the provenance of a restored or cloned volume
//!   ([`CONTEXT_SOURCE_VOLUME`]).
//! - **Sizes.** The one rule of node-local volumes too (`store::sizing`): the backend device is
//!   [`device_bytes_for_usable`] of the usable size; capacities reported back are
//!   [`usable_bytes_of_device`] of what the backend reports. Expansion and snapshots do not know
//!   a volume's parameters (CSI passes none), so they size with the AEAD bound, the larger one.

use std::collections::HashMap;
use std::sync::Arc;

use crate::backend::csi::{
    BackendCallError, Capabilities, ContentSource, ControllerCap, CreateRequest, CsiBackend, Map,
    Secrets, Topology, TopologyRequirement,
};
use crate::error::{Classify, Kind};
use crate::header::FsKind;
use crate::node::capability::AccessMode;
use crate::store::sizing::{
    device_bytes_for_usable, min_usable_bytes, usable_bytes_of_device, usable_for_range,
};
use crate::store::stacked::{
    BACKEND_CONTEXT_PREFIX, BACKEND_PARAMETER_PREFIX, CONTEXT_SOURCE_VOLUME, backend_context,
    split_parameters,
};
use crate::store::{StoreError, VolumeParams};

#[derive(Debug, thiserror::Error)]
pub enum StackedError {
    #[error(transparent)]
    Backend(#[from] BackendCallError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    InvalidArgument(String),
}

impl Classify for StackedError {
    fn kind(&self) -> Kind {
        match self {
            StackedError::Backend(e) => e.kind(),
            StackedError::Store(e) => e.kind(),
            StackedError::InvalidArgument(_) => Kind::InvalidArgument,
        }
    }
}

/// The RPCs a stacked sealcsi can forward (advertised where the backend has them too).
pub const FORWARDED: &[ControllerCap] = &[
    ControllerCap::CreateDeleteVolume,
    ControllerCap::PublishUnpublishVolume,
    ControllerCap::GetCapacity,
    ControllerCap::CreateDeleteSnapshot,
    ControllerCap::CloneVolume,
    ControllerCap::ExpandVolume,
    ControllerCap::SingleNodeMultiWriter,
];

/// A CreateVolume in core terms.
#[derive(Debug, Clone)]
pub struct StackedCreate {
    pub name: String,
    pub required_bytes: u64,
    pub limit_bytes: u64,
    pub parameters: HashMap<String, String>,
    pub secrets: Secrets,
    pub mode: AccessMode,
    /// The filesystem the CO will stage it with, where it matters for the minimum size (xfs).
    pub fs: Option<FsKind>,
    /// Whether any capability is a Mount (the volume may get a filesystem).
    pub filesystem: bool,
    pub topology: Option<TopologyRequirement>,
    pub source: Option<ContentSource>,
}

/// A stacked volume as the CO sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StackedVolume {
    pub id: String,
    pub capacity_bytes: u64,
    pub context: HashMap<String, String>,
    pub topology: Vec<Topology>,
    pub source: Option<ContentSource>,
}

/// A snapshot as the CO sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StackedSnapshot {
    pub id: String,
    pub source_volume_id: String,
    pub size_bytes: u64,
    pub created: Option<(i64, i32)>,
    pub ready: bool,
}

/// The controller core over a backend driver.
#[derive(Debug)]
pub struct StackedProvisioner {
    backend: Arc<dyn CsiBackend>,
    caps: Capabilities,
}

impl StackedProvisioner {
    /// Asks the backend what it can do (its capabilities decide what sealcsi advertises).
    pub fn new(backend: Arc<dyn CsiBackend>) -> Result<Self, StackedError> {
        let caps = backend.capabilities()?;
        if !caps.controller.contains(&ControllerCap::CreateDeleteVolume) {
            return Err(StackedError::InvalidArgument(format!(
                "backend {} does not create volumes (no CREATE_DELETE_VOLUME): nothing to stack over",
                backend.name()
            )));
        }
        Ok(Self { backend, caps })
    }

    pub fn backend(&self) -> &Arc<dyn CsiBackend> {
        &self.backend
    }

    /// The controller RPCs to advertise: what sealcsi forwards and the backend has.
    pub fn capabilities(&self) -> Vec<ControllerCap> {
        FORWARDED
            .iter()
            .copied()
            .filter(|c| self.caps.controller.contains(c))
            .collect()
    }

    pub fn has(&self, cap: ControllerCap) -> bool {
        self.capabilities().contains(&cap)
    }

    /// Creates (or finds, the backend being idempotent by name) a volume.
    pub fn create(&self, req: StackedCreate) -> Result<StackedVolume, StackedError> {
        let split = split_parameters(&req.parameters)?;
        let params = split.sealcsi;
        params.check_filesystem_use(req.filesystem)?;
        let usable = usable_for_range(params, req.fs, req.required_bytes, req.limit_bytes)?;
        let device = device_bytes_for_usable(params, usable);
        let device_limit = if req.limit_bytes == 0 {
            0
        } else {
            device_bytes_for_usable(params, req.limit_bytes).max(device)
        };
        let provenance = match &req.source {
            None => None,
            Some(ContentSource::Volume(v)) => Some(v.clone()),
            Some(ContentSource::Snapshot(s)) => Some(self.snapshot_source(s)?),
        };
        let v = self.backend.create_volume(&CreateRequest {
            name: req.name.clone(),
            required_bytes: device,
            limit_bytes: device_limit,
            mode: req.mode,
            parameters: split.backend,
            secrets: req.secrets.clone(),
            topology: req.topology.clone(),
            source: req.source.clone(),
        })?;
        let mut capacity = usable_bytes_of_device(params, v.capacity_bytes).max(usable);
        if req.limit_bytes != 0 {
            capacity = capacity.min(req.limit_bytes);
        }
        let mut context = params.to_map();
        for (k, val) in &v.context {
            context.insert(format!("{BACKEND_CONTEXT_PREFIX}{k}"), val.clone());
        }
        if let Some(source) = provenance {
            context.insert(CONTEXT_SOURCE_VOLUME.into(), source);
        }
        tracing::info!(volume.id = %v.id, bytes = capacity, backend.bytes = v.capacity_bytes, "created stacked volume");
        Ok(StackedVolume {
            id: v.id,
            capacity_bytes: capacity,
            context,
            topology: v.topology,
            source: req.source,
        })
    }

    /// The volume a backend snapshot was taken from (its header's binding names that volume).
    fn snapshot_source(&self, snapshot_id: &str) -> Result<String, StackedError> {
        Ok(self.backend.snapshot_source(snapshot_id)?)
    }

    pub fn delete(&self, volume_id: &str, secrets: &Secrets) -> Result<(), StackedError> {
        Ok(self.backend.delete_volume(volume_id, secrets)?)
    }

    pub fn publish(
        &self,
        volume_id: &str,
        node_id: &str,
        mode: AccessMode,
        readonly: bool,
        context: &HashMap<String, String>,
        secrets: &Secrets,
    ) -> Result<Map, StackedError> {
        Ok(self.backend.controller_publish(
            volume_id,
            node_id,
            mode,
            readonly,
            &backend_context(context),
            secrets,
        )?)
    }

    pub fn unpublish(
        &self,
        volume_id: &str,
        node_id: &str,
        secrets: &Secrets,
    ) -> Result<(), StackedError> {
        Ok(self
            .backend
            .controller_unpublish(volume_id, node_id, secrets)?)
    }

    /// Grows the backend volume so the sealed volume can grow to the range; returns the usable size
    /// (the stack and the filesystem grow on the node).
    pub fn expand(
        &self,
        volume_id: &str,
        required_bytes: u64,
        limit_bytes: u64,
        mode: AccessMode,
        secrets: &Secrets,
    ) -> Result<u64, StackedError> {
        let bound = VolumeParams::default();
        let device = device_bytes_for_usable(bound, required_bytes);
        let device_limit = if limit_bytes == 0 {
            0
        } else {
            device_bytes_for_usable(bound, limit_bytes).max(device)
        };
        let got = self
            .backend
            .controller_expand(volume_id, device, device_limit, mode, secrets)?;
        let usable = usable_bytes_of_device(bound, got).max(required_bytes);
        Ok(if limit_bytes == 0 {
            usable
        } else {
            usable.min(limit_bytes)
        })
    }

    /// What the backend can still give, as usable sealed bytes: (available, maximum, minimum).
    pub fn capacity(
        &self,
        parameters: &HashMap<String, String>,
        mode: Option<AccessMode>,
        fs: Option<FsKind>,
        topology: Option<&Topology>,
    ) -> Result<(u64, Option<u64>, u64), StackedError> {
        let split = split_parameters(parameters)?;
        let c = self.backend.get_capacity(mode, &split.backend, topology)?;
        let usable = |n| usable_bytes_of_device(split.sealcsi, n);
        let min = min_usable_bytes(split.sealcsi, fs);
        Ok((usable(c.available), c.maximum.map(usable), min))
    }

    pub fn create_snapshot(
        &self,
        source_volume_id: &str,
        name: &str,
        parameters: &HashMap<String, String>,
        secrets: &Secrets,
    ) -> Result<StackedSnapshot, StackedError> {
        let backend: Map = parameters
            .iter()
            .map(|(k, v)| {
                (
                    k.strip_prefix(BACKEND_PARAMETER_PREFIX)
                        .unwrap_or(k)
                        .to_string(),
                    v.clone(),
                )
            })
            .collect();
        let s = self
            .backend
            .create_snapshot(source_volume_id, name, &backend, secrets)?;
        Ok(StackedSnapshot {
            id: s.id,
            source_volume_id: s.source_volume_id,
            size_bytes: usable_bytes_of_device(VolumeParams::default(), s.size_bytes),
            created: s.created,
            ready: s.ready,
        })
    }

    pub fn delete_snapshot(
        &self,
        snapshot_id: &str,
        secrets: &Secrets,
    ) -> Result<(), StackedError> {
        Ok(self.backend.delete_snapshot(snapshot_id, secrets)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::csi::MemoryBackend;
    use crate::header::Integrity;

    fn provisioner() -> (tempfile::TempDir, Arc<MemoryBackend>, StackedProvisioner) {
        let d = tempfile::tempdir().unwrap();
        let b = Arc::new(MemoryBackend::new(d.path(), "n1", "z1"));
        let p = StackedProvisioner::new(b.clone()).unwrap();
        (d, b, p)
    }

    fn create(name: &str, required: u64, params: &[(&str, &str)]) -> StackedCreate {
        StackedCreate {
            name: name.into(),
            required_bytes: required,
            limit_bytes: 0,
            parameters: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            secrets: Secrets::default(),
            mode: AccessMode::SingleNodeWriter,
            fs: None,
            filesystem: true,
            topology: None,
            source: None,
        }
    }

    use crate::store::stacked::sealcsi_context;

    #[test]
    fn a_filesystem_volume_in_direct_mode_is_refused_before_the_backend_is_asked() {
        let (_d, b, p) = provisioner();
        let err = p
            .create(create("pvc-d", 64 << 20, &[("journal", "direct")]))
            .unwrap_err();
        assert_eq!(err.kind(), Kind::InvalidArgument);
        assert!(err.to_string().contains("raw block volumes only"), "{err}");
        let block = StackedCreate {
            filesystem: false,
            ..create("pvc-d", 64 << 20, &[("journal", "direct")])
        };
        p.create(block).unwrap();
        let creates = b.calls().iter().filter(|c| **c == "CreateVolume").count();
        assert_eq!(creates, 1, "only the block volume reached the backend");
    }

    #[test]
    fn parameters_split_between_sealcsi_and_the_backend() {
        let p: HashMap<String, String> = [
            ("integrity", "none"),
            ("backend.type", "gp3"),
            ("csi.storage.k8s.io/pvc/name", "data"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let s = split_parameters(&p).unwrap();
        assert_eq!(s.sealcsi.integrity, Integrity::None);
        assert_eq!(s.backend["type"], "gp3");
        assert_eq!(s.backend["csi.storage.k8s.io/pvc/name"], "data");
        assert_eq!(s.backend.len(), 2);
        let bad: HashMap<String, String> = [("type".to_string(), "gp3".to_string())].into();
        assert_eq!(
            split_parameters(&bad).unwrap_err().kind(),
            Kind::InvalidArgument
        );
    }

    #[test]
    fn create_grows_the_backend_volume_by_the_overhead_and_keeps_its_id() {
        let (_d, b, p) = provisioner();
        let v = p
            .create(create("pvc-1", 100 << 20, &[("backend.tier", "fast")]))
            .unwrap();
        assert_eq!(v.id, "mem-pvc-1");
        assert!(v.capacity_bytes >= 100 << 20);
        let device = std::fs::metadata(b.file(&v.id)).unwrap().len();
        assert_eq!(
            device,
            device_bytes_for_usable(VolumeParams::default(), 100 << 20)
        );
        assert!(usable_bytes_of_device(VolumeParams::default(), device) >= 100 << 20);
        assert_eq!(b.parameters(&v.id).unwrap()["tier"], "fast");
        assert_eq!(v.context["integrity"], "hmac-sha256");
        assert!(v.context.contains_key("backend.memory/file"));
        assert_eq!(v.topology[0]["topology.memory.test/zone"], "z1");
        assert_eq!(
            sealcsi_context(&v.context).unwrap(),
            VolumeParams::default()
        );
        assert!(backend_context(&v.context).contains_key("memory/file"));
    }

    #[test]
    fn backend_errors_keep_their_code() {
        let (_d, b, p) = provisioner();
        b.fail("CreateVolume", crate::backend::csi::Code::ResourceExhausted);
        let e = p.create(create("pvc-2", 0, &[])).unwrap_err();
        assert_eq!(e.kind(), Kind::ResourceExhausted);
        assert!(e.to_string().contains("backend CSI driver memory"), "{e}");
    }

    #[test]
    fn clones_and_restores_record_their_provenance() {
        let (_d, _b, p) = provisioner();
        let src = p.create(create("src", 64 << 20, &[])).unwrap();
        let mut c = create("clone", 64 << 20, &[]);
        c.source = Some(ContentSource::Volume(src.id.clone()));
        let clone = p.create(c).unwrap();
        assert_eq!(clone.context[CONTEXT_SOURCE_VOLUME], src.id);
        let snap = p
            .create_snapshot(&src.id, "s1", &HashMap::new(), &Secrets::default())
            .unwrap();
        let mut r = create("restored", 64 << 20, &[]);
        r.source = Some(ContentSource::Snapshot(snap.id.clone()));
        let restored = p.create(r).unwrap();
        assert_eq!(restored.context[CONTEXT_SOURCE_VOLUME], src.id);
    }

    #[test]
    fn capacity_and_expansion_account_for_the_overhead() {
        let (_d, b, p) = provisioner();
        let (avail, _, _) = p.capacity(&HashMap::new(), None, None, None).unwrap();
        assert!(avail < 100 << 30 && avail > 95 << 30, "{avail}");
        let v = p.create(create("e", 64 << 20, &[])).unwrap();
        let got = p
            .expand(
                &v.id,
                200 << 20,
                0,
                AccessMode::SingleNodeWriter,
                &Secrets::default(),
            )
            .unwrap();
        assert!(got >= 200 << 20);
        let device = std::fs::metadata(b.file(&v.id)).unwrap().len();
        assert!(usable_bytes_of_device(VolumeParams::default(), device) >= 200 << 20);
    }
}
