//! `netchannel bench`: workloads that measure NetChannel beside Linux TCP in one invocation.
//!
//! This module owns what every mode shares: the [`CommonOpts`] flags (backend, engine knobs,
//! config file, role and addresses, output format), turning them into an engine [`Config`],
//! the [`Report`] trait and [`emit`] (one JSON object on stdout, or human lines), and
//! [`watch`], the main thread's loop that collects the worker threads' results while it
//! prints progress and catches stalls. [`backend`] hides the difference between a vsocket on
//! an embedded host and a kernel TCP (or MPTCP, [`mptcp`]) socket, and with `--netns` runs the
//! two ends in two network namespaces ([`netns`]). [`pair`] runs a mode's server and client
//! ends on their threads; [`transfer`] (one-way modes) and [`rpc`] (request/response modes)
//! hold what those modes share.
//!
//! Adding a mode: write `bench/<mode>.rs` with an `Args` struct that flattens [`CommonOpts`]
//! and a `run(&Args) -> Result<()>` that builds one report per [`Stack`] and calls [`emit`]
//! (a server/client mode: [`pair::Pair::run_stacks`] and [`pair::Pair::run`]); then add a
//! variant to [`Mode`] and an arm to [`run`].

#[cfg(feature = "tokio")]
pub mod asyncio;
pub mod backend;
pub mod connect;
pub mod daemons;
pub mod isolation;
pub mod mptcp;
pub mod netns;
pub mod pair;
pub mod pingpong;
pub mod redis;
pub mod rpc;
pub mod short;
pub mod soak;
pub mod stream;
pub mod suite;
pub mod transfer;

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use clap::{Args, Subcommand, ValueEnum};
use netchannel::{Config, Policy};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::progress::Bar;

/// The benchmark modes.
#[derive(Subcommand, Debug)]
pub enum Mode {
    /// Bulk transfer: one app thread writes a stream of large writes, one app thread reads it
    /// (experiment 6a/6b: can one app thread use many cores?).
    Stream(stream::StreamArgs),
    /// Small messages: one app thread sends --size messages back to back, no reply
    /// (experiment 6c: do small messages scale with channels?).
    Short(short::ShortArgs),
    /// Request/response latency: one --size request and its echo at a time (HDR percentiles).
    Pingpong(pingpong::PingpongArgs),
    /// Connection rate: open a connection, one request/response, close; again and again.
    Connect(connect::ConnectArgs),
    /// Latency isolation: a ping-pong app alone, then beside --bulk-apps bulk streams
    /// (experiment 6d: is latency isolated from bulk?).
    Isolation(isolation::IsolationArgs),
    /// Reliability: many verified vsockets of mixed sizes and classes while channels are
    /// killed at random; reports bytes verified, errors (must be 0), kills and memory.
    Soak(soak::SoakArgs),
    /// Async Rust: tokio over vsockets against tokio over kernel TCP in one run (ping-pong
    /// p50/p99 with 1 and 64 connections, hyper requests/s under many clients).
    #[cfg(feature = "tokio")]
    Tokio(asyncio::TokioArgs),
    /// Experiment 7: an unmodified single-threaded redis-server and redis-benchmark at queue
    /// depths 1…64, under `netchannel run` through two daemons and over plain TCP (needs Redis).
    Redis(redis::RedisArgs),
    /// Every experiment, NetChannel beside its baselines, several repetitions: JSON per run,
    /// summary.md with medians and ratios, and charts as PNG and SVG (see `netchannel demo`).
    Suite(suite::SuiteArgs),
}

/// Run one benchmark mode.
pub fn run(mode: &Mode) -> Result<()> {
    match mode {
        Mode::Stream(args) => stream::run(args),
        Mode::Short(args) => short::run(args),
        Mode::Pingpong(args) => pingpong::run(args),
        Mode::Connect(args) => connect::run(args),
        Mode::Isolation(args) => isolation::run(args),
        Mode::Soak(args) => soak::run(args),
        #[cfg(feature = "tokio")]
        Mode::Tokio(args) => asyncio::run(args),
        Mode::Redis(args) => redis::run(args),
        Mode::Suite(args) => suite::run(args),
    }
}

