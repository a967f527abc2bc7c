//! End-to-end tests of the benchmark modes beside `stream`: `bench short`, `pingpong`,
//! `connect` and `isolation`. Each test runs the built command briefly as a child process
//! (killed after [`TIMEOUT`], so nothing can hang) and checks that its stdout is one
//! well-formed JSON object with sane values: counts above zero, data verified where asked,
//! percentiles in order. They assert behaviour, never speed.

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Longest any child process may run.
const TIMEOUT: Duration = Duration::from_secs(60);

struct Output {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

fn netchannel(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_netchannel"));
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd
}

fn drain(mut r: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut s = String::new();
        let _ = r.read_to_string(&mut s);
        s
    })
}

/// Wait for `child` (whose stdout/stderr are still piped) for at most [`TIMEOUT`]; kill it
/// and panic after that.
fn finish(mut child: Child, what: &str) -> Output {
    let stdout = drain(child.stdout.take().expect("piped stdout"));
    let stderr = child.stderr.take().map(drain);
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`{what}` did not finish within {TIMEOUT:?} and was killed");
        }
        thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.map(|h| h.join().unwrap()).unwrap_or_default(),
    }
}

/// Kills a background child (a server) if the test panics before [`finish`] takes it.
struct KillOnDrop(Option<Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn run(args: &[&str]) -> Output {
    let child = netchannel(args).spawn().expect("spawn netchannel");
    finish(child, &args.join(" "))
}

fn parse_json(out: &Output, args: &[&str]) -> Value {
    assert!(out.status.success(), "{args:?} failed: {}\nstderr: {}", out.status, out.stderr);
    let v: Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not one JSON value ({e}): {:?}", out.stdout));
    assert!(v.is_object(), "{v}");
    v
}

/// Run, require success, and parse stdout as exactly one JSON object.
fn run_json(args: &[&str]) -> Value {
    parse_json(&run(args), args)
}

/// The runs of a multi-backend report, checking its envelope.
fn runs<'a>(v: &'a Value, mode: &str, backend: &str, n: usize) -> &'a [Value] {
    assert_eq!(v["mode"], mode, "{v}");
    assert_eq!(v["backend"], backend, "{v}");
    let runs = v["runs"].as_array().unwrap_or_else(|| panic!("runs is not an array in {v}"));
    assert_eq!(runs.len(), n, "{v}");
    runs
}

fn u64_of(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("{key} is not a u64 in {v}"))
}

fn f64_of(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or_else(|| panic!("{key} is not a number in {v}"))
}

fn channel_bytes(v: &Value) -> Vec<u64> {
    v["channel_bytes"]
        .as_array()
        .unwrap_or_else(|| panic!("channel_bytes is not an array in {v}"))
        .iter()
        .map(|b| b.as_u64().expect("channel_bytes entries are u64"))
        .collect()
}

/// `samples > 0` and `0 < p50 <= p99 <= p999 <= max`, mean within [min, max].
fn assert_latencies(v: &Value) {
    assert!(u64_of(v, "samples") > 0, "{v}");
    let [p50, p99, p999, max, mean] =
        ["p50_us", "p99_us", "p999_us", "max_us", "mean_us"].map(|k| f64_of(v, k));
    assert!(p50 > 0.0 && p50 <= p99 && p99 <= p999 && p999 <= max, "percentiles out of order: {v}");
    assert!(mean > 0.0 && mean <= max, "{v}");
}

fn free_tcp_port() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port().to_string()
}

