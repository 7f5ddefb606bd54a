//! A KBS test double: a real HTTP server on 127.0.0.1 that speaks Trustee KBS protocol 0.4.0 as the
//! real broker answers it. tests/kbs_transcripts.rs checks it, exchange by exchange, against the
//! transcripts recorded from the real KBS in tests/data/kbs/ (see [`transcript`]):
//!
//! - `POST /kbs/v0/auth`: version must be 0.4.0 (else 401 `AttestationError`); a fresh 32-byte
//!   base64 nonce, `extra-params` "", and a `kbs-session-id` cookie;
//! - `POST /kbs/v0/attest`: the session's nonce, then the report data checked: SHA-384 of the JCS form
//!   of `{"additional-evidence","nonce","tee-pubkey"}` must equal the `sample` evidence's decoded
//!   `report_data` exactly (Trustee's sample verifier); answers `{"token":<JWT-shaped>}` with the
//!   session cookie set again, or 401 `AttestationError` naming no cause (as the real KBS does);
//! - error replies carry the JSON body `{"type","detail"}` and no `Content-Type`, as the real KBS's;
//! - `GET /kbs/v0/resource/<repo>/<type>/<tag>`: an attested session, then the policy, then the
//!   resource as a JWE (ECDH-ES+A256KW, A256GCM) to the session's tee-pubkey. Refusals are 401 with
//!   Trustee's error types (`TokenNotFound`, `PolicyDeny`, `PluginInternalError` for a missing
//!   resource), as the real KBS answers;
//! - admin (bearer token): `POST /kbs/v0/resource/<path>` sets a resource (raw body),
//!   `POST /kbs/v0/resource-policy` `{"policy": base64url(<double policy JSON>)}` sets the policy.
//!   The double's policy is JSON `{"allow_tees":[...], "allow_identities":[...]?}`, not Rego: it stands
//!   for "allow sample" / "deny" as the tests upload them to the real KBS.
#![allow(dead_code)]

pub mod transcript;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use p256::elliptic_curve::sec1::{FromEncodedPoint, ToEncodedPoint};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha384};

pub const ADMIN_TOKEN: &str = "double-admin-token";
const ERROR_PREFIX: &str = "https://github.com/confidential-containers/kbs/errors";

/// The double's resource policy.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize)]
pub struct Policy {
    /// The `tee` values allowed (e.g. "sample"); empty: deny everything (Trustee's default denies
    /// sample).
    #[serde(default)]
    pub allow_tees: Vec<String>,
    /// When set, only sample evidence naming one of these simulated identities is allowed.
    #[serde(default)]
    pub allow_identities: Option<Vec<String>>,
}

impl Policy {
    pub fn allow_sample() -> Self {
        Self {
            allow_tees: vec!["sample".into()],
            allow_identities: None,
        }
    }
    pub fn deny_all() -> Self {
        Self::default()
    }
}

struct Session {
    nonce: String,
    tee: String,
    /// After a successful attest: the tee-pubkey and the claims.
    attested: Option<(Value, Value)>,
}

#[derive(Default)]
struct Inner {
    sessions: HashMap<String, Session>,
    resources: HashMap<String, Vec<u8>>,
    policy: Policy,
    /// Requests seen, as "METHOD path -> status" (no bodies).
    log: Vec<String>,
}

type Shared = Arc<Mutex<Inner>>;

