//! `netchannel bench redis`: experiment 7 of the paper, an unmodified single-threaded
//! `redis-server` and `redis-benchmark`, NetChannel beside Linux TCP.
//!
//! The NetChannel side is what an unmodified program gets: two `netchannel up` daemons
//! ([`super::daemons`]) on 127.0.0.1 (client host) and 127.0.0.2 (server host), the server
//! and the benchmark each started under `netchannel run` (the preload shim). The baseline is
//! the same two programs on plain loopback TCP (server on 127.0.0.2). Both servers run for the
//! whole invocation; for every repetition and queue depth (`redis-benchmark -P`) the TCP
//! benchmark runs first, then the NetChannel one, so slow drift on a shared machine hits both.
//! Each benchmark run does the `--tests` (GET and SET by default) with `--clients`
//! connections; the report holds per test and depth the median requests/s and p50/p99
//! latency over the repetitions, the ratio to TCP, and — to prove the bytes went through
//! vsockets — how many vsockets the client daemon opened and how many bytes it carried.

use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Args;
use netchannel::PreloadDatapath;
use serde::Serialize;

use super::daemons::Daemon;
use super::{print_report, to_json, Backend, CommonOpts};
use crate::error::{describe, Error, Result};

/// Flags of `bench redis`.
#[derive(Args, Debug)]
pub struct RedisArgs {
    #[command(flatten)]
    pub common: CommonOpts,

    /// Queue depths (`redis-benchmark -P`), comma-separated
    #[arg(long, value_name = "LIST", value_delimiter = ',', default_value = "1,2,4,8,16,32,64")]
    pub depths: Vec<u32>,

    /// Concurrent client connections (`redis-benchmark -c`)
    #[arg(long, value_name = "N", default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=10000))]
    pub clients: u32,

    /// Requests per test at depth 1; depth D runs this times min(D, 16) (`redis-benchmark -n`)
    #[arg(long, value_name = "N", default_value_t = 50_000, value_parser = clap::value_parser!(u64).range(100..))]
    pub requests: u64,

    /// redis-benchmark tests, comma-separated (`redis-benchmark -t`)
    #[arg(long, value_name = "LIST", default_value = "get,set")]
    pub tests: String,

    /// Repetitions of every (stack, depth) run; the report holds medians
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub reps: u32,

    /// The shim's data path for the programs under `netchannel run`: shm or relay [default: shm, or preload.datapath from --config]
    #[arg(long, value_name = "PATH", value_parser = parse_datapath)]
    pub datapath: Option<PreloadDatapath>,
}

fn parse_datapath(s: &str) -> std::result::Result<PreloadDatapath, String> {
    match s {
        "shm" => Ok(PreloadDatapath::Shm),
        "relay" => Ok(PreloadDatapath::Relay),
        other => Err(format!("{other:?} is not shm or relay")),
    }
}

/// One test at one depth on one stack, over the repetitions.
#[derive(Serialize, Debug, Clone)]
pub struct Point {
    /// "GET", "SET", ...
    pub test: String,
    /// Queue depth (`-P`).
    pub pipeline: u32,
    /// Requests per run.
    pub requests: u64,
    /// Median requests/s.
    pub rps: f64,
    /// Every repetition's requests/s.
    pub rps_runs: Vec<f64>,
    /// Median of the runs' p50 latency, ms.
    pub p50_ms: f64,
    /// Median of the runs' p99 latency, ms.
    pub p99_ms: f64,
}

/// One stack's results.
#[derive(Serialize, Debug, Clone)]
pub struct StackRun {
    /// "tcp" or "daemon".
    pub stack: &'static str,
    /// Per test and depth.
    pub points: Vec<Point>,
    /// Daemon: vsockets the client daemon opened during the runs (the bytes went through them).
    pub vsockets_opened: Option<u64>,
    /// Daemon: bytes the client daemon sent and received on vsockets during the runs.
    pub vsocket_bytes: Option<u64>,
    /// Wall seconds of this stack's benchmark runs.
    pub seconds: f64,
}

/// NetChannel divided by TCP at one point.
#[derive(Serialize, Debug, Clone)]
pub struct Ratio {
    /// Test name.
    pub test: String,
    /// Queue depth.
    pub pipeline: u32,
    /// requests/s, NetChannel / TCP (higher is better).
    pub rps: f64,
    /// p50 latency, NetChannel / TCP (lower is better).
    pub p50: f64,
}

