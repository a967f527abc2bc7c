//! The host engine: one NetDriver with its peers, channels, channel workers and copy
//! workers, serving the vsockets of the process it runs in (the embedded host).
//!
//! [`Host`] is the handle users hold. It owns the channel listener (the acceptor thread),
//! the channel worker threads and the copy pool, the vsocket table and the listeners. The
//! engine stops when the last handle — a `Host` clone, a `VStream` or a `VListener` — is
//! dropped, or at [`Host::shutdown`].

pub(crate) mod announce;
pub(crate) mod auth;
pub(crate) mod channel;
pub(crate) mod handshake;
pub(crate) mod peer;
pub(crate) mod recovery;
pub(crate) mod vsocket;

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::Waker;

use crate::config::Config;
use crate::copy::CopyPool;
use crate::proto::sched::Depth;
use crate::proto::tombs::{Stale, Tombstones};
use crate::ring::RingPool;
use crate::wire::{Class, Frame, Reason};
use channel::{Channel, Command, WorkerHandle};
use peer::{Peer, PeerState};
use vsocket::{ListenQueue, VSock};

/// First port handed out to connecting vsockets.
const EPHEMERAL_FIRST: u16 = 32768;
/// Free ring memory a host keeps for new vsockets.
const RING_POOL_BYTES: usize = 64 << 20;

/// The engine's shared state.
pub(crate) struct HostInner {
    pub cfg: Config,
    pub host_id: u64,
    /// Pre-shared key authenticating channels, if configured.
    auth_key: Option<Vec<u8>>,
    /// The bound channel address.
    pub local: SocketAddr,
    pub peers: Mutex<HashMap<SocketAddr, Arc<Peer>>>,
    pub vsocks: RwLock<HashMap<u32, Arc<VSock>>>,
    pub listeners: Mutex<HashMap<u16, Arc<ListenQueue>>>,
    /// The last listener announcement's sequence (`engine::announce`; taken under
    /// `listeners`).
    announce_seq: AtomicU64,
    /// Vsockets holding their OPEN or OPEN_OK back for their first write
    /// (`HostInner::owe_frame`), since when.
    owed_opens: Mutex<Vec<(Instant, std::sync::Weak<VSock>)>>,
    /// `owed_opens` is not empty.
    any_owed: AtomicBool,
    ports: Mutex<(u16, HashSet<u16>)>,
    next_id: AtomicU32,
    pub next_token: AtomicUsize,
    pub workers: Vec<WorkerHandle>,
    pub copy: CopyPool,
    /// Ring memory of closed vsockets, for the next ones.
    pub rings: Arc<RingPool>,
    closing: AtomicBool,
    acceptor_waker: Waker,
    threads: Mutex<Vec<JoinHandle<()>>>,
    pub totals: Arc<Totals>,
    /// Vsocket rings live in shared memory (the daemon serves them to app processes).
    pub shm_rings: bool,
    /// The daemon's choice of region for a vsocket arriving on a port (a recycled region of
    /// the listening app process, `crate::daemon::regions`); `None`: a new one.
    pub arrival_regions: OnceLock<ArrivalRegions>,
    /// Vsockets that recently left the table (answers to their peers' late frames).
    /// Keyed by the peer's address and host id ([`Peer::tomb_key`]): a restarted peer's
    /// vsocket ids start again, and must not meet the tombs of its previous run.
    tombstones: Mutex<Tombstones<(SocketAddr, u64)>>,
    /// Channels parked by inline reads, and threads waiting for what channels carry.
    pub parking: channel::Parking,
    /// How long an inline read polls before it sleeps: `inline_spin_us`, or zero on a
    /// machine with one CPU (the spinner would hold the core its answer needs).
    pub inline_spin: Duration,
}

/// Picks the shared region of a vsocket arriving on a local port (see
/// [`HostInner::arrival_regions`]).
pub(crate) type ArrivalRegions = Box<dyn Fn(u16) -> Option<Arc<crate::shm::Region>> + Send + Sync>;

/// Host-wide counters.
#[derive(Default, Debug)]
pub(crate) struct Totals {
    pub vsockets_opened: AtomicU64,
    pub channels_refused: AtomicU64,
    /// Payload bytes written by applications into vsockets.
    pub bytes_sent: AtomicU64,
    /// Payload bytes received in order on vsockets.
    pub bytes_received: AtomicU64,
    pub frames_dropped: AtomicU64,
    pub bad_frames: AtomicU64,
    pub channels_redialed: AtomicU64,
    pub peers_lost: AtomicU64,
    /// Confirmed connects that did not wait for OPEN_OK: the port was announced.
    pub connects_announced: AtomicU64,
    /// When bulk last moved through the host (throughput-class bytes past a vsocket's first
    /// `INLINE_MAX`), on [`clock_ns`]; 0: never. Inline reads spin only while it is old.
    bulk_seen_ns: AtomicU64,
}

