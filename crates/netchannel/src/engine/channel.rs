//! Network channels: one TCP connection to a peer host, and the channel workers that serve them.
//!
//! A [`Channel`] is the shared face of a channel: its queue of frames to send (control
//! frames ahead of segments), its counters and its state. One channel worker thread serves
//! it: it reads frames and dispatches them to the NetDriver, and writes queued frames,
//! copying segment bytes from the vsocket's send ring. A worker is event-driven (mio) and
//! may own many channels.
//!
//! **Reading inline** ([`read_inline`]): an app thread about to sleep until its vsocket has
//! something new may read the vsocket's home channel itself instead, as a TCP receiver's
//! softirq work runs to completion on the receiving CPU: the frame's arrival then wakes the
//! one thread that needs it, not the worker and then the app (each wake-up that crosses CPUs
//! costs ~46 µs on a VM). Whoever reads a channel holds its [`Reader`] (taken with
//! `try_lock` only, so nobody ever waits for it). While an app thread holds it, the channel
//! is taken out of its worker's read interest (`EPOLL_CTL_MOD`), so the arrival does not
//! wake the worker as well; putting it back re-arms the edge for whatever is left unread.
//! Write interest is registered only while a flush is blocked on a full socket, so that
//! neither change reports a spurious writable edge.
//!
//! **Lending** ([`lend`], feature `tokio`): the async counterpart. An async runtime whose
//! tasks wait on latency-class vsockets registers the channel's socket in its own reactor
//! and reads it from a task of its own for as long as such streams live; the worker leaves
//! it alone meanwhile. As a runtime may stop running (a current-thread runtime outside
//! `block_on`, a task that blocks), the worker looks every [`LENT_LOOK`] whether the
//! borrower read anything since its last look while bytes wait, and reads them itself if
//! not. App threads still read a lent channel inline.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};

use crate::engine::peer::Peer;
use crate::engine::vsocket::VSock;
use crate::engine::HostInner;
use crate::proto::sched::{Batch, Depth, FrameQueue, Lane, Next};
use crate::wire::{self, Class, Frame, HEADER_LEN};

/// How often a worker looks whether the borrower of a lent channel ([`lend`]) still reads it.
const LENT_LOOK: Duration = Duration::from_millis(10);
/// Bytes a worker reads from one channel before turning to the others.
const READ_BUDGET: usize = 1 << 20;
/// Initial size of a channel's read buffer.
const READ_BUF: usize = 256 << 10;
const WAKER: Token = Token(usize::MAX);
/// Most queued bytes [`Channel::send_small_now`] writes from the calling thread.
const SMALL_QUEUE: usize = 64 << 10;
/// Why a channel went down: the NetDriver recovers from every reason but
/// [`Down::PeerShutdown`], which retires the peer.
#[derive(Debug)]
pub(crate) enum Down {
    /// This host closed it (its worker was told to).
    Closed,
    /// The peer closed the connection (end of stream).
    PeerClosed,
    /// The peer host shut down in an orderly way (a channel RESET with `Shutdown`).
    PeerShutdown,
    /// The peer reset the channel.
    PeerReset { reason: wire::Reason, message: String },
    /// The peer sent a frame that does not parse.
    Malformed(wire::WireError),
    /// The peer sent a frame that has no place on an open channel.
    Unexpected(&'static str),
    /// A system call on the channel's socket failed (`op`: what was done).
    Io { op: &'static str, error: io::Error },
    /// Its peer is being forgotten (a frame read meanwhile has nobody to go to).
    Orphaned,
    /// A test killed it.
    #[cfg(test)]
    Killed,
}

impl std::fmt::Display for Down {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Down::Closed => f.write_str("closed on request"),
            Down::PeerClosed => f.write_str("peer closed the connection"),
            Down::PeerShutdown => f.write_str("the peer host shut down"),
            Down::PeerReset { reason, message } => write!(f, "peer reset the channel ({reason}): {message}"),
            Down::Malformed(e) => write!(f, "malformed frame: {e}"),
            Down::Unexpected(what) => write!(f, "{what} on an open channel"),
            Down::Io { op, error } => write!(f, "{op} failed: {error}"),
            Down::Orphaned => f.write_str("the channel's peer is forgotten"),
            #[cfg(test)]
            Down::Killed => f.write_str("killed by the test"),
        }
    }
}

/// A frame waiting in a channel's queue.
pub(crate) enum OutFrame {
    /// A control frame, fully encoded.
    Control(Vec<u8>),
    /// A DATA segment: its bytes are copied from the vsocket's send ring when written.
    Segment { vs: Arc<VSock>, offset: u64, len: u32, ack_request: bool },
}

/// A queued segment: the vsocket, offset, length and ack request.
type QueuedSegment = (Arc<VSock>, u64, u32, bool);
type OutQueue = FrameQueue<Vec<u8>, QueuedSegment>;

/// Per-channel counters.
#[derive(Default, Debug)]
pub(crate) struct Counters {
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    pub frames_sent: AtomicU64,
    pub frames_received: AtomicU64,
    /// Write syscalls (each carries one batch of frames, or the rest of one).
    pub writes: AtomicU64,
}

/// The shared face of one channel.
pub(crate) struct Channel {
    pub token: usize,
    pub peer: Weak<Peer>,
    pub class: Class,
    pub index: u16,
    pub worker: usize,
    out: Mutex<OutQueue>,
    /// Unsent bytes: queued frames plus bytes gathered but not yet written to the socket.
    pub queued: AtomicUsize,
    kicked: AtomicBool,
    /// Whoever holds this writes the channel: an app thread sending a small frame inline, or
    /// the channel's worker.
    writer: Mutex<Writer>,
    pub up: AtomicBool,
    pub counters: Counters,
    host: Weak<HostInner>,
    /// Caps of one write: bytes and frames (`write_batch`, `write_batch_frames`).
    batch: (usize, usize),
    /// The descriptor that is read and registered in the worker's poll. It lives as long as
    /// the channel, so its number is never reused while an app thread may poll it. Also
    /// where the socket's send queue depth and congestion control are read, without taking
    /// the writer (whoever holds the writer must flush).
    read_sock: std::net::TcpStream,
    /// Whoever reads the channel holds this: its worker, or an app thread reading inline.
    reader: Mutex<Reader>,
    /// The worker's interest in the socket; changed only under this lock.
    watch: Mutex<Watch>,
    /// The channel's reading is lent to an async runtime ([`lend`]): the worker only looks
    /// now and then whether the borrower still reads it.
    lent: AtomicBool,
    /// Reads by the borrower of a lent channel ([`read_lent`]).
    lent_reads: AtomicU64,
    /// Urgent frames queued by async tasks wait for a flush at the end of the runtime's tick
    /// ([`coalescing`]): one is on its way, later ones join it.
    #[cfg(feature = "tokio")]
    tick_flush: AtomicBool,
    /// How many tasks the borrower's last read of the lent channel that woke any woke: with
    /// one, nobody else is about to write, and a task's frames go out at once.
    #[cfg(feature = "tokio")]
    fan_out: std::sync::atomic::AtomicU32,
    /// An app thread that read the channel inline left it parked: the worker still does not
    /// poll it, so the thread's next wait takes it back without a system call ([`park`]).
    /// Set and cleared under `reader`.
    parked: AtomicBool,
    /// Since when a control frame nobody waits for ([`Channel::push_lazy`]) has waited in
    /// the queue for the next write on this channel; the worker writes it at the latest
    /// about [`PARK_GRACE`] later.
    lazy_since: Mutex<Option<Instant>>,
}

/// The reading half of a channel: bytes read and not yet dispatched.
pub(crate) struct Reader {
    rbuf: Vec<u8>,
    rstart: usize,
    rend: usize,
    /// When the channel was last parked ([`Channel::parked`]).
    parked_at: Option<Instant>,
    /// The DATA payload being read straight into its vsocket's receive ring, if any: the
    /// next bytes of the socket are its rest (`rbuf` is empty meanwhile).
    direct: Option<Direct>,
    /// The last frame was a DATA frame large enough to be read into its ring ([`DIRECT_MIN`]):
    /// the next is most likely one too, so its header is read alone (the read that would
    /// take more would copy its payload through `rbuf`).
    expect_direct: bool,
}

/// A DATA payload read from the socket straight into the receive ring, into the range its
/// vsocket claimed for it ([`VSock::claim_rx`]).
struct Direct {
    vs: Arc<VSock>,
    offset: u64,
    len: u32,
    ack_request: bool,
    /// Payload bytes in the ring so far.
    done: u32,
}

impl Reader {
    /// Give up the payload being read into a receive ring (the channel died before it all
    /// came): its vsocket gets it again from the sender's recovery.
    fn abandon_direct(&mut self) {
        if let Some(d) = self.direct.take() {
            d.vs.release_rx(d.offset, d.len);
        }
    }
}

/// What the channel's worker polls the socket for.
#[derive(Default)]
struct Watch {
    /// The socket is registered in the worker's poll (from `Command::Add` until it leaves).
    registered: bool,
    /// An app thread reads the channel (no read interest for the worker meanwhile).
    inline: bool,
    /// An async runtime reads the channel ([`lend`]; no read interest for the worker either).
    lent: bool,
    /// A flush is blocked on a full socket (write interest).
    want_write: bool,
}

/// The writing half of a channel: gathered output and the socket (a duplicate of the
/// worker's descriptor, so app threads can write without the worker).
struct Writer {
    out: Output,
    sock: Option<std::net::TcpStream>,
}

/// How a flush ended.
enum Flushed {
    /// Everything queued was written.
    Empty,
    /// The socket's buffer is full; the worker goes on when it drains.
    Blocked,
}

impl Channel {
    /// The span of work done for this channel: the peer's channel address, class and index.
    pub fn span(&self, peer: std::net::SocketAddr) -> tracing::Span {
        tracing::error_span!("channel", peer = %peer, class = self.class.name(), index = self.index)
    }

