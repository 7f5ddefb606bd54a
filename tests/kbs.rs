//! The KBS client and the `kbs` keyslot against the KBS test double (tests/kbs_double), a real HTTP
//! server on 127.0.0.1: release allowed, denied by policy (the step named), broker down (nothing
//! changed), wrong report data (401), missing resource; over HTTPS, the broker's certificate verified
//! against the CA bundle (unknown issuer and wrong name refused before any request); and a volume
//! header opened through its kbs slot by a second node identity.

#[path = "kbs_double/mod.rs"]
mod kbs_double;

use std::time::Duration;

use kbs_double::{KbsDouble, Policy};
use sealcsi::attest::{
    AttestError, Evidence, EvidenceKind, EvidenceSource, ReportData, SampleEvidence,
};
use sealcsi::broker::{
    BrokerError, HttpOptions, HttpTransport, KbsClient, KbsConfig, KbsSource, ResourcePath, Retry,
};
use sealcsi::error::{Classify, Kind};
use sealcsi::sealing::SimSource;

const PATH: &str = "default/sealcsi/vol-key";

fn config(url: &str) -> KbsConfig {
    let mut c = KbsConfig::new(url);
    c.http.insecure_http = true;
    c.http.timeout = Duration::from_secs(5);
    c.retry = Retry {
        attempts: 2,
        backoff: Duration::from_millis(10),
    };
    c
}

fn client(url: &str) -> KbsClient {
    let c = config(url);
    KbsClient::new(Box::new(HttpTransport::new(url, &c.http).unwrap()), c.retry)
}

fn path() -> ResourcePath {
    ResourcePath::parse(PATH).unwrap()
}

fn allowed_double(secret: &[u8]) -> KbsDouble {
    let double = KbsDouble::start(0);
    double.set_policy(&Policy::allow_sample());
    double.put_resource(PATH, secret);
    double
}

#[test]
fn an_allowed_node_gets_the_resource_through_the_full_handshake() {
    let double = allowed_double(&[7u8; 32]);
    let got = client(&double.url())
        .fetch_resource(&SampleEvidence::new("node-a"), &path())
        .unwrap();
    assert_eq!(got.as_slice(), &[7u8; 32]);
    let log = double.log();
    let steps: Vec<&str> = log.iter().map(String::as_str).collect();
    assert_eq!(
        &steps[steps.len() - 3..],
        &[
            "POST /kbs/v0/auth -> 200",
            "POST /kbs/v0/attest -> 200",
            &format!("GET /kbs/v0/resource/{PATH} -> 200"),
        ]
    );
}