#[test]
fn short_messages_are_counted_and_verified_on_both_backends() {
    let args = ["bench", "short", "--backend", "both", "--duration", "0.5", "--verify", "--json"];
    let v = run_json(&args);
    let runs = runs(&v, "short", "both", 2);
    assert!(f64_of(&v, "ratio") > 0.0, "{v}");
    for (run, backend) in runs.iter().zip(["tcp", "netchannel"]) {
        assert_eq!(run["mode"], "short", "{run}");
        assert_eq!(run["backend"], backend, "{run}");
        assert_eq!(run["verified"], true, "{run}");
        assert_eq!(u64_of(run, "size"), 4096, "{run}");
        let messages = u64_of(run, "messages");
        assert!(messages > 0, "{run}");
        assert_eq!(u64_of(run, "bytes"), messages * 4096, "{run}");
        assert!(f64_of(run, "msgs_per_sec") > 0.0, "{run}");
        assert!(f64_of(run, "gbps") > 0.0, "{run}");
        assert!(f64_of(run, "seconds") > 0.0, "{run}");
        assert!(f64_of(run, "cpu_seconds") > 0.0, "{run}");
        assert!(f64_of(run, "sender_thread_cpu_seconds") > 0.0, "{run}");
    }
    assert_eq!(channel_bytes(&runs[0]), Vec::<u64>::new());
    let per_channel = channel_bytes(&runs[1]);
    assert_eq!(per_channel.len(), 4, "{}", runs[1]);
    assert!(per_channel.iter().sum::<u64>() >= u64_of(&runs[1], "bytes"), "{}", runs[1]);
}

#[test]
fn short_messages_straddling_reads_are_counted_whole() {
    // 1000-byte messages read 4096 bytes at a time: messages cross read boundaries.
    let args = [
        "bench",
        "short",
        "--backend",
        "tcp",
        "--size",
        "1000",
        "--read-size",
        "4096",
        "--duration",
        "0.3",
        "--verify",
        "--json",
    ];
    let v = run_json(&args);
    assert_eq!(v["verified"], true, "{v}");
    assert_eq!(u64_of(&v, "size"), 1000);
    assert_eq!(u64_of(&v, "bytes"), u64_of(&v, "messages") * 1000, "{v}");
}

#[test]
fn short_prints_a_human_summary() {
    let out = run(&["bench", "short", "--backend", "tcp", "--duration", "0.3"]);
    assert!(out.status.success(), "stderr: {}", out.stderr);
    assert!(out.stdout.starts_with("short tcp: "), "stdout: {}", out.stdout);
    assert!(out.stdout.contains("messages/s"), "stdout: {}", out.stdout);
}

#[test]
fn pingpong_reports_ordered_percentiles_on_both_backends() {
    let args = ["bench", "pingpong", "--backend", "both", "--duration", "0.5", "--verify", "--json"];
    let v = run_json(&args);
    let runs = runs(&v, "pingpong", "both", 2);
    for (run, backend) in runs.iter().zip(["tcp", "netchannel"]) {
        assert_eq!(run["mode"], "pingpong", "{run}");
        assert_eq!(run["backend"], backend, "{run}");
        assert_eq!(run["verified"], true, "{run}");
        assert_eq!(u64_of(run, "size"), 4096, "{run}");
        assert_latencies(run);
        assert!(f64_of(run, "round_trips_per_sec") > 0.0, "{run}");
        assert!(f64_of(run, "cpu_seconds") > 0.0, "{run}");
        assert!(f64_of(run, "warmup_seconds") > 0.0, "{run}");
    }
    assert_eq!(runs[0]["class"], Value::Null, "{}", runs[0]);
    assert_eq!(runs[1]["class"], "latency", "{}", runs[1]);
}

#[test]
fn pingpong_in_the_throughput_class_with_odd_size() {
    let args = [
        "bench",
        "pingpong",
        "--backend",
        "netchannel",
        "--class",
        "throughput",
        "--size",
        "70001",
        "--duration",
        "0.3",
        "--warmup",
        "0",
        "--verify",
        "--json",
    ];
    let v = run_json(&args);
    assert_eq!(v["class"], "throughput", "{v}");
    assert_eq!(v["verified"], true, "{v}");
    assert_eq!(u64_of(&v, "size"), 70001);
    assert_eq!(f64_of(&v, "warmup_seconds"), 0.0);
    assert_latencies(&v);
}

#[test]
fn connect_rate_on_both_backends() {
    let args = ["bench", "connect", "--backend", "both", "--duration", "0.5", "--verify", "--json"];
    let v = run_json(&args);
    let runs = runs(&v, "connect", "both", 2);
    for (run, backend) in runs.iter().zip(["tcp", "netchannel"]) {
        assert_eq!(run["mode"], "connect", "{run}");
        assert_eq!(run["backend"], backend, "{run}");
        assert_eq!(run["verified"], true, "{run}");
        assert_latencies(run);
        assert!(f64_of(run, "connects_per_sec") > 0.0, "{run}");
        assert!(f64_of(run, "cpu_seconds") > 0.0, "{run}");
    }
}

