//! sealcsi: sealed encrypted volumes for confidential-computing nodes.
//!
//! The library is the core the CLI and the CSI services stand on. Its tree is its architecture:
//!
//! - [`csi`]: the gRPC edge (thin handlers, the server, the one status mapping);
//! - [`controller`]: the controller core (create, delete, list node-local volumes);
//! - [`node`]: the node core (stage, publish, expand, stats);
//! - [`store`]: volume ids, records and backing files, shared by both cores;
//! - [`volume`]: the engine: format, open, close, header I/O, the one seal path, the dm stack, init;
//! - [`keyslots`]: keyslot lifecycle and recovery escrow over the engine;
//! - [`header`], [`keys`]: the on-disk format and the key hierarchy;
//! - [`sealing`]: where secrets come from (SEV-SNP, TPM, simulated);
//! - [`broker`]: the `kbs` source: secrets a key broker releases after attestation;
//! - [`attest`]: TEE evidence binding caller data (for key brokers and attested transfer);
//! - [`dm`], [`backend`], [`keyring`], [`devio`]: the kernel behind small traits;
//! - [`health`]: integrity failures of open volumes, counted from the kernel log;
//! - [`error`]: the one error taxonomy; [`metrics`], [`clock`].
//!
//! Nothing below [`csi`] knows gRPC.
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod attest;
pub mod backend;
pub mod broker;
pub mod clock;
pub mod controller;
pub mod csi;
pub mod devio;
pub mod dm;
pub mod error;
pub mod hardening;
pub mod header;
pub mod health;
pub mod keyring;
pub mod keys;
pub mod keyslots;
pub mod logging;
pub mod metrics;
pub mod node;
pub mod sealing;
pub mod store;
pub mod volume;
