//! The CSI plugin served in this process over a real unix socket, and a gRPC channel to it. Shared by
//! the host tests, the guest CSI suite and the control-path benchmark (each includes this file with
//! `#[path]`), so there is one harness to keep right.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use sealcsi::csi::proto::controller_client::ControllerClient;
use sealcsi::csi::proto::identity_client::IdentityClient;
use sealcsi::csi::proto::node_client::NodeClient;
use sealcsi::csi::{CsiError, PluginConfig, PluginDeps};
use tokio::sync::oneshot;
use tonic::transport::{Channel, Endpoint, Uri};

/// A serving plugin: stop it with [`Served::stop`].
pub struct Served {
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), CsiError>>>,
    pub channel: Channel,
}

/// Serves `config` with `deps` until stopped, and connects to its socket.
pub async fn serve(config: PluginConfig, deps: PluginDeps) -> Served {
    let socket = sealcsi::csi::socket_path(&config.endpoint).expect("a unix endpoint");
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(sealcsi::csi::serve_until(config, Some(deps), async move {
        let _ = stopped.await;
    }));
    Served {
        stop: Some(stop),
        task: Some(task),
        channel: connect(socket).await,
    }
}

/// The endpoint of a socket at `path`.
pub fn endpoint(path: &Path) -> String {
    format!("unix://{}", path.display())
}

/// Waits (up to 10 s) for the socket at `path` to answer, then opens a channel to it.
pub async fn connect(path: PathBuf) -> Channel {
    for _ in 0..1000 {
        if tokio::net::UnixStream::connect(&path).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Endpoint::try_from("http://localhost")
        .expect("a valid endpoint")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
        .expect("the plugin's socket accepts a connection")
}

impl Served {
    pub fn identity(&self) -> IdentityClient<Channel> {
        IdentityClient::new(self.channel.clone())
    }

    pub fn controller(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.channel.clone())
    }

    pub fn node(&self) -> NodeClient<Channel> {
        NodeClient::new(self.channel.clone())
    }

    /// Asks the plugin to stop and waits for it to drain and return.
    pub async fn stop(&mut self) -> Result<(), CsiError> {
        let _ = self.stop.take().expect("the plugin is running").send(());
        self.task
            .take()
            .expect("the plugin is running")
            .await
            .expect("the plugin's task did not panic")
    }
}
