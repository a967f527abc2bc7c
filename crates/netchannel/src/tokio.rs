//! Vsockets in async Rust: [`VStream`] and [`VListener`] for tokio (cargo feature `tokio`).
//!
//! The types mirror `tokio::net::TcpStream` and `tokio::net::TcpListener`, so a program
//! switches from TCP to NetChannel by changing an import. Each wraps its blocking
//! counterpart ([`crate::VStream`], [`crate::VListener`]) in non-blocking mode. A task that
//! finds an embedded vsocket not ready leaves its waker in the vsocket, and the stack wakes
//! it exactly when a read, write or accept stops blocking: no descriptor, no syscall on the
//! vsocket, and one unpark of the runtime for however many tasks a burst of frames wakes
//! (`crate::readiness`). A daemon-served vsocket's readiness comes through its pollable
//! descriptor ([`crate::VStream::poll_fd`]) in the runtime's reactor.
//!
//! They work on the current-thread and the multi-thread runtime; the runtime needs its I/O
//! and time drivers (`enable_all`, as `#[tokio::main]` does). Errors carry the same
//! [`std::io::ErrorKind`]s as the blocking API. [`VListener::accept`] and reads are
//! cancellation-safe: a dropped future loses no vsocket and no byte.
//!
//! ```
//! use netchannel::tokio::{VListener, VStream};
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> std::io::Result<()> {
//! // Two hosts in one process, on two loopback addresses, with the same channel port: one
//! // free on both just now.
//! use std::net::TcpListener;
//! let port = loop {
//!     let p = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
//!     if TcpListener::bind(("127.0.0.2", p)).is_ok() {
//!         break p;
//!     }
//! };
//! let mut cfg = netchannel::Config::default();
//! cfg.listen = std::net::SocketAddr::from(([127, 0, 0, 1], port));
//! let a = netchannel::Host::start(cfg.clone())?;
//! cfg.listen = std::net::SocketAddr::from(([127, 0, 0, 2], port));
//! let b = netchannel::Host::start(cfg)?;
//!
//! let listener = VListener::from_std(b.bind(0)?)?;
//! let addr = listener.local_addr()?;
//! let server = tokio::spawn(async move {
//!     let (mut s, _) = listener.accept().await?;
//!     let mut buf = [0u8; 4];
//!     s.read_exact(&mut buf).await?;
//!     s.write_all(&buf).await?;
//!     std::io::Result::Ok(())
//! });
//! let mut c = VStream::connect_with(&a, addr).await?;
//! c.write_all(b"ping").await?;
//! let mut buf = [0u8; 4];
//! c.read_exact(&mut buf).await?;
//! assert_eq!(&buf, b"ping");
//! server.await??;
//! # Ok(())
//! # }
//! ```

use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, ToSocketAddrs};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, Mutex, Weak};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use ::tokio::io::unix::AsyncFd;
use ::tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

use crate::engine::channel::{self, Channel, LentRead};
use crate::engine::HostInner;
use crate::readiness::TaskWakers;
use crate::vsock::{deployed, Deployed};
use crate::{Class, Host};

/// The blocking stream inside an [`AsyncFd`]: registered through its readiness descriptor.
#[derive(Debug)]
struct Stream(crate::VStream);

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        // `VStream::from_std` made the descriptor before wrapping: this cannot fail.
        self.0.as_raw_fd()
    }
}

#[derive(Debug)]
struct Listener(crate::VListener);

