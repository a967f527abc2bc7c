//! The app side of the daemon: a [`Client`] connection to `netchannel up`, and the vsockets
//! and listeners it serves, which `VStream`/`VListener` wrap.
//!
//! Data never crosses the Unix socket: a stream's bytes go through its shared rings, and
//! its positions through the shared header (`crate::shm`), so a busy stream costs no
//! syscall per message.
//!
//! Pollable descriptors: a vsocket's descriptor is the readiness proxy of the preload shim's
//! shared-memory path (`super::proxy`: end A of an `AF_UNIX`/`SOCK_SEQPACKET` pair whose IN
//! and OUT gates the daemon drives), so both homes have one readiness mechanism, records on
//! a socketpair. The daemon makes it the first time [`DStream::poll_fd`] is asked for
//! (`Request::Proxy`): a vsocket nobody polls costs no socketpair, no proxy records and no
//! poller registration (a short connection's ~10 system calls per side). From then on reads
//! close the IN gate when they drain the ring and writes plug OUT when the ring is full. A
//! listener's descriptor is a duplicate of the daemon's own embedded listener's readiness
//! descriptor (`crate::readiness`): readable exactly when the daemon's accept queue holds a
//! vsocket, its token taken by the daemon's accept that empties the queue. Control requests (connect, bind, accept, status) each take a
//! connection from a pool (opened on demand, kept for the life of the process), so a blocked
//! accept does not hold up another thread's connect. A separate *lifeline* connection tells
//! the process, through a watcher thread, that the daemon is gone: every blocked or later
//! call then fails with `ConnectionReset` naming the daemon, and a later
//! [`Client::global`] reconnects to a restarted one.

use std::io::{self, ErrorKind};
use std::net::{Shutdown, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::regions::{Lease, SlotTable};
use super::{error_of, recv_msg, send_msg, ClassName, Request, Response, MAX_MESSAGE};
use crate::config::Config;
use crate::ring::Ring;
use crate::shm::{self, Region};
use crate::wire::Class;

/// How long [`Client::status_of`] waits for the answer.
const STATUS_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest single futex sleep: how soon a waiter notices that the daemon is gone.
const WAIT_SLICE: Duration = Duration::from_millis(100);

/// A connection to the host's daemon.
///
/// ```no_run
/// use std::io::Write;
/// let daemon = netchannel::daemon::Client::connect("/run/netchannel/netchannel.sock")?;
/// let mut s = daemon.connect_stream("10.0.0.2:7000".parse().unwrap())?;
/// s.write_all(b"hello")?;
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Clone)]
pub struct Client {
    inner: Arc<ClientInner>,
}

struct ClientInner {
    path: PathBuf,
    pool: Mutex<Vec<UnixStream>>,
    dead: Arc<AtomicBool>,
    spin: Duration,
    lifeline: UnixStream,
    /// Its mappings of the daemon's regions (`super::regions`).
    table: Arc<SlotTable>,
}

impl Drop for ClientInner {
    fn drop(&mut self) {
        let _ = self.lifeline.shutdown(Shutdown::Both);
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Client({})", self.inner.path.display())
    }
}

fn gone(path: &Path) -> io::Error {
    io::Error::new(
        ErrorKind::ConnectionReset,
        format!("the NetChannel daemon at {} is gone (it stopped or was killed)", path.display()),
    )
}

impl Client {
    /// Connect to the daemon listening on `path`; fails if it is not running or refuses
    /// this process's user.
    pub fn connect(path: impl AsRef<Path>) -> io::Result<Client> {
        Client::connect_with(path.as_ref(), Config::default().daemon.app_spin())
    }

    /// Connect to the daemon named by `cfg` (`[daemon] socket`, or `NETCHANNEL_SOCKET`).
    pub fn from_config(cfg: &Config) -> io::Result<Client> {
        Client::connect_with(&cfg.daemon.socket_path()?, cfg.daemon.app_spin())
    }

