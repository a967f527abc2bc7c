//! `bench pingpong`: request/response latency of one connection with one request in flight —
//! the L-app of experiment 6d measured alone (and the latency side of experiment 8c).
//!
//! The client thread connects (for NetChannel a vsocket of `--class`, latency by default) and
//! for `--warmup` plus `--duration` seconds writes a `--size` request of pattern bytes, reads
//! the whole `--size` response and records the round trip in an HDR histogram; round trips of
//! the warm-up are discarded. The server thread accepts and echoes every request. `--verify`
//! checks that each response is the request echoed. CPU is the whole process's over the
//! measured window, with each app thread's share beside it.

use std::time::{Duration, Instant};

use clap::Args;
use netchannel::Config;
use serde::Serialize;

use super::backend::{Connector, Listener, Net};
use super::pair::Pair;
use super::rpc::{self, parse_warmup, ClientResult, LatencyRun, ServerResult, TrafficClass, WindowClock};
use super::{bytes_human, parse_io_size, parse_secs, CommonOpts, Knobs, Progress, Report, Role, Stack};
use crate::error::{Error, Result};
use crate::pattern::Source;

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
    /// Round-trip latencies, the measured window, its CPU, knobs.
    #[serde(flatten)]
    pub run: LatencyRun,
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
        let knobs = self.run.knobs.describe();
        if !knobs.is_empty() {
            what += &format!(", {knobs}");
        }
        format!(
            "pingpong {what}: {} round trips of {} in {:.2} s ({:.0}/s); {}",
            self.samples,
            bytes_human(self.size as u64),
            self.run.seconds,
            self.round_trips_per_sec,
            self.run.human(),
        )
    }
}

/// The two ends of `bench pingpong`.
const PAIR: Pair = Pair::request_response("pingpong", "waiting for one ping-pong connection");

/// Run `bench pingpong` on every stack of `--backend` and print the reports.
pub fn run(args: &PingpongArgs) -> Result<()> {
    PAIR.run_stacks(&args.common, args.verify, |stack, config| run_one(stack, args, config))
}

fn run_one(stack: Stack, args: &PingpongArgs, config: &Config) -> Result<PingpongReport> {
    let common = &args.common;
    let size = args.size;
    let warmup = rpc::warmup(args.warmup, args.duration);
    let mut net = Net::open(stack, common, config)?;
    let (class, duration, verify) = (args.class, Duration::from_secs_f64(args.duration), args.verify);
    let (server_result, client_result) = PAIR.run(
        &mut net,
        common,
        move |listener, progress, done| done(server(listener, size, warmup, progress)),
        move |connector, progress| client(connector, class, size, warmup, duration, verify, progress),
    )?;
    net.shutdown();
    let knobs = Knobs::of(stack, config);
    let (samples, run) =
        LatencyRun::of(client_result.as_ref(), server_result.as_ref(), warmup, args.verify, knobs);
    Ok(PingpongReport {
        mode: "pingpong",
        backend: stack,
        role: common.role,
        class: matches!(stack, Stack::Netchannel | Stack::Daemon).then_some(args.class),
        size,
        samples,
        round_trips_per_sec: run.per_sec(samples as f64),
        run,
    })
}

/// The server app thread: accept one connection and echo requests until the client closes.
/// Its warm-up is timed from the accept.
fn server(listener: Listener, size: usize, warmup: Duration, progress: &Progress) -> Result<ServerResult> {
    let (mut conn, peer) = listener.accept()?;
    progress.activate();
    let mut clock = WindowClock::new(warmup);
    let mut buf = vec![0u8; size];
    let mut served = 0u64;
    while rpc::serve_one(&mut *conn, &mut buf).map_err(|e| Error::from(format!("{peer}: {e}")))? {
        if clock.check(Instant::now()) {
            served += 1;
        }
        progress.add(size as u64);
    }
    Ok(ServerResult { served, window: clock.finish() })
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
    let mut offset = 0u64;
    let result = rpc::measure(warmup, duration, size, progress, || {
        rpc::round_trip(&mut *conn, &source, offset, &mut response, verify)
            .map_err(|e| Error::from(format!("{target}: {e}")))?;
        offset += size as u64;
        Ok(())
    })?;
    rpc::close_and_wait(&mut *conn)
        .map_err(|e| Error::from(format!("closing the connection to {target}: {e}")))?;
    Ok(result)
}
