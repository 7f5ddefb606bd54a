//! Fuzzes the SEV-SNP evidence parsers (a body from another node's request or a broker client, a
//! certificate table from the host: untrusted bytes): decoding must never panic, and a body that decodes
//! must survive its own encoding unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sealcsi::attest::snp::{SnpEvidenceBody, encode_cert_table, parse_cert_table};

fuzz_target!(|data: &[u8]| {
    if let Ok(body) = SnpEvidenceBody::decode(data) {
        let again = SnpEvidenceBody::decode(&body.to_json()).expect("an encoded body decodes");
        assert_eq!(again, body);
        let _ = body.report_bytes().expect("a decoded report encodes");
    }
    if let Ok(entries) = parse_cert_table(data) {
        assert_eq!(
            parse_cert_table(&encode_cert_table(&entries)).expect("an encoded table parses"),
            entries
        );
    }
});
