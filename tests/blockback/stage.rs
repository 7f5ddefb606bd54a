//! The node core: what a block driver does on the node, over real loop devices and bind mounts.
//! Idempotency comes from kernel state (is the file attached to a loop device? is the target a bind
//! of that device?) plus the staging record. Nothing here knows gRPC.

use std::fs::{self, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sealcsi::backend::LoopDevice;
use sealcsi::node::{BindFlags, Mounter, SystemMounter};

use crate::error::BbError;
use crate::store::{StagedRecord, Store};

/// The node side of blockback.
pub struct NodeCore {
    store: Arc<Store>,
    mounter: SystemMounter,
}

/// How many mounts stacked on one target an unpublish takes off at most.
const MAX_STACKED_MOUNTS: usize = 16;

impl NodeCore {
    /// A node core over the state in `store`.
    pub fn new(store: Arc<Store>) -> Self {
        Self {
            store,
            mounter: SystemMounter,
        }
    }

    fn attached(&self, volume_id: &str) -> Result<Option<LoopDevice>, BbError> {
        let file = self.store.volume_file(volume_id);
        if !file.exists() {
            return Ok(None);
        }
        Ok(LoopDevice::find(&file)?)
    }

    /// Attaches the volume's file to a loop device (or finds the one it is attached to); returns it
    /// and whether this call attached it.
    pub fn stage(&self, volume_id: &str, staging: &Path) -> Result<(LoopDevice, bool), BbError> {
        self.store.existing_volume(volume_id)?;
        if !staging.is_dir() {
            return Err(BbError::InvalidArgument(format!(
                "staging_target_path {} is not an existing directory",
                staging.display()
            )));
        }
        match self.store.staged(volume_id)? {
            Some(s) if s.staging_target_path != staging => {
                return Err(BbError::AlreadyExists(format!(
                    "volume {volume_id} is staged at {}",
                    s.staging_target_path.display()
                )));
            }
            Some(_) => {}
            None => self.store.put_staged(&StagedRecord {
                volume_id: volume_id.to_string(),
                staging_target_path: staging.to_path_buf(),
            })?,
        }
        Ok(LoopDevice::find_or_attach_reporting(
            &self.store.volume_file(volume_id),
            false,
        )?)
    }

    /// The loop device of a volume staged at `staging`, or FAILED_PRECONDITION.
    fn staged_device(&self, volume_id: &str, staging: &Path) -> Result<LoopDevice, BbError> {
        self.store.existing_volume(volume_id)?;
        match self.store.staged(volume_id)? {
            Some(s) if s.staging_target_path == staging => {}
            Some(s) => {
                return Err(BbError::FailedPrecondition(format!(
                    "volume {volume_id} is staged at {}, not {}",
                    s.staging_target_path.display(),
                    staging.display()
                )));
            }
            None => {
                return Err(BbError::FailedPrecondition(format!(
                    "volume {volume_id} is not staged"
                )));
            }
        }
        self.attached(volume_id)?.ok_or_else(|| {
            BbError::FailedPrecondition(format!(
                "volume {volume_id} is not attached to a loop device (stage it again)"
            ))
        })
    }

    /// Bind-mounts the volume's loop device node onto `target` (a file, created if missing).
    pub fn publish(
        &self,
        volume_id: &str,
        staging: &Path,
        target: &Path,
        readonly: bool,
    ) -> Result<PathBuf, BbError> {
        let lo = self.staged_device(volume_id, staging)?;
        if self.mounter.is_bind_of(target, lo.path())? {
            return Ok(lo.path().to_path_buf());
        }
        match fs::symlink_metadata(target) {
            Ok(m) if m.is_file() => {}
            Ok(_) => {
                return Err(BbError::AlreadyExists(format!(
                    "target_path {} exists and is not a regular file or this volume's device",
                    target.display()
                )));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if let Some(parent) = target.parent() {
                    fs::create_dir_all(parent).map_err(|e| BbError::io("create", parent, e))?;
                }
                OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(target)
                    .map_err(|e| BbError::io("create", target, e))?;
            }
            Err(e) => return Err(BbError::io("stat", target, e)),
        }
        self.mounter
            .bind(lo.path(), target, BindFlags::block(readonly))?;
        Ok(lo.path().to_path_buf())
    }

    /// Unmounts whatever is mounted on `target` and removes the file. OK if nothing is there.
    pub fn unpublish(&self, target: &Path) -> Result<(), BbError> {
        for _ in 0..MAX_STACKED_MOUNTS {
            if self.mounter.mounted_at(target)?.is_none() {
                break;
            }
            self.mounter.umount(target)?;
        }
        if self.mounter.mounted_at(target)?.is_some() {
            return Err(BbError::FailedPrecondition(format!(
                "{} still has mounts after {MAX_STACKED_MOUNTS} unmounts",
                target.display()
            )));
        }
        match fs::symlink_metadata(target) {
            Ok(m) if m.is_dir() => fs::remove_dir(target),
            Ok(_) => fs::remove_file(target),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
        .map_err(|e| BbError::io("remove", target, e))
    }

    /// Detaches the volume's loop device and forgets the staging. OK if not staged.
    /// FAILED_PRECONDITION while something (a device-mapper stack) holds the device.
    pub fn unstage(&self, volume_id: &str) -> Result<(), BbError> {
        if let Some(lo) = self.attached(volume_id)? {
            lo.detach()?;
        }
        self.store.remove_staged(volume_id)
    }

    /// Makes the loop device take the file's current size; returns the device's size in bytes.
    pub fn expand(&self, volume_id: &str) -> Result<u64, BbError> {
        self.store.existing_volume(volume_id)?;
        let lo = self.attached(volume_id)?.ok_or_else(|| {
            BbError::FailedPrecondition(format!("volume {volume_id} is not staged"))
        })?;
        lo.set_capacity()?;
        device_size(&lo)
    }

    /// The capacity of the volume whose device is published or staged at `path`.
    pub fn stats(&self, volume_id: &str, path: &Path) -> Result<u64, BbError> {
        let v = self.store.existing_volume(volume_id)?;
        if !path.exists() {
            return Err(BbError::NotFound(format!(
                "volume_path {} does not exist",
                path.display()
            )));
        }
        match self.attached(volume_id)? {
            Some(lo) => device_size(&lo),
            None => Ok(v.capacity_bytes),
        }
    }
}

/// The size of a loop device in bytes (sysfs `size`, in 512-byte sectors).
pub fn device_size(lo: &LoopDevice) -> Result<u64, BbError> {
    let p = PathBuf::from(format!("/sys/block/loop{}/size", lo.number()));
    let s = fs::read_to_string(&p).map_err(|e| BbError::io("read", &p, e))?;
    s.trim()
        .parse::<u64>()
        .map(|sectors| sectors * 512)
        .map_err(|e| BbError::io("parse", &p, io::Error::other(e)))
}
