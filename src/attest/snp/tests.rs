//! Host tests of SNP evidence and its verification, with the test chain of tests/data/snp/ (no SNP
//! hardware here: nothing of this ran on it).

use proptest::prelude::*;
use sev::certs::snp::builtin;
use sev::firmware::guest::GuestPolicy;

use super::testing::{self, CHIP_ID, MEASUREMENT, POLICY, TCB};
use super::verify::{certificate_from_bytes, verify_evidence};
use super::*;
use crate::error::{Classify, Kind};

const BOUND: [u8; 64] = [0x42; 64];

fn check(body: &[u8]) -> Result<SnpVerified, SnpError> {
    verify_evidence(body, &testing::expectation(), &testing::chain(), &BOUND)
}

fn signed(edit: impl FnOnce(&mut AttestationReport)) -> Vec<u8> {
    let mut report = testing::report(&BOUND);
    edit(&mut report);
    testing::body(testing::sign(report))
}

#[test]
fn a_report_signed_by_the_chain_and_meeting_the_expectation_is_accepted() {
    let v = check(&testing::evidence(&BOUND)).unwrap();
    assert_eq!(v.root, "operator ARK (not AMD)");
    assert_eq!(v.reported_tcb, "3.0.8.115");
    assert_eq!(v.chip_id, hex::encode(CHIP_ID));
    // The same with the VCEK as DER.
    let mut chain = testing::chain();
    chain.vcek = certificate_from_bytes(testing::VCEK_DER).unwrap();
    verify_evidence(
        &testing::evidence(&BOUND),
        &testing::expectation(),
        &chain,
        &BOUND,
    )
    .unwrap();
}

fn refused(body: &[u8]) -> SnpError {
    let err = check(body).unwrap_err();
    assert_eq!(err.kind(), Kind::Refused, "{err}");
    err
}

#[test]
fn a_wrong_measurement_is_refused() {
    let err = refused(&signed(|r| r.measurement[0] ^= 1));
    assert!(matches!(err, SnpError::Measurement { .. }), "{err}");
    assert!(err.to_string().contains(&hex::encode(MEASUREMENT)), "{err}");
}

#[test]
fn a_debug_policy_is_refused_unless_allowed() {
    let debug = POLICY | verify::POLICY_DEBUG;
    let body = signed(|r| r.policy = GuestPolicy::from(debug));
    let err = refused(&body);
    assert!(matches!(err, SnpError::DebugPolicy { .. }), "{err}");
    // The expectation must say debug=allow to expect such a policy at all.
    let text = testing::expectation_text().replace(&format!("{POLICY:#x}"), &format!("{debug:#x}"));
    assert!(text.parse::<SnpExpectation>().is_err());
    let allowed: SnpExpectation = format!("{text},debug=allow").parse().unwrap();
    verify_evidence(&body, &allowed, &testing::chain(), &BOUND).unwrap();
    // Another policy than the expected one.
    let err = refused(&signed(|r| {
        r.policy = GuestPolicy::from(0x1_0000u64 | 1 << 20)
    }));
    assert!(matches!(err, SnpError::Policy { .. }), "{err}");
}

#[test]
fn a_tcb_below_the_floor_is_refused() {
    let (bl, tee, snp, ucode) = TCB;
    for floor in [
        format!("{}.{tee}.{snp}.{ucode}", bl + 1),
        format!("{bl}.{}.{snp}.{ucode}", tee + 1),
        format!("{bl}.{tee}.{}.{ucode}", snp + 1),
        format!("{bl}.{tee}.{snp}.{}", ucode + 1),
        format!("{bl}.{tee}.{snp}.{ucode}.1"),
    ] {
        let text = testing::expectation_text().replace("3.0.8.115", &floor);
        let expect: SnpExpectation = text.parse().unwrap();
        let err = verify_evidence(
            &testing::evidence(&BOUND),
            &expect,
            &testing::chain(),
            &BOUND,
        )
        .unwrap_err();
        assert!(
            matches!(err, SnpError::TcbBelowFloor { .. }),
            "{floor}: {err}"
        );
    }
    // A floor below the reported TCB passes.
    let text = testing::expectation_text().replace("3.0.8.115", "2.0.7.100");
    verify_evidence(
        &testing::evidence(&BOUND),
        &text.parse().unwrap(),
        &testing::chain(),
        &BOUND,
    )
    .unwrap();
}

