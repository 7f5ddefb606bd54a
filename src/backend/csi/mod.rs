//! A CSI driver as a storage backend: sealcsi stacked over any block-capable CSI driver (docs/stacked.md).
//!
//! The backend driver provisions, attaches, snapshots and replicates ciphertext; sealcsi asks it for a raw
//! BLOCK volume and builds the sealed stack on the device it publishes. [`CsiBackend`] is the small trait
//! the controller and node cores call, in core terms (no gRPC type crosses it):
//!
//! - [`grpc::GrpcBackend`]: the real one, a tonic client over the backend's unix socket
//!   (`--backend csi:unix:///backend/csi.sock`); it converts to and from `crate::csi::proto` itself;
//! - [`memory::MemoryBackend`]: an in-memory driver for host tests (volumes are files, publishing one
//!   hard-links it at the target path). Never what a user runs.
//!
//! Errors: every failed call is a [`BackendCallError`] that names the backend, the RPC and the backend's
//! gRPC [`Code`]. It is classified into [`Kind`] one to one (Kind has a variant for every gRPC code), so
//! the status sealcsi answers with carries the backend's code, and its message says that the backend
//! failed, not sealcsi.
//!
//! Every method blocks (it waits for the backend's answer): call from a blocking context, never from
//! inside an async task.

pub mod grpc;
pub mod memory;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;

use zeroize::Zeroize;

use crate::error::{Classify, Kind};
use crate::node::capability::AccessMode;

pub use grpc::GrpcBackend;
pub use memory::MemoryBackend;

/// A string map of the CSI protocol (parameters, contexts, topology segments).
pub type Map = BTreeMap<String, String>;

/// One topology: segments, key -> value.
pub type Topology = Map;

/// The `secrets` of a request, passed through to the backend untouched. Never printed; zeroed on drop.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secrets(BTreeMap<String, String>);

impl Secrets {
    pub fn new(map: impl IntoIterator<Item = (String, String)>) -> Self {
        Self(map.into_iter().collect())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &String)> {
        self.0.iter()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secrets({} entries)", self.0.len())
    }
}

impl Drop for Secrets {
    fn drop(&mut self) {
        for v in self.0.values_mut() {
            v.zeroize();
        }
    }
}

/// A gRPC status code other than OK, in core terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    Cancelled,
    Unknown,
    InvalidArgument,
    DeadlineExceeded,
    NotFound,
    AlreadyExists,
    PermissionDenied,
    ResourceExhausted,
    FailedPrecondition,
    Aborted,
    OutOfRange,
    Unimplemented,
    Internal,
    Unavailable,
    DataLoss,
    Unauthenticated,
}

impl Code {
    /// The kind that maps back to this code (`crate::csi::status::code_for`).
    pub fn kind(self) -> Kind {
        match self {
            Code::Cancelled => Kind::Cancelled,
            Code::Unknown => Kind::Unknown,
            Code::InvalidArgument => Kind::InvalidArgument,
            Code::DeadlineExceeded => Kind::DeadlineExceeded,
            Code::NotFound => Kind::NotFound,
            Code::AlreadyExists => Kind::AlreadyExists,
            Code::PermissionDenied => Kind::PermissionDenied,
            Code::ResourceExhausted => Kind::ResourceExhausted,
            Code::FailedPrecondition => Kind::FailedPrecondition,
            Code::Aborted => Kind::Aborted,
            Code::OutOfRange => Kind::OutOfRange,
            Code::Unimplemented => Kind::Unimplemented,
            Code::Internal => Kind::Internal,
            Code::Unavailable => Kind::Unavailable,
            Code::DataLoss => Kind::DataLoss,
            Code::Unauthenticated => Kind::Unauthenticated,
        }
    }

    /// The code's name as gRPC spells it.
    pub fn name(self) -> &'static str {
        match self {
            Code::Cancelled => "CANCELLED",
            Code::Unknown => "UNKNOWN",
            Code::InvalidArgument => "INVALID_ARGUMENT",
            Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
            Code::NotFound => "NOT_FOUND",
            Code::AlreadyExists => "ALREADY_EXISTS",
            Code::PermissionDenied => "PERMISSION_DENIED",
            Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
            Code::FailedPrecondition => "FAILED_PRECONDITION",
            Code::Aborted => "ABORTED",
            Code::OutOfRange => "OUT_OF_RANGE",
            Code::Unimplemented => "UNIMPLEMENTED",
            Code::Internal => "INTERNAL",
            Code::Unavailable => "UNAVAILABLE",
            Code::DataLoss => "DATA_LOSS",
            Code::Unauthenticated => "UNAUTHENTICATED",
        }
    }
}

