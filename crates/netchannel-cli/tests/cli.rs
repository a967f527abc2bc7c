//! End-to-end tests of the `netchannel` binary: each test runs the built command as a child
//! process (killed after [`TIMEOUT`], so nothing can hang) and checks its exit status, its
//! stdout (one JSON object with `--json`) and its stderr. They assert behaviour, not speed.

mod common;

use std::net::TcpListener;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use common::{
    assert_verified_stream, channel_bytes, f64_of, finish, free_tcp_port, netchannel, run, run_json,
    run_on_terminal, runs, tcp_client_args, tcp_server, temp_file, u64_of, Output, Server, MIB,
};

/// Longest any child process may run.
const TIMEOUT: Duration = Duration::from_secs(120);

fn assert_stream_report(v: &Value, backend: &str, bytes: u64) {
    assert_verified_stream(v, backend, bytes);
    assert!(f64_of(v, "seconds") > 0.0, "{v}");
    assert!(f64_of(v, "cpu_seconds") > 0.0, "{v}");
    assert_eq!(u64_of(v, "write_size"), 10 * MIB, "{v}");
}

#[test]
fn tcp_stream_of_64mib_is_verified() {
    let v = run_json(&["bench", "stream", "--backend", "tcp", "--bytes", "64MiB", "--verify", "--json"]);
    assert_stream_report(&v, "tcp", 64 * MIB);
    assert_eq!(channel_bytes(&v), Vec::<u64>::new());
    assert_eq!(v["role"], "both");
}

#[test]
fn tcp_stream_with_odd_write_size_is_verified() {
    // A write size that is neither a power of two nor a divisor of the total.
    let v = run_json(&[
        "bench",
        "stream",
        "--backend",
        "tcp",
        "--bytes",
        "5000001",
        "--write-size",
        "65537",
        "--verify",
        "--json",
    ]);
    assert_eq!(v["verified"], true, "{v}");
    assert_eq!(u64_of(&v, "bytes"), 5_000_001);
    assert_eq!(u64_of(&v, "write_size"), 65537);
}

#[test]
fn without_verify_the_report_says_unverified() {
    let v = run_json(&["bench", "stream", "--backend", "tcp", "--bytes", "1MiB", "--json"]);
    assert_eq!(v["verified"], false, "{v}");
}

#[test]
fn a_flipped_byte_fails_the_run_with_its_offset() {
    let out = run(&[
        "bench",
        "stream",
        "--backend",
        "tcp",
        "--bytes",
        "64MiB",
        "--verify",
        "--corrupt-at",
        "12345678",
    ]);
    assert_eq!(out.status.code(), Some(1), "stderr: {}", out.stderr);
    assert!(out.stderr.contains("verify failed at offset 12345678: expected 0x"), "stderr: {}", out.stderr);
    assert_eq!(out.stdout, "");
}

#[test]
fn duration_mode_shows_progress_on_a_terminal_only_and_prints_a_summary() {
    let args = ["bench", "stream", "--backend", "tcp", "--duration", "3", "--write-size", "1MiB"];
    let out = run_on_terminal(&args);
    assert!(out.status.success(), "stderr: {}", out.stderr);
    assert!(out.stdout.starts_with("stream tcp (cubic congestion control): "), "stdout: {}", out.stdout);
    assert!(out.stdout.contains("Gbit/s"), "stdout: {}", out.stdout);
    // After 2 s: bytes so far and the rate, redrawn in place.
    assert!(out.stderr.contains(" received, ") && out.stderr.contains("Gbit/s"), "stderr: {:?}", out.stderr);
    assert!(out.stderr.contains('\r') || out.stderr.contains("\u{1b}["), "stderr: {:?}", out.stderr);
    // Piped, the same run draws nothing.
    let out = run(&args);
    assert!(out.status.success(), "stderr: {}", out.stderr);
    assert!(!out.stderr.contains("Gbit/s") && !out.stderr.contains('\r'), "stderr: {:?}", out.stderr);
}

#[test]
fn bad_size_fails_naming_the_flag() {
    let out = run(&["bench", "stream", "--backend", "tcp", "--bytes", "nonsense"]);
    assert!(!out.status.success());
    assert!(out.stderr.contains("--bytes"), "stderr: {}", out.stderr);
    assert!(out.stderr.contains("nonsense"), "stderr: {}", out.stderr);
    assert_eq!(out.stdout, "");
}

