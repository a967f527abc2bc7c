//! End-to-end test of `netchannel bench soak`: a short soak with channels killed every half
//! second finishes with every byte verified, no error, the kills counted and re-dialed, and
//! its memory reported. Behaviour only, never speed.

mod common;

use std::net::TcpListener;
use std::time::Duration;

use common::{run, run_json, run_on_terminal, u64_of};

/// Longest any child process may run.
const TIMEOUT: Duration = Duration::from_secs(120);

/// A port free on both 127.0.0.1 and 127.0.0.2 (the soak's two hosts).
fn free_port() -> String {
    let l = TcpListener::bind("127.0.0.2:0").unwrap();
    let p = l.local_addr().unwrap().port();
    TcpListener::bind(("127.0.0.1", p)).map(|_| p.to_string()).unwrap_or_else(|_| free_port())
}

#[test]
fn a_short_soak_with_channel_kills_verifies_everything() {
    let port = free_port();
    let v = run_json(&[
        "bench",
        "soak",
        "--duration",
        "5",
        "--kill-channel-every",
        "0.5",
        "--throughput-apps",
        "2",
        "--latency-apps",
        "1",
        "--port",
        &port,
        "--json",
    ]);
    assert_eq!(v["mode"], "soak");
    assert_eq!(u64_of(&v, "errors"), 0, "{v}");
    assert!(u64_of(&v, "bytes_verified") > 0, "{v}");
    assert!(u64_of(&v, "streams") > 0 && u64_of(&v, "round_trips") > 0, "{v}");
    let kills = u64_of(&v, "channel_kills");
    assert!(kills >= 5, "channels were killed every 0.5 s: {v}");
    assert!(u64_of(&v, "channels_redialed") >= 1, "{v}");
    assert_eq!(u64_of(&v, "peers_lost"), 0, "{v}");
    assert_eq!(v["channels_end"], serde_json::json!([5, 5]), "the mesh came back whole: {v}");
    assert_eq!(v["vsockets_end"], serde_json::json!([0, 0]), "every vsocket closed: {v}");
    for key in ["rss_start_kib", "rss_end_kib", "rss_max_kib"] {
        assert!(u64_of(&v, key) > 0, "{key} in {v}");
    }
}

#[test]
fn soak_rejects_a_negative_kill_interval() {
    let out = run(&["bench", "soak", "--duration", "1", "--kill-channel-every", "-1"]);
    assert!(!out.status.success());
}

#[test]
fn a_soak_on_a_terminal_shows_a_bar_of_its_duration() {
    let port = free_port();
    let args = [
        "bench",
        "soak",
        "--duration",
        "2.5",
        "--throughput-apps",
        "1",
        "--latency-apps",
        "1",
        "--port",
        &port,
    ];
    let out = run_on_terminal(&args);
    assert!(out.status.success(), "stdout: {}\nterminal: {:?}", out.stdout, out.stderr);
    assert!(out.stderr.contains("soak [#"), "terminal: {:?}", out.stderr);
    assert!(
        out.stderr.contains("MiB verified") && out.stderr.contains(" kills "),
        "terminal: {:?}",
        out.stderr
    );
}