/// A call to the backend driver failed (or its answer was unusable: [`Code::Internal`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("backend CSI driver {backend}: {rpc} failed with {}: {message}", code.name())]
pub struct BackendCallError {
    /// The backend's endpoint.
    pub backend: String,
    pub rpc: &'static str,
    pub code: Code,
    pub message: String,
}

impl Classify for BackendCallError {
    fn kind(&self) -> Kind {
        self.code.kind()
    }
}

pub type Result<T> = std::result::Result<T, BackendCallError>;

/// Controller RPCs the backend may advertise (those sealcsi forwards or needs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ControllerCap {
    CreateDeleteVolume,
    PublishUnpublishVolume,
    GetCapacity,
    CreateDeleteSnapshot,
    CloneVolume,
    ExpandVolume,
    SingleNodeMultiWriter,
}

/// Node RPCs the backend may advertise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum NodeCap {
    StageUnstageVolume,
    ExpandVolume,
    SingleNodeMultiWriter,
}

/// What the backend advertises.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    pub controller: BTreeSet<ControllerCap>,
    pub node: BTreeSet<NodeCap>,
    /// Whether the backend's plugin advertises topology constraints (VOLUME_ACCESSIBILITY_CONSTRAINTS).
    pub topology: bool,
}

/// Where a new volume's content comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContentSource {
    Snapshot(String),
    Volume(String),
}

/// The topology requirement of a CreateVolume.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TopologyRequirement {
    pub requisite: Vec<Topology>,
    pub preferred: Vec<Topology>,
}

/// A CreateVolume for the backend: always a raw BLOCK volume.
#[derive(Debug, Clone)]
pub struct CreateRequest {
    pub name: String,
    pub required_bytes: u64,
    pub limit_bytes: u64,
    pub mode: AccessMode,
    pub parameters: Map,
    pub secrets: Secrets,
    pub topology: Option<TopologyRequirement>,
    pub source: Option<ContentSource>,
}

/// A volume of the backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendVolume {
    pub id: String,
    pub capacity_bytes: u64,
    pub context: Map,
    pub topology: Vec<Topology>,
    pub source: Option<ContentSource>,
}

/// A snapshot of the backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSnapshot {
    pub id: String,
    pub source_volume_id: String,
    pub size_bytes: u64,
    /// Unix seconds and nanoseconds.
    pub created: Option<(i64, i32)>,
    pub ready: bool,
}

/// What GetCapacity answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    pub available: u64,
    pub maximum: Option<u64>,
    pub minimum: Option<u64>,
}

/// The backend's NodeGetInfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub node_id: String,
    pub max_volumes: i64,
    pub topology: Option<Topology>,
}

/// A NodeStageVolume (BLOCK) for the backend.
#[derive(Debug, Clone, Copy)]
pub struct StageRequest<'a> {
    pub volume_id: &'a str,
    pub publish_context: &'a Map,
    pub staging_path: &'a Path,
    pub mode: AccessMode,
    pub context: &'a Map,
    pub secrets: &'a Secrets,
}

/// A NodePublishVolume (BLOCK) for the backend.
#[derive(Debug, Clone, Copy)]
pub struct PublishRequest<'a> {
    pub volume_id: &'a str,
    pub publish_context: &'a Map,
    /// `None` when the backend does not advertise STAGE_UNSTAGE_VOLUME.
    pub staging_path: Option<&'a Path>,
    pub target_path: &'a Path,
    pub mode: AccessMode,
    pub readonly: bool,
    pub context: &'a Map,
    pub secrets: &'a Secrets,
}

