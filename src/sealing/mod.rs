//! Sealing sources: where the 32-byte secret bound to this node's TEE identity comes from.
//!
//! A source answers two questions: "what is my secret for this binding?" and "which binding do new keyslots
//! use?". The public identity of a secret is its digest (see [`SealingSecret::digest`]), so the same code
//! finds the right keyslot for every kind of source. Hardware sources (SEV-SNP, TPM) implement the same trait.

pub mod probe;
mod sim;
pub mod snp;
pub mod tpm;

use std::path::PathBuf;

use serde::Serialize;

pub use crate::header::SourceKind;
use crate::keys::SealingSecret;
pub use probe::Probe;
pub use sim::{DEFAULT_IDENTITY as SIM_DEFAULT_IDENTITY, SimSource};
pub use snp::{SnpPolicy, SnpSource};
pub use tpm::{PcrBank, PcrSelection, TpmSource};

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// The sealing source could not be reached or refused to answer.
    #[error("sealing source {kind:?} is unavailable: {reason}")]
    Unavailable { kind: SourceKind, reason: String },
    /// The source's persistent state (e.g. the simulator seed) is unusable.
    #[error("sealing state {path}: {reason}")]
    State { path: String, reason: String },
    /// A keyslot's binding parameters are not understood by this source.
    #[error("keyslot binding is not valid for source {kind:?}: {reason}")]
    Binding { kind: SourceKind, reason: String },
    /// The key broker did not release the secret (the failed step is named).
    #[error(transparent)]
    Broker(#[from] crate::broker::BrokerError),
}

/// A source of TEE-bound secrets.
pub trait SealingSource: Send + Sync {
    fn kind(&self) -> SourceKind;

    /// True for sources that protect nothing (the simulator); callers warn loudly.
    fn is_simulated(&self) -> bool {
        false
    }

    /// The binding parameters recorded in a new keyslot (empty when the source has only one way to bind).
    fn default_binding(&self) -> Vec<u8>;

    /// The secret for `binding`, as recorded in a keyslot.
    fn secret(&self, binding: &[u8]) -> Result<SealingSecret, SealError>;

    /// A human-readable description of what the secret is bound to (no secret material).
    fn describe(&self) -> String;

    /// Why this source was chosen (set by [`open_source`]; `None` for sources built directly).
    fn selected_because(&self) -> Option<&str> {
        None
    }
}

/// This node's sealing identity as shown to operators.
#[derive(Debug, Clone, Serialize)]
pub struct Identity {
    pub kind: SourceKind,
    /// Hex of the identity digest for the default binding: a keyslot with this digest opens here.
    pub digest: String,
    pub description: String,
    pub simulated: bool,
    /// Why `--tee` resolved to this source (for `auto`: what was probed and found).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selected_because: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warning: Option<&'static str>,
}

/// The warning every simulated identity carries.
pub const SIM_WARNING: &str =
    "SIMULATED TEE: the sealing secret is a file on this node's disk; this protects nothing";

/// The identity of `source` for its default binding.
pub fn identity(source: &dyn SealingSource) -> Result<Identity, SealError> {
    let secret = source.secret(&source.default_binding())?;
    Ok(Identity {
        kind: source.kind(),
        digest: hex::encode(secret.digest()),
        description: source.describe(),
        simulated: source.is_simulated(),
        selected_because: source.selected_because().map(str::to_owned),
        warning: source.is_simulated().then_some(SIM_WARNING),
    })
}

/// Which source the operator asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TeeChoice {
    Sim,
    Snp,
    Tpm,
    Auto,
}

