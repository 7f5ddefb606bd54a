//! Fuzzes the parsers of what the host's TDX Quote Generation Service answers: the GET_QUOTE_RESP
//! message and the quote it carries (where the report data is looked for). A reply that parses must
//! give back its tail, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sealcsi::attest::tdx;

fuzz_target!(|data: &[u8]| {
    if let Ok(quote) = tdx::parse_quote_response(data) {
        assert!(data.ends_with(quote));
        let _ = tdx::quote_report_data(quote);
    }
    let _ = tdx::quote_report_data(data);
});
