//! End-to-end tests of the `netchannel` binary: each test runs the built command as a child
//! process (killed after [`TIMEOUT`], so nothing can hang) and checks its exit status, its
//! stdout (one JSON object with `--json`) and its stderr. They assert behaviour, not speed.

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Longest any child process may run.
const TIMEOUT: Duration = Duration::from_secs(120);
const MIB: u64 = 1 << 20;

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

/// Run, require success, and parse stdout as exactly one JSON object.
fn run_json(args: &[&str]) -> Value {
    let out = run(args);
    assert!(out.status.success(), "{args:?} failed: {}\nstderr: {}", out.status, out.stderr);
    let v: Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not one JSON value ({e}): {:?}", out.stdout));
    assert!(v.is_object(), "{v}");
    v
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

fn temp_file(name: &str, text: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn assert_stream_report(v: &Value, backend: &str, bytes: u64) {
    assert_eq!(v["mode"], "stream", "{v}");
    assert_eq!(v["backend"], backend, "{v}");
    assert_eq!(v["verified"], true, "{v}");
    assert_eq!(u64_of(v, "bytes"), bytes, "{v}");
    assert!(f64_of(v, "gbps") > 0.0, "{v}");
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
fn duration_mode_prints_progress_and_a_summary() {
    let out = run(&["bench", "stream", "--backend", "tcp", "--duration", "3", "--write-size", "1MiB"]);
    assert!(out.status.success(), "stderr: {}", out.stderr);
    assert!(out.stdout.starts_with("stream tcp: "), "stdout: {}", out.stdout);
    assert!(out.stdout.contains("Gbit/s"), "stdout: {}", out.stdout);
    assert!(out.stderr.contains("received") && out.stderr.contains("Gbit/s"), "stderr: {:?}", out.stderr);
}

#[test]
fn bad_size_fails_naming_the_flag() {
    let out = run(&["bench", "stream", "--backend", "tcp", "--bytes", "nonsense"]);
    assert!(!out.status.success());
    assert!(out.stderr.contains("--bytes"), "stderr: {}", out.stderr);
    assert!(out.stderr.contains("nonsense"), "stderr: {}", out.stderr);
    assert_eq!(out.stdout, "");
}

#[test]
fn config_with_an_unknown_key_fails_naming_the_key() {
    let path = temp_file("unknown-key.toml", "throughput_channels = 2\nbogus_knob = 7\n");
    let out =
        run(&["bench", "stream", "--backend", "tcp", "--bytes", "1MiB", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "stderr: {}", out.stderr);
    assert!(out.stderr.contains("bogus_knob"), "stderr: {}", out.stderr);
    assert!(out.stderr.starts_with("netchannel: "), "stderr: {}", out.stderr);
}

#[test]
fn config_with_a_bad_value_fails_naming_the_key() {
    let path = temp_file("bad-value.toml", "segment_size = \"64 furlongs\"\n");
    let out =
        run(&["bench", "stream", "--backend", "tcp", "--bytes", "1MiB", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "stderr: {}", out.stderr);
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
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let port = port.to_string();
    let out = run(&[
        "bench",
        "stream",
        "--backend",
        "tcp",
        "--role",
        "client",
        "--connect",
        "127.0.0.1",
        "--port",
        &port,
        "--bytes",
        "1MiB",
    ]);
    assert_eq!(out.status.code(), Some(1), "stderr: {}", out.stderr);
    let want = format!("netchannel: cannot connect to 127.0.0.1:{port}: connection refused");
    assert!(out.stderr.contains(&want), "stderr: {}", out.stderr);
}

#[test]
fn tcp_server_and_client_in_two_processes() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }
    .to_string();
    let server_args = [
        "bench",
        "stream",
        "--backend",
        "tcp",
        "--role",
        "server",
        "--listen",
        "127.0.0.1",
        "--port",
        &port,
        "--verify",
        "--json",
    ];
    let mut server = KillOnDrop(Some(netchannel(&server_args).spawn().expect("spawn server")));
    // Wait until the server says it listens (its stderr), then keep draining stderr.
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
        "stream",
        "--backend",
        "tcp",
        "--role",
        "client",
        "--connect",
        "127.0.0.1",
        "--port",
        &port,
        "--bytes",
        "32MiB",
        "--json",
    ]);
    assert_eq!(client["role"], "client");
    assert_eq!(u64_of(&client, "bytes"), 32 * MIB);
    assert_eq!(client["verified"], false, "the client does not verify: {client}");

    let out = finish(server.0.take().unwrap(), "bench stream --role server");
    let server_err = stderr.join().unwrap();
    assert!(out.status.success(), "server failed: {server_err}");
    let v: Value = serde_json::from_str(&out.stdout).expect("server prints one JSON object");
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
    assert_eq!(v["mode"], "stream");
    assert_eq!(v["backend"], "both");
    let runs = v["runs"].as_array().expect("runs array");
    assert_eq!(runs.len(), 2);
    assert_stream_report(&runs[0], "tcp", 64 * MIB);
    assert_stream_report(&runs[1], "netchannel", 64 * MIB);
    assert!(f64_of(&v, "ratio") > 0.0, "{v}");
}

/// A netchannel server process on 127.0.0.2 and its channel port; waits until it listens.
fn netchannel_server(
    port: &str,
    channel_port: &str,
    extra: &[&str],
) -> (KillOnDrop, thread::JoinHandle<String>) {
    let listen = format!("127.0.0.2:{channel_port}");
    let mut args = vec![
        "bench",
        "stream",
        "--backend",
        "netchannel",
        "--role",
        "server",
        "--listen",
        &listen,
        "--port",
        port,
    ];
    args.extend_from_slice(extra);
    let mut server = KillOnDrop(Some(netchannel(&args).spawn().expect("spawn server")));
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
    let first = rx.recv_timeout(Duration::from_secs(30));
    assert!(
        first.as_deref().is_ok_and(|l| l.contains("listening")),
        "server did not announce itself: {first:?}"
    );
    (server, stderr)
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
    let (mut server, stderr) = netchannel_server("5101", &chan, &["--verify", "--json"]);
    let connect = format!("127.0.0.2:{chan}");
    let local = format!("127.0.0.1:{chan}");
    let client = run_json(&[
        "bench",
        "stream",
        "--backend",
        "netchannel",
        "--role",
        "client",
        "--connect",
        &connect,
        "--local",
        &local,
        "--port",
        "5101",
        "--bytes",
        "48MiB",
        "--json",
    ]);
    assert_eq!(u64_of(&client, "bytes"), 48 * MIB);
    let out = finish(server.0.take().unwrap(), "bench stream --role server");
    let server_err = stderr.join().unwrap();
    assert!(out.status.success(), "server failed: {server_err}");
    let v: Value = serde_json::from_str(&out.stdout).expect("server prints one JSON object");
    assert_eq!(v["verified"], true, "{v}");
    assert_eq!(u64_of(&v, "bytes"), 48 * MIB);
}

#[test]
fn killing_the_server_process_mid_transfer_fails_the_client_promptly() {
    let chan = free_port();
    let (mut server, _stderr) = netchannel_server("5102", &chan, &[]);
    let connect = format!("127.0.0.2:{chan}");
    let local = format!("127.0.0.1:{chan}");
    let client = netchannel(&[
        "bench",
        "stream",
        "--backend",
        "netchannel",
        "--role",
        "client",
        "--connect",
        &connect,
        "--local",
        &local,
        "--port",
        "5102",
        "--duration",
        "60",
        "--json",
    ])
    .spawn()
    .expect("spawn client");
    thread::sleep(Duration::from_millis(1500));
    let mut s = server.0.take().unwrap();
    s.kill().expect("SIGKILL the server");
    let _ = s.wait();
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