/// Bulk seen within this long keeps inline reads from spinning (`inline_spin_us`).
const BULK_QUIET_NS: u64 = 10_000_000;
/// The bulk mark is moved at most this often (each move is a write to a shared line).
const BULK_MARK_NS: u64 = 100_000;

/// Nanoseconds since the first call in this process, plus 1 (never 0).
pub(crate) fn clock_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64 + 1
}

impl Totals {
    /// Bulk moved through the host just now.
    pub(crate) fn saw_bulk(&self) {
        let now = clock_ns();
        if now.saturating_sub(self.bulk_seen_ns.load(Ordering::Relaxed)) > BULK_MARK_NS {
            self.bulk_seen_ns.store(now, Ordering::Relaxed);
        }
    }

    /// Whether bulk moved through the host within the last [`BULK_QUIET_NS`].
    pub(crate) fn bulk_recent(&self) -> bool {
        let seen = self.bulk_seen_ns.load(Ordering::Relaxed);
        seen != 0 && clock_ns().saturating_sub(seen) < BULK_QUIET_NS
    }
}

/// Counters of one channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelStats {
    /// The peer host's channel address.
    pub peer: SocketAddr,
    /// Throughput or latency.
    pub class: Class,
    /// Index within its class, as given in HELLO by the dialing host.
    pub index: u16,
    /// Channel worker serving it.
    pub worker: usize,
    /// Bytes written to the TCP connection.
    pub bytes_sent: u64,
    /// Bytes read from the TCP connection.
    pub bytes_received: u64,
    /// Frames written.
    pub frames_sent: u64,
    /// Frames read.
    pub frames_received: u64,
    /// Unsent bytes queued: in the channel's queue plus gathered into a write and not yet
    /// handed to the kernel.
    pub queued: usize,
    /// What waits in the channel's queue, per lane: control frames, latency-class segments
    /// (which leave first) and bulk segments.
    pub queue: LaneDepths,
    /// Bytes handed to the kernel socket and not yet sent (`SIOCOUTQNSD`).
    pub kernel_unsent: usize,
    /// Write syscalls made (`frames_sent / writes` is the mean batch).
    pub writes: u64,
    /// The TCP congestion control the kernel runs on it (`TCP_CONGESTION`, see
    /// `channel_congestion`); empty once the channel is down.
    pub congestion: String,
}

/// Queue depths of one channel's lanes, or of a whole class's channels.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LaneDepths {
    /// Control frames (CREDIT, OPEN, FIN…).
    pub control: Depth,
    /// Segments of latency-class vsockets.
    pub latency: Depth,
    /// Segments of throughput-class vsockets.
    pub bulk: Depth,
}

impl LaneDepths {
    /// Every lane together.
    pub fn total(&self) -> Depth {
        let mut d = self.control;
        d += self.latency;
        d += self.bulk;
        d
    }
}

/// What waits to be sent on the channels of one class (summed over peers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClassQueue {
    /// The channels' class.
    pub class: Class,
    /// Live channels of the class.
    pub channels: usize,
    /// Queued in their lanes.
    pub queue: LaneDepths,
    /// Unsent bytes in our queues, gathered writes included (sum of [`ChannelStats::queued`]).
    pub queued: usize,
    /// Unsent bytes in their kernel sockets.
    pub kernel_unsent: usize,
}

/// A snapshot of a host's counters.
#[derive(Debug, Clone, Default)]
pub struct HostStats {
    /// Every live channel, grouped by peer, throughput before latency, by index.
    pub channels: Vec<ChannelStats>,
    /// Vsockets in the table (open or closing).
    pub vsockets: usize,
    /// Vsockets ever opened (connected or accepted).
    pub vsockets_opened: u64,
    /// Channels refused at handshake (bad HELLO, wrong version).
    pub channels_refused: u64,
    /// Payload bytes applications wrote into vsockets.
    pub bytes_sent: u64,
    /// Payload bytes vsockets received in order.
    pub bytes_received: u64,
    /// Open channels closed because the peer sent a malformed frame (or a handshake frame
    /// after the handshake). Each is logged with the peer's address.
    pub bad_frames: u64,
    /// Lost channels dialed again successfully.
    pub channels_redialed: u64,
    /// Peers given up (every channel down too long, orderly shutdown, or restart): their
    /// vsockets failed with `ConnectionReset`.
    pub peers_lost: u64,
    /// Confirmed connects that returned without waiting for OPEN_OK because the peer had
    /// announced the port (`engine::announce`); optimistic opens are not counted.
    pub connects_announced: u64,
}

