//! The per-host daemon: one engine serving the vsockets of every local process.
//!
//! Deployment layer. `netchannel up` runs a [`Server`]: a host engine whose vsocket rings live
//! in shared memory (`crate::shm`), a Unix socket apps connect to (each connection checked
//! with `SO_PEERCRED` against the uid/gid policy), and a doorbell poller that takes in what
//! apps write and read. Apps use a [`Client`] (through `VStream`/`VListener`): control
//! requests go over the Unix socket, data goes through each vsocket's memfd, handed to the
//! app with `SCM_RIGHTS` together with the vsocket's eventfd doorbell — the first time: a
//! finished vsocket's region and doorbell serve the next vsocket of the same process
//! (`regions`), so a short connection creates and unmaps no memory.
//!
//! Control messages are one length-prefixed JSON object each way: a 4-byte big-endian length
//! (at most [`MAX_MESSAGE`]) then the object. A client that sends anything else, does not
//! finish a request within 5 s of its first byte or take an answer within 5 s, or lies in
//! its vsocket headers, is disconnected; its vsockets are closed and no other client is
//! touched. Between requests a connection may stay idle for as long as the client likes.
//!
//! The daemon's caps (`[daemon] max_connections`, `max_connections_per_process`,
//! `max_vsockets_per_process`, `max_buffer_per_process`, `max_buffer`; docs/config.md) bound
//! what clients can make it hold. A request beyond one fails with an `io::Error` of kind
//! [`ErrorKind::OutOfMemory`] carrying a [`LimitExceeded`] that names the key; so does any
//! request but `status` while the daemon is out of file descriptors (`RLIMIT_NOFILE`).

pub mod client;
pub mod proxy;
mod regions;
pub mod server;

use std::io::{self, ErrorKind};
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use serde::{Deserialize, Serialize};

pub use client::Client;
pub use server::{Server, Stopper};

use crate::wire::Class;
use regions::PoolNote;

/// Largest control message, either way.
pub const MAX_MESSAGE: usize = 4 << 20;
/// Largest request a client may send.
pub const MAX_REQUEST: usize = 64 << 10;
/// Most file descriptors in one message.
const MAX_FDS: usize = 4;

/// A request from an app to the daemon.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub(crate) enum Request {
    /// Check that this process may use the daemon. Answered with `Ok` or a refusal.
    Hello,
    /// Open a vsocket to `addr` (peer host IP and vsocket port). Answered with `Stream`;
    /// with `proxy`, its readiness proxy end A comes with it (see [`proxy`]). With `pool`,
    /// the vsocket goes in a region of the app's pool (see [`regions`]).
    Connect {
        addr: SocketAddr,
        class: ClassName,
        #[serde(default)]
        proxy: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pool: Option<PoolNote>,
        /// Answer once the OPEN is sent, without waiting for the peer's answer (a shim's
        /// non-blocking connect): the region's `OPENING` state bit says it is still
        /// connecting, and the peer's answer (or the connect timeout) ends it.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        early: bool,
    },
    /// Listen on a vsocket port (0: any). Answered with `Listener`; with `poll`, a
    /// duplicate of the listener's readiness descriptor comes with it (readable exactly
    /// when an `Accept` would not block). With `pool` (the app table's token), arrivals go
    /// in regions of that pool; such a listener cannot park.
    Bind {
        port: u16,
        #[serde(default)]
        poll: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pool: Option<u64>,
    },
    /// Take the next vsocket of a listener; `wait` false answers `WouldBlock` at once.
    /// With `park`, the vsocket is not served yet: the daemon keeps it, answers `Parked`, and
    /// serves it to whichever process claims it with the address of the loopback placeholder
    /// connection `park` names (the preload shim's accept, in any process sharing the
    /// listening socket).
    Accept {
        listener: u64,
        wait: bool,
        #[serde(default)]
        proxy: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        park: Option<SocketAddr>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pool: Option<PoolNote>,
    },
    /// Serve the parked arrival whose placeholder connection comes from `placeholder`, with
    /// its readiness proxy. Answered with `Stream` (and its descriptors).
    Claim {
        placeholder: SocketAddr,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pool: Option<PoolNote>,
    },
    /// Stop listening.
    CloseListener { listener: u64 },
    /// Give a vsocket served without a readiness proxy its proxy (a library app asked for
    /// its pollable descriptor): answered with `Ok`, end A coming with it.
    Proxy { handle: u64 },
    /// Move a vsocket to another class.
    SetClass { handle: u64, class: ClassName },
    /// The daemon's state, as `netchannel status --json` prints it.
    Status,
    /// Abort one channel to `peer` (fault injection).
    KillChannel { peer: SocketAddr, class: ClassName, index: u16 },
}

