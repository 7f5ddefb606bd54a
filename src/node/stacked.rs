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
use crate::backend::csi::{Code, Map, NodeCap, NodeInfo, PublishRequest, Secrets, StageRequest};
use crate::clock::now_unix;
use crate::error::{Classify, Kind};
use crate::store::stacked::{
    CONTEXT_SOURCE_VOLUME, backend_context, is_stacked_record, local_id, sealcsi_context,
};
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
        let mut first_stage = false;
        let record = match self.store.record(&local)? {
            Some(r) => r,
            None => {
                first_stage = true;
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
        self.stage(&local, staging, cap)?;
        if first_stage {
            // A new volume on this node: the moment to forget the volumes the backend has deleted
            // since (their DeleteVolume may have run in another pod). Never fails the stage.
            if let Err(e) = self.sweep_stacked_records(&local) {
                tracing::warn!(error = %e, "could not sweep the records of deleted stacked volumes");
            }
        }
        Ok(())
    }

    /// The DeleteVolume of a stacked volume succeeded in this process, whose node shares this store:
    /// the backend volume no longer exists, so its node-local record goes too. Kept (and left to
    /// [`NodeCore::sweep_stacked_records`]) if the backend still has a device published here.
    pub fn forget_stacked(&self, csi_id: &str) -> Result<(), NodeError> {
        let backend = self.backend()?.clone();
        let local = local_id(csi_id);
        if backend
            .check_published(&self.store.backing_path(&local))
            .is_ok()
        {
            tracing::warn!(volume.id = %csi_id, local.id = %local, "deleted stacked volume is still published on this node; its record is kept");
            return Ok(());
        }
        if self.store.remove_stacked_record(&local)? {
            tracing::info!(volume.id = %csi_id, local.id = %local, "removed the node record of a deleted stacked volume");
        }
        Ok(())
    }

    /// Removes the node-local records of stacked volumes the backend says no longer exist: its
    /// ValidateVolumeCapabilities answers NOT_FOUND for the CSI id. Never `except`, never a volume whose
    /// device is published here, never on any other answer: an OK keeps the record, and an error that
    /// is not NOT_FOUND (UNIMPLEMENTED from a node-only backend plugin, UNAVAILABLE, ...) ends the
    /// sweep with every remaining record kept. Returns the local ids removed.
    pub fn sweep_stacked_records(&self, except: &VolumeId) -> Result<Vec<VolumeId>, NodeError> {
        let backend = self.backend()?.clone();
        let mut removed = Vec::new();
        for id in self.store.ids()? {
            if &id == except {
                continue;
            }
            let record = match self.store.record(&id) {
                Ok(Some(r)) if is_stacked_record(&r) => r,
                Ok(_) => continue,
                Err(e) => {
                    tracing::warn!(local.id = %id, error = %e, "unreadable record kept");
                    continue;
                }
            };
            if backend
                .check_published(&self.store.backing_path(&id))
                .is_ok()
            {
                continue;
            }
            match backend.validate_block(&record.name, &Map::new()) {
                Ok(()) => {}
                Err(e) if e.code == Code::NotFound => {
                    self.store.remove_stacked_record(&id)?;
                    tracing::info!(volume.id = %record.name, local.id = %id, "removed the node record of a stacked volume the backend no longer has");
                    removed.push(id);
                }
                Err(e) => {
                    tracing::info!(error = %e, "the backend cannot say which volumes exist; stacked volume records kept");
                    break;
                }
            }
        }
        Ok(removed)
    }

    /// Where an operator puts the recovery public keys a re-binding re-wraps recovery slots to
    /// (`<state-dir>/recovery-keys/*.pub`, as `recovery-keygen` writes them; docs/stacked.md).
    pub fn recovery_keys_dir(&self) -> PathBuf {
        let state = self.store.dir().parent().unwrap_or(self.store.dir());
        state.join("recovery-keys")
    }

    /// A restored or cloned volume holds the ciphertext of `source`, and its header is bound to
    /// `source`'s local id: before its first open on this node it is re-bound to `local`
    /// (`crate::volume::Volumes::rebind`: this node unseals it first, and a header bound to anything but
    /// `source` is refused unchanged; what it keeps of each keyslot is logged). What this trusts: the
    /// volume context (the CO's record of the volume, written by sealcsi's controller) saying which
    /// volume this one was copied from.
    fn rebind(&self, local: &VolumeId, device: &Path, source: &str) -> Result<(), NodeError> {
        let source_local = local_id(source);
        let from = crate::header::volume_binding(source_local.as_str());
        let to = crate::header::volume_binding(local.as_str());
        let dir = self.recovery_keys_dir();
        let recipients = crate::keyslots::read_public_keys_in(&dir).map_err(|e| {
            NodeError::FailedPrecondition(format!("recovery public keys in {}: {e}", dir.display()))
        })?;
        let Some(slots) =
            self.engine
                .rebind(device, source_local.as_str(), &from, &to, &recipients)?
        else {
            return Ok(());
        };
        for s in &slots {
            tracing::info!(volume.id = %local, slot = s.slot, kind = %s.kind, kept = s.kept, why = s.why, "re-bound copy: keyslot");
        }
        let kept = slots.iter().filter(|s| s.kept).count();
        tracing::info!(volume.id = %local, source = %source, kept, dropped = slots.len() - kept, "re-bound a restored or cloned volume to its new id");
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

    /// A backend that did not grow its device (the reference hostpath driver only records the new size
    /// of a block volume) must not get the expansion reported as done: the CO would show a size the
    /// volume does not have.
    #[test]
    fn an_expansion_the_backend_did_not_grow_is_an_error_not_a_success() {
        let r = rig();
        let (id, stage) = volume(&r, "pvc-grow");
        let staging = r.root.join("kubelet/staging");
        r.node
            .stage_stacked(&id, &staging, &fs_cap(), &stage)
            .unwrap();
        // NodeExpandVolume to 128 MiB, without the ControllerExpandVolume that grows the backend.
        let err = r
            .node
            .expand_stacked(&id, &staging, 128 << 20, 0, Some(&fs_cap()))
            .unwrap_err();
        assert!(
            matches!(&err, NodeError::FailedPrecondition(m) if m.contains("did not grow")),
            "{err}"
        );
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

    /// Stages and unstages `name`: afterwards only its node record is left on this node.
    fn staged_once(r: &Rig, name: &str) -> (String, VolumeId) {
        let (id, stage) = volume(r, name);
        let staging = r.root.join("kubelet").join(name);
        r.node
            .stage_stacked(&id, &staging, &fs_cap(), &stage)
            .unwrap();
        r.node.unstage_stacked(&id, &staging).unwrap();
        let local = local_id(&id);
        assert!(r.node.store.record(&local).unwrap().is_some());
        (id, local)
    }

    #[test]
    fn a_deleted_volumes_record_goes_at_the_first_stage_of_another_volume() {
        let r = rig();
        let (gone, gone_local) = staged_once(&r, "pvc-gone");
        let (_kept, kept_local) = staged_once(&r, "pvc-kept");
        r.controller.delete(&gone, &Secrets::default()).unwrap();
        assert!(
            r.node.store.record(&gone_local).unwrap().is_some(),
            "DeleteVolume in another pod leaves the record"
        );
        let (id, stage) = volume(&r, "pvc-new");
        let staging = r.root.join("kubelet/new");
        r.node
            .stage_stacked(&id, &staging, &fs_cap(), &stage)
            .unwrap();
        assert!(
            r.node.store.record(&gone_local).unwrap().is_none(),
            "the record of the volume the backend no longer has is gone"
        );
        assert!(
            r.node.store.record(&kept_local).unwrap().is_some(),
            "a volume that still exists keeps its record"
        );
        assert!(r.node.store.record(&local_id(&id)).unwrap().is_some());
        // A restage is not a first stage: no sweep, no backend question.
        let before = r.backend.calls().len();
        r.node
            .stage_stacked(&id, &staging, &fs_cap(), &stage)
            .unwrap();
        assert!(
            !r.backend.calls()[before..].contains(&"ValidateVolumeCapabilities"),
            "{:?}",
            &r.backend.calls()[before..]
        );
    }

    #[test]
    fn a_published_volume_and_a_backend_that_cannot_tell_keep_their_records() {
        let r = rig();
        let (gone, gone_local) = staged_once(&r, "pvc-x");
        r.controller.delete(&gone, &Secrets::default()).unwrap();
        // A node-only backend plugin has no Controller service.
        r.backend
            .fail("ValidateVolumeCapabilities", Code::Unimplemented);
        let removed = r.node.sweep_stacked_records(&local_id("none")).unwrap();
        assert!(removed.is_empty());
        assert!(r.node.store.record(&gone_local).unwrap().is_some());
        // Staged here: never swept, whatever the backend says.
        let (id, stage) = volume(&r, "pvc-staged");
        let staging = r.root.join("kubelet/staged");
        r.node
            .stage_stacked(&id, &staging, &fs_cap(), &stage)
            .unwrap();
        assert!(
            r.node.store.record(&gone_local).unwrap().is_none(),
            "once the backend answers, the first stage of another volume sweeps it"
        );
        r.controller.delete(&id, &Secrets::default()).unwrap();
        let removed = r.node.sweep_stacked_records(&local_id("none")).unwrap();
        assert!(removed.is_empty(), "{removed:?}");
        assert!(r.node.store.record(&local_id(&id)).unwrap().is_some());
    }

    #[test]
    fn delete_in_the_same_process_forgets_the_record() {
        let r = rig();
        let (id, local) = staged_once(&r, "pvc-del");
        r.controller.delete(&id, &Secrets::default()).unwrap();
        r.node.forget_stacked(&id).unwrap();
        assert!(r.node.store.record(&local).unwrap().is_none());
        r.node.forget_stacked(&id).unwrap();
        // Nothing but the record was removed: another volume's record is untouched.
        let (_other, other_local) = staged_once(&r, "pvc-other");
        r.node.forget_stacked(&id).unwrap();
        assert!(r.node.store.record(&other_local).unwrap().is_some());
    }

    #[test]
    fn node_info_is_the_backends() {
        let r = rig();
        let info = r.node.stacked_info().unwrap();
        assert_eq!(info.node_id, "n1");
        assert_eq!(info.topology.unwrap()["topology.memory.test/zone"], "z1");
    }
}
