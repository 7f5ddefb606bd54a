//! Guest tests of the blockback test backend's node side (tests/blockback): the example binary as a
//! child process, driven over gRPC on the real kernel (loop devices, bind mounts). The controller
//! side is covered on the host (tests/blockback_host.rs).
//!
//! They need root and loop devices, so they are ignored in a plain `cargo test`:
//!
//! ```text
//! cargo build --example blockback
//! cargo test --test guest_blockback --no-run      # prints the test binary's path
//! tests/vm/run-in-guest.sh --timeout 1800 -- <binary> --ignored --test-threads=1 --nocapture
//! ```
//!
//! Each test works under `$SCRATCH/guest_blockback/<test>` (default /scratch) and unmounts and
//! detaches what it made even when it fails.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use sealcsi::backend::{BlockDevice, LoopDevice};
use sealcsi::csi::proto::volume_capability::{
    AccessMode, AccessType, BlockVolume, access_mode::Mode,
};
use sealcsi::csi::proto::volume_content_source::{SnapshotSource, Type as SourceType};
use sealcsi::csi::proto::*;
use sealcsi::node::{Mounter, SystemMounter, mount::parse_mountinfo};
use tonic::Code;

#[path = "common/blockback.rs"]
mod blockback;
use blockback::{Blockback, Options};

const MIB: i64 = 1 << 20;
const NODE: &str = "guest-node";

fn scratch(test: &str) -> PathBuf {
    let dir = PathBuf::from(std::env::var_os("SCRATCH").unwrap_or_else(|| "/scratch".into()))
        .join("guest_blockback")
        .join(test);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// Unmounts everything under `dir` and detaches the loop devices of its volume files, on drop.
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut points: Vec<PathBuf> = parse_mountinfo(&text)
            .into_iter()
            .map(|m| m.mount_point)
            .filter(|p| p.starts_with(&self.0))
            .collect();
        points.reverse();
        for p in points {
            let _ = SystemMounter.umount(&p);
        }
        let vols = self.0.join("blockback-state").join("volumes");
        for e in fs::read_dir(vols).into_iter().flatten().flatten() {
            if e.path().extension().is_some_and(|x| x == "img") {
                while let Ok(Some(lo)) = LoopDevice::find(&e.path()) {
                    if lo.detach().is_err() {
                        break;
                    }
                }
            }
        }
    }
}

fn block_cap() -> VolumeCapability {
    VolumeCapability {
        access_type: Some(AccessType::Block(BlockVolume {})),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    }
}

/// The loop devices the kernel has bound to `file`.
fn loops_of(file: &Path) -> usize {
    let file = fs::canonicalize(file).unwrap();
    fs::read_dir("/sys/block")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("loop"))
        .filter_map(|e| fs::read_to_string(e.path().join("loop/backing_file")).ok())
        .filter(|b| Path::new(b.trim_end()) == file)
        .count()
}

/// A pattern of `len` bytes that differs per `seed`.
fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Writes `data` at `offset` through the device node at `dev` and flushes it to the backing file.
fn write_dev(dev: &Path, offset: u64, data: &[u8]) {
    let f = OpenOptions::new()
        .write(true)
        .custom_flags(nix::libc::O_SYNC)
        .open(dev)
        .unwrap();
    f.write_all_at(data, offset).unwrap();
    f.sync_all().unwrap();
}

fn read_dev(dev: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    fs::File::open(dev)
        .unwrap()
        .read_exact_at(&mut buf, offset)
        .unwrap();
    buf
}

fn dev_size(dev: &Path) -> u64 {
    BlockDevice::open_path(dev).unwrap().size_bytes().unwrap()
}

/// A backend and what the tests do through it.
struct Bed {
    dir: PathBuf,
    bb: Blockback,
}

impl Bed {
    async fn start(dir: &Path, fault: Option<&str>) -> Bed {
        let mut o = Options::in_dir(dir, NODE);
        o.fault = fault.map(str::to_string);
        Bed {
            dir: dir.to_path_buf(),
            bb: Blockback::spawn(o).await,
        }
    }

    fn file(&self, id: &str) -> PathBuf {
        self.bb
            .options
            .state_dir
            .join("volumes")
            .join(format!("{id}.img"))
    }