impl AsRawFd for Listener {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// How a stream's tasks learn that it is ready.
#[derive(Debug)]
enum StreamIo {
    /// Embedded: the stack wakes the waiting task itself (`crate::readiness`, tasks); a
    /// latency-class stream's runtime reads its home channel ([`Lend`]).
    Direct(crate::VStream, LendSlot),
    /// Daemon-served: its readiness descriptor, in the runtime's reactor.
    Polled(AsyncFd<Stream>),
}

/// How a listener's tasks learn that an accept would not block.
#[derive(Debug)]
enum ListenerIo {
    Direct(crate::VListener),
    Polled(AsyncFd<Listener>),
}

fn interest(write: bool) -> Interest {
    if write {
        Interest::WRITABLE
    } else {
        Interest::READABLE
    }
}

/// The smallest and largest read window of a stream ([`VStream::poll_read_inner`]).
const READ_WINDOW_MIN: usize = 1024;
const READ_WINDOW_MAX: usize = 1 << 20;

/// How long a stream waits before it asks again for a lend it was refused (the channel
/// read inline by a blocking thread, no runtime, out of descriptors).
const LEND_RETRY: Duration = Duration::from_millis(50);

/// A runtime's hold on the reading of one channel (`engine::channel::lend`): while any
/// stream holds it, a task of the runtime that made it reads the channel whenever the
/// runtime's reactor reports the socket readable, instead of the channel's worker. A frame's
/// arrival then wakes the runtime alone (not the worker, which then woke the runtime): one
/// wake-up per message instead of two, and on a VM each one that crosses CPUs costs ~46 µs.
/// The frames it reads wake their vsockets' tasks, of this runtime or any other (a blocking
/// reader too). The channel goes back to its worker when the last stream lets go of the
/// lend, when it fails, and when the runtime shuts down (the reading task is dropped).
/// Meanwhile the channel is read only as often as the runtime runs that task.
struct Lend(Arc<LendCore>);

struct LendCore {
    host: Weak<HostInner>,
    ch: Arc<Channel>,
    /// Every stream let go: the reading task ends.
    done: AtomicBool,
    /// The reading task ended: the channel is back with its worker.
    ended: AtomicBool,
    /// The reading task, woken when `done` is set.
    reader: TaskWakers,
}

impl Drop for Lend {
    fn drop(&mut self) {
        self.0.done.store(true, SeqCst);
        self.0.reader.wake();
    }
}

/// The lends in force, by channel (the address of its `Arc`, alive while the lend is).
static LENDS: Mutex<Vec<(usize, Weak<Lend>)>> = Mutex::new(Vec::new());

/// A stream's part in a [`Lend`].
#[derive(Default)]
struct LendSlot(Mutex<LendState>);

#[derive(Default)]
enum LendState {
    #[default]
    None,
    Held(Arc<Lend>),
    Refused(Instant),
}

impl std::fmt::Debug for LendSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let held = matches!(*self.0.lock().unwrap_or_else(|p| p.into_inner()), LendState::Held(_));
        write!(f, "LendSlot(held: {held})")
    }
}

impl LendSlot {
    /// About to wait for `s` to become readable: make sure a runtime reads its home channel
    /// (this one, unless another holds it already).
    fn ensure(&self, s: &crate::VStream) {
        let mut st = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match &*st {
            LendState::Held(l) if !l.0.ended.load(SeqCst) => return,
            // Refused because its worker had not taken the new channel in yet: ask again as
            // soon as it has (a few round trips of a fresh connection otherwise pass before
            // LEND_RETRY, each waking the worker and then the task).
            LendState::Refused(at) if at.elapsed() < LEND_RETRY && !lend_would_take(s) => return,
            _ => {}
        }
        *st = match join_lend(s) {
            Some(l) => LendState::Held(l),
            None => LendState::Refused(Instant::now()),
        };
    }
}

/// Whether `s`'s home channel could be lent now: its worker polls it and nobody borrows it.
fn lend_would_take(s: &crate::VStream) -> bool {
    s.lendable_channel().is_some_and(|(_, ch)| channel::lend_would_take(&ch))
}

/// The lend in force on `s`'s home channel, or a new one made by the current runtime.
fn join_lend(s: &crate::VStream) -> Option<Arc<Lend>> {
    let (host, ch) = s.lendable_channel()?;
    let key = Arc::as_ptr(&ch) as usize;
    let mut lends = LENDS.lock().unwrap_or_else(|p| p.into_inner());
    lends.retain(|(_, l)| l.strong_count() > 0);
    if let Some(l) = lends.iter().find(|(k, _)| *k == key).and_then(|(_, l)| l.upgrade()) {
        if !l.0.ended.load(SeqCst) {
            return Some(l);
        }
    }
    let rt = ::tokio::runtime::Handle::try_current().ok()?;
    // A duplicate, so that the runtime's registration is its own. Registered before the
    // worker lets go, so that no arrival falls between the two.
    // SAFETY: the channel's read descriptor is open while `ch` lives.
    let dup = unsafe { libc::fcntl(channel::read_fd(&ch), libc::F_DUPFD_CLOEXEC, 0) };
    if dup < 0 {
        return None;
    }
    // SAFETY: a fresh descriptor that nobody else owns.
    let dup = unsafe { OwnedFd::from_raw_fd(dup) };
    let fd = {
        let _in = rt.enter();
        // SAFETY: the duplicate is owned by the AsyncFd, and closed only after it deregisters.
        unsafe { AsyncFd::register_with_interest(dup, Interest::READABLE) }.ok()?
    };
    if !channel::lend(&host, &ch) {
        return None;
    }
    let core = Arc::new(LendCore {
        host: Arc::downgrade(&host),
        ch,
        done: AtomicBool::new(false),
        ended: AtomicBool::new(false),
        reader: TaskWakers::default(),
    });
    let lend = Arc::new(Lend(core.clone()));
    lends.retain(|(k, _)| *k != key);
    lends.push((key, Arc::downgrade(&lend)));
    drop(lends);
    rt.spawn(read_lent_channel(core, fd));
    Some(lend)
}

