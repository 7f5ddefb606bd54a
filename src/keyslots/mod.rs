//! Keyslot lifecycle on a volume's header: list, add, remove, recovery escrow, recover, crypto-erase.
//!
//! Rules every operation keeps (docs/keys.md, "Keyslot lifecycle"):
//! - It never touches the data area and never changes the volume key: a slot is one more (or one fewer)
//!   wrapping of the same key.
//! - Before changing anything it proves it may: it unseals the volume key with a slot this node opens
//!   (`recover` proves it with the operator's escrow key instead). `erase` needs no key.
//! - Each change is one atomic header update ([`crate::volume::commit`]: the new header, with the next
//!   sequence number, over the copy that does not win, flushed). A crash leaves the old or the new set of
//!   slots, never neither. Removals and erase then write the same slot set over the other copy too, so
//!   neither copy keeps the removed wrapping (that second write is itself an ordinary update).
//! - Operations on one device are serialised by an exclusive `flock` on it.

mod erase;
mod list;
mod recovery;
mod target;
pub mod transfer;

use std::path::Path;

use serde::Serialize;

use crate::error::{Classify, Kind};
use crate::header::{Header, KEYSLOTS, MAX_BINDING_LEN, SlotKind, SourceKind};
use crate::keys::{KeyError, SealingSecret, VolumeKey};
use crate::sealing::{SealError, SealingSource};
use crate::volume::header_io::lock_device;
use crate::volume::seal::{seal_slot, unwrap_slot};
use crate::volume::{VolumeError, Volumes, commit, commit_everywhere, read_header};
pub use erase::{EraseReport, erase};
pub use list::{BindingInfo, SlotInfo, list, this_node_slot};
pub use recovery::{
    KeygenReport, RECOVERY_KEY_LEN, RecoverReport, RecoveryPrivateKey, RecoveryPublicKey,
    RecoveryReport, add_recovery, key_check, parse_key_check, read_private_key, read_public_key,
    read_public_keys_in, recover, recovery_keygen, rewrap_recovery, write_recovery_keys,
};
pub use target::{Target, TargetEnv, TargetSource, add_slot_for, open_target};

#[derive(Debug, thiserror::Error)]
pub enum KeyslotError {
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error(transparent)]
    Seal(#[from] SealError),
    #[error(transparent)]
    Key(#[from] KeyError),
    /// A `--for` target that does not parse.
    #[error("invalid keyslot target {text:?}: {reason}")]
    InvalidTarget { text: String, reason: String },
    /// A target this build cannot seal to.
    #[error("keyslot target {target} is not available: {reason}")]
    TargetUnavailable { target: String, reason: String },
    /// Every keyslot is in use.
    #[error("all {KEYSLOTS} keyslots are in use: remove one first")]
    Full,
    /// The slot index names no active keyslot.
    #[error("keyslot {0} does not exist (slots are 0..=7; see `sealcsi volume slots`)")]
    NoSuchSlot(usize),
    /// Removing the slot would lock this node (or everyone) out.
    #[error("refusing to remove keyslot {index}: {reason}; pass --force to remove it anyway")]
    LastSlot { index: usize, reason: &'static str },
    /// A destructive operation was not confirmed.
    #[error("{0}")]
    NotConfirmed(String),
    /// A slot claims an identity but does not authenticate under it.
    #[error(
        "keyslot {0} claims this identity but fails authentication (the header was altered); \
         remove it before adding a slot for this identity"
    )]
    AlteredSlot(usize),
    /// A recovery key file is missing, malformed or too widely readable.
    #[error("recovery key file {path}: {reason}")]
    RecoveryKeyFile { path: String, reason: String },
    /// No escrow slot is addressed to this recovery key.
    #[error(
        "no recovery slot of this volume is for this recovery key (key fingerprint {fingerprint})"
    )]
    NoRecoverySlot { fingerprint: String },
    /// Escrow slots addressed to this key do not decrypt.
    #[error(
        "recovery slot(s) {0:?} for this key fail to decrypt: the header was altered; refusing"
    )]
    RecoveryAuthentication(Vec<usize>),
    /// The recovered key is not the key the operator escrowed.
    #[error(
        "the key in the recovery slot does not match {what}: the slot was replaced by someone who \
         knows only the public recovery key (or the wrong volume was given); refusing to use it"
    )]
    KeyMismatch { what: &'static str },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("HPKE {0}")]
    Hpke(String),
}

impl Classify for KeyslotError {
    fn kind(&self) -> Kind {
        match self {
            KeyslotError::Volume(e) => e.kind(),
            KeyslotError::InvalidTarget { .. }
            | KeyslotError::TargetUnavailable { .. }
            | KeyslotError::NoSuchSlot(_)
            | KeyslotError::RecoveryKeyFile { .. } => Kind::InvalidArgument,
            KeyslotError::Full | KeyslotError::LastSlot { .. } | KeyslotError::NotConfirmed(_) => {
                Kind::Refused
            }
            KeyslotError::NoRecoverySlot { .. } => Kind::WrongIdentity,
            KeyslotError::AlteredSlot(_)
            | KeyslotError::RecoveryAuthentication(_)
            | KeyslotError::KeyMismatch { .. } => Kind::InvalidHeader,
            KeyslotError::Seal(_)
            | KeyslotError::Key(_)
            | KeyslotError::Io { .. }
            | KeyslotError::Hpke(_) => Kind::Internal,
        }
    }
}

