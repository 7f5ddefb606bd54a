//! The one error taxonomy. Every module keeps its own typed error (thiserror) and says, once, what each
//! variant means to a caller by implementing [`Classify`]. The edges translate a [`Kind`] exactly once:
//! `crate::csi::status` to a gRPC code, the CLI's `exit` module to an exit code, and the metrics to an
//! unseal-failure reason.

/// What a failure means to whoever asked, independent of the transport that carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The object asked for does not exist.
    NotFound,
    /// An object of that name exists and is incompatible with the request.
    AlreadyExists,
    /// The request itself is wrong (a malformed value, an unknown option).
    InvalidArgument,
    /// This node's identity cannot unseal the volume.
    WrongIdentity,
    /// The header (or the integrity superblock it depends on) is missing, damaged, altered or of an
    /// unsupported version.
    InvalidHeader,
    /// The device, the name or the volume is in use.
    Busy,
    /// The operation would destroy something and was not confirmed.
    Refused,
    /// The object is not in the state the operation needs (not staged, still published).
    FailedPrecondition,
    /// A size outside what sealcsi supports.
    OutOfRange,
    /// Not enough space.
    ResourceExhausted,
    /// A concurrent operation, or a stale continuation token: retry.
    Aborted,
    /// A dependency does not answer.
    Unavailable,
    /// Anything else: kernel, I/O, tools, bugs.
    Internal,
    // Only a stacked-over CSI driver (`crate::backend::csi`) answers with these: they exist so that its
    // errors keep their gRPC code through the one Kind -> code mapping.
    /// The backend cancelled the call.
    Cancelled,
    /// The backend failed without saying why.
    Unknown,
    /// The backend did not answer in time.
    DeadlineExceeded,
    /// The backend refused the caller's credentials.
    PermissionDenied,
    /// The backend does not implement the call.
    Unimplemented,
    /// The backend lost data.
    DataLoss,
    /// The backend could not authenticate the call (its secrets).
    Unauthenticated,
}

/// An error that knows its [`Kind`].
pub trait Classify: std::error::Error {
    fn kind(&self) -> Kind;
}

impl Classify for crate::dm::DmError {
    fn kind(&self) -> Kind {
        match self {
            crate::dm::DmError::InvalidArgument(_) => Kind::InvalidArgument,
            crate::dm::DmError::Busy(_) => Kind::Busy,
            _ => Kind::Internal,
        }
    }
}
