//! The CSI plugin's gRPC edge: Identity, Controller and Node services on a unix socket.
//!
//! Handlers are thin: they check the request's shape (INVALID_ARGUMENT), take the per-volume guard
//! ([`guard`], ABORTED for a concurrent call on the same volume), and call the core
//! ([`crate::provision::Provisioner`], [`crate::node::NodeCore`]) on a blocking thread. Errors become
//! statuses in one place ([`status`]). Nothing from a request's `secrets` map is read or logged
//! (sealcsi takes no secrets), and the request types that carry secrets have a `Debug` that prints no
//! field (see build.rs).

pub mod authority;
pub mod controller;
pub mod convert;
pub mod guard;
pub mod identity;
pub mod node;
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

use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::Status;

use crate::dm::DeviceMapper;
use crate::node::{KernelEngine, Mounter, NodeCore, SystemMounter, VolumeEngine};
use crate::provision::{ProvisionError, Provisioner, Store};
use crate::sealing::SealingSource;

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
#[derive(Debug, Clone, PartialEq, Eq)]
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
}

impl PluginConfig {
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

impl PluginDeps {
    /// The real kernel: device-mapper through ioctls, mount(2), and `source` for sealing.
    pub fn kernel(source: Box<dyn SealingSource>) -> Result<Self, CsiError> {
        let dm: Arc<dyn DeviceMapper> = Arc::new(crate::dm::KernelDm::new()?);
        let source: Arc<dyn SealingSource> = Arc::from(source);
        Ok(Self {
            engine: Arc::new(KernelEngine::new(dm.clone(), source)),
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
    Provision(#[from] ProvisionError),
    #[error(transparent)]
    Dm(#[from] crate::dm::DmError),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// What every service shares.
pub(crate) struct Shared {
    pub config: PluginConfig,
    pub deps: PluginDeps,
    pub guards: guard::OpGuards,
    pub provisioner: Option<Arc<Provisioner>>,
    pub node: Option<Arc<NodeCore>>,
}

/// Runs `f` on a blocking thread (the core does ioctls, runs mkfs, mounts), inside the caller's span.
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

/// The socket path of a `unix://` endpoint.
pub fn socket_path(endpoint: &str) -> Result<PathBuf, CsiError> {
    let path = endpoint
        .strip_prefix("unix://")
        .or_else(|| endpoint.strip_prefix("unix:"))
        .unwrap_or(endpoint);
    let path = Path::new(path);
    if !path.is_absolute()
        || endpoint.starts_with("tcp:")
        || endpoint.contains("://") && !endpoint.starts_with("unix://")
    {
        return Err(CsiError::Config(format!(
            "endpoint {endpoint:?} is not a unix socket with an absolute path (unix:///csi/csi.sock)"
        )));
    }
    Ok(path.to_path_buf())
}

/// Removes a stale socket (nobody answers on it); refuses to touch a live one or a non-socket.
fn prepare_socket(path: &Path) -> Result<(), CsiError> {
    let err = |source| CsiError::Socket {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "another process is serving on this socket",
                )));
            }
            tracing::info!(socket = %path.display(), "removing stale socket");
            std::fs::remove_file(path).map_err(err)?;
        }
        Ok(_) => {
            return Err(err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "exists and is not a socket; refusing to remove it",
            )));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(err)?;
    }
    Ok(())
}

/// SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; only SIGINT stops the plugin");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining in-flight calls"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: draining in-flight calls"),
    }
}

/// Serves until SIGTERM/SIGINT, then lets in-flight calls finish (up to [`DRAIN_TIMEOUT`]).
pub async fn serve(config: PluginConfig, deps: PluginDeps) -> Result<(), CsiError> {
    serve_until(config, deps, shutdown_signal()).await
}

