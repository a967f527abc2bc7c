//! Wire layer: the channel frame codec (sans-IO).
//!
//! A network channel is a TCP byte stream of back-to-back frames. Every frame is a fixed
//! 32-byte header followed by `len` payload bytes. All integers are in network byte order
//! (big endian). This module is the one place where every frame is documented; it owns no
//! socket and no thread, and decoding any byte sequence yields a [`Frame`] or a typed
//! [`WireError`] — never a panic, and never an allocation sized by an unchecked length.
//!
//! # Header (32 bytes)
//!
//! | off | size | field      | meaning                                                        |
//! |-----|------|------------|----------------------------------------------------------------|
//! | 0   | 1    | `kind`     | frame kind, see [`Kind`]                                       |
//! | 1   | 1    | `flags`    | bit 0: latency class (HELLO, OPEN); every other bit must be 0  |
//! | 2   | 2    | reserved   | must be 0                                                      |
//! | 4   | 4    | `len`      | payload bytes that follow the header                           |
//! | 8   | 4    | `vsock`    | the *receiver's* vsocket id the frame is for; 0 = none         |
//! | 12  | 4    | `x`        | kind-specific 32-bit field                                     |
//! | 16  | 8    | `a`        | kind-specific 64-bit field                                     |
//! | 24  | 8    | `b`        | kind-specific 64-bit field                                     |
//!
//! # Frames
//!
//! | kind | name     | vsock        | x               | a                          | b               | payload            |
//! |------|----------|--------------|-----------------|----------------------------|-----------------|--------------------|
//! | 1    | HELLO    | 0            | 0               | 0                          | 0               | [`Hello`] body     |
//! | 2    | HELLO_OK | 0            | 0               | 0                          | 0               | [`HelloOk`] body   |
//! | 3    | OPEN     | 0            | opener's vsock  | src port << 16 \| dst port | initial credit  | none               |
//! | 4    | OPEN_OK  | opener's id  | acceptor's id   | 0                          | initial credit  | none               |
//! | 5    | REFUSED  | opener's id  | reason code     | 0                          | 0               | none               |
//! | 6    | DATA     | receiver id  | 0               | stream offset of byte 0    | 0               | segment bytes      |
//! | 7    | CREDIT   | receiver id  | 0               | offset received in order   | credit limit    | none               |
//! | 8    | FIN      | receiver id  | 0               | final stream offset        | 0               | none               |
//! | 9    | RESET    | receiver id or 0 (whole channel) | reason code | 0           | 0               | UTF-8 reason text  |
//! | 10   | PING     | 0            | 0               | 0                          | nonce           | none               |
//! | 11   | PONG     | 0            | 0               | 0                          | echoed nonce    | none               |
//!
//! * HELLO is the first frame a dialing host sends on a new channel; the accepting host
//!   answers HELLO_OK, or RESET (vsock 0) with a reason — for instance a protocol version it
//!   does not speak — and closes the channel.
//! * OPEN's `a` packs the opener's vsocket port (bits 16..32) and the destination port
//!   (bits 0..16); bits 32..64 must be 0. Its `flags` bit 0 is the vsocket's class.
//! * CREDIT: `a` is how far the receiver has the stream in order (the sender may free its
//!   copy of everything below it); `b` is the absolute offset up to which the sender may
//!   send. A sender never sends a byte at or beyond `b`.
//! * DATA carries at most [`MAX_SEGMENT`] bytes; RESET text at most [`MAX_REASON`] bytes.

/// Size of every frame header.
pub const HEADER_LEN: usize = 32;
/// Largest DATA payload a decoder accepts (the configured segment size must not exceed it).
pub const MAX_SEGMENT: usize = 1 << 20;
/// Largest RESET reason text.
pub const MAX_REASON: usize = 1024;
/// `"NCHN"`: first four bytes of a HELLO body.
pub const MAGIC: u32 = 0x4E43_484E;
/// Protocol version this build speaks.
pub const VERSION: u16 = 1;
/// Flag bit: the channel (HELLO) or vsocket (OPEN) is in the latency class.
pub const FLAG_LATENCY: u8 = 0x01;

