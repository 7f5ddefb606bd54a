//! Fuzzes the parsers of key-broker replies with untrusted bytes: the resource JWE (decryption to a
//! fresh key must fail cleanly, never panic), the challenge, error bodies and session cookies, and
//! the kbs keyslot binding.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sealcsi::broker::{KbsBinding, jwe::EphemeralKey, rcar};

fuzz_target!(|data: &[u8]| {
    let key = EphemeralKey::generate().expect("randomness");
    assert!(key.decrypt(data).is_err(), "a reply to no one decrypted");
    let _ = rcar::parse_challenge(data);
    let _ = rcar::error_summary(data);
    let _ = rcar::session_cookie(&[String::from_utf8_lossy(data).into_owned()]);
    if let Ok(binding) = KbsBinding::decode(data) {
        assert_eq!(binding.encode(), data);
    }
});
