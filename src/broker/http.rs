//! The HTTP(S) transport: reqwest's blocking client (its own tokio runtime thread, so it is safe from
//! the engine's blocking threads) over rustls with the ring provider. TLS by default, verified against
//! the operator's CA bundle (`--kbs-ca`) or the system's roots; plain http only when explicitly allowed.
//! No redirects are followed; every request has connect and total timeouts.

use std::io::Read;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use super::BrokerError;
use super::jwe::MAX_REPLY_LEN;
use super::rcar::{Reply, Transport};

/// How the node reaches its broker.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// PEM bundle of the CAs that may sign the broker's certificate (default: the system's roots).
    pub ca_bundle: Option<std::path::PathBuf>,
    /// Allow `http://` URLs: the resource is still encrypted to the session key, but the session is
    /// open to an active attacker on the path. Development only.
    pub insecure_http: bool,
    /// Connect timeout per request.
    pub connect_timeout: Duration,
    /// Total timeout per request.
    pub timeout: Duration,
}

impl Default for HttpOptions {
    fn default() -> Self {
        Self {
            ca_bundle: None,
            insecure_http: false,
            connect_timeout: Duration::from_secs(5),
            timeout: Duration::from_secs(15),
        }
    }
}

pub struct HttpTransport {
    base: String,
    client: reqwest::blocking::Client,
}

fn config(reason: impl Into<String>) -> BrokerError {
    BrokerError::Config(reason.into())
}

fn roots(ca_bundle: Option<&Path>) -> Result<rustls::RootCertStore, BrokerError> {
    let mut store = rustls::RootCertStore::empty();
    match ca_bundle {
        Some(path) => {
            let pem = std::fs::read(path)
                .map_err(|e| config(format!("--kbs-ca {}: {e}", path.display())))?;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| config(format!("--kbs-ca {}: {e}", path.display())))?;
                store
                    .add(cert)
                    .map_err(|e| config(format!("--kbs-ca {}: {e}", path.display())))?;
            }
            if store.is_empty() {
                return Err(config(format!(
                    "--kbs-ca {}: no certificate in the bundle",
                    path.display()
                )));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = store.add(cert);
            }
        }
    }
    Ok(store)
}

impl HttpTransport {
    pub fn new(url: &str, opts: &HttpOptions) -> Result<Self, BrokerError> {
        let parsed =
            reqwest::Url::parse(url).map_err(|e| config(format!("KBS URL {url:?}: {e}")))?;
        match parsed.scheme() {
            "https" => {}
            "http" if opts.insecure_http => {}
            "http" => {
                return Err(config(format!(
                    "KBS URL {url:?} is plain http: use https, or --kbs-insecure-http for development"
                )));
            }
            other => {
                return Err(config(format!(
                    "KBS URL {url:?}: unsupported scheme {other}"
                )));
            }
        }
        if parsed.query().is_some() || parsed.fragment().is_some() || !parsed.username().is_empty()
        {
            return Err(config(format!(
                "KBS URL {url:?}: no query, fragment or credentials"
            )));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| config(format!("TLS: {e}")))?
            .with_root_certificates(roots(opts.ca_bundle.as_deref())?)
            .with_no_client_auth();
        let client = reqwest::blocking::Client::builder()
            .tls_backend_preconfigured(tls)
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(opts.connect_timeout)
            .timeout(opts.timeout)
            .build()
            .map_err(|e| config(format!("HTTP client: {e}")))?;
        Ok(Self {
            base: url.trim_end_matches('/').to_owned(),
            client,
        })
    }

    fn send(&self, request: reqwest::blocking::RequestBuilder) -> Result<Reply, String> {
        let response = request.send().map_err(describe)?;
        let status = response.status().as_u16();
        let set_cookies = response
            .headers()
            .get_all(reqwest::header::SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok().map(str::to_owned))
            .collect();
        let content_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let mut body = Vec::new();
        response
            .take(MAX_REPLY_LEN as u64 + 1)
            .read_to_end(&mut body)
            .map_err(|e| format!("reading the reply: {e}"))?;
        if body.len() > MAX_REPLY_LEN {
            return Err(format!("reply longer than {MAX_REPLY_LEN} bytes"));
        }
        Ok(Reply {
            status,
            set_cookies,
            content_type,
            body,
        })
    }
}

/// A transport error with its causes (reqwest's top-level message alone says little).
fn describe(e: reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

impl Transport for HttpTransport {
    fn url(&self) -> &str {
        &self.base
    }

    fn post_json(&self, path: &str, cookie: Option<&str>, body: &[u8]) -> Result<Reply, String> {
        let mut request = self
            .client
            .post(format!("{}{path}", self.base))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_vec());
        if let Some(cookie) = cookie {
            request = request.header(reqwest::header::COOKIE, cookie);
        }
        self.send(request)
    }

    fn get(&self, path: &str, cookie: Option<&str>) -> Result<Reply, String> {
        let mut request = self.client.get(format!("{}{path}", self.base));
        if let Some(cookie) = cookie {
            request = request.header(reqwest::header::COOKIE, cookie);
        }
        self.send(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_needs_the_explicit_flag() {
        let err = HttpTransport::new("http://127.0.0.1:1", &HttpOptions::default())
            .err()
            .unwrap();
        assert!(err.to_string().contains("--kbs-insecure-http"), "{err}");
        let opts = HttpOptions {
            insecure_http: true,
            ..HttpOptions::default()
        };
        assert!(HttpTransport::new("http://127.0.0.1:1", &opts).is_ok());
        assert!(HttpTransport::new("ftp://x", &opts).is_err());
        assert!(HttpTransport::new("https://u:p@x", &opts).is_err());
    }

    #[test]
    fn a_ca_bundle_without_certificates_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "not a certificate\n").unwrap();
        let opts = HttpOptions {
            ca_bundle: Some(path),
            ..HttpOptions::default()
        };
        let err = HttpTransport::new("https://kbs.example", &opts)
            .err()
            .unwrap();
        assert!(err.to_string().contains("no certificate"), "{err}");
    }
}
