//! `bench tokio` end to end: a short run of every workload on every stack gives one JSON
//! object whose samples are all there, counted and ordered. It asserts behaviour, never speed.
#![cfg(feature = "tokio")]

mod common;

use std::time::Duration;

use serde_json::Value;

/// Longest any child process may run.
const TIMEOUT: Duration = Duration::from_secs(60);

#[test]
fn bench_tokio_measures_both_stacks_for_every_workload() {
    let v = common::run_json(&[
        "bench",
        "tokio",
        "--duration",
        "0.3",
        "--repeat",
        "1",
        "--conns",
        "1,4",
        "--http-clients",
        "4",
        "--json",
    ]);
    assert_eq!(v["mode"], "tokio", "{v}");
    let samples = v["samples"].as_array().expect("samples");
    let want = [("pingpong", 1), ("pingpong", 4), ("http", 4)];
    for (w, c) in want {
        for stack in ["tcp", "netchannel", "daemon"] {
            let s: Vec<&Value> = samples
                .iter()
                .filter(|s| s["workload"] == w && s["conns"] == c && s["stack"] == stack)
                .collect();
            assert_eq!(s.len(), 1, "one {w} sample with {c} connections on {stack}: {v}");
            let s = s[0];
            assert!(s["per_sec"].as_f64().unwrap() > 0.0, "{s}");
            if w == "pingpong" {
                let (p50, p99) = (s["p50_us"].as_f64().unwrap(), s["p99_us"].as_f64().unwrap());
                assert!(p50 > 0.0 && p50 <= p99, "{s}");
            } else {
                assert!(s["p50_us"].is_null(), "{s}");
            }
        }
    }
}

#[test]
fn bench_tokio_refuses_a_zero_size() {
    let out = common::run(&["bench", "tokio", "--size", "0"]);
    assert!(!out.status.success());
    assert!(out.stderr.contains("--size"), "{}", out.stderr);
}