/// What `open_source` needs besides the choice; `None` fields take the documented defaults.
#[derive(Debug, Clone)]
pub struct SourceOptions {
    /// Node-local state: the simulator seed, the TPM's sealed objects (`<state_dir>/tpm/`).
    pub state_dir: PathBuf,
    /// For `sim`: the string standing in for a launch measurement (default `sim-default`).
    pub sim_identity: Option<String>,
    /// For `tpm`: the TCTI (default `device:/dev/tpmrm0`). Setting it also makes `auto` choose the TPM
    /// (on a confidential VM only with `tpm_trusted`).
    pub tpm_tcti: Option<String>,
    /// For `tpm`: the PCRs new keyslots are sealed to (default `sha256:0,2,4,7`).
    pub tpm_pcrs: Option<PcrSelection>,
    /// The operator's statement that the TPM is inside the TEE (an SVSM or paravisor vTPM). Without it
    /// `auto` refuses the TPM on a confidential VM, whose vTPM the host may emulate.
    pub tpm_trusted: bool,
    /// For `snp`: the launch fields new keyslots bind to (default `strict`).
    pub snp_policy: Option<SnpPolicy>,
    /// For `snp`: unseal legacy `upgradable` slots. Trusts the host (docs/keys.md); for migration only.
    pub snp_allow_legacy_upgradable: bool,
    /// Where `auto` looks for devices and CVM evidence (`/` on a node; a fake tree in tests).
    pub probe: Probe,
}

impl SourceOptions {
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        Self {
            state_dir: state_dir.into(),
            sim_identity: None,
            tpm_tcti: None,
            tpm_pcrs: None,
            tpm_trusted: false,
            snp_policy: None,
            snp_allow_legacy_upgradable: false,
            probe: Probe::host(),
        }
    }
}

pub use snp::SEV_GUEST_DEVICE;

/// The source `--tee` resolves to, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    pub kind: SourceKind,
    pub because: String,
    /// True when the reason deserves a warning in the log (a TPM on a confidential VM).
    pub warn: bool,
}

impl Selection {
    fn new(kind: SourceKind, because: impl Into<String>) -> Self {
        Self {
            kind,
            because: because.into(),
            warn: false,
        }
    }
}

/// The error `auto` gives for a TPM on a confidential VM without `tpm_trusted`.
fn untrusted_tpm(evidence: &str) -> SealError {
    SealError::Unavailable {
        kind: SourceKind::Tpm,
        reason: format!(
            "--tee auto refuses the TPM: this node is a confidential VM ({evidence}) and its vTPM may be \
             emulated by the host, which could then unseal every volume. If the vTPM runs inside the TEE \
             (an SVSM vTPM such as coconut-svsm's, or a paravisor vTPM such as Azure's), say so with \
             --tpm-trusted (SEALCSI_TPM_TRUSTED=1); otherwise use --tee snp (docs/keys.md)"
        ),
    }
}

/// Decides which source `choice` means on the machine `opts.probe` describes, without opening it.
///
/// `auto`: SEV-SNP if `/dev/sev-guest` exists; else a TPM (`/dev/tpmrm0`, or a configured TCTI), but
/// on a confidential VM only with `tpm_trusted`; never `sim`.
pub fn select(choice: TeeChoice, opts: &SourceOptions) -> Result<Selection, SealError> {
    let explicit = |kind, flag| Selection::new(kind, format!("explicitly chosen (--tee {flag})"));
    match choice {
        TeeChoice::Sim => Ok(explicit(SourceKind::Sim, "sim")),
        TeeChoice::Snp => Ok(explicit(SourceKind::Snp, "snp")),
        TeeChoice::Tpm => Ok(select_explicit_tpm(opts)),
        TeeChoice::Auto => select_auto(opts),
    }
}

/// An explicit `--tee tpm` is the operator's decision; on a CVM without `tpm_trusted` it is warned about.
fn select_explicit_tpm(opts: &SourceOptions) -> Selection {
    match opts.probe.cvm_evidence() {
        Some(evidence) if !opts.tpm_trusted => Selection {
            kind: SourceKind::Tpm,
            because: format!(
                "explicitly chosen (--tee tpm) on a confidential VM ({evidence}) without --tpm-trusted: \
                 this protects against the host only if the vTPM runs inside the TEE"
            ),
            warn: true,
        },
        Some(evidence) => Selection::new(
            SourceKind::Tpm,
            format!(
                "explicitly chosen (--tee tpm); confidential VM ({evidence}), the operator says the \
                 vTPM is inside the TEE (--tpm-trusted)"
            ),
        ),
        None => Selection::new(SourceKind::Tpm, "explicitly chosen (--tee tpm)"),
    }
}