/// The daemon's answer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "r", rename_all = "snake_case")]
pub(crate) enum Response {
    /// A vsocket: its memfd and doorbell eventfd come with the message, unless `mapped`:
    /// the app holds the region of pool `slot` mapped already (see [`regions`]). A pooled
    /// vsocket's doorbell is its table's, shared by all its vsockets.
    Stream {
        handle: u64,
        local: SocketAddr,
        remote: SocketAddr,
        class: ClassName,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        slot: Option<u32>,
        #[serde(default)]
        mapped: bool,
    },
    /// A listener.
    Listener { listener: u64, local: SocketAddr },
    /// `Accept` with `park`: an arrival from `remote` waits to be claimed.
    Parked { remote: SocketAddr },
    /// Done.
    Ok,
    /// `Status`.
    Status { status: serde_json::Value },
    /// Failed: an `io::ErrorKind` name and a message; `limit`: the cap that refused it.
    Error {
        kind: String,
        message: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<String>,
    },
}

/// A request refused by one of the daemon's caps: the error inside the `io::Error` (of kind
/// [`ErrorKind::OutOfMemory`]) that the client gets. Its message names the limit too.
///
/// ```no_run
/// use netchannel::daemon::{Client, LimitExceeded};
/// let daemon = Client::connect("/run/netchannel/netchannel.sock")?;
/// match daemon.connect_stream("10.0.0.2:7000".parse().unwrap()) {
///     Ok(_stream) => {}
///     Err(e) => match LimitExceeded::of(&e) {
///         Some(limit) => eprintln!("refused by the daemon's {}: {e}", limit.key()),
///         None => return Err(e),
///     },
/// }
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitExceeded {
    key: String,
    message: String,
}

impl LimitExceeded {
    /// The limit: a config key (`daemon.max_vsockets_per_process`) or `RLIMIT_NOFILE`.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The `LimitExceeded` inside `e`, if a cap refused the request.
    pub fn of(e: &io::Error) -> Option<&LimitExceeded> {
        e.get_ref().and_then(|inner| inner.downcast_ref::<LimitExceeded>())
    }

    /// The error a client gets for a request refused by `key`; `message` says why.
    pub(crate) fn error(key: &str, message: String) -> io::Error {
        io::Error::new(ErrorKind::OutOfMemory, LimitExceeded { key: key.into(), message })
    }
}

impl std::fmt::Display for LimitExceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for LimitExceeded {}

/// A traffic class as it appears in messages.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ClassName {
    Throughput,
    Latency,
}

impl From<Class> for ClassName {
    fn from(c: Class) -> Self {
        match c {
            Class::Throughput => ClassName::Throughput,
            Class::Latency => ClassName::Latency,
        }
    }
}

impl From<ClassName> for Class {
    fn from(c: ClassName) -> Self {
        match c {
            ClassName::Throughput => Class::Throughput,
            ClassName::Latency => Class::Latency,
        }
    }
}

const KINDS: &[(ErrorKind, &str)] = &[
    (ErrorKind::ConnectionRefused, "connection_refused"),
    (ErrorKind::ConnectionReset, "connection_reset"),
    (ErrorKind::ConnectionAborted, "connection_aborted"),
    (ErrorKind::TimedOut, "timed_out"),
    (ErrorKind::WouldBlock, "would_block"),
    (ErrorKind::AddrInUse, "addr_in_use"),
    (ErrorKind::PermissionDenied, "permission_denied"),
    (ErrorKind::InvalidInput, "invalid_input"),
    (ErrorKind::InvalidData, "invalid_data"),
    (ErrorKind::NotFound, "not_found"),
    (ErrorKind::BrokenPipe, "broken_pipe"),
    (ErrorKind::OutOfMemory, "out_of_memory"),
];

impl Response {
    pub(crate) fn error(e: &io::Error) -> Response {
        let kind = KINDS.iter().find(|(k, _)| *k == e.kind()).map_or("other", |(_, n)| n);
        let limit = LimitExceeded::of(e).map(|l| l.key.clone());
        Response::Error { kind: kind.into(), message: e.to_string(), limit }
    }
}

/// The `io::Error` of an `Error` response.
pub(crate) fn error_of(kind: &str, message: String, limit: Option<String>) -> io::Error {
    let k = KINDS.iter().find(|(_, n)| *n == kind).map_or(ErrorKind::Other, |(k, _)| *k);
    match limit {
        Some(key) => io::Error::new(k, LimitExceeded { key, message }),
        None => io::Error::new(k, message),
    }
}

/// The error for an answer of the wrong kind.
pub(crate) fn unexpected_response(r: &Response) -> io::Error {
    io::Error::new(ErrorKind::InvalidData, format!("unexpected answer from the daemon: {r:?}"))
}