    pub(crate) fn new(
        host: &Arc<HostInner>,
        peer: &Arc<Peer>,
        class: Class,
        index: u16,
        read_sock: std::net::TcpStream,
        write_sock: std::net::TcpStream,
    ) -> Arc<Channel> {
        let token = host.next_token.fetch_add(1, Ordering::Relaxed);
        // Latency channels get the latency workers when there are any.
        let bulk = host.cfg.channel_workers;
        let worker = match host.workers.len() - bulk {
            lat if class == Class::Latency && lat > 0 => bulk + token % lat,
            _ => token % bulk,
        };
        Arc::new(Channel {
            token,
            peer: Arc::downgrade(peer),
            class,
            index,
            worker,
            out: Mutex::new(OutQueue::default()),
            queued: AtomicUsize::new(0),
            kicked: AtomicBool::new(false),
            writer: Mutex::new(Writer {
                out: Output {
                    splice: host.cfg.splice_send && class == Class::Throughput,
                    ..Output::default()
                },
                sock: Some(write_sock),
            }),
            up: AtomicBool::new(true),
            counters: Counters::default(),
            host: Arc::downgrade(host),
            batch: (host.cfg.write_batch, host.cfg.write_batch_frames),
            read_sock,
            reader: Mutex::new(Reader {
                rbuf: vec![0; READ_BUF],
                rstart: 0,
                rend: 0,
                parked_at: None,
                direct: None,
                expect_direct: false,
            }),
            watch: Mutex::new(Watch::default()),
            lent: AtomicBool::new(false),
            lent_reads: AtomicU64::new(0),
            #[cfg(feature = "tokio")]
            tick_flush: AtomicBool::new(false),
            #[cfg(feature = "tokio")]
            fan_out: std::sync::atomic::AtomicU32::new(0),
            parked: AtomicBool::new(false),
            lazy_since: Mutex::new(None),
        })
    }

    /// Set the worker's interest in the socket from `w` (`EPOLL_CTL_MOD` on the worker's
    /// poll): read interest unless an app thread reads inline, write interest while a flush
    /// is blocked. The kernel re-checks readiness and reports an edge for what is pending.
    fn apply_watch(&self, host: &HostInner, w: &Watch) -> io::Result<()> {
        let mut events = libc::EPOLLET;
        if !w.inline && !w.lent {
            events |= libc::EPOLLIN | libc::EPOLLRDHUP;
        }
        if w.want_write {
            events |= libc::EPOLLOUT;
        }
        let mut ev = libc::epoll_event { events: events as u32, u64: self.token as u64 };
        let epfd = host.workers[self.worker].epoll.as_raw_fd();
        // SAFETY: both descriptors are open (the worker's poll is kept open by the host's
        // duplicate, the socket by this channel) and `ev` is a live epoll_event.
        let r = unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_MOD, self.read_sock.as_raw_fd(), &mut ev) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The worker's flush left bytes unwritten (`blocked`) or wrote everything: poll for
    /// write space only in the first case.
    fn want_write(&self, host: &HostInner, blocked: bool) -> io::Result<()> {
        let mut w = self.watch.lock().unwrap();
        if w.want_write == blocked || !w.registered {
            return Ok(());
        }
        w.want_write = blocked;
        self.apply_watch(host, &w)
    }

    /// An app thread starts (`true`) or stops reading the channel inline. Starting fails
    /// (returns `false`) when the worker does not poll the socket (not yet or no longer).
    fn set_inline(&self, host: &HostInner, on: bool) -> bool {
        let mut w = self.watch.lock().unwrap();
        if !w.registered || w.inline == on {
            return !on;
        }
        w.inline = on;
        match self.apply_watch(host, &w) {
            Ok(()) => true,
            Err(e) => {
                w.inline = false;
                tracing::warn!(class = self.class.name(), index = self.index, error = %e, "channel: cannot change the worker's interest");
                false
            }
        }
    }

    /// An async runtime starts (`true`) or stops reading the channel ([`lend`]). Starting
    /// fails (returns `false`) when it is lent already or the worker does not poll it.
    #[cfg(feature = "tokio")]
    fn set_lent(&self, host: &HostInner, on: bool) -> bool {
        let mut w = self.watch.lock().unwrap();
        if !w.registered || w.lent == on {
            return !on;
        }
        w.lent = on;
        self.lent.store(on, Ordering::SeqCst);
        match self.apply_watch(host, &w) {
            Ok(()) => true,
            Err(e) => {
                w.lent = false;
                self.lent.store(false, Ordering::SeqCst);
                tracing::warn!(class = self.class.name(), index = self.index, error = %e, "channel: cannot change the worker's interest");
                false
            }
        }
    }

    /// Queue a frame; the caller then calls [`Channel::send_now`] or [`Channel::kick`].
    ///
    /// A segment waits in the lane of its vsocket's class: latency-class segments leave ahead
    /// of bulk ones even on a throughput channel (when a latency vsocket falls back to one).
    pub(crate) fn enqueue(&self, f: OutFrame) {
        let mut q = self.out.lock().unwrap();
        match f {
            OutFrame::Control(bytes) => {
                self.queued.fetch_add(bytes.len(), Ordering::Relaxed);
                let n = bytes.len();
                q.push_control(bytes, n);
            }
            OutFrame::Segment { vs, offset, len, ack_request } => {
                let n = HEADER_LEN + len as usize;
                self.queued.fetch_add(n, Ordering::Relaxed);
                let class = vs.class();
                q.push_segment((vs, offset, len, ack_request), n, class);
            }
        }
    }

    /// Nothing but control frames waits to be sent: no segment is queued, and nothing
    /// gathered is left unwritten. A small send then is the first one on the channel, which
    /// the sender may write itself (an OPEN_OK owed, or a FIN acknowledgement waiting for the
    /// next write, leaves with it); behind segments, it waits for the worker, which batches.
    pub(crate) fn idle(&self) -> bool {
        let queued = self.queued.load(Ordering::Relaxed);
        queued == 0 || queued == self.out.lock().unwrap().depth(Lane::Control).bytes
    }

    /// What waits in this channel's queue, per lane (control, latency, bulk).
    pub(crate) fn depths(&self) -> [Depth; 3] {
        let q = self.out.lock().unwrap();
        [q.depth(Lane::Control), q.depth(Lane::Latency), q.depth(Lane::Bulk)]
    }

    /// The congestion control of the channel's socket; empty when it is down.
    pub(crate) fn congestion(&self) -> String {
        let sock = &self.read_sock;
        if !self.up.load(Ordering::Acquire) {
            return String::new();
        }
        socket2::SockRef::from(sock)
            .tcp_congestion()
            .map(|name| String::from_utf8_lossy(&name).trim_end_matches('\0').to_string())
            .unwrap_or_default()
    }

    /// Bytes handed to the kernel socket and not yet sent (`SIOCOUTQNSD`); 0 if unknown.
    pub(crate) fn kernel_unsent(&self) -> usize {
        let sock = &self.read_sock;
        if !self.up.load(Ordering::Acquire) {
            return 0;
        }
        let mut n: libc::c_int = 0;
        // SAFETY: the fd is an open socket owned by `sock` (open as long as the channel);
        // SIOCOUTQNSD writes one c_int into `n`.
        let rc = unsafe { libc::ioctl(sock.as_raw_fd(), SIOCOUTQNSD, &mut n as *mut libc::c_int) };
        if rc == 0 {
            n.max(0) as usize
        } else {
            0
        }
    }

    /// Queue an encoded control frame and send it now.
    ///
    /// Must not be called while holding a vsocket's `tx` lock (writing takes it).
    pub(crate) fn push_frame(self: &Arc<Self>, frame: &Frame<'_>) {
        self.push_frames(std::slice::from_ref(frame));
    }

