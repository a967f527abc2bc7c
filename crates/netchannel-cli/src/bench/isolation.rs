//! `bench isolation`: is latency isolated from bulk? (experiments 6d and 8c).
//!
//! One latency-sensitive app (the L-app: `--size` ping-pong on its own connection and
//! thread) runs first alone ("isolated") and then beside `--bulk-apps` bulk apps ("loaded"),
//! each a connection of its own with a sender thread writing `--bulk-write-size` writes of the
//! pattern and a receiver thread reading them. Every phase discards a `--warmup` and then
//! measures the L-app's round trips for `--duration` seconds into an HDR histogram; the bulk
//! apps' aggregate Gbit/s is what their receivers got during the loaded phase's measured
//! window. All connections are opened before the isolated phase, the bulk ones idle until the
//! loaded phase begins. Backends: `netchannel` (the L-app's vsocket in the latency class, bulk
//! vsockets in the throughput class), `tcp` (every connection plain), `tcp-prio` (the L-app's
//! TCP socket, both ends, gets `SO_PRIORITY` `--priority`; bulk plain); `all` runs the three
//! in that order. Both ends run in this process (`--role both` only). Each connection's first
//! byte tells the server which app it belongs to.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::ops::ControlFlow;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use netchannel::{Class, Config};
use serde::Serialize;

use super::backend::{Conn, Connector, Listener, Net};
use super::rpc::{self, parse_warmup, Percentiles, Recorder, TrafficClass, WindowClock};
use super::{
    bytes_human, parse_io_size, parse_secs, per_second, print_report, spawn, to_json, watch, Backend,
    CommonOpts, Knobs, Progress, Role, Stack, Watch,
};
use crate::cpu;
use crate::error::{describe, Context, Error, Result};
use crate::pattern::{self, Source};

/// First byte of the L-app's connection.
const TAG_LAPP: u8 = b'L';
/// First byte of a bulk app's connection.
const TAG_BULK: u8 = b'B';

/// Flags of `bench isolation`.
///
/// The shared `--backend` of [`CommonOpts`] is replaced by this mode's own (which knows
/// `tcp-prio` and `all`): the common one is renamed out of the way and hidden.
#[derive(Args, Debug)]
#[command(mut_arg("backend", |a| a.long("common-backend").hide(true)))]
pub struct IsolationArgs {
    /// Stack(s) to measure: netchannel, tcp, tcp-prio (L-app with SO_PRIORITY), or all three in that order
    #[arg(long = "backend", id = "isolation_backend", value_name = "BACKEND", value_enum, default_value_t = IsolationBackend::Netchannel)]
    pub backend: IsolationBackend,

    /// Seconds each phase (isolated, then loaded) is measured for, after its warm-up
    #[arg(long, value_name = "SECS", default_value_t = 5.0, value_parser = parse_secs)]
    pub duration: f64,

    /// Seconds discarded at the start of each phase [default: 10% of --duration, at most 0.5]
    #[arg(long, value_name = "SECS", value_parser = parse_warmup)]
    pub warmup: Option<f64>,

    /// Size of the L-app's requests and responses
    #[arg(long, value_name = "SIZE", default_value = "4KiB", value_parser = parse_io_size)]
    pub size: usize,

    /// Bulk apps in the loaded phase (each a connection, a sender and a receiver thread)
    #[arg(long, value_name = "N", default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub bulk_apps: u16,

    /// Size of each bulk write and read
    #[arg(long, value_name = "SIZE", default_value = "1MiB", value_parser = parse_io_size)]
    pub bulk_write_size: usize,

    /// tcp-prio: the SO_PRIORITY of the L-app's sockets (0..=6 needs no privilege)
    #[arg(long, value_name = "N", default_value_t = 6, value_parser = clap::value_parser!(i32).range(0..=255))]
    pub priority: i32,

    /// Check the L-app's echoes and every bulk byte; a mismatch fails the run
    #[arg(long)]
    pub verify: bool,

    #[command(flatten)]
    pub common: CommonOpts,
}

/// `--backend` of `bench isolation`.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum IsolationBackend {
    /// NetChannel: L-app vsocket in the latency class, bulk vsockets in the throughput class.
    Netchannel,
    /// Linux TCP, every connection plain.
    Tcp,
    /// Linux TCP, the L-app's sockets with SO_PRIORITY --priority.
    TcpPrio,
    /// netchannel, tcp, then tcp-prio.
    All,
}

