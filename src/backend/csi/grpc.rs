//! The real [`CsiBackend`]: a tonic client over the backend driver's unix socket. The one place where
//! backend calls meet proto types (`crate::csi::proto`, the same generated CSI v1.12.0 code the server
//! uses): core requests are converted here, and statuses become [`BackendCallError`]s.
//!
//! The channel connects lazily and reconnects after the backend restarts; every call has a deadline
//! ([`CALL_TIMEOUT`]) so a hung backend turns into DEADLINE_EXCEEDED, never a volume guard held forever.
//! Calls block on the runtime handle captured at construction: make them from blocking threads only.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::transport::{Channel, Endpoint, Uri};

use super::{
    BackendCallError, BackendSnapshot, BackendVolume, Capabilities, Capacity, Code, ContentSource,
    ControllerCap, CreateRequest, CsiBackend, Map, NodeCap, NodeInfo, PublishRequest, Result,
    Secrets, StageRequest, Topology,
};
use crate::csi::proto::{
    self, controller_client::ControllerClient, identity_client::IdentityClient,
    node_client::NodeClient,
};
use crate::node::capability::AccessMode;

/// The deadline of every backend call. Cloud attach and provisioning calls take seconds to a minute;
/// the CO retries a failed call.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// The prefix of the `--backend` value that names a CSI driver.
pub const SCHEME: &str = "csi:";

