//! Transcripts of KBS exchanges: a recording transport, the scenarios both the real Trustee KBS
//! (tests/kbs_interop.rs, by hand) and the double (tests/kbs_transcripts.rs, always) are driven
//! through, and the shape comparison of two transcripts.
//!
//! A transcript file (tests/data/kbs/<scenario>.json) is one JSON object:
//!
//! ```text
//! {"scenario": <name>, "recorded_from": <which KBS>,
//!  "test_session_key": <hex P-256 scalar>?, "resource": <hex>?,   (allow only: test data)
//!  "exchanges": [{"method", "path", "cookie_sent": bool, "request": <JSON body or null>,
//!                 "status", "content_type": <string or null>, "set_cookie": [<values>],
//!                 "reply": <JSON body, or {"non_json_bytes": n}>}]}
//! ```

use std::sync::{Arc, Mutex};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sealcsi::attest::{
    AttestError, Evidence, EvidenceKind, EvidenceSource, ReportData, SampleEvidence,
};
use sealcsi::broker::jwe::EphemeralKey;
use sealcsi::broker::rcar::Reply;
use sealcsi::broker::{BrokerError, KbsClient, ResourcePath, Retry, Transport};
use serde_json::{Map, Value, json};

/// The resource every scenario asks for (uploaded by the caller before `Allow` and `Deny`).
pub const RESOURCE: &str = "default/sealcsi/interop";
/// A resource no scenario uploads.
pub const MISSING: &str = "default/sealcsi/missing";

/// The scenarios, in the order the interop test runs them (the caller sets an allowing policy for
/// all but `Deny`, and a denying one for `Deny`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    Allow,
    Missing,
    WrongReportData,
    NoSession,
    VersionMismatch,
    Deny,
}

impl Scenario {
    pub const ALL: [Scenario; 6] = [
        Scenario::Allow,
        Scenario::Missing,
        Scenario::WrongReportData,
        Scenario::NoSession,
        Scenario::VersionMismatch,
        Scenario::Deny,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Allow => "allow",
            Scenario::Missing => "missing",
            Scenario::WrongReportData => "wrong-report-data",
            Scenario::NoSession => "no-session",
            Scenario::VersionMismatch => "version-mismatch",
            Scenario::Deny => "deny",
        }
    }
}

/// A transport that records every exchange; clones share the log.
#[derive(Clone)]
pub struct Recording {
    inner: Arc<dyn Transport>,
    log: Arc<Mutex<Vec<Value>>>,
}

fn body_json(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap_or_else(|_| json!({ "non_json_bytes": bytes.len() }))
}

impl Recording {
    pub fn new(inner: impl Transport + 'static) -> Self {
        Self {
            inner: Arc::new(inner),
            log: Arc::default(),
        }
    }

    /// The exchanges so far, and a fresh log.
    pub fn take(&self) -> Vec<Value> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }

    fn record(
        &self,
        method: &str,
        path: &str,
        cookie: Option<&str>,
        body: Option<&[u8]>,
        reply: &Result<Reply, String>,
    ) {
        let entry = match reply {
            Ok(r) => json!({
                "method": method, "path": path, "cookie_sent": cookie.is_some(),
                "request": body.map(body_json),
                "status": r.status, "content_type": r.content_type,
                "set_cookie": r.set_cookies, "reply": body_json(&r.body),
            }),
            Err(e) => json!({ "method": method, "path": path, "error": e }),
        };
        self.log.lock().unwrap().push(entry);
    }
}

impl Transport for Recording {
    fn url(&self) -> &str {
        self.inner.url()
    }
    fn post_json(&self, path: &str, cookie: Option<&str>, body: &[u8]) -> Result<Reply, String> {
        let reply = self.inner.post_json(path, cookie, body);
        self.record("POST", path, cookie, Some(body), &reply);
        reply
    }
    fn get(&self, path: &str, cookie: Option<&str>) -> Result<Reply, String> {
        let reply = self.inner.get(path, cookie);
        self.record("GET", path, cookie, None, &reply);
        reply
    }
}

/// Evidence over other report data than asked for (a replayed or forged report).
pub struct WrongReportData;

impl EvidenceSource for WrongReportData {
    fn kind(&self) -> EvidenceKind {
        EvidenceKind::Sample
    }
    fn is_simulated(&self) -> bool {
        true
    }
    fn evidence(&self, report_data: &ReportData) -> Result<Evidence, AttestError> {
        let mut other = *report_data;
        other[0] ^= 1;
        SampleEvidence::new("interop-node").evidence(&other)
    }
}

/// A client over `rec` that tries each step once (a scenario's transcript has one exchange per step).
pub fn client(rec: &Recording) -> KbsClient {
    KbsClient::new(
        Box::new(rec.clone()),
        Retry {
            attempts: 1,
            backoff: std::time::Duration::from_millis(1),
        },
    )
}