/// A running double; dropped, it stops.
pub struct KbsDouble {
    pub addr: SocketAddr,
    /// Served over HTTPS with this certificate (PEM), or over plain HTTP.
    pub tls_cert_pem: Option<String>,
    inner: Shared,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn random(n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    getrandom::fill(&mut b).unwrap();
    b
}

/// An error reply as the real KBS sends it: the JSON body and no `Content-Type`.
fn error(status: StatusCode, kind: &str, detail: &str) -> Response {
    let body = json!({ "type": format!("{ERROR_PREFIX}/{kind}"), "detail": detail });
    let mut response = Response::new(axum::body::Body::from(body.to_string()));
    *response.status_mut() = status;
    response
}

/// The session cookie the real KBS sets at auth and again at attest.
fn session_set_cookie(id: &str) -> String {
    format!("kbs-session-id={id}; Expires=Tue, 01 Dec 2099 00:00:00 GMT")
}

/// A token of the real one's form (a compact JWT); the signature segment is random bytes, not a
/// signature: the client never reads the token, it only keeps the session cookie.
fn token(claims: &Value) -> String {
    let header = json!({"typ": "JWT", "alg": "ES256"});
    [
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string()),
        URL_SAFE_NO_PAD.encode(random(64)),
    ]
    .join(".")
}

fn session_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| {
            let (name, value) = c.trim().split_once('=')?;
            (name == "kbs-session-id").then(|| value.to_owned())
        })
}

async fn auth(State(s): State<Shared>, body: Bytes) -> Response {
    let refused = |why: &str| {
        error(
            StatusCode::UNAUTHORIZED,
            "AttestationError",
            &format!("Attestation error: RCAR handshake Auth failed: {why}"),
        )
    };
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return refused("deserialize Request");
    };
    if request["version"] != "0.4.0" {
        return refused(&format!(
            "KBS Client Protocol Version Mismatch: expect =0.4.0 while the request is {}",
            request["version"].as_str().unwrap_or_default()
        ));
    }
    let Some(tee) = request["tee"].as_str() else {
        return refused("no tee");
    };
    let id = hex::encode(random(16));
    let nonce = STANDARD.encode(random(32));
    s.lock().unwrap().sessions.insert(
        id.clone(),
        Session {
            nonce: nonce.clone(),
            tee: tee.to_owned(),
            attested: None,
        },
    );
    let cookie = session_set_cookie(&id);
    (
        StatusCode::OK,
        [
            (header::SET_COOKIE, cookie),
            (header::CONTENT_TYPE, "application/json".to_owned()),
        ],
        json!({"nonce": nonce, "extra-params": ""}).to_string(),
    )
        .into_response()
}

/// The report data the double expects: its own JCS + SHA-384 of the runtime data.
pub fn expected_report_data(nonce: &str, tee_pubkey: &Value, additional: &Value) -> Vec<u8> {
    let runtime =
        json!({"tee-pubkey": tee_pubkey, "nonce": nonce, "additional-evidence": additional});
    Sha384::digest(serde_json_canonicalizer::to_vec(&runtime).unwrap()).to_vec()
}

async fn attest(State(s): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    // The real KBS names no cause in the body (its log does): every refusal reads the same.
    let refused = |cause: &str| {
        eprintln!("kbs double: attest refused: {cause}");
        error(
            StatusCode::UNAUTHORIZED,
            "AttestationError",
            "Attestation error: RCAR handshake Attest failed",
        )
    };
    let Some(id) = session_id(&headers) else {
        return refused("cookie not found");
    };
    let Ok(attestation) = serde_json::from_slice::<Value>(&body) else {
        return refused("deserialize Attestation");
    };
    let mut inner = s.lock().unwrap();
    let Some(session) = inner.sessions.get_mut(&id) else {
        return refused("session not found");
    };
    let runtime = &attestation["runtime-data"];
    if runtime["nonce"].as_str() != Some(session.nonce.as_str()) {
        return refused("the nonce in the handshake session is different");
    }
    let pubkey = runtime["tee-pubkey"].clone();
    let evidence = &attestation["tee-evidence"];
    let expected = expected_report_data(&session.nonce, &pubkey, &evidence["additional_evidence"]);
    let claims = match session.tee.as_str() {
        "sample" => {
            let primary = &evidence["primary_evidence"];
            let got = primary["report_data"]
                .as_str()
                .and_then(|r| STANDARD.decode(r).ok());
            if got.as_deref() != Some(expected.as_slice()) {
                return refused("verify TEE evidence failed: REPORT_DATA is different");
            }
            json!({"tee": "sample", "svn": primary["svn"], "identity": primary["sealcsi_sim_identity"]})
        }
        other => {
            return refused(&format!(
                "the double verifies only sample evidence, not {other}"
            ));
        }
    };
    let token = token(&json!({"iss": "sealcsi-kbs-double", "submods": {"cpu0": claims}}));
    session.attested = Some((pubkey, claims));
    (
        StatusCode::OK,
        [
            (header::SET_COOKIE, session_set_cookie(&id)),
            (header::CONTENT_TYPE, "application/json".to_owned()),
        ],
        json!({ "token": token }).to_string(),
    )
        .into_response()
}

