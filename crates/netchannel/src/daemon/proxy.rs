//! The readiness proxy: how an unmodified program's descriptor of a vsocket gets the kernel's
//! own poll/select/epoll readiness while its bytes move through the shared rings.
//!
//! Deployment layer, both sides. A proxied vsocket comes with an `AF_UNIX`/`SOCK_SEQPACKET`
//! socketpair: the daemon keeps end **B** (in its [`Region`](crate::shm::Region)), the
//! program's descriptor becomes end **A**. The pair carries readiness records, never data:
//!
//! * **IN**: a one-byte token B → A makes A readable. The daemon sends one whenever it
//!   publishes bytes, FIN or an error and `rx_gate` was not open; the app takes it out when it
//!   has drained the ring (`rx_gate` OPEN → CLOSING → CLOSED), re-checks, and asks the daemon
//!   to re-open (`rx_reopen` and a doorbell) if bytes came in between.
//! * **OUT**: A's send buffer is tiny, and a "base" record always sits unread in B's queue.
//!   When the send ring's free space falls below half, the app sends a plug record and a new
//!   base (`tx_gate` PLUGGED): A is then not writable. When acknowledgements free the ring
//!   the daemon takes the plug and the old base out, and A's EPOLLOUT comes back with its
//!   edge.
//! * **FIN**: `shutdown(B, SHUT_WR)`: A reads as IN|OUT|RDHUP for good.
//! * **error**: the daemon closes B while the base is unread: A reports ERR|HUP and
//!   `SO_ERROR` ECONNRESET.
//! * **lifetime**: B hangs up only when the last descriptor of A — every dup, every forked
//!   child — is closed, exactly TCP's close; the daemon then closes the vsocket (FIN, or RESET
//!   if data was left unread).
//!
//! A blocking read sleeps in `recv(A, MSG_PEEK)` and a blocking write in `poll(A, POLLOUT)`,
//! so `O_NONBLOCK`, `SO_RCVTIMEO`/`SO_SNDTIMEO` set on A, EINTR and SA_RESTART are the
//! kernel's. The app side's read and write locks are futexes in the shared header, so forked
//! processes sharing a vsocket exclude each other as threads do.

use std::cell::Cell;
use std::io::{self, ErrorKind};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use super::client::Client;
use super::regions::Lease;
use super::{unexpected_response, ClassName, Request, Response};
use crate::ring::Ring;
use crate::shm::{
    self, low_water, proxy_send, Region, GATE_CLOSED, GATE_CLOSING, GATE_OPEN, PLUG_MAX, TX_OPEN, TX_PLUGGED,
};
use crate::wire::Class;

/// `SO_SNDBUF` asked for on A (the kernel doubles it).
const A_SNDBUF: libc::c_int = 4096;
/// The record that keeps B's queue non-empty (so that closing B resets A).
const BASE: u8 = b'b';

fn cvt(r: libc::c_int, what: &str) -> io::Result<libc::c_int> {
    if r < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(r)
}

fn set_int(fd: RawFd, level: libc::c_int, name: libc::c_int, v: libc::c_int) -> io::Result<()> {
    // SAFETY: a live int of the stated size.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as _,
        )
    };
    cvt(r, "setsockopt on a readiness proxy").map(drop)
}

fn poll_one(fd: RawFd, events: libc::c_short, timeout_ms: libc::c_int) -> libc::c_short {
    let mut p = libc::pollfd { fd, events, revents: 0 };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut p, 1, timeout_ms) };
    if n > 0 {
        p.revents
    } else {
        0
    }
}

