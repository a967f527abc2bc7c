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

/// A peer broke the protocol on one vsocket: what it did, with the offsets involved. Its
/// `Display` is fit for a log line or an error (the vsocket is reset with it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtoError {
    /// A DATA segment whose end does not fit in a 64-bit offset.
    Overflow { offset: u64, len: u64 },
    /// More out-of-order ranges than a receiver holds ([`reasm::MAX_RANGES`]).
    TooManyGaps,
    /// DATA past the credit limit granted.
    BeyondCredit { end: u64, granted: u64 },
    /// DATA past the stream's FIN.
    BeyondFin { end: u64, fin: u64 },
    /// A FIN before data already received, or past the credit.
    FinBeforeData { offset: u64, data_end: u64, granted: u64 },
    /// A second FIN at another offset.
    FinMoved { first: u64, second: u64 },
    /// An acknowledgement of bytes never sent.
    AckBeyondSent { received: u64, sent: u64 },
    /// A credit limit below the offset it acknowledges.
    LimitBelowAck { limit: u64, received: u64 },
    /// An acknowledgement of a FIN at `offset`: none was sent (`end` `None`), or the
    /// stream ends at `end`.
    FinAckMismatch { offset: u64, end: Option<u64> },
}

impl std::fmt::Display for ProtoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            ProtoError::Overflow { offset, len } => write!(f, "DATA at {offset} of {len} bytes overflows"),
            ProtoError::TooManyGaps => {
                write!(f, "peer left more than {} gaps in one vsocket stream", reasm::MAX_RANGES)
            }
            ProtoError::BeyondCredit { end, granted } => {
                write!(f, "DATA up to offset {end} exceeds the credit limit {granted} granted")
            }
            ProtoError::BeyondFin { end, fin } => write!(f, "DATA up to offset {end} is beyond FIN at {fin}"),
            ProtoError::FinBeforeData { offset, data_end, granted } => {
                write!(f, "FIN at offset {offset} contradicts data up to {data_end} (credit {granted})")
            }
            ProtoError::FinMoved { first, second } => {
                write!(f, "second FIN at {second} differs from the first at {first}")
            }
            ProtoError::AckBeyondSent { received, sent } => {
                write!(f, "peer acknowledged offset {received} but only {sent} was sent")
            }
            ProtoError::LimitBelowAck { limit, received } => {
                write!(f, "credit limit {limit} is below the acknowledged offset {received}")
            }
            ProtoError::FinAckMismatch { offset, end: Some(end) } => {
                write!(f, "peer acknowledged a FIN at offset {offset}, but the stream ends at {end}")
            }
            ProtoError::FinAckMismatch { offset, end: None } => {
                write!(f, "peer acknowledged a FIN at offset {offset}, but no FIN was sent")
            }
        }
    }
}

impl std::error::Error for ProtoError {}
