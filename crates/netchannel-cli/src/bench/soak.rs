//! `netchannel bench soak`: a reliability run, not a measurement. Two embedded hosts on
//! loopback (127.0.0.1 and 127.0.0.2) carry many vsockets of mixed sizes and both classes,
//! every byte verified, while channels are killed at random ([`netchannel::Host::kill_channel`],
//! as a fault would). Reports the bytes verified, the errors (must be 0), the channels killed,
//! and resident memory at start and end.
//!
//! * throughput apps: each opens a vsocket, writes a stream of a random size (1 byte to
//!   16 MiB, most small) in random writes and half-closes; the server reads it to EOF checking
//!   every byte, answers with the byte count, and the app checks the answer;
//! * latency apps: each opens a latency-class vsocket and runs a few dozen request/response
//!   round trips of random sizes (1 byte to 16 KiB); the server echoes; every byte checked.
//!
//! Each stream uses the shared byte pattern ([`crate::pattern`]) from its own starting phase,
//! so a segment delivered to the wrong vsocket or offset is caught. Any I/O error or mismatch
//! counts as an error (the first few are reported); a blocked read or write that waits longer
//! than `--stall-timeout` is an error too, so the run cannot hang.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use netchannel::{Class, Config, Host, VStream};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::pattern;
use crate::progress::Bar;

/// Vsocket port of the throughput server.
const BULK_PORT: u16 = 5101;
/// Vsocket port of the latency server.
const LATENCY_PORT: u16 = 5102;
/// Error messages kept for the report.
const KEPT_ERRORS: usize = 10;

/// `netchannel bench soak` flags.
#[derive(Args, Debug)]
pub struct SoakArgs {
    /// Seconds to run (apps start no new vsocket after that and finish their current one)
    #[arg(long, default_value_t = 30.0)]
    pub duration: f64,
    /// Kill one random channel (of either host, either class) every SECS seconds; 0 = never
    #[arg(long, value_name = "SECS", default_value_t = 0.0)]
    pub kill_channel_every: f64,
    /// App threads opening throughput-class vsockets
    #[arg(long, default_value_t = 3)]
    pub throughput_apps: usize,
    /// App threads opening latency-class vsockets
    #[arg(long, default_value_t = 2)]
    pub latency_apps: usize,
    /// Channel port of both hosts (127.0.0.1:PORT and 127.0.0.2:PORT)
    #[arg(long, default_value_t = 9000)]
    pub port: u16,
    /// TOML configuration of both hosts (`listen` is replaced)
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Seed of the random sizes and kills
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// A read or write that waits longer than this many seconds is an error
    #[arg(long, default_value_t = 30.0)]
    pub stall_timeout: f64,
    /// Print exactly one JSON object on stdout
    #[arg(long)]
    pub json: bool,
}

/// The soak's report.
#[derive(Serialize, Debug, Default)]
pub struct SoakReport {
    pub mode: &'static str,
    pub seconds: f64,
    /// Bytes received and checked against the pattern, both directions, both classes.
    pub bytes_verified: u64,
    /// Throughput-class vsockets completed (stream sent, verified and answered).
    pub streams: u64,
    /// Latency-class round trips completed and verified.
    pub round_trips: u64,
    /// Vsockets opened.
    pub vsockets: u64,
    pub errors: u64,
    /// The first errors, in words.
    pub error_messages: Vec<String>,
    /// Channels killed (each kill that found its channel).
    pub channel_kills: u64,
    /// Lost channels dialed again, both hosts.
    pub channels_redialed: u64,
    /// Peers given up, both hosts (a soak with kills of single channels expects 0).
    pub peers_lost: u64,
    /// Channels each host had at the end (after waiting briefly for re-dials).
    pub channels_end: [usize; 2],
    /// Vsockets still in each host's table at the end (after waiting briefly for the last
    /// ones to finish closing); anything but 0 is a leak.
    pub vsockets_end: [usize; 2],
    pub rss_start_kib: u64,
    pub rss_end_kib: u64,
    pub rss_max_kib: u64,
    pub throughput_apps: usize,
    pub latency_apps: usize,
    pub kill_channel_every: f64,
}

/// A small deterministic random source (xorshift64*), one per thread.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
    /// A stream size: mostly small, sometimes large.
    fn stream_size(&mut self) -> u64 {
        match self.next() % 10 {
            0..=3 => self.range(1, 4 << 10),
            4..=6 => self.range(4 << 10, 256 << 10),
            7..=8 => self.range(256 << 10, 4 << 20),
            _ => self.range(4 << 20, 16 << 20),
        }
    }
}

/// What every thread of the run shares.
struct Shared {
    stop: AtomicBool,
    bytes_verified: AtomicU64,
    streams: AtomicU64,
    round_trips: AtomicU64,
    vsockets: AtomicU64,
    errors: AtomicU64,
    messages: Mutex<Vec<String>>,
    stall: Duration,
}

