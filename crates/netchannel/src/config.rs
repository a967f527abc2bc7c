//! Configuration: one TOML file for the whole engine, every key with a default and a unit.
//!
//! The reference table lives in `docs/config.md`; keep it in step with [`Config`]. Sizes
//! accept an integer (bytes) or a string with a unit (`"64KiB"`, `"4MiB"`, `"1GiB"`, `"512"`).
//! Every value is checked by [`Config::validate`], and an invalid one is reported with the
//! name of its key.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How the NetDriver picks a channel for each segment of a vsocket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    /// Spread consecutive segments over every channel of the class (default).
    #[default]
    RoundRobin,
    /// Pin each vsocket to one channel chosen by hashing its id.
    Hash,
}

impl Policy {
    /// The name used in config files and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Policy::RoundRobin => "round-robin",
            Policy::Hash => "hash",
        }
    }
}

impl std::str::FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "round-robin" | "rr" => Ok(Policy::RoundRobin),
            "hash" => Ok(Policy::Hash),
            other => Err(format!("unknown policy {other:?} (expected \"round-robin\" or \"hash\")")),
        }
    }
}

/// Where the engine that serves an application's vsockets runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Deployment {
    /// In the application's own process (a `Host` started on first use).
    #[default]
    Embedded,
    /// In the host's daemon (`netchannel up`), reached over its Unix socket.
    Daemon,
}

/// The `[daemon]` table: the per-host daemon and how apps reach it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DaemonConfig {
    /// `socket`: the Unix socket apps reach the daemon on. Default `/run/netchannel/netchannel.sock`
    /// for root, `$XDG_RUNTIME_DIR/netchannel/netchannel.sock` otherwise; the environment
    /// variable `NETCHANNEL_SOCKET` overrides both.
    #[serde(deserialize_with = "de::socket", skip_serializing_if = "Option::is_none")]
    pub socket: Option<std::path::PathBuf>,
    /// `allowed_uids`: user ids (besides the daemon's own and root) whose processes may use
    /// the daemon. Default none.
    #[serde(deserialize_with = "de::ids")]
    pub allowed_uids: Vec<u32>,
    /// `allowed_gids`: group ids whose processes may use the daemon. Default none.
    #[serde(deserialize_with = "de::ids")]
    pub allowed_gids: Vec<u32>,
    /// `poll_spin_us`: how long the daemon's doorbell poller keeps polling busy vsockets
    /// before it sleeps (apps then ring its eventfd). `None` (the default): 50 µs on machines
    /// with more than [`SPIN_MIN_CPUS`] CPUs, else 0 — a spinning thread takes a core from
    /// everyone else.
    #[serde(deserialize_with = "de::micros", skip_serializing_if = "Option::is_none")]
    pub poll_spin_us: Option<u64>,
    /// `app_spin_us`: how long an app thread polls its vsocket before it sleeps on the futex.
    /// `None` (the default): 20 µs with more than [`SPIN_MIN_CPUS`] CPUs, else 0.
    #[serde(deserialize_with = "de::micros", skip_serializing_if = "Option::is_none")]
    pub app_spin_us: Option<u64>,
    /// `reply_spin_us`: how long a daemon channel worker that just woke a preload-shim app
    /// (a readiness token) watches that vsocket for the app's answer before it lets the app
    /// ring the poller again; an answer seen is sent from the worker, sparing a doorbell and
    /// a poller wake-up per request. Default 0 (off): on a 2-core machine it cut sockperf
    /// ping-pong p50 by ~30 % when quiet, and did not help under load.
    #[serde(deserialize_with = "de::micros_u64")]
    pub reply_spin_us: u64,
    /// `max_connections`: control connections the daemon serves at once, all processes
    /// together (each holds a daemon thread). Default 1024.
    #[serde(deserialize_with = "de::count")]
    pub max_connections: usize,
    /// `max_connections_per_process`: control connections one process may hold (an app holds
    /// one per concurrent blocking call, plus its lifeline). Default 256.
    #[serde(deserialize_with = "de::count")]
    pub max_connections_per_process: usize,
    /// `max_vsockets_per_process`: vsockets one process may hold open through the daemon
    /// (connected or accepted). Default 4096.
    #[serde(deserialize_with = "de::count")]
    pub max_vsockets_per_process: usize,
    /// `max_buffer_per_process`: ring memory the vsockets of one process may pin, bytes
    /// (each vsocket counts its whole shared region: `send_buffer` + `recv_buffer` + a 4 KiB
    /// header). `None` (the default): a quarter of the host's physical memory.
    #[serde(deserialize_with = "de::opt_size", skip_serializing_if = "Option::is_none")]
    pub max_buffer_per_process: Option<usize>,
    /// `max_buffer`: ring memory all vsockets served by the daemon may pin, bytes. `None`
    /// (the default): half of the host's physical memory.
    #[serde(deserialize_with = "de::opt_size", skip_serializing_if = "Option::is_none")]
    pub max_buffer: Option<usize>,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            socket: None,
            allowed_uids: Vec::new(),
            allowed_gids: Vec::new(),
            poll_spin_us: None,
            app_spin_us: None,
            reply_spin_us: 0,
            max_connections: 1024,
            max_connections_per_process: 256,
            max_vsockets_per_process: 4096,
            max_buffer_per_process: None,
            max_buffer: None,
        }
    }
}

/// The host's physical memory, bytes (0 if unknown). Asked once: the daemon's caps are
/// checked for every vsocket, and each ask is a `sysinfo` system call.
fn physical_memory() -> u64 {
    static MEMORY: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *MEMORY.get_or_init(|| {
        // SAFETY: sysconf has no memory arguments.
        let (pages, size) =
            unsafe { (libc::sysconf(libc::_SC_PHYS_PAGES), libc::sysconf(libc::_SC_PAGESIZE)) };
        (pages.max(0) as u64).saturating_mul(size.max(0) as u64)
    })
}

/// Fewer CPUs than this and spinning costs more than the wake-up it saves (measured on 2
/// cores: daemon ping-pong p50 65 µs without spinning, 82–124 µs with 50/20 µs spins).
pub const SPIN_MIN_CPUS: usize = 5;

fn auto_spin(v: Option<u64>, many_cores: u64) -> std::time::Duration {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    Duration::from_micros(v.unwrap_or(if cpus >= SPIN_MIN_CPUS { many_cores } else { 0 }))
}

