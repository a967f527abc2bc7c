//! `bench stream`: one bulk byte stream, one app thread per end (experiments 6a/6b and 8a).
//!
//! The sender thread connects and writes the deterministic [`pattern`](crate::pattern) in
//! `--write-size` writes (straight out of a [`Source`], no copy) for `--duration` seconds or
//! `--bytes` bytes, half-closes, and waits for the receiver to close. The receiver thread
//! accepts, reads in `--write-size` reads until EOF and, with `--verify`, checks every byte.
//! Throughput is the receiver's: bytes received over the time from accept to EOF. CPU is the
//! whole process's (app threads, channel workers, copy workers) over the transfer, with each
//! app thread's own share beside it. Over MPTCP, each end also samples the connection's
//! subflows (every 200 ms and at the end) to report how many were established and the bytes
//! each carried.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use clap::Args;
use netchannel::Config;
use serde::Serialize;

use super::backend::{Conn, Connector, Net};
use super::mptcp::Subflows;
use super::pair::Pair;
use super::transfer::{self, Meter, Transfer, TransferCpu};
use super::{
    bytes_human, emit, parse_io_size, parse_nonzero_size, parse_secs, CommonOpts, Knobs, Progress, Report,
    Role, Stack,
};
use crate::cpu;
use crate::error::{describe, Error, Result};
use crate::pattern::{self, Source};

/// Flags of `bench stream`.
#[derive(Args, Debug)]
pub struct StreamArgs {
    /// Seconds the sender writes for [default: 5, unless --bytes is given]
    #[arg(long, value_name = "SECS", value_parser = parse_secs, conflicts_with = "bytes")]
    pub duration: Option<f64>,

    /// Bytes to send instead of a duration, e.g. 1048576, 64KiB, 256MiB, 1GiB
    #[arg(long, value_name = "SIZE", value_parser = parse_nonzero_size)]
    pub bytes: Option<u64>,

    /// Size of each app write and read (the paper's app writes 10 MB at a time)
    #[arg(long, value_name = "SIZE", default_value = "10MiB", value_parser = parse_io_size)]
    pub write_size: usize,

    /// Check every received byte against the pattern; a mismatch fails the run
    #[arg(long)]
    pub verify: bool,

    /// Test hook: the sender flips one bit of the byte at this stream offset
    #[arg(long, value_name = "OFFSET", hide = true)]
    pub corrupt_at: Option<u64>,

    #[command(flatten)]
    pub common: CommonOpts,
}

/// When the sender stops.
#[derive(Debug, Clone, Copy)]
enum Limit {
    Duration(Duration),
    Bytes(u64),
}

/// The result of one `bench stream` run.
#[derive(Serialize, Debug)]
pub struct StreamReport {
    /// Always "stream".
    pub mode: &'static str,
    /// The stack measured.
    pub backend: Stack,
    /// Which end(s) ran in this process.
    pub role: Role,
    /// Gbit/s: `bytes * 8 / seconds / 1e9`.
    pub gbps: f64,
    /// Bytes received (or, for a client-only run, sent and acknowledged by the server's close).
    pub bytes: u64,
    /// Receiver: accept to EOF (client-only run: connect to the server's close).
    pub seconds: f64,
    /// True only if `--verify` was given and every byte matched.
    pub verified: bool,
    /// Client → server bytes per throughput channel, index order (see `Net`); for MPTCP, per
    /// subflow (received by the server, or acknowledged to a client-only run); empty for TCP.
    pub channel_bytes: Vec<u64>,
    /// CPU of the process and of each app thread.
    #[serde(flatten)]
    pub cpu: TransferCpu,
    /// Engine knobs (null for TCP).
    #[serde(flatten)]
    pub knobs: Knobs,
    /// App write/read size in bytes.
    pub write_size: usize,
    /// MPTCP: subflows per connection the path manager was set up for (null otherwise, and
    /// for --role server/client, where the machine's own MPTCP settings apply).
    pub subflows: Option<usize>,
    /// MPTCP: the most subflows the connection had at once, the initial one included (1 if it
    /// fell back to TCP); null for other stacks.
    pub subflows_established: Option<usize>,
    /// Whether the ends ran in two network namespaces joined by a veth pair (--netns).
    pub netns: bool,
    /// The veth pair's tbf rate limit in bits per second (--rate), or null.
    pub rate_bps: Option<u64>,
}

impl Report for StreamReport {
    fn stack(&self) -> Stack {
        self.backend
    }

    fn headline(&self) -> (f64, &'static str) {
        (self.gbps, "Gbit/s")
    }

