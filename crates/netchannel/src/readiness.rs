//! Readiness: a pollable descriptor for a vsocket or a listener, whose readability and
//! writability the stack drives.
//!
//! The descriptor an application polls is end **A** of an `AF_UNIX, SOCK_SEQPACKET`
//! socketpair; the stack holds end **B** (the design of `shared/SHIM.md`, in one process).
//! The pair never carries data, only readiness records, so every poller the kernel has
//! (`poll(2)`, `select`, epoll level- and edge-triggered, mio, tokio) works unchanged:
//!
//! * **IN gate**: one 1-byte *token* queued in A makes A readable. The stack queues it when a
//!   read (accept) stops blocking — new data in order, end of stream, an error — and the
//!   reader takes it out when it finds nothing left. A new token is a new edge for EPOLLET.
//! * **OUT gate**: A's send buffer is made minimal, so one *plug* record sent A → B (sized at
//!   start-up, [`plug_len`]) makes A not writable; taking the plug out of B makes it writable
//!   again, with an EPOLLOUT edge. That gives the "neither readable nor writable" state an
//!   eventfd cannot express. The writer plugs when the send buffer is full (a write would
//!   block); the stack unplugs once a quarter of it is free again (as TCP, which reports
//!   EPOLLOUT only with a useful share of its buffer free), or on an error or shutdown.
//!
//! Race freedom: each gate is one flag that changes only under the gate's mutex, together
//! with the record that it stands for, and always *before* the syscall that queues or
//! removes the record: whoever sees a gate open (or unplugged) without the mutex may rely on
//! the record being there (or gone) once it takes the mutex. That matters to
//! edge-triggered pollers: a reader must never report `WouldBlock` while a token is on its
//! way, or its poller clears an edge that already came. The side that *closes* a gate (the reader taking the
//! token, the writer plugging) first stores the flag, then re-checks the vsocket's state
//! under the vsocket's own lock, and reverts if the state says the gate must stay open.
//! The side that *opens* it first changes the vsocket's state under that same lock, then
//! reads the flag. The lock orders the two: either the closer sees the new state, or the
//! opener sees the closed flag and opens the gate (taking the gate mutex after the closer).
//! So a change of state always ends with the right record queued.
//!
//! Cost: while a stream is busy the token stays queued and the flag says so: the data path
//! reads one atomic per event and makes no syscall. Each empty→non-empty edge costs one
//! `send` (by the stack) and one `recv` (by the reader); each full→not-full edge one plug
//! `send` and one `recv`. The descriptor exists only once asked for ([`std::os::fd::AsFd`]
//! on `VStream`/`VListener`): blocking users pay nothing.
//!
//! **Tasks** ([`TaskWakers`]): the `tokio` module does not go through the descriptor for
//! an embedded vsocket. A task that finds a read (write, accept) would block leaves its
//! [`Waker`] in the vsocket, and the stack wakes it where it would open the gate. That
//! costs no syscall at all on the vsocket: a wake from a channel worker is the runtime's own
//! unpark, which the runtime makes once for however many tasks are woken while it sleeps
//! (with a descriptor, each vsocket's edge was a `send` by the stack, an epoll event and a
//! `recv` by the task). Registering and waking follow the gates' rule: the task stores its
//! waker, then looks at the state under the vsocket's lock; the stack changes the state
//! under that lock, then looks for wakers, so one of the two always sees the other.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Mutex, OnceLock};
use std::task::Waker;

/// A readiness descriptor and its two gates.
///
/// Both ends are closed by [`Readiness::close`] once the owner's application handles are
/// gone, even while the stack still holds the vsocket; every syscall on them happens under
/// the gate mutex after checking `closed`, so a closed (and maybe reused) number is never
/// touched.
pub(crate) struct Readiness {
    /// End A: what applications poll.
    app: RawFd,
    /// End B: where the stack queues tokens and takes plugs out.
    stack: RawFd,
    /// Both ends were closed.
    closed: AtomicBool,
    /// A token is queued in A (A is readable).
    rx_open: AtomicBool,
    /// A plug is queued in B (A is not writable).
    plugged: AtomicBool,
    /// Serializes gate changes with the records they stand for.
    gate: Mutex<()>,
}

