//! The command's error type: one human-readable sentence saying what failed, with which
//! address, key, file or flag. `main` prints it as `netchannel: <message>` on stderr and exits
//! with status 1.
//!
//! There is deliberately no `From<io::Error>`: every I/O error gets its context through
//! [`Context::context`], so a message never reads just "connection refused".

use std::fmt;
use std::io;

/// A failure of a command, ready to show to the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(String);

/// The command's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

impl From<String> for Error {
    fn from(s: String) -> Self {
        Error(s)
    }
}

impl From<&str> for Error {
    fn from(s: &str) -> Self {
        Error(s.to_string())
    }
}

impl From<netchannel::ConfigError> for Error {
    fn from(e: netchannel::ConfigError) -> Self {
        Error(e.to_string())
    }
}

/// An I/O error as a short phrase: `connection refused` rather than
/// `Connection refused (os error 111)`. Errors made by the engine keep their text.
pub fn describe(e: &io::Error) -> String {
    let text = e.to_string();
    if e.raw_os_error().is_none() {
        return text;
    }
    let text = match text.rfind(" (os error ") {
        Some(i) => &text[..i],
        None => &text,
    };
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// Attach "what was being done" to an I/O error.
pub trait Context<T> {
    /// Turn the error into `"{what}: {reason}"`; `what` is only built on failure.
    fn context<F: FnOnce() -> String>(self, what: F) -> Result<T>;
}

impl<T> Context<T> for io::Result<T> {
    fn context<F: FnOnce() -> String>(self, what: F) -> Result<T> {
        self.map_err(|e| Error(format!("{}: {}", what(), describe(&e))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_errors_are_short_phrases() {
        let e = io::Error::from_raw_os_error(libc::ECONNREFUSED);
        assert_eq!(describe(&e), "connection refused");
        let r: io::Result<()> = Err(e);
        let msg = r.context(|| "cannot connect to 10.0.0.2:5001".to_string()).unwrap_err();
        assert_eq!(msg.to_string(), "cannot connect to 10.0.0.2:5001: connection refused");
    }

    #[test]
    fn custom_errors_keep_their_text() {
        let e = io::Error::other("HELLO refused: version 2");
        assert_eq!(describe(&e), "HELLO refused: version 2");
    }
}