/// Daemon side: a new proxy pair (A, B) with the base record queued on B. A is blocking and
/// close-on-exec until the app says otherwise; B is non-blocking.
pub(crate) fn pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: a live array of two ints.
    cvt(
        unsafe {
            libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr())
        },
        "socketpair for a readiness proxy",
    )?;
    // SAFETY: fresh descriptors owned here.
    let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    set_int(a.as_raw_fd(), libc::SOL_SOCKET, libc::SO_SNDBUF, A_SNDBUF)?;
    // SAFETY: fcntl on our own descriptor.
    unsafe {
        let fl = libc::fcntl(b.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(b.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
    if !proxy_send(a.as_raw_fd(), &[BASE]) {
        return Err(io::Error::last_os_error());
    }
    Ok((a, b))
}

/// The plug record's size: big enough that A is not writable with it queued, found once by
/// trying (it depends on the kernel's per-record overhead).
fn plug_len() -> usize {
    static LEN: OnceLock<usize> = OnceLock::new();
    *LEN.get_or_init(|| plug_len_from(512))
}

fn plug_len_from(mut len: usize) -> usize {
    while len <= PLUG_MAX {
        let Ok((a, _b)) = pair() else { return PLUG_MAX };
        let rec = vec![0u8; len];
        if proxy_send(a.as_raw_fd(), &rec) && poll_one(a.as_raw_fd(), libc::POLLOUT, 0) & libc::POLLOUT == 0 {
            return len;
        }
        len *= 2;
    }
    PLUG_MAX
}

/// How one read treats the call's flags.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReadFlags {
    /// MSG_PEEK: leave the bytes in the ring.
    pub peek: bool,
    /// MSG_WAITALL: wait until the buffer is full (or end of stream, error, signal).
    pub wait_all: bool,
    /// MSG_DONTWAIT, or O_NONBLOCK on A.
    pub nonblocking: bool,
}

/// The app side of a proxied vsocket: its mapping, doorbell and addresses. Shared by every
/// descriptor (dup, fork) of the same vsocket.
pub struct ProxyStream {
    client: Client,
    handle: u64,
    region: Arc<Region>,
    tx: Ring,
    rx: Ring,
    kick: Arc<OwnedFd>,
    local: SocketAddr,
    remote: SocketAddr,
    /// Receive position at the last doorbell rung for reading.
    rx_kicked: AtomicU64,
    shut_rd: AtomicU32,
    /// The IN token was gone when this side came to take it: something that bypassed the
    /// shim read end A (see [`ProxyStream::bypass_found`]).
    bypassed: AtomicU32,
    /// Its slot of the process's pool (`super::regions`), given back with the last handle.
    _lease: Option<Lease>,
}

impl std::fmt::Debug for ProxyStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ProxyStream({} -> {})", self.local, self.remote)
    }
}

/// A futex lock in the shared header.
struct FutexLock<'a>(&'a AtomicU32);

impl<'a> FutexLock<'a> {
    fn take(w: &'a AtomicU32) -> FutexLock<'a> {
        let mut spins = 0;
        while w.compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed).is_err() {
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
            } else if w.swap(2, Ordering::Acquire) == 0 {
                break;
            } else {
                shm::futex_wait(w, 2, Duration::from_millis(10));
            }
        }
        FutexLock(w)
    }
}

impl Drop for FutexLock<'_> {
    fn drop(&mut self) {
        if self.0.swap(0, Ordering::Release) == 2 {
            shm::futex_wake(self.0);
        }
    }
}

/// Doorbells owed by one thread: an event-loop pass defers its writes' kicks to its end.
///
/// A program's event loop wakes from `epoll_wait` (or `poll`, `select`) with several
/// descriptors ready and answers each: redis-server writes fifty replies, then waits again.
/// Kicking the daemon on every write wakes its poller fifty times, and each wake-up takes in
/// one vsocket and writes one frame. Instead, after a wait call that returned `n ≥ 2` ready
/// descriptors ([`batch_doorbells`]), the thread's next `n − 1` kicks are owed rather than
/// rung, and ring together ([`flush_doorbells`]) at the `n`-th kick, or as soon as the thread
/// does anything that could make it wait: its next wait call, a read that would block or say
/// EAGAIN, a write that finds the ring full, accept, connect, close, shutdown, fork, a sleep,
/// or a read of another descriptor (the shim's hooks call `flush_doorbells` there), and when
/// the thread or the process exits. The poller then takes in every vsocket that rang and
/// sends their frames in one write per channel. A thread that never calls a hooked wait
/// function never defers. What stays possible: an event-loop thread that, between two such
/// points, blocks in a call the shim does not see (a futex, `fsync`) delays its owed kicks
/// until it returns; `[preload] eager_doorbells = true` rings on every write instead.
struct Owed {
    /// Kicks that may still be deferred in this pass.
    budget: Cell<u32>,
    len: Cell<usize>,
    fds: [Cell<RawFd>; OWED_MAX],
}

/// Distinct doorbells one pass may owe (the vsockets of a process table share one; accepted
/// vsockets have their own): more ring at once.
const OWED_MAX: usize = 16;

