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

/// The filesystem volumes with these capabilities will be staged with, where it matters for their
/// size: xfs if any capability asks for it (its minimum is the largest).
pub fn stage_fs(caps: &[Capability]) -> Option<FsKind> {
    caps.iter()
        .any(|c| {
            matches!(
                c.access,
                AccessType::Mount {
                    fs: Some(FsKind::Xfs),
                    ..
                }
            )
        })
        .then_some(FsKind::Xfs)
}

/// Whether any capability is a Mount: the volume may get a filesystem.
pub fn wants_filesystem(caps: &[Capability]) -> bool {
    caps.iter()
        .any(|c| matches!(c.access, AccessType::Mount { .. }))
}
