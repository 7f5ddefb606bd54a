//! The keyslot lifecycle (`volume slots|add-slot|remove-slot|add-recovery|recover|erase`) and
//! `recovery-keygen`. The work is in `sealcsi::keyslots`; this module parses arguments and prints
//! reports.

use std::path::PathBuf;

use clap::Subcommand;

use super::{Global, kernel_dm, open_broker, open_source, print_json};
use sealcsi::keyslots::{self, KeyslotError, Target, TargetEnv};
use sealcsi::sealing::SealingSource;
use sealcsi::volume::Volumes;

#[derive(Subcommand)]
pub(crate) enum KeyslotCommand {
    /// List a volume's keyslots as JSON, and the one this node opens (no key needed to list).
    Slots { device: PathBuf },
    /// Add a keyslot holding the same volume key for another identity; this node must open the volume.
    /// Idempotent.
    AddSlot {
        device: PathBuf,
        /// current | sim:<identity> | tpm-pcrs:<bank>:<idx>=<hex>,... | snp:strict | snp:strict+tcb |
        /// kbs:<repo>/<type>/<tag> (with --kbs-url)
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
pub(crate) enum RecoveryCommand {
    /// Generate an X25519 recovery key pair: the private key file (mode 0600, never printed) and the
    /// public key file for `volume add-recovery`.
    RecoveryKeygen {
        #[arg(long)]
        private_key: PathBuf,
        #[arg(long)]
        public_key: PathBuf,
    },
}

pub(crate) fn run_recovery(command: RecoveryCommand) -> anyhow::Result<()> {
    match command {
        RecoveryCommand::RecoveryKeygen {
            private_key,
            public_key,
        } => print_json(&keyslots::write_recovery_keys(&private_key, &public_key)?),
    }
}

pub(crate) fn run(global: &Global, command: KeyslotCommand) -> anyhow::Result<()> {
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
            let broker = open_broker(global, source.as_ref())?;
            let dm = kernel_dm()?;
            let volumes = Volumes::new(&dm, source.as_ref())
                .with_broker(broker.as_ref().map(|b| b as &dyn SealingSource));
            let env = TargetEnv {
                state_dir: &global.state_dir,
                tpm_tcti: global.tpm_tcti.as_deref(),
                kbs: broker.as_ref(),
            };
            let change = keyslots::add_slot_for(&volumes, &device, &target, source.as_ref(), env)?;
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
