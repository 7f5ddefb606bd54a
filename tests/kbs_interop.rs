//! By hand: the KBS client against the REAL Trustee KBS (built outside this repository), started and
//! stopped by the test on 127.0.0.1 with its builtin attestation service, over plain http and HTTPS.
//!
//! ```text
//! SEALCSI_TRUSTEE_KBS=/path/to/kbs [SEALCSI_KBS_RECORD_DIR=tests/data/kbs] \
//!     cargo test --test kbs_interop -- --ignored --nocapture
//! ```
//!
//! Without `SEALCSI_TRUSTEE_KBS` it prints one line and passes. With it: uploads a 32-byte test
//! resource and an allow-all resource policy (its own Rego) through the admin API
//! (`authorization_mode = "InsecureAllowAll"`), runs the scenarios of tests/kbs_double/transcript.rs
//! (allowed release with `sample` evidence, missing resource, evidence over wrong report data, a
//! resource request without a session, a protocol version mismatch), then a deny-all policy and the
//! denied release. A second test starts the KBS over HTTPS with a certificate made for the run and
//! checks the release through TLS with that CA bundle, and the refusal without it. With
//! `SEALCSI_KBS_RECORD_DIR` it writes each scenario's exchanges there as JSON
//! (the format is in transcript.rs); `SEALCSI_TRUSTEE_KBS_REV` names the KBS revision in them. The
//! resource and the recorded session key are random test data, not secrets.

#[path = "kbs_double/mod.rs"]
mod kbs_double;

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use kbs_double::transcript::{self, Recording, Scenario};
use sealcsi::broker::jwe::EphemeralKey;
use sealcsi::broker::{HttpOptions, HttpTransport, Transport};
use serde_json::json;

struct Kbs(Child);

impl Drop for Kbs {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts the KBS on 127.0.0.1:`port`: plain http, or HTTPS with `tls` (certificate and key PEM).
fn start(binary: &Path, dir: &Path, port: u16, tls: Option<(&str, &str)>) -> Kbs {
    let http_server = match tls {
        None => "insecure_http = true".to_owned(),
        Some((cert, key)) => {
            std::fs::write(dir.join("kbs-cert.pem"), cert).unwrap();
            std::fs::write(dir.join("kbs-key.pem"), key).unwrap();
            format!(
                "insecure_http = false\ncertificate = \"{}\"\nprivate_key = \"{}\"",
                dir.join("kbs-cert.pem").display(),
                dir.join("kbs-key.pem").display()
            )
        }
    };
    let config = format!(
        "[http_server]\nsockets = [\"127.0.0.1:{port}\"]\n{http_server}\n\n\
         [attestation_token]\ninsecure_header_jwk = true\n\n\
         [attestation_service]\ntype = \"coco_as_builtin\"\n\n\
         [attestation_service.attestation_token_broker]\nduration_min = 5\n\n\
         [attestation_service.rvps_config]\ntype = \"BuiltIn\"\n\n\
         [admin]\nauthorization_mode = \"InsecureAllowAll\"\n\n\
         [storage_backend]\nstorage_type = \"LocalFs\"\n\n\
         [storage_backend.backends.local_fs]\ndir_path = \"{}\"\n\n\
         [[plugins]]\nname = \"resource\"\nstorage_backend_type = \"kvstorage\"\n",
        dir.join("storage").display()
    );
    let path = dir.join("kbs.toml");
    std::fs::write(&path, config).unwrap();
    let child = Command::new(binary)
        .arg("--config-file")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("kbs.log")).unwrap())
        .spawn()
        .expect("start the KBS");
    let kbs = Kbs(child);
    for _ in 0..300 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return kbs;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "the KBS did not listen on 127.0.0.1:{port} within 30 s; log:\n{}",
        std::fs::read_to_string(dir.join("kbs.log")).unwrap_or_default()
    );
}

fn admin(transport: &HttpTransport, path: &str, body: &[u8]) {
    let reply = transport
        .post_json(path, None, body)
        .expect("admin request");
    assert_eq!(
        reply.status,
        200,
        "admin {path}: {}",
        String::from_utf8_lossy(&reply.body)
    );
}

fn set_policy(transport: &HttpTransport, rego: &str) {
    let body = json!({ "policy": URL_SAFE_NO_PAD.encode(rego) }).to_string();
    admin(transport, "/kbs/v0/resource-policy", body.as_bytes());
}

