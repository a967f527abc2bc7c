//! The daemon side: the Unix socket, one thread per client connection, the doorbell poller.
//!
//! Every vsocket served to an app has an entry ([`Served`]) owned by the client connection
//! that opened or accepted it. The connection's end — the app closed it, exited or was
//! killed — closes every vsocket it owns (FIN after the data already written, or RESET if
//! data was left unread, as TCP does); their regions go back to the process's pool
//! (`super::regions`), which goes when the process's last connection ends. The poller thread
//! sleeps on the vsockets' eventfds (edge-triggered, each registered once for the life of its
//! pooled slot and mapped to the slot's current vsocket) and, while vsockets are busy, polls
//! their headers for a short while (`poll_spin_us`) so that busy apps need not ring.
//!
//! What clients can make the daemon hold is capped (`[daemon] max_*`): control connections
//! in total and per process, and per process the vsockets and the ring memory they pin (a
//! [`Ledger`] of [`Charge`]s, one per served vsocket), and that memory in total. A request
//! beyond a cap is refused with a [`LimitExceeded`] naming the key and harms nothing held.
//! Out of file descriptors, the accept loop answers each new connection with a descriptor
//! kept in reserve: `status` is answered, anything else refused naming `RLIMIT_NOFILE`.

use std::collections::HashMap;
use std::io::{self, ErrorKind};
use std::net::{Shutdown, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry, Token, Waker};
use serde_json::json;

use super::regions::{Doorbell, Naming, PoolKey, PoolNote, Pools};
use super::{hung_up, recv_msg, send_msg, LimitExceeded, Request, Response, MAX_REQUEST};
use crate::config::Config;
use crate::engine::channel::batching_small_sends;
use crate::engine::handshake::{suppressed_note, Reserve, Throttle, FD_BACKOFF};
use crate::engine::vsocket::VSock;
use crate::engine::Host;
use crate::shm;
use crate::vsock::{VListener, VStream};
use crate::wire::Class;

/// How long a connection answered at the descriptor limit may take to send its request.
const AT_FD_LIMIT_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a client has to send the rest of a request once it has begun one, and to take
/// an answer: a stalled client cannot hold its daemon thread.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a blocked accept checks that its client is still there.
const ACCEPT_SLICE: Duration = Duration::from_millis(100);
/// How long a parked arrival waits for the process that accepts its placeholder connection
/// before it is reset (the placeholder went to a process without the shim, or nobody
/// accepts).
const PARK_TIMEOUT: Duration = Duration::from_secs(30);

/// A running daemon.
pub struct Server {
    st: Arc<State>,
    listener: UnixListener,
    /// The accept loop's poll: the listener (token [`LISTENER`]) and the stopper's waker.
    accept_poll: Poll,
    stop: Stopper,
    /// One descriptor freed to answer a connection when the process has none left.
    reserve: Reserve,
}

/// Poll token of the daemon's Unix socket in the accept loop (the stopper's waker is 0).
const LISTENER: Token = Token(1);

/// Ends a [`Server::run`], from any thread: the accept loop wakes and the daemon shuts down.
#[derive(Clone)]
pub struct Stopper(Arc<StopInner>);

struct StopInner {
    stopped: AtomicBool,
    waker: Waker,
}

impl Stopper {
    /// Stop the server (idempotent).
    pub fn stop(&self) {
        self.0.stopped.store(true, Ordering::SeqCst);
        if let Err(e) = self.0.waker.wake() {
            tracing::error!(error = %e, "cannot wake the daemon's accept loop to stop it");
        }
    }

    fn stopped(&self) -> bool {
        self.0.stopped.load(Ordering::SeqCst)
    }
}

struct State {
    host: Host,
    cfg: Config,
    socket: PathBuf,
    started: Instant,
    next: AtomicU64,
    streams: Mutex<HashMap<u64, Arc<Served>>>,
    listeners: Mutex<HashMap<u64, Arc<ServedListener>>>,
    /// Arrivals taken off listeners for the preload shim, by their placeholder's address.
    parked: Mutex<HashMap<SocketAddr, Parked>>,
    conns: Mutex<HashMap<u64, Conn>>,
    /// Every app process's recycled regions (`super::regions`).
    pools: Arc<Pools>,
    /// Where doorbell tokens come from (apart from handles: a slot's doorbell outlives them).
    next_bell: Arc<AtomicU64>,
    /// Listening ports whose arrivals go in regions of the listening app's pool.
    pooled_ports: Arc<Mutex<HashMap<u16, PoolKey>>>,
    /// Doorbell tokens (of the poller) → the vsocket(s) that doorbell rings for now.
    bells: Mutex<HashMap<u64, Rings>>,
    poller: Poller,
    stopping: AtomicBool,
    clients_refused: AtomicU64,
    clients_disconnected: AtomicU64,
    /// App → daemon doorbells taken (eventfd wake-ups of the poller).
    doorbells: AtomicU64,
    /// Vsockets served with a readiness proxy (the preload shim's shared-memory data path).
    proxied: AtomicU64,
    /// What the served vsockets hold against the caps.
    ledger: Arc<Mutex<Ledger>>,
    /// Requests and connections refused by a cap (`[daemon] max_*`, `RLIMIT_NOFILE`).
    limits_refused: AtomicU64,
    /// Warnings of refusals by a cap.
    limit_warnings: Throttle,
    /// Warnings of clients disconnected for bad control messages.
    bad_clients: Throttle,
}

/// What the vsockets served to apps hold against the caps, per process and in total.
#[derive(Default)]
struct Ledger {
    per_process: HashMap<i32, Usage>,
    bytes: u64,
}

/// One process's vsockets and the ring memory they pin.
#[derive(Default, Clone, Copy)]
struct Usage {
    vsockets: usize,
    bytes: u64,
}

/// One served vsocket's entry in the [`Ledger`], given back when it is dropped (with the
/// vsocket's [`Served`] entry).
struct Charge {
    ledger: Arc<Mutex<Ledger>>,
    pid: i32,
    bytes: u64,
}

impl Drop for Charge {
    fn drop(&mut self) {
        let mut l = self.ledger.lock().unwrap();
        l.bytes -= self.bytes;
        if let Some(u) = l.per_process.get_mut(&self.pid) {
            u.vsockets -= 1;
            u.bytes -= self.bytes;
            if u.vsockets == 0 {
                l.per_process.remove(&self.pid);
            }
        }
    }
}

/// A byte count for messages, in MiB (or KiB below 1 MiB).
fn bytes(b: u64) -> String {
    if b >= 1 << 20 {
        format!("{:.1} MiB", b as f64 / f64::from(1 << 20))
    } else {
        format!("{} KiB", b.div_ceil(1 << 10))
    }
}

/// A vsocket served to an app.
struct Served {
    handle: u64,
    stream: VStream,
    vs: Arc<VSock>,
    /// The app → daemon doorbell (its slot's, if the region is pooled).
    bell: Arc<Doorbell>,
    /// How the region is named to the app.
    naming: Naming,
    conn: u64,
    pid: i32,
    /// Readiness proxy: end A until it is sent to the app (end B lives in the region). A
    /// proxied vsocket outlives its control connection: it ends when the last descriptor of
    /// A, in any process, is closed (B hangs up). A library app's vsocket gets its proxy
    /// only when the app asks for its pollable descriptor (`Request::Proxy`).
    proxy_a: Mutex<Option<OwnedFd>>,
    /// Set (once, after end B is in the region) when the vsocket has its proxy.
    proxied: AtomicBool,
    /// A vsocket handed over while still connecting (`early`): when it fails unless answered.
    connect_deadline: OnceLock<Instant>,
    /// Inode of end A (how the program's descriptor of it is found in /proc to name it).
    proxy_ino: AtomicU64,
    /// Its share of the caps, given back with it.
    _charge: Charge,
}

/// What a doorbell rings for: one unpooled vsocket, or every vsocket of an app table (which
/// share one doorbell, so that a vsocket costs the app one descriptor).
enum Rings {
    One(u64),
    Table(Vec<u64>),
}

/// Poller tokens of proxy ends B carry this bit beside the vsocket handle.
const PROXY_TOKEN: u64 = 1 << 63;

struct ServedListener {
    l: VListener,
    conn: u64,
    /// The process that bound it: only it may accept on it or close it.
    pid: i32,
    /// The pool its arrivals' regions come from (it then cannot park).
    pool: Option<PoolKey>,
}

