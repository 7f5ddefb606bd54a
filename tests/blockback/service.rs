//! The gRPC services: thin handlers that check the request's shape, call the store or the node core
//! on a blocking thread, and answer. A `--fault stall:<Rpc>` makes the named call do its work, mark
//! `DIR/stalled/<Rpc>`, and never answer.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sealcsi::csi::proto::controller_server::Controller;
use sealcsi::csi::proto::identity_server::Identity;
use sealcsi::csi::proto::node_server::Node;
use sealcsi::csi::proto::volume_capability::{AccessType, access_mode::Mode};
use sealcsi::csi::proto::volume_content_source::{
    SnapshotSource, Type as SourceType, VolumeSource,
};
use sealcsi::csi::proto::*;
use tonic::{Request, Response, Status};

use crate::error::BbError;
use crate::stage::NodeCore;
use crate::store::{SnapshotRecord, Source, Store, VolumeRecord};

/// The plugin name blockback reports.
pub const PLUGIN_NAME: &str = "blockback.test.sealcsi";

/// What every service shares.
pub struct Shared {
    pub store: Arc<Store>,
    pub node: NodeCore,
    pub node_id: String,
    pub topology_key: String,
    /// RPC names (`NodeStageVolume`) that stall after their side effects.
    pub stall: HashSet<String>,
}

impl Shared {
    fn topology(&self) -> Topology {
        Topology {
            segments: HashMap::from([(self.topology_key.clone(), self.node_id.clone())]),
        }
    }

    /// Never returns if `rpc` is to stall (after marking it), else returns at once.
    async fn maybe_stall(&self, rpc: &str) {
        if self.stall.contains(rpc) {
            tracing::warn!(
                rpc,
                "fault: stalling after the side effects, never answering"
            );
            if let Err(e) = self.store.mark_stalled(rpc) {
                tracing::error!(rpc, error = %e, "cannot mark the stall");
            }
            std::future::pending::<()>().await;
        }
    }
}

/// Runs `f` on a blocking thread.
async fn blocking<T, F>(f: F) -> Result<T, Status>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, BbError> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("blockback: task failed: {e}")))?
        .map_err(Status::from)
}

fn invalid(msg: impl Into<String>) -> Status {
    Status::invalid_argument(format!("blockback: {}", msg.into()))
}

fn require<'a>(value: &'a str, field: &str) -> Result<&'a str, Status> {
    if value.is_empty() {
        return Err(invalid(format!("{field} is required")));
    }
    Ok(value)
}

/// Why `cap` is not one blockback serves, if it is not.
fn unsupported(cap: &VolumeCapability) -> Option<String> {
    match &cap.access_type {
        Some(AccessType::Block(_)) => {}
        Some(AccessType::Mount(_)) => {
            return Some(
                "blockback serves raw block volumes only: a mount (filesystem) capability is not \
                 supported; ask for access type BLOCK"
                    .into(),
            );
        }
        None => return Some("a volume capability needs an access type (BLOCK)".into()),
    }
    let mode = cap
        .access_mode
        .as_ref()
        .and_then(|m| Mode::try_from(m.mode).ok())
        .unwrap_or(Mode::Unknown);
    match mode {
        Mode::SingleNodeWriter
        | Mode::SingleNodeReaderOnly
        | Mode::SingleNodeSingleWriter
        | Mode::SingleNodeMultiWriter => None,
        Mode::Unknown => Some("a volume capability needs an access mode".into()),
        other => Some(format!(
            "access mode {} is not supported (blockback volumes attach to one node)",
            other.as_str_name()
        )),
    }
}

fn check_caps(caps: &[VolumeCapability]) -> Result<(), Status> {
    if caps.is_empty() {
        return Err(invalid("volume_capabilities are required"));
    }
    caps.iter()
        .find_map(unsupported)
        .map_or(Ok(()), |why| Err(invalid(why)))
}

fn check_cap(cap: Option<&VolumeCapability>) -> Result<(), Status> {
    let cap = cap.ok_or_else(|| invalid("volume_capability is required"))?;
    unsupported(cap).map_or(Ok(()), |why| Err(invalid(why)))
}

fn range(r: Option<&CapacityRange>) -> Result<(u64, u64), Status> {
    let (req, lim) = r.map_or((0, 0), |r| (r.required_bytes, r.limit_bytes));
    if req < 0 || lim < 0 {
        return Err(Status::out_of_range("blockback: negative capacity"));
    }
    if lim > 0 && req > lim {
        return Err(Status::out_of_range(
            "blockback: required_bytes exceed limit_bytes",
        ));
    }
    Ok((req as u64, lim as u64))
}

