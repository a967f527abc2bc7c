//! Unmodified programs under `netchannel run` (the preload shim), with two `netchannel up`
//! daemons on loopback (127.x.y.1 serves the server program, 127.x.y.2 the client program):
//! a C program exercising the socket surface (tests/preload/sockets.c), Debian's
//! redis-server with redis-benchmark and redis-cli, iperf3 and sockperf. A test whose tool
//! is not installed says so and passes (`.ci/run` installs them); the C test needs `cc`.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::{finish, netchannel, KillOnDrop, TempDir};
use netchannel::daemon::Client;
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(540);

struct Daemon {
    _child: KillOnDrop,
    /// The daemon's stderr (its log).
    log: PathBuf,
    socket: PathBuf,
    config: PathBuf,
    ip: IpAddr,
}

impl Daemon {
    fn start(dir: &Path, name: &str, listen: SocketAddr, path: DataPath) -> Daemon {
        let socket = dir.join(format!("{name}.sock"));
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "listen = \"{listen}\"\n[daemon]\nsocket = \"{}\"\n{}[preload]\ndatapath = \"{}\"\n",
                socket.display(),
                path.daemon_keys(),
                path.name()
            ),
        )
        .unwrap();
        let mut cmd = netchannel(&["up", "--config", config.to_str().unwrap()]);
        let log = dir.join(format!("{name}.log"));
        cmd.stdout(Stdio::null()).stderr(std::fs::File::create(&log).unwrap());
        let mut child = KillOnDrop(Some(cmd.spawn().expect("spawn netchannel up")));
        let deadline = Instant::now() + Duration::from_secs(20);
        while Client::connect(&socket).is_err() {
            if let Some(st) = child.0.as_mut().unwrap().try_wait().unwrap() {
                let said = std::fs::read_to_string(&log).unwrap_or_default();
                panic!("netchannel up ({listen}) exited: {st}; it said:\n{said}");
            }
            assert!(Instant::now() < deadline, "the daemon did not come up on {}", socket.display());
            std::thread::sleep(Duration::from_millis(20));
        }
        Daemon { _child: child, log, socket, config, ip: listen.ip() }
    }

    /// What the daemon logged so far.
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn status(&self) -> Value {
        Client::connect(&self.socket).unwrap().status().unwrap()
    }

    /// `netchannel run --config <this daemon> -- args…`
    fn run(&self, args: &[&str]) -> Command {
        let mut v = vec!["run", "--config", self.config.to_str().unwrap(), "--"];
        v.extend_from_slice(args);
        netchannel(&v)
    }

    fn ip(&self) -> String {
        self.ip.to_string()
    }
}

/// The preload data paths: the loopback relay and the readiness proxy on shared memory
/// (also with the daemons' channel workers watching for the apps' answers).
#[derive(Clone, Copy, PartialEq)]
enum DataPath {
    Relay,
    Shm,
    ShmReplySpin,
}

impl DataPath {
    fn name(self) -> &'static str {
        match self {
            DataPath::Relay => "relay",
            DataPath::Shm | DataPath::ShmReplySpin => "shm",
        }
    }

    /// Lines of the daemons' `[daemon]` table.
    fn daemon_keys(self) -> &'static str {
        match self {
            DataPath::ShmReplySpin => "reply_spin_us = 30\n",
            _ => "",
        }
    }
}

/// With the shared-memory data path, the vsockets `d` opened since `before` had readiness
/// proxies (the bytes went through the rings, not a relay).
fn assert_proxied(path: DataPath, d: &Daemon, before: u64, at_least: u64) {
    if path != DataPath::Relay {
        let now = total(d, "vsockets_proxied");
        assert!(now >= before + at_least, "only {} proxied vsockets: {}", now - before, d.status());
    }
}

