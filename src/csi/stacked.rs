//! The Controller service of a stacked sealcsi (`--backend csi:...`) over
//! [`StackedProvisioner`]: thin handlers that check the request's shape, take the per-volume guard and
//! call the core on a blocking thread. What is not advertised (listing, GetVolume, snapshots and clones,
//! ModifyVolume) is UNIMPLEMENTED.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::convert::{self, bytes, required, required_capability};
use super::proto::controller_service_capability::{Rpc, Type as CapType, rpc::Type as RpcType};
use super::proto::{self, controller_server::Controller};
use super::{Shared, blocking, status};
use crate::backend::csi::{ContentSource, ControllerCap, Secrets, Topology, TopologyRequirement};
use crate::controller::stacked::{StackedCreate, StackedProvisioner, StackedVolume};
use crate::node::capability::{AccessMode, Capability, stage_fs, wants_filesystem};

pub struct StackedControllerService {
    shared: Arc<Shared>,
}

fn rpc_type(cap: ControllerCap) -> RpcType {
    match cap {
        ControllerCap::CreateDeleteVolume => RpcType::CreateDeleteVolume,
        ControllerCap::PublishUnpublishVolume => RpcType::PublishUnpublishVolume,
        ControllerCap::GetCapacity => RpcType::GetCapacity,
        ControllerCap::CreateDeleteSnapshot => RpcType::CreateDeleteSnapshot,
        ControllerCap::CloneVolume => RpcType::CloneVolume,
        ControllerCap::ExpandVolume => RpcType::ExpandVolume,
        ControllerCap::SingleNodeMultiWriter => RpcType::SingleNodeMultiWriter,
    }
}

fn topology(t: &proto::Topology) -> Topology {
    t.segments
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn proto_topology(t: &Topology) -> proto::Topology {
    proto::Topology {
        segments: t.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
    }
}

fn secrets(map: &std::collections::HashMap<String, String>) -> Secrets {
    Secrets::new(map.iter().map(|(k, v)| (k.clone(), v.clone())))
}

fn content_source(s: &proto::VolumeContentSource) -> Result<ContentSource, Status> {
    use proto::volume_content_source::Type;
    match &s.r#type {
        Some(Type::Snapshot(s)) => Ok(ContentSource::Snapshot(
            required(&s.snapshot_id, "volume_content_source.snapshot.snapshot_id")?.into(),
        )),
        Some(Type::Volume(v)) => Ok(ContentSource::Volume(
            required(&v.volume_id, "volume_content_source.volume.volume_id")?.into(),
        )),
        None => Err(status::invalid_argument(
            "volume_content_source names neither a snapshot nor a volume",
        )),
    }
}

fn proto_source(s: &ContentSource) -> proto::VolumeContentSource {
    use proto::volume_content_source::{SnapshotSource, Type, VolumeSource};
    proto::VolumeContentSource {
        r#type: Some(match s {
            ContentSource::Snapshot(id) => Type::Snapshot(SnapshotSource {
                snapshot_id: id.clone(),
            }),
            ContentSource::Volume(id) => Type::Volume(VolumeSource {
                volume_id: id.clone(),
            }),
        }),
    }
}

fn volume(v: &StackedVolume) -> proto::Volume {
    proto::Volume {
        capacity_bytes: bytes(v.capacity_bytes),
        volume_id: v.id.clone(),
        volume_context: v.context.clone(),
        content_source: v.source.as_ref().map(proto_source),
        accessible_topology: v.topology.iter().map(proto_topology).collect(),
    }
}

/// The capabilities of a request in core terms (INVALID_ARGUMENT if any is unusable).
fn capabilities(caps: &[proto::VolumeCapability]) -> Result<Vec<Capability>, Status> {
    caps.iter()
        .map(|c| convert::capability(c).map_err(|e| status::invalid_argument(e.message())))
        .collect()
}

/// The access mode the backend volume is asked for: the first capability's (they are all single-node).
fn mode_of(caps: &[Capability]) -> AccessMode {
    caps.first()
        .map_or(AccessMode::SingleNodeWriter, |c| c.mode)
}

fn span(rpc: &'static str, volume_id: &str) -> tracing::Span {
    tracing::info_span!("csi", rpc, volume.id = %volume_id, stacked = true)
}

impl StackedControllerService {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    fn core(&self) -> Arc<StackedProvisioner> {
        self.shared
            .stacked
            .clone()
            .expect("the stacked controller runs only with a stacked provisioner")
    }