/// Most kicks one pass defers, however many descriptors were ready.
const BUDGET_MAX: usize = 256;

impl Owed {
    fn flush(&self) {
        self.budget.set(0);
        for c in &self.fds[..self.len.replace(0)] {
            shm::eventfd_ring(c.replace(-1));
        }
    }
}

impl Drop for Owed {
    fn drop(&mut self) {
        self.flush();
    }
}

thread_local! {
    static OWED: Owed = const {
        Owed { budget: Cell::new(0), len: Cell::new(0), fds: [const { Cell::new(-1) }; OWED_MAX] }
    };
}

/// Ring doorbell `fd` now, or owe it if this thread is inside an event-loop pass.
fn ring_or_defer(fd: RawFd) {
    let deferred = OWED
        .try_with(|o| {
            let budget = o.budget.get();
            if budget == 0 {
                return false;
            }
            let len = o.len.get();
            if !o.fds[..len].iter().any(|c| c.get() == fd) {
                if len == OWED_MAX {
                    return false;
                }
                o.fds[len].set(fd);
                o.len.set(len + 1);
            }
            o.budget.set(budget - 1);
            if budget == 1 {
                o.flush();
            }
            true
        })
        .unwrap_or(false);
    if !deferred {
        shm::eventfd_ring(fd);
    }
}

/// App side: a wait call of this thread returned `ready` descriptors; if two or more, its
/// next `ready - 1` doorbell kicks are owed and ring with the `ready`-th (see [`Owed`]). Any kicks still owed ring
/// first.
pub fn batch_doorbells(ready: usize) {
    let _ = OWED.try_with(|o| {
        o.flush();
        if ready >= 2 {
            // The n-th kick finds budget 1 and rings them all.
            o.budget.set(ready.min(BUDGET_MAX) as u32);
        }
    });
}

/// App side: ring every doorbell this thread owes, and end its pass (see [`Owed`]).
#[inline]
pub fn flush_doorbells() {
    let _ = OWED.try_with(|o| {
        if o.budget.get() != 0 || o.len.get() != 0 {
            o.flush();
        }
    });
}