/// The report of `bench redis`.
#[derive(Serialize, Debug, Clone)]
pub struct RedisReport {
    /// "redis".
    pub mode: &'static str,
    /// "tcp", "daemon" or "both".
    pub backend: &'static str,
    /// redis-server's version line.
    pub redis_version: String,
    /// Client connections.
    pub clients: u32,
    /// Repetitions.
    pub reps: u32,
    /// Depths run.
    pub depths: Vec<u32>,
    /// The shim's data path under `netchannel run` (`[preload] datapath`): "shm" or "relay".
    pub datapath: &'static str,
    /// One per stack.
    pub runs: Vec<StackRun>,
    /// Per test and depth, when both stacks ran.
    pub ratios: Vec<Ratio>,
}

/// Which stacks `--backend` means here: an unmodified program reaches NetChannel only through
/// daemons, so `netchannel` and `daemon` are the same.
fn stacks(b: Backend) -> Result<Vec<&'static str>> {
    match b {
        Backend::Tcp => Ok(vec!["tcp"]),
        Backend::Netchannel | Backend::Daemon => Ok(vec!["daemon"]),
        Backend::Both | Backend::Deployments => Ok(vec!["tcp", "daemon"]),
        Backend::Mptcp | Backend::All => Err(Error::from(
            "--backend: bench redis runs on tcp, daemon (NetChannel through `netchannel up` daemons) or both",
        )),
    }
}

/// The programs' paths, or a clear error saying what to install.
fn find_tools() -> Result<(PathBuf, PathBuf)> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let find = |tool: &str| std::env::split_paths(&path).map(|d| d.join(tool)).find(|p| p.is_file());
    match (find("redis-server"), find("redis-benchmark")) {
        (Some(s), Some(b)) => Ok((s, b)),
        (s, _) => Err(Error::from(format!(
            "bench redis needs {} on PATH: install Redis (Debian/Ubuntu: apt-get install redis-server redis-tools)",
            if s.is_none() { "redis-server" } else { "redis-benchmark" }
        ))),
    }
}

/// A port free on 127.0.0.1 and 127.0.0.2 (a moment ago).
fn free_port() -> Result<u16> {
    for _ in 0..32 {
        let a = TcpListener::bind((Ipv4Addr::new(127, 0, 0, 1), 0))
            .map_err(|e| format!("cannot bind a loopback port: {}", describe(&e)))?;
        let port = a.local_addr().map_err(|e| describe(&e))?.port();
        if TcpListener::bind((Ipv4Addr::new(127, 0, 0, 2), port)).is_ok() {
            return Ok(port);
        }
    }
    Err("no TCP port is free on both 127.0.0.1 and 127.0.0.2".into())
}

/// A child killed when dropped.
struct Server {
    child: Child,
    what: String,
    log: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn check_alive(&mut self) -> Result<()> {
        if let Ok(Some(st)) = self.child.try_wait() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            return Err(format!("{} exited ({st}): {}", self.what, log.trim()).into());
        }
        Ok(())
    }
}

/// `netchannel run --config <daemon's config> -- ...`, or the program itself for TCP.
fn command(daemon: Option<&Daemon>, program: &Path) -> Result<Command> {
    Ok(match daemon {
        Some(d) => {
            let exe =
                std::env::current_exe().map_err(|e| format!("cannot find this program: {}", describe(&e)))?;
            let mut c = Command::new(exe);
            c.arg("run").arg("--config").arg(d.config_path()).arg("--").arg(program);
            c
        }
        None => Command::new(program),
    })
}

