//! `bench tokio`: async Rust over vsockets against async Rust over kernel TCP, in one run.
//!
//! Both sides are tokio programs that differ only in their import: `netchannel::tokio`'s
//! `VStream`/`VListener` on two embedded hosts (127.0.0.1 and 127.0.0.2, stack
//! `netchannel`), the same through two daemons run in this process (stack `daemon`: the
//! apps' vsockets in shared memory, their readiness through the daemon's proxies), or
//! `tokio::net::TcpStream`/`TcpListener` over loopback (`tcp`). Two workloads:
//!
//! * **pingpong**: for each `--conns` count, that many connections each keep one `--size`
//!   request in flight (write it, read its whole echo) for `--duration` seconds after a
//!   warm-up; every round trip goes into an HDR histogram (p50, p99, round trips/s).
//! * **http**: a hyper 1.x HTTP/1.1 server (the `hyper_http` example's) and `--http-clients`
//!   keep-alive clients each sending `GET /` back to back for `--duration` seconds;
//!   requests/s.
//!
//! The server and the clients run on two separate multi-thread runtimes of `--threads`
//! workers each. Stacks alternate (TCP, NetChannel, daemon) `--repeat` times; the table
//! shows each repetition's figures and the medians, with each stack's ratio to TCP.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Args;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{parse_io_size, parse_secs};
use crate::error::{Context, Error, Result};

/// Flags of `bench tokio`.
#[derive(Args, Debug)]
pub struct TokioArgs {
    /// Seconds measured per workload, stack and repetition (after a warm-up of a tenth)
    #[arg(long, value_name = "SECS", default_value_t = 3.0, value_parser = parse_secs)]
    pub duration: f64,

    /// Size of each ping-pong request and of its response
    #[arg(long, value_name = "SIZE", default_value = "64", value_parser = parse_io_size)]
    pub size: usize,

    /// Ping-pong connection counts to measure, comma-separated (0 skips the ping-pong)
    #[arg(long, value_name = "N,..", value_delimiter = ',', default_value = "1,64")]
    pub conns: Vec<usize>,

    /// Concurrent keep-alive HTTP clients (0 skips the HTTP workload)
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub http_clients: usize,

    /// Worker threads of each of the two runtimes (server, clients)
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub threads: usize,

    /// Repetitions, alternating the stacks (TCP, NetChannel, daemon)
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub repeat: usize,

    /// Stacks to measure, comma-separated (both by default; one alone is for profiling it)
    #[arg(long, value_enum, value_name = "STACK,..", value_delimiter = ',', default_values_t = [Stack::Tcp, Stack::Netchannel, Stack::Daemon])]
    pub stacks: Vec<Stack>,

    /// NetChannel: traffic class of the vsockets
    #[arg(long, value_enum, default_value_t = super::rpc::TrafficClass::Latency)]
    pub class: super::rpc::TrafficClass,

    /// Print the report as one JSON object (`mode`, `size`, `duration`, `samples`) instead of a table
    #[arg(long)]
    pub json: bool,
}

/// One measured workload on one stack.
#[derive(Serialize, Debug, Clone)]
pub struct Sample {
    /// "pingpong" or "http".
    pub workload: &'static str,
    /// "tcp", "netchannel" or "daemon".
    pub stack: &'static str,
    /// Concurrent connections (HTTP: clients).
    pub conns: usize,
    /// Repetition number, from 0.
    pub rep: usize,
    /// Round trips (HTTP: requests) per second.
    pub per_sec: f64,
    /// Round-trip p50, µs (pingpong only).
    pub p50_us: Option<f64>,
    /// Round-trip p99, µs (pingpong only).
    pub p99_us: Option<f64>,
}

/// A stack `bench tokio` measures.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum Stack {
    /// tokio over kernel TCP on loopback
    Tcp,
    /// tokio over vsockets of two embedded hosts
    Netchannel,
    /// tokio over vsockets served by two daemons (in this process, as apps reach them)
    Daemon,
}

