//! sealcsi: sealed encrypted volumes for confidential-computing nodes.
//!
//! The library is the core the CLI and the CSI services stand on; it knows nothing of gRPC.

pub mod backend;
pub mod csi;
pub mod devio;
pub mod dm;
pub mod fs;
pub mod hardening;
pub mod header;
pub mod init;
pub mod keyring;
pub mod keys;
pub mod keyslots;
pub mod logging;
pub mod mapping;
pub mod metrics;
pub mod node;
pub mod provision;
pub mod sealing;
pub mod volume;