fn select_auto(opts: &SourceOptions) -> Result<Selection, SealError> {
    let probe = &opts.probe;
    if probe.snp_device() {
        return Ok(Selection::new(
            SourceKind::Snp,
            format!("--tee auto: SEV-SNP guest device {SEV_GUEST_DEVICE} present"),
        ));
    }
    let tpm = match (&opts.tpm_tcti, probe.tpm_device()) {
        (Some(tcti), _) => format!("TPM TCTI {tcti} configured"),
        (None, true) => format!("TPM {} present", tpm::DEFAULT_DEVICE),
        (None, false) => {
            return Err(SealError::Unavailable {
                kind: SourceKind::Snp,
                reason: format!(
                    "no hardware sealing source found (no {SEV_GUEST_DEVICE}, no {}, no TPM TCTI \
                     configured); pass --tee sim explicitly for a simulated (unprotected) identity",
                    tpm::DEFAULT_DEVICE
                ),
            });
        }
    };
    match probe.cvm_evidence() {
        None => Ok(Selection::new(
            SourceKind::Tpm,
            format!("--tee auto: {tpm}, no confidential-VM evidence found"),
        )),
        Some(evidence) if opts.tpm_trusted => Ok(Selection {
            kind: SourceKind::Tpm,
            because: format!(
                "--tee auto: {tpm} on a confidential VM ({evidence}); the operator says the vTPM is \
                 inside the TEE (--tpm-trusted)"
            ),
            warn: true,
        }),
        Some(evidence) => Err(untrusted_tpm(&evidence)),
    }
}

/// Builds the source the operator asked for (see [`select`]) and logs the choice and its reason. It
/// never falls back to `sim`: a node must not silently run on a simulated identity.
pub fn open_source(
    choice: TeeChoice,
    opts: &SourceOptions,
) -> Result<Box<dyn SealingSource>, SealError> {
    // A refusal is not logged here: it is the caller's error, printed once.
    let selection = select(choice, opts)?;
    let inner: Box<dyn SealingSource> = match selection.kind {
        SourceKind::Sim => Box::new(SimSource::open(
            &opts.state_dir,
            opts.sim_identity
                .as_deref()
                .unwrap_or(sim::DEFAULT_IDENTITY),
        )?),
        SourceKind::Snp => open_snp(opts)?,
        SourceKind::Tpm => open_tpm(opts)?,
        // `select` never chooses the broker: it is configured beside the node's own source.
        SourceKind::Kbs => {
            return Err(SealError::Unavailable {
                kind: SourceKind::Kbs,
                reason: "the key broker is not a --tee choice; configure it with --kbs-url".into(),
            });
        }
    };
    if selection.warn {
        tracing::warn!(tee = ?choice, source = ?selection.kind, "sealing source: {}", selection.because);
    } else {
        tracing::info!(tee = ?choice, source = ?selection.kind, "sealing source: {}", selection.because);
    }
    Ok(Box::new(Selected {
        inner,
        because: selection.because,
    }))
}

/// A source with the reason it was selected.
struct Selected {
    inner: Box<dyn SealingSource>,
    because: String,
}

