//! The `sealcsi` binary: the operator's volume tool (and, later, the CSI plugin).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;

use sealcsi::dm::KernelDm;
use sealcsi::header::{FsKind, Journal, Profile};
use sealcsi::init::InitMode;
use sealcsi::sealing::{self, SealingSource, TeeChoice};
use sealcsi::volume::{self, ErrorClass, FormatOptions, VolumeError, Volumes};

/// Exit codes, documented in README.md: scripts and runbooks branch on them.
mod exit {
    pub const INTERNAL: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const WRONG_IDENTITY: u8 = 3;
    pub const INVALID_HEADER: u8 = 4;
    pub const BUSY: u8 = 5;
    pub const REFUSED: u8 = 6;
}

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
struct Global {
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
    /// Log verbosity (tracing filter), e.g. info or sealcsi=debug.
    #[arg(long, env = "SEALCSI_LOG", default_value = "warn", global = true)]
    log: String,
    /// Log line format on stderr.
    #[arg(long, env = "SEALCSI_LOG_FORMAT", value_enum, default_value = "text", global = true)]
    log_format: LogFormat,
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
    Volume(VolumeCommand),
    /// Serve the CSI Identity, Controller and Node services.
    Plugin(PluginArgs),
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
}

#[derive(Clone, Copy, ValueEnum)]
enum IntegrityArg {
    /// dm-integrity AEAD: every 4 KiB block authenticated (HMAC-SHA256).
    HmacSha256,
    /// dm-crypt only: confidentiality, no tamper detection.
    None,
}

#[derive(Clone, Copy, ValueEnum)]
enum JournalArg {
    /// Crash-safe: data and tags go through dm-integrity's journal.
    Journal,
    /// Faster, NOT crash-safe: a crash can leave a block unreadable.
    Direct,
}

#[derive(Clone, Copy, ValueEnum)]
enum FsArg {
    Ext4,
    Xfs,
    None,
}

#[derive(Clone, Copy, ValueEnum)]
enum InitArg {
    /// Write only what the filesystem reads before writing (filesystems only).
    Fast,
    /// Zero the whole device through the mapping.
    Full,
}

#[derive(Subcommand)]
enum VolumeCommand {
    /// Create a sealed volume on a block device or file (refuses devices holding data unless --force).
    Format {
        device: PathBuf,
        #[arg(long, value_enum, default_value = "hmac-sha256")]
        integrity: IntegrityArg,
        #[arg(long, value_enum, default_value = "journal")]
        journal: JournalArg,
        #[arg(long, value_enum, default_value = "ext4")]
        fs: FsArg,
        /// Default: fast with a filesystem, full without.
        #[arg(long, value_enum)]
        init: Option<InitArg>,
        /// Destroy whatever the device holds.
        #[arg(long)]
        force: bool,
    },
    /// Unseal and open a volume as /dev/mapper/<name>; prints {"device": ...}.
    Open {
        device: PathBuf,
        /// Device-mapper name; default sealcsi-<volume uuid>.
        #[arg(long)]
        name: Option<String>,
    },
    /// Close /dev/mapper/<name> and the layers under it.
    Close { name: String },
    /// Print the header's public fields as JSON (no key needed).
    Inspect { device: PathBuf },
    /// Print this node's sealing identity as JSON.
    Identity,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { exit::USAGE } else { 0 });
        }
    };
    init_logging(&cli.global.log, cli.global.log_format);
    // Threads share the process keyring only if it exists before they are spawned (dm-crypt looks the
    // volume key up there at table load). A node without a keyring falls back to secure hex tables.
    if let Err(e) = sealcsi::keyring::ensure_process_keyring() {
        tracing::info!(error = %e, "kernel keyring unavailable; keys will be loaded in secure tables");
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sealcsi: error: {}", error_chain(&e));
            ExitCode::from(exit_code(&e))
        }
    }
}

fn init_logging(filter: &str, format: LogFormat) {
    // The devicemapper crate logs whole tables at trace level; a table may hold a hex key, so that
    // target is capped whatever the operator asks for.
    let filter = tracing_subscriber::EnvFilter::try_new(format!("{filter},devicemapper=info"))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().with_current_span(true).init(),
    }
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