impl IsolationBackend {
    fn setups(self) -> Vec<Setup> {
        match self {
            IsolationBackend::Netchannel => vec![Setup::Netchannel],
            IsolationBackend::Tcp => vec![Setup::Tcp],
            IsolationBackend::TcpPrio => vec![Setup::TcpPrio],
            IsolationBackend::All => vec![Setup::Netchannel, Setup::Tcp, Setup::TcpPrio],
        }
    }
}

/// One setup a run measured.
#[derive(Serialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Setup {
    /// NetChannel, L-app in the latency class.
    Netchannel,
    /// Plain Linux TCP.
    Tcp,
    /// Linux TCP with SO_PRIORITY on the L-app.
    TcpPrio,
}

impl Setup {
    fn name(self) -> &'static str {
        match self {
            Setup::Netchannel => "netchannel",
            Setup::Tcp => "tcp",
            Setup::TcpPrio => "tcp-prio",
        }
    }

    fn stack(self) -> Stack {
        match self {
            Setup::Netchannel => Stack::Netchannel,
            Setup::Tcp | Setup::TcpPrio => Stack::Tcp,
        }
    }
}

/// The L-app's latencies in one phase.
#[derive(Serialize, Debug)]
pub struct PhaseReport {
    /// Round trips measured.
    pub samples: u64,
    /// Round-trip percentiles (absent only if no round trip finished).
    #[serde(flatten)]
    pub latency: Option<Percentiles>,
    /// `samples / seconds`.
    pub round_trips_per_sec: f64,
    /// Length of the measured window.
    pub seconds: f64,
    /// User + system CPU seconds of the whole process in the measured window.
    pub cpu_seconds: f64,
}

/// The result of one `bench isolation` run.
#[derive(Serialize, Debug)]
pub struct IsolationReport {
    /// Always "isolation".
    pub mode: &'static str,
    /// The setup measured.
    pub backend: Setup,
    /// Bulk apps in the loaded phase.
    pub bulk_apps: u16,
    /// L-app request and response size in bytes.
    pub size: usize,
    /// Bulk write and read size in bytes.
    pub bulk_write_size: usize,
    /// The L-app's vsocket class (netchannel only).
    pub lapp_class: Option<TrafficClass>,
    /// The L-app's SO_PRIORITY (tcp-prio only).
    pub lapp_priority: Option<i32>,
    /// The L-app alone.
    pub isolated: PhaseReport,
    /// The L-app beside the bulk apps.
    pub loaded: PhaseReport,
    /// Bulk apps' aggregate Gbit/s during the loaded phase's measured window.
    pub bulk_gbps: f64,
    /// Bulk bytes received during the loaded phase's measured window.
    pub bulk_bytes: u64,
    /// User + system CPU seconds of the whole process from the start of the isolated phase to
    /// the end of the loaded phase (warm-ups included).
    pub cpu_seconds: f64,
    /// Wall seconds of that span.
    pub seconds: f64,
    /// CPU seconds of the L-app's client thread over that span.
    pub lapp_thread_cpu_seconds: f64,
    /// CPU seconds of every bulk sender and receiver thread together.
    pub bulk_threads_cpu_seconds: f64,
    /// True only if `--verify` was given and every echo and bulk byte matched.
    pub verified: bool,
    /// NetChannel: what waited to be sent on each class's channels during the loaded phase
    /// (both hosts together, sampled every few milliseconds); null for TCP.
    pub queues: Option<QueueReport>,
    /// Engine knobs (null for TCP).
    #[serde(flatten)]
    pub knobs: Knobs,
}

