//! TEST ONLY: SEV-SNP reports signed with the test VCEK of tests/data/snp/ (a chain made by
//! tests/data/snp/make-test-chain.sh with keys of its own; nothing of AMD's), for the host tests of the
//! verification and of the attested transfer.

use p384::ecdsa::signature::Signer;
use p384::pkcs8::DecodePrivateKey;
use sev::certs::snp::ecdsa::Signature;
use sev::firmware::guest::{AttestationReport, GuestPolicy, Version};
use sev::firmware::host::TcbVersion;
use sev::parser::ByteParser;

use super::verify::certificate_from_bytes;
use super::{RootOfTrust, SnpChain, SnpEvidenceBody, SnpExpectation};
use crate::attest::ReportData;

pub(crate) const ARK: &[u8] = include_bytes!("../../../tests/data/snp/ark.pem");
pub(crate) const ASK: &[u8] = include_bytes!("../../../tests/data/snp/ask.pem");
pub(crate) const VCEK_PEM: &[u8] = include_bytes!("../../../tests/data/snp/vcek.pem");
pub(crate) const VCEK_DER: &[u8] = include_bytes!("../../../tests/data/snp/vcek.der");
pub(crate) const VCEK_KEY: &str = include_str!("../../../tests/data/snp/vcek.key.pem");
pub(crate) const OTHER_ARK: &[u8] = include_bytes!("../../../tests/data/snp/other-ark.pem");
pub(crate) const ROGUE_VCEK: &[u8] = include_bytes!("../../../tests/data/snp/rogue-vcek.pem");

/// The chip and TCB the test VCEK is issued for (make-test-chain.sh).
pub(crate) const CHIP_ID: [u8; 64] = [0x5c; 64];
pub(crate) const TCB: (u8, u8, u8, u8) = (3, 0, 8, 115);
pub(crate) const MEASUREMENT: [u8; 48] = [0x6d; 48];
/// SMT allowed (bit 16) and the reserved bit 17, ABI 0.0.
pub(crate) const POLICY: u64 = 0x3_0000;

pub(crate) fn tcb(bootloader: u8, tee: u8, snp: u8, microcode: u8) -> TcbVersion {
    TcbVersion::new(None, bootloader, tee, snp, microcode)
}

/// A version-3 Milan report as the test chip would make it, not yet signed.
pub(crate) fn report(report_data: &ReportData) -> AttestationReport {
    let (bl, tee, snp, ucode) = TCB;
    AttestationReport {
        version: 3,
        policy: GuestPolicy::from(POLICY),
        vmpl: 0,
        sig_algo: 1,
        current_tcb: tcb(bl, tee, snp, ucode),
        report_data: *report_data,
        measurement: MEASUREMENT,
        reported_tcb: tcb(bl, tee, snp, ucode),
        cpuid_fam_id: Some(0x19),
        cpuid_mod_id: Some(0x01),
        cpuid_step: Some(0x01),
        chip_id: CHIP_ID,
        committed_tcb: tcb(bl, tee, snp, ucode),
        current: Version::new(1, 55, 21),
        committed: Version::new(1, 55, 21),
        launch_tcb: tcb(bl, tee, snp, ucode),
        ..Default::default()
    }
}

/// `report` signed by the test VCEK, as the firmware signs: ECDSA P-384 over SHA-384 of bytes
/// 0..0x2A0, r and s little-endian in 72-byte fields.
pub(crate) fn sign(mut report: AttestationReport) -> AttestationReport {
    let key = p384::ecdsa::SigningKey::from_pkcs8_pem(VCEK_KEY).expect("the test VCEK key");
    let bytes = report.to_bytes().expect("the test report encodes");
    let signature: p384::ecdsa::Signature = key.sign(&bytes[..0x2A0]);
    let (r, s) = signature.split_bytes();
    let le = |be: &[u8]| {
        let mut out = [0u8; 72];
        for (i, b) in be.iter().rev().enumerate() {
            out[i] = *b;
        }
        out
    };
    report.signature = Signature::new(le(&r), le(&s));
    report
}

/// The evidence body of a signed test report binding `report_data`.
pub(crate) fn evidence(report_data: &ReportData) -> Vec<u8> {
    body(sign(report(report_data)))
}

pub(crate) fn body(report: AttestationReport) -> Vec<u8> {
    SnpEvidenceBody {
        attestation_report: report,
        cert_chain: None,
    }
    .to_json()
}

/// The test chain, trusted as the operator's root.
pub(crate) fn chain() -> SnpChain {
    SnpChain::new(
        certificate_from_bytes(VCEK_PEM).unwrap(),
        Some(certificate_from_bytes(ASK).unwrap()),
        Some(certificate_from_bytes(ARK).unwrap()),
        RootOfTrust::OperatorArk,
    )
    .unwrap()
}

/// The expectation the test report meets.
pub(crate) fn expectation_text() -> String {
    format!(
        "measurement={},policy={POLICY:#x},tcb-min=3.0.8.115",
        hex::encode(MEASUREMENT)
    )
}

pub(crate) fn expectation() -> SnpExpectation {
    expectation_text().parse().unwrap()
}
