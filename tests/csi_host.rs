//! The whole CSI gRPC surface over a real unix socket, against the in-memory device-mapper, volume engine
//! and mounter and a temporary state directory. Runs on any host (`cargo test`).

use std::collections::HashMap;
use std::os::unix::fs::{FileExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sealcsi::csi::proto::controller_client::ControllerClient;
use sealcsi::csi::proto::controller_service_capability::rpc::Type as CtrlRpc;
use sealcsi::csi::proto::identity_client::IdentityClient;
use sealcsi::csi::proto::node_client::NodeClient;
use sealcsi::csi::proto::node_service_capability::rpc::Type as NodeRpc;
use sealcsi::csi::proto::plugin_capability;
use sealcsi::csi::proto::volume_capability::{
    AccessMode, AccessType, BlockVolume, MountVolume, access_mode::Mode,
};
use sealcsi::csi::proto::*;
use sealcsi::csi::{
    CsiError, DEFAULT_DRIVER_NAME, Mode as PluginMode, PluginConfig, PluginDeps, TOPOLOGY_KEY,
};
use sealcsi::dm::{DeviceMapper, MemoryDm, memory::MemoryOp};
use sealcsi::header::FsKind;
use sealcsi::health::{IntegrityFailures, MemoryLog};
use sealcsi::node::{MemoryEngine, MemoryMounter, Mounter, VolumeEngine};
use sealcsi::volume::init::InitMode;
use tonic::Code;
use tonic::transport::Channel;

#[path = "common/plugin.rs"]
mod plugin;
use plugin::{Served, serve};

const MIB: i64 = 1 << 20;

struct Plugin {
    _dir: Option<tempfile::TempDir>,
    state: PathBuf,
    work: PathBuf,
    socket: PathBuf,
    dm: Arc<MemoryDm>,
    engine: Arc<MemoryEngine>,
    mounter: Arc<MemoryMounter>,
    /// The engine's kernel log (integrity failures): tests write kernel records into it.
    log: MemoryLog,
    failures: Arc<IntegrityFailures>,
    served: Served,
}

impl Plugin {
    async fn start() -> Plugin {
        Self::start_with(PluginMode::All, "node-a", "identity-a", None).await
    }

    /// A plugin in `mode` on node `node_id` whose engine has `identity`; `state` shares another
    /// plugin's state directory.
    async fn start_with(
        mode: PluginMode,
        node_id: &str,
        identity: &str,
        state: Option<&Path>,
    ) -> Plugin {
        Self::start_full(mode, node_id, identity, state, None).await
    }

    async fn start_full(
        mode: PluginMode,
        node_id: &str,
        identity: &str,
        state: Option<&Path>,
        metrics: Option<std::net::SocketAddr>,
    ) -> Plugin {
        let dir = tempfile::tempdir().unwrap();
        let state = state
            .map(Path::to_path_buf)
            .unwrap_or_else(|| dir.path().join("state"));
        let work = dir.path().join("work");
        std::fs::create_dir_all(&work).unwrap();
        let socket = dir.path().join("csi/csi.sock");
        let dm = Arc::new(MemoryDm::new());
        let log = MemoryLog::default();
        let failures = IntegrityFailures::new(dm.clone(), Arc::new(log.clone())).unwrap();
        let engine = Arc::new(
            MemoryEngine::new(dm.clone(), identity).with_integrity_failures(failures.clone()),
        );
        let mounter = Arc::new(MemoryMounter::new());
        let deps = PluginDeps {
            dm: dm.clone(),
            engine: engine.clone(),
            mounter: mounter.clone(),
        };
        let mut config = PluginConfig::new(
            format!("unix://{}", socket.display()),
            node_id,
            mode,
            &state,
        );
        config.metrics_address = metrics;
        let served = serve(config, deps).await;
        Plugin {
            _dir: Some(dir),
            state,
            work,
            socket,
            dm,
            engine,
            mounter,
            log,
            failures,
            served,
        }
    }

    fn identity(&self) -> IdentityClient<Channel> {
        self.served.identity()
    }

    fn controller(&self) -> ControllerClient<Channel> {
        self.served.controller()
    }

    fn node(&self) -> NodeClient<Channel> {
        self.served.node()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.work.join(name)
    }

    fn backing(&self, volume_id: &str) -> PathBuf {
        self.state.join("volumes").join(format!("{volume_id}.img"))
    }

    async fn stop(mut self) -> Result<(), CsiError> {
        self.served.stop().await
    }

    async fn create(&self, name: &str, bytes: i64, params: &[(&str, &str)]) -> Volume {
        self.controller()
            .create_volume(create_req(
                name,
                bytes,
                params,
                vec![mount_cap(Mode::SingleNodeWriter, "")],
            ))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap()
    }

    async fn stage(
        &self,
        id: &str,
        staging: &Path,
        cap: VolumeCapability,
    ) -> Result<(), tonic::Status> {
        self.node()
            .node_stage_volume(NodeStageVolumeRequest {
                volume_id: id.into(),
                staging_target_path: staging.display().to_string(),
                volume_capability: Some(cap),
                secrets: HashMap::from([("never-logged".into(), "s3cr3t".into())]),
                ..Default::default()
            })
            .await
            .map(drop)
    }

    async fn unstage(&self, id: &str, staging: &Path) -> Result<(), tonic::Status> {
        self.node()
            .node_unstage_volume(NodeUnstageVolumeRequest {
                volume_id: id.into(),
                staging_target_path: staging.display().to_string(),
            })
            .await
            .map(drop)
    }

    async fn publish(
        &self,
        id: &str,
        staging: &Path,
        target: &Path,
        cap: VolumeCapability,
        readonly: bool,
    ) -> Result<(), tonic::Status> {
        self.node()
            .node_publish_volume(NodePublishVolumeRequest {
                volume_id: id.into(),
                staging_target_path: staging.display().to_string(),
                target_path: target.display().to_string(),
                volume_capability: Some(cap),
                readonly,
                ..Default::default()
            })
            .await
            .map(drop)
    }

    async fn unpublish(&self, id: &str, target: &Path) -> Result<(), tonic::Status> {
        self.node()
            .node_unpublish_volume(NodeUnpublishVolumeRequest {
                volume_id: id.into(),
                target_path: target.display().to_string(),
            })
            .await
            .map(drop)
    }

    async fn stats(
        &self,
        id: &str,
        path: &Path,
    ) -> Result<NodeGetVolumeStatsResponse, tonic::Status> {
        self.node()
            .node_get_volume_stats(NodeGetVolumeStatsRequest {
                volume_id: id.into(),
                volume_path: path.display().to_string(),
                staging_target_path: String::new(),
            })
            .await
            .map(|r| r.into_inner())
    }
}

fn mount_cap(mode: Mode, fs: &str) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode { mode: mode as i32 }),
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs.into(),
            mount_flags: vec![],
            volume_mount_group: String::new(),
        })),
    }
}

fn block_cap(mode: Mode) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode { mode: mode as i32 }),
        access_type: Some(AccessType::Block(BlockVolume {})),
    }
}

fn create_req(
    name: &str,
    bytes: i64,
    params: &[(&str, &str)],
    caps: Vec<VolumeCapability>,
) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: caps,
        parameters: params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        secrets: HashMap::from([("never-logged".into(), "s3cr3t".into())]),
        ..Default::default()
    }
}

fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> Code {
    r.expect_err("expected an error status").code()
}