/// A vsocket arrival the preload shim's listener thread took off a listener and queued, as a
/// loopback placeholder connection, on the program's kernel listening socket. Whichever
/// process accepts that connection — the one that listened, or a forked worker — claims the
/// arrival by the placeholder's address and gets it with its readiness proxy; the process
/// that parked it holds nothing for it.
struct Parked {
    stream: VStream,
    listener: u64,
    /// The user of the listener's owner: only its processes (or root) may claim.
    uid: u32,
    since: Instant,
}

struct Conn {
    pid: i32,
    uid: u32,
    /// Shared with the connection's thread (a second descriptor would cost one more).
    sock: Arc<UnixStream>,
}

/// The credentials of the process at the other end of a Unix socket.
fn peer_cred(s: &UnixStream) -> io::Result<libc::ucred> {
    let mut c = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: c and len are live and sized for SO_PEERCRED.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut c as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(c)
}

impl Server {
    /// Bind the daemon's Unix socket and start its engine. Fails if another daemon serves
    /// the socket already.
    pub fn start(cfg: Config) -> io::Result<Server> {
        let socket = cfg.daemon.socket_path()?;
        if let Some(dir) = socket.parent() {
            if !dir.as_os_str().is_empty() && !dir.exists() {
                std::fs::create_dir_all(dir).map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("cannot create the socket directory {}: {e}", dir.display()),
                    )
                })?;
                let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
            }
        }
        if let Ok(meta) = std::fs::symlink_metadata(&socket) {
            // Only a stale socket is ours to remove: never a file, directory or link that
            // happens to be at the path (`up --socket PATH` once deleted whatever was there).
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                return Err(io::Error::new(
                    ErrorKind::AlreadyExists,
                    format!(
                        "{} exists and is not a socket: refusing to replace it; choose another daemon \
                         socket path ([daemon] socket, --socket, NETCHANNEL_SOCKET) or remove it yourself",
                        socket.display()
                    ),
                ));
            }
            if UnixStream::connect(&socket).is_ok() {
                return Err(io::Error::new(
                    ErrorKind::AddrInUse,
                    format!("a NetChannel daemon already serves {}", socket.display()),
                ));
            }
            std::fs::remove_file(&socket).map_err(|e| {
                io::Error::new(e.kind(), format!("cannot remove the stale socket {}: {e}", socket.display()))
            })?;
        }
        let listener = UnixListener::bind(&socket)
            .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {}: {e}", socket.display())))?;
        // Owner only, unless the policy admits other users (their credentials are then
        // checked on every connection).
        let open = !cfg.daemon.allowed_uids.is_empty() || !cfg.daemon.allowed_gids.is_empty();
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(if open { 0o666 } else { 0o600 }))?;
        let host = match Host::start_shared(cfg.clone()) {
            Ok(h) => h,
            Err(e) => {
                let _ = std::fs::remove_file(&socket);
                return Err(e);
            }
        };
        // Once the channel port is bound: a start that fails says only why.
        if cfg.auth_key_file.is_none() {
            tracing::warn!(
                listen = %cfg.listen,
                "channels of this daemon are not authenticated: any host can open them; set auth_key_file"
            );
        }
        let (poller, poll) = Poller::new()?;
        let st = Arc::new(State {
            host,
            socket,
            started: Instant::now(),
            next: AtomicU64::new(1),
            streams: Mutex::new(HashMap::new()),
            listeners: Mutex::new(HashMap::new()),
            parked: Mutex::new(HashMap::new()),
            conns: Mutex::new(HashMap::new()),
            pools: Arc::new(Pools::default()),
            next_bell: Arc::new(AtomicU64::new(1)),
            pooled_ports: Arc::new(Mutex::new(HashMap::new())),
            bells: Mutex::new(HashMap::new()),
            poller,
            stopping: AtomicBool::new(false),
            clients_refused: AtomicU64::new(0),
            clients_disconnected: AtomicU64::new(0),
            doorbells: AtomicU64::new(0),
            proxied: AtomicU64::new(0),
            ledger: Arc::new(Mutex::new(Ledger::default())),
            limits_refused: AtomicU64::new(0),
            limit_warnings: Throttle::new(),
            bad_clients: Throttle::new(),
            cfg,
        });
        // Arrivals on a pooled listener's port go in a region of the listening app's pool.
        let (pools, ports, registry, bells, cfg) = (
            st.pools.clone(),
            st.pooled_ports.clone(),
            st.poller.registry.clone(),
            st.next_bell.clone(),
            &st.cfg,
        );
        let (tx_cap, rx_cap) = (cfg.send_buffer, cfg.recv_buffer);
        let _ = st.host.inner().arrival_regions.set(Box::new(move |port| {
            let key = *ports.lock().unwrap().get(&port)?;
            let taken = pools.take(key, tx_cap, rx_cap, &registry, || bells.fetch_add(1, Ordering::Relaxed));
            taken.ok()
        }));
        let p = st.clone();
        std::thread::Builder::new().name("nc-doorbell".into()).spawn(move || p.run_poller(poll))?;
        tracing::info!(socket = %st.socket.display(), channels = %st.host.local_addr(), "daemon serving");
        let accept_poll = Poll::new()?;
        let waker = Waker::new(accept_poll.registry(), Token(0))?;
        let stop = Stopper(Arc::new(StopInner { stopped: AtomicBool::new(false), waker }));
        Ok(Server { st, listener, accept_poll, stop, reserve: Reserve::new() })
    }

    /// The Unix socket apps connect to.
    pub fn socket(&self) -> &Path {
        &self.st.socket
    }

    /// The engine's channel address.
    pub fn channel_addr(&self) -> SocketAddr {
        self.st.host.local_addr()
    }

    /// What ends [`Server::run`]; take it before `run`, which consumes the server.
    pub fn stopper(&self) -> Stopper {
        self.stop.clone()
    }

    /// Serve clients until the [`Stopper`] is used, then shut down. The accept loop sleeps
    /// in `mio` until a client connects or the stopper wakes it.
    pub fn run(mut self) -> io::Result<()> {
        self.listener.set_nonblocking(true)?;
        let fd = self.listener.as_raw_fd();
        self.accept_poll.registry().register(&mut SourceFd(&fd), LISTENER, Interest::READABLE)?;
        let mut events = Events::with_capacity(4);
        let mut out_of_fds = false;
        while !self.stop.stopped() {
            match self.listener.accept() {
                Ok((s, _)) => {
                    if std::mem::take(&mut out_of_fds) {
                        tracing::warn!(socket = %self.st.socket.display(), "file descriptors are free again: serving clients");
                    }
                    self.reserve.restore();
                    let _ = s.set_nonblocking(false);
                    self.st.clone().admit(s);
                }
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                    if !std::mem::replace(&mut out_of_fds, true) {
                        tracing::error!(socket = %self.st.socket.display(), error = %e, "out of file descriptors: new clients get only `status` answered (with a reserve descriptor) until some are free; raise the limit (ulimit -n, LimitNOFILE=) or stop some clients");
                    }
                    self.answer_at_fd_limit();
                    std::thread::sleep(FD_BACKOFF);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    // Edge-triggered: the queue was drained, so the next arrival is an edge.
                    if let Err(e) = self.accept_poll.poll(&mut events, None) {
                        if e.kind() != ErrorKind::Interrupted {
                            tracing::warn!(socket = %self.st.socket.display(), error = %e, "waiting for clients failed");
                            std::thread::sleep(Duration::from_millis(50));
                        }
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!(socket = %self.st.socket.display(), error = %e, "accepting a client failed");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
        self.shutdown();
        Ok(())
    }

    /// Out of descriptors: free the reserve to take the connection at the head of the
    /// queue, answer its one request (`status`, or a refusal naming `RLIMIT_NOFILE`), close
    /// it and take the reserve again.
    fn answer_at_fd_limit(&mut self) {
        if !self.reserve.release() {
            self.reserve.restore();
            return;
        }
        let accepted = self.listener.accept();
        if let Ok((s, _)) = accepted {
            self.st.answer_one(s);
        }
        self.reserve.restore();
    }

    fn shutdown(&self) {
        let st = &self.st;
        st.stopping.store(true, Ordering::SeqCst);
        let _ = std::fs::remove_file(&st.socket);
        for c in st.conns.lock().unwrap().values() {
            let _ = c.sock.shutdown(Shutdown::Both);
        }
        st.poller.wake();
        let served: Vec<_> = st.streams.lock().unwrap().drain().map(|(_, s)| s).collect();
        drop(served);
        st.listeners.lock().unwrap().clear();
        st.parked.lock().unwrap().clear();
        st.host.shutdown();
        tracing::info!(socket = %st.socket.display(), "daemon stopped");
    }
}

impl State {
    /// The credentials of a new client, if the policy admits it; a refused client is told
    /// why (and the connection is to be closed).
    fn credentials(&self, s: &UnixStream) -> Option<libc::ucred> {
        let cred = match peer_cred(s) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read a client's credentials");
                return None;
            }
        };
        let _span = tracing::error_span!("client", pid = cred.pid, uid = cred.uid).entered();
        let d = &self.cfg.daemon;
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        let allowed = cred.uid == 0
            || cred.uid == me
            || d.allowed_uids.contains(&cred.uid)
            || d.allowed_gids.contains(&cred.gid);
        if !allowed {
            self.clients_refused.fetch_add(1, Ordering::Relaxed);
            let why = format!(
                "uid {} (gid {}, pid {}) may not use the NetChannel daemon at {}: it serves root, uid {me}, \
                 allowed_uids {:?} and allowed_gids {:?} (the [daemon] table of its config)",
                cred.uid,
                cred.gid,
                cred.pid,
                self.socket.display(),
                d.allowed_uids,
                d.allowed_gids
            );
            tracing::warn!(why = %why, "refused a client");
            let e = io::Error::new(ErrorKind::PermissionDenied, why);
            let _ = send_msg(s.as_raw_fd(), &Response::error(&e), &[]);
            return None;
        }
        Some(cred)
    }

    /// Check a new client's credentials and the caps on connections, and serve it on its
    /// own thread.
    fn admit(self: Arc<Self>, s: UnixStream) {
        let Some(cred) = self.credentials(&s) else { return };
        let _span = tracing::error_span!("client", pid = cred.pid, uid = cred.uid).entered();
        let d = &self.cfg.daemon;
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let s = Arc::new(s);
        let refusal = {
            let mut conns = self.conns.lock().unwrap();
            let held = conns.values().filter(|c| c.pid == cred.pid).count();
            if conns.len() >= d.max_connections {
                Some(LimitExceeded::error(
                    "daemon.max_connections",
                    format!(
                        "the NetChannel daemon at {} refused a connection: it serves {} connections, the most daemon.max_connections allows",
                        self.socket.display(),
                        conns.len()
                    ),
                ))
            } else if held >= d.max_connections_per_process {
                Some(LimitExceeded::error(
                    "daemon.max_connections_per_process",
                    format!(
                        "the NetChannel daemon at {} refused a connection: process {} holds {held} connections, the most daemon.max_connections_per_process allows",
                        self.socket.display(),
                        cred.pid
                    ),
                ))
            } else {
                conns.insert(id, Conn { pid: cred.pid, uid: cred.uid, sock: s.clone() });
                None
            }
        };
        if let Some(e) = refusal {
            self.clients_refused.fetch_add(1, Ordering::Relaxed);
            let e = self.refused(e);
            let _ = send_msg(s.as_raw_fd(), &Response::error(&e), &[]);
            return;
        }
        let st = self.clone();
        let r = std::thread::Builder::new()
            .name("nc-client".into())
            .spawn(move || st.serve(s, id, cred.pid, cred.uid));
        if r.is_err() {
            self.conns.lock().unwrap().remove(&id);
        }
    }

    /// A request refused by a cap: count it and log it (throttled). The error, for the client.
    fn refused(&self, e: io::Error) -> io::Error {
        self.limits_refused.fetch_add(1, Ordering::Relaxed);
        if let Some(n) = self.limit_warnings.allow() {
            let limit = LimitExceeded::of(&e).map_or("", |l| l.key());
            tracing::warn!(limit, why = %e, "refused at a daemon limit{}", suppressed_note(n));
        }
        e
    }

    /// Serve one connection accepted with the reserve descriptor: with none to spare, answer
    /// `status` and refuse anything else, then hang up. Its request must come within
    /// [`AT_FD_LIMIT_TIMEOUT`], so a silent client cannot hold the reserve.
    fn answer_one(&self, s: UnixStream) {
        let _ = s.set_nonblocking(false);
        let _ = s.set_read_timeout(Some(AT_FD_LIMIT_TIMEOUT));
        let _ = s.set_write_timeout(Some(AT_FD_LIMIT_TIMEOUT));
        let Some(cred) = self.credentials(&s) else { return };
        let _span = tracing::error_span!("client", pid = cred.pid, uid = cred.uid).entered();
        let req = match recv_msg(s.as_raw_fd(), MAX_REQUEST) {
            Ok(Some((body, _))) => serde_json::from_slice::<Request>(&body).ok(),
            _ => None,
        };
        let resp = match req {
            Some(Request::Status) => Response::Status { status: self.status() },
            _ => {
                // SAFETY: getrlimit writes one rlimit into a live local.
                let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
                unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
                let e = LimitExceeded::error(
                    "RLIMIT_NOFILE",
                    format!(
                        "the NetChannel daemon at {} is out of file descriptors (RLIMIT_NOFILE {}): it answers only status until some are free; raise its limit (ulimit -n, LimitNOFILE=) or stop some of its clients",
                        self.socket.display(),
                        lim.rlim_cur
                    ),
                );
                Response::error(&self.refused(e))
            }
        };
        let _ = send_msg(s.as_raw_fd(), &resp, &[]);
    }

    /// The ring memory one vsocket pins: its whole shared region.
    fn vsocket_bytes(&self) -> u64 {
        (shm::HEADER_BYTES + self.cfg.send_buffer + self.cfg.recv_buffer) as u64
    }

    /// The cap that one more vsocket of process `pid` would exceed, as the client's error.
    fn over_limit(&self, l: &Ledger, pid: i32) -> Option<io::Error> {
        let d = &self.cfg.daemon;
        let u = l.per_process.get(&pid).copied().unwrap_or_default();
        let need = self.vsocket_bytes();
        let (key, why) = if u.vsockets >= d.max_vsockets_per_process {
            ("daemon.max_vsockets_per_process", format!("process {pid} holds {} vsockets", u.vsockets))
        } else if u.bytes + need > d.max_buffer_per_process() {
            (
                "daemon.max_buffer_per_process",
                format!(
                    "process {pid}'s vsockets pin {} of ring memory and one more needs {} (limit {})",
                    bytes(u.bytes),
                    bytes(need),
                    bytes(d.max_buffer_per_process())
                ),
            )
        } else if l.bytes + need > d.max_buffer() {
            (
                "daemon.max_buffer",
                format!(
                    "the daemon's vsockets pin {} of ring memory and one more needs {} (limit {})",
                    bytes(l.bytes),
                    bytes(need),
                    bytes(d.max_buffer())
                ),
            )
        } else {
            return None;
        };
        Some(LimitExceeded::error(
            key,
            format!("the NetChannel daemon refused a vsocket: {why}, the most {key} allows"),
        ))
    }

    /// Fail now if process `pid` may not have one more vsocket.
    fn check_limits(&self, pid: i32) -> io::Result<()> {
        let refusal = self.over_limit(&self.ledger.lock().unwrap(), pid);
        refusal.map_or(Ok(()), |e| Err(self.refused(e)))
    }

    /// Enter one more vsocket of process `pid` in the ledger, within the caps.
    fn charge(&self, pid: i32) -> io::Result<Charge> {
        let mut l = self.ledger.lock().unwrap();
        if let Some(e) = self.over_limit(&l, pid) {
            drop(l);
            return Err(self.refused(e));
        }
        let bytes = self.vsocket_bytes();
        l.bytes += bytes;
        let u = l.per_process.entry(pid).or_default();
        u.vsockets += 1;
        u.bytes += bytes;
        Ok(Charge { ledger: self.ledger.clone(), pid, bytes })
    }

    fn serve(self: Arc<Self>, s: Arc<UnixStream>, conn: u64, pid: i32, uid: u32) {
        let _span = tracing::error_span!("client", pid, uid, conn).entered();
        // An answer the client does not take within the timeout ends the connection.
        let _ = s.set_write_timeout(Some(REQUEST_TIMEOUT));
        // Set once (not around each request: two system calls per request): a read that
        // times out before a request began is an idle client, which may stay idle as long
        // as it likes; one that times out inside a request (`TimedOut`) ends the connection.
        let _ = s.set_read_timeout(Some(REQUEST_TIMEOUT));
        loop {
            let msg = recv_msg(s.as_raw_fd(), MAX_REQUEST);
            let (body, _fds) = match msg {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(e) if e.kind() == ErrorKind::WouldBlock && !self.stopping.load(Ordering::SeqCst) => {
                    continue
                }
                Err(e) => {
                    if !self.stopping.load(Ordering::SeqCst) && e.kind() != ErrorKind::ConnectionReset {
                        self.clients_disconnected.fetch_add(1, Ordering::Relaxed);
                        let e = if e.kind() == ErrorKind::TimedOut {
                            io::Error::new(
                                ErrorKind::TimedOut,
                                format!(
                                    "no whole request within {} s of its start",
                                    REQUEST_TIMEOUT.as_secs()
                                ),
                            )
                        } else {
                            e
                        };
                        if let Some(n) = self.bad_clients.allow() {
                            tracing::warn!(error = %e, "the client sent a bad control message: disconnected{}", suppressed_note(n));
                        }
                    }
                    break;
                }
            };
            let req: Request = match serde_json::from_slice(&body) {
                Ok(r) => r,
                Err(e) => {
                    self.clients_disconnected.fetch_add(1, Ordering::Relaxed);
                    if let Some(n) = self.bad_clients.allow() {
                        tracing::warn!(error = %e, "the client sent an invalid request: disconnected{}", suppressed_note(n));
                    }
                    let e = io::Error::new(ErrorKind::InvalidData, format!("invalid request: {e}"));
                    let _ = send_msg(s.as_raw_fd(), &Response::error(&e), &[]);
                    break;
                }
            };
            let poll_listener = matches!(req, Request::Bind { poll: true, .. });
            let (resp, served) = match self.handle(req, conn, pid, &s) {
                Ok(r) => r,
                Err(e) => (Response::error(&e), None),
            };
            // A listener asked for with `poll` comes with its readiness descriptor (a
            // duplicate: the daemon's accept takes its token, the app polls it).
            let listener_fd = match &resp {
                Response::Listener { listener, .. } if poll_listener => {
                    let l = self.listeners.lock().unwrap().get(listener).cloned();
                    l.and_then(|l| l.l.poll_fd().and_then(|fd| fd.try_clone_to_owned()).ok())
                }
                _ => None,
            };
            let a = served.as_ref().and_then(|sv| sv.proxy_a.lock().unwrap().take());
            // The region and its doorbell go the first time only (see `super::regions`), and
            // only with the vsocket itself (not with a proxy asked for later).
            let mut fds: Vec<RawFd> = match (&served, &resp) {
                (Some(sv), Response::Stream { .. }) => {
                    let mem = sv.vs.region().and_then(|r| r.fd()).expect("daemon vsockets are shared");
                    if sv.naming.mapped {
                        Vec::new()
                    } else {
                        vec![mem.as_raw_fd(), sv.bell.fd()]
                    }
                }
                _ => Vec::new(),
            };
            fds.extend(a.as_ref().map(|a| a.as_raw_fd()));
            fds.extend(listener_fd.as_ref().map(|l| l.as_raw_fd()));
            if send_msg(s.as_raw_fd(), &resp, &fds).is_err() {
                break;
            }
            // Our copy of A goes now: from here B hangs up when the app's last copy closes.
            drop(a);
        }
        self.cleanup(conn);
    }

    fn handle(
        &self,
        req: Request,
        conn: u64,
        pid: i32,
        s: &UnixStream,
    ) -> io::Result<(Response, Option<Arc<Served>>)> {
        match req {
            Request::Hello => Ok((Response::Ok, None)),
            Request::Connect { addr, class, proxy, pool, early } => {
                let key = self.take_note(pid, pool.as_ref());
                let charge = self.charge(pid)?;
                let region = match key {
                    Some(k) => Some(self.pools.take(
                        k,
                        self.cfg.send_buffer,
                        self.cfg.recv_buffer,
                        &self.poller.registry,
                        || self.next_bell.fetch_add(1, Ordering::Relaxed),
                    )?),
                    None => None,
                };
                // Confirmed: a blocking connect reports a refusal itself (unless the peer
                // announced the port: then it is answered at once, and a refusal fails the
                // app's first read or write, `engine::announce`), a non-blocking one
                // (`early`, proxied only) through its proxy once the answer comes.
                let (stream, deadline) = if early && proxy {
                    let (s, deadline) = crate::VStream::connect_start_in(
                        self.host.clone(),
                        addr,
                        class.into(),
                        crate::engine::vsocket::OpenMode::Confirmed,
                        region,
                    )?;
                    (s, Some(deadline))
                } else {
                    (
                        crate::VStream::open_in(
                            self.host.clone(),
                            addr,
                            class.into(),
                            crate::engine::vsocket::OpenMode::Announced,
                            region,
                        )?,
                        None,
                    )
                };
                let sv = self.register(stream, conn, pid, proxy, charge, key)?;
                if let Some(d) = deadline {
                    let _ = sv.connect_deadline.set(d);
                }
                Ok((stream_response(&sv), Some(sv)))
            }
            Request::Bind { port, pool, .. } => {
                let l = self.host.bind(port)?;
                let local = l.local_addr()?;
                let id = self.next.fetch_add(1, Ordering::Relaxed);
                let pool = pool.map(|token| PoolKey { pid, token });
                if let Some(k) = pool {
                    self.pooled_ports.lock().unwrap().insert(local.port(), k);
                }
                self.listeners.lock().unwrap().insert(id, Arc::new(ServedListener { l, conn, pid, pool }));
                Ok((Response::Listener { listener: id, local }, None))
            }
            Request::Accept { listener, wait, proxy, park, pool } => {
                let key = self.take_note(pid, pool.as_ref());
                let unknown = || io::Error::new(ErrorKind::InvalidInput, format!("no listener {listener}"));
                let l = self.listeners.lock().unwrap().get(&listener).cloned().ok_or_else(unknown)?;
                if l.pid != pid {
                    return Err(not_yours("listener", listener, l.pid));
                }
                if park.is_some() && l.pool.is_some() {
                    return Err(io::Error::new(
                        ErrorKind::InvalidInput,
                        format!("listener {listener} puts its arrivals in its process's regions: it cannot park them for another"),
                    ));
                }
                // At a cap, fail without taking a vsocket off the queue.
                self.check_limits(pid)?;
                loop {
                    match l.l.accept_timeout(if wait { ACCEPT_SLICE } else { Duration::ZERO })? {
                        Some((stream, remote)) if park.is_some() => {
                            let uid = self.conns.lock().unwrap().get(&conn).map_or(u32::MAX, |c| c.uid);
                            let placeholder = park.expect("checked");
                            self.reap_parked(false);
                            let old = self
                                .parked
                                .lock()
                                .unwrap()
                                .insert(placeholder, Parked { stream, listener, uid, since: Instant::now() });
                            if let Some(old) = old {
                                reset_parked(old, "its placeholder address was reused before it was claimed");
                            }
                            return Ok((Response::Parked { remote }, None));
                        }
                        Some((stream, _)) => {
                            // (Another thread of the process may have taken the last share
                            // meanwhile: the vsocket is then reset.)
                            let charge = self.charge(pid)?;
                            let sv = self.register(stream, conn, pid, proxy, charge, key)?;
                            return Ok((stream_response(&sv), Some(sv)));
                        }
                        None if !wait => {
                            return Err(io::Error::new(ErrorKind::WouldBlock, "no vsocket waiting"));
                        }
                        None => {
                            if hung_up(s) || self.stopping.load(Ordering::SeqCst) {
                                return Err(io::Error::new(
                                    ErrorKind::ConnectionAborted,
                                    "the client went away",
                                ));
                            }
                            if !self.listeners.lock().unwrap().contains_key(&listener) {
                                return Err(io::Error::new(
                                    ErrorKind::ConnectionAborted,
                                    "the listener was closed",
                                ));
                            }
                        }
                    }
                }
            }
            Request::Claim { placeholder, pool } => {
                let key = self.take_note(pid, pool.as_ref());
                let uid = self.conns.lock().unwrap().get(&conn).map_or(u32::MAX, |c| c.uid);
                let p = {
                    let mut parked = self.parked.lock().unwrap();
                    match parked.get(&placeholder) {
                        Some(p) if p.uid != uid && uid != 0 => {
                            return Err(io::Error::new(
                                ErrorKind::PermissionDenied,
                                format!(
                                    "the vsocket arrival behind placeholder {placeholder} belongs to uid {}",
                                    p.uid
                                ),
                            ))
                        }
                        _ => parked.remove(&placeholder),
                    }
                };
                let p = p.ok_or_else(|| {
                    io::Error::new(
                        ErrorKind::NotFound,
                        format!("no vsocket arrival waits behind placeholder connection {placeholder}"),
                    )
                })?;
                let charge = match self.charge(pid) {
                    Ok(c) => c,
                    Err(e) => {
                        reset_parked(p, "the accepting process is at a daemon limit");
                        return Err(e);
                    }
                };
                let sv = self.register(p.stream, conn, pid, true, charge, key)?;
                Ok((stream_response(&sv), Some(sv)))
            }
            Request::Proxy { handle } => {
                let sv = self.streams.lock().unwrap().get(&handle).cloned();
                let sv = sv
                    .ok_or_else(|| io::Error::new(ErrorKind::InvalidInput, format!("no vsocket {handle}")))?;
                if sv.pid != pid {
                    return Err(not_yours("vsocket", handle, sv.pid));
                }
                self.add_proxy(&sv)?;
                // Its gates start from what the vsocket holds now.
                if let Some(r) = sv.vs.region() {
                    r.drive_proxy();
                }
                Ok((Response::Ok, Some(sv)))
            }
            Request::CloseListener { listener } => {
                let l = {
                    let mut ls = self.listeners.lock().unwrap();
                    match ls.get(&listener) {
                        Some(l) if l.pid != pid => return Err(not_yours("listener", listener, l.pid)),
                        _ => ls.remove(&listener),
                    }
                };
                // Wake a blocked accept at once, so the port is free again right away.
                if let Some(l) = l {
                    self.unpool_port(&l);
                    l.l.close();
                }
                self.drop_parked_of(&[listener]);
                Ok((Response::Ok, None))
            }
            Request::SetClass { handle, class } => {
                let sv = self.streams.lock().unwrap().get(&handle).cloned();
                let sv = sv
                    .ok_or_else(|| io::Error::new(ErrorKind::InvalidInput, format!("no vsocket {handle}")))?;
                if sv.pid != pid {
                    return Err(not_yours("vsocket", handle, sv.pid));
                }
                sv.stream.set_class(class.into());
                Ok((Response::Ok, None))
            }
            Request::Status => Ok((Response::Status { status: self.status() }, None)),
            Request::KillChannel { peer, class, index } => {
                // Fault injection is for the daemon's own user and root, not every client.
                let uid = self.conns.lock().unwrap().get(&conn).map(|c| c.uid);
                // SAFETY: geteuid has no preconditions.
                let me = unsafe { libc::geteuid() };
                if !matches!(uid, Some(u) if u == 0 || u == me) {
                    return Err(io::Error::new(
                        ErrorKind::PermissionDenied,
                        format!("only root and uid {me} (the daemon's user) may kill channels"),
                    ));
                }
                if self.host.kill_channel(peer, class.into(), index) {
                    Ok((Response::Ok, None))
                } else {
                    Err(io::Error::new(
                        ErrorKind::NotFound,
                        format!("no {} channel {index} to {peer}", Class::from(class).name()),
                    ))
                }
            }
        }
    }

    /// Take in what an app says about its regions; the key of its pool, if it has one.
    fn take_note(&self, pid: i32, note: Option<&PoolNote>) -> Option<PoolKey> {
        let note = note?;
        self.pools.note(pid, note);
        Some(PoolKey { pid, token: note.token })
    }

    /// A listener is gone: its port's arrivals no longer go in its app's pool.
    fn unpool_port(&self, l: &ServedListener) {
        if let (Some(k), Ok(local)) = (l.pool, l.l.local_addr()) {
            let mut ports = self.pooled_ports.lock().unwrap();
            if ports.get(&local.port()) == Some(&k) {
                ports.remove(&local.port());
            }
        }
    }

    fn register(
        &self,
        stream: VStream,
        conn: u64,
        pid: i32,
        proxy: bool,
        charge: Charge,
        pool: Option<PoolKey>,
    ) -> io::Result<Arc<Served>> {
        let vs = stream.engine_vsock().expect("the daemon's host is embedded").clone();
        let region = vs.region().expect("daemon vsockets are shared").clone();
        let (naming, bell) = match self.pools.name(pool, pid, &region) {
            Ok(n) => n,
            Err(e) => {
                vs.reset(crate::wire::Reason::Closed, &e.to_string());
                return Err(e);
            }
        };
        let bell = match bell {
            Some(b) => b,
            None => Arc::new(Doorbell::new(
                &self.poller.registry,
                self.next_bell.fetch_add(1, Ordering::Relaxed),
            )?),
        };
        let handle = self.next.fetch_add(1, Ordering::Relaxed);
        let sv = Arc::new(Served {
            handle,
            stream,
            vs,
            bell,
            naming,
            conn,
            pid,
            proxy_ino: AtomicU64::new(0),
            proxy_a: Mutex::new(None),
            proxied: AtomicBool::new(false),
            connect_deadline: OnceLock::new(),
            _charge: charge,
        });
        if proxy {
            self.add_proxy(&sv)?;
        }
        self.streams.lock().unwrap().insert(handle, sv.clone());
        let mut bells = self.bells.lock().unwrap();
        if sv.naming.slot.is_some() {
            // A pooled vsocket rings its table's doorbell.
            match bells.entry(sv.bell.token).or_insert_with(|| Rings::Table(Vec::new())) {
                Rings::Table(v) => v.push(handle),
                one => *one = Rings::Table(vec![handle]),
            }
        } else {
            bells.insert(sv.bell.token, Rings::One(handle));
        }
        drop(bells);
        // Something may have arrived already (an accepted vsocket's first bytes).
        region.drive_proxy();
        Ok(sv)
    }

    /// Give a served vsocket its readiness proxy: end B goes in its region (and in the
    /// poller, for its hang-up), end A in `proxy_a`, to be sent to the app. Fails if it has
    /// one already (checked under `proxy_a`'s lock, so two requests make one proxy).
    fn add_proxy(&self, sv: &Served) -> io::Result<()> {
        let mut slot = sv.proxy_a.lock().unwrap();
        if sv.proxied.load(Ordering::SeqCst) {
            return Err(io::Error::new(
                ErrorKind::InvalidInput,
                format!("vsocket {} has its readiness proxy already", sv.handle),
            ));
        }
        let region = sv.vs.region().expect("daemon vsockets are shared");
        let (a, b) = super::proxy::pair()?;
        self.poller.add_hang_up(b.as_raw_fd(), sv.handle | PROXY_TOKEN)?;
        region.set_proxy(b);
        sv.proxy_ino.store(inode(a.as_raw_fd()), Ordering::Relaxed);
        // After B is in place: a proxied vsocket without B is one whose proxy failed.
        sv.proxied.store(true, Ordering::SeqCst);
        self.proxied.fetch_add(1, Ordering::Relaxed);
        *slot = Some(a);
        Ok(())
    }

    /// The connection `conn` ended: close everything it owned.
    fn cleanup(&self, conn: u64) {
        let pid = self.conns.lock().unwrap().remove(&conn).map(|c| c.pid);
        let mine: Vec<Arc<Served>> = {
            let mut m = self.streams.lock().unwrap();
            // Proxied vsockets end with their last descriptor (B's hang-up), not with this.
            let ids: Vec<u64> = m
                .values()
                .filter(|s| s.conn == conn && !s.proxied.load(Ordering::SeqCst))
                .map(|s| s.handle)
                .collect();
            ids.iter().filter_map(|h| m.remove(h)).collect()
        };
        for s in mine {
            // What the app wrote before it went is still delivered.
            let _ = s.vs.sync_app();
            self.forget_bell(&s);
        }
        let gone: Vec<(u64, Arc<ServedListener>)> = {
            let mut ls = self.listeners.lock().unwrap();
            let ids: Vec<u64> = ls.iter().filter(|(_, l)| l.conn == conn).map(|(id, _)| *id).collect();
            ids.iter().filter_map(|id| ls.remove(id).map(|l| (*id, l))).collect()
        };
        for (_, l) in &gone {
            self.unpool_port(l);
        }
        self.drop_parked_of(&gone.iter().map(|(id, _)| *id).collect::<Vec<_>>());
        if let Some(pid) = pid {
            if !self.conns.lock().unwrap().values().any(|c| c.pid == pid) {
                self.pools.drop_process(pid);
            }
        }
    }

    /// A served vsocket is done: its doorbell no longer rings for it (a pooled slot's stays
    /// registered for the slot's next vsocket; another's leaves the poller with it).
    fn forget_bell(&self, s: &Served) {
        let mut bells = self.bells.lock().unwrap();
        match bells.get_mut(&s.bell.token) {
            Some(Rings::One(h)) if *h == s.handle => {
                bells.remove(&s.bell.token);
            }
            Some(Rings::Table(v)) => v.retain(|h| *h != s.handle),
            _ => {}
        }
    }

    /// Reset the parked arrivals of closed listeners: their placeholders can no longer be
    /// accepted by anyone who would claim them.
    fn drop_parked_of(&self, listeners: &[u64]) {
        if listeners.is_empty() {
            return;
        }
        let dropped: Vec<Parked> = {
            let mut parked = self.parked.lock().unwrap();
            let keys: Vec<SocketAddr> =
                parked.iter().filter(|(_, p)| listeners.contains(&p.listener)).map(|(k, _)| *k).collect();
            keys.iter().filter_map(|k| parked.remove(k)).collect()
        };
        for p in dropped {
            reset_parked(p, "its listener closed before the program accepted it");
        }
    }

    /// Reset the arrivals parked longer than [`PARK_TIMEOUT`] (all of them with `all`).
    fn reap_parked(&self, all: bool) {
        let old: Vec<Parked> = {
            let mut parked = self.parked.lock().unwrap();
            if parked.is_empty() {
                return;
            }
            let keys: Vec<SocketAddr> = parked
                .iter()
                .filter(|(_, p)| all || p.since.elapsed() >= PARK_TIMEOUT)
                .map(|(k, _)| *k)
                .collect();
            keys.iter().filter_map(|k| parked.remove(k)).collect()
        };
        for p in old {
            reset_parked(p, "no process claimed it in time");
        }
    }

    /// Close a vsocket its app let go of.
    fn close_stream(&self, handle: u64) {
        let s = self.streams.lock().unwrap().remove(&handle);
        if let Some(s) = s {
            self.forget_bell(&s);
            if let Some(b) = s.vs.region().and_then(|r| r.proxy_fd()) {
                self.poller.remove(b);
            }
        }
    }

    /// The last descriptor of a proxied vsocket's end A closed (B hung up): the app let go.
    fn proxy_hung_up(&self, handle: u64) {
        let s = self.streams.lock().unwrap().get(&handle).cloned();
        if let Some(s) = s {
            if let Some(r) = s.vs.region() {
                r.header().app_flags.fetch_or(shm::CLOSED, Ordering::Release);
            }
            self.sync(handle);
            // Level-triggered hang-ups must not fire again, whatever sync decided.
            if let Some(b) = s.vs.region().and_then(|r| r.proxy_fd()) {
                self.poller.remove(b);
            }
        }
    }

    /// Proxied vsockets whose proxy closed on an error: nobody can reach them any more.
    fn reap_failed_proxies(&self) {
        let bypassed: Vec<Arc<Served>> = self
            .streams
            .lock()
            .unwrap()
            .values()
            .filter(|s| {
                s.proxied.load(Ordering::SeqCst)
                    && s.vs.region().is_some_and(|r| r.proxy_bypassed() && r.proxy_fd().is_some())
            })
            .cloned()
            .collect();
        for s in bypassed {
            // Reads and writes that bypass the shim would take readiness records for data:
            // reset the vsocket, loudly, rather than corrupt it.
            let (program, fd) = program_and_fd(s.pid, s.proxy_ino.load(Ordering::Relaxed));
            tracing::warn!(
                pid = s.pid,
                program = %program,
                fd = %fd,
                remote = %s.vs.remote,
                "{program} (pid {}) used vsocket fd {fd} with a call the preload shim cannot see (an io_uring \
                 data operation or a raw system call): the vsocket is reset; run it with [preload] \
                 datapath = \"relay\"",
                s.pid
            );
            s.vs.reset(
                crate::wire::Reason::Closed,
                &format!("{program} used fd {fd} with a call the preload shim cannot see (io_uring or a raw system call)"),
            );
        }
        let dead: Vec<u64> = self
            .streams
            .lock()
            .unwrap()
            .values()
            .filter(|s| {
                s.proxied.load(Ordering::SeqCst) && s.vs.region().is_some_and(|r| r.proxy_fd().is_none())
            })
            .map(|s| s.handle)
            .collect();
        for h in dead {
            self.close_stream(h);
        }
    }

    /// Fail the vsockets handed over while connecting whose answer did not come in time (the
    /// app's descriptor then reports ERR|HUP and `SO_ERROR` ETIMEDOUT). Looked at on the
    /// poller's idle passes, at least once a second.
    fn time_out_connects(&self) {
        let now = Instant::now();
        let late: Vec<Arc<Served>> = self
            .streams
            .lock()
            .unwrap()
            .values()
            .filter(|s| s.connect_deadline.get().is_some_and(|&d| d <= now) && s.vs.connecting())
            .cloned()
            .collect();
        for s in late {
            let _ = s.vs.connect_timed_out();
        }
    }

    /// An app broke the shared-memory contract: disconnect its connection.
    fn disconnect(&self, conn: u64, why: &str) {
        self.clients_disconnected.fetch_add(1, Ordering::Relaxed);
        let c = self.conns.lock().unwrap().get(&conn).map(|c| (c.pid, c.sock.clone()));
        // Its vsockets fail with the reason (their peers get a reset), then close.
        let mine: Vec<Arc<Served>> =
            self.streams.lock().unwrap().values().filter(|s| s.conn == conn).cloned().collect();
        for s in mine {
            s.vs.reset(
                crate::wire::Reason::Closed,
                &format!("the daemon disconnected the owning process: {why}"),
            );
            // Proxied ones too (the cleanup leaves those to their proxy's hang-up): another
            // doorbell of a liar must not take in its header again.
            self.close_stream(s.handle);
        }
        if let Some((pid, sock)) = c {
            tracing::warn!(pid, conn, why, "client disconnected");
            let _ = sock.shutdown(Shutdown::Both);
        }
        self.cleanup(conn);
    }

    /// Take in one vsocket's header; whether anything moved.
    fn sync(&self, handle: u64) -> bool {
        let s = self.streams.lock().unwrap().get(&handle).cloned();
        let Some(s) = s else { return false };
        match s.vs.sync_app() {
            Ok((closed, moved)) => {
                if closed {
                    self.close_stream(handle);
                } else if s.proxied.load(Ordering::Relaxed) {
                    if let Some(r) = s.vs.region() {
                        r.drive_proxy();
                    }
                }
                moved
            }
            Err(why) => {
                self.disconnect(s.conn, &format!("vsocket {} -> {}: {why}", s.vs.local, s.vs.remote));
                false
            }
        }
    }

    fn run_poller(self: Arc<Self>, mut poll: Poll) {
        let spin = self.cfg.daemon.poll_spin();
        let mut events = Events::with_capacity(256);
        let mut active: Vec<u64> = Vec::new();
        let mut last_move = Instant::now();
        loop {
            if self.stopping.load(Ordering::SeqCst) {
                return;
            }
            let timeout = if !active.is_empty() && last_move.elapsed() < spin {
                Duration::ZERO
            } else {
                // Going to sleep: ask the apps to ring, then look once more so that a move
                // made just before is not missed.
                let mut moved = false;
                for &h in &active {
                    if let Some(s) = self.streams.lock().unwrap().get(&h) {
                        s.vs.region().expect("shared").header().need_kick.store(1, Ordering::SeqCst);
                    }
                }
                let was_active = std::mem::take(&mut active);
                batching_small_sends(|| {
                    for h in was_active {
                        moved |= self.sync(h);
                    }
                });
                if moved {
                    last_move = Instant::now();
                }
                self.reap_failed_proxies();
                self.reap_parked(false);
                self.time_out_connects();
                Duration::from_secs(1)
            };
            if let Err(e) = poll.poll(&mut events, Some(timeout)) {
                if e.kind() != ErrorKind::Interrupted {
                    tracing::error!(error = %e, "the doorbell poller cannot wait; retrying");
                    std::thread::sleep(Duration::from_millis(10));
                }
                events.clear();
            }
            // The requests of every app rung in this pass leave in one write per channel.
            let moved = batching_small_sends(|| self.take_doorbells(&events, &mut active));
            let streams = self.streams.lock().unwrap();
            active.retain(|h| streams.contains_key(h));
            drop(streams);
            if moved {
                last_move = Instant::now();
            }
        }
    }

    /// The poller's pass over what woke it: hang-ups of proxies, and doorbells, whose
    /// vsockets join `active` and are all taken in; whether anything moved.
    fn take_doorbells(&self, events: &Events, active: &mut Vec<u64>) -> bool {
        for ev in events {
            let h = ev.token().0 as u64;
            if h == 0 {
                // The waker (mio resets it itself).
                continue;
            }
            if h & PROXY_TOKEN != 0 {
                self.proxy_hung_up(h & !PROXY_TOKEN);
                continue;
            }
            // Edge-triggered (`Doorbell::new`): nothing to clear. The token is the doorbell's;
            // a pooled slot's outlives its vsockets.
            let rung = match self.bells.lock().unwrap().get(&h) {
                Some(Rings::One(h)) => vec![*h],
                Some(Rings::Table(v)) => v.clone(),
                None => continue,
            };
            self.doorbells.fetch_add(1, Ordering::Relaxed);
            let table = rung.len() > 1;
            let streams = self.streams.lock().unwrap();
            for h in rung {
                // Of a table's vsockets, those whose app rang: it swaps `need_kick` to 0
                // before it rings (and the poller sets it back to 1 only when it stops
                // watching the vsocket), so the others still say 1.
                let rang = !table
                    || streams
                        .get(&h)
                        .and_then(|s| s.vs.region())
                        .is_some_and(|r| r.header().need_kick.load(Ordering::SeqCst) == 0);
                if rang && !active.contains(&h) {
                    active.push(h);
                }
            }
        }
        let mut moved = false;
        for &h in active.iter() {
            moved |= self.sync(h);
        }
        moved
    }

    fn status(&self) -> serde_json::Value {
        let stats = self.host.stats();
        let owners: HashMap<u32, i32> =
            self.streams.lock().unwrap().values().map(|s| (s.vs.id, s.pid)).collect();
        let vsockets: Vec<_> = self
            .host
            .vsock_infos()
            .into_iter()
            .map(|v| {
                json!({
                    "id": v.id,
                    "pid": owners.get(&v.id),
                    "local": v.local.to_string(),
                    "remote": v.remote.to_string(),
                    "class": v.class.name(),
                    "bytes_sent": v.bytes_sent,
                    "bytes_acked": v.bytes_acked,
                    "bytes_received": v.bytes_received,
                    "bytes_read": v.bytes_read,
                    "state": v.state,
                })
            })
            .collect();
        let mut peers: Vec<serde_json::Value> = Vec::new();
        let mut by_peer: HashMap<SocketAddr, (usize, usize)> = HashMap::new();
        for c in &stats.channels {
            let e = by_peer.entry(c.peer).or_default();
            match c.class {
                Class::Throughput => e.0 += 1,
                Class::Latency => e.1 += 1,
            }
        }
        let mut keys: Vec<_> = by_peer.keys().copied().collect();
        keys.sort();
        for k in keys {
            let (t, l) = by_peer[&k];
            peers.push(json!({"address": k.to_string(), "throughput_channels": t, "latency_channels": l}));
        }
        let channels: Vec<_> = stats
            .channels
            .iter()
            .map(|c| {
                json!({
                    "peer": c.peer.to_string(),
                    "class": c.class.name(),
                    "index": c.index,
                    "worker": c.worker,
                    "bytes_sent": c.bytes_sent,
                    "bytes_received": c.bytes_received,
                    "frames_sent": c.frames_sent,
                    "frames_received": c.frames_received,
                    "queued_bytes": c.queued,
                    "queue": lanes(&c.queue),
                    "kernel_unsent_bytes": c.kernel_unsent,
                    "writes": c.writes,
                    "state": "up",
                })
            })
            .collect();
        let class_queues: Vec<_> = stats
            .class_queues()
            .iter()
            .map(|q| {
                json!({
                    "class": q.class.name(),
                    "channels": q.channels,
                    "queue": lanes(&q.queue),
                    "queued_bytes": q.queued,
                    "kernel_unsent_bytes": q.kernel_unsent,
                })
            })
            .collect();
        let clients: Vec<_> = {
            let conns = self.conns.lock().unwrap();
            let streams = self.streams.lock().unwrap();
            let mut v: Vec<_> = conns
                .iter()
                .map(|(id, c)| {
                    json!({
                        "connection": id,
                        "pid": c.pid,
                        "uid": c.uid,
                        "vsockets": streams.values().filter(|s| s.conn == *id).count(),
                    })
                })
                .collect();
            v.sort_by_key(|c| c["connection"].as_u64());
            v
        };
        let mut listeners: Vec<_> = self
            .listeners
            .lock()
            .unwrap()
            .iter()
            .map(|(id, l)| json!({"id": id, "pid": l.pid, "local": l.l.local_addr().ok().map(|a| a.to_string())}))
            .collect();
        listeners.sort_by_key(|l| l["id"].as_u64());
        let cfg = &self.cfg;
        let pinned = self.ledger.lock().unwrap().bytes;
        let d = &cfg.daemon;
        json!({
            "daemon": {
                "pid": std::process::id(),
                "socket": self.socket.display().to_string(),
                "listen": self.host.local_addr().to_string(),
                "uptime_s": self.started.elapsed().as_secs_f64(),
                "authenticated": cfg.auth_key_file.is_some(),
            },
            "workers": {
                "channel_workers": cfg.channel_workers,
                "latency_workers": if cfg.latency_channels > 0 { cfg.latency_workers } else { 0 },
                "copy_workers": cfg.copy_workers,
            },
            "peers": peers,
            "channels": channels,
            "class_queues": class_queues,
            "vsockets": vsockets,
            "listeners": listeners,
            "clients": clients,
            "region_pools": self.pools.status(),
            "limits": {
                "max_connections": d.max_connections,
                "max_connections_per_process": d.max_connections_per_process,
                "max_vsockets_per_process": d.max_vsockets_per_process,
                "max_buffer_per_process": d.max_buffer_per_process(),
                "max_buffer": d.max_buffer(),
                "buffer_pinned": pinned,
            },
            "totals": {
                "vsockets_opened": stats.vsockets_opened,
                "vsockets_open": stats.vsockets,
                "bytes_sent": stats.bytes_sent,
                "bytes_received": stats.bytes_received,
                "channels_refused": stats.channels_refused,
                "bad_frames": stats.bad_frames,
                "channels_redialed": stats.channels_redialed,
                "peers_lost": stats.peers_lost,
                "clients_refused": self.clients_refused.load(Ordering::Relaxed),
                "clients_disconnected": self.clients_disconnected.load(Ordering::Relaxed),
                "limits_refused": self.limits_refused.load(Ordering::Relaxed),
                "doorbells": self.doorbells.load(Ordering::Relaxed),
                "vsockets_proxied": self.proxied.load(Ordering::Relaxed),
                "regions_created": self.pools.created.load(Ordering::Relaxed),
                "regions_reused": self.pools.reused.load(Ordering::Relaxed),
                "arrivals_parked": self.parked.lock().unwrap().len(),
            },
        })
    }
}

