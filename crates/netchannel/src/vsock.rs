//! The public vsocket API: [`VStream`] and [`VListener`], used like `std::net::TcpStream` and
//! `TcpListener`, over an embedded host's vsockets (`crate::engine::vsocket`) or a
//! daemon's (`crate::daemon::client`).

use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::engine::channel::Sleeping;
use crate::engine::Host;
use crate::wire::Class;

pub use crate::engine::vsocket::VsockInfo;
use crate::engine::vsocket::{ListenQueue, OpenMode, VSock};

fn err(kind: ErrorKind, msg: impl Into<String>) -> io::Error {
    io::Error::new(kind, msg.into())
}

/// The host's side of the public API: opening vsockets and listening for them. (Here, not in
/// `crate::engine`, so that the engine never names the API types.)
impl Host {
    /// Open a throughput-class vsocket to `addr`: the peer host's IP and a vsocket port.
    /// The connect is confirmed, unless the configuration says `optimistic_open` (then as
    /// [`Host::connect_optimistic`]): to a port the peer has not announced (config
    /// `announce_listeners`) it returns once the peer accepted, and fails with
    /// `ConnectionRefused` if nothing listens there; to a port the peer announced it
    /// returns at once and the OPEN leaves with the first write, carrying its first bytes
    /// (within what the listener granted) — should the listener have closed meanwhile, the
    /// first read or write fails with `ConnectionRefused`, as TCP resets a connection its
    /// listener closed before accepting it. [`Host::announced_ports`] tells which ports
    /// those are.
    pub fn connect(&self, addr: SocketAddr) -> io::Result<VStream> {
        self.connect_class(addr, Class::Throughput)
    }

    /// Open a vsocket of the given class to `addr` (confirmed unless `optimistic_open`).
    pub fn connect_class(&self, addr: SocketAddr, class: Class) -> io::Result<VStream> {
        VStream::open(self.clone(), addr, class, self.inner().cfg.optimistic_open)
    }

    /// Open a throughput-class vsocket to `addr` optimistically, as TCP Fast Open does:
    /// return at once, and send the OPEN with the first write, carrying its first bytes (up
    /// to `open_credit`, which the listening host grants every OPEN) — one frame and no
    /// round trip before the request leaves. Bytes beyond that wait for the peer's answer.
    /// A refusal fails the first read or write after it arrives with `ConnectionRefused`
    /// (a first write may already have succeeded). A vsocket that reads first sends a bare
    /// OPEN then.
    ///
    /// ```no_run
    /// use std::io::{Read, Write};
    /// let host = netchannel::Host::start(netchannel::Config::default())?;
    /// let mut s = host.connect_optimistic("127.0.0.2:7000".parse().unwrap())?;
    /// s.write_all(b"GET /")?; // leaves with the OPEN
    /// let mut answer = Vec::new();
    /// s.read_to_end(&mut answer)?; // a refusal shows here
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn connect_optimistic(&self, addr: SocketAddr) -> io::Result<VStream> {
        VStream::open(self.clone(), addr, Class::Throughput, true)
    }

    /// Listen for vsockets on `port` of this host.
    pub fn bind(&self, port: u16) -> io::Result<VListener> {
        VListener::open(self.clone(), port)
    }
}

/// A daemon client's side of the public API (here, not in `crate::daemon::client`, so that
/// the daemon's client never names the API types).
impl crate::daemon::Client {
    /// Open a throughput-class vsocket to `addr` (the peer host's IP and a vsocket port).
    pub fn connect_stream(&self, addr: SocketAddr) -> io::Result<VStream> {
        self.connect_class(addr, Class::Throughput)
    }

    /// Open a vsocket of `class` to `addr`.
    pub fn connect_class(&self, addr: SocketAddr, class: Class) -> io::Result<VStream> {
        Ok(VStream::from_daemon(self.open_stream(addr, class)?))
    }

    /// Listen on vsocket `port` of this host (0: any free port).
    pub fn bind(&self, port: u16) -> io::Result<VListener> {
        Ok(VListener::from_daemon(self.listen(port)?))
    }
}

