//! ListVolumes pages and their continuation tokens.

use super::{ControllerError, Provisioner};
use crate::store::{StoreError, VolumeId, VolumeInfo};

/// One page of [`Provisioner::list`].
#[derive(Debug, Clone)]
pub struct Page {
    pub volumes: Vec<VolumeInfo>,
    /// Empty when this was the last page.
    pub next_token: String,
}

const TOKEN_PREFIX: &str = "v1:";

fn encode_token(next: &VolumeId) -> String {
    format!("{TOKEN_PREFIX}{next}")
}

fn decode_token(token: &str) -> Result<VolumeId, ControllerError> {
    token
        .strip_prefix(TOKEN_PREFIX)
        .and_then(VolumeId::parse)
        .ok_or_else(|| ControllerError::BadToken(token.to_string()))
}

impl Provisioner {
    /// One page of volumes in id order. `starting_token` is what a previous page returned as `next_token`
    /// (empty for the first page); `max_entries` 0 means all.
    pub fn list(&self, max_entries: usize, starting_token: &str) -> Result<Page, ControllerError> {
        let ids = self.store.ids()?;
        let start = if starting_token.is_empty() {
            0
        } else {
            let from = decode_token(starting_token)?;
            ids.partition_point(|id| *id < from)
        };
        let end = if max_entries == 0 {
            ids.len()
        } else {
            (start + max_entries).min(ids.len())
        };
        let mut volumes = Vec::with_capacity(end - start);
        for id in &ids[start..end] {
            match self.store.get(id) {
                Ok(v) => volumes.push(v),
                // Deleted between listing and reading: not part of the page.
                Err(StoreError::NotFound(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let next_token = ids.get(end).map(encode_token).unwrap_or_default();
        Ok(Page {
            volumes,
            next_token,
        })
    }
}
