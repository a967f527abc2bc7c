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
//! | 1   | 1    | `flags`    | bit 0: latency class (HELLO, OPEN); bit 1: ack request (DATA); bit 2: FIN received (CREDIT); bit 3: closed (FIN); every other bit must be 0 |
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
//! | 3    | OPEN     | 0            | opener's vsock  | src port << 16 \| dst port | initial credit  | 0..=MAX_SEGMENT stream bytes from offset 0 (optimistic open) |
//! | 4    | OPEN_OK  | opener's id  | acceptor's id   | 0                          | initial credit  | none               |
//! | 5    | REFUSED  | opener's id  | reason code     | 0                          | 0               | none               |
//! | 6    | DATA     | receiver id  | 0               | stream offset of byte 0    | 0               | segment bytes      |
//! | 7    | CREDIT   | receiver id  | 0               | offset received in order   | credit limit    | none               |
//! | 8    | FIN      | receiver id  | 0               | final stream offset        | 0               | none               |
//! | 9    | RESET    | receiver id or 0 (whole channel) | reason code | 0           | 0               | UTF-8 reason text  |
//! | 10   | PING     | 0            | 0               | 0                          | nonce           | none               |
//! | 11   | PONG     | 0            | 0               | 0                          | echoed nonce    | none               |
//! | 12   | AUTH     | 0            | 0               | 0                          | 0               | 32-byte proof      |
//! | 13   | AUTH_OK  | 0            | 0               | 0                          | 0               | none               |
//! | 14   | LISTEN   | 0            | port            | announcement sequence (≠ 0) | initial credit the listener grants an OPEN (≤ MAX_SEGMENT) | none |
//! | 15   | UNLISTEN | 0            | port            | announcement sequence (≠ 0) | 0               | none               |
//! | 16   | LISTEN_SET | 0          | 0               | announcement sequence (≠ 0) | 0               | none               |
//!
//! * HELLO is the first frame a dialing host sends on a new channel; the accepting host
//!   answers HELLO_OK, or RESET (vsock 0) with a reason — for instance a protocol version it
//!   does not speak — and closes the channel.
//! * Authentication (both hosts hold the same pre-shared key; the key never crosses the
//!   wire): HELLO carries the dialer's random nonce `Nd`; HELLO_OK carries the acceptor's
//!   nonce `Na` and its proof `HMAC(key, T ‖ 1)`; the dialer checks it and answers AUTH with
//!   `HMAC(key, T ‖ 2)`; the acceptor checks that and answers AUTH_OK (or RESET with reason
//!   `Auth`; a dialer that finds the acceptor's proof wrong says so with RESET `Auth` in
//!   place of AUTH). `T` is the transcript (`engine::auth`): the 52-byte HELLO body as sent
//!   and the channel class; HELLO_OK's version, host id and `Na`; and both ends of the TCP
//!   connection (dialer IP and port, acceptor IP and port, each 16 + 2 bytes, IPv4 as
//!   IPv4-mapped), prefixed by the label `"netchannel channel handshake v2"` — so a proof is
//!   valid for one role, one pair of hosts, one pair of nonces and one connection only (no
//!   reflection, replay or relay). Without a key the nonces and proofs are zero and there is
//!   no AUTH exchange; a host with a key refuses one without. Version 1 hosts, whose proofs
//!   covered only the nonces, are refused by version.
//! * OPEN's `a` packs the opener's vsocket port (bits 16..32) and the destination port
//!   (bits 0..16); bits 32..64 must be 0. Its `flags` bit 0 is the vsocket's class. An
//!   *optimistic* opener does not wait for OPEN_OK before it sends: its OPEN carries the
//!   first bytes of its stream (from offset 0) as payload, within the credit listeners grant
//!   by configuration (`open_credit`); its later bytes wait for OPEN_OK. An OPEN sent again
//!   after a channel died carries the same bytes; the acceptor discards them by offset.
//!   The acceptor of an OPEN that carries bytes may hold its OPEN_OK back and send it right
//!   before the vsocket's first frame (in the same write), or alone once its application
//!   would wait for more: the opener, which is not waiting for it, is not woken by it alone.
//! * CREDIT: `a` is how far the receiver has the stream in order (the sender may free its
//!   copy of everything below it); `b` is the absolute offset up to which the sender may
//!   send. A sender never sends a byte at or beyond `b`. With [`FLAG_FIN_RECEIVED`] the
//!   receiver also has the sender's FIN at `a`: the stream is complete, and the sender need
//!   never send FIN again (until then it re-sends FIN when a channel that may have carried it
//!   dies). A receiver that has not sent its own FIN yet may hold that acknowledgement back
//!   until it does, and then sends the CREDIT right before its FIN in one write (as TCP's FIN
//!   acknowledges the peer's); a sender must not rely on it coming sooner.
//! * FIN with [`FLAG_CLOSED`]: the sender's application has closed the vsocket, so nothing
//!   sent to it from now on is read (data would be answered with RESET). The receiver's own
//!   FIN (and the acknowledgement it carries) then wakes nobody there, and may wait in its
//!   channel's queue for the next write on that channel, for a bounded time.
//! * DATA carries at most [`MAX_SEGMENT`] bytes; RESET text at most [`MAX_REASON`] bytes.
//! * Listener announcements (LISTEN, UNLISTEN, LISTEN_SET): a host tells each peer which
//!   vsocket ports it listens on, so that a confirmed connect to an announced port needs no
//!   round trip (its OPEN leaves with the first bytes, as an optimistic one does, under the
//!   credit the LISTEN granted; a refusal fails the first read or write). LISTEN: `port`
//!   (`x`, at most 65535) listens, and an OPEN to it may carry up to `b` stream bytes.
//!   UNLISTEN: `port` no longer listens (its last listener closed). LISTEN_SET: a full set
//!   follows — forget every announcement with a sequence below `a`; the LISTENs of the
//!   set, one per listening port, follow on the same channel with the same sequence. A host
//!   sends LISTEN or UNLISTEN on one of the peer's channels when a listener is bound or
//!   closed, and LISTEN_SET with its set on every channel that joins the mesh (both hosts,
//!   after the handshake), so that what a dead channel lost is replaced when its successor
//!   comes up. Sequences are one counter per sending host, strictly increasing across
//!   ports: announcements may arrive out of order over different channels, and a receiver
//!   applies one for a port only if its sequence is above the last it applied for that port
//!   (and not below the last LISTEN_SET's). The set a receiver holds is a hint, never a
//!   proof: a port it lacks may have been bound a moment ago (its LISTEN in flight), so an
//!   unannounced port is opened with a round trip and nothing is refused locally; a port
//!   it holds may have closed a moment ago (its UNLISTEN in flight), and the OPEN is then
//!   refused as usual.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

/// Size of every frame header.
pub const HEADER_LEN: usize = 32;
/// Largest DATA payload a decoder accepts (the configured segment size must not exceed it).
pub const MAX_SEGMENT: usize = 1 << 20;
/// Largest RESET reason text.
pub const MAX_REASON: usize = 1024;
/// `"NCHN"`: first four bytes of a HELLO body.
pub const MAGIC: u32 = 0x4E43_484E;
/// Protocol version this build speaks.
/// Version 2: the authentication proofs cover the whole handshake transcript (see above).
/// Version 3: OPEN may carry the opener's first stream bytes (optimistic open).
/// Version 4: FIN may carry [`FLAG_CLOSED`].
/// Version 5: listener announcements (LISTEN, UNLISTEN, LISTEN_SET).
pub const VERSION: u16 = 5;
/// Length of an authentication proof (HMAC-SHA256) in HELLO_OK and AUTH.
pub const AUTH_PROOF_LEN: usize = 32;
/// Flag bit: the channel (HELLO) or vsocket (OPEN) is in the latency class.
pub const FLAG_LATENCY: u8 = 0x01;
/// Flag bit on DATA: the sender's buffer is filling; acknowledge (CREDIT) as soon as the
/// stream is in order up to the end of this segment.
pub const FLAG_ACK_REQUEST: u8 = 0x02;
/// Flag bit on CREDIT: the receiver has the FIN, and `received` is the final offset.
pub const FLAG_FIN_RECEIVED: u8 = 0x04;
/// Flag bit on FIN: the sender's application has closed the vsocket (it reads nothing more).
pub const FLAG_CLOSED: u8 = 0x08;

/// Byte offsets of every field on the wire, in the order of the tables above.
mod field {
    /// A field's bytes within the header or a body.
    pub type Field = core::ops::Range<usize>;

    pub const KIND: usize = 0;
    pub const FLAGS: usize = 1;
    pub const RESERVED: Field = 2..4;
    pub const LEN: Field = 4..8;
    pub const VSOCK: Field = 8..12;
    pub const X: Field = 12..16;
    pub const A: Field = 16..24;
    pub const B: Field = 24..32;

    /// HELLO body.
    pub mod hello {
        use super::Field;

        pub const MAGIC: Field = 0..4;
        pub const VERSION: Field = 4..6;
        pub const INDEX: Field = 6..8;
        pub const HOST_ID: Field = 8..16;
        pub const IP: Field = 16..32;
        pub const PORT: Field = 32..34;
        pub const RESERVED: Field = 34..36;
        pub const NONCE: Field = 36..52;
    }

    /// HELLO_OK body.
    pub mod hello_ok {
        use super::Field;

