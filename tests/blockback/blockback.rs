//! blockback: a small block-volume CSI driver written for sealcsi's tests. It is never shipped and
//! never what a user runs; it stands in for a real block driver (EBS, PD, RBD) under the stacked
//! sealcsi in the guest suites.
//!
//! It serves Identity, Controller and Node on one unix socket. Volumes are sparse files in the state
//! directory (see [`store`] for its layout); staging attaches a file to a loop device, publishing
//! bind-mounts the loop device node onto the target file, snapshots and clones are copies of the file,
//! expansion grows the file (controller) and the loop device (node). Only raw BLOCK volumes.
//!
//! ```text
//! blockback --endpoint unix:///path/csi.sock --state-dir DIR --node-id ID
//!           [--topology-key topology.blockback.test/node] [--fault stall:<RpcName>[,stall:<RpcName>...]]
//! ```
//!
//! `--fault stall:NodeStageVolume` (also `BLOCKBACK_FAULT`) makes that call do its side effects, create
//! `DIR/stalled/NodeStageVolume`, and never answer, so a test can SIGKILL the backend mid-step.

mod error;
mod service;
mod stage;
mod store;

use std::collections::HashSet;
use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Parser;
use sealcsi::csi::proto::{
    controller_server::ControllerServer, identity_server::IdentityServer, node_server::NodeServer,
};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnixListenerStream;

/// blockback's command line.
#[derive(Debug, Parser)]
#[command(
    name = "blockback",
    version,
    about = "A block-volume CSI driver for sealcsi's tests"
)]
struct Args {
    /// The socket to serve on: unix:///path/csi.sock.
    #[arg(long)]
    endpoint: String,
    /// Where the volumes, snapshots and records live.
    #[arg(long)]
    state_dir: PathBuf,
    /// This node's id (NodeGetInfo, accessible topology, the only node ControllerPublish knows).
    #[arg(long)]
    node_id: String,
    /// The topology key whose value is the node id.
    #[arg(long, default_value = "topology.blockback.test/node")]
    topology_key: String,
    /// Faults to inject: `stall:<RpcName>`, comma-separated.
    #[arg(long, env = "BLOCKBACK_FAULT", default_value = "")]
    fault: String,
}

fn parse_faults(spec: &str) -> anyhow::Result<HashSet<String>> {
    let mut stall = HashSet::new();
    for f in spec.split(',').map(str::trim).filter(|f| !f.is_empty()) {
        match f.split_once(':') {
            Some(("stall", rpc)) if !rpc.is_empty() => {
                stall.insert(rpc.to_string());
            }
            _ => bail!("unknown fault {f:?} (want stall:<RpcName>, e.g. stall:NodeStageVolume)"),
        }
    }
    Ok(stall)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BLOCKBACK_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    if args.node_id.is_empty() {
        bail!("--node-id is empty");
    }
    let stall = parse_faults(&args.fault)?;
    let socket = sealcsi::csi::socket_path(&args.endpoint)?;
    let store = Arc::new(store::Store::open(&args.state_dir)?);
    let shared = Arc::new(service::Shared {
        node: stage::NodeCore::new(store.clone()),
        store,
        node_id: args.node_id,
        topology_key: args.topology_key,
        stall,
    });

    // A socket left by a killed predecessor is removed; anything else at the path is refused.
    match std::fs::symlink_metadata(&socket) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(&socket)
            .with_context(|| format!("removing stale socket {}", socket.display()))?,
        Ok(_) => bail!("{} exists and is not a socket", socket.display()),
        Err(_) => {}
    }
    if let Some(parent) = socket.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let listener = tokio::net::UnixListener::bind(&socket)
        .with_context(|| format!("binding {}", socket.display()))?;
    tracing::info!(socket = %socket.display(), node.id = %shared.node_id, faults = ?shared.stall, "blockback serving");
    let incoming = UnixListenerStream::new(listener)
        .map(|conn| conn.map(sealcsi::csi::authority::AuthorityFix::new));
    tonic::transport::Server::builder()
        .add_service(IdentityServer::new(service::IdentityService))
        .add_service(ControllerServer::new(service::ControllerService(
            shared.clone(),
        )))
        .add_service(NodeServer::new(service::NodeService(shared)))
        .serve_with_incoming_shutdown(incoming, sealcsi::csi::shutdown_signal())
        .await?;
    let _ = std::fs::remove_file(&socket);
    Ok(())
}