/// A vsocket stream between two hosts, used like [`std::net::TcpStream`].
///
/// Dropping the last handle closes it: data already written is still delivered, then the
/// peer reads end-of-stream. Closing with unread received data resets the connection, as
/// TCP does.
pub struct VStream {
    pub(crate) imp: StreamImp,
}

#[derive(Clone)]
pub(crate) enum StreamImp {
    /// Served by a host engine in this process.
    Embedded(Arc<Handle>),
    /// Served by the host's daemon through shared memory.
    Daemon(Arc<crate::daemon::client::DStream>),
}

pub(crate) struct Handle {
    vs: Arc<VSock>,
    _host: Host,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.vs.close();
        // Nobody polls any more: the descriptor goes now, even if the engine still holds
        // the vsocket while its last bytes drain.
        if let Some(r) = self.vs.ready.get() {
            r.close();
        }
    }
}

impl std::fmt::Debug for VStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (l, r) = match &self.imp {
            StreamImp::Embedded(h) => (h.vs.local, h.vs.remote),
            StreamImp::Daemon(d) => (d.local(), d.remote()),
        };
        write!(f, "VStream({l} -> {r})")
    }
}

/// What `VStream::connect`/`VListener::bind` use, by the configuration named by
/// `NETCHANNEL_CONFIG` (`deployment`).
pub(crate) enum Deployed {
    Embedded(Host),
    Daemon(crate::daemon::Client),
}

pub(crate) fn deployed() -> io::Result<Deployed> {
    // The file is read once per process, like the global host it configures.
    static CONFIG: std::sync::OnceLock<Result<crate::Config, crate::ConfigError>> =
        std::sync::OnceLock::new();
    let cfg = CONFIG.get_or_init(|| match std::env::var_os("NETCHANNEL_CONFIG") {
        Some(p) => crate::Config::load(std::path::Path::new(&p)),
        None => Ok(crate::Config::default()),
    });
    let cfg = cfg.as_ref().map_err(|e| io::Error::from(e.clone()))?;
    match cfg.deployment {
        crate::Deployment::Embedded => Host::global().map(Deployed::Embedded),
        crate::Deployment::Daemon => crate::daemon::Client::global(cfg).map(Deployed::Daemon),
    }
}