/// The task that reads a lent channel until its lend ends.
async fn read_lent_channel(core: Arc<LendCore>, fd: AsyncFd<OwnedFd>) {
    /// Gives the channel back to its worker however the task ends (runtime shutdown too).
    struct Back(Arc<LendCore>);
    impl Drop for Back {
        fn drop(&mut self) {
            self.0.ended.store(true, SeqCst);
            if let Some(h) = self.0.host.upgrade() {
                channel::end_lend(&h, &self.0.ch);
            }
        }
    }
    let _back = Back(core.clone());
    std::future::poll_fn(|cx| loop {
        core.reader.register(cx.waker());
        if core.done.load(SeqCst) {
            return Poll::Ready(());
        }
        let mut g = match fd.poll_read_ready(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(_)) => return Poll::Ready(()),
            Poll::Ready(Ok(g)) => g,
        };
        let Some(host) = core.host.upgrade() else { return Poll::Ready(()) };
        match channel::coalescing(|| channel::read_lent(&host, &core.ch)) {
            LentRead::Drained => g.clear_ready(),
            // Let the runtime's other tasks run before reading on.
            LentRead::Again => {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            LentRead::Down => return Poll::Ready(()),
        }
    })
    .await
}

/// A vsocket stream for tokio, used like [`tokio::net::TcpStream`].
///
/// Reading and writing go through [`AsyncRead`]/[`AsyncWrite`] (with
/// [`tokio::io::AsyncReadExt`]/[`tokio::io::AsyncWriteExt`]); [`AsyncWrite::poll_shutdown`]
/// is a half close. Dropping the stream closes the vsocket, as the blocking one does.
///
/// ```no_run
/// use tokio::io::AsyncWriteExt;
/// # async fn f() -> std::io::Result<()> {
/// let mut s = netchannel::tokio::VStream::connect("10.0.0.2:7000").await?;
/// s.write_all(b"hello").await?;
/// s.shutdown().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct VStream {
    io: StreamIo,
    /// How much of a caller's uninitialized read buffer the next read zeroes first
    /// ([`VStream::poll_read_inner`]).
    read_window: AtomicUsize,
}

impl VStream {
    /// Connect to `addr` (the peer host's IP and a vsocket port) through the process-wide
    /// host, as [`crate::VStream::connect`] does (configured by `NETCHANNEL_CONFIG`). Each
    /// address is tried in turn. Waiting for the peer's answer takes no thread; a first
    /// connect to a host whose channels are not up yet dials them on a blocking thread.
    /// A dropped connect future leaves nothing behind: the vsocket closes once the peer
    /// answers.
    ///
    /// ```no_run
    /// # async fn f() -> std::io::Result<()> {
    /// let s = netchannel::tokio::VStream::connect("10.0.0.2:7000").await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect(addr: impl ToSocketAddrs) -> io::Result<VStream> {
        let via = deployed()?;
        let mut last = io::Error::new(ErrorKind::InvalidInput, "no address to connect to");
        for a in addr.to_socket_addrs()? {
            let r = match &via {
                Deployed::Embedded(h) => VStream::connect_class_with(h, a, Class::Throughput).await,
                Deployed::Daemon(c) => {
                    let c = c.clone();
                    let s = ::tokio::task::spawn_blocking(move || c.connect_stream(a))
                        .await
                        .map_err(|e| io::Error::other(format!("connect task failed: {e}")))?;
                    s.and_then(VStream::from_std)
                }
            };
            match r {
                Ok(s) => return Ok(s),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Connect to `addr` through `host`, with a throughput-class vsocket.
    ///
    /// ```no_run
    /// # async fn f(host: netchannel::Host) -> std::io::Result<()> {
    /// let s = netchannel::tokio::VStream::connect_with(&host, "10.0.0.2:7000".parse().unwrap()).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect_with(host: &Host, addr: SocketAddr) -> io::Result<VStream> {
        VStream::connect_class_with(host, addr, Class::Throughput).await
    }

    /// Connect to `addr` through `host` with a vsocket of `class`.
    ///
    /// ```no_run
    /// use netchannel::Class;
    /// # async fn f(host: netchannel::Host) -> std::io::Result<()> {
    /// let addr = "10.0.0.2:7000".parse().unwrap();
    /// let s = netchannel::tokio::VStream::connect_class_with(&host, addr, Class::Latency).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect_class_with(host: &Host, addr: SocketAddr, class: Class) -> io::Result<VStream> {
        // Optimistic when the host's configuration says so (`optimistic_open`): then the
        // wait below ends at once.
        let optimistic = host.config().optimistic_open;
        let (s, deadline) = if crate::VStream::can_start_now(host, addr) {
            crate::VStream::connect_start(host.clone(), addr, class, optimistic)?
        } else {
            let h = host.clone();
            ::tokio::task::spawn_blocking(move || crate::VStream::connect_start(h, addr, class, optimistic))
                .await
                .map_err(|e| io::Error::other(format!("connect task failed: {e}")))??
        };
        let s = VStream::from_std(s)?;
        // The peer's answer, or the vsocket's failure, wakes the writers.
        let wait = std::future::poll_fn(|cx| {
            if let Some(r) = s.inner().open_result() {
                return Poll::Ready(r);
            }
            s.inner().register_task(true, cx.waker());
            s.inner().open_result().map_or(Poll::Pending, Poll::Ready)
        });
        match ::tokio::time::timeout_at(deadline.into(), wait).await {
            Ok(r) => r.map(|()| s),
            Err(_) => Err(s.inner().connect_timed_out()),
        }
    }