impl Stack {
    fn name(self) -> &'static str {
        match self {
            Stack::Tcp => "tcp",
            Stack::Netchannel => "netchannel",
            Stack::Daemon => "daemon",
        }
    }
}

/// Where clients connect: a kernel TCP address, or a vsocket address through a host.
#[derive(Clone)]
enum Target {
    Tcp(SocketAddr),
    Netchannel(netchannel::Host, SocketAddr, netchannel::Class),
    Daemon(netchannel::daemon::Client, SocketAddr, netchannel::Class),
}

impl Target {
    async fn connect(&self) -> std::io::Result<Box<dyn IoBox>> {
        Ok(match self {
            Target::Tcp(a) => {
                let s = tokio::net::TcpStream::connect(a).await?;
                s.set_nodelay(true)?;
                Box::new(s)
            }
            Target::Netchannel(h, a, class) => {
                Box::new(netchannel::tokio::VStream::connect_class_with(h, *a, *class).await?)
            }
            Target::Daemon(c, a, class) => {
                let (c, a, class) = (c.clone(), *a, *class);
                let s = tokio::task::spawn_blocking(move || c.connect_class(a, class))
                    .await
                    .map_err(std::io::Error::other)??;
                Box::new(netchannel::tokio::VStream::from_std(s)?)
            }
        })
    }
}

/// A connected stream of either stack.
trait IoBox: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> IoBox for T {}

/// Accepted streams of either stack, as boxed `Io`.
enum Acceptor {
    Tcp(tokio::net::TcpListener),
    Netchannel(netchannel::tokio::VListener),
}

impl Acceptor {
    async fn accept(&self) -> std::io::Result<Box<dyn IoBox>> {
        Ok(match self {
            Acceptor::Tcp(l) => {
                let (s, _) = l.accept().await?;
                s.set_nodelay(true)?;
                Box::new(s)
            }
            Acceptor::Netchannel(l) => Box::new(l.accept().await?.0),
        })
    }
}

fn runtime(threads: usize, name: &str) -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .thread_name(name)
        .enable_all()
        .build()
        .context(|| "cannot start a tokio runtime".into())
}

/// Two embedded hosts on 127.0.0.1 and 127.0.0.2 with a channel port free on both.
fn two_hosts() -> Result<(netchannel::Host, netchannel::Host)> {
    let base = 31000 + (std::process::id() % 20000) as u16;
    let mut last = String::new();
    for port in base..base + 50 {
        let mut cfg =
            netchannel::Config { listen: SocketAddr::from(([127, 0, 0, 1], port)), ..Default::default() };
        let a = match netchannel::Host::start(cfg.clone()) {
            Ok(h) => h,
            Err(e) => {
                last = e.to_string();
                continue;
            }
        };
        cfg.listen = SocketAddr::from(([127, 0, 0, 2], port));
        match netchannel::Host::start(cfg) {
            Ok(b) => return Ok((a, b)),
            Err(e) => last = e.to_string(),
        }
    }
    Err(Error::from(format!("cannot start two NetChannel hosts on 127.0.0.1/127.0.0.2: {last}")))
}

/// Two daemons on 127.0.0.1 and 127.0.0.2, run on threads of this process, with a channel
/// port free on both and their sockets in a fresh directory; stopped when dropped.
struct Daemons {
    clients: (netchannel::daemon::Client, netchannel::daemon::Client),
    _run: Running,
}

/// The daemons' threads, stopped and joined when dropped.
struct Running {
    stops: Vec<netchannel::daemon::Stopper>,
    threads: Vec<std::thread::JoinHandle<()>>,
    dir: std::path::PathBuf,
}