fn exit_code(e: &anyhow::Error) -> u8 {
    match e.downcast_ref::<VolumeError>().map(VolumeError::class) {
        Some(ErrorClass::InvalidArgument) => exit::USAGE,
        Some(ErrorClass::WrongIdentity) => exit::WRONG_IDENTITY,
        Some(ErrorClass::InvalidHeader) => exit::INVALID_HEADER,
        Some(ErrorClass::Busy) => exit::BUSY,
        Some(ErrorClass::Refused) => exit::REFUSED,
        Some(ErrorClass::Internal) | None => exit::INTERNAL,
    }
}

fn print_json(value: &impl Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn open_source(global: &Global) -> anyhow::Result<Box<dyn SealingSource>> {
    let source = sealing::open_source(
        global.tee,
        &global.state_dir,
        global.sim_identity.as_deref(),
    )
    .map_err(VolumeError::from)?;
    if source.is_simulated() {
        eprintln!("sealcsi: WARNING: {}", sealing::SIM_WARNING);
    }
    Ok(source)
}

fn kernel_dm() -> anyhow::Result<KernelDm> {
    Ok(KernelDm::new().map_err(VolumeError::from)?)
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Volume(command) => run_volume(&cli.global, command),
        Command::Plugin(args) => run_plugin(&cli.global, args),
    }
}

fn run_plugin(global: &Global, args: PluginArgs) -> anyhow::Result<()> {
    let source = open_source(global)?;
    let deps = sealcsi::csi::PluginDeps::kernel(source)?;
    let mut config =
        sealcsi::csi::PluginConfig::new(args.endpoint, args.node_id, args.mode, &global.state_dir);
    config.driver_name = args.driver_name;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(sealcsi::csi::serve(config, deps))?;
    Ok(())
}

fn run_volume(global: &Global, command: VolumeCommand) -> anyhow::Result<()> {
    match command {
        VolumeCommand::Format {
            device,
            integrity,
            journal,
            fs,
            init,
            force,
        } => {
            let opts = format_options(integrity, journal, fs, init, force);
            let source = open_source(global)?;
            let dm = kernel_dm()?;
            let report = Volumes::new(&dm, source.as_ref())
                .format(&device, &opts, &mut |done, total| {
                    eprint!(
                        "\rsealcsi: initializing {} / {} MiB",
                        done >> 20,
                        total >> 20
                    );
                    if done == total {
                        eprintln!();
                    }
                })
                .with_context(|| format!("formatting {}", device.display()))?;
            print_json(&report)
        }
        VolumeCommand::Open { device, name } => {
            let name = match name {
                Some(name) => name,
                None => volume::default_name(&volume::inspect(&device)?.uuid),
            };
            let source = open_source(global)?;
            let dm = kernel_dm()?;
            let report = Volumes::new(&dm, source.as_ref())
                .open(&device, &name)
                .with_context(|| format!("opening {}", device.display()))?;
            print_json(&report)
        }
        VolumeCommand::Close { name } => {
            let dm = kernel_dm()?;
            let closed = volume::close(&dm, &name)?;
            print_json(&serde_json::json!({ "name": name, "closed": closed }))
        }
        VolumeCommand::Inspect { device } => print_json(&volume::inspect(&device)?),
        VolumeCommand::Identity => {
            let source = open_source(global)?;
            print_json(&sealing::identity(source.as_ref()).map_err(VolumeError::from)?)
        }
    }
}

fn format_options(
    integrity: IntegrityArg,
    journal: JournalArg,
    fs: FsArg,
    init: Option<InitArg>,
    force: bool,
) -> FormatOptions {
    let profile = match (integrity, journal) {
        (IntegrityArg::HmacSha256, JournalArg::Journal) => Profile::AeadHmacSha256 {
            journal: Journal::Journal,
        },
        (IntegrityArg::HmacSha256, JournalArg::Direct) => Profile::AeadHmacSha256 {
            journal: Journal::Direct,
        },
        (IntegrityArg::None, _) => Profile::XtsOnly,
    };
    let fs = match fs {
        FsArg::Ext4 => FsKind::Ext4,
        FsArg::Xfs => FsKind::Xfs,
        FsArg::None => FsKind::None,
    };
    let init = match (init, fs) {
        (Some(InitArg::Fast), _) => InitMode::Fast,
        (Some(InitArg::Full), _) => InitMode::Full,
        (None, FsKind::None) => InitMode::Full,
        (None, _) => InitMode::Fast,
    };
    FormatOptions {
        profile,
        fs,
        init,
        force,
    }
}