        pub const MAGIC: Field = 0..4;
        pub const VERSION: Field = 4..6;
        pub const RESERVED: Field = 6..8;
        pub const HOST_ID: Field = 8..16;
        pub const PROOF: Field = 16..48;
        pub const NONCE: Field = 48..64;
    }
}

// The offset tables and the length constants must agree.
const _: () = assert!(field::B.end == HEADER_LEN);
const _: () = assert!(field::hello::NONCE.end == Hello::LEN);
const _: () = assert!(field::hello_ok::NONCE.end == HelloOk::LEN);
// Every valid frame length fits the 32-bit `len` field.
const _: () = assert!(MAX_SEGMENT <= u32::MAX as usize && MAX_REASON <= MAX_SEGMENT);

use field::Field;

/// Copies `bytes` (whose length is `N`) into an array.
fn array<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut out = [0; N];
    out.copy_from_slice(bytes);
    out
}

fn get_u16(buf: &[u8], field: Field) -> u16 {
    u16::from_be_bytes(array(&buf[field]))
}

fn get_u32(buf: &[u8], field: Field) -> u32 {
    u32::from_be_bytes(array(&buf[field]))
}

fn get_u64(buf: &[u8], field: Field) -> u64 {
    u64::from_be_bytes(array(&buf[field]))
}

fn put(buf: &mut [u8], field: Field, bytes: &[u8]) {
    buf[field].copy_from_slice(bytes);
}

/// Traffic class of a channel or a vsocket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Class {
    /// Bulk traffic: throughput channels.
    #[default]
    Throughput,
    /// Latency-sensitive traffic: latency channels, scheduled ahead of bulk.
    Latency,
}

impl Class {
    /// `"throughput"` or `"latency"`, as in config files, status and logs.
    pub fn name(self) -> &'static str {
        match self {
            Class::Throughput => "throughput",
            Class::Latency => "latency",
        }
    }

    /// The class carried in a header's `flags`.
    fn from_flags(flags: u8) -> Class {
        if flags & FLAG_LATENCY != 0 {
            Class::Latency
        } else {
            Class::Throughput
        }
    }

    /// The header `flags` that carry this class.
    fn flags(self) -> u8 {
        match self {
            Class::Throughput => 0,
            Class::Latency => FLAG_LATENCY,
        }
    }
}

/// Frame kinds (header byte 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// 1: channel greeting from the dialing host.
    Hello = 1,
    /// 2: the accepting host's answer to HELLO.
    HelloOk = 2,
    /// 3: open a vsocket connection.
    Open = 3,
    /// 4: a vsocket connection was accepted.
    OpenOk = 4,
    /// 5: a vsocket connection was refused.
    Refused = 5,
    /// 6: a segment of a vsocket's byte stream.
    Data = 6,
    /// 7: receive progress and send window of a vsocket.
    Credit = 7,
    /// 8: end of a vsocket's byte stream.
    Fin = 8,
    /// 9: abort a vsocket, or the whole channel.
    Reset = 9,
    /// 10: liveness probe.
    Ping = 10,
    /// 11: answer to PING.
    Pong = 11,
    /// 12: the dialing host's authentication proof.
    Auth = 12,
    /// 13: the accepting host verified AUTH.
    AuthOk = 13,
    /// 14: a vsocket port of the sending host listens.
    Listen = 14,
    /// 15: a vsocket port of the sending host no longer listens.
    Unlisten = 15,
    /// 16: the sending host's whole set of listening ports follows.
    ListenSet = 16,
}

