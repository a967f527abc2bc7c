//! The engine's vsockets: one byte stream each way between two hosts, its rings, its
//! sans-IO stream states, and what app threads and channel workers do to them (the public
//! API over them, `VStream`/`VListener`, is `crate::vsock`).
//!
//! A vsocket is one byte stream in each direction between two hosts. Its bytes live in two
//! rings (send and receive); its progress in the sans-IO [`TxState`]/[`RxState`]. The
//! application thread copies into and out of the rings (with the copy workers for large
//! calls); channel workers copy segments out of the send ring and arriving segments into the
//! receive ring. Who may touch which ring bytes when:
//!
//! * send ring: the writing app thread owns `[written, acked + cap)` while it holds no lock;
//!   channel workers read `[acked, written)` only while holding the `tx` lock, and `acked`
//!   only moves under that lock.
//! * receive ring: channel readers write new, never-received ranges in `[in_order, granted)`
//!   that they claimed under the `rx` lock (`RxState::claim`) and write without it — a
//!   DATA payload read straight from its channel's socket, or copied there — until they
//!   complete or release the claim, again under the lock; a segment repeating bytes already
//!   here has its new parts copied under the lock. The reading app thread reads
//!   `[consumed, in_order)` as it saw them under the lock, and `consumed` only moves under
//!   the lock after the copy.

use std::collections::VecDeque;
use std::io::{self, ErrorKind};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use crate::copy::CopyTask;
use crate::engine::channel::{read_inline, InlineTarget, OutFrame, Sleeping};
use crate::engine::peer::Peer;
use crate::engine::HostInner;
use crate::proto::stream::{Credit, RxState, TxState};
use crate::proto::ProtoError;
use crate::readiness::{LazyReadiness, Readiness, TaskWakers};
use crate::ring::Ring;
use crate::wire::{self, Class, Frame, Reason, HEADER_LEN};

/// Most segment bytes one `pump` of a latency-class vsocket writes to channels from the
/// calling thread; beyond this the channel workers write them.
pub(crate) const INLINE_MAX: usize = 16 << 10;
/// Largest piece of one write copied into the send ring before segments start to flow.
const WRITE_PIECE: usize = 1 << 20;

type Failure = Option<(ErrorKind, String)>;

pub(crate) struct TxSide {
    pub(crate) st: TxState,
    pub(crate) opened: bool,
    /// An optimistic connect (`Host::connect_optimistic`): writable before OPEN_OK, within
    /// the open credit.
    pub(crate) optimistic: bool,
    /// Stream bytes (from offset 0) its OPEN carried, sent again with a re-sent OPEN.
    open_payload: u32,
    pub(crate) error: Failure,
    closed: bool,
    pub(crate) waiting: bool,
}

pub(crate) struct RxSide {
    st: RxState,
    error: Failure,
    closed: bool,
    pub(crate) shut_read: bool,
    waiting: bool,
    /// Segments that arrived over a range claimed by another channel's reader
    /// ([`RxState::claim`]; a copy sent again after a channel died): offset, ack request and
    /// payload, taken in once no claim overlaps them.
    deferred: Vec<(u64, bool, Vec<u8>)>,
}

/// One vsocket's engine-side state.
pub(crate) struct VSock {
    pub id: u32,
    pub peer: Arc<Peer>,
    pub(crate) class: AtomicU8,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub(crate) owns_port: bool,
    remote_id: AtomicU32,
    /// The key of this vsocket's home channel (`proto::sched::home`): the id of its
    /// connecting end, so that both hosts send its control frames and small segments on the
    /// same channel. The accepting host sets it (to the OPEN's source id) before the
    /// vsocket is shared.
    pub(crate) home: u32,
    host: Weak<HostInner>,
    seg_size: u32,
    pub(crate) tx: Mutex<TxSide>,
    pub(crate) tx_cv: Condvar,
    pub(crate) rx: Mutex<RxSide>,
    pub(crate) rx_cv: Condvar,
    /// Bumped whenever a reader may have something new to see (data in order, FIN, error):
    /// what a latency-class reader spins on before it sleeps.
    pub(crate) rx_events: AtomicU64,
    tx_ring: Ring,
    rx_ring: Ring,
    write_lock: Mutex<()>,
    read_lock: Mutex<()>,
    pub(crate) nonblocking: AtomicBool,
    pub(crate) timeouts: Mutex<(Option<Duration>, Option<Duration>)>,
    retired: AtomicBool,
    /// Shared memory of a vsocket served to an app process by the daemon: the rings live in
    /// it, and the stream positions are mirrored in its header (`crate::shm`).
    pub(crate) shm: Option<Arc<crate::shm::Region>>,
    /// The host's counters, held directly so the data path never upgrades `host`.
    totals: Arc<crate::engine::Totals>,
    /// The pollable descriptor, once an application asked for it (`crate::readiness`).
    pub(crate) ready: LazyReadiness,
    /// Async tasks waiting until a read, or a write, would not block (`crate::readiness`).
    pub(crate) read_tasks: TaskWakers,
    pub(crate) write_tasks: TaskWakers,
    /// An app thread waiting for this vsocket reads its home channel itself
    /// (`engine::channel::read_inline`), to be kicked when what it waits for comes by
    /// another way (another channel, a local shutdown).
    inline: InlineWaiter,
    /// An optimistic connect whose OPEN is not sent yet: it goes with the first write, or
    /// bare when the app reads, shuts down or closes first ([`VSock::send_deferred_open`]).
    pub(crate) open_deferred: AtomicBool,
    /// The accepting end of an optimistic open owes its OPEN_OK: it leaves in the same write
    /// as this vsocket's first frame (the response, usually), or alone when the app would
    /// wait for more, so the opener is not woken by an answer it does not wait for.
    open_ok_deferred: AtomicBool,
    /// The peer's application has closed the vsocket (its FIN said so, [`wire::FLAG_CLOSED`]).
    peer_closed: AtomicBool,
}

thread_local! {
    /// This thread's eventfd for reading channels inline, created on first use and kept
    /// open (through the `Arc` a vsocket may still hold) until nobody can write it.
    static INLINE_KICK: std::cell::OnceCell<Option<Arc<OwnedFd>>> = const { std::cell::OnceCell::new() };
}

/// This thread's eventfd for reading channels inline; `None` if none can be created.
fn inline_kick() -> Option<Arc<OwnedFd>> {
    INLINE_KICK.with(|c| {
        c.get_or_init(|| {
            // SAFETY: plain eventfd creation; the descriptor is owned at once.
            let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
            // SAFETY: a fresh descriptor that nobody else owns.
            (fd >= 0).then(|| Arc::new(unsafe { OwnedFd::from_raw_fd(fd) }))
        })
        .clone()
    })
}

/// The app thread that waits for a vsocket or an accept queue by reading channels itself
/// (`engine::channel::read_inline`): its eventfd, which whoever delivers what it waits for
/// by another way (a channel worker, another thread, a local close) writes.
#[derive(Default)]
pub(crate) struct InlineWaiter {
    armed: AtomicBool,
    fd: Mutex<Option<Arc<OwnedFd>>>,
}

impl InlineWaiter {
    /// Run the inline wait `f` with this thread's eventfd (passed to `f`) published; `None`
    /// (nothing run) if the thread has no eventfd.
    fn during<T>(&self, f: impl FnOnce(RawFd) -> T) -> Option<T> {
        let kick = inline_kick()?;
        *self.fd.lock().unwrap() = Some(kick.clone());
        self.armed.store(true, Ordering::SeqCst);
        let r = f(kick.as_raw_fd());
        self.armed.store(false, Ordering::SeqCst);
        *self.fd.lock().unwrap() = None;
        Some(r)
    }

    /// Wake the waiting thread, if any, unless it is the calling one (which looks at what
    /// it waits for after each frame it dispatches). The caller changed that state first.
    fn kick(&self) {
        if !self.armed.load(Ordering::SeqCst) {
            return;
        }
        let w = self.fd.lock().unwrap();
        if let Some(fd) = w.as_ref() {
            let mine =
                INLINE_KICK.with(|c| c.get().and_then(|m| m.as_ref()).is_some_and(|m| Arc::ptr_eq(m, fd)));
            if !mine {
                let one = 1u64;
                // SAFETY: writes 8 bytes from a live u64 to an eventfd that the Arc keeps open.
                unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
            }
        }
    }
}

