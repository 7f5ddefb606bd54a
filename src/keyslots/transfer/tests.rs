//! Host tests of the transfer protocol on header-only "devices" (plain files) and two simulated nodes
//! (two state dirs).

use std::fs;
use std::path::PathBuf;

use super::*;
use crate::devio;
use crate::dm::MemoryDm;
use crate::header::{COPY_OFFSETS, FsKind, HEADER_SIZE, Header, Journal, Profile};
use crate::keys::VolumeKey;
use crate::sealing::SimSource;

struct Nodes {
    dir: tempfile::TempDir,
    dev: PathBuf,
    a_state: PathBuf,
    b_state: PathBuf,
    key: VolumeKey,
    dm: MemoryDm,
}

impl Nodes {
    /// A volume sealed to node A ("node-a", state dir a/); node B ("node-b", state dir b/).
    fn new() -> Self {
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let dev = dir.path().join("dev");
        let a_state = dir.path().join("a");
        let b_state = dir.path().join("b");
        fs::write(&dev, vec![0u8; 4 * HEADER_SIZE]).unwrap();
        let profile = Profile::AeadHmacSha256 {
            journal: Journal::Journal,
        };
        let mut header = Header::new([0x42; 16], profile, FsKind::Ext4, 1_700_000_000);
        let key = VolumeKey::generate(profile.key_len()).unwrap();
        let a = SimSource::open(&a_state, "node-a").unwrap();
        header.keyslots[0] = Some(crate::volume::seal::seal_for(&a, &header, &key).unwrap());
        for offset in COPY_OFFSETS {
            devio::write_at(&dev, offset, &header.encode()).unwrap();
        }
        Nodes {
            dir,
            dev,
            a_state,
            b_state,
            key,
            dm: MemoryDm::default(),
        }
    }

    fn a(&self) -> SimSource {
        SimSource::open(&self.a_state, "node-a").unwrap()
    }

    fn b(&self) -> SimSource {
        SimSource::open(&self.b_state, "node-b").unwrap()
    }

    fn request_on_b(&self, name: &str, volume: Option<[u8; 16]>) -> (PathBuf, RequestReport) {
        let out = self.dir.path().join(name);
        let b = self.b();
        let ev = SampleEvidence::new("node-b");
        let report = make_request(&b, &ev, &self.b_state, volume, &out).unwrap();
        (out, report)
    }

    fn grant_on_a(&self, request: &Path, expect: &str) -> Result<GrantReport, TransferError> {
        let a = self.a();
        let req = read_request(request)?;
        grant(
            &Volumes::new(&self.dm, &a),
            &self.dev,
            &req,
            &expect.parse()?,
            &self.a_state,
        )
    }

    fn bytes(&self) -> Vec<u8> {
        fs::read(&self.dev).unwrap()
    }

    fn header(&self) -> Header {
        read_header(&self.dev).unwrap().header
    }

    #[track_caller]
    fn assert_opens(&self, node: &dyn SealingSource) -> usize {
        let (slot, key) = unseal_with(node, &self.header()).unwrap();
        assert_eq!(key.expose(), self.key.expose());
        slot
    }

    fn granted_records(&self) -> usize {
        fs::read_dir(self.a_state.join(GRANTED_DIR)).map_or(0, |d| d.count())
    }
}

fn parse_check(hex_text: &str) -> [u8; 32] {
    crate::keyslots::parse_key_check(hex_text).unwrap()
}