impl DaemonConfig {
    /// The poller's spin (`poll_spin_us`, or its default for this machine).
    pub fn poll_spin(&self) -> Duration {
        auto_spin(self.poll_spin_us, 50)
    }

    /// An app thread's spin (`app_spin_us`, or its default for this machine).
    pub fn app_spin(&self) -> Duration {
        auto_spin(self.app_spin_us, 20)
    }

    /// A channel worker's watch for a shim app's answer (`reply_spin_us`, default 0).
    pub fn reply_spin(&self) -> Duration {
        Duration::from_micros(self.reply_spin_us)
    }

    /// The ring memory one process's vsockets may pin (`max_buffer_per_process`, or a
    /// quarter of physical memory).
    pub fn max_buffer_per_process(&self) -> u64 {
        self.max_buffer_per_process.map_or(physical_memory() / 4, |b| b as u64)
    }

    /// The ring memory all served vsockets may pin (`max_buffer`, or half of physical memory).
    pub fn max_buffer(&self) -> u64 {
        self.max_buffer.map_or(physical_memory() / 2, |b| b as u64)
    }

    /// The socket path: `NETCHANNEL_SOCKET`, else `socket`, else the default for this user.
    pub fn socket_path(&self) -> std::io::Result<std::path::PathBuf> {
        if let Some(p) = std::env::var_os("NETCHANNEL_SOCKET") {
            return Ok(p.into());
        }
        if let Some(p) = &self.socket {
            return Ok(p.clone());
        }
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            return Ok("/run/netchannel/netchannel.sock".into());
        }
        match std::env::var_os("XDG_RUNTIME_DIR") {
            Some(d) => Ok(std::path::Path::new(&d).join("netchannel/netchannel.sock")),
            None => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "no daemon socket: set `socket` in the [daemon] table of the config, or NETCHANNEL_SOCKET \
                 (XDG_RUNTIME_DIR is not set)",
            )),
        }
    }
}