impl IsolationReport {
    fn human(&self) -> String {
        let mut what = self.backend.name().to_string();
        if let Some(c) = self.lapp_class {
            what += &format!(", L-app in the {} class", c.name());
        }
        if let Some(p) = self.lapp_priority {
            what += &format!(", L-app SO_PRIORITY {p}");
        }
        let knobs = self.knobs.describe();
        if !knobs.is_empty() {
            what += &format!(", {knobs}");
        }
        let phase = |p: &PhaseReport| {
            let latency = p.latency.as_ref().map(Percentiles::human).unwrap_or_else(|| "no samples".into());
            format!(
                "{} round trips of {} in {:.2} s: {latency}",
                p.samples,
                bytes_human(self.size as u64),
                p.seconds
            )
        };
        format!(
            "isolation {what}: {} bulk apps\n  isolated: {}; CPU {:.2} s\n  loaded:   {}; CPU {:.2} s; bulk {:.2} Gbit/s{}",
            self.bulk_apps,
            phase(&self.isolated),
            self.isolated.cpu_seconds,
            phase(&self.loaded),
            self.loaded.cpu_seconds,
            self.bulk_gbps,
            if self.verified { "; verified" } else { "" },
        )
    }
}

/// Queue depths sampled during the loaded phase, per channel class.
#[derive(Serialize, Debug, Default)]
pub struct QueueReport {
    /// Samples taken.
    pub samples: u64,
    /// Throughput (bulk) channels.
    pub throughput: ClassDepths,
    /// Latency channels.
    pub latency: ClassDepths,
}

/// Mean and largest depths of one class's channels over the samples.
#[derive(Serialize, Debug, Default)]
pub struct ClassDepths {
    /// Unsent bytes in our queues (gathered writes included).
    pub mean_queued_bytes: f64,
    /// Largest of those.
    pub max_queued_bytes: u64,
    /// Frames waiting in the channels' lanes.
    pub mean_queued_frames: f64,
    /// Largest of those.
    pub max_queued_frames: u64,
    /// Bytes the kernel sockets held unsent.
    pub mean_kernel_unsent_bytes: f64,
    /// Largest of those.
    pub max_kernel_unsent_bytes: u64,
}

impl ClassDepths {
    fn add(&mut self, q: &netchannel::ClassQueue) {
        self.mean_queued_bytes += q.queued as f64;
        self.max_queued_bytes = self.max_queued_bytes.max(q.queued as u64);
        let frames = q.queue.total().frames;
        self.mean_queued_frames += frames as f64;
        self.max_queued_frames = self.max_queued_frames.max(frames as u64);
        self.mean_kernel_unsent_bytes += q.kernel_unsent as f64;
        self.max_kernel_unsent_bytes = self.max_kernel_unsent_bytes.max(q.kernel_unsent as u64);
    }

    fn finish(&mut self, samples: u64) {
        let n = samples.max(1) as f64;
        self.mean_queued_bytes /= n;
        self.mean_queued_frames /= n;
        self.mean_kernel_unsent_bytes /= n;
    }
}

/// Sample the hosts' queue depths while the loaded phase runs (until the gate stops).
fn sample_queues(hosts: &[netchannel::Host], gate: &Gate) -> QueueReport {
    let mut r = QueueReport::default();
    while !gate.stopped() {
        std::thread::sleep(Duration::from_millis(5));
        if !gate.is_open() || gate.stopped() {
            continue;
        }
        let mut per_class = [netchannel::ClassQueue {
            class: Class::Throughput,
            channels: 0,
            queue: Default::default(),
            queued: 0,
            kernel_unsent: 0,
        }; 2];
        for h in hosts {
            for (sum, q) in per_class.iter_mut().zip(h.stats().class_queues()) {
                sum.queued += q.queued;
                sum.kernel_unsent += q.kernel_unsent;
                sum.queue.bulk += q.queue.total();
            }
        }
        r.throughput.add(&per_class[0]);
        r.latency.add(&per_class[1]);
        r.samples += 1;
    }
    r.throughput.finish(r.samples);
    r.latency.finish(r.samples);
    r
}

#[derive(Serialize)]
struct Runs<'a> {
    mode: &'static str,
    backend: &'static str,
    runs: &'a [IsolationReport],
}

/// Run `bench isolation` on every setup of `--backend` and print the reports.
pub fn run(args: &IsolationArgs) -> Result<()> {
    let common = &args.common;
    if common.role != Role::Both {
        return Err("bench isolation runs both ends in this process: it takes only --role both".into());
    }
    if common.backend != Backend::Netchannel {
        return Err("bench isolation: use --backend (netchannel, tcp, tcp-prio or all)".into());
    }
    let config = common.engine_config()?;
    pattern::byte_at(0); // build the table before anything is timed
    let mut reports = Vec::new();
    for setup in args.backend.setups() {
        reports.push(run_one(setup, args, &config)?);
    }
    print(args.common.json, &reports)
}