fn cvt(r: isize, what: &str) -> io::Result<isize> {
    if r < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("readiness descriptor: {what}: {e}")));
    }
    Ok(r)
}

fn socketpair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` is a live array of two ints, as socketpair(2) requires.
    let r = unsafe {
        libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr())
    };
    cvt(r as isize, "socketpair")?;
    // SAFETY: socketpair succeeded: both fds are fresh and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn set_sndbuf(fd: RawFd, bytes: libc::c_int) -> io::Result<()> {
    // SAFETY: passes a pointer to a live int of the stated size.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&bytes as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    cvt(r as isize, "SO_SNDBUF").map(|_| ())
}

fn send_record(fd: RawFd, len: usize) -> io::Result<()> {
    let buf = [0u8; 8192];
    let len = len.min(buf.len());
    loop {
        // SAFETY: sends from a live buffer of at least `len` bytes.
        let r = unsafe { libc::send(fd, buf.as_ptr().cast(), len, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
        if r >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(io::Error::new(e.kind(), format!("readiness descriptor: send: {e}")));
        }
    }
}

/// Take one record out of `fd`; the caller knows one is queued.
fn recv_record(fd: RawFd) -> io::Result<()> {
    let mut buf = [0u8; 8192];
    loop {
        // SAFETY: receives into a live buffer of the stated size.
        let r = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if r >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(io::Error::new(e.kind(), format!("readiness descriptor: recv: {e}")));
        }
    }
}

/// Whether `fd` polls writable now.
fn writable(fd: RawFd) -> bool {
    let mut p = libc::pollfd { fd, events: libc::POLLOUT, revents: 0 };
    // SAFETY: one live pollfd, no wait.
    let r = unsafe { libc::poll(&mut p, 1, 0) };
    r == 1 && p.revents & libc::POLLOUT != 0
}

/// The size of A's send buffer asked for: the kernel doubles it and raises it to its minimum.
const SNDBUF: libc::c_int = 1;

/// The length of a plug record that makes A not writable, measured once on this kernel (it
/// depends on the kernel's accounting of a record's memory).
pub(crate) fn plug_len() -> io::Result<usize> {
    static LEN: OnceLock<Result<usize, String>> = OnceLock::new();
    LEN.get_or_init(|| {
        let probe = || -> io::Result<Option<usize>> {
            for len in [512usize, 1024, 1536, 2048, 3072, 4096] {
                let (a, b) = socketpair()?;
                set_sndbuf(a.as_raw_fd(), SNDBUF)?;
                if !writable(a.as_raw_fd()) {
                    return Ok(None);
                }
                send_record(a.as_raw_fd(), len)?;
                let plugged = !writable(a.as_raw_fd());
                recv_record(b.as_raw_fd())?;
                if plugged && writable(a.as_raw_fd()) {
                    return Ok(Some(len));
                }
            }
            Ok(None)
        };
        match probe() {
            Ok(Some(len)) => Ok(len),
            Ok(None) => Err("no record size makes a unix socket unwritable on this kernel".into()),
            Err(e) => Err(e.to_string()),
        }
    })
    .clone()
    .map_err(|m| io::Error::new(io::ErrorKind::Unsupported, format!("readiness descriptor: {m}")))
}

impl Readiness {
    /// A new descriptor: writable, not readable. The owner then brings the gates to the
    /// vsocket's state ([`Readiness::rx_publish`], [`Readiness::tx_full`]).
    pub(crate) fn new() -> io::Result<Readiness> {
        plug_len()?;
        let (app, stack) = socketpair()?;
        set_sndbuf(app.as_raw_fd(), SNDBUF)?;
        Ok(Readiness {
            app: app.into_raw_fd(),
            stack: stack.into_raw_fd(),
            closed: AtomicBool::new(false),
            rx_open: AtomicBool::new(false),
            plugged: AtomicBool::new(false),
            gate: Mutex::new(()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.gate.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Close both ends: the owner's application handles are gone, nobody polls any more.
    pub(crate) fn close(&self) {
        let _g = self.lock();
        if !self.closed.swap(true, SeqCst) {
            // SAFETY: both numbers are ours (from socketpair) and closed only here, once.
            unsafe {
                libc::close(self.app);
                libc::close(self.stack);
            }
        }
    }

    /// Something a reader must see was published (data, end of stream, an error, a queued
    /// vsocket): make A readable if `readable` (evaluated under the gate mutex) still holds.
    /// Call it after the vsocket's lock is released. The check matters: a reader may have
    /// taken everything between the publication and this call, found the gate closed and
    /// left it so; a token queued now would make A readable with nothing to read.
    pub(crate) fn rx_publish(&self, readable: impl FnOnce() -> bool) {
        if self.rx_open.load(SeqCst) {
            return;
        }
        let _g = self.lock();
        if !self.rx_open.load(SeqCst) && !self.closed.load(SeqCst) && readable() {
            // The flag goes first: a reader that sees it open takes the mutex, and so waits
            // for the token, instead of reporting `WouldBlock` while it is on its way.
            self.rx_open.store(true, SeqCst);
            if let Err(e) = send_record(self.stack, 1) {
                tracing::warn!(error = %e, "readiness descriptor");
                self.rx_open.store(false, SeqCst);
            }
        }
    }

    /// The reader found nothing to read: make A unreadable unless `readable` (evaluated
    /// under the vsocket's lock, after the gate is marked closed) says otherwise. Returns
    /// `true` if the gate stayed open: something arrived meanwhile, and the reader must look
    /// again instead of reporting `WouldBlock` (an edge-triggered poller would get no new
    /// edge for it).
    #[must_use]
    pub(crate) fn rx_drained(&self, readable: impl FnOnce() -> bool) -> bool {
        if !self.rx_open.load(SeqCst) {
            return false;
        }
        let _g = self.lock();
        if !self.rx_open.load(SeqCst) || self.closed.load(SeqCst) {
            return false;
        }
        self.rx_open.store(false, SeqCst);
        if readable() {
            self.rx_open.store(true, SeqCst);
            return true;
        }
        if let Err(e) = recv_record(self.app) {
            tracing::warn!(error = %e, "readiness descriptor");
        }
        false
    }

    /// A write would block: make A unwritable unless `writable` (the condition the stack
    /// unplugs on, evaluated under the vsocket's lock after the gate is marked plugged) holds.
    /// Returns `true` if A stayed writable: space came back meanwhile, and the writer must
    /// try again instead of reporting `WouldBlock`.
    #[must_use]
    pub(crate) fn tx_full(&self, writable: impl FnOnce() -> bool) -> bool {
        if self.plugged.load(SeqCst) {
            return false;
        }
        let _g = self.lock();
        if self.plugged.load(SeqCst) || self.closed.load(SeqCst) {
            return false;
        }
        self.plugged.store(true, SeqCst);
        if writable() {
            self.plugged.store(false, SeqCst);
            return true;
        }
        let len = plug_len().unwrap_or(4096);
        if let Err(e) = send_record(self.app, len) {
            tracing::warn!(error = %e, "readiness descriptor");
            self.plugged.store(false, SeqCst);
            return true;
        }
        false
    }

    /// Send space was freed (or the vsocket failed or shut down): make A writable if
    /// `writable` holds. Call it after the vsocket's lock is released.
    pub(crate) fn tx_freed(&self, writable: impl FnOnce() -> bool) {
        if !self.plugged.load(SeqCst) {
            return;
        }
        let _g = self.lock();
        if self.plugged.load(SeqCst) && !self.closed.load(SeqCst) && writable() {
            // The flag goes first, as in `rx_publish`: a writer that sees it plugged may
            // report `WouldBlock`, and only does so if the plug will still be there.
            self.plugged.store(false, SeqCst);
            if let Err(e) = recv_record(self.stack) {
                tracing::warn!(error = %e, "readiness descriptor");
            }
        }
    }
}

impl AsFd for Readiness {
    fn as_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: end A stays open until `close`, which runs only once the application
        // handles that can borrow it are gone.
        unsafe { BorrowedFd::borrow_raw(self.app) }
    }
}

impl Drop for Readiness {
    fn drop(&mut self) {
        self.close();
    }
}

/// A readiness descriptor created on first use, then kept for the owner's life.
#[derive(Default)]
pub(crate) struct LazyReadiness {
    cell: OnceLock<Readiness>,
    create: Mutex<()>,
}

impl LazyReadiness {
    /// The descriptor, if it was created.
    #[inline]
    pub(crate) fn get(&self) -> Option<&Readiness> {
        self.cell.get()
    }

    /// The descriptor, created now if needed; `sync` then brings its gates to the owner's
    /// state (every event after the creation reaches it through [`LazyReadiness::get`]).
    pub(crate) fn get_or_create(&self, sync: impl FnOnce(&Readiness)) -> io::Result<&Readiness> {
        if let Some(r) = self.cell.get() {
            return Ok(r);
        }
        let _c = self.create.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = self.cell.get() {
            return Ok(r);
        }
        let fresh = Readiness::new()?;
        // Only this thread (holding `create`) sets the cell.
        let r = self.cell.get_or_init(|| fresh);
        sync(r);
        Ok(r)
    }
}

/// The tasks waiting for one direction of a vsocket (or a listener's accept): woken, all of
/// them, by the next [`TaskWakers::wake`].
#[derive(Default)]
pub(crate) struct TaskWakers {
    /// Some task is registered: the stack's only cost while nobody waits is this load.
    armed: AtomicBool,
    wakers: Mutex<Vec<Waker>>,
}

impl TaskWakers {
    /// Wake `waker` at the next [`TaskWakers::wake`]. The caller looks at the state again
    /// afterwards: what changed before this call wakes nobody.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn register(&self, waker: &Waker) {
        let mut w = self.wakers.lock().unwrap_or_else(|p| p.into_inner());
        if !w.iter().any(|o| o.will_wake(waker)) {
            w.push(waker.clone());
        }
        self.armed.store(true, SeqCst);
    }

    /// The state changed (call it with no vsocket lock held): wake every registered task.
    #[inline]
    pub(crate) fn wake(&self) {
        if !self.armed.load(SeqCst) {
            return;
        }
        let woken = {
            let mut w = self.wakers.lock().unwrap_or_else(|p| p.into_inner());
            self.armed.store(false, SeqCst);
            std::mem::take(&mut *w)
        };
        WOKEN.set(WOKEN.get().wrapping_add(woken.len() as u64));
        for w in woken {
            w.wake();
        }
    }
}

thread_local! {
    /// Tasks this thread woke ([`TaskWakers::wake`]), ever.
    static WOKEN: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// How many tasks this thread has woken so far: the difference across a pass of work is
/// how many tasks that pass woke.
#[cfg_attr(not(feature = "tokio"), allow(dead_code))]
pub(crate) fn tasks_woken() -> u64 {
    WOKEN.get()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn revents(fd: RawFd) -> i16 {
        let mut p = libc::pollfd { fd, events: libc::POLLIN | libc::POLLOUT, revents: 0 };
        // SAFETY: one live pollfd, no wait.
        unsafe { libc::poll(&mut p, 1, 0) };
        p.revents
    }

    #[test]
    fn gates_drive_poll() {
        let r = Readiness::new().unwrap();
        let fd = r.as_fd().as_raw_fd();
        assert_eq!(revents(fd), libc::POLLOUT, "fresh: writable only");
        r.rx_publish(|| false);
        assert_eq!(revents(fd), libc::POLLOUT, "published but taken already: not readable");
        r.rx_publish(|| true);
        r.rx_publish(|| true);
        assert_eq!(revents(fd), libc::POLLIN | libc::POLLOUT);
        assert!(r.rx_drained(|| true));
        assert_eq!(revents(fd), libc::POLLIN | libc::POLLOUT, "still readable: the token stays");
        assert!(!r.rx_drained(|| false));
        assert_eq!(revents(fd), libc::POLLOUT, "one token only, taken out");
        assert!(!r.tx_full(|| false));
        assert_eq!(revents(fd), 0, "plugged: neither");
        r.tx_freed(|| false);
        assert_eq!(revents(fd), 0);
        r.tx_freed(|| true);
        assert_eq!(revents(fd), libc::POLLOUT);
        assert!(r.tx_full(|| true));
        assert_eq!(revents(fd), libc::POLLOUT, "space came back before the plug went in");
    }
}