/// A snapshot of one vsocket, for `netchannel status`.
#[derive(Debug, Clone)]
pub struct VsockInfo {
    /// The engine's id of the vsocket.
    pub id: u32,
    /// This end's address.
    pub local: SocketAddr,
    /// The peer's address.
    pub remote: SocketAddr,
    /// Traffic class.
    pub class: Class,
    /// Bytes the application wrote.
    pub bytes_sent: u64,
    /// Bytes the peer acknowledged.
    pub bytes_acked: u64,
    /// Bytes received in order.
    pub bytes_received: u64,
    /// Bytes the application read.
    pub bytes_read: u64,
    /// `connecting`, `open`, `fin-sent`, `fin-received`, `closing`, `failed: …`.
    pub state: String,
}

fn err(kind: ErrorKind, msg: impl Into<String>) -> io::Error {
    io::Error::new(kind, msg.into())
}

impl VSock {
    /// The span of work done for this vsocket: its id and both ends as fields.
    pub(crate) fn span(&self) -> tracing::Span {
        tracing::error_span!("vsocket", id = self.id, local = %self.local, remote = %self.remote)
    }

    /// A new vsocket; on a host with shared rings, in `region` (a daemon app's recycled
    /// one, `crate::daemon::regions`) or else in a new region.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        host: &Arc<HostInner>,
        id: u32,
        peer: Arc<Peer>,
        class: Class,
        local: SocketAddr,
        remote: SocketAddr,
        peer_credit: u64,
        region: Option<Arc<crate::shm::Region>>,
    ) -> io::Result<Arc<VSock>> {
        let cfg = &host.cfg;
        let shm = match region {
            Some(r) if host.shm_rings => Some(r),
            _ if host.shm_rings => {
                Some(Arc::new(crate::shm::Region::create(cfg.send_buffer, cfg.recv_buffer)?))
            }
            _ => None,
        };
        let (tx_ring, rx_ring) = match &shm {
            Some(r) => (Ring::in_region(r, true), Ring::in_region(r, false)),
            None => (host.rings.take(cfg.send_buffer), host.rings.take(cfg.recv_buffer)),
        };
        Ok(Arc::new(VSock {
            id,
            peer,
            class: AtomicU8::new(class as u8),
            local,
            remote,
            owns_port: false,
            remote_id: AtomicU32::new(0),
            home: id,
            host: Arc::downgrade(host),
            seg_size: cfg.segment_size as u32,
            tx: Mutex::new(TxSide {
                st: TxState::new(cfg.send_buffer as u64, peer_credit),
                opened: peer_credit > 0,
                optimistic: false,
                open_payload: 0,
                error: None,
                closed: false,
                waiting: false,
            }),
            tx_cv: Condvar::new(),
            rx: Mutex::new(RxSide {
                st: RxState::new(cfg.recv_buffer as u64),
                error: None,
                closed: false,
                shut_read: false,
                waiting: false,
                deferred: Vec::new(),
            }),
            rx_cv: Condvar::new(),
            rx_events: AtomicU64::new(0),
            tx_ring,
            rx_ring,
            write_lock: Mutex::new(()),
            read_lock: Mutex::new(()),
            nonblocking: AtomicBool::new(false),
            timeouts: Mutex::new((None, None)),
            retired: AtomicBool::new(false),
            shm,
            totals: host.totals.clone(),
            ready: LazyReadiness::default(),
            read_tasks: TaskWakers::default(),
            write_tasks: TaskWakers::default(),
            inline: InlineWaiter::default(),
            open_deferred: AtomicBool::new(false),
            open_ok_deferred: AtomicBool::new(false),
            peer_closed: AtomicBool::new(false),
        }))
    }

    /// A reader may see something new (data in order, end of stream, an error, an open):
    /// count it, and wake the thread reading a channel inline for this vsocket, unless it is
    /// the calling thread (it looks at the count after each frame it dispatches).
    pub(crate) fn rx_event(&self) {
        self.rx_events.fetch_add(1, Ordering::SeqCst);
        self.inline.kick();
    }

    /// Instead of sleeping until `done()`, read this vsocket's home channel from this thread
    /// (`engine::channel::read_inline`) when its worker is not reading it: the frame that
    /// ends the wait then wakes this thread alone. Returns `false` if it did not (the caller
    /// sleeps as usual). The caller holds none of this vsocket's locks.
    pub(crate) fn wait_inline(&self, deadline: Option<Instant>, done: impl Fn() -> bool) -> bool {
        let Some(host) = self.host() else { return false };
        if !host.cfg.inline_read {
            return false;
        }
        let Some(ch) = self.peer.control_channel(self.class(), self.home) else { return false };
        let target = InlineTarget::Channel(&ch);
        self.inline.during(|kick| read_inline(&host, target, kick, deadline, done)).unwrap_or(false)
    }

    /// Give this vsocket's home channel back to its worker if an inline read left it
    /// parked (`engine::channel::park`): a thread about to wait for something else the
    /// channel carries (credit, acknowledgements) must not wait on a channel nobody polls.
    pub(crate) fn unpark_home(&self) {
        let Some(host) = self.host() else { return };
        if !host.parking.any() {
            return;
        }
        if let Some(ch) = self.peer.control_channel(self.class(), self.home) {
            crate::engine::channel::unpark(&host, &ch, Duration::ZERO);
        }
    }

    /// The shared memory of a daemon-served vsocket.
    pub(crate) fn region(&self) -> Option<&Arc<crate::shm::Region>> {
        self.shm.as_ref()
    }

    /// A snapshot for status reports.
    pub(crate) fn info(&self) -> VsockInfo {
        let tx = self.tx.lock().unwrap();
        let rx = self.rx.lock().unwrap();
        let state = if let Some((_, m)) = tx.error.as_ref().or(rx.error.as_ref()) {
            format!("failed: {m}")
        } else if !tx.opened {
            "connecting".into()
        } else if tx.closed && rx.closed {
            "closing".into()
        } else if tx.st.is_shutdown() {
            "fin-sent".into()
        } else if rx.st.fin().is_some() {
            "fin-received".into()
        } else {
            "open".into()
        };
        VsockInfo {
            id: self.id,
            local: self.local,
            remote: self.remote,
            class: self.class(),
            bytes_sent: tx.st.written(),
            bytes_acked: tx.st.acked(),
            bytes_received: rx.st.in_order(),
            bytes_read: rx.st.consumed(),
            state,
        }
    }

    /// Take in what the app of a daemon-served vsocket did through the shared header: bytes
    /// written (segments then flow), bytes read (credit may then be due), half close.
    /// Returns whether the app has closed the vsocket. An impossible position (the app
    /// claims to have written past its buffer, or read what never arrived) is an error that
    /// names it: the daemon then disconnects that app.
    pub(crate) fn sync_app(self: &Arc<Self>) -> Result<(bool, bool), String> {
        let Some(shm) = &self.shm else { return Ok((false, false)) };
        let h = shm.header();
        let flags = h.app_flags.load(Ordering::Acquire);
        let written = h.tx_written.load(Ordering::Acquire);
        let consumed = h.rx_consumed.load(Ordering::Acquire);
        // An app that closed with bytes unread gets its vsocket reset by the close, as TCP
        // does: no FIN first (the peer would read end of stream before the reset).
        let aborting = flags & crate::shm::CLOSED != 0 && {
            let rx = self.rx.lock().unwrap();
            rx.error.is_none() && consumed < rx.st.in_order()
        };
        let mut pump = false;
        {
            let mut tx = self.tx.lock().unwrap();
            let cur = tx.st.written();
            if written < cur || written - tx.st.acked() > self.tx_ring.capacity() as u64 {
                return Err(format!(
                    "the app moved its write position to {written} (was {cur}, acknowledged {}, buffer {})",
                    tx.st.acked(),
                    self.tx_ring.capacity()
                ));
            }
            if written > cur {
                if tx.st.is_shutdown() {
                    return Err("the app wrote after shutting down writing".into());
                }
                tx.st.commit(written - cur);
                self.totals.bytes_sent.fetch_add(written - cur, Ordering::Relaxed);
                pump = true;
            }
            if flags & (crate::shm::SHUT_WR | crate::shm::CLOSED) != 0 && !tx.st.is_shutdown() && !aborting {
                tx.st.shutdown();
                pump = true;
            }
        }
        if pump {
            self.pump_from(true);
        }
        let moved_tx = pump;
        let mut moved_rx = false;
        let credit = {
            let mut rx = self.rx.lock().unwrap();
            let cur = rx.st.consumed();
            if consumed < cur || consumed > rx.st.in_order() {
                return Err(format!(
                    "the app moved its read position to {consumed} (was {cur}, received {})",
                    rx.st.in_order()
                ));
            }
            if consumed > cur {
                moved_rx = true;
                rx.st.consume(consumed - cur);
                if rx.error.is_none() {
                    rx.st.credit_due()
                } else {
                    None
                }
            } else {
                None
            }
        };
        self.send_credit(credit);
        Ok((flags & crate::shm::CLOSED != 0, moved_tx || moved_rx))
    }

    pub(crate) fn set_remote_id(&self, id: u32) {
        self.remote_id.store(id, Ordering::Release);
    }

    pub(crate) fn remote_id(&self) -> u32 {
        self.remote_id.load(Ordering::Acquire)
    }

    pub(crate) fn host(&self) -> Option<Arc<HostInner>> {
        self.host.upgrade()
    }

    /// The traffic class: which channels carry this vsocket's frames.
    pub(crate) fn class(&self) -> Class {
        if self.class.load(Ordering::Relaxed) == Class::Latency as u8 {
            Class::Latency
        } else {
            Class::Throughput
        }
    }

    fn send_control(&self, f: &Frame<'_>) {
        match self.take_open_ok() {
            Some(ok) => self.peer.send_controls(self.class(), self.home, &[ok, f.clone()]),
            None => self.peer.send_control(self.class(), self.home, f),
        };
    }

    /// Hold this (accepting) vsocket's OPEN_OK back until its first frame or until its app
    /// would wait ([`VSock::open_ok_deferred`]).
    pub(crate) fn defer_open_ok(&self) {
        self.open_ok_deferred.store(true, Ordering::Release);
    }

    /// The OPEN_OK still owed, if any (taking it: it is sent once).
    pub(crate) fn take_open_ok(&self) -> Option<Frame<'static>> {
        if !self.open_ok_deferred.swap(false, Ordering::AcqRel) {
            return None;
        }
        let credit = self.host().map_or(0, |h| h.cfg.recv_buffer as u64);
        Some(Frame::OpenOk { vsock: self.remote_id(), src_vsock: self.id, credit })
    }

    /// Send a CREDIT computed by [`RxState::credit_due`], if one is due.
    fn send_credit(&self, credit: Option<Credit>) {
        if let Some(c) = credit {
            self.send_control(&self.credit_frame(c));
        }
    }

    fn credit_frame(&self, c: Credit) -> Frame<'static> {
        Frame::Credit {
            vsock: self.remote_id(),
            received: c.received,
            limit: c.limit,
            fin_received: c.fin_received,
        }
    }

    /// The DATA header and the send-ring parts of the queued segment `[offset, offset + len)`:
    /// only the part not yet acknowledged; `None` if nothing is left to send.
    ///
    /// The parts stay valid for reading while the caller holds an `Arc` of this vsocket. The
    /// application rewrites those ring bytes only once `acked` has passed them, that is once
    /// the peer holds them already: a copy still in flight then is a duplicate that the
    /// receiver discards by offset, whatever bytes it carries.
    pub(crate) fn segment_view(
        &self,
        offset: u64,
        len: u32,
        ack_request: bool,
    ) -> Option<([u8; HEADER_LEN], [crate::ring::RawPart; 2])> {
        let tx = self.tx.lock().unwrap();
        if tx.error.is_some() {
            return None;
        }
        let (o, l) = tx.st.clip(offset, len)?;
        let mut head = [0u8; HEADER_LEN];
        wire::encode_data_header(&mut head, self.remote_id(), o, l, ack_request);
        Some((head, self.tx_ring.parts(o, l as usize)))
    }

    /// Hand every segment that data and credit allow to channels; send FIN when due.
    ///
    /// A latency-class vsocket's small sends (at most [`INLINE_MAX`] bytes) are written to
    /// the channel from this thread, sparing a hand-off to a channel worker. Everything else
    /// is left to the channel workers, so that one app thread's bulk spreads over several
    /// cores and back-to-back small messages are batched into few syscalls.
    pub(crate) fn pump(self: &Arc<Self>) {
        self.pump_from(false)
    }

    /// [`VSock::pump`]; `poller` says the daemon's doorbell poller calls it (taking in an
    /// app's writes), which then sends small messages itself instead of waking a worker.
    fn pump_from(self: &Arc<Self>, poller: bool) {
        if self.open_deferred.load(Ordering::Acquire) {
            return self.send_deferred_open();
        }
        let tx = self.tx.lock().unwrap();
        self.pump_locked(tx, poller)
    }

    /// [`VSock::pump_from`] with the tx lock already held (a write that has just committed
    /// its bytes pumps them under the same lock) and no deferred OPEN to send.
    fn pump_locked(self: &Arc<Self>, mut tx: MutexGuard<'_, TxSide>, poller: bool) {
        if tx.error.is_some() || !tx.opened {
            return;
        }
        let class = self.class();
        // An OPEN_OK still owed goes first, in the same write as what this pump sends.
        let open_ok = self.take_open_ok().and_then(|ok| {
            let ch = self.peer.control_channel(class, self.home)?;
            ch.enqueue_frame(&ok);
            Some(ch)
        });
        let mut parked = false;
        // The channels used, each with whether it was idle before this pump (`Channel::idle`).
        let mut used: Vec<(Arc<crate::engine::channel::Channel>, bool)> = Vec::new();
        let mut bytes = 0usize;
        // Whether every segment of this pump is among the stream's first INLINE_MAX bytes.
        let mut opening = true;
        while let Some(seg) = tx.st.next_segment(self.seg_size) {
            // The first bytes of a stream stay on the home channel, beside the vsocket's
            // control frames: a short-lived vsocket then touches one channel.
            let small = seg.offset + u64::from(seg.len) <= INLINE_MAX as u64;
            opening &= small;
            let ch = match self.peer.pick_segment_channel(class, self.home, small) {
                Some(ch) => ch,
                None if !parked => {
                    // Park, then look once more so a channel that drained meanwhile is not missed.
                    self.peer.park(self);
                    parked = true;
                    match self.peer.pick_segment_channel(class, self.home, small) {
                        Some(ch) => ch,
                        None => {
                            tx.st.unsend(seg);
                            break;
                        }
                    }
                }
                None => {
                    tx.st.unsend(seg);
                    break;
                }
            };
            if !used.iter().any(|(c, _)| Arc::ptr_eq(c, &ch)) {
                let idle = ch.idle();
                used.push((ch.clone(), idle));
            }
            ch.enqueue(OutFrame::Segment {
                vs: self.clone(),
                offset: seg.offset,
                len: seg.len,
                ack_request: seg.ack_request,
            });
            bytes += seg.len as usize;
        }
        let fin = tx.st.take_fin();
        drop(tx);
        if !opening && class == Class::Throughput {
            self.totals.saw_bulk();
        }
        if let Some(ch) = open_ok {
            if fin.is_none() && !used.iter().any(|(c, _)| Arc::ptr_eq(c, &ch)) {
                ch.send_now();
            }
        }
        for (ch, idle) in used {
            if class == Class::Latency && bytes <= INLINE_MAX {
                ch.send_now();
            } else if (poller || (idle && opening)) && bytes <= INLINE_MAX {
                // The first small send of a stream on a channel that had nothing queued (a
                // request on a new vsocket), or the daemon's poller pumping an app's writes,
                // goes out from this thread at once instead of waking a channel worker.
                // Later sends are left to the worker, which batches back-to-back messages
                // into few writes: written inline each, 4 KiB messages went 380k -> 140k/s.
                ch.send_small_now();
            } else {
                ch.kick();
            }
        }
        if let Some(offset) = fin {
            // An acknowledgement of the peer's FIN held back for this FIN leaves in the
            // same write.
            let (held, closed) = {
                let mut rx = self.rx.lock().unwrap();
                (rx.st.credit_due(), rx.closed)
            };
            let fin = Frame::Fin { vsock: self.remote_id(), offset, closed };
            let frames: Vec<Frame<'_>> =
                held.map(|c| self.credit_frame(c)).into_iter().chain([fin]).collect();
            if self.peer_closed.load(Ordering::Acquire) && !self.open_ok_deferred.load(Ordering::Acquire) {
                // The peer's app has closed: nobody there waits for this FIN.
                self.peer.send_controls_lazy(self.class(), self.home, &frames);
            } else {
                self.peer.send_controls(self.class(), self.home, &frames);
            }
        }
    }

    /// A DATA segment arrived (protocol errors reset the vsocket, not the channel).
    ///
    /// A segment that is all new is claimed ([`RxState::claim`]) and copied into the receive
    /// ring without the rx lock, so that neither the reading app nor another channel's
    /// worker waits for the copy; one that repeats bytes already here (a copy sent again
    /// after a channel died) has its new parts copied under the lock.
    pub(crate) fn on_data(self: &Arc<Self>, offset: u64, payload: &[u8], ack_request: bool) {
        let len = payload.len() as u64;
        let mut rx = self.rx.lock().unwrap();
        if rx.error.is_some() {
            return;
        }
        if rx.closed {
            // A copy of bytes already received, re-sent after a channel died: nothing new.
            if offset.saturating_add(len) <= rx.st.in_order() {
                return;
            }
            // The application closed this vsocket; new data still arriving is refused as TCP does.
            drop(rx);
            self.reset(Reason::Closed, "data arrived after the vsocket was closed");
            return;
        }
        if rx.st.overlaps_claim(offset, len) {
            // Another channel's reader is filling (part of) this range: take it in after.
            rx.deferred.push((offset, ack_request, payload.to_vec()));
            return;
        }
        match rx.st.claim(offset, len) {
            Ok(true) => {
                drop(rx);
                // SAFETY: [offset, offset + len) is claimed by this call: nobody else writes
                // it and no reader looks at it before `finish_rx` (module docs).
                unsafe { self.rx_ring.write(offset, payload) };
                self.finish_rx(offset, payload.len() as u32, ack_request);
                return;
            }
            Ok(false) => {}
            Err(e) => {
                drop(rx);
                self.protocol_error(e);
                return;
            }
        }
        let before = rx.st.in_order();
        let ring = &self.rx_ring;
        let res = rx.st.on_data(offset, len, ack_request, |s, e| {
            let from = (s - offset) as usize;
            let to = (e - offset) as usize;
            // SAFETY: [s, e) is new, unclaimed and within [in_order, granted): no reader looks
            // at it and other writers are excluded by the rx lock (module docs).
            unsafe { ring.write(s, &payload[from..to]) };
        });
        if let Err(e) = res {
            drop(rx);
            self.protocol_error(e);
            return;
        }
        self.arrived(rx, before);
    }

    /// Claim the DATA segment `[offset, offset + len)` for the channel reader about to read
    /// its payload straight into the receive ring; the ring's parts to read it into, or
    /// `None` (nothing claimed: the reader reads the frame whole and dispatches it) if the
    /// vsocket failed or closed, or the segment is not all new. The reader then calls
    /// [`VSock::finish_rx`] or [`VSock::release_rx`].
    pub(crate) fn claim_rx(&self, offset: u64, len: u32) -> Option<[crate::ring::RawPart; 2]> {
        let mut rx = self.rx.lock().unwrap();
        if rx.error.is_some() || rx.closed || !matches!(rx.st.claim(offset, u64::from(len)), Ok(true)) {
            return None;
        }
        Some(self.rx_ring.parts(offset, len as usize))
    }

    /// The receive ring's parts holding `[offset, offset + len)`.
    pub(crate) fn rx_parts(&self, offset: u64, len: usize) -> [crate::ring::RawPart; 2] {
        self.rx_ring.parts(offset, len)
    }

    /// The claimed segment `[offset, offset + len)` ([`VSock::claim_rx`]) is in the receive
    /// ring: it arrived.
    pub(crate) fn finish_rx(self: &Arc<Self>, offset: u64, len: u32, ack_request: bool) {
        let mut rx = self.rx.lock().unwrap();
        if rx.error.is_some() || rx.closed {
            rx.st.release(offset, u64::from(len));
            let closed = rx.error.is_none();
            let deferred = self.take_deferred(&mut rx);
            drop(rx);
            if closed {
                self.reset(Reason::Closed, "data arrived after the vsocket was closed");
            }
            self.take_in(deferred);
            return;
        }
        let before = rx.st.in_order();
        if let Err(e) = rx.st.complete(offset, u64::from(len), ack_request) {
            drop(rx);
            self.protocol_error(e);
            return;
        }
        self.arrived(rx, before);
    }

    /// The claimed segment `[offset, offset + len)` did not arrive whole (its channel died):
    /// its bytes come again by the sender's recovery.
    pub(crate) fn release_rx(self: &Arc<Self>, offset: u64, len: u32) {
        let mut rx = self.rx.lock().unwrap();
        rx.st.release(offset, u64::from(len));
        let deferred = self.take_deferred(&mut rx);
        drop(rx);
        self.take_in(deferred);
    }

    /// The deferred segments that no claim overlaps any more.
    fn take_deferred(&self, rx: &mut RxSide) -> Vec<(u64, bool, Vec<u8>)> {
        if rx.deferred.is_empty() {
            return Vec::new();
        }
        let (ready, wait) = std::mem::take(&mut rx.deferred)
            .into_iter()
            .partition(|(o, _, p)| !rx.st.overlaps_claim(*o, p.len() as u64));
        rx.deferred = wait;
        ready
    }

    fn take_in(self: &Arc<Self>, deferred: Vec<(u64, bool, Vec<u8>)>) {
        for (offset, ack_request, payload) in deferred {
            self.on_data(offset, &payload, ack_request);
        }
    }

    /// Bytes arrived (the in-order point was `before`): tell the reader, send the credit due
    /// and take in the deferred segments no claim holds back any more.
    fn arrived(self: &Arc<Self>, mut rx: MutexGuard<'_, RxSide>, before: u64) {
        let after = rx.st.in_order();
        if after > before {
            self.rx_event();
            self.totals.bytes_received.fetch_add(after - before, Ordering::Relaxed);
            if after > INLINE_MAX as u64 && self.class() == Class::Throughput {
                self.totals.saw_bulk();
            }
            if let Some(shm) = &self.shm {
                shm.header().rx_in_order.store(after, Ordering::Release);
            }
            if rx.waiting {
                self.rx_cv.notify_all();
            }
        }
        let credit = rx.st.credit_due();
        let deferred = self.take_deferred(&mut rx);
        drop(rx);
        if after > before {
            // Outside the rx lock: a readiness proxy's token is a system call (and a wake-up
            // of the app), which another channel's worker delivering to this vsocket need
            // not wait for.
            if let Some(shm) = &self.shm {
                if shm.ring_app() {
                    watch_for_reply(self);
                }
            }
            self.wake_pollers();
        }
        self.send_credit(credit);
        self.take_in(deferred);
    }

    /// A CREDIT arrived.
    pub(crate) fn on_credit(self: &Arc<Self>, received: u64, limit: u64, fin_received: bool) {
        let mut tx = self.tx.lock().unwrap();
        match tx.st.on_credit_frame(received, limit, fin_received) {
            Err(e) => {
                drop(tx);
                self.protocol_error(e);
                return;
            }
            Ok(freed) => {
                if freed {
                    if let Some(shm) = &self.shm {
                        shm.header().tx_acked.store(tx.st.acked(), Ordering::Release);
                        shm.ring_app();
                    }
                    if tx.waiting {
                        self.tx_cv.notify_all();
                    }
                }
            }
        }
        drop(tx);
        self.wake_writers();
        self.pump();
        self.maybe_retire();
    }

    pub(crate) fn on_open_ok(self: &Arc<Self>, remote: u32, credit: u64) {
        let mut tx = self.tx.lock().unwrap();
        if tx.opened || tx.error.is_some() {
            return;
        }
        self.set_remote_id(remote);
        tx.opened = true;
        let _ = tx.st.on_credit(0, credit);
        // Only a sleeping connect (or writer) needs the futex wake.
        if tx.waiting {
            self.tx_cv.notify_all();
        }
        drop(tx);
        if let Some(shm) = &self.shm {
            // A shim's non-blocking connect keeps its descriptor not writable until now.
            shm.header().state.fetch_and(!crate::shm::OPENING, Ordering::SeqCst);
            shm.ring_app();
        }
        // A connect waiting inline for this answer looks at the event count.
        self.rx_event();
        self.totals.vsockets_opened.fetch_add(1, Ordering::Relaxed);
        self.wake_writers();
        // Bytes written (or a close) while connecting go out now; a vsocket whose owner
        // dropped it while connecting sends its FIN and then leaves the table.
        self.pump();
        self.maybe_retire();
    }

    pub(crate) fn on_refused(&self, reason: Reason) {
        let msg = match reason {
            Reason::NoListener => format!(
                "connection refused: no vsocket listener on port {} at {}",
                self.remote.port(),
                self.remote.ip()
            ),
            other => format!("connection refused by {}: {other}", self.remote),
        };
        self.fail(ErrorKind::ConnectionRefused, msg);
    }

    /// The peer's FIN arrived.
    ///
    /// `closed`: the peer's application has closed the vsocket ([`wire::FLAG_CLOSED`]), so
    /// this end's FIN, when its app closes too, wakes nobody there and may wait for the next
    /// write on its channel.
    pub(crate) fn on_fin(self: &Arc<Self>, offset: u64, closed: bool) {
        if closed {
            self.peer_closed.store(true, Ordering::Release);
        }
        // While this side has not shut down, its own FIN (on close or shutdown) will carry the
        // acknowledgement: one write and one arrival fewer where both ends close, as in TCP.
        let hold = {
            let tx = self.tx.lock().unwrap();
            !tx.st.is_shutdown() && tx.error.is_none()
        };
        let mut rx = self.rx.lock().unwrap();
        if let Err(e) = rx.st.on_fin(offset) {
            drop(rx);
            self.protocol_error(e);
            return;
        }
        self.rx_event();
        if rx.waiting {
            self.rx_cv.notify_all();
        }
        if let Some(shm) = &self.shm {
            shm.header().rx_fin.store(offset, Ordering::Relaxed);
            shm.header().state.fetch_or(crate::shm::FIN, Ordering::Release);
            shm.ring_app();
        }
        let credit = if hold { rx.st.credit_due_holding_fin() } else { rx.st.credit_due() };
        drop(rx);
        self.wake_pollers();
        match credit {
            // This side had shut down already: the CREDIT acknowledges the peer's FIN, which
            // only lets the peer's vsocket leave its table (its app sent FIN, so it writes no
            // more and waits for no credit). It leaves with the next write on the channel.
            Some(c) if !hold && !self.open_ok_deferred.load(Ordering::Acquire) => {
                self.peer.send_controls_lazy(self.class(), self.home, &[self.credit_frame(c)]);
            }
            _ => self.send_credit(credit),
        }
        if hold && self.tx.lock().unwrap().st.is_shutdown() {
            // Shut down meanwhile: its FIN may have left before this FIN was recorded.
            let credit = self.rx.lock().unwrap().st.credit_due();
            self.send_credit(credit);
        }
        self.maybe_retire();
    }

    pub(crate) fn on_reset(&self, reason: Reason, message: &str) {
        let msg = if message.is_empty() {
            format!("connection reset by {} ({reason})", self.remote)
        } else {
            format!("connection reset by {} ({reason}): {message}", self.remote)
        };
        self.fail(ErrorKind::ConnectionReset, msg);
    }

    /// The peer broke the protocol on this vsocket: reset it, keep the channel.
    fn protocol_error(self: &Arc<Self>, e: ProtoError) {
        let _span = self.span().entered();
        tracing::warn!(error = %e, "protocol error: the vsocket is reset");
        self.reset(Reason::Protocol, &e.to_string());
    }

    /// Send RESET to the peer, fail locally and leave the table.
    pub(crate) fn reset(self: &Arc<Self>, reason: Reason, why: &str) {
        let rid = self.remote_id();
        if rid != 0 {
            self.send_control(&Frame::Reset { vsock: rid, reason, message: why });
        }
        self.fail(ErrorKind::ConnectionAborted, format!("vsocket to {} aborted: {why}", self.remote));
        self.retire();
    }

    /// Fail both directions with `kind` (first failure wins) and wake every waiter.
    pub(crate) fn fail(&self, kind: ErrorKind, msg: String) {
        {
            let mut tx = self.tx.lock().unwrap();
            if tx.error.is_none() {
                tx.error = Some((kind, msg.clone()));
            }
        }
        {
            let mut rx = self.rx.lock().unwrap();
            if rx.error.is_none() {
                if let Some(shm) = &self.shm {
                    shm.header().set_error(kind, &msg);
                    shm.ring_app();
                }
                rx.error = Some((kind, msg));
            }
        }
        self.rx_event();
        self.tx_cv.notify_all();
        self.rx_cv.notify_all();
        self.wake_pollers();
        self.wake_writers();
    }

    /// Readers may see something new (data, end of stream, an error): wake the tasks
    /// waiting to read and open the readiness descriptor's IN gate, if there is one. Called
    /// with no vsocket lock held.
    #[inline]
    pub(crate) fn wake_pollers(&self) {
        self.read_tasks.wake();
        if let Some(r) = self.ready.get() {
            r.rx_publish(|| self.read_ready());
        }
    }

    /// Send space was freed, or writes stopped blocking (error, shutdown, open): wake the
    /// tasks waiting to write and unplug the readiness descriptor's OUT gate if it is
    /// plugged. Called with no vsocket lock held.
    #[inline]
    pub(crate) fn wake_writers(&self) {
        self.write_tasks.wake();
        if let Some(r) = self.ready.get() {
            r.tx_freed(|| self.writable_enough());
        }
    }

    /// A read would not block: data, end of stream, an error or a local read shutdown.
    pub(crate) fn read_ready(&self) -> bool {
        let rx = self.rx.lock().unwrap();
        rx.error.is_some() || rx.st.readable() > 0 || rx.st.eof() || rx.shut_read
    }

    /// A write would not block.
    pub(crate) fn write_ready(&self) -> bool {
        let tx = self.tx.lock().unwrap();
        tx.error.is_some() || tx.st.is_shutdown() || ((tx.opened || tx.optimistic) && tx.st.space() > 0)
    }

    /// The OUT gate reopens: an error, a shutdown, or a quarter of the send buffer free.
    fn writable_enough(&self) -> bool {
        let tx = self.tx.lock().unwrap();
        tx.error.is_some()
            || tx.st.is_shutdown()
            || ((tx.opened || tx.optimistic) && tx.st.space() >= (self.tx_ring.capacity() as u64 / 4).max(1))
    }

    /// The readiness descriptor, created on first use with its gates set to the vsocket's
    /// state.
    pub(crate) fn readiness(&self) -> io::Result<&Readiness> {
        self.ready.get_or_create(|r| {
            r.rx_publish(|| self.read_ready());
            if !self.write_ready() {
                let _ = r.tx_full(|| self.writable_enough());
            }
        })
    }

    /// Fail this connecting vsocket: its deadline passed without an answer.
    pub(crate) fn connect_timed_out(&self) -> io::Error {
        let t = self.host().map(|h| h.cfg.connect_timeout).unwrap_or_default();
        let msg = format!("connect to {} timed out after {t:?}", self.remote);
        self.fail(ErrorKind::TimedOut, msg.clone());
        err(ErrorKind::TimedOut, msg)
    }

    /// Whether the connect finished: `None` while waiting for the peer's answer.
    #[cfg(feature = "tokio")]
    pub(crate) fn open_result(&self) -> Option<io::Result<()>> {
        let tx = self.tx.lock().unwrap();
        if let Some((kind, msg)) = &tx.error {
            return Some(Err(err(*kind, msg.clone())));
        }
        (tx.opened || tx.optimistic).then_some(Ok(()))
    }

    /// Whether this vsocket still waits for the answer to its OPEN (no OPEN_OK, no failure).
    pub(crate) fn connecting(&self) -> bool {
        let tx = self.tx.lock().unwrap();
        self.owns_port && !tx.opened && !tx.optimistic && tx.error.is_none()
    }

    /// If this vsocket is still connecting (no OPEN_OK yet), send its OPEN again: the OPEN
    /// or its answer may have been lost with a channel. The peer answers a repeated OPEN with
    /// the same OPEN_OK. Returns whether it was connecting.
    pub(crate) fn reopen_if_connecting(&self) -> bool {
        let deferred = self.open_deferred.load(Ordering::Acquire);
        let (connecting, payload) = {
            let tx = self.tx.lock().unwrap();
            (self.owns_port && !tx.opened && tx.error.is_none(), tx.open_payload)
        };
        // An OPEN not sent yet was lost with no channel: it goes when it is due.
        if connecting && !deferred {
            if let Some(h) = self.host() {
                self.send_control(&self.open_frame(h.cfg.recv_buffer, payload));
            }
        }
        connecting
    }

    /// The OPEN frame that opens this (connecting) vsocket, carrying the first `payload`
    /// bytes of its stream (an optimistic open).
    pub(crate) fn open_frame(&self, recv_buffer: usize, payload: u32) -> Frame<'_> {
        let payload = if payload == 0 {
            &[][..]
        } else {
            let [a, _] = self.tx_ring.parts(0, payload as usize);
            // SAFETY: a part of the send ring, allocated while `self` lives. The bytes from
            // offset 0 do not wrap (the ring is larger than a segment) and stay as written
            // until acknowledged; a re-sent OPEN that carries rewritten bytes is a duplicate
            // the acceptor discards by offset (module docs).
            unsafe { std::slice::from_raw_parts(a.ptr.cast_const(), a.len) }
        };
        Frame::Open {
            src_vsock: self.id,
            src_port: self.local.port(),
            dst_port: self.remote.port(),
            class: self.class(),
            credit: recv_buffer as u64,
            payload,
        }
    }

    /// Whether this vsocket holds its OPEN or its OPEN_OK back ([`HostInner::owe_frame`]).
    pub(crate) fn owes_frame(&self) -> bool {
        self.open_deferred.load(Ordering::Acquire) || self.open_ok_deferred.load(Ordering::Acquire)
    }

    /// Send the OPEN (bare, or with what was written meanwhile) or the OPEN_OK held back.
    pub(crate) fn send_owed_frames(&self) {
        self.send_deferred_open();
        if let Some(ok) = self.take_open_ok() {
            self.peer.send_control(self.class(), self.home, &ok);
        }
    }

    /// Send an optimistic connect's deferred OPEN, with the first bytes written (at most one
    /// segment, within the open credit), or bare if nothing was written yet.
    pub(crate) fn send_deferred_open(&self) {
        if !self.open_deferred.swap(false, Ordering::AcqRel) {
            return;
        }
        let payload = {
            let mut tx = self.tx.lock().unwrap();
            if tx.error.is_some() {
                return;
            }
            let n = tx.st.next_segment(self.seg_size).map_or(0, |seg| {
                debug_assert_eq!(seg.offset, 0, "an OPEN carries the stream from its start");
                seg.len
            });
            tx.open_payload = n;
            n
        };
        if let Some(h) = self.host() {
            self.send_control(&self.open_frame(h.cfg.recv_buffer, payload));
        }
    }

    /// The stream's final offset received, if the vsocket ended cleanly: no error, its own
    /// FIN acknowledged, the peer's FIN and every byte before it received.
    pub(crate) fn clean_end(&self) -> Option<u64> {
        let tx = self.tx.lock().unwrap();
        let rx = self.rx.lock().unwrap();
        if tx.error.is_some() || rx.error.is_some() || !tx.st.finished() {
            return None;
        }
        rx.st.fin().filter(|&f| f == rx.st.in_order())
    }

    /// A channel to the peer died: send every unacknowledged byte again, re-send FIN if it
    /// may have been lost, re-announce credit in case a CREDIT was lost, and send OPEN again
    /// if a connect is still waiting for its answer.
    ///
    /// What is sent again is decided by the stream states ([`TxState::recover`],
    /// [`RxState::recovery_credit`]); the simulation of `proto::sim` runs the same sequence.
    pub(crate) fn recover(self: &Arc<Self>) {
        let again = self.tx.lock().unwrap().st.recover();
        tracing::debug!(resend_from = again.resend_from, fin_again = again.fin_again, "recovering");
        if self.reopen_if_connecting() {
            return;
        }
        self.pump();
        if self.remote_id() != 0 {
            let credit = self.rx.lock().unwrap().st.recovery_credit();
            self.send_control(&self.credit_frame(credit));
        }
    }

    /// The application dropped its last handle.
    pub(crate) fn close(self: &Arc<Self>) {
        let unread = {
            let mut rx = self.rx.lock().unwrap();
            rx.closed = true;
            rx.st.readable() > 0 && rx.error.is_none()
        };
        if unread {
            // As TCP does: closing with unread data aborts the connection.
            self.reset(Reason::Closed, "closed by its owner with unread data");
            return;
        }
        {
            let mut tx = self.tx.lock().unwrap();
            tx.closed = true;
            if !tx.st.is_shutdown() {
                tx.st.shutdown();
            }
        }
        self.pump();
        self.maybe_retire();
    }

    /// Leave the table once both halves are finished (or failed) and the app has let go.
    fn maybe_retire(&self) {
        let done = {
            let tx = self.tx.lock().unwrap();
            let rx = self.rx.lock().unwrap();
            tx.closed && rx.closed && (tx.error.is_some() || (tx.st.finished() && rx.st.fin().is_some()))
        };
        if done {
            self.retire();
        }
    }

    fn retire(&self) {
        if self.retired.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Some(h) = self.host() {
            h.remove_vsock(self.id);
            if self.owns_port {
                h.free_port(self.local.port());
            }
        }
    }

    fn wait<'a, T>(
        cv: &Condvar,
        guard: MutexGuard<'a, T>,
        deadline: Option<Instant>,
    ) -> io::Result<MutexGuard<'a, T>> {
        match deadline {
            None => Ok(cv.wait(guard).unwrap()),
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(err(ErrorKind::WouldBlock, "timed out"));
                }
                Ok(cv.wait_timeout(guard, left).unwrap().0)
            }
        }
    }

    /// How long a latency-class reader spins before it sleeps (`latency_spin_us`).
    fn read_spin(&self) -> Duration {
        self.host().map_or(Duration::ZERO, |h| Duration::from_micros(h.cfg.latency_spin_us))
    }

    /// Spin until `rx_events` moves past `seen` or `latency_spin_us` has passed.
    fn spin_until_event(&self, seen: u64) {
        let spin = self.read_spin();
        let start = Instant::now();
        let mut n = 0u32;
        while self.rx_events.load(Ordering::Acquire) == seen {
            std::hint::spin_loop();
            n = n.wrapping_add(1);
            if n.is_multiple_of(64) && start.elapsed() >= spin {
                return;
            }
        }
    }

    pub(crate) fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let _one_reader = self.read_lock.lock().unwrap();
        let deadline = self.timeouts.lock().unwrap().0.map(|t| Instant::now() + t);
        let mut spin_left = self.class() == Class::Latency && !self.read_spin().is_zero();
        // Whether to try reading the home channel inline before sleeping (once it could
        // not, this call sleeps on the vsocket).
        let mut inline = true;
        let mut rx = self.rx.lock().unwrap();
        let avail = loop {
            // A stream that arrived whole stays readable even if the peer vanished afterwards.
            let complete = rx.st.fin() == Some(rx.st.in_order());
            if let Some((kind, msg)) = &rx.error {
                if !complete {
                    return Err(err(*kind, msg.clone()));
                }
            }
            let n = rx.st.readable();
            if n > 0 {
                break n;
            }
            if rx.st.eof() || rx.shut_read {
                return Ok(0);
            }
            if self.open_deferred.load(Ordering::Acquire) {
                // An optimistic connect that reads before it writes: the peer must hear of it.
                drop(rx);
                self.send_deferred_open();
                rx = self.rx.lock().unwrap();
                continue;
            }
            if self.open_ok_deferred.load(Ordering::Acquire) {
                // The opener may be waiting for credit (or to close): answer it before waiting.
                drop(rx);
                if let Some(ok) = self.take_open_ok() {
                    self.peer.send_control(self.class(), self.home, &ok);
                }
                rx = self.rx.lock().unwrap();
                continue;
            }
            if self.nonblocking.load(Ordering::Relaxed) {
                drop(rx);
                if self.ready.get().is_some_and(|r| r.rx_drained(|| self.read_ready())) {
                    // Something arrived while the gate closed: look again.
                    rx = self.rx.lock().unwrap();
                    continue;
                }
                return Err(err(ErrorKind::WouldBlock, "no data available"));
            }
            if spin_left {
                // A latency-class reader polls briefly before it sleeps: the answer to a
                // request usually comes within a few tens of µs, and a wake-up costs more.
                spin_left = false;
                let seen = self.rx_events.load(Ordering::Acquire);
                drop(rx);
                self.spin_until_event(seen);
                rx = self.rx.lock().unwrap();
                continue;
            }
            // A latency-class vsocket, or one still within its first INLINE_MAX bytes (which
            // the peer sends on the home channel), reads that channel itself instead of
            // sleeping until a worker has read it.
            // Either way the state is looked at again: the lock was let go meanwhile.
            if inline && (self.class() == Class::Latency || rx.st.in_order() < INLINE_MAX as u64) {
                let seen = self.rx_events.load(Ordering::SeqCst);
                drop(rx);
                inline = self.wait_inline(deadline, || self.rx_events.load(Ordering::SeqCst) != seen);
                rx = self.rx.lock().unwrap();
                continue;
            }
            rx.waiting = true;
            let host = self.host();
            let _sleeping = host.as_deref().map(Sleeping::new);
            rx = Self::wait(&self.rx_cv, rx, deadline)?;
            rx.waiting = false;
        };
        let n = (avail as usize).min(buf.len());
        let off = rx.st.consumed();
        drop(rx);
        let [a, b] = self.rx_ring.parts(off, n);
        let (d0, d1) = buf[..n].split_at_mut(a.len);
        let tasks = [
            CopyTask { src: a.ptr, dst: d0.as_mut_ptr(), len: a.len },
            CopyTask { src: b.ptr, dst: d1.as_mut_ptr(), len: b.len },
        ];
        if let Some(h) = self.host() {
            // SAFETY: [off, off + n) is below in_order and at or above consumed: writers never
            // touch it until consume() below (module docs); `buf` is ours.
            unsafe { h.copy.run(&tasks) };
        } else {
            return Err(err(ErrorKind::ConnectionAborted, "the NetChannel host shut down"));
        }
        let mut rx = self.rx.lock().unwrap();
        rx.st.consume(n as u64);
        let credit = if rx.error.is_none() { rx.st.credit_due() } else { None };
        let drained = rx.st.readable() == 0;
        drop(rx);
        self.send_credit(credit);
        if drained {
            if let Some(r) = self.ready.get() {
                // Whether more came meanwhile does not matter: the gate is right either way.
                let _ = r.rx_drained(|| self.read_ready());
            }
        }
        Ok(n)
    }

    pub(crate) fn write(self: &Arc<Self>, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let _one_writer = self.write_lock.lock().unwrap();
        let deadline = self.timeouts.lock().unwrap().1.map(|t| Instant::now() + t);
        let host =
            self.host().ok_or_else(|| err(ErrorKind::ConnectionAborted, "the NetChannel host shut down"))?;
        let piece_max = WRITE_PIECE.max(host.cfg.copy_threshold);
        let mut done = 0;
        while done < buf.len() {
            let mut tx = self.tx.lock().unwrap();
            let space = loop {
                if let Some((kind, msg)) = &tx.error {
                    if done > 0 {
                        return Ok(done);
                    }
                    return Err(err(*kind, msg.clone()));
                }
                if tx.st.is_shutdown() {
                    return Err(err(ErrorKind::BrokenPipe, "the vsocket was shut down for writing"));
                }
                let space = tx.st.space() as usize;
                if space > 0 {
                    break space;
                }
                if self.nonblocking.load(Ordering::Relaxed) {
                    drop(tx);
                    self.unpark_home();
                    if self.ready.get().is_some_and(|r| r.tx_full(|| self.writable_enough())) {
                        // Space came back while the gate was being plugged: try again.
                        tx = self.tx.lock().unwrap();
                        continue;
                    }
                    if done > 0 {
                        return Ok(done);
                    }
                    return Err(err(ErrorKind::WouldBlock, "send buffer full"));
                }
                tx.waiting = true;
                let _sleeping = Sleeping::new(&host);
                tx = match Self::wait(&self.tx_cv, tx, deadline) {
                    Ok(g) => g,
                    // A timeout after a partial write reports what was written.
                    Err(_) if done > 0 => return Ok(done),
                    Err(e) => return Err(e),
                };
                tx.waiting = false;
            };
            let n = space.min(buf.len() - done).min(piece_max);
            let off = tx.st.written();
            drop(tx);
            let src = &buf[done..done + n];
            let [a, b] = self.tx_ring.parts(off, n);
            let tasks = [
                CopyTask { src: src.as_ptr(), dst: a.ptr, len: a.len },
                // SAFETY: a.len <= n = src.len().
                CopyTask { src: unsafe { src.as_ptr().add(a.len) }, dst: b.ptr, len: b.len },
            ];
            // SAFETY: [off, off + n) is within [written, acked + cap): owned by this writer
            // (the write lock is held) until commit() below (module docs).
            unsafe { host.copy.run(&tasks) };
            // One lock for the commit and the pump that sends what it committed.
            let mut tx = self.tx.lock().unwrap();
            tx.st.commit(n as u64);
            let full = tx.st.space() == 0;
            self.totals.bytes_sent.fetch_add(n as u64, Ordering::Relaxed);
            if self.open_deferred.load(Ordering::Acquire) {
                drop(tx);
                self.pump();
            } else {
                self.pump_locked(tx, false);
            }
            done += n;
            if full && done == buf.len() {
                // The buffer is full now: the next write would block.
                if let Some(r) = self.ready.get() {
                    let _ = r.tx_full(|| self.writable_enough());
                }
            }
        }
        Ok(done)
    }
}