#[test]
fn connect_server_and_client_in_two_processes() {
    let port = free_tcp_port();
    let server_args = [
        "bench",
        "connect",
        "--backend",
        "tcp",
        "--role",
        "server",
        "--listen",
        "127.0.0.1",
        "--port",
        &port,
        "--warmup",
        "0",
        "--json",
    ];
    let mut server = KillOnDrop(Some(netchannel(&server_args).spawn().expect("spawn server")));
    let (tx, rx) = mpsc::channel();
    let err = BufReader::new(server.0.as_mut().unwrap().stderr.take().unwrap());
    let stderr = thread::spawn(move || {
        let mut all = String::new();
        for line in err.lines().map_while(Result::ok) {
            let _ = tx.send(line.clone());
            all += &line;
            all.push('\n');
        }
        all
    });
    let listening = rx.recv_timeout(Duration::from_secs(30));
    assert!(
        listening.as_deref().is_ok_and(|l| l.contains("listening on TCP 127.0.0.1:")),
        "server did not announce itself: {listening:?}"
    );
    let client = run_json(&[
        "bench",
        "connect",
        "--backend",
        "tcp",
        "--role",
        "client",
        "--connect",
        "127.0.0.1",
        "--port",
        &port,
        "--duration",
        "0.3",
        "--warmup",
        "0",
        "--verify",
        "--json",
    ]);
    assert_eq!(client["role"], "client");
    assert_eq!(client["verified"], true, "{client}");
    assert_latencies(&client);

    let out = finish(server.0.take().unwrap(), "bench connect --role server");
    let server_err = stderr.join().unwrap();
    assert!(out.status.success(), "server failed: {server_err}");
    let v: Value = serde_json::from_str(&out.stdout).expect("server prints one JSON object");
    assert_eq!(v["role"], "server", "{v}");
    assert!(u64_of(&v, "samples") > 0, "{v}");
    assert!(v.get("p50_us").is_none(), "the server times nothing: {v}");
}

#[test]
fn isolation_runs_every_setup_isolated_then_loaded() {
    let args = [
        "bench",
        "isolation",
        "--backend",
        "all",
        "--bulk-apps",
        "2",
        "--duration",
        "0.5",
        "--verify",
        "--json",
    ];
    let v = run_json(&args);
    let runs = runs(&v, "isolation", "all", 3);
    for (run, backend) in runs.iter().zip(["netchannel", "tcp", "tcp-prio"]) {
        assert_eq!(run["mode"], "isolation", "{run}");
        assert_eq!(run["backend"], backend, "{run}");
        assert_eq!(run["verified"], true, "{run}");
        assert_eq!(u64_of(run, "bulk_apps"), 2, "{run}");
        assert_latencies(&run["isolated"]);
        assert_latencies(&run["loaded"]);
        assert!(f64_of(run, "bulk_gbps") > 0.0, "{run}");
        assert!(u64_of(run, "bulk_bytes") > 0, "{run}");
        assert!(f64_of(run, "cpu_seconds") > 0.0, "{run}");
    }
    assert_eq!(runs[0]["lapp_class"], "latency", "{}", runs[0]);
    assert_eq!(runs[1]["lapp_priority"], Value::Null, "{}", runs[1]);
    assert_eq!(runs[2]["lapp_priority"], 6, "{}", runs[2]);
}

#[test]
fn isolation_takes_only_role_both() {
    let out = run(&["bench", "isolation", "--role", "server"]);
    assert_eq!(out.status.code(), Some(1), "stderr: {}", out.stderr);
    assert!(out.stderr.contains("--role both"), "stderr: {}", out.stderr);
    assert_eq!(out.stdout, "");
}

#[test]
fn several_backends_need_role_both() {
    for mode in ["short", "pingpong", "connect"] {
        let out = run(&["bench", mode, "--backend", "both", "--role", "server"]);
        assert_eq!(out.status.code(), Some(1), "{mode}: stderr: {}", out.stderr);
        assert!(out.stderr.contains("--backend both"), "{mode}: stderr: {}", out.stderr);
    }
}