/// Uploads a random 32-byte resource and the allow-all policy to a fresh KBS; returns the resource.
fn seed_allowing(transport: &HttpTransport) -> [u8; 32] {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).unwrap();
    admin(
        transport,
        &format!("/kbs/v0/resource/{}", transcript::RESOURCE),
        &secret,
    );
    set_policy(transport, "package policy\n\ndefault allow = true\n");
    secret
}

/// A session key whose private half the transcript keeps (test data), so the recorded JWE can be
/// decrypted later.
fn recorded_key() -> ([u8; 32], EphemeralKey) {
    loop {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).unwrap();
        if let Ok(key) = EphemeralKey::from_secret_bytes(&bytes) {
            return (bytes, key);
        }
    }
}

#[test]
#[ignore = "by hand: needs the real Trustee KBS in SEALCSI_TRUSTEE_KBS"]
fn the_client_interoperates_with_the_real_trustee_kbs() {
    let Some(binary) = std::env::var_os("SEALCSI_TRUSTEE_KBS") else {
        println!(
            "kbs_interop: SEALCSI_TRUSTEE_KBS is not set: the real-KBS interop test did not run"
        );
        return;
    };
    let record = std::env::var_os("SEALCSI_KBS_RECORD_DIR").map(std::path::PathBuf::from);
    let revision =
        std::env::var("SEALCSI_TRUSTEE_KBS_REV").unwrap_or_else(|_| "unknown revision".into());
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _kbs = start(Path::new(&binary), dir.path(), port, None);
    let url = format!("http://127.0.0.1:{port}");
    let opts = HttpOptions {
        insecure_http: true,
        ..HttpOptions::default()
    };
    let plain = HttpTransport::new(&url, &opts).unwrap();
    let secret = seed_allowing(&plain);

    let rec = Recording::new(HttpTransport::new(&url, &opts).unwrap());
    for scenario in Scenario::ALL {
        if scenario == Scenario::Deny {
            set_policy(&plain, "package policy\n\ndefault allow = false\n");
        }
        let (key_bytes, key) = recorded_key();
        let exchanges = transcript::drive(scenario, &rec, key, &secret);
        println!(
            "kbs_interop: {}: as expected, {} exchanges",
            scenario.name(),
            exchanges.len()
        );
        if let Some(dir) = &record {
            let mut file = json!({
                "scenario": scenario.name(),
                "recorded_from": format!(
                    "real Trustee KBS ({revision}), builtin attestation service, sample verifier, \
                     plain http on 127.0.0.1"
                ),
                "exchanges": exchanges,
            });
            if scenario == Scenario::Allow {
                file["test_session_key"] = json!(hex::encode(key_bytes));
                file["resource"] = json!(hex::encode(secret));
            }
            std::fs::create_dir_all(dir).unwrap();
            let text = serde_json::to_string_pretty(&file).unwrap();
            std::fs::write(dir.join(format!("{}.json", scenario.name())), text + "\n").unwrap();
        }
    }
}

#[test]
#[ignore = "by hand: needs the real Trustee KBS in SEALCSI_TRUSTEE_KBS"]
fn the_client_interoperates_with_the_real_trustee_kbs_over_https() {
    let Some(binary) = std::env::var_os("SEALCSI_TRUSTEE_KBS") else {
        println!(
            "kbs_interop: SEALCSI_TRUSTEE_KBS is not set: the real-KBS HTTPS test did not run"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let (cert, key) = kbs_double::test_certificate(&["127.0.0.1"]);
    let _kbs = start(Path::new(&binary), dir.path(), port, Some((&cert, &key)));
    let url = format!("https://127.0.0.1:{port}");
    let bundle = dir.path().join("ca.pem");
    std::fs::write(&bundle, &cert).unwrap();
    let opts = HttpOptions {
        ca_bundle: Some(bundle),
        ..HttpOptions::default()
    };
    let secret = seed_allowing(&HttpTransport::new(&url, &opts).unwrap());
    let rec = Recording::new(HttpTransport::new(&url, &opts).unwrap());
    let (_, session_key) = recorded_key();
    let exchanges = transcript::drive(Scenario::Allow, &rec, session_key, &secret);
    println!(
        "kbs_interop: allow over HTTPS: as expected, {} exchanges",
        exchanges.len()
    );
    // Without the CA bundle (the system's roots do not know the certificate): refused.
    let untrusting = HttpTransport::new(&url, &HttpOptions::default()).unwrap();
    let text = untrusting
        .post_json("/kbs/v0/auth", None, b"{}")
        .expect_err("an unknown issuer is refused");
    assert!(text.contains("invalid peer certificate"), "{text}");
    println!("kbs_interop: HTTPS without the CA bundle: refused ({text})");
}