/// Which stack(s) a benchmark runs on.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// NetChannel: vsockets on embedded hosts.
    Netchannel,
    /// Linux kernel TCP, one connection.
    Tcp,
    /// Linux TCP first, then NetChannel, in the same invocation; reports both and the ratio.
    Both,
    /// Linux MPTCP, one connection with --subflows subflows.
    Mptcp,
    /// Linux TCP, then MPTCP, then NetChannel, in the same invocation; reports all three.
    All,
    /// NetChannel through two `netchannel up` daemons (child processes): the apps reach
    /// them over Unix sockets and shared memory, as unmodified programs do.
    Daemon,
    /// Linux TCP, then NetChannel embedded, then NetChannel through daemons, in one invocation.
    Deployments,
}

impl Backend {
    /// The stacks to run, in order.
    pub fn stacks(self) -> Vec<Stack> {
        match self {
            Backend::Netchannel => vec![Stack::Netchannel],
            Backend::Tcp => vec![Stack::Tcp],
            Backend::Both => vec![Stack::Tcp, Stack::Netchannel],
            Backend::Mptcp => vec![Stack::Mptcp],
            Backend::All => vec![Stack::Tcp, Stack::Mptcp, Stack::Netchannel],
            Backend::Daemon => vec![Stack::Daemon],
            Backend::Deployments => vec![Stack::Tcp, Stack::Netchannel, Stack::Daemon],
        }
    }

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Netchannel => "netchannel",
            Backend::Tcp => "tcp",
            Backend::Both => "both",
            Backend::Mptcp => "mptcp",
            Backend::All => "all",
            Backend::Daemon => "daemon",
            Backend::Deployments => "deployments",
        }
    }
}

/// One stack a run actually used.
#[derive(Serialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Stack {
    /// NetChannel vsockets.
    Netchannel,
    /// Linux kernel TCP.
    Tcp,
    /// Linux kernel MPTCP.
    Mptcp,
    /// NetChannel vsockets served by per-host daemons.
    Daemon,
}

impl Stack {
    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Stack::Netchannel => "netchannel",
            Stack::Tcp => "tcp",
            Stack::Mptcp => "mptcp",
            Stack::Daemon => "daemon",
        }
    }
}

/// Which end(s) of the workload this process runs.
#[derive(ValueEnum, Serialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Both ends in this process, over loopback (127.0.0.1 → 127.0.0.2).
    Both,
    /// The accepting end: listens on --listen and serves one run.
    Server,
    /// The connecting end: connects to --connect.
    Client,
}

impl Role {
    /// Whether this process runs the accepting end.
    pub fn has_server(self) -> bool {
        matches!(self, Role::Both | Role::Server)
    }
    /// Whether this process runs the connecting end.
    pub fn has_client(self) -> bool {
        matches!(self, Role::Both | Role::Client)
    }
}

/// Flags every benchmark mode takes: backend, engine knobs ([`EngineFlags`]), topology and
/// output.
#[derive(Args, Debug, Clone)]
pub struct CommonOpts {
    /// Stack to measure
    #[arg(long, value_enum, default_value_t = Backend::Netchannel)]
    pub backend: Backend,

    /// Engine knobs, each overriding one config key
    #[command(flatten)]
    pub engine: EngineFlags,

    /// Engine configuration file (TOML, see docs/config.md); flags override its keys
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Which end(s) to run: both (loopback, one process), server or client
    #[arg(long, value_enum, default_value_t = Role::Both)]
    pub role: Role,

    /// Server: address to listen on, IP or IP:PORT. netchannel: the host's channel address
    /// [default: listen from --config, 0.0.0.0:9000]; tcp: the IP (the TCP port is --port)
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,

    /// Client: the server's address as given to its --listen, IP or IP:PORT
    #[arg(long, value_name = "ADDR")]
    pub connect: Option<String>,