impl SealingSource for Selected {
    fn kind(&self) -> SourceKind {
        self.inner.kind()
    }
    fn is_simulated(&self) -> bool {
        self.inner.is_simulated()
    }
    fn default_binding(&self) -> Vec<u8> {
        self.inner.default_binding()
    }
    fn secret(&self, binding: &[u8]) -> Result<SealingSecret, SealError> {
        self.inner.secret(binding)
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn selected_because(&self) -> Option<&str> {
        Some(&self.because)
    }
}

fn open_tpm(opts: &SourceOptions) -> Result<Box<dyn SealingSource>, SealError> {
    let selection = opts.tpm_pcrs.clone().unwrap_or_default();
    Ok(Box::new(TpmSource::open(
        &opts.state_dir,
        opts.tpm_tcti.as_deref(),
        &selection,
    )?))
}

fn open_snp(opts: &SourceOptions) -> Result<Box<dyn SealingSource>, SealError> {
    let source = SnpSource::open_at(
        &opts.probe.path(SEV_GUEST_DEVICE),
        opts.snp_policy.unwrap_or(SnpPolicy::Strict),
    )?
    .allow_legacy_upgradable(opts.snp_allow_legacy_upgradable);
    if opts.snp_allow_legacy_upgradable {
        tracing::warn!(
            "--snp-allow-legacy-upgradable is set: legacy SNP upgradable keyslots unseal, which trusts \
             the host; use it only to move data off such volumes"
        );
    }
    Ok(Box::new(source))
}

#[cfg(test)]
mod tests {
    use super::*;
    use probe::touch;

    /// Options whose probe looks at a fresh, empty tree.
    fn on_tree(dir: &tempfile::TempDir) -> SourceOptions {
        SourceOptions {
            probe: Probe::under(dir.path().join("root")),
            ..SourceOptions::new(dir.path().join("state"))
        }
    }

    fn root(dir: &tempfile::TempDir) -> std::path::PathBuf {
        dir.path().join("root")
    }

    fn refused(choice: TeeChoice, opts: &SourceOptions) -> SealError {
        match open_source(choice, opts) {
            Ok(source) => panic!("{choice:?} opened {}", source.describe()),
            Err(e) => e,
        }
    }

    #[test]
    fn auto_never_falls_back_to_sim() {
        let dir = tempfile::tempdir().unwrap();
        let opts = on_tree(&dir);
        let err = refused(TeeChoice::Auto, &opts);
        assert!(err.to_string().contains("--tee sim"), "{err}");
        assert!(!dir.path().join("state/sim-seed").exists());
    }

    #[test]
    fn auto_on_a_cvm_refuses_the_tpm_without_tpm_trusted() {
        for evidence in [probe::TDX_GUEST, "/sys/kernel/config/tsm/report/x"] {
            let dir = tempfile::tempdir().unwrap();
            touch(&root(&dir), probe::TPM_DEVICE);
            touch(&root(&dir), evidence);
            let opts = on_tree(&dir);
            let err = select(TeeChoice::Auto, &opts).unwrap_err();
            assert!(
                matches!(
                    err,
                    SealError::Unavailable {
                        kind: SourceKind::Tpm,
                        ..
                    }
                ),
                "{err}"
            );
            let text = err.to_string();
            assert!(text.contains("--tpm-trusted"), "{text}");
            assert!(text.contains("SEALCSI_TPM_TRUSTED=1"), "{text}");
            assert!(text.contains("confidential VM"), "{text}");
            // open_source refuses before touching the TPM or the state directory.
            let err = refused(TeeChoice::Auto, &opts);
            assert!(err.to_string().contains("--tpm-trusted"), "{err}");
            assert!(!dir.path().join("state").exists());
        }
    }

    #[test]
    fn auto_on_a_cvm_refuses_a_configured_tcti_too() {
        let dir = tempfile::tempdir().unwrap();
        touch(&root(&dir), probe::TDX_GUEST);
        let mut opts = on_tree(&dir);
        opts.tpm_tcti = Some("swtpm:host=127.0.0.1,port=2321".into());
        let err = select(TeeChoice::Auto, &opts).unwrap_err();
        assert!(err.to_string().contains("--tpm-trusted"), "{err}");
    }