/// Whether a connect waits for the peer's answer to its OPEN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpenMode {
    /// Always: a refusal fails the connect itself.
    Confirmed,
    /// Unless the peer announced that the port listens (`engine::announce`): then the
    /// connect returns at once and a refusal (the listener closed in the meantime) fails
    /// the first read or write, as with an optimistic open. The default of `Host::connect`.
    Announced,
    /// Never ([`Host::connect_optimistic`]).
    Optimistic,
}

impl OpenMode {
    /// [`OpenMode::Optimistic`] or the default, [`OpenMode::Announced`].
    pub(crate) fn from_optimistic(optimistic: bool) -> OpenMode {
        if optimistic {
            OpenMode::Optimistic
        } else {
            OpenMode::Announced
        }
    }
}

/// The accept queue of one vsocket port.
pub(crate) struct ListenQueue {
    pub(crate) port: u16,
    backlog: usize,
    pub(crate) q: Mutex<Arrivals>,
    pub(crate) cv: Condvar,
    /// Bumped (under `q`) whenever an accept may find something new: a vsocket queued, the
    /// listener closed. What an accept reading channels inline waits on.
    pub(crate) events: AtomicU64,
    /// A blocking accept reads the host's parked channels itself (`read_inline`): kicked
    /// when a vsocket arrives by another way (a channel worker) or the listener closes.
    inline: InlineWaiter,
    /// The pollable descriptor, once an application asked for it (`crate::readiness`).
    pub(crate) ready: LazyReadiness,
    /// Async tasks waiting until an accept would not block.
    pub(crate) tasks: TaskWakers,
}