#[test]
fn the_node_local_runbook_moves_the_key_from_a_to_b() {
    let n = Nodes::new();
    assert!(unseal_with(&n.b(), &n.header()).is_err());
    let (req_path, req) = n.request_on_b("req", Some([0x42; 16]));
    assert!(req.pending_key.exists());
    let pending_mode = fs::metadata(&req.pending_key).unwrap().permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&pending_mode) & 0o777,
        0o600
    );
    let granted = n.grant_on_a(&req_path, "sim:node-b").unwrap();
    assert_eq!(granted.slot, 1);
    assert!(granted.simulated);
    assert_eq!(granted.request_id, req.request_id);
    assert_eq!(granted.target_identity, req.target_identity);
    let h = n.header();
    let slot = h.keyslots[1].as_ref().unwrap();
    assert_eq!(slot.kind, SlotKind::Transfer);
    assert_eq!(hex::encode(slot.identity_digest), req.request_id);
    // B still cannot open the volume by its sealing identity alone: the slot is for the request key.
    assert!(unseal_with(&n.b(), &h).is_err());

    let accepted = accept(
        &n.b(),
        &n.dev,
        &n.b_state,
        Some(&parse_check(&granted.key_check)),
    )
    .unwrap();
    assert_eq!(accepted.transfer_slot, Some(1));
    assert!(accepted.key_checked);
    assert_eq!(n.assert_opens(&n.b()), accepted.slot);
    let h = n.header();
    assert!(
        h.active_slots().all(|(_, s)| s.kind != SlotKind::Transfer),
        "the transfer slot is gone"
    );
    // From both copies.
    let transfer_wrapped = slot.wrapped.clone();
    assert!(
        !n.bytes()
            .windows(transfer_wrapped.len())
            .any(|w| w == transfer_wrapped.as_slice())
    );
    assert!(!req.pending_key.exists(), "the pending key is deleted");
    // A's slot can now go; B keeps the volume.
    let b = n.b();
    crate::keyslots::remove_slot(&Volumes::new(&n.dm, &b), &n.dev, 0, false).unwrap();
    n.assert_opens(&n.b());
    assert!(unseal_with(&n.a(), &n.header()).is_err());
    // Accept again: nothing to do, success.
    let again = accept(&n.b(), &n.dev, &n.b_state, None).unwrap();
    assert_eq!(again.transfer_slot, None);
}

#[test]
fn refused_requests_change_nothing() {
    let n = Nodes::new();
    let (req_path, _) = n.request_on_b("req", None);
    let before = n.bytes();

    // A request from an identity the expectation does not name.
    let err = n.grant_on_a(&req_path, "sim:node-c").unwrap_err();
    assert_eq!(err.kind(), Kind::Refused, "{err}");
    assert!(err.to_string().contains("node-b"), "{err}");

    // A forged request: B's evidence, another key (the report data no longer binds the key).
    let mut forged = read_request(&req_path).unwrap();
    forged.public_key = crate::keyslots::recovery_keygen().0;
    let forged_path = n.dir.path().join("forged");
    fs::write(&forged_path, forged.encode().unwrap()).unwrap();
    let err = n.grant_on_a(&forged_path, "sim:node-b").unwrap_err();
    assert_eq!(err.kind(), Kind::Refused, "{err}");
    assert!(err.to_string().contains("does not bind"), "{err}");

    // A request for another volume.
    let (other_path, _) = n.request_on_b("other", Some([0x43; 16]));
    let err = n.grant_on_a(&other_path, "sim:node-b").unwrap_err();
    assert!(err.to_string().contains("asks for volume"), "{err}");

    // A stale request (re-made with an old time and evidence that binds it, as a target could).
    let mut stale = read_request(&req_path).unwrap();
    stale.created -= MAX_REQUEST_AGE_SECS + 10;
    stale.evidence = SampleEvidence::new("node-b")
        .evidence(&stale.report_data())
        .unwrap()
        .body;
    let stale_path = n.dir.path().join("stale");
    fs::write(&stale_path, stale.encode().unwrap()).unwrap();
    let err = n.grant_on_a(&stale_path, "sim:node-b").unwrap_err();
    assert!(err.to_string().contains("older than"), "{err}");

    // A node that cannot open the volume cannot grant.
    let c_state = n.dir.path().join("c");
    let c = SimSource::open(&c_state, "node-c").unwrap();
    let req = read_request(&req_path).unwrap();
    let err = grant(
        &Volumes::new(&n.dm, &c),
        &n.dev,
        &req,
        &"sim:node-b".parse().unwrap(),
        &c_state,
    )
    .unwrap_err();
    assert_eq!(err.kind(), Kind::WrongIdentity, "{err}");

    assert_eq!(n.bytes(), before, "the device is unchanged");
    assert_eq!(n.granted_records(), 0, "no request was recorded");
}

