//! The CSI plugin's gRPC edge: Identity, Controller and Node services on a unix socket.
//!
//! Handlers are thin: they check the request's shape (INVALID_ARGUMENT), take the per-volume guard
//! ([`guard`], ABORTED for a concurrent call on the same volume), and call the core
//! ([`crate::controller::Provisioner`], [`crate::node::NodeCore`]) on a blocking thread. Errors become
//! statuses in one place ([`status`]); [`server`] owns the socket, the serving and the drain. Nothing from a request's `secrets` map is read or logged
//! (sealcsi takes no secrets), and the request types that carry secrets have a `Debug` that prints no
//! field (see build.rs).

pub mod authority;
pub mod controller;
pub mod convert;
pub mod guard;
pub mod identity;
pub mod node;
pub mod server;
pub mod stacked;
pub mod status;

/// The generated CSI v1.12.0 types and services (`proto/csi.proto`, package `csi.v1`).
pub mod proto {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("csi.v1");

    /// `Debug` for the messages that carry secrets (generated without one, see build.rs): the type
    /// name only, never a field.
    macro_rules! redacted_debug {
        ($($t:ident),* $(,)?) => {
            $(impl std::fmt::Debug for $t {
                fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.debug_struct(stringify!($t)).finish_non_exhaustive()
                }
            })*
        };
    }

    redacted_debug!(
        CreateVolumeRequest,
        DeleteVolumeRequest,
        ControllerPublishVolumeRequest,
        ControllerUnpublishVolumeRequest,
        ValidateVolumeCapabilitiesRequest,
        ControllerModifyVolumeRequest,
        CreateSnapshotRequest,
        DeleteSnapshotRequest,
        ListSnapshotsRequest,
        GetSnapshotRequest,
        ControllerExpandVolumeRequest,
        NodeStageVolumeRequest,
        NodePublishVolumeRequest,
        NodeExpandVolumeRequest,
        CreateVolumeGroupSnapshotRequest,
        DeleteVolumeGroupSnapshotRequest,
        GetVolumeGroupSnapshotRequest,
        GetMetadataAllocatedRequest,
        GetMetadataDeltaRequest,
    );
}

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tonic::Status;

use crate::controller::Provisioner;
use crate::dm::DeviceMapper;
use crate::node::{KernelEngine, Mounter, NodeCore, SystemMounter, VolumeEngine};
use crate::sealing::SealingSource;
use crate::store::StoreError;
pub use server::{serve, serve_until, shutdown_signal, socket_path};

/// The driver name registered with Kubernetes (CSIDriver object, StorageClass provisioner).
pub const DEFAULT_DRIVER_NAME: &str = "sealcsi.io";
/// The topology key of the node a volume lives on.
pub const TOPOLOGY_KEY: &str = "topology.sealcsi.io/node";
/// Where the sidecars expect the socket.
pub const DEFAULT_ENDPOINT: &str = "unix:///csi/csi.sock";
/// Permissions of the socket: owner and group (the sidecars run as root in the pod).
pub const SOCKET_MODE: u32 = 0o660;
/// How long in-flight calls get to finish after SIGTERM/SIGINT.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

/// Which services this process serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Identity + Controller.
    Controller,
    /// Identity + Node.
    Node,
    /// Identity + Controller + Node (the volumes are node-local, so one process per node can do both).
    All,
}

impl Mode {
    pub fn controller(self) -> bool {
        matches!(self, Mode::Controller | Mode::All)
    }

    pub fn node(self) -> bool {
        matches!(self, Mode::Node | Mode::All)
    }
}

/// What the plugin serves, where, and as whom.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginConfig {
    /// `unix:///path/to/csi.sock` (a bare absolute path is accepted too).
    pub endpoint: String,
    /// This node's id (the Kubernetes node name).
    pub node_id: String,
    pub driver_name: String,
    pub mode: Mode,
    /// Volumes live under `<state_dir>/volumes/`.
    pub state_dir: PathBuf,
    /// Where to serve Prometheus metrics (`GET /metrics`); off when `None`.
    pub metrics_address: Option<std::net::SocketAddr>,
    /// How many times the state directory's disk the sparse volumes may be promised (1.0: never more
    /// than the disk holds).
    pub overcommit_ratio: f64,
    /// Stack over this CSI driver (`csi:unix:///path/to/csi.sock`, docs/stacked.md); `None`: node-local
    /// volume files.
    pub backend: Option<String>,
}

impl PluginConfig {
    /// Whether this plugin needs device-mapper and a sealing source: the node service does, and so
    /// does the node-local controller (it checks the volumes it deletes are not open); a stacked
    /// controller alone does not.
    pub fn needs_kernel(&self) -> bool {
        self.mode.node() || self.backend.is_none()
    }

    /// A configuration with the default driver name.
    pub fn new(
        endpoint: impl Into<String>,
        node_id: impl Into<String>,
        mode: Mode,
        state_dir: impl Into<PathBuf>,
    ) -> Self {
        Self {
            endpoint: endpoint.into(),
            node_id: node_id.into(),
            driver_name: DEFAULT_DRIVER_NAME.to_string(),
            mode,
            state_dir: state_dir.into(),
            metrics_address: None,
            overcommit_ratio: 1.0,
            backend: None,
        }
    }
}