/// Engine configuration. See `docs/config.md` for the reference (a test checks that it
/// documents every key, no other, and the defaults of [`Config::default`]).
///
/// Each key is defined once, here: its field (named as the key, with a `serde` attribute
/// where the TOML form differs: sizes, `…_ms` durations, ranges with their own message) and
/// its default in [`Config::default`]. Parsing, `to_toml`, flag overrides and the docs test
/// derive from it. A new key: a field (with its `serde` helper if it needs one), its
/// default, a row in docs/config.md.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `listen`: address this host accepts channels on. Default `0.0.0.0:9000`.
    #[serde(deserialize_with = "de::addr")]
    pub listen: SocketAddr,
    /// `peer_port`: TCP port dialed on peer hosts. Default: the port of `listen`.
    #[serde(deserialize_with = "de::port", skip_serializing_if = "Option::is_none")]
    pub peer_port: Option<u16>,
    /// `throughput_channels`: throughput-class channels per peer. Default 4.
    #[serde(deserialize_with = "de::count")]
    pub throughput_channels: usize,
    /// `latency_channels`: latency-class channels per peer. Default 1.
    #[serde(deserialize_with = "de::count")]
    pub latency_channels: usize,
    /// `channel_workers`: threads serving throughput channels. Default 2.
    #[serde(deserialize_with = "de::count")]
    pub channel_workers: usize,
    /// `latency_workers`: threads serving only latency channels, so latency frames never wait
    /// behind bulk in a worker; 0 = latency channels share the channel workers. Default 1.
    #[serde(deserialize_with = "de::count")]
    pub latency_workers: usize,
    /// `latency_ports`: vsocket ports whose vsockets (connected to or accepted on them) are in
    /// the latency class. Default none.
    #[serde(deserialize_with = "de::ports")]
    pub latency_ports: Vec<u16>,
    /// `latency_nice`: nice value of the latency workers (-20..=19; below 0 needs privilege,
    /// refused with a warning otherwise). Default -10.
    #[serde(deserialize_with = "de::nice")]
    pub latency_nice: i32,
    /// `latency_fifo_priority`: run the latency workers under SCHED_FIFO at this priority
    /// (1..=99) when permitted; 0 = no real-time policy. Default 0.
    #[serde(deserialize_with = "de::non_negative")]
    pub latency_fifo_priority: u32,
    /// `busy_poll_us`: how long a latency worker polls its channels without sleeping before it
    /// blocks; 0 = never spin (right for machines with few cores). Default 0 µs.
    #[serde(deserialize_with = "de::non_negative")]
    pub busy_poll_us: u64,
    /// `latency_spin_us`: how long an app thread reading a latency-class vsocket polls for
    /// data before it sleeps, sparing the wake-up when the answer comes soon. Default 0 µs.
    #[serde(deserialize_with = "de::non_negative")]
    pub latency_spin_us: u64,
    /// `inline_spin_us`: how long an app thread reading its vsocket's home channel itself
    /// (`inline_read`) polls the channel without sleeping before it blocks in poll(2), so
    /// that an answer arriving within that time costs no wake-up. Skipped on a machine with
    /// one CPU, and while the host carries bulk (throughput-class bytes past a vsocket's first
    /// 16 KiB within the last 10 ms), so it never takes a core from bulk transfers.
    /// Default 30 µs; 0 = never spin.
    #[serde(deserialize_with = "de::non_negative")]
    pub inline_spin_us: u64,
    /// `splice_send`: throughput channels hand payloads of 64 KiB and more to the kernel by
    /// `vmsplice` + `splice` through a pipe (the socket references the send ring's pages)
    /// instead of `writev`, which copies them. Default false.
    pub splice_send: bool,
    /// `inline_read`: an app thread about to sleep until its vsocket has something new (a
    /// latency-class vsocket, or a connect or a vsocket within its first 16 KiB) reads the
    /// vsocket's home channel itself when no worker is reading it, so the arrival wakes it
    /// alone. Default true.
    pub inline_read: bool,
    /// `announce_listeners`: tell every peer host which vsocket ports listen here (and what
    /// an OPEN to them may carry), so that a confirmed connect to an announced port returns
    /// without waiting for the answer (`engine::announce`). Default true; false = no
    /// announcements: the peers' connects to this host wait a round trip each.
    pub announce_listeners: bool,
    /// `optimistic_open`: `Host::connect` (and `VStream::connect` on an embedded host) opens
    /// optimistically, as `Host::connect_optimistic` does. Default false: confirmed.
    pub optimistic_open: bool,
    /// `open_credit`: the stream bytes an optimistic OPEN may carry: what this host sends
    /// with one, and the most it accepts in one as a listener. Default 16 KiB.
    #[serde(with = "de::size")]
    pub open_credit: usize,
    /// `auth_key_file`: file holding the pre-shared key that authenticates channels (both
    /// hosts need the same key; at least 16 bytes; one trailing newline is ignored). Default
    /// none: channels are not authenticated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth_key_file: Option<std::path::PathBuf>,
    /// `copy_workers`: threads helping app threads copy large reads/writes; 0 = the app thread copies alone. Default 1.
    #[serde(deserialize_with = "de::count")]
    pub copy_workers: usize,
    /// `copy_threshold`: bytes from which one read/write is split among copy workers. Default 256 KiB.
    #[serde(with = "de::size")]
    pub copy_threshold: usize,
    /// `segment_size`: largest DATA segment, bytes. Default 256 KiB.
    #[serde(with = "de::size")]
    pub segment_size: usize,
    /// `send_buffer`: per-vsocket send buffer, bytes. Default 4 MiB.
    #[serde(with = "de::size")]
    pub send_buffer: usize,
    /// `recv_buffer`: per-vsocket receive buffer (= credit window), bytes. Default 4 MiB.
    #[serde(with = "de::size")]
    pub recv_buffer: usize,
    /// `channel_queue`: unsent bytes the NetDriver queues on one channel before choosing another. Default 512 KiB.
    #[serde(with = "de::size")]
    pub channel_queue: usize,
    /// `bulk_sndbuf`: `SO_SNDBUF` of throughput-class channels, bytes: caps the bulk the kernel
    /// holds unsent in each bulk channel (the kernel doubles the value for its bookkeeping);
    /// 0 = the kernel's default and autotuning. Default 0.
    #[serde(with = "de::size")]
    pub bulk_sndbuf: usize,
    /// `channel_congestion`: the TCP congestion control of every channel (`TCP_CONGESTION`,
    /// set on both the dialing and the accepting end), e.g. `"cubic"`, `"bbr"`, `"reno"`;
    /// empty = the system default (`net.ipv4.tcp_congestion_control`). Default `"cubic"`: BBR's
    /// pacing arms a timer per burst, which costs a VM exit each on virtual machines.
    pub channel_congestion: String,
    /// `channel_worker_cpus`: CPUs the channel workers may run on (`sched_setaffinity`);
    /// empty = wherever the scheduler puts them. Default empty.
    #[serde(deserialize_with = "de::cpus")]
    pub channel_worker_cpus: Vec<usize>,
    /// `latency_worker_cpus`: CPUs the latency workers may run on; empty = anywhere. Default empty.
    #[serde(deserialize_with = "de::cpus")]
    pub latency_worker_cpus: Vec<usize>,
    /// `copy_worker_cpus`: CPUs the copy workers may run on; empty = anywhere. Default empty.
    #[serde(deserialize_with = "de::cpus")]
    pub copy_worker_cpus: Vec<usize>,
    /// `write_batch`: most bytes one channel write (`writev`) gathers; a frame queued behind
    /// a batch in progress waits for at most this much. Default 256 KiB.
    #[serde(with = "de::size")]
    pub write_batch: usize,
    /// `write_batch_frames`: most frames one channel write gathers. Default 256.
    #[serde(deserialize_with = "de::count")]
    pub write_batch_frames: usize,
    /// `policy`: `"round-robin"` or `"hash"`. Default round-robin.
    pub policy: Policy,
    /// `connect_timeout_ms`: how long a vsocket connect (including channel setup) may take. Default 3000 ms.
    #[serde(rename = "connect_timeout_ms", with = "de::millis")]
    pub connect_timeout: Duration,
    /// `accept_backlog`: pending vsockets a listener holds before refusing. Default 1024.
    #[serde(deserialize_with = "de::count")]
    pub accept_backlog: usize,
    /// `deployment`: `"embedded"` (the engine runs in each app process) or `"daemon"` (apps
    /// use the host's daemon). Chooses what `VStream::connect`/`VListener::bind` use. Default embedded.
    pub deployment: Deployment,
    /// The `[daemon]` table.
    pub daemon: DaemonConfig,
    /// `peer_down_timeout_ms`: how long every channel to a peer may stay down before its
    /// vsockets fail (ConnectionReset naming the peer); meanwhile channels are dialed again
    /// and vsockets wait. Default 5000 ms.
    #[serde(rename = "peer_down_timeout_ms", with = "de::millis")]
    pub peer_down_timeout: Duration,
    /// `reconnect_backoff_ms`: first pause before dialing a lost channel again; it doubles
    /// after each failed attempt up to `reconnect_backoff_max_ms`. Default 50 ms.
    #[serde(rename = "reconnect_backoff_ms", with = "de::millis")]
    pub reconnect_backoff: Duration,
    /// `reconnect_backoff_max_ms`: longest pause between attempts to dial a lost channel.
    /// Default 1000 ms.
    #[serde(rename = "reconnect_backoff_max_ms", with = "de::millis")]
    pub reconnect_backoff_max: Duration,
    /// The `[preload]` table: what `netchannel run` (the preload shim) moves onto vsockets.
    pub preload: PreloadConfig,
}

/// The `[preload]` table: which TCP sockets of a program run under `netchannel run` become
/// vsockets.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PreloadConfig {
    /// `hosts`: peer IPs whose connections become vsockets. Default empty: every connection
    /// is offered to the daemon first and stays on kernel TCP where no NetChannel host answers.
    #[serde(deserialize_with = "de::ips")]
    pub hosts: Vec<std::net::IpAddr>,
    /// `ports`: listening ports also served as vsocket ports. Default empty: every port.
    #[serde(deserialize_with = "de::listen_ports")]
    pub ports: Vec<u16>,
    /// `require_daemon`: without a reachable daemon, `netchannel run` fails instead of running
    /// the program on plain TCP. Default false.
    pub require_daemon: bool,
    /// `library`: the preload library. Default: `libnetchannel_preload.so` next to the
    /// `netchannel` binary.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub library: Option<std::path::PathBuf>,
    /// `datapath`: `"shm"` (the fd is a readiness proxy and data moves straight between the
    /// program's buffers and the shared rings) or `"relay"` (the program's fd is a loopback
    /// TCP socket relayed to the vsocket by two threads: the per-program fallback). Default
    /// `"shm"`.
    pub datapath: PreloadDatapath,
    /// `eager_doorbells`: kick the daemon on every write that needs it, instead of once at
    /// the end of an event-loop pass (after a `epoll_wait`/`poll`/`select` that returned
    /// several ready descriptors; see `netchannel::daemon::proxy`). Default false.
    pub eager_doorbells: bool,
}

