//! `bench short`: small messages back to back, one app thread per end (experiments 6c and 8b:
//! do small messages scale with channels and channel workers?).
//!
//! The sender thread connects and writes `--size` messages of the deterministic
//! [`pattern`](crate::pattern) (one `write_all` per message, no reply) for `--duration`
//! seconds, half-closes and waits for the receiver to close. The receiver thread accepts, reads
//! into a `--read-size` buffer until EOF and counts the complete `--size` messages; with
//! `--verify` it checks every byte. Rates are the receiver's: messages (and bits) received over
//! the time from accept to EOF. CPU is the whole process's over the transfer, with each app
//! thread's share beside it; `channel_bytes` shows how the sending host spread the messages
//! over its throughput channels.

use std::io::{self, Write};
use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use netchannel::Config;
use serde::Serialize;

use super::backend::{Conn, Connector, Listener, Net};
use super::{
    bytes_human, emit, parse_io_size, parse_secs, spawn, watch, CommonOpts, Knobs, Progress, Report, Role,
    Stack, Watch,
};
use crate::cpu;
use crate::error::{describe, Error, Result};
use crate::pattern::{self, Source};

/// Flags of `bench short`.
#[derive(Args, Debug)]
pub struct ShortArgs {
    /// Seconds the sender writes for
    #[arg(long, value_name = "SECS", default_value_t = 5.0, value_parser = parse_secs)]
    pub duration: f64,

    /// Size of each message (one app write)
    #[arg(long, value_name = "SIZE", default_value = "4KiB", value_parser = parse_io_size)]
    pub size: usize,

    /// Size of the receiver's reads (messages are counted across read boundaries)
    #[arg(long, value_name = "SIZE", default_value = "64KiB", value_parser = parse_io_size)]
    pub read_size: usize,

    /// Check every received byte against the pattern; a mismatch fails the run
    #[arg(long)]
    pub verify: bool,

    #[command(flatten)]
    pub common: CommonOpts,
}

/// The result of one `bench short` run.
#[derive(Serialize, Debug)]
pub struct ShortReport {
    /// Always "short".
    pub mode: &'static str,
    /// The stack measured.
    pub backend: Stack,
    /// Which end(s) ran in this process.
    pub role: Role,
    /// Message size in bytes.
    pub size: usize,
    /// Complete messages received per second.
    pub msgs_per_sec: f64,
    /// Gbit/s of message bytes: `messages * size * 8 / seconds / 1e9`.
    pub gbps: f64,
    /// Complete messages received (client-only run: sent and acknowledged by the server's close).
    pub messages: u64,
    /// Bytes received.
    pub bytes: u64,
    /// Receiver: accept to EOF (client-only run: connect to the server's close).
    pub seconds: f64,
    /// User + system CPU seconds of the whole process during the transfer.
    pub cpu_seconds: f64,
    /// `cpu_seconds / seconds`: cores kept busy.
    pub cpu_cores: f64,
    /// CPU seconds of the sending app thread (null when not in this process).
    pub sender_thread_cpu_seconds: Option<f64>,
    /// CPU seconds of the receiving app thread (null when not in this process).
    pub receiver_thread_cpu_seconds: Option<f64>,
    /// Client → server bytes per throughput channel, index order (see `Net`); empty for TCP.
    pub channel_bytes: Vec<u64>,
    /// True only if `--verify` was given and every byte matched.
    pub verified: bool,
    /// Engine knobs (null for TCP).
    #[serde(flatten)]
    pub knobs: Knobs,
    /// The receiver's read size in bytes.
    pub read_size: usize,
}

impl Report for ShortReport {
    fn stack(&self) -> Stack {
        self.backend
    }

    fn headline(&self) -> (f64, &'static str) {
        (self.msgs_per_sec, "messages/s")
    }

    fn human(&self) -> String {
        let knobs = self.knobs.describe();
        let mut s = format!(
            "short {}{}: {:.0} messages/s of {} ({:.2} Gbit/s), {} messages in {:.2} s{}; CPU {:.2} s ({:.2} cores)",
            self.backend.name(),
            if knobs.is_empty() { String::new() } else { format!(" ({knobs})") },
            self.msgs_per_sec,
            bytes_human(self.size as u64),
            self.gbps,
            self.messages,
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
            s += &format!("\n  channel bytes: {}", per.join(" | "));
        }
        s
    }
}

/// Run `bench short` on every stack of `--backend` and print the reports.
pub fn run(args: &ShortArgs) -> Result<()> {
    let config = args.common.engine_config()?;
    let stacks = args.common.backend.stacks();
    if stacks.len() > 1 && args.common.role != Role::Both {
        return Err("--backend both needs --role both (run server and client once per backend)".into());
    }
    if args.verify && args.common.role == Role::Client {
        eprintln!("netchannel: note: --verify is checked by the receiver; give it to the server");
    }
    pattern::byte_at(0); // build the table before anything is timed
    let mut reports = Vec::new();
    for stack in stacks {
        reports.push(run_one(stack, args, &config)?);
    }
    emit("short", args.common.json, &reports)
}

struct Sent {
    bytes: u64,
    seconds: f64,
    thread_cpu: f64,
    process_cpu_at_start: f64,
}

struct Received {
    bytes: u64,
    seconds: f64,
    thread_cpu: f64,
    process_cpu_at_start: f64,
    peer: SocketAddr,
}

