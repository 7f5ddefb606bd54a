//! Requests' proto types into core types, and back. Validation of the shape of requests lives here.

use std::collections::HashMap;

use tonic::Status;

use super::proto::volume_capability::{AccessType as ProtoAccess, access_mode::Mode};
use super::proto::{self, VolumeCapability};
use super::status;
use crate::header::FsKind;
use crate::node::capability::{AccessMode, AccessType, Capability};
use crate::store::{StoreError, VolumeId};
use crate::volume::Condition;

/// Why a capability cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CapabilityError {
    /// Malformed: a required part is missing.
    Invalid(String),
    /// Well-formed, but not something sealcsi supports (multi-node modes, other filesystems).
    Unsupported(String),
}

impl CapabilityError {
    pub fn message(&self) -> &str {
        match self {
            CapabilityError::Invalid(m) | CapabilityError::Unsupported(m) => m,
        }
    }
}

/// The volume id of a request, checked once here: an id of a shape this plugin never makes names no
/// volume (NOT_FOUND, as the core would answer for an unknown id).
pub fn volume_id(id: &str) -> Result<VolumeId, Status> {
    VolumeId::parse(id).ok_or_else(|| status::from_error(&StoreError::NotFound(id.to_string())))
}

/// The filesystem named by a CSI `fs_type` (`""` = the plugin's choice).
fn fs_type(fs_type: &str) -> Result<Option<FsKind>, CapabilityError> {
    if fs_type.is_empty() {
        return Ok(None);
    }
    FsKind::from_fs_name(fs_type).map(Some).ok_or_else(|| {
        CapabilityError::Unsupported(format!(
            "fs_type {fs_type:?} is not supported (ext4 or xfs)"
        ))
    })
}

/// A proto capability in core terms.
pub fn capability(cap: &VolumeCapability) -> Result<Capability, CapabilityError> {
    let mode = cap.access_mode.as_ref().ok_or_else(|| {
        CapabilityError::Invalid("volume_capability.access_mode is required".into())
    })?;
    let mode = match Mode::try_from(mode.mode) {
        Ok(Mode::SingleNodeWriter) => AccessMode::SingleNodeWriter,
        Ok(Mode::SingleNodeReaderOnly) => AccessMode::SingleNodeReaderOnly,
        Ok(Mode::SingleNodeSingleWriter) => AccessMode::SingleNodeSingleWriter,
        Ok(Mode::SingleNodeMultiWriter) => AccessMode::SingleNodeMultiWriter,
        Ok(Mode::Unknown) => {
            return Err(CapabilityError::Invalid(
                "volume_capability.access_mode is UNKNOWN".into(),
            ));
        }
        Ok(
            m @ (Mode::MultiNodeReaderOnly
            | Mode::MultiNodeSingleWriter
            | Mode::MultiNodeMultiWriter),
        ) => {
            return Err(CapabilityError::Unsupported(format!(
                "access mode {} is not supported: sealcsi volumes are local to one node",
                m.as_str_name()
            )));
        }
        Err(_) => {
            return Err(CapabilityError::Unsupported(format!(
                "unknown access mode {}",
                mode.mode
            )));
        }
    };
    let access = match cap.access_type.as_ref() {
        None => {
            return Err(CapabilityError::Invalid(
                "volume_capability.access_type (block or mount) is required".into(),
            ));
        }
        Some(ProtoAccess::Block(_)) => AccessType::Block,
        Some(ProtoAccess::Mount(m)) => {
            let fs = fs_type(&m.fs_type)?;
            if !m.volume_mount_group.is_empty() {
                return Err(CapabilityError::Unsupported(
                    "volume_mount_group is not supported".into(),
                ));
            }
            crate::node::mount::split_options(&m.mount_flags)
                .map_err(|e| CapabilityError::Unsupported(e.to_string()))?;
            AccessType::Mount {
                fs,
                flags: m.mount_flags.clone(),
            }
        }
    };
    Ok(Capability { access, mode })
}

