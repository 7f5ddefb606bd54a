//! The blockback test backend (tests/blockback, the `blockback` example) run as a child process: spawn
//! it on a socket, wait until it answers, talk to it over gRPC, kill it. Shared by the host test
//! (tests/blockback_host.rs) and the guest suites (include it with `#[path = "common/blockback.rs"]`).
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use sealcsi::csi::proto::controller_client::ControllerClient;
use sealcsi::csi::proto::identity_client::IdentityClient;
use sealcsi::csi::proto::node_client::NodeClient;
use tonic::transport::{Channel, Endpoint, Uri};

/// How long [`Blockback::spawn`] waits for the socket to answer before it gives up.
const START_ATTEMPTS: u32 = 3000;

/// What to start blockback with.
#[derive(Debug, Clone)]
pub struct Options {
    /// The socket path (served as `unix://<socket>`).
    pub socket: PathBuf,
    /// `--state-dir`.
    pub state_dir: PathBuf,
    /// `--node-id`.
    pub node_id: String,
    /// `--topology-key`, if not the default.
    pub topology_key: Option<String>,
    /// `--fault`, e.g. `stall:NodeStageVolume`.
    pub fault: Option<String>,
}

impl Options {
    /// Options for a backend in `dir`: socket `dir/blockback.sock`, state `dir/blockback-state`.
    pub fn in_dir(dir: &Path, node_id: &str) -> Options {
        Options {
            socket: dir.join("blockback.sock"),
            state_dir: dir.join("blockback-state"),
            node_id: node_id.to_string(),
            topology_key: None,
            fault: None,
        }
    }

    /// These options with `--fault <fault>`.
    pub fn with_fault(mut self, fault: &str) -> Options {
        self.fault = Some(fault.to_string());
        self
    }

    /// The `unix://` endpoint of the socket.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }
}

/// The blockback executable: `target/debug/examples/blockback` beside the running test executable
/// (`target/debug/deps/<test>-<hash>`); built with `cargo build --example blockback` when running
/// under cargo, else a clear panic if it is absent.
pub fn binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test executable lives in target/<profile>/deps");
    let bin = profile_dir.join("examples").join("blockback");
    if let Some(cargo) = std::env::var_os("CARGO") {
        let status = Command::new(cargo)
            .args(["build", "--quiet", "--example", "blockback"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("running cargo build --example blockback");
        assert!(status.success(), "cargo build --example blockback failed");
    }
    assert!(
        bin.is_file(),
        "the blockback backend is not built at {}: run `cargo build --example blockback` first",
        bin.display()
    );
    bin
}

/// A running blockback child process and a channel to it. Killed (SIGKILL) when dropped.
pub struct Blockback {
    /// What it was started with.
    pub options: Options,
    child: Option<Child>,
    /// A gRPC channel to its socket.
    pub channel: Channel,
}

/// Opens a gRPC channel to the unix socket at `path` (connecting lazily, on first use).
pub fn channel(path: &Path) -> Channel {
    let path = path.to_path_buf();
    Endpoint::try_from("http://localhost")
        .expect("a valid endpoint")
        .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
}

impl Blockback {
    /// Starts blockback with `options` and waits until its socket accepts a connection; panics with
    /// its stderr if it exits first. Its stderr goes to `<state_dir>.log` (appended).
    pub async fn spawn(options: Options) -> Blockback {
        std::fs::create_dir_all(&options.state_dir).expect("creating the state dir");
        let log_path = log_path(&options);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("opening the backend's log");
        let mut cmd = Command::new(binary());
        cmd.arg("--endpoint")
            .arg(options.endpoint())
            .arg("--state-dir")
            .arg(&options.state_dir)
            .arg("--node-id")
            .arg(&options.node_id)
            .env_remove("BLOCKBACK_FAULT")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(k) = &options.topology_key {
            cmd.arg("--topology-key").arg(k);
        }
        if let Some(f) = &options.fault {
            cmd.arg("--fault").arg(f);
        }
        let mut child = cmd.spawn().expect("spawning blockback");
        let mut attempts = 0;
        while tokio::net::UnixStream::connect(&options.socket)
            .await
            .is_err()
        {
            if let Some(status) = child.try_wait().expect("polling blockback") {
                panic!(
                    "blockback exited ({status}) before serving:\n{}",
                    read_log(&log_path)
                );
            }
            attempts += 1;
            if attempts > START_ATTEMPTS {
                let _ = child.kill();
                panic!(
                    "blockback did not serve on {} in time:\n{}",
                    options.socket.display(),
                    read_log(&log_path)
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Blockback {
            channel: channel(&options.socket),
            options,
            child: Some(child),
        }
    }

    /// An Identity client.
    pub fn identity(&self) -> IdentityClient<Channel> {
        IdentityClient::new(self.channel.clone())
    }

    /// A Controller client.
    pub fn controller(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.channel.clone())
    }

    /// A Node client.
    pub fn node(&self) -> NodeClient<Channel> {
        NodeClient::new(self.channel.clone())
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Its log so far (stderr).
    pub fn log(&self) -> String {
        read_log(&log_path(&self.options))
    }

    /// Whether the call `rpc` stalled by `--fault stall:<rpc>` has done its side effects.
    pub fn stalled(&self, rpc: &str) -> bool {
        self.options.state_dir.join("stalled").join(rpc).exists()
    }

    /// Waits until [`Self::stalled`] for `rpc`; panics (with the log) if the child exits first.
    pub async fn wait_stalled(&mut self, rpc: &str) {
        while !self.stalled(rpc) {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "blockback exited ({status}) before {rpc} stalled:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// SIGKILLs the child and reaps it (no cleanup of its socket, loop devices or mounts).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERMs the child and waits for it to exit; returns its exit code.
    pub fn stop(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        child.wait().ok()?.code()
    }

    /// Kills the child and starts a new one with the same options but no fault (the stall marks
    /// are removed), as a restart after a crash.
    pub async fn restart(&mut self) {
        self.respawn(None).await;
    }

    /// Kills the child and starts a new one with the same options and `fault` instead (the stall
    /// marks are removed).
    pub async fn respawn(&mut self, fault: Option<&str>) {
        self.kill();
        let mut options = self.options.clone();
        options.fault = fault.map(str::to_string);
        let _ = std::fs::remove_dir_all(options.state_dir.join("stalled"));
        *self = Blockback::spawn(options).await;
    }
}

impl Drop for Blockback {
    fn drop(&mut self) {
        self.kill();
    }
}

fn log_path(options: &Options) -> PathBuf {
    options.state_dir.with_extension("log")
}

fn read_log(path: &Path) -> String {
    let mut s = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let _ = f.read_to_string(&mut s);
    }
    s
}
