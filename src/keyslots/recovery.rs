//! Recovery escrow: an operator's X25519 key pair, HPKE slots holding the volume key for it, and
//! `recover`, which opens such a slot and adds a slot for this node.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use hkdf::Hkdf;
use hpke::aead::ChaCha20Poly1305;
use hpke::kdf::HkdfSha256;
use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, Kem as _, OpModeR, OpModeS, Serializable};
use serde::Serialize;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::{KeyslotError, ensure_sealed_slot};
use crate::clock::now_unix;
use crate::header::{Header, Keyslot, SlotKind};
use crate::keys::{DIGEST_LEN, NONCE_LEN, SALT_LEN, VolumeKey, WRAP_TAG_LEN};
use crate::sealing::SealingSource;
use crate::volume::header_io::lock_device;
use crate::volume::{Volumes, commit, commit_everywhere, read_header};

/// HPKE suite of recovery slots: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20Poly1305, mode Base.
type RecoveryKem = X25519HkdfSha256;
type RecoveryKdf = HkdfSha256;
type RecoveryAead = ChaCha20Poly1305;
/// HPKE `info` of a recovery slot: this label, then the volume UUID (16 bytes).
const RECOVERY_INFO_LABEL: &[u8] = b"sealcsi/v1/recovery";
/// HPKE `info` of a transfer slot: this label, then the volume UUID (16 bytes).
const TRANSFER_INFO_LABEL: &[u8] = b"sealcsi/v1/transfer";
/// Label of the key check value printed by `add-recovery` and checked by `recover`.
const KEY_CHECK_LABEL: &[u8] = b"sealcsi/v1/key-check";
const PUBLIC_KEY_TAG: &str = "sealcsi-recovery-public-key-v1 x25519";
const PRIVATE_KEY_TAG: &str = "sealcsi-recovery-private-key-v1 x25519";
/// Length of an X25519 key.
pub const RECOVERY_KEY_LEN: usize = 32;

/// An operator's X25519 recovery public key.
#[derive(Clone, PartialEq, Eq)]
pub struct RecoveryPublicKey([u8; RECOVERY_KEY_LEN]);

/// An operator's X25519 recovery private key: zeroized on drop, never printed.
pub struct RecoveryPrivateKey(Zeroizing<[u8; RECOVERY_KEY_LEN]>);

impl fmt::Debug for RecoveryPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RecoveryPublicKey({})", hex::encode(self.0))
    }
}

impl fmt::Debug for RecoveryPrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RecoveryPrivateKey(<redacted>)")
    }
}

impl RecoveryPublicKey {
    pub fn from_bytes(bytes: [u8; RECOVERY_KEY_LEN]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; RECOVERY_KEY_LEN] {
        &self.0
    }

    /// SHA-256 of the 32-byte public key: recorded as the recovery slot's identity digest.
    pub fn fingerprint(&self) -> [u8; DIGEST_LEN] {
        Sha256::digest(self.0).into()
    }

    fn hpke(&self) -> Result<<RecoveryKem as hpke::Kem>::PublicKey, KeyslotError> {
        <RecoveryKem as hpke::Kem>::PublicKey::from_bytes(&self.0)
            .map_err(|e| KeyslotError::Hpke(format!("public key: {e}")))
    }
}

impl RecoveryPrivateKey {
    pub fn from_bytes(bytes: Zeroizing<[u8; RECOVERY_KEY_LEN]>) -> Self {
        Self(bytes)
    }

    fn hpke(&self) -> Result<<RecoveryKem as hpke::Kem>::PrivateKey, KeyslotError> {
        <RecoveryKem as hpke::Kem>::PrivateKey::from_bytes(self.0.as_slice())
            .map_err(|e| KeyslotError::Hpke(format!("private key: {e}")))
    }

    pub fn public(&self) -> Result<RecoveryPublicKey, KeyslotError> {
        let pk = RecoveryKem::sk_to_pk(&self.hpke()?);
        let mut out = [0u8; RECOVERY_KEY_LEN];
        out.copy_from_slice(&pk.to_bytes());
        Ok(RecoveryPublicKey(out))
    }
}

