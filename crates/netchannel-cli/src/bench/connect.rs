//! `bench connect`: connection rate — open a connection, one request/response, close; again
//! and again (the "connect rate" measurement of EXPERIMENTS.md: NetChannel's channels are
//! already up, so a vsocket costs no TCP handshake).
//!
//! The client thread, sequentially for `--warmup` plus `--duration` seconds: connects, writes
//! a `--size` request of pattern bytes, reads the whole `--size` response, closes, and records
//! the time of all three in an HDR histogram (the warm-up's are discarded, and with them the
//! first NetChannel connect, which dials the channel mesh). The server thread accepts in a loop
//! and serves each connection inline (the client is sequential): it echoes the request, waits
//! for the client to close, and closes. The client ends the run with one connection that it
//! closes without a request. `--verify` checks every response.

use std::io::{self, Read};
use std::ops::ControlFlow;
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use netchannel::Config;
use serde::Serialize;

use super::backend::{Connector, Listener, Net};
use super::rpc::{self, parse_warmup, Percentiles, Recorder, Window, WindowClock};
use super::{
    bytes_human, emit, parse_io_size, parse_secs, spawn, watch, CommonOpts, Knobs, Progress, Report, Role,
    Stack, Watch,
};
use crate::error::{describe, Error, Result};
use crate::pattern::{self, Source};

/// Flags of `bench connect`.
#[derive(Args, Debug)]
pub struct ConnectArgs {
    /// Seconds of measured connections (after the warm-up)
    #[arg(long, value_name = "SECS", default_value_t = 3.0, value_parser = parse_secs)]
    pub duration: f64,

    /// Seconds of connections to discard first [default: 10% of --duration, at most 0.5]
    #[arg(long, value_name = "SECS", value_parser = parse_warmup)]
    pub warmup: Option<f64>,

    /// Size of the request and of the response on each connection
    #[arg(long, value_name = "SIZE", default_value = "4KiB", value_parser = parse_io_size)]
    pub size: usize,

    /// Check that every response is its request echoed; a mismatch fails the run
    #[arg(long)]
    pub verify: bool,

    #[command(flatten)]
    pub common: CommonOpts,
}

/// The result of one `bench connect` run.
#[derive(Serialize, Debug)]
pub struct ConnectReport {
    /// Always "connect".
    pub mode: &'static str,
    /// The stack measured.
    pub backend: Stack,
    /// Which end(s) ran in this process.
    pub role: Role,
    /// Request and response size in bytes.
    pub size: usize,
    /// Connections (connect + request/response + close) per second.
    pub connects_per_sec: f64,
    /// Connections measured (server-only run: connections served after its warm-up).
    pub samples: u64,
    /// Percentiles of connect + request/response + close (absent in a server-only run).
    #[serde(flatten)]
    pub latency: Option<Percentiles>,
    /// Length of the measured window (the warm-up excluded).
    pub seconds: f64,
    /// Warm-up discarded before the measured window.
    pub warmup_seconds: f64,
    /// User + system CPU seconds of the whole process during the measured window.
    pub cpu_seconds: f64,
    /// `cpu_seconds / seconds`: cores kept busy.
    pub cpu_cores: f64,
    /// CPU seconds of the client app thread in its measured window (null when not in this process).
    pub client_thread_cpu_seconds: Option<f64>,
    /// CPU seconds of the server app thread after its warm-up (null when not in this process).
    pub server_thread_cpu_seconds: Option<f64>,
    /// True only if `--verify` was given and every response matched (checked by the client).
    pub verified: bool,
    /// Engine knobs (null for TCP).
    #[serde(flatten)]
    pub knobs: Knobs,
}

impl Report for ConnectReport {
    fn stack(&self) -> Stack {
        self.backend
    }

    fn headline(&self) -> (f64, &'static str) {
        (self.connects_per_sec, "connections/s")
    }