impl Kind {
    /// The kind with wire code `b`, or `None` for an unknown code.
    pub fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Hello,
            2 => Kind::HelloOk,
            3 => Kind::Open,
            4 => Kind::OpenOk,
            5 => Kind::Refused,
            6 => Kind::Data,
            7 => Kind::Credit,
            8 => Kind::Fin,
            9 => Kind::Reset,
            10 => Kind::Ping,
            11 => Kind::Pong,
            12 => Kind::Auth,
            13 => Kind::AuthOk,
            14 => Kind::Listen,
            15 => Kind::Unlisten,
            16 => Kind::ListenSet,
            _ => return None,
        })
    }

    /// The name used in the tables above (`"HELLO_OK"`, `"DATA"`, …).
    pub fn name(self) -> &'static str {
        match self {
            Kind::Hello => "HELLO",
            Kind::HelloOk => "HELLO_OK",
            Kind::Open => "OPEN",
            Kind::OpenOk => "OPEN_OK",
            Kind::Refused => "REFUSED",
            Kind::Data => "DATA",
            Kind::Credit => "CREDIT",
            Kind::Fin => "FIN",
            Kind::Reset => "RESET",
            Kind::Ping => "PING",
            Kind::Pong => "PONG",
            Kind::Auth => "AUTH",
            Kind::AuthOk => "AUTH_OK",
            Kind::Listen => "LISTEN",
            Kind::Unlisten => "UNLISTEN",
            Kind::ListenSet => "LISTEN_SET",
        }
    }

    /// Flag bits this kind defines.
    fn allowed_flags(self) -> u8 {
        match self {
            Kind::Hello | Kind::Open => FLAG_LATENCY,
            Kind::Data => FLAG_ACK_REQUEST,
            Kind::Credit => FLAG_FIN_RECEIVED,
            Kind::Fin => FLAG_CLOSED,
            _ => 0,
        }
    }

    /// Smallest and largest payload length this kind allows.
    fn len_bounds(self) -> (usize, usize) {
        match self {
            Kind::Hello => (Hello::LEN, Hello::LEN),
            Kind::HelloOk => (HelloOk::LEN, HelloOk::LEN),
            Kind::Auth => (AUTH_PROOF_LEN, AUTH_PROOF_LEN),
            Kind::Data => (1, MAX_SEGMENT),
            Kind::Open => (0, MAX_SEGMENT),
            Kind::Reset => (0, MAX_REASON),
            _ => (0, 0),
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
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

impl Reason {
    /// The wire code (the frame's `x` field).
    ///
    /// `Other(c)` gives `c` back unchanged, even where `c` is one of the named codes 1..=7.
    pub fn code(self) -> u32 {
        match self {
            Reason::NoListener => 1,
            Reason::BacklogFull => 2,
            Reason::Closed => 3,
            Reason::Protocol => 4,
            Reason::Version => 5,
            Reason::Auth => 6,
            Reason::Shutdown => 7,
            Reason::Other(code) => code,
        }
    }

    /// The reason with wire code `code`; codes other than 1..=7 give `Other(code)`.
    pub fn from_code(code: u32) -> Reason {
        match code {
            1 => Reason::NoListener,
            2 => Reason::BacklogFull,
            3 => Reason::Closed,
            4 => Reason::Protocol,
            5 => Reason::Version,
            6 => Reason::Auth,
            7 => Reason::Shutdown,
            other => Reason::Other(other),
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::NoListener => f.write_str("no listener on that port"),
            Reason::BacklogFull => f.write_str("listener backlog full"),
            Reason::Closed => f.write_str("vsocket closed by its owner"),
            Reason::Protocol => f.write_str("protocol violation"),
            Reason::Version => f.write_str("protocol version not supported"),
            Reason::Auth => f.write_str("authentication failed"),
            Reason::Shutdown => f.write_str("host shutting down"),
            Reason::Other(code) => write!(f, "reason code {code}"),
        }
    }
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
///
/// The class is not in the body: it travels in the header's `flags` ([`FLAG_LATENCY`]).
/// An IPv4 `listen` address is sent IPv4-mapped (`::ffff:a.b.c.d`) and an IPv4-mapped address
/// is received as [`SocketAddr::V4`]; an IPv6 address loses its flow info and scope id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// Protocol version of the dialing host (the decoder accepts any; see [`VERSION`]).
    pub version: u16,
    /// Class of the channel (header `flags` bit 0).
    pub class: Class,
    /// Index of the channel within its class.
    pub index: u16,
    /// Host id of the dialing host (random per engine start).
    pub host_id: u64,
    /// Address the dialing host accepts channels on.
    pub listen: std::net::SocketAddr,
    /// Authentication challenge; zero when unauthenticated.
    pub nonce: [u8; 16],
}

impl Hello {
    /// Size of a HELLO body.
    pub const LEN: usize = 52;

    /// Writes the body (the class goes in the header, not here).
    pub fn encode(&self, out: &mut [u8; Hello::LEN]) {
        use field::hello;
        let ip = match self.listen.ip() {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        };
        put(out, hello::MAGIC, &MAGIC.to_be_bytes());
        put(out, hello::VERSION, &self.version.to_be_bytes());
        put(out, hello::INDEX, &self.index.to_be_bytes());
        put(out, hello::HOST_ID, &self.host_id.to_be_bytes());
        put(out, hello::IP, &ip.octets());
        put(out, hello::PORT, &self.listen.port().to_be_bytes());
        put(out, hello::RESERVED, &[0; 2]);
        put(out, hello::NONCE, &self.nonce);
    }

    /// Reads a body; `class` comes from the header's flags.
    ///
    /// Fails with [`WireError::BadField`] (`"magic"`) on a wrong magic number and with
    /// [`WireError::Reserved`] when the reserved bytes are not zero.
    pub fn decode(body: &[u8; Hello::LEN], class: Class) -> Result<Hello, WireError> {
        use field::hello;
        if get_u32(body, hello::MAGIC) != MAGIC {
            return Err(WireError::BadField { kind: Kind::Hello, field: "magic" });
        }
        if get_u16(body, hello::RESERVED) != 0 {
            return Err(WireError::Reserved { kind: Kind::Hello });
        }
        let ip = Ipv6Addr::from(array::<16>(&body[hello::IP]));
        let port = get_u16(body, hello::PORT);
        let listen = match ip.to_ipv4_mapped() {
            Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, port)),
            None => SocketAddr::V6(SocketAddrV6::new(ip, port, 0, 0)),
        };
        Ok(Hello {
            version: get_u16(body, hello::VERSION),
            class,
            index: get_u16(body, hello::INDEX),
            host_id: get_u64(body, hello::HOST_ID),
            listen,
            nonce: array(&body[hello::NONCE]),
        })
    }
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
/// | 48  | 16   | nonce: the accepting host's challenge (zero when unauthenticated) |
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HelloOk {
    /// Protocol version the accepting host speaks on this channel.
    pub version: u16,
    /// Host id of the accepting host.
    pub host_id: u64,
    /// Authentication proof; zero when unauthenticated.
    pub proof: [u8; 32],
    /// The accepting host's challenge to the dialing host; zero when unauthenticated.
    pub nonce: [u8; 16],
}

impl HelloOk {
    /// Size of a HELLO_OK body.
    pub const LEN: usize = 64;

    /// Writes the body.
    pub fn encode(&self, out: &mut [u8; HelloOk::LEN]) {
        use field::hello_ok;
        put(out, hello_ok::MAGIC, &MAGIC.to_be_bytes());
        put(out, hello_ok::VERSION, &self.version.to_be_bytes());
        put(out, hello_ok::RESERVED, &[0; 2]);
        put(out, hello_ok::HOST_ID, &self.host_id.to_be_bytes());
        put(out, hello_ok::PROOF, &self.proof);
        put(out, hello_ok::NONCE, &self.nonce);
    }

    /// Reads a body.
    ///
    /// Fails with [`WireError::BadField`] (`"magic"`) on a wrong magic number and with
    /// [`WireError::Reserved`] when the reserved bytes are not zero.
    pub fn decode(body: &[u8; HelloOk::LEN]) -> Result<HelloOk, WireError> {
        use field::hello_ok;
        if get_u32(body, hello_ok::MAGIC) != MAGIC {
            return Err(WireError::BadField { kind: Kind::HelloOk, field: "magic" });
        }
        if get_u16(body, hello_ok::RESERVED) != 0 {
            return Err(WireError::Reserved { kind: Kind::HelloOk });
        }
        Ok(HelloOk {
            version: get_u16(body, hello_ok::VERSION),
            host_id: get_u64(body, hello_ok::HOST_ID),
            proof: array(&body[hello_ok::PROOF]),
            nonce: array(&body[hello_ok::NONCE]),
        })
    }
}

/// A decoded frame. Payload-carrying variants borrow from the input buffer.
///
/// Field meanings are those of the frame table in the [module documentation](crate::wire).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame<'a> {
    /// HELLO: channel greeting.
    Hello(Hello),
    /// HELLO_OK: channel accepted.
    HelloOk(HelloOk),
    /// OPEN: open a vsocket connection to `dst_port` on the peer.
    Open {
        /// The opener's vsocket id (`x`, never 0).
        src_vsock: u32,
        /// The opener's vsocket port (`a` bits 16..32).
        src_port: u16,
        /// The destination port (`a` bits 0..16).
        dst_port: u16,
        /// The vsocket's class (`flags` bit 0).
        class: Class,
        /// Initial credit: the absolute offset up to which the acceptor may send (`b`).
        credit: u64,
        /// The opener's stream from offset 0 (optimistic open); empty for a confirmed open.
        payload: &'a [u8],
    },
    /// OPEN_OK: the connection was accepted.
    OpenOk {
        /// The opener's vsocket id (never 0).
        vsock: u32,
        /// The acceptor's vsocket id (`x`, never 0).
        src_vsock: u32,
        /// Initial credit: the absolute offset up to which the opener may send (`b`).
        credit: u64,
    },
    /// REFUSED: the connection was refused.
    Refused {
        /// The opener's vsocket id (never 0).
        vsock: u32,
        /// Why (`x`).
        reason: Reason,
    },
    /// DATA: `payload` is the receiver's stream from `offset` on.
    Data {
        /// The receiver's vsocket id (never 0).
        vsock: u32,
        /// Stream offset of `payload[0]` (`a`); `offset + payload.len()` fits a `u64`.
        offset: u64,
        /// 1..=[`MAX_SEGMENT`] stream bytes.
        payload: &'a [u8],
        /// [`FLAG_ACK_REQUEST`]: acknowledge promptly.
        ack_request: bool,
    },
    /// CREDIT: receive progress and send window.
    Credit {
        /// The receiver's vsocket id (never 0).
        vsock: u32,
        /// Offset up to which the stream was received in order (`a`).
        received: u64,
        /// Offset up to which the sender may send (`b`, at least `received`).
        limit: u64,
        /// [`FLAG_FIN_RECEIVED`]: the FIN arrived and `received` is the final offset.
        fin_received: bool,
    },
    /// FIN: the stream ends at `offset`.
    Fin {
        /// The receiver's vsocket id (never 0).
        vsock: u32,
        /// Final stream offset (`a`).
        offset: u64,
        /// [`FLAG_CLOSED`]: the sender's application has closed the vsocket.
        closed: bool,
    },
    /// RESET: abort a vsocket, or the whole channel when `vsock` is 0.
    Reset {
        /// The receiver's vsocket id, or 0 for the whole channel.
        vsock: u32,
        /// Why (`x`).
        reason: Reason,
        /// Human-readable detail, at most [`MAX_REASON`] bytes on the wire.
        message: &'a str,
    },
    /// PING: liveness probe.
    Ping {
        /// Value the peer echoes back (`b`).
        nonce: u64,
    },
    /// PONG: answer to a PING.
    Pong {
        /// The PING's nonce (`b`).
        nonce: u64,
    },
    /// AUTH: the dialing host's answer to the accepting host's challenge.
    Auth {
        /// The proof (payload).
        proof: [u8; AUTH_PROOF_LEN],
    },
    /// AUTH_OK: the accepting host verified AUTH; the channel is open.
    AuthOk,
    /// LISTEN: the sender listens on `port`.
    Listen {
        /// The listening vsocket port (`x`).
        port: u16,
        /// Announcement sequence (`a`, never 0).
        seq: u64,
        /// Stream bytes an OPEN to this port may carry (`b`, at most [`MAX_SEGMENT`]).
        credit: u64,
    },
    /// UNLISTEN: the sender no longer listens on `port`.
    Unlisten {
        /// The vsocket port (`x`).
        port: u16,
        /// Announcement sequence (`a`, never 0).
        seq: u64,
    },
    /// LISTEN_SET: the sender's whole set of listening ports follows (as LISTENs with `seq`).
    ListenSet {
        /// Announcement sequence (`a`, never 0).
        seq: u64,
    },
}