#[tokio::test]
async fn identity_reports_driver_capabilities_and_readiness() {
    let p = Plugin::start().await;
    let info = p
        .identity()
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, DEFAULT_DRIVER_NAME);
    assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));
    let caps = p
        .identity()
        .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    let services: Vec<_> = caps
        .capabilities
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(plugin_capability::Type::Service(s)) => Some(s.r#type),
            _ => None,
        })
        .collect();
    assert!(services.contains(&(plugin_capability::service::Type::ControllerService as i32)));
    assert!(
        services
            .contains(&(plugin_capability::service::Type::VolumeAccessibilityConstraints as i32))
    );
    assert!(caps.capabilities.iter().any(|c| matches!(&c.r#type,
        Some(plugin_capability::Type::VolumeExpansion(e)) if e.r#type == plugin_capability::volume_expansion::Type::Online as i32)));
    let probe = p
        .identity()
        .probe(ProbeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(probe.ready, Some(true));

    p.engine.set_source_down(true);
    let err = p.identity().probe(ProbeRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("sealing source"),
        "{}",
        err.message()
    );
    p.engine.set_source_down(false);
    p.dm.fail_next(MemoryOp::Version);
    let err = p.identity().probe(ProbeRequest {}).await.unwrap_err();
    assert!(err.message().contains("device-mapper"), "{}", err.message());
    assert_eq!(
        p.identity()
            .probe(ProbeRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready,
        Some(true)
    );
    p.stop().await.unwrap();
}

#[tokio::test]
async fn capabilities_and_node_info() {
    let p = Plugin::start().await;
    let caps = p
        .controller()
        .controller_get_capabilities(ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    let rpcs: Vec<i32> = caps
        .capabilities
        .iter()
        .filter_map(|c| {
            c.r#type
                .as_ref()
                .map(|controller_service_capability::Type::Rpc(r)| r.r#type)
        })
        .collect();
    for want in [
        CtrlRpc::CreateDeleteVolume,
        CtrlRpc::ListVolumes,
        CtrlRpc::GetCapacity,
        CtrlRpc::GetVolume,
        CtrlRpc::VolumeCondition,
    ] {
        assert!(rpcs.contains(&(want as i32)), "{want:?}");
    }
    // Expansion is node-only for Kubernetes: one leader-elected csi-resizer serves the whole cluster and
    // would send ControllerExpandVolume to a node that does not hold the volume.
    assert!(!rpcs.contains(&(CtrlRpc::ExpandVolume as i32)));
    assert!(!rpcs.contains(&(CtrlRpc::PublishUnpublishVolume as i32)));
    assert!(!rpcs.contains(&(CtrlRpc::CreateDeleteSnapshot as i32)));
    let caps = p
        .node()
        .node_get_capabilities(NodeGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    let rpcs: Vec<i32> = caps
        .capabilities
        .iter()
        .filter_map(|c| {
            c.r#type
                .as_ref()
                .map(|node_service_capability::Type::Rpc(r)| r.r#type)
        })
        .collect();
    for want in [
        NodeRpc::StageUnstageVolume,
        NodeRpc::GetVolumeStats,
        NodeRpc::ExpandVolume,
        NodeRpc::VolumeCondition,
    ] {
        assert!(rpcs.contains(&(want as i32)), "{want:?}");
    }
    let info = p
        .node()
        .node_get_info(NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.node_id, "node-a");
    assert_eq!(
        info.accessible_topology.unwrap().segments[TOPOLOGY_KEY],
        "node-a"
    );
    p.stop().await.unwrap();
}

#[tokio::test]
async fn create_volume_validates_requests() {
    let p = Plugin::start().await;
    let mut c = p.controller();
    let ok_cap = || vec![mount_cap(Mode::SingleNodeWriter, "")];
    assert_eq!(
        code(
            c.create_volume(create_req("", 64 * MIB, &[], ok_cap()))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.create_volume(create_req("v", 64 * MIB, &[], vec![]))
                .await
        ),
        Code::InvalidArgument
    );
    for mode in [
        Mode::MultiNodeMultiWriter,
        Mode::MultiNodeReaderOnly,
        Mode::MultiNodeSingleWriter,
    ] {
        let r = c
            .create_volume(create_req("v", 64 * MIB, &[], vec![mount_cap(mode, "")]))
            .await;
        assert_eq!(code(r), Code::InvalidArgument, "{mode:?}");
    }
    let r = c
        .create_volume(create_req(
            "v",
            64 * MIB,
            &[],
            vec![mount_cap(Mode::SingleNodeWriter, "btrfs")],
        ))
        .await;
    assert_eq!(code(r), Code::InvalidArgument);
    let no_type = VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: None,
    };
    assert_eq!(
        code(
            c.create_volume(create_req("v", 64 * MIB, &[], vec![no_type]))
                .await
        ),
        Code::InvalidArgument
    );

    let err = c
        .create_volume(create_req("v", 64 * MIB, &[("fstype", "ext4")], ok_cap()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    for key in ["integrity", "init", "journal"] {
        assert!(
            err.message().contains(key),
            "allowed keys listed: {}",
            err.message()
        );
    }
    let r = c
        .create_volume(create_req("v", 64 * MIB, &[("integrity", "md5")], ok_cap()))
        .await;
    assert_eq!(code(r), Code::InvalidArgument);

    let mut req = create_req("v", 64 * MIB, &[], ok_cap());
    req.capacity_range = Some(CapacityRange {
        required_bytes: 100 * MIB,
        limit_bytes: 80 * MIB,
    });
    assert_eq!(
        code(c.create_volume(req).await),
        Code::InvalidArgument,
        "limit < required"
    );
    let mut req = create_req("v", 0, &[], ok_cap());
    req.capacity_range = Some(CapacityRange {
        required_bytes: 0,
        limit_bytes: MIB,
    });
    assert_eq!(
        code(c.create_volume(req).await),
        Code::OutOfRange,
        "limit below the smallest volume"
    );
    let mut req = create_req("v", 64 * MIB, &[], ok_cap());
    req.volume_content_source = Some(VolumeContentSource {
        r#type: Some(volume_content_source::Type::Volume(
            volume_content_source::VolumeSource {
                volume_id: "sv-x".into(),
            },
        )),
    });
    assert_eq!(code(c.create_volume(req).await), Code::InvalidArgument);
    let mut req = create_req("v", 64 * MIB, &[], ok_cap());
    let other = Topology {
        segments: HashMap::from([(TOPOLOGY_KEY.to_string(), "node-b".to_string())]),
    };
    req.accessibility_requirements = Some(TopologyRequirement {
        requisite: vec![other],
        preferred: vec![],
    });
    assert_eq!(code(c.create_volume(req).await), Code::ResourceExhausted);
    // Nothing was made by any of these.
    let list = c
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(list.entries.is_empty());
    p.stop().await.unwrap();
}

#[tokio::test]
async fn create_volume_is_idempotent_and_refuses_conflicts() {
    let p = Plugin::start().await;
    let mut c = p.controller();
    let caps = vec![
        block_cap(Mode::SingleNodeWriter),
        block_cap(Mode::SingleNodeReaderOnly),
    ];
    let a = c
        .create_volume(create_req(
            "pvc-1",
            100 * MIB + 1,
            &[("journal", "direct")],
            caps.clone(),
        ))
        .await
        .unwrap();
    let a = a.into_inner().volume.unwrap();
    assert!(a.volume_id.starts_with("sv-"));
    assert_eq!(a.capacity_bytes, 101 * MIB, "whole MiB");
    assert_eq!(a.volume_context["journal"], "direct");
    assert_eq!(a.accessible_topology[0].segments[TOPOLOGY_KEY], "node-a");
    assert_eq!(
        std::fs::metadata(p.backing(&a.volume_id)).unwrap().len(),
        109 * MIB as u64,
        "the usable 101 MiB plus the header region, integrity journal and tags"
    );
    let b = c
        .create_volume(create_req(
            "pvc-1",
            100 * MIB + 1,
            &[("journal", "direct")],
            caps.clone(),
        ))
        .await
        .unwrap();
    assert_eq!(b.into_inner().volume.unwrap(), a);
    let r = c
        .create_volume(create_req(
            "pvc-1",
            200 * MIB,
            &[("journal", "direct")],
            caps.clone(),
        ))
        .await;
    assert_eq!(code(r), Code::AlreadyExists);
    let r = c
        .create_volume(create_req("pvc-1", 100 * MIB + 1, &[], caps.clone()))
        .await;
    assert_eq!(code(r), Code::AlreadyExists);
    let other = p.create("pvc-2", 64 * MIB, &[]).await;
    assert_ne!(other.volume_id, a.volume_id);
    p.stop().await.unwrap();
}

#[tokio::test]
async fn a_filesystem_volume_in_direct_mode_is_refused_and_nothing_is_created() {
    let p = Plugin::start().await;
    let mut c = p.controller();
    for caps in [
        vec![mount_cap(Mode::SingleNodeWriter, "")],
        vec![
            block_cap(Mode::SingleNodeWriter),
            mount_cap(Mode::SingleNodeWriter, "xfs"),
        ],
    ] {
        let r = c
            .create_volume(create_req(
                "pvc-d",
                64 * MIB,
                &[("journal", "direct")],
                caps,
            ))
            .await;
        let status = r.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(
            status.message().contains("raw block volumes only"),
            "{status:?}"
        );
    }
    let list = c
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(list.entries.is_empty(), "nothing was created");
    // A block volume in direct mode is made, and is not confirmed for a filesystem.
    let v = c
        .create_volume(create_req(
            "pvc-d",
            64 * MIB,
            &[("journal", "direct")],
            vec![block_cap(Mode::SingleNodeWriter)],
        ))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let r = c
        .validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
            volume_id: v.volume_id.clone(),
            volume_capabilities: vec![mount_cap(Mode::SingleNodeWriter, "")],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.confirmed.is_none());
    assert!(
        r.message.contains("raw block volumes only"),
        "{}",
        r.message
    );
    p.stop().await.unwrap();
}

#[tokio::test]
async fn delete_volume_crypto_erases_both_header_copies_and_is_idempotent() {
    let p = Plugin::start().await;
    let v = p.create("pvc-del", 64 * MIB, &[]).await;
    let staging = p.path("staging");
    p.stage(
        &v.volume_id,
        &staging,
        mount_cap(Mode::SingleNodeWriter, ""),
    )
    .await
    .unwrap();
    // Staged: refused.
    let del = || DeleteVolumeRequest {
        volume_id: v.volume_id.clone(),
        secrets: HashMap::new(),
    };
    assert_eq!(
        code(p.controller().delete_volume(del()).await),
        Code::FailedPrecondition
    );
    p.unstage(&v.volume_id, &staging).await.unwrap();

    let backing = p.backing(&v.volume_id);
    let region = std::fs::read(&backing).unwrap();
    assert_eq!(&region[..7], b"MEMSEAL", "copy 0 written at format");
    assert_eq!(&region[4096..4103], b"MEMSEAL", "copy 1 written at format");
    // A second name for the file shows what delete did to its content before removing it.
    let witness = p.path("witness");
    std::fs::hard_link(&backing, &witness).unwrap();
    p.controller().delete_volume(del()).await.unwrap();
    assert!(!backing.exists());
    let after = std::fs::read(&witness).unwrap();
    assert!(
        after[..8192].iter().all(|&b| b == 0),
        "both header copies zeroed"
    );
    p.controller().delete_volume(del()).await.unwrap();
    p.controller()
        .delete_volume(DeleteVolumeRequest {
            volume_id: "not-ours".into(),
            secrets: HashMap::new(),
        })
        .await
        .unwrap();
    assert_eq!(
        code(
            p.controller()
                .delete_volume(DeleteVolumeRequest::default())
                .await
        ),
        Code::InvalidArgument
    );
    let r = p
        .controller()
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: v.volume_id.clone(),
        })
        .await;
    assert_eq!(code(r), Code::NotFound);
    p.stop().await.unwrap();
}

#[tokio::test]
async fn list_volumes_paginates_in_stable_order() {
    let p = Plugin::start().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(p.create(&format!("pvc-{i}"), 64 * MIB, &[]).await.volume_id);
    }
    ids.sort();
    let mut c = p.controller();
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = c
            .list_volumes(ListVolumesRequest {
                max_entries: 2,
                starting_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(page.entries.len() <= 2);
        for e in &page.entries {
            let status = e.status.as_ref().unwrap();
            assert!(!status.volume_condition.as_ref().unwrap().abnormal);
            seen.push(e.volume.as_ref().unwrap().volume_id.clone());
        }
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, ids);
    let all = c
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.entries.len(), 5);
    assert!(all.next_token.is_empty());
    let r = c
        .list_volumes(ListVolumesRequest {
            max_entries: 1,
            starting_token: "bogus".into(),
        })
        .await;
    assert_eq!(code(r), Code::Aborted);
    let r = c
        .list_volumes(ListVolumesRequest {
            max_entries: -1,
            starting_token: String::new(),
        })
        .await;
    assert_eq!(code(r), Code::InvalidArgument);
    p.stop().await.unwrap();
}

#[tokio::test]
async fn get_capacity_reports_free_space_of_this_node() {
    let p = Plugin::start().await;
    let mut c = p.controller();
    let cap = c
        .get_capacity(GetCapacityRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(cap.available_capacity > 0);
    // Usable bytes, as a claim's size is: whole MiB, what a 64 MiB backing file offers at least.
    assert_eq!(cap.available_capacity % MIB, 0);
    assert_eq!(cap.maximum_volume_size, Some(cap.available_capacity));
    assert_eq!(cap.minimum_volume_size, Some(57 * MIB));
    let xts = c
        .get_capacity(GetCapacityRequest {
            parameters: HashMap::from([("integrity".to_string(), "none".to_string())]),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(xts.minimum_volume_size, Some(59 * MIB));
    assert!(
        xts.available_capacity > cap.available_capacity,
        "no integrity metadata: more of the same disk is usable"
    );
    let other = GetCapacityRequest {
        accessible_topology: Some(Topology {
            segments: HashMap::from([(TOPOLOGY_KEY.to_string(), "node-b".to_string())]),
        }),
        ..Default::default()
    };
    assert_eq!(
        c.get_capacity(other)
            .await
            .unwrap()
            .into_inner()
            .available_capacity,
        0
    );
    let multi = GetCapacityRequest {
        volume_capabilities: vec![mount_cap(Mode::MultiNodeMultiWriter, "")],
        ..Default::default()
    };
    assert_eq!(
        c.get_capacity(multi)
            .await
            .unwrap()
            .into_inner()
            .available_capacity,
        0
    );
    let bad = GetCapacityRequest {
        parameters: HashMap::from([("colour".to_string(), "red".to_string())]),
        ..Default::default()
    };
    assert_eq!(code(c.get_capacity(bad).await), Code::InvalidArgument);
    p.stop().await.unwrap();
}

#[tokio::test]
async fn get_volume_and_validate_capabilities() {
    let p = Plugin::start().await;
    let v = p.create("pvc-v", 64 * MIB, &[("init", "full")]).await;
    let mut c = p.controller();
    let got = c
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: v.volume_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.volume.unwrap(), v);
    assert!(!got.status.unwrap().volume_condition.unwrap().abnormal);
    let r = c
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: "sv-00".into(),
        })
        .await;
    assert_eq!(code(r), Code::NotFound);
    assert_eq!(
        code(
            c.controller_get_volume(ControllerGetVolumeRequest::default())
                .await
        ),
        Code::InvalidArgument
    );

    let validate = |caps: Vec<VolumeCapability>, params: &[(&str, &str)], id: &str| {
        ValidateVolumeCapabilitiesRequest {
            volume_id: id.into(),
            volume_capabilities: caps,
            parameters: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }
    };
    let ok = c
        .validate_volume_capabilities(validate(
            vec![
                mount_cap(Mode::SingleNodeWriter, "xfs"),
                block_cap(Mode::SingleNodeMultiWriter),
            ],
            &[("init", "full")],
            &v.volume_id,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.confirmed.unwrap().volume_capabilities.len(), 2);
    let no = c
        .validate_volume_capabilities(validate(
            vec![mount_cap(Mode::MultiNodeReaderOnly, "")],
            &[],
            &v.volume_id,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(no.confirmed.is_none());
    assert!(
        no.message.contains("MULTI_NODE_READER_ONLY"),
        "{}",
        no.message
    );
    let no = c
        .validate_volume_capabilities(validate(
            vec![mount_cap(Mode::SingleNodeWriter, "")],
            &[("init", "fast")],
            &v.volume_id,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(no.confirmed.is_none());
    let r = c
        .validate_volume_capabilities(validate(vec![], &[], &v.volume_id))
        .await;
    assert_eq!(code(r), Code::InvalidArgument);
    let r = c
        .validate_volume_capabilities(validate(
            vec![mount_cap(Mode::SingleNodeWriter, "")],
            &[],
            "",
        ))
        .await;
    assert_eq!(code(r), Code::InvalidArgument);
    let r = c
        .validate_volume_capabilities(validate(
            vec![mount_cap(Mode::SingleNodeWriter, "")],
            &[],
            "sv-nope",
        ))
        .await;
    assert_eq!(code(r), Code::NotFound);
    p.stop().await.unwrap();
}

#[tokio::test]
async fn unimplemented_rpcs_and_services() {
    let p = Plugin::start().await;
    let mut c = p.controller();
    assert_eq!(
        code(c.create_snapshot(CreateSnapshotRequest::default()).await),
        Code::Unimplemented
    );
    assert_eq!(
        code(c.delete_snapshot(DeleteSnapshotRequest::default()).await),
        Code::Unimplemented
    );
    assert_eq!(
        code(c.list_snapshots(ListSnapshotsRequest::default()).await),
        Code::Unimplemented
    );
    assert_eq!(
        code(c.get_snapshot(GetSnapshotRequest::default()).await),
        Code::Unimplemented
    );
    assert_eq!(
        code(
            c.controller_publish_volume(ControllerPublishVolumeRequest::default())
                .await
        ),
        Code::Unimplemented
    );
    assert_eq!(
        code(
            c.controller_unpublish_volume(ControllerUnpublishVolumeRequest::default())
                .await
        ),
        Code::Unimplemented
    );
    assert_eq!(
        code(
            c.controller_modify_volume(ControllerModifyVolumeRequest::default())
                .await
        ),
        Code::Unimplemented
    );
    let mut g = group_controller_client::GroupControllerClient::new(p.served.channel.clone());
    let r = g
        .group_controller_get_capabilities(GroupControllerGetCapabilitiesRequest {})
        .await;
    assert_eq!(code(r), Code::Unimplemented);
    let mut s = snapshot_metadata_client::SnapshotMetadataClient::new(p.served.channel.clone());
    let r = s
        .get_metadata_allocated(GetMetadataAllocatedRequest::default())
        .await;
    assert_eq!(code(r), Code::Unimplemented);
    p.stop().await.unwrap();
}

#[tokio::test]
async fn node_requests_need_their_fields_and_known_volumes() {
    let p = Plugin::start().await;
    let v = p.create("pvc-n", 64 * MIB, &[]).await;
    let id = v.volume_id.as_str();
    let staging = p.path("staging");
    let target = p.path("target");
    let cap = || mount_cap(Mode::SingleNodeWriter, "");
    let mut n = p.node();
    assert_eq!(
        code(p.stage("", &staging, cap()).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(p.stage(id, Path::new(""), cap()).await),
        Code::InvalidArgument
    );
    let r = n
        .node_stage_volume(NodeStageVolumeRequest {
            volume_id: id.into(),
            staging_target_path: staging.display().to_string(),
            ..Default::default()
        })
        .await;
    assert_eq!(code(r), Code::InvalidArgument, "missing capability");
    assert_eq!(
        code(
            p.stage(id, &staging, mount_cap(Mode::MultiNodeMultiWriter, ""))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            p.stage("sv-0123456789abcdef0123456789abcdef", &staging, cap())
                .await
        ),
        Code::NotFound
    );
    assert_eq!(code(p.unstage("", &staging).await), Code::InvalidArgument);
    assert_eq!(
        code(p.unstage(id, Path::new("")).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            p.unstage("sv-0123456789abcdef0123456789abcdef", &staging)
                .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(p.publish("", &staging, &target, cap(), false).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(p.publish(id, &staging, Path::new(""), cap(), false).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(p.publish(id, Path::new(""), &target, cap(), false).await),
        Code::InvalidArgument
    );
    let r = n
        .node_publish_volume(NodePublishVolumeRequest {
            volume_id: id.into(),
            staging_target_path: staging.display().to_string(),
            target_path: target.display().to_string(),
            ..Default::default()
        })
        .await;
    assert_eq!(code(r), Code::InvalidArgument, "missing capability");
    assert_eq!(
        code(
            p.publish(
                "sv-0123456789abcdef0123456789abcdef",
                &staging,
                &target,
                cap(),
                false
            )
            .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(p.publish(id, &staging, &target, cap(), false).await),
        Code::FailedPrecondition,
        "not staged"
    );
    assert_eq!(code(p.unpublish("", &target).await), Code::InvalidArgument);
    assert_eq!(
        code(p.unpublish(id, Path::new("")).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            p.unpublish("sv-0123456789abcdef0123456789abcdef", &target)
                .await
        ),
        Code::NotFound
    );
    assert_eq!(code(p.stats("", &target).await), Code::InvalidArgument);
    assert_eq!(
        code(p.stats(id, Path::new("")).await),
        Code::InvalidArgument
    );
    assert_eq!(code(p.stats(id, &p.path("nowhere")).await), Code::NotFound);
    assert_eq!(
        code(
            p.stats("sv-0123456789abcdef0123456789abcdef", &target)
                .await
        ),
        Code::NotFound
    );
    let r = n
        .node_expand_volume(NodeExpandVolumeRequest {
            volume_id: id.into(),
            ..Default::default()
        })
        .await;
    assert_eq!(code(r), Code::InvalidArgument);
    let r = n
        .node_expand_volume(NodeExpandVolumeRequest {
            volume_path: target.display().to_string(),
            ..Default::default()
        })
        .await;
    assert_eq!(code(r), Code::InvalidArgument);
    p.stop().await.unwrap();
}

async fn scrape(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    for _ in 0..100 {
        if let Ok(mut s) = tokio::net::TcpStream::connect(addr).await {
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
                .await
                .unwrap();
            let mut body = String::new();
            s.read_to_string(&mut body).await.unwrap();
            return body;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("metrics endpoint {addr} never answered");
}

#[tokio::test]
async fn metrics_endpoint_counts_calls_staged_volumes_and_unseal_failures() {
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let p = Plugin::start_full(PluginMode::All, "node-a", "identity-a", None, Some(addr)).await;
    let v = p.create("pvc-metrics", 64 * MIB, &[]).await;
    let id = v.volume_id.as_str();
    let staging = p.path("staging");
    p.stage(id, &staging, mount_cap(Mode::SingleNodeWriter, ""))
        .await
        .unwrap();
    let conflicting = create_req(
        "pvc-metrics",
        128 * MIB,
        &[],
        vec![mount_cap(Mode::SingleNodeWriter, "")],
    );
    assert_eq!(
        code(p.controller().create_volume(conflicting).await),
        Code::AlreadyExists
    );

    // Another identity sharing the state dir cannot unseal the volume: counted by reason.
    let other_addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let other = Plugin::start_full(
        PluginMode::All,
        "node-a",
        "identity-b",
        Some(&p.state),
        Some(other_addr),
    )
    .await;
    let err = other
        .stage(
            id,
            &other.path("staging"),
            mount_cap(Mode::SingleNodeWriter, ""),
        )
        .await;
    assert!(err.is_err());
    let other_text = scrape(other_addr).await;
    assert!(
        other_text.contains(r#"sealcsi_unseal_failures_total{reason="wrong_identity"} 1"#),
        "{other_text}"
    );

    let text = scrape(addr).await;
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    assert!(
        text.contains(r#"sealcsi_csi_rpc_total{method="CreateVolume",code="Ok"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"sealcsi_csi_rpc_total{method="CreateVolume",code="AlreadyExists"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"sealcsi_csi_rpc_total{method="NodeStageVolume",code="Ok"} 1"#),
        "{text}"
    );
    assert!(text.contains(r#"sealcsi_csi_rpc_duration_seconds_count{method="NodeStageVolume"} 1"#));
    assert!(text.contains("sealcsi_volumes_staged 1"), "{text}");
    assert!(
        text.contains(&format!(
            r#"sealcsi_integrity_mismatches{{volume_id="{id}"}} 0"#
        )),
        "{text}"
    );
    assert!(
        text.contains(r#"sealcsi_init_duration_seconds_count{mode="fast",phase="mkfs"} 1"#),
        "{text}"
    );
    // No label carries a path, a volume name or anything a caller chose freely besides the volume id.
    assert!(!text.contains("pvc-metrics") && !text.contains(&*staging.to_string_lossy()));
}

#[tokio::test]
async fn filesystem_lifecycle_is_idempotent_at_every_step() {
    let p = Plugin::start().await;
    let v = p.create("pvc-fs", 64 * MIB, &[]).await;
    let id = v.volume_id.as_str();
    let staging = p.path("staging");
    let target = p.path("pods/pod-1/volume");
    let cap = || mount_cap(Mode::SingleNodeWriter, "");
    p.stage(id, &staging, cap()).await.unwrap();
    p.stage(id, &staging, cap()).await.unwrap();
    let formats = p.engine.formats();
    assert_eq!(formats.len(), 1, "formatted once");
    assert_eq!(formats[0].1.fs, FsKind::Ext4);
    assert_eq!(formats[0].1.init, InitMode::Fast);
    assert!(!formats[0].1.force);
    let staged = p.mounter.mounted_at(&staging).unwrap().unwrap();
    assert_eq!(staged.fs_type, "ext4");
    assert_eq!(staged.source, format!("/dev/mapper/sealcsi-{id}"));

    p.publish(id, &staging, &target, cap(), false)
        .await
        .unwrap();
    p.publish(id, &staging, &target, cap(), false)
        .await
        .unwrap();
    let published = p.mounter.mounted_at(&target).unwrap().unwrap();
    assert!(published.same_filesystem(&staged));
    assert!(!published.read_only());
    assert_eq!(
        code(p.publish(id, &staging, &target, cap(), true).await),
        Code::AlreadyExists,
        "readonly differs"
    );
    // A second target on this node (SINGLE_NODE_MULTI_WRITER-style).
    let target2 = p.path("pods/pod-2/volume");
    p.publish(
        id,
        &staging,
        &target2,
        mount_cap(Mode::SingleNodeMultiWriter, ""),
        false,
    )
    .await
    .unwrap();

    assert_eq!(
        code(p.unstage(id, &staging).await),
        Code::FailedPrecondition,
        "still published"
    );
    assert!(
        p.mounter.mounted_at(&staging).unwrap().is_some(),
        "staging left as it was"
    );
    p.unpublish(id, &target).await.unwrap();
    assert!(!target.exists(), "target removed");
    p.unpublish(id, &target).await.unwrap();
    p.unpublish(id, &target2).await.unwrap();
    p.unstage(id, &staging).await.unwrap();
    assert!(p.mounter.mounted_at(&staging).unwrap().is_none());
    assert!(
        p.engine
            .open_device(&format!("sealcsi-{id}"))
            .unwrap()
            .is_none()
    );
    p.unstage(id, &staging).await.unwrap();

    // Stage again: opened, not formatted again.
    p.stage(id, &staging, cap()).await.unwrap();
    assert_eq!(p.engine.formats().len(), 1);
    assert_eq!(
        code(
            p.stage(
                id,
                &p.path("staging-2"),
                mount_cap(Mode::SingleNodeWriter, "xfs")
            )
            .await
        ),
        Code::InvalidArgument
    );
    p.unstage(id, &staging).await.unwrap();
    p.stop().await.unwrap();
}

#[tokio::test]
async fn readonly_publish_is_a_readonly_bind() {
    let p = Plugin::start().await;
    let v = p.create("pvc-ro", 64 * MIB, &[]).await;
    let (staging, target) = (p.path("s"), p.path("t"));
    p.stage(
        &v.volume_id,
        &staging,
        mount_cap(Mode::SingleNodeWriter, "xfs"),
    )
    .await
    .unwrap();
    assert_eq!(p.engine.formats()[0].1.fs, FsKind::Xfs);
    p.publish(
        &v.volume_id,
        &staging,
        &target,
        mount_cap(Mode::SingleNodeWriter, "xfs"),
        true,
    )
    .await
    .unwrap();
    assert!(p.mounter.mounted_at(&target).unwrap().unwrap().read_only());
    assert!(!p.mounter.mounted_at(&staging).unwrap().unwrap().read_only());
    p.publish(
        &v.volume_id,
        &staging,
        &target,
        mount_cap(Mode::SingleNodeWriter, "xfs"),
        true,
    )
    .await
    .unwrap();
    let t2 = p.path("t2");
    p.publish(
        &v.volume_id,
        &staging,
        &t2,
        mount_cap(Mode::SingleNodeReaderOnly, "xfs"),
        false,
    )
    .await
    .unwrap();
    assert!(
        p.mounter.mounted_at(&t2).unwrap().unwrap().read_only(),
        "reader-only mode"
    );
    p.unpublish(&v.volume_id, &target).await.unwrap();
    p.unpublish(&v.volume_id, &t2).await.unwrap();
    p.unstage(&v.volume_id, &staging).await.unwrap();
    p.stop().await.unwrap();
}

/// The lead's Kubernetes finding: a 64Mi block claim must give the pod at least 64 MiB, and every
/// capacity the plugin reports must be what the pod can use. Records of the previous release (the backing
/// file's size as the capacity) are reported as what their file offers, and nothing rewrites them.
#[tokio::test]
async fn a_block_volume_offers_what_every_capacity_reports_and_legacy_records_are_honest() {
    let p = Plugin::start().await;
    let mut c = p.controller();
    let v = c
        .create_volume(create_req(
            "pvc-64",
            64 * MIB,
            &[],
            vec![block_cap(Mode::SingleNodeWriter)],
        ))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let id = v.volume_id.clone();
    assert_eq!(
        v.capacity_bytes,
        64 * MIB,
        "what was asked, not the file's size"
    );
    assert_eq!(
        std::fs::metadata(p.backing(&id)).unwrap().len(),
        71 * MIB as u64,
        "the file holds the header region, journal and tags on top"
    );
    let listed = c
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        listed.entries[0].volume.as_ref().unwrap().capacity_bytes,
        64 * MIB
    );
    let got = c
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.volume.unwrap().capacity_bytes, 64 * MIB);
    let (staging, target) = (p.path("s"), p.path("t"));
    let cap = || block_cap(Mode::SingleNodeWriter);
    p.stage(&id, &staging, cap()).await.unwrap();
    p.publish(&id, &staging, &target, cap(), false)
        .await
        .unwrap();
    let stats = p.stats(&id, &target).await.unwrap();
    assert!(stats.usage[0].total >= 64 * MIB, "{stats:?}");
    p.unpublish(&id, &target).await.unwrap();
    p.unstage(&id, &staging).await.unwrap();

    // Turn it into what the previous release left for the same claim: a 64 MiB file recorded as 64 MiB.
    let record_path = p.state.join("volumes").join(format!("{id}.json"));
    let mut record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&record_path).unwrap()).unwrap();
    record.as_object_mut().unwrap().remove("device_bytes");
    let legacy = serde_json::to_vec(&record).unwrap();
    std::fs::write(&record_path, &legacy).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(p.backing(&id))
        .unwrap()
        .set_len(64 * MIB as u64)
        .unwrap();
    let got = c
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        got.volume.unwrap().capacity_bytes,
        57 * MIB,
        "what a 64 MiB file offers at least, not the 64 MiB it was recorded as"
    );
    let listed = c
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        listed.entries[0].volume.as_ref().unwrap().capacity_bytes,
        57 * MIB
    );
    assert_eq!(
        std::fs::read(&record_path).unwrap(),
        legacy,
        "reads rewrite nothing"
    );
    // It still stages, and its expansion to the claim's size gives it the space it lacked.
    p.stage(&id, &staging, cap()).await.unwrap();
    p.publish(&id, &staging, &target, cap(), false)
        .await
        .unwrap();
    let r = p
        .node()
        .node_expand_volume(node_expand(&id, &target, 64 * MIB, 0))
        .await
        .unwrap()
        .into_inner();
    assert!(r.capacity_bytes >= 64 * MIB, "{r:?}");
    assert_eq!(
        std::fs::metadata(p.backing(&id)).unwrap().len(),
        71 * MIB as u64
    );
    p.unpublish(&id, &target).await.unwrap();
    p.unstage(&id, &staging).await.unwrap();
    // Deleting it takes its whole file.
    c.delete_volume(DeleteVolumeRequest {
        volume_id: id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(!p.backing(&id).exists());
    p.stop().await.unwrap();
}

#[tokio::test]
async fn block_volume_stage_publish_and_stats() {
    let p = Plugin::start().await;
    let v = p.create("pvc-blk", 64 * MIB, &[("init", "fast")]).await;
    let id = v.volume_id.as_str();
    let staging = p.path("staging");
    let target = p.path("pods/pod/dev/vol");
    let cap = || block_cap(Mode::SingleNodeWriter);
    p.stage(id, &staging, cap()).await.unwrap();
    let f = p.engine.formats();
    assert_eq!(
        (f[0].1.fs, f[0].1.init),
        (FsKind::None, InitMode::Full),
        "block volumes are always fully initialized"
    );
    assert!(
        p.mounter.mounted_at(&staging).unwrap().is_none(),
        "nothing mounted at stage"
    );
    p.publish(id, &staging, &target, cap(), false)
        .await
        .unwrap();
    p.publish(id, &staging, &target, cap(), false)
        .await
        .unwrap();
    assert!(
        std::fs::metadata(&target).unwrap().is_file(),
        "device bound onto a file"
    );
    let device = PathBuf::from(format!("/dev/mapper/sealcsi-{id}"));
    assert!(p.mounter.is_bind_of(&target, &device).unwrap());
    let stats = p.stats(id, &target).await.unwrap();
    assert_eq!(stats.usage.len(), 1);
    assert_eq!(stats.usage[0].unit, volume_usage::Unit::Bytes as i32);
    assert_eq!(
        stats.usage[0].total,
        70 * MIB,
        "the in-memory engine's top device: the 71 MiB backing file less the 1 MiB header region"
    );
    assert!(
        stats.usage[0].total >= 64 * MIB,
        "at least the capacity asked"
    );
    assert!(!stats.volume_condition.unwrap().abnormal);
    // A block volume has no filesystem to mount.
    assert_eq!(
        code(
            p.stage(id, &p.path("s2"), mount_cap(Mode::SingleNodeWriter, ""))
                .await
        ),
        Code::InvalidArgument
    );
    let ro = p.path("pods/pod/dev/ro");
    p.publish(id, &staging, &ro, cap(), true).await.unwrap();
    assert!(p.mounter.mounted_at(&ro).unwrap().unwrap().read_only());
    p.unpublish(id, &ro).await.unwrap();
    p.unpublish(id, &target).await.unwrap();
    assert!(!target.exists());
    p.unstage(id, &staging).await.unwrap();
    p.stop().await.unwrap();
}

#[tokio::test]
async fn stats_of_a_filesystem_and_abnormal_conditions() {
    let p = Plugin::start().await;
    let v = p.create("pvc-st", 64 * MIB, &[]).await;
    let id = v.volume_id.as_str();
    let (staging, target) = (p.path("s"), p.path("t"));
    p.stage(id, &staging, mount_cap(Mode::SingleNodeWriter, ""))
        .await
        .unwrap();
    p.publish(
        id,
        &staging,
        &target,
        mount_cap(Mode::SingleNodeWriter, ""),
        false,
    )
    .await
    .unwrap();
    let stats = p.stats(id, &target).await.unwrap();
    let units: Vec<i32> = stats.usage.iter().map(|u| u.unit).collect();
    assert_eq!(
        units,
        vec![
            volume_usage::Unit::Bytes as i32,
            volume_usage::Unit::Inodes as i32
        ]
    );
    assert!(stats.usage[0].total > 0 && stats.usage[1].total > 0);
    let condition = stats.volume_condition.unwrap();
    assert!(!condition.abnormal, "{}", condition.message);

    p.engine.inject_mismatches(&format!("sealcsi-{id}"), 3);
    let c = p
        .stats(id, &target)
        .await
        .unwrap()
        .volume_condition
        .unwrap();
    assert!(
        c.abnormal && c.message.contains("mismatch"),
        "{}",
        c.message
    );
    p.engine.inject_mismatches(&format!("sealcsi-{id}"), 0);

    // The host flips a byte of header copy 0: still opens from copy 1, but the volume is reported.
    let backing = p.backing(id);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&backing)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, 20).unwrap();
    f.write_all_at(&[b[0] ^ 0x40], 20).unwrap();
    let c = p
        .stats(id, &target)
        .await
        .unwrap()
        .volume_condition
        .unwrap();
    assert!(
        c.abnormal && c.message.contains("header copy 0"),
        "{}",
        c.message
    );
    let got = p
        .controller()
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: id.into(),
        })
        .await
        .unwrap()
        .into_inner();
    // The controller reads the header region too; the memory engine's marker is not a sealcsi header,
    // so it sees "data that is not a sealcsi header".
    assert!(got.status.unwrap().volume_condition.unwrap().abnormal);
    p.unpublish(id, &target).await.unwrap();
    p.unstage(id, &staging).await.unwrap();
    p.stop().await.unwrap();
}

/// The host changed data blocks of an open volume: dm-crypt's failures in the kernel log make the
/// volume abnormal with their count, a sibling stays healthy, and a re-staged volume starts from 0
/// even on the same device-mapper minor.
#[tokio::test]
async fn integrity_failures_in_the_kernel_log_make_the_volume_abnormal() {
    let p = Plugin::start().await;
    let cap = || mount_cap(Mode::SingleNodeWriter, "");
    let mut vols = Vec::new();
    for name in ["pvc-if-a", "pvc-if-b"] {
        let id = p.create(name, 64 * MIB, &[]).await.volume_id;
        let (staging, target) = (p.path(&format!("{name}-s")), p.path(&format!("{name}-t")));
        p.stage(&id, &staging, cap()).await.unwrap();
        p.publish(&id, &staging, &target, cap(), false)
            .await
            .unwrap();
        vols.push((id, staging, target));
    }
    let condition = |id: String, target: PathBuf| {
        let p = &p;
        async move {
            p.failures.pump().unwrap();
            p.stats(&id, &target)
                .await
                .unwrap()
                .volume_condition
                .unwrap()
        }
    };
    let (a, b) = (&vols[0], &vols[1]);
    let minor = |id: &str| {
        let name = sealcsi::dm::DmName::try_from(format!("sealcsi-{id}")).unwrap();
        p.dm.info(&name).unwrap().unwrap().minor
    };
    let c = condition(a.0.clone(), a.2.clone()).await;
    assert!(!c.abnormal, "{}", c.message);
    for sector in [8, 16] {
        p.log.kernel(&format!(
            "device-mapper: crypt: dm-{}: INTEGRITY AEAD ERROR, sector {sector}",
            minor(&a.0)
        ));
    }
    let c = condition(a.0.clone(), a.2.clone()).await;
    assert!(c.abnormal, "two AEAD failures left the volume healthy");
    assert!(
        c.message
            .starts_with("2 integrity failure(s) since the volume was staged")
            && c.message.contains("EIO"),
        "{}",
        c.message
    );
    let c = condition(b.0.clone(), b.2.clone()).await;
    assert!(!c.abnormal, "the sibling was charged: {}", c.message);
    assert_eq!(
        p.engine.integrity_failures(&format!("sealcsi-{}", a.0)),
        Some(2)
    );

    // Unstaged and staged again: the count restarts (the kernel hands out the same lowest free minor).
    let old_minor = minor(&a.0);
    p.unpublish(&a.0, &a.2).await.unwrap();
    p.unstage(&a.0, &a.1).await.unwrap();
    p.stage(&a.0, &a.1, cap()).await.unwrap();
    p.publish(&a.0, &a.1, &a.2, cap(), false).await.unwrap();
    assert_eq!(minor(&a.0), old_minor);
    let c = condition(a.0.clone(), a.2.clone()).await;
    assert!(
        !c.abnormal,
        "re-staged volume inherited old failures: {}",
        c.message
    );
    for (id, staging, target) in &vols {
        p.unpublish(id, target).await.unwrap();
        p.unstage(id, staging).await.unwrap();
    }
    p.stop().await.unwrap();
}

fn node_expand(id: &str, path: &Path, required: i64, limit: i64) -> NodeExpandVolumeRequest {
    NodeExpandVolumeRequest {
        volume_id: id.into(),
        volume_path: path.display().to_string(),
        capacity_range: Some(CapacityRange {
            required_bytes: required,
            limit_bytes: limit,
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn node_expansion_grows_file_mapping_and_filesystem() {
    let p = Plugin::start().await;
    let v = p.create("pvc-x", 64 * MIB, &[]).await;
    let id = v.volume_id.as_str();
    let (staging, target) = (p.path("s"), p.path("t"));
    p.stage(id, &staging, mount_cap(Mode::SingleNodeWriter, ""))
        .await
        .unwrap();
    p.publish(
        id,
        &staging,
        &target,
        mount_cap(Mode::SingleNodeWriter, ""),
        false,
    )
    .await
    .unwrap();
    let dm = format!("sealcsi-{id}");
    let old_top = p.engine.size_bytes(&dm).unwrap() as i64;
    assert_eq!(old_top, 70 * MIB);

    // No ControllerExpandVolume first: the node grows the backing file itself.
    let r = p
        .node()
        .node_expand_volume(node_expand(id, &target, 128 * MIB, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.capacity_bytes, 135 * MIB, "the top device's size");
    assert_eq!(
        std::fs::metadata(p.backing(id)).unwrap().len(),
        136 * MIB as u64,
        "the file of a 128 MiB volume"
    );
    let got = p
        .controller()
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: id.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.volume.unwrap().capacity_bytes, 128 * MIB);
    assert_eq!(
        p.engine.grown(),
        vec![(FsKind::Ext4, PathBuf::from(format!("/dev/mapper/{dm}")))]
    );
    assert_eq!(
        p.engine.inits(),
        vec![(dm.clone(), old_top as u64, 135 * MIB as u64)],
        "the new space is initialized once"
    );
    assert!(!p.state.join("volumes").join(format!("{id}.grow")).exists());
    // Again: nothing more to grow or initialize, same answer.
    let r = p
        .node()
        .node_expand_volume(node_expand(id, &target, 128 * MIB, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.capacity_bytes, 135 * MIB);
    assert_eq!(p.engine.inits().len(), 1);
    // Never shrinks: asking for less is success at the current size; a limit below it is refused.
    let r = p
        .node()
        .node_expand_volume(node_expand(id, &target, 64 * MIB, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.capacity_bytes, 135 * MIB);
    assert_eq!(
        code(
            p.node()
                .node_expand_volume(node_expand(id, &target, 64 * MIB, 100 * MIB))
                .await
        ),
        Code::OutOfRange
    );
    assert_eq!(
        code(
            p.node()
                .node_expand_volume(node_expand(id, &target, 200 * MIB, 100 * MIB))
                .await
        ),
        Code::InvalidArgument
    );
    // Without a capacity range: the mapping takes what the file holds.
    let mut no_range = node_expand(id, &target, 0, 0);
    no_range.capacity_range = None;
    let r = p.node().node_expand_volume(no_range).await.unwrap();
    assert_eq!(r.into_inner().capacity_bytes, 135 * MIB);
    assert_eq!(
        code(
            p.node()
                .node_expand_volume(node_expand(id, &p.path("nowhere"), 256 * MIB, 0))
                .await
        ),
        Code::NotFound
    );
    assert_eq!(
        std::fs::metadata(p.backing(id)).unwrap().len(),
        136 * MIB as u64,
        "a refused expansion grows nothing"
    );
    p.unpublish(id, &target).await.unwrap();
    p.unstage(id, &staging).await.unwrap();
    assert_eq!(
        code(
            p.node()
                .node_expand_volume(node_expand(id, &staging, 256 * MIB, 0))
                .await
        ),
        Code::FailedPrecondition,
        "not staged"
    );
    assert_eq!(
        std::fs::metadata(p.backing(id)).unwrap().len(),
        136 * MIB as u64
    );
    p.stop().await.unwrap();
}

#[tokio::test]
async fn controller_expand_still_grows_a_local_volume_for_direct_callers() {
    let p = Plugin::start().await;
    let v = p.create("pvc-x", 64 * MIB, &[]).await;
    let id = v.volume_id.as_str();
    let mut c = p.controller();
    let expand = |required: i64, limit: i64| ControllerExpandVolumeRequest {
        volume_id: id.into(),
        capacity_range: Some(CapacityRange {
            required_bytes: required,
            limit_bytes: limit,
        }),
        ..Default::default()
    };
    let r = c
        .controller_expand_volume(expand(128 * MIB, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.capacity_bytes, 128 * MIB);
    assert!(r.node_expansion_required);
    assert_eq!(
        std::fs::metadata(p.backing(id)).unwrap().len(),
        136 * MIB as u64
    );
    assert_eq!(
        c.controller_expand_volume(expand(64 * MIB, 0))
            .await
            .unwrap()
            .into_inner()
            .capacity_bytes,
        128 * MIB
    );
    assert_eq!(
        code(
            c.controller_expand_volume(expand(64 * MIB, 100 * MIB))
                .await
        ),
        Code::OutOfRange
    );
    let mut no_range = expand(0, 0);
    no_range.capacity_range = None;
    assert_eq!(
        code(c.controller_expand_volume(no_range).await),
        Code::InvalidArgument
    );
    let mut unknown = expand(128 * MIB, 0);
    unknown.volume_id = "sv-0123456789abcdef0123456789abcdef".into();
    assert_eq!(
        code(c.controller_expand_volume(unknown).await),
        Code::NotFound
    );
    // Then the node: the file is already grown, the mapping follows it.
    let (staging, target) = (p.path("s"), p.path("t"));
    let cap = || mount_cap(Mode::SingleNodeWriter, "");
    p.stage(id, &staging, cap()).await.unwrap();
    p.publish(id, &staging, &target, cap(), false)
        .await
        .unwrap();
    let r = p
        .node()
        .node_expand_volume(node_expand(id, &target, 128 * MIB, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.capacity_bytes, 135 * MIB);
    p.stop().await.unwrap();
}

/// A crash after the mapping grew but before its new space was initialized: the retry finds nothing left
/// to grow, and must initialize the new space all the same (and before the filesystem grows into it).
#[tokio::test]
async fn node_expansion_interrupted_before_initializing_new_space_converges() {
    let p = Plugin::start().await;
    let v = p.create("pvc-x", 64 * MIB, &[]).await;
    let id = v.volume_id.as_str();
    let dm = format!("sealcsi-{id}");
    let (staging, target) = (p.path("s"), p.path("t"));
    let cap = || mount_cap(Mode::SingleNodeWriter, "");
    p.stage(id, &staging, cap()).await.unwrap();
    p.publish(id, &staging, &target, cap(), false)
        .await
        .unwrap();

    p.engine.fail_next_inits(1);
    assert_eq!(
        code(
            p.node()
                .node_expand_volume(node_expand(id, &target, 128 * MIB, 0))
                .await
        ),
        Code::Internal
    );
    assert_eq!(p.engine.size_bytes(&dm).unwrap(), 135 << 20, "mapping grew");
    assert!(p.engine.inits().is_empty());
    assert!(p.engine.grown().is_empty(), "no filesystem growth over it");
    let r = p
        .node()
        .node_expand_volume(node_expand(id, &target, 128 * MIB, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.capacity_bytes, 135 * MIB);
    assert_eq!(p.engine.inits(), vec![(dm.clone(), 70 << 20, 135 << 20)]);
    assert_eq!(p.engine.grown().len(), 1);

    // The same crash, then the node restarts (the mapping is gone) and the volume is staged again at its
    // grown size: staging initializes the new space before anyone gets the volume.
    p.engine.fail_next_inits(1);
    assert_eq!(
        code(
            p.node()
                .node_expand_volume(node_expand(id, &target, 256 * MIB, 0))
                .await
        ),
        Code::Internal
    );
    p.unpublish(id, &target).await.unwrap();
    p.unstage(id, &staging).await.unwrap();
    p.stage(id, &staging, cap()).await.unwrap();
    assert_eq!(
        p.engine.inits().last().unwrap(),
        &(dm.clone(), 135 << 20, 266 << 20)
    );
    assert!(!p.state.join("volumes").join(format!("{id}.grow")).exists());
    // A stage of a volume with nothing pending initializes nothing.
    p.unstage(id, &staging).await.unwrap();
    p.stage(id, &staging, cap()).await.unwrap();
    assert_eq!(p.engine.inits().len(), 2);
    p.unstage(id, &staging).await.unwrap();
    p.stop().await.unwrap();
}

#[tokio::test]
async fn xfs_volumes_are_at_least_what_mkfs_xfs_accepts() {
    let p = Plugin::start().await;
    let mut c = p.controller();
    let xfs = || vec![mount_cap(Mode::SingleNodeWriter, "xfs")];
    let cap_of = |r: CreateVolumeResponse| r.volume.unwrap().capacity_bytes;
    // Rounded up to the smallest volume mkfs.xfs formats, for each integrity profile.
    let r = c
        .create_volume(create_req("x-aead", 100 * MIB, &[], xfs()))
        .await
        .unwrap();
    assert_eq!(cap_of(r.into_inner()), 300 * MIB);
    let r = c
        .create_volume(create_req("x-aead", 100 * MIB, &[], xfs()))
        .await
        .unwrap();
    assert_eq!(cap_of(r.into_inner()), 300 * MIB, "idempotent");
    let r = c
        .create_volume(create_req(
            "x-xts",
            100 * MIB,
            &[("integrity", "none")],
            xfs(),
        ))
        .await
        .unwrap();
    assert_eq!(cap_of(r.into_inner()), 300 * MIB);
    let r = c
        .create_volume(create_req("x-big", 400 * MIB, &[], xfs()))
        .await
        .unwrap();
    assert_eq!(cap_of(r.into_inner()), 400 * MIB);
    // ext4 and block volumes keep the general minimum.
    let r = c
        .create_volume(create_req(
            "e",
            100 * MIB,
            &[],
            vec![mount_cap(Mode::SingleNodeWriter, "ext4")],
        ))
        .await
        .unwrap();
    assert_eq!(cap_of(r.into_inner()), 100 * MIB);
    // A limit below the xfs minimum allows no volume.
    let mut small = create_req("x-small", 100 * MIB, &[], xfs());
    small.capacity_range.as_mut().unwrap().limit_bytes = 200 * MIB;
    let err = c.create_volume(small).await.unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange);
    assert!(
        err.message().contains("xfs") && err.message().contains("300 MiB"),
        "{}",
        err.message()
    );
    assert!(
        !p.backing(sealcsi::store::VolumeId::for_name("x-small").as_str())
            .exists()
    );
    // GetCapacity tells the minimum for what is asked.
    let cap = c
        .get_capacity(GetCapacityRequest {
            volume_capabilities: xfs(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cap.minimum_volume_size, Some(300 * MIB));
    let cap = c
        .get_capacity(GetCapacityRequest {
            volume_capabilities: xfs(),
            parameters: HashMap::from([("integrity".to_string(), "none".to_string())]),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cap.minimum_volume_size, Some(300 * MIB));
    p.stop().await.unwrap();
}

#[tokio::test]
async fn concurrent_operations_on_one_volume_are_aborted() {
    let p = Arc::new(Plugin::start().await);
    let v = p.create("pvc-c", 64 * MIB, &[]).await;
    let other = p.create("pvc-c2", 64 * MIB, &[]).await;
    p.engine.set_stage_delay(Duration::from_millis(800));
    let id = v.volume_id.clone();
    let first = {
        let p = p.clone();
        let id = id.clone();
        tokio::spawn(async move {
            p.stage(&id, &p.path("s"), mount_cap(Mode::SingleNodeWriter, ""))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        code(
            p.stage(&id, &p.path("s"), mount_cap(Mode::SingleNodeWriter, ""))
                .await
        ),
        Code::Aborted
    );
    assert_eq!(code(p.unstage(&id, &p.path("s")).await), Code::Aborted);
    let del = p
        .controller()
        .delete_volume(DeleteVolumeRequest {
            volume_id: id.clone(),
            secrets: HashMap::new(),
        })
        .await;
    assert_eq!(code(del), Code::Aborted);
    // Another volume is not held up.
    p.engine.set_stage_delay(Duration::ZERO);
    p.stage(
        &other.volume_id,
        &p.path("s-other"),
        mount_cap(Mode::SingleNodeWriter, ""),
    )
    .await
    .unwrap();
    first.await.unwrap().unwrap();
    // Once done, the volume takes operations again.
    p.stage(&id, &p.path("s"), mount_cap(Mode::SingleNodeWriter, ""))
        .await
        .unwrap();
    p.unstage(&id, &p.path("s")).await.unwrap();
    p.unstage(&other.volume_id, &p.path("s-other"))
        .await
        .unwrap();
}

#[tokio::test]
async fn another_identity_cannot_stage_and_nothing_is_reformatted() {
    let a = Plugin::start().await;
    let v = a.create("pvc-id", 64 * MIB, &[]).await;
    a.stage(
        &v.volume_id,
        &a.path("s"),
        mount_cap(Mode::SingleNodeWriter, ""),
    )
    .await
    .unwrap();
    a.unstage(&v.volume_id, &a.path("s")).await.unwrap();
    let before = std::fs::read(a.backing(&v.volume_id)).unwrap()[..8192].to_vec();

    let b = Plugin::start_with(PluginMode::Node, "node-a", "identity-b", Some(&a.state)).await;
    let err = b
        .stage(
            &v.volume_id,
            &b.path("s"),
            mount_cap(Mode::SingleNodeWriter, ""),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("cannot unseal"), "{}", err.message());
    assert!(b.engine.formats().is_empty());
    assert_eq!(
        std::fs::read(a.backing(&v.volume_id)).unwrap()[..8192],
        before[..]
    );
    assert!(b.dm.list().unwrap().is_empty());
    b.stop().await.unwrap();
    a.stop().await.unwrap();
}

#[tokio::test]
async fn stage_refuses_a_device_holding_other_data() {
    let p = Plugin::start().await;
    let v = p.create("pvc-junk", 64 * MIB, &[]).await;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(p.backing(&v.volume_id))
        .unwrap();
    f.write_all_at(b"XFSB", 0).unwrap();
    let err = p
        .stage(
            &v.volume_id,
            &p.path("s"),
            mount_cap(Mode::SingleNodeWriter, ""),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(p.engine.formats().is_empty());
    p.stop().await.unwrap();
}

#[tokio::test]
async fn node_mode_serves_no_controller_and_socket_is_0660_and_removed_on_stop() {
    let p = Plugin::start_with(PluginMode::Node, "node-n", "identity-a", None).await;
    let socket = p.socket.clone();
    let meta = std::fs::metadata(&socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    let r = p
        .controller()
        .controller_get_capabilities(ControllerGetCapabilitiesRequest {})
        .await;
    assert_eq!(code(r), Code::Unimplemented);
    let caps = p
        .identity()
        .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(!caps.capabilities.iter().any(|c| matches!(&c.r#type,
        Some(plugin_capability::Type::Service(s)) if s.r#type == plugin_capability::service::Type::ControllerService as i32)));
    p.node().node_get_info(NodeGetInfoRequest {}).await.unwrap();
    p.stop().await.unwrap();
    assert!(!socket.exists(), "socket removed after shutdown");
}

#[tokio::test]
async fn a_stale_socket_is_replaced_and_a_live_one_refused() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("csi.sock");
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    let deps = || {
        let dm = Arc::new(MemoryDm::new());
        PluginDeps {
            dm: dm.clone(),
            engine: Arc::new(MemoryEngine::new(dm, "x")),
            mounter: Arc::new(MemoryMounter::new()),
        }
    };
    let config = PluginConfig::new(
        format!("unix://{}", socket.display()),
        "n",
        PluginMode::All,
        dir.path().join("state"),
    );
    let mut served = serve(config.clone(), deps()).await;
    served.identity().probe(ProbeRequest {}).await.unwrap();
    // A second plugin on the same live socket refuses to start.
    let second =
        sealcsi::csi::serve_until(config.clone(), Some(deps()), std::future::pending()).await;
    assert!(matches!(second, Err(CsiError::Socket { .. })), "{second:?}");
    let bad = PluginConfig::new(
        "tcp://0.0.0.0:1",
        "n",
        PluginMode::All,
        dir.path().join("state"),
    );
    assert!(matches!(
        sealcsi::csi::serve_until(bad, Some(deps()), async {}).await,
        Err(CsiError::Config(_))
    ));
    served.stop().await.unwrap();
}

/// CSI AccessMode SINGLE_NODE_SINGLE_WRITER: one read-write publish at a time (a second target path is
/// FAILED_PRECONDITION, a read-only one is allowed); SINGLE_NODE_MULTI_WRITER allows several writers.
#[tokio::test]
async fn single_writer_volumes_are_published_read_write_once() {
    let p = Plugin::start().await;
    for (mode, second_writer_ok) in [
        (Mode::SingleNodeSingleWriter, false),
        (Mode::SingleNodeMultiWriter, true),
    ] {
        let v = p.create(&format!("v-{mode:?}"), 64 * MIB, &[]).await;
        let id = v.volume_id.clone();
        let staging = p.path(&format!("staging-{mode:?}"));
        let cap = || mount_cap(mode, "");
        p.stage(&id, &staging, cap()).await.unwrap();
        let (t1, t2, t3) = (
            p.path(&format!("t1-{mode:?}")),
            p.path(&format!("t2-{mode:?}")),
            p.path(&format!("t3-{mode:?}")),
        );
        p.publish(&id, &staging, &t1, cap(), false).await.unwrap();
        // The same publish again is idempotent.
        p.publish(&id, &staging, &t1, cap(), false).await.unwrap();
        let second = p.publish(&id, &staging, &t2, cap(), false).await;
        if second_writer_ok {
            second.unwrap();
        } else {
            assert_eq!(code(second), Code::FailedPrecondition, "{mode:?}");
        }
        p.publish(&id, &staging, &t3, cap(), true).await.unwrap();
        // Once the writer is gone, another target may write.
        p.unpublish(&id, &t1).await.unwrap();
        p.publish(&id, &staging, &t2, cap(), false).await.unwrap();
        for t in [&t2, &t3] {
            p.unpublish(&id, t).await.unwrap();
        }
        p.unstage(&id, &staging).await.unwrap();
    }
    p.stop().await.unwrap();
}

/// The same rule for raw block volumes: their publishes are bind mounts of the device node.
#[tokio::test]
async fn single_writer_block_volumes_are_published_read_write_once() {
    let p = Plugin::start().await;
    for (mode, second_writer_ok) in [
        (Mode::SingleNodeSingleWriter, false),
        (Mode::SingleNodeMultiWriter, true),
    ] {
        let v = p.create(&format!("b-{mode:?}"), 64 * MIB, &[]).await;
        let id = v.volume_id.clone();
        let staging = p.path(&format!("bstaging-{mode:?}"));
        let cap = || block_cap(mode);
        p.stage(&id, &staging, cap()).await.unwrap();
        let (t1, t2, t3) = (
            p.path(&format!("b1-{mode:?}")),
            p.path(&format!("b2-{mode:?}")),
            p.path(&format!("b3-{mode:?}")),
        );
        p.publish(&id, &staging, &t1, cap(), false).await.unwrap();
        p.publish(&id, &staging, &t1, cap(), false).await.unwrap();
        let second = p.publish(&id, &staging, &t2, cap(), false).await;
        if second_writer_ok {
            second.unwrap();
        } else {
            let status = second.unwrap_err();
            assert_eq!(status.code(), Code::FailedPrecondition, "{mode:?}");
            assert!(
                status.message().contains("SINGLE_NODE_SINGLE_WRITER"),
                "{status:?}"
            );
        }
        p.publish(&id, &staging, &t3, cap(), true).await.unwrap();
        p.unpublish(&id, &t1).await.unwrap();
        p.publish(&id, &staging, &t2, cap(), false).await.unwrap();
        for t in [&t2, &t3] {
            p.unpublish(&id, t).await.unwrap();
        }
        p.unstage(&id, &staging).await.unwrap();
    }
    p.stop().await.unwrap();
}

/// Issue 10, item 3: once a volume was formatted its record says so (with the UUID), and a header the
/// host blanked afterwards is never a reason to format again: the stage fails and nothing is written.
#[tokio::test]
async fn a_blanked_header_is_never_formatted_again() {
    let p = Plugin::start().await;
    let v = p.create("v-blank", 64 * MIB, &[]).await;
    let id = v.volume_id.clone();
    let staging = p.path("staging-blank");
    let cap = || mount_cap(Mode::SingleNodeWriter, "");
    p.stage(&id, &staging, cap()).await.unwrap();
    p.unstage(&id, &staging).await.unwrap();
    let backing = p.backing(&id);
    let record =
        std::fs::read_to_string(p.state.join("volumes").join(format!("{id}.json"))).unwrap();
    assert!(record.contains("formatted_uuid"), "{record}");
    // The host zeroes both header copies.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&backing)
        .unwrap()
        .write_all_at(&[0u8; 8192], 0)
        .unwrap();
    let before = std::fs::read(&backing).unwrap();
    let err = p.stage(&id, &staging, cap()).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("refusing to format it again"),
        "{}",
        err.message()
    );
    assert_eq!(std::fs::read(&backing).unwrap(), before, "nothing written");
    assert_eq!(
        p.engine.formats().len(),
        1,
        "formatted once, at the first stage only"
    );
    p.stop().await.unwrap();
}

fn mount_cap_with_flags(mode: Mode, flags: &[&str]) -> VolumeCapability {
    let mut cap = mount_cap(mode, "");
    if let Some(AccessType::Mount(m)) = &mut cap.access_type {
        m.mount_flags = flags.iter().map(|f| f.to_string()).collect();
    }
    cap
}

#[tokio::test]
async fn mounts_are_nosuid_nodev_unless_the_co_asks_for_suid_or_dev() {
    let p = Plugin::start().await;
    let opts = |path: &Path| p.mounter.mounted_at(path).unwrap().unwrap().options;
    // Default: the staging mount and the publish bind are both nosuid,nodev.
    let v = p.create("pvc-nosuid", 64 * MIB, &[]).await;
    let (staging, target) = (p.path("s"), p.path("t"));
    let cap = || mount_cap_with_flags(Mode::SingleNodeWriter, &["noatime"]);
    p.stage(&v.volume_id, &staging, cap()).await.unwrap();
    p.publish(&v.volume_id, &staging, &target, cap(), false)
        .await
        .unwrap();
    for path in [&staging, &target] {
        let o = opts(path);
        assert!(
            o.contains(&"nosuid".to_string()) && o.contains(&"nodev".to_string()),
            "{}: {o:?}",
            path.display()
        );
    }
    // A read-only publish keeps them (a remount,bind,ro without them would clear them).
    let ro = p.path("t-ro");
    p.publish(&v.volume_id, &staging, &ro, cap(), true)
        .await
        .unwrap();
    assert_eq!(opts(&ro), ["ro", "nosuid", "nodev"]);
    // The CO asks for suid and dev explicitly: then neither is added.
    let w = p.create("pvc-suid", 64 * MIB, &[]).await;
    let (staging2, target2) = (p.path("s2"), p.path("t2"));
    let cap2 = || mount_cap_with_flags(Mode::SingleNodeWriter, &["suid", "dev"]);
    p.stage(&w.volume_id, &staging2, cap2()).await.unwrap();
    p.publish(&w.volume_id, &staging2, &target2, cap2(), false)
        .await
        .unwrap();
    assert_eq!(opts(&staging2), ["rw"]);
    assert_eq!(opts(&target2), ["rw"]);
    // A raw block device node: nosuid, but never nodev (the node must stay openable).
    let b = p
        .create("pvc-blk-flags", 64 * MIB, &[("init", "fast")])
        .await;
    let blk = p.path("pods/pod/dev/vol");
    let bcap = || block_cap(Mode::SingleNodeWriter);
    p.stage(&b.volume_id, &p.path("sb"), bcap()).await.unwrap();
    p.publish(&b.volume_id, &p.path("sb"), &blk, bcap(), false)
        .await
        .unwrap();
    assert_eq!(opts(&blk), ["rw", "nosuid"]);
    p.stop().await.unwrap();
}