/// A fresh X25519 recovery key pair from the OS random number generator.
pub fn recovery_keygen() -> (RecoveryPublicKey, RecoveryPrivateKey) {
    let (sk, pk) = RecoveryKem::gen_keypair();
    key_pair_bytes(sk, pk)
}

/// The X25519 key pair HPKE's DeriveKeyPair (RFC 9180, section 7.1.3) makes from `ikm`: how a transfer
/// request's ephemeral key comes from the seed sealed under the state dir.
pub fn derive_x25519(ikm: &[u8]) -> (RecoveryPublicKey, RecoveryPrivateKey) {
    let (sk, pk) = RecoveryKem::derive_keypair(ikm);
    key_pair_bytes(sk, pk)
}

fn key_pair_bytes(
    sk: <RecoveryKem as hpke::Kem>::PrivateKey,
    pk: <RecoveryKem as hpke::Kem>::PublicKey,
) -> (RecoveryPublicKey, RecoveryPrivateKey) {
    let mut public = [0u8; RECOVERY_KEY_LEN];
    public.copy_from_slice(&pk.to_bytes());
    let mut private = Zeroizing::new([0u8; RECOVERY_KEY_LEN]);
    let mut sk_bytes = sk.to_bytes();
    private.copy_from_slice(&sk_bytes);
    zeroize::Zeroize::zeroize(sk_bytes.as_mut_slice());
    (RecoveryPublicKey(public), RecoveryPrivateKey(private))
}

/// What `recovery-keygen` wrote.
#[derive(Debug, Clone, Serialize)]
pub struct KeygenReport {
    pub public_key_file: PathBuf,
    pub private_key_file: PathBuf,
    /// SHA-256 of the public key: recovery slots for this key show it as their identity digest.
    pub fingerprint: String,
}

fn key_file_error(path: &Path, reason: impl fmt::Display) -> KeyslotError {
    KeyslotError::RecoveryKeyFile {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

fn write_new_file(path: &Path, mode: u32, contents: &[u8]) -> Result<(), KeyslotError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| key_file_error(path, e))?;
    // The umask may have narrowed the mode; set it exactly.
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .and_then(|()| file.write_all(contents))
        .and_then(|()| file.sync_all())
        .map_err(|e| key_file_error(path, e))
}

/// Generates a recovery key pair and writes it: the private key to `private_path` (mode 0600, created
/// new, never overwritten), the public key to `public_path` (0644). The private key is never printed.
pub fn write_recovery_keys(
    private_path: &Path,
    public_path: &Path,
) -> Result<KeygenReport, KeyslotError> {
    if private_path == public_path {
        return Err(key_file_error(
            private_path,
            "the private and public key files must differ",
        ));
    }
    let (public, private) = recovery_keygen();
    let private_text = Zeroizing::new(format!(
        "{PRIVATE_KEY_TAG} {}\n",
        hex::encode(private.0.as_slice())
    ));
    write_new_file(private_path, 0o600, private_text.as_bytes())?;
    let public_text = format!("{PUBLIC_KEY_TAG} {}\n", hex::encode(public.0));
    if let Err(e) = write_new_file(public_path, 0o644, public_text.as_bytes()) {
        // Do not leave a private key whose public half was never written.
        let _ = fs::remove_file(private_path);
        return Err(e);
    }
    Ok(KeygenReport {
        public_key_file: public_path.to_path_buf(),
        private_key_file: private_path.to_path_buf(),
        fingerprint: hex::encode(public.fingerprint()),
    })
}

fn parse_key_line(path: &Path, text: &str, tag: &str) -> Result<Zeroizing<[u8; 32]>, KeyslotError> {
    let hex_part = text
        .trim_end_matches('\n')
        .strip_prefix(tag)
        .and_then(|rest| rest.strip_prefix(' '))
        .ok_or_else(|| key_file_error(path, format!("not a \"{tag}\" key file")))?;
    let mut out = Zeroizing::new([0u8; 32]);
    hex::decode_to_slice(hex_part, out.as_mut_slice())
        .map_err(|_| key_file_error(path, "the key is not 64 hex digits"))?;
    Ok(out)
}

