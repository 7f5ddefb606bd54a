//! An in-memory [`CsiBackend`] for host tests: volumes are sparse files in a directory, snapshots and
//! clones are copies, NodePublishVolume hard-links the volume's file at the target path (so writes through
//! it land in the volume, as through a published device node). It checks what a real driver checks (ids,
//! staged before published) and can be told to fail one RPC ([`MemoryBackend::fail`]). Never what a
//! user runs.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::{
    BackendCallError, BackendSnapshot, BackendVolume, Capabilities, Capacity, Code, ContentSource,
    ControllerCap, CreateRequest, CsiBackend, Map, NodeCap, NodeInfo, PublishRequest, Result,
    Secrets, StageRequest, Topology,
};
use crate::node::capability::AccessMode;

#[derive(Debug, Clone)]
struct Volume {
    name: String,
    capacity: u64,
    parameters: Map,
}

#[derive(Debug, Default)]
struct State {
    volumes: BTreeMap<String, Volume>,
    snapshots: BTreeMap<String, (String, String)>,
    staged: BTreeMap<String, PathBuf>,
    published: BTreeMap<PathBuf, String>,
    attached: BTreeMap<String, String>,
    fail: Option<(&'static str, Code)>,
    calls: Vec<&'static str>,
}

/// The in-memory backend.
#[derive(Debug)]
pub struct MemoryBackend {
    dir: PathBuf,
    node_id: String,
    topology: Topology,
    capacity: u64,
    state: Mutex<State>,
}

impl MemoryBackend {
    /// A backend keeping its volume files in `dir`, for node `node_id` in zone `zone`.
    pub fn new(dir: &Path, node_id: &str, zone: &str) -> Self {
        fs::create_dir_all(dir).expect("creating the memory backend's directory");
        Self {
            dir: dir.to_path_buf(),
            node_id: node_id.into(),
            topology: Map::from([("topology.memory.test/zone".into(), zone.into())]),
            capacity: 100 << 30,
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The next call of `rpc` fails with `code`.
    pub fn fail(&self, rpc: &'static str, code: Code) {
        self.state().fail = Some((rpc, code));
    }

    /// The RPCs called so far, in order.
    pub fn calls(&self) -> Vec<&'static str> {
        self.state().calls.clone()
    }

    /// The parameters volume `id` was created with.
    pub fn parameters(&self, id: &str) -> Option<Map> {
        self.state().volumes.get(id).map(|v| v.parameters.clone())
    }

    /// The file holding volume `id`.
    pub fn file(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.vol"))
    }

    fn enter(&self, rpc: &'static str) -> Result<std::sync::MutexGuard<'_, State>> {
        let mut st = self.state();
        st.calls.push(rpc);
        if let Some((r, code)) = st.fail
            && r == rpc
        {
            st.fail = None;
            return Err(err(rpc, code, "injected failure"));
        }
        Ok(st)
    }
}

fn err(rpc: &'static str, code: Code, message: impl Into<String>) -> BackendCallError {
    BackendCallError {
        backend: "memory".into(),
        rpc,
        code,
        message: message.into(),
    }
}

fn io(rpc: &'static str) -> impl FnOnce(std::io::Error) -> BackendCallError {
    move |e| err(rpc, Code::Internal, e.to_string())
}

impl CsiBackend for MemoryBackend {
    fn name(&self) -> &str {
        "memory"
    }

    fn plugin_name(&self) -> Result<String> {
        Ok("memory.backend.test".into())
    }

    fn probe(&self) -> Result<bool> {
        self.enter("Probe").map(|_| true)
    }

    fn capabilities(&self) -> Result<Capabilities> {
        let _st = self.enter("GetPluginCapabilities")?;
        Ok(Capabilities {
            controller: [
                ControllerCap::CreateDeleteVolume,
                ControllerCap::PublishUnpublishVolume,
                ControllerCap::GetCapacity,
                ControllerCap::CreateDeleteSnapshot,
                ControllerCap::CloneVolume,
                ControllerCap::ExpandVolume,
            ]
            .into(),
            node: [NodeCap::StageUnstageVolume, NodeCap::ExpandVolume].into(),
            topology: true,
        })
    }

    fn create_volume(&self, req: &CreateRequest) -> Result<BackendVolume> {
        const RPC: &str = "CreateVolume";
        let mut st = self.enter(RPC)?;
        let id = format!("mem-{}", req.name);
        let size = req.required_bytes.max(1 << 20).div_ceil(1 << 20) << 20;
        if req.limit_bytes != 0 && size > req.limit_bytes {
            return Err(err(RPC, Code::OutOfRange, "limit too small"));
        }
        if let Some(v) = st.volumes.get(&id) {
            if v.capacity < req.required_bytes {
                return Err(err(RPC, Code::AlreadyExists, "other size"));
            }
        } else {
            let file = self.file(&id);
            match &req.source {
                Some(ContentSource::Snapshot(s)) => {
                    let (_, snap_file) = st
                        .snapshots
                        .get(s)
                        .cloned()
                        .ok_or_else(|| err(RPC, Code::NotFound, format!("snapshot {s}")))?;
                    fs::copy(snap_file, &file).map_err(io(RPC))?;
                }
                Some(ContentSource::Volume(v)) => {
                    if !st.volumes.contains_key(v) {
                        return Err(err(RPC, Code::NotFound, format!("volume {v}")));
                    }
                    fs::copy(self.file(v), &file).map_err(io(RPC))?;
                }
                None => {}
            }
            let f = fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&file)
                .map_err(io(RPC))?;
            let len = f.metadata().map_err(io(RPC))?.len();
            f.set_len(size.max(len)).map_err(io(RPC))?;
            st.volumes.insert(
                id.clone(),
                Volume {
                    name: req.name.clone(),
                    capacity: size.max(len),
                    parameters: req.parameters.clone(),
                },
            );
        }
        let v = &st.volumes[&id];
        debug_assert_eq!(v.name, req.name);
        Ok(BackendVolume {
            id: id.clone(),
            capacity_bytes: v.capacity,
            context: Map::from([("memory/file".into(), self.file(&id).display().to_string())]),
            topology: vec![self.topology.clone()],
            source: req.source.clone(),
        })
    }

    fn delete_volume(&self, volume_id: &str, _secrets: &Secrets) -> Result<()> {
        let mut st = self.enter("DeleteVolume")?;
        if st.volumes.remove(volume_id).is_some() {
            fs::remove_file(self.file(volume_id)).map_err(io("DeleteVolume"))?;
        }
        Ok(())
    }

    fn validate_block(&self, volume_id: &str, _context: &Map) -> Result<()> {
        let st = self.enter("ValidateVolumeCapabilities")?;
        if st.volumes.contains_key(volume_id) {
            Ok(())
        } else {
            Err(err(
                "ValidateVolumeCapabilities",
                Code::NotFound,
                volume_id.to_string(),
            ))
        }
    }

    fn controller_publish(
        &self,
        volume_id: &str,
        node_id: &str,
        _mode: AccessMode,
        _readonly: bool,
        _context: &Map,
        _secrets: &Secrets,
    ) -> Result<Map> {
        const RPC: &str = "ControllerPublishVolume";
        let mut st = self.enter(RPC)?;
        if !st.volumes.contains_key(volume_id) {
            return Err(err(RPC, Code::NotFound, volume_id.to_string()));
        }
        if node_id != self.node_id {
            return Err(err(RPC, Code::NotFound, format!("node {node_id}")));
        }
        st.attached.insert(volume_id.into(), node_id.into());
        Ok(Map::from([("memory/attached".into(), node_id.into())]))
    }

    fn controller_unpublish(&self, volume_id: &str, _node_id: &str, _s: &Secrets) -> Result<()> {
        self.enter("ControllerUnpublishVolume")?
            .attached
            .remove(volume_id);
        Ok(())
    }

    fn controller_expand(
        &self,
        volume_id: &str,
        required_bytes: u64,
        _limit_bytes: u64,
        _mode: AccessMode,
        _secrets: &Secrets,
    ) -> Result<u64> {
        const RPC: &str = "ControllerExpandVolume";
        let mut st = self.enter(RPC)?;
        let v = st
            .volumes
            .get_mut(volume_id)
            .ok_or_else(|| err(RPC, Code::NotFound, volume_id.to_string()))?;
        let size = required_bytes.div_ceil(1 << 20) << 20;
        if size > v.capacity {
            fs::OpenOptions::new()
                .write(true)
                .open(self.file(volume_id))
                .and_then(|f| f.set_len(size))
                .map_err(io(RPC))?;
            v.capacity = size;
        }
        Ok(v.capacity)
    }

    fn get_capacity(
        &self,
        _mode: Option<AccessMode>,
        _parameters: &Map,
        topology: Option<&Topology>,
    ) -> Result<Capacity> {
        let _st = self.enter("GetCapacity")?;
        let here = topology.is_none_or(|t| *t == self.topology);
        Ok(Capacity {
            available: if here { self.capacity } else { 0 },
            maximum: None,
            minimum: None,
        })
    }

    fn create_snapshot(
        &self,
        source_volume_id: &str,
        name: &str,
        _parameters: &Map,
        _secrets: &Secrets,
    ) -> Result<BackendSnapshot> {
        const RPC: &str = "CreateSnapshot";
        let mut st = self.enter(RPC)?;
        let v = st
            .volumes
            .get(source_volume_id)
            .cloned()
            .ok_or_else(|| err(RPC, Code::NotFound, source_volume_id.to_string()))?;
        let id = format!("snap-{name}");
        let file = self.dir.join(format!("{id}.snap"));
        if !st.snapshots.contains_key(&id) {
            fs::copy(self.file(source_volume_id), &file).map_err(io(RPC))?;
            st.snapshots.insert(
                id.clone(),
                (source_volume_id.into(), file.display().to_string()),
            );
        }
        Ok(BackendSnapshot {
            id,
            source_volume_id: source_volume_id.into(),
            size_bytes: v.capacity,
            created: Some((1, 0)),
            ready: true,
        })
    }

    fn delete_snapshot(&self, snapshot_id: &str, _secrets: &Secrets) -> Result<()> {
        let mut st = self.enter("DeleteSnapshot")?;
        if let Some((_, file)) = st.snapshots.remove(snapshot_id) {
            fs::remove_file(file).map_err(io("DeleteSnapshot"))?;
        }
        Ok(())
    }

    fn snapshot_source(&self, snapshot_id: &str) -> Result<String> {
        let st = self.enter("ListSnapshots")?;
        st.snapshots
            .get(snapshot_id)
            .map(|(v, _)| v.clone())
            .ok_or_else(|| err("ListSnapshots", Code::NotFound, snapshot_id.to_string()))
    }

    fn node_info(&self) -> Result<NodeInfo> {
        let _st = self.enter("NodeGetInfo")?;
        Ok(NodeInfo {
            node_id: self.node_id.clone(),
            max_volumes: 0,
            topology: Some(self.topology.clone()),
        })
    }

    fn node_stage(&self, req: &StageRequest<'_>) -> Result<()> {
        const RPC: &str = "NodeStageVolume";
        let mut st = self.enter(RPC)?;
        if !st.volumes.contains_key(req.volume_id) {
            return Err(err(RPC, Code::NotFound, req.volume_id.to_string()));
        }
        if !st.attached.contains_key(req.volume_id) {
            return Err(err(RPC, Code::FailedPrecondition, "not attached"));
        }
        st.staged
            .insert(req.volume_id.into(), req.staging_path.to_path_buf());
        Ok(())
    }

    fn node_unstage(&self, volume_id: &str, _staging_path: &Path) -> Result<()> {
        let mut st = self.enter("NodeUnstageVolume")?;
        if st.published.values().any(|v| v == volume_id) {
            return Err(err(
                "NodeUnstageVolume",
                Code::FailedPrecondition,
                "still published",
            ));
        }
        st.staged.remove(volume_id);
        Ok(())
    }

    fn node_publish(&self, req: &PublishRequest<'_>) -> Result<()> {
        const RPC: &str = "NodePublishVolume";
        let mut st = self.enter(RPC)?;
        if !st.staged.contains_key(req.volume_id) {
            return Err(err(RPC, Code::FailedPrecondition, "not staged"));
        }
        if st.published.get(req.target_path).map(String::as_str) == Some(req.volume_id) {
            return Ok(());
        }
        if let Some(parent) = req.target_path.parent() {
            fs::create_dir_all(parent).map_err(io(RPC))?;
        }
        fs::hard_link(self.file(req.volume_id), req.target_path).map_err(io(RPC))?;
        st.published
            .insert(req.target_path.to_path_buf(), req.volume_id.into());
        Ok(())
    }

    fn node_unpublish(&self, volume_id: &str, target_path: &Path) -> Result<()> {
        let mut st = self.enter("NodeUnpublishVolume")?;
        if st.published.get(target_path).map(String::as_str) == Some(volume_id) {
            fs::remove_file(target_path).map_err(io("NodeUnpublishVolume"))?;
            st.published.remove(target_path);
        }
        Ok(())
    }

    fn node_expand(
        &self,
        volume_id: &str,
        _volume_path: &Path,
        _staging_path: Option<&Path>,
        _required_bytes: u64,
        _limit_bytes: u64,
        _mode: AccessMode,
    ) -> Result<()> {
        let st = self.enter("NodeExpandVolume")?;
        if !st.published.values().any(|v| v == volume_id) {
            return Err(err(
                "NodeExpandVolume",
                Code::FailedPrecondition,
                "not published",
            ));
        }
        Ok(())
    }

    fn check_published(&self, target: &Path) -> std::result::Result<(), String> {
        let published = self.state().published.contains_key(target) && target.is_file();
        if published {
            Ok(())
        } else {
            Err(format!("nothing published at {}", target.display()))
        }
    }
}