    /// Client, netchannel: this host's own channel address [default: 0.0.0.0 and the server's channel port]
    #[arg(long, value_name = "ADDR")]
    pub local: Option<SocketAddr>,

    /// The vsocket port of the stream (netchannel), or the TCP port (tcp); --role both over
    /// TCP uses an ephemeral port
    #[arg(long, value_name = "PORT", default_value_t = 5001)]
    pub port: u16,

    /// Print exactly one JSON object on stdout and no progress
    #[arg(long)]
    pub json: bool,

    /// Fail the run when no byte has moved for this many seconds
    #[arg(long, value_name = "SECS", default_value_t = 30.0, value_parser = parse_secs)]
    pub stall_timeout: f64,

    /// MPTCP: subflows per connection, the initial one included (1..=9)
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = parse_subflows)]
    pub subflows: usize,

    /// Run each end in its own network namespace, joined by a veth pair (needs root and iproute2)
    #[arg(long)]
    pub netns: bool,

    /// With --netns: limit both veth ends to this rate with a tbf qdisc, e.g. 10gbit, 500mbit
    #[arg(long, value_name = "RATE", requires = "netns", value_parser = netns::Rate::parse)]
    pub rate: Option<netns::Rate>,
}

/// The engine knob flags of every benchmark mode, one per config key: a field is named as
/// its key (`--channels` is `throughput_channels`), so applying the flags is serializing the
/// ones given over the configuration ([`Config::overridden`]). `Option`s without a clap
/// default, so that a value from `--config` is only overridden by a flag actually given.
#[derive(Args, Debug, Clone, Default, Serialize)]
pub struct EngineFlags {
    /// Throughput channels per peer [default: 4, or throughput_channels from --config]
    #[arg(long = "channels", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub throughput_channels: Option<usize>,

    /// Channel worker threads per host [default: 2, or channel_workers from --config]
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channel_workers: Option<usize>,

    /// Worker threads serving only latency channels; 0 = they share the channel workers [default: 1, or latency_workers from --config]
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_workers: Option<usize>,

    /// Copy worker threads per host; 0 = app threads copy alone [default: 1, or copy_workers from --config]
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub copy_workers: Option<usize>,

    /// Largest DATA segment, e.g. 64KiB [default: 256KiB, or segment_size from --config]
    #[arg(long, value_name = "SIZE", value_parser = parse_size_usize)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub segment_size: Option<usize>,

    /// Channel choice per segment: round-robin or hash [default: round-robin, or policy from --config]
    #[arg(long, value_name = "POLICY", value_parser = parse_policy)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<Policy>,

    /// Latency-class channels per peer [default: 1, or latency_channels from --config]
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_channels: Option<usize>,

    /// Unsent bytes queued on one channel before the NetDriver chooses another, e.g. 512KiB [default: 512KiB, or channel_queue from --config]
    #[arg(long, value_name = "SIZE", value_parser = parse_size_usize)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channel_queue: Option<usize>,

    /// SO_SNDBUF of throughput (bulk) channels, e.g. 256KiB; 0 = kernel default [default: 0, or bulk_sndbuf from --config]
    #[arg(long, value_name = "SIZE", value_parser = parse_size_usize)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bulk_sndbuf: Option<usize>,

    /// TCP congestion control of every channel AND of the TCP/MPTCP baselines, so that they
    /// compare like with like, e.g. cubic, bbr, reno; "" = the system default [default: cubic, or channel_congestion from --config]
    #[arg(long = "congestion", value_name = "NAME")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channel_congestion: Option<String>,

    /// Most bytes one channel write gathers, e.g. 256KiB [default: 256KiB, or write_batch from --config]
    #[arg(long, value_name = "SIZE", value_parser = parse_size_usize)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub write_batch: Option<usize>,

    /// Most frames one channel write gathers [default: 256, or write_batch_frames from --config]
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub write_batch_frames: Option<usize>,

    /// Microseconds an app thread reading a latency-class vsocket polls before it sleeps [default: 0, or latency_spin_us from --config]
    #[arg(long, value_name = "US")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_spin_us: Option<u64>,

