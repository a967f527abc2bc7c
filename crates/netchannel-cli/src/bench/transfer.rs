//! What the one-way modes, `bench stream` and `bench short`, share: one end's count and clocks
//! ([`Transfer`], kept with a [`Meter`]), the receiving end ([`receiver`], [`receive`]), and how
//! the two ends' counts make the report's bytes, seconds and CPU ([`totals`], [`TransferCpu`]).

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::backend::{Conn, Listener};
use super::{app_threads, bytes_human, cpu_human, per_second, Progress};
use crate::cpu;
use crate::error::{describe, Error, Result};
use crate::pattern;

/// One end's bytes, time and CPU.
pub struct Transfer {
    /// Bytes received (receiver), or sent and acknowledged by the receiver's close (sender).
    pub bytes: u64,
    /// From the end's start to its end.
    pub seconds: f64,
    /// CPU seconds of the end's thread.
    pub thread_cpu: f64,
    /// The whole process's CPU seconds when the end started.
    pub process_cpu_at_start: f64,
}

/// The clocks of one end, started when the end starts.
pub struct Meter {
    start: Instant,
    process_cpu_at_start: f64,
    thread_cpu_at_start: f64,
}

impl Meter {
    /// Start the clocks now.
    pub fn start() -> Meter {
        let process_cpu_at_start = cpu::process_seconds();
        let thread_cpu_at_start = cpu::thread_seconds();
        Meter { start: Instant::now(), process_cpu_at_start, thread_cpu_at_start }
    }

    /// Time since the start.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// The end's result: `bytes` and the clocks so far.
    pub fn finish(&self, bytes: u64) -> Transfer {
        Transfer {
            bytes,
            seconds: self.start.elapsed().as_secs_f64(),
            thread_cpu: cpu::thread_seconds() - self.thread_cpu_at_start,
            process_cpu_at_start: self.process_cpu_at_start,
        }
    }
}

/// The receiving app thread: accept one connection and `receive` it. Its result is sent with
/// `done` while the stream is still open, so a verify failure reaches the main thread before
/// the sender sees the stream close.
pub fn receiver<R>(
    listener: Listener,
    progress: &Progress,
    done: &dyn Fn(Result<R>),
    receive: impl FnOnce(&mut dyn Conn, SocketAddr) -> Result<R>,
) {
    let (mut conn, peer) = match listener.accept() {
        Ok(c) => c,
        Err(e) => return done(Err(e)),
    };
    progress.activate();
    done(receive(&mut *conn, peer));
    drop(conn);
}

/// The receiving app thread's work: read `conn` in `read_size` reads until EOF, counting the
/// bytes (and with `verify` checking them against the pattern); `tick` sees the connection
/// before every read.
pub fn receive(
    conn: &mut dyn Conn,
    peer: SocketAddr,
    verify: bool,
    read_size: usize,
    progress: &Progress,
    mut tick: impl FnMut(&dyn Conn),
) -> Result<Transfer> {
    let meter = Meter::start();
    let mut buf = vec![0u8; read_size];
    let mut offset = 0u64;
    loop {
        tick(conn);
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
    Ok(meter.finish(offset))
}

/// The CPU a one-way run used, as reported.
#[derive(Serialize, Debug)]
pub struct TransferCpu {
    /// User + system CPU seconds of the whole process during the transfer.
    pub cpu_seconds: f64,
    /// `cpu_seconds / seconds`: cores kept busy.
    pub cpu_cores: f64,
    /// CPU seconds of the sending app thread (null when not in this process).
    pub sender_thread_cpu_seconds: Option<f64>,
    /// CPU seconds of the receiving app thread (null when not in this process).
    pub receiver_thread_cpu_seconds: Option<f64>,
}

impl TransferCpu {
    /// `CPU 1.23 s (0.98 cores), app threads: sender 0.50 s, receiver 0.40 s`.
    pub fn human(&self) -> String {
        cpu_human(self.cpu_seconds, self.cpu_cores)
            + &app_threads([
                ("sender", self.sender_thread_cpu_seconds),
                ("receiver", self.receiver_thread_cpu_seconds),
            ])
    }
}

/// A one-way run's numbers, from the ends that ran in this process.
pub struct Totals {
    /// The receiver's bytes, else (a client-only run) the sender's.
    pub bytes: u64,
    /// The receiver's seconds, else the sender's.
    pub seconds: f64,
    /// Its CPU.
    pub cpu: TransferCpu,
}

impl Totals {
    /// `v / seconds` (0 for an empty run).
    pub fn per_sec(&self, v: f64) -> f64 {
        per_second(v, self.seconds)
    }
}

/// The numbers of a one-way run whose ends got `received` and `sent`; the process's CPU is
/// counted from the earlier end's start to `process_cpu_at_end`. Fails when both ends ran and
/// their counts differ.
pub fn totals(
    received: Option<&Transfer>,
    sent: Option<&Transfer>,
    process_cpu_at_end: f64,
) -> Result<Totals> {
    if let (Some(r), Some(s)) = (received, sent) {
        if r.bytes != s.bytes {
            return Err(format!("the receiver got {} bytes but the sender wrote {}", r.bytes, s.bytes).into());
        }
    }
    let (bytes, seconds) = match (received, sent) {
        (Some(r), _) => (r.bytes, r.seconds),
        (None, Some(s)) => (s.bytes, s.seconds),
        (None, None) => unreachable!("a role has at least one end"),
    };
    let cpu_start = [received.map(|r| r.process_cpu_at_start), sent.map(|s| s.process_cpu_at_start)]
        .into_iter()
        .flatten()
        .fold(f64::INFINITY, f64::min);
    let cpu_seconds = (process_cpu_at_end - cpu_start).max(0.0);
    Ok(Totals {
        bytes,
        seconds,
        cpu: TransferCpu {
            cpu_seconds,
            cpu_cores: per_second(cpu_seconds, seconds),
            sender_thread_cpu_seconds: sent.map(|s| s.thread_cpu),
            receiver_thread_cpu_seconds: received.map(|r| r.thread_cpu),
        },
    })
}

/// `\n  channel bytes: 1.00 GiB | 1.00 GiB` (`what` = "channel" or "subflow"); empty when
/// `per` is (TCP).
pub fn per_channel_human(what: &str, per: &[u64]) -> String {
    if per.is_empty() {
        return String::new();
    }
    let per: Vec<String> = per.iter().map(|&b| bytes_human(b)).collect();
    format!("\n  {what} bytes: {}", per.join(" | "))
}
