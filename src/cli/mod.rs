//! The `sealcsi` command line: the operator's volume tool and the CSI plugin. This layer parses
//! arguments, opens what a command needs (sealing source, device-mapper) and prints reports; the work is
//! in the library.
//!
//! - [`volume`]: `volume format|open|close|inspect|identity`;
//! - [`keyslots`]: the keyslot lifecycle and `recovery-keygen`;
//! - [`transfer`]: attested transfer (`volume transfer-request|transfer-grant|transfer-accept`);
//! - [`exit`]: the exit codes.

mod exit;
mod keyslots;
mod transfer;
mod volume;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::builder::BoolishValueParser;
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;

use sealcsi::dm::KernelDm;
use sealcsi::sealing::{self, SealingSource, TeeChoice};
use sealcsi::volume::VolumeError;

#[derive(Parser)]
#[command(
    name = "sealcsi",
    version,
    about = "Sealed encrypted volumes for confidential-computing nodes"
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
pub(crate) struct Global {
    /// Sealing source: sim (simulated, protects nothing), snp, tpm, or auto (hardware only).
    #[arg(
        long,
        env = "SEALCSI_TEE",
        value_enum,
        default_value = "auto",
        global = true
    )]
    tee: TeeChoice,
    /// Directory for node-local state (the simulator seed, volume files).
    #[arg(
        long,
        env = "SEALCSI_STATE_DIR",
        default_value = "/var/lib/sealcsi",
        global = true
    )]
    state_dir: PathBuf,
    /// For --tee sim: the string standing in for the launch measurement.
    #[arg(long, env = "SEALCSI_SIM_IDENTITY", global = true)]
    sim_identity: Option<String>,
    /// For --tee tpm (or auto): the TPM's TCTI [default: device:/dev/tpmrm0], e.g.
    /// swtpm:host=127.0.0.1,port=2321. Setting it makes --tee auto use the TPM.
    #[arg(long, env = "SEALCSI_TPM_TCTI", global = true)]
    tpm_tcti: Option<String>,
    /// For --tee tpm (or auto): the PCRs new keyslots are sealed to [default: sha256:0,2,4,7].
    #[arg(long, env = "SEALCSI_TPM_PCRS", global = true)]
    tpm_pcrs: Option<sealing::PcrSelection>,
    /// The TPM is inside the TEE (an SVSM or paravisor vTPM, not one the host emulates): lets --tee auto
    /// use it on a confidential VM.
    #[arg(long, env = "SEALCSI_TPM_TRUSTED", global = true, value_parser = BoolishValueParser::new())]
    tpm_trusted: bool,
    /// For --tee snp (or auto): what new keyslots bind to: strict or strict+tcb [default: strict].
    #[arg(long, env = "SEALCSI_SNP_POLICY", global = true)]
    snp_policy: Option<sealing::SnpPolicy>,
    /// INSECURE, for moving data off old volumes only: unseal legacy SNP `upgradable` keyslots. This
    /// trusts the host (docs/keys.md).
    #[arg(long, env = "SEALCSI_SNP_ALLOW_LEGACY_UPGRADABLE", global = true, value_parser = BoolishValueParser::new())]
    snp_allow_legacy_upgradable: bool,
    /// Key broker (Trustee KBS) URL: `kbs` keyslots open through it, besides this node's own source.
    /// https unless --kbs-insecure-http.
    #[arg(long, env = "SEALCSI_KBS_URL", global = true)]
    kbs_url: Option<String>,
    /// The broker's name recorded in new kbs slots [default: the URL].
    #[arg(long, env = "SEALCSI_KBS_NAME", global = true)]
    kbs_name: Option<String>,
    /// PEM bundle of the CAs that sign the broker's TLS certificate [default: the system's roots].
    #[arg(long, env = "SEALCSI_KBS_CA", global = true)]
    kbs_ca: Option<PathBuf>,
    /// Allow a plain http:// broker URL (development only: the session is open to a path attacker).
    #[arg(long, env = "SEALCSI_KBS_INSECURE_HTTP", global = true, value_parser = BoolishValueParser::new())]
    kbs_insecure_http: bool,
    /// The evidence shown to the broker [default: from --tee: sim -> sample, snp -> snp, tpm -> tpm].
    /// `sample` proves nothing and is allowed only with --tee sim.
    #[arg(long, env = "SEALCSI_KBS_EVIDENCE", global = true, value_enum)]
    kbs_evidence: Option<EvidenceChoice>,
    /// Log verbosity (tracing filter), e.g. info or sealcsi=debug.
    #[arg(long, env = "SEALCSI_LOG", default_value = "warn", global = true)]
    log: String,
    /// Log line format on stderr.
    #[arg(
        long,
        env = "SEALCSI_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    log_format: LogFormat,
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum EvidenceChoice {
    Sample,
    Snp,
    Tdx,
    Tpm,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    /// One JSON object per line (for log collectors).
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Format, open, close and inspect sealed volumes.
    #[command(subcommand)]
    Volume(volume::VolumeCommand),
    /// Serve the CSI Identity, Controller and Node services.
    Plugin(PluginArgs),
    // recovery-keygen: see the keyslots module.
    #[command(flatten)]
    Recovery(keyslots::RecoveryCommand),
}