/// An embedded NetChannel host: the whole engine inside this process.
///
/// ```no_run
/// use std::io::{Read, Write};
/// use netchannel::{Config, Host};
///
/// let mut cfg = Config::default();
/// cfg.listen = "127.0.0.1:9000".parse().unwrap();
/// let host = Host::start(cfg)?;
/// let mut s = host.connect("127.0.0.2:7000".parse().unwrap())?;
/// s.write_all(b"hello")?;
/// let mut reply = [0u8; 5];
/// s.read_exact(&mut reply)?;
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Clone)]
pub struct Host {
    guard: Arc<Guard>,
}

struct Guard {
    inner: Arc<HostInner>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.inner.shutdown();
    }
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Host({})", self.guard.inner.local)
    }
}

pub(crate) fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most b.len() bytes into b.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != 8 {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        return t.as_nanos() as u64 ^ ((std::process::id() as u64) << 32);
    }
    u64::from_ne_bytes(b)
}

impl HostStats {
    /// Queue depths per channel class (throughput, then latency), summed over channels.
    pub fn class_queues(&self) -> [ClassQueue; 2] {
        let mut out = [Class::Throughput, Class::Latency].map(|class| ClassQueue {
            class,
            channels: 0,
            queue: LaneDepths::default(),
            queued: 0,
            kernel_unsent: 0,
        });
        for c in &self.channels {
            let q = &mut out[c.class as usize];
            q.channels += 1;
            q.queue.control += c.queue.control;
            q.queue.latency += c.queue.latency;
            q.queue.bulk += c.queue.bulk;
            q.queued += c.queued;
            q.kernel_unsent += c.kernel_unsent;
        }
        out
    }
}

impl Host {
    /// Start a host: validate `config`, bind `config.listen` for channels, start the
    /// channel workers, the copy workers and the acceptor.
    pub fn start(config: Config) -> io::Result<Host> {
        Host::start_inner(config, false)
    }

    /// Start a host whose vsocket rings live in shared memory, so that the daemon can hand
    /// them to application processes.
    pub(crate) fn start_shared(config: Config) -> io::Result<Host> {
        Host::start_inner(config, true)
    }

    fn start_inner(config: Config, shm_rings: bool) -> io::Result<Host> {
        config.validate()?;
        check_congestion(&config.channel_congestion)?;
        crate::placement::check("channel_worker_cpus", &config.channel_worker_cpus)?;
        crate::placement::check("latency_worker_cpus", &config.latency_worker_cpus)?;
        crate::placement::check("copy_worker_cpus", &config.copy_worker_cpus)?;
        let auth_key = config.auth_key()?;
        let std_listener = std::net::TcpListener::bind(config.listen).map_err(|e| {
            io::Error::new(e.kind(), format!("cannot listen for channels on {}: {e}", config.listen))
        })?;
        std_listener.set_nonblocking(true)?;
        let local = std_listener.local_addr()?;
        // Said once the port is ours, so that a start that fails says only why.
        if auth_key.is_none() {
            tracing::info!(listen = %config.listen, "the host's channels are not authenticated (no auth_key_file)");
        }
        let mut polls = Vec::new();
        let mut workers = Vec::new();
        // Channel workers first, then the latency workers (used only when there are latency
        // channels to serve).
        let latency_workers = if config.latency_channels > 0 { config.latency_workers } else { 0 };
        for _ in 0..config.channel_workers + latency_workers {
            let (p, h) = channel::new_worker()?;
            polls.push(p);
            workers.push(h);
        }
        let (acceptor, acceptor_waker) = handshake::Acceptor::new(std_listener)?;
        let copy = CopyPool::new(config.copy_workers, config.copy_threshold, &config.copy_worker_cpus)?;
        let inner = Arc::new(HostInner {
            host_id: random_u64() | 1,
            auth_key,
            local,
            peers: Mutex::new(HashMap::new()),
            vsocks: RwLock::new(HashMap::new()),
            listeners: Mutex::new(HashMap::new()),
            announce_seq: AtomicU64::new(0),
            owed_opens: Mutex::new(Vec::new()),
            any_owed: AtomicBool::new(false),
            ports: Mutex::new((EPHEMERAL_FIRST, HashSet::new())),
            next_id: AtomicU32::new(1),
            next_token: AtomicUsize::new(0),
            workers,
            copy,
            rings: RingPool::new(RING_POOL_BYTES),
            closing: AtomicBool::new(false),
            acceptor_waker,
            threads: Mutex::new(Vec::new()),
            totals: Arc::new(Totals::default()),
            shm_rings,
            arrival_regions: OnceLock::new(),
            tombstones: Mutex::new(Tombstones::default()),
            parking: channel::Parking::default(),
            inline_spin: if std::thread::available_parallelism().map_or(1, |n| n.get()) > 1 {
                Duration::from_micros(config.inline_spin_us)
            } else {
                Duration::ZERO
            },
            cfg: config,
        });
        let mut threads = Vec::new();
        for (i, p) in polls.into_iter().enumerate() {
            let h = inner.clone();
            let latency = i >= inner.cfg.channel_workers;
            let spin = if latency { Duration::from_micros(inner.cfg.busy_poll_us) } else { Duration::ZERO };
            threads.push(
                std::thread::Builder::new()
                    .name(if i < inner.cfg.channel_workers {
                        format!("nc-chan-{i}")
                    } else {
                        format!("nc-lat-{i}")
                    })
                    .spawn(move || {
                        if latency {
                            crate::placement::pin_or_warn("a latency worker", &h.cfg.latency_worker_cpus);
                            raise_priority(&h.cfg);
                        } else {
                            crate::placement::pin_or_warn("a channel worker", &h.cfg.channel_worker_cpus);
                        }
                        channel::run_worker(h, i, p, spin)
                    })?,
            );
        }
        let h = inner.clone();
        threads.push(std::thread::Builder::new().name("nc-accept".into()).spawn(move || acceptor.run(h))?);
        *inner.threads.lock().unwrap() = threads;
        Ok(Host { guard: Arc::new(Guard { inner }) })
    }

