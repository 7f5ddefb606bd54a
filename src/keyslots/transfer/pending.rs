//! The target's half of a pending transfer: the ephemeral private key, sealed to this node's own
//! identity under the state dir until `transfer-accept` uses it (docs/format.md, "Pending transfer").
//!
//! The record is a sealcsi header (the same codec, checksum and strict decoder) with profile
//! `xts-only`, no filesystem, the request nonce in its volume-binding field, and one sealed keyslot
//! made by [`seal_for`] holding a 64-byte random seed; the X25519 key pair is HPKE's DeriveKeyPair of
//! that seed. So the one keyslot wrap and unwrap of `volume/seal.rs` protect it, and a node of another
//! identity (or a copy of the state dir on another machine, for hardware sources) cannot use it.

use std::fs::{self, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::TransferError;
use super::request::REQUEST_NONCE_LEN;
use crate::clock::now_unix;
use crate::header::{FsKind, HEADER_SIZE, Header, Profile};
use crate::keys::{DIGEST_LEN, VolumeKey};
use crate::keyslots::recovery::derive_x25519;
use crate::keyslots::{RecoveryPrivateKey, RecoveryPublicKey};
use crate::sealing::SealingSource;
use crate::volume::seal::{seal_for, unseal_with};

/// Where pending transfers live under the state dir.
pub const PENDING_DIR: &str = "transfer/pending";
/// Length of the sealed seed (the key length of profile `xts-only`).
const SEED_LEN: usize = 64;

fn state_error(path: &Path, reason: impl std::fmt::Display) -> TransferError {
    TransferError::State {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

pub fn pending_path(state_dir: &Path, id: &[u8; DIGEST_LEN]) -> PathBuf {
    state_dir.join(PENDING_DIR).join(hex::encode(id))
}

/// Writes `contents` to a new file (never over an existing one) with `mode`, and makes it and its
/// directory entry durable.
pub(super) fn write_new_durable(
    path: &Path,
    mode: u32,
    contents: &[u8],
) -> Result<(), std::io::Error> {
    let dir = path.parent().expect("a path under a directory");
    fs::create_dir_all(dir)?;
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    let written = fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .and_then(|()| file.write_all(contents))
        .and_then(|()| file.sync_all())
        .and_then(|()| fs::File::open(dir)?.sync_all());
    if written.is_err() {
        let _ = fs::remove_file(path);
    }
    written
}

/// A fresh ephemeral key pair, its private half sealed to `node` under `state_dir`. Returns the
/// public key and the record's path.
pub fn create(
    node: &dyn SealingSource,
    state_dir: &Path,
    nonce: &[u8; REQUEST_NONCE_LEN],
) -> Result<(RecoveryPublicKey, PathBuf), TransferError> {
    let seed = VolumeKey::generate(SEED_LEN)?;
    let (public, _private) = derive_x25519(seed.expose());
    let mut uuid = [0u8; 16];
    crate::keys::random_bytes(&mut uuid)?;
    let mut header = Header::new(uuid, Profile::XtsOnly, FsKind::None, now_unix());
    header.volume_binding = *nonce;
    header.keyslots[0] = Some(seal_for(node, &header, &seed)?);
    let path = pending_path(state_dir, &public.fingerprint());
    write_new_durable(&path, 0o600, &header.encode()).map_err(|e| state_error(&path, e))?;
    Ok((public, path))
}

/// The private key of pending request `id`, unsealed by `node`, and the nonce it was made for.
/// `Ok(None)` when this node has no such pending request.
pub fn load(
    node: &dyn SealingSource,
    state_dir: &Path,
    id: &[u8; DIGEST_LEN],
) -> Result<Option<(RecoveryPrivateKey, [u8; REQUEST_NONCE_LEN])>, TransferError> {
    let path = pending_path(state_dir, id);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(state_error(&path, e)),
    };
    if bytes.len() != HEADER_SIZE {
        return Err(state_error(
            &path,
            format!("{} bytes, not {HEADER_SIZE}", bytes.len()),
        ));
    }
    let header = Header::decode(&bytes).map_err(|e| state_error(&path, e))?;
    if header.profile != Profile::XtsOnly || header.fs != FsKind::None {
        return Err(state_error(&path, "not a pending-transfer record"));
    }
    let (_, seed) = unseal_with(node, &header)?;
    let (public, private) = derive_x25519(seed.expose());
    if public.fingerprint() != *id {
        return Err(state_error(
            &path,
            "the sealed key is not the one the file is named for",
        ));
    }
    Ok(Some((private, header.volume_binding)))
}

/// Removes the pending record of `id` (after accept), durably; a missing record is not an error.
pub fn remove(state_dir: &Path, id: &[u8; DIGEST_LEN]) -> Result<(), TransferError> {
    let path = pending_path(state_dir, id);
    match fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(state_error(&path, e)),
    }
    if let Some(dir) = path.parent() {
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| state_error(dir, e))?;
    }
    Ok(())
}