/// The kernel-facing parts the plugin runs on: real ones ([`PluginDeps::kernel`]) or in-memory ones
/// (host tests).
#[derive(Clone)]
pub struct PluginDeps {
    pub dm: Arc<dyn DeviceMapper>,
    pub engine: Arc<dyn VolumeEngine>,
    pub mounter: Arc<dyn Mounter>,
}

impl std::fmt::Debug for PluginDeps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PluginDeps")
    }
}

/// Integrity failures counted from `/dev/kmsg` (followed on a thread of its own), or `None`, said once
/// in the log, where the kernel log cannot be read.
fn integrity_failures(dm: Arc<dyn DeviceMapper>) -> Option<Arc<crate::health::IntegrityFailures>> {
    let started = crate::health::IntegrityFailures::new(dm, Arc::new(crate::health::Kmsg))
        .and_then(|f| {
            f.follow().map_err(|source| crate::health::LogError::Io {
                op: "start the follower thread",
                source,
            })?;
            Ok(f)
        });
    match started {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::warn!(error = %e, "integrity failures (dm-crypt AEAD errors) will not be reported in volume conditions");
            None
        }
    }
}

impl PluginDeps {
    /// The real kernel: device-mapper through ioctls, mount(2), and `source` for sealing.
    pub fn kernel(source: Box<dyn SealingSource>) -> Result<Self, CsiError> {
        Self::kernel_with_broker(source, None)
    }

    /// As [`PluginDeps::kernel`], with the node's key broker for `kbs` keyslots.
    pub fn kernel_with_broker(
        source: Box<dyn SealingSource>,
        broker: Option<Box<dyn SealingSource>>,
    ) -> Result<Self, CsiError> {
        let dm: Arc<dyn DeviceMapper> = Arc::new(crate::dm::KernelDm::new()?);
        let source: Arc<dyn SealingSource> = Arc::from(source);
        let broker = broker.map(Arc::from);
        let failures = integrity_failures(dm.clone());
        Ok(Self {
            engine: Arc::new(
                KernelEngine::new(dm.clone(), source)
                    .with_broker(broker)
                    .with_integrity_failures(failures),
            ),
            dm,
            mounter: Arc::new(SystemMounter),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CsiError {
    /// The configuration is unusable (endpoint scheme, empty node id).
    #[error("invalid plugin configuration: {0}")]
    Config(String),
    #[error("socket {path}: {source}")]
    Socket {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Dm(#[from] crate::dm::DmError),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The backend driver of a stacked plugin is unusable.
    #[error("backend: {0}")]
    Backend(String),
}

/// What every service shares.
pub(crate) struct Shared {
    pub config: PluginConfig,
    /// `None` only in a stacked controller ([`PluginConfig::needs_kernel`]).
    pub deps: Option<PluginDeps>,
    pub guards: guard::OpGuards,
    pub provisioner: Option<Arc<Provisioner>>,
    /// The controller core of a stacked plugin (`PluginConfig::backend`), in place of `provisioner`.
    pub stacked: Option<Arc<crate::controller::stacked::StackedProvisioner>>,
    /// The backend driver of a stacked plugin (Probe asks it too).
    pub backend: Option<Arc<dyn crate::backend::csi::CsiBackend>>,
    pub node: Option<Arc<NodeCore>>,
}

/// Runs `f` on a blocking thread (the core does ioctls, runs mkfs, mounts), inside the caller's span.
/// Runs `op` on `core` under the guard of `key` (ABORTED while another call holds it), on a blocking
/// thread; the core's error becomes a status here, once.
pub(crate) async fn guarded<C, T, E, F>(
    guards: &guard::OpGuards,
    key: &str,
    core: Arc<C>,
    op: F,
) -> Result<T, Status>
where
    C: Send + Sync + ?Sized + 'static,
    T: Send + 'static,
    E: crate::error::Classify,
    F: FnOnce(&C) -> Result<T, E> + Send + 'static,
{
    let guard = guards
        .try_acquire(key)
        .map_err(|e| status::from_error(&e))?;
    blocking(move || {
        let _guard = guard;
        op(&core).map_err(|e| status::from_error(&e))
    })
    .await
}

pub(crate) async fn blocking<T, F>(f: F) -> Result<T, Status>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, Status> + Send + 'static,
{
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || span.in_scope(f))
        .await
        .map_err(|e| status::internal(format!("the operation's task failed: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_with_secrets_never_print_them() {
        let req = proto::NodeStageVolumeRequest {
            volume_id: "sv-1".into(),
            secrets: std::collections::HashMap::from([("key".into(), "hunter2".into())]),
            ..Default::default()
        };
        let shown = format!("{req:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("key"),
            "{shown}"
        );
        assert_eq!(shown, "NodeStageVolumeRequest { .. }");
        let shown = format!("{:?}", proto::CreateVolumeRequest::default());
        assert_eq!(shown, "CreateVolumeRequest { .. }");
    }
}
