//! Request/response building blocks shared by the latency modes — `bench pingpong`,
//! `bench connect` and `bench isolation` (experiment 6d) — so that all three time a round trip
//! the same way: the client writes a `--size` request (pattern bytes), reads the whole
//! `--size` response, and records the time in an HDR histogram; the server reads the whole
//! request and writes it back. A warm-up at the start of every measured phase is discarded.
//! [`TrafficClass`] is the `--class` flag of the NetChannel vsocket. [`LatencyRun`] is what the
//! reports of `bench pingpong` and `bench connect` share.

use std::io::{self, Read};
use std::time::{Duration, Instant};

use clap::ValueEnum;
use hdrhistogram::Histogram;
use netchannel::Class;
use serde::Serialize;

use super::backend::Conn;
use super::{app_threads, cpu_human, per_second, Knobs, Progress};
use crate::cpu;
use crate::error::{describe, Error, Result};
use crate::pattern::{self, Source};

/// Longest latency the histogram holds apart (longer ones are recorded as this), in ns.
const HIGHEST_NS: u64 = 3_600_000_000_000;

/// Latencies of one measured phase: an HDR histogram of nanoseconds, 3 significant digits.
pub struct Recorder {
    hist: Histogram<u64>,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder::new()
    }
}

impl Recorder {
    /// An empty recorder.
    pub fn new() -> Recorder {
        let hist = Histogram::new_with_bounds(1, HIGHEST_NS, 3).expect("static histogram bounds are valid");
        Recorder { hist }
    }

    /// Record one latency.
    pub fn record(&mut self, d: Duration) {
        self.hist.saturating_record(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1));
    }

    /// Latencies recorded so far.
    pub fn samples(&self) -> u64 {
        self.hist.len()
    }

    /// The percentiles, or none when nothing was recorded.
    pub fn percentiles(&self) -> Option<Percentiles> {
        if self.hist.is_empty() {
            return None;
        }
        let us = |ns: u64| ns as f64 / 1e3;
        Some(Percentiles {
            p50_us: us(self.hist.value_at_quantile(0.5)),
            p99_us: us(self.hist.value_at_quantile(0.99)),
            p999_us: us(self.hist.value_at_quantile(0.999)),
            max_us: us(self.hist.max()),
            mean_us: self.hist.mean() / 1e3,
        })
    }
}

/// Latency percentiles in microseconds. Each percentile is the highest value the histogram
/// holds equivalent to it (3 significant digits), so `p50 <= p99 <= p999 <= max`.
#[derive(Serialize, Debug, Clone, Copy, PartialEq)]
pub struct Percentiles {
    /// Median.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Largest.
    pub max_us: f64,
    /// Arithmetic mean.
    pub mean_us: f64,
}

impl Percentiles {
    /// `p50 12.3 µs, p99 45.6 µs, p99.9 78.9 µs, max 123 µs`.
    pub fn human(&self) -> String {
        format!(
            "p50 {} µs, p99 {} µs, p99.9 {} µs, max {} µs",
            us_human(self.p50_us),
            us_human(self.p99_us),
            us_human(self.p999_us),
            us_human(self.max_us)
        )
    }
}

/// Microseconds with about three significant digits.
pub fn us_human(us: f64) -> String {
    if us >= 100.0 {
        format!("{us:.0}")
    } else if us >= 10.0 {
        format!("{us:.1}")
    } else {
        format!("{us:.2}")
    }
}

/// The vsocket traffic class a latency mode asks for (`--class`).
#[derive(ValueEnum, Serialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TrafficClass {
    /// Latency channels, scheduled ahead of bulk.
    Latency,
    /// Throughput channels, shared with bulk.
    Throughput,
}

impl TrafficClass {
    /// The engine's class.
    pub fn class(self) -> Class {
        match self {
            TrafficClass::Latency => Class::Latency,
            TrafficClass::Throughput => Class::Throughput,
        }
    }

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            TrafficClass::Latency => "latency",
            TrafficClass::Throughput => "throughput",
        }
    }
}

/// Time and CPU of one end's measured window.
pub struct Window {
    /// Seconds from the window's start to [`WindowClock::finish`].
    pub seconds: f64,
    /// CPU seconds of the thread that kept the clock.
    pub thread_cpu: f64,
    /// CPU seconds of the whole process.
    pub process_cpu: f64,
}

/// The measured window of one end of a run: it starts at the first check past its warm-up.
pub struct WindowClock {
    /// When the warm-up ends.
    pub from: Instant,
    started: Option<(Instant, f64, f64)>,
}

impl WindowClock {
    /// A clock whose warm-up starts now.
    pub fn new(warmup: Duration) -> WindowClock {
        WindowClock { from: Instant::now() + warmup, started: None }
    }

