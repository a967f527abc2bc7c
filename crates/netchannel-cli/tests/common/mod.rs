//! What the end-to-end tests of the `netchannel` binary share: running it as a child process
//! with its output piped and drained on threads ([`run`], [`finish`]) or its stderr on a
//! pseudo-terminal ([`run_on_terminal`]), a server process in the
//! background ([`Server`]), reading its one JSON object ([`run_json`], [`u64_of`], …) and
//! asserting the fields every report has, and temporary files.
//!
//! Each test file defines `const TIMEOUT: Duration`, the longest any of its child processes
//! may run: [`finish`] kills a child after that and fails the test, so nothing can hang.

// Each test binary uses a subset of these.
#![allow(dead_code)]

pub mod daemons;

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

pub const MIB: u64 = 1 << 20;

/// What a child process left: its exit status and all it printed.
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// The built `netchannel` with `args`, stdin closed, stdout and stderr piped.
pub fn netchannel(args: &[&str]) -> Command {
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

/// Wait for `child` (whose stdout, and stderr unless taken already, are still piped) for at
/// most the test file's `TIMEOUT`; kill it and panic after that.
pub fn finish(mut child: Child, what: &str) -> Output {
    let timeout = crate::TIMEOUT;
    let stdout = drain(child.stdout.take().expect("piped stdout"));
    let stderr = child.stderr.take().map(drain);
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`{what}` did not finish within {timeout:?} and was killed");
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
pub struct KillOnDrop(pub Option<Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Run `netchannel args` to the end.
pub fn run(args: &[&str]) -> Output {
    let child = netchannel(args).spawn().expect("spawn netchannel");
    finish(child, &args.join(" "))
}

/// Run `netchannel args` to the end with its stderr on a pseudo-terminal (stdout piped), as a
/// person at a terminal sees it: `Output::stderr` is all the terminal received.
pub fn run_on_terminal(args: &[&str]) -> Output {
    use std::os::fd::{FromRawFd, OwnedFd};
    let (mut master, mut slave) = (-1, -1);
    let size = libc::winsize { ws_row: 40, ws_col: 120, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: openpty writes two new descriptors into `master` and `slave`; no name buffer, no
    // termios, a valid winsize.
    let rc = unsafe { libc::openpty(&mut master, &mut slave, std::ptr::null_mut(), std::ptr::null(), &size) };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors are new and owned by nothing else.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    let mut cmd = netchannel(args);
    cmd.stderr(Stdio::from(slave));
    let child = cmd.spawn().expect("spawn netchannel");
    // Close this process' copy of the terminal's slave side: reading the master side then ends
    // (EIO) once the child has exited.
    drop(cmd);
    let terminal = thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = std::fs::File::from(master).read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    });
    let mut out = finish(child, &args.join(" "));
    out.stderr = terminal.join().unwrap();
    out
}

/// Require that the run of `args` succeeded.
pub fn assert_success(out: &Output, args: &[&str]) {
    assert!(out.status.success(), "{args:?} failed: {}\nstderr: {}", out.status, out.stderr);
}

/// `stdout` as exactly one JSON object.
pub fn json_object(stdout: &str) -> Value {
    let v: Value = serde_json::from_str(stdout)
        .unwrap_or_else(|e| panic!("stdout is not one JSON value ({e}): {stdout:?}"));
    assert!(v.is_object(), "{v}");
    v
}

/// Require success, and parse stdout as exactly one JSON object.
pub fn parse_json(out: &Output, args: &[&str]) -> Value {
    assert_success(out, args);
    json_object(&out.stdout)
}

/// Run, require success, and parse stdout as exactly one JSON object.
pub fn run_json(args: &[&str]) -> Value {
    parse_json(&run(args), args)
}

/// A `netchannel` server process in the background, killed if the test ends first.
pub struct Server {
    child: KillOnDrop,
    stderr: thread::JoinHandle<String>,
}

impl Server {
    /// Spawn `netchannel args` and wait (at most 30 s) until the first line of its stderr
    /// contains `announce`; its stderr is then drained in the background.
    pub fn start(args: &[&str], announce: &str) -> Server {
        let mut child = KillOnDrop(Some(netchannel(args).spawn().expect("spawn server")));
        let (tx, rx) = mpsc::channel();
        let err = BufReader::new(child.0.as_mut().unwrap().stderr.take().unwrap());
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
            first.as_deref().is_ok_and(|l| l.contains(announce)),
            "server did not announce itself: {first:?}"
        );
        Server { child, stderr }
    }

    /// Wait for the server to end (see [`finish`]), require success, and parse its stdout as
    /// one JSON value.
    pub fn finish_json(mut self, what: &str) -> Value {
        let out = finish(self.child.0.take().unwrap(), what);
        let server_err = self.stderr.join().unwrap();
        assert!(out.status.success(), "server failed: {server_err}");
        serde_json::from_str(&out.stdout).expect("server prints one JSON object")
    }

    /// SIGKILL the server and reap it.
    pub fn kill(mut self) {
        let mut s = self.child.0.take().unwrap();
        s.kill().expect("SIGKILL the server");
        let _ = s.wait();
    }
}

/// `bench MODE --backend tcp --role server --listen 127.0.0.1 --port PORT EXTRA…`, started (see
/// [`Server::start`]).
pub fn tcp_server(mode: &str, port: &str, extra: &[&str]) -> Server {
    let mut args =
        vec!["bench", mode, "--backend", "tcp", "--role", "server", "--listen", "127.0.0.1", "--port", port];
    args.extend_from_slice(extra);
    Server::start(&args, "listening on TCP 127.0.0.1:")
}

/// `bench MODE --backend tcp --role client --connect 127.0.0.1 --port PORT EXTRA…`.
pub fn tcp_client_args<'a>(mode: &'a str, port: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args =
        vec!["bench", mode, "--backend", "tcp", "--role", "client", "--connect", "127.0.0.1", "--port", port];
    args.extend_from_slice(extra);
    args
}

