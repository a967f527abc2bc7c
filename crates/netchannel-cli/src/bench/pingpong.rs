//! `bench pingpong`: request/response latency of one connection with one request in flight —
//! the L-app of experiment 6d measured alone (and the latency side of experiment 8c).
//!
//! The client thread connects (for NetChannel a vsocket of `--class`, latency by default) and
//! for `--warmup` plus `--duration` seconds writes a `--size` request of pattern bytes, reads
//! the whole `--size` response and records the round trip in an HDR histogram; round trips of
//! the warm-up are discarded. The server thread accepts and echoes every request. `--verify`
//! checks that each response is the request echoed. CPU is the whole process's over the
//! measured window, with each app thread's share beside it.

use std::ops::ControlFlow;
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use netchannel::Config;
use serde::Serialize;

use super::backend::{Connector, Listener, Net};
use super::rpc::{self, parse_warmup, Percentiles, Recorder, TrafficClass, Window, WindowClock};
use super::{
    bytes_human, emit, parse_io_size, parse_secs, spawn, watch, CommonOpts, Knobs, Progress, Report, Role,
    Stack, Watch,
};
use crate::error::{Error, Result};
use crate::pattern::{self, Source};

/// Flags of `bench pingpong`.
#[derive(Args, Debug)]
pub struct PingpongArgs {
    /// Seconds of measured round trips (after the warm-up)
    #[arg(long, value_name = "SECS", default_value_t = 5.0, value_parser = parse_secs)]
    pub duration: f64,

    /// Seconds of round trips to discard first [default: 10% of --duration, at most 0.5]
    #[arg(long, value_name = "SECS", value_parser = parse_warmup)]
    pub warmup: Option<f64>,

    /// Size of each request and of its response
    #[arg(long, value_name = "SIZE", default_value = "4KiB", value_parser = parse_io_size)]
    pub size: usize,

    /// NetChannel: traffic class of the vsocket (tcp has none)
    #[arg(long, value_enum, default_value_t = TrafficClass::Latency)]
    pub class: TrafficClass,

    /// Check that every response is its request echoed; a mismatch fails the run
    #[arg(long)]
    pub verify: bool,

    #[command(flatten)]
    pub common: CommonOpts,
}

/// The result of one `bench pingpong` run.
#[derive(Serialize, Debug)]
pub struct PingpongReport {
    /// Always "pingpong".
    pub mode: &'static str,
    /// The stack measured.
    pub backend: Stack,
    /// Which end(s) ran in this process.
    pub role: Role,
    /// The vsocket's traffic class (null for TCP).
    pub class: Option<TrafficClass>,
    /// Request and response size in bytes.
    pub size: usize,
    /// Round trips measured (server-only run: requests served after its warm-up).
    pub samples: u64,
    /// `samples / seconds`.
    pub round_trips_per_sec: f64,
    /// Round-trip latency percentiles (absent in a server-only run, which times nothing).
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

impl Report for PingpongReport {
    fn stack(&self) -> Stack {
        self.backend
    }

    fn headline(&self) -> (f64, &'static str) {
        (self.round_trips_per_sec, "round trips/s")
    }

    fn human(&self) -> String {
        let mut what = self.backend.name().to_string();
        if let Some(c) = self.class {
            what += &format!(", {} class", c.name());
        }
        let knobs = self.knobs.describe();
        if !knobs.is_empty() {
            what += &format!(", {knobs}");
        }
        let latency = match &self.latency {
            Some(p) => format!("{}; ", p.human()),
            None => String::new(),
        };
        let mut s = format!(
            "pingpong {what}: {} round trips of {} in {:.2} s ({:.0}/s); {latency}CPU {:.2} s ({:.2} cores){}",
            self.samples,
            bytes_human(self.size as u64),
            self.seconds,
            self.round_trips_per_sec,
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

/// Run `bench pingpong` on every stack of `--backend` and print the reports.
pub fn run(args: &PingpongArgs) -> Result<()> {
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
    emit("pingpong", args.common.json, &reports)
}

struct ClientResult {
    latencies: Recorder,
    window: Window,
}

struct ServerResult {
    requests: u64,
    window: Window,
}

enum Event {
    Client(Result<ClientResult>),
    Server(Result<ServerResult>),
}

fn run_one(stack: Stack, args: &PingpongArgs, config: &Config) -> Result<PingpongReport> {
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
                "netchannel: listening on {}; waiting for one ping-pong connection",
                listener.describe()
            );
        }
        let (progress, tx) = (progress.clone(), tx.clone());
        spawn("pingpong-server", move || server(listener, size, warmup, &progress, &tx))?;
        expected += 1;
    }
    if role.has_client() {
        let connector = net.connector()?;
        let counted = (role == Role::Client).then(|| progress.clone());
        let tx = tx.clone();
        let (class, duration, verify) = (args.class, Duration::from_secs_f64(args.duration), args.verify);
        spawn("pingpong-client", move || {
            let result = client(&connector, class, size, warmup, duration, verify, counted.as_deref());
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
    // The client's error (e.g. a verify failure) explains the server's.
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
        (None, Some(s)) => (s.requests, None, &s.window),
        (None, None) => unreachable!("a role has at least one end"),
    };
    let seconds = window.seconds;
    let per_sec = |v: f64| if seconds > 0.0 { v / seconds } else { 0.0 };
    Ok(PingpongReport {
        mode: "pingpong",
        backend: stack,
        role,
        class: (stack == Stack::Netchannel).then_some(args.class),
        size,
        samples,
        round_trips_per_sec: per_sec(samples as f64),
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

/// The server app thread: accept one connection and echo requests until the client closes.
/// Its warm-up is timed from the accept.
fn server(listener: Listener, size: usize, warmup: Duration, progress: &Progress, tx: &Sender<Event>) {
    let result = (|| {
        let (mut conn, peer) = listener.accept()?;
        progress.activate();
        let mut clock = WindowClock::new(warmup);
        let mut buf = vec![0u8; size];
        let mut requests = 0u64;
        while rpc::serve_one(&mut *conn, &mut buf).map_err(|e| Error::from(format!("{peer}: {e}")))? {
            if clock.check(Instant::now()) {
                requests += 1;
            }
            progress.add(size as u64);
        }
        Ok(ServerResult { requests, window: clock.finish() })
    })();
    let _ = tx.send(Event::Server(result));
}

/// The client app thread: ping-pong for `warmup + duration`, recording round trips after the
/// warm-up, then close and wait for the server to close.
fn client(
    connector: &Connector,
    class: TrafficClass,
    size: usize,
    warmup: Duration,
    duration: Duration,
    verify: bool,
    progress: Option<&Progress>,
) -> Result<ClientResult> {
    let source = Source::new(size);
    let target = connector.target();
    let mut conn = connector.connect_class(class.class())?;
    let mut response = vec![0u8; size];
    let mut latencies = Recorder::new();
    let mut clock = WindowClock::new(warmup);
    let end = clock.from + duration;
    let mut offset = 0u64;
    loop {
        let t0 = Instant::now();
        let measuring = clock.check(t0);
        if t0 >= end {
            break;
        }
        rpc::round_trip(&mut *conn, &source, offset, &mut response, verify)
            .map_err(|e| Error::from(format!("{target}: {e}")))?;
        if measuring {
            latencies.record(t0.elapsed());
        }
        offset += size as u64;
        if let Some(p) = progress {
            p.add(size as u64);
        }
    }
    let window = clock.finish();
    rpc::close_and_wait(&mut *conn)
        .map_err(|e| Error::from(format!("closing the connection to {target}: {e}")))?;
    Ok(ClientResult { latencies, window })
}