/// What waits in an accept queue.
#[derive(Default)]
pub(crate) struct Arrivals {
    /// Opened vsockets, oldest first.
    pub(crate) queue: VecDeque<Arc<VSock>>,
    /// The listener was closed.
    pub(crate) closed: bool,
    /// Accepts sleeping on the condition variable (only they need its notify).
    pub(crate) sleepers: usize,
}

impl ListenQueue {
    /// An empty accept queue for `port`, holding at most `backlog` arrivals.
    pub(crate) fn new(port: u16, backlog: usize) -> ListenQueue {
        ListenQueue {
            port,
            backlog,
            q: Mutex::new(Arrivals::default()),
            cv: Condvar::new(),
            events: AtomicU64::new(0),
            inline: InlineWaiter::default(),
            ready: LazyReadiness::default(),
            tasks: TaskWakers::default(),
        }
    }

    pub(crate) fn is_full(&self) -> bool {
        self.q.lock().unwrap().queue.len() >= self.backlog
    }

    /// Queue an opened vsocket; false if the listener is closed.
    pub(crate) fn push(&self, vs: Arc<VSock>) -> bool {
        let mut q = self.q.lock().unwrap();
        if q.closed {
            return false;
        }
        q.queue.push_back(vs);
        self.arrived(q);
        self.wake_pollers();
        true
    }