    /// Queue control frames in order and write them (with whatever else is urgent) at once.
    pub(crate) fn push_frames(self: &Arc<Self>, frames: &[Frame<'_>]) {
        for frame in frames {
            self.enqueue_frame(frame);
        }
        self.send_now();
    }

    /// Queue control frames that nobody waits for (the acknowledgement of a FIN whose
    /// vsocket is finished here, a FIN to a peer whose application closed): they leave with
    /// the next write on this channel, whoever makes it, instead of in a write (and an
    /// arrival at the peer) of their own; the worker writes them if no write comes within
    /// about [`PARK_GRACE`]. Written now when the worker does not tick (a tick only for this
    /// would cost more than the write).
    pub(crate) fn push_lazy(self: &Arc<Self>, frames: &[Frame<'_>]) {
        for frame in frames {
            self.enqueue_frame(frame);
        }
        self.lazy_since.lock().unwrap().get_or_insert_with(Instant::now);
        // Marked first, then the worker's ticking looked at; the worker clears `ticking`
        // and then looks for marked channels (`keep_ticking`): one of the two sees the other.
        let ticking =
            self.host.upgrade().is_some_and(|h| h.workers[self.worker].ticking.load(Ordering::SeqCst));
        if !ticking {
            self.send_now();
        }
    }

    /// Whether a lazy frame waits ([`Channel::push_lazy`]).
    fn has_lazy(&self) -> bool {
        self.lazy_since.lock().unwrap().is_some()
    }

    /// The worker's tick: a lazy frame that waited `at_least` is written now (returns
    /// `true`: the caller flushes); one that left meanwhile with another write is forgotten.
    fn lazy_due(&self, at_least: Duration) -> bool {
        let mut since = self.lazy_since.lock().unwrap();
        match *since {
            Some(t) if t.elapsed() >= at_least => {
                *since = None;
                self.queued.load(Ordering::Relaxed) > 0
            }
            _ => false,
        }
    }

    /// Queue an encoded control frame; the caller sends it ([`Channel::send_now`], or a
    /// write of this channel it is about to make).
    pub(crate) fn enqueue_frame(&self, frame: &Frame<'_>) {
        let mut bytes = Vec::with_capacity(frame.encoded_len());
        frame.encode(&mut bytes);
        self.enqueue(OutFrame::Control(bytes));
    }

    /// Write the queued control frames and latency segments from this thread, saving the
    /// hand-off to the channel's worker (a latency win for small frames). Bulk segments are
    /// left to the worker (only the rest of a batch already begun goes first, as it must), so
    /// an app thread never ends up writing other vsockets' bulk. If another thread is writing
    /// the channel it will see the new frames; if the socket is full the worker takes over
    /// when it drains.
    ///
    /// Inside [`coalescing`] (an async task's vsocket operation) the write waits for the end
    /// of the runtime's tick, where one write carries what all its tasks queued.
    ///
    /// Must not be called while holding a vsocket's `tx` lock (writing takes it).
    pub(crate) fn send_now(self: &Arc<Self>) {
        #[cfg(feature = "tokio")]
        if COALESCING.get() && self.flush_at_tick_end() {
            return;
        }
        self.write_urgent_now();
    }

    /// [`Channel::send_now`] from this thread, now.
    fn write_urgent_now(&self) {
        loop {
            let Ok(mut w) = self.writer.try_lock() else { return };
            let res = self.flush_locked(&mut w, true);
            drop(w);
            self.unblock_parked();
            match res {
                Ok(Flushed::Empty) => match self.pending() {
                    (true, _) => continue,
                    (false, true) => return self.kick(),
                    (false, false) => return,
                },
                // The worker writes the rest on the writable edge, or meets the error itself.
                Ok(Flushed::Blocked) | Err(_) => return self.kick(),
            }
        }
    }

    /// Write what is queued from the calling thread (bulk included) if that is little — at
    /// most [`SMALL_QUEUE`] bytes — else leave it to the worker. The daemon's doorbell poller
    /// sends an app's small messages this way, sparing the hand-off to a channel worker.
    ///
    /// Inside [`batching_small_sends`] the write waits for the end of the batch, where every
    /// channel used is written once.
    pub(crate) fn send_small_now(self: &Arc<Self>) {
        if self.queued.load(Ordering::Relaxed) > SMALL_QUEUE {
            return self.kick();
        }
        let deferred = DEFERRED_SENDS.with(|d| match d.borrow_mut().as_mut() {
            Some(v) => {
                if !v.iter().any(|c| Arc::ptr_eq(c, self)) {
                    v.push(self.clone());
                }
                true
            }
            None => false,
        });
        if deferred {
            return;
        }
        self.write_small_now();
    }

    fn write_small_now(&self) {
        if self.queued.load(Ordering::Relaxed) > SMALL_QUEUE {
            return self.kick();
        }
        let Ok(mut w) = self.writer.try_lock() else { return self.kick() };
        let res = self.flush_locked(&mut w, false);
        drop(w);
        self.unblock_parked();
        match res {
            Ok(Flushed::Empty) if !self.pending().1 => {}
            _ => self.kick(),
        }
    }

    /// Whether urgent frames (control, latency segments), and any frames, are queued.
    fn pending(&self) -> (bool, bool) {
        let q = self.out.lock().unwrap();
        (q.has_urgent(), !q.is_empty())
    }

    /// Gather queued frames (only urgent ones with `urgent_only`) and write them until the
    /// socket would block or nothing is left.
    fn flush_locked(&self, w: &mut Writer, urgent_only: bool) -> io::Result<Flushed> {
        let Some(sock) = w.sock.as_ref() else {
            return Err(io::Error::new(io::ErrorKind::NotConnected, "channel closed"));
        };
        loop {
            if w.out.is_empty() {
                w.out.gather(self, urgent_only);
                if w.out.is_empty() {
                    break Ok(Flushed::Empty);
                }
            }
            match w.out.write_to(sock) {
                Ok(n) => {
                    self.queued.fetch_sub(n, Ordering::Relaxed);
                    self.counters.bytes_sent.fetch_add(n as u64, Ordering::Relaxed);
                    self.counters.writes.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(Flushed::Blocked),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        }
    }

    /// Vsockets parked because every channel of this one's class was full may go on if this
    /// one has room now. Called without the writer lock (scheduling takes vsocket locks).
    fn unblock_parked(&self) {
        let cap = self.host.upgrade().map_or(usize::MAX, |h| h.cfg.channel_queue);
        if self.queued.load(Ordering::Relaxed) < cap {
            if let Some(peer) = self.peer.upgrade() {
                peer.unblock(self.class);
            }
        }
    }

    /// The worker's flush: wait for the writer, write, and repeat while frames keep coming.
    /// Returns whether the socket is full with bytes left to write.
    fn flush_from_worker(&self) -> io::Result<bool> {
        self.kicked.store(false, Ordering::Release);
        loop {
            let res = {
                let mut w = self.writer.lock().unwrap();
                self.flush_locked(&mut w, false)?
            };
            self.unblock_parked();
            match res {
                Flushed::Empty if self.pending().1 => continue,
                Flushed::Empty => return Ok(false),
                Flushed::Blocked => return Ok(true),
            }
        }
    }

    /// Close the writing half: shut the TCP connection down so the peer sees it.
    fn close_writer(&self) {
        if let Some(s) = self.writer.lock().unwrap().sock.take() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Ask the channel's worker to write what is queued.
    pub(crate) fn kick(&self) {
        if !self.kicked.swap(true, Ordering::AcqRel) {
            if let Some(host) = self.host.upgrade() {
                host.workers[self.worker].command(Command::Kick(self.token));
            }
        }
    }

    /// Drop everything queued (the channel is down).
    fn clear(&self) {
        let mut q = self.out.lock().unwrap();
        q.clear();
    }
}

#[cfg(feature = "tokio")]
thread_local! {
    /// This thread runs a vsocket operation of an async task ([`coalescing`]).
    static COALESCING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Run `f`, a vsocket operation of an async task (a read, a write, the reading of a lent
/// channel), with the urgent writes it makes ([`Channel::send_now`]) held back until the
/// end of the runtime's tick: when the runtime has run every task that was ready, before it
/// waits for events (and at least every `event_interval` polls, when it looks at its
/// events anyway). There one write per channel carries the frames of every task that ran.
/// A runtime that wakes 64 tasks with one read of a channel then answers them with one
/// write instead of 64 (on loopback each write also pays the receiver's TCP processing),
/// as a kernel socket's `MSG_MORE` or `TCP_CORK` would, only bounded by the tick and not
/// by a timer. Outside a runtime the writes go out at once.
#[cfg(feature = "tokio")]
pub(crate) fn coalescing<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            COALESCING.set(self.0);
        }
    }
    let _restore = Restore(COALESCING.replace(true));
    f()
}

/// The end-of-tick flush of one channel ([`coalescing`]); if the runtime drops it unrun (it
/// shuts down), the channel's worker writes instead.
#[cfg(feature = "tokio")]
struct TickFlush(Option<Arc<Channel>>);

#[cfg(feature = "tokio")]
impl TickFlush {
    fn run(mut self) {
        if let Some(ch) = self.0.take() {
            // Cleared first: a frame queued after this flush gathered sends a flush of its own.
            ch.tick_flush.store(false, Ordering::SeqCst);
            ch.write_urgent_now();
        }
    }
}

#[cfg(feature = "tokio")]
impl Drop for TickFlush {
    fn drop(&mut self) {
        if let Some(ch) = self.0.take() {
            ch.tick_flush.store(false, Ordering::SeqCst);
            ch.kick();
        }
    }
}

#[cfg(feature = "tokio")]
impl Channel {
    /// Leave the urgent frames just queued to a flush at the end of the current runtime's
    /// tick; `false` (nothing done) outside a runtime, and while the last read of the lent
    /// channel woke a single task. The flush is a task that yields once:
    /// tokio wakes a yielded task only once its ready tasks ran (`yield_now` defers the
    /// wake-up to the worker's next look at its events).
    fn flush_at_tick_end(self: &Arc<Self>) -> bool {
        // One task woken by the last read (one busy stream): a flush at the end of the tick
        // would only add its cost (a task, a look at the events) to the round trip.
        if self.fan_out.load(Ordering::Relaxed) < 2 {
            return false;
        }
        let Ok(rt) = ::tokio::runtime::Handle::try_current() else { return false };
        // The queue was pushed before this swap, and the flush clears the flag before it
        // gathers: a frame that finds the flag set is in the flush's write.
        if self.tick_flush.swap(true, Ordering::SeqCst) {
            return true;
        }
        let flush = TickFlush(Some(self.clone()));
        rt.spawn(async move {
            ::tokio::task::yield_now().await;
            flush.run();
        });
        true
    }
}

thread_local! {
    /// The channels whose small sends wait for the end of this thread's
    /// [`batching_small_sends`] (none outside one).
    static DEFERRED_SENDS: std::cell::RefCell<Option<Vec<Arc<Channel>>>> =
        const { std::cell::RefCell::new(None) };
}

/// Run `f` with the small sends it makes ([`Channel::send_small_now`]) held back, then write
/// each channel they used once: the daemon's poller takes in many apps' doorbells in one
/// pass, and their requests leave in one write per channel instead of one each (on
/// loopback each write also pays the receiver's TCP processing and, often, a wake-up).
pub(crate) fn batching_small_sends<R>(f: impl FnOnce() -> R) -> R {
    let outer = DEFERRED_SENDS.with(|d| d.borrow_mut().replace(Vec::new()));
    let r = f();
    let used = DEFERRED_SENDS.with(|d| std::mem::replace(&mut *d.borrow_mut(), outer)).unwrap_or_default();
    for ch in used {
        ch.write_small_now();
    }
    r
}

/// What a worker is asked to do.
pub(crate) enum Command {
    /// Serve a new channel.
    Add(Arc<Channel>),
    /// A channel has frames queued.
    Kick(usize),
    /// Close a channel (fault injection, peer retirement).
    Close(usize),
    /// Stop the worker.
    Stop,
}

/// How other threads reach a worker.
pub(crate) struct WorkerHandle {
    waker: Waker,
    /// A duplicate of the worker's poll descriptor, so that app threads can change a
    /// channel's interest ([`Channel::set_inline`]) even while the worker exits.
    epoll: OwnedFd,
    /// Pending commands, and whether the worker has stopped (then nobody will run them).
    commands: Mutex<(Vec<Command>, bool)>,
    /// The worker wakes every [`PARK_GRACE`] to take back channels parked longer than that
    /// (it ticks while any of its channels is parked; [`park`] wakes it to start).
    ticking: AtomicBool,
}

impl WorkerHandle {
    pub(crate) fn command(&self, c: Command) {
        let mut q = self.commands.lock().unwrap();
        if q.1 {
            // The worker is gone: a channel handed to it now must not linger half open.
            if let Command::Add(ch) = c {
                ch.up.store(false, Ordering::Release);
                ch.close_writer();
            }
            return;
        }
        q.0.push(c);
        drop(q);
        let _ = self.waker.wake();
    }
}

/// A channel as its worker serves it.
struct Conn {
    ch: Arc<Channel>,
    /// The borrower's read count ([`Channel::lent_reads`]) at the worker's last look.
    lent_seen: u64,
    /// The frames the channel had carried when [`keep_ticking`] last looked.
    frames_seen: u64,
}

impl Conn {
    /// Take the socket out of the worker's poll; nobody changes its interest afterwards.
    fn unregister(&self, poll: &Poll) {
        let mut w = self.ch.watch.lock().unwrap();
        w.registered = false;
        let _ = poll.registry().deregister(&mut SourceFd(&self.ch.read_sock.as_raw_fd()));
    }
}

/// Create a worker's poll and handle; the thread is started by [`run_worker`].
pub(crate) fn new_worker() -> io::Result<(Poll, WorkerHandle)> {
    let poll = Poll::new()?;
    let waker = Waker::new(poll.registry(), WAKER)?;
    // SAFETY: dup of the poll's open descriptor; the new one is owned by the handle.
    let dup = unsafe { libc::fcntl(poll.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    if dup < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `dup` is a fresh descriptor nobody else owns.
    let epoll = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(dup as RawFd) };
    Ok((
        poll,
        WorkerHandle {
            waker,
            epoll,
            commands: Mutex::new((Vec::new(), false)),
            ticking: AtomicBool::new(false),
        },
    ))
}

/// The channel worker loop.
///
/// `busy_poll`: how long to keep polling without sleeping once idle (latency workers only).
pub(crate) fn run_worker(host: Arc<HostInner>, me: usize, mut poll: Poll, busy_poll: Duration) {
    let mut events = Events::with_capacity(256);
    let mut conns: HashMap<usize, Conn> = HashMap::new();
    let mut again: Vec<usize> = Vec::new(); // channels with reading left over
    let mut closing_again: Vec<usize> = Vec::new(); // those of them that reported end of stream
    let mut last_look = Instant::now();
    let reply_spin = host.cfg.daemon.reply_spin();
    let mut last_tick = Instant::now();
    loop {
        let any_lent = conns.values().any(|c| c.ch.lent.load(Ordering::Relaxed));
        let ticking = keep_ticking(&host, &host.workers[me], &mut conns);
        let timeout = if !again.is_empty() {
            Some(Duration::ZERO)
        } else if ticking {
            let tick = PARK_GRACE.saturating_sub(last_tick.elapsed());
            Some(if any_lent { tick.min(LENT_LOOK.saturating_sub(last_look.elapsed())) } else { tick })
        } else if any_lent {
            Some(LENT_LOOK.saturating_sub(last_look.elapsed()))
        } else {
            None
        };
        if let Err(e) = poll_spinning(&mut poll, &mut events, timeout, busy_poll) {
            tracing::error!(worker = me, error = %e, "channel worker: poll failed");
            return;
        }
        let mut readable: Vec<usize> = std::mem::take(&mut again);
        if any_lent && last_look.elapsed() >= LENT_LOOK {
            // A lent channel whose borrower read nothing since the last look while bytes
            // wait: its runtime is not running the reading task (blocked, busy): read it here.
            last_look = Instant::now();
            for (t, c) in conns.iter_mut() {
                if !c.ch.lent.load(Ordering::Relaxed) {
                    continue;
                }
                let reads = c.ch.lent_reads.load(Ordering::Relaxed);
                let idle = reads == c.lent_seen;
                c.lent_seen = reads;
                let mut p = libc::pollfd { fd: c.ch.read_sock.as_raw_fd(), events: libc::POLLIN, revents: 0 };
                // SAFETY: one live pollfd on the channel's open socket, no wait.
                if idle && unsafe { libc::poll(&mut p, 1, 0) } == 1 {
                    readable.push(*t);
                }
            }
        }
        let mut writable: Vec<usize> = Vec::new();
        if ticking && last_tick.elapsed() >= PARK_GRACE {
            last_tick = Instant::now();
            // OPENs and OPEN_OKs held back for a first write that has not come.
            host.send_owed(PARK_GRACE);
            for (t, c) in conns.iter() {
                unpark(&host, &c.ch, PARK_GRACE);
                if c.ch.lazy_due(PARK_GRACE) {
                    writable.push(*t);
                }
            }
        }
        // Channels whose event reported end of stream or an error: read to the end.
        let mut closing: Vec<usize> = std::mem::take(&mut closing_again);
        for ev in events.iter() {
            if ev.token() == WAKER {
                continue;
            }
            if ev.is_read_closed() || ev.is_error() {
                closing.push(ev.token().0);
            }
            if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                readable.push(ev.token().0);
            }
            if ev.is_writable() {
                writable.push(ev.token().0);
            }
        }
        let commands = std::mem::take(&mut host.workers[me].commands.lock().unwrap().0);
        for c in commands {
            match c {
                Command::Add(ch) => {
                    let token = ch.token;
                    let fd = ch.read_sock.as_raw_fd();
                    let mut w = ch.watch.lock().unwrap();
                    // Read interest only: write interest comes with a blocked flush.
                    if let Err(e) =
                        poll.registry().register(&mut SourceFd(&fd), Token(token), Interest::READABLE)
                    {
                        drop(w);
                        tracing::error!(class = ch.class.name(), index = ch.index, error = %e, "cannot register a channel");
                        channel_down(&host, &ch, Down::Io { op: "register", error: e });
                        continue;
                    }
                    w.registered = true;
                    drop(w);
                    conns.insert(token, Conn { ch, lent_seen: 0, frames_seen: 0 });
                    readable.push(token);
                    writable.push(token);
                }
                Command::Kick(t) => writable.push(t),
                Command::Close(t) => {
                    if let Some(c) = conns.remove(&t) {
                        c.unregister(&poll);
                        let _ = c.ch.read_sock.shutdown(std::net::Shutdown::Both);
                        channel_down(&host, &c.ch, Down::Closed);
                    }
                }
                Command::Stop => {
                    let mut bye = Vec::new();
                    let msg = "host shutting down";
                    Frame::Reset { vsock: 0, reason: wire::Reason::Shutdown, message: msg }.encode(&mut bye);
                    for (_, c) in conns.drain() {
                        // Best effort: tell the peer this is an orderly shutdown. Only when no
                        // frame is half written, so the RESET starts on a frame boundary.
                        if let Ok(w) = c.ch.writer.lock() {
                            if let (true, Some(s)) = (w.out.is_empty(), w.sock.as_ref()) {
                                let _ = (&*s).write(&bye);
                            }
                        }
                        c.unregister(&poll);
                        c.ch.up.store(false, Ordering::Release);
                        c.ch.close_writer();
                        c.ch.clear();
                    }
                    // Channels handed over after the stop are closed, not left half open.
                    let late = {
                        let mut q = host.workers[me].commands.lock().unwrap();
                        q.1 = true;
                        std::mem::take(&mut q.0)
                    };
                    for c in late {
                        if let Command::Add(ch) = c {
                            ch.up.store(false, Ordering::Release);
                            ch.close_writer();
                        }
                    }
                    return;
                }
            }
        }
        for t in readable {
            let Some(conn) = conns.get(&t) else { continue };
            // An app thread reading inline has it: it reads what arrived, and the edge for
            // anything it leaves comes back when it gives the channel back.
            let Ok(mut rd) = conn.ch.reader.try_lock() else { continue };
            let res = read_some(&host, &conn.ch, &mut rd, &|| false, !closing.contains(&t));
            drop(rd);
            match res {
                Ok(true) => {
                    again.push(t);
                    if closing.contains(&t) {
                        closing_again.push(t);
                    }
                }
                Ok(false) => {}
                Err(reason) => {
                    if let Some(c) = conns.remove(&t) {
                        c.unregister(&poll);
                        channel_down(&host, &c.ch, reason);
                    }
                    continue;
                }
            }
        }
        crate::engine::vsocket::spin_for_replies(reply_spin);
        writable.sort_unstable();
        writable.dedup();
        for t in writable {
            let Some(conn) = conns.get(&t) else { continue };
            let res = conn.ch.flush_from_worker().and_then(|blocked| conn.ch.want_write(&host, blocked));
            if let Err(e) = res {
                if let Some(c) = conns.remove(&t) {
                    c.unregister(&poll);
                    channel_down(&host, &c.ch, Down::Io { op: "write", error: e });
                }
            }
        }
    }
}

/// Poll for events; with a `spin` budget, poll without sleeping for up to that long first.
fn poll_spinning(
    poll: &mut Poll,
    events: &mut Events,
    timeout: Option<Duration>,
    spin: Duration,
) -> io::Result<()> {
    let start = std::time::Instant::now();
    loop {
        let t = if spin.is_zero() || start.elapsed() >= spin { timeout } else { Some(Duration::ZERO) };
        match poll.poll(events, t) {
            Ok(()) if events.is_empty() && t == Some(Duration::ZERO) && timeout != Some(Duration::ZERO) => {
                std::hint::spin_loop();
            }
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Read and dispatch until the socket would block (`Ok(false)`), the read budget is spent
/// (`Ok(true)`) or `enough` says the caller has what it waited for (`Ok(false)`: an inline
/// reader stops there, and handing the channel back re-arms the worker's edge for the rest).
///
/// With `short_read_drains`, a read that fills less than the free buffer also ends it
/// (`Ok(false)`): the socket's queue was empty then, and for the worker's edge-triggered
/// poll every later arrival is a new edge, so the read that would only say EAGAIN is
/// spared (one system call per wake-up). The worker passes it only when its event did not
/// report end of stream or an error, which a short read could leave unread behind the data.
fn read_some(
    host: &Arc<HostInner>,
    ch: &Arc<Channel>,
    c: &mut Reader,
    enough: &dyn Fn() -> bool,
    short_read_drains: bool,
) -> Result<bool, Down> {
    let res = read_frames(host, ch, c, enough, short_read_drains);
    if res.is_err() || !ch.up.load(Ordering::Acquire) {
        c.abandon_direct();
    }
    res
}

/// DATA payloads of at least this many bytes are read straight into the receive ring
/// ([`Direct`]); smaller ones go through the read buffer, which takes many frames per read.
const DIRECT_MIN: usize = 16 << 10;

fn read_frames(
    host: &Arc<HostInner>,
    ch: &Arc<Channel>,
    c: &mut Reader,
    enough: &dyn Fn() -> bool,
    short_read_drains: bool,
) -> Result<bool, Down> {
    let mut budget = READ_BUDGET;
    loop {
        let (res, room) = match &c.direct {
            Some(d) => {
                let room = (d.len - d.done) as usize + HEADER_LEN;
                (read_direct(ch, c), room)
            }
            None => {
                if c.rend == c.rbuf.len() {
                    // Make room: move the partial frame to the front, or grow for a large one.
                    if c.rstart > 0 {
                        c.rbuf.copy_within(c.rstart..c.rend, 0);
                        c.rend -= c.rstart;
                        c.rstart = 0;
                    } else {
                        let n = c.rbuf.len() * 2;
                        c.rbuf.resize(n.min(HEADER_LEN + wire::MAX_SEGMENT).max(c.rend + 1), 0);
                    }
                }
                let mut room = c.rbuf.len() - c.rend;
                let have = c.rend - c.rstart;
                if c.expect_direct && have < HEADER_LEN {
                    room = room.min(HEADER_LEN - have);
                }
                let res = (&ch.read_sock).read(&mut c.rbuf[c.rend..c.rend + room]).inspect(|&n| c.rend += n);
                (res, room)
            }
        };
        match res {
            Ok(0) => return Err(Down::PeerClosed),
            Ok(n) => {
                let drained = short_read_drains && n < room;
                ch.counters.bytes_received.fetch_add(n as u64, Ordering::Relaxed);
                if c.direct.as_ref().is_some_and(|d| d.done == d.len) {
                    let d = c.direct.take().expect("checked");
                    c.expect_direct = true;
                    ch.counters.frames_received.fetch_add(1, Ordering::Relaxed);
                    d.vs.finish_rx(d.offset, d.len, d.ack_request);
                }
                if c.direct.is_none() {
                    parse(host, ch, c)?;
                }
                if drained || enough() {
                    return Ok(false);
                }
                budget = budget.saturating_sub(n);
                if budget == 0 {
                    return Ok(true);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Down::Io { op: "read", error: e }),
        }
    }
}

/// One `readv` of the rest of the payload being read straight into its receive ring, and
/// of the next frame's header behind it (into the empty read buffer): the header says
/// whether the next payload goes the same way. Returns the bytes read.
fn read_direct(ch: &Channel, c: &mut Reader) -> io::Result<usize> {
    let d = c.direct.as_mut().expect("a direct read");
    let rest = (d.len - d.done) as usize;
    let [a, b] = d.vs.rx_parts(d.offset + u64::from(d.done), rest);
    debug_assert!(c.rstart == 0 && c.rend == 0, "read buffer not empty during a direct read");
    let iov = [
        libc::iovec { iov_base: a.ptr.cast(), iov_len: a.len },
        libc::iovec { iov_base: b.ptr.cast(), iov_len: b.len },
        libc::iovec { iov_base: c.rbuf.as_mut_ptr().cast(), iov_len: HEADER_LEN },
    ];
    // SAFETY: the first two iovecs are the ring range this reader claimed (nobody else
    // writes or reads it until the claim ends, module docs of `crate::engine::vsocket`), kept mapped by
    // the `Arc<VSock>`; the third is the start of the read buffer (at least HEADER_LEN long).
    let n = unsafe { libc::readv(ch.read_sock.as_raw_fd(), iov.as_ptr(), 3) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    let into_ring = n.min(rest);
    d.done += into_ring as u32;
    c.rend = n - into_ring;
    Ok(n)
}

fn parse(host: &Arc<HostInner>, ch: &Arc<Channel>, c: &mut Reader) -> Result<(), Down> {
    loop {
        match wire::decode(&c.rbuf[c.rstart..c.rend]) {
            Ok((frame, used)) => {
                c.expect_direct = matches!(frame, Frame::Data { payload, .. } if payload.len() >= DIRECT_MIN);
                ch.counters.frames_received.fetch_add(1, Ordering::Relaxed);
                host.dispatch(ch, frame)?;
                c.rstart += used;
            }
            Err(wire::WireError::Incomplete { needed }) => {
                if start_direct(host, ch, c) {
                    return Ok(());
                }
                if c.rstart == c.rend {
                    c.rstart = 0;
                    c.rend = 0;
                }
                if needed > c.rbuf.len() - c.rstart && c.rstart > 0 {
                    c.rbuf.copy_within(c.rstart..c.rend, 0);
                    c.rend -= c.rstart;
                    c.rstart = 0;
                }
                if needed > c.rbuf.len() {
                    c.rbuf.resize(needed, 0);
                }
                return Ok(());
            }
            Err(e) => {
                host.totals.bad_frames.fetch_add(1, Ordering::Relaxed);
                let from =
                    ch.read_sock.peer_addr().map_or_else(|_| "an unknown address".into(), |a| a.to_string());
                static MALFORMED: super::handshake::Throttle = super::handshake::Throttle::new();
                if let Some(n) = MALFORMED.allow() {
                    tracing::warn!(from = %from, class = ch.class.name(), index = ch.index, error = %e, suppressed = n, "closing a channel: it sent a malformed frame");
                }
                return Err(Down::Malformed(e));
            }
        }
    }
}

/// The read buffer ends in an incomplete frame: if it is a DATA frame with a large payload
/// for a vsocket of this channel's peer that can take all of it, claim the payload's range
/// in the receive ring, copy the part already read there and read the rest straight into
/// it ([`Direct`]); the read buffer is empty then. `false` (nothing done) otherwise.
fn start_direct(host: &Arc<HostInner>, ch: &Arc<Channel>, c: &mut Reader) -> bool {
    let buf = &c.rbuf[c.rstart..c.rend];
    let Some(head) = wire::decode_data_head(buf) else { return false };
    if (head.len as usize) < DIRECT_MIN {
        return false;
    }
    // As `dispatch` does: a vsocket's frames are only taken from its own peer's channels.
    let Some(vs) = host.vsock(head.vsock).filter(|v| std::ptr::eq(Arc::as_ptr(&v.peer), ch.peer.as_ptr()))
    else {
        return false;
    };
    let Some([a, b]) = vs.claim_rx(head.offset, head.len) else { return false };
    let have = &buf[HEADER_LEN..];
    let (h0, h1) = have.split_at(have.len().min(a.len));
    // SAFETY: the claimed range, which only this reader writes (module docs of
    // `crate::engine::vsocket`); `have` is shorter than the payload, so both copies fit their parts.
    unsafe {
        std::ptr::copy_nonoverlapping(h0.as_ptr(), a.ptr, h0.len());
        std::ptr::copy_nonoverlapping(h1.as_ptr(), b.ptr, h1.len());
    }
    c.direct = Some(Direct {
        vs,
        offset: head.offset,
        len: head.len,
        ack_request: head.ack_request,
        done: have.len() as u32,
    });
    c.rstart = 0;
    c.rend = 0;
    true
}

/// Most pieces one `writev` takes (the kernel's `IOV_MAX`); a batch needing more is written
/// in several calls.
const MAX_IOV: usize = 1024;
/// `ioctl` request: bytes in a TCP socket's send queue not yet sent (`linux/sockios.h`).
const SIOCOUTQNSD: libc::c_ulong = 0x894B;

/// One piece of gathered output.
enum Piece {
    /// Bytes `start..end` of [`Output::buf`] (headers and control frames).
    Buf { start: usize, end: usize },
    /// Payload bytes straight from a vsocket's send ring, which the `Arc` keeps allocated.
    Ring { _vs: Arc<VSock>, ptr: *const u8, len: usize },
}

impl Piece {
    fn len(&self) -> usize {
        match self {
            Piece::Buf { start, end } => end - start,
            Piece::Ring { len, .. } => *len,
        }
    }
}

/// Frames gathered for one channel and not yet written: headers and control frames are
/// copied into a buffer, segment payloads are written from the send rings without a copy.
#[derive(Default)]
pub(crate) struct Output {
    buf: Vec<u8>,
    pieces: VecDeque<Piece>,
    /// Bytes of the first piece already written.
    head_done: usize,
    /// Large payloads go to the socket by `vmsplice` + `splice` (`splice_send`).
    splice: bool,
    /// The pipe they go through, once one was needed.
    pipe: Option<SplicePipe>,
}

/// Payload pieces at least this long are spliced (`splice_send`); shorter ones, and every
/// header, are written by `writev` (a header's buffer is reused at once, so the kernel must
/// copy it).
const SPLICE_MIN: usize = 64 << 10;

/// The pipe a channel's large payloads pass through on their way from the send rings to the
/// socket: `vmsplice` puts references to the ring's pages in it, `splice` moves them into
/// the socket's queue, so the kernel does not copy the bytes on the way. The pages stay
/// referenced until the receiving TCP has them (on loopback, until the peer read them); the
/// ring rewrites them only after the peer acknowledged them, so what the socket carries is
/// what was written (the same argument as for `writev`, which copies at once: module docs
/// of `engine::vsocket`).
struct SplicePipe {
    r: std::os::fd::OwnedFd,
    w: std::os::fd::OwnedFd,
    /// Bytes in the pipe, not yet in the socket.
    pending: usize,
}

impl SplicePipe {
    fn new() -> io::Result<SplicePipe> {
        use std::os::fd::FromRawFd;
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two descriptors into `fds`.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both are fresh descriptors owned by nobody else.
        let (r, w) =
            unsafe { (std::os::fd::OwnedFd::from_raw_fd(fds[0]), std::os::fd::OwnedFd::from_raw_fd(fds[1])) };
        // A larger pipe takes a whole segment at once; the default (64 KiB) still works.
        // SAFETY: fcntl on our own descriptor.
        unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, 1 << 20) };
        Ok(SplicePipe { r, w, pending: 0 })
    }

    /// Move what the pipe holds into `sock`; the bytes moved.
    fn drain(&mut self, sock: &std::net::TcpStream) -> io::Result<usize> {
        use std::os::fd::AsRawFd;
        // SAFETY: splice between two descriptors we own; no memory is passed.
        let n = unsafe {
            libc::splice(
                self.r.as_raw_fd(),
                std::ptr::null_mut(),
                sock.as_raw_fd(),
                std::ptr::null_mut(),
                self.pending,
                libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        self.pending -= n as usize;
        Ok(n as usize)
    }
}

// SAFETY: the raw pointers in `Piece::Ring` point into rings owned by the `Arc<VSock>` stored
// beside them; an `Output` is only ever used by the one channel worker that owns it.
unsafe impl Send for Output {}

impl Output {
    /// Nothing gathered is left to write (nothing waits in the splice pipe either).
    pub(crate) fn is_empty(&self) -> bool {
        self.pieces.is_empty() && self.pipe.as_ref().is_none_or(|p| p.pending == 0)
    }

    /// Forget what was gathered (written, or written by the splice pipe's last `vmsplice`).
    pub(crate) fn clear(&mut self) {
        self.buf.clear();
        self.pieces.clear();
        self.head_done = 0;
    }

    fn push_bytes(&mut self, bytes: &[u8]) {
        let start = self.buf.len();
        self.buf.extend_from_slice(bytes);
        let end = self.buf.len();
        match self.pieces.back_mut() {
            Some(Piece::Buf { end: e, .. }) if *e == start => *e = end,
            _ => self.pieces.push_back(Piece::Buf { start, end }),
        }
    }

    /// Move one batch of frames from the channel's queue (at most `write_batch` bytes and
    /// `write_batch_frames` frames): control first, then latency segments, then bulk ones
    /// unless `urgent_only`. The queue lock is taken per frame, never while a vsocket's is.
    fn gather(&mut self, ch: &Channel, urgent_only: bool) {
        self.clear();
        let mut batch = Batch::new(ch.batch.0, ch.batch.1);
        loop {
            let next = ch.out.lock().unwrap().pop_within(&mut batch, urgent_only);
            let (vs, offset, len, ack_request) = match next {
                None => break,
                Some(Next::Control(f)) => {
                    self.push_bytes(&f);
                    ch.counters.frames_sent.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                Some(Next::Segment(s)) => s,
            };
            let view = vs.segment_view(offset, len, ack_request);
            let sent = view.as_ref().map_or(0, |(_, parts)| HEADER_LEN + parts[0].len + parts[1].len);
            let skipped = (HEADER_LEN + len as usize) - sent;
            if skipped > 0 {
                ch.queued.fetch_sub(skipped, Ordering::Relaxed);
            }
            let Some((header, parts)) = view else { continue };
            self.push_bytes(&header);
            for p in parts.into_iter().filter(|p| p.len > 0) {
                self.pieces.push_back(Piece::Ring { _vs: vs.clone(), ptr: p.ptr, len: p.len });
            }
            ch.counters.frames_sent.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// One write of the gathered pieces: what the splice pipe holds first, then a large
    /// payload by the pipe (`splice_send`), else one `writev` of the pieces up to the next
    /// large payload. Returns the bytes that reached the socket.
    fn write_to(&mut self, sock: &std::net::TcpStream) -> io::Result<usize> {
        use std::os::fd::AsRawFd;
        if let Some(p) = self.pipe.as_mut().filter(|p| p.pending > 0) {
            return p.drain(sock);
        }
        let large = |p: &Piece, skip: usize| matches!(p, Piece::Ring { len, .. } if len - skip >= SPLICE_MIN);
        if self.splice {
            let front = match self.pieces.front() {
                Some(p @ Piece::Ring { ptr, len, .. }) if large(p, self.head_done) => Some((*ptr, *len)),
                _ => None,
            };
            if let Some((ptr, len)) = front {
                if self.pipe.is_none() {
                    match SplicePipe::new() {
                        Ok(p) => self.pipe = Some(p),
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot create a pipe to splice payloads: written by writev");
                            self.splice = false;
                        }
                    }
                }
                if let Some(pipe) = self.pipe.as_mut() {
                    // SAFETY: head_done < len for the first piece.
                    let iov = libc::iovec {
                        iov_base: unsafe { ptr.add(self.head_done) } as *mut _,
                        iov_len: len - self.head_done,
                    };
                    // SAFETY: the iovec points into a send ring kept alive by the piece's
                    // `Arc<VSock>` (and its pages by the pipe and the socket once spliced);
                    // see `SplicePipe` for why the bytes stay as written.
                    let n = unsafe { libc::vmsplice(pipe.w.as_raw_fd(), &iov, 1, libc::SPLICE_F_NONBLOCK) };
                    if n < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    pipe.pending = n as usize;
                    let moved = pipe.drain(sock);
                    self.advance(n as usize);
                    return moved;
                }
            }
        }
        let mut iov: Vec<libc::iovec> = Vec::with_capacity(self.pieces.len().min(MAX_IOV));
        for (i, p) in self.pieces.iter().take(MAX_IOV).enumerate() {
            if self.splice && i > 0 && large(p, 0) {
                // Spliced by the next call.
                break;
            }
            let skip = if i == 0 { self.head_done } else { 0 };
            let (base, len) = match p {
                Piece::Buf { start, end } => (self.buf[*start..*end].as_ptr(), end - start),
                Piece::Ring { ptr, len, .. } => (*ptr, *len),
            };
            // SAFETY: skip < len for the first piece (fully written pieces are popped).
            iov.push(libc::iovec { iov_base: unsafe { base.add(skip) } as *mut _, iov_len: len - skip });
        }
        // SAFETY: every iovec points into `self.buf` or into a send ring kept alive by its
        // `Arc<VSock>`. Ring bytes of a queued segment are only rewritten by the application
        // after the peer acknowledged them, i.e. when this copy is a duplicate the receiver
        // discards (see `VSock::segment_view`); the kernel only reads them.
        let n = unsafe { libc::writev(sock.as_raw_fd(), iov.as_ptr(), iov.len() as libc::c_int) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        self.advance(n as usize);
        Ok(n as usize)
    }

    /// `n` more bytes of the gathered pieces are written (or in the splice pipe).
    fn advance(&mut self, n: usize) {
        let mut left = n;
        while left > 0 {
            let first = self.pieces.front().expect("wrote more than gathered").len() - self.head_done;
            if left >= first {
                left -= first;
                self.pieces.pop_front();
                self.head_done = 0;
            } else {
                self.head_done += left;
                left = 0;
            }
        }
    }
}

/// A channel died: take it out of its peer and let the NetDriver recover.
pub(crate) fn channel_down(host: &Arc<HostInner>, ch: &Arc<Channel>, reason: Down) {
    if !ch.up.swap(false, Ordering::AcqRel) {
        return;
    }
    ch.close_writer();
    ch.clear();
    ch.queued.store(0, Ordering::Relaxed);
    // A payload half read into a receive ring will not come whole on this channel. Whoever
    // reads the channel now meets the shutdown just made and lets go of the reader.
    ch.reader.lock().unwrap().abandon_direct();
    if let Some(peer) = ch.peer.upgrade() {
        host.on_channel_down(&peer, ch, &reason);
    }
}

/// How one [`read_lent`] ended.
#[cfg(feature = "tokio")]
pub(crate) enum LentRead {
    /// Everything that had arrived was read: wait for the socket's next readable edge.
    Drained,
    /// The read budget ran out, or another thread holds the reader for a moment: read again
    /// soon.
    Again,
    /// The channel failed (it is down now) or is not up.
    Down,
}

/// Lend the reading of `ch` to an async runtime (`crate::tokio`): the worker stops polling
/// it for reading, and the borrower reads it with [`read_lent`] whenever its own reactor
/// reports the socket readable, until it gives it back with [`end_lend`]. Returns `false`
/// (nothing lent) when an app thread reads the channel inline or the worker does not poll
/// it. Like [`read_inline`], this is what spares the wake-up of the worker and then of the
/// reader: a frame's arrival wakes the runtime alone.
#[cfg(feature = "tokio")]
pub(crate) fn lend(host: &HostInner, ch: &Channel) -> bool {
    ch.up.load(Ordering::Acquire) && ch.set_lent(host, true)
}

/// Whether [`lend`] would lend `ch` now: its worker has taken it in (polls it) and no
/// runtime borrows it.
#[cfg(feature = "tokio")]
pub(crate) fn lend_would_take(ch: &Channel) -> bool {
    let w = ch.watch.lock().unwrap();
    ch.up.load(Ordering::Acquire) && w.registered && !w.lent
}

/// Give a lent channel back to its worker (re-arming the worker's interest reports an
/// edge for whatever is left unread).
#[cfg(feature = "tokio")]
pub(crate) fn end_lend(host: &HostInner, ch: &Channel) {
    ch.set_lent(host, false);
}

/// The descriptor a borrower polls for the lent channel's arrivals (the borrower registers
/// a duplicate of it; it lives as long as the channel).
#[cfg(feature = "tokio")]
pub(crate) fn read_fd(ch: &Channel) -> RawFd {
    ch.read_sock.as_raw_fd()
}

/// Read and dispatch what arrived on a lent channel, from the borrower's thread. A failure
/// takes the channel down, after giving it back to its worker.
#[cfg(feature = "tokio")]
pub(crate) fn read_lent(host: &Arc<HostInner>, ch: &Arc<Channel>) -> LentRead {
    if !ch.up.load(Ordering::Acquire) {
        return LentRead::Down;
    }
    let Ok(mut rd) = ch.reader.try_lock() else { return LentRead::Again };
    ch.lent_reads.fetch_add(1, Ordering::Relaxed);
    let woken = crate::readiness::tasks_woken();
    let res = read_some(host, ch, &mut rd, &|| false, false);
    drop(rd);
    let woke = crate::readiness::tasks_woken().wrapping_sub(woken);
    if woke > 0 {
        ch.fan_out.store(woke.min(u32::MAX as u64) as u32, Ordering::Relaxed);
    }
    match res {
        Ok(false) => LentRead::Drained,
        Ok(true) => LentRead::Again,
        Err(reason) => {
            end_lend(host, ch);
            channel_down(host, ch, reason);
            LentRead::Down
        }
    }
}

/// What [`read_inline`] reads: one vsocket's home channel, or every channel of the host
/// that is parked (a blocking accept, whose arrivals may come on any channel).
pub(crate) enum InlineTarget<'a> {
    /// The channel that carries what the caller waits for.
    Channel(&'a Arc<Channel>),
    /// The host's parked channels (nobody else polls them).
    Parked,
}

/// Read channels from the calling app thread until `done()` holds, `deadline` passes or a
/// read channel fails, sleeping in `poll(2)` on their sockets and on `kick` (the calling
/// thread's eventfd, which other threads write when what `done` waits for arrives by
/// another way). Every frame read is dispatched as the worker would. Returns `false`,
/// having done nothing, when there is nothing to read this way: the target channel's worker
/// (or another app thread) is reading it or it is not up, or (for
/// [`InlineTarget::Parked`]) no channel is parked. The caller then waits as usual.
///
/// With [`InlineTarget::Parked`] the caller counts as a sleeper ([`Sleeping`]) while it
/// waits: a channel that another thread would park meanwhile goes back to its worker
/// instead, so an arrival on it is not left unread. Such a wait that finds itself reading
/// bulk for others (more than [`READ_BUDGET`] bytes) ends and gives the channels back to
/// their workers.
///
/// The caller holds no vsocket lock, and publishes `kick` before it first checks `done`.
pub(crate) fn read_inline(
    host: &Arc<HostInner>,
    target: InlineTarget<'_>,
    kick: RawFd,
    deadline: Option<Instant>,
    done: impl Fn() -> bool,
) -> bool {
    let parked_list: Vec<Arc<Channel>>;
    let chans: &[Arc<Channel>] = match target {
        InlineTarget::Channel(ch) => std::slice::from_ref(ch),
        InlineTarget::Parked => {
            if !host.parking.any() {
                return false;
            }
            // Counted first, then the list read: a channel parked after the look below
            // sees this thread sleeping and goes back to its worker (see `park`).
            host.parking.sleepers.fetch_add(1, Ordering::SeqCst);
            parked_list = host.parking.parked.lock().unwrap().clone();
            &parked_list
        }
    };
    let parked_only = matches!(target, InlineTarget::Parked);
    // Each channel read, its reader, and whether the last poll reported it readable.
    let mut held: Vec<(&Arc<Channel>, std::sync::MutexGuard<'_, Reader>, bool)> =
        Vec::with_capacity(chans.len());
    for ch in chans {
        if !ch.up.load(Ordering::Acquire) {
            continue;
        }
        let Ok(mut rd) = ch.reader.try_lock() else { continue };
        if ch.parked.load(Ordering::SeqCst) {
            // Parked by the last inline read: the worker's interest is still off.
            unmark(host, ch, &mut rd);
        } else if parked_only || !ch.set_inline(host, true) {
            // Taken back by its worker meanwhile: the worker reads it.
            continue;
        }
        held.push((ch, rd, false));
    }
    if held.is_empty() {
        if parked_only {
            host.parking.sleepers.fetch_sub(1, Ordering::SeqCst);
        }
        return false;
    }
    let mut failed: Vec<(&Arc<Channel>, Down)> = Vec::new();
    let mut down: Vec<&Arc<Channel>> = Vec::new();
    // Bytes the held channels had carried when the wait began: a wait on parked channels
    // that finds itself reading bulk for others (more than READ_BUDGET) gives them back to
    // their workers, which spread it over cores, rather than serve it from this thread.
    let carried = |held: &[(&Arc<Channel>, std::sync::MutexGuard<'_, Reader>, bool)]| -> u64 {
        held.iter().map(|(ch, _, _)| ch.counters.bytes_received.load(Ordering::Relaxed)).sum()
    };
    let carried_before = carried(&held);
    let mut bulk = false;
    // The caller found nothing to read, so the sockets are most likely empty too: ask
    // poll(2) first (it returns at once if not) rather than read to hear EAGAIN.
    let mut fds: Vec<libc::pollfd> = Vec::with_capacity(held.len() + 1);
    // Poll without sleeping for a while first (`inline_spin_us`): an answer that comes
    // within it costs no wake-up, which on a VM costs tens of µs. Not while bulk moves
    // through the host, nor with one CPU: the spinning thread would take the core the
    // bulk (or the answer's sender) needs.
    let spin_until = (host.inline_spin > Duration::ZERO && !host.totals.bulk_recent())
        .then(|| Instant::now() + host.inline_spin);
    loop {
        // poll(2) below is level-triggered: it reports whatever a short read left, so a
        // short read drains. Every channel it reported is read, even once `done` holds:
        // what came for others is not left behind on a channel nobody polls.
        let mut i = 0;
        while i < held.len() {
            let (ch, rd, readable) = &mut held[i];
            if std::mem::take(readable) {
                if let Err(reason) = read_some(host, ch, rd, &done, true) {
                    let (ch, rd, _) = held.remove(i);
                    drop(rd);
                    failed.push((ch, reason));
                    continue;
                }
            }
            i += 1;
        }
        if done() || (!parked_only && !failed.is_empty()) {
            break;
        }
        if parked_only && carried(&held).saturating_sub(carried_before) > READ_BUDGET as u64 {
            bulk = true;
            break;
        }
        // A channel taken down meanwhile (by its worker or another thread) is left alone.
        let mut i = 0;
        while i < held.len() {
            if held[i].0.up.load(Ordering::Acquire) {
                i += 1;
            } else {
                let (ch, rd, _) = held.remove(i);
                drop(rd);
                down.push(ch);
            }
        }
        if held.is_empty() {
            break;
        }
        let spinning = spin_until.is_some_and(|t| Instant::now() < t);
        let timeout = match deadline {
            _ if spinning => 0,
            None => -1,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                // Round up: a poll that returns before the deadline would just come back.
                left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32
            }
        };
        fds.clear();
        fds.extend(held.iter().map(|(ch, _, _)| libc::pollfd {
            fd: ch.read_sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }));
        fds.push(libc::pollfd { fd: kick, events: libc::POLLIN, revents: 0 });
        // SAFETY: live pollfds on open descriptors (each channel's socket lives as long as
        // its channel, which `chans` holds; the eventfd as long as the caller's thread).
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if r < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            break;
        }
        for (h, f) in held.iter_mut().zip(&fds) {
            h.2 = f.revents != 0;
        }
        if fds[held.len()].revents & libc::POLLIN != 0 {
            let mut v = 0u64;
            // SAFETY: reads 8 bytes into a live u64 from the eventfd.
            unsafe { libc::read(kick, (&mut v as *mut u64).cast(), 8) };
        }
    }
    if parked_only {
        host.parking.sleepers.fetch_sub(1, Ordering::SeqCst);
    }
    for (ch, mut rd, _) in held {
        if !bulk && ch.up.load(Ordering::Acquire) && park(host, ch, &mut rd) {
            continue;
        }
        drop(rd);
        down.push(ch);
    }
    // Back to the worker: re-arming its read interest reports an edge for what is left (and
    // for a failed channel, the end its worker then meets, taking it out of its poll).
    for ch in down.into_iter().chain(failed.iter().map(|(ch, _)| *ch)) {
        ch.set_inline(host, false);
    }
    for (ch, reason) in failed {
        channel_down(host, ch, reason);
    }
    true
}
/// How long a channel stays parked after an inline read before its worker takes it back
/// (and how often a worker with parked channels looks). What arrives meanwhile for a
/// vsocket nobody waits on inline waits at most about twice this.
pub(crate) const PARK_GRACE: Duration = Duration::from_millis(1);

/// Channels parked by inline reads ([`park`]), and how many threads of the host sleep
/// waiting for something channels carry without reading one themselves ([`Sleeping`]).
/// While any does, no channel is parked: what it waits for must not sit on a channel that
/// nobody polls.
#[derive(Default)]
pub(crate) struct Parking {
    sleepers: AtomicUsize,
    parked: Mutex<Vec<Arc<Channel>>>,
    any: AtomicBool,
}

impl Parking {
    /// Whether any channel of the host is parked (one atomic load: callers look before they
    /// search for a channel to take back).
    pub(crate) fn any(&self) -> bool {
        self.any.load(Ordering::SeqCst)
    }
}

/// A thread of the host sleeping (on a condition variable) until a frame changes what it
/// waits for — a read, a write waiting for credit, a connect, an accept — without reading a
/// channel itself: parked channels go back to their workers first, and none is parked
/// until it wakes.
pub(crate) struct Sleeping<'a>(&'a HostInner);

impl<'a> Sleeping<'a> {
    pub(crate) fn new(host: &'a HostInner) -> Sleeping<'a> {
        host.parking.sleepers.fetch_add(1, Ordering::SeqCst);
        if host.parking.any() {
            let parked = std::mem::take(&mut *host.parking.parked.lock().unwrap());
            for ch in parked {
                unpark(host, &ch, Duration::ZERO);
            }
        }
        Sleeping(host)
    }
}

impl Drop for Sleeping<'_> {
    fn drop(&mut self) {
        self.0.parking.sleepers.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Leave `ch` parked after an inline read (the caller holds its reader, `rd`); `false`
/// (nothing done) while another thread of the host sleeps waiting for a frame. Parked, the
/// worker still does not poll the channel, so the next inline wait on it — most often the
/// same thread's, one round trip later — starts without changing the worker's interest,
/// and a frame that arrives in between wakes the thread that will read it, not the worker.
/// This is Linux's preferred busy polling (`SO_PREFER_BUSY_POLL` with `gro_flush_timeout`):
/// the interrupt stays off while the application keeps coming back, and a timer turns it on
/// when it does not. A thread that starts to wait otherwise ([`Sleeping`], or an async task
/// registering) takes parked channels back at once; the worker takes back a channel parked
/// longer than [`PARK_GRACE`].
fn park(host: &HostInner, ch: &Arc<Channel>, rd: &mut Reader) -> bool {
    let p = &host.parking;
    // A daemon's own inline waits (a connect it makes for a client) never come back to read:
    // its vsockets are read by other processes, through shared memory.
    if host.shm_rings || p.sleepers.load(Ordering::SeqCst) > 0 {
        return false;
    }
    rd.parked_at = Some(Instant::now());
    ch.parked.store(true, Ordering::SeqCst);
    p.parked.lock().unwrap().push(ch.clone());
    p.any.store(true, Ordering::SeqCst);
    // Parked first, then look at the sleepers; a sleeper counts itself first, then looks
    // for parked channels: one of the two sees the other.
    if p.sleepers.load(Ordering::SeqCst) > 0 {
        unmark(host, ch, rd);
        return false;
    }
    let w = &host.workers[ch.worker];
    if !w.ticking.swap(true, Ordering::SeqCst) {
        let _ = w.waker.wake();
    }
    true
}

/// `ch` is parked no more (the caller holds its reader, `rd`): clear its mark and take it
/// off the host's list. Its worker's interest is left as it is.
fn unmark(host: &HostInner, ch: &Arc<Channel>, rd: &mut Reader) {
    ch.parked.store(false, Ordering::SeqCst);
    rd.parked_at = None;
    let mut list = host.parking.parked.lock().unwrap();
    list.retain(|c| !Arc::ptr_eq(c, ch));
    host.parking.any.store(!list.is_empty(), Ordering::SeqCst);
}

/// Give a parked channel back to its worker if it has been parked for `at_least` (zero:
/// whenever it is parked). Nothing happens while an app thread reads it (that thread
/// parks it again only if nobody sleeps).
pub(crate) fn unpark(host: &HostInner, ch: &Arc<Channel>, at_least: Duration) {
    if !ch.parked.load(Ordering::SeqCst) {
        return;
    }
    let Ok(mut rd) = ch.reader.try_lock() else { return };
    if !ch.parked.load(Ordering::SeqCst) || rd.parked_at.is_some_and(|t| t.elapsed() < at_least) {
        return;
    }
    unmark(host, ch, &mut rd);
    drop(rd);
    // Re-arming the worker's read interest reports an edge for whatever arrived meanwhile.
    ch.set_inline(host, false);
}

/// Make worker `w` wake every [`PARK_GRACE`] (for a frame owed, `HostInner::owe_frame`),
/// waking it if it was not ticking. Pairs with [`keep_ticking`] as [`park`] does.
pub(crate) fn start_ticking(host: &HostInner, w: usize) {
    let w = &host.workers[w];
    if !w.ticking.swap(true, Ordering::SeqCst) {
        let _ = w.waker.wake();
    }
}

/// Whether worker `w` should keep waking every [`PARK_GRACE`]: while any of its channels
/// is parked or holds a lazy frame, or a vsocket owes a frame (`HostInner::owe_frame`). Clearing `ticking` and then looking again pairs with
/// [`park`], which sets a channel parked and then `ticking` (and with
/// [`Channel::push_lazy`], which marks the channel and then looks at `ticking`): one of the
/// two sees the other.
///
/// A channel an app thread is reading inline (not parked while it waits, parked again when
/// the read returns) also keeps the worker ticking as long as frames keep coming on it: in a
/// ping-pong the channel is parked and taken again every round trip, and a worker that
/// stopped ticking whenever it looked during a wait would have to be woken by the next
/// [`park`] — an eventfd write, and a wake-up of the worker's thread, in the app's round
/// trip about once in ten. An inline wait that sees nothing (an idle blocking read) lets the
/// worker stop after one more tick.
fn keep_ticking(host: &HostInner, w: &WorkerHandle, conns: &mut HashMap<usize, Conn>) -> bool {
    if !w.ticking.load(Ordering::SeqCst) {
        return false;
    }
    let mut inline_busy = false;
    for c in conns.values_mut() {
        let frames = c.ch.counters.frames_received.load(Ordering::Relaxed);
        inline_busy |= frames != c.frames_seen && c.ch.watch.lock().unwrap().inline;
        c.frames_seen = frames;
    }
    let parked =
        || host.opens_owed() || conns.values().any(|c| c.ch.parked.load(Ordering::SeqCst) || c.ch.has_lazy());
    if inline_busy || parked() {
        return true;
    }
    w.ticking.store(false, Ordering::SeqCst);
    if parked() {
        w.ticking.store(true, Ordering::SeqCst);
        return true;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Host;
    use crate::Config;
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};

    /// Two hosts on loopback addresses of their own (this test process's).
    fn two_hosts() -> (Host, Host) {
        let pid = std::process::id();
        let (b, port) = ((pid % 200) as u8 + 20, 20000 + (pid % 20000) as u16);
        let at = |d| SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, b, 253, d)), port);
        let start = |listen| Host::start(Config { listen, ..Config::default() }).expect("start a host");
        (start(at(1)), start(at(2)))
    }

    /// A reader of a throughput channel claimed a DATA payload's range in a receive ring and
    /// read part of it when the channel dies; the same bytes, sent again meanwhile on another
    /// channel, wait for the claim. Taking the channel down releases the claim, and the bytes
    /// that waited arrive, whole.
    #[test]
    fn a_payload_half_read_into_a_ring_is_released_with_its_channel_and_what_waited_arrives() {
        let (a, b) = two_hosts();
        let l = b.bind(7000).unwrap();
        let _c = a.connect(SocketAddr::new(b.local_addr().ip(), 7000)).unwrap();
        let (s, _) = l.accept().unwrap();
        let inner = b.guard.inner.clone();
        let peer = inner.peers.lock().unwrap().values().next().cloned().expect("B knows A");
        let vs = inner.peer_vsocks(&peer).into_iter().next().expect("the accepted vsocket");
        // A channel of B's peer that no worker serves (none reads it behind the test's back).
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let read_sock = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let _far_end = l.accept().unwrap();
        let write_sock = read_sock.try_clone().unwrap();
        let ch = Channel::new(&inner, &peer, Class::Throughput, 99, read_sock, write_sock);
        let len = 100u32 << 10;
        assert!(vs.claim_rx(0, len).is_some(), "the range is new");
        ch.reader.lock().unwrap().direct =
            Some(Direct { vs: vs.clone(), offset: 0, len, ack_request: false, done: 10 });
        let payload: Vec<u8> = (0..150u32 << 10).map(|i| (i % 251) as u8).collect();
        vs.on_data(0, &payload, false);
        assert_eq!(vs.info().bytes_received, 0, "bytes over a claimed range wait for the claim");
        channel_down(&inner, &ch, Down::Killed);
        assert_eq!(vs.info().bytes_received, payload.len() as u64, "the waiting bytes arrived");
        // Read from the ring, not by the app: host A, which never sent these bytes, resets
        // the vsocket when B acknowledges them.
        let mut got = vec![0u8; payload.len()];
        let [p0, p1] = vs.rx_parts(0, got.len());
        // SAFETY: the range arrived, so nobody writes it again; `got` is ours.
        unsafe {
            std::ptr::copy_nonoverlapping(p0.ptr, got.as_mut_ptr(), p0.len);
            std::ptr::copy_nonoverlapping(p1.ptr, got.as_mut_ptr().add(p0.len), p1.len);
        }
        assert!(got == payload, "the ring holds the bytes that waited");
        drop(s);
    }
}