    fn connect_with(path: &Path, spin: Duration) -> io::Result<Client> {
        let lifeline = open(path)?;
        // The first answer says whether this process may use the daemon at all.
        match exchange(&lifeline, &Request::Hello, path)? {
            (Response::Ok, _) => {}
            (Response::Error { kind, message, limit }, _) => return Err(error_of(&kind, message, limit)),
            (other, _) => return Err(unexpected(&other)),
        }
        let dead = Arc::new(AtomicBool::new(false));
        let (watch, flag) = (lifeline.try_clone()?, dead.clone());
        std::thread::Builder::new().name("nc-daemon-watch".into()).spawn(move || {
            let mut b = [0u8; 64];
            // The daemon never writes on the lifeline: any return is its end.
            // SAFETY: reads into a live local buffer.
            while unsafe { libc::read(watch.as_raw_fd(), b.as_mut_ptr().cast(), b.len()) } > 0 {}
            flag.store(true, Ordering::SeqCst);
        })?;
        Ok(Client {
            inner: Arc::new(ClientInner {
                path: path.to_owned(),
                pool: Mutex::new(Vec::new()),
                dead,
                spin,
                lifeline,
                table: SlotTable::new(),
            }),
        })
    }

    /// Its regions of the daemon.
    pub(crate) fn table(&self) -> &Arc<SlotTable> {
        &self.inner.table
    }

    /// The process-wide client used by `VStream::connect`/`VListener::bind` when the
    /// configuration says `deployment = "daemon"`; reconnects if the daemon restarted.
    pub fn global(cfg: &Config) -> io::Result<Client> {
        static GLOBAL: Mutex<Option<Client>> = Mutex::new(None);
        let mut g = GLOBAL.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = g.as_ref() {
            if !c.is_dead() {
                return Ok(c.clone());
            }
        }
        let c = Client::from_config(cfg)?;
        *g = Some(c.clone());
        Ok(c)
    }

    /// The daemon's socket.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Whether the daemon went away.
    pub fn is_dead(&self) -> bool {
        self.inner.dead.load(Ordering::SeqCst)
    }

    fn gone(&self) -> io::Error {
        gone(&self.inner.path)
    }

    pub(crate) fn request(&self, req: &Request) -> io::Result<(Response, Vec<OwnedFd>)> {
        if self.is_dead() {
            return Err(self.gone());
        }
        let conn = match self.inner.pool.lock().unwrap().pop() {
            Some(c) => c,
            None => open(&self.inner.path)?,
        };
        let (resp, fds) = exchange(&conn, req, &self.inner.path)?;
        self.inner.pool.lock().unwrap().push(conn);
        if let Response::Error { kind, message, limit } = resp {
            return Err(error_of(&kind, message, limit));
        }
        Ok((resp, fds))
    }

    /// Open a vsocket of `class` to `addr` (the API over it: `Client::connect_class` in
    /// `crate::vsock`).
    pub(crate) fn open_stream(&self, addr: SocketAddr, class: Class) -> io::Result<DStream> {
        let pool = self.inner.table.note();
        let (resp, fds) =
            self.request(&Request::Connect { addr, class: class.into(), proxy: false, pool, early: false })?;
        DStream::from_response(self, resp, fds)
    }

    /// Listen on vsocket `port` of this host, 0: any free port (the API over it:
    /// `Client::bind` in `crate::vsock`).
    pub(crate) fn listen(&self, port: u16) -> io::Result<DListener> {
        // Only this process accepts on it: its arrivals may go in this process's regions.
        let pool = self.inner.table.note().map(|n| n.token);
        match self.request(&Request::Bind { port, poll: true, pool })? {
            (Response::Listener { listener, local }, fds) => Ok(DListener {
                client: self.clone(),
                id: listener,
                local,
                nonblocking: AtomicBool::new(false),
                closed: AtomicBool::new(false),
                poll: fds.into_iter().next(),
            }),
            (other, _) => Err(unexpected(&other)),
        }
    }

