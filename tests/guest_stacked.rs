//! Guest tests of sealcsi stacked over a CSI driver (docs/stacked.md): the real plugin in-process with
//! `--backend` pointing at the blockback test backend (tests/blockback, a real CSI server over real loop
//! devices, run as a child process), driven over gRPC as a CO would.
//!
//! ```text
//! cargo build --example blockback && cargo test --test guest_stacked --no-run
//! tests/vm/run-in-guest.sh --timeout 1500 -- <binary> --ignored --test-threads=1 --nocapture
//! ```
//!
//! Each test works under `$SCRATCH/guest_stacked/<test>` and cleans up its mounts and device-mapper
//! devices even when it fails.

use std::collections::HashMap;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use sealcsi::csi::proto::controller_client::ControllerClient;
use sealcsi::csi::proto::node_client::NodeClient;
use sealcsi::csi::proto::volume_capability::{
    AccessMode, AccessType, BlockVolume, MountVolume, access_mode::Mode,
};
use sealcsi::csi::proto::*;
use sealcsi::csi::{Mode as PluginMode, PluginConfig, PluginDeps};
use sealcsi::dm::{DeviceMapper, KernelDm};
use sealcsi::sealing::SimSource;
use tonic::Code;
use tonic::transport::Channel;

#[path = "common/plugin.rs"]
mod plugin;
use plugin::{Served, serve};

#[path = "common/blockback.rs"]
mod blockback;
use blockback::{Blockback, Options};

const MIB: i64 = 1 << 20;

fn scratch(test: &str) -> PathBuf {
    let dir = PathBuf::from(std::env::var_os("SCRATCH").unwrap_or_else(|| "/scratch".into()))
        .join("guest_stacked")
        .join(test);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn cap(access: AccessType) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(access),
    }
}

fn fs_cap() -> VolumeCapability {
    cap(AccessType::Mount(MountVolume {
        fs_type: "ext4".into(),
        mount_flags: vec![],
        volume_mount_group: String::new(),
    }))
}

fn block_cap() -> VolumeCapability {
    cap(AccessType::Block(BlockVolume {}))
}

/// A stacked sealcsi (controller and node in one process) over the backend at `backend`.
struct Stacked {
    dir: PathBuf,
    served: Served,
    node_id: String,
}

impl Stacked {
    async fn start(dir: &Path, name: &str, identity: &str, backend: &str) -> Stacked {
        let sim_dir = dir.join(format!("sim-{identity}"));
        fs::create_dir_all(&sim_dir).unwrap();
        let source = SimSource::open(&sim_dir, identity).unwrap();
        let deps = PluginDeps::kernel(Box::new(source)).unwrap();
        let socket = dir.join(format!("sealcsi-{name}.sock"));
        let mut config = PluginConfig::new(
            format!("unix://{}", socket.display()),
            format!("sealcsi-{name}"),
            PluginMode::All,
            dir.join(format!("state-{name}")),
        );
        config.backend = Some(format!("csi:{backend}"));
        let served = serve(config, deps).await;
        let node_id = NodeClient::new(served.channel.clone())
            .node_get_info(NodeGetInfoRequest {})
            .await
            .unwrap()
            .into_inner()
            .node_id;
        Stacked {
            dir: dir.to_path_buf(),
            served,
            node_id,
        }
    }

    fn controller(&self) -> ControllerClient<Channel> {
        self.served.controller()
    }

    fn node(&self) -> NodeClient<Channel> {
        self.served.node()
    }

