//! Host tests of the blockback test backend (tests/blockback): the example binary on a temporary
//! socket, its controller driven over gRPC. Nothing here needs a loop device; the node side is
//! covered in the guest (tests/guest_blockback.rs).

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::FileExt;

use sealcsi::csi::proto::volume_capability::{
    AccessMode, AccessType, BlockVolume, MountVolume, access_mode::Mode,
};
use sealcsi::csi::proto::volume_content_source::{
    SnapshotSource, Type as SourceType, VolumeSource,
};
use sealcsi::csi::proto::*;
use tonic::Code;

#[path = "common/blockback.rs"]
mod blockback;
use blockback::{Blockback, Options};

const MIB: i64 = 1 << 20;

fn block_cap() -> VolumeCapability {
    VolumeCapability {
        access_type: Some(AccessType::Block(BlockVolume {})),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    }
}

fn create(name: &str, bytes: i64) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![block_cap()],
        ..Default::default()
    }
}

fn from_source(name: &str, source: volume_content_source::Type) -> CreateVolumeRequest {
    CreateVolumeRequest {
        volume_content_source: Some(VolumeContentSource {
            r#type: Some(source),
        }),
        ..create(name, 0)
    }
}

async fn start(dir: &std::path::Path) -> Blockback {
    Blockback::spawn(Options::in_dir(dir, "host-node")).await
}

fn backing_file(bb: &Blockback, volume_id: &str) -> std::path::PathBuf {
    bb.options
        .state_dir
        .join("volumes")
        .join(format!("{volume_id}.img"))
}