#[derive(Args)]
struct PluginArgs {
    /// Where to listen: unix://<path>.
    #[arg(long, env = "SEALCSI_ENDPOINT", default_value = sealcsi::csi::DEFAULT_ENDPOINT)]
    endpoint: String,
    /// This node's id, as the CO knows it (in Kubernetes, the node name).
    #[arg(long, env = "SEALCSI_NODE_ID")]
    node_id: String,
    /// Which services to serve.
    #[arg(long, value_enum, env = "SEALCSI_MODE", default_value = "all")]
    mode: sealcsi::csi::Mode,
    /// The CSI driver name.
    #[arg(long, env = "SEALCSI_DRIVER_NAME", default_value = sealcsi::csi::DEFAULT_DRIVER_NAME)]
    driver_name: String,
    /// Serve Prometheus metrics on this address (e.g. 0.0.0.0:9809); off by default.
    #[arg(long, env = "SEALCSI_METRICS_ADDRESS")]
    metrics_address: Option<std::net::SocketAddr>,
    /// How many times the state directory's disk the (sparse) volumes may be promised: CreateVolume and
    /// expansions beyond it are RESOURCE_EXHAUSTED, and GetCapacity reports what is left.
    #[arg(long, env = "SEALCSI_OVERCOMMIT_RATIO", default_value_t = 1.0)]
    overcommit_ratio: f64,
    /// Stack over a block-capable CSI driver running beside sealcsi: csi:unix:///path/to/csi.sock
    /// (docs/stacked.md). Without it, volumes are files in the state directory.
    #[arg(long, env = "SEALCSI_BACKEND")]
    backend: Option<String>,
}

/// Runs the command line and returns the process's exit code.
pub fn main() -> ExitCode {
    // First, before any key exists: no core dumps (src/hardening.rs). Failing closed: a process that
    // could dump its keys to the host's disk does not run.
    if let Err(e) = sealcsi::hardening::harden_process() {
        eprintln!("sealcsi: error: {e}");
        return ExitCode::from(exit::INTERNAL);
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() {
                exit::USAGE
            } else {
                exit::SUCCESS
            });
        }
    };
    init_logging(&cli.global.log, cli.global.log_format);
    // Threads share the process keyring only if it exists before they are spawned (dm-crypt looks the
    // volume key up there at table load). There is no fallback: without a keyring no volume opens
    // (a key is never put into a table), which the commands that open volumes report.
    if let Err(e) = sealcsi::keyring::ensure_process_keyring() {
        tracing::warn!(error = %e, "kernel keyring unavailable: volumes cannot be opened on this node");
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sealcsi: error: {}", error_chain(&e));
            ExitCode::from(exit::code_of(&e))
        }
    }
}

fn init_logging(filter: &str, format: LogFormat) {
    // The devicemapper crate's verbose records are dropped whatever the filter says (src/logging.rs).
    sealcsi::logging::init(filter, matches!(format, LogFormat::Json));
}