    /// Microseconds an app thread reading its home channel itself polls it before it sleeps, unless the host carries bulk [default: 30, or inline_spin_us from --config]
    #[arg(long, value_name = "US")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inline_spin_us: Option<u64>,

    /// Whether throughput channels splice payloads of 64 KiB and more from the send rings into the socket instead of copying them, true or false [default: false, or splice_send from --config]
    #[arg(long, value_name = "BOOL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub splice_send: Option<bool>,

    /// Whether an app thread about to sleep on a vsocket reads its home channel itself, true or false [default: true, or inline_read from --config]
    #[arg(long, value_name = "BOOL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inline_read: Option<bool>,

    /// Whether the hosts announce their listening ports to each other (a confirmed connect to an announced port needs no round trip), true or false [default: true, or announce_listeners from --config]
    #[arg(long, value_name = "BOOL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub announce_listeners: Option<bool>,

    /// Microseconds a latency worker polls its channels before it sleeps [default: 0, or busy_poll_us from --config]
    #[arg(long, value_name = "US")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub busy_poll_us: Option<u64>,
}

impl EngineFlags {
    /// `config` with the given flags applied, validated; an error caused by a flag names it
    /// (`--channels: 0 is out of range 1..=256 (config key `throughput_channels`)`).
    pub fn apply(&self, config: &Config) -> Result<Config> {
        config.overridden(self).map_err(|e| {
            let flags = <EngineFlags as Args>::augment_args(clap::Command::new("flags"));
            let given = flags.get_arguments().find(|a| a.get_id() == e.key.as_str()).filter(|a| {
                let key = a.get_id().as_str();
                serde_json::to_value(self).is_ok_and(|v| v.get(key).is_some())
            });
            match given.and_then(|a| a.get_long()) {
                Some(long) => Error::from(format!("--{long}: {} (config key `{}`)", e.message, e.key)),
                None => Error::from(e),
            }
        })
    }
}

impl CommonOpts {
    /// The engine configuration: `--config` (or the defaults) with the knob flags applied,
    /// validated. An invalid value is reported with the flag that set it, else its config key.
    /// Loaded for every backend, so a bad file fails before any run starts.
    pub fn engine_config(&self) -> Result<Config> {
        let c = match &self.config {
            Some(path) => Config::load(path)?,
            None => Config::default(),
        };
        self.engine.apply(&c)
    }
}

/// The engine knobs a run used, as reported (all `null` for TCP, which has none of them).
#[derive(Serialize, Debug, Clone, Default)]
pub struct Knobs {
    /// Throughput channels per peer.
    pub channels: Option<usize>,
    /// Channel worker threads per host.
    pub channel_workers: Option<usize>,
    /// Copy worker threads per host.
    pub copy_workers: Option<usize>,
    /// Largest DATA segment in bytes.
    pub segment_size: Option<usize>,
    /// Channel choice policy.
    pub policy: Option<&'static str>,
    /// Latency channels per peer.
    pub latency_channels: Option<usize>,
    /// Per-channel queue cap in bytes.
    pub channel_queue: Option<usize>,
    /// SO_SNDBUF of bulk channels in bytes (0: the kernel's default).
    pub bulk_sndbuf: Option<usize>,
    /// Most bytes per channel write.
    pub write_batch: Option<usize>,
    /// Most frames per channel write.
    pub write_batch_frames: Option<usize>,
    /// Latency-class readers' spin before sleeping, µs.
    pub latency_spin_us: Option<u64>,
    /// The TCP congestion control of the channels, and of the TCP and MPTCP baselines (one
    /// setting for every stack, so this is set for TCP too); "" = the system default's.
    pub congestion: String,
}