#[tokio::test]
async fn identity_reports_the_test_plugin() {
    let dir = tempfile::tempdir().unwrap();
    let bb = start(dir.path()).await;
    let info = bb
        .identity()
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "blockback.test.sealcsi");
    assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));
    let probe = bb
        .identity()
        .probe(ProbeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(probe.ready, Some(true));
    let caps = bb
        .controller()
        .controller_get_capabilities(ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities;
    assert_eq!(caps.len(), 8, "{caps:?}");
    let info = bb
        .node()
        .node_get_info(NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.node_id, "host-node");
    assert_eq!(
        info.accessible_topology.unwrap().segments,
        HashMap::from([(
            "topology.blockback.test/node".to_string(),
            "host-node".to_string()
        )])
    );
}

#[tokio::test]
async fn create_is_idempotent_by_name_and_refuses_mount() {
    let dir = tempfile::tempdir().unwrap();
    let bb = start(dir.path()).await;
    let mut c = bb.controller();
    let v = c
        .create_volume(create("pvc-1", 5 * MIB + 1))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(v.capacity_bytes, 6 * MIB, "rounded up to whole MiB");
    assert_eq!(
        fs::metadata(backing_file(&bb, &v.volume_id)).unwrap().len(),
        6 * MIB as u64
    );
    assert_eq!(
        v.accessible_topology[0].segments["topology.blockback.test/node"],
        "host-node"
    );
    let again = c
        .create_volume(create("pvc-1", 4 * MIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(again.volume_id, v.volume_id);
    assert_eq!(again.capacity_bytes, 6 * MIB);
    let e = c
        .create_volume(create("pvc-1", 64 * MIB))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");

    let mut mount = create("pvc-2", MIB);
    mount.volume_capabilities = vec![VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume::default())),
        ..block_cap()
    }];
    let e = c.create_volume(mount).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("BLOCK"), "{e:?}");
    let listed = c
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        listed.entries.len(),
        1,
        "the refused volume was not created"
    );

    c.delete_volume(DeleteVolumeRequest {
        volume_id: v.volume_id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(!backing_file(&bb, &v.volume_id).exists());
    // Idempotent.
    c.delete_volume(DeleteVolumeRequest {
        volume_id: v.volume_id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn snapshot_restore_and_clone_copy_the_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let bb = start(dir.path()).await;
    let mut c = bb.controller();
    let v = c
        .create_volume(create("src", 4 * MIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let pattern: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
    let f = fs::OpenOptions::new()
        .write(true)
        .open(backing_file(&bb, &v.volume_id))
        .unwrap();
    f.write_all_at(&pattern, 3 * MIB as u64).unwrap();

    let snap_req = CreateSnapshotRequest {
        source_volume_id: v.volume_id.clone(),
        name: "snap-1".into(),
        ..Default::default()
    };
    let s = c
        .create_snapshot(snap_req.clone())
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert!(s.ready_to_use);
    assert_eq!(s.size_bytes, 4 * MIB);
    let again = c
        .create_snapshot(snap_req)
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(again.snapshot_id, s.snapshot_id, "idempotent by name");

    // The snapshot is a copy: later writes to the source do not change it.
    f.write_all_at(&[0xff; 4096], 3 * MIB as u64).unwrap();

    let restored = c
        .create_volume(from_source(
            "restored",
            SourceType::Snapshot(SnapshotSource {
                snapshot_id: s.snapshot_id.clone(),
            }),
        ))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(restored.capacity_bytes, 4 * MIB);
    let mut got = vec![0u8; 4096];
    fs::File::open(backing_file(&bb, &restored.volume_id))
        .unwrap()
        .read_exact_at(&mut got, 3 * MIB as u64)
        .unwrap();
    assert_eq!(got, pattern);

    let clone = c
        .create_volume(from_source(
            "clone",
            SourceType::Volume(VolumeSource {
                volume_id: v.volume_id.clone(),
            }),
        ))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    fs::File::open(backing_file(&bb, &clone.volume_id))
        .unwrap()
        .read_exact_at(&mut got, 3 * MIB as u64)
        .unwrap();
    assert_eq!(got, vec![0xff; 4096], "the clone copies the source now");

    let e = c
        .create_volume(from_source(
            "missing",
            SourceType::Snapshot(SnapshotSource {
                snapshot_id: "bbs-00000000000000000000000000000000".into(),
            }),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");

    let listed = c
        .list_snapshots(ListSnapshotsRequest {
            source_volume_id: v.volume_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.entries.len(), 1);
    c.delete_snapshot(DeleteSnapshotRequest {
        snapshot_id: s.snapshot_id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    c.delete_snapshot(DeleteSnapshotRequest {
        snapshot_id: s.snapshot_id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let listed = c
        .list_snapshots(ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.entries.is_empty());
}

#[tokio::test]
async fn expand_capacity_publish_and_paging() {
    let dir = tempfile::tempdir().unwrap();
    let bb = start(dir.path()).await;
    let mut c = bb.controller();
    let v = c
        .create_volume(create("grow", 8 * MIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let r = c
        .controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: v.volume_id.clone(),
            capacity_range: Some(CapacityRange {
                required_bytes: 12 * MIB - 5,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.capacity_bytes, 12 * MIB);
    assert!(r.node_expansion_required);
    assert_eq!(
        fs::metadata(backing_file(&bb, &v.volume_id)).unwrap().len(),
        12 * MIB as u64
    );

    let cap = c
        .get_capacity(GetCapacityRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(cap.available_capacity > 0);

    let publish = ControllerPublishVolumeRequest {
        volume_id: v.volume_id.clone(),
        node_id: "host-node".into(),
        volume_capability: Some(block_cap()),
        ..Default::default()
    };
    let p = c.controller_publish_volume(publish.clone()).await.unwrap();
    assert!(p.into_inner().publish_context.is_empty());
    c.controller_publish_volume(publish.clone()).await.unwrap();
    let e = c
        .controller_publish_volume(ControllerPublishVolumeRequest {
            node_id: "other-node".into(),
            ..publish.clone()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = c
        .delete_volume(DeleteVolumeRequest {
            volume_id: v.volume_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "published: {e:?}");
    for _ in 0..2 {
        c.controller_unpublish_volume(ControllerUnpublishVolumeRequest {
            volume_id: v.volume_id.clone(),
            node_id: "host-node".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }

    for i in 0..4 {
        c.create_volume(create(&format!("page-{i}"), MIB))
            .await
            .unwrap();
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .list_volumes(ListVolumesRequest {
                max_entries: 2,
                starting_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.entries.len() <= 2);
        seen.extend(
            page.entries
                .into_iter()
                .map(|e| e.volume.unwrap().volume_id),
        );
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    assert_eq!(seen.len(), 5);
    let e = c
        .list_volumes(ListVolumesRequest {
            max_entries: 0,
            starting_token: "nonsense".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Aborted);
}

#[tokio::test]
async fn restart_keeps_the_state() {
    let dir = tempfile::tempdir().unwrap();
    let mut bb = start(dir.path()).await;
    let mut c = bb.controller();
    let v = c
        .create_volume(create("kept", 2 * MIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let s = c
        .create_snapshot(CreateSnapshotRequest {
            source_volume_id: v.volume_id.clone(),
            name: "kept-snap".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    bb.restart().await;
    let mut c = bb.controller();
    let listed = c
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.entries.len(), 1);
    assert_eq!(
        listed.entries[0].volume.as_ref().unwrap().volume_id,
        v.volume_id
    );
    let again = c
        .create_volume(create("kept", 2 * MIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(again.volume_id, v.volume_id);
    let snaps = c
        .list_snapshots(ListSnapshotsRequest {
            snapshot_id: s.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(snaps.entries.len(), 1);
}