    /// Wrap a blocking stream (of the process-wide host, a [`Host`]'s or a listener's): it
    /// is put in non-blocking mode and, if the host's daemon serves it, its pollable
    /// descriptor is registered with the current runtime, as
    /// [`tokio::net::TcpStream::from_std`] does (an embedded vsocket wakes its tasks
    /// itself). Must be called within a runtime.
    ///
    /// ```no_run
    /// # async fn f(host: netchannel::Host) -> std::io::Result<()> {
    /// let blocking = host.connect("10.0.0.2:7000".parse().unwrap())?;
    /// let s = netchannel::tokio::VStream::from_std(blocking)?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn from_std(stream: crate::VStream) -> io::Result<VStream> {
        stream.set_nonblocking(true)?;
        if !stream.is_daemon() {
            // Wakers need no reactor, but the documented contract is tokio's.
            ::tokio::runtime::Handle::try_current().map_err(io::Error::other)?;
            return Ok(VStream::with(StreamIo::Direct(stream, LendSlot::default())));
        }
        stream.poll_fd()?;
        // SAFETY: the descriptor is the vsocket's readiness descriptor, created above and
        // kept open, the same one, for the vsocket's whole life, which `Stream` extends.
        let io = unsafe {
            AsyncFd::register_with_interest(Stream(stream), Interest::READABLE | Interest::WRITABLE)
        }?;
        Ok(VStream::with(StreamIo::Polled(io)))
    }

    /// The blocking stream back, in blocking mode again.
    ///
    /// ```no_run
    /// # async fn f(s: netchannel::tokio::VStream) -> std::io::Result<()> {
    /// let blocking: netchannel::VStream = s.into_std()?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn into_std(self) -> io::Result<crate::VStream> {
        let s = match self.io {
            StreamIo::Direct(s, _) => s,
            StreamIo::Polled(io) => io.into_inner().0,
        };
        s.set_nonblocking(false)?;
        Ok(s)
    }

    fn inner(&self) -> &crate::VStream {
        match &self.io {
            StreamIo::Direct(s, _) => s,
            StreamIo::Polled(io) => &io.get_ref().0,
        }
    }

    /// Ready when a read (`write` false) or a write would not block; else the task is woken
    /// when it would not. Readiness is kept until an operation reports `WouldBlock`.
    fn poll_ready(&self, cx: &mut Context<'_>, write: bool) -> Poll<io::Result<()>> {
        match &self.io {
            StreamIo::Direct(s, lend) => match s.register_task(write, cx.waker()) {
                Some(true) => Poll::Ready(Ok(())),
                _ => {
                    if !write {
                        lend.ensure(s);
                    }
                    Poll::Pending
                }
            },
            StreamIo::Polled(io) => {
                let g = if write { ready!(io.poll_write_ready(cx)) } else { ready!(io.poll_read_ready(cx)) };
                g?.retain_ready();
                Poll::Ready(Ok(()))
            }
        }
    }

    /// Run `f` until it does not report `WouldBlock`, waiting for readiness in between.
    fn poll_io<R>(
        &self,
        cx: &mut Context<'_>,
        write: bool,
        mut f: impl FnMut(&crate::VStream) -> io::Result<R>,
    ) -> Poll<io::Result<R>> {
        match &self.io {
            StreamIo::Direct(s, lend) => loop {
                match channel::coalescing(|| f(s)) {
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    r => return Poll::Ready(r),
                }
                // Registered first, then looked at again: a change meanwhile is not missed.
                if s.register_task(write, cx.waker()) != Some(true) {
                    if !write {
                        lend.ensure(s);
                    }
                    return Poll::Pending;
                }
            },
            StreamIo::Polled(io) => loop {
                let mut g =
                    if write { ready!(io.poll_write_ready(cx)) } else { ready!(io.poll_read_ready(cx)) }?;
                match g.try_io(|s| f(&s.get_ref().0)) {
                    Ok(r) => return Poll::Ready(r),
                    Err(_would_block) => continue,
                }
            },
        }
    }

    /// `f` once; a `WouldBlock` clears the readiness it reports.
    fn try_io<R>(&self, write: bool, f: impl FnOnce(&crate::VStream) -> io::Result<R>) -> io::Result<R> {
        match &self.io {
            StreamIo::Direct(s, _) => channel::coalescing(|| f(s)),
            StreamIo::Polled(io) => io.try_io(interest(write), |s| f(&s.0)),
        }
    }

    /// The peer's address: its host IP and its vsocket port.
    ///
    /// ```no_run
    /// # async fn f(s: netchannel::tokio::VStream) -> std::io::Result<()> {
    /// println!("connected to {}", s.peer_addr()?);
    /// # Ok(())
    /// # }
    /// ```
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.inner().peer_addr()
    }

    /// This end's address: this host's IP and the vsocket port.
    ///
    /// ```no_run
    /// # async fn f(s: netchannel::tokio::VStream) -> std::io::Result<()> {
    /// println!("from {}", s.local_addr()?);
    /// # Ok(())
    /// # }
    /// ```
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner().local_addr()
    }

    /// The vsocket's traffic class.
    ///
    /// ```no_run
    /// # fn f(s: netchannel::tokio::VStream) {
    /// assert_eq!(s.class(), netchannel::Class::Throughput);
    /// # }
    /// ```
    pub fn class(&self) -> Class {
        self.inner().class()
    }

    /// Move this end to another traffic class ([`crate::VStream::set_class`]).
    ///
    /// ```no_run
    /// # fn f(s: netchannel::tokio::VStream) {
    /// s.set_class(netchannel::Class::Latency);
    /// # }
    /// ```
    pub fn set_class(&self, class: Class) {
        self.inner().set_class(class)
    }

    /// Wait until the stream is readable (data, end of stream or an error); then
    /// [`VStream::try_read`] may succeed. Cancellation-safe.
    ///
    /// ```no_run
    /// # async fn f(s: netchannel::tokio::VStream) -> std::io::Result<()> {
    /// s.readable().await?;
    /// let mut buf = [0u8; 1024];
    /// match s.try_read(&mut buf) {
    ///     Ok(n) => println!("{n} bytes"),
    ///     Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
    ///     Err(e) => return Err(e),
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn readable(&self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_ready(cx, false)).await
    }

    /// Wait until the stream is writable; then [`VStream::try_write`] may succeed.
    /// Cancellation-safe.
    ///
    /// ```no_run
    /// # async fn f(s: netchannel::tokio::VStream) -> std::io::Result<()> {
    /// s.writable().await?;
    /// let n = s.try_write(b"hello")?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn writable(&self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_ready(cx, true)).await
    }

    /// Poll for read readiness: `Ready` when a read would not block, else the task is woken
    /// when it would not. As [`tokio::net::TcpStream::poll_read_ready`].
    ///
    /// ```no_run
    /// use std::task::Poll;
    /// # fn f(s: &netchannel::tokio::VStream, cx: &mut std::task::Context<'_>) {
    /// if let Poll::Ready(Ok(())) = s.poll_read_ready(cx) {
    ///     // s.try_read(...)
    /// }
    /// # }
    /// ```
    pub fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_ready(cx, false)
    }

    /// Poll for write readiness, as [`tokio::net::TcpStream::poll_write_ready`].
    ///
    /// ```no_run
    /// use std::task::Poll;
    /// # fn f(s: &netchannel::tokio::VStream, cx: &mut std::task::Context<'_>) {
    /// if let Poll::Ready(Ok(())) = s.poll_write_ready(cx) {
    ///     // s.try_write(...)
    /// }
    /// # }
    /// ```
    pub fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_ready(cx, true)
    }

    /// Read what is there without waiting: `Ok(0)` at end of stream, `WouldBlock` if
    /// nothing is (the readiness is then cleared, as tokio's `try_read` does).
    ///
    /// ```no_run
    /// # async fn f(s: netchannel::tokio::VStream) -> std::io::Result<()> {
    /// let mut buf = [0u8; 1024];
    /// let n = s.try_read(&mut buf)?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.try_io(false, |s| (&*s).read(buf))
    }

    /// Write what fits without waiting: `WouldBlock` if the send buffer is full.
    ///
    /// ```no_run
    /// # async fn f(s: netchannel::tokio::VStream) -> std::io::Result<()> {
    /// let n = s.try_write(b"hello")?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        self.try_io(true, |s| (&*s).write(buf))
    }

    fn with(io: StreamIo) -> VStream {
        VStream { io, read_window: AtomicUsize::new(READ_WINDOW_MIN) }
    }

    /// Read into `buf`. A caller's uninitialized space (hyper's read buffer: 8 KiB and more)
    /// is zeroed before the read only as far as the stream's read window, which doubles
    /// while reads fill it and halves while they use less than a quarter: a small message,
    /// and a read that finds nothing, zero a little, not the whole buffer each time.
    fn poll_read_inner(&self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let initialized = buf.initialized().len() - buf.filled().len();
        let window = self.read_window.load(Relaxed);
        let want = buf.remaining().min(window).max(initialized);
        let dst = buf.initialize_unfilled_to(want);
        let n = ready!(self.poll_io(cx, false, |s| (&*s).read(&mut *dst)))?;
        if n == want && window < READ_WINDOW_MAX {
            self.read_window.store(window * 2, Relaxed);
        } else if n < window / 4 && window > READ_WINDOW_MIN {
            self.read_window.store(window / 2, Relaxed);
        }
        buf.advance(n);
        Poll::Ready(Ok(()))
    }

    fn poll_write_inner(&self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_io(cx, true, |s| (&*s).write(buf))
    }

    fn half_close(&self) -> io::Result<()> {
        match self.inner().shutdown(Shutdown::Write) {
            // Shutting down twice, or after the peer reset, is done already.
            Err(e) if e.kind() != ErrorKind::BrokenPipe && e.kind() != ErrorKind::NotConnected => Err(e),
            _ => Ok(()),
        }
    }

    /// Borrowed read and write halves, usable at once from two futures of one task, as
    /// [`tokio::net::TcpStream::split`].
    ///
    /// ```no_run
    /// # async fn f(mut s: netchannel::tokio::VStream) -> std::io::Result<()> {
    /// let (mut rd, mut wr) = s.split();
    /// tokio::io::copy(&mut rd, &mut wr).await?; // echo
    /// # Ok(())
    /// # }
    /// ```
    pub fn split(&mut self) -> (ReadHalf<'_>, WriteHalf<'_>) {
        (ReadHalf(self), WriteHalf(self))
    }

    /// Owned read and write halves, movable to different tasks, as
    /// [`tokio::net::TcpStream::into_split`]. Dropping the write half shuts down writing.
    ///
    /// ```no_run
    /// # async fn f(s: netchannel::tokio::VStream) -> std::io::Result<()> {
    /// let (mut rd, mut wr) = s.into_split();
    /// tokio::spawn(async move { tokio::io::copy(&mut rd, &mut tokio::io::sink()).await });
    /// tokio::io::AsyncWriteExt::write_all(&mut wr, b"hello").await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn into_split(self) -> (OwnedReadHalf, OwnedWriteHalf) {
        let s = Arc::new(self);
        (OwnedReadHalf(s.clone()), OwnedWriteHalf { s, shutdown_on_drop: true })
    }
}