    /// The process-wide host used by [`VStream::connect`](crate::VStream::connect) and [`VListener::bind`](crate::VListener::bind): started
    /// on first use from the TOML file named by `NETCHANNEL_CONFIG`, or with defaults.
    pub fn global() -> io::Result<Host> {
        // A mutex, not a OnceLock: two threads starting it at once would both bind the
        // channel port, and one would fail.
        static GLOBAL: Mutex<Option<Host>> = Mutex::new(None);
        let mut g = GLOBAL.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = g.as_ref() {
            return Ok(h.clone());
        }
        let cfg = match std::env::var_os("NETCHANNEL_CONFIG") {
            Some(p) => Config::load(std::path::Path::new(&p))?,
            None => Config::default(),
        };
        let h = Host::start(cfg)?;
        *g = Some(h.clone());
        Ok(h)
    }

    pub(crate) fn inner(&self) -> &Arc<HostInner> {
        &self.guard.inner
    }

    /// The address channels are accepted on.
    pub fn local_addr(&self) -> SocketAddr {
        self.guard.inner.local
    }

    /// The configuration this host runs with.
    pub fn config(&self) -> &Config {
        &self.guard.inner.cfg
    }

    /// The vsocket ports the host whose channels are accepted at `peer` (its IP and
    /// channel port, as in [`ChannelStats::peer`]) announced it listens on, as this host
    /// knows them now (empty for a host without channels to this one). A hint: a port bound
    /// there a moment ago may be missing, one closed a moment ago may still be here.
    pub fn announced_ports(&self, peer: SocketAddr) -> Vec<u16> {
        let p = self.guard.inner.peers.lock().unwrap().get(&peer).cloned();
        p.map(|p| p.announced.lock().unwrap().listening()).unwrap_or_default()
    }

    /// Counters of every channel.
    pub fn stats(&self) -> HostStats {
        let inner = &self.guard.inner;
        let mut channels = Vec::new();
        let peers: Vec<_> = inner.peers.lock().unwrap().values().cloned().collect();
        for p in peers {
            for c in p.channels().iter() {
                let [control, latency, bulk] = c.depths();
                channels.push(ChannelStats {
                    peer: p.key,
                    class: c.class,
                    index: c.index,
                    worker: c.worker,
                    bytes_sent: c.counters.bytes_sent.load(Ordering::Relaxed),
                    bytes_received: c.counters.bytes_received.load(Ordering::Relaxed),
                    frames_sent: c.counters.frames_sent.load(Ordering::Relaxed),
                    frames_received: c.counters.frames_received.load(Ordering::Relaxed),
                    queued: c.queued.load(Ordering::Relaxed),
                    queue: LaneDepths { control, latency, bulk },
                    kernel_unsent: c.kernel_unsent(),
                    writes: c.counters.writes.load(Ordering::Relaxed),
                    congestion: c.congestion(),
                });
            }
        }
        channels.sort_by_key(|c| (c.peer, c.class, c.index));
        HostStats {
            channels,
            vsockets: inner.vsocks.read().unwrap().len(),
            vsockets_opened: inner.totals.vsockets_opened.load(Ordering::Relaxed),
            channels_refused: inner.totals.channels_refused.load(Ordering::Relaxed),
            bytes_sent: inner.totals.bytes_sent.load(Ordering::Relaxed),
            bytes_received: inner.totals.bytes_received.load(Ordering::Relaxed),
            bad_frames: inner.totals.bad_frames.load(Ordering::Relaxed),
            channels_redialed: inner.totals.channels_redialed.load(Ordering::Relaxed),
            peers_lost: inner.totals.peers_lost.load(Ordering::Relaxed),
            connects_announced: inner.totals.connects_announced.load(Ordering::Relaxed),
        }
    }