pub fn read_public_key(path: &Path) -> Result<RecoveryPublicKey, KeyslotError> {
    let text = fs::read_to_string(path).map_err(|e| key_file_error(path, e))?;
    Ok(RecoveryPublicKey(*parse_key_line(
        path,
        &text,
        PUBLIC_KEY_TAG,
    )?))
}

/// Reads a private key file; refuses one that group or others can read.
pub fn read_private_key(path: &Path) -> Result<RecoveryPrivateKey, KeyslotError> {
    let meta = fs::metadata(path).map_err(|e| key_file_error(path, e))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(key_file_error(
            path,
            format!(
                "mode {:o} lets others read the private key; chmod 600 it",
                meta.permissions().mode() & 0o777
            ),
        ));
    }
    let text = Zeroizing::new(fs::read_to_string(path).map_err(|e| key_file_error(path, e))?);
    Ok(RecoveryPrivateKey(parse_key_line(
        path,
        &text,
        PRIVATE_KEY_TAG,
    )?))
}

/// Every recovery public key in `dir`: each file named `*.pub` in the format `recovery-keygen` writes
/// (other names are ignored; a `*.pub` file that is not one is an error). A missing `dir` holds none.
pub fn read_public_keys_in(dir: &Path) -> Result<Vec<RecoveryPublicKey>, KeyslotError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(key_file_error(dir, e)),
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "pub"))
        .collect();
    paths.sort();
    paths.iter().map(|p| read_public_key(p)).collect()
}

/// The HPKE re-wrap of a re-binding (`crate::volume::Volumes::rebind`): a recovery slot whose
/// fingerprint is one of `recipients`' is sealed anew to that key for the re-bound header (the one
/// HPKE wrap, [`seal_recovery_slot`]); any other slot, `None`. The recipient key comes from the
/// caller, never from the header: a slot's fields other than the node's own are not authenticated.
pub fn rewrap_recovery(
    recipients: &[RecoveryPublicKey],
) -> impl Fn(&Header, &Keyslot, &VolumeKey) -> Result<Option<Keyslot>, String> + '_ {
    move |new, slot, key| {
        if slot.kind != SlotKind::Recovery {
            return Ok(None);
        }
        recipients
            .iter()
            .find(|r| r.fingerprint() == slot.identity_digest)
            .map(|r| seal_recovery_slot(new, key, r).map_err(|e| e.to_string()))
            .transpose()
    }
}

/// HPKE `info` of an HPKE slot of `kind`: its label, then the volume UUID (16 bytes).
fn hpke_info(header: &Header, kind: SlotKind) -> Vec<u8> {
    let label = match kind {
        SlotKind::Transfer => TRANSFER_INFO_LABEL,
        _ => RECOVERY_INFO_LABEL,
    };
    let mut info = label.to_vec();
    info.extend_from_slice(&header.uuid);
    info
}

/// The key check value: `HKDF-SHA256(ikm = volume key, info = "sealcsi/v1/key-check" || UUID)`. It
/// commits to the volume key without revealing anything about it; `recover` compares it.
pub fn key_check(header: &Header, key: &VolumeKey) -> [u8; 32] {
    let hk = Hkdf::<Sha256>::new(None, key.expose());
    let mut info = KEY_CHECK_LABEL.to_vec();
    info.extend_from_slice(&header.uuid);
    let mut out = [0u8; 32];
    hk.expand(&info, &mut out)
        .expect("32 bytes is a valid HKDF output length");
    out
}

pub(super) fn seal_recovery_slot(
    header: &Header,
    key: &VolumeKey,
    recipient: &RecoveryPublicKey,
) -> Result<Keyslot, KeyslotError> {
    seal_hpke_slot(header, key, recipient, SlotKind::Recovery, [0; SALT_LEN])
}

