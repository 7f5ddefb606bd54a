//! Fuzzes the header parser with untrusted bytes: decoding and copy selection must never panic, and
//! whatever decodes must re-encode to exactly the bytes it came from (nothing silently normalised).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sealcsi::header::{self, HEADER_SIZE, Header};

fuzz_target!(|data: &[u8]| {
    let _ = header::select(data);
    if let Ok(h) = Header::decode(data) {
        assert_eq!(&h.encode()[..], data);
        for (_, slot) in h.active_slots() {
            let _ = h.keyslot_aad(slot);
        }
    }
    if data.len() == 2 * HEADER_SIZE {
        let _ = header::has_magic(data);
    }
});
