//! The KBS protocol 0.4.0 handshake (Request-Challenge-Attestation-Response) and the resource fetch,
//! over a [`Transport`]. Message types are `kbs-types`' (Request, Challenge, Attestation); the reply
//! JWE is parsed by [`super::jwe`] from the raw `protected` string (kbs-types' `Response` re-encodes
//! the header, which would make the AAD depend on a serializer's member order).
//!
//! Steps, each named in errors:
//! 1. `auth`: `POST /kbs/v0/auth` `{"version":"0.4.0","tee":<tee>,"extra-params":{...}}`; the reply is
//!    a challenge `{"nonce","extra-params"}` and a `kbs-session-id` cookie.
//! 2. `attest`: `POST /kbs/v0/attest` with the cookie and
//!    `{"init-data":null,"runtime-data":{"nonce","tee-pubkey"},"tee-evidence":{"primary_evidence",
//!    "additional_evidence":""}}`; the evidence's report data is SHA-384 of the RFC 8785 (JCS) form of
//!    `{"additional-evidence":"","nonce":<nonce>,"tee-pubkey":<jwk>}`, zero-padded to 64 bytes.
//! 3. `resource`: `GET /kbs/v0/resource/<repo>/<type>/<tag>` with the cookie; the reply is a JWE to
//!    the tee-pubkey.
//!
//! Run against the real Trustee KBS (78962cd4) by tests/kbs_interop.rs; its replies are recorded in
//! tests/data/kbs/ and the KBS test double is held to them (docs/keys.md). The real KBS answers every
//! refusal with 401 and names it in the error `type` (`PolicyDeny`, `TokenNotFound`,
//! `PluginInternalError` for a missing resource, `AttestationError` at auth and attest).

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use kbs_types::{Attestation, Challenge, CompositeEvidence, Request, RuntimeData, Tee, TeePubKey};
use serde::Deserialize;
use sha2::{Digest, Sha384};
use zeroize::Zeroizing;

use super::binding::ResourcePath;
use super::jwe::EphemeralKey;
use super::{BrokerError, Step};
use crate::attest::{Evidence, EvidenceKind, EvidenceSource, REPORT_DATA_LEN, ReportData};

/// The protocol version this client speaks (Trustee KBS requires an exact match).
pub const PROTOCOL_VERSION: &str = "0.4.0";
/// The session cookie the KBS sets at `auth` and reads afterwards.
pub const SESSION_COOKIE: &str = "kbs-session-id";
/// The runtime-data hash this client uses (Trustee's default for every TEE but IBM SE).
pub const HASH_ALGORITHM: &str = "sha384";

/// One HTTP exchange as the protocol sees it.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    /// The values of `Set-Cookie` headers.
    pub set_cookies: Vec<String>,
    /// The `Content-Type` header, if any (Trustee sends `application/json` with JSON replies and none
    /// with error bodies); kept for transcripts, the protocol does not depend on it.
    pub content_type: Option<String>,
    /// At most [`super::jwe::MAX_REPLY_LEN`] bytes (the transport refuses longer bodies).
    pub body: Vec<u8>,
}

/// The network under the protocol: one implementation over HTTP(S) ([`super::http::HttpTransport`]);
/// tests drive the same code against a real server (tests/kbs_double).
pub trait Transport: Send + Sync {
    /// The base URL, for messages.
    fn url(&self) -> &str;
    /// `POST <base><path>` with a JSON body; `Err` is "no HTTP answer" (refused, reset, timed out).
    fn post_json(&self, path: &str, cookie: Option<&str>, body: &[u8]) -> Result<Reply, String>;
    /// `GET <base><path>`.
    fn get(&self, path: &str, cookie: Option<&str>) -> Result<Reply, String>;
}

/// How often and how patiently a step is retried when the broker does not answer (or answers 5xx).
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    /// Total attempts per step, at least 1.
    pub attempts: u32,
    /// The pause before the second attempt; doubled before each further one.
    pub backoff: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Self {
            attempts: 3,
            backoff: Duration::from_millis(250),
        }
    }
}

/// The report data that binds a session: SHA-384 of the JCS form of the runtime data, zero-padded.
pub fn report_data(nonce: &str, tee_pubkey: &TeePubKey, additional_evidence: &str) -> ReportData {
    let runtime = serde_json::json!({
        "tee-pubkey": tee_pubkey,
        "nonce": nonce,
        "additional-evidence": additional_evidence,
    });
    let canonical = serde_json_canonicalizer::to_vec(&runtime)
        .expect("a JSON value of strings always canonicalizes");
    let digest = Sha384::digest(&canonical);
    let mut out = [0u8; REPORT_DATA_LEN];
    out[..digest.len()].copy_from_slice(&digest);
    out
}