/// The one HPKE wrap of a volume key into a slot of `kind` (recovery or transfer) for `recipient`;
/// `salt` is recorded in the slot's salt field (zero for recovery, the request nonce for transfer).
pub(super) fn seal_hpke_slot(
    header: &Header,
    key: &VolumeKey,
    recipient: &RecoveryPublicKey,
    kind: SlotKind,
    salt: [u8; SALT_LEN],
) -> Result<Keyslot, KeyslotError> {
    debug_assert!(kind.is_hpke());
    let (enc, mut ctx) = hpke::setup_sender::<RecoveryAead, RecoveryKdf, RecoveryKem>(
        &OpModeS::Base,
        &recipient.hpke()?,
        &hpke_info(header, kind),
    )
    .map_err(|e| KeyslotError::Hpke(format!("encapsulation: {e}")))?;
    let mut slot = Keyslot {
        kind,
        created: now_unix(),
        identity_digest: recipient.fingerprint(),
        salt,
        nonce: [0; NONCE_LEN],
        binding: enc.to_bytes().to_vec(),
        wrapped: vec![0; key.len() + WRAP_TAG_LEN],
    };
    slot.wrapped = ctx
        .seal(key.expose(), &header.keyslot_aad(&slot))
        .map_err(|e| KeyslotError::Hpke(format!("seal: {e}")))?;
    Ok(slot)
}

/// The one HPKE unwrap of a recovery or transfer slot (the info follows the slot's kind).
pub(super) fn open_recovery_slot(
    header: &Header,
    slot: &Keyslot,
    private: &RecoveryPrivateKey,
) -> Result<VolumeKey, KeyslotError> {
    let enc = <RecoveryKem as hpke::Kem>::EncappedKey::from_bytes(&slot.binding)
        .map_err(|e| KeyslotError::Hpke(format!("encapsulated key: {e}")))?;
    let mut ctx = hpke::setup_receiver::<RecoveryAead, RecoveryKdf, RecoveryKem>(
        &OpModeR::Base,
        &private.hpke()?,
        &enc,
        &hpke_info(header, slot.kind),
    )
    .map_err(|e| KeyslotError::Hpke(format!("decapsulation: {e}")))?;
    let key = Zeroizing::new(
        ctx.open(&slot.wrapped, &header.keyslot_aad(slot))
            .map_err(|e| KeyslotError::Hpke(format!("open: {e}")))?,
    );
    if key.len() != header.profile.key_len() {
        return Err(KeyslotError::Hpke(
            "the recovered key has the wrong length".into(),
        ));
    }
    Ok(VolumeKey::from_bytes(key))
}

/// What `add-recovery` did.
#[derive(Debug, Clone, Serialize)]
pub struct RecoveryReport {
    pub slot: usize,
    /// False when an escrow slot for this key existed (it is rewritten in place, since its content
    /// cannot be checked without the private key).
    pub created: bool,
    pub volume_uuid: String,
    /// SHA-256 of the recovery public key.
    pub fingerprint: String,
    /// Commitment to the volume key: keep it with the private key; `recover --key-check` needs it.
    pub key_check: String,
}

/// Adds (or rewrites) the escrow slot for `recipient`: the volume key, HPKE-sealed to the operator's
/// X25519 key. This node must unseal the volume first.
pub fn add_recovery(
    volumes: &Volumes,
    device: &Path,
    recipient: &RecoveryPublicKey,
) -> Result<RecoveryReport, KeyslotError> {
    let _lock = lock_device(device)?;
    let active = read_header(device)?;
    let (_, key) = volumes.unseal(&active.header)?;
    let fingerprint = recipient.fingerprint();
    let existing = active
        .header
        .active_slots()
        .find(|(_, s)| s.kind == SlotKind::Recovery && s.identity_digest == fingerprint)
        .map(|(i, _)| i);
    let index = match existing {
        Some(index) => index,
        None => active
            .header
            .keyslots
            .iter()
            .position(Option::is_none)
            .ok_or(KeyslotError::Full)?,
    };
    let mut new = active.header.clone();
    new.keyslots[index] = Some(seal_recovery_slot(&active.header, &key, recipient)?);
    // A rewritten escrow slot replaces the old one in both copies.
    if existing.is_some() {
        commit_everywhere(device, &active, new)?;
    } else {
        commit(device, &active, new)?;
    }
    Ok(RecoveryReport {
        slot: index,
        created: existing.is_none(),
        volume_uuid: active.header.uuid_string(),
        fingerprint: hex::encode(fingerprint),
        key_check: hex::encode(key_check(&active.header, &key)),
    })
}