impl Knobs {
    /// The knobs of `config` when `stack` is NetChannel; none for TCP and MPTCP.
    pub fn of(stack: Stack, config: &Config) -> Knobs {
        let congestion = congestion_name(&config.channel_congestion);
        match stack {
            Stack::Tcp | Stack::Mptcp => Knobs { congestion, ..Knobs::default() },
            Stack::Netchannel | Stack::Daemon => Knobs {
                channels: Some(config.throughput_channels),
                channel_workers: Some(config.channel_workers),
                copy_workers: Some(config.copy_workers),
                segment_size: Some(config.segment_size),
                policy: Some(config.policy.name()),
                latency_channels: Some(config.latency_channels),
                channel_queue: Some(config.channel_queue),
                bulk_sndbuf: Some(config.bulk_sndbuf),
                write_batch: Some(config.write_batch),
                write_batch_frames: Some(config.write_batch_frames),
                latency_spin_us: Some(config.latency_spin_us),
                congestion,
            },
        }
    }

    /// "4 channels, 2 channel workers, …" for human output; empty for TCP.
    pub fn describe(&self) -> String {
        let mut s = String::new();
        if let (Some(ch), Some(cw), Some(cp), Some(seg), Some(pol)) =
            (self.channels, self.channel_workers, self.copy_workers, self.segment_size, self.policy)
        {
            let _ = write!(
                s,
                "{ch} channels, {cw} channel workers, {cp} copy workers, {} segments, {pol}",
                bytes_human(seg as u64)
            );
        }
        if !self.congestion.is_empty() {
            let _ =
                write!(s, "{}{} congestion control", if s.is_empty() { "" } else { ", " }, self.congestion);
        }
        s
    }
}

/// The congestion control `name` (a `channel_congestion` value) stands for: itself, or for an
/// empty name the system default's, as `"bbr (system default)"`.
pub fn congestion_name(name: &str) -> String {
    if !name.is_empty() {
        return name.to_string();
    }
    match std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control") {
        Ok(s) => format!("{} (system default)", s.trim()),
        Err(_) => "system default".to_string(),
    }
}

/// One run's result, as printed by [`emit`].
pub trait Report: Serialize {
    /// The stack the run measured.
    fn stack(&self) -> Stack;
    /// The number the stacks are compared by (higher is better), and its unit.
    fn headline(&self) -> (f64, &'static str);
    /// The result for people: one or a few lines, no trailing newline.
    fn human(&self) -> String;
}

/// Print the reports of one invocation on stdout: one JSON object (the run itself, or
/// `{"mode", "backend": "both", "runs": [...], "ratio"}` for several; `"backend": "all"` and
/// also `"ratio_mptcp"` when MPTCP ran), or human lines.
pub fn emit<R: Report>(mode: &str, json: bool, runs: &[R]) -> Result<()> {
    let text = if json {
        match runs {
            [one] => to_json(one)?,
            _ => to_json(&Runs {
                mode,
                backend: if runs.iter().any(|r| r.stack() == Stack::Mptcp) {
                    "all"
                } else if runs.iter().any(|r| r.stack() == Stack::Daemon) {
                    "deployments"
                } else {
                    "both"
                },
                runs,
                ratio: ratio(runs),
                ratio_mptcp: ratio_to(runs, Stack::Mptcp),
            })?,
        }
    } else {
        let mut text = runs.iter().map(Report::human).collect::<Vec<_>>().join("\n");
        if let Some(r) = ratio(runs) {
            let unit = runs[0].headline().1;
            let _ = write!(text, "\nnetchannel / tcp: {r:.2}x ({unit})");
        }
        if let Some(r) = ratio_to(runs, Stack::Mptcp) {
            let _ = write!(text, "\nnetchannel / mptcp: {r:.2}x ({})", runs[0].headline().1);
        }
        let of = |s: Stack| runs.iter().find(|r| r.stack() == s).map(|r| r.headline().0);
        if let (Some(d), Some(e)) = (of(Stack::Daemon), of(Stack::Netchannel)) {
            if e > 0.0 {
                let _ = write!(text, "\ndaemon / embedded: {:.2}x ({})", d / e, runs[0].headline().1);
            }
        }
        text
    };
    print_report(&text)
}

/// A report as one line of JSON.
pub fn to_json(report: &impl Serialize) -> Result<String> {
    serde_json::to_string(report).map_err(|e| format!("cannot encode the report as JSON: {e}").into())
}

/// Write the report `text` and a newline on stdout.
pub fn print_report(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}")
        .and_then(|_| out.flush())
        .map_err(|e| Error::from(format!("cannot write the report to stdout: {e}")))
}