/// A TCP port free on 127.0.0.1 just now.
pub fn free_tcp_port() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port().to_string()
}

pub fn u64_of(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("{key} is not a u64 in {v}"))
}

pub fn f64_of(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or_else(|| panic!("{key} is not a number in {v}"))
}

pub fn channel_bytes(v: &Value) -> Vec<u64> {
    v["channel_bytes"]
        .as_array()
        .unwrap_or_else(|| panic!("channel_bytes is not an array in {v}"))
        .iter()
        .map(|b| b.as_u64().expect("channel_bytes entries are u64"))
        .collect()
}

/// The runs of a multi-backend report, checking its envelope.
pub fn runs<'a>(v: &'a Value, mode: &str, backend: &str, n: usize) -> &'a [Value] {
    assert_eq!(v["mode"], mode, "{v}");
    assert_eq!(v["backend"], backend, "{v}");
    let runs = v["runs"].as_array().unwrap_or_else(|| panic!("runs is not an array in {v}"));
    assert_eq!(runs.len(), n, "{v}");
    runs
}

/// A report of `mode` on `backend` whose data was verified.
pub fn assert_verified_run(v: &Value, mode: &str, backend: &str) {
    assert_eq!(v["mode"], mode, "{v}");
    assert_eq!(v["backend"], backend, "{v}");
    assert_eq!(v["verified"], true, "{v}");
}

/// A verified stream report on `backend` of `bytes` bytes at some Gbit/s.
pub fn assert_verified_stream(v: &Value, backend: &str, bytes: u64) {
    assert_verified_run(v, "stream", backend);
    assert_eq!(u64_of(v, "bytes"), bytes, "{v}");
    assert!(f64_of(v, "gbps") > 0.0, "{v}");
}

/// A file `name` holding `text` in the tests' temporary directory.
pub fn temp_file(name: &str, text: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// A fresh directory path under the system's temp dir (not created), removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().subsec_nanos();
        TempDir(std::env::temp_dir().join(format!("netchannel-{tag}-{}-{nanos}", std::process::id())))
    }
    pub fn path(&self) -> &str {
        self.0.to_str().expect("a UTF-8 temp path")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