#[test]
fn a_replayed_request_is_refused_by_the_record_and_by_the_header() {
    let n = Nodes::new();
    let (req_path, _) = n.request_on_b("req", None);
    n.grant_on_a(&req_path, "sim:node-b").unwrap();
    let after_grant = n.bytes();
    // The same request again: the header holds its slot.
    let err = n.grant_on_a(&req_path, "sim:node-b").unwrap_err();
    assert!(
        matches!(
            err,
            TransferError::Replayed {
                place: "this volume holds its transfer slot",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(err.kind(), Kind::Refused);
    assert_eq!(n.bytes(), after_grant);
    // After accept (the slot is gone), the source's record still refuses it.
    accept(&n.b(), &n.dev, &n.b_state, None).unwrap();
    let after_accept = n.bytes();
    let err = n.grant_on_a(&req_path, "sim:node-b").unwrap_err();
    assert!(
        matches!(
            err,
            TransferError::Replayed {
                place: "this node's record of granted requests",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(n.bytes(), after_accept);
}

#[test]
fn accept_is_crash_safe_between_its_updates() {
    for last in [Step::AddOwnSlot, Step::RemoveTransferSlot] {
        let n = Nodes::new();
        let (req_path, req) = n.request_on_b("req", None);
        n.grant_on_a(&req_path, "sim:node-b").unwrap();
        // "Crash" after `last`: the header holds a consistent slot set, and B opens it (step 1 done).
        let partial = accept_steps(&n.b(), &n.dev, &n.b_state, None, last).unwrap();
        n.assert_opens(&n.b());
        n.assert_opens(&n.a());
        let transfer_left = n
            .header()
            .active_slots()
            .any(|(_, s)| s.kind == SlotKind::Transfer);
        assert_eq!(transfer_left, last == Step::AddOwnSlot, "{last:?}");
        // The rerun finishes; B's slot is the same one.
        let done = accept(&n.b(), &n.dev, &n.b_state, None).unwrap();
        assert_eq!(done.slot, partial.slot);
        assert!(
            n.header()
                .active_slots()
                .all(|(_, s)| s.kind != SlotKind::Transfer)
        );
        if last == Step::AddOwnSlot {
            assert!(!req.pending_key.exists());
        }
        n.assert_opens(&n.b());
    }
}

#[test]
fn accept_refuses_a_wrong_key_check_a_foreign_node_and_an_altered_slot() {
    let n = Nodes::new();
    let (req_path, req) = n.request_on_b("req", None);
    n.grant_on_a(&req_path, "sim:node-b").unwrap();
    let before = n.bytes();
    let err = accept(&n.b(), &n.dev, &n.b_state, Some(&[0u8; 32])).unwrap_err();
    assert!(matches!(err, TransferError::KeyMismatch(1)), "{err}");
    assert_eq!(err.kind(), Kind::InvalidHeader, "{err}");
    // Node C (no pending request) gets nothing.
    let c_state = n.dir.path().join("c");
    let c = SimSource::open(&c_state, "node-c").unwrap();
    let err = accept(&c, &n.dev, &c_state, None).unwrap_err();
    assert!(matches!(err, TransferError::NoTransferSlot), "{err}");
    // B's state dir under another identity: the pending key does not unseal.
    let b_other = SimSource::open(&n.b_state, "node-b2").unwrap();
    let err = accept(&b_other, &n.dev, &n.b_state, None).unwrap_err();
    assert_eq!(err.kind(), Kind::WrongIdentity, "{err}");
    assert_eq!(n.bytes(), before);
    // A host that swaps the transfer slot's nonce is caught.
    let mut h = n.header();
    let mut slot = h.keyslots[1].clone().unwrap();
    slot.salt[0] ^= 1;
    h.keyslots[1] = Some(slot);
    h.seqno += 1;
    for offset in COPY_OFFSETS {
        devio::write_at(&n.dev, offset, &h.encode()).unwrap();
    }
    let err = accept(&n.b(), &n.dev, &n.b_state, None).unwrap_err();
    assert!(matches!(err, TransferError::NonceMismatch(1)), "{err}");
    assert!(req.pending_key.exists());
}

#[test]
fn make_request_writes_a_bound_request_and_never_overwrites() {
    let n = Nodes::new();
    let (path, report) = n.request_on_b("req", None);
    let req = read_request(&path).unwrap();
    assert_eq!(hex::encode(req.id()), report.request_id);
    let (body, data) = crate::attest::SampleBody::parse(&req.evidence).unwrap();
    assert_eq!(data, req.report_data());
    assert_eq!(body.sealcsi_sim_identity.as_deref(), Some("node-b"));
    assert_eq!(
        hex::encode(req.target_identity),
        sealing::identity(&n.b()).unwrap().digest
    );
    let (private, nonce) = pending::load(&n.b(), &n.b_state, &req.id())
        .unwrap()
        .unwrap();
    assert_eq!(nonce, req.nonce);
    assert_eq!(private.public().unwrap(), req.public_key);
    let ev = SampleEvidence::new("node-b");
    let err = make_request(&n.b(), &ev, &n.b_state, None, &path).unwrap_err();
    assert_eq!(err.kind(), Kind::InvalidArgument, "{err}");
    // SNP evidence on a machine without an SNP guest device (this host, the guest of the tests)
    // fails clearly, naming what is missing.
    if !std::path::Path::new(crate::sealing::SEV_GUEST_DEVICE).exists() {
        let err = evidence_source(&EvidenceChoice::Snp).err().unwrap();
        assert!(err.to_string().contains("sev-guest"), "{err}");
    }
}

/// SNP evidence from the test chip of tests/data/snp/ (signed by the test VCEK; no SNP hardware).
struct TestSnpChip;

impl EvidenceSource for TestSnpChip {
    fn kind(&self) -> EvidenceKind {
        EvidenceKind::Snp
    }

    fn evidence(
        &self,
        report_data: &crate::attest::ReportData,
    ) -> Result<crate::attest::Evidence, AttestError> {
        Ok(crate::attest::Evidence {
            kind: EvidenceKind::Snp,
            report_data: *report_data,
            body: crate::attest::snp::testing::evidence(report_data),
        })
    }
}

fn snp_expectation(text: &str) -> Expectation {
    format!("snp:{text}")
        .parse::<Expectation>()
        .unwrap()
        .with_snp_chain(crate::attest::snp::testing::chain())
        .unwrap()
}

#[test]
fn an_snp_request_is_granted_only_when_its_report_meets_the_expectation() {
    use crate::attest::snp::testing;
    let n = Nodes::new();
    let out = n.dir.path().join("snp-req");
    let report = make_request(&n.b(), &TestSnpChip, &n.b_state, None, &out).unwrap();
    assert_eq!(report.evidence, EvidenceKind::Snp);
    let req = read_request(&out).unwrap();
    let a = n.a();
    let grant_with = |req: &TransferRequest, expect: &Expectation| {
        grant(&Volumes::new(&n.dm, &a), &n.dev, req, expect, &n.a_state)
    };
    let before = n.bytes();
    let good = testing::expectation_text();
    let refusals: Vec<(Expectation, &str)> = vec![
        (
            snp_expectation(&good.replace(&hex::encode(testing::MEASUREMENT), &"00".repeat(48))),
            "launch measurement",
        ),
        (
            snp_expectation(&good.replace("3.0.8.115", "3.0.9.115")),
            "below the floor",
        ),
        (snp_expectation(&format!("{good},vmpl=2")), "VMPL"),
        // No chain attached: refused, not skipped.
        (format!("snp:{good}").parse().unwrap(), "needs the VCEK"),
    ];
    for (expect, needle) in refusals {
        let err = grant_with(&req, &expect).unwrap_err();
        assert!(err.to_string().contains(needle), "{needle}: {err}");
    }
    // A forged request: the evidence binds another key.
    let mut forged = req.clone();
    forged.public_key = crate::keyslots::recovery_keygen().0;
    let err = grant_with(&forged, &snp_expectation(&good)).unwrap_err();
    assert_eq!(err.kind(), Kind::Refused);
    assert!(err.to_string().contains("does not bind"), "{err}");
    // Sample evidence against an snp expectation.
    let (sample, _) = n.request_on_b("sample-req", None);
    let err = grant_with(&read_request(&sample).unwrap(), &snp_expectation(&good)).unwrap_err();
    assert!(err.to_string().contains("SEV-SNP report"), "{err}");
    assert_eq!(n.bytes(), before, "nothing was written on refusal");
    assert_eq!(n.granted_records(), 0);

    let granted = grant_with(&req, &snp_expectation(&good)).unwrap();
    assert!(!granted.simulated);
    assert!(
        granted.verified.contains("operator ARK (not AMD)"),
        "{}",
        granted.verified
    );
    let accepted = accept(
        &n.b(),
        &n.dev,
        &n.b_state,
        Some(&parse_check(&granted.key_check)),
    )
    .unwrap();
    assert_eq!(n.assert_opens(&n.b()), accepted.slot);
}
