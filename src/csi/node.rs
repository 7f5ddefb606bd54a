//! The Node service over [`NodeCore`]: stage, publish, unpublish, unstage, stats and expansion.

use std::path::PathBuf;
use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::convert::{self, bytes, required, required_capability};
use super::proto::node_service_capability::{Rpc, Type as CapType, rpc::Type as RpcType};
use super::proto::volume_usage::Unit;
use super::proto::{self, node_server::Node};
use super::{Shared, blocking, status};
use crate::node::{NodeCore, Usage};

pub struct NodeService {
    shared: Arc<Shared>,
}

/// The RPCs the node advertises.
pub const CAPABILITIES: &[RpcType] = &[
    RpcType::StageUnstageVolume,
    RpcType::GetVolumeStats,
    RpcType::ExpandVolume,
    RpcType::VolumeCondition,
    RpcType::SingleNodeMultiWriter,
];

fn span(rpc: &'static str, volume_id: &str) -> tracing::Span {
    tracing::info_span!("csi", rpc, volume.id = %volume_id)
}

impl NodeService {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    /// The node-local id of a request's volume id: checked (node-local volumes), or derived (stacked
    /// volumes, whose ids are the backend's).
    fn volume_id(&self, id: &str) -> Result<crate::store::VolumeId, Status> {
        if self.core().is_stacked() {
            Ok(NodeCore::stacked_id(id))
        } else {
            convert::volume_id(id)
        }
    }

    fn core(&self) -> Arc<NodeCore> {
        self.shared
            .node
            .clone()
            .expect("the node service runs only with a node core")
    }

