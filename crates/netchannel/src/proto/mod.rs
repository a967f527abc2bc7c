//! Protocol core (sans-IO): the per-vsocket send and receive state machines, reassembly by
//! offset, credit accounting, the NetDriver's channel scheduler and the tombstones that answer late
//! frames of vsockets gone.
//!
//! Nothing here owns a socket, a thread or a clock. The engine (`crate::engine`) drives these
//! structures with method calls; the tests drive them directly, deterministically.

pub mod reasm;
pub mod sched;
#[cfg(test)]
mod sim;
pub mod stream;
pub mod tombs;

/// A peer broke the protocol: what it did, in words fit for a log line or an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtoError(pub String);

impl std::fmt::Display for ProtoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ProtoError {}