impl AsyncRead for VStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        self.poll_read_inner(cx, buf)
    }
}

impl AsyncWrite for VStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_write_inner(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// A half close: the peer reads what was written, then end of stream.
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.half_close())
    }
}

/// The vsocket's pollable descriptor ([`crate::VStream::poll_fd`]).
///
/// # Panics
///
/// If the descriptor cannot be made (out of descriptors).
impl AsRawFd for VStream {
    fn as_raw_fd(&self) -> RawFd {
        self.inner().as_raw_fd()
    }
}

impl TryFrom<crate::VStream> for VStream {
    type Error = io::Error;

    /// [`VStream::from_std`].
    fn try_from(s: crate::VStream) -> io::Result<VStream> {
        VStream::from_std(s)
    }
}

/// The borrowed read half of [`VStream::split`].
///
/// ```no_run
/// use tokio::io::AsyncReadExt;
/// # async fn f(mut s: netchannel::tokio::VStream) -> std::io::Result<()> {
/// let (mut rd, _wr) = s.split();
/// let mut buf = Vec::new();
/// rd.read_to_end(&mut buf).await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct ReadHalf<'a>(&'a VStream);

/// The borrowed write half of [`VStream::split`]; shutting it down is a half close.
///
/// ```no_run
/// use tokio::io::AsyncWriteExt;
/// # async fn f(mut s: netchannel::tokio::VStream) -> std::io::Result<()> {
/// let (_rd, mut wr) = s.split();
/// wr.write_all(b"bye").await?;
/// wr.shutdown().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct WriteHalf<'a>(&'a VStream);

