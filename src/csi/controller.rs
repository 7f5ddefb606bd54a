//! The Controller service over [`Provisioner`]: create, delete, list, capacity, expand (not advertised,
//! see [`CAPABILITIES`]), get and validate node-local sealed volumes. Snapshots, ControllerPublish and ModifyVolume are UNIMPLEMENTED.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::convert::{self, CapabilityError, bytes, required};
use super::proto::controller_service_capability::{Rpc, Type as CapType, rpc::Type as RpcType};
use super::proto::{self, controller_server::Controller};
use super::{Shared, blocking, status};
use crate::controller::{Created, Provisioner};
use crate::header::Journal;
use crate::node::capability::{AccessType, stage_fs, wants_filesystem};
use crate::store::sizing::min_usable_bytes;
use crate::store::{StoreError, VolumeId, VolumeInfo, VolumeParams};
use crate::volume::DIRECT_FILESYSTEM_REFUSED;

pub struct ControllerService {
    shared: Arc<Shared>,
}

/// The RPCs the controller advertises.
///
/// Not EXPAND_VOLUME, although ControllerExpandVolume works for a volume of this node: every node runs
/// its own csi-resizer, which has no per-node mode. Its leader election makes one resizer in the cluster
/// handle every claim, and its ControllerExpandVolume would land on the leader's plugin, which does not
/// hold the volumes of other nodes (NotFound, resize marked infeasible). Without the capability,
/// Kubernetes expands node-only: the resizer just records the new size in the PV, and the kubelet of the
/// volume's node calls NodeExpandVolume, which grows the backing file itself.
pub const CAPABILITIES: &[RpcType] = &[
    RpcType::CreateDeleteVolume,
    RpcType::ListVolumes,
    RpcType::GetCapacity,
    RpcType::GetVolume,
    RpcType::VolumeCondition,
    RpcType::SingleNodeMultiWriter,
];

impl ControllerService {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    fn provisioner(&self) -> Arc<Provisioner> {
        self.shared
            .provisioner
            .clone()
            .expect("the controller service runs only with a provisioner")
    }

    fn volume(&self, v: &VolumeInfo) -> proto::Volume {
        proto::Volume {
            capacity_bytes: bytes(v.capacity_bytes),
            volume_id: v.id().to_string(),
            volume_context: v.record.parameters.to_map(),
            content_source: None,
            accessible_topology: vec![convert::topology(&self.shared.config.node_id)],
        }
    }

    /// Whether `topology` (if given) names this node.
    fn is_this_node(&self, topology: &proto::Topology) -> bool {
        topology
            .segments
            .get(super::TOPOLOGY_KEY)
            .is_some_and(|n| *n == self.shared.config.node_id)
    }

    async fn create(
        &self,
        req: proto::CreateVolumeRequest,
    ) -> Result<Response<proto::CreateVolumeResponse>, Status> {
        if req.volume_capabilities.is_empty() {
            return Err(status::invalid_argument("volume_capabilities is required"));
        }
        let mut caps = Vec::with_capacity(req.volume_capabilities.len());
        for cap in &req.volume_capabilities {
            caps.push(convert::capability(cap).map_err(|e| status::invalid_argument(e.message()))?);
        }
        let fs = stage_fs(&caps);
        if req.volume_content_source.is_some() {
            return Err(status::invalid_argument(
                "volume_content_source is not supported: sealcsi creates empty volumes only (no snapshots, no clones)",
            ));
        }
        if !req.mutable_parameters.is_empty() {
            return Err(status::invalid_argument(
                "mutable_parameters are not supported",
            ));
        }
        let params = VolumeParams::parse(&req.parameters).map_err(|e| status::from_error(&e))?;
        params
            .check_filesystem_use(wants_filesystem(&caps))
            .map_err(|e| status::from_error(&e))?;
        if let Some(reqs) = &req.accessibility_requirements
            && !reqs.requisite.is_empty()
            && !reqs.requisite.iter().any(|t| self.is_this_node(t))
        {
            return Err(status::from_error(&StoreError::ResourceExhausted(format!(
                "volumes of this plugin live on node {}, which is not in the requisite topology",
                self.shared.config.node_id
            ))));
        }
        let (required_bytes, limit_bytes) = convert::range(req.capacity_range.as_ref())?;
        let id = VolumeId::for_name(&req.name);
        let guard = self
            .shared
            .guards
            .try_acquire(id.as_str())
            .map_err(|e| status::from_error(&e))?;
        let provisioner = self.provisioner();
        let name = req.name.clone();
        let created = blocking(move || {
            let _guard = guard;
            provisioner
                .create(&name, required_bytes, limit_bytes, params, fs)
                .map_err(|e| status::from_error(&e))
        })
        .await?;
        if let Created::Existing(_) = created {
            tracing::info!("volume already existed (idempotent create)");
        }
        Ok(Response::new(proto::CreateVolumeResponse {
            volume: Some(self.volume(created.info())),
        }))
    }