    /// Whether the window has begun (starting it if `now` is past the warm-up).
    pub fn check(&mut self, now: Instant) -> bool {
        if self.started.is_none() && now >= self.from {
            self.started = Some((now, cpu::process_seconds(), cpu::thread_seconds()));
        }
        self.started.is_some()
    }

    /// The window so far (all zero if it never began).
    pub fn finish(&self) -> Window {
        match self.started {
            Some((at, process, thread)) => Window {
                seconds: at.elapsed().as_secs_f64(),
                thread_cpu: cpu::thread_seconds() - thread,
                process_cpu: cpu::process_seconds() - process,
            },
            None => Window { seconds: 0.0, thread_cpu: 0.0, process_cpu: 0.0 },
        }
    }
}

/// What the client end of a latency run measured.
pub struct ClientResult {
    /// Its latencies after the warm-up.
    pub latencies: Recorder,
    /// Its measured window.
    pub window: Window,
}

/// What the server end of a latency run counted.
pub struct ServerResult {
    /// Requests (or connections) served in its measured window.
    pub served: u64,
    /// Its measured window, which starts when its warm-up after the first accept ends.
    pub window: Window,
}

/// The client's measuring loop: `round_trip` back to back for `warmup + duration`, the time of
/// each after the warm-up recorded; `progress` counts `size` bytes a round trip.
pub fn measure(
    warmup: Duration,
    duration: Duration,
    size: usize,
    progress: Option<&Progress>,
    mut round_trip: impl FnMut() -> Result<()>,
) -> Result<ClientResult> {
    let mut latencies = Recorder::new();
    let mut clock = WindowClock::new(warmup);
    let end = clock.from + duration;
    loop {
        let t0 = Instant::now();
        let measuring = clock.check(t0);
        if t0 >= end {
            break;
        }
        round_trip()?;
        if measuring {
            latencies.record(t0.elapsed());
        }
        if let Some(p) = progress {
            p.add(size as u64);
        }
    }
    Ok(ClientResult { latencies, window: clock.finish() })
}

/// What the reports of `bench pingpong` and `bench connect` share, after their rate: the
/// latencies, the measured window and its CPU.
#[derive(Serialize, Debug)]
pub struct LatencyRun {
    /// Latency percentiles: of a round trip (pingpong), of connect + request/response + close
    /// (connect); absent in a server-only run, which times nothing.
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

impl LatencyRun {
    /// The samples and the run's numbers, from the ends that ran in this process: the
    /// client's latencies and window, else (a server-only run) the server's count and window.
    pub fn of(
        client: Option<&ClientResult>,
        server: Option<&ServerResult>,
        warmup: Duration,
        verify: bool,
        knobs: Knobs,
    ) -> (u64, LatencyRun) {
        let (samples, latency, window) = match (client, server) {
            (Some(c), _) => (c.latencies.samples(), c.latencies.percentiles(), &c.window),
            (None, Some(s)) => (s.served, None, &s.window),
            (None, None) => unreachable!("a role has at least one end"),
        };
        let run = LatencyRun {
            latency,
            seconds: window.seconds,
            warmup_seconds: warmup.as_secs_f64(),
            cpu_seconds: window.process_cpu,
            cpu_cores: per_second(window.process_cpu, window.seconds),
            client_thread_cpu_seconds: client.map(|c| c.window.thread_cpu),
            server_thread_cpu_seconds: server.map(|s| s.window.thread_cpu),
            verified: verify && client.is_some(),
            knobs,
        };
        (samples, run)
    }

    /// `v / seconds` (0 for an empty window).
    pub fn per_sec(&self, v: f64) -> f64 {
        per_second(v, self.seconds)
    }

    /// `p50 … µs; CPU 1.23 s (0.98 cores), verified, app threads: client 0.50 s, server 0.40 s`.
    pub fn human(&self) -> String {
        let latency = match &self.latency {
            Some(p) => format!("{}; ", p.human()),
            None => String::new(),
        };
        format!(
            "{latency}{}{}{}",
            cpu_human(self.cpu_seconds, self.cpu_cores),
            if self.verified { ", verified" } else { "" },
            app_threads([
                ("client", self.client_thread_cpu_seconds),
                ("server", self.server_thread_cpu_seconds)
            ])
        )
    }
}

/// clap parser: a warm-up of zero or more seconds.
pub fn parse_warmup(s: &str) -> std::result::Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && (0.0..1e9).contains(&v) => Ok(v),
        _ => Err(format!("{s:?} is not a number of seconds >= 0")),
    }
}