    /// CreateVolume and ControllerPublishVolume to this node: (id, context, publish context).
    async fn create(
        &self,
        name: &str,
        bytes: i64,
        c: VolumeCapability,
    ) -> (String, HashMap<String, String>, HashMap<String, String>) {
        let v = self
            .controller()
            .create_volume(CreateVolumeRequest {
                name: name.into(),
                capacity_range: Some(CapacityRange {
                    required_bytes: bytes,
                    limit_bytes: 0,
                }),
                volume_capabilities: vec![c.clone()],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        assert!(v.capacity_bytes >= bytes);
        let publish = self.attach(&v.volume_id, &v.volume_context, c).await;
        (v.volume_id, v.volume_context, publish)
    }

    async fn attach(
        &self,
        id: &str,
        context: &HashMap<String, String>,
        c: VolumeCapability,
    ) -> HashMap<String, String> {
        self.controller()
            .controller_publish_volume(ControllerPublishVolumeRequest {
                volume_id: id.into(),
                node_id: self.node_id.clone(),
                volume_capability: Some(c),
                readonly: false,
                secrets: HashMap::new(),
                volume_context: context.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .publish_context
    }

    async fn stage(
        &self,
        id: &str,
        context: &HashMap<String, String>,
        publish: &HashMap<String, String>,
        staging: &Path,
        c: VolumeCapability,
    ) -> Result<(), tonic::Status> {
        self.node()
            .node_stage_volume(NodeStageVolumeRequest {
                volume_id: id.into(),
                publish_context: publish.clone(),
                staging_target_path: staging.display().to_string(),
                volume_capability: Some(c),
                secrets: HashMap::new(),
                volume_context: context.clone(),
            })
            .await
            .map(drop)
    }

    async fn unstage(&self, id: &str, staging: &Path) {
        self.node()
            .node_unstage_volume(NodeUnstageVolumeRequest {
                volume_id: id.into(),
                staging_target_path: staging.display().to_string(),
            })
            .await
            .unwrap();
    }

    async fn publish(&self, id: &str, staging: &Path, target: &Path, c: VolumeCapability) {
        self.node()
            .node_publish_volume(NodePublishVolumeRequest {
                volume_id: id.into(),
                staging_target_path: staging.display().to_string(),
                target_path: target.display().to_string(),
                volume_capability: Some(c),
                ..Default::default()
            })
            .await
            .unwrap();
    }

    async fn unpublish(&self, id: &str, target: &Path) {
        self.node()
            .node_unpublish_volume(NodeUnpublishVolumeRequest {
                volume_id: id.into(),
                target_path: target.display().to_string(),
            })
            .await
            .unwrap();
    }

    async fn delete(&self, id: &str) {
        self.controller()
            .controller_unpublish_volume(ControllerUnpublishVolumeRequest {
                volume_id: id.into(),
                node_id: self.node_id.clone(),
                secrets: HashMap::new(),
            })
            .await
            .unwrap();
        self.controller()
            .delete_volume(DeleteVolumeRequest {
                volume_id: id.into(),
                secrets: HashMap::new(),
            })
            .await
            .unwrap();
    }
}

/// Mount points under `dir`, and sealcsi's device-mapper devices.
fn leftovers(dir: &Path) -> (Vec<PathBuf>, Vec<String>) {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mounts = sealcsi::node::mount::parse_mountinfo(&text)
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|p| p.starts_with(dir))
        .collect();
    let dm = KernelDm::new()
        .unwrap()
        .list()
        .unwrap()
        .into_iter()
        .map(|d| d.name.to_string())
        .filter(|n| n.starts_with("sealcsi-"))
        .collect();
    (mounts, dm)
}

impl Drop for Stacked {
    fn drop(&mut self) {
        let (mut points, _) = leftovers(&self.dir);
        points.reverse();
        for p in points {
            let _ = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH);
        }
        if let Ok(dm) = KernelDm::new()
            && let Ok(list) = dm.list()
        {
            for d in list {
                let name = d.name.as_str();
                if name.starts_with("sealcsi-sv-") && !name.ends_with("-integrity") {
                    let _ = sealcsi::volume::close(&dm, name);
                }
            }
        }
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn write_synced(path: &Path, data: &[u8]) {
    let mut f = fs::File::create(path).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

async fn backend(dir: &Path) -> Blockback {
    Blockback::spawn(Options::in_dir(dir, "bb-node")).await
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "guest: needs root, loop devices and device-mapper (tests/vm/run-in-guest.sh)"]
async fn guest_stacked_filesystem_and_block_volumes_survive_restage() {
    let dir = scratch("lifecycle");
    let bb = backend(&dir).await;
    let s = Stacked::start(&dir, "a", "id-a", &bb.options.endpoint()).await;
    assert_eq!(s.node_id, "bb-node", "NodeGetInfo is the backend's");

    // Filesystem.
    let (id, ctx, pc) = s.create("fs-vol", 64 * MIB, fs_cap()).await;
    let (staging, target) = (dir.join("staging-fs"), dir.join("target-fs"));
    s.stage(&id, &ctx, &pc, &staging, fs_cap()).await.unwrap();
    s.stage(&id, &ctx, &pc, &staging, fs_cap()).await.unwrap();
    s.publish(&id, &staging, &target, fs_cap()).await;
    let data = pattern(3 << 20, 7);
    write_synced(&target.join("data"), &data);
    s.unpublish(&id, &target).await;
    s.unstage(&id, &staging).await;
    assert_eq!(leftovers(&dir), (vec![], vec![]), "unstage leaves nothing");
    s.stage(&id, &ctx, &pc, &staging, fs_cap()).await.unwrap();
    s.publish(&id, &staging, &target, fs_cap()).await;
    assert_eq!(fs::read(target.join("data")).unwrap(), data);
    s.unpublish(&id, &target).await;
    s.unstage(&id, &staging).await;
    s.delete(&id).await;

    // Block.
    let (id, ctx, pc) = s.create("block-vol", 64 * MIB, block_cap()).await;
    let (staging, target) = (dir.join("staging-b"), dir.join("pod/target-b"));
    s.stage(&id, &ctx, &pc, &staging, block_cap())
        .await
        .unwrap();
    s.publish(&id, &staging, &target, block_cap()).await;
    let data = pattern(1 << 20, 9);
    {
        let f = fs::OpenOptions::new().write(true).open(&target).unwrap();
        f.write_all_at(&data, 5 << 20).unwrap();
        f.sync_all().unwrap();
    }
    s.unpublish(&id, &target).await;
    s.unstage(&id, &staging).await;
    s.stage(&id, &ctx, &pc, &staging, block_cap())
        .await
        .unwrap();
    s.publish(&id, &staging, &target, block_cap()).await;
    let mut back = vec![0u8; data.len()];
    fs::File::open(&target)
        .unwrap()
        .read_exact_at(&mut back, 5 << 20)
        .unwrap();
    assert_eq!(back, data);
    s.unpublish(&id, &target).await;
    s.unstage(&id, &staging).await;
    s.delete(&id).await;
    assert_eq!(leftovers(&dir), (vec![], vec![]));
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "guest: needs root, loop devices and device-mapper (tests/vm/run-in-guest.sh)"]
async fn guest_stacked_online_expansion() {
    let dir = scratch("expand");
    let bb = backend(&dir).await;
    let s = Stacked::start(&dir, "a", "id-a", &bb.options.endpoint()).await;
    let (id, ctx, pc) = s.create("grow", 64 * MIB, fs_cap()).await;
    let (staging, target) = (dir.join("staging"), dir.join("target"));
    s.stage(&id, &ctx, &pc, &staging, fs_cap()).await.unwrap();
    s.publish(&id, &staging, &target, fs_cap()).await;
    write_synced(&target.join("before"), b"kept");
    let total = |p: &Path| {
        let st = nix::sys::statvfs::statvfs(p).unwrap();
        st.blocks() as u64 * st.fragment_size() as u64
    };
    let before = total(&target);
    let r = s
        .controller()
        .controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: id.clone(),
            capacity_range: Some(CapacityRange {
                required_bytes: 160 * MIB,
                limit_bytes: 0,
            }),
            secrets: HashMap::new(),
            volume_capability: Some(fs_cap()),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.node_expansion_required);
    assert!(r.capacity_bytes >= 160 * MIB);
    let got = s
        .node()
        .node_expand_volume(NodeExpandVolumeRequest {
            volume_id: id.clone(),
            volume_path: target.display().to_string(),
            capacity_range: Some(CapacityRange {
                required_bytes: 160 * MIB,
                limit_bytes: 0,
            }),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(fs_cap()),
            secrets: HashMap::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(got.capacity_bytes >= 160 * MIB, "{}", got.capacity_bytes);
    let after = total(&target);
    assert!(after > before + (64 << 20), "{before} -> {after}");
    assert_eq!(fs::read(target.join("before")).unwrap(), b"kept");
    s.unpublish(&id, &target).await;
    s.unstage(&id, &staging).await;
    s.delete(&id).await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "guest: needs root, loop devices and device-mapper (tests/vm/run-in-guest.sh)"]
async fn guest_stacked_other_identity_is_refused_and_changes_nothing() {
    let dir = scratch("identity");
    let bb = backend(&dir).await;
    let a = Stacked::start(&dir, "a", "id-a", &bb.options.endpoint()).await;
    let (id, ctx, pc) = a.create("shared", 64 * MIB, fs_cap()).await;
    let (staging, target) = (dir.join("staging"), dir.join("target"));
    a.stage(&id, &ctx, &pc, &staging, fs_cap()).await.unwrap();
    a.publish(&id, &staging, &target, fs_cap()).await;
    write_synced(&target.join("data"), b"of node a");
    a.unpublish(&id, &target).await;
    a.unstage(&id, &staging).await;

    // Another sealcsi node (its own state, another sealing identity) over the same backend volume.
    let b = Stacked::start(&dir, "b", "id-b", &bb.options.endpoint()).await;
    let e = b
        .stage(&id, &ctx, &pc, &dir.join("staging-b"), fs_cap())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    b.unstage(&id, &dir.join("staging-b")).await;

    a.stage(&id, &ctx, &pc, &staging, fs_cap()).await.unwrap();
    a.publish(&id, &staging, &target, fs_cap()).await;
    assert_eq!(fs::read(target.join("data")).unwrap(), b"of node a");
    a.unpublish(&id, &target).await;
    a.unstage(&id, &staging).await;
    a.delete(&id).await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "guest: needs root, loop devices and device-mapper (tests/vm/run-in-guest.sh)"]
async fn guest_stacked_backend_killed_mid_stage_then_the_retry_succeeds() {
    let dir = scratch("killed");
    let mut bb =
        Blockback::spawn(Options::in_dir(&dir, "bb-node").with_fault("stall:NodeStageVolume"))
            .await;
    let s = Stacked::start(&dir, "a", "id-a", &bb.options.endpoint()).await;
    let (id, ctx, pc) = s.create("stall", 64 * MIB, fs_cap()).await;
    let staging = dir.join("staging");
    let stage = {
        let (node, id, ctx, pc, staging) = (
            s.node(),
            id.clone(),
            ctx.clone(),
            pc.clone(),
            staging.clone(),
        );
        tokio::spawn(async move {
            let mut node = node;
            node.node_stage_volume(NodeStageVolumeRequest {
                volume_id: id,
                publish_context: pc,
                staging_target_path: staging.display().to_string(),
                volume_capability: Some(fs_cap()),
                secrets: HashMap::new(),
                volume_context: ctx,
            })
            .await
        })
    };
    bb.wait_stalled("NodeStageVolume").await;
    bb.kill();
    let e = stage.await.unwrap().unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(
        e.message().contains("backend CSI driver") && e.message().contains("NodeStageVolume"),
        "the error says the backend failed: {}",
        e.message()
    );
    let (mounts, dm) = leftovers(&dir);
    assert!(dm.is_empty(), "nothing opened yet: {dm:?}");
    assert!(!mounts.contains(&staging));
    bb.restart().await;
    s.stage(&id, &ctx, &pc, &staging, fs_cap()).await.unwrap();
    s.unstage(&id, &staging).await;
    s.delete(&id).await;
    let (mounts, dm) = leftovers(&dir);
    assert!(dm.is_empty(), "{dm:?}");
    assert!(mounts.is_empty(), "{mounts:?}");
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "guest: needs root, loop devices and device-mapper (tests/vm/run-in-guest.sh)"]
async fn guest_stacked_foreign_filesystem_is_never_formatted() {
    let dir = scratch("foreign");
    let bb = backend(&dir).await;
    let s = Stacked::start(&dir, "a", "id-a", &bb.options.endpoint()).await;
    let (id, ctx, pc) = s.create("foreign", 64 * MIB, fs_cap()).await;
    // Someone else's filesystem on the backend's device, made through the backend directly.
    let bstage = dir.join("bb-staging");
    let bdev = dir.join("bb-dev");
    fs::create_dir_all(&bstage).unwrap();
    let mut node = bb.node();
    node.node_stage_volume(NodeStageVolumeRequest {
        volume_id: id.clone(),
        publish_context: pc.clone(),
        staging_target_path: bstage.display().to_string(),
        volume_capability: Some(block_cap()),
        ..Default::default()
    })
    .await
    .unwrap();
    node.node_publish_volume(NodePublishVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: bstage.display().to_string(),
        target_path: bdev.display().to_string(),
        volume_capability: Some(block_cap()),
        ..Default::default()
    })
    .await
    .unwrap();
    let out = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&bdev)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let head = |p: &Path| {
        let mut b = vec![0u8; 2048];
        fs::File::open(p).unwrap().read_exact(&mut b).unwrap();
        b
    };
    let before = head(&bdev);
    node.node_unpublish_volume(NodeUnpublishVolumeRequest {
        volume_id: id.clone(),
        target_path: bdev.display().to_string(),
    })
    .await
    .unwrap();
    node.node_unstage_volume(NodeUnstageVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: bstage.display().to_string(),
    })
    .await
    .unwrap();

    let staging = dir.join("staging");
    let e = s
        .stage(&id, &ctx, &pc, &staging, fs_cap())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    s.unstage(&id, &staging).await;
    // The device still holds exactly the foreign filesystem.
    node.node_stage_volume(NodeStageVolumeRequest {
        volume_id: id.clone(),
        publish_context: pc.clone(),
        staging_target_path: bstage.display().to_string(),
        volume_capability: Some(block_cap()),
        ..Default::default()
    })
    .await
    .unwrap();
    node.node_publish_volume(NodePublishVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: bstage.display().to_string(),
        target_path: bdev.display().to_string(),
        volume_capability: Some(block_cap()),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(head(&bdev), before, "the foreign filesystem is untouched");
    node.node_unpublish_volume(NodeUnpublishVolumeRequest {
        volume_id: id.clone(),
        target_path: bdev.display().to_string(),
    })
    .await
    .unwrap();
    node.node_unstage_volume(NodeUnstageVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: bstage.display().to_string(),
    })
    .await
    .unwrap();
    s.delete(&id).await;
}

impl Stacked {
    /// CreateVolume from a content source, ControllerPublished to this node.
    async fn create_from(
        &self,
        name: &str,
        source: volume_content_source::Type,
    ) -> (String, HashMap<String, String>, HashMap<String, String>) {
        let v = self
            .controller()
            .create_volume(CreateVolumeRequest {
                name: name.into(),
                capacity_range: Some(CapacityRange {
                    required_bytes: 64 * MIB,
                    limit_bytes: 0,
                }),
                volume_capabilities: vec![fs_cap()],
                volume_content_source: Some(VolumeContentSource {
                    r#type: Some(source),
                }),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        assert!(v.content_source.is_some());
        let publish = self.attach(&v.volume_id, &v.volume_context, fs_cap()).await;
        (v.volume_id, v.volume_context, publish)
    }

    /// Stages and publishes, runs `f` on the mounted target, unpublishes and unstages.
    async fn with_mounted<T>(
        &self,
        v: &(String, HashMap<String, String>, HashMap<String, String>),
        tag: &str,
        f: impl FnOnce(&Path) -> T,
    ) -> T {
        let staging = self.dir.join(format!("staging-{tag}"));
        let target = self.dir.join(format!("target-{tag}"));
        self.stage(&v.0, &v.1, &v.2, &staging, fs_cap())
            .await
            .unwrap();
        self.publish(&v.0, &staging, &target, fs_cap()).await;
        let out = f(&target);
        self.unpublish(&v.0, &target).await;
        self.unstage(&v.0, &staging).await;
        out
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "guest: needs root, loop devices and device-mapper (tests/vm/run-in-guest.sh)"]
async fn guest_stacked_snapshot_restore_and_clone_keep_the_data_and_are_rebound() {
    let dir = scratch("copies");
    let bb = backend(&dir).await;
    let s = Stacked::start(&dir, "a", "id-a", &bb.options.endpoint()).await;
    let src = s.create("source", 64 * MIB, fs_cap()).await;
    let data = pattern(2 << 20, 3);
    s.with_mounted(&src, "src", |t| write_synced(&t.join("data"), &data))
        .await;
    let snap = s
        .controller()
        .create_snapshot(CreateSnapshotRequest {
            source_volume_id: src.0.clone(),
            name: "snap-1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(snap.source_volume_id, src.0);

    // Restore: the same data, opened under its own id (re-bound on the first stage).
    let restored = s
        .create_from(
            "restored",
            volume_content_source::Type::Snapshot(volume_content_source::SnapshotSource {
                snapshot_id: snap.snapshot_id.clone(),
            }),
        )
        .await;
    assert_eq!(restored.1["stacked.sealcsi.io/source-volume"], src.0);
    let back = s
        .with_mounted(&restored, "restored", |t| fs::read(t.join("data")).unwrap())
        .await;
    assert_eq!(back, data);
    // Restaged (now bound to its own id, no re-bind needed): still the same.
    let back = s
        .with_mounted(&restored, "restored", |t| fs::read(t.join("data")).unwrap())
        .await;
    assert_eq!(back, data);

    // Clone: the same data, and writes stay on their side.
    let clone = s
        .create_from(
            "clone",
            volume_content_source::Type::Volume(volume_content_source::VolumeSource {
                volume_id: src.0.clone(),
            }),
        )
        .await;
    s.with_mounted(&clone, "clone", |t| {
        assert_eq!(fs::read(t.join("data")).unwrap(), data);
        write_synced(&t.join("data"), b"the clone's");
    })
    .await;
    s.with_mounted(&src, "src", |t| {
        assert_eq!(fs::read(t.join("data")).unwrap(), data);
        write_synced(&t.join("only-source"), b"x");
    })
    .await;
    s.with_mounted(&clone, "clone", |t| {
        assert_eq!(fs::read(t.join("data")).unwrap(), b"the clone's");
        assert!(!t.join("only-source").exists());
    })
    .await;

    s.controller()
        .delete_snapshot(DeleteSnapshotRequest {
            snapshot_id: snap.snapshot_id,
            secrets: HashMap::new(),
        })
        .await
        .unwrap();
    for v in [&clone.0, &restored.0, &src.0] {
        s.delete(v).await;
    }
    assert_eq!(leftovers(&dir), (vec![], vec![]));
}

/// The node record of a stacked volume (`<state-dir>/volumes/<local id>.json`) of plugin `name`.
fn record_of(dir: &Path, name: &str, id: &str) -> PathBuf {
    let local = sealcsi::store::stacked::local_id(id);
    dir.join(format!("state-{name}"))
        .join("volumes")
        .join(format!("{local}.json"))
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "guest: needs root, loop devices and device-mapper (tests/vm/run-in-guest.sh)"]
async fn guest_stacked_deleted_volumes_leave_no_node_record() {
    let dir = scratch("records");
    let bb = backend(&dir).await;
    let a = Stacked::start(&dir, "a", "id-a", &bb.options.endpoint()).await;
    // DeleteVolume in the process whose node staged it: the record goes with the volume.
    let (id, ctx, pc) = a.create("rec-a", 64 * MIB, fs_cap()).await;
    let staging = dir.join("staging-a");
    a.stage(&id, &ctx, &pc, &staging, fs_cap()).await.unwrap();
    a.unstage(&id, &staging).await;
    assert!(record_of(&dir, "a", &id).exists(), "kept after unstage");
    a.delete(&id).await;
    assert!(
        !record_of(&dir, "a", &id).exists(),
        "removed by DeleteVolume"
    );

    // A node whose volume was deleted by another process: the record goes at its next first stage,
    // once the backend says NOT_FOUND; a volume that still exists keeps its record.
    let b = Stacked::start(&dir, "b", "id-a", &bb.options.endpoint()).await;
    let (gone, gctx, gpc) = a.create("rec-gone", 64 * MIB, fs_cap()).await;
    let (kept, kctx, kpc) = a.create("rec-kept", 64 * MIB, fs_cap()).await;
    for (id, ctx, pc, st) in [
        (&gone, &gctx, &gpc, "staging-gone"),
        (&kept, &kctx, &kpc, "staging-kept"),
    ] {
        let staging = dir.join(st);
        b.stage(id, ctx, pc, &staging, fs_cap()).await.unwrap();
        b.unstage(id, &staging).await;
    }
    a.delete(&gone).await;
    assert!(
        record_of(&dir, "b", &gone).exists(),
        "another process deleted it"
    );
    let (new, nctx, npc) = a.create("rec-new", 64 * MIB, fs_cap()).await;
    let staging = dir.join("staging-new");
    b.stage(&new, &nctx, &npc, &staging, fs_cap())
        .await
        .unwrap();
    assert!(
        !record_of(&dir, "b", &gone).exists(),
        "swept: the backend no longer has it"
    );
    assert!(record_of(&dir, "b", &kept).exists());
    assert!(record_of(&dir, "b", &new).exists());
    b.unstage(&new, &staging).await;
    for id in [&kept, &new] {
        a.delete(id).await;
    }
}

#[path = "bench/stacked_stage.rs"]
mod stacked_stage;

/// The stage-time benchmark (tests/bench/stacked_stage.rs): prints figures, asserts none.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "guest: needs root, loop devices and device-mapper (tests/vm/run-in-guest.sh)"]
async fn guest_stacked_bench_stage_time_through_the_stack() {
    stacked_stage::run().await;
}
