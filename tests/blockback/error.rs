//! blockback's errors, and their one mapping to gRPC codes (the CSI spec's meanings).

use std::path::{Path, PathBuf};

use tonic::{Code, Status};

/// Everything a blockback operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum BbError {
    /// The request is malformed or asks for what blockback does not do.
    #[error("{0}")]
    InvalidArgument(String),
    /// The volume, snapshot, node or path does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The name is taken by something incompatible with the request.
    #[error("{0}")]
    AlreadyExists(String),
    /// The object is not in a state that allows the operation (published, staged, in use).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The requested size cannot be honoured.
    #[error("{0}")]
    OutOfRange(String),
    /// The request cannot be placed (topology) or there is no room.
    #[error("{0}")]
    ResourceExhausted(String),
    /// A paging token this server did not hand out.
    #[error("{0}")]
    Aborted(String),
    /// A filesystem operation on the state directory or a target path failed.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A record does not parse.
    #[error("record {path}: {source}")]
    Record {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// A loop device operation failed.
    #[error(transparent)]
    Loop(#[from] sealcsi::backend::BackendError),
    /// A mount operation failed.
    #[error(transparent)]
    Mount(#[from] sealcsi::node::MountError),
}

impl BbError {
    /// An I/O error of `op` on `path`.
    pub fn io(op: &'static str, path: &Path, source: std::io::Error) -> Self {
        BbError::Io {
            op,
            path: path.to_owned(),
            source,
        }
    }

    /// The gRPC code of this error.
    pub fn code(&self) -> Code {
        use sealcsi::backend::BackendError;
        match self {
            BbError::InvalidArgument(_) => Code::InvalidArgument,
            BbError::NotFound(_) => Code::NotFound,
            BbError::AlreadyExists(_) => Code::AlreadyExists,
            BbError::FailedPrecondition(_) => Code::FailedPrecondition,
            BbError::OutOfRange(_) => Code::OutOfRange,
            BbError::ResourceExhausted(_) => Code::ResourceExhausted,
            BbError::Aborted(_) => Code::Aborted,
            BbError::Loop(BackendError::Busy(_)) => Code::FailedPrecondition,
            BbError::Loop(BackendError::NoFreeLoop(_)) => Code::ResourceExhausted,
            BbError::Io { source, .. } if source.raw_os_error() == Some(nix::libc::ENOSPC) => {
                Code::ResourceExhausted
            }
            BbError::Io { .. } | BbError::Record { .. } | BbError::Loop(_) | BbError::Mount(_) => {
                Code::Internal
            }
        }
    }
}

impl From<BbError> for Status {
    fn from(e: BbError) -> Status {
        let code = e.code();
        if code == Code::Internal {
            tracing::error!(error = %e, "internal error");
        }
        Status::new(code, format!("blockback: {e}"))
    }
}