impl VStream {
    /// Connect to `addr` (the peer host's IP and a vsocket port) through the process-wide
    /// host ([`Host::global`]) or, if the configuration named by `NETCHANNEL_CONFIG` says
    /// `deployment = "daemon"`, through the host's daemon.
    pub fn connect(addr: impl ToSocketAddrs) -> io::Result<VStream> {
        let via = deployed()?;
        let mut last = err(ErrorKind::InvalidInput, "no address to connect to");
        for a in addr.to_socket_addrs()? {
            let r = match &via {
                Deployed::Embedded(h) => h.connect(a),
                Deployed::Daemon(c) => c.connect_stream(a),
            };
            match r {
                Ok(s) => return Ok(s),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    pub(crate) fn open(host: Host, addr: SocketAddr, class: Class, optimistic: bool) -> io::Result<VStream> {
        VStream::open_in(host, addr, class, OpenMode::from_optimistic(optimistic), None)
    }

    /// [`VStream::open`], the vsocket's rings in `region` if the host keeps them in shared
    /// memory (the daemon's recycled regions).
    pub(crate) fn open_in(
        host: Host,
        addr: SocketAddr,
        class: Class,
        mode: OpenMode,
        region: Option<Arc<crate::shm::Region>>,
    ) -> io::Result<VStream> {
        let (stream, deadline) = VStream::connect_start_in(host, addr, class, mode, region)?;
        let vs = stream.engine_vsock().expect("embedded").clone();
        let mut inline = true;
        let mut tx = vs.tx.lock().unwrap();
        loop {
            if let Some((kind, msg)) = &tx.error {
                return Err(err(*kind, msg.clone()));
            }
            // Opened, or not waiting for the answer (optimistic, or an announced port).
            if tx.opened || tx.optimistic {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                drop(tx);
                return Err(vs.connect_timed_out());
            }
            // Read the home channel, which carries the answer, instead of sleeping until
            // its worker has read it.
            // Either way the state is looked at again: the lock was let go meanwhile.
            if inline {
                // Counted under the lock that OPEN_OK is recorded under: an answer recorded
                // after the look above moves the count past `seen`. (Read after letting go,
                // an answer in between was counted already and the wait slept to its deadline.)
                let seen = vs.rx_events.load(Ordering::SeqCst);
                drop(tx);
                inline = vs.wait_inline(Some(deadline), || vs.rx_events.load(Ordering::SeqCst) != seen);
                tx = vs.tx.lock().unwrap();
                continue;
            }
            tx.waiting = true;
            let host = vs.host();
            let _sleeping = host.as_deref().map(Sleeping::new);
            tx = vs.tx_cv.wait_timeout(tx, left).unwrap().0;
            tx.waiting = false;
        }
        drop(tx);
        Ok(stream)
    }

    /// Whether a connect to `addr` through `host` can start without waiting: the channels
    /// to its host are up (else [`VStream::connect_start`] dials them first).
    #[cfg(feature = "tokio")]
    pub(crate) fn can_start_now(host: &Host, addr: SocketAddr) -> bool {
        let inner = host.inner();
        let key = SocketAddr::new(addr.ip(), inner.cfg.peer_port());
        let peer = inner.peers.lock().unwrap().get(&key).cloned();
        peer.is_some_and(|p| matches!(*p.state.lock().unwrap(), crate::engine::peer::PeerState::Up))
    }

    /// Start a connect: find (or dial) the channels to the peer host, send OPEN and return
    /// the connecting stream with the connect's deadline, without waiting for the answer.
    /// [`VStream::open_result`] then tells the outcome; the stream's readiness descriptor is
    /// not writable until then.
    #[cfg(feature = "tokio")]
    pub(crate) fn connect_start(
        host: Host,
        addr: SocketAddr,
        class: Class,
        optimistic: bool,
    ) -> io::Result<(VStream, Instant)> {
        VStream::connect_start_in(host, addr, class, OpenMode::from_optimistic(optimistic), None)
    }

    /// Start a connect in `mode` (see [`OpenMode`]): with an optimistic open, or a
    /// confirmed one to a port the peer announced (`engine::announce`), the stream is
    /// writable at once, within the credit the peer's LISTEN granted (an optimistic open to a
    /// port not announced assumes this host's `open_credit`), and its OPEN waits for the
    /// first write so that it carries its bytes; a refusal fails the first read or write.
    pub(crate) fn connect_start_in(
        host: Host,
        addr: SocketAddr,
        class: Class,
        mode: OpenMode,
        region: Option<Arc<crate::shm::Region>>,
    ) -> io::Result<(VStream, Instant)> {
        let inner = host.inner().clone();
        let class = if inner.cfg.latency_ports.contains(&addr.port()) { Class::Latency } else { class };
        let deadline = Instant::now() + inner.cfg.connect_timeout;
        let peer = inner.peer_for(addr.ip(), deadline)?;
        let grant = match mode {
            OpenMode::Confirmed => None,
            OpenMode::Announced | OpenMode::Optimistic => peer.announced.lock().unwrap().grant(addr.port()),
        };
        let early = match mode {
            OpenMode::Optimistic => Some(grant.unwrap_or(inner.cfg.open_credit as u64)),
            OpenMode::Announced => grant,
            OpenMode::Confirmed => None,
        };
        let id = inner.alloc_id();
        let port = inner.alloc_port()?;
        let local_ip = peer.local_ip.lock().unwrap().unwrap_or(inner.local.ip());
        let mut vs =
            VSock::new(&inner, id, peer.clone(), class, SocketAddr::new(local_ip, port), addr, 0, region)?;
        Arc::get_mut(&mut vs).expect("fresh vsocket").owns_port = true;
        if let Some(credit) = early {
            // Writable at once within the credit the listener grants an OPEN; the OPEN
            // itself waits for the first write so that it carries its bytes (a listener that
            // grants nothing gets it now: writes wait for its answer).
            let mut tx = vs.tx.lock().unwrap();
            tx.optimistic = true;
            let _ = tx.st.on_credit(0, credit);
            drop(tx);
            vs.open_deferred.store(credit > 0, Ordering::Release);
            if mode == OpenMode::Announced {
                inner.totals.connects_announced.fetch_add(1, Ordering::Relaxed);
                if credit > 0 {
                    // Confirmed: the connection reaches the listener even if the app never
                    // writes (an optimistic open's OPEN waits for the app, as TCP_FASTOPEN_CONNECT).
                    let worker = peer.control_channel(class, id).map_or(0, |c| c.worker);
                    inner.owe_frame(&vs, worker);
                }
            }
        }
        let optimistic = early.is_some();
        if let (Some(shm), false) = (&vs.shm, optimistic) {
            // Until OPEN_OK (`on_open_ok`) or a failure: what a daemon's shim app, handed this
            // vsocket before the answer, reads to know it is still connecting.
            shm.header().state.fetch_or(crate::shm::OPENING, Ordering::SeqCst);
        }
        inner.vsocks.write().unwrap().insert(id, vs.clone());
        let stream = VStream { imp: StreamImp::Embedded(Arc::new(Handle { vs: vs.clone(), _host: host })) };
        // With no channel up (all being dialed again), OPEN goes out when one is back
        // (`VSock::recover`); the peer's loss fails this vsocket, and the deadline bounds it.
        if !vs.open_deferred.load(Ordering::Acquire) {
            peer.send_control(class, id, &vs.open_frame(inner.cfg.recv_buffer, 0));
        }
        Ok((stream, deadline))
    }

    /// Fail a connect that passed its deadline (`connect_timeout`) without an answer.
    #[cfg(feature = "tokio")]
    pub(crate) fn connect_timed_out(&self) -> io::Error {
        match &self.imp {
            StreamImp::Embedded(h) => h.vs.connect_timed_out(),
            StreamImp::Daemon(_) => err(ErrorKind::TimedOut, "connect timed out"),
        }
    }

    pub(crate) fn from_daemon(d: crate::daemon::client::DStream) -> VStream {
        VStream { imp: StreamImp::Daemon(Arc::new(d)) }
    }

    /// The engine's vsocket behind an embedded stream.
    pub(crate) fn engine_vsock(&self) -> Option<&Arc<VSock>> {
        match &self.imp {
            StreamImp::Embedded(h) => Some(&h.vs),
            StreamImp::Daemon(_) => None,
        }
    }

    /// Whether the host's daemon serves this vsocket (else an engine in this process does).
    pub fn is_daemon(&self) -> bool {
        matches!(self.imp, StreamImp::Daemon(_))
    }

    /// The peer's address: its host IP and its vsocket port.
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        Ok(match &self.imp {
            StreamImp::Embedded(h) => h.vs.remote,
            StreamImp::Daemon(d) => d.remote(),
        })
    }

    /// This end's address: this host's IP and the vsocket port.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(match &self.imp {
            StreamImp::Embedded(h) => h.vs.local,
            StreamImp::Daemon(d) => d.local(),
        })
    }

    /// The vsocket's traffic class.
    pub fn class(&self) -> Class {
        match &self.imp {
            StreamImp::Embedded(h) => h.vs.class(),
            StreamImp::Daemon(d) => d.class(),
        }
    }

    /// Move this end of the vsocket to another traffic class: later segments and control
    /// frames travel on that class's channels (latency channels are served by their own
    /// workers and sent without a hand-off). The peer's end keeps its own class.
    pub fn set_class(&self, class: Class) {
        match &self.imp {
            StreamImp::Embedded(h) => h.vs.class.store(class as u8, Ordering::Relaxed),
            StreamImp::Daemon(d) => {
                if let Err(e) = d.set_class(class) {
                    tracing::warn!(class = class.name(), error = %e, "cannot move the vsocket to another class");
                }
            }
        }
    }

    /// Shut down reading, writing or both. `Shutdown::Write` is a half close: the peer reads
    /// everything written so far, then end-of-stream.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        let vs = match &self.imp {
            StreamImp::Embedded(h) => &h.vs,
            StreamImp::Daemon(d) => return d.shutdown(how),
        };
        if matches!(how, Shutdown::Write | Shutdown::Both) {
            {
                let mut tx = vs.tx.lock().unwrap();
                if let Some((kind, msg)) = &tx.error {
                    return Err(err(*kind, msg.clone()));
                }
                tx.st.shutdown();
            }
            vs.pump();
            vs.wake_writers();
        }
        if matches!(how, Shutdown::Read | Shutdown::Both) {
            vs.rx.lock().unwrap().shut_read = true;
            vs.rx_event();
            vs.rx_cv.notify_all();
            vs.wake_pollers();
        }
        Ok(())
    }

    /// In non-blocking mode reads and writes that cannot proceed fail with `WouldBlock`.
    pub fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        match &self.imp {
            StreamImp::Embedded(h) => h.vs.nonblocking.store(nonblocking, Ordering::Relaxed),
            StreamImp::Daemon(d) => d.nonblocking.store(nonblocking, Ordering::Relaxed),
        }
        Ok(())
    }

    fn timeouts(&self) -> &Mutex<(Option<Duration>, Option<Duration>)> {
        match &self.imp {
            StreamImp::Embedded(h) => &h.vs.timeouts,
            StreamImp::Daemon(d) => &d.timeouts,
        }
    }

    fn do_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match &self.imp {
            StreamImp::Embedded(h) => h.vs.read(buf),
            StreamImp::Daemon(d) => d.read(buf),
        }
    }

    fn do_write(&self, buf: &[u8]) -> io::Result<usize> {
        match &self.imp {
            StreamImp::Embedded(h) => h.vs.write(buf),
            StreamImp::Daemon(d) => d.write(buf),
        }
    }

    /// Like [`std::net::TcpStream::set_read_timeout`]: a read that waits longer fails with `WouldBlock`.
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        if t == Some(Duration::ZERO) {
            return Err(err(ErrorKind::InvalidInput, "cannot set a 0 duration timeout"));
        }
        self.timeouts().lock().unwrap().0 = t;
        Ok(())
    }

    /// Like [`std::net::TcpStream::set_write_timeout`].
    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        if t == Some(Duration::ZERO) {
            return Err(err(ErrorKind::InvalidInput, "cannot set a 0 duration timeout"));
        }
        self.timeouts().lock().unwrap().1 = t;
        Ok(())
    }

    /// A second handle to the same vsocket (it closes when the last handle is dropped).
    pub fn try_clone(&self) -> io::Result<VStream> {
        Ok(VStream { imp: self.imp.clone() })
    }

    /// The vsocket's pollable descriptor, created on the first call (the same one for every
    /// handle of the vsocket): readable exactly when a read would not block (data, end of
    /// stream, an error), writable when a write would not block (once the send buffer was
    /// full, from when a quarter of it is free again, as TCP reports it). It carries no
    /// data: read and write through the `VStream`, never the descriptor. Use it with
    /// `poll(2)`, epoll (level- or edge-triggered) or mio, with
    /// [`set_nonblocking(true)`](VStream::set_nonblocking). Also available as [`AsFd`].
    ///
    /// For a vsocket served by the daemon it is the end A of its readiness proxy
    /// (`daemon::proxy`), whose gates the daemon drives. Fails if the process is out of
    /// descriptors.
    ///
    /// ```no_run
    /// use std::os::fd::AsRawFd;
    /// let s = netchannel::VStream::connect("127.0.0.1:7000")?;
    /// s.set_nonblocking(true)?;
    /// let mut p = libc::pollfd { fd: s.poll_fd()?.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    /// // SAFETY: one live pollfd.
    /// unsafe { libc::poll(&mut p, 1, 1000) };
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn poll_fd(&self) -> io::Result<BorrowedFd<'_>> {
        match &self.imp {
            StreamImp::Embedded(h) => h.vs.readiness().map(|r| r.as_fd()),
            StreamImp::Daemon(d) => d.poll_fd(),
        }
    }

    /// An embedded stream: wake `waker` once a read (`write` false) or a write would not
    /// block any more, and say whether it would not block already (looked at after the
    /// registration, so nothing is missed). `None` for a daemon-served stream, whose
    /// readiness comes only through its descriptor.
    #[cfg(feature = "tokio")]
    pub(crate) fn register_task(&self, write: bool, waker: &std::task::Waker) -> Option<bool> {
        let StreamImp::Embedded(h) = &self.imp else { return None };
        let vs = &h.vs;
        // A task that waits is woken by frames the worker reads.
        vs.unpark_home();
        Some(if write {
            vs.write_tasks.register(waker);
            vs.write_ready()
        } else {
            vs.read_tasks.register(waker);
            vs.read_ready()
        })
    }

    /// The channel whose reading an async runtime may borrow for this stream
    /// (`crate::tokio`): the home channel of an embedded latency-class vsocket, if its host
    /// reads channels inline (`inline_read`), with the host.
    #[cfg(feature = "tokio")]
    pub(crate) fn lendable_channel(
        &self,
    ) -> Option<(Arc<crate::engine::HostInner>, Arc<crate::engine::channel::Channel>)> {
        let StreamImp::Embedded(h) = &self.imp else { return None };
        let vs = &h.vs;
        let host = vs.host()?;
        if !host.cfg.inline_read || vs.class() != Class::Latency {
            return None;
        }
        let ch = vs.peer.control_channel(Class::Latency, vs.home)?;
        Some((host, ch))
    }

    /// Whether the connect of a stream made by [`VStream::connect_start`] finished: `None`
    /// while the peer has not answered, then its outcome (the stream is writable from then).
    #[cfg(feature = "tokio")]
    pub(crate) fn open_result(&self) -> Option<io::Result<()>> {
        match &self.imp {
            StreamImp::Embedded(h) => h.vs.open_result(),
            StreamImp::Daemon(_) => Some(Ok(())),
        }
    }
}