fn start_server(
    daemon: Option<&Daemon>,
    program: &Path,
    ip: Ipv4Addr,
    port: u16,
    dir: &Path,
) -> Result<Server> {
    let what =
        format!("redis-server on {ip}:{port}{}", if daemon.is_some() { " (netchannel run)" } else { "" });
    let log = dir.join(format!("redis-{port}.log"));
    let logf = std::fs::File::create(&log)
        .map_err(|e| format!("cannot create {}: {}", log.display(), describe(&e)))?;
    let mut c = command(daemon, program)?;
    c.args(["--bind", &ip.to_string(), "--port", &port.to_string()])
        .args(["--save", "", "--appendonly", "no", "--protected-mode", "no", "--io-threads", "1"])
        .arg("--dir")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(logf);
    let child = c.spawn().map_err(|e| format!("cannot start {what}: {}", describe(&e)))?;
    let mut s = Server { child, what, log };
    let addr = SocketAddr::new(IpAddr::V4(ip), port);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        s.check_alive()?;
        let tcp_up = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok();
        // Under the shim the vsocket listener comes with listen(): wait until the daemon has it.
        let vsock_up = match daemon {
            None => true,
            Some(d) => d.client.status().ok().is_some_and(|st| {
                st["listeners"].as_array().is_some_and(|ls| {
                    ls.iter().any(|l| l["local"].as_str().is_some_and(|a| a.ends_with(&format!(":{port}"))))
                })
            }),
        };
        if tcp_up && vsock_up {
            return Ok(s);
        }
        if Instant::now() > deadline {
            return Err(format!("{} did not come up within 20 s", s.what).into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One line of `redis-benchmark --csv`.
#[derive(Debug, Clone, PartialEq)]
struct CsvRow {
    test: String,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// Parse `redis-benchmark --csv` output (Redis 6/7 columns: test, rps, avg, min, p50, p95,
/// p99, max).
fn parse_csv(text: &str) -> Result<Vec<CsvRow>> {
    let mut rows = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let f: Vec<&str> = line.split(',').map(|s| s.trim_matches('"')).collect();
        if f[0] == "test" {
            continue;
        }
        let num = |i: usize| -> Result<f64> {
            f.get(i).and_then(|s| s.parse::<f64>().ok()).ok_or_else(|| {
                Error::from(format!("redis-benchmark printed a line this does not understand: {line:?}"))
            })
        };
        rows.push(CsvRow { test: f[0].to_string(), rps: num(1)?, p50_ms: num(4)?, p99_ms: num(6)? });
    }
    if rows.is_empty() {
        return Err("redis-benchmark printed no results".into());
    }
    Ok(rows)
}

/// Run redis-benchmark once; the per-test rows.
fn bench_once(
    daemon: Option<&Daemon>,
    program: &Path,
    port: u16,
    args: &RedisArgs,
    depth: u32,
    requests: u64,
) -> Result<Vec<CsvRow>> {
    let mut c = command(daemon, program)?;
    c.args(["-h", "127.0.0.2", "-p", &port.to_string()])
        .args(["-c", &args.clients.to_string(), "-n", &requests.to_string(), "-P", &depth.to_string()])
        .args(["-t", &args.tests, "--csv"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().map_err(|e| format!("cannot start redis-benchmark: {}", describe(&e)))?;
    let mut out = String::new();
    let mut err = String::new();
    let stderr = child.stderr.take();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut e) = stderr {
            let _ = e.read_to_string(&mut s);
        }
        s
    });
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_string(&mut out);
    }
    let st = child.wait().map_err(|e| format!("cannot wait for redis-benchmark: {}", describe(&e)))?;
    err.push_str(&reader.join().unwrap_or_default());
    let stack = if daemon.is_some() { "through daemons" } else { "on TCP" };
    if !st.success() {
        return Err(format!("redis-benchmark -P {depth} {stack} failed ({st}): {}", err.trim()).into());
    }
    if out.contains("Error") || err.contains("Error") {
        return Err(format!(
            "redis-benchmark -P {depth} {stack} reported errors: {} {}",
            out.trim(),
            err.trim()
        )
        .into());
    }
    parse_csv(&out)
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    match s.len() {
        0 => 0.0,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

fn daemon_totals(d: &Daemon) -> Result<(u64, u64)> {
    let st =
        d.client.status().map_err(|e| format!("cannot read the client daemon's status: {}", describe(&e)))?;
    let t = &st["totals"];
    let n = |k: &str| t[k].as_u64().unwrap_or(0);
    Ok((n("vsockets_opened"), n("bytes_sent") + n("bytes_received")))
}

/// Run `bench redis`.
pub fn run(args: &RedisArgs) -> Result<()> {
    let stacks = stacks(args.common.backend)?;
    if args.depths.is_empty() || args.depths.iter().any(|&d| d == 0 || d > 10_000) {
        return Err("--depths: queue depths are 1 to 10000".into());
    }
    let (server_bin, bench_bin) = find_tools()?;
    let version = Command::new(&server_bin)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let mut config = args.common.engine_config()?;
    if let Some(d) = args.datapath {
        config.preload.datapath = d;
    }
    let dir = std::env::temp_dir().join(format!("netchannel-bench-redis-{}", std::process::id()));
    std::fs::create_dir_all(&dir)
        .map_err(|e| format!("cannot create {}: {}", dir.display(), describe(&e)))?;
    let result = run_in(args, &stacks, &server_bin, &bench_bin, &config, &dir, version);
    let _ = std::fs::remove_dir_all(&dir);
    let report = result?;
    if args.common.json {
        print_report(&to_json(&report)?)
    } else {
        print_report(&human(&report))
    }
}

#[allow(clippy::too_many_arguments)]
fn run_in(
    args: &RedisArgs,
    stacks: &[&'static str],
    server_bin: &Path,
    bench_bin: &Path,
    config: &netchannel::Config,
    dir: &Path,
    version: String,
) -> Result<RedisReport> {
    let use_daemon = stacks.contains(&"daemon");
    // Daemons first (client host 127.0.0.1, server host 127.0.0.2), then the servers.
    let daemons = if use_daemon {
        let port = free_port()?;
        let a = Daemon::start(config, SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)), port), None)?;
        let b = Daemon::start(config, SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)), port), None)?;
        Some((a, b))
    } else {
        None
    };
    let server_ip = Ipv4Addr::new(127, 0, 0, 2);
    let mut servers: Vec<(&'static str, Server, u16)> = Vec::new();
    for &s in stacks {
        let port = free_port()?;
        let d = daemons.as_ref().filter(|_| s == "daemon").map(|(_, b)| b);
        servers.push((s, start_server(d, server_bin, server_ip, port, dir)?, port));
    }
    let before = match &daemons {
        Some((a, _)) => Some(daemon_totals(a)?),
        None => None,
    };
    // samples[stack][depth index] = rows of every repetition
    let mut samples: Vec<Vec<Vec<Vec<CsvRow>>>> = vec![vec![Vec::new(); args.depths.len()]; stacks.len()];
    let mut seconds = vec![0.0; stacks.len()];
    let quiet = args.common.json;
    for rep in 1..=args.reps {
        for (di, &depth) in args.depths.iter().enumerate() {
            let requests = args.requests * u64::from(depth.min(16));
            for (si, (stack, server, port)) in servers.iter_mut().enumerate() {
                server.check_alive()?;
                let d = daemons.as_ref().filter(|_| *stack == "daemon").map(|(a, _)| a);
                let t = Instant::now();
                let rows = bench_once(d, bench_bin, *port, args, depth, requests)?;
                seconds[si] += t.elapsed().as_secs_f64();
                if !quiet {
                    let line: Vec<String> =
                        rows.iter().map(|r| format!("{} {:.0}/s", r.test, r.rps)).collect();
                    eprintln!("rep {rep} -P {depth:<3} {stack:<6}: {}", line.join(", "));
                }
                samples[si][di].push(rows);
            }
        }
    }
    let after = match &daemons {
        Some((a, _)) => Some(daemon_totals(a)?),
        None => None,
    };
    let mut runs = Vec::new();
    for (si, &stack) in stacks.iter().enumerate() {
        let mut points = Vec::new();
        for (di, &depth) in args.depths.iter().enumerate() {
            let reps = &samples[si][di];
            let tests: Vec<String> =
                reps.first().map(|r| r.iter().map(|x| x.test.clone()).collect()).unwrap_or_default();
            for t in tests {
                let of = |f: fn(&CsvRow) -> f64| -> Vec<f64> {
                    reps.iter().filter_map(|rows| rows.iter().find(|r| r.test == t).map(f)).collect()
                };
                let rps_runs = of(|r| r.rps);
                points.push(Point {
                    test: t.clone(),
                    pipeline: depth,
                    requests: args.requests * u64::from(depth.min(16)),
                    rps: median(&rps_runs),
                    rps_runs,
                    p50_ms: median(&of(|r| r.p50_ms)),
                    p99_ms: median(&of(|r| r.p99_ms)),
                });
            }
        }
        let (vsockets_opened, vsocket_bytes) = match (stack, before, after) {
            ("daemon", Some(b), Some(a)) => (Some(a.0 - b.0), Some(a.1 - b.1)),
            _ => (None, None),
        };
        if vsockets_opened == Some(0) {
            return Err("the benchmark through daemons opened no vsocket: the shim did not take its connections (see the daemon's log)".into());
        }
        runs.push(StackRun { stack, points, vsockets_opened, vsocket_bytes, seconds: seconds[si] });
    }
    let mut ratios = Vec::new();
    if let (Some(tcp), Some(nc)) =
        (runs.iter().find(|r| r.stack == "tcp"), runs.iter().find(|r| r.stack == "daemon"))
    {
        for p in &nc.points {
            if let Some(b) = tcp.points.iter().find(|b| b.test == p.test && b.pipeline == p.pipeline) {
                let div = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
                ratios.push(Ratio {
                    test: p.test.clone(),
                    pipeline: p.pipeline,
                    rps: div(p.rps, b.rps),
                    p50: div(p.p50_ms, b.p50_ms),
                });
            }
        }
    }
    let backend = if stacks.len() == 2 { "both" } else { stacks[0] };
    Ok(RedisReport {
        mode: "redis",
        backend,
        redis_version: version,
        clients: args.clients,
        reps: args.reps,
        depths: args.depths.clone(),
        datapath: config.preload.datapath.name(),
        runs,
        ratios,
    })
}

