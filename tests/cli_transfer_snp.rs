//! `volume transfer-grant` with an `snp:` expectation: the chain options are checked before anything
//! is read or written (no device, request or state is touched by these refusals). The verification
//! itself is tested in `src/attest/snp/tests.rs` and `src/keyslots/transfer/tests.rs`.

use std::process::Command;

const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/snp");

fn expectation() -> String {
    format!(
        "snp:measurement={},policy=0x30000,tcb-min=3.0.8.115",
        "6d".repeat(48)
    )
}

/// Runs `sealcsi volume transfer-grant <missing device> --request <missing> <args>`; returns stderr.
fn grant(args: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let out = Command::new(env!("CARGO_BIN_EXE_sealcsi"))
        .args(["--tee", "sim", "--state-dir"])
        .arg(&state)
        .args(["volume", "transfer-grant"])
        .arg(dir.path().join("no-device"))
        .arg("--request")
        .arg(dir.path().join("no-request"))
        .args(args)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
    assert!(!state.exists(), "nothing was written under the state dir");
    String::from_utf8(out.stderr).unwrap()
}

#[test]
fn an_snp_expectation_needs_the_vcek() {
    let err = grant(&["--expect", &expectation()]);
    assert!(err.contains("needs --vcek"), "{err}");
}

#[test]
fn chain_files_are_only_for_snp_expectations() {
    let vcek = format!("{DATA}/vcek.pem");
    let err = grant(&["--expect", "sim:node-b", "--vcek", &vcek]);
    assert!(err.contains("only for --expect snp:"), "{err}");
}

#[test]
fn trusting_the_given_ark_needs_the_ark_and_the_ask() {
    let vcek = format!("{DATA}/vcek.pem");
    let ark = format!("{DATA}/ark.pem");
    let err = grant(&[
        "--expect",
        &expectation(),
        "--vcek",
        &vcek,
        "--ark",
        &ark,
        "--trust-given-ark",
    ]);
    assert!(err.contains("--ask"), "{err}");
}

#[test]
fn unreadable_chain_files_and_bad_expectations_are_named() {
    let err = grant(&[
        "--expect",
        &expectation(),
        "--vcek",
        "/nonexistent/vcek.der",
    ]);
    assert!(
        err.contains("SNP certificate VCEK (/nonexistent/vcek.der)"),
        "{err}"
    );
    let not_a_cert = format!("{DATA}/README.md");
    let err = grant(&["--expect", &expectation(), "--vcek", &not_a_cert]);
    assert!(err.contains("SNP certificate VCEK"), "{err}");
    let err = grant(&["--expect", "snp:measurement=00,policy=0,tcb-min=1.2.3.4"]);
    assert!(err.contains("96 hex digits"), "{err}");
}

#[test]
fn the_test_chain_loads_and_then_the_missing_request_is_the_error() {
    let (vcek, ask, ark) = (
        format!("{DATA}/vcek.der"),
        format!("{DATA}/ask.pem"),
        format!("{DATA}/ark.pem"),
    );
    let err = grant(&[
        "--expect",
        &expectation(),
        "--vcek",
        &vcek,
        "--ask",
        &ask,
        "--ark",
        &ark,
        "--trust-given-ark",
    ]);
    assert!(err.contains("trusting the given ARK"), "{err}");
    assert!(err.contains("no-request"), "{err}");
}