    fn require(&self, cap: ControllerCap, rpc: &str) -> Result<(), Status> {
        if self.core().has(cap) {
            Ok(())
        } else {
            Err(Status::unimplemented(format!(
                "{rpc}: the backend driver does not offer it"
            )))
        }
    }

    /// Runs `op` on the core under the guard of `key`, on a blocking thread.
    async fn guarded<T, F>(&self, key: &str, op: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&StackedProvisioner) -> Result<T, crate::controller::stacked::StackedError>
            + Send
            + 'static,
    {
        super::guarded(&self.shared.guards, key, self.core(), op).await
    }
}

#[tonic::async_trait]
impl Controller for StackedControllerService {
    async fn create_volume(
        &self,
        request: Request<proto::CreateVolumeRequest>,
    ) -> Result<Response<proto::CreateVolumeResponse>, Status> {
        let req = request.into_inner();
        let name = required(&req.name, "name")?.to_string();
        let span =
            tracing::info_span!("csi", rpc = "CreateVolume", volume.name = %name, stacked = true);
        async {
            if req.volume_capabilities.is_empty() {
                return Err(status::invalid_argument("volume_capabilities is required"));
            }
            let caps = capabilities(&req.volume_capabilities)?;
            if !req.mutable_parameters.is_empty() {
                return Err(status::invalid_argument(
                    "mutable_parameters are not supported",
                ));
            }
            let source = match &req.volume_content_source {
                Some(s) => {
                    let s = content_source(s)?;
                    let cap = match s {
                        ContentSource::Snapshot(_) => ControllerCap::CreateDeleteSnapshot,
                        ContentSource::Volume(_) => ControllerCap::CloneVolume,
                    };
                    self.require(cap, "CreateVolume from a content source")?;
                    Some(s)
                }
                None => None,
            };
            let (required_bytes, limit_bytes) = convert::range(req.capacity_range.as_ref())?;
            let create = StackedCreate {
                name: name.clone(),
                required_bytes,
                limit_bytes,
                parameters: req.parameters.clone(),
                secrets: secrets(&req.secrets),
                mode: mode_of(&caps),
                fs: stage_fs(&caps),
                filesystem: wants_filesystem(&caps),
                topology: req
                    .accessibility_requirements
                    .as_ref()
                    .map(|t| TopologyRequirement {
                        requisite: t.requisite.iter().map(topology).collect(),
                        preferred: t.preferred.iter().map(topology).collect(),
                    }),
                source,
            };
            let v = self
                .guarded(&format!("name:{name}"), move |core| core.create(create))
                .await?;
            Ok(Response::new(proto::CreateVolumeResponse {
                volume: Some(volume(&v)),
            }))
        }
        .instrument(span)
        .await
    }