/// What an operation did: the slot it concerns, and whether the header changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SlotChange {
    pub slot: usize,
    /// False when the slot already existed (an idempotent repeat).
    pub changed: bool,
}

/// Puts a slot for (`source`, `binding`) holding `key` into `header`, or finds the one already there.
fn ensure_sealed_slot(
    header: &Header,
    key: &VolumeKey,
    source: SourceKind,
    binding: Vec<u8>,
    secret: &SealingSecret,
) -> Result<(usize, Option<Header>), KeyslotError> {
    if binding.len() > MAX_BINDING_LEN {
        return Err(KeyslotError::InvalidTarget {
            text: hex::encode(&binding),
            reason: format!("binding longer than {MAX_BINDING_LEN} bytes"),
        });
    }
    let digest = secret.digest();
    let kind = SlotKind::Sealed(source);
    for (index, slot) in header.active_slots() {
        if slot.kind == kind && slot.identity_digest == digest && slot.binding == binding {
            return match unwrap_slot(header, slot, secret) {
                Ok(existing) if existing.expose() == key.expose() => Ok((index, None)),
                Ok(_) => Err(KeyslotError::KeyMismatch {
                    what: "the key of this identity's existing keyslot",
                }),
                Err(_) => Err(KeyslotError::AlteredSlot(index)),
            };
        }
    }
    let index = header
        .keyslots
        .iter()
        .position(Option::is_none)
        .ok_or(KeyslotError::Full)?;
    let mut new = header.clone();
    new.keyslots[index] = Some(seal_slot(header, key, source, binding, secret)?);
    Ok((index, Some(new)))
}

/// Adds a keyslot for `target` (with `binding`, or the target's default binding) holding this volume's
/// key. This node must unseal the volume first. Idempotent: a slot with the same source, identity
/// digest and binding is returned as it is.
pub fn add_slot(
    volumes: &Volumes,
    device: &Path,
    target: &dyn SealingSource,
    binding: Option<&[u8]>,
) -> Result<SlotChange, KeyslotError> {
    let binding = binding.map_or_else(|| target.default_binding(), <[u8]>::to_vec);
    let secret = target.secret(&binding)?;
    add_sealed(volumes, device, target.kind(), binding, &secret)
}

/// [`add_slot`] for a secret obtained another way: e.g. a TPM secret sealed to expected (future) PCR
/// values, which no source can produce until the node boots the new image.
pub fn add_sealed(
    volumes: &Volumes,
    device: &Path,
    kind: SourceKind,
    binding: Vec<u8>,
    secret: &SealingSecret,
) -> Result<SlotChange, KeyslotError> {
    let _lock = lock_device(device)?;
    let active = read_header(device)?;
    let (_, key) = volumes.unseal(&active.header)?;
    let (slot, new) = ensure_sealed_slot(&active.header, &key, kind, binding, secret)?;
    let changed = new.is_some();
    if let Some(new) = new {
        commit(device, &active, new)?;
        tracing::info!(device = %device.display(), keyslot = slot, source = ?kind, "added a keyslot");
    }
    Ok(SlotChange { slot, changed })
}

