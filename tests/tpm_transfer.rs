//! Attested transfer with TPM evidence against real software TPMs: each test starts its own `swtpm`
//! instances (one per node) on free local ports, and stops them at the end. Runs on the host (header-only
//! "devices" are plain files; no kernel device needed). Without swtpm every test fails, unless
//! `SEALCSI_ALLOW_SKIP=tpm` says to skip (CI never sets it).

use std::fs;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use sealcsi::attest::tpm::{QuoteExpectation, TpmQuoteEvidence, ak_fingerprint, verify_quote};
use sealcsi::attest::{EvidenceSource, REPORT_DATA_LEN};
use sealcsi::devio;
use sealcsi::dm::MemoryDm;
use sealcsi::error::{Classify, Kind};
use sealcsi::header::{COPY_OFFSETS, FsKind, HEADER_SIZE, Header, Journal, Profile};
use sealcsi::keys::VolumeKey;
use sealcsi::keyslots::transfer::{self, TransferError};
use sealcsi::sealing::SimSource;
use sealcsi::sealing::tpm::{PcrSelection, TpmSource};
use sealcsi::volume::seal::{seal_for, unseal_with};
use sealcsi::volume::{Volumes, read_header};
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{Digest, DigestValues};
use tss_esapi::{Context, TctiNameConf};

#[path = "common/swtpm.rs"]
mod swtpm;
use swtpm::Swtpm;

fn zeros_expectation(ak_sha256: [u8; 32]) -> QuoteExpectation {
    let selection = PcrSelection::default();
    let values = selection.pcrs().iter().map(|&i| (i, [0u8; 32])).collect();
    QuoteExpectation {
        ak_sha256,
        selection,
        values,
    }
}

fn extend_pcr7(tpm: &Swtpm) {
    let mut ctx = Context::new(TctiNameConf::from_str(&tpm.tcti()).unwrap()).unwrap();
    let mut values = DigestValues::new();
    values.set(
        HashingAlgorithm::Sha256,
        Digest::try_from(vec![0x42u8; 32]).unwrap(),
    );
    ctx.execute_with_session(Some(AuthSession::Password), |ctx| {
        ctx.pcr_extend(swtpm::pcr_handle(7), values)
    })
    .unwrap();
}

#[test]
fn a_quote_verifies_only_with_its_report_data_ak_and_pcr_values() {
    if !swtpm::installed_or_allowed_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tpm = Swtpm::start(&dir.path().join("swtpm"));
    let source = TpmQuoteEvidence::new(tpm.tcti(), PcrSelection::default());
    let data = [0x5Au8; REPORT_DATA_LEN];
    let ev = source.evidence(&data).unwrap();
    let ak = ak_fingerprint(&ev.body).unwrap();
    // The AK is the same key every time (a primary of the endorsement hierarchy).
    let again = source.evidence(&data).unwrap();
    assert_eq!(ak_fingerprint(&again.body).unwrap(), ak);
    let expect = zeros_expectation(ak);
    verify_quote(&ev.body, &expect, &data).unwrap();

    let err = verify_quote(&ev.body, &expect, &[0x5B; REPORT_DATA_LEN]).unwrap_err();
    assert!(err.contains("qualifying data"), "{err}");
    let err = verify_quote(&ev.body, &zeros_expectation([0; 32]), &data).unwrap_err();
    assert!(err.contains("other than the trusted"), "{err}");
    let mut wrong_pcr = expect.clone();
    wrong_pcr.values[3].1 = [1; 32];
    let err = verify_quote(&ev.body, &wrong_pcr, &data).unwrap_err();
    assert!(err.contains("PCR values"), "{err}");
    let mut other_selection = expect.clone();
    other_selection.selection = PcrSelection::from_str("sha256:0,2,4").unwrap();
    other_selection.values.pop();
    let err = verify_quote(&ev.body, &other_selection, &data).unwrap_err();
    assert!(err.contains("other PCRs"), "{err}");

    // A tampered TPMS_ATTEST (one bit of the qualifying data) no longer verifies.
    let mut body: serde_json::Value = serde_json::from_slice(&ev.body).unwrap();
    let mut attest = hex::decode(body["attest"].as_str().unwrap()).unwrap();
    let at = attest
        .windows(REPORT_DATA_LEN)
        .position(|w| w == data)
        .unwrap();
    attest[at] ^= 1;
    body["attest"] = hex::encode(&attest).into();
    let tampered = serde_json::to_vec(&body).unwrap();
    let mut flipped = data;
    flipped[0] ^= 1;
    let err = verify_quote(&tampered, &expect, &flipped).unwrap_err();
    assert!(err.contains("does not verify"), "{err}");

    // After an extend, the quote no longer matches the zero values.
    extend_pcr7(&tpm);
    let ev = source.evidence(&data).unwrap();
    let err = verify_quote(&ev.body, &expect, &data).unwrap_err();
    assert!(err.contains("PCR values"), "{err}");

    for garbage in [
        &b""[..],
        b"{}",
        b"not json",
        br#"{"ak_public":"zz","attest":"","signature":""}"#,
    ] {
        assert!(verify_quote(garbage, &expect, &data).is_err());
    }
}