    /// Runs `op` on the node core under the volume's guard, on a blocking thread.
    async fn guarded<T, F>(&self, volume_id: &str, op: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&NodeCore) -> Result<T, crate::node::NodeError> + Send + 'static,
    {
        super::guarded(&self.shared.guards, volume_id, self.core(), op).await
    }
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        request: Request<proto::NodeStageVolumeRequest>,
    ) -> Result<Response<proto::NodeStageVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = required(&req.volume_id, "volume_id")?.to_string();
        let span = span("NodeStageVolume", &id);
        async {
            let staging = PathBuf::from(required(&req.staging_target_path, "staging_target_path")?);
            let cap = required_capability(req.volume_capability.as_ref())?;
            if self.core().is_stacked() {
                let stage = crate::node::stacked::StackedStage {
                    publish_context: req.publish_context.clone().into_iter().collect(),
                    volume_context: req.volume_context.clone(),
                    secrets: crate::backend::csi::Secrets::new(req.secrets.clone()),
                };
                let csi_id = id.clone();
                self.guarded(&id, move |core| {
                    core.stage_stacked(&csi_id, &staging, &cap, &stage)
                })
                .await?;
                return Ok(Response::new(proto::NodeStageVolumeResponse {}));
            }
            let vid = convert::volume_id(&id)?;
            self.guarded(&id, move |core| core.stage(&vid, &staging, &cap))
                .await?;
            Ok(Response::new(proto::NodeStageVolumeResponse {}))
        }
        .instrument(span)
        .await
    }

    async fn node_unstage_volume(
        &self,
        request: Request<proto::NodeUnstageVolumeRequest>,
    ) -> Result<Response<proto::NodeUnstageVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = required(&req.volume_id, "volume_id")?.to_string();
        let span = span("NodeUnstageVolume", &id);
        async {
            let staging = PathBuf::from(required(&req.staging_target_path, "staging_target_path")?);
            if self.core().is_stacked() {
                let csi_id = id.clone();
                self.guarded(&id, move |core| core.unstage_stacked(&csi_id, &staging))
                    .await?;
                return Ok(Response::new(proto::NodeUnstageVolumeResponse {}));
            }
            let vid = convert::volume_id(&id)?;
            self.guarded(&id, move |core| core.unstage(&vid, &staging))
                .await?;
            Ok(Response::new(proto::NodeUnstageVolumeResponse {}))
        }
        .instrument(span)
        .await
    }

    async fn node_publish_volume(
        &self,
        request: Request<proto::NodePublishVolumeRequest>,
    ) -> Result<Response<proto::NodePublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = required(&req.volume_id, "volume_id")?.to_string();
        let span = span("NodePublishVolume", &id);
        async {
            let target = PathBuf::from(required(&req.target_path, "target_path")?);
            // STAGE_UNSTAGE_VOLUME is advertised, so the CO always passes the staging path.
            let staging = PathBuf::from(required(&req.staging_target_path, "staging_target_path")?);
            let cap = required_capability(req.volume_capability.as_ref())?;
            let readonly = req.readonly;
            let vid = self.volume_id(&id)?;
            self.guarded(&id, move |core| {
                core.publish(&vid, &staging, &target, &cap, readonly)
            })
            .await?;
            Ok(Response::new(proto::NodePublishVolumeResponse {}))
        }
        .instrument(span)
        .await
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<proto::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<proto::NodeUnpublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = required(&req.volume_id, "volume_id")?.to_string();
        let span = span("NodeUnpublishVolume", &id);
        async {
            let target = PathBuf::from(required(&req.target_path, "target_path")?);
            let vid = self.volume_id(&id)?;
            self.guarded(&id, move |core| core.unpublish(&vid, &target))
                .await?;
            Ok(Response::new(proto::NodeUnpublishVolumeResponse {}))
        }
        .instrument(span)
        .await
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<proto::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<proto::NodeGetVolumeStatsResponse>, Status> {
        let req = request.into_inner();
        let id = required(&req.volume_id, "volume_id")?.to_string();
        let span = span("NodeGetVolumeStats", &id);
        async {
            let path = PathBuf::from(required(&req.volume_path, "volume_path")?);
            // Read-only: no guard, so the kubelet's periodic stats never collide with a publish.
            let vid = self.volume_id(&id)?;
            let core = self.core();
            let stats =
                blocking(move || core.stats(&vid, &path).map_err(|e| status::from_error(&e)))
                    .await?;
            let usage = match stats.usage {
                Usage::Filesystem {
                    total_bytes,
                    available_bytes,
                    used_bytes,
                    total_inodes,
                    available_inodes,
                    used_inodes,
                } => vec![
                    proto::VolumeUsage {
                        available: bytes(available_bytes),
                        total: bytes(total_bytes),
                        used: bytes(used_bytes),
                        unit: Unit::Bytes as i32,
                    },
                    proto::VolumeUsage {
                        available: bytes(available_inodes),
                        total: bytes(total_inodes),
                        used: bytes(used_inodes),
                        unit: Unit::Inodes as i32,
                    },
                ],
                Usage::Block { total_bytes } => vec![proto::VolumeUsage {
                    available: 0,
                    total: bytes(total_bytes),
                    used: 0,
                    unit: Unit::Bytes as i32,
                }],
            };
            Ok(Response::new(proto::NodeGetVolumeStatsResponse {
                usage,
                volume_condition: Some(convert::condition(&stats.condition)),
            }))
        }
        .instrument(span)
        .await
    }

    async fn node_expand_volume(
        &self,
        request: Request<proto::NodeExpandVolumeRequest>,
    ) -> Result<Response<proto::NodeExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = required(&req.volume_id, "volume_id")?.to_string();
        let span = span("NodeExpandVolume", &id);
        async {
            let path = PathBuf::from(required(&req.volume_path, "volume_path")?);
            let cap = match &req.volume_capability {
                Some(cap) => Some(
                    convert::capability(cap).map_err(|e| status::invalid_argument(e.message()))?,
                ),
                None => None,
            };
            let (required, limit) = convert::range(req.capacity_range.as_ref())?;
            if self.core().is_stacked() {
                let csi_id = id.clone();
                let size = self
                    .guarded(&id, move |core| {
                        core.expand_stacked(&csi_id, &path, required, limit, cap.as_ref())
                    })
                    .await?;
                return Ok(Response::new(proto::NodeExpandVolumeResponse {
                    capacity_bytes: bytes(size),
                }));
            }
            let vid = convert::volume_id(&id)?;
            let size = self
                .guarded(&id, move |core| core.expand(&vid, &path, required, limit))
                .await?;
            Ok(Response::new(proto::NodeExpandVolumeResponse {
                capacity_bytes: bytes(size),
            }))
        }
        .instrument(span)
        .await
    }

    async fn node_get_capabilities(
        &self,
        _request: Request<proto::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<proto::NodeGetCapabilitiesResponse>, Status> {
        let capabilities = CAPABILITIES
            .iter()
            .map(|t| proto::NodeServiceCapability {
                r#type: Some(CapType::Rpc(Rpc { r#type: *t as i32 })),
            })
            .collect();
        Ok(Response::new(proto::NodeGetCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn node_get_info(
        &self,
        _request: Request<proto::NodeGetInfoRequest>,
    ) -> Result<Response<proto::NodeGetInfoResponse>, Status> {
        let core = self.core();
        if core.is_stacked() {
            // The backend's node id and topology: ControllerPublish and scheduling go by them.
            let info =
                blocking(move || core.stacked_info().map_err(|e| status::from_error(&e))).await?;
            return Ok(Response::new(proto::NodeGetInfoResponse {
                node_id: info.node_id,
                max_volumes_per_node: info.max_volumes,
                accessible_topology: info.topology.map(|t| proto::Topology {
                    segments: t.into_iter().collect(),
                }),
            }));
        }
        Ok(Response::new(proto::NodeGetInfoResponse {
            node_id: self.shared.config.node_id.clone(),
            max_volumes_per_node: 0,
            accessible_topology: Some(convert::topology(&self.shared.config.node_id)),
        }))
    }
}
