//! Why a lean exchange with the app failed, and whether the request may go out again.

use std::io;

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket failed (`answered`: after the answer's head had arrived).
    #[error("{what}: {source}")]
    Io { what: &'static str, source: io::Error, answered: bool },
    /// The app closed the connection before the answer's head, or before its body's end.
    #[error("the app closed the connection {}", if *answered { "before the answer's end" } else { "before answering" })]
    Closed { answered: bool },
    /// The answer broke HTTP/1.1.
    #[error("invalid answer from the app: {0}")]
    Invalid(&'static str),
}

impl Error {
    /// The connection ended (EOF, reset, aborted, broken pipe) before any answer's head: a
    /// reused keep-alive connection the app closed just as it was reused (the rule hyper's
    /// `closed_before_answer` applies, see [`crate::transport::https_client`]).
    pub fn unanswered(&self) -> bool {
        match self {
            Error::Closed { answered } => !answered,
            Error::Io { source, answered, .. } => {
                !answered
                    && matches!(
                        source.kind(),
                        io::ErrorKind::ConnectionReset
                            | io::ErrorKind::ConnectionAborted
                            | io::ErrorKind::BrokenPipe
                            | io::ErrorKind::UnexpectedEof
                    )
            }
            Error::Invalid(_) => false,
        }
    }
}