    /// A snapshot of every vsocket in the table.
    pub fn vsock_infos(&self) -> Vec<vsocket::VsockInfo> {
        let vs: Vec<_> = self.guard.inner.vsocks.read().unwrap().values().cloned().collect();
        let mut v: Vec<_> = vs.iter().map(|v| v.info()).collect();
        v.sort_by_key(|i| i.id);
        v
    }

    /// Abort one channel to `peer` (its TCP connection is shut down), as a fault would.
    /// Returns whether such a channel existed; when it did, the channel is down when this
    /// returns (its worker has taken it out; re-dialing may already have begun), so stats
    /// read afterwards never count the killed channel.
    pub fn kill_channel(&self, peer: SocketAddr, class: Class, index: u16) -> bool {
        let inner = &self.guard.inner;
        let p = inner.peers.lock().unwrap().get(&peer).cloned();
        let Some(p) = p else { return false };
        let ch = p.channels().into_iter().find(|c| c.class == class && c.index == index);
        let Some(c) = ch else { return false };
        inner.workers[c.worker].command(Command::Close(c.token));
        // The worker closes it on its next turn; a stopped host closes it too.
        let give_up = Instant::now() + Duration::from_secs(2);
        while c.up.load(Ordering::Acquire) && Instant::now() < give_up {
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    /// Stop the host: every vsocket fails with an error, channels close, threads are joined.
    pub fn shutdown(&self) {
        self.guard.inner.shutdown();
    }
}

impl HostInner {
    pub(crate) fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    fn shutdown(&self) {
        if self.closing.swap(true, Ordering::AcqRel) {
            return;
        }
        let _ = self.acceptor_waker.wake();
        for w in &self.workers {
            w.command(Command::Stop);
        }
        let me = std::thread::current().id();
        for t in self.threads.lock().unwrap().drain(..) {
            if t.thread().id() != me {
                let _ = t.join();
            }
        }
        let vsocks: Vec<_> = self.vsocks.write().unwrap().drain().map(|(_, v)| v).collect();
        for v in vsocks {
            v.fail(io::ErrorKind::ConnectionAborted, "the NetChannel host shut down".into());
        }
        for (_, l) in self.listeners.lock().unwrap().drain() {
            l.close();
        }
        for (_, p) in self.peers.lock().unwrap().drain() {
            p.take_channels();
            p.set_state(PeerState::Dead("the NetChannel host shut down".into()));
            p.take_parked();
        }
    }

    /// A fresh vsocket id (never 0).
    pub(crate) fn alloc_id(&self) -> u32 {
        loop {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            if id != 0 && !self.vsocks.read().unwrap().contains_key(&id) {
                return id;
            }
        }
    }

    /// An unused ephemeral vsocket port.
    pub(crate) fn alloc_port(&self) -> io::Result<u16> {
        let listeners = self.listeners.lock().unwrap();
        let mut p = self.ports.lock().unwrap();
        for _ in 0..=(u16::MAX - EPHEMERAL_FIRST) {
            let port = p.0;
            p.0 = if port == u16::MAX { EPHEMERAL_FIRST } else { port + 1 };
            if !p.1.contains(&port) && !listeners.contains_key(&port) {
                p.1.insert(port);
                return Ok(port);
            }
        }
        Err(io::Error::new(io::ErrorKind::AddrInUse, "every ephemeral vsocket port is in use"))
    }

    pub(crate) fn free_port(&self, port: u16) {
        self.ports.lock().unwrap().1.remove(&port);
    }

    /// The vsocket leaves the table and is buried in the same step (under the table's write
    /// lock): a late frame that misses it in the table finds its tomb
    /// ([`HostInner::on_open`] relies on it to see a copy of an OPEN as one).
    pub(crate) fn remove_vsock(&self, id: u32) {
        let Some(vs) = self.vsock(id) else { return };
        let tomb = self.tomb_of(&vs);
        let mut table = self.vsocks.write().unwrap();
        if table.remove(&id).is_some() {
            if let Some(t) = tomb {
                self.tombstones.lock().unwrap().bury(id, t);
            }
        }
    }

    /// The vsockets of `peer` in the table (a snapshot).
    pub(crate) fn peer_vsocks(&self, peer: &Arc<Peer>) -> Vec<Arc<VSock>> {
        self.vsocks.read().unwrap().values().filter(|v| Arc::ptr_eq(&v.peer, peer)).cloned().collect()
    }

    fn vsock(&self, id: u32) -> Option<Arc<VSock>> {
        self.vsocks.read().unwrap().get(&id).cloned()
    }

    /// The peer at `ip`, dialing its channel mesh if there is none yet.
    pub(crate) fn peer_for(self: &Arc<Self>, ip: IpAddr, deadline: Instant) -> io::Result<Arc<Peer>> {
        let key = SocketAddr::new(ip, self.cfg.peer_port());
        let (peer, dial) = {
            let mut peers = self.peers.lock().unwrap();
            match peers.get(&key) {
                Some(p) if !p.is_dead() => (p.clone(), false),
                _ => {
                    let p = Peer::new(key, &self.cfg, PeerState::Dialing);
                    peers.insert(key, p.clone());
                    (p, true)
                }
            }
        };
        if dial {
            peer.recovery.dialer.store(true, Ordering::Release);
            match self.dial_mesh(&peer, deadline) {
                Ok(()) => peer.set_state(PeerState::Up),
                Err(e) => {
                    // A host that answered and refused (authentication, version) is named as
                    // the subject; one that did not answer is "no host".
                    let msg = if e.kind() == io::ErrorKind::PermissionDenied
                        || e.to_string().starts_with("refused the channel")
                    {
                        format!("the NetChannel host at {key} {e}")
                    } else {
                        format!("no NetChannel host answers at {key}: {e}")
                    };
                    peer.set_state(PeerState::Dead(msg.clone()));
                    self.forget_peer(&peer);
                    return Err(io::Error::new(e.kind(), msg));
                }
            }
        }
        let mut st = peer.state.lock().unwrap();
        loop {
            match &*st {
                PeerState::Up => return Ok(peer.clone()),
                PeerState::Dead(m) => {
                    return Err(io::Error::new(io::ErrorKind::ConnectionRefused, m.clone()))
                }
                PeerState::Dialing => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("timed out waiting for the channels to {key}"),
                        ));
                    }
                    st = peer.state_cv.wait_timeout(st, left).unwrap().0;
                }
            }
        }
    }

    fn forget_peer(&self, peer: &Arc<Peer>) {
        let mut peers = self.peers.lock().unwrap();
        if peers.get(&peer.key).is_some_and(|p| Arc::ptr_eq(p, peer)) {
            peers.remove(&peer.key);
        }
    }

    fn dial_mesh(self: &Arc<Self>, peer: &Arc<Peer>, deadline: Instant) -> io::Result<()> {
        let plan: Vec<_> = self.channel_plan().collect();
        for (class, index) in plan {
            let (s, peer_id) = self.dial(peer, class, index, deadline)?;
            if peer_id == self.host_id {
                return Err(io::Error::new(io::ErrorKind::InvalidInput, "that address is this host itself"));
            }
            peer.host_id.store(peer_id, Ordering::Relaxed);
            self.add_channel(peer, s, class, index)?;
        }
        Ok(())
    }

    fn add_channel(
        self: &Arc<Self>,
        peer: &Arc<Peer>,
        s: TcpStream,
        class: Class,
        index: u16,
    ) -> io::Result<()> {
        if self.is_closing() {
            let _ = s.shutdown(std::net::Shutdown::Both);
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the NetChannel host is shutting down",
            ));
        }
        if let Ok(a) = s.local_addr() {
            *peer.local_ip.lock().unwrap() = Some(a.ip());
        }
        set_congestion(&s, &self.cfg.channel_congestion)?;
        if class == Class::Throughput && self.cfg.bulk_sndbuf > 0 {
            // Bound the bulk the kernel holds unsent on this channel (see `bulk_sndbuf`).
            socket2::SockRef::from(&s).set_send_buffer_size(self.cfg.bulk_sndbuf)?;
        }
        s.set_nonblocking(true)?;
        let write_half = s.try_clone()?;
        let ch = Channel::new(self, peer, class, index, s, write_half);
        peer.add_channel(ch.clone());
        self.workers[ch.worker].command(Command::Add(ch.clone()));
        // The listening ports, first on the new channel: what a dead one lost is replaced,
        // and a peer that (re)connects learns them (`engine::announce`).
        let set = self.listen_set_frames();
        if !set.is_empty() {
            ch.push_frames(&set);
        }
        self.on_channel_up(peer);
        Ok(())
    }

    /// Fail every vsocket of `peer` and close its channels.
    fn retire_peer(&self, peer: &Arc<Peer>, why: &str) {
        if peer.is_dead() {
            return;
        }
        self.totals.peers_lost.fetch_add(1, Ordering::Relaxed);
        peer.set_state(PeerState::Dead(why.to_string()));
        self.forget_peer(peer);
        let chans = peer.take_channels();
        for c in chans {
            self.workers[c.worker].command(Command::Close(c.token));
        }
        peer.take_parked();
        for v in self.peer_vsocks(peer) {
            v.fail(io::ErrorKind::ConnectionReset, format!("connection to {} lost: {why}", peer.key));
            self.remove_vsock(v.id);
        }
    }

    /// Handle one frame read from `ch`.
    pub(crate) fn dispatch(
        self: &Arc<Self>,
        ch: &Arc<Channel>,
        frame: Frame<'_>,
    ) -> Result<(), channel::Down> {
        let Some(peer) = ch.peer.upgrade() else { return Err(channel::Down::Orphaned) };
        // A vsocket frame is only taken from a channel of the vsocket's own peer.
        let mine = |id: u32| self.vsock(id).filter(|v| Arc::ptr_eq(&v.peer, &peer));
        match frame {
            Frame::Data { vsock, offset, payload, ack_request } => match mine(vsock) {
                Some(v) => v.on_data(offset, payload, ack_request),
                None => {
                    self.totals.frames_dropped.fetch_add(1, Ordering::Relaxed);
                    self.on_stale_frame(&peer, vsock, Stale::Data(offset + payload.len() as u64));
                }
            },
            Frame::Credit { vsock, received, limit, fin_received } => match mine(vsock) {
                Some(v) => v.on_credit(received, limit, fin_received),
                None => self.on_stale_frame(&peer, vsock, Stale::Credit),
            },
            Frame::Open { .. } => {
                self.on_open(&peer, &frame);
            }
            Frame::OpenOk { vsock, src_vsock, credit } => {
                if let Some(v) = mine(vsock) {
                    v.on_open_ok(src_vsock, credit);
                }
            }
            Frame::Refused { vsock, reason } => {
                if let Some(v) = mine(vsock) {
                    v.on_refused(reason);
                    self.remove_vsock(vsock);
                }
            }
            Frame::Fin { vsock, offset, closed } => match mine(vsock) {
                Some(v) => v.on_fin(offset, closed),
                None => self.on_stale_frame(&peer, vsock, Stale::Fin(offset)),
            },
            Frame::Reset { vsock: 0, reason: Reason::Shutdown, .. } => {
                return Err(channel::Down::PeerShutdown);
            }
            Frame::Reset { vsock: 0, reason, message } => {
                return Err(channel::Down::PeerReset { reason, message: message.to_string() });
            }
            Frame::Reset { vsock, reason, message } => {
                if let Some(v) = mine(vsock) {
                    v.on_reset(reason, message);
                    self.remove_vsock(vsock);
                }
            }
            Frame::Listen { .. } | Frame::Unlisten { .. } | Frame::ListenSet { .. } => {
                self.on_announcement(&peer, &frame);
            }
            Frame::Ping { nonce } => ch.push_frame(&Frame::Pong { nonce }),
            Frame::Pong { .. } => {}
            Frame::Hello(_) | Frame::HelloOk(_) | Frame::Auth { .. } | Frame::AuthOk => {
                self.totals.bad_frames.fetch_add(1, Ordering::Relaxed);
                return Err(channel::Down::Unexpected("handshake frame"));
            }
        }
        Ok(())
    }

    /// An OPEN arrived (`open` is a [`Frame::Open`]).
    fn on_open(self: &Arc<Self>, peer: &Arc<Peer>, open: &Frame<'_>) {
        let &Frame::Open { src_vsock: src, src_port, dst_port, class, credit, payload } = open else {
            return;
        };
        let listener = self.listeners.lock().unwrap().get(&dst_port).cloned();
        let refuse = |reason| {
            peer.send_control(class, src, &Frame::Refused { vsock: src, reason });
        };
        if payload.len() > self.cfg.open_credit {
            // More than this host grants an optimistic OPEN: the opener does not follow
            // the protocol (or its open_credit is larger than ours).
            self.totals.bad_frames.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(peer = %peer.key, port = dst_port, bytes = payload.len(), grant = self.cfg.open_credit, "refused an OPEN carrying more than open_credit");
            return refuse(Reason::Protocol);
        }
        // An OPEN sent again after a channel died (its OPEN_OK may have been lost): answer
        // for the vsocket it opened already. Held until the new vsocket is in the table, so
        // two copies arriving on two channels at once open one vsocket.
        let _one_open = peer.recovery.opening.lock().unwrap();
        let existing = self
            .vsocks
            .read()
            .unwrap()
            .values()
            .find(|v| Arc::ptr_eq(&v.peer, peer) && v.remote_id() == src && v.remote.port() == src_port)
            .cloned();
        if existing.is_none() {
            // A copy of the OPEN of a vsocket that has come and gone already (a short
            // exchange can end before the copy arrives): it opens nothing.
            let gone = self.tombstones.lock().unwrap().answer_open(&peer.tomb_key(), src);
            if let Some(answer) = gone {
                self.totals.frames_dropped.fetch_add(1, Ordering::Relaxed);
                if let Some(a) = answer {
                    peer.send_control(Class::Latency, a.remote, &a.frame);
                }
                return;
            }
        }
        if let Some(v) = existing {
            // One answer: an OPEN_OK still held back is this one.
            let _ = v.take_open_ok();
            let ok = Frame::OpenOk { vsock: src, src_vsock: v.id, credit: self.cfg.recv_buffer as u64 };
            peer.send_control(v.class(), src, &ok);
            if !payload.is_empty() {
                // A copy: discarded by offset unless the first one's bytes were lost.
                v.on_data(0, payload, false);
            }
            return;
        }
        let Some(l) = listener else { return refuse(Reason::NoListener) };
        if l.is_full() {
            return refuse(Reason::BacklogFull);
        }
        let id = self.alloc_id();
        let local_ip = peer.local_ip.lock().unwrap().unwrap_or(self.local.ip());
        let class = if self.cfg.latency_ports.contains(&dst_port) { Class::Latency } else { class };
        let region = self.arrival_regions.get().and_then(|f| f(dst_port));
        let vs = match VSock::new(
            self,
            id,
            peer.clone(),
            class,
            SocketAddr::new(local_ip, dst_port),
            SocketAddr::new(peer.key.ip(), src_port),
            credit,
            region,
        ) {
            Ok(mut v) => {
                // Both hosts key the vsocket's home channel on the connecting end's id.
                Arc::get_mut(&mut v).expect("fresh vsocket").home = src;
                v
            }
            Err(e) => {
                tracing::error!(peer = %peer.key, port = dst_port, error = %e, "cannot create a vsocket");
                return refuse(Reason::BacklogFull);
            }
        };
        vs.set_remote_id(src);
        self.vsocks.write().unwrap().insert(id, vs.clone());
        self.totals.vsockets_opened.fetch_add(1, Ordering::Relaxed);
        if !payload.is_empty() && vs.region().is_none() {
            // An optimistic opener sends on without waiting for the answer: it leaves with
            // this vsocket's first frame (the response, usually) instead of waking the opener
            // on its own. (A daemon-served app's waits are not seen here: answered at once.)
            // Not for long: an app that does not answer soon lets it go alone.
            vs.defer_open_ok();
            let worker = peer.control_channel(class, src).map_or(0, |c| c.worker);
            self.owe_frame(&vs, worker);
        } else {
            peer.send_control(
                class,
                src,
                &Frame::OpenOk { vsock: src, src_vsock: id, credit: self.cfg.recv_buffer as u64 },
            );
        }
        if !payload.is_empty() {
            // An optimistic open's first bytes: readable as soon as it is accepted.
            vs.on_data(0, payload, false);
        }
        if !l.push(vs.clone()) {
            vs.close();
        }
    }
}