    async fn delete(
        &self,
        volume_id: String,
    ) -> Result<Response<proto::DeleteVolumeResponse>, Status> {
        // An id of a shape this plugin never makes names no volume here: deleting it is done.
        let Some(volume_id) = VolumeId::parse(&volume_id) else {
            return Ok(Response::new(proto::DeleteVolumeResponse {}));
        };
        let guard = self
            .shared
            .guards
            .try_acquire(volume_id.as_str())
            .map_err(|e| status::from_error(&e))?;
        let provisioner = self.provisioner();
        blocking(move || {
            let _guard = guard;
            provisioner
                .delete(&volume_id)
                .map_err(|e| status::from_error(&e))
        })
        .await?;
        Ok(Response::new(proto::DeleteVolumeResponse {}))
    }

    async fn validate(
        &self,
        req: proto::ValidateVolumeCapabilitiesRequest,
    ) -> Result<Response<proto::ValidateVolumeCapabilitiesResponse>, Status> {
        if req.volume_capabilities.is_empty() {
            return Err(status::invalid_argument("volume_capabilities is required"));
        }
        let provisioner = self.provisioner();
        let id = convert::volume_id(&req.volume_id)?;
        let vol = blocking(move || {
            provisioner
                .store()
                .get(&id)
                .map_err(|e| status::from_error(&e))
        })
        .await?;
        let refuse = |message: String| {
            Ok(Response::new(proto::ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message,
            }))
        };
        for cap in &req.volume_capabilities {
            match convert::capability(cap) {
                Ok(c)
                    if matches!(c.access, AccessType::Mount { .. })
                        && vol.record.parameters.profile().journal() == Some(Journal::Direct) =>
                {
                    return refuse(DIRECT_FILESYSTEM_REFUSED.into());
                }
                Ok(_) => {}
                Err(CapabilityError::Invalid(m)) => return Err(status::invalid_argument(m)),
                Err(CapabilityError::Unsupported(m)) => return refuse(m),
            }
        }
        if !req.parameters.is_empty() {
            match VolumeParams::parse(&req.parameters) {
                Ok(p) if p == vol.record.parameters => {}
                Ok(_) => return refuse("the parameters differ from the volume's".into()),
                Err(e) => return refuse(e.to_string()),
            }
        }
        if !req.mutable_parameters.is_empty() {
            return refuse("mutable_parameters are not supported".into());
        }
        Ok(Response::new(proto::ValidateVolumeCapabilitiesResponse {
            confirmed: Some(proto::validate_volume_capabilities_response::Confirmed {
                volume_context: req.volume_context,
                volume_capabilities: req.volume_capabilities,
                parameters: req.parameters,
                mutable_parameters: req.mutable_parameters,
            }),
            message: String::new(),
        }))
    }

    async fn list(
        &self,
        req: proto::ListVolumesRequest,
    ) -> Result<Response<proto::ListVolumesResponse>, Status> {
        let max = usize::try_from(req.max_entries)
            .map_err(|_| status::invalid_argument("max_entries is negative"))?;
        let provisioner = self.provisioner();
        let token = req.starting_token;
        let page = blocking(move || {
            let page = provisioner
                .list(max, &token)
                .map_err(|e| status::from_error(&e))?;
            let conditions: Vec<_> = page
                .volumes
                .iter()
                .map(|v| provisioner.condition(v))
                .collect();
            Ok((page, conditions))
        })
        .await?;
        let (page, conditions) = page;
        let entries = page
            .volumes
            .iter()
            .zip(&conditions)
            .map(|(v, c)| proto::list_volumes_response::Entry {
                volume: Some(self.volume(v)),
                status: Some(proto::list_volumes_response::VolumeStatus {
                    published_node_ids: Vec::new(),
                    volume_condition: Some(convert::condition(c)),
                }),
            })
            .collect();
        Ok(Response::new(proto::ListVolumesResponse {
            entries,
            next_token: page.next_token,
        }))
    }

    async fn capacity(
        &self,
        req: proto::GetCapacityRequest,
    ) -> Result<Response<proto::GetCapacityResponse>, Status> {
        let params = VolumeParams::parse(&req.parameters).map_err(|e| status::from_error(&e))?;
        let none = || {
            Ok(Response::new(proto::GetCapacityResponse {
                available_capacity: 0,
                maximum_volume_size: None,
                minimum_volume_size: None,
            }))
        };
        let mut caps = Vec::with_capacity(req.volume_capabilities.len());
        for cap in &req.volume_capabilities {
            match convert::capability(cap) {
                Ok(c) => caps.push(c),
                Err(CapabilityError::Invalid(m)) => return Err(status::invalid_argument(m)),
                Err(CapabilityError::Unsupported(_)) => return none(),
            }
        }
        let min = min_usable_bytes(params, stage_fs(&caps));
        if let Some(t) = &req.accessible_topology
            && !self.is_this_node(t)
        {
            return none();
        }
        let provisioner = self.provisioner();
        // Usable bytes, as a claim's size is: what the largest new volume would offer.
        let free = blocking(move || {
            provisioner
                .capacity(params)
                .map_err(|e| status::from_error(&e))
        })
        .await?;
        Ok(Response::new(proto::GetCapacityResponse {
            available_capacity: bytes(free),
            maximum_volume_size: Some(bytes(free)),
            minimum_volume_size: Some(bytes(min)),
        }))
    }

    async fn expand(
        &self,
        req: proto::ControllerExpandVolumeRequest,
    ) -> Result<Response<proto::ControllerExpandVolumeResponse>, Status> {
        let range = req
            .capacity_range
            .as_ref()
            .ok_or_else(|| status::invalid_argument("capacity_range is required"))?;
        let (required_bytes, limit_bytes) = convert::range(Some(range))?;
        if let Some(cap) = &req.volume_capability {
            convert::capability(cap).map_err(|e| status::invalid_argument(e.message()))?;
        }
        let id = convert::volume_id(&req.volume_id)?;
        let guard = self
            .shared
            .guards
            .try_acquire(id.as_str())
            .map_err(|e| status::from_error(&e))?;
        let provisioner = self.provisioner();
        let size = blocking(move || {
            let _guard = guard;
            provisioner
                .expand(&id, required_bytes, limit_bytes)
                .map_err(|e| status::from_error(&e))
        })
        .await?;
        Ok(Response::new(proto::ControllerExpandVolumeResponse {
            capacity_bytes: bytes(size),
            // The open mapping and the filesystem grow on the node (NodeExpandVolume).
            node_expansion_required: true,
        }))
    }

    async fn get(
        &self,
        volume_id: String,
    ) -> Result<Response<proto::ControllerGetVolumeResponse>, Status> {
        let volume_id = convert::volume_id(&volume_id)?;
        let provisioner = self.provisioner();
        let (vol, condition) = blocking(move || {
            let vol = provisioner
                .store()
                .get(&volume_id)
                .map_err(|e| status::from_error(&e))?;
            let condition = provisioner.condition(&vol);
            Ok((vol, condition))
        })
        .await?;
        Ok(Response::new(proto::ControllerGetVolumeResponse {
            volume: Some(self.volume(&vol)),
            status: Some(proto::controller_get_volume_response::VolumeStatus {
                published_node_ids: Vec::new(),
                volume_condition: Some(convert::condition(&condition)),
            }),
        }))
    }
}