    fn human(&self) -> String {
        let knobs = self.knobs.describe();
        let latency = match &self.latency {
            Some(p) => format!("{}; ", p.human()),
            None => String::new(),
        };
        let mut s = format!(
            "connect {}{}: {:.0} connections/s ({} in {:.2} s, {} request/response each); {latency}CPU {:.2} s ({:.2} cores){}",
            self.backend.name(),
            if knobs.is_empty() { String::new() } else { format!(" ({knobs})") },
            self.connects_per_sec,
            self.samples,
            self.seconds,
            bytes_human(self.size as u64),
            self.cpu_seconds,
            self.cpu_cores,
            if self.verified { ", verified" } else { "" },
        );
        let threads: Vec<String> =
            [("client", self.client_thread_cpu_seconds), ("server", self.server_thread_cpu_seconds)]
                .iter()
                .filter_map(|(name, v)| v.map(|v| format!("{name} {v:.2} s")))
                .collect();
        if !threads.is_empty() {
            s += &format!(", app threads: {}", threads.join(", "));
        }
        s
    }
}

/// Run `bench connect` on every stack of `--backend` and print the reports.
pub fn run(args: &ConnectArgs) -> Result<()> {
    let config = args.common.engine_config()?;
    let stacks = args.common.backend.stacks();
    if stacks.len() > 1 && args.common.role != Role::Both {
        return Err("--backend both needs --role both (run server and client once per backend)".into());
    }
    if args.verify && args.common.role == Role::Server {
        eprintln!("netchannel: note: --verify is checked by the client; give it to the client");
    }
    pattern::byte_at(0); // build the table before anything is timed
    let mut reports = Vec::new();
    for stack in stacks {
        reports.push(run_one(stack, args, &config)?);
    }
    emit("connect", args.common.json, &reports)
}

struct ClientResult {
    latencies: Recorder,
    window: Window,
}

struct ServerResult {
    connections: u64,
    window: Window,
}

enum Event {
    Client(Result<ClientResult>),
    Server(Result<ServerResult>),
}

