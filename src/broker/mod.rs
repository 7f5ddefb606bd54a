//! Key-broker release: the `kbs` sealing source. A keyslot of source `kbs` wraps the volume key under
//! a KEK derived (as for every source, `keys.rs`) from a 32-byte secret that a Key Broker Service
//! releases after attesting this node; any node that passes the broker's policy opens the volume.
//! The protocol is Trustee KBS 0.4.0 ([`rcar`]); the released resource arrives as a JWE to an
//! ephemeral key ([`jwe`]); the slot's binding names the broker and the resource ([`binding`]).
//! Evidence comes from [`crate::attest`]; `sample` evidence (simulated TEE) protects nothing.

pub mod binding;
pub mod http;
pub mod jwe;
pub mod rcar;

use std::fmt;
use std::sync::Arc;

pub use binding::{KbsBinding, ResourcePath};
pub use http::{HttpOptions, HttpTransport};
pub use rcar::{KbsClient, Retry, Transport};

use crate::attest::{AttestError, EvidenceSource};
use crate::error::{Classify, Kind};
use crate::header::SourceKind;
use crate::keys::{SECRET_LEN, SealingSecret};
use crate::sealing::{SealError, SealingSource};

/// A step of the broker exchange, named in every error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Auth,
    Attest,
    Resource,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Step::Auth => "auth",
            Step::Attest => "attest",
            Step::Resource => "resource",
        })
    }
}

/// Errors of the broker exchange. None carries resource bytes: a reply's body appears only as the
/// `type` and `detail` of a KBS error body.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("key broker configuration: {0}")]
    Config(String),
    #[error("key broker {url} is unreachable (step {step}, {attempts} attempts): {reason}")]
    Unreachable {
        url: String,
        step: Step,
        attempts: u32,
        reason: String,
    },
    #[error("key broker {url} refused the attestation (401 at step {step}): {detail}")]
    AttestationRefused {
        url: String,
        step: Step,
        detail: String,
    },
    #[error(
        "key broker {url}: its policy denies resource {resource} to this node (step resource): {detail}"
    )]
    PolicyDenied {
        url: String,
        resource: String,
        detail: String,
    },
    #[error("key broker {url} has no resource {resource} (404 at step resource): {detail}")]
    NotFound {
        url: String,
        resource: String,
        detail: String,
    },
    #[error(
        "key broker {url} did not release resource {resource} (401 at step resource): {detail}"
    )]
    ResourceRefused {
        url: String,
        resource: String,
        detail: String,
    },
    #[error("key broker {url} answered step {step} out of protocol: {reason}")]
    Protocol {
        url: String,
        step: Step,
        reason: String,
    },
    #[error("resource {resource} from key broker {url} is unusable: {reason}")]
    Resource {
        url: String,
        resource: String,
        reason: String,
    },
    #[error("evidence for the key broker: {0}")]
    Evidence(#[from] AttestError),
}

impl Classify for BrokerError {
    fn kind(&self) -> Kind {
        match self {
            BrokerError::Config(_) => Kind::InvalidArgument,
            BrokerError::Unreachable { .. } | BrokerError::Protocol { .. } => Kind::Unavailable,
            BrokerError::AttestationRefused { .. }
            | BrokerError::PolicyDenied { .. }
            | BrokerError::ResourceRefused { .. } => Kind::WrongIdentity,
            BrokerError::NotFound { .. } => Kind::NotFound,
            BrokerError::Resource { .. } => Kind::FailedPrecondition,
            BrokerError::Evidence(e) => e.kind(),
        }
    }
}

/// How a node reaches its broker (`--kbs-url`, `--kbs-name`, `--kbs-ca`, `--kbs-insecure-http`).
#[derive(Debug, Clone)]
pub struct KbsConfig {
    pub url: String,
    /// The name recorded in new slots' bindings instead of the URL (so the URL may change later).
    pub name: Option<String>,
    pub http: HttpOptions,
    pub retry: Retry,
}