impl Shared {
    fn error(&self, what: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        eprintln!("netchannel: soak: {what}");
        let mut m = self.messages.lock().unwrap();
        if m.len() < KEPT_ERRORS {
            m.push(what);
        }
    }
}

/// Resident memory of this process, KiB (VmRSS of /proc/self/status).
fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The pattern phase a stream starts at, distinct per stream.
fn phase_of(stream: u64) -> u64 {
    stream.wrapping_mul(7_919)
}

fn timeouts(s: &VStream, stall: Duration) -> std::io::Result<()> {
    s.set_read_timeout(Some(stall))?;
    s.set_write_timeout(Some(stall))
}

/// Read exactly `buf.len()` bytes, or say why not.
fn read_full(s: &VStream, buf: &mut [u8]) -> std::result::Result<(), String> {
    (&*s).read_exact(buf).map_err(|e| format!("read: {e}"))
}

/// One throughput-class stream from the client side; returns the bytes verified.
fn bulk_client(
    host: &Host,
    dst: SocketAddr,
    id: u64,
    rng: &mut Rng,
    sh: &Shared,
) -> std::result::Result<u64, String> {
    let size = rng.stream_size();
    let s = host.connect(dst).map_err(|e| format!("connect to {dst}: {e}"))?;
    sh.vsockets.fetch_add(1, Ordering::Relaxed);
    timeouts(&s, sh.stall).map_err(|e| e.to_string())?;
    let base = phase_of(id);
    // Header: stream id and size, then the stream.
    let mut head = [0u8; 16];
    head[..8].copy_from_slice(&id.to_be_bytes());
    head[8..].copy_from_slice(&size.to_be_bytes());
    (&s).write_all(&head).map_err(|e| format!("write: {e}"))?;
    let src = pattern::Source::new(1 << 20);
    let mut off = 0u64;
    while off < size {
        let n = rng.range(1, 1 << 20).min(size - off) as usize;
        (&s).write_all(src.slice(base + off, n)).map_err(|e| format!("write at {off} of {size}: {e}"))?;
        off += n as u64;
    }
    s.shutdown(Shutdown::Write).map_err(|e| format!("shutdown: {e}"))?;
    let mut answer = [0u8; 8];
    read_full(&s, &mut answer)?;
    let got = u64::from_be_bytes(answer);
    if got != size {
        return Err(format!("stream {id}: server verified {got} bytes of {size}"));
    }
    let mut end = [0u8; 1];
    match (&s).read(&mut end) {
        Ok(0) => Ok(size),
        Ok(_) => Err(format!("stream {id}: bytes after the answer")),
        Err(e) => Err(format!("stream {id}: reading EOF: {e}")),
    }
}

/// Server side of a throughput stream: read and verify to EOF, answer the count.
fn bulk_server(s: VStream, sh: &Shared) -> std::result::Result<u64, String> {
    timeouts(&s, sh.stall).map_err(|e| e.to_string())?;
    let mut head = [0u8; 16];
    read_full(&s, &mut head)?;
    let id = u64::from_be_bytes(head[..8].try_into().unwrap());
    let size = u64::from_be_bytes(head[8..].try_into().unwrap());
    let base = phase_of(id);
    let mut buf = vec![0u8; 256 << 10];
    let mut off = 0u64;
    loop {
        let n = (&s).read(&mut buf).map_err(|e| format!("stream {id}: read at {off} of {size}: {e}"))?;
        if n == 0 {
            break;
        }
        pattern::check(base + off, &buf[..n]).map_err(|m| format!("stream {id}: {m}"))?;
        off += n as u64;
    }
    if off != size {
        return Err(format!("stream {id}: EOF after {off} of {size} bytes"));
    }
    (&s).write_all(&off.to_be_bytes()).map_err(|e| format!("stream {id}: answer: {e}"))?;
    s.shutdown(Shutdown::Write).map_err(|e| format!("stream {id}: shutdown: {e}"))?;
    Ok(off)
}