    /// Something an accept waits for happened (under `q`, given back here): wake it.
    fn arrived(&self, q: MutexGuard<'_, Arrivals>) {
        self.events.fetch_add(1, Ordering::SeqCst);
        if q.sleepers > 0 {
            self.cv.notify_one();
        }
        drop(q);
        self.inline.kick();
    }

    /// Instead of sleeping until `done()`, read the host's parked channels from this thread
    /// (`engine::channel::read_inline`): the OPEN that ends the wait then wakes this thread
    /// alone, not a channel worker and then this thread. Returns `false` if it did not (no
    /// channel is parked; the caller sleeps as usual).
    pub(crate) fn wait_inline(&self, host: &Arc<HostInner>, done: impl Fn() -> bool) -> bool {
        if !host.cfg.inline_read {
            return false;
        }
        self.inline.during(|kick| read_inline(host, InlineTarget::Parked, kick, None, done)).unwrap_or(false)
    }

    pub(crate) fn wake_pollers(&self) {
        self.tasks.wake();
        if let Some(r) = self.ready.get() {
            r.rx_publish(|| self.accept_ready());
        }
    }

    /// An accept would not block: a vsocket is waiting or the listener is closed.
    pub(crate) fn accept_ready(&self) -> bool {
        let q = self.q.lock().unwrap();
        !q.queue.is_empty() || q.closed
    }