/// A channel's (or class's) queue depths per lane.
fn lanes(q: &crate::engine::LaneDepths) -> serde_json::Value {
    let d = |d: &crate::proto::sched::Depth| json!({"bytes": d.bytes, "frames": d.frames});
    json!({"control": d(&q.control), "latency": d(&q.latency), "bulk": d(&q.bulk)})
}

/// A request about another process's vsocket or listener.
/// The inode number of descriptor `fd`.
fn inode(fd: RawFd) -> u64 {
    // SAFETY: stat is plain data; fstat fills it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a live stat buffer.
    if unsafe { libc::fstat(fd, &mut st) } == 0 {
        st.st_ino
    } else {
        0
    }
}

/// The name of process `pid` and its descriptor of the socket with inode `ino` ("?" where
/// /proc does not say).
fn program_and_fd(pid: i32, ino: u64) -> (String, String) {
    let program = std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map_or("?".to_string(), |s| s.trim().to_string());
    let want = format!("socket:[{ino}]");
    let fd = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()
        .and_then(|d| {
            d.filter_map(|e| e.ok())
                .find(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.as_os_str() == want.as_str()))
        })
        .map_or("?".to_string(), |e| e.file_name().to_string_lossy().into_owned());
    (program, fd)
}

/// Refuse a parked arrival to its peer (RESET), never drop it silently; one log line.
fn reset_parked(p: Parked, why: &str) {
    if let Some(vs) = p.stream.engine_vsock() {
        tracing::warn!(remote = %vs.remote, why, "a vsocket arrival for the preload shim was not delivered: reset");
        vs.reset(crate::wire::Reason::Closed, &format!("not delivered to the program: {why}"));
    }
}