    async fn create(&self, name: &str, bytes: i64, source: Option<SourceType>) -> Volume {
        self.bb
            .controller()
            .create_volume(CreateVolumeRequest {
                name: name.into(),
                capacity_range: Some(CapacityRange {
                    required_bytes: bytes,
                    limit_bytes: 0,
                }),
                volume_capabilities: vec![block_cap()],
                volume_content_source: source.map(|t| VolumeContentSource { r#type: Some(t) }),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap()
    }

    fn staging(&self, id: &str) -> PathBuf {
        let p = self.dir.join("staging").join(id);
        fs::create_dir_all(&p).unwrap();
        p
    }

    fn stage_req(&self, id: &str) -> NodeStageVolumeRequest {
        NodeStageVolumeRequest {
            volume_id: id.into(),
            staging_target_path: self.staging(id).display().to_string(),
            volume_capability: Some(block_cap()),
            ..Default::default()
        }
    }

    async fn stage(&self, id: &str) {
        self.bb
            .node()
            .node_stage_volume(self.stage_req(id))
            .await
            .unwrap();
    }

    fn publish_req(&self, id: &str, target: &Path) -> NodePublishVolumeRequest {
        NodePublishVolumeRequest {
            volume_id: id.into(),
            staging_target_path: self.staging(id).display().to_string(),
            target_path: target.display().to_string(),
            volume_capability: Some(block_cap()),
            ..Default::default()
        }
    }

    /// Publishes at `dir/pods/<name>/dev` and returns that path.
    async fn publish(&self, id: &str, name: &str) -> PathBuf {
        let target = self.dir.join("pods").join(name).join("dev");
        fs::create_dir_all(target.parent().unwrap()).unwrap();
        self.bb
            .node()
            .node_publish_volume(self.publish_req(id, &target))
            .await
            .unwrap();
        target
    }

    async fn unpublish(&self, id: &str, target: &Path) {
        self.bb
            .node()
            .node_unpublish_volume(NodeUnpublishVolumeRequest {
                volume_id: id.into(),
                target_path: target.display().to_string(),
            })
            .await
            .unwrap();
    }

    async fn unstage(&self, id: &str) {
        self.bb
            .node()
            .node_unstage_volume(NodeUnstageVolumeRequest {
                volume_id: id.into(),
                staging_target_path: self.staging(id).display().to_string(),
            })
            .await
            .unwrap();
    }
}

#[tokio::test]
#[ignore = "needs root and loop devices (run in the guest)"]
async fn stage_publish_write_unstage_restage_reads_back() {
    let dir = scratch("lifecycle");
    let _cleanup = Cleanup(dir.clone());
    let bed = Bed::start(&dir, None).await;
    let v = bed.create("pvc-life", 16 * MIB, None).await;
    let id = &v.volume_id;
    let file = bed.file(id);
    bed.bb
        .controller()
        .controller_publish_volume(ControllerPublishVolumeRequest {
            volume_id: id.clone(),
            node_id: NODE.into(),
            volume_capability: Some(block_cap()),
            ..Default::default()
        })
        .await
        .unwrap();

    // Staging needs an existing staging directory.
    let mut missing = bed.stage_req(id);
    missing.staging_target_path = dir.join("nowhere").display().to_string();
    let e = bed.bb.node().node_stage_volume(missing).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert_eq!(loops_of(&file), 0);

    bed.stage(id).await;
    assert_eq!(loops_of(&file), 1);
    bed.stage(id).await;
    assert_eq!(loops_of(&file), 1, "a second stage attaches nothing new");
    let lo = LoopDevice::find(&file).unwrap().unwrap();

    let target = bed.publish(id, "a").await;
    let again = bed.publish(id, "a").await;
    assert_eq!(again, target);
    let meta = fs::metadata(&target).unwrap();
    assert!(meta.file_type().is_block_device());
    assert_eq!(meta.rdev(), fs::metadata(lo.path()).unwrap().rdev());
    assert_eq!(dev_size(&target), 16 * MIB as u64);

    let data = pattern(7, 64 * 1024);
    write_dev(&target, 5 * MIB as u64, &data);
    write_dev(&target, 0, &pattern(9, 4096));

    bed.unpublish(id, &target).await;
    assert!(!target.exists(), "unpublish removes the target file");
    bed.unpublish(id, &target).await;
    bed.unstage(id).await;
    assert_eq!(loops_of(&file), 0, "unstage detaches the loop device");
    bed.unstage(id).await;

    // The bytes are in the backing file, and come back through a new stage.
    let mut raw = vec![0u8; data.len()];
    fs::File::open(&file)
        .unwrap()
        .read_exact_at(&mut raw, 5 * MIB as u64)
        .unwrap();
    assert_eq!(raw, data);
    bed.stage(id).await;
    let target = bed.publish(id, "b").await;
    assert_eq!(read_dev(&target, 5 * MIB as u64, data.len()), data);
    assert_eq!(read_dev(&target, 0, 4096), pattern(9, 4096));

    // Deleting a staged volume is refused.
    let e = bed
        .bb
        .controller()
        .delete_volume(DeleteVolumeRequest {
            volume_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    bed.unpublish(id, &target).await;
    bed.unstage(id).await;
    bed.bb
        .controller()
        .controller_unpublish_volume(ControllerUnpublishVolumeRequest {
            volume_id: id.clone(),
            node_id: NODE.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    bed.bb
        .controller()
        .delete_volume(DeleteVolumeRequest {
            volume_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(!file.exists());
}

#[tokio::test]
#[ignore = "needs root and loop devices (run in the guest)"]
async fn snapshot_restore_reads_the_same_bytes() {
    let dir = scratch("snapshot");
    let _cleanup = Cleanup(dir.clone());
    let bed = Bed::start(&dir, None).await;
    let v = bed.create("pvc-src", 8 * MIB, None).await;
    let id = &v.volume_id;
    bed.stage(id).await;
    let target = bed.publish(id, "src").await;
    let data = pattern(3, 128 * 1024);
    write_dev(&target, 3 * MIB as u64, &data);

    let snap = bed
        .bb
        .controller()
        .create_snapshot(CreateSnapshotRequest {
            source_volume_id: id.clone(),
            name: "snap".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    // Later writes to the source do not reach the snapshot.
    write_dev(&target, 3 * MIB as u64, &pattern(4, 128 * 1024));

    let r = bed
        .create(
            "pvc-restored",
            0,
            Some(SourceType::Snapshot(SnapshotSource {
                snapshot_id: snap.snapshot_id.clone(),
            })),
        )
        .await;
    assert_eq!(r.capacity_bytes, 8 * MIB);
    bed.stage(&r.volume_id).await;
    let restored = bed.publish(&r.volume_id, "restored").await;
    assert_eq!(read_dev(&restored, 3 * MIB as u64, data.len()), data);
    assert_eq!(
        read_dev(&target, 3 * MIB as u64, data.len()),
        pattern(4, 128 * 1024)
    );
    for (vid, t) in [(&r.volume_id, &restored), (id, &target)] {
        bed.unpublish(vid, t).await;
        bed.unstage(vid).await;
    }
}

#[tokio::test]
#[ignore = "needs root and loop devices (run in the guest)"]
async fn expansion_grows_the_published_device() {
    let dir = scratch("expand");
    let _cleanup = Cleanup(dir.clone());
    let bed = Bed::start(&dir, None).await;
    let v = bed.create("pvc-grow", 8 * MIB, None).await;
    let id = &v.volume_id;
    bed.stage(id).await;
    let target = bed.publish(id, "grow").await;
    let data = pattern(1, 4096);
    write_dev(&target, 8 * MIB as u64 - 4096, &data);
    assert_eq!(dev_size(&target), 8 * MIB as u64);

    let r = bed
        .bb
        .controller()
        .controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: id.clone(),
            capacity_range: Some(CapacityRange {
                required_bytes: 20 * MIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.node_expansion_required);
    assert_eq!(r.capacity_bytes, 20 * MIB);
    assert_eq!(
        dev_size(&target),
        8 * MIB as u64,
        "the device grows only at NodeExpandVolume"
    );
    let n = bed
        .bb
        .node()
        .node_expand_volume(NodeExpandVolumeRequest {
            volume_id: id.clone(),
            volume_path: target.display().to_string(),
            staging_target_path: bed.staging(id).display().to_string(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(n.capacity_bytes, 20 * MIB);
    assert_eq!(dev_size(&target), 20 * MIB as u64);
    assert_eq!(read_dev(&target, 8 * MIB as u64 - 4096, 4096), data);
    write_dev(&target, 20 * MIB as u64 - 4096, &data);

    let stats = bed
        .bb
        .node()
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: target.display().to_string(),
            staging_target_path: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.usage[0].total, 20 * MIB);
    bed.unpublish(id, &target).await;
    bed.unstage(id).await;
}

#[tokio::test]
#[ignore = "needs root and loop devices (run in the guest)"]
async fn a_stalled_step_killed_is_completed_by_the_retry() {
    let dir = scratch("stall");
    let _cleanup = Cleanup(dir.clone());
    let mut bed = Bed::start(&dir, Some("stall:NodeStageVolume,stall:NodePublishVolume")).await;
    let v = bed.create("pvc-stall", 8 * MIB, None).await;
    let id = v.volume_id.clone();
    let file = bed.file(&id);

    let mut node = bed.bb.node();
    let req = bed.stage_req(&id);
    let call = tokio::spawn(async move { node.node_stage_volume(req).await });
    bed.bb.wait_stalled("NodeStageVolume").await;
    assert_eq!(loops_of(&file), 1, "the stalled stage attached the device");
    assert!(!call.is_finished(), "a stalled call never answers");
    bed.bb.kill();
    let e = call.await.unwrap().unwrap_err();
    assert_ne!(e.code(), Code::Ok);

    bed.bb.respawn(Some("stall:NodePublishVolume")).await;
    bed.stage(&id).await;
    assert_eq!(loops_of(&file), 1, "the retry reuses the attached device");

    let target = dir.join("pods").join("p").join("dev");
    fs::create_dir_all(target.parent().unwrap()).unwrap();
    let mut node = bed.bb.node();
    let req = bed.publish_req(&id, &target);
    let call = tokio::spawn(async move { node.node_publish_volume(req).await });
    bed.bb.wait_stalled("NodePublishVolume").await;
    assert!(fs::metadata(&target).unwrap().file_type().is_block_device());
    bed.bb.restart().await;
    assert!(call.await.unwrap().is_err());

    let again = bed.publish(&id, "p").await;
    assert_eq!(again, target);
    write_dev(&target, 0, &pattern(5, 4096));
    bed.unpublish(&id, &target).await;
    assert!(!target.exists());
    bed.unstage(&id).await;
    assert_eq!(loops_of(&file), 0, "nothing left attached");
}
