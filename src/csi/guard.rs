//! Per-volume operation guards: one operation per volume id at a time. A second concurrent call on the
//! same volume gets ABORTED, as the CSI spec asks (the CO retries later). The guard is an RAII value:
//! it is released when dropped, including when the blocking work it protects ends after the RPC itself
//! was cancelled (the guard moves into that work).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use crate::error::{Classify, Kind};

/// The volumes with an operation in progress.
#[derive(Debug, Clone, Default)]
pub struct OpGuards {
    held: Arc<Mutex<HashSet<String>>>,
}

/// Another operation holds the volume.
#[derive(Debug, thiserror::Error)]
#[error("an operation on volume {0} is already in progress; retry later")]
pub struct InProgress(pub String);

impl Classify for InProgress {
    fn kind(&self) -> Kind {
        Kind::Aborted
    }
}

/// Held while an operation on one volume runs.
#[derive(Debug)]
pub struct OpGuard {
    held: Arc<Mutex<HashSet<String>>>,
    volume_id: String,
}

impl OpGuards {
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes the guard of `volume_id`, or fails at once if another operation holds it.
    pub fn try_acquire(&self, volume_id: &str) -> Result<OpGuard, InProgress> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if !held.insert(volume_id.to_string()) {
            return Err(InProgress(volume_id.to_string()));
        }
        Ok(OpGuard {
            held: self.held.clone(),
            volume_id: volume_id.to_string(),
        })
    }

    /// Whether an operation on `volume_id` is in progress.
    pub fn is_held(&self, volume_id: &str) -> bool {
        self.held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(volume_id)
    }
}

impl Drop for OpGuard {
    fn drop(&mut self) {
        self.held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.volume_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_operation_per_volume() {
        let g = OpGuards::new();
        let a = g.try_acquire("v1").unwrap();
        assert_eq!(g.try_acquire("v1").unwrap_err().kind(), Kind::Aborted);
        let _b = g.try_acquire("v2").unwrap();
        assert!(g.is_held("v1"));
        drop(a);
        assert!(!g.is_held("v1"));
        g.try_acquire("v1").unwrap();
    }
}