fn errno_error(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

impl ProxyStream {
    fn from_response(
        client: &Client,
        resp: Response,
        fds: Vec<OwnedFd>,
    ) -> io::Result<(ProxyStream, OwnedFd)> {
        let Response::Stream { handle, local, remote, slot, mapped, .. } = resp else {
            return Err(unexpected_response(&resp));
        };
        let mut fds = fds.into_iter();
        let adopted = client.table().adopt(slot, mapped, &mut fds)?;
        let (region, kick) = (adopted.region, adopted.kick);
        let Some(a) = fds.next() else {
            return Err(io::Error::new(
                ErrorKind::InvalidData,
                "the daemon sent a vsocket without its proxy",
            ));
        };
        Ok((
            ProxyStream {
                client: client.clone(),
                handle,
                tx: Ring::in_region(&region, true),
                rx: Ring::in_region(&region, false),
                region,
                kick,
                local,
                remote,
                rx_kicked: AtomicU64::new(0),
                shut_rd: AtomicU32::new(0),
                bypassed: AtomicU32::new(0),
                _lease: adopted.lease,
            },
            a,
        ))
    }

    /// This end's vsocket address.
    pub fn local(&self) -> SocketAddr {
        self.local
    }

    /// The peer's vsocket address.
    pub fn remote(&self) -> SocketAddr {
        self.remote
    }

    /// Move the vsocket to another class (asks the daemon; the process that opened it only).
    pub fn set_class(&self, class: Class) -> io::Result<()> {
        self.client
            .request(&Request::SetClass { handle: self.handle, class: ClassName::from(class) })
            .map(drop)
    }

    fn header(&self) -> &shm::Header {
        self.region.header()
    }

    /// The vsocket's error, if it failed.
    pub fn error(&self) -> Option<io::Error> {
        self.header().error()
    }

    /// The errno a failed vsocket gives a call, if it failed.
    pub fn error_code(&self) -> Option<i32> {
        self.error().map(|e| match e.kind() {
            ErrorKind::ConnectionRefused => libc::ECONNREFUSED,
            ErrorKind::TimedOut => libc::ETIMEDOUT,
            ErrorKind::BrokenPipe => libc::EPIPE,
            _ => libc::ECONNRESET,
        })
    }

    /// Whether the vsocket still waits for the peer's answer to its OPEN (an `early`
    /// connect): neither failed nor connected yet.
    pub fn connecting(&self) -> bool {
        self.header().state.load(Ordering::SeqCst) & (shm::OPENING | shm::ERROR) == shm::OPENING
    }

    /// Make end `a` not writable until the connect finishes: the daemon takes the plug out
    /// when the peer's answer clears `OPENING` (or closes B on a failure, which makes A
    /// report ERR|HUP). Call it before `a` is handed to the program.
    pub fn hold_until_connected(&self, a: RawFd) {
        let _one_writer = FutexLock::take(&self.header().tx_lock);
        self.plug(a);
    }

    /// Bytes ready to read (FIONREAD).
    pub fn readable(&self) -> usize {
        let h = self.header();
        (h.rx_in_order.load(Ordering::Acquire).saturating_sub(h.rx_consumed.load(Ordering::Acquire))) as usize
    }

    /// Bytes written and not yet acknowledged by the peer (SIOCOUTQ).
    pub fn unsent(&self) -> usize {
        let h = self.header();
        (h.tx_written.load(Ordering::Acquire).saturating_sub(h.tx_acked.load(Ordering::Acquire))) as usize
    }

    /// Send and receive buffer sizes.
    pub fn buffer_sizes(&self) -> (usize, usize) {
        (self.tx.capacity(), self.rx.capacity())
    }

    /// Ring unconditionally. `need_kick` must be 0 first: it is how the daemon tells which of
    /// the vsockets sharing a doorbell rang.
    fn ring_doorbell(&self) {
        shm::eventfd_ring(self.kick.as_raw_fd());
    }

    fn kick(&self) {
        if self.header().need_kick.swap(0, Ordering::SeqCst) == 1 {
            ring_or_defer(self.kick.as_raw_fd());
        }
    }

    /// After a read: kick the daemon only when the read freed a quarter of the receive
    /// buffer since the last kick, or the ring had been full (the peer may be stalled on
    /// credit). Credit is only due at those points, so other kicks would wake it for nothing.
    fn kick_after_read(&self, consumed: u64, was_full: bool) {
        let last = self.rx_kicked.load(Ordering::Relaxed);
        let quarter = (self.rx.capacity() / 4) as u64;
        if was_full || consumed.saturating_sub(last) >= quarter {
            self.rx_kicked.store(consumed, Ordering::Relaxed);
            self.kick();
        }
    }

    /// Take the IN token out of A once the ring is empty; true if the gate closed with the
    /// ring still empty (else the caller reads again).
    fn close_in(&self, a: RawFd) -> bool {
        close_in(self.header(), a, self.kick.as_raw_fd(), Some(&self.bypassed))
    }

    /// True once, the first time after this side found that a call bypassing the shim (an
    /// io_uring operation, a raw system call) read the vsocket's readiness proxy: the vsocket
    /// is being reset, and the caller may say so.
    pub fn bypass_found(&self) -> bool {
        self.bypassed.compare_exchange(1, 2, Ordering::SeqCst, Ordering::SeqCst).is_ok()
    }

    /// Read into `buf` from the receive ring; `a` is the program's descriptor (end A).
    pub fn read(&self, a: RawFd, buf: &mut [u8], flags: ReadFlags) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let h = self.header();
        let _one_reader = FutexLock::take(&h.rx_lock);
        let mut done = 0usize;
        loop {
            let consumed = h.rx_consumed.load(Ordering::Relaxed);
            let in_order = h.rx_in_order.load(Ordering::Acquire);
            let avail = in_order.saturating_sub(consumed) as usize;
            let skip = if flags.peek { done } else { 0 };
            if avail > skip {
                let n = (avail - skip).min(buf.len() - done);
                // SAFETY: [consumed + skip, + n) is below rx_in_order: written by the engine
                // and untouched by it until rx_consumed passes it (module docs of shm).
                unsafe { self.rx.read(consumed + skip as u64, &mut buf[done..done + n]) };
                done += n;
                if !flags.peek {
                    let was_full = avail >= self.rx.capacity();
                    h.rx_consumed.store(consumed + n as u64, Ordering::Release);
                    self.kick_after_read(consumed + n as u64, was_full);
                    if avail == n {
                        self.close_in(a);
                    }
                }
                if done == buf.len() || !flags.wait_all || flags.peek {
                    return Ok(done);
                }
                continue;
            }
            let state = h.state.load(Ordering::Acquire);
            if state & shm::FIN != 0 && h.rx_fin.load(Ordering::Relaxed) == consumed {
                return Ok(done);
            }
            if let Some(code) = self.error_code() {
                return if done > 0 { Ok(done) } else { Err(errno_error(code)) };
            }
            if self.shut_rd.load(Ordering::Relaxed) != 0 {
                return Ok(done);
            }
            if !self.close_in(a) {
                continue;
            }
            if done > 0 && !flags.wait_all {
                return Ok(done);
            }
            // About to say EAGAIN or to sleep: whatever this thread wrote must be on its way.
            flush_doorbells();
            if flags.nonblocking {
                return if done > 0 { Ok(done) } else { Err(errno_error(libc::EAGAIN)) };
            }
            // Sleep in the kernel until the daemon queues a token (or A resets, or a signal,
            // or A's SO_RCVTIMEO): its semantics are the program's.
            let mut b = [0u8; 1];
            // SAFETY: a live one-byte buffer; a blocking peek on the program's own proxy end.
            let n = unsafe { libc::recv(a, b.as_mut_ptr().cast(), 1, libc::MSG_PEEK) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if done > 0 {
                    return Ok(done);
                }
                return Err(match e.raw_os_error() {
                    Some(libc::ECONNRESET) => self.error_code().map_or(e, errno_error),
                    _ => e,
                });
            }
        }
    }

    /// Write `buf` into the send ring; `a` is the program's descriptor (end A).
    pub fn write(&self, a: RawFd, buf: &[u8], nonblocking: bool) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let h = self.header();
        let _one_writer = FutexLock::take(&h.tx_lock);
        let cap = self.tx.capacity() as u64;
        let mut done = 0usize;
        while done < buf.len() {
            if let Some(code) = self.error_code() {
                return if done > 0 { Ok(done) } else { Err(errno_error(code)) };
            }
            if h.app_flags.load(Ordering::Relaxed) & shm::SHUT_WR != 0 {
                return Err(errno_error(libc::EPIPE));
            }
            let written = h.tx_written.load(Ordering::Relaxed);
            let acked = h.tx_acked.load(Ordering::Acquire);
            // Connecting: not writable yet (as a TCP socket in SYN-SENT), whatever the room.
            let space = if self.connecting() { 0 } else { cap - (written - acked) };
            if space == 0 {
                flush_doorbells();
                self.plug(a);
                if nonblocking || done > 0 {
                    return if done > 0 { Ok(done) } else { Err(errno_error(libc::EAGAIN)) };
                }
                if h.tx_acked.load(Ordering::Acquire) != acked {
                    continue;
                }
                // Sleep until the daemon unplugs A (or A fails); A's SO_SNDTIMEO bounds it.
                let timeout = sndtimeo_ms(a);
                let r = poll_one(a, libc::POLLOUT, timeout);
                if r == 0 && timeout >= 0 && h.tx_acked.load(Ordering::Acquire) == acked {
                    return Err(errno_error(libc::EAGAIN));
                }
                continue;
            }
            let n = (space as usize).min(buf.len() - done);
            // SAFETY: [written, written + n) is inside [written, acked + cap): the app's own
            // part of the send ring until tx_written passes it (module docs of shm).
            unsafe { self.tx.write(written, &buf[done..done + n]) };
            h.tx_written.store(written + n as u64, Ordering::Release);
            self.kick();
            done += n;
            if space - (n as u64) < low_water(cap) {
                self.plug(a);
            }
        }
        Ok(done)
    }

    /// Make A not writable until the daemon sees room again (no-op if plugged already).
    fn plug(&self, a: RawFd) {
        plug(self.header(), a, self.kick.as_raw_fd())
    }

    /// Half close: `Write` sends FIN after the bytes written; `Read` makes reads return 0.
    pub fn shutdown(&self, how: std::net::Shutdown) -> io::Result<()> {
        let h = self.header();
        if matches!(how, std::net::Shutdown::Write | std::net::Shutdown::Both) {
            if let Some(code) = self.error_code() {
                return Err(errno_error(code));
            }
            h.app_flags.fetch_or(shm::SHUT_WR, Ordering::Release);
            h.need_kick.store(0, Ordering::SeqCst);
            self.ring_doorbell();
        }
        if matches!(how, std::net::Shutdown::Read | std::net::Shutdown::Both) {
            self.shut_rd.store(1, Ordering::Relaxed);
            h.rx_reopen.store(1, Ordering::SeqCst);
            h.need_kick.store(0, Ordering::SeqCst);
            self.ring_doorbell();
        }
        Ok(())
    }
}

