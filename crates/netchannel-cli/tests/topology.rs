//! End-to-end tests of the topologies and baselines that need the machine's network stack:
//! `--netns` (two network namespaces joined by a veth pair, optionally rate-limited with
//! `--rate`) and `--backend mptcp|all`. Each test runs the built `netchannel` binary as a child
//! process (killed after [`TIMEOUT`]) and asserts behaviour: the data is verified, MPTCP
//! establishes subflows, the rate limit holds, and no namespace the child created is left
//! behind (checked by the child's pid, so tests running in parallel do not see each other's).
//!
//! They need root and iproute2 (`ip`, `tc`), as CI has (.ci/run installs iproute2), and an
//! MPTCP-capable kernel for the MPTCP tests; without them they fail saying what is missing.

mod common;

use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use common::{
    assert_success, assert_verified_run, assert_verified_stream, channel_bytes, f64_of, finish, json_object,
    netchannel, u64_of, Output, MIB,
};

/// Longest any child process may run.
const TIMEOUT: Duration = Duration::from_secs(60);

/// Fail the test with a clear message unless it can create namespaces: root and iproute2.
fn require_root_and_iproute2() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "this test needs root: it creates network namespaces (running as uid {euid})");
    for tool in ["ip", "tc"] {
        let ok = Command::new(tool)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "this test needs iproute2 (`{tool}` not found or failing): apt-get install iproute2");
    }
}

/// Run to the end; return the child's pid with its output.
fn run(args: &[&str]) -> (u32, Output) {
    let child = netchannel(args).spawn().expect("spawn netchannel");
    let pid = child.id();
    (pid, finish(child, &args.join(" ")))
}

/// The namespaces of process `pid` (`nc-a-<pid>-<n>`, `nc-b-…`, `nc-m-…`) that exist now.
fn namespaces_of(pid: u32) -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().expect("run `ip netns list`");
    assert!(out.status.success(), "`ip netns list` failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| ["a", "b", "m"].iter().any(|k| name.starts_with(&format!("nc-{k}-{pid}-"))))
        .map(str::to_string)
        .collect()
}

/// Run, require success, require that the child left no namespace, parse stdout as one JSON
/// object.
fn run_json(args: &[&str]) -> Value {
    let (pid, out) = run(args);
    assert_success(&out, args);
    assert_eq!(namespaces_of(pid), Vec::<String>::new(), "namespaces left behind by {args:?}");
    json_object(&out.stdout)
}

/// `bench stream ARGS --verify --json`, run to its report (see [`run_json`]).
fn run_verified_stream(args: &[&str]) -> Value {
    run_json(&[&["bench", "stream"], args, &["--verify", "--json"]].concat())
}

#[test]
fn netns_tcp_stream_is_verified_and_cleaned_up() {
    require_root_and_iproute2();
    let v = run_verified_stream(&["--netns", "--backend", "tcp", "--bytes", "32MiB"]);
    assert_verified_stream(&v, "tcp", 32 * MIB);
    assert_eq!(v["netns"], true, "{v}");
    assert_eq!(v["rate_bps"], Value::Null, "{v}");
}

#[test]
fn netns_netchannel_stream_is_verified_striped_and_cleaned_up() {
    require_root_and_iproute2();
    let v = run_verified_stream(&["--netns", "--backend", "netchannel", "--bytes", "32MiB"]);
    assert_verified_stream(&v, "netchannel", 32 * MIB);
    assert_eq!(v["netns"], true, "{v}");
    let per_channel = channel_bytes(&v);
    assert_eq!(per_channel.len(), 4, "{v}");
    assert!(per_channel.iter().all(|&b| b > 0), "a channel carried nothing: {v}");
}

#[test]
fn netns_daemon_stream_is_verified_through_a_daemon_in_each_namespace() {
    require_root_and_iproute2();
    let v = run_verified_stream(&["--netns", "--backend", "daemon", "--bytes", "32MiB"]);
    assert_verified_stream(&v, "daemon", 32 * MIB);
    assert_eq!(v["netns"], true, "{v}");
    let per_channel = channel_bytes(&v);
    assert_eq!(per_channel.len(), 4, "{v}");
    assert!(per_channel.iter().all(|&b| b > 0), "a channel carried nothing: {v}");
}

