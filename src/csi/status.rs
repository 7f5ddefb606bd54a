//! The one place where errors become gRPC statuses. Core errors know their [`Kind`]; this maps the kind
//! to a code, so every RPC answers the same failure with the same code.

use tonic::{Code, Status};

use crate::error::{Classify, Kind};

/// The gRPC code of a kind of failure.
pub fn code_for(kind: Kind) -> Code {
    match kind {
        Kind::NotFound => Code::NotFound,
        Kind::AlreadyExists => Code::AlreadyExists,
        Kind::InvalidArgument => Code::InvalidArgument,
        // This node cannot open the volume, the header is damaged, the device holds something else or
        // is held: none of it goes away by retrying the same call; an operator must act.
        Kind::WrongIdentity
        | Kind::InvalidHeader
        | Kind::Busy
        | Kind::Refused
        | Kind::FailedPrecondition => Code::FailedPrecondition,
        Kind::Aborted => Code::Aborted,
        Kind::OutOfRange => Code::OutOfRange,
        Kind::ResourceExhausted => Code::ResourceExhausted,
        Kind::Unavailable => Code::Unavailable,
        Kind::Internal => Code::Internal,
        Kind::Cancelled => Code::Cancelled,
        Kind::Unknown => Code::Unknown,
        Kind::DeadlineExceeded => Code::DeadlineExceeded,
        Kind::PermissionDenied => Code::PermissionDenied,
        Kind::Unimplemented => Code::Unimplemented,
        Kind::DataLoss => Code::DataLoss,
        Kind::Unauthenticated => Code::Unauthenticated,
    }
}

/// The status for a core error. Messages of core errors never hold secrets (keys, request secrets).
pub fn from_error<E: Classify + ?Sized>(e: &E) -> Status {
    let kind = e.kind();
    match kind {
        Kind::Internal | Kind::Unavailable | Kind::Unknown | Kind::DataLoss => {
            tracing::error!(error = %e, "request failed")
        }
        _ => tracing::info!(error = %e, code = ?code_for(kind), "request refused"),
    }
    Status::new(code_for(kind), e.to_string())
}

/// A malformed request (a required field missing, a bad value).
pub fn invalid_argument(message: impl Into<String>) -> Status {
    let message = message.into();
    tracing::info!(error = %message, "invalid request");
    Status::invalid_argument(message)
}

/// An RPC or feature sealcsi does not implement.
pub fn unimplemented(what: &str) -> Status {
    Status::unimplemented(format!("{what} is not implemented by sealcsi"))
}

/// A failure of the plugin's own machinery (a task that panicked).
pub fn internal(message: impl Into<String>) -> Status {
    let message = message.into();
    tracing::error!(error = %message, "internal error");
    Status::internal(message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::ControllerError;
    use crate::store::StoreError;

    #[test]
    fn kinds_map_to_their_codes() {
        let e = StoreError::NotFound("sv-x".into());
        assert_eq!(from_error(&e).code(), Code::NotFound);
        assert_eq!(
            from_error(&ControllerError::BadToken("t".into())).code(),
            Code::Aborted
        );
        assert_eq!(code_for(Kind::OutOfRange), Code::OutOfRange);
        assert_eq!(code_for(Kind::ResourceExhausted), Code::ResourceExhausted);
        assert_eq!(code_for(Kind::WrongIdentity), Code::FailedPrecondition);
    }
}