/// One latency-class vsocket: a few dozen verified round trips; returns the bytes verified.
fn latency_client(
    host: &Host,
    dst: SocketAddr,
    id: u64,
    rng: &mut Rng,
    sh: &Shared,
) -> std::result::Result<u64, String> {
    let s = host.connect_class(dst, Class::Latency).map_err(|e| format!("connect to {dst}: {e}"))?;
    sh.vsockets.fetch_add(1, Ordering::Relaxed);
    timeouts(&s, sh.stall).map_err(|e| e.to_string())?;
    let src = pattern::Source::new(16 << 10);
    let mut back = vec![0u8; 16 << 10];
    let mut off = phase_of(id);
    let mut verified = 0;
    for _ in 0..rng.range(8, 64) {
        let n = rng.range(1, 16 << 10) as usize;
        (&s).write_all(src.slice(off, n)).map_err(|e| format!("latency {id}: write: {e}"))?;
        read_full(&s, &mut back[..n])?;
        pattern::check(off, &back[..n]).map_err(|m| format!("latency {id}: echo {m}"))?;
        off += n as u64;
        verified += 2 * n as u64;
        sh.round_trips.fetch_add(1, Ordering::Relaxed);
    }
    s.shutdown(Shutdown::Write).map_err(|e| format!("latency {id}: shutdown: {e}"))?;
    match (&s).read(&mut back[..1]) {
        Ok(0) => Ok(verified),
        Ok(_) => Err(format!("latency {id}: bytes after the last echo")),
        Err(e) => Err(format!("latency {id}: reading EOF: {e}")),
    }
}

/// Server side of a latency vsocket: echo until EOF.
fn echo_server(s: VStream, sh: &Shared) -> std::result::Result<u64, String> {
    timeouts(&s, sh.stall).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = (&s).read(&mut buf).map_err(|e| format!("echo: read: {e}"))?;
        if n == 0 {
            s.shutdown(Shutdown::Write).map_err(|e| format!("echo: shutdown: {e}"))?;
            return Ok(0);
        }
        (&s).write_all(&buf[..n]).map_err(|e| format!("echo: write: {e}"))?;
    }
}

