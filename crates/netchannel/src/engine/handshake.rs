//! Channel handshake, both sides: the acceptor of the channel port and the accept side of
//! the handshake (HELLO / HELLO_OK / AUTH / AUTH_OK, see `crate::wire`), and the dial side
//! ([`dial_channel`]). What a finished handshake yields — a channel joining a peer's mesh —
//! is handed to the NetDriver (`HostInner::add_channel`); the proofs are in `engine::auth`.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token, Waker};

use crate::engine::auth;
use crate::engine::peer::{Peer, PeerState};
use crate::engine::HostInner;
use crate::wire::{self, Class, Frame, Hello, HelloOk, Reason, HEADER_LEN};

/// How long an accepted channel may take to send its HELLO.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
/// The acceptor's poll token of the channel listener.
const LISTENER: Token = Token(0);
/// The acceptor's poll token of its waker.
const WAKER: Token = Token(1);

/// The channel port: the listener and the poller the acceptor thread waits on.
pub(super) struct Acceptor {
    poll: Poll,
    listener: TcpListener,
}

impl Acceptor {
    /// Register `listener` (already bound, non-blocking) with a new poller. The waker
    /// interrupts [`Acceptor::run`] when the host shuts down.
    pub(super) fn new(listener: std::net::TcpListener) -> io::Result<(Acceptor, Waker)> {
        let mut listener = TcpListener::from_std(listener);
        let poll = Poll::new()?;
        poll.registry().register(&mut listener, LISTENER, Interest::READABLE)?;
        let waker = Waker::new(poll.registry(), WAKER)?;
        Ok((Acceptor { poll, listener }, waker))
    }

    /// The acceptor thread: accept channels until the host shuts down, each handshake on
    /// its own short-lived thread.
    pub(super) fn run(self, host: Arc<HostInner>) {
        let Acceptor { mut poll, listener } = self;
        let mut events = Events::with_capacity(16);
        loop {
            if host.is_closing() {
                return;
            }
            if let Err(e) = poll.poll(&mut events, None) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!(error = %e, "channel acceptor stopped");
                return;
            }
            if host.is_closing() {
                return;
            }
            loop {
                match listener.accept() {
                    Ok((s, from)) => {
                        let h = host.clone();
                        let std_s: TcpStream = match mio_to_std(s) {
                            Ok(s) => s,
                            Err(_) => continue,
                        };
                        let _ = std::thread::Builder::new()
                            .name("nc-handshake".into())
                            .spawn(move || h.handshake(std_s, from));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting a channel failed");
                        std::thread::sleep(Duration::from_millis(50));
                        break;
                    }
                }
            }
        }
    }
}

impl HostInner {
    /// Dial channel `index` of `class` to `peer` and run the handshake as this host.
    pub(crate) fn dial(
        &self,
        peer: &Arc<Peer>,
        class: Class,
        index: u16,
        deadline: Instant,
    ) -> io::Result<(TcpStream, u64)> {
        dial_channel(peer.key, self.local, self.host_id, class, index, self.auth_key.as_deref(), deadline)
    }

