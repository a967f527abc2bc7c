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
use std::ops::ControlFlow;
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use clap::Args;
use netchannel::Config;
use serde::Serialize;

use super::backend::{Conn, Connector, Listener, Net};
use super::mptcp::Subflows;
use super::{
    bytes_human, emit, parse_io_size, parse_nonzero_size, parse_secs, watch, CommonOpts, Knobs, Progress,
    Report, Role, Stack, Watch,
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
    /// User + system CPU seconds of the whole process during the transfer.
    pub cpu_seconds: f64,
    /// `cpu_seconds / seconds`: cores kept busy.
    pub cpu_cores: f64,
    /// CPU seconds of the sending app thread (null when not in this process).
    pub sender_thread_cpu_seconds: Option<f64>,
    /// CPU seconds of the receiving app thread (null when not in this process).
    pub receiver_thread_cpu_seconds: Option<f64>,
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
        let mut s = format!(
            "stream {}{}: {:.2} Gbit/s, {} in {:.2} s{}; CPU {:.2} s ({:.2} cores)",
            self.backend.name(),
            if knobs.is_empty() { String::new() } else { format!(" ({knobs})") },
            self.gbps,
            bytes_human(self.bytes),
            self.seconds,
            if self.verified { ", verified" } else { "" },
            self.cpu_seconds,
            self.cpu_cores,
        );
        let threads: Vec<String> =
            [("sender", self.sender_thread_cpu_seconds), ("receiver", self.receiver_thread_cpu_seconds)]
                .iter()
                .filter_map(|(name, v)| v.map(|v| format!("{name} {v:.2} s")))
                .collect();
        if !threads.is_empty() {
            s += &format!(", app threads: {}", threads.join(", "));
        }
        if !self.channel_bytes.is_empty() {
            let per: Vec<String> = self.channel_bytes.iter().map(|&b| bytes_human(b)).collect();
            let what = if self.backend == Stack::Mptcp { "subflow" } else { "channel" };
            s += &format!("\n  {what} bytes: {}", per.join(" | "));
        }
        s
    }
}

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
    if args.verify && args.common.role == Role::Client {
        eprintln!("netchannel: note: --verify is checked by the receiver; give it to the server");
    }
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

struct Sent {
    bytes: u64,
    thread_cpu: f64,
    process_cpu_at_start: f64,
    seconds: f64,
    subflows: SubflowLog,
}

