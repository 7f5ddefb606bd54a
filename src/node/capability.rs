//! A CSI volume capability in core terms: how a volume is accessed (block or filesystem) and by whom.
//! The gRPC edge builds it from the request (`crate::csi::convert`); the node core acts on it.

use crate::header::FsKind;

/// How a volume may be accessed: only single-node modes exist (the volumes are local to one node).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessMode {
    SingleNodeWriter,
    SingleNodeReaderOnly,
    SingleNodeSingleWriter,
    SingleNodeMultiWriter,
}

impl AccessMode {
    pub fn read_only(self) -> bool {
        self == AccessMode::SingleNodeReaderOnly
    }
}

/// Block device or mounted filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessType {
    Block,
    /// `fs` is `None` when the CO left the choice to the plugin (ext4 for a new volume, else what the
    /// volume was formatted with).
    Mount {
        fs: Option<FsKind>,
        flags: Vec<String>,
    },
}

/// A volume capability in core terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capability {
    pub access: AccessType,
    pub mode: AccessMode,
}