/// Give the calling (latency worker) thread the configured nice value and real-time policy.
/// Failures (no privilege) are logged once per process and otherwise ignored: the worker
/// still runs, at normal priority.
fn raise_priority(cfg: &Config) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    let warn = |what: String| {
        if !WARNED.swap(true, Ordering::Relaxed) {
            tracing::warn!(why = %what, "latency workers run at normal priority");
        }
    };
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    if cfg.latency_nice != 0 {
        // SAFETY: setpriority on our own thread id; no memory is passed.
        let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, cfg.latency_nice) };
        if r != 0 {
            warn(format!("cannot set nice {} ({})", cfg.latency_nice, io::Error::last_os_error()));
        }
    }
    if cfg.latency_fifo_priority > 0 {
        let param = libc::sched_param { sched_priority: cfg.latency_fifo_priority as i32 };
        // SAFETY: param is a valid sched_param for the duration of the call.
        let r = unsafe { libc::sched_setscheduler(tid, libc::SCHED_FIFO, &param) };
        if r != 0 {
            warn(format!(
                "cannot use SCHED_FIFO priority {} ({})",
                cfg.latency_fifo_priority,
                io::Error::last_os_error()
            ));
        }
    }
}

/// Give channel socket `s` the congestion control `name` (`channel_congestion`); nothing for
/// an empty name (the system default).
fn set_congestion(s: &TcpStream, name: &str) -> io::Result<()> {
    if name.is_empty() {
        return Ok(());
    }
    socket2::SockRef::from(s).set_tcp_congestion(name.as_bytes()).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "config key `channel_congestion`: cannot give a channel the congestion control {name:?}: {e}"
            ),
        )
    })
}

/// Check at start that this kernel lets channels use `name`, so that a missing algorithm is
/// reported with its key before any channel is set up (and not as a failed connect).
fn check_congestion(name: &str) -> io::Result<()> {
    if name.is_empty() {
        return Ok(());
    }
    let probe = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    probe.set_tcp_congestion(name.as_bytes()).map_err(|e| {
        let read = |f: &str| std::fs::read_to_string(format!("/proc/sys/net/ipv4/{f}")).unwrap_or_default();
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "config key `channel_congestion`: this kernel refuses congestion control {name:?} ({e}); \
                 available: {}; allowed without privilege: {} (load its module, or set another name, \
                 or \"\" for the system default)",
                read("tcp_available_congestion_control").trim(),
                read("tcp_allowed_congestion_control").trim()
            ),
        )
    })
}