/// Runs `scenario` through `rec` and checks its outcome; `allow_key` is the session key of
/// `Allow`, `secret` the resource uploaded. Returns the exchanges.
pub fn drive(
    scenario: Scenario,
    rec: &Recording,
    allow_key: EphemeralKey,
    secret: &[u8],
) -> Vec<Value> {
    rec.take();
    let client = client(rec);
    let evidence = SampleEvidence::new("interop-node");
    let resource = ResourcePath::parse(RESOURCE).unwrap();
    match scenario {
        Scenario::Allow => {
            let got = client
                .fetch_resource_with_key(&evidence, &resource, allow_key)
                .expect("allowed release");
            assert_eq!(got.as_slice(), secret, "the released resource");
        }
        Scenario::Missing => {
            let missing = ResourcePath::parse(MISSING).unwrap();
            let err = client.fetch_resource(&evidence, &missing).unwrap_err();
            println!("transcript missing: {err}");
            assert!(matches!(err, BrokerError::ResourceRefused { .. }), "{err}");
            assert!(err.to_string().contains("does not hold"), "{err}");
        }
        Scenario::WrongReportData => {
            let err = client
                .fetch_resource(&WrongReportData, &resource)
                .unwrap_err();
            println!("transcript wrong-report-data: {err}");
            assert!(
                matches!(err, BrokerError::AttestationRefused { .. }),
                "{err}"
            );
            assert!(err.to_string().contains("401 at step attest"), "{err}");
        }
        Scenario::NoSession => {
            let reply = rec
                .get(&format!("/kbs/v0/resource/{RESOURCE}"), None)
                .expect("an answer");
            assert_eq!(reply.status, 401);
        }
        Scenario::VersionMismatch => {
            let body = json!({"version": "0.3.0", "tee": "sample", "extra-params": ""});
            let reply = rec
                .post_json("/kbs/v0/auth", None, body.to_string().as_bytes())
                .expect("an answer");
            assert_eq!(reply.status, 401);
        }
        Scenario::Deny => {
            let err = client.fetch_resource(&evidence, &resource).unwrap_err();
            println!("transcript deny: {err}");
            assert!(matches!(err, BrokerError::PolicyDenied { .. }), "{err}");
            assert!(!err.to_string().contains(&hex::encode(secret)), "{err}");
        }
    }
    rec.take()
}

/// Members whose values are protocol constants, compared exactly; every other string is compared
/// by its form.
const EXACT: &[&str] = &[
    "alg", "enc", "kty", "crv", "typ", "type", "version", "tee", "svn",
];

/// The form of a string: a compact JWS/JWT, base64 of either alphabet, empty, or other text.
fn string_form(s: &str) -> &'static str {
    let b64url = |p: &str| {
        !p.is_empty()
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    let parts: Vec<&str> = s.split('.').collect();
    if parts.len() == 3 && parts.iter().all(|p| b64url(p)) {
        "<jwt>"
    } else if s.is_empty() {
        "<empty>"
    } else if s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"+/=-_".contains(&b))
    {
        "<base64>"
    } else {
        "<text>"
    }
}

/// The shape of a JSON value: objects keep their keys, strings become their form (but members
/// named in [`EXACT`] keep their value), numbers, booleans and null their type. A JWE's
/// `protected` member is decoded and shaped as JSON.
pub fn shape(value: &Value) -> Value {
    shape_member(None, value)
}

fn shape_member(key: Option<&str>, value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), shape_member(Some(k), v)))
                .collect::<Map<_, _>>(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(|v| shape_member(key, v)).collect()),
        Value::String(s) if key.is_some_and(|k| EXACT.contains(&k)) => Value::String(s.clone()),
        Value::String(s) if key == Some("protected") => {
            let decoded = URL_SAFE_NO_PAD
                .decode(s)
                .ok()
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok());
            match decoded {
                Some(header) => json!({ "<decoded>": shape(&header) }),
                None => Value::String("<not a JWE header>".into()),
            }
        }
        Value::String(s) => Value::String(string_form(s).into()),
        Value::Number(_) => Value::String("<number>".into()),
        Value::Bool(_) => Value::String("<bool>".into()),
        Value::Null => Value::Null,
    }
}

/// A `Set-Cookie` value's shape: the cookie's name, the form of its value, its attribute names.
pub fn cookie_shape(cookie: &str) -> Value {
    let mut parts = cookie.split(';').map(str::trim);
    let (name, value) = parts
        .next()
        .and_then(|p| p.split_once('='))
        .unwrap_or(("<none>", ""));
    let attributes: Vec<String> = parts
        .map(|a| a.split('=').next().unwrap_or_default().to_ascii_lowercase())
        .collect();
    json!({"name": name, "value": string_form(value), "attributes": attributes})
}

/// The shape of one recorded exchange: everything the client or a reader could depend on.
pub fn exchange_shape(exchange: &Value) -> Value {
    let cookies: Vec<Value> = exchange["set_cookie"]
        .as_array()
        .map(|c| {
            c.iter()
                .filter_map(Value::as_str)
                .map(cookie_shape)
                .collect()
        })
        .unwrap_or_default();
    json!({
        "method": exchange["method"],
        "path": exchange["path"],
        "cookie_sent": exchange["cookie_sent"],
        "request": shape(&exchange["request"]),
        "status": exchange["status"],
        "content_type": exchange["content_type"],
        "set_cookie": cookies,
        "reply": shape(&exchange["reply"]),
        "error": exchange.get("error").map(|_| "<transport error>"),
    })
}

/// Panics, naming the first difference, unless `got` has the shape of `want` exchange by exchange.
pub fn assert_same_shape(scenario: &str, want: &[Value], got: &[Value]) {
    assert_eq!(
        want.len(),
        got.len(),
        "{scenario}: the real KBS had {} exchanges, the double {}",
        want.len(),
        got.len()
    );
    for (i, (w, g)) in want.iter().zip(got).enumerate() {
        let (w, g) = (exchange_shape(w), exchange_shape(g));
        assert_eq!(
            w,
            g,
            "{scenario}: exchange {i} differs (left: real KBS, right: double)\nreal: {}\ndouble: {}",
            serde_json::to_string_pretty(&w).unwrap(),
            serde_json::to_string_pretty(&g).unwrap()
        );
    }
}
