//! Other gRPC implementations than tonic against the real plugin server on a unix socket (in-memory
//! device-mapper, engine and mounter, as in tests/csi_host.rs). Runs on any host (`cargo test`).
//!
//! gRPC C-core (Python grpcio here; the C++, Ruby and PHP clients and Apache Mesos share it) sends the
//! percent-encoded socket path as `:authority` for a `unix:` target. h2 rejects that authority with
//! RST_STREAM(PROTOCOL_ERROR) unless the server rewrites it (sealcsi::csi::authority).
//!
//! Python and grpcio are test dependencies (tests/install-deps.sh installs them). A missing one fails
//! the test with a message, unless SEALCSI_ALLOW_SKIP contains `grpcio`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use sealcsi::csi::proto::controller_client::ControllerClient;
use sealcsi::csi::proto::controller_service_capability::Type as CtrlCap;
use sealcsi::csi::proto::identity_client::IdentityClient;
use sealcsi::csi::proto::plugin_capability::Type as PluginCap;
use sealcsi::csi::proto::*;
use sealcsi::csi::{DEFAULT_DRIVER_NAME, Mode, PluginConfig, PluginDeps};
use sealcsi::dm::MemoryDm;
use sealcsi::node::{MemoryEngine, MemoryMounter};
use tonic::transport::{Endpoint, Uri};

/// Whether python3 with grpcio and grpcio-tools is here; otherwise fails loudly unless skipping is allowed.
fn python_with_grpcio() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import grpc, grpc_tools.protoc"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return true;
    }
    let allowed = std::env::var("SEALCSI_ALLOW_SKIP").unwrap_or_default();
    if allowed.split([',', ' ']).any(|s| s == "grpcio") {
        eprintln!(
            "SKIPPED: python3 with grpcio/grpcio-tools is missing (SEALCSI_ALLOW_SKIP=grpcio)"
        );
        return false;
    }
    panic!(
        "python3 with the grpcio and grpcio-tools packages is required by this test: run \
         tests/install-deps.sh (pip install grpcio grpcio-tools), or set SEALCSI_ALLOW_SKIP=grpcio to \
         skip it knowingly"
    );
}

struct Server {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), sealcsi::csi::CsiError>>,
}

/// The real server (`serve_until`) in controller mode on a socket under a fresh temporary directory.
async fn start(mode: Mode) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("csi/csi.sock");
    let dm = Arc::new(MemoryDm::new());
    let deps = PluginDeps {
        dm: dm.clone(),
        engine: Arc::new(MemoryEngine::new(dm, "identity-a")),
        mounter: Arc::new(MemoryMounter::new()),
    };
    let config = PluginConfig::new(
        format!("unix://{}", socket.display()),
        "node-a",
        mode,
        dir.path().join("state"),
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(sealcsi::csi::serve_until(config, Some(deps), async move {
        let _ = stopped.await;
    }));
    for _ in 0..500 {
        if tokio::net::UnixStream::connect(&socket).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Server {
        _dir: dir,
        socket,
        stop: Some(stop),
        task,
    }
}

impl Server {
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap().unwrap();
    }
}

/// The same questions through tonic (which sends `:authority: localhost`): the reference answers.
async fn tonic_answers(socket: &Path) -> serde_json::Value {
    let path = socket.to_path_buf();
    let channel = Endpoint::try_from("http://localhost")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
        .unwrap();
    let mut identity = IdentityClient::new(channel.clone());
    let caps = identity
        .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    let mut plugin: Vec<String> = caps
        .capabilities
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(PluginCap::Service(s)) => Some(
                plugin_capability::service::Type::try_from(s.r#type)
                    .unwrap()
                    .as_str_name()
                    .to_string(),
            ),
            _ => None,
        })
        .collect();
    plugin.sort();
    let caps = ControllerClient::new(channel)
        .controller_get_capabilities(ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    let mut controller: Vec<String> = caps
        .capabilities
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(CtrlCap::Rpc(r)) => Some(
                controller_service_capability::rpc::Type::try_from(r.r#type)
                    .unwrap()
                    .as_str_name()
                    .to_string(),
            ),
            _ => None,
        })
        .collect();
    controller.sort();
    serde_json::json!({ "plugin_capabilities": plugin, "controller_capabilities": controller })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_with_default_options_is_served() {
    if !python_with_grpcio() {
        return;
    }
    let server = start(Mode::Controller).await;
    let scratch = tempfile::tempdir().unwrap();
    let proto = Path::new(env!("CARGO_MANIFEST_DIR")).join("proto");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/grpcio_client.py");
    let (socket, scratch_path) = (server.socket.clone(), scratch.path().to_path_buf());
    let output = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(script)
            .arg(&socket)
            .arg(&proto)
            .arg(&scratch_path)
            .output()
            .expect("running python3")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the grpcio client failed ({}):\n{stderr}\n{stdout}",
        output.status
    );
    let got: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("grpcio client printed no JSON ({e}): {stdout}\n{stderr}"));
    assert_eq!(got["name"], DEFAULT_DRIVER_NAME, "{got}");
    assert_eq!(got["vendor_version"], env!("CARGO_PKG_VERSION"), "{got}");
    assert_eq!(got["ready"], true, "{got}");
    let want = tonic_answers(&server.socket).await;
    assert_eq!(got["plugin_capabilities"], want["plugin_capabilities"]);
    assert!(
        got["plugin_capabilities"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c == "CONTROLLER_SERVICE"),
        "{got}"
    );
    assert_eq!(
        got["controller_capabilities"],
        want["controller_capabilities"]
    );
    assert!(
        got["controller_capabilities"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c == "CREATE_DELETE_VOLUME"),
        "{got}"
    );
    // An error is a status (INVALID_ARGUMENT for the missing id), not a reset stream.
    assert_eq!(got["delete_empty_id"], "INVALID_ARGUMENT", "{got}");
    server.stop().await;
}