    /// Accept side of the channel handshake (runs on its own short-lived thread).
    pub(super) fn handshake(self: &Arc<Self>, mut s: TcpStream, from: SocketAddr) {
        let _span = tracing::error_span!("channel", from = %from).entered();
        let refuse = |s: &mut TcpStream, reason: Reason, msg: String| {
            self.totals.channels_refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(why = %msg, "refused a channel");
            let mut buf = Vec::new();
            Frame::Reset { vsock: 0, reason, message: &msg }.encode(&mut buf);
            let _ = s.write_all(&buf);
        };
        let _ = s.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
        let _ = s.set_nodelay(true);
        let mut buf = vec![0u8; HEADER_LEN + wire::Hello::LEN];
        if let Err(e) = s.read_exact(&mut buf[..HEADER_LEN]) {
            self.totals.channels_refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %e, "a channel sent no HELLO");
            return;
        }
        let hello = match wire::Header::decode(&buf[..HEADER_LEN]) {
            Ok(h) if h.kind == wire::Kind::Hello => {
                if s.read_exact(&mut buf[HEADER_LEN..]).is_err() {
                    return refuse(&mut s, Reason::Protocol, "truncated HELLO".into());
                }
                match wire::decode(&buf) {
                    Ok((Frame::Hello(h), _)) => h,
                    Ok(_) => unreachable!("header said HELLO"),
                    Err(e) => return refuse(&mut s, Reason::Protocol, format!("bad HELLO: {e}")),
                }
            }
            Ok(h) => return refuse(&mut s, Reason::Protocol, format!("expected HELLO, got {}", h.kind)),
            Err(e) => return refuse(&mut s, Reason::Protocol, format!("expected HELLO: {e}")),
        };
        if hello.version != wire::VERSION {
            return refuse(
                &mut s,
                Reason::Version,
                format!(
                    "protocol version {} is not supported (this host speaks {})",
                    hello.version,
                    wire::VERSION
                ),
            );
        }
        if hello.host_id == self.host_id {
            return refuse(&mut s, Reason::Protocol, "a host cannot open channels to itself".into());
        }
        let mut ok = Vec::new();
        match &self.auth_key {
            None => {
                Frame::HelloOk(HelloOk {
                    version: wire::VERSION,
                    host_id: self.host_id,
                    proof: [0; 32],
                    nonce: [0; 16],
                })
                .encode(&mut ok);
                if s.write_all(&ok).is_err() {
                    return;
                }
            }
            Some(key) => {
                if hello.nonce == [0; 16] {
                    return refuse(
                        &mut s,
                        Reason::Auth,
                        "this host requires authenticated channels: configure the same auth_key_file".into(),
                    );
                }
                let Ok(acceptor) = s.local_addr() else { return };
                let t = auth::Transcript {
                    hello,
                    acceptor_version: wire::VERSION,
                    acceptor_id: self.host_id,
                    na: auth::nonce(),
                    dialer: from,
                    acceptor,
                };
                let proof = auth::acceptor_proof(key, &t);
                Frame::HelloOk(HelloOk { version: wire::VERSION, host_id: self.host_id, proof, nonce: t.na })
                    .encode(&mut ok);
                if s.write_all(&ok).is_err() {
                    return;
                }
                let mut frame = Vec::new();
                match read_frame(&mut s, &mut frame) {
                    Ok(Frame::Auth { proof }) if auth::check_dialer(key, &t, &proof) => {}
                    Ok(Frame::Auth { .. }) => {
                        return refuse(
                            &mut s,
                            Reason::Auth,
                            "authentication failed: the dialing host's proof did not match (it holds \
                             another key, or the handshake was relayed or reflected)"
                                .into(),
                        )
                    }
                    Ok(Frame::Reset { reason: Reason::Auth, message, .. }) => {
                        self.totals.channels_refused.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(
                            reason = %message,
                            "a channel failed authentication: this host's proof did not match at the \
                             dialing host; do both hosts hold the same auth_key_file?"
                        );
                        return;
                    }
                    Ok(other) => {
                        return refuse(
                            &mut s,
                            Reason::Protocol,
                            format!("expected AUTH, got {}", other.kind()),
                        )
                    }
                    Err(e) => {
                        self.totals.channels_refused.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(error = %e, "a channel did not complete authentication");
                        return;
                    }
                }
                ok.clear();
                Frame::AuthOk.encode(&mut ok);
                if s.write_all(&ok).is_err() {
                    return;
                }
            }
        }
        if s.set_read_timeout(None).is_err() {
            return;
        }
        let key = SocketAddr::new(from.ip(), hello.listen.port());
        let peer = {
            let mut peers = self.peers.lock().unwrap();
            let existing = peers.get(&key).cloned();
            match existing {
                Some(p) if !p.is_dead() => {
                    let known = p.host_id.load(Ordering::Relaxed);
                    if known != 0 && known != hello.host_id {
                        // The peer restarted: its old vsockets are gone with it.
                        drop(peers);
                        self.retire_peer(&p, "the peer host restarted");
                        let fresh = Peer::new(key, &self.cfg, PeerState::Up);
                        self.peers.lock().unwrap().insert(key, fresh.clone());
                        fresh
                    } else {
                        p
                    }
                }
                _ => {
                    let p = Peer::new(key, &self.cfg, PeerState::Up);
                    peers.insert(key, p.clone());
                    p
                }
            }
        };
        peer.host_id.store(hello.host_id, Ordering::Relaxed);
        if let Err(e) = self.add_channel(&peer, s, hello.class, hello.index) {
            tracing::error!(error = %e, "cannot add a channel");
        }
    }
}