/// `[preload] datapath`: how a program's vsocket descriptors move their bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PreloadDatapath {
    /// A loopback TCP socket per vsocket, relayed by two threads (the fallback).
    Relay,
    /// A readiness proxy per vsocket; hooked data calls use the shared rings.
    #[default]
    Shm,
}

impl PreloadDatapath {
    /// The name in the configuration: `"relay"` or `"shm"`.
    pub fn name(self) -> &'static str {
        match self {
            PreloadDatapath::Relay => "relay",
            PreloadDatapath::Shm => "shm",
        }
    }
}

impl Serialize for PreloadDatapath {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for PreloadDatapath {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match String::deserialize(d)?.as_str() {
            "relay" => Ok(PreloadDatapath::Relay),
            "shm" => Ok(PreloadDatapath::Shm),
            other => Err(serde::de::Error::custom(format!("{other:?} is not \"relay\" or \"shm\""))),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([0, 0, 0, 0], 9000)),
            peer_port: None,
            throughput_channels: 4,
            latency_channels: 1,
            channel_workers: 2,
            latency_workers: 1,
            latency_ports: Vec::new(),
            auth_key_file: None,
            latency_nice: -10,
            latency_fifo_priority: 0,
            busy_poll_us: 0,
            latency_spin_us: 0,
            inline_spin_us: 30,
            splice_send: false,
            inline_read: true,
            announce_listeners: true,
            optimistic_open: false,
            open_credit: 16 << 10,
            copy_workers: 1,
            copy_threshold: 256 << 10,
            segment_size: 256 << 10,
            send_buffer: 4 << 20,
            recv_buffer: 4 << 20,
            channel_queue: 512 << 10,
            bulk_sndbuf: 0,
            channel_congestion: DEFAULT_CONGESTION.to_string(),
            channel_worker_cpus: Vec::new(),
            latency_worker_cpus: Vec::new(),
            copy_worker_cpus: Vec::new(),
            write_batch: 256 << 10,
            write_batch_frames: 256,
            policy: Policy::RoundRobin,
            connect_timeout: Duration::from_millis(3000),
            accept_backlog: 1024,
            deployment: Deployment::Embedded,
            daemon: DaemonConfig::default(),
            peer_down_timeout: Duration::from_millis(5000),
            reconnect_backoff: Duration::from_millis(50),
            reconnect_backoff_max: Duration::from_millis(1000),
            preload: PreloadConfig::default(),
        }
    }
}

/// A configuration error: which key (or file) and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The key at fault, or the file name for a syntax error.
    pub key: String,
    /// What is wrong and what is expected.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "config key `{}`: {}", self.key, self.message)
    }
}

impl std::error::Error for ConfigError {}

impl From<ConfigError> for std::io::Error {
    fn from(e: ConfigError) -> Self {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string())
    }
}

fn err(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError { key: key.to_string(), message: message.into() }
}

/// Parse a size: plain bytes or a number with a unit (B, KiB, MiB, GiB, K, M, G, KB, MB, GB).
/// Binary units; `KB`/`MB`/`GB` are decimal.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(format!("{s:?} is not a size (expected e.g. 65536, \"64KiB\", \"4MiB\")"));
    }
    let mult: u64 = match unit.trim() {
        "" | "B" | "b" => 1,
        "K" | "k" | "KiB" | "kib" | "Ki" => 1 << 10,
        "M" | "m" | "MiB" | "mib" | "Mi" => 1 << 20,
        "G" | "g" | "GiB" | "gib" | "Gi" => 1 << 30,
        "KB" | "kB" | "kb" => 1_000,
        "MB" | "mb" => 1_000_000,
        "GB" | "gb" => 1_000_000_000,
        u => return Err(format!("unknown size unit {u:?} in {s:?} (use B, KiB, MiB or GiB)")),
    };
    let v: f64 = num.parse().map_err(|_| format!("{s:?} is not a size"))?;
    let bytes = v * mult as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(bytes as u64)
}

/// The congestion control channels get when the config names none: cubic (see
/// [`Config::channel_congestion`]).
pub const DEFAULT_CONGESTION: &str = "cubic";

/// CPUs a CPU list may name (`CPU_SETSIZE`).
pub const MAX_CPUS: usize = 1024;

/// The shortest channel authentication key accepted (`auth_key_file`), in bytes.
pub const MIN_KEY_LEN: usize = 16;

/// Longest congestion control name the kernel accepts (`TCP_CA_NAME_MAX` less the NUL).
const MAX_CONGESTION_NAME: usize = 15;

/// A congestion control name as `TCP_CONGESTION` takes it: empty (the system default) or up
/// to 15 ASCII letters, digits, `_` or `-`. Whether the kernel has it is known only when a
/// channel is set up (that error names the key too).
fn check_congestion(name: &str) -> Result<(), ConfigError> {
    if name.len() > MAX_CONGESTION_NAME
        || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(err(
            "channel_congestion",
            format!(
                "{name:?} is not a congestion control name (at most {MAX_CONGESTION_NAME} letters, \
                 digits, `_` or `-`, e.g. \"cubic\"; empty for the system default)"
            ),
        ));
    }
    Ok(())
}

/// The serde helpers of the keys whose TOML form is not their Rust type's: sizes (an integer
/// or a string with a unit), milliseconds (`Duration`), and integers whose range errors say
/// what the key holds. Each error message names the value; the caller prefixes the key.
mod de {
    use std::net::{IpAddr, SocketAddr};
    use std::path::PathBuf;
    use std::time::Duration;

    use serde::de::{self, Deserializer, Error as _, Visitor};
    use serde::{Deserialize, Serializer};

    /// An integer, converted to `T` or refused with "`v` `why`".
    fn int<'de, D: Deserializer<'de>, T: TryFrom<i64>>(d: D, why: &str) -> Result<T, D::Error> {
        let v = i64::deserialize(d)?;
        T::try_from(v).map_err(|_| D::Error::custom(format!("{v} {why}")))
    }

