//! The TPM 2.0 sealing source against a real software TPM: each test starts its own `swtpm` on free local
//! ports with a private state directory, and stops it at the end. Runs on any host with `swtpm` installed
//! (no kernel device needed); without it every test fails, unless `SEALCSI_ALLOW_SKIP=tpm` says to skip
//! (CI never sets it; tests/install-deps.sh installs swtpm).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use sha2::{Digest as _, Sha256};

use sealcsi::dm::MemoryDm;
use sealcsi::error::{Classify, Kind};
use sealcsi::header::{FsKind, Header, Journal, Profile, SourceKind};
use sealcsi::keys::{SealingSecret, VolumeKey};
use sealcsi::sealing::tpm::{self, PcrBank, PcrSelection, TpmBinding, TpmSource};
use sealcsi::sealing::{SealError, SealingSource, SourceOptions, TeeChoice};
use sealcsi::volume::{VolumeError, Volumes};

#[path = "common/swtpm.rs"]
mod swtpm;
use swtpm::Swtpm;

/// A fresh swtpm plus a sealcsi state directory; None only when a missing swtpm may be skipped.
fn setup() -> Option<(tempfile::TempDir, Swtpm, PathBuf)> {
    if !swtpm::installed_or_allowed_skip() {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let tpm = Swtpm::start(&dir.path().join("swtpm"));
    let state = dir.path().join("sealcsi");
    Some((dir, tpm, state))
}

fn open(state: &Path, tpm: &Swtpm) -> TpmSource {
    TpmSource::open(state, Some(&tpm.tcti()), &PcrSelection::default()).unwrap()
}

fn header() -> Header {
    Header::new(
        [9; 16],
        Profile::AeadHmacSha256 {
            journal: Journal::Journal,
        },
        FsKind::Ext4,
        1,
    )
}

/// What `add-slot --for tpm-pcrs:...` does with seal_for_pcrs' answer: a source that hands out the
/// pre-authorized secret once, for its binding, so `seal_keyslot` wraps the volume key with it now.
struct Preauthorized {
    binding: Vec<u8>,
    secret: Mutex<Option<SealingSecret>>,
}

impl SealingSource for Preauthorized {
    fn kind(&self) -> SourceKind {
        SourceKind::Tpm
    }
    fn default_binding(&self) -> Vec<u8> {
        self.binding.clone()
    }
    fn secret(&self, binding: &[u8]) -> Result<SealingSecret, SealError> {
        assert_eq!(binding, self.binding);
        Ok(self.secret.lock().unwrap().take().expect("asked once"))
    }
    fn describe(&self) -> String {
        "pre-authorized TPM policy".into()
    }
}

const EVENT: [u8; 32] = [0x42; 32];

#[test]
fn tpm_seal_then_unseal_gives_the_same_secret_across_opens() {
    let Some((_dir, tpm, state)) = setup() else {
        return;
    };
    let a = open(&state, &tpm);
    let b = open(&state, &tpm);
    assert_eq!(a.default_binding(), b.default_binding());
    let first = a.secret(&a.default_binding()).unwrap().digest();
    // Many round trips: handles must be flushed (swtpm has no resource manager and 3 object slots).
    for _ in 0..8 {
        assert_eq!(b.secret(&b.default_binding()).unwrap().digest(), first);
    }
    let identity = sealcsi::sealing::identity(&a).unwrap();
    assert_eq!(identity.kind, SourceKind::Tpm);
    assert_eq!(identity.digest, hex::encode(first));
    assert!(!identity.simulated);

    // The binding fits the header and says sha256:0,2,4,7 with the policy of the current (all-zero) PCRs,
    // which the TPM's trial session and the software computation agree on.
    let binding = TpmBinding::decode(&a.default_binding()).unwrap();
    assert!(a.default_binding().len() <= sealcsi::header::MAX_BINDING_LEN);
    assert_eq!(binding.selection.to_string(), "sha256:0,2,4,7");
    let zeros: Vec<(u8, [u8; 32])> = [0, 2, 4, 7].iter().map(|&p| (p, [0; 32])).collect();
    assert_eq!(
        binding.policy_digest,
        tpm::policy_pcr_digest(&binding.selection, &tpm::pcr_digest(&zeros))
    );
    let blobs: Vec<_> = std::fs::read_dir(state.join("tpm"))
        .unwrap()
        .map(|e| e.unwrap())
        .collect();
    assert_eq!(blobs.len(), 1);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        blobs[0].metadata().unwrap().permissions().mode() & 0o777,
        0o600
    );
    let name = blobs[0].file_name().into_string().unwrap();
    assert!(
        name.starts_with(&hex::encode(binding.policy_digest)),
        "{name}"
    );

    // Through open_source with an explicit TCTI, as the binary does.
    let opts = SourceOptions {
        tpm_tcti: Some(tpm.tcti()),
        ..SourceOptions::new(&state)
    };
    let source = sealcsi::sealing::open_source(TeeChoice::Tpm, &opts).unwrap();
    assert_eq!(
        source.secret(&source.default_binding()).unwrap().digest(),
        first
    );
    if !Path::new(sealcsi::sealing::SEV_GUEST_DEVICE).exists() {
        let auto = sealcsi::sealing::open_source(TeeChoice::Auto, &opts).unwrap();
        assert_eq!(auto.kind(), SourceKind::Tpm);
    }
}