/// What `recover` did.
#[derive(Debug, Clone, Serialize)]
pub struct RecoverReport {
    /// The escrow slot that was opened.
    pub recovery_slot: usize,
    /// This node's slot (added, or already there).
    pub slot: usize,
    pub created: bool,
    /// Whether the recovered key was checked against the operator's key check value.
    pub key_checked: bool,
    pub key_check: String,
}

/// Opens the escrow slot with the operator's private key and adds a slot for this node (`node`, default
/// binding). Idempotent. With `expected_key_check` (printed by `add-recovery`), a recovery slot forged
/// by someone who knows only the public key is refused; without it, the caller accepts that risk.
pub fn recover(
    node: &dyn SealingSource,
    device: &Path,
    private: &RecoveryPrivateKey,
    expected_key_check: Option<&[u8; 32]>,
) -> Result<RecoverReport, KeyslotError> {
    let _lock = lock_device(device)?;
    let active = read_header(device)?;
    let header = &active.header;
    let fingerprint = private.public()?.fingerprint();
    let candidates: Vec<usize> = header
        .active_slots()
        .filter(|(_, s)| s.kind == SlotKind::Recovery && s.identity_digest == fingerprint)
        .map(|(i, _)| i)
        .collect();
    if candidates.is_empty() {
        return Err(KeyslotError::NoRecoverySlot {
            fingerprint: hex::encode(fingerprint),
        });
    }
    let opened = candidates.iter().find_map(|&i| {
        let slot = header.keyslots[i].as_ref().expect("active slot");
        open_recovery_slot(header, slot, private)
            .ok()
            .map(|key| (i, key))
    });
    let (recovery_slot, key) =
        opened.ok_or_else(|| KeyslotError::RecoveryAuthentication(candidates.clone()))?;
    let check = key_check(header, &key);
    if let Some(expected) = expected_key_check
        && *expected != check
    {
        return Err(KeyslotError::KeyMismatch {
            what: "the key check value recorded when the escrow was made",
        });
    }
    let binding = node.default_binding();
    let secret = node.secret(&binding)?;
    let (slot, new) = ensure_sealed_slot(header, &key, node.kind(), binding, &secret)?;
    let created = new.is_some();
    if let Some(new) = new {
        commit(device, &active, new)?;
    }
    Ok(RecoverReport {
        recovery_slot,
        slot,
        created,
        key_checked: expected_key_check.is_some(),
        key_check: hex::encode(check),
    })
}