fn span(rpc: &'static str, volume_id: &str) -> tracing::Span {
    tracing::info_span!("csi", rpc, volume.id = %volume_id)
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(
        &self,
        request: Request<proto::CreateVolumeRequest>,
    ) -> Result<Response<proto::CreateVolumeResponse>, Status> {
        let req = request.into_inner();
        required(&req.name, "name")?;
        let span = tracing::info_span!("csi", rpc = "CreateVolume", volume.id = %VolumeId::for_name(&req.name), volume.name = %req.name);
        self.create(req).instrument(span).await
    }

    async fn delete_volume(
        &self,
        request: Request<proto::DeleteVolumeRequest>,
    ) -> Result<Response<proto::DeleteVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = required(&req.volume_id, "volume_id")?.to_string();
        let span = span("DeleteVolume", &id);
        self.delete(id).instrument(span).await
    }

    async fn controller_publish_volume(
        &self,
        _request: Request<proto::ControllerPublishVolumeRequest>,
    ) -> Result<Response<proto::ControllerPublishVolumeResponse>, Status> {
        Err(status::unimplemented("ControllerPublishVolume"))
    }

    async fn controller_unpublish_volume(
        &self,
        _request: Request<proto::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<proto::ControllerUnpublishVolumeResponse>, Status> {
        Err(status::unimplemented("ControllerUnpublishVolume"))
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<proto::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<proto::ValidateVolumeCapabilitiesResponse>, Status> {
        let req = request.into_inner();
        let span = span(
            "ValidateVolumeCapabilities",
            required(&req.volume_id, "volume_id")?,
        );
        self.validate(req).instrument(span).await
    }

    async fn list_volumes(
        &self,
        request: Request<proto::ListVolumesRequest>,
    ) -> Result<Response<proto::ListVolumesResponse>, Status> {
        let span = tracing::info_span!("csi", rpc = "ListVolumes");
        self.list(request.into_inner()).instrument(span).await
    }

    async fn get_capacity(
        &self,
        request: Request<proto::GetCapacityRequest>,
    ) -> Result<Response<proto::GetCapacityResponse>, Status> {
        let span = tracing::info_span!("csi", rpc = "GetCapacity");
        self.capacity(request.into_inner()).instrument(span).await
    }

    async fn controller_get_capabilities(
        &self,
        _request: Request<proto::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<proto::ControllerGetCapabilitiesResponse>, Status> {
        let capabilities = CAPABILITIES
            .iter()
            .map(|t| proto::ControllerServiceCapability {
                r#type: Some(CapType::Rpc(Rpc { r#type: *t as i32 })),
            })
            .collect();
        Ok(Response::new(proto::ControllerGetCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn create_snapshot(
        &self,
        _request: Request<proto::CreateSnapshotRequest>,
    ) -> Result<Response<proto::CreateSnapshotResponse>, Status> {
        Err(status::unimplemented("CreateSnapshot"))
    }

    async fn delete_snapshot(
        &self,
        _request: Request<proto::DeleteSnapshotRequest>,
    ) -> Result<Response<proto::DeleteSnapshotResponse>, Status> {
        Err(status::unimplemented("DeleteSnapshot"))
    }

    async fn list_snapshots(
        &self,
        _request: Request<proto::ListSnapshotsRequest>,
    ) -> Result<Response<proto::ListSnapshotsResponse>, Status> {
        Err(status::unimplemented("ListSnapshots"))
    }

    async fn get_snapshot(
        &self,
        _request: Request<proto::GetSnapshotRequest>,
    ) -> Result<Response<proto::GetSnapshotResponse>, Status> {
        Err(status::unimplemented("GetSnapshot"))
    }

    async fn controller_expand_volume(
        &self,
        request: Request<proto::ControllerExpandVolumeRequest>,
    ) -> Result<Response<proto::ControllerExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        let span = span(
            "ControllerExpandVolume",
            required(&req.volume_id, "volume_id")?,
        );
        self.expand(req).instrument(span).await
    }

    async fn controller_get_volume(
        &self,
        request: Request<proto::ControllerGetVolumeRequest>,
    ) -> Result<Response<proto::ControllerGetVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = required(&req.volume_id, "volume_id")?.to_string();
        let span = span("ControllerGetVolume", &id);
        self.get(id).instrument(span).await
    }

    async fn controller_modify_volume(
        &self,
        _request: Request<proto::ControllerModifyVolumeRequest>,
    ) -> Result<Response<proto::ControllerModifyVolumeResponse>, Status> {
        Err(status::unimplemented("ControllerModifyVolume"))
    }
}