fn to_source(s: &Option<Source>) -> Option<VolumeContentSource> {
    s.as_ref().map(|s| VolumeContentSource {
        r#type: Some(match s {
            Source::Snapshot(id) => SourceType::Snapshot(SnapshotSource {
                snapshot_id: id.clone(),
            }),
            Source::Volume(id) => SourceType::Volume(VolumeSource {
                volume_id: id.clone(),
            }),
        }),
    })
}

impl Shared {
    fn to_volume(&self, v: &VolumeRecord) -> Volume {
        Volume {
            capacity_bytes: v.capacity_bytes as i64,
            volume_id: v.id.clone(),
            volume_context: HashMap::new(),
            content_source: to_source(&v.source),
            accessible_topology: vec![self.topology()],
        }
    }
}

fn to_snapshot(s: &SnapshotRecord) -> Snapshot {
    Snapshot {
        size_bytes: s.size_bytes as i64,
        snapshot_id: s.id.clone(),
        source_volume_id: s.source_volume_id.clone(),
        creation_time: Some(prost_types::Timestamp {
            seconds: s.created_unix_seconds,
            nanos: s.created_nanos,
        }),
        ready_to_use: true,
        group_snapshot_id: String::new(),
    }
}

/// One page of `items` from `token` (an index this server handed out).
fn page<T>(items: Vec<T>, token: &str, max: i32) -> Result<(Vec<T>, String), Status> {
    let start: usize = if token.is_empty() {
        0
    } else {
        token
            .parse()
            .ok()
            .filter(|&n: &usize| n <= items.len())
            .ok_or_else(|| Status::aborted(format!("blockback: bad starting_token {token:?}")))?
    };
    if max < 0 {
        return Err(invalid("max_entries is negative"));
    }
    let end = if max == 0 {
        items.len()
    } else {
        (start + max as usize).min(items.len())
    };
    let next = if end < items.len() {
        end.to_string()
    } else {
        String::new()
    };
    Ok((
        items.into_iter().skip(start).take(end - start).collect(),
        next,
    ))
}

/// The Identity service.
pub struct IdentityService;

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: PLUGIN_NAME.to_string(),
            vendor_version: env!("CARGO_PKG_VERSION").to_string(),
            manifest: HashMap::new(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        use plugin_capability::{Service, Type, service};
        let cap = |t: service::Type| PluginCapability {
            r#type: Some(Type::Service(Service { r#type: t as i32 })),
        };
        Ok(Response::new(GetPluginCapabilitiesResponse {
            capabilities: vec![
                cap(service::Type::ControllerService),
                cap(service::Type::VolumeAccessibilityConstraints),
            ],
        }))
    }

    async fn probe(&self, _: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        Ok(Response::new(ProbeResponse { ready: Some(true) }))
    }
}

/// The controller capabilities blockback has, exactly.
pub const CONTROLLER_CAPS: &[controller_service_capability::rpc::Type] = {
    use controller_service_capability::rpc::Type as T;
    &[
        T::CreateDeleteVolume,
        T::PublishUnpublishVolume,
        T::ListVolumes,
        T::GetCapacity,
        T::CreateDeleteSnapshot,
        T::ListSnapshots,
        T::CloneVolume,
        T::ExpandVolume,
    ]
};

/// The node capabilities blockback has, exactly.
pub const NODE_CAPS: &[node_service_capability::rpc::Type] = {
    use node_service_capability::rpc::Type as T;
    &[T::StageUnstageVolume, T::ExpandVolume, T::GetVolumeStats]
};

