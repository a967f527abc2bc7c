//! Channel handshake, both sides: the acceptor of the channel port, which runs the accept
//! side of every handshake (HELLO / HELLO_OK / AUTH / AUTH_OK, see `crate::wire`) in one
//! event loop, and the dial side ([`dial_channel`]). What a finished handshake yields — a
//! channel joining a peer's mesh — is handed to the NetDriver (`HostInner::add_channel`);
//! the proofs are in `engine::auth`.
//!
//! The channel port faces anyone who can reach it, so what a connection can hold here is
//! bounded:
//! * no thread per connection: one acceptor thread polls every pending handshake (mio);
//! * one deadline for the whole handshake ([`HANDSHAKE_TIMEOUT`] from accept), however
//!   slowly its bytes trickle in;
//! * at most [`MAX_PENDING`] handshakes pending, and [`MAX_PENDING_PER_IP`] from one source
//!   IP; beyond them a connection is closed as soon as it is accepted;
//! * at most [`MAX_ACCEPTED_PEERS`] peers whose meshes this host did not dial, and
//!   [`MAX_PEERS_PER_IP`] at one IP; a HELLO that would make another is refused;
//! * out of descriptors (`EMFILE`/`ENFILE`), the acceptor says so once, sheds the connection
//!   at the head of the queue with a reserve descriptor, backs off [`FD_BACKOFF`] and keeps
//!   accepting;
//! * refusals are logged at most [`LOG_PER_SECOND`] a second, with a count of the rest.
//!
//! Without a key nothing here is authenticated (a deployment without `auth_key_file` is
//! spoofable by design), but a peer's *restart* — a HELLO from its address with a new host
//! id, which fails every vsocket to it — is believed only once its existing channels are
//! gone; while they are up, the new channel waits (within its deadline) and is then refused.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token, Waker};

use crate::engine::auth;
use crate::engine::peer::{Peer, PeerState};
use crate::engine::HostInner;
use crate::wire::{self, Class, Frame, Hello, HelloOk, Reason, HEADER_LEN};

/// How long an accepted connection has to complete the whole handshake.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
/// Most handshakes pending at once.
pub(crate) const MAX_PENDING: usize = 256;
/// Most handshakes pending at once from one source IP.
pub(crate) const MAX_PENDING_PER_IP: usize = 16;
/// Most peers at once whose channel meshes other hosts dialed to this one.
pub(crate) const MAX_ACCEPTED_PEERS: usize = 1024;
/// Most such peers at one IP (hosts on one IP differ by their channel port).
pub(crate) const MAX_PEERS_PER_IP: usize = 16;
/// Pause before accepting again after running out of file descriptors.
pub(crate) const FD_BACKOFF: Duration = Duration::from_millis(100);
/// Refusal warnings logged per second at most.
pub(crate) const LOG_PER_SECOND: u32 = 10;
/// How often a handshake waiting for a verdict (a peer's restart) looks again.
const VERDICT_TICK: Duration = Duration::from_millis(20);
/// The acceptor's poll token of the channel listener.
const LISTENER: Token = Token(0);
/// The acceptor's poll token of its waker.
const WAKER: Token = Token(1);
/// First poll token of a pending handshake.
const FIRST_PENDING: usize = 2;

/// The channel port: the listener and the poller the acceptor thread waits on.
pub(super) struct Acceptor {
    poll: Poll,
    listener: TcpListener,
}

/// Warnings of one kind, at most [`LOG_PER_SECOND`] a second; the rest are counted and the
/// count is said with the next one let through.
pub(crate) struct Throttle {
    state: Mutex<ThrottleState>,
}

struct ThrottleState {
    window: Option<Instant>,
    in_window: u32,
    suppressed: u64,
}

impl Throttle {
    pub(crate) const fn new() -> Throttle {
        Throttle { state: Mutex::new(ThrottleState { window: None, in_window: 0, suppressed: 0 }) }
    }

    /// Whether to log this one; `Some(n)`: yes, and `n` were left out since the last.
    pub(crate) fn allow(&self) -> Option<u64> {
        let mut st = self.state.lock().unwrap();
        let now = Instant::now();
        if st.window.is_none_or(|w| now.duration_since(w) >= Duration::from_secs(1)) {
            st.window = Some(now);
            st.in_window = 0;
        }
        if st.in_window >= LOG_PER_SECOND {
            st.suppressed += 1;
            return None;
        }
        st.in_window += 1;
        Some(std::mem::take(&mut st.suppressed))
    }
}