/// A header-only "device" on the repository's disk (O_DIRECT), with one slot for `node`.
fn device(dir: &Path, node: &dyn sealcsi::sealing::SealingSource) -> (PathBuf, VolumeKey) {
    let dev = dir.join("dev");
    fs::write(&dev, vec![0u8; 4 * HEADER_SIZE]).unwrap();
    let profile = Profile::AeadHmacSha256 {
        journal: Journal::Journal,
    };
    let mut header = Header::new([0x42; 16], profile, FsKind::Ext4, 1_700_000_000);
    let key = VolumeKey::generate(profile.key_len()).unwrap();
    header.keyslots[0] = Some(seal_for(node, &header, &key).unwrap());
    for offset in COPY_OFFSETS {
        devio::write_at(&dev, offset, &header.encode()).unwrap();
    }
    (dev, key)
}

/// Two TPM nodes (two swtpm instances): A grants to B on B's quote, B accepts and opens.
#[test]
fn transfer_between_two_tpm_nodes() {
    if !swtpm::installed_or_allowed_skip() {
        return;
    }
    let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
    let tpm_a = Swtpm::start(&dir.path().join("swtpm-a"));
    let tpm_b = Swtpm::start(&dir.path().join("swtpm-b"));
    let (a_state, b_state) = (dir.path().join("a"), dir.path().join("b"));
    let a = TpmSource::open(&a_state, Some(&tpm_a.tcti()), &PcrSelection::default()).unwrap();
    let b = TpmSource::open(&b_state, Some(&tpm_b.tcti()), &PcrSelection::default()).unwrap();
    let (dev, key) = device(dir.path(), &a);
    let dm = MemoryDm::default();

    let evidence_b = TpmQuoteEvidence::new(tpm_b.tcti(), PcrSelection::default());
    let out = dir.path().join("req");
    let report = transfer::make_request(&b, &evidence_b, &b_state, None, &out).unwrap();
    let ak_b = report
        .ak_sha256
        .clone()
        .expect("a TPM request names its AK");
    let zeros = "00".repeat(32);
    let expect_b: transfer::Expectation =
        format!("tpm:{ak_b}:sha256:0={zeros},2={zeros},4={zeros},7={zeros}")
            .parse()
            .unwrap();
    let request = transfer::read_request(&out).unwrap();
    let before = fs::read(&dev).unwrap();

    // Refused: A's own AK pinned instead of B's; a PCR value B does not have; a forged key.
    let ak_a = hex::encode(
        ak_fingerprint(
            &TpmQuoteEvidence::new(tpm_a.tcti(), PcrSelection::default())
                .evidence(&[0; 64])
                .unwrap()
                .body,
        )
        .unwrap(),
    );
    assert_ne!(ak_a, ak_b);
    let ones = "11".repeat(32);
    for expect in [
        format!("tpm:{ak_a}:sha256:0={zeros},2={zeros},4={zeros},7={zeros}"),
        format!("tpm:{ak_b}:sha256:0={zeros},2={zeros},4={zeros},7={ones}"),
    ] {
        let err = transfer::grant(
            &Volumes::new(&dm, &a),
            &dev,
            &request,
            &expect.parse().unwrap(),
            &a_state,
        )
        .unwrap_err();
        assert_eq!(err.kind(), Kind::Refused, "{expect}: {err}");
    }
    let mut forged = request.clone();
    forged.public_key = sealcsi::keyslots::recovery_keygen().0;
    let err =
        transfer::grant(&Volumes::new(&dm, &a), &dev, &forged, &expect_b, &a_state).unwrap_err();
    assert!(
        matches!(err, TransferError::EvidenceRejected { .. }),
        "{err}"
    );
    assert_eq!(fs::read(&dev).unwrap(), before, "refusals change nothing");

    let granted =
        transfer::grant(&Volumes::new(&dm, &a), &dev, &request, &expect_b, &a_state).unwrap();
    assert!(!granted.simulated);
    let err =
        transfer::grant(&Volumes::new(&dm, &a), &dev, &request, &expect_b, &a_state).unwrap_err();
    assert!(matches!(err, TransferError::Replayed { .. }), "{err}");
    let check = sealcsi::keyslots::parse_key_check(&granted.key_check).unwrap();
    transfer::accept(&b, &dev, &b_state, Some(&check)).unwrap();
    let header = read_header(&dev).unwrap().header;
    let (_, opened) = unseal_with(&b, &header).unwrap();
    assert_eq!(opened.expose(), key.expose());
    // A simulated node that is not B gets nothing from B's grant.
    let c_state = dir.path().join("c");
    let c = SimSource::open(&c_state, "node-c").unwrap();
    assert!(unseal_with(&c, &header).is_err());
}