/// The descriptor of [`VStream::poll_fd`].
///
/// # Panics
///
/// If [`VStream::poll_fd`] fails (out of descriptors, a daemon-served vsocket): call it
/// first where that can happen.
impl AsFd for VStream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.poll_fd().unwrap_or_else(|e| panic!("VStream::as_fd: {e}"))
    }
}

impl AsRawFd for VStream {
    fn as_raw_fd(&self) -> RawFd {
        self.as_fd().as_raw_fd()
    }
}

impl Read for VStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.do_read(buf)
    }
}

impl Read for &VStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.do_read(buf)
    }
}

impl Write for VStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.do_write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Write for &VStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.do_write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A vsocket listener, used like [`std::net::TcpListener`].
pub struct VListener {
    imp: ListenerImp,
}

enum ListenerImp {
    Embedded(EmbeddedListener),
    Daemon(crate::daemon::client::DListener),
}

struct EmbeddedListener {
    q: Arc<ListenQueue>,
    host: Host,
    nonblocking: AtomicBool,
}

impl std::fmt::Debug for VListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.imp {
            ListenerImp::Embedded(l) => write!(f, "VListener(port {})", l.q.port),
            ListenerImp::Daemon(d) => write!(f, "VListener({}, daemon)", d.local()),
        }
    }
}