/// The owned read half of [`VStream::into_split`].
///
/// ```no_run
/// use tokio::io::AsyncReadExt;
/// # async fn f(s: netchannel::tokio::VStream) -> std::io::Result<()> {
/// let (mut rd, _wr) = s.into_split();
/// let mut buf = [0u8; 16];
/// let n = rd.read(&mut buf).await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct OwnedReadHalf(Arc<VStream>);

/// The owned write half of [`VStream::into_split`]; dropping it (or shutting it down) is a
/// half close.
///
/// ```no_run
/// use tokio::io::AsyncWriteExt;
/// # async fn f(s: netchannel::tokio::VStream) -> std::io::Result<()> {
/// let (_rd, mut wr) = s.into_split();
/// wr.write_all(b"bye").await?;
/// drop(wr); // the peer reads end of stream after "bye"
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct OwnedWriteHalf {
    s: Arc<VStream>,
    shutdown_on_drop: bool,
}

/// The two halves given to [`reunite`](OwnedReadHalf::reunite) were not of one stream.
#[derive(Debug)]
pub struct ReuniteError(pub OwnedReadHalf, pub OwnedWriteHalf);

impl std::fmt::Display for ReuniteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("tried to reunite halves that are not from the same vsocket")
    }
}

impl std::error::Error for ReuniteError {}

