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
    /// For --tee tpm (or auto): the TPM's TCTI [default: device:/dev/tpmrm0], e.g.
    /// swtpm:host=127.0.0.1,port=2321. Setting it makes --tee auto use the TPM.
    #[arg(long, env = "SEALCSI_TPM_TCTI", global = true)]
    tpm_tcti: Option<String>,
    /// For --tee tpm (or auto): the PCRs new keyslots are sealed to [default: sha256:0,2,4,7].
    #[arg(long, env = "SEALCSI_TPM_PCRS", global = true)]
    tpm_pcrs: Option<sealing::PcrSelection>,
    /// For --tee snp (or auto): what new keyslots bind to: strict, upgradable or upgradable:svn=N
    /// [default: strict].
    #[arg(long, env = "SEALCSI_SNP_POLICY", global = true)]
    snp_policy: Option<sealing::SnpPolicy>,
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
    // recovery-keygen: see the keyslot block at the end of this file.
    #[command(flatten)]
    Recovery(RecoveryCommand),
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
    // Keyslot lifecycle (slots, add-slot, remove-slot, add-recovery, recover, erase): see the block at
    // the end of this file.
    #[command(flatten)]
    Keyslots(KeyslotCommand),
}

fn main() -> ExitCode {
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
            return ExitCode::from(if e.use_stderr() { exit::USAGE } else { 0 });
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
            ExitCode::from(exit_code(&e))
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

fn exit_code(e: &anyhow::Error) -> u8 {
    let class = e.downcast_ref::<VolumeError>().map(VolumeError::class);
    match class.or_else(|| e.downcast_ref::<KeyslotError>().map(KeyslotError::class)) {
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
    let opts = sealing::SourceOptions {
        state_dir: global.state_dir.clone(),
        sim_identity: global.sim_identity.clone(),
        tpm_tcti: global.tpm_tcti.clone(),
        tpm_pcrs: global.tpm_pcrs.clone(),
        snp_policy: global.snp_policy,
    };
    let source = sealing::open_source(global.tee, &opts).map_err(VolumeError::from)?;
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
        Command::Recovery(command) => run_recovery(command),
    }
}

fn run_plugin(global: &Global, args: PluginArgs) -> anyhow::Result<()> {
    if args.mode.node() {
        // Fail at start, not at the first NodeStageVolume: volume keys go only through the keyring.
        sealcsi::keyring::require().context("the node service cannot serve")?;
    }
    let source = open_source(global)?;
    let deps = sealcsi::csi::PluginDeps::kernel(source)?;
    let mut config =
        sealcsi::csi::PluginConfig::new(args.endpoint, args.node_id, args.mode, &global.state_dir);
    config.driver_name = args.driver_name;
    config.metrics_address = args.metrics_address;
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
        VolumeCommand::Keyslots(command) => run_keyslots(global, command),
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

// ---------------------------------------------------------------------------------------------
// Keyslot lifecycle and recovery escrow (issue 4a). The work is in `sealcsi::keyslots`; this block
// only parses arguments and prints reports.
// ---------------------------------------------------------------------------------------------

use sealcsi::keyslots::{self, KeyslotError, Target};

#[derive(Subcommand)]
enum KeyslotCommand {
    /// List a volume's keyslots as JSON, and the one this node opens (no key needed to list).
    Slots { device: PathBuf },
    /// Add a keyslot holding the same volume key for another identity; this node must open the volume.
    /// Idempotent.
    AddSlot {
        device: PathBuf,
        /// current | sim:<identity> | tpm-pcrs:<bank>:<idx>=<hex>,... | snp:strict | snp:upgradable[:svn=N]
        #[arg(long = "for", value_name = "TARGET")]
        target: Target,
    },
    /// Remove a keyslot (see `volume slots` for indices); this node must open the volume. Refuses the
    /// last slot of the volume, or the last one this node opens, unless --force.
    RemoveSlot {
        device: PathBuf,
        #[arg(long)]
        slot: usize,
        #[arg(long)]
        force: bool,
    },
    /// Escrow the volume key to an operator's recovery public key (HPKE); this node must open the
    /// volume. Prints the key check value to keep with the private key.
    AddRecovery {
        device: PathBuf,
        #[arg(long, visible_alias = "recovery-pubkey")]
        recovery_public_key: PathBuf,
    },
    /// Open the escrow slot with the recovery private key and add a keyslot for this node.
    Recover {
        device: PathBuf,
        #[arg(long, visible_alias = "recovery-key")]
        recovery_private_key: PathBuf,
        /// The key check value `add-recovery` printed: refuses an escrow slot forged with the public key.
        #[arg(long, required_unless_present = "unverified")]
        key_check: Option<String>,
        /// Recover without a key check value (accepting a slot anyone with the public key could forge).
        #[arg(long, conflicts_with = "key_check")]
        unverified: bool,
    },
    /// Crypto-erase: destroy every keyslot in both header copies. The data becomes unrecoverable.
    Erase {
        device: PathBuf,
        /// Confirms the destruction.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum RecoveryCommand {
    /// Generate an X25519 recovery key pair: the private key file (mode 0600, never printed) and the
    /// public key file for `volume add-recovery`.
    RecoveryKeygen {
        #[arg(long)]
        private_key: PathBuf,
        #[arg(long)]
        public_key: PathBuf,
    },
}

fn run_recovery(command: RecoveryCommand) -> anyhow::Result<()> {
    match command {
        RecoveryCommand::RecoveryKeygen {
            private_key,
            public_key,
        } => print_json(&keyslots::write_recovery_keys(&private_key, &public_key)?),
    }
}

fn run_keyslots(global: &Global, command: KeyslotCommand) -> anyhow::Result<()> {
    match command {
        KeyslotCommand::Slots { device } => {
            let slots = keyslots::list(&device)?;
            // Which slot this node opens, if it has a sealing source at all.
            let this_node = match (open_source(global), kernel_dm()) {
                (Ok(source), Ok(dm)) => {
                    keyslots::this_node_slot(&Volumes::new(&dm, source.as_ref()), &device)?
                }
                _ => None,
            };
            print_json(&serde_json::json!({
                "device": device,
                "slots": slots,
                "this_node_slot": this_node,
            }))
        }
        KeyslotCommand::AddSlot { device, target } => {
            let source = open_source(global)?;
            let dm = kernel_dm()?;
            let volumes = Volumes::new(&dm, source.as_ref());
            let change = match &target {
                // A pre-authorised TPM policy: a new secret sealed to PCR values the node will have
                // after the next measured boot, not to the current ones.
                keyslots::Target::TpmPcrs(spec) => {
                    let (bank, values) = sealing::tpm::parse_expected_pcrs(spec)?;
                    let pcrs: Vec<u8> = values.iter().map(|(pcr, _)| *pcr).collect();
                    let (binding, secret) = sealing::tpm::seal_for_pcrs(
                        &global.state_dir,
                        global.tpm_tcti.as_deref(),
                        bank,
                        &pcrs,
                        &values,
                    )
                    .map_err(VolumeError::from)?;
                    keyslots::add_sealed(
                        &volumes,
                        &device,
                        sealing::SourceKind::Tpm,
                        binding,
                        &secret,
                    )?
                }
                _ => {
                    let to = keyslots::open_target(&target, source.as_ref(), &global.state_dir)?;
                    keyslots::add_slot(&volumes, &device, to.source(), None)?
                }
            };
            print_json(&serde_json::json!({
                "slot": change.slot,
                "changed": change.changed,
                "for": target.to_string(),
            }))
        }
        KeyslotCommand::RemoveSlot {
            device,
            slot,
            force,
        } => {
            let source = open_source(global)?;
            let dm = kernel_dm()?;
            let change =
                keyslots::remove_slot(&Volumes::new(&dm, source.as_ref()), &device, slot, force)?;
            print_json(&change)
        }
        KeyslotCommand::AddRecovery {
            device,
            recovery_public_key,
        } => {
            let public = keyslots::read_public_key(&recovery_public_key)?;
            let source = open_source(global)?;
            let dm = kernel_dm()?;
            let report =
                keyslots::add_recovery(&Volumes::new(&dm, source.as_ref()), &device, &public)?;
            eprintln!(
                "sealcsi: keep the key_check value ({}) with the recovery private key: \
                 `volume recover --key-check` needs it",
                report.key_check
            );
            print_json(&report)
        }
        KeyslotCommand::Recover {
            device,
            recovery_private_key,
            key_check,
            unverified,
        } => {
            let private = keyslots::read_private_key(&recovery_private_key)?;
            let expected = key_check
                .as_deref()
                .map(keyslots::parse_key_check)
                .transpose()?;
            if unverified {
                eprintln!(
                    "sealcsi: WARNING: recovering without a key check: an escrow slot forged with the \
                     public recovery key would be accepted"
                );
            }
            let source = open_source(global)?;
            let report = keyslots::recover(source.as_ref(), &device, &private, expected.as_ref())?;
            print_json(&report)
        }
        KeyslotCommand::Erase { device, force } => {
            if !force {
                return Err(KeyslotError::NotConfirmed(format!(
                    "refusing to erase {}: erase destroys every keyslot and makes the data \
                     unrecoverable; pass --force",
                    device.display()
                ))
                .into());
            }
            let report = keyslots::erase(&device)?;
            eprintln!(
                "sealcsi: {} was crypto-erased: no header copy holds a key any more, and its data can \
                 never be decrypted again (by anyone who did not keep a copy of the old header)",
                device.display()
            );
            print_json(&report)
        }
    }
}