/// A required capability: missing or unusable is INVALID_ARGUMENT.
pub fn required_capability(cap: Option<&VolumeCapability>) -> Result<Capability, Status> {
    let cap = cap.ok_or_else(|| status::invalid_argument("volume_capability is required"))?;
    capability(cap).map_err(|e| status::invalid_argument(e.message()))
}

/// A required non-empty string field.
pub fn required<'a>(value: &'a str, field: &str) -> Result<&'a str, Status> {
    if value.is_empty() {
        Err(status::invalid_argument(format!("{field} is required")))
    } else {
        Ok(value)
    }
}

/// A capacity range as (required, limit) bytes, `0` meaning unset.
pub fn range(r: Option<&proto::CapacityRange>) -> Result<(u64, u64), Status> {
    let Some(r) = r else { return Ok((0, 0)) };
    let required = u64::try_from(r.required_bytes)
        .map_err(|_| status::invalid_argument("capacity_range.required_bytes is negative"))?;
    let limit = u64::try_from(r.limit_bytes)
        .map_err(|_| status::invalid_argument("capacity_range.limit_bytes is negative"))?;
    Ok((required, limit))
}

/// Bytes as a proto int64 (saturating).
pub fn bytes(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The proto condition.
pub fn condition(c: &Condition) -> proto::VolumeCondition {
    match c {
        Condition::Healthy => proto::VolumeCondition {
            abnormal: false,
            message: "volume is healthy".into(),
        },
        Condition::Abnormal(m) => proto::VolumeCondition {
            abnormal: true,
            message: m.clone(),
        },
    }
}

/// This node's topology segment.
pub fn topology(node_id: &str) -> proto::Topology {
    proto::Topology {
        segments: HashMap::from([(super::TOPOLOGY_KEY.to_string(), node_id.to_string())]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::volume_capability::{AccessMode as ProtoMode, BlockVolume, MountVolume};

    fn cap(mode: Mode, access: Option<ProtoAccess>) -> VolumeCapability {
        VolumeCapability {
            access_mode: Some(ProtoMode { mode: mode as i32 }),
            access_type: access,
        }
    }

    fn mount(fs: &str) -> Option<ProtoAccess> {
        Some(ProtoAccess::Mount(MountVolume {
            fs_type: fs.into(),
            mount_flags: vec![],
            volume_mount_group: String::new(),
        }))
    }

    #[test]
    fn capabilities() {
        let c = capability(&cap(Mode::SingleNodeWriter, mount("xfs"))).unwrap();
        assert_eq!(c.mode, AccessMode::SingleNodeWriter);
        assert!(matches!(
            c.access,
            AccessType::Mount {
                fs: Some(crate::header::FsKind::Xfs),
                ..
            }
        ));
        let c = capability(&cap(
            Mode::SingleNodeReaderOnly,
            Some(ProtoAccess::Block(BlockVolume {})),
        ))
        .unwrap();
        assert_eq!(c.access, AccessType::Block);
        assert!(c.mode.read_only());
        assert!(matches!(
            capability(&cap(Mode::MultiNodeMultiWriter, mount(""))),
            Err(CapabilityError::Unsupported(_))
        ));
        assert!(matches!(
            capability(&cap(Mode::SingleNodeWriter, mount("btrfs"))),
            Err(CapabilityError::Unsupported(_))
        ));
        assert!(matches!(
            capability(&cap(Mode::SingleNodeWriter, None)),
            Err(CapabilityError::Invalid(_))
        ));
        assert!(matches!(
            capability(&cap(Mode::Unknown, mount(""))),
            Err(CapabilityError::Invalid(_))
        ));
        assert!(matches!(
            capability(&VolumeCapability {
                access_mode: None,
                access_type: mount("")
            }),
            Err(CapabilityError::Invalid(_))
        ));
    }

    #[test]
    fn ranges() {
        assert_eq!(range(None).unwrap(), (0, 0));
        let r = proto::CapacityRange {
            required_bytes: 5,
            limit_bytes: 9,
        };
        assert_eq!(range(Some(&r)).unwrap(), (5, 9));
        let r = proto::CapacityRange {
            required_bytes: -1,
            limit_bytes: 0,
        };
        assert!(range(Some(&r)).is_err());
    }
}