impl OwnedReadHalf {
    /// The stream again, from its two halves.
    ///
    /// ```no_run
    /// # fn f(s: netchannel::tokio::VStream) {
    /// let (rd, wr) = s.into_split();
    /// let s = rd.reunite(wr).unwrap();
    /// # }
    /// ```
    pub fn reunite(self, mut other: OwnedWriteHalf) -> Result<VStream, ReuniteError> {
        if !Arc::ptr_eq(&self.0, &other.s) {
            return Err(ReuniteError(self, other));
        }
        other.shutdown_on_drop = false;
        let s = other.s.clone();
        drop(other);
        drop(self);
        Ok(Arc::into_inner(s).expect("both halves were given back"))
    }

    /// The peer's address.
    ///
    /// ```no_run
    /// # fn f(rd: netchannel::tokio::OwnedReadHalf) -> std::io::Result<()> {
    /// println!("{}", rd.peer_addr()?);
    /// # Ok(())
    /// # }
    /// ```
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.0.peer_addr()
    }

    /// This end's address.
    ///
    /// ```no_run
    /// # fn f(rd: netchannel::tokio::OwnedReadHalf) -> std::io::Result<()> {
    /// println!("{}", rd.local_addr()?);
    /// # Ok(())
    /// # }
    /// ```
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }
}

impl OwnedWriteHalf {
    /// The peer's address.
    ///
    /// ```no_run
    /// # fn f(wr: netchannel::tokio::OwnedWriteHalf) -> std::io::Result<()> {
    /// println!("{}", wr.peer_addr()?);
    /// # Ok(())
    /// # }
    /// ```
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.s.peer_addr()
    }

    /// This end's address.
    ///
    /// ```no_run
    /// # fn f(wr: netchannel::tokio::OwnedWriteHalf) -> std::io::Result<()> {
    /// println!("{}", wr.local_addr()?);
    /// # Ok(())
    /// # }
    /// ```
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.s.local_addr()
    }
}

impl Drop for OwnedWriteHalf {
    fn drop(&mut self) {
        if self.shutdown_on_drop {
            let _ = self.s.half_close();
        }
    }
}

macro_rules! read_half {
    ($t:ty, $s:ident => $e:expr) => {
        impl AsyncRead for $t {
            fn poll_read(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                let $s = &*self;
                $e.poll_read_inner(cx, buf)
            }
        }
    };
}

macro_rules! write_half {
    ($t:ty, $s:ident => $e:expr) => {
        impl AsyncWrite for $t {
            fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
                let $s = &*self;
                $e.poll_write_inner(cx, buf)
            }
            fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
                Poll::Ready(Ok(()))
            }
            fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
                let $s = &*self;
                Poll::Ready($e.half_close())
            }
        }
    };
}