/// Serves until `shutdown` completes, then drains.
pub async fn serve_until(
    config: PluginConfig,
    deps: PluginDeps,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), CsiError> {
    if config.node_id.is_empty() {
        return Err(CsiError::Config("node id is empty".into()));
    }
    if config.driver_name.is_empty() {
        return Err(CsiError::Config("driver name is empty".into()));
    }
    let path = socket_path(&config.endpoint)?;
    let store = Store::open(&config.state_dir)?;
    // Always collected (cheap); served only when an address is configured.
    let metrics = crate::metrics::Metrics::new(Some(deps.dm.clone()));
    let shared = Arc::new(Shared {
        provisioner: config
            .mode
            .controller()
            .then(|| Arc::new(Provisioner::new(store.clone(), deps.dm.clone()))),
        node: config.mode.node().then(|| {
            Arc::new(
                NodeCore::new(store.clone(), deps.engine.clone(), deps.mounter.clone())
                    .with_metrics(metrics.clone()),
            )
        }),
        guards: guard::OpGuards::new(),
        config,
        deps,
    });

    prepare_socket(&path)?;
    let listener = tokio::net::UnixListener::bind(&path).map_err(|source| CsiError::Socket {
        path: path.clone(),
        source,
    })?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(SOCKET_MODE)).map_err(
        |source| CsiError::Socket {
            path: path.clone(),
            source,
        },
    )?;
    tracing::info!(
        socket = %path.display(),
        driver = %shared.config.driver_name,
        node.id = %shared.config.node_id,
        mode = ?shared.config.mode,
        "CSI plugin serving"
    );

    let identity =
        proto::identity_server::IdentityServer::new(identity::IdentityService::new(shared.clone()));
    let controller = shared.provisioner.is_some().then(|| {
        proto::controller_server::ControllerServer::new(controller::ControllerService::new(
            shared.clone(),
        ))
    });
    let node = shared
        .node
        .is_some()
        .then(|| proto::node_server::NodeServer::new(node::NodeService::new(shared.clone())));
    let metrics_server = shared.config.metrics_address.map(|addr| {
        let metrics = metrics.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::metrics::serve(addr, metrics).await {
                tracing::error!(%addr, error = %e, "metrics endpoint stopped");
            }
        })
    });
    let router = tonic::transport::Server::builder()
        .layer(crate::metrics::MetricsLayer::new(metrics))
        .add_service(identity)
        .add_optional_service(controller)
        .add_optional_service(node);

    let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
    let signal = async move {
        shutdown.await;
        let _ = stopping_tx.send(());
    };
    // Any `:authority` is accepted on the socket (gRPC C-core sends the socket path): see `authority`.
    let incoming =
        UnixListenerStream::new(listener).map(|conn| conn.map(authority::AuthorityFix::new));
    let serving = router.serve_with_incoming_shutdown(incoming, signal);
    tokio::pin!(serving);
    let result = tokio::select! {
        r = &mut serving => r.map_err(CsiError::from),
        _ = async {
            if stopping_rx.await.is_ok() {
                tokio::time::sleep(DRAIN_TIMEOUT).await;
            } else {
                std::future::pending::<()>().await;
            }
        } => {
            tracing::warn!(timeout = ?DRAIN_TIMEOUT, "in-flight calls did not finish in time; stopping anyway");
            Ok(())
        }
    };
    if let Err(e) = std::fs::remove_file(&path)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(socket = %path.display(), error = %e, "could not remove the socket");
    }
    if let Some(task) = metrics_server {
        task.abort();
    }
    tracing::info!("CSI plugin stopped");
    result
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

    #[test]
    fn endpoints() {
        assert_eq!(
            socket_path("unix:///csi/csi.sock").unwrap(),
            PathBuf::from("/csi/csi.sock")
        );
        assert_eq!(
            socket_path("unix:/csi/csi.sock").unwrap(),
            PathBuf::from("/csi/csi.sock")
        );
        assert_eq!(
            socket_path("/csi/csi.sock").unwrap(),
            PathBuf::from("/csi/csi.sock")
        );
        for bad in [
            "tcp://0.0.0.0:10000",
            "unix://relative.sock",
            "csi.sock",
            "http://x/y",
        ] {
            assert!(socket_path(bad).is_err(), "{bad}");
        }
        assert_eq!(
            socket_path(DEFAULT_ENDPOINT).unwrap(),
            PathBuf::from("/csi/csi.sock")
        );
    }

    #[test]
    fn stale_sockets_are_removed_but_nothing_else() {
        let d = tempfile::tempdir().unwrap();
        let sock = d.path().join("s.sock");
        drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
        prepare_socket(&sock).unwrap();
        assert!(!sock.exists());
        let live = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        assert!(prepare_socket(&sock).is_err());
        drop(live);
        let file = d.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        assert!(prepare_socket(&file).is_err());
        assert!(file.exists());
    }
}
