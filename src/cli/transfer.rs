//! Attested transfer (`volume transfer-request|transfer-grant|transfer-accept`). The work is in
//! `sealcsi::keyslots::transfer`; this module parses arguments, picks the evidence source from
//! `--tee`, and prints reports.

use std::path::PathBuf;

use clap::Subcommand;

use super::{Global, kernel_dm, open_source, print_json};
use sealcsi::attest::snp::{RootOfTrust, SnpChain};
use sealcsi::keyslots::parse_key_check;
use sealcsi::keyslots::transfer::{self, EvidenceChoice, Expectation, TransferError};
use sealcsi::sealing::{SIM_DEFAULT_IDENTITY, SourceKind, tpm};
use sealcsi::volume::Volumes;

#[derive(Subcommand)]
pub(crate) enum TransferCommand {
    /// On the target node: make a transfer request (an ephemeral key bound into this node's TEE
    /// evidence; the private half sealed to this node under the state dir). The file is public.
    #[command(name = "transfer-request")]
    Request {
        /// Where to write the request (created new, never overwritten).
        #[arg(long)]
        out: PathBuf,
        /// Limit the request to the volume of this UUID (`volume inspect` shows it).
        #[arg(long, value_name = "UUID")]
        volume_uuid: Option<uuid::Uuid>,
    },
    /// On the source node: verify a transfer request's evidence against --expect and add a transfer
    /// slot for the target; this node must open the volume. Prints the key check value for the target.
    #[command(name = "transfer-grant")]
    Grant {
        device: PathBuf,
        #[arg(long)]
        request: PathBuf,
        /// What the target must prove: sim:<identity>, tpm:<ak-sha256>:<bank>:<pcr>=<hex>,... (the
        /// request's `ak_sha256` and the PCR values you expect), or
        /// snp:measurement=<96 hex>,policy=<hex>,tcb-min=<bl>.<tee>.<snp>.<ucode>[,vmpl=<n>][,debug=allow]
        /// (with --vcek; docs/keys.md, "SNP expectation").
        #[arg(long, value_name = "POLICY")]
        expect: Expectation,
        /// snp: the target chip's VCEK certificate (PEM or DER; AMD's KDS serves it for the chip ID
        /// and reported TCB).
        #[arg(long, value_name = "FILE")]
        vcek: Option<PathBuf>,
        /// snp: the ASK certificate (PEM or DER); default: AMD's, built in, of the report's product.
        #[arg(long, value_name = "FILE", requires = "vcek")]
        ask: Option<PathBuf>,
        /// snp: the ARK certificate (PEM or DER); it must be AMD's root (built in) of the report's
        /// product unless --trust-given-ark; default: AMD's, built in.
        #[arg(long, value_name = "FILE", requires = "vcek")]
        ark: Option<PathBuf>,
        /// snp: trust --ark as the root even though it is not AMD's (test chains, a private root):
        /// the grant then proves nothing about AMD hardware. Needs --ark and --ask.
        #[arg(long, requires_all = ["ark", "ask"])]
        trust_given_ark: bool,
    },
    /// On the target node: open the transfer slot with this node's pending request key, add this
    /// node's own sealed slot and remove the transfer slot. Idempotent.
    #[command(name = "transfer-accept")]
    Accept {
        device: PathBuf,
        /// The key check value `transfer-grant` printed: refuses a transfer slot a host forged.
        #[arg(long, required_unless_present = "unverified")]
        key_check: Option<String>,
        /// Accept without a key check value (a slot anyone with the request file could forge).
        #[arg(long, conflicts_with = "key_check")]
        unverified: bool,
    },
}

fn evidence_choice(global: &Global, kind: SourceKind) -> anyhow::Result<EvidenceChoice> {
    Ok(match kind {
        SourceKind::Sim => EvidenceChoice::Sim {
            identity: global
                .sim_identity
                .clone()
                .unwrap_or_else(|| SIM_DEFAULT_IDENTITY.to_owned()),
        },
        SourceKind::Tpm => EvidenceChoice::Tpm {
            tcti: global
                .tpm_tcti
                .clone()
                .unwrap_or_else(|| tpm::DEFAULT_TCTI.to_owned()),
            selection: global.tpm_pcrs.clone().unwrap_or_default(),
        },
        SourceKind::Snp => EvidenceChoice::Snp,
        SourceKind::Kbs => anyhow::bail!(
            "a key broker is not a node identity: a transfer request needs this node's own TEE \
             (--tee sim|tpm|snp)"
        ),
    })
}

pub(crate) fn run(global: &Global, command: TransferCommand) -> anyhow::Result<()> {
    match command {
        TransferCommand::Request { out, volume_uuid } => {
            let source = open_source(global)?;
            let evidence = transfer::evidence_source(&evidence_choice(global, source.kind())?)?;
            if evidence.is_simulated() {
                eprintln!(
                    "sealcsi: WARNING: sample evidence is signed by nobody: this request proves \
                     nothing about this node"
                );
            }
            let report = transfer::make_request(
                source.as_ref(),
                evidence.as_ref(),
                &global.state_dir,
                volume_uuid.map(|u| *u.as_bytes()),
                &out,
            )?;
            print_json(&report)
        }
        TransferCommand::Grant {
            device,
            request,
            expect,
            vcek,
            ask,
            ark,
            trust_given_ark,
        } => {
            let expect = match (expect.is_snp(), vcek) {
                (true, Some(vcek)) => {
                    let root = if trust_given_ark {
                        eprintln!(
                            "sealcsi: WARNING: trusting the given ARK, not AMD's: this grant proves \
                             nothing about AMD hardware"
                        );
                        RootOfTrust::OperatorArk
                    } else {
                        RootOfTrust::Amd
                    };
                    let chain = SnpChain::load(&vcek, ask.as_deref(), ark.as_deref(), root)
                        .map_err(TransferError::from)?;
                    expect.with_snp_chain(chain)?
                }
                (true, None) => anyhow::bail!(
                    "--expect snp: needs --vcek (the target chip's VCEK certificate; \
                     docs/keys.md, \"SNP expectation\")"
                ),
                (false, Some(_)) => {
                    anyhow::bail!("--vcek, --ask and --ark are only for --expect snp:")
                }
                (false, None) => expect,
            };
            let request = transfer::read_request(&request)?;
            let source = open_source(global)?;
            let dm = kernel_dm()?;
            let report = transfer::grant(
                &Volumes::new(&dm, source.as_ref()),
                &device,
                &request,
                &expect,
                &global.state_dir,
            )?;
            if report.simulated {
                eprintln!(
                    "sealcsi: WARNING: the target's evidence is simulated (sample): the grant \
                     checked the protocol, not a TEE"
                );
            }
            eprintln!(
                "sealcsi: give the key_check value ({}) to the target's operator with the volume: \
                 `volume transfer-accept --key-check` needs it",
                report.key_check
            );
            print_json(&report)
        }
        TransferCommand::Accept {
            device,
            key_check,
            unverified,
        } => {
            let expected = key_check
                .as_deref()
                .map(parse_key_check)
                .transpose()
                .map_err(TransferError::from)?;
            if unverified {
                eprintln!(
                    "sealcsi: WARNING: accepting without a key check: a transfer slot forged with \
                     the public request key would be accepted"
                );
            }
            let source = open_source(global)?;
            let report = transfer::accept(
                source.as_ref(),
                &device,
                &global.state_dir,
                expected.as_ref(),
            )?;
            print_json(&report)
        }
    }
}