#[test]
fn a_report_claiming_a_tcb_its_vcek_was_not_issued_for_is_refused() {
    // An old VCEK (its key leaked, say) signing a report that claims newer firmware: the VCEK's own
    // TCB extensions refuse it, whatever the floor.
    let err = refused(&signed(|r| r.reported_tcb = testing::tcb(3, 0, 9, 115)));
    assert!(matches!(err, SnpError::VcekMismatch(_)), "{err}");
    let err = refused(&signed(|r| r.chip_id[0] ^= 1));
    assert!(matches!(err, SnpError::VcekMismatch(_)), "{err}");
    assert!(err.to_string().contains("chip"), "{err}");
}

#[test]
fn report_data_not_binding_the_request_is_refused() {
    let err = verify_evidence(
        &testing::evidence(&[0x43; 64]),
        &testing::expectation(),
        &testing::chain(),
        &BOUND,
    )
    .unwrap_err();
    assert!(matches!(err, SnpError::ReportData), "{err}");
}

#[test]
fn a_tampered_report_is_refused_by_its_signature() {
    let mut report = testing::sign(testing::report(&BOUND));
    report.measurement[5] ^= 0x80;
    let err = refused(&testing::body(report));
    assert!(matches!(err, SnpError::ReportSignature(_)), "{err}");
    // Every signed byte counts: flip one bit in each field the report's firmware encoding carries.
    let good = testing::sign(testing::report(&BOUND));
    let bytes = good.to_bytes().unwrap();
    for at in [
        0x04, 0x10, 0x20, 0x38, 0x50, 0x8f, 0x90, 0xC0, 0x1A0, 0x1E0, 0x29F,
    ] {
        let mut b = bytes;
        b[at] ^= 1;
        let Ok(r) = AttestationReport::from_bytes(&b) else {
            continue;
        };
        assert!(check(&testing::body(r)).is_err(), "byte {at:#x}");
    }
    let mut r = good;
    r.signature = sev::certs::snp::ecdsa::Signature::new([7; 72], [7; 72]);
    assert!(matches!(
        refused(&testing::body(r)),
        SnpError::ReportSignature(_)
    ));
}

#[test]
fn a_signature_with_bytes_beyond_r_and_s_is_refused() {
    // The signature check reads 48 bytes of each 72-byte component: the rest must be zero, or one
    // signed report would verify under many encodings (found by the mutation property test below).
    let good = testing::sign(testing::report(&BOUND)).to_bytes().unwrap();
    check(&testing::body(
        AttestationReport::from_bytes(&good).unwrap(),
    ))
    .unwrap();
    // (The reserved bytes after S are not carried by the parsed report: nothing to check there.)
    for at in [0x2A0 + 48, 0x2A0 + 71, 0x2A0 + 72 + 48, 0x2A0 + 143] {
        let mut b = good;
        b[at] = 1;
        let r = AttestationReport::from_bytes(&b).unwrap();
        let err = refused(&testing::body(r));
        assert!(
            matches!(err, SnpError::ReportFormat(_)),
            "byte {at:#x}: {err}"
        );
    }
}

#[test]
fn a_vcek_not_signed_by_the_ask_is_refused() {
    let mut chain = testing::chain();
    chain.vcek = certificate_from_bytes(testing::ROGUE_VCEK).unwrap();
    let err = verify_evidence(
        &testing::evidence(&BOUND),
        &testing::expectation(),
        &chain,
        &BOUND,
    )
    .unwrap_err();
    assert!(matches!(err, SnpError::VcekNotSignedByAsk(_)), "{err}");
}

#[test]
fn a_wrong_ark_is_refused() {
    // Trusting another root: the ASK is not signed by it.
    let mut chain = testing::chain();
    chain.ark = Some(certificate_from_bytes(testing::OTHER_ARK).unwrap());
    let err = verify_evidence(
        &testing::evidence(&BOUND),
        &testing::expectation(),
        &chain,
        &BOUND,
    )
    .unwrap_err();
    assert!(matches!(err, SnpError::AskNotSignedByArk(_)), "{err}");
    // An ASK given as the ARK is not self-signed.
    let mut chain = testing::chain();
    chain.ark = Some(certificate_from_bytes(testing::ASK).unwrap());
    let err = verify_evidence(
        &testing::evidence(&BOUND),
        &testing::expectation(),
        &chain,
        &BOUND,
    )
    .unwrap_err();
    assert!(matches!(err, SnpError::ArkNotSelfSigned(_)), "{err}");
}