#[test]
fn netns_rate_limit_caps_the_throughput() {
    require_root_and_iproute2();
    let v = run_verified_stream(&["--netns", "--rate", "1gbit", "--backend", "tcp", "--bytes", "64MiB"]);
    assert_verified_stream(&v, "tcp", 64 * MIB);
    assert_eq!(u64_of(&v, "rate_bps"), 1_000_000_000, "{v}");
    let gbps = f64_of(&v, "gbps");
    assert!(gbps < 1.2, "a 1gbit tbf let {gbps:.2} Gbit/s through: {v}");
}

#[test]
fn mptcp_on_loopback_is_verified_over_several_subflows() {
    require_root_and_iproute2();
    // A timed run, not a byte count: extra subflows join asynchronously, and on a loaded
    // machine a 32 MiB transfer can end before they do.
    let v = run_verified_stream(&["--backend", "mptcp", "--subflows", "4", "--duration", "1.5"]);
    assert_verified_run(&v, "stream", "mptcp");
    assert!(u64_of(&v, "bytes") > 0, "{v}");
    assert_eq!(u64_of(&v, "subflows"), 4, "{v}");
    let established = u64_of(&v, "subflows_established");
    assert!(established >= 1, "{v}");
    // The path manager's extra endpoints were used: more than the initial subflow.
    assert!(established >= 2, "only {established} subflow(s) of 4: {v}");
    assert_eq!(v["channel_bytes"].as_array().map(Vec::len), Some(established as usize), "{v}");
}

#[test]
fn mptcp_in_netns_is_verified() {
    require_root_and_iproute2();
    let v = run_verified_stream(&["--netns", "--backend", "mptcp", "--subflows", "3", "--bytes", "32MiB"]);
    assert_verified_stream(&v, "mptcp", 32 * MIB);
    assert_eq!(v["netns"], true, "{v}");
    assert!(u64_of(&v, "subflows_established") >= 1, "{v}");
}

#[test]
fn backend_all_reports_tcp_mptcp_and_netchannel() {
    require_root_and_iproute2();
    let v = run_verified_stream(&["--backend", "all", "--bytes", "16MiB"]);
    assert_eq!(v["backend"], "all", "{v}");
    let runs = v["runs"].as_array().expect("runs array");
    let backends: Vec<&str> = runs.iter().map(|r| r["backend"].as_str().unwrap()).collect();
    assert_eq!(backends, ["tcp", "mptcp", "netchannel"]);
    for r in runs {
        assert_eq!(r["verified"], true, "{r}");
    }
    assert!(f64_of(&v, "ratio") > 0.0, "{v}");
    assert!(f64_of(&v, "ratio_mptcp") > 0.0, "{v}");
}

#[test]
fn sigint_removes_the_namespaces() {
    require_root_and_iproute2();
    let args = ["bench", "stream", "--netns", "--backend", "tcp", "--duration", "30", "--json"];
    let child = netchannel(&args).spawn().expect("spawn netchannel");
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(15);
    while namespaces_of(pid).len() < 2 {
        assert!(Instant::now() < deadline, "the run did not create its namespaces within 15 s");
        thread::sleep(Duration::from_millis(50));
    }
    thread::sleep(Duration::from_millis(300)); // let the transfer start
                                               // SAFETY: kill(2) on our own child's pid, which has not been reaped yet.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGINT) }, 0);
    let out = finish(child, &args.join(" "));
    assert_eq!(out.status.code(), Some(130), "stderr: {}", out.stderr);
    assert!(out.stderr.contains("removed network namespaces"), "stderr: {}", out.stderr);
    assert_eq!(namespaces_of(pid), Vec::<String>::new(), "namespaces left behind after SIGINT");
}

#[test]
fn rate_without_netns_is_a_usage_error() {
    let (_, out) = run(&["bench", "stream", "--backend", "tcp", "--rate", "1gbit"]);
    assert_eq!(out.status.code(), Some(2), "stderr: {}", out.stderr);
    assert!(out.stderr.contains("--netns"), "stderr: {}", out.stderr);
}