/// The `tee` string the KBS is told for this kind of evidence.
pub fn tee_of(kind: EvidenceKind) -> Tee {
    match kind {
        EvidenceKind::Snp => Tee::Snp,
        EvidenceKind::Tdx => Tee::Tdx,
        // Trustee verifies a TPM quote under its `tpm` verifier; kbs-types 0.18 names it `Tpm`.
        EvidenceKind::Tpm => Tee::Tpm,
        EvidenceKind::Sample => Tee::Sample,
    }
}

/// The evidence body as the KBS's verifier takes it. Trustee's `sample` verifier compares the decoded
/// `report_data` with the 48-byte digest exactly, so sample evidence carries the digest unpadded; the
/// hardware verifiers compare the digest with the start of the 64-byte field.
pub fn primary_evidence(evidence: &Evidence) -> Result<serde_json::Value, String> {
    let mut value: serde_json::Value = serde_json::from_slice(&evidence.body)
        .map_err(|_| format!("{:?} evidence body is not JSON", evidence.kind))?;
    if evidence.kind == EvidenceKind::Sample {
        let digest = &evidence.report_data[..Sha384::output_size()];
        value["report_data"] = serde_json::Value::String(STANDARD.encode(digest));
    }
    Ok(value)
}

/// The error body Trustee sends with 4xx answers (`kbs_types::ErrorInformation`).
#[derive(Deserialize)]
struct ErrorInformation {
    #[serde(rename = "type", default)]
    error_type: String,
    #[serde(default)]
    detail: String,
}

/// The last path segment of an error's `type` and its detail, printable and bounded (never a body of
/// a successful reply).
pub fn error_summary(body: &[u8]) -> String {
    let clean = |s: &str| -> String { s.chars().filter(|c| !c.is_control()).take(200).collect() };
    match serde_json::from_slice::<ErrorInformation>(body) {
        Ok(info) => {
            let kind = info.error_type.rsplit('/').next().unwrap_or_default();
            format!("{}: {}", clean(kind), clean(&info.detail))
        }
        Err(_) => format!("{} bytes, not a KBS error body", body.len()),
    }
}

/// The error type name of a 4xx body, if it is a KBS error body.
fn error_type(body: &[u8]) -> Option<String> {
    serde_json::from_slice::<ErrorInformation>(body)
        .ok()
        .map(|i| {
            i.error_type
                .rsplit('/')
                .next()
                .unwrap_or_default()
                .to_owned()
        })
}

/// The session id from `Set-Cookie` values (`kbs-session-id=<id>; ...`).
pub fn session_cookie(set_cookies: &[String]) -> Option<String> {
    set_cookies.iter().find_map(|c| {
        let first = c.split(';').next()?.trim();
        let (name, value) = first.split_once('=')?;
        (name.trim() == SESSION_COOKIE && !value.is_empty() && value.len() <= 256)
            .then(|| value.trim_matches('"').to_owned())
    })
}

/// Parses an `auth` reply body into the challenge nonce. The nonce is opaque to the client (Trustee
/// sends 32 random bytes in base64); it is bounded so a broker cannot make evidence requests huge.
pub fn parse_challenge(body: &[u8]) -> Result<Challenge, String> {
    let challenge: Challenge =
        serde_json::from_slice(body).map_err(|_| "the challenge is not KBS challenge JSON")?;
    if challenge.nonce.is_empty() || challenge.nonce.len() > 1024 {
        return Err(format!(
            "the challenge nonce is {} bytes (1..=1024 are accepted)",
            challenge.nonce.len()
        ));
    }
    if let Some(selected) = challenge
        .extra_params
        .get("selected-hash-algorithm")
        .and_then(|v| v.as_str())
        && !selected.eq_ignore_ascii_case(HASH_ALGORITHM)
    {
        return Err(format!(
            "the broker selected hash {selected:?}; this client binds with {HASH_ALGORITHM}"
        ));
    }
    Ok(challenge)
}

/// A KBS client over one transport.
pub struct KbsClient {
    transport: Box<dyn Transport>,
    retry: Retry,
}

impl KbsClient {
    pub fn new(transport: Box<dyn Transport>, retry: Retry) -> Self {
        Self { transport, retry }
    }