#[test]
fn by_default_only_amds_roots_are_trusted() {
    let amd = |ark: Option<&[u8]>| {
        SnpChain::new(
            certificate_from_bytes(testing::VCEK_PEM).unwrap(),
            Some(certificate_from_bytes(testing::ASK).unwrap()),
            ark.map(|a| certificate_from_bytes(a).unwrap()),
            RootOfTrust::Amd,
        )
        .unwrap()
    };
    let verify = |chain: &SnpChain| {
        verify_evidence(
            &testing::evidence(&BOUND),
            &testing::expectation(),
            chain,
            &BOUND,
        )
        .unwrap_err()
    };
    // The test ARK is not AMD's.
    let err = verify(&amd(Some(testing::ARK)));
    assert!(matches!(err, SnpError::ArkNotAmd), "{err}");
    // AMD's Genoa root for a Milan report.
    let err = verify(&amd(Some(builtin::genoa::ARK)));
    assert!(matches!(err, SnpError::ProductMismatch { .. }), "{err}");
    // AMD's Milan root (built in, no --ark) does not sign the test ASK.
    let err = verify(&amd(None));
    assert!(matches!(err, SnpError::AskNotSignedByArk(_)), "{err}");
    // And with AMD's own Milan ASK (no --ask either), the test VCEK is not signed by it.
    let chain = SnpChain::new(
        certificate_from_bytes(testing::VCEK_PEM).unwrap(),
        None,
        None,
        RootOfTrust::Amd,
    )
    .unwrap();
    assert!(matches!(verify(&chain), SnpError::VcekNotSignedByAsk(_)));
    // Trusting the operator's ARK needs the ARK and the ASK.
    let err = SnpChain::new(
        certificate_from_bytes(testing::VCEK_PEM).unwrap(),
        None,
        Some(certificate_from_bytes(testing::ARK).unwrap()),
        RootOfTrust::OperatorArk,
    )
    .unwrap_err();
    assert_eq!(err.kind(), Kind::InvalidArgument);
}

#[test]
fn vmpl_and_report_format_checks() {
    let err = refused(&signed(|r| r.vmpl = 1));
    assert!(matches!(err, SnpError::Vmpl { got: 1, want: 0 }), "{err}");
    let vmpl1: SnpExpectation = format!("{},vmpl=1", testing::expectation_text())
        .parse()
        .unwrap();
    verify_evidence(&signed(|r| r.vmpl = 1), &vmpl1, &testing::chain(), &BOUND).unwrap();
    let err = refused(&signed(|r| r.sig_algo = 2));
    assert!(matches!(err, SnpError::ReportFormat(_)), "{err}");
    let err = refused(b"{\"attestation_report\": 1}");
    assert!(matches!(err, SnpError::Evidence(_)), "{err}");
}

#[test]
fn expectations_parse_strictly() {
    let e = testing::expectation();
    assert_eq!(e.measurement, MEASUREMENT);
    assert_eq!(e.policy, POLICY);
    assert_eq!(e.tcb_min.to_string(), "3.0.8.115");
    assert_eq!((e.vmpl, e.allow_debug), (0, false));
    let m = hex::encode(MEASUREMENT);
    let ok = format!("policy=30000,tcb-min=1.2.3.4.5,measurement={m},vmpl=2");
    let e: SnpExpectation = ok.parse().unwrap();
    assert_eq!((e.policy, e.vmpl, e.tcb_min.fmc), (0x30000, 2, Some(5)));
    for bad in [
        String::new(),
        format!("measurement={m},policy=0x30000"),
        format!("measurement={m},tcb-min=1.2.3.4"),
        "policy=0x30000,tcb-min=1.2.3.4".to_owned(),
        "measurement=abcd,policy=0x30000,tcb-min=1.2.3.4".to_owned(),
        format!("measurement={m},policy=xyz,tcb-min=1.2.3.4"),
        format!("measurement={m},policy=0x30000,tcb-min=1.2.3"),
        format!("measurement={m},policy=0x30000,tcb-min=1.2.3.256"),
        format!("measurement={m},policy=0x30000,tcb-min=1.2.3.4,vmpl=4"),
        format!("measurement={m},policy=0x30000,tcb-min=1.2.3.4,debug=yes"),
        format!("measurement={m},policy=0x30000,tcb-min=1.2.3.4,policy=0x30000"),
        format!("measurement={m},policy=0x30000,tcb-min=1.2.3.4,colour=blue"),
        format!("measurement={m},policy=0xb0000,tcb-min=1.2.3.4"),
    ] {
        assert!(bad.parse::<SnpExpectation>().is_err(), "{bad}");
    }
}