/// Parses a key check value (64 hex digits).
pub fn parse_key_check(text: &str) -> Result<[u8; 32], KeyslotError> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut out).map_err(|_| KeyslotError::InvalidTarget {
        text: text.to_owned(),
        reason: "a key check value is 64 hex digits".into(),
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devio;
    use crate::dm::MemoryDm;
    use crate::header::{COPY_OFFSETS, FsKind, HEADER_SIZE, Journal, Profile, volume_binding};
    use crate::sealing::SimSource;

    /// A clone's header-only device, bound to volume `vol-a`: slot 0 sealed to identity A (this node),
    /// slot 1 to identity B, slot 2 the recovery escrow for `recovery`. Returns the device and the key.
    fn clone_of_a(
        dir: &Path,
        recovery: &RecoveryPublicKey,
    ) -> (PathBuf, VolumeKey, SimSource, [u8; 32]) {
        let dev = dir.join("dev");
        fs::write(&dev, vec![0u8; 4 * HEADER_SIZE]).unwrap();
        let profile = Profile::AeadHmacSha256 {
            journal: Journal::Journal,
        };
        let mut header = Header::new([0x42; 16], profile, FsKind::Ext4, 1_700_000_000);
        header.volume_binding = volume_binding("vol-a");
        let key = VolumeKey::generate(profile.key_len()).unwrap();
        let dm = MemoryDm::default();
        let a = SimSource::open(&dir.join("state"), "A").unwrap();
        let b = SimSource::open(&dir.join("state-b"), "B").unwrap();
        header.keyslots[0] = Some(Volumes::new(&dm, &a).seal_keyslot(&header, &key).unwrap());
        header.keyslots[1] = Some(Volumes::new(&dm, &b).seal_keyslot(&header, &key).unwrap());
        header.keyslots[2] = Some(seal_recovery_slot(&header, &key, recovery).unwrap());
        let check = key_check(&header, &key);
        for offset in COPY_OFFSETS {
            devio::write_at(&dev, offset, &header.encode()).unwrap();
        }
        (dev, key, a, check)
    }

    #[test]
    fn a_rebound_clone_keeps_its_recovery_slot_for_a_known_recipient() {
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let (public, private) = recovery_keygen();
        let (dev, key, a, check) = clone_of_a(dir.path(), &public);
        let dm = MemoryDm::default();
        let (from, to) = (volume_binding("vol-a"), volume_binding("vol-b"));
        let recipients = [public];
        let report = Volumes::new(&dm, &a)
            .rebind(&dev, "vol-a", &from, &to, &rewrap_recovery(&recipients))
            .unwrap()
            .expect("re-bound");
        let kept: Vec<(usize, &str, bool)> = report
            .iter()
            .map(|s| (s.slot, s.kind.as_str(), s.kept))
            .collect();
        assert_eq!(
            kept,
            [
                (0, "sealed:sim", true),
                (1, "sealed:sim", false),
                (2, "recovery", true)
            ]
        );
        let header = read_header(&dev).unwrap().header;
        assert_eq!(header.volume_binding, to);
        assert!(header.keyslots[1].is_none());
        // The recovery key opens the re-bound copy, and it is the same volume key.
        let slot = header.keyslots[2].as_ref().unwrap();
        let recovered = open_recovery_slot(&header, slot, &private).unwrap();
        assert_eq!(recovered.expose(), key.expose());
        let c = SimSource::open(&dir.path().join("state-c"), "C").unwrap();
        let r = recover(&c, &dev, &private, Some(&check)).unwrap();
        assert_eq!(r.recovery_slot, 2);
        // This node opens it as well.
        let (index, unsealed) = Volumes::new(&dm, &a).unseal(&header).unwrap();
        assert_eq!((index, unsealed.expose()), (0, key.expose()));
        // Already re-bound: nothing to do.
        assert!(
            Volumes::new(&dm, &a)
                .rebind(&dev, "vol-a", &from, &to, &rewrap_recovery(&recipients))
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn without_its_public_key_the_recovery_slot_is_dropped_not_left_stale() {
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let (public, _private) = recovery_keygen();
        let (other, _) = recovery_keygen();
        let (dev, _key, a, _) = clone_of_a(dir.path(), &public);
        let dm = MemoryDm::default();
        let (from, to) = (volume_binding("vol-a"), volume_binding("vol-b"));
        let report = Volumes::new(&dm, &a)
            .rebind(&dev, "vol-a", &from, &to, &rewrap_recovery(&[other]))
            .unwrap()
            .unwrap();
        assert!(!report[2].kept, "{report:?}");
        let header = read_header(&dev).unwrap().header;
        assert!(header.keyslots[2].is_none());
        assert!(header.keyslots[0].is_some());
    }

    #[test]
    fn public_keys_are_read_from_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        assert!(
            read_public_keys_in(&dir.path().join("none"))
                .unwrap()
                .is_empty()
        );
        write_recovery_keys(&dir.path().join("op.key"), &dir.path().join("op.pub")).unwrap();
        fs::write(dir.path().join("README"), "not a key").unwrap();
        assert_eq!(read_public_keys_in(dir.path()).unwrap().len(), 1);
        fs::write(dir.path().join("bad.pub"), "not a key").unwrap();
        assert!(read_public_keys_in(dir.path()).is_err());
    }
}