impl Frame<'_> {
    /// The frame's kind.
    pub fn kind(&self) -> Kind {
        match self {
            Frame::Hello(_) => Kind::Hello,
            Frame::HelloOk(_) => Kind::HelloOk,
            Frame::Open { .. } => Kind::Open,
            Frame::OpenOk { .. } => Kind::OpenOk,
            Frame::Refused { .. } => Kind::Refused,
            Frame::Data { .. } => Kind::Data,
            Frame::Credit { .. } => Kind::Credit,
            Frame::Fin { .. } => Kind::Fin,
            Frame::Reset { .. } => Kind::Reset,
            Frame::Ping { .. } => Kind::Ping,
            Frame::Pong { .. } => Kind::Pong,
            Frame::Auth { .. } => Kind::Auth,
            Frame::AuthOk => Kind::AuthOk,
            Frame::Listen { .. } => Kind::Listen,
            Frame::Unlisten { .. } => Kind::Unlisten,
            Frame::ListenSet { .. } => Kind::ListenSet,
        }
    }

    /// Bytes [`encode`](Frame::encode) appends: header plus payload.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.payload_len()
    }

    /// Appends the encoded frame (header, then payload) to `out`.
    ///
    /// Fields are written as given. A frame that breaks the rules of the frame table (a zero
    /// vsocket id where one is required, `received > limit` in CREDIT, a DATA offset whose
    /// end overflows a `u64`, …) is encoded all the same, and the peer's [`decode`] rejects
    /// it. A RESET message longer than [`MAX_REASON`] bytes is cut at the last character
    /// boundary at or before `MAX_REASON`.
    ///
    /// # Panics
    ///
    /// If a DATA payload is empty or longer than [`MAX_SEGMENT`]: the engine must split its
    /// stream into segments of 1..=`MAX_SEGMENT` bytes.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut header = [0; HEADER_LEN];
        self.header().encode(&mut header);
        out.reserve(self.encoded_len());
        out.extend_from_slice(&header);
        match self {
            Frame::Hello(hello) => {
                let mut body = [0; Hello::LEN];
                hello.encode(&mut body);
                out.extend_from_slice(&body);
            }
            Frame::HelloOk(hello_ok) => {
                let mut body = [0; HelloOk::LEN];
                hello_ok.encode(&mut body);
                out.extend_from_slice(&body);
            }
            Frame::Data { payload, .. } | Frame::Open { payload, .. } => out.extend_from_slice(payload),
            Frame::Reset { message, .. } => out.extend_from_slice(truncate_reason(message).as_bytes()),
            Frame::Auth { proof } => out.extend_from_slice(proof),
            _ => {}
        }
    }

    /// Payload bytes on the wire.
    fn payload_len(&self) -> usize {
        match self {
            Frame::Hello(_) => Hello::LEN,
            Frame::HelloOk(_) => HelloOk::LEN,
            Frame::Data { payload, .. } | Frame::Open { payload, .. } => payload.len(),
            Frame::Reset { message, .. } => truncate_reason(message).len(),
            Frame::Auth { .. } => AUTH_PROOF_LEN,
            _ => 0,
        }
    }

    /// The header this frame is sent with. Panics on a DATA payload the decoder would reject.
    fn header(&self) -> Header {
        let len = self.payload_len() as u32;
        let header = Header::empty(self.kind(), len);
        match *self {
            Frame::Hello(hello) => Header { flags: hello.class.flags(), ..header },
            Frame::HelloOk(_) => header,
            Frame::Open { src_vsock, src_port, dst_port, class, credit, .. } => Header {
                flags: class.flags(),
                x: src_vsock,
                a: (u64::from(src_port) << 16) | u64::from(dst_port),
                b: credit,
                ..header
            },
            Frame::OpenOk { vsock, src_vsock, credit } => Header { vsock, x: src_vsock, b: credit, ..header },
            Frame::Refused { vsock, reason } => Header { vsock, x: reason.code(), ..header },
            Frame::Data { vsock, offset, payload, ack_request } => Header {
                vsock,
                a: offset,
                len: data_len(payload.len()),
                flags: if ack_request { FLAG_ACK_REQUEST } else { 0 },
                ..header
            },
            Frame::Credit { vsock, received, limit, fin_received } => Header {
                vsock,
                a: received,
                b: limit,
                flags: if fin_received { FLAG_FIN_RECEIVED } else { 0 },
                ..header
            },
            Frame::Fin { vsock, offset, closed } => {
                Header { flags: if closed { FLAG_CLOSED } else { 0 }, vsock, a: offset, ..header }
            }
            Frame::Reset { vsock, reason, .. } => Header { vsock, x: reason.code(), ..header },
            Frame::Ping { nonce } | Frame::Pong { nonce } => Header { b: nonce, ..header },
            Frame::Auth { .. } | Frame::AuthOk => header,
            Frame::Listen { port, seq, credit } => Header { x: u32::from(port), a: seq, b: credit, ..header },
            Frame::Unlisten { port, seq } => Header { x: u32::from(port), a: seq, ..header },
            Frame::ListenSet { seq } => Header { a: seq, ..header },
        }
    }
}

/// `message` cut to at most [`MAX_REASON`] bytes, at a character boundary.
fn truncate_reason(message: &str) -> &str {
    if message.len() <= MAX_REASON {
        return message;
    }
    let mut end = MAX_REASON;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    &message[..end]
}

/// The `len` field of a DATA frame with `len` payload bytes.
///
/// Panics unless `len` is within 1..=[`MAX_SEGMENT`].
fn data_len(len: usize) -> u32 {
    assert!(
        (1..=MAX_SEGMENT).contains(&len),
        "DATA payload of {len} bytes: a segment must hold 1..={MAX_SEGMENT} bytes"
    );
    len as u32
}

/// Writes the header of a DATA frame carrying `len` bytes of `vsock`'s stream from `offset`
/// on; the caller sends the `len` payload bytes right after it. Produces the same bytes as
/// [`Frame::encode`] for the same DATA frame, without building a [`Frame`].
///
/// # Panics
///
/// If `len` is 0 or greater than [`MAX_SEGMENT`].
pub fn encode_data_header(out: &mut [u8; HEADER_LEN], vsock: u32, offset: u64, len: u32, ack_request: bool) {
    let len = data_len(len as usize);
    Header {
        vsock,
        a: offset,
        flags: if ack_request { FLAG_ACK_REQUEST } else { 0 },
        ..Header::empty(Kind::Data, len)
    }
    .encode(out);
}

/// A decoded header (validated: known kind, zero reserved bits, length within the kind's bound).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Frame kind (byte 0).
    pub kind: Kind,
    /// Flag bits (byte 1).
    pub flags: u8,
    /// Payload bytes that follow the header.
    pub len: u32,
    /// The receiver's vsocket id; 0 = none.
    pub vsock: u32,
    /// Kind-specific 32-bit field.
    pub x: u32,
    /// Kind-specific 64-bit field.
    pub a: u64,
    /// Kind-specific 64-bit field.
    pub b: u64,
}

impl Header {
    /// A header of `kind` with `len` payload bytes and every other field 0.
    fn empty(kind: Kind, len: u32) -> Header {
        Header { kind, flags: 0, len, vsock: 0, x: 0, a: 0, b: 0 }
    }

    /// Reads and validates the header at the start of `buf`.
    ///
    /// Checks what the header alone shows about the frame's shape: a known kind
    /// ([`WireError::UnknownKind`]); zero reserved bytes and no flags but [`FLAG_LATENCY`] on
    /// HELLO and OPEN ([`WireError::Reserved`]); a length within the kind's bound
    /// ([`WireError::BadLength`]): HELLO and HELLO_OK exactly their body size, DATA
    /// 1..=[`MAX_SEGMENT`], RESET 0..=[`MAX_REASON`], every other kind 0. With fewer than
    /// [`HEADER_LEN`] bytes it gives [`WireError::Incomplete`]. The per-kind field rules are
    /// checked by [`decode`].
    pub fn decode(buf: &[u8]) -> Result<Header, WireError> {
        let Some(buf) = buf.first_chunk::<HEADER_LEN>() else {
            return Err(WireError::Incomplete { needed: HEADER_LEN });
        };
        let kind_byte = buf[field::KIND];
        let kind = Kind::from_u8(kind_byte).ok_or(WireError::UnknownKind(kind_byte))?;
        let flags = buf[field::FLAGS];
        if get_u16(buf, field::RESERVED) != 0 || flags & !kind.allowed_flags() != 0 {
            return Err(WireError::Reserved { kind });
        }
        let len = get_u32(buf, field::LEN);
        let (min, max) = kind.len_bounds();
        if !usize::try_from(len).is_ok_and(|len| (min..=max).contains(&len)) {
            return Err(WireError::BadLength { kind, len, max });
        }
        Ok(Header {
            kind,
            flags,
            len,
            vsock: get_u32(buf, field::VSOCK),
            x: get_u32(buf, field::X),
            a: get_u64(buf, field::A),
            b: get_u64(buf, field::B),
        })
    }

    /// Writes the header, fields as given and reserved bytes 0.
    pub fn encode(&self, out: &mut [u8; HEADER_LEN]) {
        out[field::KIND] = self.kind as u8;
        out[field::FLAGS] = self.flags;
        put(out, field::RESERVED, &[0; 2]);
        put(out, field::LEN, &self.len.to_be_bytes());
        put(out, field::VSOCK, &self.vsock.to_be_bytes());
        put(out, field::X, &self.x.to_be_bytes());
        put(out, field::A, &self.a.to_be_bytes());
        put(out, field::B, &self.b.to_be_bytes());
    }

    /// Size of the whole frame: [`HEADER_LEN`] + `len`.
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + self.len as usize
    }

    /// `Ok` if `valid`, else a [`WireError::BadField`] naming `field`.
    fn check(&self, valid: bool, field: &'static str) -> Result<(), WireError> {
        if valid {
            Ok(())
        } else {
            Err(WireError::BadField { kind: self.kind, field })
        }
    }
}

/// Decodes one frame from the start of `buf`: the frame and the bytes it took
/// ([`HEADER_LEN`] + `len`). Bytes after the frame are left alone.
///
/// The header is validated first (see [`Header::decode`]); if `buf` then holds less than the
/// whole frame, the result is [`WireError::Incomplete`] with the frame's size, which is never
/// more than `HEADER_LEN + MAX_SEGMENT`. The per-kind rules of the frame table follow, each
/// failure a [`WireError::BadField`] naming the header field (`"vsock"`, `"x"`, `"a"`, `"b"`)
/// or the body field (`"magic"`, `"message"`): fields the table marks 0 are 0; OPEN has a
/// nonzero `x` (the opener's id), `a` below 2³² and `vsock` 0; OPEN_OK has nonzero `vsock` and
/// `x`; REFUSED, DATA, CREDIT and FIN have a nonzero `vsock`; CREDIT has `a <= b`; DATA's
/// `a + len` fits a `u64`; RESET's text is UTF-8; LISTEN, UNLISTEN and LISTEN_SET have `vsock`
/// 0 and a nonzero `a`, LISTEN and UNLISTEN an `x` below 2¹⁶, LISTEN a `b` of at most
/// [`MAX_SEGMENT`].
///
/// Never panics, and allocates nothing.
pub fn decode(buf: &[u8]) -> Result<(Frame<'_>, usize), WireError> {
    let header = Header::decode(buf)?;
    let frame_len = header.frame_len();
    let payload = buf.get(HEADER_LEN..frame_len).ok_or(WireError::Incomplete { needed: frame_len })?;
    Ok((parse(&header, payload)?, frame_len))
}

/// The head of a DATA frame whose payload has not all arrived: what a reader needs to read
/// the payload straight into its vsocket's receive buffer ([`decode_data_head`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataHead {
    /// The receiver's vsocket id.
    pub vsock: u32,
    /// Stream offset of the payload's first byte.
    pub offset: u64,
    /// Payload bytes that follow the header.
    pub len: u32,
    /// The sender asks for a prompt acknowledgement ([`FLAG_ACK_REQUEST`]).
    pub ack_request: bool,
}