read_half!(ReadHalf<'_>, h => h.0);
write_half!(WriteHalf<'_>, h => h.0);
read_half!(OwnedReadHalf, h => h.0);
write_half!(OwnedWriteHalf, h => h.s);

/// A vsocket listener for tokio, used like [`tokio::net::TcpListener`].
///
/// ```no_run
/// # async fn f() -> std::io::Result<()> {
/// let listener = netchannel::tokio::VListener::bind("0.0.0.0:7000").await?;
/// loop {
///     let (stream, peer) = listener.accept().await?;
///     tokio::spawn(async move {
///         let (mut rd, mut wr) = stream.into_split();
///         let _ = tokio::io::copy(&mut rd, &mut wr).await;
///     });
/// }
/// # }
/// ```
#[derive(Debug)]
pub struct VListener {
    io: ListenerIo,
}

impl VListener {
    /// Listen on the port of `addr` through the process-wide host, as
    /// [`crate::VListener::bind`] does.
    ///
    /// ```no_run
    /// # async fn f() -> std::io::Result<()> {
    /// let listener = netchannel::tokio::VListener::bind("0.0.0.0:7000").await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn bind(addr: impl ToSocketAddrs) -> io::Result<VListener> {
        VListener::from_std(crate::VListener::bind(addr)?)
    }

    /// Wrap a blocking listener (of the process-wide host or a [`Host`]'s): it is put in
    /// non-blocking mode and, if the host's daemon serves it, registered with the current
    /// runtime. Must be called within a runtime.
    ///
    /// ```no_run
    /// # async fn f(host: netchannel::Host) -> std::io::Result<()> {
    /// let listener = netchannel::tokio::VListener::from_std(host.bind(7000)?)?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn from_std(listener: crate::VListener) -> io::Result<VListener> {
        listener.set_nonblocking(true)?;
        if !listener.is_daemon() {
            ::tokio::runtime::Handle::try_current().map_err(io::Error::other)?;
            return Ok(VListener { io: ListenerIo::Direct(listener) });
        }
        listener.poll_fd()?;
        // SAFETY: the descriptor is the listener's readiness descriptor, created above and
        // kept open, the same one, for the listener's whole life, which `Listener` extends.
        let io = unsafe { AsyncFd::register_with_interest(Listener(listener), Interest::READABLE) }?;
        Ok(VListener { io: ListenerIo::Polled(io) })
    }

    fn inner(&self) -> &crate::VListener {
        match &self.io {
            ListenerIo::Direct(l) => l,
            ListenerIo::Polled(io) => &io.get_ref().0,
        }
    }

    /// The blocking listener back, in blocking mode again.
    ///
    /// ```no_run
    /// # fn f(l: netchannel::tokio::VListener) -> std::io::Result<()> {
    /// let blocking: netchannel::VListener = l.into_std()?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn into_std(self) -> io::Result<crate::VListener> {
        let l = match self.io {
            ListenerIo::Direct(l) => l,
            ListenerIo::Polled(io) => io.into_inner().0,
        };
        l.set_nonblocking(false)?;
        Ok(l)
    }

    /// Wait for the next vsocket and return it with the peer's address. Cancellation-safe:
    /// a dropped `accept` future takes no vsocket out of the queue.
    ///
    /// ```no_run
    /// # async fn f(l: netchannel::tokio::VListener) -> std::io::Result<()> {
    /// let (stream, peer) = l.accept().await?;
    /// println!("vsocket from {peer}");
    /// # Ok(())
    /// # }
    /// ```
    pub async fn accept(&self) -> io::Result<(VStream, SocketAddr)> {
        std::future::poll_fn(|cx| self.poll_accept(cx)).await
    }

    /// Poll for the next vsocket, as [`tokio::net::TcpListener::poll_accept`].
    ///
    /// ```no_run
    /// # async fn f(l: netchannel::tokio::VListener) -> std::io::Result<()> {
    /// let (s, peer) = std::future::poll_fn(|cx| l.poll_accept(cx)).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<(VStream, SocketAddr)>> {
        let r = match &self.io {
            ListenerIo::Direct(l) => loop {
                match l.accept() {
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    r => break r,
                }
                if l.register_task(cx.waker()) != Some(true) {
                    return Poll::Pending;
                }
            },
            ListenerIo::Polled(io) => loop {
                let mut g = ready!(io.poll_read_ready(cx))?;
                if let Ok(r) = g.try_io(|l| l.get_ref().0.accept()) {
                    break r;
                }
            },
        };
        Poll::Ready(r.and_then(|(s, a)| VStream::from_std(s).map(|s| (s, a))))
    }

    /// This listener's address: the host's IP and the port.
    ///
    /// ```no_run
    /// # fn f(l: netchannel::tokio::VListener) -> std::io::Result<()> {
    /// println!("listening on {}", l.local_addr()?);
    /// # Ok(())
    /// # }
    /// ```
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner().local_addr()
    }
}

/// The listener's pollable descriptor ([`crate::VListener::poll_fd`]).
///
/// # Panics
///
/// If the descriptor cannot be made (out of descriptors).
impl AsRawFd for VListener {
    fn as_raw_fd(&self) -> RawFd {
        self.inner().as_raw_fd()
    }
}

impl TryFrom<crate::VListener> for VListener {
    type Error = io::Error;

    /// [`VListener::from_std`].
    fn try_from(l: crate::VListener) -> io::Result<VListener> {
        VListener::from_std(l)
    }
}