/// The error and its causes on one line. Many library errors already quote their cause in their own
/// message (so that a single Display, as the gRPC edge sends, is complete): such causes are not repeated.
fn error_chain(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

pub(crate) fn print_json(value: &impl Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

pub(crate) fn open_source(global: &Global) -> anyhow::Result<Box<dyn SealingSource>> {
    let opts = sealing::SourceOptions {
        state_dir: global.state_dir.clone(),
        sim_identity: global.sim_identity.clone(),
        tpm_tcti: global.tpm_tcti.clone(),
        tpm_pcrs: global.tpm_pcrs.clone(),
        tpm_trusted: global.tpm_trusted,
        snp_policy: global.snp_policy,
        snp_allow_legacy_upgradable: global.snp_allow_legacy_upgradable,
        probe: sealing::Probe::host(),
    };
    let source = sealing::open_source(global.tee, &opts).map_err(VolumeError::from)?;
    if source.is_simulated() {
        eprintln!("sealcsi: WARNING: {}", sealing::SIM_WARNING);
    }
    Ok(source)
}

/// The node's key broker, when `--kbs-url` is set; `source` is the node's own sealing source (its
/// kind chooses the evidence unless --kbs-evidence does).
pub(crate) fn open_broker(
    global: &Global,
    source: &dyn SealingSource,
) -> anyhow::Result<Option<sealcsi::broker::KbsSource>> {
    use sealcsi::attest::EvidenceKind;
    let Some(url) = &global.kbs_url else {
        return Ok(None);
    };
    let kind = match (global.kbs_evidence, source.kind()) {
        (Some(EvidenceChoice::Sample), _) => EvidenceKind::Sample,
        (Some(EvidenceChoice::Snp), _) => EvidenceKind::Snp,
        (Some(EvidenceChoice::Tdx), _) => EvidenceKind::Tdx,
        (Some(EvidenceChoice::Tpm), _) => EvidenceKind::Tpm,
        (None, sealing::SourceKind::Sim) => EvidenceKind::Sample,
        (None, sealing::SourceKind::Snp) => EvidenceKind::Snp,
        (None, sealing::SourceKind::Tpm) => EvidenceKind::Tpm,
        (None, sealing::SourceKind::Kbs) => anyhow::bail!("--tee cannot be kbs"),
    };
    if kind == EvidenceKind::Sample && !source.is_simulated() {
        return Err(sealcsi::broker::BrokerError::Config(
            "sample evidence proves nothing and is allowed only with --tee sim".into(),
        )
        .into());
    }
    let identity = global
        .sim_identity
        .clone()
        .unwrap_or_else(|| "sim-default".to_owned());
    let evidence = sealcsi::attest::open(kind, &identity)?;
    if evidence.is_simulated() {
        eprintln!(
            "sealcsi: WARNING: SAMPLE EVIDENCE to key broker {url}: unsigned, it proves nothing; \
             any process can claim it"
        );
    }
    let mut config = sealcsi::broker::KbsConfig::new(url.clone());
    config.name = global.kbs_name.clone();
    config.http.ca_bundle = global.kbs_ca.clone();
    config.http.insecure_http = global.kbs_insecure_http;
    Ok(Some(config.open(evidence)?))
}

pub(crate) fn kernel_dm() -> anyhow::Result<KernelDm> {
    Ok(KernelDm::new().map_err(VolumeError::from)?)
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Volume(command) => volume::run(&cli.global, command),
        Command::Plugin(args) => run_plugin(&cli.global, args),
        Command::Recovery(command) => keyslots::run_recovery(command),
    }
}

fn run_plugin(global: &Global, args: PluginArgs) -> anyhow::Result<()> {
    if args.mode.node() {
        // Fail at start, not at the first NodeStageVolume: volume keys go only through the keyring.
        sealcsi::keyring::require().context("the node service cannot serve")?;
    }
    let mut config =
        sealcsi::csi::PluginConfig::new(args.endpoint, args.node_id, args.mode, &global.state_dir);
    config.driver_name = args.driver_name;
    config.metrics_address = args.metrics_address;
    config.overcommit_ratio = args.overcommit_ratio;
    config.backend = args.backend;
    // A stacked controller runs wherever its Deployment lands, often a node with no TEE: it opens
    // neither device-mapper nor a sealing source.
    let deps = if config.needs_kernel() {
        let source = open_source(global)?;
        let broker =
            open_broker(global, source.as_ref())?.map(|b| Box::new(b) as Box<dyn SealingSource>);
        Some(sealcsi::csi::PluginDeps::kernel_with_broker(
            source, broker,
        )?)
    } else {
        None
    };
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(sealcsi::csi::serve(config, deps))?;
    Ok(())
}