    pub fn url(&self) -> &str {
        self.transport.url()
    }

    fn exchange(
        &self,
        step: Step,
        send: impl Fn(&dyn Transport) -> Result<Reply, String>,
    ) -> Result<Reply, BrokerError> {
        let mut pause = self.retry.backoff;
        let mut last = String::new();
        for attempt in 0..self.retry.attempts.max(1) {
            if attempt > 0 {
                std::thread::sleep(pause);
                pause = pause.saturating_mul(2);
            }
            match send(self.transport.as_ref()) {
                Ok(reply) if reply.status >= 500 => {
                    last = format!("HTTP {}: {}", reply.status, error_summary(&reply.body));
                }
                Ok(reply) => return Ok(reply),
                Err(reason) => last = reason,
            }
        }
        Err(BrokerError::Unreachable {
            url: self.url().to_owned(),
            step,
            attempts: self.retry.attempts.max(1),
            reason: last,
        })
    }

    fn protocol(&self, step: Step, reason: impl Into<String>) -> BrokerError {
        BrokerError::Protocol {
            url: self.url().to_owned(),
            step,
            reason: reason.into(),
        }
    }

    /// Attests with `evidence` and fetches `resource` under a fresh ephemeral key; the plaintext
    /// stays in zeroizing memory.
    pub fn fetch_resource(
        &self,
        evidence: &dyn EvidenceSource,
        resource: &ResourcePath,
    ) -> Result<Zeroizing<Vec<u8>>, BrokerError> {
        let key =
            EphemeralKey::generate().map_err(|e| self.protocol(Step::Attest, e.to_string()))?;
        self.fetch_resource_with_key(evidence, resource, key)
    }