/// A backend CSI driver reached over its unix socket.
#[derive(Clone)]
pub struct GrpcBackend {
    endpoint: String,
    channel: Channel,
    runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for GrpcBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcBackend")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

/// The socket path of a `--backend` value: `csi:unix:///path` (or `csi:/path`).
pub fn socket_of(backend: &str) -> std::result::Result<PathBuf, String> {
    let rest = backend.strip_prefix(SCHEME).ok_or_else(|| {
        format!(
            "backend {backend:?}: only CSI drivers are supported (csi:unix:///path/to/csi.sock)"
        )
    })?;
    let path = rest
        .strip_prefix("unix://")
        .or_else(|| rest.strip_prefix("unix:"))
        .unwrap_or(rest);
    if !path.starts_with('/') {
        return Err(format!(
            "backend {backend:?}: the socket must be an absolute path (csi:unix:///path/to/csi.sock)"
        ));
    }
    Ok(PathBuf::from(path))
}

fn code_of(code: tonic::Code) -> Code {
    match code {
        tonic::Code::Cancelled => Code::Cancelled,
        tonic::Code::InvalidArgument => Code::InvalidArgument,
        tonic::Code::DeadlineExceeded => Code::DeadlineExceeded,
        tonic::Code::NotFound => Code::NotFound,
        tonic::Code::AlreadyExists => Code::AlreadyExists,
        tonic::Code::PermissionDenied => Code::PermissionDenied,
        tonic::Code::ResourceExhausted => Code::ResourceExhausted,
        tonic::Code::FailedPrecondition => Code::FailedPrecondition,
        tonic::Code::Aborted => Code::Aborted,
        tonic::Code::OutOfRange => Code::OutOfRange,
        tonic::Code::Unimplemented => Code::Unimplemented,
        tonic::Code::Internal => Code::Internal,
        tonic::Code::Unavailable => Code::Unavailable,
        tonic::Code::DataLoss => Code::DataLoss,
        tonic::Code::Unauthenticated => Code::Unauthenticated,
        // OK as an error cannot happen; anything unknown stays unknown.
        tonic::Code::Ok | tonic::Code::Unknown => Code::Unknown,
    }
}

fn hash(map: &Map) -> HashMap<String, String> {
    map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn tree(map: HashMap<String, String>) -> Map {
    map.into_iter().collect()
}

fn secrets(s: &Secrets) -> HashMap<String, String> {
    s.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn topology(t: &Topology) -> proto::Topology {
    proto::Topology { segments: hash(t) }
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

fn bytes(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn unsigned(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// A raw BLOCK capability of `mode`: what sealcsi always asks the backend for.
fn block(mode: AccessMode) -> proto::VolumeCapability {
    use proto::volume_capability::access_mode::Mode;
    let mode = match mode {
        AccessMode::SingleNodeWriter => Mode::SingleNodeWriter,
        AccessMode::SingleNodeReaderOnly => Mode::SingleNodeReaderOnly,
        AccessMode::SingleNodeSingleWriter => Mode::SingleNodeSingleWriter,
        AccessMode::SingleNodeMultiWriter => Mode::SingleNodeMultiWriter,
    };
    proto::VolumeCapability {
        access_mode: Some(proto::volume_capability::AccessMode { mode: mode as i32 }),
        access_type: Some(proto::volume_capability::AccessType::Block(
            proto::volume_capability::BlockVolume {},
        )),
    }
}

fn range(required: u64, limit: u64) -> Option<proto::CapacityRange> {
    (required != 0 || limit != 0).then(|| proto::CapacityRange {
        required_bytes: bytes(required),
        limit_bytes: bytes(limit),
    })
}

fn content_source(s: &ContentSource) -> proto::VolumeContentSource {
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

fn content_source_of(s: Option<proto::VolumeContentSource>) -> Option<ContentSource> {
    use proto::volume_content_source::Type;
    match s?.r#type? {
        Type::Snapshot(s) => Some(ContentSource::Snapshot(s.snapshot_id)),
        Type::Volume(v) => Some(ContentSource::Volume(v.volume_id)),
    }
}

impl GrpcBackend {
    /// A client for `backend` (`csi:unix:///path`). Must be called inside a tokio runtime (its handle
    /// runs the calls); does not connect yet.
    pub fn new(backend: &str) -> std::result::Result<Self, String> {
        let socket = socket_of(backend)?;
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| "the backend client needs a tokio runtime".to_string())?;
        let endpoint = Endpoint::from_static("http://backend.invalid")
            .timeout(CALL_TIMEOUT)
            .connect_timeout(Duration::from_secs(10));
        let channel = endpoint.connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }));
        Ok(Self {
            endpoint: backend.to_string(),
            channel,
            runtime,
        })
    }

    fn error(&self, rpc: &'static str, status: &tonic::Status) -> BackendCallError {
        // A status with a source was made here from a local failure (the connection refused, reset or
        // closed mid-call: tonic says UNKNOWN), not sent by the backend: the backend did not answer.
        if let Some(source) = std::error::Error::source(status)
            && status.code() == tonic::Code::Unknown
        {
            return BackendCallError {
                backend: self.endpoint.clone(),
                rpc,
                code: Code::Unavailable,
                message: format!(
                    "no answer (the connection failed: {}: {source})",
                    status.message()
                ),
            };
        }
        BackendCallError {
            backend: self.endpoint.clone(),
            rpc,
            code: code_of(status.code()),
            message: status.message().to_string(),
        }
    }

    fn invalid(&self, rpc: &'static str, what: &str) -> BackendCallError {
        BackendCallError {
            backend: self.endpoint.clone(),
            rpc,
            code: Code::Internal,
            message: format!("invalid response: {what}"),
        }
    }

    fn call<T, F>(&self, rpc: &'static str, f: F) -> Result<T>
    where
        F: std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        let started = std::time::Instant::now();
        let result = self.runtime.block_on(f);
        tracing::debug!(backend = %self.endpoint, rpc, ok = result.is_ok(), seconds = started.elapsed().as_secs_f64(), "backend call");
        result
            .map(tonic::Response::into_inner)
            .map_err(|s| self.error(rpc, &s))
    }

    fn controller(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.channel.clone())
    }

    fn node(&self) -> NodeClient<Channel> {
        NodeClient::new(self.channel.clone())
    }

    fn identity(&self) -> IdentityClient<Channel> {
        IdentityClient::new(self.channel.clone())
    }
}

impl CsiBackend for GrpcBackend {
    fn name(&self) -> &str {
        &self.endpoint
    }

    fn plugin_name(&self) -> Result<String> {
        let r = self.call(
            "GetPluginInfo",
            self.identity()
                .get_plugin_info(proto::GetPluginInfoRequest {}),
        )?;
        Ok(r.name)
    }

    fn probe(&self) -> Result<bool> {
        let r = self.call("Probe", self.identity().probe(proto::ProbeRequest {}))?;
        Ok(r.ready.is_none_or(|r| r))
    }