/// Removes keyslot `index`. This node must unseal the volume first. Without `force` it refuses to
/// remove the volume's last keyslot, or the last slot this node opens.
pub fn remove_slot(
    volumes: &Volumes,
    device: &Path,
    index: usize,
    force: bool,
) -> Result<SlotChange, KeyslotError> {
    let _lock = lock_device(device)?;
    let active = read_header(device)?;
    if index >= KEYSLOTS || active.header.keyslots[index].is_none() {
        return Err(KeyslotError::NoSuchSlot(index));
    }
    volumes.unseal(&active.header)?;
    let mut new = active.header.clone();
    new.keyslots[index] = None;
    if !force {
        if new.active_slots().next().is_none() {
            return Err(KeyslotError::LastSlot {
                index,
                reason: "it is the volume's last keyslot, so nobody could open the data afterwards \
                         (to destroy a volume on purpose, use erase)",
            });
        }
        match volumes.unseal(&new) {
            Ok(_) => {}
            Err(VolumeError::WrongIdentity { .. } | VolumeError::NoKeyslots) => {
                return Err(KeyslotError::LastSlot {
                    index,
                    reason: "it is the last keyslot this node opens, so this node would lose access",
                });
            }
            Err(e) => return Err(e.into()),
        }
    }
    commit_everywhere(device, &active, new)?;
    tracing::info!(device = %device.display(), keyslot = index, "removed a keyslot");
    Ok(SlotChange {
        slot: index,
        changed: true,
    })
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;

    use super::list::decode_binding;
    use super::recovery::{open_recovery_slot, seal_recovery_slot};
    use super::*;
    use crate::devio;
    use crate::dm::MemoryDm;
    use crate::header::{self, COPY_OFFSETS, HEADER_SIZE, Keyslot};
    use crate::header::{FsKind, Journal, Profile};
    use crate::keys::WRAP_TAG_LEN;
    use crate::sealing::SimSource;
    use crate::sealing::snp::{FakeSnpDevice, SnpPolicy, SnpSource};

    const SECTOR: usize = 512;

    /// A header-only "device" (a plain file on the repository's disk filesystem, for O_DIRECT), a
    /// simulated-TEE state dir, and the volume key, formatted as identity "A".
    struct Fixture {
        _dir: tempfile::TempDir,
        dev: PathBuf,
        state: PathBuf,
        key: VolumeKey,
        dm: MemoryDm,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
            let dev = dir.path().join("dev");
            let state = dir.path().join("state");
            fs::write(&dev, vec![0u8; 4 * HEADER_SIZE]).unwrap();
            let profile = Profile::AeadHmacSha256 {
                journal: Journal::Journal,
            };
            let mut header = Header::new([0x42; 16], profile, FsKind::Ext4, 1_700_000_000);
            let key = VolumeKey::generate(profile.key_len()).unwrap();
            let dm = MemoryDm::default();
            let a = SimSource::open(&state, "A").unwrap();
            header.keyslots[0] = Some(Volumes::new(&dm, &a).seal_keyslot(&header, &key).unwrap());
            for offset in COPY_OFFSETS {
                devio::write_at(&dev, offset, &header.encode()).unwrap();
            }
            Fixture {
                _dir: dir,
                dev,
                state,
                key,
                dm,
            }
        }

        fn sim(&self, identity: &str) -> SimSource {
            SimSource::open(&self.state, identity).unwrap()
        }

        fn volumes<'a>(&'a self, source: &'a dyn SealingSource) -> Volumes<'a> {
            Volumes::new(&self.dm, source)
        }

        fn header(&self) -> Header {
            read_header(&self.dev).unwrap().header
        }

        fn region(&self) -> Vec<u8> {
            devio::read_at(&self.dev, 0, 2 * HEADER_SIZE)
                .unwrap()
                .to_vec()
        }

        fn write_region(&self, region: &[u8]) {
            devio::write_at(&self.dev, 0, region).unwrap();
        }

        /// Replaces the winning header as a hostile host would (valid checksum, no keys).
        fn host_writes(&self, header: &Header) {
            let mut h = header.clone();
            h.seqno += 1;
            for offset in COPY_OFFSETS {
                devio::write_at(&self.dev, offset, &h.encode()).unwrap();
            }
        }

        /// The key `source` unseals from the current header, if any.
        fn unseal_as(&self, source: &dyn SealingSource) -> Result<(usize, VolumeKey), VolumeError> {
            self.volumes(source).unseal(&self.header())
        }

        #[track_caller]
        fn assert_opens(&self, source: &dyn SealingSource) -> usize {
            let (slot, key) = self.unseal_as(source).unwrap();
            assert_eq!(key.expose(), self.key.expose());
            slot
        }
    }

    fn slot_set(header: &Header) -> Vec<(usize, Keyslot)> {
        header.active_slots().map(|(i, s)| (i, s.clone())).collect()
    }

    #[test]
    fn add_slot_seals_the_same_key_for_another_identity_idempotently() {
        let fx = Fixture::new();
        let (a, b) = (fx.sim("A"), fx.sim("B"));
        assert!(matches!(
            fx.unseal_as(&b),
            Err(VolumeError::WrongIdentity { .. })
        ));
        let seqno = fx.header().seqno;
        let added = add_slot(&fx.volumes(&a), &fx.dev, &b, None).unwrap();
        assert_eq!(
            added,
            SlotChange {
                slot: 1,
                changed: true
            }
        );
        assert_eq!(fx.assert_opens(&b), 1);
        assert_eq!(fx.assert_opens(&a), 0);
        assert_eq!(fx.header().seqno, seqno + 1, "one header write");
        // Again, from either node: the existing slot, no write.
        for node in [&a, &b] {
            let again = add_slot(&fx.volumes(node), &fx.dev, &b, None).unwrap();
            assert_eq!(
                again,
                SlotChange {
                    slot: 1,
                    changed: false
                }
            );
        }
        assert_eq!(fx.header().seqno, seqno + 1);
        // A node that cannot unseal cannot add anything.
        let c = fx.sim("C");
        let err = add_slot(&fx.volumes(&c), &fx.dev, &c, None).unwrap_err();
        assert_eq!(err.kind(), Kind::WrongIdentity, "{err}");
        assert_eq!(fx.header().seqno, seqno + 1);
    }

    #[test]
    fn add_slot_refuses_a_full_header_but_stays_idempotent() {
        let fx = Fixture::new();
        let a = fx.sim("A");
        for i in 1..KEYSLOTS {
            let t = fx.sim(&format!("n{i}"));
            assert_eq!(
                add_slot(&fx.volumes(&a), &fx.dev, &t, None).unwrap().slot,
                i
            );
        }
        let extra = fx.sim("extra");
        let err = add_slot(&fx.volumes(&a), &fx.dev, &extra, None).unwrap_err();
        assert!(matches!(err, KeyslotError::Full), "{err}");
        assert_eq!(err.kind(), Kind::Refused);
        let n3 = fx.sim("n3");
        assert_eq!(
            add_slot(&fx.volumes(&a), &fx.dev, &n3, None).unwrap(),
            SlotChange {
                slot: 3,
                changed: false
            }
        );
        assert!(matches!(
            add_slot(&fx.volumes(&a), &fx.dev, &a, Some(&[0u8; 200])).unwrap_err(),
            KeyslotError::InvalidTarget { .. } | KeyslotError::Seal(_)
        ));
    }

    #[test]
    fn remove_slot_refusals_and_force() {
        let fx = Fixture::new();
        let (a, b) = (fx.sim("A"), fx.sim("B"));
        let err = remove_slot(&fx.volumes(&a), &fx.dev, 3, false).unwrap_err();
        assert!(matches!(err, KeyslotError::NoSuchSlot(3)), "{err}");
        assert!(matches!(
            remove_slot(&fx.volumes(&a), &fx.dev, 8, true).unwrap_err(),
            KeyslotError::NoSuchSlot(8)
        ));
        // The volume's only slot.
        let err = remove_slot(&fx.volumes(&a), &fx.dev, 0, false).unwrap_err();
        assert!(
            matches!(err, KeyslotError::LastSlot { index: 0, .. }),
            "{err}"
        );
        assert_eq!(err.kind(), Kind::Refused);
        add_slot(&fx.volumes(&a), &fx.dev, &b, None).unwrap();
        // A's last slot, while B still has one: A would lock itself out.
        let err = remove_slot(&fx.volumes(&a), &fx.dev, 0, false).unwrap_err();
        assert!(
            matches!(err, KeyslotError::LastSlot { index: 0, .. }),
            "{err}"
        );
        // B removes A's slot: fine, B keeps its own.
        assert_eq!(
            remove_slot(&fx.volumes(&b), &fx.dev, 0, false).unwrap(),
            SlotChange {
                slot: 0,
                changed: true
            }
        );
        assert!(matches!(
            fx.unseal_as(&a),
            Err(VolumeError::WrongIdentity { .. })
        ));
        fx.assert_opens(&b);
        // Removed means gone: a second remove is refused, and A cannot remove anything any more.
        assert!(matches!(
            remove_slot(&fx.volumes(&b), &fx.dev, 0, false).unwrap_err(),
            KeyslotError::NoSuchSlot(0)
        ));
        assert_eq!(
            remove_slot(&fx.volumes(&a), &fx.dev, 1, true)
                .unwrap_err()
                .kind(),
            Kind::WrongIdentity
        );
        // With force, B may remove the last slot of all.
        remove_slot(&fx.volumes(&b), &fx.dev, 1, true).unwrap();
        assert!(matches!(fx.unseal_as(&b), Err(VolumeError::NoKeyslots)));
    }

    #[test]
    fn removed_slots_are_gone_from_both_copies() {
        let fx = Fixture::new();
        let (a, b) = (fx.sim("A"), fx.sim("B"));
        add_slot(&fx.volumes(&a), &fx.dev, &b, None).unwrap();
        let wrapped = fx.header().keyslots[0].clone().unwrap().wrapped;
        remove_slot(&fx.volumes(&b), &fx.dev, 0, false).unwrap();
        let region = fx.region();
        assert!(
            !region
                .windows(wrapped.len())
                .any(|w| w == wrapped.as_slice()),
            "a header copy still holds the removed slot's wrapped key"
        );
        for copy in region.chunks(HEADER_SIZE) {
            let h = Header::decode(copy).unwrap();
            assert!(h.keyslots[0].is_none() && h.keyslots[1].is_some());
        }
    }

    #[test]
    fn tpm_bindings_are_decoded_for_operators() {
        use crate::sealing::tpm::{PcrBank, PcrSelection, TpmBinding};
        let binding = TpmBinding {
            selection: PcrSelection::new(PcrBank::Sha256, &[0, 7]).unwrap(),
            policy_digest: [0xAB; 32],
            blob_id: [1; 8],
        };
        let slot = Keyslot {
            kind: SlotKind::Sealed(SourceKind::Tpm),
            created: 0,
            identity_digest: [0; 32],
            salt: [0; 32],
            nonce: [0; 12],
            binding: binding.encode(),
            wrapped: vec![0; 112],
        };
        let json = serde_json::to_value(decode_binding(&slot)).unwrap();
        assert_eq!(json["type"], "tpm");
        assert_eq!(json["pcrs"], binding.selection.to_string());
        assert_eq!(json["policy_digest"], "ab".repeat(32));
        let mut broken = slot.clone();
        broken.binding.truncate(5);
        assert_eq!(
            serde_json::to_value(decode_binding(&broken)).unwrap()["type"],
            "invalid"
        );
    }

    #[test]
    fn list_decodes_bindings() {
        let fx = Fixture::new();
        let a = fx.sim("A");
        let snp = SnpSource::with_device(
            SnpPolicy::StrictTcb,
            Box::new(FakeSnpDevice {
                launch: b"image-1".to_vec(),
                committed_tcb: 4,
                ..Default::default()
            }),
        )
        .unwrap();
        add_slot(&fx.volumes(&a), &fx.dev, &snp, None).unwrap();
        let (public, _) = recovery_keygen();
        add_recovery(&fx.volumes(&a), &fx.dev, &public).unwrap();
        let slots = list(&fx.dev).unwrap();
        let json = serde_json::to_value(&slots).unwrap();
        assert_eq!(json[0]["kind"], "sealed");
        assert_eq!(json[0]["source"], "sim");
        assert_eq!(json[0]["decoded"]["type"], "sim");
        assert_eq!(
            json[0]["identity_digest"],
            hex::encode(a.secret(&[]).unwrap().digest())
        );
        assert_eq!(json[1]["source"], "snp");
        assert_eq!(json[1]["decoded"]["type"], "snp");
        assert_eq!(json[1]["decoded"]["policy"], "strict+tcb");
        assert_eq!(json[1]["decoded"]["guest_field_select"], "0x29");
        assert_eq!(json[1]["decoded"]["tcb_version"], 4);
        assert_eq!(json[2]["kind"], "recovery");
        assert_eq!(json[2]["source"], serde_json::Value::Null);
        assert_eq!(
            json[2]["identity_digest"],
            hex::encode(public.fingerprint())
        );
        assert_eq!(
            json[2]["decoded"]["encapsulated_key"]
                .as_str()
                .unwrap()
                .len(),
            64
        );
        assert_eq!(this_node_slot(&fx.volumes(&a), &fx.dev).unwrap(), Some(0));
        assert_eq!(this_node_slot(&fx.volumes(&snp), &fx.dev).unwrap(), Some(1));
        assert_eq!(
            this_node_slot(&fx.volumes(&fx.sim("Z")), &fx.dev).unwrap(),
            None
        );
    }

    #[test]
    fn snp_slots_open_on_the_same_launch_only() {
        let fx = Fixture::new();
        let a = fx.sim("A");
        let snp = |launch: &[u8], policy| {
            SnpSource::with_device(
                policy,
                Box::new(FakeSnpDevice {
                    launch: launch.to_vec(),
                    ..Default::default()
                }),
            )
            .unwrap()
        };
        let strict = snp(b"image-1", SnpPolicy::Strict);
        add_slot(&fx.volumes(&a), &fx.dev, &strict, None).unwrap();
        fx.assert_opens(&strict);
        // The same node with the other default policy still opens the strict slot.
        fx.assert_opens(&snp(b"image-1", SnpPolicy::StrictTcb));
        assert!(fx.unseal_as(&snp(b"image-2", SnpPolicy::Strict)).is_err());
    }

    #[test]
    fn recovery_escrow_round_trip() {
        let fx = Fixture::new();
        let (a, c) = (fx.sim("A"), fx.sim("C"));
        let (public, private) = recovery_keygen();
        let report = add_recovery(&fx.volumes(&a), &fx.dev, &public).unwrap();
        assert_eq!((report.slot, report.created), (1, true));
        assert_eq!(report.volume_uuid, fx.header().uuid_string());
        // Again: same slot, rewritten (its content cannot be checked without the private key).
        let again = add_recovery(&fx.volumes(&a), &fx.dev, &public).unwrap();
        assert_eq!((again.slot, again.created), (1, false));
        assert_eq!(again.key_check, report.key_check);
        // Nodes never unseal an escrow slot.
        remove_slot(&fx.volumes(&a), &fx.dev, 0, true).unwrap();
        assert!(matches!(
            fx.unseal_as(&a),
            Err(VolumeError::WrongIdentity { slots: 1, .. })
        ));
        let check = parse_key_check(&report.key_check).unwrap();
        let recovered = recover(&c, &fx.dev, &private, Some(&check)).unwrap();
        assert_eq!(
            (recovered.recovery_slot, recovered.slot, recovered.created),
            (1, 0, true)
        );
        assert!(recovered.key_checked);
        fx.assert_opens(&c);
        // Idempotent.
        let seqno = fx.header().seqno;
        let again = recover(&c, &fx.dev, &private, Some(&check)).unwrap();
        assert_eq!((again.slot, again.created), (0, false));
        assert_eq!(fx.header().seqno, seqno);
        // Another recovery key finds no slot; a wrong key check is refused before anything is written.
        let (_, other) = recovery_keygen();
        let err = recover(&c, &fx.dev, &other, None).unwrap_err();
        assert!(matches!(err, KeyslotError::NoRecoverySlot { .. }), "{err}");
        assert_eq!(err.kind(), Kind::WrongIdentity);
        let d = fx.sim("D");
        let err = recover(&d, &fx.dev, &private, Some(&[0; 32])).unwrap_err();
        assert!(matches!(err, KeyslotError::KeyMismatch { .. }), "{err}");
        assert_eq!(fx.header().seqno, seqno);
    }

    #[test]
    fn a_forged_or_altered_escrow_slot_is_refused() {
        let fx = Fixture::new();
        let a = fx.sim("A");
        let (public, private) = recovery_keygen();
        let report = add_recovery(&fx.volumes(&a), &fx.dev, &public).unwrap();
        let check = parse_key_check(&report.key_check).unwrap();
        let c = fx.sim("C");

        // Altered metadata (authenticated as HPKE aad): refused as tampering.
        let mut h = fx.header();
        h.keyslots[1].as_mut().unwrap().created += 1;
        fx.host_writes(&h);
        let err = recover(&c, &fx.dev, &private, Some(&check)).unwrap_err();
        assert!(
            matches!(err, KeyslotError::RecoveryAuthentication(ref s) if s == &[1]),
            "{err}"
        );
        assert_eq!(err.kind(), Kind::InvalidHeader);

        // Replaced by the host: the public key is public, so anyone can seal a key of their choosing to
        // it. The key check catches it; nothing is written.
        let mut h = fx.header();
        let host_key = VolumeKey::generate(96).unwrap();
        h.keyslots[1] = Some(seal_recovery_slot(&h, &host_key, &public).unwrap());
        fx.host_writes(&h);
        let seqno = fx.header().seqno;
        let err = recover(&c, &fx.dev, &private, Some(&check)).unwrap_err();
        assert!(matches!(err, KeyslotError::KeyMismatch { .. }), "{err}");
        assert_eq!(fx.header().seqno, seqno);
        assert!(fx.unseal_as(&c).is_err());

        // A recovery slot moved to another volume (other UUID) does not open: info and aad bind it.
        let fx2 = Fixture::new();
        let mut other = fx2.header();
        other.uuid = [0x43; 16];
        let mut moved = fx.header().keyslots[1].clone().unwrap();
        moved.created = 0;
        other.keyslots[1] = Some(moved);
        assert!(open_recovery_slot(&other, other.keyslots[1].as_ref().unwrap(), &private).is_err());
    }

    #[test]
    fn recover_refuses_when_this_nodes_slot_holds_another_key() {
        let fx = Fixture::new();
        let a = fx.sim("A");
        let (public, private) = recovery_keygen();
        let mut h = fx.header();
        let host_key = VolumeKey::generate(96).unwrap();
        h.keyslots[1] = Some(seal_recovery_slot(&h, &host_key, &public).unwrap());
        fx.host_writes(&h);
        // Unverified recover as A: the escrow key differs from the key in A's own slot.
        let err = recover(&a, &fx.dev, &private, None).unwrap_err();
        assert!(matches!(err, KeyslotError::KeyMismatch { .. }), "{err}");
    }

    #[test]
    fn erase_leaves_no_wrapped_key_in_either_copy() {
        let fx = Fixture::new();
        let (a, b) = (fx.sim("A"), fx.sim("B"));
        add_slot(&fx.volumes(&a), &fx.dev, &b, None).unwrap();
        let (public, _) = recovery_keygen();
        add_recovery(&fx.volumes(&a), &fx.dev, &public).unwrap();
        let wrapped: Vec<Vec<u8>> = fx
            .header()
            .active_slots()
            .map(|(_, s)| s.wrapped.clone())
            .collect();
        let report = erase(&fx.dev).unwrap();
        assert_eq!(report.slots_destroyed, 3);
        let region = fx.region();
        for w in &wrapped {
            assert!(!region.windows(w.len()).any(|x| x == w.as_slice()));
        }
        for copy in region.chunks(HEADER_SIZE) {
            assert!(copy[128..128 + 8 * 384].iter().all(|&b| b == 0));
            assert!(
                Header::decode(copy)
                    .unwrap()
                    .active_slots()
                    .next()
                    .is_none()
            );
        }
        for node in [&a, &b] {
            assert!(matches!(fx.unseal_as(node), Err(VolumeError::NoKeyslots)));
        }
        // Erase again is harmless.
        assert_eq!(erase(&fx.dev).unwrap().slots_destroyed, 0);
    }

    #[test]
    fn erase_zeroes_a_damaged_header_and_refuses_foreign_devices() {
        let fx = Fixture::new();
        let mut region = fx.region();
        region[100] ^= 1;
        region[HEADER_SIZE + 100] ^= 1;
        fx.write_region(&region);
        let report = erase(&fx.dev).unwrap();
        assert!(report.zeroed_damaged_header);
        assert!(fx.region().iter().all(|&b| b == 0));
        let err = erase(&fx.dev).unwrap_err();
        assert_eq!(err.kind(), Kind::InvalidHeader, "{err}");
    }

    /// Every mix of old and new 512-byte sectors of `copy` (the one being written), the rest as `base`.
    fn torn_variants(base: &[u8], new: &[u8], copy: usize) -> Vec<(u32, Vec<u8>)> {
        let sectors = HEADER_SIZE / SECTOR;
        (0..1u32 << sectors)
            .map(|mask| {
                let mut region = base.to_vec();
                for s in 0..sectors {
                    if mask & (1 << s) != 0 {
                        let at = copy * HEADER_SIZE + s * SECTOR;
                        region[at..at + SECTOR].copy_from_slice(&new[at..at + SECTOR]);
                    }
                }
                (mask, region)
            })
            .collect()
    }

    fn changed_copy(before: &[u8], after: &[u8]) -> Vec<usize> {
        (0..2)
            .filter(|c| {
                before[c * HEADER_SIZE..(c + 1) * HEADER_SIZE]
                    != after[c * HEADER_SIZE..(c + 1) * HEADER_SIZE]
            })
            .collect()
    }

    /// Checks every torn state between `before` and `after` (one copy rewritten): the winner holds the
    /// old or the new slot set, never anything else, and the full write gives the new set.
    fn check_torn(fx: &Fixture, before: &[u8], after: &[u8], nodes: &[(&str, bool, bool)]) {
        let copies = changed_copy(before, after);
        assert_eq!(copies.len(), 1, "one copy per write");
        let old = header::select(before).unwrap().header;
        let new = header::select(after).unwrap().header;
        for (mask, region) in torn_variants(before, after, copies[0]) {
            let got = header::select(&region).unwrap().header;
            let is_new = slot_set(&got) == slot_set(&new);
            assert!(
                is_new || slot_set(&got) == slot_set(&old),
                "torn write {mask:#010b}: a slot set that is neither old nor new"
            );
            if mask == 0xff {
                assert!(is_new, "the full write gives the new slot set");
            }
            for &(identity, in_old, in_new) in nodes {
                let source = fx.sim(identity);
                let opens = fx.volumes(&source).unseal(&got).is_ok();
                assert_eq!(
                    opens,
                    if is_new { in_new } else { in_old },
                    "torn write {mask:#010b}: {identity}"
                );
            }
        }
    }

    #[test]
    fn a_torn_header_write_leaves_the_old_or_the_new_slot_set() {
        let fx = Fixture::new();
        let (a, b) = (fx.sim("A"), fx.sim("B"));
        // add-slot: one write.
        let before = fx.region();
        add_slot(&fx.volumes(&a), &fx.dev, &b, None).unwrap();
        let after = fx.region();
        check_torn(
            &fx,
            &before,
            &after,
            &[("A", true, true), ("B", false, true)],
        );

        // remove-slot: two writes (the new set, then the same set over the other copy).
        let before = fx.region();
        let (old_header, old_copy) = {
            let active = header::select(&before).unwrap();
            (active.header, active.copy)
        };
        remove_slot(&fx.volumes(&b), &fx.dev, 0, false).unwrap();
        let after = fx.region();
        // Reconstruct the state after the first write: the new set in the copy that did not win.
        let mut first = before.clone();
        let inactive = 1 - old_copy;
        let mut new = old_header.clone();
        new.keyslots[0] = None;
        new.seqno = old_header.seqno + 1;
        first[inactive * HEADER_SIZE..(inactive + 1) * HEADER_SIZE].copy_from_slice(&new.encode());
        assert_eq!(
            first[inactive * HEADER_SIZE..(inactive + 1) * HEADER_SIZE],
            after[inactive * HEADER_SIZE..(inactive + 1) * HEADER_SIZE],
            "the first write is the new set over the inactive copy"
        );
        check_torn(
            &fx,
            &before,
            &first,
            &[("A", true, false), ("B", true, true)],
        );
        check_torn(
            &fx,
            &first,
            &after,
            &[("A", false, false), ("B", true, true)],
        );
    }

    #[test]
    fn host_crafted_slots_never_give_a_weaker_mapping() {
        let fx = Fixture::new();
        let (a, b) = (fx.sim("A"), fx.sim("B"));
        let original = fx.header();

        // A slot added by the host, claiming B's (public) digest, with a key of its own: B refuses it as
        // tampering, A ignores it, add-slot for B refuses to treat it as B's slot.
        let mut h = original.clone();
        let mut forged = h.keyslots[0].clone().unwrap();
        forged.identity_digest = b.secret(&[]).unwrap().digest();
        forged.wrapped[0] ^= 1;
        h.keyslots[4] = Some(forged);
        fx.host_writes(&h);
        assert!(matches!(
            fx.unseal_as(&b),
            Err(VolumeError::HeaderAuthentication { ref slots }) if slots == &[4]
        ));
        assert_eq!(fx.assert_opens(&a), 0);
        let err = add_slot(&fx.volumes(&a), &fx.dev, &b, None).unwrap_err();
        assert!(matches!(err, KeyslotError::AlteredSlot(4)), "{err}");

        // A slot with an unknown digest: ignored.
        let mut h = original.clone();
        let mut stranger = h.keyslots[0].clone().unwrap();
        stranger.identity_digest = [0x77; 32];
        h.keyslots[6] = Some(stranger);
        fx.host_writes(&h);
        assert_eq!(fx.assert_opens(&a), 0);
        assert!(matches!(
            fx.unseal_as(&b),
            Err(VolumeError::WrongIdentity { slots: 2, .. })
        ));

        // A's slot altered (binding, kind, the profile it covers): A refuses, and so does every
        // keyslot operation (they unseal first), so nothing is written.
        let mut alterations = Vec::new();
        let mut h = original.clone();
        h.keyslots[0].as_mut().unwrap().created ^= 1;
        alterations.push(h);
        let mut h = original.clone();
        h.profile = Profile::AeadHmacSha256 {
            journal: Journal::Direct,
        };
        alterations.push(h);
        let mut h = original.clone();
        h.profile = Profile::XtsOnly;
        h.keyslots[0]
            .as_mut()
            .unwrap()
            .wrapped
            .truncate(64 + WRAP_TAG_LEN);
        alterations.push(h);
        for altered in alterations {
            fx.host_writes(&altered);
            let seqno = fx.header().seqno;
            assert!(matches!(
                fx.unseal_as(&a),
                Err(VolumeError::HeaderAuthentication { .. })
            ));
            let (public, _) = recovery_keygen();
            for err in [
                add_slot(&fx.volumes(&a), &fx.dev, &b, None).unwrap_err(),
                remove_slot(&fx.volumes(&a), &fx.dev, 0, true).unwrap_err(),
                add_recovery(&fx.volumes(&a), &fx.dev, &public).unwrap_err(),
            ] {
                assert_eq!(err.kind(), Kind::InvalidHeader, "{err}");
            }
            assert_eq!(fx.header().seqno, seqno, "nothing written");
        }

        // A's slot removed by the host: A cannot open (a wrong identity, not a weaker volume).
        let mut h = original.clone();
        h.keyslots[0] = None;
        fx.host_writes(&h);
        assert!(matches!(fx.unseal_as(&a), Err(VolumeError::NoKeyslots)));
    }

    #[test]
    fn targets_parse_and_print() {
        let sha256 = "ab".repeat(32);
        for (text, expected) in [
            ("current", Target::Current),
            ("sim:img-2", Target::Sim("img-2".into())),
            ("sim:a:b", Target::Sim("a:b".into())),
            ("snp:strict", Target::Snp(SnpPolicy::Strict)),
            ("snp:strict+tcb", Target::Snp(SnpPolicy::StrictTcb)),
        ] {
            let parsed = Target::parse(text).unwrap();
            assert_eq!(parsed, expected, "{text}");
            assert_eq!(parsed.to_string(), text);
        }
        for removed in ["snp:upgradable", "snp:upgradable:svn=3"] {
            let err = Target::parse(removed).unwrap_err();
            assert!(err.to_string().contains("removed"), "{err}");
        }
        let text = format!("tpm-pcrs:sha256:7={sha256},0={sha256}");
        let parsed = Target::parse(&text).unwrap();
        assert_eq!(
            parsed,
            Target::TpmPcrs(format!("sha256:7={sha256},0={sha256}"))
        );
        assert_eq!(parsed.to_string(), text);
        // PCR targets parse but need the TPM source.
        let fx = Fixture::new();
        let a = fx.sim("A");
        let err = open_target(&Target::parse(&text).unwrap(), &a, &fx.state, None)
            .err()
            .unwrap();
        assert!(
            matches!(err, KeyslotError::TargetUnavailable { .. }),
            "{err}"
        );
        assert!(matches!(
            open_target(&Target::Current, &a, &fx.state, None).unwrap(),
            TargetSource::Node(_)
        ));
        let b = open_target(&Target::Sim("B".into()), &a, &fx.state, None).unwrap();
        assert_eq!(
            b.source().secret(&[]).unwrap().digest(),
            fx.sim("B").secret(&[]).unwrap().digest()
        );
    }

    #[test]
    fn kbs_targets_parse_and_need_a_configured_broker() {
        let parsed = Target::parse("kbs:default/sealcsi/vol-1").unwrap();
        assert_eq!(parsed.to_string(), "kbs:default/sealcsi/vol-1");
        for bad in ["kbs:", "kbs:a/b", "kbs:a/../c", "kbs:a/b/c d"] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
        let fx = Fixture::new();
        let a = fx.sim("A");
        let err = open_target(&parsed, &a, &fx.state, None).err().unwrap();
        assert!(err.to_string().contains("--kbs-url"), "{err}");
    }

    #[test]
    fn recovery_key_files() {
        let dir = tempfile::tempdir().unwrap();
        let private = dir.path().join("recovery.key");
        let public = dir.path().join("recovery.pub");
        let report = write_recovery_keys(&private, &public).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&private), 0o600);
        assert_eq!(mode(&public), 0o644);
        let pk = read_public_key(&public).unwrap();
        let sk = read_private_key(&private).unwrap();
        assert_eq!(sk.public().unwrap(), pk);
        assert_eq!(report.fingerprint, hex::encode(pk.fingerprint()));
        let shown = serde_json::to_string(&report).unwrap() + &format!("{sk:?}");
        let secret_hex = fs::read_to_string(&private).unwrap();
        let secret_hex = secret_hex.split_whitespace().last().unwrap();
        assert!(
            !shown.contains(secret_hex),
            "the private key is never shown"
        );
        // Never overwritten.
        assert!(write_recovery_keys(&private, &dir.path().join("other.pub")).is_err());
        assert!(write_recovery_keys(&dir.path().join("k2"), &public).is_err());
        assert!(!dir.path().join("k2").exists(), "no orphaned private key");
        // A private key others can read is refused; files of the wrong kind are refused.
        fs::set_permissions(&private, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(read_private_key(&private).is_err());
        assert!(read_public_key(&private).is_err());
        let junk = dir.path().join("junk");
        fs::write(&junk, "sealcsi-recovery-public-key-v1 x25519 abcd\n").unwrap();
        assert!(read_public_key(&junk).is_err());
        assert!(parse_key_check("00").is_err());
        assert_eq!(parse_key_check(&"01".repeat(32)).unwrap(), [1; 32]);
    }

    #[test]
    fn operations_serialise_on_the_device_lock() {
        let fx = Fixture::new();
        let a = fx.sim("A");
        let names: Vec<String> = (1..KEYSLOTS).map(|i| format!("t{i}")).collect();
        std::thread::scope(|scope| {
            for name in &names {
                let fx = &fx;
                let a = &a;
                scope.spawn(move || {
                    let t = fx.sim(name);
                    add_slot(&fx.volumes(a), &fx.dev, &t, None).unwrap();
                });
            }
        });
        // No update was lost: every identity opens.
        for name in &names {
            fx.assert_opens(&fx.sim(name));
        }
        assert_eq!(fx.header().active_slots().count(), KEYSLOTS);
    }
}
