//! The one place where errors become gRPC statuses. Core errors carry a [`Meaning`]; this maps the
//! meaning to a code, so every RPC answers the same failure with the same code.

use tonic::{Code, Status};

use crate::provision::{Meaning, Meaningful};

/// The gRPC code of a meaning.
pub fn code_for(meaning: Meaning) -> Code {
    match meaning {
        Meaning::NotFound => Code::NotFound,
        Meaning::AlreadyExists => Code::AlreadyExists,
        Meaning::InvalidArgument => Code::InvalidArgument,
        Meaning::FailedPrecondition => Code::FailedPrecondition,
        Meaning::Aborted => Code::Aborted,
        Meaning::OutOfRange => Code::OutOfRange,
        Meaning::ResourceExhausted => Code::ResourceExhausted,
        Meaning::Unavailable => Code::Unavailable,
        Meaning::Internal => Code::Internal,
    }
}

/// The status for a core error. Messages of core errors never hold secrets (keys, request secrets).
pub fn from_error<E: Meaningful + ?Sized>(e: &E) -> Status {
    let meaning = e.meaning();
    match meaning {
        Meaning::Internal | Meaning::Unavailable => tracing::error!(error = %e, "request failed"),
        _ => tracing::info!(error = %e, code = ?code_for(meaning), "request refused"),
    }
    Status::new(code_for(meaning), e.to_string())
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
    use crate::provision::ProvisionError;

    #[test]
    fn meanings_map_to_their_codes() {
        let e = ProvisionError::NotFound("sv-x".into());
        assert_eq!(from_error(&e).code(), Code::NotFound);
        assert_eq!(
            from_error(&ProvisionError::BadToken("t".into())).code(),
            Code::Aborted
        );
        assert_eq!(code_for(Meaning::OutOfRange), Code::OutOfRange);
        assert_eq!(
            code_for(Meaning::ResourceExhausted),
            Code::ResourceExhausted
        );
    }
}