    /// The daemon's state: peers, channels, vsockets, totals (`netchannel status --json`).
    pub fn status(&self) -> io::Result<serde_json::Value> {
        match self.request(&Request::Status)?.0 {
            Response::Status { status } => Ok(status),
            other => Err(unexpected(&other)),
        }
    }

    /// The state of the daemon at `path`, asked on one connection that carries nothing else
    /// (no lifeline), so that a daemon out of file descriptors still answers it (with the
    /// descriptor it keeps in reserve).
    pub fn status_of(path: impl AsRef<Path>) -> io::Result<serde_json::Value> {
        let path = path.as_ref();
        let conn = open(path)?;
        conn.set_read_timeout(Some(STATUS_TIMEOUT))?;
        let asked = Instant::now();
        let answer = exchange(&conn, &Request::Status, path).map_err(|e| {
            if asked.elapsed() < STATUS_TIMEOUT {
                return e;
            }
            io::Error::new(
                ErrorKind::TimedOut,
                format!(
                    "the NetChannel daemon at {} accepts connections but did not answer status within {} s",
                    path.display(),
                    STATUS_TIMEOUT.as_secs()
                ),
            )
        })?;
        match answer {
            (Response::Status { status }, _) => Ok(status),
            (Response::Error { kind, message, limit }, _) => Err(error_of(&kind, message, limit)),
            (other, _) => Err(unexpected(&other)),
        }
    }

    /// Ask the daemon to abort one channel to `peer` (fault injection).
    pub fn kill_channel(&self, peer: SocketAddr, class: Class, index: u16) -> io::Result<()> {
        self.request(&Request::KillChannel { peer, class: class.into(), index }).map(|_| ())
    }
}

fn open(path: &Path) -> io::Result<UnixStream> {
    UnixStream::connect(path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "cannot reach the NetChannel daemon at {}: {e} (is `netchannel up` running?)",
                path.display()
            ),
        )
    })
}

fn exchange(conn: &UnixStream, req: &Request, path: &Path) -> io::Result<(Response, Vec<OwnedFd>)> {
    // A refused client finds the daemon's reason waiting even if its own send failed.
    let sent = send_msg(conn.as_raw_fd(), req, &[]);
    let (body, fds) = match recv_msg(conn.as_raw_fd(), MAX_MESSAGE) {
        Ok(Some(m)) => m,
        _ => return Err(gone(path)),
    };
    if sent.is_err() && !body.starts_with(b"{\"r\":\"error\"") {
        return Err(gone(path));
    }
    let resp = serde_json::from_slice(&body).map_err(|e| {
        io::Error::new(
            ErrorKind::InvalidData,
            format!("the daemon at {} answered garbage: {e}", path.display()),
        )
    })?;
    Ok((resp, fds))
}

fn unexpected(r: &Response) -> io::Error {
    io::Error::new(ErrorKind::InvalidData, format!("unexpected answer from the daemon: {r:?}"))
}

/// A daemon-served vsocket: the app's view of its shared memory.
pub(crate) struct DStream {
    client: Client,
    handle: u64,
    region: Arc<Region>,
    tx: Ring,
    rx: Ring,
    kick: Arc<OwnedFd>,
    /// End A of the vsocket's readiness proxy (`super::proxy`), once asked for.
    proxy: OnceLock<OwnedFd>,
    /// Held while asking the daemon for the proxy (one request, whoever asks first).
    proxy_asked: Mutex<()>,
    /// [`DStream::poll_fd`] was asked for: reads and writes drive the proxy's gates.
    polled: AtomicBool,
    local: SocketAddr,
    remote: SocketAddr,
    class: AtomicU8,
    write_lock: Mutex<()>,
    read_lock: Mutex<()>,
    shut_rd: AtomicBool,
    pub(crate) nonblocking: AtomicBool,
    pub(crate) timeouts: Mutex<(Option<Duration>, Option<Duration>)>,
    /// Its slot of the process's pool, given back after the last look at the region.
    _lease: Option<Lease>,
}

