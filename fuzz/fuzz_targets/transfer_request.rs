//! Fuzzes the transfer request parser (a file from another node: untrusted bytes): decoding must never
//! panic, and whatever decodes must re-encode to exactly the bytes it came from.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sealcsi::keyslots::transfer::TransferRequest;

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = TransferRequest::decode(data) {
        assert_eq!(request.encode().expect("a decoded request encodes"), data);
        let _ = request.report_data();
    }
});