/// Run the soak.
pub fn run(args: &SoakArgs) -> Result<()> {
    let valid = |v: f64, zero_ok: bool| v.is_finite() && (v > 0.0 || (zero_ok && v == 0.0));
    let ok = valid(args.duration, false)
        && valid(args.stall_timeout, false)
        && valid(args.kill_channel_every, true);
    if !ok {
        return Err("--duration and --stall-timeout must be positive, --kill-channel-every 0 or more".into());
    }
    let base = match &args.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    let addr = |last: u8| SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)), args.port);
    let start_host = |listen: SocketAddr| {
        Host::start(Config { listen, ..base.clone() })
            .map_err(|e| Error::from(format!("cannot start the host on {listen}: {e}")))
    };
    let (a, b) = (start_host(addr(1))?, start_host(addr(2))?);
    let bulk_l = b.bind(BULK_PORT).map_err(|e| Error::from(format!("bind {BULK_PORT}: {e}")))?;
    let lat_l = b.bind(LATENCY_PORT).map_err(|e| Error::from(format!("bind {LATENCY_PORT}: {e}")))?;
    let sh = Arc::new(Shared {
        stop: AtomicBool::new(false),
        bytes_verified: AtomicU64::new(0),
        streams: AtomicU64::new(0),
        round_trips: AtomicU64::new(0),
        vsockets: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        messages: Mutex::new(Vec::new()),
        stall: Duration::from_secs_f64(args.stall_timeout),
    });
    let rss_start = rss_kib();
    let rss_max = Arc::new(AtomicU64::new(rss_start));
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.duration);

    // Servers: one accept loop per port, one thread per vsocket.
    let mut servers = Vec::new();
    for (l, bulk) in [(bulk_l, true), (lat_l, false)] {
        let sh = sh.clone();
        l.set_nonblocking(true).map_err(|e| Error::from(e.to_string()))?;
        servers.push(std::thread::spawn(move || {
            let mut conns = Vec::new();
            while !sh.stop.load(Ordering::Acquire) {
                match l.accept() {
                    Ok((s, _)) => {
                        let sh = sh.clone();
                        conns.push(std::thread::spawn(move || {
                            let r = if bulk { bulk_server(s, &sh) } else { echo_server(s, &sh) };
                            match r {
                                Ok(n) => {
                                    sh.bytes_verified.fetch_add(n, Ordering::Relaxed);
                                }
                                Err(e) => sh.error(format!("server: {e}")),
                            }
                        }));
                        conns.retain(|c| !c.is_finished());
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => {
                        sh.error(format!("accept: {e}"));
                        break;
                    }
                }
            }
            for c in conns {
                let _ = c.join();
            }
        }));
    }

    // Apps.
    let mut apps = Vec::new();
    let next_id = Arc::new(AtomicU64::new(1));
    for i in 0..args.throughput_apps + args.latency_apps {
        let bulk = i < args.throughput_apps;
        let (a, sh, next_id) = (a.clone(), sh.clone(), next_id.clone());
        let dst = SocketAddr::new(addr(2).ip(), if bulk { BULK_PORT } else { LATENCY_PORT });
        let mut rng = Rng::new(args.seed ^ ((i as u64 + 1) << 32));
        apps.push(std::thread::spawn(move || {
            while Instant::now() < deadline {
                let id = next_id.fetch_add(1, Ordering::Relaxed);
                let r = if bulk {
                    bulk_client(&a, dst, id, &mut rng, &sh)
                } else {
                    latency_client(&a, dst, id, &mut rng, &sh)
                };
                match r {
                    Ok(n) => {
                        sh.bytes_verified.fetch_add(n, Ordering::Relaxed);
                        if bulk {
                            sh.streams.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(e) => sh.error(format!("client: {e}")),
                }
            }
        }));
    }

    // The fault injector, which also samples memory.
    let kills = Arc::new(AtomicU64::new(0));
    let killer = {
        let (a, b, sh, kills, rss_max) = (a.clone(), b.clone(), sh.clone(), kills.clone(), rss_max.clone());
        let every = (args.kill_channel_every > 0.0).then(|| Duration::from_secs_f64(args.kill_channel_every));
        let mut rng = Rng::new(args.seed.wrapping_add(0x5eed));
        std::thread::spawn(move || {
            let mut next_kill = every.map(|e| Instant::now() + e);
            while !sh.stop.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(20));
                rss_max.fetch_max(rss_kib(), Ordering::Relaxed);
                let Some(t) = next_kill else { continue };
                if Instant::now() < t {
                    continue;
                }
                next_kill = every.map(|e| t + e);
                let host = if rng.next() & 1 == 0 { &a } else { &b };
                let chans = host.stats().channels;
                if chans.is_empty() {
                    continue;
                }
                let c = &chans[(rng.next() % chans.len() as u64) as usize];
                if host.kill_channel(c.peer, c.class, c.index) {
                    kills.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };

    // Progress, then wait for the apps (they finish their current vsocket after the deadline).
    let bar = if args.json { Bar::hidden() } else { Bar::timed("soak", deadline - started) };
    while Instant::now() < deadline {
        std::thread::sleep(
            Duration::from_millis(200).min(deadline.saturating_duration_since(Instant::now())),
        );
        bar.set_position(started.elapsed().as_millis() as u64);
        bar.set_message(format!(
            "{:5.1} s  {} MiB verified  {} kills  {} errors",
            started.elapsed().as_secs_f64(),
            sh.bytes_verified.load(Ordering::Relaxed) >> 20,
            kills.load(Ordering::Relaxed),
            sh.errors.load(Ordering::Relaxed)
        ));
    }
    drop(bar); // cleared
    for a in apps {
        let _ = a.join();
    }
    let seconds = started.elapsed().as_secs_f64();
    sh.stop.store(true, Ordering::Release);
    let _ = killer.join();
    for s in servers {
        let _ = s.join();
    }
    // Let the last killed channel come back before counting.
    let want = base.throughput_channels + base.latency_channels;
    let settle = Instant::now() + Duration::from_secs(5);
    while Instant::now() < settle
        && [&a, &b].iter().any(|h| {
            let st = h.stats();
            st.channels.len() < want || st.vsockets > 0
        })
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let (sa, sb) = (a.stats(), b.stats());
    let rss_end = rss_kib();
    let report = SoakReport {
        mode: "soak",
        seconds,
        bytes_verified: sh.bytes_verified.load(Ordering::Relaxed),
        streams: sh.streams.load(Ordering::Relaxed),
        round_trips: sh.round_trips.load(Ordering::Relaxed),
        vsockets: sh.vsockets.load(Ordering::Relaxed),
        errors: sh.errors.load(Ordering::Relaxed),
        error_messages: sh.messages.lock().unwrap().clone(),
        channel_kills: kills.load(Ordering::Relaxed),
        channels_redialed: sa.channels_redialed + sb.channels_redialed,
        peers_lost: sa.peers_lost + sb.peers_lost,
        channels_end: [sa.channels.len(), sb.channels.len()],
        vsockets_end: [sa.vsockets, sb.vsockets],
        rss_start_kib: rss_start,
        rss_end_kib: rss_end,
        rss_max_kib: rss_max.load(Ordering::Relaxed).max(rss_end),
        throughput_apps: args.throughput_apps,
        latency_apps: args.latency_apps,
        kill_channel_every: args.kill_channel_every,
    };
    a.shutdown();
    b.shutdown();
    if args.json {
        println!("{}", serde_json::to_string(&report).map_err(|e| Error::from(e.to_string()))?);
    } else {
        println!(
            "soak: {:.1} s, {} MiB verified in {} streams and {} round trips, {} channel kills \
             ({} re-dialed), {} errors, RSS {} -> {} KiB (max {})",
            report.seconds,
            report.bytes_verified >> 20,
            report.streams,
            report.round_trips,
            report.channel_kills,
            report.channels_redialed,
            report.errors,
            report.rss_start_kib,
            report.rss_end_kib,
            report.rss_max_kib
        );
    }
    if report.errors > 0 {
        return Err(format!(
            "soak failed: {} errors; first: {}",
            report.errors,
            report.error_messages.first().map_or("?", String::as_str)
        )
        .into());
    }
    Ok(())
}