/// A's SO_SNDTIMEO in ms, or -1 (none).
fn sndtimeo_ms(a: RawFd) -> libc::c_int {
    let mut tv = libc::timeval { tv_sec: 0, tv_usec: 0 };
    let mut len = std::mem::size_of::<libc::timeval>() as libc::socklen_t;
    // SAFETY: a live timeval of the stated size.
    let r = unsafe {
        libc::getsockopt(
            a,
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&mut tv as *mut libc::timeval).cast(),
            &mut len,
        )
    };
    if r != 0 || (tv.tv_sec == 0 && tv.tv_usec == 0) {
        return -1;
    }
    (tv.tv_sec * 1000 + tv.tv_usec / 1000).clamp(1, i32::MAX as i64) as libc::c_int
}

/// App side of a proxied vsocket (this module's shim, and `daemon::client`'s vsockets):
/// take the IN token out of end `a` once the ring is empty. True if the gate closed with the
/// ring still empty; false if bytes, FIN or an error came in between (the caller reads
/// again; the daemon was asked, through doorbell `kick`, to open the gate again). A token
/// found gone (read by a call that bypassed the shim) has the daemon reset the vsocket, and
/// sets `bypassed` to 1.
pub(crate) fn close_in(h: &shm::Header, a: RawFd, kick: RawFd, bypassed: Option<&AtomicU32>) -> bool {
    if h.rx_gate.compare_exchange(GATE_OPEN, GATE_CLOSING, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
        let mut b = [0u8; 16];
        let mut taken = false;
        // The daemon sends the token right after it opened the gate: wait for it a moment.
        for _ in 0..1000 {
            // SAFETY: a live buffer; non-blocking receive on the program's own proxy end.
            let n = unsafe { libc::recv(a, b.as_mut_ptr().cast(), b.len(), libc::MSG_DONTWAIT) };
            if n >= 0 {
                // A token, or the end of B's records (FIN): nothing was taken behind us.
                taken = true;
                break;
            }
            let e = io::Error::last_os_error().raw_os_error();
            if e != Some(libc::EAGAIN) && e != Some(libc::EINTR) {
                break;
            }
            if poll_one(a, libc::POLLIN, 1) == 0 {
                continue;
            }
        }
        let _ = h.rx_gate.compare_exchange(GATE_CLOSING, GATE_CLOSED, Ordering::SeqCst, Ordering::SeqCst);
        if !taken && h.state.load(Ordering::SeqCst) & (shm::ERROR | shm::FIN) == 0 && !hung_up(a) {
            // An open gate always has its token queued on A, and only this side takes it:
            // a call that bypassed the shim (io_uring, a raw syscall) read it as data.
            // Have the daemon reset the vsocket rather than let it be corrupted.
            if let Some(b) = bypassed {
                b.store(1, Ordering::SeqCst);
            }
            h.app_flags.fetch_or(shm::BYPASSED, Ordering::SeqCst);
            h.need_kick.store(0, Ordering::SeqCst);
            shm::eventfd_ring(kick);
        }
    }
    if h.rx_in_order.load(Ordering::SeqCst) > h.rx_consumed.load(Ordering::SeqCst)
        || h.state.load(Ordering::SeqCst) != 0
    {
        if h.rx_gate.load(Ordering::SeqCst) == GATE_CLOSED {
            // Bytes came in while we closed: have the daemon open the gate again.
            h.rx_reopen.store(1, Ordering::SeqCst);
            h.need_kick.store(0, Ordering::SeqCst);
            shm::eventfd_ring(kick);
        }
        return false;
    }
    true
}