    pub fn count<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
        int(d, "is negative; expected a count")
    }

    pub fn non_negative<'de, D: Deserializer<'de>, T: TryFrom<i64>>(d: D) -> Result<T, D::Error> {
        int(d, "is negative")
    }

    pub fn nice<'de, D: Deserializer<'de>>(d: D) -> Result<i32, D::Error> {
        int(d, "is out of range")
    }

    pub fn port<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u16>, D::Error> {
        int(d, "is not a TCP port").map(Some)
    }

    pub fn ports<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u16>, D::Error> {
        let v = Vec::<i64>::deserialize(d)?;
        v.into_iter()
            .map(|p| u16::try_from(p).map_err(|_| D::Error::custom(format!("{p} is not a port"))))
            .collect()
    }

    pub fn cpus<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<usize>, D::Error> {
        let v = Vec::<i64>::deserialize(d)?;
        v.into_iter()
            .map(|i| usize::try_from(i).map_err(|_| D::Error::custom(format!("{i} is not a CPU number"))))
            .collect()
    }

    pub fn listen_ports<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u16>, D::Error> {
        let v = ports(d)?;
        if v.contains(&0) {
            return Err(D::Error::custom("0 is not a port a program listens on"));
        }
        Ok(v)
    }

    pub fn ids<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u32>, D::Error> {
        let v = Vec::<i64>::deserialize(d)?;
        v.into_iter()
            .map(|i| u32::try_from(i).map_err(|_| D::Error::custom(format!("{i} is not a user or group id"))))
            .collect()
    }

    pub fn micros<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        let v = i64::deserialize(d)?;
        match u64::try_from(v) {
            Ok(us) if us <= 1_000_000 => Ok(Some(us)),
            _ => Err(D::Error::custom(format!("{v} is out of range 0..=1000000"))),
        }
    }

    /// Microseconds, 0..=1000000, as a plain number.
    pub fn micros_u64<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        micros(d).map(|v| v.unwrap_or(0))
    }

    pub fn addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(|_| D::Error::custom(format!("{s:?} is not an IP:port address")))
    }

    pub fn ips<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<IpAddr>, D::Error> {
        let v = Vec::<String>::deserialize(d)?;
        v.iter()
            .map(|h| h.parse().map_err(|_| D::Error::custom(format!("{h:?} is not an IP address"))))
            .collect()
    }

    pub fn socket<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
        let p = String::deserialize(d)?;
        if p.is_empty() {
            return Err(D::Error::custom("is empty; give the path of a Unix socket"));
        }
        Ok(Some(p.into()))
    }

    /// An optional size ([`size`]): set when the key is given.
    pub fn opt_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
        size::deserialize(d).map(Some)
    }

    /// A size in bytes: an integer, or a string such as `"64KiB"` ([`super::parse_size`]);
    /// written back as an integer.
    pub mod size {
        use super::*;

        struct Size;
        impl Visitor<'_> for Size {
            type Value = u64;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a size: an integer (bytes) or a string such as \"64KiB\"")
            }
            fn visit_i64<E: de::Error>(self, i: i64) -> Result<u64, E> {
                u64::try_from(i).map_err(|_| E::custom(format!("{i} is negative; expected a size in bytes")))
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<u64, E> {
                Ok(n)
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<u64, E> {
                crate::config::parse_size(s).map_err(E::custom)
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
            let n = d.deserialize_any(Size)?;
            usize::try_from(n).map_err(|_| D::Error::custom(format!("{n} is too large")))
        }

        pub fn serialize<S: Serializer>(v: &usize, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_u64(*v as u64)
        }
    }

    /// A `Duration` as whole milliseconds (the `…_ms` keys).
    pub mod millis {
        use super::*;

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
            super::non_negative(d).map(Duration::from_millis)
        }

        pub fn serialize<S: Serializer>(v: &Duration, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_u64(v.as_millis() as u64)
        }
    }
}

impl Serialize for Policy {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for Policy {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

impl Deployment {
    /// The name used in config files.
    pub fn name(self) -> &'static str {
        match self {
            Deployment::Embedded => "embedded",
            Deployment::Daemon => "daemon",
        }
    }
}

impl Serialize for Deployment {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for Deployment {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match String::deserialize(d)?.as_str() {
            "embedded" => Ok(Deployment::Embedded),
            "daemon" => Ok(Deployment::Daemon),
            other => Err(serde::de::Error::custom(format!(
                "unknown deployment {other:?} (expected \"embedded\" or \"daemon\")"
            ))),
        }
    }
}

/// The dotted key (`daemon.allowed_uids`) of a deserializer path, array indices left out.
fn dotted(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let keys: Vec<String> = path
        .iter()
        .filter_map(|s| match s {
            Segment::Map { key } => Some(key.clone()),
            Segment::Enum { variant } => Some(variant.clone()),
            Segment::Seq { .. } | Segment::Unknown => None,
        })
        .collect();
    keys.join(".")
}

impl Config {
    /// Parse a TOML document; keys not given keep their defaults. Unknown keys are errors.
    /// An error names the key through the deserializer's path (`daemon.allowed_uids`), or
    /// `<toml>` for a syntax error (whose message says the line).
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        let c: Config = serde_path_to_error::deserialize(toml::Deserializer::new(text)).map_err(|e| {
            let key = dotted(e.path());
            let inner = e.into_inner();
            if key.is_empty() {
                // A syntax error: where it is, by line and column.
                let at = inner.span().map(|sp| {
                    let before = &text[..sp.start.min(text.len())];
                    let line = before.matches('\n').count() + 1;
                    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                    format!("line {line}, column {column}: ")
                });
                err("<toml>", format!("{}{}", at.unwrap_or_default(), inner.message()))
            } else {
                err(&key, inner.message())
            }
        })?;
        c.validate()?;
        Ok(c)
    }