fn admin(headers: &HeaderMap) -> bool {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        == Some(&format!("Bearer {ADMIN_TOKEN}"))
}

async fn get_resource(
    State(s): State<Shared>,
    Path((repo, kind, tag)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let path = format!("{repo}/{kind}/{tag}");
    let inner = s.lock().unwrap();
    let attested = session_id(&headers)
        .and_then(|id| inner.sessions.get(&id))
        .and_then(|sess| sess.attested.clone());
    let Some((pubkey, claims)) = attested else {
        return error(
            StatusCode::UNAUTHORIZED,
            "TokenNotFound",
            "Attestation Token not found",
        );
    };
    let policy = &inner.policy;
    let tee_ok = claims["tee"]
        .as_str()
        .is_some_and(|t| policy.allow_tees.iter().any(|a| a == t));
    let id_ok = match &policy.allow_identities {
        None => true,
        Some(ids) => claims["identity"]
            .as_str()
            .is_some_and(|i| ids.iter().any(|a| a == i)),
    };
    if !(tee_ok && id_ok) {
        return error(
            StatusCode::UNAUTHORIZED,
            "PolicyDeny",
            "Access denied by policy",
        );
    }
    let Some(resource) = inner.resources.get(&path) else {
        return error(
            StatusCode::UNAUTHORIZED,
            "PluginInternalError",
            "Plugin internal error",
        );
    };
    match encrypt_to(&pubkey, resource) {
        Ok(jwe) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            jwe.to_string(),
        )
            .into_response(),
        Err(e) => error(StatusCode::UNAUTHORIZED, "JweError", &e),
    }
}

async fn set_resource(
    State(s): State<Shared>,
    Path((repo, kind, tag)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !admin(&headers) {
        return error(
            StatusCode::UNAUTHORIZED,
            "AdminAuthAccess",
            "admin access denied",
        );
    }
    s.lock()
        .unwrap()
        .resources
        .insert(format!("{repo}/{kind}/{tag}"), body.to_vec());
    StatusCode::OK.into_response()
}

async fn set_policy(State(s): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    if !admin(&headers) {
        return error(
            StatusCode::UNAUTHORIZED,
            "AdminAuthAccess",
            "admin access denied",
        );
    }
    let parsed = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v["policy"].as_str().map(str::to_owned))
        .and_then(|p| URL_SAFE_NO_PAD.decode(p).ok())
        .and_then(|p| serde_json::from_slice::<Policy>(&p).ok());
    let Some(policy) = parsed else {
        return error(
            StatusCode::UNAUTHORIZED,
            "ParsePolicyError",
            "Illegal SetPolicy Request Json",
        );
    };
    s.lock().unwrap().policy = policy;
    StatusCode::OK.into_response()
}