impl DStream {
    fn from_response(client: &Client, resp: Response, fds: Vec<OwnedFd>) -> io::Result<DStream> {
        let Response::Stream { handle, local, remote, class, slot, mapped } = resp else {
            return Err(unexpected(&resp));
        };
        let mut fds = fds.into_iter();
        let adopted = client.inner.table.adopt(slot, mapped, &mut fds)?;
        let (region, kick) = (adopted.region, adopted.kick);
        let proxy = fds.next().map(OnceLock::from).unwrap_or_default();
        Ok(DStream {
            client: client.clone(),
            handle,
            tx: Ring::in_region(&region, true),
            rx: Ring::in_region(&region, false),
            region,
            kick,
            proxy,
            proxy_asked: Mutex::new(()),
            polled: AtomicBool::new(false),
            local,
            remote,
            class: AtomicU8::new(Class::from(class) as u8),
            write_lock: Mutex::new(()),
            read_lock: Mutex::new(()),
            shut_rd: AtomicBool::new(false),
            nonblocking: AtomicBool::new(false),
            timeouts: Mutex::new((None, None)),
            _lease: adopted.lease,
        })
    }

    pub(crate) fn local(&self) -> SocketAddr {
        self.local
    }

    pub(crate) fn remote(&self) -> SocketAddr {
        self.remote
    }

    pub(crate) fn class(&self) -> Class {
        if self.class.load(Ordering::Relaxed) == Class::Latency as u8 {
            Class::Latency
        } else {
            Class::Throughput
        }
    }

    pub(crate) fn set_class(&self, class: Class) -> io::Result<()> {
        self.client.request(&Request::SetClass { handle: self.handle, class: ClassName::from(class) })?;
        self.class.store(class as u8, Ordering::Relaxed);
        Ok(())
    }

    /// The vsocket's shared memory.
    #[cfg(test)]
    pub(crate) fn region(&self) -> &Region {
        &self.region
    }

    /// Ring the daemon's doorbell for this vsocket unconditionally.
    #[cfg(test)]
    pub(crate) fn ring_doorbell(&self) {
        self.region.header().need_kick.store(0, Ordering::SeqCst);
        shm::eventfd_ring(self.kick.as_raw_fd());
    }

