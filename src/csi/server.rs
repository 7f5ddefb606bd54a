//! The plugin's server: the unix socket (stale ones removed, live ones left alone), the services it
//! serves for its mode, and a drain of in-flight calls on SIGTERM/SIGINT.

use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnixListenerStream;

use super::{
    CsiError, DRAIN_TIMEOUT, PluginConfig, PluginDeps, SOCKET_MODE, Shared, controller, guard,
    identity, node, proto,
};
use crate::controller::Provisioner;
use crate::node::NodeCore;
use crate::store::Store;

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
/// `deps` may be `None` only for a stacked controller (`--mode controller --backend ...`): it talks to
/// the backend driver alone, so it runs on any node, with neither device-mapper nor a sealing source.
pub async fn serve(config: PluginConfig, deps: Option<PluginDeps>) -> Result<(), CsiError> {
    serve_until(config, deps, shutdown_signal()).await
}

/// How long the plugin waits at start for the backend driver of a stacked plugin to answer (it runs
/// in a container of the same pod, which may start later).
pub const BACKEND_WAIT: Duration = Duration::from_secs(60);

/// The backend driver's client, once it answers a Probe (within [`BACKEND_WAIT`]).
async fn connect_backend(
    backend: &str,
) -> Result<Arc<dyn crate::backend::csi::CsiBackend>, CsiError> {
    use crate::backend::csi::CsiBackend;
    let client = crate::backend::csi::GrpcBackend::new(backend).map_err(CsiError::Backend)?;
    let deadline = tokio::time::Instant::now() + BACKEND_WAIT;
    loop {
        let c = client.clone();
        let probe = tokio::task::spawn_blocking(move || c.probe())
            .await
            .map_err(|e| CsiError::Backend(e.to_string()))?;
        match probe {
            Ok(true) => break,
            Ok(false) | Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Ok(false) => {
                return Err(CsiError::Backend(format!("{backend} says it is not ready")));
            }
            Err(e) => return Err(CsiError::Backend(e.to_string())),
        }
    }
    let c = client.clone();
    let name = tokio::task::spawn_blocking(move || c.plugin_name())
        .await
        .map_err(|e| CsiError::Backend(e.to_string()))?
        .map_err(|e| CsiError::Backend(e.to_string()))?;
    tracing::info!(backend, backend.plugin = %name, "stacked over a CSI driver");
    Ok(Arc::new(client))
}

/// Serves until `shutdown` completes, then drains.
pub async fn serve_until(
    config: PluginConfig,
    deps: Option<PluginDeps>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), CsiError> {
    if config.node_id.is_empty() {
        return Err(CsiError::Config("node id is empty".into()));
    }
    if config.driver_name.is_empty() {
        return Err(CsiError::Config("driver name is empty".into()));
    }
    if deps.is_none() && config.needs_kernel() {
        return Err(CsiError::Config(
            "the node service and the node-local controller need device-mapper and a sealing \
             source; only a stacked controller (--mode controller --backend ...) runs without"
                .into(),
        ));
    }
    let path = socket_path(&config.endpoint)?;
    let store = Store::open(&config.state_dir)?.with_overcommit(config.overcommit_ratio)?;
    // Always collected (cheap); served only when an address is configured.
    let metrics = match &deps {
        Some(deps) => {
            let engine = deps.engine.clone();
            crate::metrics::Metrics::with_failure_counts(
                Some(deps.dm.clone()),
                Some(Box::new(move |dm_name| engine.integrity_failures(dm_name))),
            )
        }
        None => crate::metrics::Metrics::new(None),
    };
    let backend = match &config.backend {
        Some(b) => Some(connect_backend(b).await?),
        None => None,
    };
    let stacked = match (&backend, config.mode.controller()) {
        (Some(b), true) => {
            let b = b.clone();
            let core = tokio::task::spawn_blocking(move || {
                crate::controller::stacked::StackedProvisioner::new(b)
            })
            .await
            .map_err(|e| CsiError::Backend(e.to_string()))?
            .map_err(|e| CsiError::Backend(e.to_string()))?;
            Some(Arc::new(core))
        }
        _ => None,
    };
    // `needs_kernel` was checked above: whatever needs `deps` below finds it.
    let shared = Arc::new(Shared {
        provisioner: deps
            .as_ref()
            .filter(|_| config.mode.controller() && backend.is_none())
            .map(|deps| Arc::new(Provisioner::new(store.clone(), deps.dm.clone()))),
        stacked,
        backend: backend.clone(),
        node: deps.as_ref().filter(|_| config.mode.node()).map(|deps| {
            let core = NodeCore::new(store.clone(), deps.engine.clone(), deps.mounter.clone())
                .with_metrics(metrics.clone());
            Arc::new(match &backend {
                Some(b) => core.with_backend(b.clone()),
                None => core,
            })
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
    let stacked_controller = shared.stacked.is_some().then(|| {
        proto::controller_server::ControllerServer::new(
            super::stacked::StackedControllerService::new(shared.clone()),
        )
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
        .add_optional_service(stacked_controller)
        .add_optional_service(node);

    // Every connection goes through the authority fix: gRPC C-core clients send the socket path as
    // `:authority`, which h2 refuses (see `authority`).
    let incoming =
        UnixListenerStream::new(listener).map(|conn| conn.map(super::authority::AuthorityFix::new));
    let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
    let signal = async move {
        shutdown.await;
        let _ = stopping_tx.send(());
    };
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
    use crate::csi::DEFAULT_ENDPOINT;

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