/// Traffic class of a channel or a vsocket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Class {
    /// Bulk traffic: throughput channels.
    #[default]
    Throughput,
    /// Latency-sensitive traffic: latency channels, scheduled ahead of bulk.
    Latency,
}

/// Frame kinds (header byte 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Hello = 1,
    HelloOk = 2,
    Open = 3,
    OpenOk = 4,
    Refused = 5,
    Data = 6,
    Credit = 7,
    Fin = 8,
    Reset = 9,
    Ping = 10,
    Pong = 11,
}

/// Why a RESET or REFUSED was sent (the `x` field). Unknown codes decode as `Other(code)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// 1: no vsocket listener on the destination port (REFUSED).
    NoListener,
    /// 2: the listener's accept backlog is full (REFUSED).
    BacklogFull,
    /// 3: the vsocket was closed by its owner while data was still arriving.
    Closed,
    /// 4: the peer violated the protocol (credit overrun, unknown vsocket, bad frame).
    Protocol,
    /// 5: protocol version not spoken here (HELLO refusal).
    Version,
    /// 6: authentication failed (HELLO refusal).
    Auth,
    /// 7: the host is shutting down.
    Shutdown,
    /// Any other code, kept as received.
    Other(u32),
}

/// Body of HELLO (payload, fixed [`Hello::LEN`] bytes):
///
/// | off | size | field        |
/// |-----|------|--------------|
/// | 0   | 4    | magic = [`MAGIC`] |
/// | 4   | 2    | version      |
/// | 6   | 2    | channel index within its class |
/// | 8   | 8    | host id (random per engine start) |
/// | 16  | 16   | listen IP of the dialing host (IPv6, IPv4-mapped for IPv4) |
/// | 32  | 2    | listen port of the dialing host |
/// | 34  | 2    | reserved, must be 0 |
/// | 36  | 16   | nonce (authentication challenge; zero when unauthenticated) |
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    pub version: u16,
    pub class: Class,
    pub index: u16,
    pub host_id: u64,
    pub listen: std::net::SocketAddr,
    pub nonce: [u8; 16],
}

/// Body of HELLO_OK (payload, fixed [`HelloOk::LEN`] bytes):
///
/// | off | size | field      |
/// |-----|------|------------|
/// | 0   | 4    | magic      |
/// | 4   | 2    | version    |
/// | 6   | 2    | reserved, must be 0 |
/// | 8   | 8    | host id of the accepting host |
/// | 16  | 32   | authentication proof (zero when unauthenticated) |
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HelloOk {
    pub version: u16,
    pub host_id: u64,
    pub proof: [u8; 32],
}

/// A decoded frame. Payload-carrying variants borrow from the input buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame<'a> {
    Hello(Hello),
    HelloOk(HelloOk),
    Open { src_vsock: u32, src_port: u16, dst_port: u16, class: Class, credit: u64 },
    OpenOk { vsock: u32, src_vsock: u32, credit: u64 },
    Refused { vsock: u32, reason: Reason },
    Data { vsock: u32, offset: u64, payload: &'a [u8] },
    Credit { vsock: u32, received: u64, limit: u64 },
    Fin { vsock: u32, offset: u64 },
    Reset { vsock: u32, reason: Reason, message: &'a str },
    Ping { nonce: u64 },
    Pong { nonce: u64 },
}

/// A decoded header (validated: known kind, zero reserved bits, length within the kind's bound).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub flags: u8,
    pub len: u32,
    pub vsock: u32,
    pub x: u32,
    pub a: u64,
    pub b: u64,
}

/// Why bytes are not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireError {
    /// More bytes are needed: at least `needed` bytes in total from the frame start.
    Incomplete { needed: usize },
    /// Header byte 0 is not a known kind.
    UnknownKind(u8),
    /// Reserved bits or bytes are not zero, or flags are set that the kind does not define.
    Reserved { kind: Kind },
    /// The length field is not allowed for this kind.
    BadLength { kind: Kind, len: u32, max: usize },
    /// A field has a value the kind does not allow (bad magic, zero vsock id, non-UTF-8 text…).
    BadField { kind: Kind, field: &'static str },
}