#[test]
fn the_body_is_trustees_snp_evidence_shape() {
    let table = encode_cert_table(&[
        CertTableEntry::new(CertType::ARK, b"ark".to_vec()),
        CertTableEntry::new(CertType::VCEK, testing::VCEK_DER.to_vec()),
    ]);
    let raw = testing::sign(testing::report(&BOUND)).to_bytes().unwrap();
    let body = SnpEvidenceBody::from_report(&raw, Some(&table)).unwrap();
    let json: serde_json::Value = serde_json::from_slice(&body.to_json()).unwrap();
    let object = json.as_object().unwrap();
    assert_eq!(
        object.keys().collect::<Vec<_>>(),
        ["attestation_report", "cert_chain"]
    );
    let report = &json["attestation_report"];
    for (field, len) in [
        ("family_id", 16),
        ("image_id", 16),
        ("report_data", 64),
        ("measurement", 48),
        ("host_data", 32),
        ("id_key_digest", 48),
        ("author_key_digest", 48),
        ("report_id", 32),
        ("report_id_ma", 32),
        ("chip_id", 64),
    ] {
        assert_eq!(report[field].as_array().map(Vec::len), Some(len), "{field}");
    }
    assert_eq!(report["report_data"][0], 0x42);
    assert_eq!(report["measurement"][0], MEASUREMENT[0]);
    assert_eq!(report["version"], 3);
    assert_eq!(report["policy"], POLICY);
    assert_eq!(report["vmpl"], 0);
    assert_eq!(report["cpuid_fam_id"], 0x19);
    assert_eq!(
        report["reported_tcb"],
        serde_json::json!({"fmc": null, "bootloader": 3, "tee": 0, "snp": 8, "microcode": 115})
    );
    assert_eq!(
        report["current"],
        serde_json::json!({"major": 1, "minor": 55, "build": 21})
    );
    assert_eq!(report["signature"]["r"].as_array().map(Vec::len), Some(72));
    assert_eq!(report["signature"]["s"].as_array().map(Vec::len), Some(72));
    assert_eq!(json["cert_chain"][0]["cert_type"], "ARK");
    assert_eq!(
        json["cert_chain"][0]["data"],
        serde_json::json!([97, 114, 107])
    );
    assert_eq!(json["cert_chain"][1]["cert_type"], "VCEK");
    // It decodes back to the same report and table, and the firmware bytes are the report's.
    let again = SnpEvidenceBody::decode(&body.to_json()).unwrap();
    assert_eq!(again, body);
    assert_eq!(again.report_bytes().unwrap(), raw);
    // No table: null.
    let bare = SnpEvidenceBody::from_report(&raw, None).unwrap().to_json();
    let bare: serde_json::Value = serde_json::from_slice(&bare).unwrap();
    assert!(bare["cert_chain"].is_null());
}

#[test]
fn the_certificate_table_parses_strictly() {
    let entries = vec![
        CertTableEntry::new(CertType::ASK, vec![1, 2, 3]),
        CertTableEntry::new(CertType::VCEK, vec![4; 100]),
        CertTableEntry::new(CertType::OTHER(uuid::Uuid::from_bytes([9; 16])), Vec::new()),
    ];
    let table = encode_cert_table(&entries);
    // GUIDs in the byte order of their text (the VCEK's is 63da758d-e664-4564-adc5-f4b93be8accd).
    assert_eq!(&table[24..28], &[0x63, 0xda, 0x75, 0x8d]);
    assert_eq!(&table[24 + 16..24 + 20], &(4 * 24 + 3u32).to_le_bytes());
    assert_eq!(parse_cert_table(&table).unwrap(), entries);
    // No terminator, an entry pointing outside, too many entries.
    assert!(parse_cert_table(&table[..24 * 3]).is_err());
    let mut outside = table.clone();
    outside[24 + 20..24 + 24].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(parse_cert_table(&outside).unwrap_err().contains("outside"));
    let many = vec![CertTableEntry::new(CertType::CRL, vec![0]); MAX_CERT_TABLE_ENTRIES + 1];
    assert!(
        parse_cert_table(&encode_cert_table(&many))
            .unwrap_err()
            .contains("more than")
    );
    let max = vec![CertTableEntry::new(CertType::CRL, vec![0]); MAX_CERT_TABLE_ENTRIES];
    assert_eq!(parse_cert_table(&encode_cert_table(&max)).unwrap(), max);
}

