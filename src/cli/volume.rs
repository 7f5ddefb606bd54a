//! `sealcsi volume format|open|close|inspect|identity`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;

use super::keyslots::KeyslotCommand;
use super::transfer::TransferCommand;
use super::{Global, kernel_dm, open_broker, open_source, print_json};
use sealcsi::header::{self, FsKind, Integrity, Journal, Profile};
use sealcsi::sealing;
use sealcsi::volume::init::InitMode;
use sealcsi::volume::stack::Workqueues;
use sealcsi::volume::{self, FormatOptions, VolumeError, Volumes};

#[derive(Subcommand)]
pub(crate) enum VolumeCommand {
    /// Create a sealed volume on a block device or file (refuses devices holding data unless --force).
    Format {
        device: PathBuf,
        #[arg(long, value_enum, default_value = "hmac-sha256")]
        integrity: Integrity,
        #[arg(long, value_enum, default_value = "journal")]
        journal: Journal,
        #[arg(long, value_enum, default_value = "ext4")]
        fs: FsKind,
        /// Default: fast with a filesystem, full without.
        #[arg(long, value_enum)]
        init: Option<InitMode>,
        /// Destroy whatever the device holds.
        #[arg(long)]
        force: bool,
        /// Bind the volume to this CSI volume id: a sealcsi node stages only volumes bound to the id it
        /// stages (e.g. when preparing a volume for a static PersistentVolume).
        #[arg(long, value_name = "CSI_VOLUME_ID")]
        volume_id: Option<String>,
    },
    /// Unseal and open a volume as /dev/mapper/<name>; prints {"device": ...}.
    Open {
        device: PathBuf,
        /// Device-mapper name; default sealcsi-<volume uuid>.
        #[arg(long)]
        name: Option<String>,
        /// Which of dm-crypt's workqueues the crypt device bypasses (docs/benchmarks.md,
        /// "Workqueues"). A volume already open keeps its flags.
        #[arg(long, value_enum, default_value_t)]
        workqueues: Workqueues,
    },
    /// Close /dev/mapper/<name> and the layers under it.
    Close { name: String },
    /// Print the header's public fields as JSON (no key needed).
    Inspect { device: PathBuf },
    /// Print this node's sealing identity as JSON.
    Identity,
    // Keyslot lifecycle (slots, add-slot, remove-slot, add-recovery, recover, erase): see the keyslots
    // module.
    #[command(flatten)]
    Keyslots(KeyslotCommand),
    // Attested transfer (transfer-request, transfer-grant, transfer-accept): see the transfer module.
    #[command(flatten)]
    Transfer(TransferCommand),
}

pub(crate) fn run(global: &Global, command: VolumeCommand) -> anyhow::Result<()> {
    match command {
        VolumeCommand::Format {
            device,
            integrity,
            journal,
            fs,
            init,
            force,
            volume_id,
        } => {
            let mut opts = format_options(integrity, journal, fs, init, force);
            if let Some(id) = &volume_id {
                opts.volume_binding = header::volume_binding(id);
            }
            // Bad options are refused before the sealing source or the kernel is touched.
            volume::check_format_options(&opts)?;
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
        VolumeCommand::Open {
            device,
            name,
            workqueues,
        } => {
            let name = match name {
                Some(name) => name,
                None => volume::default_name(&volume::inspect(&device)?.uuid)?,
            };
            let source = open_source(global)?;
            let broker = open_broker(global, source.as_ref())?;
            let dm = kernel_dm()?;
            let report = Volumes::new(&dm, source.as_ref())
                .with_broker(broker.as_ref().map(|b| b as &dyn sealing::SealingSource))
                .with_workqueues(workqueues)
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
        VolumeCommand::Keyslots(command) => super::keyslots::run(global, command),
        VolumeCommand::Transfer(command) => super::transfer::run(global, command),
    }
}

/// What `format` builds from its options. Without `--init`: fast with a filesystem, full without.
fn format_options(
    integrity: Integrity,
    journal: Journal,
    fs: FsKind,
    init: Option<InitMode>,
    force: bool,
) -> FormatOptions {
    let init = init.unwrap_or(match fs {
        FsKind::None => InitMode::Full,
        _ => InitMode::Fast,
    });
    FormatOptions {
        profile: Profile::new(integrity, journal),
        fs,
        init,
        force,
        volume_binding: [0; header::BINDING_DIGEST_LEN],
    }
}