/// The JWE the real KBS sends: ECDH-ES+A256KW on P-256 (Concat KDF, empty apu/apv) and A256GCM with
/// the base64url protected header as AAD. Written from RFC 7516/7518, independently of the client.
pub fn encrypt_to(tee_pubkey: &Value, plaintext: &[u8]) -> Result<Value, String> {
    if tee_pubkey["kty"] != "EC" || tee_pubkey["crv"] != "P-256" {
        return Err("the double encrypts only to P-256 keys".into());
    }
    let coord = |name: &str| {
        tee_pubkey[name]
            .as_str()
            .and_then(|c| URL_SAFE_NO_PAD.decode(c).ok())
            .filter(|c| c.len() == 32)
            .ok_or_else(|| format!("bad {name}"))
    };
    let (x, y) = (coord("x")?, coord("y")?);
    let point = p256::EncodedPoint::from_affine_coordinates(
        x.as_slice().into(),
        y.as_slice().into(),
        false,
    );
    let client: p256::PublicKey =
        Option::from(p256::PublicKey::from_encoded_point(&point)).ok_or("not a P-256 point")?;
    let eph = loop {
        if let Ok(k) = p256::SecretKey::from_slice(&random(32)) {
            break k;
        }
    };
    let z = p256::ecdh::diffie_hellman(eph.to_nonzero_scalar(), client.as_affine());
    // Concat KDF (NIST SP 800-56A, one SHA-256 round): counter 1 || Z || OtherInfo.
    let alg = b"ECDH-ES+A256KW";
    let mut hasher = sha2::Sha256::new();
    hasher.update(1u32.to_be_bytes());
    hasher.update(z.raw_secret_bytes());
    hasher.update((alg.len() as u32).to_be_bytes());
    hasher.update(alg);
    hasher.update(0u32.to_be_bytes());
    hasher.update(0u32.to_be_bytes());
    hasher.update(256u32.to_be_bytes());
    let kek = hasher.finalize();
    let cek = random(32);
    let mut wrapped = [0u8; 40];
    aes_kw::KwAes256::new_from_slice(&kek)
        .unwrap()
        .wrap_key(&cek, &mut wrapped)
        .map_err(|e| format!("{e:?}"))?;
    let epk = eph.public_key().to_encoded_point(false);
    let header = json!({
        "alg": "ECDH-ES+A256KW",
        "enc": "A256GCM",
        "epk": {"crv": "P-256", "kty": "EC",
                "x": URL_SAFE_NO_PAD.encode(epk.x().unwrap()),
                "y": URL_SAFE_NO_PAD.encode(epk.y().unwrap())},
    });
    let protected = URL_SAFE_NO_PAD.encode(header.to_string());
    let iv = random(12);
    let sealed = Aes256Gcm::new_from_slice(&cek)
        .unwrap()
        .encrypt(
            &Nonce::try_from(iv.as_slice()).unwrap(),
            Payload {
                msg: plaintext,
                aad: protected.as_bytes(),
            },
        )
        .map_err(|e| e.to_string())?;
    let (ciphertext, tag) = sealed.split_at(sealed.len() - 16);
    Ok(json!({
        "protected": protected,
        "encrypted_key": URL_SAFE_NO_PAD.encode(wrapped),
        "iv": URL_SAFE_NO_PAD.encode(&iv),
        "ciphertext": URL_SAFE_NO_PAD.encode(ciphertext),
        "tag": URL_SAFE_NO_PAD.encode(tag),
    }))
}

/// A self-signed certificate for `names` (DNS names or IP addresses), as (certificate, key) PEM.
pub fn test_certificate(names: &[&str]) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let cert = rcgen::CertificateParams::new(names)
        .unwrap()
        .self_signed(&key)
        .unwrap();
    (cert.pem(), key.serialize_pem())
}

fn tls_acceptor(cert_pem: &str, key_pem: &str) -> tokio_rustls::TlsAcceptor {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

/// Serves `app` over TLS on `listener` until `stopped`: one HTTP/1.1 connection per accepted TLS
/// session; a failed handshake only ends its connection.
async fn serve_tls(
    listener: tokio::net::TcpListener,
    app: Router,
    acceptor: tokio_rustls::TlsAcceptor,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    loop {
        let (tcp, _) = tokio::select! {
            _ = &mut stopped => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(_) => continue,
            },
        };
        let (acceptor, app) = (acceptor.clone(), app.clone());
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let service = hyper_util::service::TowerToHyperService::new(app);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                .await;
        });
    }
}