/// One JSON object (the run, or `{"mode", "backend": "all", "runs"}`), or human lines.
fn print(json: bool, runs: &[IsolationReport]) -> Result<()> {
    let text = if json {
        match runs {
            [one] => to_json(one)?,
            _ => to_json(&Runs { mode: "isolation", backend: "all", runs })?,
        }
    } else {
        let mut text = runs.iter().map(IsolationReport::human).collect::<Vec<_>>().join("\n");
        if runs.len() > 1 {
            let p99 = |r: &IsolationReport| {
                r.loaded.latency.map(|p| format!("{} µs", rpc::us_human(p.p99_us))).unwrap_or("-".into())
            };
            let each: Vec<String> = runs.iter().map(|r| format!("{} {}", r.backend.name(), p99(r))).collect();
            text += &format!("\nL-app p99 under load: {}", each.join(", "));
        }
        text
    };
    print_report(&text)
}

/// Bulk senders wait here until the L-app opens the loaded phase, and stop when told.
#[derive(Default)]
struct Gate {
    state: Mutex<GateState>,
    cv: Condvar,
    stop: AtomicBool,
}

#[derive(Default)]
struct GateState {
    connected: usize,
    go: bool,
}

impl Gate {
    /// A bulk sender's connection is up.
    fn connected(&self) {
        self.state.lock().unwrap().connected += 1;
        self.cv.notify_all();
    }

    /// Wait until `n` bulk senders are connected; false if stopped first.
    fn wait_connected(&self, n: usize) -> bool {
        let st =
            self.cv.wait_while(self.state.lock().unwrap(), |s| s.connected < n && !self.stopped()).unwrap();
        st.connected >= n && !self.stopped()
    }

    /// Start the bulk apps.
    fn open(&self) {
        self.state.lock().unwrap().go = true;
        self.cv.notify_all();
    }

    /// Whether the loaded phase has begun.
    fn is_open(&self) -> bool {
        self.state.lock().unwrap().go
    }

    /// Wait for [`Gate::open`]; false if stopped first.
    fn wait_open(&self) -> bool {
        let st = self.cv.wait_while(self.state.lock().unwrap(), |s| !s.go && !self.stopped()).unwrap();
        st.go && !self.stopped()
    }

