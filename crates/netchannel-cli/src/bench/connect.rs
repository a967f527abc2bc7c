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
use std::time::{Duration, Instant};

use clap::Args;
use netchannel::Config;
use serde::Serialize;

use super::backend::{Connector, Listener, Net};
use super::pair::Pair;
use super::rpc::{self, parse_warmup, ClientResult, LatencyRun, ServerResult, WindowClock};
use super::{bytes_human, parse_io_size, parse_secs, CommonOpts, Knobs, Progress, Report, Role, Stack};
use crate::error::{describe, Error, Result};
use crate::pattern::Source;

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

    /// Open NetChannel vsockets optimistically (config `optimistic_open`): the OPEN leaves
    /// with the request, no round trip first. Embedded hosts only; TCP runs as usual
    #[arg(long)]
    pub optimistic: bool,

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
    /// NetChannel vsockets were opened optimistically (`--optimistic`).
    pub optimistic: bool,
    /// The NetChannel hosts announced their listening ports (`announce_listeners`, flag
    /// `--announce-listeners`): a confirmed connect to the server's port (announced once the
    /// mesh is up, within the warm-up) then returns without waiting for OPEN_OK. False for
    /// TCP, and for a run with announcements off, whose confirmed connects each wait a round
    /// trip (the daemon answers an app's blocking connect to an announced port at once too).
    pub announced: bool,
    /// Latencies of connect + request/response + close, the measured window, its CPU, knobs.
    #[serde(flatten)]
    pub run: LatencyRun,
}

impl Report for ConnectReport {
    fn stack(&self) -> Stack {
        self.backend
    }

    fn headline(&self) -> (f64, &'static str) {
        (self.connects_per_sec, "connections/s")
    }

    fn human(&self) -> String {
        let knobs = self.run.knobs.describe();
        format!(
            "connect {}{}{}: {:.0} connections/s ({} in {:.2} s, {} request/response each); {}",
            self.backend.name(),
            match (self.backend, self.optimistic, self.announced) {
                (Stack::Tcp | Stack::Mptcp, ..) => "",
                (_, true, _) => " optimistic",
                (_, false, true) => " confirmed, announced port",
                (_, false, false) => " confirmed, round trip",
            },
            if knobs.is_empty() { String::new() } else { format!(" ({knobs})") },
            self.connects_per_sec,
            self.samples,
            self.run.seconds,
            bytes_human(self.size as u64),
            self.run.human(),
        )
    }
}

/// The two ends of `bench connect`.
const PAIR: Pair = Pair::request_response("connect", "serving connections until the client says it is done");

/// Run `bench connect` on every stack of `--backend` and print the reports.
pub fn run(args: &ConnectArgs) -> Result<()> {
    PAIR.run_stacks(&args.common, args.verify, |stack, config| run_one(stack, args, config))
}

fn run_one(stack: Stack, args: &ConnectArgs, config: &Config) -> Result<ConnectReport> {
    let common = &args.common;
    let optimistic = args.optimistic && stack == Stack::Netchannel;
    if args.optimistic && stack == Stack::Daemon {
        return Err(Error::from(
            "--optimistic applies to embedded NetChannel hosts: a daemon's connects are always confirmed",
        ));
    }
    let mut config = config.clone();
    config.optimistic_open |= optimistic;
    let config = &config;
    let size = args.size;
    let warmup = rpc::warmup(args.warmup, args.duration);
    let mut net = Net::open(stack, common, config)?;
    let (duration, verify) = (Duration::from_secs_f64(args.duration), args.verify);
    let (server_result, client_result) = PAIR.run(
        &mut net,
        common,
        move |listener, progress, done| done(server(listener, size, warmup, progress)),
        move |connector, progress| client(connector, size, warmup, duration, verify, progress),
    )?;
    net.shutdown();
    let knobs = Knobs::of(stack, config);
    let (samples, run) =
        LatencyRun::of(client_result.as_ref(), server_result.as_ref(), warmup, args.verify, knobs);
    Ok(ConnectReport {
        mode: "connect",
        backend: stack,
        role: common.role,
        size,
        connects_per_sec: run.per_sec(samples as f64),
        samples,
        optimistic: config.optimistic_open && stack == Stack::Netchannel,
        // A daemon answers an app's blocking connect to an announced port at once, too.
        announced: config.announce_listeners && matches!(stack, Stack::Netchannel | Stack::Daemon),
        run,
    })
}

/// The server app thread: accept connections one after another and serve each inline, until
/// a connection closes without a request. Its warm-up is timed from the first accept.
fn server(listener: Listener, size: usize, warmup: Duration, progress: &Progress) -> Result<ServerResult> {
    let mut buf = vec![0u8; size];
    let mut clock = None;
    let mut served = 0u64;
    loop {
        let (mut conn, peer) = listener.accept()?;
        let clock = clock.get_or_insert_with(|| {
            progress.activate();
            WindowClock::new(warmup)
        });
        if !rpc::serve_one(&mut *conn, &mut buf).map_err(|e| Error::from(format!("{peer}: {e}")))? {
            return Ok(ServerResult { served, window: clock.finish() });
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
                    return Err(format!("{peer}: waiting for the client to close: {}", describe(&e)).into())
                }
            }
        }
        drop(conn);
        if clock.check(Instant::now()) {
            served += 1;
        }
        progress.add(size as u64);
    }
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
    let result = rpc::measure(warmup, duration, size, progress, || {
        let mut conn = connector.connect()?;
        rpc::round_trip(&mut *conn, &source, 0, &mut response, verify)
            .map_err(|e| Error::from(format!("{target}: {e}")))?;
        drop(conn);
        Ok(())
    })?;
    let mut last = connector.connect()?;
    rpc::close_and_wait(&mut *last)
        .map_err(|e| Error::from(format!("closing the last connection to {target}: {e}")))?;
    Ok(result)
}