    async fn delete_volume(
        &self,
        request: Request<proto::DeleteVolumeRequest>,
    ) -> Result<Response<proto::DeleteVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = required(&req.volume_id, "volume_id")?.to_string();
        let s = secrets(&req.secrets);
        let key = id.clone();
        // In `--mode all` the node core is in this process and shares its state directory: the
        // deleted volume's node record goes with it (docs/stacked.md, "Node records").
        let node = self.shared.node.clone();
        self.guarded(&key, move |core| {
            core.delete(&id, &s)?;
            if let Some(node) = node
                && let Err(e) = node.forget_stacked(&id)
            {
                tracing::warn!(error = %e, "could not remove the node record of the deleted volume");
            }
            Ok(())
        })
        .instrument(span("DeleteVolume", &req.volume_id))
        .await?;
        Ok(Response::new(proto::DeleteVolumeResponse {}))
    }

    async fn controller_publish_volume(
        &self,
        request: Request<proto::ControllerPublishVolumeRequest>,
    ) -> Result<Response<proto::ControllerPublishVolumeResponse>, Status> {
        self.require(
            ControllerCap::PublishUnpublishVolume,
            "ControllerPublishVolume",
        )?;
        let req = request.into_inner();
        let id = required(&req.volume_id, "volume_id")?.to_string();
        let node = required(&req.node_id, "node_id")?.to_string();
        let cap = required_capability(req.volume_capability.as_ref())?;
        let (readonly, context, s) = (req.readonly, req.volume_context, secrets(&req.secrets));
        let key = id.clone();
        let publish_context = self
            .guarded(&key, move |core| {
                core.publish(&id, &node, cap.mode, readonly, &context, &s)
            })
            .instrument(span("ControllerPublishVolume", &req.volume_id))
            .await?;
        Ok(Response::new(proto::ControllerPublishVolumeResponse {
            publish_context: publish_context.into_iter().collect(),
        }))
    }

    async fn controller_unpublish_volume(
        &self,
        request: Request<proto::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<proto::ControllerUnpublishVolumeResponse>, Status> {
        self.require(
            ControllerCap::PublishUnpublishVolume,
            "ControllerUnpublishVolume",
        )?;
        let req = request.into_inner();
        let id = required(&req.volume_id, "volume_id")?.to_string();
        let (node, s) = (req.node_id, secrets(&req.secrets));
        let key = id.clone();
        self.guarded(&key, move |core| core.unpublish(&id, &node, &s))
            .instrument(span("ControllerUnpublishVolume", &req.volume_id))
            .await?;
        Ok(Response::new(proto::ControllerUnpublishVolumeResponse {}))
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<proto::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<proto::ValidateVolumeCapabilitiesResponse>, Status> {
        let req = request.into_inner();
        required(&req.volume_id, "volume_id")?;
        if req.volume_capabilities.is_empty() {
            return Err(status::invalid_argument("volume_capabilities is required"));
        }
        for cap in &req.volume_capabilities {
            if let Err(e) = convert::capability(cap) {
                return match e {
                    convert::CapabilityError::Invalid(m) => Err(status::invalid_argument(m)),
                    convert::CapabilityError::Unsupported(m) => {
                        Ok(Response::new(proto::ValidateVolumeCapabilitiesResponse {
                            confirmed: None,
                            message: m,
                        }))
                    }
                };
            }
        }
        // Whether the volume exists is the backend's to say: asking it with a BLOCK capability (what
        // sealcsi always uses) answers NOT_FOUND for an unknown id.
        let core = self.core();
        let id = req.volume_id.clone();
        let context = req.volume_context.clone();
        blocking(move || {
            core.backend()
                .validate_block(&id, &crate::store::stacked::backend_context(&context))
                .map_err(|e| status::from_error(&e))
        })
        .instrument(span("ValidateVolumeCapabilities", &req.volume_id))
        .await?;
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

    async fn list_volumes(
        &self,
        _request: Request<proto::ListVolumesRequest>,
    ) -> Result<Response<proto::ListVolumesResponse>, Status> {
        Err(status::unimplemented("ListVolumes (stacked)"))
    }

    async fn get_capacity(
        &self,
        request: Request<proto::GetCapacityRequest>,
    ) -> Result<Response<proto::GetCapacityResponse>, Status> {
        self.require(ControllerCap::GetCapacity, "GetCapacity")?;
        let req = request.into_inner();
        let caps = match capabilities(&req.volume_capabilities) {
            Ok(c) => c,
            Err(e) if e.code() == tonic::Code::InvalidArgument => {
                // A capability sealcsi cannot serve has no capacity here.
                return Ok(Response::new(proto::GetCapacityResponse {
                    available_capacity: 0,
                    maximum_volume_size: None,
                    minimum_volume_size: None,
                }));
            }
            Err(e) => return Err(e),
        };
        let mode = caps.first().map(|c| c.mode);
        let fs = stage_fs(&caps);
        let params = req.parameters;
        let t = req.accessible_topology.as_ref().map(topology);
        let core = self.core();
        let (available, maximum, minimum) = blocking(move || {
            core.capacity(&params, mode, fs, t.as_ref())
                .map_err(|e| status::from_error(&e))
        })
        .instrument(tracing::info_span!(
            "csi",
            rpc = "GetCapacity",
            stacked = true
        ))
        .await?;
        Ok(Response::new(proto::GetCapacityResponse {
            available_capacity: bytes(available),
            maximum_volume_size: maximum.map(bytes),
            minimum_volume_size: Some(bytes(minimum)),
        }))
    }

    async fn controller_get_capabilities(
        &self,
        _request: Request<proto::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<proto::ControllerGetCapabilitiesResponse>, Status> {
        let capabilities = self
            .core()
            .capabilities()
            .into_iter()
            .map(|c| proto::ControllerServiceCapability {
                r#type: Some(CapType::Rpc(Rpc {
                    r#type: rpc_type(c) as i32,
                })),
            })
            .collect();
        Ok(Response::new(proto::ControllerGetCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn create_snapshot(
        &self,
        request: Request<proto::CreateSnapshotRequest>,
    ) -> Result<Response<proto::CreateSnapshotResponse>, Status> {
        self.require(ControllerCap::CreateDeleteSnapshot, "CreateSnapshot")?;
        let req = request.into_inner();
        let source = required(&req.source_volume_id, "source_volume_id")?.to_string();
        let name = required(&req.name, "name")?.to_string();
        let (params, s) = (req.parameters, secrets(&req.secrets));
        let snap = self
            .guarded(&format!("snapshot:{name}"), move |core| {
                core.create_snapshot(&source, &name, &params, &s)
            })
            .instrument(span("CreateSnapshot", &req.source_volume_id))
            .await?;
        Ok(Response::new(proto::CreateSnapshotResponse {
            snapshot: Some(proto::Snapshot {
                size_bytes: bytes(snap.size_bytes),
                snapshot_id: snap.id,
                source_volume_id: snap.source_volume_id,
                creation_time: snap
                    .created
                    .map(|(seconds, nanos)| prost_types::Timestamp { seconds, nanos }),
                ready_to_use: snap.ready,
                group_snapshot_id: String::new(),
            }),
        }))
    }

    async fn delete_snapshot(
        &self,
        request: Request<proto::DeleteSnapshotRequest>,
    ) -> Result<Response<proto::DeleteSnapshotResponse>, Status> {
        self.require(ControllerCap::CreateDeleteSnapshot, "DeleteSnapshot")?;
        let req = request.into_inner();
        let id = required(&req.snapshot_id, "snapshot_id")?.to_string();
        let s = secrets(&req.secrets);
        self.guarded(&format!("snapshot-id:{id}"), move |core| {
            core.delete_snapshot(&id, &s)
        })
        .instrument(span("DeleteSnapshot", &req.snapshot_id))
        .await?;
        Ok(Response::new(proto::DeleteSnapshotResponse {}))
    }

    async fn list_snapshots(
        &self,
        _request: Request<proto::ListSnapshotsRequest>,
    ) -> Result<Response<proto::ListSnapshotsResponse>, Status> {
        Err(status::unimplemented("ListSnapshots (stacked)"))
    }

    async fn get_snapshot(
        &self,
        _request: Request<proto::GetSnapshotRequest>,
    ) -> Result<Response<proto::GetSnapshotResponse>, Status> {
        Err(status::unimplemented("GetSnapshot (stacked)"))
    }

    async fn controller_expand_volume(
        &self,
        request: Request<proto::ControllerExpandVolumeRequest>,
    ) -> Result<Response<proto::ControllerExpandVolumeResponse>, Status> {
        self.require(ControllerCap::ExpandVolume, "ControllerExpandVolume")?;
        let req = request.into_inner();
        let id = required(&req.volume_id, "volume_id")?.to_string();
        let range = req
            .capacity_range
            .as_ref()
            .ok_or_else(|| status::invalid_argument("capacity_range is required"))?;
        let (required_bytes, limit_bytes) = convert::range(Some(range))?;
        let mode = match &req.volume_capability {
            Some(c) => {
                convert::capability(c)
                    .map_err(|e| status::invalid_argument(e.message()))?
                    .mode
            }
            None => AccessMode::SingleNodeWriter,
        };
        let s = secrets(&req.secrets);
        let key = id.clone();
        let size = self
            .guarded(&key, move |core| {
                core.expand(&id, required_bytes, limit_bytes, mode, &s)
            })
            .instrument(span("ControllerExpandVolume", &req.volume_id))
            .await?;
        Ok(Response::new(proto::ControllerExpandVolumeResponse {
            capacity_bytes: bytes(size),
            // The sealed stack and the filesystem grow on the node, always.
            node_expansion_required: true,
        }))
    }

    async fn controller_get_volume(
        &self,
        _request: Request<proto::ControllerGetVolumeRequest>,
    ) -> Result<Response<proto::ControllerGetVolumeResponse>, Status> {
        Err(status::unimplemented("ControllerGetVolume (stacked)"))
    }

    async fn controller_modify_volume(
        &self,
        _request: Request<proto::ControllerModifyVolumeRequest>,
    ) -> Result<Response<proto::ControllerModifyVolumeResponse>, Status> {
        Err(status::unimplemented("ControllerModifyVolume"))
    }
}