    /// The accepting side found the queue empty: close the IN gate unless it is not.
    /// Returns `true` if a vsocket arrived meanwhile (look again).
    pub(crate) fn drained(&self) -> bool {
        self.ready.get().is_some_and(|r| r.rx_drained(|| self.accept_ready()))
    }

    pub(crate) fn readiness(&self) -> io::Result<&Readiness> {
        self.ready.get_or_create(|r| {
            r.rx_publish(|| self.accept_ready());
        })
    }

    /// Close: pending vsockets are reset.
    pub(crate) fn close(&self) {
        let pending: Vec<_> = {
            let mut q = self.q.lock().unwrap();
            q.closed = true;
            self.events.fetch_add(1, Ordering::SeqCst);
            q.queue.drain(..).collect()
        };
        self.cv.notify_all();
        self.inline.kick();
        self.wake_pollers();
        for vs in pending {
            vs.reset(Reason::Closed, "the listener was closed before accepting");
        }
    }
}

thread_local! {
    /// Proxied vsockets whose app this thread just woke with bytes to read (see
    /// [`spin_for_replies`]).
    static REPLY_WATCH: std::cell::RefCell<Vec<Arc<VSock>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Remember `vs` for this thread's next [`spin_for_replies`] (at most 64 vsockets).
fn watch_for_reply(vs: &Arc<VSock>) {
    REPLY_WATCH.with(|w| {
        let mut w = w.borrow_mut();
        if w.len() < 64 && !w.iter().any(|v| Arc::ptr_eq(v, vs)) {
            w.push(vs.clone());
        }
    });
}

/// Channel worker, after a round of reads (`[daemon] reply_spin_us`, `budget`): the apps it
/// woke (a token on their readiness proxy) usually answer within microseconds. Watch their
/// headers for up to `budget` instead of letting them ring the poller: an answer seen here
/// is taken in and sent from this thread, sparing the app's doorbell and the poller's
/// wake-up. While watched, a vsocket's `need_kick` is 0 (the app does not ring); when the
/// watch ends it is 1 again and the header is taken in once more, so nothing the app did
/// meanwhile waits for a doorbell that was never rung.
pub(crate) fn spin_for_replies(budget: std::time::Duration) {
    let list: Vec<Arc<VSock>> = REPLY_WATCH.with(|w| std::mem::take(&mut *w.borrow_mut()));
    if list.is_empty() || budget.is_zero() {
        return;
    }
    let pos = |v: &VSock| {
        let h = v.shm.as_ref().expect("watched vsockets are shared").header();
        (h.tx_written.load(Ordering::SeqCst), h.rx_consumed.load(Ordering::SeqCst))
    };
    let mut pending: Vec<(Arc<VSock>, (u64, u64))> = list
        .into_iter()
        .map(|v| {
            let p = pos(&v);
            v.shm.as_ref().expect("shared").header().need_kick.store(0, Ordering::SeqCst);
            (v, p)
        })
        .collect();
    let start = std::time::Instant::now();
    let mut spins = 0u32;
    // Until an answer (a write) shows up, or the budget is spent.
    loop {
        pending.retain_mut(|(v, p)| {
            let now = pos(v);
            if now.0 == p.0 {
                return true;
            }
            *p = now;
            finish_watch(v);
            false
        });
        if pending.is_empty() || start.elapsed() >= budget {
            break;
        }
        spins += 1;
        // Now and then give the CPU to the app, should it be waiting for this one.
        if spins.is_multiple_of(64) {
            std::thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
    }
    for (v, _) in pending {
        finish_watch(&v);
    }
}

/// The app rings again from here on; whatever it did without ringing is taken in now. Not
/// only what differs from a snapshot: a write made just before the watch began, whose ring
/// the watch's `need_kick = 0` then suppressed, is in every snapshot.
fn finish_watch(v: &Arc<VSock>) {
    let h = v.shm.as_ref().expect("shared").header();
    h.need_kick.store(1, Ordering::SeqCst);
    v.take_reply();
}

impl VSock {
    /// Take in what the app of a watched vsocket did, as the daemon's poller would. What the
    /// poller must handle itself — the app's close (B's hang-up), an impossible position
    /// (the poller disconnects the app on its next look) — is left to it.
    fn take_reply(self: &Arc<Self>) {
        if let Ok((false, true)) = self.sync_app() {
            if let Some(r) = &self.shm {
                r.drive_proxy();
            }
        }
    }
}