/// `" (N similar warnings not shown)"`, or nothing.
pub(crate) fn suppressed_note(n: u64) -> String {
    if n == 0 {
        String::new()
    } else {
        format!(" ({n} similar warnings in the last second not shown)")
    }
}

static REFUSALS: Throttle = Throttle::new();

/// One descriptor held in reserve: freed to take a connection when the process has none
/// left, so that it can be closed (here) or answered (the daemon's `status`) instead of
/// left in the queue.
pub(crate) struct Reserve(Option<std::fs::File>);

impl Reserve {
    pub(crate) fn new() -> Reserve {
        Reserve(std::fs::File::open("/dev/null").ok())
    }

    /// Free the reserve descriptor; false if there was none to free.
    pub(crate) fn release(&mut self) -> bool {
        self.0.take().is_some()
    }

    /// Take the reserve descriptor again if it is free (it may not be, out of descriptors).
    pub(crate) fn restore(&mut self) {
        if self.0.is_none() {
            self.0 = std::fs::File::open("/dev/null").ok();
        }
    }

    /// Free the reserve, accept and close one connection, take the reserve again.
    fn shed_one(&mut self, listener: &TcpListener) -> bool {
        self.release();
        let shed = listener.accept().is_ok();
        self.restore();
        shed
    }
}

/// Where one accepted connection's handshake stands.
enum Step {
    /// Waiting for HELLO.
    Hello,
    /// HELLO_OK sent with our proof; waiting for the dialer's AUTH.
    Auth { hello: Hello, transcript: auth::Transcript },
    /// The handshake is complete, but a peer with another host id still has live channels
    /// from this address: wait (within the deadline) for them to go.
    Verdict { hello: Hello },
}

/// One accepted connection whose handshake is not complete.
struct Pending {
    stream: mio::net::TcpStream,
    from: SocketAddr,
    deadline: Instant,
    /// Bytes of the frame being received (never more than one frame).
    buf: Vec<u8>,
    step: Step,
}

/// What handling input did to a pending handshake.
enum Progress {
    /// Still pending.
    Wait,
    /// Complete: the connection joins this peer's mesh as channel `index` of `class`.
    Admit { peer: Arc<Peer>, class: Class, index: u16 },
    /// Done with: refused, or closed by the peer.
    Gone,
}

/// The pending handshakes of the acceptor, with their count per source IP.
struct Handshakes {
    map: HashMap<Token, Pending>,
    per_ip: HashMap<IpAddr, usize>,
    next: usize,
}