    fn capabilities(&self) -> Result<Capabilities> {
        use proto::controller_service_capability::rpc::Type as C;
        use proto::node_service_capability::rpc::Type as N;
        let mut caps = Capabilities::default();
        let plugin = self.call(
            "GetPluginCapabilities",
            self.identity()
                .get_plugin_capabilities(proto::GetPluginCapabilitiesRequest {}),
        )?;
        let mut has_controller = false;
        for c in plugin.capabilities {
            if let Some(proto::plugin_capability::Type::Service(s)) = c.r#type {
                use proto::plugin_capability::service::Type as S;
                match S::try_from(s.r#type) {
                    Ok(S::ControllerService) => has_controller = true,
                    Ok(S::VolumeAccessibilityConstraints) => caps.topology = true,
                    _ => {}
                }
            }
        }
        if has_controller {
            let r = self.call(
                "ControllerGetCapabilities",
                self.controller()
                    .controller_get_capabilities(proto::ControllerGetCapabilitiesRequest {}),
            )?;
            for c in r.capabilities {
                let Some(proto::controller_service_capability::Type::Rpc(rpc)) = c.r#type else {
                    continue;
                };
                let cap = match C::try_from(rpc.r#type) {
                    Ok(C::CreateDeleteVolume) => ControllerCap::CreateDeleteVolume,
                    Ok(C::PublishUnpublishVolume) => ControllerCap::PublishUnpublishVolume,
                    Ok(C::GetCapacity) => ControllerCap::GetCapacity,
                    Ok(C::CreateDeleteSnapshot) => ControllerCap::CreateDeleteSnapshot,
                    Ok(C::CloneVolume) => ControllerCap::CloneVolume,
                    Ok(C::ExpandVolume) => ControllerCap::ExpandVolume,
                    Ok(C::SingleNodeMultiWriter) => ControllerCap::SingleNodeMultiWriter,
                    _ => continue,
                };
                caps.controller.insert(cap);
            }
        }
        let r = self.call(
            "NodeGetCapabilities",
            self.node()
                .node_get_capabilities(proto::NodeGetCapabilitiesRequest {}),
        )?;
        for c in r.capabilities {
            let Some(proto::node_service_capability::Type::Rpc(rpc)) = c.r#type else {
                continue;
            };
            let cap = match N::try_from(rpc.r#type) {
                Ok(N::StageUnstageVolume) => NodeCap::StageUnstageVolume,
                Ok(N::ExpandVolume) => NodeCap::ExpandVolume,
                Ok(N::SingleNodeMultiWriter) => NodeCap::SingleNodeMultiWriter,
                _ => continue,
            };
            caps.node.insert(cap);
        }
        Ok(caps)
    }

    fn create_volume(&self, req: &CreateRequest) -> Result<BackendVolume> {
        let request = proto::CreateVolumeRequest {
            name: req.name.clone(),
            capacity_range: range(req.required_bytes, req.limit_bytes),
            volume_capabilities: vec![block(req.mode)],
            parameters: hash(&req.parameters),
            secrets: secrets(&req.secrets),
            volume_content_source: req.source.as_ref().map(content_source),
            accessibility_requirements: req.topology.as_ref().map(|t| proto::TopologyRequirement {
                requisite: t.requisite.iter().map(topology).collect(),
                preferred: t.preferred.iter().map(topology).collect(),
            }),
            mutable_parameters: HashMap::new(),
        };
        let r = self.call("CreateVolume", self.controller().create_volume(request))?;
        let v = r
            .volume
            .ok_or_else(|| self.invalid("CreateVolume", "no volume"))?;
        if v.volume_id.is_empty() {
            return Err(self.invalid("CreateVolume", "empty volume_id"));
        }
        Ok(BackendVolume {
            id: v.volume_id,
            capacity_bytes: unsigned(v.capacity_bytes),
            context: tree(v.volume_context),
            topology: v
                .accessible_topology
                .into_iter()
                .map(|t| tree(t.segments))
                .collect(),
            source: content_source_of(v.content_source),
        })
    }

    fn delete_volume(&self, volume_id: &str, s: &Secrets) -> Result<()> {
        self.call(
            "DeleteVolume",
            self.controller().delete_volume(proto::DeleteVolumeRequest {
                volume_id: volume_id.into(),
                secrets: secrets(s),
            }),
        )
        .map(drop)
    }

    fn validate_block(&self, volume_id: &str, context: &Map) -> Result<()> {
        const RPC: &str = "ValidateVolumeCapabilities";
        let r = self.call(
            RPC,
            self.controller().validate_volume_capabilities(
                proto::ValidateVolumeCapabilitiesRequest {
                    volume_id: volume_id.into(),
                    volume_context: hash(context),
                    volume_capabilities: vec![block(AccessMode::SingleNodeWriter)],
                    parameters: HashMap::new(),
                    mutable_parameters: HashMap::new(),
                    secrets: HashMap::new(),
                },
            ),
        )?;
        if r.confirmed.is_none() {
            return Err(BackendCallError {
                backend: self.endpoint.clone(),
                rpc: RPC,
                code: Code::InvalidArgument,
                message: format!("the backend does not confirm a BLOCK volume: {}", r.message),
            });
        }
        Ok(())
    }

    fn controller_publish(
        &self,
        volume_id: &str,
        node_id: &str,
        mode: AccessMode,
        readonly: bool,
        context: &Map,
        s: &Secrets,
    ) -> Result<Map> {
        let r = self.call(
            "ControllerPublishVolume",
            self.controller()
                .controller_publish_volume(proto::ControllerPublishVolumeRequest {
                    volume_id: volume_id.into(),
                    node_id: node_id.into(),
                    volume_capability: Some(block(mode)),
                    readonly,
                    secrets: secrets(s),
                    volume_context: hash(context),
                }),
        )?;
        Ok(tree(r.publish_context))
    }

    fn controller_unpublish(&self, volume_id: &str, node_id: &str, s: &Secrets) -> Result<()> {
        self.call(
            "ControllerUnpublishVolume",
            self.controller().controller_unpublish_volume(
                proto::ControllerUnpublishVolumeRequest {
                    volume_id: volume_id.into(),
                    node_id: node_id.into(),
                    secrets: secrets(s),
                },
            ),
        )
        .map(drop)
    }

    fn controller_expand(
        &self,
        volume_id: &str,
        required_bytes: u64,
        limit_bytes: u64,
        mode: AccessMode,
        s: &Secrets,
    ) -> Result<u64> {
        let r = self.call(
            "ControllerExpandVolume",
            self.controller()
                .controller_expand_volume(proto::ControllerExpandVolumeRequest {
                    volume_id: volume_id.into(),
                    capacity_range: range(required_bytes, limit_bytes),
                    secrets: secrets(s),
                    volume_capability: Some(block(mode)),
                }),
        )?;
        Ok(unsigned(r.capacity_bytes))
    }

    fn get_capacity(
        &self,
        mode: Option<AccessMode>,
        parameters: &Map,
        t: Option<&Topology>,
    ) -> Result<Capacity> {
        let r = self.call(
            "GetCapacity",
            self.controller().get_capacity(proto::GetCapacityRequest {
                volume_capabilities: mode.map(block).into_iter().collect(),
                parameters: hash(parameters),
                accessible_topology: t.map(topology),
            }),
        )?;
        Ok(Capacity {
            available: unsigned(r.available_capacity),
            maximum: r.maximum_volume_size.map(unsigned),
            minimum: r.minimum_volume_size.map(unsigned),
        })
    }

    fn create_snapshot(
        &self,
        source_volume_id: &str,
        name: &str,
        parameters: &Map,
        s: &Secrets,
    ) -> Result<BackendSnapshot> {
        let r = self.call(
            "CreateSnapshot",
            self.controller()
                .create_snapshot(proto::CreateSnapshotRequest {
                    source_volume_id: source_volume_id.into(),
                    name: name.into(),
                    secrets: secrets(s),
                    parameters: hash(parameters),
                }),
        )?;
        let snap = r
            .snapshot
            .ok_or_else(|| self.invalid("CreateSnapshot", "no snapshot"))?;
        Ok(BackendSnapshot {
            id: snap.snapshot_id,
            source_volume_id: snap.source_volume_id,
            size_bytes: unsigned(snap.size_bytes),
            created: snap.creation_time.map(|t| (t.seconds, t.nanos)),
            ready: snap.ready_to_use,
        })
    }

    fn delete_snapshot(&self, snapshot_id: &str, s: &Secrets) -> Result<()> {
        self.call(
            "DeleteSnapshot",
            self.controller()
                .delete_snapshot(proto::DeleteSnapshotRequest {
                    snapshot_id: snapshot_id.into(),
                    secrets: secrets(s),
                }),
        )
        .map(drop)
    }

    fn snapshot_source(&self, snapshot_id: &str) -> Result<String> {
        let r = self.call(
            "ListSnapshots",
            self.controller()
                .list_snapshots(proto::ListSnapshotsRequest {
                    max_entries: 0,
                    starting_token: String::new(),
                    source_volume_id: String::new(),
                    snapshot_id: snapshot_id.into(),
                    secrets: HashMap::new(),
                }),
        )?;
        r.entries
            .into_iter()
            .filter_map(|e| e.snapshot)
            .find(|s| s.snapshot_id == snapshot_id)
            .map(|s| s.source_volume_id)
            .ok_or_else(|| BackendCallError {
                backend: self.endpoint.clone(),
                rpc: "ListSnapshots",
                code: Code::NotFound,
                message: format!("snapshot {snapshot_id} does not exist"),
            })
    }

    fn node_info(&self) -> Result<NodeInfo> {
        let r = self.call(
            "NodeGetInfo",
            self.node().node_get_info(proto::NodeGetInfoRequest {}),
        )?;
        if r.node_id.is_empty() {
            return Err(self.invalid("NodeGetInfo", "empty node_id"));
        }
        Ok(NodeInfo {
            node_id: r.node_id,
            max_volumes: r.max_volumes_per_node,
            topology: r.accessible_topology.map(|t| tree(t.segments)),
        })
    }

    fn node_stage(&self, req: &StageRequest<'_>) -> Result<()> {
        self.call(
            "NodeStageVolume",
            self.node()
                .node_stage_volume(proto::NodeStageVolumeRequest {
                    volume_id: req.volume_id.into(),
                    publish_context: hash(req.publish_context),
                    staging_target_path: path(req.staging_path),
                    volume_capability: Some(block(req.mode)),
                    secrets: secrets(req.secrets),
                    volume_context: hash(req.context),
                }),
        )
        .map(drop)
    }

    fn node_unstage(&self, volume_id: &str, staging_path: &Path) -> Result<()> {
        self.call(
            "NodeUnstageVolume",
            self.node()
                .node_unstage_volume(proto::NodeUnstageVolumeRequest {
                    volume_id: volume_id.into(),
                    staging_target_path: path(staging_path),
                }),
        )
        .map(drop)
    }

    fn node_publish(&self, req: &PublishRequest<'_>) -> Result<()> {
        self.call(
            "NodePublishVolume",
            self.node()
                .node_publish_volume(proto::NodePublishVolumeRequest {
                    volume_id: req.volume_id.into(),
                    publish_context: hash(req.publish_context),
                    staging_target_path: req.staging_path.map(path).unwrap_or_default(),
                    target_path: path(req.target_path),
                    volume_capability: Some(block(req.mode)),
                    readonly: req.readonly,
                    secrets: secrets(req.secrets),
                    volume_context: hash(req.context),
                }),
        )
        .map(drop)
    }

    fn node_unpublish(&self, volume_id: &str, target_path: &Path) -> Result<()> {
        self.call(
            "NodeUnpublishVolume",
            self.node()
                .node_unpublish_volume(proto::NodeUnpublishVolumeRequest {
                    volume_id: volume_id.into(),
                    target_path: path(target_path),
                }),
        )
        .map(drop)
    }

    fn node_expand(
        &self,
        volume_id: &str,
        volume_path: &Path,
        staging_path: Option<&Path>,
        required_bytes: u64,
        limit_bytes: u64,
        mode: AccessMode,
    ) -> Result<()> {
        self.call(
            "NodeExpandVolume",
            self.node()
                .node_expand_volume(proto::NodeExpandVolumeRequest {
                    volume_id: volume_id.into(),
                    volume_path: path(volume_path),
                    capacity_range: range(required_bytes, limit_bytes),
                    staging_target_path: staging_path.map(path).unwrap_or_default(),
                    volume_capability: Some(block(mode)),
                    secrets: HashMap::new(),
                }),
        )
        .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_values() {
        assert_eq!(
            socket_of("csi:unix:///backend/csi.sock").unwrap(),
            PathBuf::from("/backend/csi.sock")
        );
        assert_eq!(socket_of("csi:/b.sock").unwrap(), PathBuf::from("/b.sock"));
        for bad in ["unix:///b.sock", "csi:unix://rel.sock", "file:/x", ""] {
            assert!(socket_of(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn statuses_keep_their_code() {
        assert_eq!(code_of(tonic::Code::Unavailable), Code::Unavailable);
        assert_eq!(
            code_of(tonic::Code::DeadlineExceeded),
            Code::DeadlineExceeded
        );
        assert_eq!(code_of(tonic::Code::Unknown), Code::Unknown);
    }
}