/// Dial one channel: TCP connect from our IP, HELLO, HELLO_OK, and with a pre-shared `auth`
/// key the AUTH / AUTH_OK exchange (both sides prove they hold the key).
/// Returns the stream (blocking mode) and the peer's host id.
#[allow(clippy::too_many_arguments)]
pub(crate) fn dial_channel(
    key: SocketAddr,
    local: SocketAddr,
    host_id: u64,
    class: Class,
    index: u16,
    auth: Option<&[u8]>,
    deadline: Instant,
) -> io::Result<(TcpStream, u64)> {
    let remaining = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| io::Error::new(io::ErrorKind::TimedOut, "timed out"))
    };
    let sock = socket2::Socket::new(socket2::Domain::for_address(key), socket2::Type::STREAM, None)?;
    if !local.ip().is_unspecified() && local.is_ipv4() == key.is_ipv4() {
        sock.bind(&SocketAddr::new(local.ip(), 0).into())?;
    }
    sock.connect_timeout(&key.into(), remaining()?)?;
    let mut s: TcpStream = sock.into();
    s.set_nodelay(true)?;
    let nd = if auth.is_some() { auth::nonce() } else { [0; 16] };
    let hello = Hello { version: wire::VERSION, class, index, host_id, listen: local, nonce: nd };
    let mut buf = Vec::new();
    Frame::Hello(hello).encode(&mut buf);
    s.set_write_timeout(Some(remaining()?))?;
    s.write_all(&buf)?;
    let mut frame = Vec::new();
    s.set_read_timeout(Some(remaining()?))?;
    let ok = match read_frame(&mut s, &mut frame)? {
        Frame::HelloOk(ok) => ok,
        Frame::Reset { reason, message, .. } => return Err(refused(reason, message)),
        other => return Err(invalid(format!("answered HELLO with {}", other.kind()))),
    };
    if ok.host_id == host_id {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "that address is this host itself"));
    }
    if let Some(k) = auth {
        if ok.nonce == [0; 16] {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "does not authenticate its channels, and this host requires it (auth_key_file)",
            ));
        }
        let t = auth::Transcript {
            hello,
            acceptor_version: ok.version,
            acceptor_id: ok.host_id,
            na: ok.nonce,
            dialer: s.local_addr()?,
            acceptor: s.peer_addr()?,
        };
        if !auth::check_acceptor(k, &t, &ok.proof) {
            // Tell the acceptor why, so that its log says so too.
            buf.clear();
            let message = "the accepting host's proof did not match this host's key";
            Frame::Reset { vsock: 0, reason: Reason::Auth, message }.encode(&mut buf);
            let _ = s.write_all(&buf);
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "failed authentication: its proof does not match this host's pre-shared key (it holds \
                 another key, or the handshake was relayed)",
            ));
        }
        let proof = auth::dialer_proof(k, &t);
        buf.clear();
        Frame::Auth { proof }.encode(&mut buf);
        s.set_write_timeout(Some(remaining()?))?;
        s.write_all(&buf)?;
        s.set_read_timeout(Some(remaining()?))?;
        match read_frame(&mut s, &mut frame)? {
            Frame::AuthOk => {}
            Frame::Reset { reason, message, .. } => return Err(refused(reason, message)),
            other => return Err(invalid(format!("answered AUTH with {}", other.kind()))),
        }
    }
    s.set_read_timeout(None)?;
    s.set_write_timeout(None)?;
    Ok((s, ok.host_id))
}

fn refused(reason: wire::Reason, message: &str) -> io::Error {
    let kind = if reason == wire::Reason::Auth {
        io::ErrorKind::PermissionDenied
    } else {
        io::ErrorKind::ConnectionRefused
    };
    io::Error::new(kind, format!("refused the channel ({reason}): {message}"))
}

/// Read exactly one frame from a blocking stream (the handshake) into `buf` and decode it.
/// The header is validated before its payload is read, so `buf` never grows past
/// `HEADER_LEN + MAX_SEGMENT`.
pub(crate) fn read_frame<'b>(s: &mut TcpStream, buf: &'b mut Vec<u8>) -> io::Result<Frame<'b>> {
    buf.clear();
    buf.resize(HEADER_LEN, 0);
    read_exact_or(s, buf)?;
    let h = wire::Header::decode(buf).map_err(|e| invalid(format!("bad handshake frame: {e}")))?;
    buf.resize(HEADER_LEN + h.len as usize, 0);
    read_exact_or(s, &mut buf[HEADER_LEN..])?;
    let (f, _) = wire::decode(buf).map_err(|e| invalid(format!("bad handshake frame: {e}")))?;
    Ok(f)
}

fn read_exact_or(s: &mut TcpStream, buf: &mut [u8]) -> io::Result<()> {
    s.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            io::Error::new(io::ErrorKind::TimedOut, "no handshake answer before the connect timeout")
        }
        io::ErrorKind::UnexpectedEof => {
            io::Error::new(io::ErrorKind::ConnectionAborted, "closed the connection during the handshake")
        }
        _ => e,
    })
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

fn mio_to_std(s: mio::net::TcpStream) -> io::Result<TcpStream> {
    use std::os::fd::{FromRawFd, IntoRawFd};
    let fd = s.into_raw_fd();
    // SAFETY: fd was just released by the mio stream, which owned it.
    let s = unsafe { TcpStream::from_raw_fd(fd) };
    s.set_nonblocking(false)?;
    Ok(s)
}