impl Drop for Running {
    fn drop(&mut self) {
        for s in &self.stops {
            s.stop();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn two_daemons() -> Result<Daemons> {
    let dir = std::env::temp_dir().join(format!("netchannel-bench-tokio-{}", std::process::id()));
    std::fs::create_dir_all(&dir).context(|| format!("cannot create {}", dir.display()))?;
    let mut run = Running { stops: Vec::new(), threads: Vec::new(), dir: dir.clone() };
    let base = 33000 + (std::process::id() % 20000) as u16;
    let mut last = String::new();
    'port: for port in base..base + 50 {
        let mut servers = Vec::new();
        for (ip, name) in [([127, 0, 0, 1], "a.sock"), ([127, 0, 0, 2], "b.sock")] {
            let mut cfg = netchannel::Config { listen: SocketAddr::from((ip, port)), ..Default::default() };
            cfg.daemon.socket = Some(dir.join(name));
            match netchannel::daemon::Server::start(cfg) {
                Ok(s) => servers.push(s),
                Err(e) => {
                    last = e.to_string();
                    continue 'port;
                }
            }
        }
        for s in servers {
            run.stops.push(s.stopper());
            run.threads.push(std::thread::spawn(move || {
                let _ = s.run();
            }));
        }
        let client = |name: &str| {
            netchannel::daemon::Client::connect(dir.join(name))
                .context(|| format!("cannot reach the bench's daemon {name}"))
        };
        return Ok(Daemons { clients: (client("a.sock")?, client("b.sock")?), _run: run });
    }
    Err(Error::from(format!("cannot start two NetChannel daemons on 127.0.0.1/127.0.0.2: {last}")))
}

/// The server side of one stack, and where its clients go.
struct Served {
    /// The server's runtime: dropping it stops the server.
    _rt: tokio::runtime::Runtime,
    target: Target,
    _hosts: Option<(netchannel::Host, netchannel::Host)>,
    _daemons: Option<Daemons>,
}

fn serve(stack: Stack, args: &TokioArgs, http: bool) -> Result<Served> {
    let rt = runtime(args.threads, "bench-server")?;
    let class = args.class.class();
    let mut daemons = None;
    let (acceptor, target, hosts) = match stack {
        Stack::Tcp => {
            let l = rt
                .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
                .context(|| "cannot listen on 127.0.0.1".into())?;
            let a = l.local_addr().context(|| "listener address".into())?;
            (Acceptor::Tcp(l), Target::Tcp(a), None)
        }
        Stack::Netchannel => {
            let (a, b) = two_hosts()?;
            let l = b.bind(0).context(|| "cannot bind a vsocket port".into())?;
            let l = {
                let _g = rt.enter();
                netchannel::tokio::VListener::from_std(l)
                    .context(|| "cannot make the listener async".into())?
            };
            let addr = l.local_addr().context(|| "listener address".into())?;
            (Acceptor::Netchannel(l), Target::Netchannel(a.clone(), addr, class), Some((a, b)))
        }
        Stack::Daemon => {
            let d = two_daemons()?;
            let l = d.clients.1.bind(0).context(|| "cannot bind a vsocket port through the daemon".into())?;
            let l = {
                let _g = rt.enter();
                netchannel::tokio::VListener::from_std(l)
                    .context(|| "cannot make the daemon's listener async".into())?
            };
            let addr = l.local_addr().context(|| "listener address".into())?;
            let target = Target::Daemon(d.clients.0.clone(), addr, class);
            daemons = Some(d);
            (Acceptor::Netchannel(l), target, None)
        }
    };
    let size = args.size;
    rt.spawn(async move {
        loop {
            let Ok(s) = acceptor.accept().await else { return };
            if http {
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|_req| async {
                        Ok::<_, hyper::Error>(hyper::Response::new(Full::new(Bytes::from_static(
                            b"hello over NetChannel\n",
                        ))))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            } else {
                tokio::spawn(async move {
                    let mut s = s;
                    let mut buf = vec![0u8; size];
                    while s.read_exact(&mut buf).await.is_ok() {
                        if s.write_all(&buf).await.is_err() {
                            return;
                        }
                    }
                });
            }
        }
    });
    Ok(Served { _rt: rt, target, _hosts: hosts, _daemons: daemons })
}

fn pingpong(stack: Stack, conns: usize, rep: usize, args: &TokioArgs) -> Result<Sample> {
    let served = serve(stack, args, false)?;
    let rt = runtime(args.threads, "bench-client")?;
    let warm = Duration::from_secs_f64(args.duration / 10.0);
    let measure = Duration::from_secs_f64(args.duration);
    let size = args.size;
    let target = served.target.clone();
    let hist = rt.block_on(async move {
        let mut streams = Vec::new();
        for _ in 0..conns {
            streams.push(target.connect().await.context(|| format!("{} connect", stack.name()))?);
        }
        let start = Instant::now() + warm;
        let end = start + measure;
        let mut tasks = Vec::new();
        for mut s in streams {
            tasks.push(tokio::spawn(async move {
                let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("bounds");
                let req = vec![0x5au8; size];
                let mut back = vec![0u8; size];
                loop {
                    let t = Instant::now();
                    if t >= end {
                        break;
                    }
                    s.write_all(&req).await?;
                    s.read_exact(&mut back).await?;
                    if t >= start {
                        h.record(t.elapsed().as_nanos() as u64).expect("in bounds");
                    }
                }
                std::io::Result::Ok(h)
            }));
        }
        let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("bounds");
        for t in tasks {
            let h = t
                .await
                .map_err(|e| Error::from(format!("a client task failed: {e}")))?
                .context(|| format!("{} round trip", stack.name()))?;
            all.add(&h).expect("same bounds");
        }
        Result::Ok(all)
    })?;
    drop(rt);
    drop(served);
    Ok(Sample {
        workload: "pingpong",
        stack: stack.name(),
        conns,
        rep,
        per_sec: hist.len() as f64 / measure.as_secs_f64(),
        p50_us: Some(hist.value_at_quantile(0.5) as f64 / 1e3),
        p99_us: Some(hist.value_at_quantile(0.99) as f64 / 1e3),
    })
}

fn http(stack: Stack, clients: usize, rep: usize, args: &TokioArgs) -> Result<Sample> {
    let served = serve(stack, args, true)?;
    let rt = runtime(args.threads, "bench-client")?;
    let warm = Duration::from_secs_f64(args.duration / 10.0);
    let measure = Duration::from_secs_f64(args.duration);
    let target = served.target.clone();
    let count = Arc::new(AtomicU64::new(0));
    let counting = Arc::new(AtomicBool::new(false));
    let n = rt.block_on({
        let (count, counting) = (count.clone(), counting.clone());
        async move {
            let mut tasks = Vec::new();
            for _ in 0..clients {
                let s = target.connect().await.context(|| format!("{} connect", stack.name()))?;
                let (mut send, conn) =
                    hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(s))
                        .await
                        .map_err(|e| Error::from(format!("HTTP handshake: {e}")))?;
                tokio::spawn(conn);
                let (count, counting) = (count.clone(), counting.clone());
                tasks.push(tokio::spawn(async move {
                    loop {
                        let req = hyper::Request::get("/")
                            .header("host", "bench")
                            .body(Full::default())
                            .expect("a valid request");
                        let res = match send.send_request(req).await {
                            Ok(r) => r,
                            Err(e) => return Err(format!("HTTP request: {e}")),
                        };
                        if res.status() != 200 {
                            return Err(format!("HTTP status {}", res.status()));
                        }
                        if let Err(e) = res.into_body().collect().await {
                            return Err(format!("HTTP body: {e}"));
                        }
                        if counting.load(Ordering::Relaxed) {
                            count.fetch_add(1, Ordering::Relaxed);
                        }
                        if send.is_closed() {
                            return Ok(());
                        }
                    }
                }));
            }
            tokio::time::sleep(warm).await;
            counting.store(true, Ordering::Relaxed);
            tokio::time::sleep(measure).await;
            counting.store(false, Ordering::Relaxed);
            let n = count.load(Ordering::Relaxed);
            for t in &tasks {
                t.abort();
            }
            for t in tasks {
                // Aborted tasks (the normal end) are fine; a failed request is not.
                if let Ok(Err(e)) = t.await {
                    return Err(Error::from(format!("{}: {e}", stack.name())));
                }
            }
            Result::Ok(n)
        }
    })?;
    drop(rt);
    drop(served);
    Ok(Sample {
        workload: "http",
        stack: stack.name(),
        conns: clients,
        rep,
        per_sec: n as f64 / measure.as_secs_f64(),
        p50_us: None,
        p99_us: None,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

/// Run `bench tokio`.
pub fn run(args: &TokioArgs) -> Result<()> {
    if args.size == 0 {
        return Err("--size must be at least 1 byte".into());
    }
    if args.repeat == 0 {
        return Err("--repeat must be at least 1".into());
    }
    let mut stacks = Vec::new();
    for s in [Stack::Tcp, Stack::Netchannel, Stack::Daemon] {
        if args.stacks.contains(&s) {
            stacks.push(s);
        }
    }
    let mut samples = Vec::new();
    for rep in 0..args.repeat {
        for &conns in args.conns.iter().filter(|&&c| c > 0) {
            for &stack in &stacks {
                samples.push(pingpong(stack, conns, rep, args)?);
            }
        }
        if args.http_clients > 0 {
            for &stack in &stacks {
                samples.push(http(stack, args.http_clients, rep, args)?);
            }
        }
    }
    if args.json {
        let report = serde_json::json!({ "mode": "tokio", "size": args.size, "duration": args.duration, "samples": samples });
        println!("{}", serde_json::to_string_pretty(&report).expect("serializable"));
        return Ok(());
    }
    println!(
        "bench tokio: {} B ping-pong, {} s per run, {} repetitions, {} worker(s) per runtime, vsockets of class {:?}",
        args.size, args.duration, args.repeat, args.threads, args.class
    );
    println!(
        "{:<9} {:>5} {:<11} {:>12} {:>10} {:>10}   per repetition (per s)",
        "workload", "conns", "stack", "per s", "p50 µs", "p99 µs"
    );
    let mut groups: Vec<(&'static str, usize)> = Vec::new();
    for s in &samples {
        if !groups.contains(&(s.workload, s.conns)) {
            groups.push((s.workload, s.conns));
        }
    }
    for (w, c) in groups {
        let mut med = Vec::new();
        for stack in stacks.iter().map(|s| s.name()) {
            let of: Vec<&Sample> =
                samples.iter().filter(|s| s.workload == w && s.conns == c && s.stack == stack).collect();
            let per = median(of.iter().map(|s| s.per_sec).collect());
            let p50 = median(of.iter().filter_map(|s| s.p50_us).collect());
            let p99 = median(of.iter().filter_map(|s| s.p99_us).collect());
            let reps: Vec<String> = of.iter().map(|s| format!("{:.0}", s.per_sec)).collect();
            let lat = |v: f64| if v.is_nan() { "-".to_string() } else { format!("{v:.1}") };
            println!(
                "{w:<9} {c:>5} {stack:<11} {per:>12.0} {:>10} {:>10}   {}",
                lat(p50),
                lat(p99),
                reps.join(" ")
            );
            med.push((stack, per, p50, p99));
        }
        let Some(&(_, t0, t1, t2)) = med.iter().find(|m| m.0 == "tcp") else { continue };
        for &(stack, n0, n1, n2) in med.iter().filter(|m| m.0 != "tcp") {
            let what = format!("({stack} / tcp)");
            if w == "pingpong" {
                println!(
                    "{:<9} {c:>5} {:<11} {:>11.2}x {:>9.2}x {:>9.2}x   {what}",
                    "",
                    "ratio",
                    n0 / t0,
                    n1 / t1,
                    n2 / t2
                );
            } else {
                println!("{:<9} {c:>5} {:<11} {:>11.2}x   {what}", "", "ratio", n0 / t0);
            }
        }
    }
    Ok(())
}