impl VListener {
    /// Listen on the port of `addr` through the process-wide host ([`Host::global`]) or,
    /// if the configuration named by `NETCHANNEL_CONFIG` says `deployment = "daemon"`,
    /// through the host's daemon.
    pub fn bind(addr: impl ToSocketAddrs) -> io::Result<VListener> {
        let a = addr
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| err(ErrorKind::InvalidInput, "no address to bind"))?;
        match deployed()? {
            Deployed::Embedded(h) => h.bind(a.port()),
            Deployed::Daemon(c) => c.bind(a.port()),
        }
    }

    pub(crate) fn from_daemon(d: crate::daemon::client::DListener) -> VListener {
        VListener { imp: ListenerImp::Daemon(d) }
    }

    /// Wait at most `t` for the next vsocket (daemon side of an app's accept).
    pub(crate) fn accept_timeout(&self, t: Duration) -> io::Result<Option<(VStream, SocketAddr)>> {
        let ListenerImp::Embedded(l) = &self.imp else {
            return Err(err(ErrorKind::Unsupported, "accept_timeout on a daemon listener"));
        };
        let deadline = Instant::now() + t;
        let mut q = l.q.q.lock().unwrap();
        loop {
            if let Some(vs) = q.queue.pop_front() {
                let empty = q.queue.is_empty();
                drop(q);
                // The daemon's app polls a duplicate of the readiness descriptor.
                if empty {
                    let _ = l.q.drained();
                }
                let addr = vs.remote;
                let h = Handle { vs, _host: l.host.clone() };
                return Ok(Some((VStream { imp: StreamImp::Embedded(Arc::new(h)) }, addr)));
            }
            if q.closed {
                return Err(err(ErrorKind::ConnectionAborted, "the listener was closed"));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                drop(q);
                if l.q.drained() {
                    q = l.q.q.lock().unwrap();
                    continue;
                }
                return Ok(None);
            }
            let _sleeping = Sleeping::new(l.host.inner());
            q.sleepers += 1;
            q = l.q.cv.wait_timeout(q, left).unwrap().0;
            q.sleepers -= 1;
        }
    }

    pub(crate) fn open(host: Host, port: u16) -> io::Result<VListener> {
        let inner = host.inner().clone();
        let port = if port == 0 { inner.alloc_port()? } else { port };
        let mut ls = inner.listeners.lock().unwrap();
        if ls.contains_key(&port) {
            return Err(err(
                ErrorKind::AddrInUse,
                format!("vsocket port {port} is already listening on this host"),
            ));
        }
        let q = Arc::new(ListenQueue::new(port, inner.cfg.accept_backlog));
        ls.insert(port, q.clone());
        // Numbered under the table's lock, so that the peers apply binds and closes of
        // this port in the order they happened (`engine::announce`).
        let listen = inner.listen_frame(port);
        drop(ls);
        inner.announce(&listen);
        Ok(VListener {
            imp: ListenerImp::Embedded(EmbeddedListener { q, host, nonblocking: AtomicBool::new(false) }),
        })
    }

    /// Wait for the next vsocket and return it with the peer's address.
    pub fn accept(&self) -> io::Result<(VStream, SocketAddr)> {
        let l = match &self.imp {
            ListenerImp::Embedded(l) => l,
            ListenerImp::Daemon(d) => return d.accept().map(|(s, remote)| (VStream::from_daemon(s), remote)),
        };
        // Whether to read the host's parked channels before sleeping (once it could not,
        // this call sleeps on the queue).
        let mut inline = true;
        let mut q = l.q.q.lock().unwrap();
        loop {
            if let Some(vs) = q.queue.pop_front() {
                let empty = q.queue.is_empty();
                drop(q);
                if empty {
                    let _ = l.q.drained();
                }
                let addr = vs.remote;
                let h = Handle { vs, _host: l.host.clone() };
                return Ok((VStream { imp: StreamImp::Embedded(Arc::new(h)) }, addr));
            }
            if q.closed {
                return Err(err(ErrorKind::ConnectionAborted, "the listener was closed"));
            }
            if l.nonblocking.load(Ordering::Relaxed) {
                drop(q);
                if l.q.drained() {
                    q = l.q.q.lock().unwrap();
                    continue;
                }
                return Err(err(ErrorKind::WouldBlock, "no vsocket waiting"));
            }
            if inline {
                // Counted under the lock that arrivals are queued under: one queued after
                // the look above moves the count past `seen`.
                let seen = l.q.events.load(Ordering::SeqCst);
                drop(q);
                inline = l.q.wait_inline(l.host.inner(), || l.q.events.load(Ordering::SeqCst) != seen);
                q = l.q.q.lock().unwrap();
                continue;
            }
            let _sleeping = Sleeping::new(l.host.inner());
            q.sleepers += 1;
            q = l.q.cv.wait(q).unwrap();
            q.sleepers -= 1;
        }
    }

    /// This listener's address: the host's IP and the port.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(match &self.imp {
            ListenerImp::Embedded(l) => SocketAddr::new(l.host.local_addr().ip(), l.q.port),
            ListenerImp::Daemon(d) => d.local(),
        })
    }

    /// In non-blocking mode `accept` fails with `WouldBlock` when nothing is waiting.
    pub fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        match &self.imp {
            ListenerImp::Embedded(l) => l.nonblocking.store(nonblocking, Ordering::Relaxed),
            ListenerImp::Daemon(d) => d.nonblocking.store(nonblocking, Ordering::Relaxed),
        }
        Ok(())
    }

    /// Stop listening now: vsockets not yet accepted are refused, an `accept` blocked in
    /// another thread fails with `ConnectionAborted`, and the port is free again (the peer
    /// hosts are told it no longer listens; OPENs to it are refused).
    pub fn close(&self) {
        match &self.imp {
            ListenerImp::Embedded(l) => l.unlisten(),
            ListenerImp::Daemon(d) => d.close(),
        }
    }

    /// The listener's pollable descriptor, created on the first call: readable exactly when
    /// [`accept`](VListener::accept) would not block (a vsocket waits, or the listener was
    /// closed). Use it with `poll(2)`, epoll or mio, with
    /// [`set_nonblocking(true)`](VListener::set_nonblocking). Also available as [`AsFd`].
    ///
    /// For a listener served by the daemon it is a duplicate of the daemon's listener's own
    /// descriptor. Fails if the process is out of descriptors.
    ///
    /// ```no_run
    /// let l = netchannel::VListener::bind("0.0.0.0:7000")?;
    /// let fd = l.poll_fd()?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn poll_fd(&self) -> io::Result<BorrowedFd<'_>> {
        match &self.imp {
            ListenerImp::Embedded(l) => l.q.readiness().map(|r| r.as_fd()),
            ListenerImp::Daemon(d) => d.poll_fd(),
        }
    }

    /// Whether the host's daemon serves this listener (else an engine in this process does).
    pub fn is_daemon(&self) -> bool {
        matches!(self.imp, ListenerImp::Daemon(_))
    }

    /// An embedded listener: wake `waker` once an accept would not block, and say whether
    /// it would not already. `None` for a daemon-served listener (see
    /// [`VStream::register_task`]).
    #[cfg(feature = "tokio")]
    pub(crate) fn register_task(&self, waker: &std::task::Waker) -> Option<bool> {
        let ListenerImp::Embedded(l) = &self.imp else { return None };
        l.q.tasks.register(waker);
        Some(l.q.accept_ready())
    }

    /// An iterator over accepted vsockets, like [`std::net::TcpListener::incoming`].
    pub fn incoming(&self) -> impl Iterator<Item = io::Result<VStream>> + '_ {
        std::iter::from_fn(move || Some(self.accept().map(|(s, _)| s)))
    }
}

/// The descriptor of [`VListener::poll_fd`].
///
/// # Panics
///
/// If [`VListener::poll_fd`] fails: call it first where that can happen.
impl AsFd for VListener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.poll_fd().unwrap_or_else(|e| panic!("VListener::as_fd: {e}"))
    }
}

impl AsRawFd for VListener {
    fn as_raw_fd(&self) -> RawFd {
        self.as_fd().as_raw_fd()
    }
}

impl EmbeddedListener {
    /// Stop listening: out of the host's table (its peers are told, `engine::announce`),
    /// and the queue closed. Once only: the port may be listening again by then.
    fn unlisten(&self) {
        let inner = self.host.inner();
        let mut ls = inner.listeners.lock().unwrap();
        let gone = if ls.get(&self.q.port).is_some_and(|q| Arc::ptr_eq(q, &self.q)) {
            ls.remove(&self.q.port);
            Some(inner.unlisten_frame(self.q.port))
        } else {
            None
        };
        drop(ls);
        if let Some(f) = gone {
            inner.announce(&f);
        }
        self.q.close();
    }
}

impl Drop for EmbeddedListener {
    fn drop(&mut self) {
        self.unlisten();
        if let Some(r) = self.q.ready.get() {
            r.close();
        }
    }
}