/// Whether end A reports a hang-up or an error (the daemon closed B).
fn hung_up(a: RawFd) -> bool {
    poll_one(a, 0, 0) & (libc::POLLHUP | libc::POLLERR) != 0
}

/// App side of a proxied vsocket: make end `a` not writable until the daemon sees room in
/// the send ring again (no-op if plugged already); doorbell `kick` has it look at once.
/// Called with the header's write lock held, so one plug at a time.
///
/// The records go into B's queue *before* the gate says PLUGGED: the daemon unplugs as soon
/// as it sees PLUGGED with room in the ring, and takes the old base and the plug out then;
/// marked first, it could look between the mark and the records, find the plug missing and
/// take that for a stray write into A (a reset of a healthy vsocket).
pub(crate) fn plug(h: &shm::Header, a: RawFd, kick: RawFd) {
    if h.tx_gate.load(Ordering::SeqCst) != TX_OPEN {
        return;
    }
    let rec = vec![0u8; plug_len()];
    proxy_send(a, &rec);
    proxy_send(a, &[BASE]);
    h.tx_gate.store(TX_PLUGGED, Ordering::SeqCst);
    // Room may have come back before the plug landed: let the daemon look.
    h.need_kick.store(0, Ordering::SeqCst);
    shm::eventfd_ring(kick);
}

