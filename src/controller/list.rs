//! ListVolumes pages and their continuation tokens.
//!
//! A walk over all volumes reads the volume directory once: the first page takes a sorted snapshot of
//! the ids and every later page of that walk continues in the same snapshot, named by the walk number
//! in its token. Walking n volumes in pages therefore costs O(n) directory work in total, not one
//! directory read per page. A volume created during a walk is not in it (the next walk has it); one
//! deleted during a walk is left out of the page that would have shown it. A token whose snapshot is no
//! longer kept (an old walk, a restarted plugin) continues correctly from a fresh read.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use super::{ControllerError, Provisioner};
use crate::store::{StoreError, VolumeId, VolumeInfo};

/// One page of [`Provisioner::list`].
#[derive(Debug, Clone)]
pub struct Page {
    pub volumes: Vec<VolumeInfo>,
    /// Empty when this was the last page.
    pub next_token: String,
}

/// How many walks keep their snapshot (each is one id per volume: 10 000 volumes take ~1 MiB).
const KEPT_WALKS: usize = 8;

/// The snapshots of the walks in progress, newest last.
#[derive(Debug, Default)]
pub struct Walks {
    inner: Mutex<WalksInner>,
}

#[derive(Debug, Default)]
struct WalksInner {
    next_walk: u64,
    kept: VecDeque<(u64, Arc<Vec<VolumeId>>)>,
}

impl Walks {
    fn start(&self, ids: Vec<VolumeId>) -> (u64, Arc<Vec<VolumeId>>) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.next_walk += 1;
        let walk = inner.next_walk;
        let ids = Arc::new(ids);
        if inner.kept.len() == KEPT_WALKS {
            inner.kept.pop_front();
        }
        inner.kept.push_back((walk, ids.clone()));
        (walk, ids)
    }

    fn get(&self, walk: u64) -> Option<Arc<Vec<VolumeId>>> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner
            .kept
            .iter()
            .find(|(w, _)| *w == walk)
            .map(|(_, ids)| ids.clone())
    }
}

/// `v2:<walk>:<next id>`. Tokens of the earlier form `v1:<next id>` are still accepted.
const TOKEN_PREFIX: &str = "v2:";
const TOKEN_PREFIX_V1: &str = "v1:";

fn encode_token(walk: u64, next: &VolumeId) -> String {
    format!("{TOKEN_PREFIX}{walk}:{next}")
}

/// The walk (if the token names one) and the id the page starts at.
fn decode_token(token: &str) -> Result<(Option<u64>, VolumeId), ControllerError> {
    let bad = || ControllerError::BadToken(token.to_string());
    if let Some(id) = token.strip_prefix(TOKEN_PREFIX_V1) {
        return Ok((None, VolumeId::parse(id).ok_or_else(bad)?));
    }
    let rest = token.strip_prefix(TOKEN_PREFIX).ok_or_else(bad)?;
    let (walk, id) = rest.split_once(':').ok_or_else(bad)?;
    let walk = walk.parse().map_err(|_| bad())?;
    Ok((Some(walk), VolumeId::parse(id).ok_or_else(bad)?))
}

impl Provisioner {
    /// One page of volumes in id order. `starting_token` is what a previous page returned as `next_token`
    /// (empty for the first page); `max_entries` 0 means all.
    pub fn list(&self, max_entries: usize, starting_token: &str) -> Result<Page, ControllerError> {
        let (walk, ids, start) = if starting_token.is_empty() {
            let (walk, ids) = self.walks.start(self.store.ids()?);
            (walk, ids, 0)
        } else {
            let (walk, from) = decode_token(starting_token)?;
            let (walk, ids) = match walk.and_then(|w| Some((w, self.walks.get(w)?))) {
                Some(kept) => kept,
                None => self.walks.start(self.store.ids()?),
            };
            let start = ids.partition_point(|id| *id < from);
            (walk, ids, start)
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
                // Deleted since the walk's snapshot: not part of the page.
                Err(StoreError::NotFound(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let next_token = ids
            .get(end)
            .map(|next| encode_token(walk, next))
            .unwrap_or_default();
        Ok(Page {
            volumes,
            next_token,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_garbage_is_refused() {
        let id = VolumeId::for_name("pvc-1");
        assert_eq!(
            decode_token(&encode_token(7, &id)).unwrap(),
            (Some(7), id.clone())
        );
        assert_eq!(
            decode_token(&format!("v1:{id}")).unwrap(),
            (None, id.clone())
        );
        for bad in ["", "v2:", "v2:x:sv-1", "v2:1", "v3:1:sv-1", "v2:1:../etc"] {
            assert!(
                matches!(decode_token(bad), Err(ControllerError::BadToken(_))),
                "{bad}"
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn decoding_any_token_never_panics(token in ".{0,80}") {
            let _ = decode_token(&token);
        }
    }
}