fn human(r: &RedisReport) -> String {
    let mut s = format!(
        "redis-benchmark, {} clients, median of {} rep{} ({}); shim data path: {}\n",
        r.clients,
        r.reps,
        if r.reps == 1 { "" } else { "s" },
        r.redis_version,
        r.datapath
    );
    s += &format!(
        "{:<6} {:>4} {:>14} {:>9} {:>14} {:>9} {:>8} {:>8}\n",
        "test", "-P", "tcp req/s", "tcp p50", "daemon req/s", "p50", "rps x", "p50 x"
    );
    let of = |stack: &str| r.runs.iter().find(|x| x.stack == stack);
    let (tcp, nc) = (of("tcp"), of("daemon"));
    let base = nc.or(tcp).map(|x| x.points.clone()).unwrap_or_default();
    for p in &base {
        let find = |run: Option<&StackRun>| {
            run.and_then(|x| x.points.iter().find(|q| q.test == p.test && q.pipeline == p.pipeline).cloned())
        };
        let (t, n) = (find(tcp), find(nc));
        let cell = |v: Option<f64>, digits: usize| v.map_or("-".to_string(), |v| format!("{v:.digits$}"));
        let ratio = r.ratios.iter().find(|x| x.test == p.test && x.pipeline == p.pipeline);
        s += &format!(
            "{:<6} {:>4} {:>14} {:>9} {:>14} {:>9} {:>8} {:>8}\n",
            p.test,
            p.pipeline,
            cell(t.as_ref().map(|x| x.rps), 0),
            cell(t.as_ref().map(|x| x.p50_ms), 3),
            cell(n.as_ref().map(|x| x.rps), 0),
            cell(n.as_ref().map(|x| x.p50_ms), 3),
            cell(ratio.map(|x| x.rps), 2),
            cell(ratio.map(|x| x.p50), 2),
        );
    }
    if let Some(n) = nc {
        s += &format!(
            "through daemons: {} vsockets opened, {} bytes on vsockets (client daemon)",
            n.vsockets_opened.unwrap_or(0),
            n.vsocket_bytes.unwrap_or(0)
        );
    }
    s.trim_end().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_of_redis_7_is_parsed() {
        let out = "\"test\",\"rps\",\"avg_latency_ms\",\"min_latency_ms\",\"p50_latency_ms\",\"p95_latency_ms\",\"p99_latency_ms\",\"max_latency_ms\"\n\
                   \"SET\",\"46663.56\",\"0.801\",\"0.064\",\"0.303\",\"4.519\",\"7.503\",\"21.039\"\n\
                   \"GET\",\"52770.45\",\"0.689\",\"0.096\",\"0.351\",\"3.359\",\"6.703\",\"15.959\"\n";
        let rows = parse_csv(out).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0], CsvRow { test: "SET".into(), rps: 46663.56, p50_ms: 0.303, p99_ms: 7.503 });
        assert_eq!(rows[1].test, "GET");
        assert!(parse_csv("").is_err());
        let e = parse_csv("\"SET\",\"fast\"\n").unwrap_err().to_string();
        assert!(e.contains("does not understand"), "{e}");
    }

    #[test]
    fn medians_and_backends() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0]), 2.5);
        assert_eq!(stacks(Backend::Both).unwrap(), ["tcp", "daemon"]);
        assert_eq!(stacks(Backend::Netchannel).unwrap(), ["daemon"]);
        assert!(stacks(Backend::Mptcp).unwrap_err().to_string().contains("--backend"));
    }
}