/// A temporary directory and two daemons on 127.b.c.1 / 127.b.c.2, plus a free port number
/// for the programs.
fn setup_with(tag: &str, path: DataPath) -> (TempDir, Daemon, Daemon, u16) {
    let lib = Path::new(env!("CARGO_BIN_EXE_netchannel")).with_file_name("libnetchannel_preload.so");
    assert!(
        lib.is_file(),
        "{} is not built: run `cargo build --workspace` before the tests (.ci/run does)",
        lib.display()
    );
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    let (b, c) = ((pid % 100) as u8 + 20, (n % 250) as u8 + 1);
    let port = 42000 + (pid % 15000) as u16;
    let d = TempDir::new(tag);
    std::fs::create_dir_all(&d.0).unwrap();
    let a = Daemon::start(&d.0, "a", SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, b, c, 1)), port), path);
    let bd = Daemon::start(&d.0, "b", SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, b, c, 2)), port), path);
    (d, a, bd, port + 1)
}

fn have(tool: &str) -> bool {
    let found =
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()).any(|d| d.join(tool).is_file());
    if !found {
        eprintln!("skipped: `{tool}` is not installed (.ci/run installs it)");
    }
    found
}

/// Start a server program in the background and wait until `addr` accepts.
fn background(mut cmd: Command, addr: &str) -> KillOnDrop {
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    let mut child = KillOnDrop(Some(cmd.spawn().expect("spawn server")));
    let a: SocketAddr = addr.parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect_timeout(&a, Duration::from_millis(200)).is_err() {
        if let Some(st) = child.0.as_mut().unwrap().try_wait().unwrap() {
            panic!("server for {addr} exited: {st}");
        }
        assert!(Instant::now() < deadline, "nothing listens on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The probe above went over kernel TCP; give the vsocket listener its moment too.
    std::thread::sleep(Duration::from_millis(200));
    child
}

fn ok(cmd: Command, what: &str) -> common::Output {
    let child = { cmd }.spawn().unwrap_or_else(|e| panic!("spawn {what}: {e}"));
    let out = finish(child, what);
    assert!(
        out.status.success(),
        "{what} failed: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        out.stdout,
        out.stderr
    );
    out
}

fn total(d: &Daemon, key: &str) -> u64 {
    d.status()["totals"][key].as_u64().unwrap()
}

#[test]
fn c_program_socket_surface_over_the_relay_fallback() {
    c_program(DataPath::Relay);
}

#[test]
fn c_program_socket_surface_over_the_shared_memory_data_path() {
    c_program(DataPath::Shm);
}

fn c_program(path: DataPath) {
    if !have("cc") {
        return;
    }
    let (dir, a, b, port) = setup_with("preload-c", path);
    let exe = dir.0.join("sockets");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/preload/sockets.c");
    let st = Command::new("cc").args(["-O1", "-Wall", "-o"]).arg(&exe).arg(&src).status().unwrap();
    assert!(st.success(), "cc {}", src.display());
    let exe = exe.to_str().unwrap();
    let port_s = port.to_string();
    let _server = background(a.run(&[exe, "server", &a.ip(), &port_s]), &format!("{}:{port}", a.ip()));
    let opened = total(&b, "vsockets_opened");
    let (pa, pb) = (total(&a, "vsockets_proxied"), total(&b, "vsockets_proxied"));
    let out = ok(b.run(&[exe, "client", &a.ip(), &port_s]), "sockets client");
    assert_eq!(out.stdout.trim(), "ok", "stderr:\n{}", out.stderr);
    // The client's two connections (one from a forked child) were vsockets.
    assert!(total(&b, "vsockets_opened") >= opened + 2, "{}", b.status());
    assert!(total(&b, "bytes_sent") >= 1 << 20);
    assert_proxied(path, &b, pb, 2);
    assert_proxied(path, &a, pa, 2);
    // Every vsocket ends once its last descriptor (in any process) is closed.
    let deadline = Instant::now() + Duration::from_secs(10);
    while total(&b, "vsockets_open") > 0 {
        assert!(Instant::now() < deadline, "vsockets left behind: {}", b.status());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Compile tests/preload/sockets.c into `dir`; its path.
fn sockets_program(dir: &Path) -> String {
    let exe = dir.join("sockets");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/preload/sockets.c");
    let st = Command::new("cc").args(["-O1", "-Wall", "-o"]).arg(&exe).arg(&src).status().unwrap();
    assert!(st.success(), "cc {}", src.display());
    exe.to_str().unwrap().to_string()
}

/// Kills a whole process group (a server and the workers it forked) when dropped.
struct KillGroup(i32);

impl Drop for KillGroup {
    fn drop(&mut self) {
        // SAFETY: kill(2) on a process group this test started.
        unsafe { libc::kill(-self.0, libc::SIGKILL) };
    }
}

/// A `sockets prefork` server (a master and its workers) on `a`'s host, killed whole when
/// dropped.
struct Prefork {
    _group: KillGroup,
    server: KillOnDrop,
}

impl Prefork {
    fn master(&self) -> u32 {
        self.server.0.as_ref().unwrap().id()
    }
}

fn prefork_server(a: &Daemon, exe: &str, port: u16, workers: u32) -> Prefork {
    use std::os::unix::process::CommandExt;
    let ip = a.ip();
    let mut cmd = a.run(&[exe, "prefork", &ip, &port.to_string(), &workers.to_string()]);
    cmd.process_group(0);
    let server = background(cmd, &format!("{ip}:{port}"));
    let master = server.0.as_ref().unwrap().id() as i32;
    Prefork { _group: KillGroup(master), server }
}

fn open_fds(pid: u64) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// Wait (at most 20 s) until neither daemon holds a vsocket or a parked arrival.
fn wait_until_idle(ds: &[&Daemon]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    for d in ds {
        while total(d, "vsockets_open") > 0 || total(d, "arrivals_parked") > 0 {
            assert!(Instant::now() < deadline, "vsockets left behind: {}", d.status());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Issue 12, defect 1: a master that listens and forks workers that accept (the shape of
/// event-loop servers). Every arrival reaches the worker that accepts it, and ends when that
/// worker closes it: after 2,000 connect/close cycles no vsocket is left in either daemon,
/// and neither the master nor the server's daemon holds more descriptors than before.
#[test]
fn accept_in_forked_workers_leaks_no_vsocket_and_no_descriptor() {
    if !have("cc") {
        return;
    }
    let (dir, a, b, port) = setup_with("preload-prefork", DataPath::Shm);
    let exe = sockets_program(&dir.0);
    let (ip, port_s) = (a.ip(), port.to_string());
    let server = prefork_server(&a, &exe, port, 2);
    let master = u64::from(server.master());
    let daemon_pid = a.status()["daemon"]["pid"].as_u64().unwrap();
    // A first round creates what is made once (the workers' daemon connections).
    assert_eq!(ok(b.run(&[&exe, "churn", &ip, &port_s, "20"]), "churn 20").stdout.trim(), "ok");
    wait_until_idle(&[&a, &b]);
    let (master_fds, daemon_fds) = (open_fds(master), open_fds(daemon_pid));
    let proxied = total(&a, "vsockets_proxied");
    let out = ok(b.run(&[&exe, "churn", &ip, &port_s, "2000"]), "churn 2000");
    assert_eq!(out.stdout.trim(), "ok", "stderr:\n{}", out.stderr);
    // The workers got the arrivals as vsockets (with their readiness proxies).
    assert_proxied(DataPath::Shm, &a, proxied, 2000);
    wait_until_idle(&[&a, &b]);
    assert!(open_fds(master) <= master_fds, "the master grew from {master_fds} to {} fds", open_fds(master));
    assert!(
        open_fds(daemon_pid) <= daemon_fds + 2,
        "the server's daemon grew from {daemon_fds} to {} fds",
        open_fds(daemon_pid)
    );
}

/// An event loop's writes kick the daemon once per pass (`[preload] eager_doorbells`), but
/// never wait for more than the thread's next call that may wait: a server that answers the
/// first of two ready connections and then sleeps has its first answer delivered at once,
/// not after the sleep with the second.
#[test]
fn an_answer_owed_by_an_event_loop_pass_leaves_when_the_loop_sleeps() {
    if !have("cc") {
        return;
    }
    let (dir, a, b, port) = setup_with("preload-pass", DataPath::Shm);
    let exe = sockets_program(&dir.0);
    let (ip, port_s) = (a.ip(), port.to_string());
    let _server = background(a.run(&[&exe, "pass", &ip, &port_s]), &format!("{ip}:{port}"));
    let proxied = total(&a, "vsockets_proxied");
    let out = ok(b.run(&[&exe, "pass_client", &ip, &port_s]), "pass_client");
    let ms: u64 = out.stdout.trim().strip_prefix("ok ").and_then(|k| k.parse().ok()).unwrap_or(u64::MAX);
    assert!(
        ms < 2000,
        "the first answer took {ms} ms: it waited for the server's 3 s sleep (stdout {:?}, stderr:\n{})",
        out.stdout,
        out.stderr
    );
    assert_proxied(DataPath::Shm, &a, proxied, 2);
}

/// Issue 12 item 4 (SHIM.md 10): an event loop that opens hundreds of non-blocking connects
/// at once gets every one of them as a vsocket, each writable once connected (`SO_ERROR` 0)
/// and answered; none fails, none is left behind. Once a connect reached the address, the
/// others return without waiting for the peer's answer (EINPROGRESS, or 0 where the answer
/// was quicker than the daemon's reply). A refused non-blocking connect
/// looks as the kernel's does (SHIM.md 2: ERR|HUP to an `events = 0` registration, then
/// `SO_ERROR` ECONNREFUSED): to a port nobody listens on, and through a vsocket whose
/// listener went away after the program had connected there.
#[test]
fn hundreds_of_non_blocking_connects_from_one_event_loop_all_succeed() {
    if !have("cc") {
        return;
    }
    let (dir, a, b, port) = setup_with("preload-many", DataPath::Shm);
    let exe = sockets_program(&dir.0);
    let (ip, port_s) = (a.ip(), port.to_string());
    let server = prefork_server(&a, &exe, port, 2);
    let proxied = total(&b, "vsockets_proxied");
    let n: u64 = 300;
    let out = ok(b.run(&[&exe, "many", &ip, &port_s, &n.to_string()]), "many");
    let said: Vec<&str> = out.stdout.split_whitespace().collect();
    let in_progress: u64 = said.get(3).and_then(|k| k.parse().ok()).unwrap_or(0);
    assert_eq!(said.get(..2), Some(&["ok", "300"][..]), "stdout {:?}, stderr:\n{}", out.stdout, out.stderr);
    // The others were answered before the daemon's reply came back: connected at once (0).
    assert!(in_progress > 0, "none of {n} connects answered EINPROGRESS");
    assert_proxied(DataPath::Shm, &b, proxied, n);
    wait_until_idle(&[&a, &b]);

    // Issue 12, defect 2: a vsocket costs the program one descriptor, as a TCP connection
    // does (its proxy end; the memfd is closed once mapped, the doorbell is one per process).
    let out = ok(b.run(&[&exe, "hold", &ip, &port_s, "64"]), "hold");
    let fds: usize =
        out.stdout.trim().strip_prefix("ok fds ").and_then(|k| k.parse().ok()).unwrap_or(usize::MAX);
    assert!(fds <= 64, "64 vsockets took {fds} descriptors in the program (stdout {:?})", out.stdout);
    wait_until_idle(&[&a, &b]);

    // The program connects once, then the server goes away, then it connects again.
    let opened = total(&b, "vsockets_proxied");
    connect_again_after(&b, &exe, &ip, port, "refused", || {
        drop(server);
        let deadline = Instant::now() + Duration::from_secs(20);
        while a.status()["listeners"].as_array().is_some_and(|l| !l.is_empty()) {
            assert!(Instant::now() < deadline, "the server's listener stayed: {}", a.status());
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    assert!(
        total(&b, "vsockets_proxied") >= opened + 2,
        "the second connect was not a vsocket: {}",
        b.status()
    );
    wait_until_idle(&[&a, &b]);

    // A port nobody listens on (the program never reached it before).
    let closed = (port + 7).to_string();
    let out = ok(b.run(&[&exe, "refused", &ip, &closed]), "refused");
    assert_eq!(out.stdout.trim(), "ok", "stderr:\n{}", out.stderr);
}

/// `sockets gone`: the program reaches `ip:port` once, `between` runs, and the program's
/// next non-blocking connect there (EINPROGRESS at once: the address is known) must fail as
/// `how` says ("refused": ECONNREFUSED, "timeout": ETIMEDOUT) through ERR|HUP and SO_ERROR.
fn connect_again_after(b: &Daemon, exe: &str, ip: &str, port: u16, how: &str, between: impl FnOnce()) {
    use std::io::{BufRead, Write};
    let port_s = port.to_string();
    let mut cmd = b.run(&[exe, "gone", ip, &port_s, how]);
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = KillOnDrop(Some(cmd.spawn().expect("spawn sockets gone")));
    let c = child.0.as_mut().unwrap();
    let mut line = String::new();
    std::io::BufReader::new(c.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "connected");
    between();
    c.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    let out = finish(child.0.take().unwrap(), "sockets gone");
    assert!(
        out.status.success() && out.stdout.trim() == "ok",
        "stdout {:?}, stderr:\n{}",
        out.stdout,
        out.stderr
    );
}

/// Wait (at most 10 s) until every thread of process `pid` is stopped (state `T`).
fn wait_stopped(pid: i32) {
    let stopped = || {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return false };
        tasks.flatten().all(|t| {
            let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
            // The state follows the command name's closing parenthesis.
            stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('T') || rest.starts_with('t'))
        })
    };
    let start = std::time::Instant::now();
    while !stopped() {
        assert!(start.elapsed() < Duration::from_secs(10), "daemon {pid} did not stop within 10 s");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A non-blocking connect whose OPEN is never answered (the peer's daemon is frozen) fails
/// at `connect_timeout` (3 s by default): ERR|HUP and `SO_ERROR` ETIMEDOUT, never a hang.
#[test]
fn a_non_blocking_connect_nobody_answers_times_out() {
    if !have("cc") {
        return;
    }
    let (dir, a, b, port) = setup_with("preload-frozen", DataPath::Shm);
    let exe = sockets_program(&dir.0);
    let ip = a.ip();
    let _server = prefork_server(&a, &exe, port, 1);
    let daemon = a.status()["daemon"]["pid"].as_i64().unwrap() as i32;
    /// Thaws the frozen daemon, whatever happens.
    struct Thaw(i32);
    impl Drop for Thaw {
        fn drop(&mut self) {
            // SAFETY: kill(2) on the daemon this test started.
            unsafe { libc::kill(self.0, libc::SIGCONT) };
        }
    }
    let mut thaw = None;
    connect_again_after(&b, &exe, &ip, port, "timeout", || {
        // SAFETY: kill(2) on the daemon this test started.
        assert_eq!(unsafe { libc::kill(daemon, libc::SIGSTOP) }, 0);
        thaw = Some(Thaw(daemon));
        // kill(2) returns before the stop takes hold: on a loaded machine a thread of the
        // daemon can still run (and answer the OPEN) for milliseconds. Go on only once every
        // thread is stopped.
        wait_stopped(daemon);
    });
    drop(thaw);
    wait_until_idle(&[&b]);
}

/// Issue 12, defect 3: a long-running server under `netchannel run` whose daemon restarts
/// gets its listener registered again with the new daemon, says so in one line, and takes
/// vsockets again (not kernel TCP) without being restarted itself.
#[test]
fn a_listener_is_registered_again_when_the_daemon_restarts() {
    if !have("cc") {
        return;
    }
    let (dir, a, b, port) = setup_with("preload-restart", DataPath::Shm);
    let exe = sockets_program(&dir.0);
    let (ip, port_s) = (a.ip(), port.to_string());
    let log = dir.0.join("server.log");
    let mut cmd = a.run(&[&exe, "server", &ip, &port_s]);
    cmd.stdout(Stdio::null()).stderr(std::fs::File::create(&log).unwrap());
    let mut server = KillOnDrop(Some(cmd.spawn().expect("spawn the server")));
    let listening = |d: &Daemon| {
        d.status()["listeners"].as_array().is_some_and(|ls| {
            ls.iter().any(|l| l["local"].as_str().is_some_and(|x| x.ends_with(&format!(":{port}"))))
        })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !listening(&a) {
        assert!(Instant::now() < deadline, "the server's vsocket listener did not come up: {}", a.status());
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = ok(b.run(&[&exe, "client", &ip, &port_s]), "client before the restart");
    assert_eq!(out.stdout.trim(), "ok", "stderr:\n{}", out.stderr);
    // The server's daemon goes away and comes back on the same socket and address.
    let listen = SocketAddr::new(a.ip, port - 1);
    drop(a);
    let a = Daemon::start(&dir.0, "a", listen, DataPath::Shm);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !listening(&a) {
        assert!(Instant::now() < deadline, "the listener was not registered again: {}", a.status());
        assert!(server.0.as_mut().unwrap().try_wait().unwrap().is_none(), "the server exited");
        std::thread::sleep(Duration::from_millis(50));
    }
    let proxied = total(&a, "vsockets_proxied");
    let out = ok(b.run(&[&exe, "client", &ip, &port_s]), "client after the restart");
    assert_eq!(out.stdout.trim(), "ok", "stderr:\n{}", out.stderr);
    assert_proxied(DataPath::Shm, &a, proxied, 2);
    let said = std::fs::read_to_string(&log).unwrap();
    assert_eq!(said.matches("takes vsockets again").count(), 1, "the server's stderr:\n{said}");
}

/// Issue 12 (e): io_uring is decided per socket operation, not per program. A program that
/// reads its files through io_uring and drives its socket with epoll keeps its vsocket; an
/// io_uring receive on a vsocket (an operation the shim cannot see) resets it, with one line
/// in the daemon's log naming the program and the fd, instead of corrupting it or hanging.
#[test]
fn io_uring_for_files_keeps_vsockets_and_an_io_uring_recv_resets_the_vsocket_loudly() {
    if !have("cc") {
        return;
    }
    let (dir, a, b, port) = setup_with("preload-uring", DataPath::Shm);
    let sockets = sockets_program(&dir.0);
    let uring = dir.0.join("uring");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/preload/uring.c");
    let st = Command::new("cc").args(["-O1", "-Wall", "-o"]).arg(&uring).arg(&src).status().unwrap();
    assert!(st.success(), "cc {}", src.display());
    let uring = uring.to_str().unwrap();
    let (ip, port_s) = (a.ip(), port.to_string());
    let _server = background(a.run(&[&sockets, "server", &ip, &port_s]), &format!("{ip}:{port}"));
    let proxied = total(&b, "vsockets_proxied");
    let out = ok(b.run(&[uring, "files", &ip, &port_s, src.to_str().unwrap()]), "uring files");
    assert_eq!(out.stdout.trim(), "ok", "stderr:\n{}", out.stderr);
    assert!(!out.stderr.contains("kernel TCP"), "{}", out.stderr);
    assert_proxied(DataPath::Shm, &b, proxied, 1);
    let proxied = total(&b, "vsockets_proxied");
    let out = ok(b.run(&[uring, "recv", &ip, &port_s]), "uring recv");
    assert_eq!(out.stdout.trim(), "reset", "stderr:\n{}\ndaemon log:\n{}", out.stderr, b.log());
    assert_proxied(DataPath::Shm, &b, proxied, 1);
    let deadline = Instant::now() + Duration::from_secs(10);
    let lines = |log: String| {
        log.lines().filter(|l| l.contains("cannot see")).map(str::to_string).collect::<Vec<_>>()
    };
    while lines(b.log()).is_empty() {
        assert!(Instant::now() < deadline, "no line about it in the daemon's log:\n{}", b.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let said = lines(b.log());
    assert_eq!(said.len(), 1, "{said:?}");
    assert!(said[0].contains("uring (pid ") && said[0].contains("vsocket fd "), "{said:?}");
    assert!(!said[0].contains("fd ?"), "the fd is named: {said:?}");
}

#[test]
fn redis_benchmark_and_a_1mib_value_over_the_relay_fallback() {
    redis(DataPath::Relay);
}

#[test]
fn redis_benchmark_and_a_1mib_value_over_the_shared_memory_data_path() {
    redis(DataPath::Shm);
}

/// The daemons' channel workers take the apps' answers themselves (`reply_spin_us`): no
/// answer may wait for a doorbell the watch suppressed (a lost one stalls redis-benchmark).
#[test]
fn redis_benchmark_with_the_daemons_watching_for_answers() {
    redis(DataPath::ShmReplySpin);
}

fn redis(path: DataPath) {
    if !have("redis-server") || !have("redis-benchmark") || !have("redis-cli") {
        return;
    }
    let (dir, a, b, port) = setup_with("preload-redis", path);
    let port_s = port.to_string();
    let ip = a.ip();
    let _server = background(
        a.run(&[
            "redis-server",
            "--bind",
            &ip,
            "--port",
            &port_s,
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
            "--dir",
            dir.0.to_str().unwrap(),
        ]),
        &format!("{ip}:{port}"),
    );
    let before = total(&a, "bytes_received");
    let proxied = total(&a, "vsockets_proxied");
    for pipeline in ["1", "32"] {
        let out = ok(
            b.run(&[
                "redis-benchmark",
                "-h",
                &ip,
                "-p",
                &port_s,
                "-t",
                "set,get,lpush,lpop,mset",
                "-n",
                "100000",
                "-P",
                pipeline,
                "-q",
            ]),
            "redis-benchmark",
        );
        let text = out.stdout.replace('\r', "\n");
        for t in ["SET", "GET", "LPUSH", "LPOP", "MSET"] {
            assert!(
                text.lines().any(|l| l.starts_with(t) && l.contains("requests per second")),
                "no {t} result at -P {pipeline}:\n{text}"
            );
        }
        assert!(!text.contains("Error") && !out.stderr.contains("Error"), "{text}\n{}", out.stderr);
    }
    // A 1 MiB value in and out through redis-cli.
    let value: String = (0..(1 << 20)).map(|i| (b'a' + (i * 7 % 26) as u8) as char).collect();
    let file = dir.0.join("value");
    std::fs::write(&file, &value).unwrap();
    let mut set = b.run(&["redis-cli", "-h", &ip, "-p", &port_s, "-x", "set", "big"]);
    set.stdin(std::fs::File::open(&file).unwrap());
    assert_eq!(ok(set, "redis-cli set").stdout.trim(), "OK");
    let got = ok(b.run(&["redis-cli", "-h", &ip, "-p", &port_s, "--raw", "get", "big"]), "redis-cli get");
    assert!(got.stdout.trim_end_matches('\n') == value, "the 1 MiB value came back changed");
    // The bytes went through vsockets: the server's daemon received them.
    assert!(total(&a, "bytes_received") >= before + (2 << 20), "{}", a.status());
    let json = ok(netchannel(&["status", "--config", a.config.to_str().unwrap(), "--json"]), "status");
    let v: Value = serde_json::from_str(json.stdout.trim()).unwrap();
    assert!(v["totals"]["vsockets_opened"].as_u64().unwrap() >= 100);
    assert_proxied(path, &a, proxied, 100);
}

#[test]
fn iperf3_parallel_and_reverse_over_the_relay_fallback() {
    iperf3(DataPath::Relay);
}

#[test]
fn iperf3_parallel_and_reverse_over_the_shared_memory_data_path() {
    iperf3(DataPath::Shm);
}

fn iperf3(path: DataPath) {
    if !have("iperf3") {
        return;
    }
    let (_dir, a, b, port) = setup_with("preload-iperf", path);
    let port_s = port.to_string();
    let ip = a.ip();
    // No `-1`: the readiness probe of `background` is a session of its own.
    let _server = background(a.run(&["iperf3", "-s", "-B", &ip, "-p", &port_s]), &format!("{ip}:{port}"));
    for extra in [["-P", "4"], ["-R", "-J"]] {
        let before = total(&b, "bytes_sent") + total(&b, "bytes_received");
        let proxied = total(&b, "vsockets_proxied");
        let mut args = vec!["iperf3", "-c", &ip, "-p", &port_s, "-t", "2"];
        args.extend_from_slice(&extra);
        ok(b.run(&args), "iperf3 client");
        let after = total(&b, "bytes_sent") + total(&b, "bytes_received");
        assert!(
            after - before >= 10 << 20,
            "iperf3 {extra:?} moved only {} bytes through vsockets",
            after - before
        );
        assert_proxied(path, &b, proxied, 2);
    }
}

#[test]
fn sockperf_ping_pong_over_the_relay_fallback() {
    sockperf(DataPath::Relay);
}

#[test]
fn sockperf_ping_pong_over_the_shared_memory_data_path() {
    sockperf(DataPath::Shm);
}

fn sockperf(path: DataPath) {
    if !have("sockperf") {
        return;
    }
    let (_dir, a, b, port) = setup_with("preload-sockperf", path);
    let port_s = port.to_string();
    let ip = a.ip();
    let _server =
        background(a.run(&["sockperf", "sr", "--tcp", "-i", &ip, "-p", &port_s]), &format!("{ip}:{port}"));
    let opened = total(&b, "vsockets_opened");
    let proxied = total(&b, "vsockets_proxied");
    let out = ok(b.run(&["sockperf", "pp", "--tcp", "-i", &ip, "-p", &port_s, "-t", "2"]), "sockperf pp");
    assert!(out.stdout.contains("Summary: Latency is") || out.stderr.contains("Summary: Latency is"));
    assert!(total(&b, "vsockets_opened") > opened);
    assert_proxied(path, &b, proxied, 1);
}

/// Issue 15, defect 7: a preload library that is not there fails `run` naming the path (the
/// loader would only warn, and the program would run without it).
#[test]
fn a_missing_preload_library_fails_run_naming_it() {
    let d = TempDir::new("preload-nolib");
    std::fs::create_dir_all(&d.0).unwrap();
    let cfg = d.0.join("c.toml");
    let lib = d.0.join("missing/libnetchannel_preload.so");
    std::fs::write(
        &cfg,
        format!(
            "[daemon]\nsocket = \"{}\"\n[preload]\nlibrary = \"{}\"\n",
            d.0.join("none.sock").display(),
            lib.display()
        ),
    )
    .unwrap();
    let child = netchannel(&["run", "--config", cfg.to_str().unwrap(), "--", "true"]).spawn().unwrap();
    let out = finish(child, "run true (missing library)");
    assert!(!out.status.success(), "{}", out.stderr);
    assert!(
        out.stderr.contains(&lib.display().to_string()) && out.stderr.contains("[preload] library"),
        "{}",
        out.stderr
    );
    // The same for NETCHANNEL_PRELOAD_LIB.
    std::fs::write(&cfg, format!("[daemon]\nsocket = \"{}\"\n", d.0.join("none.sock").display())).unwrap();
    let mut cmd = netchannel(&["run", "--config", cfg.to_str().unwrap(), "--", "true"]);
    cmd.env("NETCHANNEL_PRELOAD_LIB", &lib);
    let out = finish(cmd.spawn().unwrap(), "run true (missing NETCHANNEL_PRELOAD_LIB)");
    assert!(!out.status.success(), "{}", out.stderr);
    assert!(out.stderr.contains("NETCHANNEL_PRELOAD_LIB"), "{}", out.stderr);
}

#[test]
fn without_a_daemon_the_program_runs_on_plain_tcp_after_one_warning() {
    let d = TempDir::new("preload-nodaemon");
    std::fs::create_dir_all(&d.0).unwrap();
    let cfg = d.0.join("c.toml");
    std::fs::write(&cfg, format!("[daemon]\nsocket = \"{}\"\n", d.0.join("none.sock").display())).unwrap();
    let out = ok(netchannel(&["run", "--config", cfg.to_str().unwrap(), "--", "true"]), "run true");
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
    assert!(out.stderr.contains("plain TCP"), "{}", out.stderr);
    std::fs::write(
        &cfg,
        format!(
            "[daemon]\nsocket = \"{}\"\n[preload]\nrequire_daemon = true\n",
            d.0.join("none.sock").display()
        ),
    )
    .unwrap();
    let child = netchannel(&["run", "--config", cfg.to_str().unwrap(), "--", "true"]).spawn().unwrap();
    let out = finish(child, "run true (require_daemon)");
    assert!(!out.status.success());
    assert!(out.stderr.contains("require_daemon"), "{}", out.stderr);
}