/// The backend driver, in core terms. Every call is one RPC of the backend, and as idempotent as the CSI
/// spec makes that RPC.
pub trait CsiBackend: Send + Sync + fmt::Debug {
    /// The backend's name in messages (its endpoint).
    fn name(&self) -> &str;
    /// GetPluginInfo's name.
    fn plugin_name(&self) -> Result<String>;
    /// Probe: `Ok(false)` if the backend says it is not ready.
    fn probe(&self) -> Result<bool>;
    /// Controller, node and plugin capabilities.
    fn capabilities(&self) -> Result<Capabilities>;
    fn create_volume(&self, req: &CreateRequest) -> Result<BackendVolume>;
    fn delete_volume(&self, volume_id: &str, secrets: &Secrets) -> Result<()>;
    /// ValidateVolumeCapabilities with a BLOCK capability: `Ok` if the backend confirms it (its NOT_FOUND
    /// for an unknown volume kept; a refusal is [`Code::InvalidArgument`]).
    fn validate_block(&self, volume_id: &str, context: &Map) -> Result<()>;
    /// ControllerPublishVolume (BLOCK); returns the publish context.
    fn controller_publish(
        &self,
        volume_id: &str,
        node_id: &str,
        mode: AccessMode,
        readonly: bool,
        context: &Map,
        secrets: &Secrets,
    ) -> Result<Map>;
    fn controller_unpublish(&self, volume_id: &str, node_id: &str, secrets: &Secrets)
    -> Result<()>;
    /// ControllerExpandVolume (BLOCK); returns the new capacity.
    fn controller_expand(
        &self,
        volume_id: &str,
        required_bytes: u64,
        limit_bytes: u64,
        mode: AccessMode,
        secrets: &Secrets,
    ) -> Result<u64>;
    /// GetCapacity for BLOCK volumes of `mode`.
    fn get_capacity(
        &self,
        mode: Option<AccessMode>,
        parameters: &Map,
        topology: Option<&Topology>,
    ) -> Result<Capacity>;
    fn create_snapshot(
        &self,
        source_volume_id: &str,
        name: &str,
        parameters: &Map,
        secrets: &Secrets,
    ) -> Result<BackendSnapshot>;
    fn delete_snapshot(&self, snapshot_id: &str, secrets: &Secrets) -> Result<()>;
    /// The volume snapshot `snapshot_id` was taken from (ListSnapshots by id); NOT_FOUND if none.
    fn snapshot_source(&self, snapshot_id: &str) -> Result<String>;
    fn node_info(&self) -> Result<NodeInfo>;
    fn node_stage(&self, req: &StageRequest<'_>) -> Result<()>;
    fn node_unstage(&self, volume_id: &str, staging_path: &Path) -> Result<()>;
    fn node_publish(&self, req: &PublishRequest<'_>) -> Result<()>;
    fn node_unpublish(&self, volume_id: &str, target_path: &Path) -> Result<()>;
    /// NodeExpandVolume of the published BLOCK volume at `volume_path`.
    fn node_expand(
        &self,
        volume_id: &str,
        volume_path: &Path,
        staging_path: Option<&Path>,
        required_bytes: u64,
        limit_bytes: u64,
        mode: AccessMode,
    ) -> Result<()>;
    /// `Ok` if what NodePublishVolume left at `target` is the kind of device this backend publishes (a
    /// block device node for a real driver). sealcsi never formats anything else.
    fn check_published(&self, target: &Path) -> std::result::Result<(), String> {
        if crate::backend::is_block_device(target) {
            Ok(())
        } else {
            Err(format!(
                "the backend published no block device at {} (it must publish a BLOCK volume's device node there)",
                target.display()
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_keep_the_backend_code_and_say_where_they_came_from() {
        let e = BackendCallError {
            backend: "unix:///b.sock".into(),
            rpc: "CreateVolume",
            code: Code::ResourceExhausted,
            message: "pool full".into(),
        };
        assert_eq!(e.kind(), Kind::ResourceExhausted);
        let shown = e.to_string();
        assert!(
            shown.starts_with(
                "backend CSI driver unix:///b.sock: CreateVolume failed with RESOURCE_EXHAUSTED"
            ),
            "{shown}"
        );
        for code in [
            Code::Cancelled,
            Code::Unknown,
            Code::DeadlineExceeded,
            Code::PermissionDenied,
            Code::Unimplemented,
            Code::DataLoss,
            Code::Unauthenticated,
            Code::Unavailable,
            Code::NotFound,
        ] {
            assert_eq!(
                format!("{:?}", crate::csi::status::code_for(code.kind())),
                format!("{code:?}"),
                "{code:?} keeps its gRPC code"
            );
        }
    }

    #[test]
    fn secrets_never_print() {
        let s = Secrets::new([("password".to_string(), "hunter2".to_string())]);
        let shown = format!("{s:?}");
        assert!(!shown.contains("hunter2") && !shown.contains("password"));
    }
}