/// A daemon listener whose arrivals come with readiness proxies.
#[derive(Debug)]
pub struct ProxyListener {
    client: Client,
    id: u64,
    local: SocketAddr,
}

impl ProxyListener {
    /// The vsocket address it listens on.
    pub fn local(&self) -> SocketAddr {
        self.local
    }

    /// The next arrival and its end A, waiting for one.
    pub fn accept(&self) -> io::Result<(ProxyStream, OwnedFd)> {
        let (resp, fds) = self.client.request(&Request::Accept {
            listener: self.id,
            wait: true,
            proxy: true,
            park: None,
            pool: self.client.table().note(),
        })?;
        ProxyStream::from_response(&self.client, resp, fds)
    }

    /// Wait for the next arrival and leave it parked in the daemon behind `placeholder`, the
    /// local address of the loopback connection that will carry it into a kernel accept
    /// queue; the arrival's peer address. Any process of the same user that accepts that
    /// connection takes the arrival with [`Client::claim_proxied`]; nothing of it is held
    /// here, so an arrival never outlives its last descriptor because of this process.
    pub fn park(&self, placeholder: SocketAddr) -> io::Result<SocketAddr> {
        let req = Request::Accept {
            listener: self.id,
            wait: true,
            proxy: true,
            park: Some(placeholder),
            pool: self.client.table().note(),
        };
        match self.client.request(&req)?.0 {
            Response::Parked { remote } => Ok(remote),
            other => Err(unexpected_response(&other)),
        }
    }

    /// Whether its daemon went away (it stopped or restarted): the listener is gone with it.
    pub fn daemon_gone(&self) -> bool {
        self.client.is_dead()
    }

    /// Stop listening (a blocked accept then fails).
    pub fn close(&self) {
        let _ = self.client.request(&Request::CloseListener { listener: self.id });
    }
}

impl Client {
    /// Open a vsocket of `class` to `addr` with a readiness proxy: the stream and its end A.
    /// With `early`, the daemon answers once the OPEN is sent, not once the peer accepted it:
    /// [`ProxyStream::connecting`] then tells whether the answer is still to come, and
    /// [`ProxyStream::hold_until_connected`] keeps A not writable until it has come (a
    /// non-blocking connect's EINPROGRESS).
    pub fn connect_proxied(
        &self,
        addr: SocketAddr,
        class: Class,
        early: bool,
    ) -> io::Result<(ProxyStream, OwnedFd)> {
        let pool = self.table().note();
        let (resp, fds) =
            self.request(&Request::Connect { addr, class: class.into(), proxy: true, pool, early })?;
        ProxyStream::from_response(self, resp, fds)
    }

    /// Take the arrival a [`ProxyListener::park`] left behind the placeholder connection
    /// from `placeholder`: the stream and its end A.
    pub fn claim_proxied(&self, placeholder: SocketAddr) -> io::Result<(ProxyStream, OwnedFd)> {
        let (resp, fds) = self.request(&Request::Claim { placeholder, pool: self.table().note() })?;
        ProxyStream::from_response(self, resp, fds)
    }