    /// The vsocket's pollable descriptor: end A of its readiness proxy, which the daemon
    /// makes the first time it is asked for. From now on reads and writes drive its gates.
    pub(crate) fn poll_fd(&self) -> io::Result<BorrowedFd<'_>> {
        let a = match self.proxy.get() {
            Some(a) => a,
            None => self.ask_proxy()?,
        };
        self.polled.store(true, Ordering::SeqCst);
        Ok(a.as_fd())
    }

    /// Ask the daemon for the readiness proxy (once: whoever asks first, the others wait).
    fn ask_proxy(&self) -> io::Result<&OwnedFd> {
        let _one = self.proxy_asked.lock().unwrap();
        if let Some(a) = self.proxy.get() {
            return Ok(a);
        }
        let (resp, fds) = self.client.request(&Request::Proxy { handle: self.handle })?;
        let Response::Ok = resp else { return Err(unexpected(&resp)) };
        let a = fds.into_iter().next().ok_or_else(|| {
            io::Error::new(
                ErrorKind::InvalidData,
                "the daemon answered a readiness proxy request without its descriptor",
            )
        })?;
        Ok(self.proxy.get_or_init(|| a))
    }

    /// The proxy's end A, if reads and writes must drive its gates.
    fn gates(&self) -> Option<RawFd> {
        if self.polled.load(Ordering::Relaxed) {
            self.proxy.get().map(|a| a.as_raw_fd())
        } else {
            None
        }
    }

    /// The ring is empty: close the IN gate. False if something came meanwhile (look again).
    fn drained(&self) -> bool {
        match self.gates() {
            Some(a) => super::proxy::close_in(self.region.header(), a, self.kick.as_raw_fd(), None),
            None => true,
        }
    }

    /// Tell the daemon's poller that a position moved, if it is not polling already.
    fn kick(&self) {
        if self.region.header().need_kick.swap(0, Ordering::SeqCst) == 1 {
            shm::eventfd_ring(self.kick.as_raw_fd());
        }
    }

    /// Spin briefly, then sleep on the header's futex until `ready`, the deadline, or the
    /// daemon's end.
    fn wait(&self, ready: impl Fn() -> bool, deadline: Option<Instant>) -> io::Result<()> {
        let h = self.region.header();
        let spin_end = Instant::now() + self.client.inner.spin;
        while Instant::now() < spin_end {
            if ready() {
                return Ok(());
            }
            std::hint::spin_loop();
        }
        loop {
            if ready() {
                return Ok(());
            }
            if self.client.is_dead() {
                return Err(self.client.gone());
            }
            let mut slice = WAIT_SLICE;
            if let Some(d) = deadline {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::Error::new(ErrorKind::WouldBlock, "timed out"));
                }
                slice = slice.min(left);
            }
            let s = h.seq.load(Ordering::SeqCst);
            h.app_waiters.fetch_add(1, Ordering::SeqCst);
            if !ready() {
                shm::futex_wait(&h.seq, s, slice);
            }
            h.app_waiters.fetch_sub(1, Ordering::SeqCst);
        }
    }

    pub(crate) fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let _one_reader = self.read_lock.lock().unwrap();
        let h = self.region.header();
        let deadline = self.timeouts.lock().unwrap().0.map(|t| Instant::now() + t);
        loop {
            let consumed = h.rx_consumed.load(Ordering::Relaxed);
            let in_order = h.rx_in_order.load(Ordering::Acquire);
            if in_order > consumed {
                let n = ((in_order - consumed) as usize).min(buf.len());
                // SAFETY: [consumed, consumed + n) is below rx_in_order: the engine wrote it
                // and does not touch it until rx_consumed passes it (module docs of shm).
                unsafe { self.rx.read(consumed, &mut buf[..n]) };
                h.rx_consumed.store(consumed + n as u64, Ordering::Release);
                self.kick();
                if consumed + n as u64 == in_order {
                    // Whether more came meanwhile does not matter: the gate is right either way.
                    let _ = self.drained();
                }
                return Ok(n);
            }
            let state = h.state.load(Ordering::Acquire);
            if state & shm::FIN != 0 && h.rx_fin.load(Ordering::Relaxed) == consumed {
                return Ok(0);
            }
            if let Some(e) = h.error() {
                return Err(e);
            }
            if self.shut_rd.load(Ordering::Relaxed) {
                return Ok(0);
            }
            if self.client.is_dead() {
                return Err(self.client.gone());
            }
            if !self.drained() {
                continue;
            }
            if self.nonblocking.load(Ordering::Relaxed) {
                return Err(io::Error::new(ErrorKind::WouldBlock, "no data available"));
            }
            self.wait(
                || {
                    h.rx_in_order.load(Ordering::Acquire) > consumed
                        || h.state.load(Ordering::Acquire) != state
                        || self.shut_rd.load(Ordering::Relaxed)
                },
                deadline,
            )?;
        }
    }

    pub(crate) fn write(&self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let _one_writer = self.write_lock.lock().unwrap();
        let h = self.region.header();
        let cap = self.tx.capacity() as u64;
        let deadline = self.timeouts.lock().unwrap().1.map(|t| Instant::now() + t);
        let mut done = 0;
        while done < buf.len() {
            if let Some(e) = h.error() {
                return if done > 0 { Ok(done) } else { Err(e) };
            }
            if self.client.is_dead() {
                return if done > 0 { Ok(done) } else { Err(self.client.gone()) };
            }
            if h.app_flags.load(Ordering::Relaxed) & shm::SHUT_WR != 0 {
                return Err(io::Error::new(ErrorKind::BrokenPipe, "the vsocket was shut down for writing"));
            }
            let written = h.tx_written.load(Ordering::Relaxed);
            let acked = h.tx_acked.load(Ordering::Acquire);
            let space = cap - (written - acked);
            if space == 0 {
                if let Some(a) = self.gates() {
                    super::proxy::plug(h, a, self.kick.as_raw_fd());
                }
                if self.nonblocking.load(Ordering::Relaxed) {
                    return if done > 0 {
                        Ok(done)
                    } else {
                        Err(io::Error::new(ErrorKind::WouldBlock, "send buffer full"))
                    };
                }
                let r = self.wait(
                    || {
                        h.tx_acked.load(Ordering::Acquire) != acked
                            || h.state.load(Ordering::Acquire) & shm::ERROR != 0
                    },
                    deadline,
                );
                match r {
                    Ok(()) => continue,
                    Err(_) if done > 0 => return Ok(done),
                    Err(e) => return Err(e),
                }
            }
            let n = (space as usize).min(buf.len() - done);
            // SAFETY: [written, written + n) is inside [written, acked + cap): the app's own
            // region of the send ring until tx_written passes it (module docs of shm).
            unsafe { self.tx.write(written, &buf[done..done + n]) };
            h.tx_written.store(written + n as u64, Ordering::Release);
            self.kick();
            done += n;
        }
        Ok(done)
    }

    pub(crate) fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        let h = self.region.header();
        if matches!(how, Shutdown::Write | Shutdown::Both) {
            if let Some(e) = h.error() {
                return Err(e);
            }
            h.app_flags.fetch_or(shm::SHUT_WR, Ordering::Release);
            h.need_kick.store(0, Ordering::SeqCst);
            shm::eventfd_ring(self.kick.as_raw_fd());
        }
        if matches!(how, Shutdown::Read | Shutdown::Both) {
            self.shut_rd.store(true, Ordering::Relaxed);
            h.ring_app();
        }
        Ok(())
    }
}

