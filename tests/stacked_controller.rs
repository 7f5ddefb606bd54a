//! The stacked controller as its Deployment runs it: the `sealcsi plugin --mode controller --backend`
//! binary on a machine with no device-mapper and no TEE (this host), stacked over the blockback test
//! backend. It must start, say it is ready, and provision through the backend: nothing of the node's
//! kernel or sealing source is its business. The node service without them refuses to start.

use std::path::Path;
use std::process::{Child, Command, Stdio};

use sealcsi::csi::proto::volume_capability::{AccessMode, AccessType, MountVolume, access_mode};
use sealcsi::csi::proto::*;
use sealcsi::csi::{CsiError, Mode as PluginMode, PluginConfig};

#[path = "common/blockback.rs"]
mod blockback;
#[path = "common/plugin.rs"]
mod plugin;

/// Kills the plugin when the test ends, however it ends.
struct Plugin(Child);

impl Drop for Plugin {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_controller(dir: &Path, backend: &str) -> (Plugin, std::path::PathBuf) {
    let socket = dir.join("sealcsi.sock");
    let child = Command::new(env!("CARGO_BIN_EXE_sealcsi"))
        .args([
            "plugin",
            "--mode",
            "controller",
            "--node-id",
            "controller-0",
        ])
        .arg("--endpoint")
        .arg(plugin::endpoint(&socket))
        .arg("--backend")
        .arg(format!("csi:{backend}"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        // No --tee: the default (auto, hardware only) finds nothing on this host, so a controller
        // that opened a sealing source would not start.
        .env_remove("SEALCSI_TEE")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("plugin.log")).unwrap())
        .spawn()
        .expect("spawning sealcsi plugin");
    (Plugin(child), socket)
}

fn mount_cap() -> VolumeCapability {
    VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: "ext4".into(),
            ..Default::default()
        })),
        access_mode: Some(AccessMode {
            mode: access_mode::Mode::SingleNodeWriter as i32,
        }),
    }
}

#[tokio::test]
async fn a_stacked_controller_serves_without_device_mapper_or_a_sealing_source() {
    // The host tier's machines have no device-mapper (and no TEE): there, a controller that opened
    // either would exit at start.
    let dir = tempfile::tempdir().unwrap();
    let backend = blockback::Blockback::spawn(blockback::Options::in_dir(dir.path(), "n0")).await;
    let (mut plugin, socket) = start_controller(dir.path(), &backend.options.endpoint());
    let channel = plugin::connect(socket).await;
    if let Some(status) = plugin.0.try_wait().unwrap() {
        panic!(
            "the controller exited ({status}):\n{}",
            std::fs::read_to_string(dir.path().join("plugin.log")).unwrap_or_default()
        );
    }
    let mut identity = identity_client::IdentityClient::new(channel.clone());
    let ready = identity.probe(ProbeRequest {}).await.unwrap().into_inner();
    assert_eq!(ready.ready, Some(true));

    let mut controller = controller_client::ControllerClient::new(channel);
    let created = controller
        .create_volume(CreateVolumeRequest {
            name: "pvc-stacked-controller".into(),
            capacity_range: Some(CapacityRange {
                required_bytes: 64 << 20,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![mount_cap()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .volume
        .expect("a volume");
    // The user gets at least what they asked for; the backend was asked for more (the overhead).
    assert!(created.capacity_bytes >= 64 << 20, "{created:?}");
    let on_backend = backend_volumes(&backend).await;
    assert_eq!(on_backend.len(), 1, "{on_backend:?}");
    assert!(on_backend[0].capacity_bytes > 64 << 20, "{on_backend:?}");

    controller
        .delete_volume(DeleteVolumeRequest {
            volume_id: created.volume_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let left = backend_volumes(&backend).await;
    assert!(left.is_empty(), "{left:?}");
}

/// The volumes the backend itself lists.
async fn backend_volumes(backend: &blockback::Blockback) -> Vec<Volume> {
    let listed = backend
        .controller()
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    listed
        .entries
        .into_iter()
        .filter_map(|e| e.volume)
        .collect()
}

#[tokio::test]
async fn without_the_kernel_only_a_stacked_controller_may_serve() {
    let dir = tempfile::tempdir().unwrap();
    for (mode, backend) in [
        (
            PluginMode::Node,
            Some("csi:unix:///nonexistent/backend.sock"),
        ),
        (
            PluginMode::All,
            Some("csi:unix:///nonexistent/backend.sock"),
        ),
        (PluginMode::Controller, None),
    ] {
        let mut config = PluginConfig::new(
            plugin::endpoint(&dir.path().join("s.sock")),
            "n",
            mode,
            dir.path().join("state"),
        );
        config.backend = backend.map(str::to_string);
        let served = sealcsi::csi::serve_until(config, None, async {}).await;
        assert!(
            matches!(&served, Err(CsiError::Config(m)) if m.contains("device-mapper")),
            "{mode:?} {backend:?}: {served:?}"
        );
        // Refused before anything was made: no socket.
        assert!(!dir.path().join("s.sock").exists());
    }
}