fn not_yours(what: &str, id: u64, owner: i32) -> io::Error {
    io::Error::new(ErrorKind::PermissionDenied, format!("{what} {id} belongs to process {owner}"))
}

fn stream_response(sv: &Served) -> Response {
    Response::Stream {
        handle: sv.handle,
        local: sv.vs.local,
        remote: sv.vs.remote,
        class: sv.stream.class().into(),
        slot: sv.naming.slot,
        mapped: sv.naming.mapped,
    }
}

/// The doorbell poller's registry: vsocket doorbells (edge-triggered, under their tokens),
/// proxy ends B (hang-ups only, under `handle | PROXY_TOKEN`) and a waker (token 0). The
/// `mio::Poll` itself belongs to the poller thread (`State::run_poller`).
struct Poller {
    /// Shared with the doorbells, which take themselves out of it when they go.
    registry: Arc<Registry>,
    waker: Waker,
}

impl Poller {
    fn new() -> io::Result<(Poller, Poll)> {
        let poll = Poll::new()?;
        let registry = Arc::new(poll.registry().try_clone()?);
        let waker = Waker::new(&registry, Token(0))?;
        Ok((Poller { registry, waker }, poll))
    }

    /// Watch proxy end B for its hang-up only: `EPOLLHUP` and `EPOLLERR` are always
    /// reported, and a Unix socket never raises `EPOLLPRI`, so the records the app writes
    /// to plug its OUT gate wake nobody.
    fn add_hang_up(&self, fd: RawFd, token: u64) -> io::Result<()> {
        self.registry.register(&mut SourceFd(&fd), Token(token as usize), Interest::PRIORITY)
    }