    /// Stop the bulk apps (also releases every waiter).
    fn stop(&self) {
        let _st = self.state.lock().unwrap();
        self.stop.store(true, Ordering::Relaxed);
        self.cv.notify_all();
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

/// Stops the gate when the L-app's thread ends, however it ends.
struct StopOnDrop(Arc<Gate>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stop();
    }
}

struct PhaseResult {
    latencies: Recorder,
    seconds: f64,
    process_cpu: f64,
    bulk_bytes: u64,
}

struct LappResult {
    isolated: PhaseResult,
    loaded: PhaseResult,
    seconds: f64,
    process_cpu: f64,
    thread_cpu: f64,
}

enum Event {
    Lapp(Box<Result<LappResult>>),
    LappServer(Result<()>),
    Acceptor(Result<()>),
    /// A bulk sender's or receiver's thread CPU seconds.
    Bulk(Result<f64>),
}

/// What every thread of one run shares.
struct Shared {
    setup: Setup,
    priority: i32,
    size: usize,
    write_size: usize,
    verify: bool,
    bulk_apps: usize,
    warmup: Duration,
    duration: Duration,
    gate: Arc<Gate>,
    bulk_bytes: AtomicU64,
    progress: Progress,
    bulk_source: Source,
}

fn run_one(setup: Setup, args: &IsolationArgs, config: &Config) -> Result<IsolationReport> {
    let common = &args.common;
    let stack = setup.stack();
    let mut net = Net::open(stack, common, config)?;
    let shared = Arc::new(Shared {
        setup,
        priority: args.priority,
        size: args.size,
        write_size: args.bulk_write_size,
        verify: args.verify,
        bulk_apps: usize::from(args.bulk_apps),
        warmup: rpc::warmup(args.warmup, args.duration),
        duration: Duration::from_secs_f64(args.duration),
        gate: Arc::new(Gate::default()),
        bulk_bytes: AtomicU64::new(0),
        progress: Progress::default(),
        bulk_source: Source::new(args.bulk_write_size),
    });
    let (tx, rx) = mpsc::channel();
    let listener = net.listen()?;
    let connector = net.connector()?;
    {
        let (shared, tx) = (shared.clone(), tx.clone());
        spawn("isolation-accept", move || {
            let result = acceptor(&listener, &shared, &tx);
            let _ = tx.send(Event::Acceptor(result));
        })?;
    }
    {
        let (shared, tx, connector) = (shared.clone(), tx.clone(), connector.clone());
        spawn("isolation-lapp", move || {
            let _ = tx.send(Event::Lapp(Box::new(lapp_client(&connector, &shared))));
        })?;
    }
    for i in 0..shared.bulk_apps {
        let (shared, tx, connector) = (shared.clone(), tx.clone(), connector.clone());
        spawn(&format!("isolation-bulk-tx-{i}"), move || {
            let result = bulk_sender(&connector, &shared);
            if result.is_err() {
                shared.gate.stop();
            }
            let _ = tx.send(Event::Bulk(result));
        })?;
    }
    drop(tx);
    let sampler = match net.hosts() {
        hosts if hosts.is_empty() => None,
        hosts => {
            let gate = shared.gate.clone();
            Some(
                std::thread::Builder::new()
                    .name("isolation-queues".into())
                    .spawn(move || sample_queues(&hosts, &gate))
                    .map_err(|e| Error::from(format!("cannot start the queue sampler thread: {e}")))?,
            )
        }
    };
    shared.progress.activate();
    // The L-app, its server, the acceptor, and a sender and a receiver per bulk app.
    let expected = 3 + 2 * shared.bulk_apps;
    let mut lapp = None;
    let mut bulk_cpu = 0.0;
    let mut results = 0;
    let mut failure = None;
    let opts = Watch {
        quiet: common.json,
        stall_timeout: Duration::from_secs_f64(common.stall_timeout),
        label: "received",
    };
    watch(&rx, &shared.progress, &opts, |event| {
        results += 1;
        let outcome = match event {
            Event::Lapp(r) => r.map(|l| lapp = Some(l)),
            Event::LappServer(r) | Event::Acceptor(r) => r,
            Event::Bulk(r) => r.map(|cpu| bulk_cpu += cpu),
        };
        if let Err(e) = outcome {
            // The first error explains the others (which follow from the gate stopping).
            failure.get_or_insert(e);
            shared.gate.stop();
            return ControlFlow::Break(());
        }
        if results == expected {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })?;
    shared.gate.stop();
    let queues = sampler.and_then(|t| t.join().ok());
    if let Some(e) = failure {
        return Err(e);
    }
    let lapp = lapp.ok_or("the L-app thread stopped without a result (see the panic above)")?;
    if results != expected {
        return Err("a bulk app thread stopped without a result (see the panic above)".into());
    }
    net.shutdown();
    let phase = |p: &PhaseResult| PhaseReport {
        samples: p.latencies.samples(),
        latency: p.latencies.percentiles(),
        round_trips_per_sec: per_second(p.latencies.samples() as f64, p.seconds),
        seconds: p.seconds,
        cpu_seconds: p.process_cpu,
    };
    Ok(IsolationReport {
        mode: "isolation",
        backend: setup,
        bulk_apps: args.bulk_apps,
        size: args.size,
        bulk_write_size: args.bulk_write_size,
        lapp_class: (setup == Setup::Netchannel).then_some(TrafficClass::Latency),
        lapp_priority: (setup == Setup::TcpPrio).then_some(args.priority),
        isolated: phase(&lapp.isolated),
        loaded: phase(&lapp.loaded),
        bulk_gbps: per_second(lapp.loaded.bulk_bytes as f64 * 8.0, lapp.loaded.seconds) / 1e9,
        bulk_bytes: lapp.loaded.bulk_bytes,
        cpu_seconds: lapp.process_cpu,
        seconds: lapp.seconds,
        lapp_thread_cpu_seconds: lapp.thread_cpu,
        bulk_threads_cpu_seconds: bulk_cpu,
        verified: args.verify,
        queues,
        knobs: Knobs::of(stack, config),
    })
}

/// Set `SO_PRIORITY` on a TCP socket.
fn set_priority(s: &TcpStream, priority: i32) -> io::Result<()> {
    let v: libc::c_int = priority;
    // SAFETY: the fd is an open socket owned by `s`; the option value points to a c_int that
    // lives across the call, and its size is passed with it.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PRIORITY,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Read the first byte of a new connection: which app it belongs to.
fn read_tag(conn: &mut dyn Read, peer: SocketAddr) -> Result<u8> {
    let mut tag = [0u8; 1];
    conn.read_exact(&mut tag)
        .context(|| format!("cannot read the first byte of the connection from {peer}"))?;
    Ok(tag[0])
}

/// Accept one connection and read its tag. For tcp-prio the L-app's socket gets its priority.
fn accept_tagged(listener: &Listener, shared: &Shared) -> Result<(Box<dyn Conn>, SocketAddr, u8)> {
    if let (Setup::TcpPrio, Listener::Tcp(l)) = (shared.setup, listener) {
        let (mut s, peer) = l.accept().context(|| format!("cannot accept on {}", listener.describe()))?;
        s.set_nodelay(true).context(|| format!("cannot set TCP_NODELAY on the stream from {peer}"))?;
        let tag = read_tag(&mut s, peer)?;
        if tag == TAG_LAPP {
            set_priority(&s, shared.priority).context(|| {
                format!("cannot set SO_PRIORITY {} on the stream from {peer}", shared.priority)
            })?;
        }
        return Ok((Box::new(s), peer, tag));
    }
    let (mut conn, peer) = listener.accept()?;
    let tag = read_tag(&mut *conn, peer)?;
    Ok((conn, peer, tag))
}

/// The server's accepting thread: one L-app and `bulk_apps` bulk connections, each handed to a
/// thread of its own.
fn acceptor(listener: &Listener, shared: &Arc<Shared>, tx: &Sender<Event>) -> Result<()> {
    let mut lapp_seen = false;
    for i in 0..=shared.bulk_apps {
        let (mut conn, peer, tag) = accept_tagged(listener, shared)?;
        let (shared, tx2) = (shared.clone(), tx.clone());
        match tag {
            TAG_LAPP if !lapp_seen => {
                lapp_seen = true;
                spawn("isolation-lapp-server", move || {
                    let result = lapp_server(&mut *conn, peer, &shared);
                    let _ = tx2.send(Event::LappServer(result));
                })?;
            }
            TAG_BULK => spawn(&format!("isolation-bulk-rx-{i}"), move || {
                let result = bulk_receiver(&mut *conn, peer, &shared);
                let _ = tx2.send(Event::Bulk(result));
            })?,
            other => {
                return Err(format!("unexpected first byte {other:#04x} on the connection from {peer}").into())
            }
        }
    }
    Ok(())
}

/// The L-app's server: echo requests until the client closes.
fn lapp_server(conn: &mut dyn Conn, peer: SocketAddr, shared: &Shared) -> Result<()> {
    let mut buf = vec![0u8; shared.size];
    while rpc::serve_one(conn, &mut buf).map_err(|e| Error::from(format!("L-app server, {peer}: {e}")))? {
        shared.progress.add(shared.size as u64);
    }
    Ok(())
}

/// A bulk app's receiver: read until EOF, counting (and with `--verify` checking) the bytes.
/// Returns its thread's CPU seconds.
fn bulk_receiver(conn: &mut dyn Conn, peer: SocketAddr, shared: &Shared) -> Result<f64> {
    let thread_cpu_at_start = cpu::thread_seconds();
    let mut buf = vec![0u8; shared.write_size];
    let mut offset = 0u64;
    loop {
        let n = match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(format!(
                    "bulk read from {peer} failed at stream offset {offset}: {}",
                    describe(&e)
                )
                .into())
            }
        };
        if shared.verify {
            pattern::check(offset, &buf[..n])
                .map_err(|m| Error::from(format!("verify failed on the bulk stream from {peer} at {m}")))?;
        }
        offset += n as u64;
        shared.bulk_bytes.fetch_add(n as u64, Ordering::Relaxed);
        shared.progress.add(n as u64);
    }
    Ok(cpu::thread_seconds() - thread_cpu_at_start)
}

/// A bulk app's sender: connect, wait for the loaded phase, write until stopped, close.
/// Returns its thread's CPU seconds.
fn bulk_sender(connector: &Connector, shared: &Shared) -> Result<f64> {
    let thread_cpu_at_start = cpu::thread_seconds();
    let target = connector.target();
    let mut conn = connector.connect_class(Class::Throughput)?;
    conn.write_all(&[TAG_BULK]).context(|| format!("cannot write to {target}"))?;
    shared.gate.connected();
    let mut offset = 0u64;
    if shared.gate.wait_open() {
        let size = shared.write_size;
        while !shared.gate.stopped() {
            conn.write_all(shared.bulk_source.slice(offset, size)).map_err(|e| {
                Error::from(format!(
                    "bulk write to {target} failed at stream offset {offset}: {}",
                    describe(&e)
                ))
            })?;
            offset += size as u64;
        }
    }
    rpc::close_and_wait(&mut *conn)
        .map_err(|e| Error::from(format!("closing the bulk stream to {target}: {e}")))?;
    Ok(cpu::thread_seconds() - thread_cpu_at_start)
}

/// Open the L-app's connection as the setup wants it.
fn connect_lapp(connector: &Connector, shared: &Shared) -> Result<Box<dyn Conn>> {
    let target = connector.target();
    let mut conn: Box<dyn Conn> = match shared.setup {
        Setup::Netchannel => connector.connect_class(Class::Latency)?,
        Setup::Tcp => connector.connect()?,
        Setup::TcpPrio => {
            let s = TcpStream::connect(target).context(|| format!("cannot connect to {target}"))?;
            s.set_nodelay(true).context(|| format!("cannot set TCP_NODELAY on the stream to {target}"))?;
            connector.tune(&s)?;
            set_priority(&s, shared.priority).context(|| {
                format!("cannot set SO_PRIORITY {} on the stream to {target}", shared.priority)
            })?;
            Box::new(s)
        }
    };
    conn.write_all(&[TAG_LAPP]).context(|| format!("cannot write to {target}"))?;
    Ok(conn)
}

/// The L-app's client thread, which also paces the run: connect, wait for the bulk apps'
/// connections, ping-pong alone, open the gate, ping-pong beside the bulk apps, stop them.
fn lapp_client(connector: &Connector, shared: &Shared) -> Result<LappResult> {
    let _stop = StopOnDrop(shared.gate.clone());
    let target = connector.target();
    let mut conn = connect_lapp(connector, shared)?;
    if !shared.gate.wait_connected(shared.bulk_apps) {
        return Err("a bulk app failed before the run began".into());
    }
    let source = Source::new(shared.size);
    let mut response = vec![0u8; shared.size];
    let mut offset = 0u64;
    let start = Instant::now();
    let process_cpu_at_start = cpu::process_seconds();
    let thread_cpu_at_start = cpu::thread_seconds();
    let mut phase = |conn: &mut dyn Conn| -> Result<PhaseResult> {
        let mut latencies = Recorder::new();
        let mut clock = WindowClock::new(shared.warmup);
        let end = clock.from + shared.duration;
        let mut bulk_at_start = None;
        loop {
            let t0 = Instant::now();
            let measuring = clock.check(t0);
            if measuring && bulk_at_start.is_none() {
                bulk_at_start = Some(shared.bulk_bytes.load(Ordering::Relaxed));
            }
            if t0 >= end {
                break;
            }
            rpc::round_trip(conn, &source, offset, &mut response, shared.verify)
                .map_err(|e| Error::from(format!("L-app, {target}: {e}")))?;
            if measuring {
                latencies.record(t0.elapsed());
            }
            offset += shared.size as u64;
        }
        let window = clock.finish();
        let bulk_bytes = shared.bulk_bytes.load(Ordering::Relaxed) - bulk_at_start.unwrap_or(0);
        Ok(PhaseResult { latencies, seconds: window.seconds, process_cpu: window.process_cpu, bulk_bytes })
    };
    let isolated = phase(&mut *conn)?;
    shared.gate.open();
    let loaded = phase(&mut *conn)?;
    shared.gate.stop();
    let result = LappResult {
        isolated,
        loaded,
        seconds: start.elapsed().as_secs_f64(),
        process_cpu: cpu::process_seconds() - process_cpu_at_start,
        thread_cpu: cpu::thread_seconds() - thread_cpu_at_start,
    };
    rpc::close_and_wait(&mut *conn)
        .map_err(|e| Error::from(format!("closing the L-app connection to {target}: {e}")))?;
    Ok(result)
}
