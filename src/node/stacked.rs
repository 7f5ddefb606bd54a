//! The node side of a stacked sealcsi (`--backend csi:...`, docs/stacked.md): the backend driver stages
//! and publishes its raw BLOCK volume at private paths under sealcsi's state directory, and then the
//! node-local path runs unchanged on the device it published ([`NodeCore::stage`]: format on first use
//! under the safety rules, unseal, device-mapper stack, mkfs, mount).
//!
//! ```text
//! <state-dir>/stacked/<local id>/staging   the backend's staging path (a directory)
//! <state-dir>/volumes/<local id>.img       the backend's publish target: its device node
//! <state-dir>/volumes/<local id>.json      the node-local record (parameters, the "formatted" UUID)
//! ```
//!
//! The local id is [`local_id`] of the CSI volume id. Stage order: record, backend NodeStage, backend
//! NodePublish, the published device checked, then the node-local stage. Unstage in reverse, the backend
//! last. Every step is idempotent (the backend's by the CSI spec, sealcsi's by observed state), so a
//! retry after a crash between any two steps finishes the job.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use super::capability::Capability;
use super::{NodeCore, NodeError, io_err};
use crate::backend::csi::{Map, NodeCap, NodeInfo, PublishRequest, Secrets, StageRequest};
use crate::clock::now_unix;
use crate::error::{Classify, Kind};
use crate::store::stacked::{CONTEXT_SOURCE_VOLUME, backend_context, local_id, sealcsi_context};
use crate::store::{VolumeId, VolumeRecord};

/// What a stacked NodeStageVolume carries besides the paths.
#[derive(Debug, Clone, Default)]
pub struct StackedStage {
    pub publish_context: Map,
    pub volume_context: HashMap<String, String>,
    pub secrets: Secrets,
}

impl NodeCore {
    fn backend(&self) -> Result<&std::sync::Arc<dyn crate::backend::csi::CsiBackend>, NodeError> {
        self.backend.as_ref().ok_or_else(|| {
            NodeError::FailedPrecondition(
                "this node serves no stacked volumes (no --backend)".into(),
            )
        })
    }

    /// Whether this node stacks over a backend driver.
    pub fn is_stacked(&self) -> bool {
        self.backend.is_some()
    }

    /// The backend's staging directory for `local`.
    fn backend_staging(&self, local: &VolumeId) -> PathBuf {
        let state = self.store.dir().parent().unwrap_or(self.store.dir());
        state.join("stacked").join(local.as_str()).join("staging")
    }

    fn stages_on_backend(&self) -> Result<bool, NodeError> {
        Ok(self
            .backend_node_caps()?
            .contains(&NodeCap::StageUnstageVolume))
    }

    /// The backend's node capabilities (asked on first use, then kept: a driver's capabilities do not
    /// change while it runs).
    fn backend_node_caps(&self) -> Result<std::collections::BTreeSet<NodeCap>, NodeError> {
        if let Some(caps) = self.backend_caps.get() {
            return Ok(caps.clone());
        }
        let caps = self.backend()?.capabilities()?.node;
        Ok(self.backend_caps.get_or_init(|| caps).clone())
    }

    /// The backend's NodeGetInfo: its node id and topology are this node's (attach and scheduling go
    /// by them).
    pub fn stacked_info(&self) -> Result<NodeInfo, NodeError> {
        Ok(self.backend()?.node_info()?)
    }

    /// The local id of a stacked volume (see the module docs).
    pub fn stacked_id(csi_id: &str) -> VolumeId {
        local_id(csi_id)
    }

    /// NodeStageVolume of a stacked volume: the backend's BLOCK volume staged and published at private
    /// paths, then [`NodeCore::stage`] on its device.
    pub fn stage_stacked(
        &self,
        csi_id: &str,
        staging: &Path,
        cap: &Capability,
        req: &StackedStage,
    ) -> Result<(), NodeError> {
        let backend = self.backend()?.clone();
        let local = local_id(csi_id);
        let params = sealcsi_context(&req.volume_context).map_err(|e| {
            NodeError::InvalidArgument(format!(
                "volume context of stacked volume {csi_id}: {e} (not made by a stacked sealcsi controller?)"
            ))
        })?;
        let record = match self.store.record(&local)? {
            Some(r) => r,
            None => {
                let record = VolumeRecord {
                    version: 1,
                    volume_id: local.to_string(),
                    name: csi_id.to_string(),
                    capacity_bytes: 0,
                    parameters: params,
                    created: now_unix(),
                    formatted_uuid: None,
                    // The backend's device: its size is the backend's, not recorded here.
                    device_bytes: None,
                };
                self.store.write_record(&record)?;
                record
            }
        };
        let context = backend_context(&req.volume_context);
        let mode = cap.mode;
        let backend_staging = self.backend_staging(&local);
        let stages = self.stages_on_backend()?;
        if stages {
            fs::create_dir_all(&backend_staging)
                .map_err(io_err(format!("creating {}", backend_staging.display())))?;
            backend.node_stage(&StageRequest {
                volume_id: csi_id,
                publish_context: &req.publish_context,
                staging_path: &backend_staging,
                mode,
                context: &context,
                secrets: &req.secrets,
            })?;
        }
        let device = self.store.backing_path(&local);
        backend.node_publish(&PublishRequest {
            volume_id: csi_id,
            publish_context: &req.publish_context,
            staging_path: stages.then_some(backend_staging.as_path()),
            target_path: &device,
            mode,
            readonly: mode.read_only(),
            context: &context,
            secrets: &req.secrets,
        })?;
        backend
            .check_published(&device)
            .map_err(NodeError::FailedPrecondition)?;
        if record.formatted_uuid.is_none()
            && let Some(source) = req.volume_context.get(CONTEXT_SOURCE_VOLUME)
        {
            self.rebind(&local, &device, source)?;
        }
        tracing::info!(volume.id = %csi_id, local.id = %local, device = %device.display(), "backend volume published");
        self.stage(&local, staging, cap)
    }