/// `v / seconds`, or 0 for a run that took no time.
pub fn per_second(v: f64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        v / seconds
    } else {
        0.0
    }
}

/// `CPU 1.23 s (0.98 cores)`.
pub fn cpu_human(cpu_seconds: f64, cpu_cores: f64) -> String {
    format!("CPU {cpu_seconds:.2} s ({cpu_cores:.2} cores)")
}

/// `, app threads: sender 0.50 s, receiver 0.40 s` for the app threads that ran in this
/// process (their CPU seconds); empty when none did.
pub fn app_threads(threads: [(&str, Option<f64>); 2]) -> String {
    let threads: Vec<String> =
        threads.iter().filter_map(|(name, v)| v.map(|v| format!("{name} {v:.2} s"))).collect();
    if threads.is_empty() {
        String::new()
    } else {
        format!(", app threads: {}", threads.join(", "))
    }
}

#[derive(Serialize)]
struct Runs<'a, R> {
    mode: &'a str,
    backend: &'a str,
    runs: &'a [R],
    /// NetChannel's headline number divided by TCP's.
    ratio: Option<f64>,
    /// NetChannel's headline number divided by MPTCP's (only when MPTCP ran).
    #[serde(skip_serializing_if = "Option::is_none")]
    ratio_mptcp: Option<f64>,
}

fn ratio<R: Report>(runs: &[R]) -> Option<f64> {
    ratio_to(runs, Stack::Tcp)
}

/// NetChannel's headline number divided by `base`'s, when both ran among several runs.
fn ratio_to<R: Report>(runs: &[R], base: Stack) -> Option<f64> {
    let of = |s: Stack| runs.iter().find(|r| r.stack() == s).map(|r| r.headline().0);
    match (of(Stack::Netchannel), of(base)) {
        (Some(nc), Some(tcp)) if runs.len() > 1 && tcp > 0.0 => Some(nc / tcp),
        _ => None,
    }
}

/// Bytes moved so far, shared by a worker thread (which adds) and [`watch`] (which reads).
#[derive(Debug, Default)]
pub struct Progress {
    bytes: AtomicU64,
    active: AtomicBool,
}

impl Progress {
    /// Count `n` more bytes.
    pub fn add(&self, n: u64) {
        self.bytes.fetch_add(n, Ordering::Relaxed);
    }
    /// Bytes counted so far.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
    /// Start the stall clock (a server waiting for its client is not stalled).
    pub fn activate(&self) {
        self.active.store(true, Ordering::Relaxed);
    }
    fn is_active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }
}

/// How [`watch`] reports on a run.
pub struct Watch {
    /// No progress line (`--json`).
    pub quiet: bool,
    /// Fail when an active run has not moved a byte for this long.
    pub stall_timeout: Duration,
    /// What the counted bytes are: "received" or "sent".
    pub label: &'static str,
}