    fn human(&self) -> String {
        let mut knobs = self.knobs.describe();
        if let Some(est) = self.subflows_established {
            knobs = match self.subflows {
                Some(n) => format!("{n} subflow{}, {est} established", if n == 1 { "" } else { "s" }),
                None => format!("{est} subflow{} established", if est == 1 { "" } else { "s" }),
            };
        }
        if self.netns {
            let rate =
                self.rate_bps.map(|r| format!(", tbf {:.3} Gbit/s", r as f64 / 1e9)).unwrap_or_default();
            knobs += &format!("{}netns veth{rate}", if knobs.is_empty() { "" } else { "; " });
        }
        format!(
            "stream {}{}: {:.2} Gbit/s, {} in {:.2} s{}; {}{}",
            self.backend.name(),
            if knobs.is_empty() { String::new() } else { format!(" ({knobs})") },
            self.gbps,
            bytes_human(self.bytes),
            self.seconds,
            if self.verified { ", verified" } else { "" },
            self.cpu.human(),
            transfer::per_channel_human(
                if self.backend == Stack::Mptcp { "subflow" } else { "channel" },
                &self.channel_bytes
            ),
        )
    }
}

/// The two ends of `bench stream`.
const PAIR: Pair = Pair::one_way("stream", "waiting for one stream");

/// Run `bench stream` on every stack of `--backend` and print the reports.
pub fn run(args: &StreamArgs) -> Result<()> {
    let config = args.common.engine_config()?;
    let stacks = args.common.backend.stacks();
    if stacks.len() > 1 && args.common.role != Role::Both {
        let name = args.common.backend.name();
        return Err(
            format!("--backend {name} needs --role both (run server and client once per backend)").into()
        );
    }
    if stacks.contains(&Stack::Mptcp) && args.common.role != Role::Both {
        eprintln!(
            "netchannel: note: across machines MPTCP uses their own path manager settings \
             (`ip mptcp endpoint`, `ip mptcp limits`); --subflows applies to --role both only"
        );
    }
    PAIR.note_verify(args.common.role, args.verify);
    let limit = match (args.bytes, args.duration) {
        (Some(b), _) => Limit::Bytes(b),
        (None, Some(d)) => Limit::Duration(Duration::from_secs_f64(d)),
        (None, None) => Limit::Duration(Duration::from_secs(5)),
    };
    pattern::byte_at(0); // build the table before anything is timed
    let mut reports = Vec::new();
    for stack in stacks {
        reports.push(run_one(stack, args, &config, limit)?);
    }
    emit("stream", args.common.json, &reports)
}

/// What the sender wrote, and its subflows.
struct Sent {
    transfer: Transfer,
    subflows: SubflowLog,
}

/// What the receiver got, from where, and its subflows.
struct Received {
    transfer: Transfer,
    peer: SocketAddr,
    subflows: SubflowLog,
}

/// What one end saw of its MPTCP connection's subflows (nothing for other stacks).
#[derive(Default)]
struct SubflowLog {
    /// The most subflows seen at once.
    most: usize,
    /// The latest sample.
    last: Option<Subflows>,
    /// The first sampling error, if any.
    error: Option<String>,
    /// When to sample next.
    next: Option<Instant>,
}

impl SubflowLog {
    const EVERY: Duration = Duration::from_millis(200);

    /// Sample now.
    fn sample(&mut self, conn: &dyn Conn) {
        match conn.subflows() {
            None => {}
            Some(Ok(s)) => {
                self.most = self.most.max(s.count);
                self.last = Some(s);
            }
            Some(Err(e)) => {
                self.error.get_or_insert_with(|| describe(&e));
            }
        }
        self.next = Some(Instant::now() + Self::EVERY);
    }

    /// Sample if the last sample is [`Self::EVERY`] old.
    fn tick(&mut self, conn: &dyn Conn) {
        match self.next {
            Some(t) if Instant::now() < t => {}
            _ => self.sample(conn),
        }
    }
}