/// Send one message with `fds` attached.
pub(crate) fn send_msg(sock: RawFd, msg: &impl Serialize, fds: &[RawFd]) -> io::Result<()> {
    let body = serde_json::to_vec(msg).map_err(|e| io::Error::new(ErrorKind::InvalidData, e))?;
    if body.len() > MAX_MESSAGE {
        return Err(io::Error::new(ErrorKind::InvalidData, "control message too large"));
    }
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&(body.len() as u32).to_be_bytes());
    buf.extend_from_slice(&body);
    let mut sent = 0;
    let mut first = true;
    while sent < buf.len() {
        let n = sendmsg(sock, &buf[sent..], if first { fds } else { &[] })?;
        first = false;
        sent += n;
    }
    Ok(())
}

/// Receive one message of at most `max` bytes and the fds that came with it. `Ok(None)` at a
/// clean end of stream before the message started. A read timeout (`SO_RCVTIMEO`) before
/// the message started is `WouldBlock`; inside it, `TimedOut`.
pub(crate) fn recv_msg(sock: RawFd, max: usize) -> io::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
    let mut fds = Vec::new();
    let mut len = [0u8; 4];
    let mut got = 0;
    let inside = |e: io::Error| match e.kind() {
        ErrorKind::WouldBlock => {
            io::Error::new(ErrorKind::TimedOut, "the rest of a control message did not come in time")
        }
        _ => e,
    };
    while got < 4 {
        let n = recvmsg(sock, &mut len[got..], &mut fds).map_err(|e| if got > 0 { inside(e) } else { e })?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(io::Error::new(ErrorKind::UnexpectedEof, "control connection closed mid-message"));
        }
        got += n;
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(io::Error::new(
            ErrorKind::InvalidData,
            format!("control message of {len} bytes is over the limit of {max}"),
        ));
    }
    let mut body = vec![0u8; len];
    let mut got = 0;
    while got < len {
        let n = recvmsg(sock, &mut body[got..], &mut fds).map_err(inside)?;
        if n == 0 {
            return Err(io::Error::new(ErrorKind::UnexpectedEof, "control connection closed mid-message"));
        }
        got += n;
    }
    Ok(Some((body, fds)))
}

fn cmsg_space() -> usize {
    // SAFETY: CMSG_SPACE is a pure computation.
    unsafe { libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<RawFd>()) as u32) as usize }
}

fn sendmsg(sock: RawFd, data: &[u8], fds: &[RawFd]) -> io::Result<usize> {
    assert!(fds.len() <= MAX_FDS);
    let mut iov = libc::iovec { iov_base: data.as_ptr() as *mut _, iov_len: data.len() };
    let mut cbuf = vec![0u8; cmsg_space()];
    // SAFETY: msghdr is plain data; zeroed is a valid empty header.
    let mut msg: libc::msghdr = unsafe { MaybeUninit::zeroed().assume_init() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let bytes = std::mem::size_of_val(fds);
        msg.msg_control = cbuf.as_mut_ptr().cast();
        // SAFETY: pure computation.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(bytes as u32) } as _;
        // SAFETY: msg_control points at cbuf, large enough for one cmsg of `bytes` (CMSG_SPACE
        // of MAX_FDS fds); CMSG_FIRSTHDR/CMSG_DATA stay inside it.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(bytes as u32) as _;
            std::ptr::copy_nonoverlapping(fds.as_ptr().cast::<u8>(), libc::CMSG_DATA(c), bytes);
        }
    }
    loop {
        // SAFETY: msg points at live iov and control buffers.
        let n = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn recvmsg(sock: RawFd, data: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    let mut iov = libc::iovec { iov_base: data.as_mut_ptr().cast(), iov_len: data.len() };
    let mut cbuf = vec![0u8; cmsg_space()];
    // SAFETY: as in sendmsg.
    let mut msg: libc::msghdr = unsafe { MaybeUninit::zeroed().assume_init() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = cbuf.len() as _;
    let n = loop {
        // SAFETY: msg points at live buffers of the lengths it states.
        let n = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != ErrorKind::Interrupted {
            return Err(e);
        }
    };
    // SAFETY: walking the control messages the kernel wrote into cbuf, within msg_controllen.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c);
                let count =
                    ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok(n)
}

/// Whether the other end of a connected socket hung up (without consuming anything).
pub(crate) fn hung_up(sock: &impl AsRawFd) -> bool {
    let mut p = libc::pollfd { fd: sock.as_raw_fd(), events: libc::POLLRDHUP, revents: 0 };
    // SAFETY: one valid pollfd, no wait.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}
