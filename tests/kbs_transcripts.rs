//! The KBS test double against the transcripts recorded from the real Trustee KBS (tests/data/kbs/,
//! written by tests/kbs_interop.rs): every scenario driven through the double gives, exchange by
//! exchange, the real KBS's status, headers, cookie and body shapes; and the sealcsi client parses the
//! recorded real replies (the challenge, the cookie, the error bodies, and the JWE, which it decrypts
//! with the recorded test session key).

#[path = "kbs_double/mod.rs"]
mod kbs_double;

use std::path::PathBuf;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use kbs_double::transcript::{self, Recording, Scenario};
use kbs_double::{KbsDouble, Policy};
use sealcsi::broker::jwe::EphemeralKey;
use sealcsi::broker::rcar;
use sealcsi::broker::{HttpOptions, HttpTransport};
use serde_json::Value;

fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/kbs")
}

fn recorded(scenario: Scenario) -> Value {
    let path = data_dir().join(format!("{}.json", scenario.name()));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (record it with tests/kbs_interop.rs)",
            path.display()
        )
    });
    let file: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(file["scenario"], scenario.name(), "{}", path.display());
    assert!(
        file["recorded_from"]
            .as_str()
            .is_some_and(|r| r.starts_with("real Trustee KBS")),
        "{}",
        path.display()
    );
    file
}

fn exchanges(file: &Value) -> &[Value] {
    file["exchanges"].as_array().expect("exchanges")
}

fn unhex(file: &Value, member: &str) -> Vec<u8> {
    hex::decode(file[member].as_str().expect(member)).expect(member)
}

/// The double, set up as the interop test sets up the real KBS before `scenario`.
fn double_for(scenario: Scenario, secret: &[u8]) -> KbsDouble {
    let double = KbsDouble::start(0);
    double.put_resource(transcript::RESOURCE, secret);
    double.set_policy(&if scenario == Scenario::Deny {
        Policy::deny_all()
    } else {
        Policy::allow_sample()
    });
    double
}

#[test]
fn the_double_answers_every_recorded_scenario_as_the_real_kbs_did() {
    for scenario in Scenario::ALL {
        let real = recorded(scenario);
        let secret = [0x5a; 32];
        let double = double_for(scenario, &secret);
        let opts = HttpOptions {
            insecure_http: true,
            ..HttpOptions::default()
        };
        let rec = Recording::new(HttpTransport::new(&double.url(), &opts).unwrap());
        let got = transcript::drive(scenario, &rec, EphemeralKey::generate().unwrap(), &secret);
        transcript::assert_same_shape(scenario.name(), exchanges(&real), &got);
    }
}

/// A change to a transcript, standing for a double that drifted.
type Drift = fn(&mut Vec<Value>);

#[test]
fn a_drifted_double_would_fail_the_comparison() {
    let real = recorded(Scenario::Allow);
    let want = exchanges(&real);
    let drifts: [(&str, Drift); 6] = [
        ("a reply member dropped", |x| {
            x[0]["reply"]
                .as_object_mut()
                .unwrap()
                .remove("extra-params");
        }),
        ("another status", |x| x[2]["status"] = 403.into()),
        ("no cookie again at attest", |x| {
            x[1]["set_cookie"] = Value::Array(vec![])
        }),
        ("another cookie name", |x| {
            x[0]["set_cookie"][0] = "session=abc; Expires=x".into()
        }),
        ("a content type on the JWE", |x| {
            x[2]["content_type"] = "text/plain".into()
        }),
        ("another JWE algorithm", |x| {
            // {"alg":"RSA-OAEP-256","enc":"A256GCM"}
            x[2]["reply"]["protected"] =
                "eyJhbGciOiJSU0EtT0FFUC0yNTYiLCJlbmMiOiJBMjU2R0NNIn0".into()
        }),
    ];
    for (what, drift) in drifts {
        let mut got = want.to_vec();
        drift(&mut got);
        let result =
            std::panic::catch_unwind(|| transcript::assert_same_shape("allow", want, &got));
        assert!(result.is_err(), "{what} was not noticed");
    }
    transcript::assert_same_shape("allow", want, want);
}

