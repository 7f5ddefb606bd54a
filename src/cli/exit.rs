//! Exit codes, documented in README.md: scripts and runbooks branch on them. The one place an error's
//! [`Kind`] becomes an exit code.

use sealcsi::error::{Classify, Kind};
use sealcsi::keyslots::KeyslotError;
use sealcsi::keyslots::transfer::TransferError;
use sealcsi::volume::VolumeError;

pub const SUCCESS: u8 = 0;
pub const INTERNAL: u8 = 1;
pub const USAGE: u8 = 2;
pub const WRONG_IDENTITY: u8 = 3;
pub const INVALID_HEADER: u8 = 4;
pub const BUSY: u8 = 5;
pub const REFUSED: u8 = 6;

/// The exit code of a kind of failure.
pub fn code_for(kind: Kind) -> u8 {
    match kind {
        Kind::InvalidArgument => USAGE,
        Kind::WrongIdentity => WRONG_IDENTITY,
        Kind::InvalidHeader => INVALID_HEADER,
        Kind::Busy => BUSY,
        Kind::Refused => REFUSED,
        Kind::NotFound
        | Kind::AlreadyExists
        | Kind::FailedPrecondition
        | Kind::OutOfRange
        | Kind::ResourceExhausted
        | Kind::Aborted
        | Kind::Unavailable
        | Kind::Internal
        | Kind::Cancelled
        | Kind::Unknown
        | Kind::DeadlineExceeded
        | Kind::PermissionDenied
        | Kind::Unimplemented
        | Kind::DataLoss
        | Kind::Unauthenticated => INTERNAL,
    }
}

/// The exit code of a failed command: from the first error in its chain that knows its kind.
pub fn code_of(e: &anyhow::Error) -> u8 {
    let kind = e.chain().find_map(|cause| {
        cause
            .downcast_ref::<VolumeError>()
            .map(Classify::kind)
            .or_else(|| cause.downcast_ref::<KeyslotError>().map(Classify::kind))
            .or_else(|| cause.downcast_ref::<TransferError>().map(Classify::kind))
    });
    kind.map_or(INTERNAL, code_for)
}