struct Received {
    bytes: u64,
    seconds: f64,
    thread_cpu: f64,
    process_cpu_at_start: f64,
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

enum Event {
    Sent(Result<Sent>),
    Received(Result<Received>),
}

fn run_one(stack: Stack, args: &StreamArgs, config: &Config, limit: Limit) -> Result<StreamReport> {
    let common = &args.common;
    let role = common.role;
    let mut net = Net::open(stack, common, config)?;
    let progress = Arc::new(Progress::default());
    let (tx, rx) = mpsc::channel();
    let mut expected = 0;
    if role.has_server() {
        let listener = net.listen()?;
        if role == Role::Server {
            eprintln!("netchannel: listening on {}; waiting for one stream", listener.describe());
        }
        let (progress, tx, verify, size) = (progress.clone(), tx.clone(), args.verify, args.write_size);
        spawn("stream-receiver", move || receiver(listener, verify, size, &progress, &tx))?;
        expected += 1;
    }
    if role.has_client() {
        let connector = net.connector()?;
        let counted = (role == Role::Client).then(|| progress.clone());
        let (tx, size, corrupt_at) = (tx.clone(), args.write_size, args.corrupt_at);
        spawn("stream-sender", move || {
            let result = sender(&connector, limit, size, corrupt_at, counted.as_deref());
            let _ = tx.send(Event::Sent(result));
        })?;
        expected += 1;
    }
    drop(tx);
    if role != Role::Server {
        progress.activate();
    }

    let (mut sent, mut received) = (None, None);
    let opts = Watch {
        quiet: common.json,
        stall_timeout: Duration::from_secs_f64(common.stall_timeout),
        label: if role == Role::Client { "sent" } else { "received" },
    };
    watch(&rx, &progress, &opts, |event| {
        let failed = match event {
            Event::Sent(r) => sent.insert(r).is_err(),
            Event::Received(r) => received.insert(r).is_err(),
        };
        let done = sent.iter().count() + received.iter().count() == expected;
        if failed || done {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })?;
    let process_cpu_at_end = cpu::process_seconds();
    // The receiver's error explains a sender's (e.g. a verify failure closes the stream).
    let received = received.transpose()?;
    let sent = sent.transpose()?;
    let lost =
        |side: &str| Error::from(format!("the {side} thread stopped without a result (see the panic above)"));
    if role.has_server() && received.is_none() {
        return Err(lost("receiver"));
    }
    if role.has_client() && sent.is_none() {
        return Err(lost("sender"));
    }
    if let (Some(r), Some(s)) = (&received, &sent) {
        if r.bytes != s.bytes {
            return Err(format!("the receiver got {} bytes but the sender wrote {}", r.bytes, s.bytes).into());
        }
    }
    if let (Limit::Bytes(want), Some(r)) = (limit, &received) {
        if r.bytes != want {
            return Err(format!("the stream ended early: received {} of {want} bytes", r.bytes).into());
        }
    }

    let (bytes, seconds) = match (&received, &sent) {
        (Some(r), _) => (r.bytes, r.seconds),
        (None, Some(s)) => (s.bytes, s.seconds),
        (None, None) => unreachable!("a role has at least one end"),
    };
    let cpu_start =
        [received.as_ref().map(|r| r.process_cpu_at_start), sent.as_ref().map(|s| s.process_cpu_at_start)]
            .into_iter()
            .flatten()
            .fold(f64::INFINITY, f64::min);
    let cpu_seconds = (process_cpu_at_end - cpu_start).max(0.0);
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
    let per_sec = |v: f64| if seconds > 0.0 { v / seconds } else { 0.0 };
    Ok(StreamReport {
        mode: "stream",
        backend: stack,
        role,
        gbps: per_sec(bytes as f64 * 8.0 / 1e9),
        bytes,
        seconds,
        verified: args.verify && received.is_some(),
        channel_bytes,
        cpu_seconds,
        cpu_cores: per_sec(cpu_seconds),
        sender_thread_cpu_seconds: sent.as_ref().map(|s| s.thread_cpu),
        receiver_thread_cpu_seconds: received.as_ref().map(|r| r.thread_cpu),
        knobs: Knobs::of(stack, config),
        write_size: args.write_size,
        subflows,
        subflows_established,
        netns,
        rate_bps,
    })
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<()> {
    thread::Builder::new()
        .name(name.to_string())
        .spawn(f)
        .map(drop)
        .map_err(|e| format!("cannot start the {name} thread: {}", describe(&e)).into())
}

/// The receiving app thread. Its result is sent while the stream is still open, so a verify
/// failure reaches the main thread before the sender sees the stream close.
fn receiver(listener: Listener, verify: bool, size: usize, progress: &Progress, tx: &Sender<Event>) {
    let (mut conn, peer) = match listener.accept() {
        Ok(c) => c,
        Err(e) => {
            let _ = tx.send(Event::Received(Err(e)));
            return;
        }
    };
    progress.activate();
    let result = receive(&mut *conn, peer, verify, size, progress);
    let _ = tx.send(Event::Received(result));
    drop(conn);
}

fn receive(
    conn: &mut dyn Conn,
    peer: SocketAddr,
    verify: bool,
    size: usize,
    progress: &Progress,
) -> Result<Received> {
    let process_cpu_at_start = cpu::process_seconds();
    let thread_cpu_at_start = cpu::thread_seconds();
    let start = Instant::now();
    let mut buf = vec![0u8; size];
    let mut offset = 0u64;
    let mut subflows = SubflowLog::default();
    loop {
        subflows.tick(conn);
        let n = match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(
                    format!("read from {peer} failed at stream offset {offset}: {}", describe(&e)).into()
                );
            }
        };
        if verify {
            pattern::check(offset, &buf[..n]).map_err(|m| Error::from(format!("verify failed at {m}")))?;
        }
        offset += n as u64;
        progress.add(n as u64);
    }
    let seconds = start.elapsed().as_secs_f64();
    subflows.sample(conn);
    Ok(Received {
        bytes: offset,
        seconds,
        thread_cpu: cpu::thread_seconds() - thread_cpu_at_start,
        process_cpu_at_start,
        peer,
        subflows,
    })
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
    let process_cpu_at_start = cpu::process_seconds();
    let thread_cpu_at_start = cpu::thread_seconds();
    let start = Instant::now();
    let mut conn = connector.connect()?;
    let target = connector.target();
    let mut offset = 0u64;
    let mut subflows = SubflowLog::default();
    loop {
        subflows.tick(&*conn);
        let len = match limit {
            Limit::Bytes(total) => (total - offset).min(size as u64) as usize,
            Limit::Duration(d) if start.elapsed() < d => size,
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
    Ok(Sent {
        bytes: offset,
        thread_cpu: cpu::thread_seconds() - thread_cpu_at_start,
        process_cpu_at_start,
        seconds: start.elapsed().as_secs_f64(),
        subflows,
    })
}