#[test]
fn a_short_or_unknown_report_does_not_make_a_body() {
    let raw = testing::report(&BOUND).to_bytes().unwrap();
    assert!(SnpEvidenceBody::from_report(&raw[..1000], None).is_err());
    let mut unknown = raw;
    unknown[0x188] = 0x42; // CPUID family of no SNP product
    assert!(SnpEvidenceBody::from_report(&unknown, None).is_err());
    assert_eq!(REPORT_DATA_RANGE, 0x50..0x90);
    assert_eq!(&raw[REPORT_DATA_RANGE], &BOUND[..]);
}

#[test]
fn the_fuzz_seeds_written_from_the_docs_decode() {
    // fuzz/make-snp-seeds.py builds them from docs/keys.md alone.
    let body = SnpEvidenceBody::decode(include_bytes!(
        "../../../fuzz/seeds/snp_evidence/body-no-table.json"
    ))
    .unwrap();
    assert_eq!(
        body.attestation_report.reported_tcb,
        testing::tcb(3, 0, 8, 115)
    );
    assert_eq!(body.attestation_report.chip_id, CHIP_ID);
    assert_eq!(body.cert_chain, None);
    let body = SnpEvidenceBody::decode(include_bytes!(
        "../../../fuzz/seeds/snp_evidence/body-table.json"
    ))
    .unwrap();
    assert_eq!(body.cert_chain.unwrap()[1].cert_type, CertType::ASK);
    let table = parse_cert_table(include_bytes!(
        "../../../fuzz/seeds/snp_evidence/cert-table.bin"
    ))
    .unwrap();
    let kinds: Vec<_> = table
        .iter()
        .map(|e| (e.cert_type.clone(), e.data.clone()))
        .collect();
    assert_eq!(
        kinds,
        [
            (CertType::VCEK, b"vcek".to_vec()),
            (CertType::ASK, b"ask".to_vec()),
            (CertType::ARK, b"ark".to_vec())
        ]
    );
}

proptest! {
    // Each case of the mutation tests checks four signatures: fewer cases than the default 256.
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn decoding_untrusted_bodies_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
        let _ = SnpEvidenceBody::decode(&bytes);
        let _ = parse_cert_table(&bytes);
    }

    #[test]
    fn mutated_bodies_never_panic_and_are_never_accepted_when_signed_fields_change(
        at in any::<usize>(),
        value in any::<u8>(),
    ) {
        let good = testing::evidence(&BOUND);
        let mut bytes = good.clone();
        let at = at % bytes.len();
        bytes[at] = value;
        if let Ok(v) = check(&bytes) {
            // Accepted only if the mutation left the report as signed (JSON whitespace, say).
            let a = SnpEvidenceBody::decode(&bytes).unwrap();
            let b = SnpEvidenceBody::decode(&good).unwrap();
            prop_assert_eq!(a.report_bytes().unwrap(), b.report_bytes().unwrap());
            prop_assert_eq!(v.reported_tcb, "3.0.8.115");
        }
    }

    #[test]
    fn mutated_firmware_reports_never_panic(at in 0usize..REPORT_LEN, value in any::<u8>()) {
        let mut raw = testing::sign(testing::report(&BOUND)).to_bytes().unwrap();
        raw[at] = value;
        if let Ok(body) = SnpEvidenceBody::from_report(&raw, None) {
            let _ = SnpEvidenceBody::decode(&body.to_json());
            let _ = check(&body.to_json());
        }
    }

    #[test]
    fn mutated_certificate_tables_never_panic(at in any::<usize>(), value in any::<u8>()) {
        let mut table = encode_cert_table(&[
            CertTableEntry::new(CertType::VCEK, testing::VCEK_DER.to_vec()),
            CertTableEntry::new(CertType::ASK, testing::ASK.to_vec()),
        ]);
        let at = at % table.len();
        table[at] = value;
        let _ = parse_cert_table(&table);
    }
}