    fn remove(&self, fd: RawFd) {
        let _ = self.registry.deregister(&mut SourceFd(&fd));
    }

    fn wake(&self) {
        let _ = self.waker.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::Client;
    use std::io::{Read, Write};

    fn start(listen: &str, dir: &Path) -> (PathBuf, Stopper) {
        let socket = dir.join(format!("{listen}.sock"));
        let mut cfg = Config { listen: listen.parse().unwrap(), ..Config::default() };
        cfg.daemon.socket = Some(socket.clone());
        let server = Server::start(cfg).unwrap();
        let stop = server.stopper();
        std::thread::spawn(move || server.run());
        (socket, stop)
    }

    #[test]
    fn one_process_cannot_hold_unbounded_connections() {
        let dir = std::env::temp_dir().join(format!("nc-conns-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (sa, stop) = start("127.61.1.1:9000", &dir);
        let held: Vec<UnixStream> = (0..Config::default().daemon.max_connections_per_process)
            .map(|_| {
                let c = UnixStream::connect(&sa).unwrap();
                super::super::send_msg(c.as_raw_fd(), &Request::Hello, &[]).unwrap();
                let (body, _) = super::super::recv_msg(c.as_raw_fd(), 1 << 16).unwrap().unwrap();
                assert!(matches!(serde_json::from_slice(&body).unwrap(), Response::Ok));
                c
            })
            .collect();
        let e = Client::connect(&sa).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::OutOfMemory, "{e}");
        assert_eq!(LimitExceeded::of(&e).map(|l| l.key()), Some("daemon.max_connections_per_process"), "{e}");
        assert!(e.to_string().contains("daemon.max_connections_per_process"), "{e}");
        drop(held);
        // Once they are gone the process is served again.
        let deadline = Instant::now() + Duration::from_secs(10);
        while Client::connect(&sa).is_err() {
            assert!(Instant::now() < deadline, "connections were not released");
            std::thread::sleep(Duration::from_millis(10));
        }
        stop.stop();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_connect_through_the_daemon_leaves_no_channel_parked() {
        let dir = std::env::temp_dir().join(format!("nc-park-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("a.sock");
        let mut cfg = Config { listen: "127.61.3.1:9000".parse().unwrap(), ..Config::default() };
        cfg.daemon.socket = Some(socket.clone());
        let server = Server::start(cfg).unwrap();
        let host = server.st.host.clone();
        let stop_a = server.stopper();
        std::thread::spawn(move || server.run());
        let (sb, stop_b) = start("127.61.3.2:9000", &dir);
        let (ca, cb) = (Client::connect(&socket).unwrap(), Client::connect(&sb).unwrap());
        let _l = cb.bind(7000).unwrap();
        for _ in 0..20 {
            let _s = ca.connect_stream("127.61.3.2:7000".parse().unwrap()).unwrap();
            // The connect read its home channel inline for OPEN_OK; the app now reads the
            // shared rings, so nothing must be left for the worker's tick.
            assert!(!host.inner().parking.any(), "a daemon connect left its home channel parked");
        }
        stop_a.stop();
        stop_b.stop();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_idle_client_stays_and_one_stalled_inside_a_request_is_cut_off() {
        let dir = std::env::temp_dir().join(format!("nc-stall-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (sa, stop) = start("127.61.2.1:9000", &dir);
        let idle = UnixStream::connect(&sa).unwrap();
        let stalled = UnixStream::connect(&sa).unwrap();
        // Half a length prefix, then nothing.
        (&stalled).write_all(&[0, 0]).unwrap();
        stalled.set_read_timeout(Some(REQUEST_TIMEOUT * 3)).unwrap();
        let started = Instant::now();
        let mut b = [0u8; 16];
        let n = (&stalled).read(&mut b).unwrap_or(0);
        assert_eq!(n, 0, "the stalled client is hung up on");
        assert!(started.elapsed() < REQUEST_TIMEOUT * 2, "cut off after {:?}", started.elapsed());
        // The idle one, as old by now as a request may take, is still served.
        assert!(started.elapsed() >= REQUEST_TIMEOUT - Duration::from_millis(100));
        super::super::send_msg(idle.as_raw_fd(), &Request::Hello, &[]).unwrap();
        let (body, _) = super::super::recv_msg(idle.as_raw_fd(), 1 << 16).unwrap().unwrap();
        assert!(matches!(serde_json::from_slice(&body).unwrap(), Response::Ok));
        let st = Client::connect(&sa).unwrap().status().unwrap();
        assert_eq!(st["totals"]["clients_disconnected"], 1, "{st}");
        stop.stop();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_client_that_lies_in_its_header_is_disconnected_alone() {
        let dir = std::env::temp_dir().join(format!("nc-lie-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (sa, stop_a) = start("127.61.0.1:9000", &dir);
        let (sb, stop_b) = start("127.61.0.2:9000", &dir);
        let (liar, honest, server) =
            (Client::connect(&sa).unwrap(), Client::connect(&sa).unwrap(), Client::connect(&sb).unwrap());
        let l = server.bind(7000).unwrap();
        let target: SocketAddr = "127.61.0.2:7000".parse().unwrap();
        let bad = liar.connect_stream(target).unwrap();
        let (mut bad_peer, _) = l.accept().unwrap();
        let mut good = honest.connect_stream(target).unwrap();
        let (mut good_peer, _) = l.accept().unwrap();
        // The liar claims to have written far past its send buffer.
        let crate::vsock::StreamImp::Daemon(d) = &bad.imp else { panic!("a daemon stream") };
        let h = d.region().header();
        h.tx_written.store(u64::MAX / 2, Ordering::Release);
        d.ring_doorbell();
        let mut b = [0u8; 8];
        let e = (&bad).read(&mut b).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ConnectionAborted, "{e}");
        assert!(e.to_string().contains("write position"), "{e}");
        // Its peer is reset; the honest client of the same daemon is untouched.
        bad_peer.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        assert!(bad_peer.read(&mut b).is_err(), "the liar's peer sees a reset");
        good.write_all(b"still fine").unwrap();
        let mut got = [0u8; 10];
        good_peer.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"still fine");
        let st = honest.status().unwrap();
        assert_eq!(st["totals"]["clients_disconnected"], 1, "{st}");
        stop_a.stop();
        stop_b.stop();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