    /// A restored or cloned volume holds the ciphertext of `source`, and its header is bound to
    /// `source`'s local id: before its first open on this node it is re-bound to `local`
    /// (`crate::volume::Volumes::rebind`: this node unseals it first, and a header bound to anything but
    /// `source` is refused unchanged). What this trusts: the volume context (the CO's record of the
    /// volume, written by sealcsi's controller) saying which volume this one was copied from.
    fn rebind(&self, local: &VolumeId, device: &Path, source: &str) -> Result<(), NodeError> {
        let source_local = local_id(source);
        let from = crate::header::volume_binding(source_local.as_str());
        let to = crate::header::volume_binding(local.as_str());
        if self
            .engine
            .rebind(device, source_local.as_str(), &from, &to)?
        {
            tracing::info!(volume.id = %local, source = %source, "re-bound a restored or cloned volume to its new id");
        }
        Ok(())
    }

    /// NodeUnstageVolume of a stacked volume: [`NodeCore::unstage`], then the backend's unpublish and
    /// unstage.
    pub fn unstage_stacked(&self, csi_id: &str, staging: &Path) -> Result<(), NodeError> {
        let backend = self.backend()?.clone();
        let local = local_id(csi_id);
        let core = self.unstage(&local, staging);
        match &core {
            Ok(()) => {}
            Err(e) if e.kind() == Kind::NotFound => {}
            Err(_) => return core,
        }
        let device = self.store.backing_path(&local);
        backend.node_unpublish(csi_id, &device)?;
        let backend_staging = self.backend_staging(&local);
        if self.stages_on_backend()? {
            backend.node_unstage(csi_id, &backend_staging)?;
        }
        for dir in [Some(backend_staging.as_path()), backend_staging.parent()]
            .into_iter()
            .flatten()
        {
            match fs::remove_dir(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(path = %dir.display(), error = %e, "could not remove the backend's staging directory")
                }
            }
        }
        core
    }

    /// NodeExpandVolume of a stacked volume: the backend's NodeExpandVolume on its published device
    /// (if it has one), then [`NodeCore::expand`] (stack, new space, filesystem).
    pub fn expand_stacked(
        &self,
        csi_id: &str,
        volume_path: &Path,
        required: u64,
        limit: u64,
        cap: Option<&Capability>,
    ) -> Result<u64, NodeError> {
        let backend = self.backend()?.clone();
        let local = local_id(csi_id);
        let caps = self.backend_node_caps()?;
        if caps.contains(&NodeCap::ExpandVolume) {
            let vol = self.store.get(&local)?;
            let device =
                crate::store::sizing::device_bytes_for_usable(vol.record.parameters, required);
            let staging = self.backend_staging(&local);
            backend.node_expand(
                csi_id,
                &vol.backing,
                caps.contains(&NodeCap::StageUnstageVolume)
                    .then_some(staging.as_path()),
                device,
                0,
                cap.map_or(super::capability::AccessMode::SingleNodeWriter, |c| c.mode),
            )?;
        }
        self.expand(&local, volume_path, required, limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::csi::{Code, MemoryBackend, Secrets};
    use crate::controller::stacked::{StackedCreate, StackedProvisioner};
    use crate::dm::MemoryDm;
    use crate::node::capability::{AccessMode, AccessType};
    use crate::node::{MemoryEngine, MemoryMounter, Mounter};
    use crate::store::Store;
    use std::sync::Arc;

    struct Rig {
        _dir: tempfile::TempDir,
        backend: Arc<MemoryBackend>,
        controller: StackedProvisioner,
        node: NodeCore,
        mounter: Arc<MemoryMounter>,
        root: PathBuf,
    }

    fn rig() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let backend = Arc::new(MemoryBackend::new(&root.join("backend"), "n1", "z1"));
        let controller = StackedProvisioner::new(backend.clone()).unwrap();
        let dm = Arc::new(MemoryDm::new());
        let mounter = Arc::new(MemoryMounter::new());
        let node = NodeCore::new(
            Store::open(&root.join("state")).unwrap(),
            Arc::new(MemoryEngine::new(dm, "identity-a")),
            mounter.clone(),
        )
        .with_backend(backend.clone());
        Rig {
            _dir: dir,
            backend,
            controller,
            node,
            mounter,
            root,
        }
    }

    fn fs_cap() -> Capability {
        Capability {
            access: AccessType::Mount {
                fs: None,
                flags: vec![],
            },
            mode: AccessMode::SingleNodeWriter,
        }
    }

    /// A created and ControllerPublished volume, with what NodeStage gets.
    fn volume(r: &Rig, name: &str) -> (String, StackedStage) {
        let v = r
            .controller
            .create(StackedCreate {
                name: name.into(),
                required_bytes: 64 << 20,
                limit_bytes: 0,
                parameters: HashMap::new(),
                secrets: Secrets::default(),
                mode: AccessMode::SingleNodeWriter,
                fs: None,
                filesystem: true,
                topology: None,
                source: None,
            })
            .unwrap();
        let info = r.node.stacked_info().unwrap();
        let publish_context = r
            .controller
            .publish(
                &v.id,
                &info.node_id,
                AccessMode::SingleNodeWriter,
                false,
                &v.context,
                &Secrets::default(),
            )
            .unwrap();
        (
            v.id,
            StackedStage {
                publish_context,
                volume_context: v.context,
                secrets: Secrets::default(),
            },
        )
    }

    fn node_calls(b: &MemoryBackend) -> Vec<&'static str> {
        b.calls()
            .into_iter()
            .filter(|c| c.starts_with("Node") && *c != "NodeGetInfo")
            .collect()
    }

    #[test]
    fn stage_goes_through_the_backend_then_the_node_local_path_and_unstage_reverses_it() {
        let r = rig();
        let (id, stage) = volume(&r, "pvc-a");
        let staging = r.root.join("kubelet/staging");
        r.node
            .stage_stacked(&id, &staging, &fs_cap(), &stage)
            .unwrap();
        let local = local_id(&id);
        let device = r.node.store.backing_path(&local);
        assert!(
            device.is_file(),
            "the backend published at the private path"
        );
        assert!(r.mounter.mounted_at(&staging).unwrap().is_some());
        let record = r.node.store.record(&local).unwrap().unwrap();
        assert!(
            record.formatted_uuid.is_some(),
            "the formatted record is kept"
        );
        assert_eq!(
            node_calls(&r.backend),
            ["NodeStageVolume", "NodePublishVolume"]
        );
        // Idempotent.
        r.node
            .stage_stacked(&id, &staging, &fs_cap(), &stage)
            .unwrap();
        r.node.unstage_stacked(&id, &staging).unwrap();
        assert!(r.mounter.mounted_at(&staging).unwrap().is_none());
        assert!(!device.exists(), "the backend unpublished");
        assert_eq!(
            &node_calls(&r.backend)[4..],
            ["NodeUnpublishVolume", "NodeUnstageVolume"],
            "the backend goes last"
        );
        r.node.unstage_stacked(&id, &staging).unwrap();
        // Restage: the formatted volume opens again (never formatted twice).
        r.node
            .stage_stacked(&id, &staging, &fs_cap(), &stage)
            .unwrap();
        r.node.unstage_stacked(&id, &staging).unwrap();
    }

    #[test]
    fn a_backend_failure_mid_stage_is_the_backends_error_and_the_retry_finishes() {
        let r = rig();
        let (id, stage) = volume(&r, "pvc-b");
        let staging = r.root.join("kubelet/staging-b");
        r.backend.fail("NodePublishVolume", Code::Unavailable);
        let e = r
            .node
            .stage_stacked(&id, &staging, &fs_cap(), &stage)
            .unwrap_err();
        assert_eq!(e.kind(), Kind::Unavailable);
        assert!(e.to_string().contains("backend CSI driver"), "{e}");
        assert!(r.mounter.mounted_at(&staging).unwrap().is_none());
        r.node
            .stage_stacked(&id, &staging, &fs_cap(), &stage)
            .unwrap();
        assert!(r.mounter.mounted_at(&staging).unwrap().is_some());
    }

    #[test]
    fn node_info_is_the_backends() {
        let r = rig();
        let info = r.node.stacked_info().unwrap();
        assert_eq!(info.node_id, "n1");
        assert_eq!(info.topology.unwrap()["topology.memory.test/zone"], "z1");
    }
}