/// `bench stream --backend tcp --bytes 1MiB --config FILE`, with the temporary file `name`
/// holding `toml`: it fails with status 1.
fn run_with_bad_config(name: &str, toml: &str) -> Output {
    let path = temp_file(name, toml);
    let out =
        run(&["bench", "stream", "--backend", "tcp", "--bytes", "1MiB", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "stderr: {}", out.stderr);
    out
}

#[test]
fn config_with_an_unknown_key_fails_naming_the_key() {
    let out = run_with_bad_config("unknown-key.toml", "throughput_channels = 2\nbogus_knob = 7\n");
    assert!(out.stderr.contains("bogus_knob"), "stderr: {}", out.stderr);
    assert!(out.stderr.starts_with("netchannel: "), "stderr: {}", out.stderr);
}

#[test]
fn config_with_a_bad_value_fails_naming_the_key() {
    let out = run_with_bad_config("bad-value.toml", "segment_size = \"64 furlongs\"\n");
    assert!(out.stderr.contains("segment_size"), "stderr: {}", out.stderr);
}

#[test]
fn invalid_knob_flag_fails_naming_the_flag() {
    let out = run(&["bench", "stream", "--backend", "tcp", "--bytes", "1MiB", "--channels", "0"]);
    assert_eq!(out.status.code(), Some(1), "stderr: {}", out.stderr);
    assert!(out.stderr.contains("--channels"), "stderr: {}", out.stderr);
}

#[test]
fn connect_refused_names_the_address() {
    let port = free_tcp_port();
    let out = run(&tcp_client_args("stream", &port, &["--bytes", "1MiB"]));
    assert_eq!(out.status.code(), Some(1), "stderr: {}", out.stderr);
    let want = format!("netchannel: cannot connect to 127.0.0.1:{port}: connection refused");
    assert!(out.stderr.contains(&want), "stderr: {}", out.stderr);
}

#[test]
fn tcp_server_and_client_in_two_processes() {
    let port = free_tcp_port();
    // Wait until the server says it listens (its stderr), then keep draining stderr.
    let server = tcp_server("stream", &port, &["--verify", "--json"]);
    let client = run_json(&tcp_client_args("stream", &port, &["--bytes", "32MiB", "--json"]));
    assert_eq!(client["role"], "client");
    assert_eq!(u64_of(&client, "bytes"), 32 * MIB);
    assert_eq!(client["verified"], false, "the client does not verify: {client}");

    let v = server.finish_json("bench stream --role server");
    assert_eq!(v["role"], "server");
    assert_eq!(v["verified"], true, "{v}");
    assert_eq!(u64_of(&v, "bytes"), 32 * MIB);
}

#[test]
fn backend_both_is_only_for_role_both() {
    let out = run(&["bench", "stream", "--backend", "both", "--role", "server"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stderr.contains("--backend both"), "stderr: {}", out.stderr);
}

#[test]

fn netchannel_stream_of_64mib_is_verified_and_striped() {
    let v =
        run_json(&["bench", "stream", "--backend", "netchannel", "--bytes", "64MiB", "--verify", "--json"]);
    assert_stream_report(&v, "netchannel", 64 * MIB);
    assert_eq!(u64_of(&v, "channels"), 4);
    let per_channel = channel_bytes(&v);
    assert_eq!(per_channel.len(), 4, "{v}");
    assert!(per_channel.iter().all(|&b| b > 0), "a channel carried nothing: {v}");
    assert!(per_channel.iter().sum::<u64>() >= 64 * MIB, "{v}");
}

#[test]

fn backend_both_reports_tcp_then_netchannel_and_the_ratio() {
    let v = run_json(&["bench", "stream", "--backend", "both", "--bytes", "64MiB", "--verify", "--json"]);
    let runs = runs(&v, "stream", "both", 2);
    assert_stream_report(&runs[0], "tcp", 64 * MIB);
    assert_stream_report(&runs[1], "netchannel", 64 * MIB);
    assert!(f64_of(&v, "ratio") > 0.0, "{v}");
}

/// `bench stream --backend netchannel --role ROLE ADDRESSES… --port PORT EXTRA…`.
fn netchannel_args<'a>(
    role: &'a str,
    addresses: &[&'a str],
    port: &'a str,
    extra: &[&'a str],
) -> Vec<&'a str> {
    [&["bench", "stream", "--backend", "netchannel", "--role", role], addresses, &["--port", port], extra]
        .concat()
}

/// A netchannel server process on 127.0.0.2 and its channel port; waits until it listens.
fn netchannel_server(port: &str, channel_port: &str, extra: &[&str]) -> Server {
    let listen = format!("127.0.0.2:{channel_port}");
    Server::start(&netchannel_args("server", &["--listen", &listen], port, extra), "listening")
}

fn free_port() -> String {
    let l = TcpListener::bind("127.0.0.2:0").unwrap();
    let p = l.local_addr().unwrap().port();
    // The client host binds the same channel port on 127.0.0.1.
    TcpListener::bind(("127.0.0.1", p)).map(|_| p.to_string()).unwrap_or_else(|_| free_port())
}

#[test]
fn netchannel_server_and_client_in_two_processes() {
    let chan = free_port();
    let server = netchannel_server("5101", &chan, &["--verify", "--json"]);
    let connect = format!("127.0.0.2:{chan}");
    let local = format!("127.0.0.1:{chan}");
    let addresses = ["--connect", &connect, "--local", &local];
    let client = run_json(&netchannel_args("client", &addresses, "5101", &["--bytes", "48MiB", "--json"]));
    assert_eq!(u64_of(&client, "bytes"), 48 * MIB);
    let v = server.finish_json("bench stream --role server");
    assert_eq!(v["verified"], true, "{v}");
    assert_eq!(u64_of(&v, "bytes"), 48 * MIB);
}

#[test]
fn killing_the_server_process_mid_transfer_fails_the_client_promptly() {
    let chan = free_port();
    let server = netchannel_server("5102", &chan, &[]);
    let connect = format!("127.0.0.2:{chan}");
    let local = format!("127.0.0.1:{chan}");
    let addresses = ["--connect", &connect, "--local", &local];
    let client = netchannel(&netchannel_args("client", &addresses, "5102", &["--duration", "60", "--json"]))
        .spawn()
        .expect("spawn client");
    thread::sleep(Duration::from_millis(1500));
    server.kill();
    let killed_at = Instant::now();
    let out = finish(client, "bench stream --role client (server killed)");
    assert!(!out.status.success(), "client succeeded although its peer died: {}", out.stdout);
    assert!(killed_at.elapsed() < Duration::from_secs(20), "client took {:?} to notice", killed_at.elapsed());
    assert!(
        out.stderr.contains("reset") || out.stderr.contains("lost") || out.stderr.contains("down"),
        "the error says what happened: {}",
        out.stderr
    );
}
