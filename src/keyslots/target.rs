//! Who a new keyslot is sealed to: the `--for` argument of `volume add-slot`.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use super::{KeyslotError, SlotChange, add_sealed, add_slot};
use crate::broker::{KbsSource, ResourcePath};
use crate::header::SourceKind;
use crate::sealing::snp::{SnpPolicy, SnpSource};
use crate::sealing::{SealingSource, SimSource, tpm};
use crate::volume::Volumes;

/// Who a new keyslot is sealed to: the `--for` argument.
///
/// Grammar:
/// - `current`: this node's sealing source, with its default binding;
/// - `sim:<identity>`: a simulated node with the same state directory (seed) and another identity
///   string (development and tests: "another image");
/// - `tpm-pcrs:<bank>:<idx>=<hex>[,<idx>=<hex>...]`: the TPM, for expected PCR values (the grammar and
///   the banks are the TPM module's: `sealing::tpm::parse_expected_pcrs`, sha256 today);
/// - `snp:strict`, `snp:strict+tcb`: this SEV-SNP guest, under the named policy;
/// - `kbs:<repo>/<type>/<tag>`: the secret the node's key broker releases as that resource (any node
///   the broker's policy admits opens the slot; `--kbs-url` must be configured).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Current,
    Sim(String),
    /// The text after `tpm-pcrs:` (`<bank>:<idx>=<hex>,...`), checked by the TPM module's parser.
    TpmPcrs(String),
    Snp(SnpPolicy),
    Kbs(ResourcePath),
}

impl Target {
    pub fn parse(text: &str) -> Result<Self, KeyslotError> {
        let bad = |reason: String| KeyslotError::InvalidTarget {
            text: text.to_owned(),
            reason,
        };
        if text == "current" {
            return Ok(Target::Current);
        }
        let (scheme, rest) = text.split_once(':').ok_or_else(|| {
            bad(
                "expected current, sim:<identity>, tpm-pcrs:<bank>:<idx>=<hex>,... or \
                 snp:strict|strict+tcb or kbs:<repo>/<type>/<tag>"
                    .into(),
            )
        })?;
        match scheme {
            "sim" if !rest.is_empty() => Ok(Target::Sim(rest.to_owned())),
            "sim" => Err(bad("the simulated identity is empty".into())),
            "snp" => rest.parse().map(Target::Snp).map_err(bad),
            "kbs" => ResourcePath::parse(rest)
                .map(Target::Kbs)
                .map_err(|e| bad(e.0)),
            "tpm-pcrs" => crate::sealing::tpm::parse_expected_pcrs(rest)
                .map(|_| Target::TpmPcrs(rest.to_owned()))
                .map_err(|e| bad(e.to_string())),
            other => Err(bad(format!("unknown target kind {other:?}"))),
        }
    }
}

impl FromStr for Target {
    type Err = KeyslotError;
    fn from_str(s: &str) -> Result<Self, KeyslotError> {
        Target::parse(s)
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Current => f.write_str("current"),
            Target::Sim(id) => write!(f, "sim:{id}"),
            Target::Snp(policy) => write!(f, "snp:{policy}"),
            Target::TpmPcrs(spec) => write!(f, "tpm-pcrs:{spec}"),
            Target::Kbs(path) => write!(f, "kbs:{path}"),
        }
    }
}

/// The sealing source a target resolves to: this node's own, or one opened for the target.
pub enum TargetSource<'a> {
    Node(&'a dyn SealingSource),
    Opened(Box<dyn SealingSource>),
}

impl TargetSource<'_> {
    pub fn source(&self) -> &dyn SealingSource {
        match self {
            TargetSource::Node(s) => *s,
            TargetSource::Opened(s) => s.as_ref(),
        }
    }
}

/// Resolves `target` to a sealing source. `state_dir` is where simulated identities keep their seed.
pub fn open_target<'a>(
    target: &Target,
    node: &'a dyn SealingSource,
    state_dir: &Path,
    kbs: Option<&KbsSource>,
) -> Result<TargetSource<'a>, KeyslotError> {
    match target {
        Target::Kbs(path) => match kbs {
            Some(broker) => Ok(TargetSource::Opened(Box::new(
                broker.for_resource(path.clone()),
            ))),
            None => Err(KeyslotError::TargetUnavailable {
                target: target.to_string(),
                reason: "no key broker is configured (--kbs-url)".into(),
            }),
        },
        Target::Current => Ok(TargetSource::Node(node)),
        Target::Sim(identity) => Ok(TargetSource::Opened(Box::new(SimSource::open(
            state_dir, identity,
        )?))),
        Target::Snp(policy) => Ok(TargetSource::Opened(Box::new(SnpSource::open(*policy)?))),
        Target::TpmPcrs(_) => Err(KeyslotError::TargetUnavailable {
            target: target.to_string(),
            reason:
                "a pre-authorised PCR binding has no sealing source of this boot: use add_slot_for"
                    .into(),
        }),
    }
}

/// Where targets other than this node's own are found: the state directory (simulated identities keep
/// their seed there, the TPM its primary's context) and the TPM's TCTI.
#[derive(Debug, Clone, Copy)]
pub struct TargetEnv<'a> {
    pub state_dir: &'a Path,
    pub tpm_tcti: Option<&'a str>,
    /// The node's key broker, for `kbs:` targets.
    pub kbs: Option<&'a KbsSource>,
}

/// Adds a keyslot for `target` (see [`add_slot`]). A `tpm-pcrs:` target is a pre-authorised TPM policy:
/// a new secret sealed to PCR values the node will have after its next measured boot, not to the
/// current ones, so no sealing source of this boot could produce it.
pub fn add_slot_for(
    volumes: &Volumes,
    device: &Path,
    target: &Target,
    node: &dyn SealingSource,
    env: TargetEnv<'_>,
) -> Result<SlotChange, KeyslotError> {
    if let Target::TpmPcrs(spec) = target {
        let (bank, values) =
            tpm::parse_expected_pcrs(spec).map_err(|e| KeyslotError::InvalidTarget {
                text: target.to_string(),
                reason: e.to_string(),
            })?;
        let pcrs: Vec<u8> = values.iter().map(|(pcr, _)| *pcr).collect();
        let (binding, secret) =
            tpm::seal_for_pcrs(env.state_dir, env.tpm_tcti, bank, &pcrs, &values)?;
        return add_sealed(volumes, device, SourceKind::Tpm, binding, &secret);
    }
    let to = open_target(target, node, env.state_dir, env.kbs)?;
    add_slot(volumes, device, to.source(), None)
}