/// The Controller service.
pub struct ControllerService(pub Arc<Shared>);

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(
        &self,
        request: Request<CreateVolumeRequest>,
    ) -> Result<Response<CreateVolumeResponse>, Status> {
        let r = request.into_inner();
        let name = require(&r.name, "name")?.to_string();
        check_caps(&r.volume_capabilities)?;
        let (required_bytes, limit_bytes) = range(r.capacity_range.as_ref())?;
        if let Some(req) = &r.accessibility_requirements {
            let ours = self.0.topology();
            if !req.requisite.is_empty() && !req.requisite.contains(&ours) {
                return Err(Status::resource_exhausted(format!(
                    "blockback: no requisite topology is this node's {:?}",
                    ours.segments
                )));
            }
        }
        let source = match r.volume_content_source.and_then(|s| s.r#type) {
            None => None,
            Some(SourceType::Snapshot(s)) => Some(Source::Snapshot(
                require(&s.snapshot_id, "volume_content_source.snapshot.snapshot_id")?.into(),
            )),
            Some(SourceType::Volume(v)) => Some(Source::Volume(
                require(&v.volume_id, "volume_content_source.volume.volume_id")?.into(),
            )),
        };
        let spec = crate::store::CreateSpec {
            name,
            required_bytes,
            limit_bytes,
            source,
            parameters: r.parameters.into_iter().collect::<BTreeMap<_, _>>(),
        };
        let store = self.0.store.clone();
        let (v, created) = blocking(move || store.create_volume(&spec)).await?;
        tracing::info!(volume.id = %v.id, created, bytes = v.capacity_bytes, "CreateVolume");
        self.0.maybe_stall("CreateVolume").await;
        Ok(Response::new(CreateVolumeResponse {
            volume: Some(self.0.to_volume(&v)),
        }))
    }

    async fn delete_volume(
        &self,
        request: Request<DeleteVolumeRequest>,
    ) -> Result<Response<DeleteVolumeResponse>, Status> {
        let id = require(&request.get_ref().volume_id, "volume_id")?.to_string();
        let store = self.0.store.clone();
        blocking(move || store.delete_volume(&id)).await?;
        self.0.maybe_stall("DeleteVolume").await;
        Ok(Response::new(DeleteVolumeResponse {}))
    }

    async fn controller_publish_volume(
        &self,
        request: Request<ControllerPublishVolumeRequest>,
    ) -> Result<Response<ControllerPublishVolumeResponse>, Status> {
        let r = request.into_inner();
        let volume = require(&r.volume_id, "volume_id")?.to_string();
        let node = require(&r.node_id, "node_id")?.to_string();
        check_cap(r.volume_capability.as_ref())?;
        let store = self.0.store.clone();
        store.existing_volume(&volume).map_err(Status::from)?;
        if node != self.0.node_id {
            return Err(Status::not_found(format!(
                "blockback: node {node:?} is unknown (this backend serves node {:?})",
                self.0.node_id
            )));
        }
        let readonly = r.readonly;
        blocking(move || store.attach(&volume, &node, readonly)).await?;
        self.0.maybe_stall("ControllerPublishVolume").await;
        Ok(Response::new(ControllerPublishVolumeResponse {
            publish_context: HashMap::new(),
        }))
    }

    async fn controller_unpublish_volume(
        &self,
        request: Request<ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<ControllerUnpublishVolumeResponse>, Status> {
        let r = request.into_inner();
        let volume = require(&r.volume_id, "volume_id")?.to_string();
        let store = self.0.store.clone();
        let node = r.node_id;
        blocking(move || {
            if node.is_empty() {
                for n in store.attachments_of(&volume)? {
                    store.detach(&volume, &n)?;
                }
                Ok(())
            } else {
                store.detach(&volume, &node)
            }
        })
        .await?;
        self.0.maybe_stall("ControllerUnpublishVolume").await;
        Ok(Response::new(ControllerUnpublishVolumeResponse {}))
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<ValidateVolumeCapabilitiesResponse>, Status> {
        let r = request.into_inner();
        let id = require(&r.volume_id, "volume_id")?;
        if r.volume_capabilities.is_empty() {
            return Err(invalid("volume_capabilities are required"));
        }
        self.0.store.existing_volume(id).map_err(Status::from)?;
        let why = r.volume_capabilities.iter().find_map(unsupported);
        Ok(Response::new(match why {
            Some(message) => ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message,
            },
            None => ValidateVolumeCapabilitiesResponse {
                confirmed: Some(validate_volume_capabilities_response::Confirmed {
                    volume_context: r.volume_context,
                    volume_capabilities: r.volume_capabilities,
                    parameters: r.parameters,
                    mutable_parameters: r.mutable_parameters,
                }),
                message: String::new(),
            },
        }))
    }

    async fn list_volumes(
        &self,
        request: Request<ListVolumesRequest>,
    ) -> Result<Response<ListVolumesResponse>, Status> {
        let r = request.into_inner();
        let store = self.0.store.clone();
        let all = blocking(move || store.volumes()).await?;
        let (items, next_token) = page(all, &r.starting_token, r.max_entries)?;
        Ok(Response::new(ListVolumesResponse {
            entries: items
                .iter()
                .map(|v| list_volumes_response::Entry {
                    volume: Some(self.0.to_volume(v)),
                    status: None,
                })
                .collect(),
            next_token,
        }))
    }

    async fn get_capacity(
        &self,
        request: Request<GetCapacityRequest>,
    ) -> Result<Response<GetCapacityResponse>, Status> {
        let r = request.into_inner();
        check_caps(&r.volume_capabilities).or_else(|e| {
            // No capabilities: the total; unsupported ones: none of it is available to them.
            if r.volume_capabilities.is_empty() {
                Ok(())
            } else {
                Err(e)
            }
        })?;
        let foreign = r
            .accessible_topology
            .as_ref()
            .is_some_and(|t| *t != self.0.topology());
        let free = if foreign {
            0
        } else {
            self.0.store.free_bytes().map_err(Status::from)?
        };
        Ok(Response::new(GetCapacityResponse {
            available_capacity: free as i64,
            maximum_volume_size: None,
            minimum_volume_size: Some(crate::store::MIB as i64),
        }))
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<ControllerGetCapabilitiesResponse>, Status> {
        use controller_service_capability::{Rpc, Type};
        Ok(Response::new(ControllerGetCapabilitiesResponse {
            capabilities: CONTROLLER_CAPS
                .iter()
                .map(|t| ControllerServiceCapability {
                    r#type: Some(Type::Rpc(Rpc { r#type: *t as i32 })),
                })
                .collect(),
        }))
    }

    async fn create_snapshot(
        &self,
        request: Request<CreateSnapshotRequest>,
    ) -> Result<Response<CreateSnapshotResponse>, Status> {
        let r = request.into_inner();
        let name = require(&r.name, "name")?.to_string();
        let source = require(&r.source_volume_id, "source_volume_id")?.to_string();
        let store = self.0.store.clone();
        let (s, created) = blocking(move || store.create_snapshot(&name, &source)).await?;
        tracing::info!(snapshot.id = %s.id, created, "CreateSnapshot");
        self.0.maybe_stall("CreateSnapshot").await;
        Ok(Response::new(CreateSnapshotResponse {
            snapshot: Some(to_snapshot(&s)),
        }))
    }

    async fn delete_snapshot(
        &self,
        request: Request<DeleteSnapshotRequest>,
    ) -> Result<Response<DeleteSnapshotResponse>, Status> {
        let id = require(&request.get_ref().snapshot_id, "snapshot_id")?.to_string();
        let store = self.0.store.clone();
        blocking(move || store.delete_snapshot(&id)).await?;
        self.0.maybe_stall("DeleteSnapshot").await;
        Ok(Response::new(DeleteSnapshotResponse {}))
    }

    async fn list_snapshots(
        &self,
        request: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        let r = request.into_inner();
        let store = self.0.store.clone();
        let all = blocking(move || store.snapshots()).await?;
        let all: Vec<_> = all
            .into_iter()
            .filter(|s| r.snapshot_id.is_empty() || s.id == r.snapshot_id)
            .filter(|s| r.source_volume_id.is_empty() || s.source_volume_id == r.source_volume_id)
            .collect();
        let (items, next_token) = page(all, &r.starting_token, r.max_entries)?;
        Ok(Response::new(ListSnapshotsResponse {
            entries: items
                .iter()
                .map(|s| list_snapshots_response::Entry {
                    snapshot: Some(to_snapshot(s)),
                })
                .collect(),
            next_token,
        }))
    }

    async fn get_snapshot(
        &self,
        _: Request<GetSnapshotRequest>,
    ) -> Result<Response<GetSnapshotResponse>, Status> {
        Err(Status::unimplemented("blockback: GetSnapshot"))
    }

    async fn controller_expand_volume(
        &self,
        request: Request<ControllerExpandVolumeRequest>,
    ) -> Result<Response<ControllerExpandVolumeResponse>, Status> {
        let r = request.into_inner();
        let id = require(&r.volume_id, "volume_id")?.to_string();
        let (required, limit) = range(r.capacity_range.as_ref())?;
        if required == 0 {
            return Err(invalid("capacity_range.required_bytes is required"));
        }
        if let Some(cap) = &r.volume_capability {
            check_cap(Some(cap))?;
        }
        let store = self.0.store.clone();
        let capacity = blocking(move || store.expand_volume(&id, required, limit)).await?;
        self.0.maybe_stall("ControllerExpandVolume").await;
        Ok(Response::new(ControllerExpandVolumeResponse {
            capacity_bytes: capacity as i64,
            node_expansion_required: true,
        }))
    }

    async fn controller_get_volume(
        &self,
        _: Request<ControllerGetVolumeRequest>,
    ) -> Result<Response<ControllerGetVolumeResponse>, Status> {
        Err(Status::unimplemented("blockback: ControllerGetVolume"))
    }

    async fn controller_modify_volume(
        &self,
        _: Request<ControllerModifyVolumeRequest>,
    ) -> Result<Response<ControllerModifyVolumeResponse>, Status> {
        Err(Status::unimplemented("blockback: ControllerModifyVolume"))
    }
}

/// The Node service.
pub struct NodeService(pub Arc<Shared>);

fn path_of(value: &str, field: &str) -> Result<PathBuf, Status> {
    let p = Path::new(require(value, field)?);
    if !p.is_absolute() {
        return Err(invalid(format!(
            "{field} {value:?} is not an absolute path"
        )));
    }
    Ok(p.to_path_buf())
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        request: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        let r = request.into_inner();
        let id = require(&r.volume_id, "volume_id")?.to_string();
        let staging = path_of(&r.staging_target_path, "staging_target_path")?;
        check_cap(r.volume_capability.as_ref())?;
        let shared = self.0.clone();
        let (lo, attached) = blocking(move || shared.node.stage(&id, &staging)).await?;
        tracing::info!(loop_dev = %lo.path().display(), attached, "NodeStageVolume");
        self.0.maybe_stall("NodeStageVolume").await;
        Ok(Response::new(NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(
        &self,
        request: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        let r = request.into_inner();
        let id = require(&r.volume_id, "volume_id")?.to_string();
        path_of(&r.staging_target_path, "staging_target_path")?;
        let shared = self.0.clone();
        blocking(move || shared.node.unstage(&id)).await?;
        self.0.maybe_stall("NodeUnstageVolume").await;
        Ok(Response::new(NodeUnstageVolumeResponse {}))
    }

    async fn node_publish_volume(
        &self,
        request: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let r = request.into_inner();
        let id = require(&r.volume_id, "volume_id")?.to_string();
        let staging = path_of(&r.staging_target_path, "staging_target_path")?;
        let target = path_of(&r.target_path, "target_path")?;
        check_cap(r.volume_capability.as_ref())?;
        let readonly = r.readonly;
        let shared = self.0.clone();
        let dev = blocking(move || shared.node.publish(&id, &staging, &target, readonly)).await?;
        tracing::info!(loop_dev = %dev.display(), "NodePublishVolume");
        self.0.maybe_stall("NodePublishVolume").await;
        Ok(Response::new(NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let r = request.into_inner();
        require(&r.volume_id, "volume_id")?;
        let target = path_of(&r.target_path, "target_path")?;
        let shared = self.0.clone();
        blocking(move || shared.node.unpublish(&target)).await?;
        self.0.maybe_stall("NodeUnpublishVolume").await;
        Ok(Response::new(NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        let r = request.into_inner();
        let id = require(&r.volume_id, "volume_id")?.to_string();
        let path = path_of(&r.volume_path, "volume_path")?;
        let shared = self.0.clone();
        let total = blocking(move || shared.node.stats(&id, &path)).await?;
        Ok(Response::new(NodeGetVolumeStatsResponse {
            usage: vec![VolumeUsage {
                available: 0,
                total: total as i64,
                used: 0,
                unit: volume_usage::Unit::Bytes as i32,
            }],
            volume_condition: None,
        }))
    }

    async fn node_expand_volume(
        &self,
        request: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        let r = request.into_inner();
        let id = require(&r.volume_id, "volume_id")?.to_string();
        let path = path_of(&r.volume_path, "volume_path")?;
        if let Some(cap) = &r.volume_capability {
            check_cap(Some(cap))?;
        }
        let shared = self.0.clone();
        let bytes = blocking(move || {
            if !path.exists() {
                return Err(BbError::NotFound(format!(
                    "volume_path {} does not exist",
                    path.display()
                )));
            }
            shared.node.expand(&id)
        })
        .await?;
        self.0.maybe_stall("NodeExpandVolume").await;
        Ok(Response::new(NodeExpandVolumeResponse {
            capacity_bytes: bytes as i64,
        }))
    }

    async fn node_get_capabilities(
        &self,
        _: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        use node_service_capability::{Rpc, Type};
        Ok(Response::new(NodeGetCapabilitiesResponse {
            capabilities: NODE_CAPS
                .iter()
                .map(|t| NodeServiceCapability {
                    r#type: Some(Type::Rpc(Rpc { r#type: *t as i32 })),
                })
                .collect(),
        }))
    }

    async fn node_get_info(
        &self,
        _: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        Ok(Response::new(NodeGetInfoResponse {
            node_id: self.0.node_id.clone(),
            max_volumes_per_node: 0,
            accessible_topology: Some(self.0.topology()),
        }))
    }
}