    /// Read and parse a TOML file; errors name the file or the key.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| err(&path.display().to_string(), format!("cannot read config file: {e}")))?;
        Config::from_toml_str(&text).map_err(|e| ConfigError {
            key: e.key,
            message: format!("{} (in {})", e.message, path.display()),
        })
    }

    /// Read the pre-shared channel key named by `auth_key_file`, if any.
    pub fn auth_key(&self) -> Result<Option<Vec<u8>>, ConfigError> {
        let Some(path) = &self.auth_key_file else { return Ok(None) };
        let mut key = std::fs::read(path)
            .map_err(|e| err("auth_key_file", format!("cannot read {}: {e}", path.display())))?;
        if key.last() == Some(&b'\n') {
            key.pop();
        }
        if key.len() < MIN_KEY_LEN {
            return Err(err(
                "auth_key_file",
                format!(
                    "the key in {} has {} bytes; use at least {}",
                    path.display(),
                    key.len(),
                    MIN_KEY_LEN
                ),
            ));
        }
        Ok(Some(key))
    }

    /// The configuration as a TOML document that [`Config::from_toml_str`] reads back to
    /// an equal value (e.g. to hand a benchmark's knobs to a daemon process).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("every Config serializes to TOML")
    }

    /// This configuration with the keys that `overrides` serializes to (a struct whose fields
    /// are named as keys, `None`s skipped) replaced, validated. The error names the key.
    pub fn overridden<T: Serialize>(&self, overrides: &T) -> Result<Config, ConfigError> {
        let mut table = toml::Table::try_from(self).expect("every Config serializes to a TOML table");
        let over = toml::Table::try_from(overrides).map_err(|e| err("<overrides>", e.to_string()))?;
        for (key, value) in over {
            table.insert(key, value);
        }
        Config::from_toml_str(&table.to_string())
    }

    /// The TCP port dialed on peers.
    pub fn peer_port(&self) -> u16 {
        self.peer_port.unwrap_or(self.listen.port())
    }

    /// Check every value; the error names the first key at fault.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let range = |key: &str, v: usize, lo: usize, hi: usize| {
            if v < lo || v > hi {
                Err(err(key, format!("{v} is out of range {lo}..={hi}")))
            } else {
                Ok(())
            }
        };
        range("throughput_channels", self.throughput_channels, 1, 256)?;
        range("latency_channels", self.latency_channels, 0, 256)?;
        range("channel_workers", self.channel_workers, 1, 1024)?;
        range("latency_workers", self.latency_workers, 0, 1024)?;
        if !(-20..=19).contains(&self.latency_nice) {
            return Err(err("latency_nice", format!("{} is out of range -20..=19", self.latency_nice)));
        }
        if self.latency_fifo_priority > 99 {
            return Err(err(
                "latency_fifo_priority",
                format!("{} is out of range 0..=99", self.latency_fifo_priority),
            ));
        }
        if self.busy_poll_us > 1_000_000 {
            return Err(err("busy_poll_us", format!("{} is out of range 0..=1000000", self.busy_poll_us)));
        }
        if self.latency_spin_us > 1_000_000 {
            return Err(err(
                "latency_spin_us",
                format!("{} is out of range 0..=1000000", self.latency_spin_us),
            ));
        }
        if self.inline_spin_us > 1_000_000 {
            return Err(err(
                "inline_spin_us",
                format!("{} is out of range 0..=1000000", self.inline_spin_us),
            ));
        }
        range("copy_workers", self.copy_workers, 0, 1024)?;
        range("segment_size", self.segment_size, 512, crate::wire::MAX_SEGMENT)?;
        range("copy_threshold", self.copy_threshold, 4096, usize::MAX)?;
        range("send_buffer", self.send_buffer, self.segment_size, 1 << 32)
            .map_err(|e| err("send_buffer", format!("{} (must be at least segment_size)", e.message)))?;
        range("recv_buffer", self.recv_buffer, self.segment_size, 1 << 32)
            .map_err(|e| err("recv_buffer", format!("{} (must be at least segment_size)", e.message)))?;
        range("channel_queue", self.channel_queue, self.segment_size, usize::MAX)
            .map_err(|e| err("channel_queue", format!("{} (must be at least segment_size)", e.message)))?;
        range("open_credit", self.open_credit, 0, self.recv_buffer.min(crate::wire::MAX_SEGMENT))
            .map_err(|e| err("open_credit", format!("{} (at most recv_buffer and 1 MiB)", e.message)))?;
        if self.bulk_sndbuf != 0 {
            range("bulk_sndbuf", self.bulk_sndbuf, 4096, 1 << 30)
                .map_err(|e| err("bulk_sndbuf", format!("{} (or 0 for the kernel's default)", e.message)))?;
        }
        check_congestion(&self.channel_congestion)?;
        for (key, list) in [
            ("channel_worker_cpus", &self.channel_worker_cpus),
            ("latency_worker_cpus", &self.latency_worker_cpus),
            ("copy_worker_cpus", &self.copy_worker_cpus),
        ] {
            if let Some(&cpu) = list.iter().find(|&&c| c >= MAX_CPUS) {
                return Err(err(key, format!("CPU {cpu} is out of range 0..{MAX_CPUS}")));
            }
        }
        range("write_batch", self.write_batch, 4096, 64 << 20)?;
        range("write_batch_frames", self.write_batch_frames, 1, 1024)?;
        range("accept_backlog", self.accept_backlog, 1, 1 << 20)?;
        let d = &self.daemon;
        range("daemon.max_connections", d.max_connections, 2, 1 << 20)?;
        range("daemon.max_connections_per_process", d.max_connections_per_process, 2, 1 << 20)?;
        range("daemon.max_vsockets_per_process", d.max_vsockets_per_process, 1, 1 << 24)?;
        for (key, v) in
            [("daemon.max_buffer_per_process", d.max_buffer_per_process), ("daemon.max_buffer", d.max_buffer)]
        {
            if let Some(v) = v {
                range(key, v, 4096, usize::MAX)?;
            }
        }
        if self.peer_down_timeout.is_zero() {
            return Err(err("peer_down_timeout_ms", "must be greater than 0"));
        }
        if self.reconnect_backoff.is_zero() {
            return Err(err("reconnect_backoff_ms", "must be greater than 0"));
        }
        if self.reconnect_backoff_max < self.reconnect_backoff {
            return Err(err(
                "reconnect_backoff_max_ms",
                format!(
                    "{} is below reconnect_backoff_ms ({})",
                    self.reconnect_backoff_max.as_millis(),
                    self.reconnect_backoff.as_millis()
                ),
            ));
        }
        if self.connect_timeout.is_zero() {
            return Err(err("connect_timeout_ms", "must be greater than 0"));
        }
        if self.peer_port() == 0 {
            return Err(err("peer_port", "is 0 and `listen` has port 0: set the port peers listen on"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The field names (keys) serde knows for `T`, read from its derived `Deserialize`.
    fn keys_of<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
        #[derive(Debug)]
        struct Stop;
        impl fmt::Display for Stop {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("stop")
            }
        }
        impl std::error::Error for Stop {}
        impl serde::de::Error for Stop {
            fn custom<M: fmt::Display>(_: M) -> Self {
                Stop
            }
        }
        struct Fields<'a>(&'a mut &'static [&'static str]);
        impl<'de> serde::Deserializer<'de> for Fields<'_> {
            type Error = Stop;
            fn deserialize_any<V: serde::de::Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
                Err(Stop)
            }
            fn deserialize_struct<V: serde::de::Visitor<'de>>(
                self,
                _: &'static str,
                fields: &'static [&'static str],
                _: V,
            ) -> Result<V::Value, Stop> {
                *self.0 = fields;
                Err(Stop)
            }
            serde::forward_to_deserialize_any! {
                bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
                option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
                ignored_any
            }
        }
        let mut fields: &'static [&'static str] = &[];
        let _ = T::deserialize(Fields(&mut fields));
        fields
    }

    /// The rows of docs/config.md's key tables (header `| key | type | default |…`): the
    /// dotted key (`[daemon] socket` is `daemon.socket`) and its default cell.
    fn documented(doc: &str) -> Vec<(String, String)> {
        let mut rows = Vec::new();
        let mut in_keys = false;
        for line in doc.lines() {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            if !line.starts_with('|') {
                in_keys = false;
            } else if cells.get(1..4) == Some(&["key", "type", "default"][..]) {
                in_keys = true;
            } else if in_keys && !cells[1].starts_with("---") {
                let key = cells[1].trim_matches('`');
                let key = match key.strip_prefix('[').and_then(|k| k.split_once("] ")) {
                    Some((table, k)) => format!("{table}.{k}"),
                    None => key.to_string(),
                };
                rows.push((key, cells[3].to_string()));
            }
        }
        rows
    }

    #[test]
    fn docs_config_md_documents_every_key_with_its_default() {
        let tables = [("daemon", keys_of::<DaemonConfig>()), ("preload", keys_of::<PreloadConfig>())];
        let defaults: toml::Table = toml::from_str(&Config::default().to_toml()).unwrap();
        for (k, v) in &defaults {
            assert!(!v.is_table() || tables.iter().any(|(t, _)| t == k), "a new table [{k}]: list it here");
        }
        let mut code: Vec<String> = keys_of::<Config>()
            .iter()
            .filter(|k| !tables.iter().any(|(t, _)| t == *k))
            .map(|k| k.to_string())
            .collect();
        for (t, keys) in tables {
            code.extend(keys.iter().map(|k| format!("{t}.{k}")));
        }
        assert!(code.len() > 30, "{code:?}");
        let rows = documented(include_str!("../../../docs/config.md"));
        let doc: Vec<&str> = rows.iter().map(|(k, _)| k.as_str()).collect();
        let missing: Vec<&String> = code.iter().filter(|k| !doc.contains(&k.as_str())).collect();
        let extra: Vec<&&str> = doc.iter().filter(|k| !code.contains(&k.to_string())).collect();
        assert!(missing.is_empty(), "keys not in docs/config.md: {missing:?}");
        assert!(extra.is_empty(), "docs/config.md documents keys that do not exist: {extra:?}");
        for (key, default) in &rows {
            let (table, name) = key.split_once('.').map_or((None, key.as_str()), |(t, n)| (Some(t), n));
            let in_code = match table {
                Some(t) => defaults[t].get(name),
                None => defaults.get(name),
            };
            // A default written as one TOML literal must be the default; one said in words
            // ("the port of `listen`", "none") is only right for a key unset by default.
            match default.strip_prefix('`').and_then(|d| d.strip_suffix('`')).filter(|d| !d.contains('`')) {
                Some(lit) => {
                    let toml = match table {
                        Some(t) => format!("[{t}]\n{name} = {lit}"),
                        None => format!("{name} = {lit}"),
                    };
                    let c = Config::from_toml_str(&toml)
                        .unwrap_or_else(|e| panic!("{key}: the documented default {lit} is invalid: {e}"));
                    assert_eq!(
                        c,
                        Config::default(),
                        "{key}: documented default {lit}, in the code {in_code:?}"
                    );
                }
                None => assert!(in_code.is_none(), "{key}: the default is {in_code:?}; document it as `…`"),
            }
        }
    }

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
        assert_eq!(Config::from_toml_str("").unwrap(), Config::default());
    }

    #[test]
    fn parses_every_key_and_units() {
        let c = Config::from_toml_str(
            r#"
            listen = "127.0.0.2:9100"
            peer_port = 9200
            throughput_channels = 8
            latency_channels = 2
            channel_workers = 3
            latency_workers = 0
            latency_ports = [6379, 11211]
            latency_nice = -5
            latency_fifo_priority = 10
            busy_poll_us = 50
            copy_workers = 0
            copy_threshold = "512KiB"
            segment_size = "32KiB"
            send_buffer = 1048576
            recv_buffer = "2MiB"
            channel_queue = "1MiB"
            bulk_sndbuf = "128KiB"
            channel_congestion = "reno"
            channel_worker_cpus = [0, 1]
            latency_worker_cpus = [2]
            copy_worker_cpus = []
            write_batch = "64KiB"
            write_batch_frames = 32
            latency_spin_us = 20
            policy = "hash"
            connect_timeout_ms = 500
            accept_backlog = 16
            peer_down_timeout_ms = 2500
            reconnect_backoff_ms = 20
            reconnect_backoff_max_ms = 400
            deployment = "daemon"

            [daemon]
            socket = "/tmp/nc.sock"
            allowed_uids = [1000]
            allowed_gids = [27, 100]
            poll_spin_us = 0
            app_spin_us = 5
            reply_spin_us = 25
            max_connections = 64
            max_connections_per_process = 8
            max_vsockets_per_process = 100
            max_buffer_per_process = "1GiB"
            max_buffer = 4294967296
            "#,
        )
        .unwrap();
        assert_eq!(c.listen, "127.0.0.2:9100".parse().unwrap());
        assert_eq!(c.peer_port(), 9200);
        assert_eq!(c.throughput_channels, 8);
        assert_eq!((c.channel_workers, c.latency_workers), (3, 0));
        assert_eq!(c.latency_ports, [6379, 11211]);
        assert_eq!((c.latency_nice, c.latency_fifo_priority, c.busy_poll_us), (-5, 10, 50));
        assert_eq!(c.peer_down_timeout, Duration::from_millis(2500));
        assert_eq!(
            (c.reconnect_backoff, c.reconnect_backoff_max),
            (Duration::from_millis(20), Duration::from_millis(400))
        );
        assert!(Config::from_toml_str("reconnect_backoff_ms = 500\nreconnect_backoff_max_ms = 100")
            .unwrap_err()
            .to_string()
            .contains("reconnect_backoff_max_ms"));
        assert_eq!(
            Config::from_toml_str("peer_down_timeout_ms = 0").unwrap_err().key,
            "peer_down_timeout_ms"
        );
        assert_eq!(c.copy_threshold, 512 << 10);
        assert_eq!(c.segment_size, 32 << 10);
        assert_eq!(c.send_buffer, 1 << 20);
        assert_eq!(c.recv_buffer, 2 << 20);
        assert_eq!(c.policy, Policy::Hash);
        assert_eq!((c.bulk_sndbuf, c.write_batch, c.write_batch_frames), (128 << 10, 64 << 10, 32));
        assert_eq!(c.latency_spin_us, 20);
        assert_eq!(c.channel_congestion, "reno");
        assert_eq!(
            (c.channel_worker_cpus.as_slice(), c.latency_worker_cpus.as_slice()),
            (&[0, 1][..], &[2][..])
        );
        assert!(c.copy_worker_cpus.is_empty());
        assert_eq!(Config::from_toml_str("channel_congestion = \"\"").unwrap().channel_congestion, "");
        assert_eq!(c.connect_timeout, Duration::from_millis(500));
        assert_eq!(c.deployment, Deployment::Daemon);
        assert_eq!(c.daemon.socket.as_deref(), Some(Path::new("/tmp/nc.sock")));
        assert_eq!(
            (c.daemon.allowed_uids.clone(), c.daemon.allowed_gids.clone()),
            (vec![1000], vec![27, 100])
        );
        assert_eq!((c.daemon.poll_spin_us, c.daemon.app_spin_us), (Some(0), Some(5)));
        assert_eq!(c.daemon.reply_spin(), Duration::from_micros(25));
        assert_eq!(c.daemon.app_spin(), Duration::from_micros(5));
        let d = &c.daemon;
        assert_eq!(
            (d.max_connections, d.max_connections_per_process, d.max_vsockets_per_process),
            (64, 8, 100)
        );
        assert_eq!((d.max_buffer_per_process(), d.max_buffer()), (1 << 30, 4 << 30));
        let auto = DaemonConfig::default();
        assert!(auto.max_buffer() > 0 && auto.max_buffer_per_process() == auto.max_buffer() / 2);
    }

    #[test]
    fn errors_name_the_key() {
        for (doc, key) in [
            ("throughput_channels = 0", "throughput_channels"),
            ("segment_size = \"2GiB\"", "segment_size"),
            ("policy = \"fastest\"", "policy"),
            ("listen = \"nowhere\"", "listen"),
            ("recv_buffer = \"1KiB\"", "recv_buffer"),
            ("bogus_key = 1", "bogus_key"),
            ("copy_workers = -1", "copy_workers"),
            ("latency_nice = -21", "latency_nice"),
            ("[daemon]\nmax_connections = 1", "daemon.max_connections"),
            ("[daemon]\nmax_vsockets_per_process = 0", "daemon.max_vsockets_per_process"),
            ("[daemon]\nmax_buffer = \"1KiB\"", "daemon.max_buffer"),
            ("[daemon]\nmax_buffer_per_process = -1", "daemon.max_buffer_per_process"),
            ("latency_ports = [70000]", "latency_ports"),
            ("[preload]\nports = [0]", "preload.ports"),
            ("latency_fifo_priority = 100", "latency_fifo_priority"),
            ("segment_size = \"64 furlongs\"", "segment_size"),
            ("deployment = \"cloud\"", "deployment"),
            ("[daemon]\nallowed_uids = [\"root\"]", "daemon.allowed_uids"),
            ("[daemon]\nbogus = 1", "daemon.bogus"),
            ("segment_size = true", "segment_size"),
            ("[daemon]\nallowed_uids = [-1]", "daemon.allowed_uids"),
            ("[daemon]\npoll_spin_us = 2000000", "daemon.poll_spin_us"),
            ("[daemon]\nreply_spin_us = -1", "daemon.reply_spin_us"),
            ("bulk_sndbuf = 100", "bulk_sndbuf"),
            ("write_batch = 0", "write_batch"),
            ("write_batch_frames = 0", "write_batch_frames"),
            ("write_batch_frames = 5000", "write_batch_frames"),
            ("latency_spin_us = 2000000", "latency_spin_us"),
            ("channel_congestion = \"cu bic\"", "channel_congestion"),
            ("channel_congestion = \"averyveryverylongname\"", "channel_congestion"),
            ("channel_worker_cpus = [-1]", "channel_worker_cpus"),
            ("latency_worker_cpus = [4096]", "latency_worker_cpus"),
            ("copy_worker_cpus = [\"all\"]", "copy_worker_cpus"),
        ] {
            let e = Config::from_toml_str(doc).unwrap_err();
            assert_eq!(e.key, key, "{doc}: {e}");
            assert!(e.to_string().contains(key));
        }
    }

    #[test]
    fn to_toml_reads_back_equal() {
        let mut c = Config {
            peer_port: Some(9100),
            latency_ports: vec![6379],
            auth_key_file: Some("/etc/netchannel/key".into()),
            policy: Policy::Hash,
            deployment: Deployment::Daemon,
            ..Config::default()
        };
        c.daemon.socket = Some("/tmp/a b.sock".into());
        c.daemon.allowed_gids = vec![27];
        c.daemon.poll_spin_us = Some(7);
        c.bulk_sndbuf = 256 << 10;
        c.write_batch_frames = 17;
        c.latency_spin_us = 3;
        c.channel_congestion = String::new();
        c.copy_worker_cpus = vec![1, 3];
        assert_eq!(Config::from_toml_str(&c.to_toml()).unwrap(), c);
        assert_eq!(Config::from_toml_str(&Config::default().to_toml()).unwrap(), Config::default());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64KiB").unwrap(), 65536);
        assert_eq!(parse_size("1.5MiB").unwrap(), 1572864);
        assert_eq!(parse_size("10 MB").unwrap(), 10_000_000);
        assert_eq!(parse_size("7").unwrap(), 7);
        assert!(parse_size("").is_err());
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("3 parsecs").is_err());
    }
}
