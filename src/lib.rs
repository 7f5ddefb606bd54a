//! sealcsi: sealed encrypted volumes for confidential-computing nodes.
//!
//! The library is the core the CLI and the CSI services stand on; it knows nothing of gRPC.

pub mod backend;
pub mod devio;
pub mod dm;
pub mod header;
pub mod keyring;
pub mod keys;
pub mod mapping;
pub mod sealing;
pub mod csi; pub mod node; pub mod provision;
pub mod fs;
pub mod init;
pub mod volume;