/// The DATA frame that starts `buf`, from its header alone: `Some` if `buf` starts with a
/// complete header of a DATA frame that passes every rule [`decode`] checks (the payload
/// itself may be missing, in part or whole); `None` for any other kind, too few bytes, or a
/// header [`decode`] would reject (which [`decode`] then reports, with its error).
pub fn decode_data_head(buf: &[u8]) -> Option<DataHead> {
    let h = Header::decode(buf).ok()?;
    if h.kind != Kind::Data {
        return None;
    }
    match parse(&h, &[]).ok()? {
        Frame::Data { vsock, offset, ack_request, .. } => {
            Some(DataHead { vsock, offset, len: h.len, ack_request })
        }
        _ => None,
    }
}

/// Checks the per-kind rules of a validated header and its payload, and builds the frame.
fn parse<'a>(h: &Header, payload: &'a [u8]) -> Result<Frame<'a>, WireError> {
    // Header fields the frame table marks 0, in wire order.
    let zero_vsock = || h.check(h.vsock == 0, "vsock");
    let zero_x = || h.check(h.x == 0, "x");
    let zero_a = || h.check(h.a == 0, "a");
    let zero_b = || h.check(h.b == 0, "b");
    let some_vsock = || h.check(h.vsock != 0, "vsock");

    let frame = match h.kind {
        Kind::Hello => {
            zero_vsock()?;
            zero_x()?;
            zero_a()?;
            zero_b()?;
            let body = fixed_body(h, payload)?;
            Frame::Hello(Hello::decode(body, Class::from_flags(h.flags))?)
        }
        Kind::HelloOk => {
            zero_vsock()?;
            zero_x()?;
            zero_a()?;
            zero_b()?;
            let body = fixed_body(h, payload)?;
            Frame::HelloOk(HelloOk::decode(body)?)
        }
        Kind::Open => {
            zero_vsock()?;
            h.check(h.x != 0, "x")?;
            h.check(h.a >> 32 == 0, "a")?;
            Frame::Open {
                src_vsock: h.x,
                src_port: (h.a >> 16) as u16,
                dst_port: h.a as u16,
                class: Class::from_flags(h.flags),
                credit: h.b,
                payload,
            }
        }
        Kind::OpenOk => {
            some_vsock()?;
            h.check(h.x != 0, "x")?;
            zero_a()?;
            Frame::OpenOk { vsock: h.vsock, src_vsock: h.x, credit: h.b }
        }
        Kind::Refused => {
            some_vsock()?;
            zero_a()?;
            zero_b()?;
            Frame::Refused { vsock: h.vsock, reason: Reason::from_code(h.x) }
        }
        Kind::Data => {
            some_vsock()?;
            zero_x()?;
            h.check(h.a.checked_add(u64::from(h.len)).is_some(), "a")?;
            zero_b()?;
            Frame::Data { vsock: h.vsock, offset: h.a, payload, ack_request: h.flags & FLAG_ACK_REQUEST != 0 }
        }
        Kind::Credit => {
            some_vsock()?;
            zero_x()?;
            h.check(h.a <= h.b, "a")?;
            Frame::Credit {
                vsock: h.vsock,
                received: h.a,
                limit: h.b,
                fin_received: h.flags & FLAG_FIN_RECEIVED != 0,
            }
        }
        Kind::Fin => {
            some_vsock()?;
            zero_x()?;
            zero_b()?;
            Frame::Fin { vsock: h.vsock, offset: h.a, closed: h.flags & FLAG_CLOSED != 0 }
        }
        Kind::Reset => {
            zero_a()?;
            zero_b()?;
            let message = std::str::from_utf8(payload)
                .map_err(|_| WireError::BadField { kind: Kind::Reset, field: "message" })?;
            Frame::Reset { vsock: h.vsock, reason: Reason::from_code(h.x), message }
        }
        Kind::Ping | Kind::Pong => {
            zero_vsock()?;
            zero_x()?;
            zero_a()?;
            if h.kind == Kind::Ping {
                Frame::Ping { nonce: h.b }
            } else {
                Frame::Pong { nonce: h.b }
            }
        }
        Kind::Auth | Kind::AuthOk => {
            zero_vsock()?;
            zero_x()?;
            zero_a()?;
            zero_b()?;
            if h.kind == Kind::Auth {
                Frame::Auth { proof: *fixed_body::<AUTH_PROOF_LEN>(h, payload)? }
            } else {
                Frame::AuthOk
            }
        }
        Kind::Listen => {
            zero_vsock()?;
            h.check(h.x <= u32::from(u16::MAX), "x")?;
            h.check(h.a != 0, "a")?;
            h.check(h.b <= MAX_SEGMENT as u64, "b")?;
            Frame::Listen { port: h.x as u16, seq: h.a, credit: h.b }
        }
        Kind::Unlisten => {
            zero_vsock()?;
            h.check(h.x <= u32::from(u16::MAX), "x")?;
            h.check(h.a != 0, "a")?;
            zero_b()?;
            Frame::Unlisten { port: h.x as u16, seq: h.a }
        }
        Kind::ListenSet => {
            zero_vsock()?;
            zero_x()?;
            h.check(h.a != 0, "a")?;
            zero_b()?;
            Frame::ListenSet { seq: h.a }
        }
    };
    Ok(frame)
}

/// The payload of a fixed-size body. [`Header::decode`] has already checked its length.
fn fixed_body<'a, const N: usize>(h: &Header, payload: &'a [u8]) -> Result<&'a [u8; N], WireError> {
    payload.try_into().map_err(|_| WireError::BadLength { kind: h.kind, len: h.len, max: N })
}

/// Why bytes are not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireError {
    /// More bytes are needed: at least `needed` bytes in total from the frame start.
    Incomplete {
        /// Bytes needed from the frame start.
        needed: usize,
    },
    /// Header byte 0 is not a known kind.
    UnknownKind(u8),
    /// Reserved bits or bytes are not zero, or flags are set that the kind does not define.
    Reserved {
        /// Kind of the offending frame.
        kind: Kind,
    },
    /// The length field is not allowed for this kind.
    BadLength {
        /// Kind of the offending frame.
        kind: Kind,
        /// The length field as received.
        len: u32,
        /// Largest length the kind allows.
        max: usize,
    },
    /// A field has a value the kind does not allow (bad magic, zero vsock id, non-UTF-8 text…).
    BadField {
        /// Kind of the offending frame.
        kind: Kind,
        /// The field: a header field (`"vsock"`, `"x"`, `"a"`, `"b"`) or a body field
        /// (`"magic"`, `"message"`).
        field: &'static str,
    },
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            WireError::Incomplete { needed } => {
                write!(f, "incomplete frame: {needed} bytes needed")
            }
            WireError::UnknownKind(kind) => write!(f, "unknown frame kind {kind}"),
            WireError::Reserved { kind } => {
                write!(f, "{kind} frame has nonzero reserved bits or undefined flags")
            }
            WireError::BadLength { kind, len, max } => match kind {
                Kind::Hello | Kind::HelloOk => {
                    write!(f, "{kind} frame length {len} is not the required {max}")
                }
                // Only DATA has a nonzero minimum.
                _ if len == 0 => write!(f, "{kind} frame length 0 is below the minimum 1"),
                _ => write!(f, "{kind} frame length {len} exceeds the maximum {max}"),
            },
            WireError::BadField { kind, field } => {
                write!(f, "{kind} frame has an invalid `{field}` field")
            }
        }
    }
}