    /// [`Self::fetch_resource`] with a caller's session key. Only for recording transcripts whose
    /// JWE a later test decrypts (tests/kbs_interop.rs): a node always uses `fetch_resource`, which
    /// draws a fresh key per session.
    pub fn fetch_resource_with_key(
        &self,
        evidence: &dyn EvidenceSource,
        resource: &ResourcePath,
        key: EphemeralKey,
    ) -> Result<Zeroizing<Vec<u8>>, BrokerError> {
        // 1. auth
        let request = Request {
            version: PROTOCOL_VERSION.to_owned(),
            tee: tee_of(evidence.kind()),
            extra_params: serde_json::json!({ "supported-hash-algorithms": [HASH_ALGORITHM] }),
        };
        let body =
            serde_json::to_vec(&request).map_err(|e| self.protocol(Step::Auth, e.to_string()))?;
        let reply = self.exchange(Step::Auth, |t| t.post_json("/kbs/v0/auth", None, &body))?;
        if reply.status != 200 {
            return Err(self.protocol(
                Step::Auth,
                format!("HTTP {} ({})", reply.status, error_summary(&reply.body)),
            ));
        }
        let challenge = parse_challenge(&reply.body).map_err(|e| self.protocol(Step::Auth, e))?;
        let cookie = session_cookie(&reply.set_cookies)
            .ok_or_else(|| self.protocol(Step::Auth, format!("no {SESSION_COOKIE} cookie")))?;
        let cookie = format!("{SESSION_COOKIE}={cookie}");

        // 2. attest
        let tee_pubkey = key.tee_pubkey();
        let data = report_data(&challenge.nonce, &tee_pubkey, "");
        let evidence = evidence.evidence(&data)?;
        let attestation = Attestation {
            init_data: None,
            runtime_data: RuntimeData {
                nonce: challenge.nonce.clone(),
                tee_pubkey,
            },
            tee_evidence: CompositeEvidence {
                primary_evidence: primary_evidence(&evidence)
                    .map_err(|e| self.protocol(Step::Attest, e))?,
                additional_evidence: String::new(),
            },
        };
        let body = serde_json::to_vec(&attestation)
            .map_err(|e| self.protocol(Step::Attest, e.to_string()))?;
        let reply = self.exchange(Step::Attest, |t| {
            t.post_json("/kbs/v0/attest", Some(&cookie), &body)
        })?;
        match reply.status {
            200 => {}
            401 => {
                return Err(BrokerError::AttestationRefused {
                    url: self.url().to_owned(),
                    step: Step::Attest,
                    detail: error_summary(&reply.body),
                });
            }
            other => {
                return Err(self.protocol(
                    Step::Attest,
                    format!("HTTP {other} ({})", error_summary(&reply.body)),
                ));
            }
        }

        // 3. resource
        let path = format!("/kbs/v0/resource/{resource}");
        let reply = self.exchange(Step::Resource, |t| t.get(&path, Some(&cookie)))?;
        let url = self.url().to_owned();
        let resource_name = resource.to_string();
        match reply.status {
            200 => key.decrypt(&reply.body).map_err(|e| BrokerError::Resource {
                url,
                resource: resource_name,
                reason: e.to_string(),
            }),
            403 => Err(BrokerError::PolicyDenied {
                url,
                resource: resource_name,
                detail: error_summary(&reply.body),
            }),
            404 => Err(BrokerError::NotFound {
                url,
                resource: resource_name,
                detail: error_summary(&reply.body),
            }),
            // Trustee answers most refusals with 401 and names them in the error type.
            401 => match error_type(&reply.body).as_deref() {
                Some("PolicyDeny") => Err(BrokerError::PolicyDenied {
                    url,
                    resource: resource_name,
                    detail: error_summary(&reply.body),
                }),
                Some("TokenNotFound") | Some("TokenVerifierError") => {
                    Err(BrokerError::AttestationRefused {
                        url,
                        step: Step::Resource,
                        detail: error_summary(&reply.body),
                    })
                }
                // The real KBS (78962cd4) answers a resource that does not exist this way, and
                // a storage failure too: say so, since the detail alone names no cause.
                Some("PluginInternalError") => Err(BrokerError::ResourceRefused {
                    url,
                    resource: resource_name,
                    detail: format!(
                        "{} (the broker's answer for a resource it does not hold, or cannot read)",
                        error_summary(&reply.body)
                    ),
                }),
                _ => Err(BrokerError::ResourceRefused {
                    url,
                    resource: resource_name,
                    detail: error_summary(&reply.body),
                }),
            },
            other => Err(self.protocol(
                Step::Resource,
                format!("HTTP {other} ({})", error_summary(&reply.body)),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn report_data_is_sha384_of_the_jcs_runtime_data() {
        let pk = TeePubKey::EC {
            crv: "P-256".into(),
            alg: "ECDH-ES+A256KW".into(),
            x: "X".into(),
            y: "Y".into(),
        };
        let data = report_data("N", &pk, "");
        // JCS sorts members by code point: additional-evidence, nonce, tee-pubkey; the JWK's too.
        let canonical = br#"{"additional-evidence":"","nonce":"N","tee-pubkey":{"alg":"ECDH-ES+A256KW","crv":"P-256","kty":"EC","x":"X","y":"Y"}}"#;
        assert_eq!(&data[..48], Sha384::digest(canonical).as_slice());
        assert_eq!(&data[48..], &[0u8; 16]);
    }

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let cookies = vec![
            "other=1; Path=/".to_owned(),
            "kbs-session-id=abc-123; Expires=Tue, 01 Dec 2026 15:00:00 GMT".to_owned(),
        ];
        assert_eq!(session_cookie(&cookies).as_deref(), Some("abc-123"));
        assert_eq!(session_cookie(&["kbs-session-id=".to_owned()]), None);
    }

    #[test]
    fn a_challenge_with_another_hash_is_refused() {
        let body = br#"{"nonce":"abc","extra-params":{"selected-hash-algorithm":"sha256"}}"#;
        assert!(parse_challenge(body).unwrap_err().contains("sha256"));
        let body = br#"{"nonce":"abc","extra-params":""}"#;
        assert_eq!(parse_challenge(body).unwrap().nonce, "abc");
    }

    #[test]
    fn error_summaries_name_the_type_and_strip_control_characters() {
        let body = br#"{"type":"https://github.com/confidential-containers/kbs/errors/PolicyDeny","detail":"Access denied\nby policy"}"#;
        assert_eq!(error_summary(body), "PolicyDeny: Access deniedby policy");
        assert_eq!(error_summary(b"secret"), "6 bytes, not a KBS error body");
    }

    proptest! {
        #[test]
        fn reply_parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_challenge(&bytes);
            let _ = error_summary(&bytes);
            let text = String::from_utf8_lossy(&bytes).into_owned();
            let _ = session_cookie(&[text]);
        }

        #[test]
        fn error_summaries_are_bounded(detail in ".{0,2000}") {
            let body = serde_json::to_vec(&serde_json::json!({"type": "x/PolicyDeny", "detail": detail})).unwrap();
            prop_assert!(error_summary(&body).chars().count() <= 200 + 2 + 10);
        }
    }
}