impl KbsDouble {
    /// Starts the double on 127.0.0.1 over plain HTTP (`port` 0: any free port).
    pub fn start(port: u16) -> Self {
        Self::start_with(port, None)
    }

    /// Starts the double on 127.0.0.1 over HTTPS with this certificate and key (PEM).
    pub fn start_tls(port: u16, cert_pem: &str, key_pem: &str) -> Self {
        Self::start_with(port, Some((cert_pem.to_owned(), key_pem.to_owned())))
    }

    fn start_with(port: u16, tls: Option<(String, String)>) -> Self {
        let inner: Shared = Arc::default();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let state = inner.clone();
        let tls_cert_pem = tls.as_ref().map(|(cert, _)| cert.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let app = Router::new()
                    .route("/kbs/v0/auth", post(auth))
                    .route("/kbs/v0/attest", post(attest))
                    .route(
                        "/kbs/v0/resource/{repo}/{kind}/{tag}",
                        axum::routing::get(get_resource).post(set_resource),
                    )
                    .route("/kbs/v0/resource-policy", post(set_policy))
                    .layer(axum::middleware::from_fn_with_state(state.clone(), record))
                    .with_state(state);
                let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
                    .await
                    .unwrap();
                ready_tx.send(listener.local_addr().unwrap()).unwrap();
                match tls {
                    Some((cert, key)) => {
                        serve_tls(listener, app, tls_acceptor(&cert, &key), stopped).await
                    }
                    None => axum::serve(listener, app)
                        .with_graceful_shutdown(async {
                            let _ = stopped.await;
                        })
                        .await
                        .unwrap(),
                }
            });
        });
        let addr = ready_rx.recv().unwrap();
        Self {
            addr,
            tls_cert_pem,
            inner,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls_cert_pem.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.addr)
    }

    /// Sets a resource through the admin endpoint (over HTTP, as an operator would; over HTTPS the
    /// double takes it directly: its TLS is what the test is about, not its admin API).
    pub fn put_resource(&self, path: &str, bytes: &[u8]) {
        if self.tls_cert_pem.is_some() {
            let mut inner = self.inner.lock().unwrap();
            inner.resources.insert(path.to_owned(), bytes.to_vec());
            return;
        }
        let status = admin_post(
            &format!("{}/kbs/v0/resource/{path}", self.url()),
            bytes.to_vec(),
        );
        assert_eq!(status, 200, "set resource");
    }

    /// Sets the policy through the admin endpoint (directly over HTTPS, as for resources).
    pub fn set_policy(&self, policy: &Policy) {
        if self.tls_cert_pem.is_some() {
            self.inner.lock().unwrap().policy = policy.clone();
            return;
        }
        let text = serde_json::to_vec(policy).unwrap();
        let body = json!({ "policy": URL_SAFE_NO_PAD.encode(text) }).to_string();
        let status = admin_post(
            &format!("{}/kbs/v0/resource-policy", self.url()),
            body.into_bytes(),
        );
        assert_eq!(status, 200, "set policy");
    }

    /// "METHOD path -> status" of every request so far.
    pub fn log(&self) -> Vec<String> {
        self.inner.lock().unwrap().log.clone()
    }

    /// Stops the server (the port is closed when this returns).
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
    }
}

impl Drop for KbsDouble {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn record(
    State(s): State<Shared>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let line = format!("{} {}", request.method(), request.uri().path());
    let response = next.run(request).await;
    s.lock()
        .unwrap()
        .log
        .push(format!("{line} -> {}", response.status().as_u16()));
    response
}

/// A blocking admin POST over plain HTTP/1.1 (the double's admin client; `url` is http://host:port/path).
fn admin_post(url: &str, body: Vec<u8>) -> u16 {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_at(rest.find('/').unwrap());
    let mut stream = std::net::TcpStream::connect(host).unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(&body).unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    reply.split(' ').nth(1).unwrap().parse().unwrap()
}