/// Receive the worker threads' events on the calling thread until `on_event` says stop or
/// every sender is gone. Meanwhile, once a second (sleeping in between), show the bytes so far
/// and the last second's rate on a progress spinner ([`Bar`], drawn only when stderr is a
/// terminal) for runs longer than 2 s, and fail if an active run stalls.
pub fn watch<E>(
    events: &Receiver<E>,
    progress: &Progress,
    opts: &Watch,
    mut on_event: impl FnMut(E) -> ControlFlow<()>,
) -> Result<()> {
    const TICK: Duration = Duration::from_secs(1);
    const QUIET_FOR: Duration = Duration::from_secs(2);
    let start = Instant::now();
    let mut next_tick = start + TICK;
    let (mut last_bytes, mut last_tick) = (progress.bytes(), start);
    let mut last_move: Option<Instant> = None;
    let mut bar: Option<Bar> = None;
    let result = loop {
        match events.recv_timeout(next_tick.saturating_duration_since(Instant::now())) {
            Ok(event) => {
                if on_event(event).is_break() {
                    break Ok(());
                }
            }
            Err(RecvTimeoutError::Disconnected) => break Ok(()),
            Err(RecvTimeoutError::Timeout) => {
                let now = Instant::now();
                next_tick = now + TICK;
                let bytes = progress.bytes();
                if bytes != last_bytes || last_move.is_none() && progress.is_active() {
                    last_move = Some(now);
                }
                if let Some(t) = last_move {
                    if now - t >= opts.stall_timeout {
                        break Err(Error::from(format!(
                            "run stalled: no bytes {} for {:.0} s (--stall-timeout), {} {} so far",
                            opts.label,
                            opts.stall_timeout.as_secs_f64(),
                            bytes_human(bytes),
                            opts.label
                        )));
                    }
                }
                if !opts.quiet && now - start > QUIET_FOR {
                    let secs = (now - last_tick).as_secs_f64();
                    let rate = (bytes - last_bytes) as f64 * 8.0 / secs / 1e9;
                    bar.get_or_insert_with(Bar::spinner).set_message(format!(
                        "{:>12} {}, {rate:7.2} Gbit/s",
                        bytes_human(bytes),
                        opts.label
                    ));
                }
                (last_bytes, last_tick) = (bytes, now);
            }
        }
    };
    drop(bar); // cleared
    result
}

/// Start a named worker thread of a benchmark; its result travels over a channel, so the
/// handle is dropped.
pub fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<()> {
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(f)
        .map(drop)
        .map_err(|e| format!("cannot start the {name} thread: {}", crate::error::describe(&e)).into())
}

/// `1.50 GiB`, `64.0 KiB`, `512 B`.
pub fn bytes_human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else if v >= 100.0 {
        format!("{v:.0} {}", UNITS[unit])
    } else if v >= 10.0 {
        format!("{v:.1} {}", UNITS[unit])
    } else {
        format!("{v:.2} {}", UNITS[unit])
    }
}

/// clap parser: a size such as `1048576`, `64KiB`, `256MiB`, `1GiB`.
pub fn parse_size_u64(s: &str) -> std::result::Result<u64, String> {
    netchannel::config::parse_size(s)
}

/// clap parser: a size that fits in memory (`usize`).
pub fn parse_size_usize(s: &str) -> std::result::Result<usize, String> {
    let n = parse_size_u64(s)?;
    usize::try_from(n).map_err(|_| format!("{s:?} is too large"))
}

/// clap parser: a size of at least one byte.
pub fn parse_nonzero_size(s: &str) -> std::result::Result<u64, String> {
    match parse_size_u64(s)? {
        0 => Err("must be at least 1 byte".to_string()),
        n => Ok(n),
    }
}

/// clap parser: a buffer size for one read or write, 1 byte to 1 GiB.
pub fn parse_io_size(s: &str) -> std::result::Result<usize, String> {
    match parse_size_usize(s)? {
        n @ 1..=0x4000_0000 => Ok(n),
        n => Err(format!("{n} is out of range 1..=1GiB")),
    }
}

/// clap parser: a positive number of seconds, e.g. `5` or `0.5`.
pub fn parse_secs(s: &str) -> std::result::Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v < 1e9 => Ok(v),
        _ => Err(format!("{s:?} is not a positive number of seconds")),
    }
}

/// clap parser: MPTCP subflows per connection, 1 to 1 + the kernel's limit of extra ones.
pub fn parse_subflows(s: &str) -> std::result::Result<usize, String> {
    let max = 1 + netns::MPTCP_MAX_EXTRA_SUBFLOWS;
    match s.trim().parse::<usize>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(format!("{s:?} is not a number of subflows in 1..={max}")),
    }
}