enum Event {
    Sent(Result<Sent>),
    Received(Result<Received>),
}

fn run_one(stack: Stack, args: &ShortArgs, config: &Config) -> Result<ShortReport> {
    let common = &args.common;
    let role = common.role;
    let size = args.size;
    let mut net = Net::open(stack, common, config)?;
    let progress = Arc::new(Progress::default());
    let (tx, rx) = mpsc::channel();
    let mut expected = 0;
    if role.has_server() {
        let listener = net.listen()?;
        if role == Role::Server {
            eprintln!("netchannel: listening on {}; waiting for one stream of messages", listener.describe());
        }
        let (progress, tx, verify, read_size) = (progress.clone(), tx.clone(), args.verify, args.read_size);
        spawn("short-receiver", move || receiver(listener, verify, read_size, &progress, &tx))?;
        expected += 1;
    }
    if role.has_client() {
        let connector = net.connector()?;
        let counted = (role == Role::Client).then(|| progress.clone());
        let (tx, duration) = (tx.clone(), Duration::from_secs_f64(args.duration));
        spawn("short-sender", move || {
            let result = sender(&connector, duration, size, counted.as_deref());
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
    let (bytes, seconds) = match (&received, &sent) {
        (Some(r), _) => (r.bytes, r.seconds),
        (None, Some(s)) => (s.bytes, s.seconds),
        (None, None) => unreachable!("a role has at least one end"),
    };
    if bytes % size as u64 != 0 {
        return Err(format!(
            "the stream ended inside a message: {bytes} bytes is not a whole number of {size}-byte messages \
             (is --size the same on both ends?)"
        )
        .into());
    }
    let messages = bytes / size as u64;
    let cpu_start =
        [received.as_ref().map(|r| r.process_cpu_at_start), sent.as_ref().map(|s| s.process_cpu_at_start)]
            .into_iter()
            .flatten()
            .fold(f64::INFINITY, f64::min);
    let cpu_seconds = (process_cpu_at_end - cpu_start).max(0.0);
    let channel_bytes = net.client_to_server_channel_bytes(received.as_ref().map(|r| r.peer.ip()));
    net.shutdown();
    let per_sec = |v: f64| if seconds > 0.0 { v / seconds } else { 0.0 };
    Ok(ShortReport {
        mode: "short",
        backend: stack,
        role,
        size,
        msgs_per_sec: per_sec(messages as f64),
        gbps: per_sec(bytes as f64 * 8.0 / 1e9),
        messages,
        bytes,
        seconds,
        cpu_seconds,
        cpu_cores: per_sec(cpu_seconds),
        sender_thread_cpu_seconds: sent.as_ref().map(|s| s.thread_cpu),
        receiver_thread_cpu_seconds: received.as_ref().map(|r| r.thread_cpu),
        channel_bytes,
        verified: args.verify && received.is_some(),
        knobs: Knobs::of(stack, config),
        read_size: args.read_size,
    })
}

/// The receiving app thread. Its result is sent while the stream is still open, so a verify
/// failure reaches the main thread before the sender sees the stream close.
fn receiver(listener: Listener, verify: bool, read_size: usize, progress: &Progress, tx: &Sender<Event>) {
    let (mut conn, peer) = match listener.accept() {
        Ok(c) => c,
        Err(e) => {
            let _ = tx.send(Event::Received(Err(e)));
            return;
        }
    };
    progress.activate();
    let result = receive(&mut *conn, peer, verify, read_size, progress);
    let _ = tx.send(Event::Received(result));
    drop(conn);
}

fn receive(
    conn: &mut dyn Conn,
    peer: SocketAddr,
    verify: bool,
    read_size: usize,
    progress: &Progress,
) -> Result<Received> {
    let process_cpu_at_start = cpu::process_seconds();
    let thread_cpu_at_start = cpu::thread_seconds();
    let start = Instant::now();
    let mut buf = vec![0u8; read_size];
    let mut offset = 0u64;
    loop {
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
    Ok(Received {
        bytes: offset,
        seconds: start.elapsed().as_secs_f64(),
        thread_cpu: cpu::thread_seconds() - thread_cpu_at_start,
        process_cpu_at_start,
        peer,
    })
}

/// The sending app thread: connect, write `size`-byte messages for `duration`, half-close,
/// wait for the receiver to close (so "sent" means "received and closed by the receiver").
fn sender(
    connector: &Connector,
    duration: Duration,
    size: usize,
    progress: Option<&Progress>,
) -> Result<Sent> {
    let source = Source::new(size);
    let process_cpu_at_start = cpu::process_seconds();
    let thread_cpu_at_start = cpu::thread_seconds();
    let start = Instant::now();
    let mut conn = connector.connect()?;
    let target = connector.target();
    let mut offset = 0u64;
    while start.elapsed() < duration {
        conn.write_all(source.slice(offset, size)).map_err(|e| {
            Error::from(format!("write to {target} failed at stream offset {offset}: {}", describe(&e)))
        })?;
        offset += size as u64;
        if let Some(p) = progress {
            p.add(size as u64);
        }
    }
    super::rpc::close_and_wait(&mut *conn)
        .map_err(|e| Error::from(format!("closing the stream to {target}: {e}")))?;
    Ok(Sent {
        bytes: offset,
        seconds: start.elapsed().as_secs_f64(),
        thread_cpu: cpu::thread_seconds() - thread_cpu_at_start,
        process_cpu_at_start,
    })
}