#[test]
fn the_client_decrypts_the_recorded_real_jwe_with_the_recorded_session_key() {
    let file = recorded(Scenario::Allow);
    let [auth, attest, resource] = exchanges(&file) else {
        panic!("allow has three exchanges")
    };
    let key = EphemeralKey::from_secret_bytes(&unhex(&file, "test_session_key")).unwrap();
    // The recorded attest request carried this key's public half, as the client builds it.
    let sent_pubkey = &attest["request"]["runtime-data"]["tee-pubkey"];
    assert_eq!(
        sent_pubkey,
        &serde_json::to_value(key.tee_pubkey()).unwrap()
    );
    // The real KBS accepted report data the client's binding function reproduces.
    let nonce = auth["reply"]["nonce"].as_str().unwrap();
    assert_eq!(attest["request"]["runtime-data"]["nonce"], nonce);
    let pubkey = serde_json::from_value(sent_pubkey.clone()).unwrap();
    let bound = rcar::report_data(nonce, &pubkey, "");
    let sent = attest["request"]["tee-evidence"]["primary_evidence"]["report_data"]
        .as_str()
        .unwrap();
    assert_eq!(STANDARD.decode(sent).unwrap(), &bound[..48]);
    assert_eq!(attest["status"], 200);
    // The real KBS's JWE decrypts to the uploaded test resource.
    assert_eq!(resource["status"], 200);
    let jwe = serde_json::to_vec(&resource["reply"]).unwrap();
    let plain = key.decrypt(&jwe).expect("the real KBS's JWE decrypts");
    assert_eq!(plain.as_slice(), unhex(&file, "resource").as_slice());
    // And to no other key.
    assert!(EphemeralKey::generate().unwrap().decrypt(&jwe).is_err());
}

#[test]
fn the_client_parses_every_recorded_real_reply() {
    let mut seen_types = Vec::new();
    for scenario in Scenario::ALL {
        let file = recorded(scenario);
        for exchange in exchanges(&file) {
            let body = serde_json::to_vec(&exchange["reply"]).unwrap();
            let cookies: Vec<String> = exchange["set_cookie"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c.as_str().unwrap().to_owned())
                .collect();
            let path = exchange["path"].as_str().unwrap();
            match exchange["status"].as_u64().unwrap() {
                200 if path == "/kbs/v0/auth" => {
                    let challenge = rcar::parse_challenge(&body).unwrap();
                    assert_eq!(STANDARD.decode(&challenge.nonce).unwrap().len(), 32);
                    assert!(rcar::session_cookie(&cookies).is_some(), "{scenario:?}");
                }
                200 if path == "/kbs/v0/attest" => {
                    let token = exchange["reply"]["token"].as_str().unwrap();
                    assert_eq!(token.split('.').count(), 3, "a compact JWT");
                    // The real KBS sets the same session again.
                    assert!(rcar::session_cookie(&cookies).is_some(), "{scenario:?}");
                }
                200 => assert!(path.starts_with("/kbs/v0/resource/")),
                401 => {
                    let summary = rcar::error_summary(&body);
                    let kind = summary.split(':').next().unwrap().to_owned();
                    assert!(
                        !summary.contains("not a KBS error body"),
                        "{scenario:?}: {summary}"
                    );
                    seen_types.push(kind);
                }
                other => panic!("{scenario:?}: unexpected status {other}"),
            }
        }
    }
    seen_types.sort();
    seen_types.dedup();
    assert_eq!(
        seen_types,
        [
            "AttestationError",
            "PluginInternalError",
            "PolicyDeny",
            "TokenNotFound"
        ]
    );
}

/// fuzz/seeds/kbs_reply/ holds the recorded real replies (compact JSON) and Set-Cookie values, as
/// seeds for fuzz/fuzz_targets/kbs_reply.rs; they must stay the transcripts' replies.
#[test]
fn the_fuzz_seeds_are_the_recorded_real_replies() {
    let seeds = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/kbs_reply");
    let mut expected = Vec::new();
    for scenario in Scenario::ALL {
        let file = recorded(scenario);
        for (i, exchange) in exchanges(&file).iter().enumerate() {
            let path = exchange["path"].as_str().unwrap();
            let step = path.split('/').nth(3).unwrap();
            let name = format!("{}-{i}-{step}-{}", scenario.name(), exchange["status"]);
            expected.push((
                format!("{name}.json"),
                serde_json::to_string(&exchange["reply"]).unwrap(),
            ));
            for (j, cookie) in exchange["set_cookie"]
                .as_array()
                .unwrap()
                .iter()
                .enumerate()
            {
                expected.push((
                    format!("{name}-set-cookie-{j}.txt"),
                    cookie.as_str().unwrap().to_owned(),
                ));
            }
        }
    }
    for (name, content) in &expected {
        let got = std::fs::read_to_string(seeds.join(name))
            .unwrap_or_else(|e| panic!("seed {name}: {e}"));
        assert_eq!(&got, content, "seed {name}");
    }
    let present = std::fs::read_dir(&seeds).unwrap().count();
    assert_eq!(
        present,
        expected.len(),
        "stale files in {}",
        seeds.display()
    );
}