fn run_one(stack: Stack, args: &StreamArgs, config: &Config, limit: Limit) -> Result<StreamReport> {
    let common = &args.common;
    let mut net = Net::open(stack, common, config)?;
    let (verify, size, corrupt_at) = (args.verify, args.write_size, args.corrupt_at);
    let (received, sent) = PAIR.run(
        &mut net,
        common,
        move |listener, progress, done| {
            transfer::receiver(listener, progress, done, |conn, peer| {
                receive(conn, peer, verify, size, progress)
            })
        },
        move |connector, progress| sender(connector, limit, size, corrupt_at, progress),
    )?;
    let process_cpu_at_end = cpu::process_seconds();
    let totals = transfer::totals(
        received.as_ref().map(|r| &r.transfer),
        sent.as_ref().map(|s| &s.transfer),
        process_cpu_at_end,
    )?;
    if let (Limit::Bytes(want), Some(r)) = (limit, &received) {
        if r.transfer.bytes != want {
            return Err(
                format!("the stream ended early: received {} of {want} bytes", r.transfer.bytes).into()
            );
        }
    }

    let mut channel_bytes = net.client_to_server_channel_bytes(received.as_ref().map(|r| r.peer.ip()));
    let subflows_established = (stack == Stack::Mptcp).then(|| {
        let logs = [received.as_ref().map(|r| &r.subflows), sent.as_ref().map(|s| &s.subflows)];
        let logs: Vec<&SubflowLog> = logs.into_iter().flatten().collect();
        if let Some(e) = logs.iter().find_map(|l| l.error.as_deref()) {
            eprintln!("netchannel: warning: cannot read the MPTCP subflows (MPTCP_TCPINFO): {e}");
        }
        if logs.iter().any(|l| l.last.as_ref().is_some_and(|s| s.fallback)) {
            eprintln!("netchannel: warning: the MPTCP connection fell back to plain TCP");
        }
        // The receiver's counts of received bytes, else the sender's of acknowledged ones.
        let per_subflow = match (&received, &sent) {
            (Some(r), _) => r.subflows.last.as_ref().map(|s| s.bytes_received.clone()),
            (None, Some(s)) => s.subflows.last.as_ref().map(|s| s.bytes_acked.clone()),
            (None, None) => None,
        };
        channel_bytes = per_subflow.unwrap_or_default();
        logs.iter().map(|l| l.most).max().unwrap_or(0)
    });
    if let (Some(want), Some(got)) = (net.subflows(), subflows_established) {
        if got < want {
            eprintln!("netchannel: note: MPTCP established {got} of {want} subflows");
        }
    }
    let (netns, rate_bps) = match net.netns() {
        Some(t) => (true, t.rate().map(|r| r.bits_per_sec())),
        None => (false, None),
    };
    let subflows = net.subflows();
    net.shutdown();
    Ok(StreamReport {
        mode: "stream",
        backend: stack,
        role: common.role,
        gbps: totals.per_sec(totals.bytes as f64 * 8.0 / 1e9),
        bytes: totals.bytes,
        seconds: totals.seconds,
        verified: args.verify && received.is_some(),
        channel_bytes,
        cpu: totals.cpu,
        knobs: Knobs::of(stack, config),
        write_size: args.write_size,
        subflows,
        subflows_established,
        netns,
        rate_bps,
    })
}

/// The receiving app thread's work: [`transfer::receive`], sampling the MPTCP subflows.
fn receive(
    conn: &mut dyn Conn,
    peer: SocketAddr,
    verify: bool,
    size: usize,
    progress: &Progress,
) -> Result<Received> {
    let mut subflows = SubflowLog::default();
    let transfer = transfer::receive(conn, peer, verify, size, progress, |c| subflows.tick(c))?;
    subflows.sample(conn);
    Ok(Received { transfer, peer, subflows })
}

/// The sending app thread's work: connect, write the pattern, half-close, wait for the
/// receiver to close (so "sent" means "received and closed by the receiver").
fn sender(
    connector: &Connector,
    limit: Limit,
    size: usize,
    corrupt_at: Option<u64>,
    progress: Option<&Progress>,
) -> Result<Sent> {
    let source = Source::new(size);
    let meter = Meter::start();
    let mut conn = connector.connect()?;
    let target = connector.target();
    let mut offset = 0u64;
    let mut subflows = SubflowLog::default();
    loop {
        subflows.tick(&*conn);
        let len = match limit {
            Limit::Bytes(total) => (total - offset).min(size as u64) as usize,
            Limit::Duration(d) if meter.elapsed() < d => size,
            Limit::Duration(_) => 0,
        };
        if len == 0 {
            break;
        }
        let chunk = source.slice(offset, len);
        let corrupted;
        let chunk = match corrupt_at.and_then(|at| at.checked_sub(offset)).filter(|&i| i < len as u64) {
            Some(i) => {
                let mut copy = chunk.to_vec();
                copy[i as usize] ^= 0x01;
                corrupted = copy;
                &corrupted[..]
            }
            None => chunk,
        };
        conn.write_all(chunk).map_err(|e| {
            Error::from(format!("write to {target} failed at stream offset {offset}: {}", describe(&e)))
        })?;
        offset += len as u64;
        if let Some(p) = progress {
            p.add(len as u64);
        }
    }
    let finish = |what: &str, e: io::Error| {
        Error::from(format!("{what} on the stream to {target} failed: {}", describe(&e)))
    };
    conn.flush().map_err(|e| finish("flush", e))?;
    subflows.sample(&*conn);
    conn.shutdown_write().map_err(|e| finish("shutdown(Write)", e))?;
    // Linger until the receiver has read everything and closed its end.
    let mut scratch = [0u8; 4096];
    loop {
        match conn.read(&mut scratch) {
            Ok(0) => break,
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(e.kind(), io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted) =>
            {
                break
            }
            Err(e) => return Err(finish("waiting for the receiver to close", e)),
        }
    }
    Ok(Sent { transfer: meter.finish(offset), subflows })
}
