//! End-to-end tests of the benchmark modes beside `stream`: `bench short`, `pingpong`,
//! `connect` and `isolation`. Each test runs the built command briefly as a child process
//! (killed after [`TIMEOUT`], so nothing can hang) and checks that its stdout is one
//! well-formed JSON object with sane values: counts above zero, data verified where asked,
//! percentiles in order. They assert behaviour, never speed.

mod common;

use std::time::Duration;

use serde_json::Value;

use common::{
    assert_verified_run, channel_bytes, f64_of, free_tcp_port, run, run_json, runs, tcp_client_args,
    tcp_server, u64_of,
};

/// Longest any child process may run.
const TIMEOUT: Duration = Duration::from_secs(60);

/// `samples > 0` and `0 < p50 <= p99 <= p999 <= max`, mean within [min, max].
fn assert_latencies(v: &Value) {
    assert!(u64_of(v, "samples") > 0, "{v}");
    let [p50, p99, p999, max, mean] =
        ["p50_us", "p99_us", "p999_us", "max_us", "mean_us"].map(|k| f64_of(v, k));
    assert!(p50 > 0.0 && p50 <= p99 && p99 <= p999 && p999 <= max, "percentiles out of order: {v}");
    assert!(mean > 0.0 && mean <= max, "{v}");
}

/// Run `bench MODE --backend both --duration 0.5 --verify --json` and check its two runs,
/// tcp's then netchannel's: each a verified run of `mode`, and whatever `check` asserts.
/// Returns the report.
fn run_on_both_backends(mode: &str, check: impl Fn(&Value)) -> Value {
    let v = run_json(&["bench", mode, "--backend", "both", "--duration", "0.5", "--verify", "--json"]);
    for (run, backend) in runs(&v, mode, "both", 2).iter().zip(["tcp", "netchannel"]) {
        assert_verified_run(run, mode, backend);
        check(run);
    }
    v
}

#[test]
fn short_messages_are_counted_and_verified_on_both_backends() {
    let v = run_on_both_backends("short", |run| {
        assert_eq!(u64_of(run, "size"), 4096, "{run}");
        let messages = u64_of(run, "messages");
        assert!(messages > 0, "{run}");
        assert_eq!(u64_of(run, "bytes"), messages * 4096, "{run}");
        assert!(f64_of(run, "msgs_per_sec") > 0.0, "{run}");
        assert!(f64_of(run, "gbps") > 0.0, "{run}");
        assert!(f64_of(run, "seconds") > 0.0, "{run}");
        assert!(f64_of(run, "cpu_seconds") > 0.0, "{run}");
        assert!(f64_of(run, "sender_thread_cpu_seconds") > 0.0, "{run}");
    });
    assert!(f64_of(&v, "ratio") > 0.0, "{v}");
    let runs = &v["runs"];
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
    assert!(out.stdout.starts_with("short tcp (cubic congestion control): "), "stdout: {}", out.stdout);
    assert!(out.stdout.contains("messages/s"), "stdout: {}", out.stdout);
}

#[test]
fn pingpong_reports_ordered_percentiles_on_both_backends() {
    let v = run_on_both_backends("pingpong", |run| {
        assert_eq!(u64_of(run, "size"), 4096, "{run}");
        assert_latencies(run);
        assert!(f64_of(run, "round_trips_per_sec") > 0.0, "{run}");
        assert!(f64_of(run, "cpu_seconds") > 0.0, "{run}");
        assert!(f64_of(run, "warmup_seconds") > 0.0, "{run}");
    });
    let runs = &v["runs"];
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
    run_on_both_backends("connect", |run| {
        assert_latencies(run);
        assert!(f64_of(run, "connects_per_sec") > 0.0, "{run}");
        assert!(f64_of(run, "cpu_seconds") > 0.0, "{run}");
    });
}

#[test]
fn connect_server_and_client_in_two_processes() {
    let port = free_tcp_port();
    let server = tcp_server("connect", &port, &["--warmup", "0", "--json"]);
    let client = run_json(&tcp_client_args(
        "connect",
        &port,
        &["--duration", "0.3", "--warmup", "0", "--verify", "--json"],
    ));
    assert_eq!(client["role"], "client");
    assert_eq!(client["verified"], true, "{client}");
    assert_latencies(&client);

    let v = server.finish_json("bench connect --role server");
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
        assert_verified_run(run, "isolation", backend);
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