fn run_one(stack: Stack, args: &ConnectArgs, config: &Config) -> Result<ConnectReport> {
    let common = &args.common;
    let role = common.role;
    let size = args.size;
    let warmup = rpc::warmup(args.warmup, args.duration);
    let mut net = Net::open(stack, common, config)?;
    let progress = Arc::new(Progress::default());
    let (tx, rx) = mpsc::channel();
    let mut expected = 0;
    if role.has_server() {
        let listener = net.listen()?;
        if role == Role::Server {
            eprintln!(
                "netchannel: listening on {}; serving connections until the client says it is done",
                listener.describe()
            );
        }
        let (progress, tx) = (progress.clone(), tx.clone());
        spawn("connect-server", move || server(listener, size, warmup, &progress, &tx))?;
        expected += 1;
    }
    if role.has_client() {
        let connector = net.connector()?;
        let counted = (role == Role::Client).then(|| progress.clone());
        let tx = tx.clone();
        let (duration, verify) = (Duration::from_secs_f64(args.duration), args.verify);
        spawn("connect-client", move || {
            let result = client(&connector, size, warmup, duration, verify, counted.as_deref());
            let _ = tx.send(Event::Client(result));
        })?;
        expected += 1;
    }
    drop(tx);
    if role != Role::Server {
        progress.activate();
    }

    let (mut client_result, mut server_result) = (None, None);
    let opts = Watch {
        quiet: true,
        stall_timeout: Duration::from_secs_f64(common.stall_timeout),
        label: "received",
    };
    watch(&rx, &progress, &opts, |event| {
        let failed = match event {
            Event::Client(r) => client_result.insert(r).is_err(),
            Event::Server(r) => server_result.insert(r).is_err(),
        };
        let done = client_result.iter().count() + server_result.iter().count() == expected;
        if failed || done {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })?;
    let client_result = client_result.transpose()?;
    let server_result = server_result.transpose()?;
    let lost =
        |side: &str| Error::from(format!("the {side} thread stopped without a result (see the panic above)"));
    if role.has_server() && server_result.is_none() {
        return Err(lost("server"));
    }
    if role.has_client() && client_result.is_none() {
        return Err(lost("client"));
    }
    net.shutdown();

    let (samples, latency, window) = match (&client_result, &server_result) {
        (Some(c), _) => (c.latencies.samples(), c.latencies.percentiles(), &c.window),
        (None, Some(s)) => (s.connections, None, &s.window),
        (None, None) => unreachable!("a role has at least one end"),
    };
    let seconds = window.seconds;
    let per_sec = |v: f64| if seconds > 0.0 { v / seconds } else { 0.0 };
    Ok(ConnectReport {
        mode: "connect",
        backend: stack,
        role,
        size,
        connects_per_sec: per_sec(samples as f64),
        samples,
        latency,
        seconds,
        warmup_seconds: warmup.as_secs_f64(),
        cpu_seconds: window.process_cpu,
        cpu_cores: per_sec(window.process_cpu),
        client_thread_cpu_seconds: client_result.as_ref().map(|c| c.window.thread_cpu),
        server_thread_cpu_seconds: server_result.as_ref().map(|s| s.window.thread_cpu),
        verified: args.verify && client_result.is_some(),
        knobs: Knobs::of(stack, config),
    })
}

/// The server app thread: accept connections one after another and serve each inline, until
/// a connection closes without a request. Its warm-up is timed from the first accept.
fn server(listener: Listener, size: usize, warmup: Duration, progress: &Progress, tx: &Sender<Event>) {
    let result = (|| {
        let mut buf = vec![0u8; size];
        let mut clock = None;
        let mut connections = 0u64;
        loop {
            let (mut conn, peer) = listener.accept()?;
            let clock = clock.get_or_insert_with(|| {
                progress.activate();
                WindowClock::new(warmup)
            });
            if !rpc::serve_one(&mut *conn, &mut buf).map_err(|e| Error::from(format!("{peer}: {e}")))? {
                return Ok(ServerResult { connections, window: clock.finish() });
            }
            // The client closes first (it times its close); then this end closes.
            let mut scratch = [0u8; 64];
            loop {
                match conn.read(&mut scratch) {
                    Ok(0) => break,
                    Ok(_) => return Err(format!("{peer} sent more than one request on a connection").into()),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break,
                    Err(e) => {
                        return Err(
                            format!("{peer}: waiting for the client to close: {}", describe(&e)).into()
                        )
                    }
                }
            }
            drop(conn);
            if clock.check(Instant::now()) {
                connections += 1;
            }
            progress.add(size as u64);
        }
    })();
    let _ = tx.send(Event::Server(result));
}

/// The client app thread: connect, one request/response, close, for `warmup + duration`;
/// then one connection closed without a request, which tells the server the run is over.
fn client(
    connector: &Connector,
    size: usize,
    warmup: Duration,
    duration: Duration,
    verify: bool,
    progress: Option<&Progress>,
) -> Result<ClientResult> {
    let source = Source::new(size);
    let target = connector.target();
    let mut response = vec![0u8; size];
    let mut latencies = Recorder::new();
    let mut clock = WindowClock::new(warmup);
    let end = clock.from + duration;
    loop {
        let t0 = Instant::now();
        let measuring = clock.check(t0);
        if t0 >= end {
            break;
        }
        let mut conn = connector.connect()?;
        rpc::round_trip(&mut *conn, &source, 0, &mut response, verify)
            .map_err(|e| Error::from(format!("{target}: {e}")))?;
        drop(conn);
        if measuring {
            latencies.record(t0.elapsed());
        }
        if let Some(p) = progress {
            p.add(size as u64);
        }
    }
    let window = clock.finish();
    let mut last = connector.connect()?;
    rpc::close_and_wait(&mut *last)
        .map_err(|e| Error::from(format!("closing the last connection to {target}: {e}")))?;
    Ok(ClientResult { latencies, window })
}