#[test]
fn a_denying_policy_is_refused_at_the_resource_step_and_the_secret_is_not_printed() {
    let double = KbsDouble::start(0);
    double.put_resource(PATH, b"resource-bytes-that-must-not-leak");
    double.set_policy(&Policy::deny_all());
    let err = client(&double.url())
        .fetch_resource(&SampleEvidence::new("node-a"), &path())
        .unwrap_err();
    assert!(matches!(err, BrokerError::PolicyDenied { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("policy denies") && text.contains("step resource"),
        "{text}"
    );
    assert!(text.contains(PATH), "{text}");
    assert!(!text.contains("must-not-leak"), "{text}");
    assert_eq!(err.kind(), Kind::WrongIdentity);
}

#[test]
fn a_policy_naming_other_identities_refuses_this_one() {
    let double = allowed_double(&[1u8; 32]);
    double.set_policy(&Policy {
        allow_tees: vec!["sample".into()],
        allow_identities: Some(vec!["node-b".into()]),
    });
    let c = client(&double.url());
    let err = c
        .fetch_resource(&SampleEvidence::new("node-a"), &path())
        .unwrap_err();
    assert!(matches!(err, BrokerError::PolicyDenied { .. }), "{err}");
    assert!(
        c.fetch_resource(&SampleEvidence::new("node-b"), &path())
            .is_ok()
    );
}

#[test]
fn a_broker_that_is_down_is_unreachable_at_the_auth_step() {
    let mut double = KbsDouble::start(0);
    let url = double.url();
    double.stop();
    let err = client(&url)
        .fetch_resource(&SampleEvidence::new("node-a"), &path())
        .unwrap_err();
    assert!(matches!(err, BrokerError::Unreachable { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("unreachable") && text.contains("step auth") && text.contains("2 attempts"),
        "{text}"
    );
    assert_eq!(err.kind(), Kind::Unavailable);
}

/// Evidence over other report data than asked for (a replayed or forged report).
struct WrongReportData;

impl EvidenceSource for WrongReportData {
    fn kind(&self) -> EvidenceKind {
        EvidenceKind::Sample
    }
    fn is_simulated(&self) -> bool {
        true
    }
    fn evidence(&self, report_data: &ReportData) -> Result<Evidence, AttestError> {
        let mut other = *report_data;
        other[0] ^= 1;
        SampleEvidence::new("node-a").evidence(&other)
    }
}

#[test]
fn evidence_over_other_report_data_is_refused_with_401_at_attest() {
    let double = allowed_double(&[7u8; 32]);
    let err = client(&double.url())
        .fetch_resource(&WrongReportData, &path())
        .unwrap_err();
    assert!(
        matches!(err, BrokerError::AttestationRefused { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("401 at step attest"), "{err}");
    assert!(
        // The real KBS names no cause in the reply (tests/data/kbs/wrong-report-data.json).
        err.to_string().contains("RCAR handshake Attest failed"),
        "{err}"
    );
    assert!(
        double
            .log()
            .iter()
            .any(|l| l == "POST /kbs/v0/attest -> 401")
    );
}

#[test]
fn a_missing_resource_is_not_released() {
    let double = KbsDouble::start(0);
    double.set_policy(&Policy::allow_sample());
    let err = client(&double.url())
        .fetch_resource(&SampleEvidence::new("node-a"), &path())
        .unwrap_err();
    assert!(matches!(err, BrokerError::ResourceRefused { .. }), "{err}");
}

#[test]
fn a_resource_of_the_wrong_length_is_unusable_and_not_printed() {
    let double = allowed_double(b"sixteen-byte-key");
    let source = config(&double.url())
        .open(Box::new(SampleEvidence::new("node-a")))
        .unwrap();
    let err = source.release(&path()).unwrap_err();
    assert!(matches!(err, BrokerError::Resource { .. }), "{err}");
    assert!(err.to_string().contains("16 bytes"), "{err}");
    assert!(!err.to_string().contains("sixteen"), "{err}");
}

#[test]
fn plain_http_is_refused_without_the_flag() {
    let err = HttpTransport::new("http://127.0.0.1:9", &HttpOptions::default())
        .err()
        .unwrap();
    assert!(err.to_string().contains("--kbs-insecure-http"), "{err}");
}

mod volume {
    //! The kbs keyslot on a real header (the engine's one wrap and unwrap), without device-mapper:
    //! format's slot 0 for node A, a kbs slot added, opened by node B through the broker.
    use super::*;
    use sealcsi::dm::MemoryDm;
    use sealcsi::header::{FsKind, Header, Journal, Profile, SlotKind, SourceKind};
    use sealcsi::keys::VolumeKey;
    use sealcsi::volume::{VolumeError, Volumes};

    /// A header with slot 0 sealed to `a` and slot 1 to the broker's resource.
    fn header_with_kbs_slot(broker: &KbsSource, a: &SimSource) -> (Header, Vec<u8>) {
        let dm = MemoryDm::new();
        let profile = Profile::AeadHmacSha256 {
            journal: Journal::Journal,
        };
        let mut header = Header::new([0x42; 16], profile, FsKind::Ext4, 1_700_000_000);
        let key = VolumeKey::generate(profile.key_len()).unwrap();
        header.keyslots[0] = Some(Volumes::new(&dm, a).seal_keyslot(&header, &key).unwrap());
        let slot = Volumes::new(&dm, &broker.for_resource(path()))
            .seal_keyslot(&header, &key)
            .unwrap();
        header.keyslots[1] = Some(slot);
        (header, key.expose().to_vec())
    }

    #[test]
    fn a_second_node_identity_opens_through_the_broker_and_not_without_it() {
        let double = allowed_double(&[9u8; 32]);
        let state = tempfile::tempdir().unwrap();
        let a = SimSource::open(state.path(), "node-a").unwrap();
        let b = SimSource::open(state.path(), "node-b").unwrap();
        let broker_a = config(&double.url())
            .open(Box::new(SampleEvidence::new("node-a")))
            .unwrap();
        let (header, key) = header_with_kbs_slot(&broker_a, &a);
        assert_eq!(
            header.keyslots[1].as_ref().unwrap().kind,
            SlotKind::Sealed(SourceKind::Kbs)
        );

        let dm = MemoryDm::new();
        // Node B alone: not its volume.
        let err = Volumes::new(&dm, &b).unseal(&header).unwrap_err();
        assert!(matches!(err, VolumeError::WrongIdentity { .. }), "{err}");
        // Node B with the broker: policy-bound, not node-bound.
        let broker_b = config(&double.url())
            .open(Box::new(SampleEvidence::new("node-b")))
            .unwrap();
        let (slot, unsealed) = Volumes::new(&dm, &b)
            .with_broker(Some(&broker_b))
            .unseal(&header)
            .unwrap();
        assert_eq!(slot, 1);
        assert_eq!(unsealed.expose(), key.as_slice());
        // Node A still opens with its own slot, without asking the broker.
        let before = double.log().len();
        let (slot, _) = Volumes::new(&dm, &a)
            .with_broker(Some(&broker_b))
            .unseal(&header)
            .unwrap();
        assert_eq!(slot, 0);
        assert_eq!(
            double.log().len(),
            before,
            "the broker was asked needlessly"
        );
    }

    #[test]
    fn broker_down_or_denying_is_a_clear_error_naming_the_step() {
        let mut double = allowed_double(&[9u8; 32]);
        let state = tempfile::tempdir().unwrap();
        let a = SimSource::open(state.path(), "node-a").unwrap();
        let b = SimSource::open(state.path(), "node-b").unwrap();
        let broker = config(&double.url())
            .open(Box::new(SampleEvidence::new("node-b")))
            .unwrap();
        let (header, _) = header_with_kbs_slot(&broker, &a);
        let dm = MemoryDm::new();

        double.set_policy(&Policy::deny_all());
        let err = Volumes::new(&dm, &b)
            .with_broker(Some(&broker))
            .unseal(&header)
            .unwrap_err();
        assert!(err.to_string().contains("policy denies"), "{err}");
        assert_eq!(err.kind(), Kind::WrongIdentity);

        double.stop();
        let err = Volumes::new(&dm, &b)
            .with_broker(Some(&broker))
            .unseal(&header)
            .unwrap_err();
        assert!(err.to_string().contains("unreachable (step auth"), "{err}");
        assert_eq!(err.kind(), Kind::Unavailable);
    }

    #[test]
    fn a_slot_naming_another_broker_is_for_someone_else() {
        let double = allowed_double(&[9u8; 32]);
        let state = tempfile::tempdir().unwrap();
        let a = SimSource::open(state.path(), "node-a").unwrap();
        let b = SimSource::open(state.path(), "node-b").unwrap();
        let mut other = config(&double.url());
        other.name = Some("other-kbs".into());
        let other = other.open(Box::new(SampleEvidence::new("node-a"))).unwrap();
        let (header, _) = header_with_kbs_slot(&other, &a);
        let broker = config(&double.url())
            .open(Box::new(SampleEvidence::new("node-b")))
            .unwrap();
        let before = double.log().len();
        let err = Volumes::new(&MemoryDm::new(), &b)
            .with_broker(Some(&broker))
            .unseal(&header)
            .unwrap_err();
        assert!(matches!(err, VolumeError::WrongIdentity { .. }), "{err}");
        assert_eq!(
            double.log().len(),
            before,
            "another broker's slot was sent to this one"
        );
    }
}

/// A client over HTTPS (the default) that trusts `ca_pem` (written to a file, as `--kbs-ca` takes it)
/// or, without one, the system's roots.
fn tls_client(url: &str, ca_pem: Option<&str>, dir: &std::path::Path) -> KbsClient {
    let mut c = KbsConfig::new(url);
    c.http.timeout = Duration::from_secs(5);
    if let Some(pem) = ca_pem {
        let bundle = dir.join("ca.pem");
        std::fs::write(&bundle, pem).unwrap();
        c.http.ca_bundle = Some(bundle);
    }
    c.retry = Retry {
        attempts: 1,
        backoff: Duration::from_millis(10),
    };
    KbsClient::new(Box::new(HttpTransport::new(url, &c.http).unwrap()), c.retry)
}

/// The double over HTTPS with a certificate for `names`, allowing sample evidence to a resource of
/// nines; and the certificate (PEM).
fn allowed_tls_double(names: &[&str]) -> (KbsDouble, String) {
    let (cert, key) = kbs_double::test_certificate(names);
    let double = KbsDouble::start_tls(0, &cert, &key);
    double.set_policy(&Policy::allow_sample());
    double.put_resource(PATH, &[9u8; 32]);
    (double, cert)
}

#[test]
fn over_https_the_release_needs_the_brokers_certificate_to_verify() {
    let dir = tempfile::tempdir().unwrap();
    let (double, cert) = allowed_tls_double(&["127.0.0.1"]);
    let url = double.url();
    assert!(url.starts_with("https://"), "{url}");
    // With the CA bundle that signed the broker's certificate: the full handshake, over TLS.
    let got = tls_client(&url, Some(&cert), dir.path())
        .fetch_resource(&SampleEvidence::new("node-a"), &path())
        .unwrap();
    assert_eq!(got.as_slice(), &[9u8; 32]);
    assert_eq!(double.log().len(), 3, "{:?}", double.log());
    // Without it (the system's roots do not know this certificate): refused at the first step, and
    // no request reached the broker.
    let err = tls_client(&url, None, dir.path())
        .fetch_resource(&SampleEvidence::new("node-a"), &path())
        .unwrap_err();
    assert!(matches!(err, BrokerError::Unreachable { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains("step auth"), "{text}");
    assert!(text.contains("invalid peer certificate"), "{text}");
    // A CA bundle of another certificate: refused the same way.
    let (other, _) = kbs_double::test_certificate(&["127.0.0.1"]);
    let err = tls_client(&url, Some(&other), dir.path())
        .fetch_resource(&SampleEvidence::new("node-a"), &path())
        .unwrap_err();
    assert!(matches!(err, BrokerError::Unreachable { .. }), "{err}");
    assert_eq!(double.log().len(), 3, "no request got past the handshake");
}

#[test]
fn over_https_a_certificate_for_another_name_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (double, cert) = allowed_tls_double(&["kbs.example"]);
    let err = tls_client(&double.url(), Some(&cert), dir.path())
        .fetch_resource(&SampleEvidence::new("node-a"), &path())
        .unwrap_err();
    assert!(matches!(err, BrokerError::Unreachable { .. }), "{err}");
    assert!(err.to_string().contains("not valid for name"), "{err}");
    assert!(double.log().is_empty(), "{:?}", double.log());
}