impl KbsConfig {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            name: None,
            http: HttpOptions::default(),
            retry: Retry::default(),
        }
    }

    /// The broker as a sealing source attesting with `evidence`. Nothing is sent until a secret is
    /// asked for.
    pub fn open(&self, evidence: Box<dyn EvidenceSource>) -> Result<KbsSource, BrokerError> {
        let transport = HttpTransport::new(&self.url, &self.http)?;
        Ok(KbsSource::new(
            self.name.clone(),
            KbsClient::new(Box::new(transport), self.retry),
            evidence,
        ))
    }
}

/// A node's broker: where it is, what the node calls it in bindings, and how it attests.
pub struct KbsSource {
    /// The name recorded in bindings: the configured name, or the URL.
    name: String,
    client: Arc<KbsClient>,
    evidence: Arc<dyn EvidenceSource>,
    /// The resource new slots of this source bind to (`add-slot --for kbs:<path>`).
    resource: Option<ResourcePath>,
}

impl fmt::Debug for KbsSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KbsSource")
            .field("name", &self.name)
            .field("url", &self.client.url())
            .field("evidence", &self.evidence.kind())
            .field("resource", &self.resource)
            .finish()
    }
}

impl KbsSource {
    /// `name` defaults to the transport's URL.
    pub fn new(name: Option<String>, client: KbsClient, evidence: Box<dyn EvidenceSource>) -> Self {
        Self {
            name: name.unwrap_or_else(|| client.url().to_owned()),
            client: Arc::new(client),
            evidence: Arc::from(evidence),
            resource: None,
        }
    }

    /// The same broker and evidence, with new slots bound to `resource`.
    pub fn for_resource(&self, resource: ResourcePath) -> Self {
        Self {
            name: self.name.clone(),
            client: self.client.clone(),
            evidence: self.evidence.clone(),
            resource: Some(resource),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The 32-byte secret the broker releases for `resource`.
    pub fn release(&self, resource: &ResourcePath) -> Result<SealingSecret, BrokerError> {
        let plain = self
            .client
            .fetch_resource(self.evidence.as_ref(), resource)?;
        let bytes: [u8; SECRET_LEN] =
            plain
                .as_slice()
                .try_into()
                .map_err(|_| BrokerError::Resource {
                    url: self.client.url().to_owned(),
                    resource: resource.to_string(),
                    reason: format!(
                        "{} bytes; a sealcsi KBS resource is exactly {SECRET_LEN} random bytes",
                        plain.len()
                    ),
                })?;
        Ok(SealingSecret::new(bytes))
    }
}

impl SealingSource for KbsSource {
    fn kind(&self) -> SourceKind {
        SourceKind::Kbs
    }

    fn is_simulated(&self) -> bool {
        self.evidence.is_simulated()
    }

    /// Empty when no resource is chosen, or when name and path do not fit a binding (then `secret`
    /// refuses the empty binding with the reason).
    fn default_binding(&self) -> Vec<u8> {
        self.resource
            .as_ref()
            .and_then(|r| KbsBinding::new(self.name.clone(), r.clone()).ok())
            .map(|b| b.encode())
            .unwrap_or_default()
    }

    fn secret(&self, binding: &[u8]) -> Result<SealingSecret, SealError> {
        let unusable = |reason: String| SealError::Binding {
            kind: SourceKind::Kbs,
            reason,
        };
        if binding.is_empty() {
            return Err(unusable(match &self.resource {
                Some(r) => match KbsBinding::new(self.name.clone(), r.clone()) {
                    Err(e) => e.0,
                    Ok(_) => "an empty kbs binding".into(),
                },
                None => "no resource chosen (add-slot --for kbs:<repo/type/tag>)".into(),
            }));
        }
        let binding = KbsBinding::decode(binding).map_err(|e| unusable(e.0))?;
        if binding.broker != self.name {
            return Err(unusable(format!(
                "the slot names key broker {:?}; this node's is {:?}",
                binding.broker, self.name
            )));
        }
        Ok(self.release(&binding.resource)?)
    }

    fn describe(&self) -> String {
        let mut text = format!(
            "key broker {} ({}), {:?} evidence",
            self.name,
            self.client.url(),
            self.evidence.kind()
        );
        if let Some(r) = &self.resource {
            text.push_str(&format!(", resource {r}"));
        }
        text
    }
}