/// The warm-up to discard: `--warmup`, else the smaller of 0.5 s and 10 % of the duration.
pub fn warmup(flag: Option<f64>, duration: f64) -> Duration {
    Duration::from_secs_f64(flag.unwrap_or_else(|| (duration / 10.0).min(0.5)))
}

/// Read until `buf` is full or the peer closes; the number of bytes read (0: closed before
/// the message began, less than `buf.len()`: closed in the middle of it).
pub fn read_full(conn: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match conn.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// One round trip of the client: write the request (the pattern bytes of stream offsets
/// `offset..offset + size`), read the whole response, and with `verify` check that it is the
/// request echoed.
pub fn round_trip(
    conn: &mut dyn Conn,
    source: &Source,
    offset: u64,
    response: &mut [u8],
    verify: bool,
) -> Result<()> {
    let size = response.len();
    conn.write_all(source.slice(offset, size))
        .map_err(|e| Error::from(format!("request write at offset {offset} failed: {}", describe(&e))))?;
    match read_full(conn, response) {
        Ok(n) if n == size => {}
        Ok(n) => {
            return Err(format!(
                "the server closed the connection after {n} of {size} response bytes (offset {offset})"
            )
            .into())
        }
        Err(e) => {
            return Err(format!("response read at offset {offset} failed: {}", describe(&e)).into());
        }
    }
    if verify {
        pattern::check(offset, response)
            .map_err(|m| Error::from(format!("verify failed: the echoed response differs at {m}")))?;
    }
    Ok(())
}

/// The server's half of one request/response: read a whole request into `buf` and write it
/// back. `Ok(false)` when the client closed instead of sending a request.
pub fn serve_one(conn: &mut dyn Conn, buf: &mut [u8]) -> Result<bool> {
    let size = buf.len();
    match read_full(conn, buf) {
        Ok(0) => return Ok(false),
        Ok(n) if n == size => {}
        Ok(n) => {
            return Err(format!(
                "the client closed the connection after {n} of {size} request bytes (is --size the same on both ends?)"
            )
            .into())
        }
        Err(e) => return Err(format!("request read failed: {}", describe(&e)).into()),
    }
    conn.write_all(buf).map_err(|e| Error::from(format!("response write failed: {}", describe(&e))))?;
    Ok(true)
}

/// Half-close and wait until the peer closes too (reading and discarding anything it sends).
/// A reset counts as closed.
pub fn close_and_wait(conn: &mut dyn Conn) -> Result<()> {
    let fail = |what: &str, e: io::Error| Error::from(format!("{what} failed: {}", describe(&e)));
    conn.flush().map_err(|e| fail("flush", e))?;
    conn.shutdown_write().map_err(|e| fail("shutdown(Write)", e))?;
    let mut scratch = [0u8; 4096];
    loop {
        match conn.read(&mut scratch) {
            Ok(0) => return Ok(()),
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(e.kind(), io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted) =>
            {
                return Ok(())
            }
            Err(e) => return Err(fail("waiting for the peer to close", e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_ordered_and_in_microseconds() {
        let mut r = Recorder::new();
        assert_eq!(r.percentiles(), None);
        for us in 1..=1000u64 {
            r.record(Duration::from_micros(us));
        }
        assert_eq!(r.samples(), 1000);
        let p = r.percentiles().unwrap();
        assert!((p.p50_us - 500.0).abs() < 1.0, "{p:?}");
        assert!(p.p50_us <= p.p99_us && p.p99_us <= p.p999_us && p.p999_us <= p.max_us, "{p:?}");
        assert!((p.max_us - 1000.0).abs() < 1.0, "{p:?}");
        assert!((p.mean_us - 500.5).abs() < 1.0, "{p:?}");
    }

    #[test]
    fn warmup_defaults_to_a_tenth_capped_at_half_a_second() {
        assert_eq!(warmup(None, 5.0), Duration::from_millis(500));
        assert_eq!(warmup(None, 60.0), Duration::from_millis(500));
        assert_eq!(warmup(None, 1.0), Duration::from_millis(100));
        assert_eq!(warmup(Some(0.0), 1.0), Duration::ZERO);
        assert_eq!(parse_warmup("0"), Ok(0.0));
        assert!(parse_warmup("-1").is_err());
    }

    #[test]
    fn read_full_reports_short_and_empty_streams() {
        let mut buf = [0u8; 8];
        assert_eq!(read_full(&mut &b"abc"[..], &mut buf).unwrap(), 3);
        assert_eq!(read_full(&mut &b""[..], &mut buf).unwrap(), 0);
        assert_eq!(read_full(&mut &b"0123456789"[..], &mut buf).unwrap(), 8);
        assert_eq!(&buf, b"01234567");
    }
}