    /// Listen on vsocket `port`, arrivals with readiness proxies.
    pub fn bind_proxied(&self, port: u16) -> io::Result<ProxyListener> {
        // Arrivals park for whichever process accepts them: no pool.
        match self.request(&Request::Bind { port, poll: false, pool: None })?.0 {
            Response::Listener { listener, local } => {
                Ok(ProxyListener { client: self.clone(), id: listener, local })
            }
            other => Err(unexpected_response(&other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How many times `fd` (an eventfd) was rung since the last look.
    fn rings(fd: RawFd) -> u64 {
        let mut v = 0u64;
        // SAFETY: an 8-byte read into a live u64 from a non-blocking eventfd.
        let n = unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
        if n == 8 {
            v
        } else {
            0
        }
    }

    #[test]
    fn an_event_loop_pass_rings_each_doorbell_once_and_waits_for_nothing_else() {
        // In a thread of its own: the owed doorbells are the thread's.
        std::thread::spawn(|| {
            let (table, own) = (shm::eventfd().unwrap(), shm::eventfd().unwrap());
            let (t, o) = (table.as_raw_fd(), own.as_raw_fd());
            // Outside a pass every kick rings at once.
            ring_or_defer(t);
            assert_eq!(rings(t), 1);
            // A wait returned 3: the first two kicks are owed, the third rings them all, and
            // each doorbell once however many of its vsockets kicked.
            batch_doorbells(3);
            ring_or_defer(t);
            ring_or_defer(o);
            assert_eq!((rings(t), rings(o)), (0, 0), "owed during the pass");
            ring_or_defer(t);
            assert_eq!((rings(t), rings(o)), (1, 1), "rung at the pass's last kick");
            // The pass is over: the next kick rings at once.
            ring_or_defer(t);
            assert_eq!(rings(t), 1);
            // A pass cut short (the thread is about to wait) rings what it owes.
            batch_doorbells(50);
            ring_or_defer(o);
            assert_eq!(rings(o), 0);
            flush_doorbells();
            assert_eq!(rings(o), 1);
            ring_or_defer(o);
            assert_eq!(rings(o), 1, "and ends the pass");
            // A wait that returned one descriptor starts no pass.
            batch_doorbells(1);
            ring_or_defer(t);
            assert_eq!(rings(t), 1);
            // A thread that ends owing rings as it goes.
            batch_doorbells(10);
            ring_or_defer(t);
            (table, own)
        })
        .join()
        .map(|(table, _own)| assert_eq!(rings(table.as_raw_fd()), 1, "rung at thread exit"))
        .unwrap();
    }

    #[test]
    fn the_plug_makes_a_not_writable_and_its_removal_gives_it_back() {
        let (a, b) = pair().unwrap();
        let a = a.as_raw_fd();
        assert_ne!(poll_one(a, libc::POLLOUT, 0) & libc::POLLOUT, 0, "A starts writable");
        assert_eq!(poll_one(a, libc::POLLIN, 0) & libc::POLLIN, 0, "and not readable");
        let len = plug_len();
        assert!(proxy_send(a, &vec![0u8; len]) && proxy_send(a, &[BASE]));
        assert_eq!(poll_one(a, libc::POLLOUT, 0) & libc::POLLOUT, 0, "plugged A is not writable");
        let mut buf = [0u8; PLUG_MAX];
        for _ in 0..2 {
            // SAFETY: a live buffer.
            unsafe { libc::recv(b.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        }
        assert_ne!(poll_one(a, libc::POLLOUT, 0) & libc::POLLOUT, 0, "unplugged A is writable again");
        // A token makes A readable; FIN adds RDHUP; closing B with the base unread resets A.
        assert!(proxy_send(b.as_raw_fd(), &[shm::TOKEN]));
        assert_ne!(poll_one(a, libc::POLLIN, 0) & libc::POLLIN, 0);
        // SAFETY: shutdown of our own socket.
        unsafe { libc::shutdown(b.as_raw_fd(), libc::SHUT_WR) };
        assert_ne!(poll_one(a, libc::POLLRDHUP, 0) & libc::POLLRDHUP, 0);
        drop(b);
        let r = poll_one(a, libc::POLLIN | libc::POLLOUT, 0);
        assert_ne!(r & libc::POLLERR, 0, "closing B with the base unread gives A ERR: {r:#x}");
        assert_ne!(r & libc::POLLHUP, 0, "and HUP: {r:#x}");
    }
}
