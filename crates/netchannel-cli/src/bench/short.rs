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

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;
use netchannel::Config;
use serde::Serialize;

use super::backend::{Connector, Net};
use super::pair::Pair;
use super::transfer::{self, Meter, Transfer, TransferCpu};
use super::{bytes_human, parse_io_size, parse_secs, CommonOpts, Knobs, Progress, Report, Role, Stack};
use crate::cpu;
use crate::error::{describe, Error, Result};
use crate::pattern::Source;

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
    /// CPU of the process and of each app thread.
    #[serde(flatten)]
    pub cpu: TransferCpu,
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
        format!(
            "short {}{}: {:.0} messages/s of {} ({:.2} Gbit/s), {} messages in {:.2} s{}; {}{}",
            self.backend.name(),
            if knobs.is_empty() { String::new() } else { format!(" ({knobs})") },
            self.msgs_per_sec,
            bytes_human(self.size as u64),
            self.gbps,
            self.messages,
            self.seconds,
            if self.verified { ", verified" } else { "" },
            self.cpu.human(),
            transfer::per_channel_human("channel", &self.channel_bytes),
        )
    }
}

/// The two ends of `bench short`.
const PAIR: Pair = Pair::one_way("short", "waiting for one stream of messages");

/// Run `bench short` on every stack of `--backend` and print the reports.
pub fn run(args: &ShortArgs) -> Result<()> {
    PAIR.run_stacks(&args.common, args.verify, |stack, config| run_one(stack, args, config))
}

/// What the receiver got, and from where.
struct Received {
    transfer: Transfer,
    peer: SocketAddr,
}

fn run_one(stack: Stack, args: &ShortArgs, config: &Config) -> Result<ShortReport> {
    let common = &args.common;
    let size = args.size;
    let mut net = Net::open(stack, common, config)?;
    let (verify, read_size, duration) = (args.verify, args.read_size, Duration::from_secs_f64(args.duration));
    let (received, sent) = PAIR.run(
        &mut net,
        common,
        move |listener, progress, done| {
            transfer::receiver(listener, progress, done, |conn, peer| {
                let transfer = transfer::receive(conn, peer, verify, read_size, progress, |_| {})?;
                Ok(Received { transfer, peer })
            })
        },
        move |connector, progress| sender(connector, duration, size, progress),
    )?;
    let process_cpu_at_end = cpu::process_seconds();
    let totals = transfer::totals(received.as_ref().map(|r| &r.transfer), sent.as_ref(), process_cpu_at_end)?;
    let bytes = totals.bytes;
    if bytes % size as u64 != 0 {
        return Err(format!(
            "the stream ended inside a message: {bytes} bytes is not a whole number of {size}-byte messages \
             (is --size the same on both ends?)"
        )
        .into());
    }
    let messages = bytes / size as u64;
    let channel_bytes = net.client_to_server_channel_bytes(received.as_ref().map(|r| r.peer.ip()));
    net.shutdown();
    Ok(ShortReport {
        mode: "short",
        backend: stack,
        role: common.role,
        size,
        msgs_per_sec: totals.per_sec(messages as f64),
        gbps: totals.per_sec(bytes as f64 * 8.0 / 1e9),
        messages,
        bytes,
        seconds: totals.seconds,
        cpu: totals.cpu,
        channel_bytes,
        verified: args.verify && received.is_some(),
        knobs: Knobs::of(stack, config),
        read_size: args.read_size,
    })
}

/// The sending app thread: connect, write `size`-byte messages for `duration`, half-close,
/// wait for the receiver to close (so "sent" means "received and closed by the receiver").
fn sender(
    connector: &Connector,
    duration: Duration,
    size: usize,
    progress: Option<&Progress>,
) -> Result<Transfer> {
    let source = Source::new(size);
    let meter = Meter::start();
    let mut conn = connector.connect()?;
    let target = connector.target();
    let mut offset = 0u64;
    while meter.elapsed() < duration {
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
    Ok(meter.finish(offset))
}