    #[test]
    fn auto_on_a_cvm_takes_the_tpm_with_tpm_trusted() {
        let dir = tempfile::tempdir().unwrap();
        touch(&root(&dir), probe::TPM_DEVICE);
        touch(&root(&dir), probe::TDX_GUEST);
        let mut opts = on_tree(&dir);
        opts.tpm_trusted = true;
        let chosen = select(TeeChoice::Auto, &opts).unwrap();
        assert_eq!(chosen.kind, SourceKind::Tpm);
        assert!(
            chosen.because.contains("--tpm-trusted"),
            "{}",
            chosen.because
        );
        assert!(
            chosen.because.contains(probe::TDX_GUEST),
            "{}",
            chosen.because
        );
        assert!(chosen.warn);
    }

    #[test]
    fn auto_off_a_cvm_takes_the_tpm_as_before() {
        let dir = tempfile::tempdir().unwrap();
        touch(&root(&dir), probe::TPM_DEVICE);
        let chosen = select(TeeChoice::Auto, &on_tree(&dir)).unwrap();
        assert_eq!(chosen.kind, SourceKind::Tpm);
        assert!(
            chosen.because.contains("no confidential-VM evidence"),
            "{}",
            chosen.because
        );
        assert!(!chosen.warn);
    }

    #[test]
    fn auto_takes_snp_when_the_guest_device_exists() {
        let dir = tempfile::tempdir().unwrap();
        touch(&root(&dir), probe::SEV_GUEST);
        touch(&root(&dir), probe::TPM_DEVICE);
        let opts = on_tree(&dir);
        let chosen = select(TeeChoice::Auto, &opts).unwrap();
        assert_eq!(chosen.kind, SourceKind::Snp);
        assert!(
            chosen.because.contains(SEV_GUEST_DEVICE),
            "{}",
            chosen.because
        );
        // Opening goes to the device under the probe root (a plain file here: opening works, no
        // request is sent until a secret is asked for).
        let source = open_source(TeeChoice::Auto, &opts).unwrap();
        assert_eq!(source.kind(), SourceKind::Snp);
        assert_eq!(source.selected_because(), Some(chosen.because.as_str()));
    }

    #[test]
    fn explicit_choices_say_so() {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = on_tree(&dir);
        assert_eq!(
            select(TeeChoice::Sim, &opts).unwrap().because,
            "explicitly chosen (--tee sim)"
        );
        let tpm = select(TeeChoice::Tpm, &opts).unwrap();
        assert!(!tpm.warn, "{}", tpm.because);
        touch(&root(&dir), probe::TDX_GUEST);
        let tpm = select(TeeChoice::Tpm, &opts).unwrap();
        assert!(
            tpm.warn && tpm.because.contains("without --tpm-trusted"),
            "{}",
            tpm.because
        );
        opts.tpm_trusted = true;
        assert!(!select(TeeChoice::Tpm, &opts).unwrap().warn);
    }

    #[test]
    fn identity_shows_why_the_source_was_selected() {
        let dir = tempfile::tempdir().unwrap();
        let source = open_source(TeeChoice::Sim, &on_tree(&dir)).unwrap();
        let json = serde_json::to_value(identity(source.as_ref()).unwrap()).unwrap();
        assert_eq!(json["selected_because"], "explicitly chosen (--tee sim)");
        assert_eq!(json["simulated"], true);
    }

    #[test]
    fn explicit_tpm_without_a_tpm_is_unavailable() {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = on_tree(&dir);
        opts.tpm_tcti = Some("device:/nonexistent/tpmrm0".into());
        let err = refused(TeeChoice::Tpm, &opts);
        assert!(
            matches!(
                err,
                SealError::Unavailable {
                    kind: SourceKind::Tpm,
                    ..
                }
            ),
            "{err}"
        );
        // auto with an explicit TCTI, off a CVM, tries the TPM too, and fails the same way.
        assert!(matches!(
            refused(TeeChoice::Auto, &opts),
            SealError::Unavailable {
                kind: SourceKind::Tpm,
                ..
            }
        ));
    }
}
