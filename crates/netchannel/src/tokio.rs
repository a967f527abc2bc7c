//! Vsockets in async Rust: [`VStream`] and [`VListener`] for tokio (cargo feature `tokio`).
//!
//! The types mirror `tokio::net::TcpStream` and `tokio::net::TcpListener`, so a program
//! switches from TCP to NetChannel by changing an import. Each wraps its blocking
//! counterpart ([`crate::VStream`], [`crate::VListener`]) in non-blocking mode inside a
//! [`tokio::io::unix::AsyncFd`] over the vsocket's pollable descriptor
//! ([`crate::VStream::poll_fd`]), whose readiness the stack drives: the runtime's reactor
//! (epoll, edge-triggered) wakes a task exactly when a read, write or accept stops blocking,
//! and a busy stream costs no syscall per message.
//!
//! They work on the current-thread and the multi-thread runtime; the runtime needs its I/O
//! and time drivers (`enable_all`, as `#[tokio::main]` does). Errors carry the same
//! [`std::io::ErrorKind`]s as the blocking API. [`VListener::accept`] and reads are
//! cancellation-safe: a dropped future loses no vsocket and no byte.
//!
//! The vsockets of an embedded host are served; those of the host's daemon
//! (`deployment = "daemon"`) are not pollable yet, and converting one fails with
//! [`std::io::ErrorKind::Unsupported`].
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
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use ::tokio::io::unix::AsyncFd;
use ::tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

use crate::vsock::{deployed, Deployed};
use crate::{Class, Host};

/// The blocking stream inside an [`AsyncFd`]: registered through its readiness descriptor.
#[derive(Debug)]
struct Stream(crate::VStream);

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        // `VStream::new` made the descriptor before wrapping: this cannot fail.
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
    io: AsyncFd<Stream>,
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
        let wait = async {
            loop {
                let mut g = s.io.writable().await?;
                match s.inner().open_result() {
                    Some(r) => return r,
                    None => g.clear_ready(),
                }
            }
        };
        match ::tokio::time::timeout_at(deadline.into(), wait).await {
            Ok(r) => r.map(|()| s),
            Err(_) => Err(s.inner().connect_timed_out()),
        }
    }

    /// Wrap a blocking stream (of the process-wide host, a [`Host`]'s or a listener's): it
    /// is put in non-blocking mode and its pollable descriptor is registered with the
    /// current runtime, as [`tokio::net::TcpStream::from_std`] does. Must be called within
    /// a runtime. Fails with [`ErrorKind::Unsupported`] for a daemon-served vsocket.
    ///
    /// ```no_run
    /// # async fn f(host: netchannel::Host) -> std::io::Result<()> {
    /// let blocking = host.connect("10.0.0.2:7000".parse().unwrap())?;
    /// let s = netchannel::tokio::VStream::from_std(blocking)?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn from_std(stream: crate::VStream) -> io::Result<VStream> {
        stream.poll_fd()?;
        stream.set_nonblocking(true)?;
        // SAFETY: the descriptor is the vsocket's readiness descriptor, created above and
        // kept open, the same one, for the vsocket's whole life, which `Stream` extends.
        let io = unsafe {
            AsyncFd::register_with_interest(Stream(stream), Interest::READABLE | Interest::WRITABLE)
        }?;
        Ok(VStream { io })
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
        let s = self.io.into_inner().0;
        s.set_nonblocking(false)?;
        Ok(s)
    }

    fn inner(&self) -> &crate::VStream {
        &self.io.get_ref().0
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
        self.io.readable().await?.retain_ready();
        Ok(())
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
        self.io.writable().await?.retain_ready();
        Ok(())
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
        ready!(self.io.poll_read_ready(cx))?.retain_ready();
        Poll::Ready(Ok(()))
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
        ready!(self.io.poll_write_ready(cx))?.retain_ready();
        Poll::Ready(Ok(()))
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
        self.io.try_io(Interest::READABLE, |s| (&s.0).read(buf))
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
        self.io.try_io(Interest::WRITABLE, |s| (&s.0).write(buf))
    }

    fn poll_read_inner(&self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            let mut g = ready!(self.io.poll_read_ready(cx))?;
            let dst = buf.initialize_unfilled();
            match g.try_io(|s| (&s.get_ref().0).read(dst)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_write_inner(&self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            let mut g = ready!(self.io.poll_write_ready(cx))?;
            match g.try_io(|s| (&s.get_ref().0).write(buf)) {
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) => continue,
            }
        }
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

impl AsRawFd for VStream {
    fn as_raw_fd(&self) -> RawFd {
        self.io.as_raw_fd()
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
    io: AsyncFd<Listener>,
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
    /// non-blocking mode and registered with the current runtime. Must be called within a
    /// runtime. Fails with [`ErrorKind::Unsupported`] for a daemon-served listener.
    ///
    /// ```no_run
    /// # async fn f(host: netchannel::Host) -> std::io::Result<()> {
    /// let listener = netchannel::tokio::VListener::from_std(host.bind(7000)?)?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn from_std(listener: crate::VListener) -> io::Result<VListener> {
        listener.poll_fd()?;
        listener.set_nonblocking(true)?;
        // SAFETY: the descriptor is the listener's readiness descriptor, created above and
        // kept open, the same one, for the listener's whole life, which `Listener` extends.
        let io = unsafe { AsyncFd::register_with_interest(Listener(listener), Interest::READABLE) }?;
        Ok(VListener { io })
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
        let l = self.io.into_inner().0;
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
        loop {
            let mut g = ready!(self.io.poll_read_ready(cx))?;
            match g.try_io(|l| l.get_ref().0.accept()) {
                Ok(Ok((s, a))) => return Poll::Ready(VStream::from_std(s).map(|s| (s, a))),
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
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
        self.io.get_ref().0.local_addr()
    }
}

impl AsRawFd for VListener {
    fn as_raw_fd(&self) -> RawFd {
        self.io.as_raw_fd()
    }
}

impl TryFrom<crate::VListener> for VListener {
    type Error = io::Error;

    /// [`VListener::from_std`].
    fn try_from(l: crate::VListener) -> io::Result<VListener> {
        VListener::from_std(l)
    }
}