impl Handshakes {
    fn remove(&mut self, t: Token) -> Option<Pending> {
        let p = self.map.remove(&t)?;
        let ip = p.from.ip().to_canonical();
        if let Some(n) = self.per_ip.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.per_ip.remove(&ip);
            }
        }
        Some(p)
    }

    fn token(&mut self) -> Token {
        loop {
            let t = Token(self.next);
            self.next = if self.next == usize::MAX { FIRST_PENDING } else { self.next + 1 };
            if !self.map.contains_key(&t) {
                return t;
            }
        }
    }
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

    /// The acceptor thread: accept connections and run their handshakes until the host
    /// shuts down.
    pub(super) fn run(self, host: Arc<HostInner>) {
        let Acceptor { mut poll, listener } = self;
        let mut events = Events::with_capacity(256);
        let mut hs = Handshakes { map: HashMap::new(), per_ip: HashMap::new(), next: FIRST_PENDING };
        let mut reserve = Reserve::new();
        // Out of descriptors: when to try accepting again, and whether that was said.
        let mut paused_until: Option<Instant> = None;
        let mut accept_ready = true;
        loop {
            if host.is_closing() {
                return;
            }
            let now = Instant::now();
            let mut wake = hs.map.values().map(|p| p.deadline).min();
            if hs.map.values().any(|p| matches!(p.step, Step::Verdict { .. })) {
                wake = Some(wake.map_or(now + VERDICT_TICK, |w| w.min(now + VERDICT_TICK)));
            }
            if let Some(t) = paused_until {
                wake = Some(wake.map_or(t, |w| w.min(t)));
            }
            let timeout = wake.map(|w| w.saturating_duration_since(now));
            if let Err(e) = poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!("channel acceptor stopped: {e}");
                return;
            }
            if host.is_closing() {
                return;
            }
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => accept_ready = true,
                    WAKER => {}
                    t => {
                        if let Some(p) = hs.map.get_mut(&t) {
                            let outcome = host.progress(p);
                            if !matches!(outcome, Progress::Wait) {
                                if let Some(p) = hs.remove(t) {
                                    host.finish(&poll, p, outcome);
                                }
                            }
                        }
                    }
                }
            }
            let now = Instant::now();
            if paused_until.is_some_and(|t| now >= t) {
                paused_until = None;
                accept_ready = true;
            }
            if accept_ready && paused_until.is_none() {
                accept_ready = false;
                host.accept_all(&poll, &listener, &mut hs, &mut reserve, &mut paused_until);
            }
            // Deadlines, and handshakes waiting for a verdict.
            let due: Vec<Token> = hs
                .map
                .iter()
                .filter(|(_, p)| p.deadline <= now || matches!(p.step, Step::Verdict { .. }))
                .map(|(t, _)| *t)
                .collect();
            for t in due {
                let Some(p) = hs.map.get_mut(&t) else { continue };
                let _span = tracing::error_span!("channel", from = %p.from).entered();
                let outcome = if p.deadline <= now {
                    host.expire(p);
                    Progress::Gone
                } else {
                    host.try_admit(p)
                };
                if !matches!(outcome, Progress::Wait) {
                    if let Some(p) = hs.remove(t) {
                        host.finish(&poll, p, outcome);
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

    /// Accept every connection in the queue, within the caps on pending handshakes.
    fn accept_all(
        self: &Arc<Self>,
        poll: &Poll,
        listener: &TcpListener,
        hs: &mut Handshakes,
        reserve: &mut Reserve,
        paused_until: &mut Option<Instant>,
    ) {
        static OUT_OF_FDS: AtomicBool = AtomicBool::new(false);
        loop {
            match listener.accept() {
                Ok((mut stream, from)) => {
                    if OUT_OF_FDS.swap(false, Ordering::Relaxed) {
                        tracing::warn!(
                            "file descriptors are free again: accepting channels on {}",
                            self.local
                        );
                    }
                    let ip = from.ip().to_canonical();
                    let from_ip = hs.per_ip.get(&ip).copied().unwrap_or(0);
                    if hs.map.len() >= MAX_PENDING || from_ip >= MAX_PENDING_PER_IP {
                        self.totals.channels_refused.fetch_add(1, Ordering::Relaxed);
                        if let Some(n) = REFUSALS.allow() {
                            tracing::warn!("closed a channel connection from {from} at once: {} handshakes pending ({} from {ip}; at most {MAX_PENDING}, {MAX_PENDING_PER_IP} per IP){}",
                                hs.map.len(),
                                from_ip,
                                suppressed_note(n)
                            );
                        }
                        continue;
                    }
                    let t = hs.token();
                    if let Err(e) = poll.registry().register(&mut stream, t, Interest::READABLE) {
                        tracing::warn!("cannot poll the channel connection from {from}: {e}");
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    let mut p = Pending {
                        stream,
                        from,
                        deadline: Instant::now() + HANDSHAKE_TIMEOUT,
                        buf: Vec::new(),
                        step: Step::Hello,
                    };
                    // Its HELLO may be here already.
                    match self.progress(&mut p) {
                        Progress::Wait => {
                            hs.map.insert(t, p);
                            *hs.per_ip.entry(ip).or_insert(0) += 1;
                        }
                        outcome => self.finish(poll, p, outcome),
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                    if !OUT_OF_FDS.swap(true, Ordering::Relaxed) {
                        tracing::error!("out of file descriptors accepting channels on {} ({e}): shedding connections and trying again every {} ms; raise the descriptor limit (ulimit -n) or lower the load",
                            self.local,
                            FD_BACKOFF.as_millis()
                        );
                    }
                    if reserve.shed_one(listener) {
                        self.totals.channels_refused.fetch_add(1, Ordering::Relaxed);
                    }
                    *paused_until = Some(Instant::now() + FD_BACKOFF);
                    return;
                }
                Err(e) => {
                    if let Some(n) = REFUSALS.allow() {
                        tracing::warn!(
                            "accepting a channel on {} failed: {e}{}",
                            self.local,
                            suppressed_note(n)
                        );
                    }
                    *paused_until = Some(Instant::now() + FD_BACKOFF);
                    return;
                }
            }
        }
    }

    /// Refuse a pending handshake: count it, log it (throttled; the caller is in the
    /// connection's `channel` span), send RESET (best effort).
    fn refuse(&self, p: &mut Pending, reason: Reason, msg: &str) {
        self.totals.channels_refused.fetch_add(1, Ordering::Relaxed);
        if let Some(n) = REFUSALS.allow() {
            tracing::warn!(why = %msg, suppressed = n, "refused a channel");
        }
        let mut buf = Vec::new();
        Frame::Reset { vsock: 0, reason, message: msg }.encode(&mut buf);
        let _ = send(&mut p.stream, &buf);
    }

    /// A pending handshake ran past its deadline.
    fn expire(&self, p: &mut Pending) {
        let what = match p.step {
            Step::Hello => "no HELLO",
            Step::Auth { .. } => "no AUTH",
            Step::Verdict { .. } => {
                let msg = format!(
                    "a host with another host id still has live channels from {}: a restart is believed only once they are gone",
                    p.from.ip()
                );
                return self.refuse(p, Reason::Protocol, &msg);
            }
        };
        self.totals.channels_refused.fetch_add(1, Ordering::Relaxed);
        if let Some(n) = REFUSALS.allow() {
            tracing::warn!(
                "closed the channel connection from {}: {what} within the handshake's {} ms{}",
                p.from,
                HANDSHAKE_TIMEOUT.as_millis(),
                suppressed_note(n)
            );
        }
    }

    /// A pending handshake is done with: its connection joins a mesh, or is closed.
    fn finish(self: &Arc<Self>, poll: &Poll, mut p: Pending, outcome: Progress) {
        let _ = poll.registry().deregister(&mut p.stream);
        if let Progress::Admit { peer, class, index } = outcome {
            let s = mio_to_std(p.stream);
            if let Err(e) = self.add_channel(&peer, s, class, index) {
                tracing::error!("cannot add channel from {}: {e}", p.from);
            }
        }
    }

    /// Read what a pending connection sent (never past the frame expected) and act on each
    /// complete frame.
    fn progress(self: &Arc<Self>, p: &mut Pending) -> Progress {
        let _span = tracing::error_span!("channel", from = %p.from).entered();
        loop {
            if let Step::Verdict { .. } = p.step {
                return Progress::Wait;
            }
            // How many bytes the frame expected needs in total.
            let need = if p.buf.len() < HEADER_LEN {
                HEADER_LEN
            } else {
                match wire::Header::decode(&p.buf[..HEADER_LEN]) {
                    Ok(h) => HEADER_LEN + h.len as usize,
                    Err(e) => {
                        let msg = match p.step {
                            Step::Hello => format!("expected HELLO: {e}"),
                            _ => format!("bad handshake frame: {e}"),
                        };
                        self.refuse(p, Reason::Protocol, &msg);
                        return Progress::Gone;
                    }
                }
            };
            if p.buf.len() == HEADER_LEN && need > HEADER_LEN {
                // Refuse a wrong kind before reading its payload.
                if let Ok(h) = wire::Header::decode(&p.buf[..HEADER_LEN]) {
                    let ok = match p.step {
                        Step::Hello => h.kind == wire::Kind::Hello,
                        _ => matches!(h.kind, wire::Kind::Auth | wire::Kind::Reset),
                    };
                    if !ok {
                        let msg = match p.step {
                            Step::Hello => format!("expected HELLO, got {}", h.kind),
                            _ => format!("expected AUTH, got {}", h.kind),
                        };
                        self.refuse(p, Reason::Protocol, &msg);
                        return Progress::Gone;
                    }
                }
            }
            if p.buf.len() < need {
                let have = p.buf.len();
                p.buf.resize(need, 0);
                match p.stream.read(&mut p.buf[have..need]) {
                    Ok(0) => {
                        p.buf.truncate(have);
                        self.totals.channels_refused.fetch_add(1, Ordering::Relaxed);
                        if let Some(n) = REFUSALS.allow() {
                            let what = match p.step {
                                Step::Hello if have == 0 => "sent no HELLO",
                                Step::Hello => "sent a truncated HELLO",
                                _ => "closed the connection before authenticating",
                            };
                            tracing::warn!("channel connection from {} {what}{}", p.from, suppressed_note(n));
                        }
                        return Progress::Gone;
                    }
                    Ok(k) => p.buf.truncate(have + k),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        p.buf.truncate(have);
                        return Progress::Wait;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => p.buf.truncate(have),
                    Err(e) => {
                        self.totals.channels_refused.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(
                            "channel connection from {} failed during the handshake: {e}",
                            p.from
                        );
                        return Progress::Gone;
                    }
                }
                continue;
            }
            // One whole frame is in.
            let step = std::mem::replace(&mut p.step, Step::Hello);
            let frame_bytes = std::mem::take(&mut p.buf);
            let frame = match wire::decode(&frame_bytes) {
                Ok((f, _)) => f,
                Err(e) => {
                    let msg = match step {
                        Step::Hello => format!("bad HELLO: {e}"),
                        _ => format!("bad handshake frame: {e}"),
                    };
                    self.refuse(p, Reason::Protocol, &msg);
                    return Progress::Gone;
                }
            };
            match (step, frame) {
                (Step::Hello, Frame::Hello(hello)) => match self.on_hello(p, hello) {
                    Progress::Wait if matches!(p.step, Step::Auth { .. }) => {}
                    outcome => return outcome,
                },
                (Step::Auth { hello, transcript }, frame) => {
                    let Some(key) = &self.auth_key else { return Progress::Gone };
                    match frame {
                        Frame::Auth { proof } if auth::check_dialer(key, &transcript, &proof) => {
                            let mut ok = Vec::new();
                            Frame::AuthOk.encode(&mut ok);
                            if !send(&mut p.stream, &ok) {
                                return Progress::Gone;
                            }
                            p.step = Step::Verdict { hello };
                            return self.try_admit(p);
                        }
                        Frame::Auth { .. } => {
                            self.refuse(
                                p,
                                Reason::Auth,
                                "authentication failed: the dialing host's proof did not match (it holds \
                                 another key, or the handshake was relayed or reflected)",
                            );
                            return Progress::Gone;
                        }
                        Frame::Reset { reason: Reason::Auth, message, .. } => {
                            self.totals.channels_refused.fetch_add(1, Ordering::Relaxed);
                            if let Some(n) = REFUSALS.allow() {
                                tracing::warn!("channel from {} failed authentication: this host's proof did not match at the dialing host ({message}); do both hosts hold the same auth_key_file?{}",
                                    p.from,
                                    suppressed_note(n)
                                );
                            }
                            return Progress::Gone;
                        }
                        other => {
                            let msg = format!("expected AUTH, got {}", other.kind());
                            self.refuse(p, Reason::Protocol, &msg);
                            return Progress::Gone;
                        }
                    }
                }
                (_, other) => {
                    let msg = format!("expected HELLO, got {}", other.kind());
                    self.refuse(p, Reason::Protocol, &msg);
                    return Progress::Gone;
                }
            }
        }
    }

    /// A complete HELLO: check it, answer HELLO_OK (with our proof when keyed).
    fn on_hello(self: &Arc<Self>, p: &mut Pending, hello: Hello) -> Progress {
        if hello.version != wire::VERSION {
            let msg = format!(
                "protocol version {} is not supported (this host speaks {})",
                hello.version,
                wire::VERSION
            );
            self.refuse(p, Reason::Version, &msg);
            return Progress::Gone;
        }
        if hello.host_id == self.host_id {
            self.refuse(p, Reason::Protocol, "a host cannot open channels to itself");
            return Progress::Gone;
        }
        let claimed = hello.listen.ip().to_canonical();
        let src = p.from.ip().to_canonical();
        if !claimed.is_unspecified() && claimed.is_ipv4() == src.is_ipv4() && claimed != src {
            let msg = format!("HELLO claims the host listens on {claimed} but the channel comes from {src}");
            self.refuse(p, Reason::Protocol, &msg);
            return Progress::Gone;
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
                if !send(&mut p.stream, &ok) {
                    return Progress::Gone;
                }
                p.step = Step::Verdict { hello };
                self.try_admit(p)
            }
            Some(key) => {
                if hello.nonce == [0; 16] {
                    self.refuse(
                        p,
                        Reason::Auth,
                        "this host requires authenticated channels: configure the same auth_key_file",
                    );
                    return Progress::Gone;
                }
                let Ok(acceptor) = p.stream.local_addr() else { return Progress::Gone };
                let transcript = auth::Transcript {
                    hello,
                    acceptor_version: wire::VERSION,
                    acceptor_id: self.host_id,
                    na: auth::nonce(),
                    dialer: p.from,
                    acceptor,
                };
                let proof = auth::acceptor_proof(key, &transcript);
                Frame::HelloOk(HelloOk {
                    version: wire::VERSION,
                    host_id: self.host_id,
                    proof,
                    nonce: transcript.na,
                })
                .encode(&mut ok);
                if !send(&mut p.stream, &ok) {
                    return Progress::Gone;
                }
                p.step = Step::Auth { hello, transcript };
                Progress::Wait
            }
        }
    }

    /// The handshake is complete: join the channel to its peer's mesh, unless a peer with
    /// another host id still has live channels from this address (wait), or the caps on
    /// accepted peers are reached (refuse).
    fn try_admit(self: &Arc<Self>, p: &mut Pending) -> Progress {
        let Step::Verdict { hello } = p.step else { return Progress::Wait };
        let key = SocketAddr::new(p.from.ip(), hello.listen.port());
        let peer = {
            let mut peers = self.peers.lock().unwrap();
            match peers.get(&key).cloned() {
                Some(old) if !old.is_dead() => {
                    let known = old.host_id.load(Ordering::Relaxed);
                    if known != 0 && known != hello.host_id {
                        if old.channel_count() > 0 {
                            // Not believed while its channels are up: a real restart closes
                            // them (the old process's sockets go with it). Ask them to answer.
                            for ch in old.channels() {
                                ch.push_frame(&Frame::Ping { nonce: super::random_u64() });
                            }
                            return Progress::Wait;
                        }
                        // The peer restarted: its old vsockets are gone with it.
                        drop(peers);
                        tracing::warn!("the peer host at {key} restarted (new host id, no channel of the old one left): its vsockets are reset"
                        );
                        self.retire_peer(&old, "the peer host restarted");
                        let fresh = Peer::new(key, &self.cfg, PeerState::Up);
                        self.peers.lock().unwrap().insert(key, fresh.clone());
                        fresh
                    } else {
                        old
                    }
                }
                _ => {
                    let accepted: Vec<&Arc<Peer>> =
                        peers.values().filter(|q| !q.recovery.dialer.load(Ordering::Acquire)).collect();
                    let at_ip = accepted.iter().filter(|q| q.key.ip() == key.ip()).count();
                    if accepted.len() >= MAX_ACCEPTED_PEERS || at_ip >= MAX_PEERS_PER_IP {
                        let msg = format!(
                            "too many peer hosts ({} accepted, {at_ip} at {}; at most {MAX_ACCEPTED_PEERS}, {MAX_PEERS_PER_IP} per IP)",
                            accepted.len(),
                            key.ip()
                        );
                        drop(peers);
                        self.refuse(p, Reason::Other(0), &msg);
                        return Progress::Gone;
                    }
                    let q = Peer::new(key, &self.cfg, PeerState::Up);
                    peers.insert(key, q.clone());
                    q
                }
            }
        };
        peer.host_id.store(hello.host_id, Ordering::Relaxed);
        Progress::Admit { peer, class: hello.class, index: hello.index }
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

/// Write a whole handshake frame to a non-blocking socket. A handshake writes a few hundred
/// bytes into a fresh connection's send buffer, so a write that would block means the peer
/// is not reading: give it up.
fn send(s: &mut mio::net::TcpStream, mut buf: &[u8]) -> bool {
    while !buf.is_empty() {
        match s.write(buf) {
            Ok(0) => return false,
            Ok(k) => buf = &buf[k..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    true
}

fn mio_to_std(s: mio::net::TcpStream) -> TcpStream {
    use std::os::fd::{FromRawFd, IntoRawFd};
    let fd = s.into_raw_fd();
    // SAFETY: fd was just released by the mio stream, which owned it.
    unsafe { TcpStream::from_raw_fd(fd) }
}