impl std::error::Error for WireError {}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::Ipv4Addr;

    fn encode(frame: &Frame) -> Vec<u8> {
        let mut out = Vec::new();
        frame.encode(&mut out);
        out
    }

    /// Encodes `frame`, decodes it back, and checks both agree.
    fn round_trip(frame: &Frame) {
        let buf = encode(frame);
        assert_eq!(buf.len(), frame.encoded_len(), "{frame:?}");
        assert_eq!(decode(&buf), Ok((frame.clone(), buf.len())));
        let header = Header::decode(&buf).unwrap();
        assert_eq!(header.kind, frame.kind());
        assert_eq!(header.frame_len(), buf.len());
    }

    /// A valid header for `kind` with `len` payload bytes, as bytes.
    fn header_bytes(kind: Kind, len: u32) -> [u8; HEADER_LEN] {
        let mut out = [0; HEADER_LEN];
        Header { vsock: 1, ..Header::empty(kind, len) }.encode(&mut out);
        out
    }

    fn hello(class: Class, listen: SocketAddr) -> Hello {
        Hello { version: VERSION, class, index: 3, host_id: 0x0123_4567_89ab_cdef, listen, nonce: [7; 16] }
    }

    fn bad_field(kind: Kind, field: &'static str) -> Result<(Frame<'static>, usize), WireError> {
        Err(WireError::BadField { kind, field })
    }

    #[test]
    fn a_data_head_is_read_from_the_header_alone_and_only_if_decode_would_take_it() {
        let payload = vec![7u8; 5000];
        let buf = encode(&Frame::Data { vsock: 9, offset: 1 << 33, payload: &payload, ack_request: true });
        let head = DataHead { vsock: 9, offset: 1 << 33, len: 5000, ack_request: true };
        assert_eq!(decode_data_head(&buf[..HEADER_LEN]), Some(head));
        assert_eq!(decode_data_head(&buf[..HEADER_LEN + 10]), Some(head));
        assert_eq!(decode_data_head(&buf[..HEADER_LEN - 1]), None, "header incomplete");
        let credit = encode(&Frame::Credit { vsock: 9, received: 1, limit: 2, fin_received: false });
        assert_eq!(decode_data_head(&credit), None, "not DATA");
        // A DATA header whose vsock is 0 is malformed: no head, and decode names the field.
        let mut bad = buf[..HEADER_LEN].to_vec();
        bad[field::VSOCK].fill(0);
        assert_eq!(decode_data_head(&bad), None);
        bad.extend_from_slice(&payload);
        assert!(matches!(decode(&bad), Err(WireError::BadField { field: "vsock", .. })));
    }

    #[test]
    fn round_trip_hello() {
        let v4 = SocketAddr::from((Ipv4Addr::new(10, 0, 0, 1), 9000));
        let v6 = SocketAddr::from((Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2), 9001));
        for class in [Class::Throughput, Class::Latency] {
            for listen in [v4, v6] {
                round_trip(&Frame::Hello(hello(class, listen)));
            }
        }
    }

    #[test]
    fn hello_ipv4_is_sent_mapped() {
        let listen = SocketAddr::from((Ipv4Addr::new(192, 168, 1, 2), 0x1234));
        let buf = encode(&Frame::Hello(hello(Class::Latency, listen)));
        assert_eq!(buf[field::FLAGS], FLAG_LATENCY);
        let body = &buf[HEADER_LEN..];
        assert_eq!(&body[field::hello::MAGIC], b"NCHN");
        assert_eq!(&body[field::hello::IP], &Ipv4Addr::new(192, 168, 1, 2).to_ipv6_mapped().octets());
        assert_eq!(&body[field::hello::PORT], &[0x12, 0x34]);
    }

    #[test]
    fn round_trip_hello_ok() {
        round_trip(&Frame::HelloOk(HelloOk {
            version: VERSION,
            host_id: 42,
            proof: [0xa5; 32],
            nonce: [0x5a; 16],
        }));
    }

    #[test]
    fn round_trip_auth() {
        round_trip(&Frame::Auth { proof: [7; 32] });
        round_trip(&Frame::AuthOk);
    }

    #[test]
    fn round_trip_open() {
        for class in [Class::Throughput, Class::Latency] {
            round_trip(&Frame::Open {
                src_vsock: 17,
                src_port: 40000,
                dst_port: 80,
                class,
                credit: 4 << 20,
                payload: &[],
            });
            round_trip(&Frame::Open {
                src_vsock: 17,
                src_port: 40000,
                dst_port: 80,
                class,
                credit: 1,
                payload: b"GET",
            });
        }
    }

    #[test]
    fn open_packs_ports_into_a() {
        let frame = Frame::Open {
            src_vsock: 1,
            src_port: 0xabcd,
            dst_port: 0x1234,
            class: Class::Latency,
            credit: 0,
            payload: &[],
        };
        let header = Header::decode(&encode(&frame)).unwrap();
        assert_eq!(header.a, 0xabcd_1234);
        assert_eq!(header.flags, FLAG_LATENCY);
    }

    #[test]
    fn round_trip_announcements() {
        round_trip(&Frame::Listen { port: 7000, seq: 1, credit: 16 << 10 });
        round_trip(&Frame::Listen { port: u16::MAX, seq: u64::MAX, credit: MAX_SEGMENT as u64 });
        round_trip(&Frame::Listen { port: 0, seq: 3, credit: 0 });
        round_trip(&Frame::Unlisten { port: 7000, seq: 2 });
        round_trip(&Frame::ListenSet { seq: 9 });
        let header = Header::decode(&encode(&Frame::Listen { port: 0x1234, seq: 5, credit: 6 })).unwrap();
        assert_eq!((header.x, header.a, header.b), (0x1234, 5, 6));
    }

    #[test]
    fn announcements_with_bad_fields_are_rejected() {
        let bytes = |kind, x, a, b| {
            let mut out = [0; HEADER_LEN];
            Header { x, a, b, ..Header::empty(kind, 0) }.encode(&mut out);
            out
        };
        assert_eq!(decode(&bytes(Kind::Listen, 0x1_0000, 1, 0)), bad_field(Kind::Listen, "x"));
        assert_eq!(decode(&bytes(Kind::Listen, 80, 0, 0)), bad_field(Kind::Listen, "a"));
        assert_eq!(decode(&bytes(Kind::Listen, 80, 1, MAX_SEGMENT as u64 + 1)), bad_field(Kind::Listen, "b"));
        assert_eq!(decode(&bytes(Kind::Unlisten, 80, 1, 1)), bad_field(Kind::Unlisten, "b"));
        assert_eq!(decode(&bytes(Kind::Unlisten, 80, 0, 0)), bad_field(Kind::Unlisten, "a"));
        assert_eq!(decode(&bytes(Kind::ListenSet, 1, 1, 0)), bad_field(Kind::ListenSet, "x"));
        assert_eq!(decode(&bytes(Kind::ListenSet, 0, 0, 0)), bad_field(Kind::ListenSet, "a"));
        let mut with_vsock = bytes(Kind::Listen, 80, 1, 0);
        with_vsock[field::VSOCK].copy_from_slice(&1u32.to_be_bytes());
        assert_eq!(decode(&with_vsock), bad_field(Kind::Listen, "vsock"));
    }

    #[test]
    fn round_trip_open_ok() {
        round_trip(&Frame::OpenOk { vsock: 17, src_vsock: 99, credit: u64::MAX });
    }

    #[test]
    fn round_trip_refused() {
        for code in [1, 2, 3, 4, 5, 6, 7, 0, 8, u32::MAX] {
            round_trip(&Frame::Refused { vsock: 17, reason: Reason::from_code(code) });
        }
    }

    #[test]
    fn round_trip_data() {
        round_trip(&Frame::Data { vsock: 5, offset: 1 << 40, payload: b"hello, world", ack_request: false });
        let full = vec![0xee; MAX_SEGMENT];
        round_trip(&Frame::Data {
            vsock: u32::MAX,
            offset: u64::MAX - MAX_SEGMENT as u64,
            payload: &full,
            ack_request: false,
        });
    }

    #[test]
    fn round_trip_credit() {
        round_trip(&Frame::Credit { vsock: 5, received: 100, limit: 100, fin_received: false });
        round_trip(&Frame::Credit { vsock: 5, received: 0, limit: u64::MAX, fin_received: false });
        round_trip(&Frame::Credit { vsock: 5, received: 7, limit: 9, fin_received: true });
        let buf = encode(&Frame::Credit { vsock: 5, received: 7, limit: 9, fin_received: true });
        assert_eq!(buf[field::FLAGS], FLAG_FIN_RECEIVED);
    }

    #[test]
    fn round_trip_fin() {
        round_trip(&Frame::Fin { vsock: 5, offset: 123_456, closed: false });
        round_trip(&Frame::Fin { vsock: 5, offset: 123_456, closed: true });
    }

    #[test]
    fn round_trip_reset() {
        round_trip(&Frame::Reset { vsock: 0, reason: Reason::Version, message: "version 2 not spoken" });
        round_trip(&Frame::Reset { vsock: 9, reason: Reason::Other(1000), message: "" });
        round_trip(&Frame::Reset { vsock: 9, reason: Reason::Protocol, message: "débordement ✓" });
        let longest = "x".repeat(MAX_REASON);
        round_trip(&Frame::Reset { vsock: 9, reason: Reason::Closed, message: &longest });
    }

    #[test]
    fn round_trip_ping_pong() {
        round_trip(&Frame::Ping { nonce: 0xdead_beef });
        round_trip(&Frame::Pong { nonce: 0xdead_beef });
    }

    #[test]
    fn reset_message_is_truncated_at_a_char_boundary() {
        // 'é' is two bytes: MAX_REASON + 1 bytes in all, with a character straddling the limit.
        let message = format!("{}é", "x".repeat(MAX_REASON - 1));
        let frame = Frame::Reset { vsock: 1, reason: Reason::Closed, message: &message };
        let buf = encode(&frame);
        assert_eq!(buf.len(), frame.encoded_len());
        assert_eq!(buf.len(), HEADER_LEN + MAX_REASON - 1);
        let (decoded, _) = decode(&buf).unwrap();
        assert_eq!(
            decoded,
            Frame::Reset { vsock: 1, reason: Reason::Closed, message: &message[..MAX_REASON - 1] }
        );
    }

    #[test]
    fn decode_takes_one_frame_from_a_stream() {
        let mut buf = encode(&Frame::Ping { nonce: 1 });
        Frame::Data { vsock: 2, offset: 0, payload: b"abc", ack_request: false }.encode(&mut buf);
        let (first, used) = decode(&buf).unwrap();
        assert_eq!((first, used), (Frame::Ping { nonce: 1 }, HEADER_LEN));
        let (second, used2) = decode(&buf[used..]).unwrap();
        assert_eq!(second, Frame::Data { vsock: 2, offset: 0, payload: b"abc", ack_request: false });
        assert_eq!(used + used2, buf.len());
    }

    #[test]
    fn data_header_fast_path_matches_frame_encode() {
        let payload = [1, 2, 3, 4, 5];
        let buf = encode(&Frame::Data { vsock: 77, offset: 1000, payload: &payload, ack_request: true });
        let mut header = [0; HEADER_LEN];
        encode_data_header(&mut header, 77, 1000, payload.len() as u32, true);
        assert_eq!(&buf[..HEADER_LEN], &header);
    }

    #[test]
    #[should_panic(expected = "DATA payload")]
    fn encoding_oversized_data_panics() {
        let payload = vec![0; MAX_SEGMENT + 1];
        Frame::Data { vsock: 1, offset: 0, payload: &payload, ack_request: false }.encode(&mut Vec::new());
    }

    #[test]
    #[should_panic(expected = "DATA payload")]
    fn encoding_empty_data_header_panics() {
        encode_data_header(&mut [0; HEADER_LEN], 1, 0, 0, false);
    }

    #[test]
    fn kind_codes() {
        for b in 0..=u8::MAX {
            match Kind::from_u8(b) {
                Some(kind) => assert_eq!(kind as u8, b),
                None => assert!(b == 0 || b > 13, "{b}"),
            }
        }
    }

    #[test]
    fn reason_codes() {
        for code in 0..20 {
            assert_eq!(Reason::from_code(code).code(), code);
        }
        assert_eq!(Reason::from_code(1), Reason::NoListener);
        assert_eq!(Reason::from_code(7), Reason::Shutdown);
        assert_eq!(Reason::from_code(8), Reason::Other(8));
        assert_eq!(Reason::NoListener.to_string(), "no listener on that port");
        assert_eq!(Reason::Other(99).to_string(), "reason code 99");
    }

    #[test]
    fn error_messages() {
        let err = WireError::BadLength { kind: Kind::Data, len: 2_000_000, max: MAX_SEGMENT };
        assert_eq!(err.to_string(), "DATA frame length 2000000 exceeds the maximum 1048576");
        let err = WireError::BadField { kind: Kind::Hello, field: "magic" };
        assert_eq!(err.to_string(), "HELLO frame has an invalid `magic` field");
        let err: Box<dyn std::error::Error> = Box::new(WireError::UnknownKind(200));
        assert_eq!(err.to_string(), "unknown frame kind 200");
    }

    #[test]
    fn short_header_is_incomplete() {
        for len in 0..HEADER_LEN {
            assert_eq!(
                Header::decode(&[0xff; HEADER_LEN][..len]),
                Err(WireError::Incomplete { needed: HEADER_LEN })
            );
        }
    }

    #[test]
    fn header_alone_asks_for_the_payload() {
        let header = header_bytes(Kind::Data, MAX_SEGMENT as u32);
        assert_eq!(decode(&header), Err(WireError::Incomplete { needed: HEADER_LEN + MAX_SEGMENT }));
    }

    #[test]
    fn rejects_unknown_kind() {
        for kind in [0, 17, 0xff] {
            let mut buf = encode(&Frame::Ping { nonce: 1 });
            buf[field::KIND] = kind;
            assert_eq!(decode(&buf), Err(WireError::UnknownKind(kind)));
        }
    }

    #[test]
    fn rejects_nonzero_reserved_bytes() {
        for byte in field::RESERVED {
            let mut buf = encode(&Frame::Fin { vsock: 1, offset: 2, closed: false });
            buf[byte] = 0x80;
            assert_eq!(decode(&buf), Err(WireError::Reserved { kind: Kind::Fin }));
        }
    }

    #[test]
    fn rejects_undefined_flags() {
        // The latency flag on a kind that does not define it.
        let mut buf = encode(&Frame::Fin { vsock: 1, offset: 2, closed: false });
        buf[field::FLAGS] = FLAG_LATENCY;
        assert_eq!(decode(&buf), Err(WireError::Reserved { kind: Kind::Fin }));
        // Any other bit on OPEN.
        let open = Frame::Open {
            src_vsock: 1,
            src_port: 1,
            dst_port: 2,
            class: Class::Latency,
            credit: 0,
            payload: &[],
        };
        let mut buf = encode(&open);
        buf[field::FLAGS] |= 0x02;
        assert_eq!(decode(&buf), Err(WireError::Reserved { kind: Kind::Open }));
    }

    #[test]
    fn rejects_nonzero_hello_body_reserved() {
        let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, 1));
        let mut buf = encode(&Frame::Hello(hello(Class::Throughput, listen)));
        buf[HEADER_LEN + field::hello::RESERVED.start] = 1;
        assert_eq!(decode(&buf), Err(WireError::Reserved { kind: Kind::Hello }));
        let mut buf =
            encode(&Frame::HelloOk(HelloOk { version: 1, host_id: 1, proof: [0; 32], nonce: [0; 16] }));
        buf[HEADER_LEN + field::hello_ok::RESERVED.end - 1] = 1;
        assert_eq!(decode(&buf), Err(WireError::Reserved { kind: Kind::HelloOk }));
    }

    #[test]
    fn rejects_oversized_data_without_waiting_for_it() {
        let header = header_bytes(Kind::Data, u32::MAX);
        let expected = Err(WireError::BadLength { kind: Kind::Data, len: u32::MAX, max: MAX_SEGMENT });
        assert_eq!(Header::decode(&header), expected);
        assert_eq!(decode(&header).map(|_| ()), expected.map(|_| ()));
        let header = header_bytes(Kind::Data, MAX_SEGMENT as u32 + 1);
        assert!(matches!(decode(&header), Err(WireError::BadLength { kind: Kind::Data, .. })));
    }

    #[test]
    fn rejects_zero_length_data() {
        let header = header_bytes(Kind::Data, 0);
        assert_eq!(decode(&header), Err(WireError::BadLength { kind: Kind::Data, len: 0, max: MAX_SEGMENT }));
    }

    #[test]
    fn rejects_wrong_lengths() {
        let cases = [
            (Kind::Hello, Hello::LEN as u32 - 1, Hello::LEN),
            (Kind::Hello, Hello::LEN as u32 + 1, Hello::LEN),
            (Kind::HelloOk, 0, HelloOk::LEN),
            (Kind::Reset, MAX_REASON as u32 + 1, MAX_REASON),
            (Kind::Fin, 1, 0),
            (Kind::Ping, 8, 0),
        ];
        for (kind, len, max) in cases {
            assert_eq!(decode(&header_bytes(kind, len)), Err(WireError::BadLength { kind, len, max }));
        }
    }

    #[test]
    fn rejects_bad_magic() {
        let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, 1));
        let mut buf = encode(&Frame::Hello(hello(Class::Throughput, listen)));
        buf[HEADER_LEN] = b'X';
        assert_eq!(decode(&buf), bad_field(Kind::Hello, "magic"));
        let mut buf =
            encode(&Frame::HelloOk(HelloOk { version: 1, host_id: 1, proof: [0; 32], nonce: [0; 16] }));
        buf[HEADER_LEN + 3] ^= 1;
        assert_eq!(decode(&buf), bad_field(Kind::HelloOk, "magic"));
    }

    #[test]
    fn rejects_credit_beyond_limit() {
        let buf = encode(&Frame::Credit { vsock: 1, received: 11, limit: 10, fin_received: false });
        assert_eq!(decode(&buf), bad_field(Kind::Credit, "a"));
    }

    #[test]
    fn rejects_reset_with_invalid_utf8() {
        let mut buf = encode(&Frame::Reset { vsock: 1, reason: Reason::Closed, message: "abc" });
        buf[HEADER_LEN + 1] = 0xff;
        assert_eq!(decode(&buf), bad_field(Kind::Reset, "message"));
    }

    #[test]
    fn rejects_open_with_vsock() {
        let open = Frame::Open {
            src_vsock: 1,
            src_port: 1,
            dst_port: 2,
            class: Class::Throughput,
            credit: 0,
            payload: &[],
        };
        let mut buf = encode(&open);
        buf[field::VSOCK.end - 1] = 1;
        assert_eq!(decode(&buf), bad_field(Kind::Open, "vsock"));
    }

    #[test]
    fn rejects_bad_fields() {
        // Frames `encode` writes as given but `decode` rejects, with the field it names.
        let cases: [(Frame, &str); 9] = [
            (
                Frame::Open {
                    src_vsock: 0,
                    src_port: 1,
                    dst_port: 2,
                    class: Class::Throughput,
                    credit: 0,
                    payload: &[],
                },
                "x",
            ),
            (Frame::OpenOk { vsock: 0, src_vsock: 1, credit: 0 }, "vsock"),
            (Frame::OpenOk { vsock: 1, src_vsock: 0, credit: 0 }, "x"),
            (Frame::Refused { vsock: 0, reason: Reason::NoListener }, "vsock"),
            (Frame::Data { vsock: 0, offset: 0, payload: b"a", ack_request: false }, "vsock"),
            (Frame::Data { vsock: 1, offset: u64::MAX, payload: b"a", ack_request: false }, "a"),
            (Frame::Credit { vsock: 0, received: 0, limit: 0, fin_received: false }, "vsock"),
            (Frame::Fin { vsock: 0, offset: 0, closed: false }, "vsock"),
            (Frame::Data { vsock: 1, offset: u64::MAX - 1, payload: b"ab", ack_request: false }, "a"),
        ];
        for (frame, field) in cases {
            assert_eq!(decode(&encode(&frame)), bad_field(frame.kind(), field), "{frame:?}");
        }
    }

    #[test]
    fn rejects_nonzero_fields_the_table_marks_zero() {
        let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, 1));
        let frames = [
            Frame::Hello(hello(Class::Throughput, listen)),
            Frame::HelloOk(HelloOk { version: 1, host_id: 1, proof: [0; 32], nonce: [0; 16] }),
            Frame::Open {
                src_vsock: 1,
                src_port: 1,
                dst_port: 2,
                class: Class::Throughput,
                credit: 0,
                payload: &[],
            },
            Frame::OpenOk { vsock: 1, src_vsock: 1, credit: 0 },
            Frame::Refused { vsock: 1, reason: Reason::BacklogFull },
            Frame::Data { vsock: 1, offset: 0, payload: b"a", ack_request: false },
            Frame::Credit { vsock: 1, received: 0, limit: 0, fin_received: false },
            Frame::Fin { vsock: 1, offset: 0, closed: true },
            Frame::Reset { vsock: 0, reason: Reason::Shutdown, message: "bye" },
            Frame::Ping { nonce: 0 },
            Frame::Pong { nonce: 0 },
        ];
        let fields = [("vsock", field::VSOCK), ("x", field::X), ("a", field::A), ("b", field::B)];
        for frame in frames {
            for (name, range) in fields.clone() {
                // The fields the frame table marks 0 (for OPEN's `a`: bits 32..64).
                let zero = matches!(
                    (frame.kind(), name),
                    (Kind::Hello | Kind::HelloOk, _)
                        | (Kind::Open, "vsock" | "a")
                        | (Kind::OpenOk | Kind::Refused | Kind::Reset, "a")
                        | (Kind::Refused | Kind::Data | Kind::Fin | Kind::Reset, "b")
                        | (Kind::Data | Kind::Credit | Kind::Fin, "x")
                        | (Kind::Ping | Kind::Pong, "vsock" | "x" | "a")
                );
                if zero {
                    let mut buf = encode(&frame);
                    buf[range.start] = 0x80;
                    assert_eq!(decode(&buf), bad_field(frame.kind(), name), "{frame:?}");
                }
            }
        }
    }

    // ---- property tests ----

    /// An owned description of a valid frame (proptest values cannot borrow).
    #[derive(Debug, Clone)]
    enum Spec {
        Fixed(Frame<'static>),
        Data { vsock: u32, offset: u64, payload: Vec<u8> },
        Reset { vsock: u32, reason: Reason, message: String },
    }

    impl Spec {
        fn frame(&self) -> Frame<'_> {
            match self {
                Spec::Fixed(frame) => frame.clone(),
                Spec::Data { vsock, offset, payload } => {
                    Frame::Data { vsock: *vsock, offset: *offset, payload, ack_request: offset % 2 == 1 }
                }
                Spec::Reset { vsock, reason, message } => {
                    Frame::Reset { vsock: *vsock, reason: *reason, message }
                }
            }
        }

        fn encode(&self) -> Vec<u8> {
            encode(&self.frame())
        }
    }

    fn id() -> impl Strategy<Value = u32> {
        1..=u32::MAX
    }

    fn class() -> impl Strategy<Value = Class> {
        prop_oneof![Just(Class::Throughput), Just(Class::Latency)]
    }

    fn reason() -> impl Strategy<Value = Reason> {
        prop_oneof![0..10u32, any::<u32>()].prop_map(Reason::from_code)
    }

    fn listen() -> impl Strategy<Value = SocketAddr> {
        let v4 = (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::from((ip, port)));
        let v6 = (any::<[u8; 16]>(), any::<u16>())
            .prop_map(|(ip, port)| (Ipv6Addr::from(ip), port))
            // A mapped address comes back as IPv4 (tested separately).
            .prop_filter("IPv4-mapped", |(ip, _)| ip.to_ipv4_mapped().is_none())
            .prop_map(SocketAddr::from);
        prop_oneof![v4, v6]
    }

    fn fixed_frame() -> impl Strategy<Value = Frame<'static>> {
        prop_oneof![
            (any::<u16>(), class(), any::<u16>(), any::<u64>(), listen(), any::<[u8; 16]>()).prop_map(
                |(version, class, index, host_id, listen, nonce)| {
                    Frame::Hello(Hello { version, class, index, host_id, listen, nonce })
                }
            ),
            (any::<u16>(), any::<u64>(), any::<[u8; 32]>(), any::<[u8; 16]>()).prop_map(
                |(version, host_id, proof, nonce)| Frame::HelloOk(HelloOk { version, host_id, proof, nonce })
            ),
            any::<[u8; 32]>().prop_map(|proof| Frame::Auth { proof }),
            Just(Frame::AuthOk),
            (id(), any::<u16>(), any::<u16>(), class(), any::<u64>()).prop_map(
                |(src_vsock, src_port, dst_port, class, credit)| Frame::Open {
                    src_vsock,
                    src_port,
                    dst_port,
                    class,
                    credit,
                    payload: &[]
                }
            ),
            (id(), id(), any::<u64>()).prop_map(|(vsock, src_vsock, credit)| Frame::OpenOk {
                vsock,
                src_vsock,
                credit
            }),
            (id(), reason()).prop_map(|(vsock, reason)| Frame::Refused { vsock, reason }),
            (id(), any::<u64>(), any::<u64>(), any::<bool>()).prop_map(|(vsock, p, q, fin_received)| {
                Frame::Credit { vsock, received: p.min(q), limit: p.max(q), fin_received }
            }),
            (id(), any::<u64>(), any::<bool>()).prop_map(|(vsock, offset, closed)| Frame::Fin {
                vsock,
                offset,
                closed
            }),
            any::<u64>().prop_map(|nonce| Frame::Ping { nonce }),
            any::<u64>().prop_map(|nonce| Frame::Pong { nonce }),
            (any::<u16>(), 1..=u64::MAX, 0..=MAX_SEGMENT as u64)
                .prop_map(|(port, seq, credit)| Frame::Listen { port, seq, credit }),
            (any::<u16>(), 1..=u64::MAX).prop_map(|(port, seq)| Frame::Unlisten { port, seq }),
            (1..=u64::MAX).prop_map(|seq| Frame::ListenSet { seq }),
        ]
    }

    fn spec() -> impl Strategy<Value = Spec> {
        let data = (id(), prop::collection::vec(any::<u8>(), 1..64)).prop_flat_map(|(vsock, payload)| {
            let last = u64::MAX - payload.len() as u64;
            let offset = prop_oneof![Just(0), Just(last), 0..=last];
            (Just(vsock), offset, Just(payload)).prop_map(|(vsock, offset, payload)| Spec::Data {
                vsock,
                offset,
                payload,
            })
        });
        // At most 200 characters of at most 4 bytes: within MAX_REASON.
        let reset = (any::<u32>(), reason(), "\\PC{0,200}")
            .prop_map(|(vsock, reason, message)| Spec::Reset { vsock, reason, message });
        prop_oneof![9 => fixed_frame().prop_map(Spec::Fixed), 2 => data, 2 => reset]
    }

    /// Whatever `decode` says about `buf`, it says without panicking, and what it accepts is
    /// canonical: encoding the frame again gives the bytes it was decoded from.
    fn check_decode(buf: &[u8]) -> Result<(), TestCaseError> {
        match decode(buf) {
            Ok((frame, used)) => {
                prop_assert!(used <= buf.len());
                prop_assert_eq!(used, frame.encoded_len());
                prop_assert_eq!(encode(&frame), &buf[..used]);
            }
            Err(WireError::Incomplete { needed }) => {
                prop_assert!(needed > buf.len() && needed <= HEADER_LEN + MAX_SEGMENT);
            }
            Err(_) => {}
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn prop_round_trip(spec in spec()) {
            let frame = spec.frame();
            let buf = encode(&frame);
            prop_assert_eq!(buf.len(), frame.encoded_len());
            prop_assert_eq!(decode(&buf), Ok((frame, buf.len())));
        }

        #[test]
        fn prop_stream_of_frames(specs in prop::collection::vec(spec(), 0..8)) {
            let mut buf = Vec::new();
            for spec in &specs {
                spec.frame().encode(&mut buf);
            }
            let mut rest = &buf[..];
            for spec in &specs {
                let (frame, used) = decode(rest).unwrap();
                prop_assert_eq!(frame, spec.frame());
                rest = &rest[used..];
            }
            prop_assert!(rest.is_empty());
        }

        #[test]
        fn prop_arbitrary_bytes_never_panic(buf in prop::collection::vec(any::<u8>(), 0..200)) {
            check_decode(&buf)?;
            let _ = Header::decode(&buf);
        }

        #[test]
        fn prop_valid_header_then_garbage(spec in spec(), garbage in prop::collection::vec(any::<u8>(), 0..200)) {
            let mut buf = spec.encode();
            buf.truncate(HEADER_LEN);
            buf.extend_from_slice(&garbage);
            check_decode(&buf)?;
        }

        #[test]
        fn prop_strict_prefix_is_incomplete(spec in spec()) {
            let buf = spec.encode();
            for end in 0..buf.len() {
                let needed = if end < HEADER_LEN { HEADER_LEN } else { buf.len() };
                prop_assert_eq!(decode(&buf[..end]), Err(WireError::Incomplete { needed }));
            }
        }

        #[test]
        fn prop_header_bit_flip(spec in spec(), bit in 0..HEADER_LEN * 8) {
            let mut buf = spec.encode();
            buf[bit / 8] ^= 1 << (bit % 8);
            check_decode(&buf)?;
        }
    }
}
