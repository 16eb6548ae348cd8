//! NIXL status codes and the engine's error type.
//!
//! Every error names who is at fault (the caller, a remote peer, or this
//! process) and maps to exactly one `nixl_status_t`.

use thiserror::Error;

/// `nixl_status_t` as NIXL 1.5 defines it.
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// The operation is still running.
    InProg = 1,
    /// The operation finished successfully.
    Success = 0,
    /// The request was never posted.
    NotPosted = -1,
    /// A parameter from the caller is invalid.
    InvalidParam = -2,
    /// The backend failed internally.
    Backend = -3,
    /// Something the caller named does not exist.
    NotFound = -4,
    /// Two things that must agree do not.
    Mismatch = -5,
    /// The operation is not allowed.
    NotAllowed = -6,
    /// A repost was attempted while the previous post is still running.
    RepostActive = -7,
    /// An unexpected failure (used for caught panics).
    Unknown = -8,
    /// The operation is not supported by this backend.
    NotSupported = -9,
    /// The remote agent went away.
    RemoteDisconnect = -10,
    /// The operation was cancelled.
    Canceled = -11,
}

impl Status {
    /// The raw `nixl_status_t` value.
    pub fn code(self) -> i32 {
        self as i32
    }

    /// Maps a raw value back, for values this engine produces.
    pub fn from_code(code: i32) -> Option<Status> {
        use Status::*;
        Some(match code {
            1 => InProg,
            0 => Success,
            -1 => NotPosted,
            -2 => InvalidParam,
            -3 => Backend,
            -4 => NotFound,
            -5 => Mismatch,
            -6 => NotAllowed,
            -7 => RepostActive,
            -8 => Unknown,
            -9 => NotSupported,
            -10 => RemoteDisconnect,
            -11 => Canceled,
            _ => return None,
        })
    }
}

/// An engine error: what went wrong and why, and whose fault it is.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum Error {
    /// The caller passed something malformed or inconsistent.
    #[error("invalid parameter: {0}")]
    InvalidParam(String),
    /// The caller named an object (agent, metadata, handle) this engine does not know.
    #[error("not found: {0}")]
    NotFound(String),
    /// Two inputs from the caller disagree (e.g. descriptor counts or lengths).
    #[error("mismatch: {0}")]
    Mismatch(String),
    /// The operation is valid but refused (e.g. access outside a registration).
    #[error("not allowed: {0}")]
    NotAllowed(String),
    /// The request is already running.
    #[error("repost while active: {0}")]
    RepostActive(String),
    /// This build or configuration cannot do what was asked.
    #[error("not supported: {0}")]
    NotSupported(String),
    /// The peer is gone or unreachable.
    #[error("remote disconnected: {0}")]
    RemoteDisconnect(String),
    /// The request was cancelled.
    #[error("canceled: {0}")]
    Canceled(String),
    /// A failure inside this process (system call, invariant).
    #[error("backend failure: {0}")]
    Backend(String),
}

impl Error {
    /// The one `nixl_status_t` this error maps to.
    pub fn status(&self) -> Status {
        match self {
            Error::InvalidParam(_) => Status::InvalidParam,
            Error::NotFound(_) => Status::NotFound,
            Error::Mismatch(_) => Status::Mismatch,
            Error::NotAllowed(_) => Status::NotAllowed,
            Error::RepostActive(_) => Status::RepostActive,
            Error::NotSupported(_) => Status::NotSupported,
            Error::RemoteDisconnect(_) => Status::RemoteDisconnect,
            Error::Canceled(_) => Status::Canceled,
            Error::Backend(_) => Status::Backend,
        }
    }

    /// What went wrong, without the category prefix of `Display` (for an
    /// error quoted inside another one's message).
    pub fn message(&self) -> &str {
        match self {
            Error::InvalidParam(m)
            | Error::NotFound(m)
            | Error::Mismatch(m)
            | Error::NotAllowed(m)
            | Error::RepostActive(m)
            | Error::NotSupported(m)
            | Error::RemoteDisconnect(m)
            | Error::Canceled(m)
            | Error::Backend(m) => m,
        }
    }
}

/// The engine's result type.
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_round_trips_through_its_code() {
        for code in -11..=1 {
            let status = Status::from_code(code).expect("all codes from -11 to 1 are defined");
            assert_eq!(status.code(), code);
        }
        assert_eq!(Status::from_code(-12), None);
    }

    #[test]
    fn errors_map_to_their_status() {
        assert_eq!(
            Error::InvalidParam("x".into()).status(),
            Status::InvalidParam
        );
        assert_eq!(Error::RemoteDisconnect("x".into()).status().code(), -10);
        assert_eq!(Error::Canceled("x".into()).status().code(), -11);
        assert!(
            Error::NotAllowed("range".into())
                .to_string()
                .contains("range")
        );
    }
}