/// clap parser: `round-robin` or `hash`.
pub fn parse_policy(s: &str) -> std::result::Result<Policy, String> {
    s.parse()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(args: &[&str]) -> CommonOpts {
        #[derive(clap::Parser)]
        struct T {
            #[command(flatten)]
            common: CommonOpts,
        }
        let mut argv = vec!["t"];
        argv.extend_from_slice(args);
        <T as clap::Parser>::try_parse_from(argv).unwrap().common
    }

    #[test]
    fn flags_override_config_defaults() {
        let c = opts(&["--channels", "8", "--segment-size", "32KiB", "--policy", "hash"])
            .engine_config()
            .unwrap();
        assert_eq!(c.throughput_channels, 8);
        assert_eq!(c.segment_size, 32 << 10);
        assert_eq!(c.policy, Policy::Hash);
        assert_eq!(c.channel_workers, Config::default().channel_workers);
    }

    #[test]
    fn docs_config_md_lists_every_engine_flag_with_its_key() {
        let doc = include_str!("../../../../docs/config.md");
        let table = &doc[doc.find("## CLI flags that override keys").expect("the flags section")..];
        let flags = <EngineFlags as Args>::augment_args(clap::Command::new("flags"));
        for arg in flags.get_arguments() {
            let long = arg.get_long().expect("every engine flag is a --long flag");
            let row = format!("| `--{long} ");
            let line = table
                .lines()
                .find(|l| l.starts_with(&row))
                .unwrap_or_else(|| panic!("--{long} is not in docs/config.md"));
            let cells = line.replace("\\|", "/");
            let key = cells.split('|').nth(2).map(str::trim).unwrap_or_default();
            assert!(
                key.starts_with(&format!("`{}`", arg.get_id())),
                "--{long} sets `{}`: {line}",
                arg.get_id()
            );
        }
    }

    #[test]
    fn flags_reach_every_kind_of_key() {
        let c = opts(&["--congestion", "reno", "--bulk-sndbuf", "128KiB", "--latency-spin-us", "5"])
            .engine_config()
            .unwrap();
        assert_eq!((c.channel_congestion.as_str(), c.bulk_sndbuf, c.latency_spin_us), ("reno", 128 << 10, 5));
        let e = opts(&["--congestion", "no such"]).engine_config().unwrap_err().to_string();
        assert!(e.starts_with("--congestion: ") && e.contains("channel_congestion"), "{e}");
    }

    #[test]
    fn invalid_knob_names_the_flag() {
        let e = opts(&["--channels", "0"]).engine_config().unwrap_err().to_string();
        assert!(e.starts_with("--channels: "), "{e}");
        assert!(e.contains("throughput_channels"), "{e}");
    }

    #[test]
    fn human_sizes() {
        assert_eq!(bytes_human(512), "512 B");
        assert_eq!(bytes_human(64 << 10), "64.0 KiB");
        assert_eq!(bytes_human(3 << 29), "1.50 GiB");
        assert_eq!(bytes_human(300 << 20), "300 MiB");
    }

    #[test]
    fn parsers() {
        assert_eq!(parse_nonzero_size("64KiB"), Ok(65536));
        assert!(parse_nonzero_size("0").is_err());
        assert!(parse_io_size("2GiB").is_err());
        assert_eq!(parse_secs("0.5"), Ok(0.5));
        assert!(parse_secs("-1").is_err());
        assert!(parse_secs("soon").is_err());
    }

    #[test]
    fn watch_returns_when_workers_finish_and_detects_stalls() {
        let (tx, rx) = std::sync::mpsc::channel::<u32>();
        let progress = Progress::default();
        let opts = Watch { quiet: true, stall_timeout: Duration::from_secs(60), label: "received" };
        tx.send(1).unwrap();
        drop(tx);
        let mut seen = vec![];
        watch(&rx, &progress, &opts, |e| {
            seen.push(e);
            ControlFlow::Continue(())
        })
        .unwrap();
        assert_eq!(seen, [1]);

        let (_tx, rx) = std::sync::mpsc::channel::<u32>();
        progress.activate();
        let opts = Watch { quiet: true, stall_timeout: Duration::from_secs(1), label: "received" };
        let e = watch(&rx, &progress, &opts, |_| ControlFlow::Continue(())).unwrap_err();
        assert!(e.to_string().contains("stalled"), "{e}");
    }
}