impl Drop for DStream {
    fn drop(&mut self) {
        // The daemon takes in the last positions, then closes the vsocket as TCP would.
        self.region.header().app_flags.fetch_or(shm::CLOSED, Ordering::Release);
        // need_kick 0 says which of the vsockets sharing the doorbell rang.
        self.region.header().need_kick.store(0, Ordering::SeqCst);
        shm::eventfd_ring(self.kick.as_raw_fd());
    }
}

/// A daemon-served listener.
pub(crate) struct DListener {
    client: Client,
    id: u64,
    local: SocketAddr,
    pub(crate) nonblocking: AtomicBool,
    closed: AtomicBool,
    /// A duplicate of the daemon's listener's readiness descriptor.
    poll: Option<OwnedFd>,
}

impl DListener {
    pub(crate) fn local(&self) -> SocketAddr {
        self.local
    }

    /// The listener's pollable descriptor: readable exactly when the daemon holds a vsocket
    /// for it to accept (or the listener was closed).
    pub(crate) fn poll_fd(&self) -> io::Result<BorrowedFd<'_>> {
        self.poll.as_ref().map(|p| p.as_fd()).ok_or_else(|| {
            io::Error::new(
                ErrorKind::Unsupported,
                "the daemon sent this listener without a pollable descriptor",
            )
        })
    }

    pub(crate) fn accept(&self) -> io::Result<(DStream, SocketAddr)> {
        let wait = !self.nonblocking.load(Ordering::Relaxed);
        let pool = self.client.inner.table.note();
        let (resp, fds) = self.client.request(&Request::Accept {
            listener: self.id,
            wait,
            proxy: false,
            park: None,
            pool,
        })?;
        let s = DStream::from_response(&self.client, resp, fds)?;
        let remote = s.remote;
        Ok((s, remote))
    }
}

impl DListener {
    /// Stop listening (a blocked `accept` of another thread then fails).
    pub(crate) fn close(&self) {
        if !self.closed.swap(true, Ordering::SeqCst) {
            let _ = self.client.request(&Request::CloseListener { listener: self.id });
        }
    }
}

impl Drop for DListener {
    fn drop(&mut self) {
        self.close();
    }
}