#[test]
fn tpm_changed_pcr_refuses_the_volume_and_a_reboot_restores_it() {
    let Some((_dir, mut tpm, state)) = setup() else {
        return;
    };
    let source = open(&state, &tpm);
    let dm = MemoryDm::default();
    let mut header = header();
    let key = VolumeKey::generate(96).unwrap();
    header.keyslots[0] = Some(
        Volumes::new(&dm, &source)
            .seal_keyslot(&header, &key)
            .unwrap(),
    );
    let header = Header::decode(&header.encode()).unwrap();
    let (slot, unsealed) = Volumes::new(&dm, &source).unseal(&header).unwrap();
    assert_eq!((slot, unsealed.expose()), (0, key.expose()));

    // A different boot: PCR 7 (secure-boot state) changes.
    tpm.extend(7, EVENT);
    let binding = header.keyslots[0].as_ref().unwrap().binding.clone();
    let err = source.secret(&binding).unwrap_err();
    assert!(
        matches!(
            err,
            SealError::Binding {
                kind: SourceKind::Tpm,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("PCR values differ"), "{err}");
    // The volume is refused as "wrong identity": the node in its new state opens to a new identity.
    let changed = open(&state, &tpm);
    let err = Volumes::new(&dm, &changed).unseal(&header).unwrap_err();
    assert!(
        matches!(err, VolumeError::WrongIdentity { slots: 1, .. }),
        "{err:?}"
    );
    assert_eq!(err.kind(), Kind::WrongIdentity);
    assert_ne!(changed.default_binding(), source.default_binding());

    // Power cycle: PCRs back to their boot values; the owner seed survived in swtpm's state.
    tpm.power_cycle();
    let rebooted = open(&state, &tpm);
    assert_eq!(rebooted.default_binding(), source.default_binding());
    let (_, unsealed) = Volumes::new(&dm, &rebooted).unseal(&header).unwrap();
    assert_eq!(unsealed.expose(), key.expose());
}

#[test]
fn tpm_preauthorized_pcr_values_unseal_after_the_change_and_the_old_ones_do_not() {
    let Some((_dir, tpm, state)) = setup() else {
        return;
    };
    let source = open(&state, &tpm);
    let dm = MemoryDm::default();
    let key = VolumeKey::generate(96).unwrap();
    let mut header = header();
    header.keyslots[0] = Some(
        Volumes::new(&dm, &source)
            .seal_keyslot(&header, &key)
            .unwrap(),
    );

    // The values PCRs 0,2,4,7 WILL have after extending PCR 7 once: new = SHA-256(old ‖ event).
    let old = [0u8; 32];
    let new7: [u8; 32] = Sha256::new()
        .chain_update(old)
        .chain_update(EVENT)
        .finalize()
        .into();
    let expected = [(7, new7), (0, old), (2, old), (4, old)];
    let (binding, secret) = tpm::seal_for_pcrs(
        &state,
        Some(&tpm.tcti()),
        PcrBank::Sha256,
        &[0, 2, 4, 7],
        &expected,
    )
    .unwrap();
    let decoded = TpmBinding::decode(&binding).unwrap();
    assert_eq!(
        decoded.policy_digest,
        tpm::policy_pcr_digest(&decoded.selection, &tpm::pcr_digest(&expected))
    );
    // Not unsealable yet: the PCRs still hold the old values.
    assert!(matches!(
        source.secret(&binding),
        Err(SealError::Binding { .. })
    ));
    let pre_digest = secret.digest();
    let pre = Preauthorized {
        binding: binding.clone(),
        secret: Mutex::new(Some(secret)),
    };
    header.keyslots[1] = Some(Volumes::new(&dm, &pre).seal_keyslot(&header, &key).unwrap());
    let header = Header::decode(&header.encode()).unwrap();
    // Before the change, the current-state slot opens.
    let (slot, _) = Volumes::new(&dm, &source).unseal(&header).unwrap();
    assert_eq!(slot, 0);

    // Boot the "new image": PCR 7 takes the value that was pre-authorized.
    tpm.extend(7, EVENT);
    assert_eq!(source.secret(&binding).unwrap().digest(), pre_digest);
    assert!(matches!(
        source.secret(&source.default_binding()),
        Err(SealError::Binding { .. })
    ));
    let after = open(&state, &tpm);
    assert_eq!(
        TpmBinding::decode(&after.default_binding())
            .unwrap()
            .policy_digest,
        decoded.policy_digest
    );
    let (slot, unsealed) = Volumes::new(&dm, &after).unseal(&header).unwrap();
    assert_eq!((slot, unsealed.expose()), (1, key.expose()));

    // A mismatched selection is rejected before touching the TPM.
    assert!(
        tpm::seal_for_pcrs(
            &state,
            Some(&tpm.tcti()),
            PcrBank::Sha256,
            &[0, 7],
            &expected
        )
        .is_err()
    );
}
