//! The per-host daemon across processes: two `netchannel up` daemons on loopback (127.x.y.1
//! and 127.x.y.2), and apps that are separate processes — this test binary re-run in an app
//! role (the ignored test `app_main`, driven by `NC_APP_*` variables) or the `netchannel`
//! command itself. Covers verified data from several processes sharing one channel mesh,
//! an app killed mid-transfer, the daemon killed under its apps and restarted, and a user
//! refused by the credential policy. Hostile clients (garbage on the control socket, caps,
//! descriptor exhaustion) are in tests/hostile.rs.

mod common;

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::daemons::{addr_pair, dir, pattern, Daemon};
use common::{finish, netchannel, KillOnDrop, TempDir};
use netchannel::daemon::Client;
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(60);

fn pair(tag: &str) -> (TempDir, Daemon, Daemon) {
    let d = dir(tag);
    let (a, b) = addr_pair();
    let da = Daemon::start(&d.0, "a", a, "");
    let db = Daemon::start(&d.0, "b", b, "");
    (d, da, db)
}

/// This test binary in an app role (see `app_main`), started.
fn app(role: &str, socket: &str, vars: &[(&str, String)]) -> App {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "app_main", "--ignored", "--nocapture", "--test-threads", "1"])
        .env("NC_APP_ROLE", role)
        .env("NC_APP_SOCKET", socket)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in vars {
        cmd.env(k, v);
    }
    App::spawn(cmd)
}

/// An app process whose stdout lines arrive on a channel.
struct App {
    child: KillOnDrop,
    lines: std::sync::mpsc::Receiver<String>,
}

impl App {
    fn spawn(mut cmd: Command) -> App {
        let mut child = cmd.spawn().expect("spawn app");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(app_line(&line).to_string());
            }
        });
        App { child: KillOnDrop(Some(child)), lines: rx }
    }

    fn pid(&self) -> u32 {
        self.child.0.as_ref().unwrap().id()
    }

    /// Wait for a line that starts with `prefix`; the line.
    fn wait_line(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.starts_with(prefix) => return l,
                Ok(_) => {}
                Err(_) => panic!("the app did not print {prefix:?}"),
            }
        }
    }

    fn kill(&mut self) {
        let mut c = self.child.0.take().unwrap();
        c.kill().unwrap();
        c.wait().unwrap();
    }

    /// Wait (at most TIMEOUT) for the app to exit; its status and the rest of its stdout.
    fn finish(mut self, what: &str) -> (std::process::ExitStatus, String) {
        let mut child = self.child.0.take().unwrap();
        let deadline = Instant::now() + TIMEOUT;
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("{what} did not finish within {TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        let rest: Vec<String> = self.lines.iter().collect();
        assert!(
            status.success() || what.contains("killed"),
            "{what} failed ({status}): {}\n{err}",
            rest.join("\n")
        );
        (status, rest.join("\n"))
    }
}

/// A line the app printed, without the test harness's "test app_main ... " before the first.
fn app_line(l: &str) -> &str {
    l.trim_start_matches("test app_main ... ")
}

fn var(k: &str) -> String {
    std::env::var(k).unwrap_or_else(|_| panic!("{k} not set"))
}

/// The app processes of these tests. Run only as a child (`NC_APP_ROLE` set).
#[test]
#[ignore = "an app process of the daemon tests, run by them"]
fn app_main() {
    let Ok(role) = std::env::var("NC_APP_ROLE") else { return };
    let client = Client::connect(var("NC_APP_SOCKET")).unwrap();
    let mut out = std::io::stdout();
    match role.as_str() {
        // Accept NC_APP_STREAMS vsockets on NC_APP_PORT; each starts with its seed, then
        // pattern bytes to EOF; answer the count. Prints "verified BYTES".
        "server" => {
            let l = client.bind(var("NC_APP_PORT").parse().unwrap()).unwrap();
            writeln!(out, "listening").unwrap();
            let n: usize = var("NC_APP_STREAMS").parse().unwrap();
            let mut threads = Vec::new();
            for _ in 0..n {
                let (mut s, _) = l.accept().unwrap();
                threads.push(std::thread::spawn(move || {
                    let mut seed = [0u8; 8];
                    s.read_exact(&mut seed).unwrap();
                    let seed = u64::from_be_bytes(seed);
                    let mut buf = vec![0u8; 1 << 16];
                    let mut off = 0u64;
                    loop {
                        let k = s.read(&mut buf).unwrap();
                        if k == 0 {
                            break;
                        }
                        for (i, b) in buf[..k].iter().enumerate() {
                            assert_eq!(
                                *b,
                                pattern(seed, off + i as u64),
                                "stream {seed} at {}",
                                off + i as u64
                            );
                        }
                        off += k as u64;
                    }
                    s.write_all(&off.to_be_bytes()).unwrap();
                    off
                }));
            }
            let total: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
            writeln!(out, "verified {total}").unwrap();
        }
        // NC_APP_STREAMS vsockets to NC_APP_TARGET in parallel, NC_APP_BYTES each; the seeds
        // start at NC_APP_SEED. Prints "sent BYTES".
        "client" => {
            let target: SocketAddr = var("NC_APP_TARGET").parse().unwrap();
            let n: u64 = var("NC_APP_STREAMS").parse().unwrap();
            let bytes: u64 = var("NC_APP_BYTES").parse().unwrap();
            let seed0: u64 = var("NC_APP_SEED").parse().unwrap();
            let threads: Vec<_> = (0..n)
                .map(|i| {
                    let c = client.clone();
                    std::thread::spawn(move || {
                        let seed = seed0 + i;
                        let mut s = c.connect_stream(target).unwrap();
                        s.write_all(&seed.to_be_bytes()).unwrap();
                        let mut buf = vec![0u8; 100_003];
                        let mut off = 0;
                        while off < bytes {
                            let k = (bytes - off).min(buf.len() as u64) as usize;
                            for (j, b) in buf[..k].iter_mut().enumerate() {
                                *b = pattern(seed, off + j as u64);
                            }
                            s.write_all(&buf[..k]).unwrap();
                            off += k as u64;
                        }
                        s.shutdown(Shutdown::Write).unwrap();
                        let mut count = [0u8; 8];
                        s.read_exact(&mut count).unwrap();
                        assert_eq!(u64::from_be_bytes(count), bytes);
                        bytes
                    })
                })
                .collect();
            let total: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
            writeln!(out, "sent {total}").unwrap();
        }
        // Write to NC_APP_TARGET without end; prints "writing" once data flows.
        "writer" => {
            let target: SocketAddr = var("NC_APP_TARGET").parse().unwrap();
            let mut s = client.connect_stream(target).unwrap();
            s.write_all(&0u64.to_be_bytes()).unwrap();
            let buf = vec![7u8; 1 << 16];
            s.write_all(&buf).unwrap();
            writeln!(out, "writing").unwrap();
            loop {
                if let Err(e) = s.write_all(&buf) {
                    writeln!(out, "write error {:?}: {e}", e.kind()).unwrap();
                    return;
                }
            }
        }
        // Accept one vsocket and read it until EOF or an error: prints "eof BYTES" or
        // "error KIND".
        "drain" => {
            let l = client.bind(var("NC_APP_PORT").parse().unwrap()).unwrap();
            writeln!(out, "listening").unwrap();
            let (mut s, _) = l.accept().unwrap();
            let mut buf = vec![0u8; 1 << 16];
            let mut n = 0u64;
            loop {
                match s.read(&mut buf) {
                    Ok(0) => {
                        writeln!(out, "eof {n}").unwrap();
                        return;
                    }
                    Ok(k) => n += k as u64,
                    Err(e) => {
                        writeln!(out, "error {:?}", e.kind()).unwrap();
                        return;
                    }
                }
            }
        }
        // Connect to NC_APP_TARGET and block in read; prints how the read and a later
        // connect fail.
        "reader" => {
            let target: SocketAddr = var("NC_APP_TARGET").parse().unwrap();
            let mut s = client.connect_stream(target).unwrap();
            writeln!(out, "reading").unwrap();
            let mut b = [0u8; 16];
            match s.read(&mut b) {
                Ok(n) => writeln!(out, "read returned {n}").unwrap(),
                Err(e) => writeln!(out, "read error {:?}: {e}", e.kind()).unwrap(),
            }
            match s.write_all(b"more") {
                Ok(()) => writeln!(out, "write ok").unwrap(),
                Err(e) => writeln!(out, "write error {:?}: {e}", e.kind()).unwrap(),
            }
            match client.connect_stream(target) {
                Ok(_) => writeln!(out, "connect ok").unwrap(),
                Err(e) => writeln!(out, "connect error {:?}: {e}", e.kind()).unwrap(),
            }
        }
        other => panic!("unknown app role {other}"),
    }
}

fn target(d: &Daemon, port: u16) -> String {
    SocketAddr::new(d.addr.ip(), port).to_string()
}

/// A client app: `streams` vsockets of `bytes` each to vsocket `port` of daemon `to`, through
/// daemon `via`, seeds from `seed`.
fn client_app(via: &Daemon, to: &Daemon, port: u16, streams: u64, bytes: u64, seed: u64) -> App {
    app(
        "client",
        via.sock(),
        &[
            ("NC_APP_TARGET", target(to, port)),
            ("NC_APP_STREAMS", streams.to_string()),
            ("NC_APP_BYTES", bytes.to_string()),
            ("NC_APP_SEED", seed.to_string()),
        ],
    )
}

fn finish_ok(app: App, what: &str) -> String {
    app.finish(what).1
}

#[test]
fn several_processes_share_the_daemons_channels() {
    let (_d, da, db) = pair("share");
    let port = 7100;
    let mut server =
        app("server", db.sock(), &[("NC_APP_PORT", port.to_string()), ("NC_APP_STREAMS", "6".into())]);
    let line = server.wait_line("listening");
    assert_eq!(line, "listening");
    let bytes = 3 << 20;
    let clients: Vec<App> = (0..3).map(|i| client_app(&da, &db, port, 2, bytes, 10 * i + 1)).collect();
    for (i, c) in clients.into_iter().enumerate() {
        let out = finish_ok(c, &format!("client app {i}"));
        assert!(out.contains(&format!("sent {}", 2 * bytes)), "{out}");
    }
    // The server's stdout reader thread was taken by wait_line; wait for its exit.
    server.finish("server app");
    // One channel mesh between the daemons, whatever the number of processes.
    let st = da.status();
    let peers = st["peers"].as_array().unwrap();
    assert_eq!(peers.len(), 1, "{st}");
    assert_eq!(peers[0]["throughput_channels"], 4, "{st}");
    assert!(st["totals"]["bytes_sent"].as_u64().unwrap() >= 6 * bytes, "{st}");
    assert!(st["totals"]["vsockets_opened"].as_u64().unwrap() >= 6, "{st}");
    let stb = db.status();
    assert!(stb["totals"]["bytes_received"].as_u64().unwrap() >= 6 * bytes, "{stb}");
    // `netchannel status` prints the same, as JSON and as tables.
    let out =
        finish(netchannel(&["status", "--json", "--socket", da.sock()]).spawn().unwrap(), "status --json");
    assert!(out.status.success(), "{}", out.stderr);
    let v: Value = serde_json::from_str(&out.stdout).unwrap();
    for key in ["peers", "vsockets", "totals", "channels", "clients"] {
        assert!(v.get(key).is_some(), "status --json lacks {key}: {v}");
    }
    let out = finish(netchannel(&["status", "--socket", da.sock()]).spawn().unwrap(), "status");
    assert!(out.stdout.contains("channels:") && out.stdout.contains(&db.addr.to_string()), "{}", out.stdout);
}

#[test]
fn an_app_killed_mid_transfer_is_cleaned_up() {
    let (_d, da, db) = pair("appkill");
    let port = 7200;
    let mut drain = app("drain", db.sock(), &[("NC_APP_PORT", port.to_string())]);
    drain.wait_line("listening");
    let mut writer = app("writer", da.sock(), &[("NC_APP_TARGET", target(&db, port))]);
    writer.wait_line("writing");
    let pid = writer.pid() as u64;
    let owned = |st: &Value| st["vsockets"].as_array().unwrap().iter().filter(|v| v["pid"] == pid).count();
    let pooled = |st: &Value| st["region_pools"].as_array().unwrap().iter().any(|p| p["pid"] == pid);
    let st = da.status();
    assert_eq!(owned(&st), 1, "the writer's vsocket is listed with its pid");
    assert!(pooled(&st), "the writer's vsocket is in a region of its pool: {st}");
    writer.kill();
    let killed = Instant::now();
    loop {
        let st = da.status();
        if owned(&st) == 0
            && st["clients"].as_array().unwrap().iter().all(|c| c["pid"] != pid)
            && !pooled(&st)
        {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(3),
            "the daemon still holds the killed app's vsocket: {st}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!("daemon released the killed app's vsocket after {:?}", killed.elapsed());
    // The peer sees the end of the stream (FIN after what was written) or a reset.
    let (_, out) = drain.finish("drain app");
    assert!(out.contains("eof ") || out.contains("error "), "{out}");
}

#[test]
fn a_killed_daemon_fails_its_apps_and_a_restarted_one_serves() {
    let (_d, mut da, db) = pair("daemonkill");
    let port = 7300;
    let mut drain = app("drain", db.sock(), &[("NC_APP_PORT", port.to_string())]);
    drain.wait_line("listening");
    let mut reader = app("reader", da.sock(), &[("NC_APP_TARGET", target(&db, port))]);
    reader.wait_line("reading");
    std::thread::sleep(Duration::from_millis(100));
    da.kill();
    let (_, out) = reader.finish("reader app");
    for call in ["read", "write", "connect"] {
        let line = out.lines().find(|l| l.starts_with(call)).unwrap_or_default();
        assert!(
            line.starts_with(&format!("{call} error ConnectionReset")) && line.contains("daemon"),
            "{call} after the daemon died: {line:?}\n{out}"
        );
    }
    // The peer daemon sees every channel go down: its app gets a reset.
    let (_, out) = drain.finish("drain app");
    assert!(out.contains("error ") || out.contains("eof "), "{out}");
    // A restarted daemon on the same socket serves new apps.
    da.spawn();
    let port = 7301;
    let mut server =
        app("server", db.sock(), &[("NC_APP_PORT", port.to_string()), ("NC_APP_STREAMS", "1".into())]);
    server.wait_line("listening");
    let client = client_app(&da, &db, port, 1, 1 << 20, 5);
    assert!(finish_ok(client, "client after restart").contains("sent 1048576"));
    server.finish("server app");
}

#[test]
fn another_user_is_refused_with_a_reason() {
    let d = dir("cred");
    let (a, _) = addr_pair();
    let da = Daemon::start(&d.0, "a", a, "allowed_uids = [4242]");
    let status = |uid: u32| {
        let mut cmd = netchannel(&["status", "--socket", da.sock()]);
        cmd.uid(uid).gid(uid);
        finish(cmd.spawn().unwrap(), "status as another user")
    };
    let out = status(4243);
    assert!(!out.status.success(), "uid 4243 must be refused");
    assert!(out.stderr.contains("uid 4243") && out.stderr.contains("may not use"), "{}", out.stderr);
    let out = status(4242);
    assert!(out.status.success(), "uid 4242 is allowed: {}", out.stderr);
    let st = da.status();
    assert_eq!(st["totals"]["clients_refused"], 1, "{st}");
    let e = match UnixStream::connect(&da.socket) {
        Ok(s) => s.shutdown(Shutdown::Both).err(),
        Err(e) => Some(e),
    };
    assert!(e.is_none_or(|e| e.kind() != ErrorKind::PermissionDenied));
}

#[test]
fn a_channel_killed_through_the_daemon_loses_no_byte() {
    let (_d, da, db) = pair("fault");
    let port = 7500;
    let mut server =
        app("server", db.sock(), &[("NC_APP_PORT", port.to_string()), ("NC_APP_STREAMS", "2".into())]);
    server.wait_line("listening");
    let bytes: u64 = 48 << 20;
    let client = client_app(&da, &db, port, 2, bytes, 77);
    // Wait until data flows, then kill channel 1 to the peer.
    let deadline = Instant::now() + Duration::from_secs(20);
    while da.status()["totals"]["bytes_sent"].as_u64().unwrap() < (1 << 20) {
        assert!(Instant::now() < deadline, "no data flowed");
        std::thread::sleep(Duration::from_millis(5));
    }
    let peer = db.addr.to_string();
    let out = finish(
        netchannel(&["fault", "kill-channel", "--peer", &peer, "--index", "1", "--socket", da.sock()])
            .spawn()
            .unwrap(),
        "fault kill-channel",
    );
    assert!(out.status.success(), "{}", out.stderr);
    assert!(out.stderr.contains("killed throughput channel 1"), "{}", out.stderr);
    assert!(finish_ok(client, "client app").contains(&format!("sent {}", 2 * bytes)));
    assert!(server.finish("server app").1.contains(&format!("verified {}", 2 * bytes)));
    // A channel that does not exist is named in the error.
    let out = finish(
        netchannel(&["fault", "kill-channel", "--peer", "127.0.0.9:1", "--socket", da.sock()])
            .spawn()
            .unwrap(),
        "fault kill-channel (no such peer)",
    );
    assert!(!out.status.success());
    assert!(out.stderr.contains("no throughput channel 0 to 127.0.0.9:1"), "{}", out.stderr);
}

/// One request on a fresh control connection, raw; the answer's JSON.
fn raw_request(socket: &Path, body: &str) -> Value {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&(body.len() as u32).to_be_bytes()).unwrap();
    s.write_all(body.as_bytes()).unwrap();
    let mut len = [0u8; 4];
    s.read_exact(&mut len).unwrap();
    let mut buf = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut buf).unwrap();
    serde_json::from_slice(&buf).unwrap()
}

#[test]
fn another_process_cannot_use_or_close_a_listener() {
    let (_d, _da, db) = pair("owner");
    let mut server =
        app("server", db.sock(), &[("NC_APP_PORT", "7600".into()), ("NC_APP_STREAMS", "1".into())]);
    server.wait_line("listening");
    let st = db.status();
    let l = st["listeners"].as_array().unwrap().iter().find(|l| l["pid"] == server.pid() as u64).cloned();
    let id = l.unwrap_or_else(|| panic!("the app's listener is listed with its pid: {st}"))["id"]
        .as_u64()
        .unwrap();
    for op in
        ["{\"op\":\"accept\",\"listener\":ID,\"wait\":false}", "{\"op\":\"close_listener\",\"listener\":ID}"]
    {
        let answer = raw_request(&db.socket, &op.replace("ID", &id.to_string()));
        assert_eq!(answer["r"], "error", "{op}: {answer}");
        assert_eq!(answer["kind"], "permission_denied", "{op}: {answer}");
        assert!(answer["message"].as_str().unwrap().contains("belongs to process"), "{answer}");
    }
    // Still listening: the owner's listener was not closed.
    let st = db.status();
    assert!(st["listeners"].as_array().unwrap().iter().any(|l| l["id"] == id), "{st}");
}

#[test]
fn clear_errors_without_a_daemon_and_for_a_second_one() {
    let d = dir("errors");
    let socket = d.0.join("none.sock");
    let out =
        finish(netchannel(&["status", "--socket", socket.to_str().unwrap()]).spawn().unwrap(), "status");
    assert!(!out.status.success());
    assert!(
        out.stderr.contains("cannot reach the NetChannel daemon at") && out.stderr.contains("netchannel up"),
        "{}",
        out.stderr
    );
    let (a, b) = addr_pair();
    let da = Daemon::start(&d.0, "a", a, "");
    // A second daemon on the same socket (another channel address) refuses to start.
    let cfg = d.0.join("second.toml");
    std::fs::write(&cfg, format!("listen = \"{b}\"\n[daemon]\nsocket = \"{}\"\n", da.socket.display()))
        .unwrap();
    let out = finish(netchannel(&["up", "--config", cfg.to_str().unwrap()]).spawn().unwrap(), "second up");
    assert!(!out.status.success());
    assert!(out.stderr.contains("already serves"), "{}", out.stderr);
    // The first one still serves.
    assert!(da.status()["daemon"]["pid"].is_u64());
    // A bad key in the daemon's table is named.
    std::fs::write(&cfg, "[daemon]\nallowed_uids = [\"root\"]\n").unwrap();
    let out = finish(netchannel(&["up", "--config", cfg.to_str().unwrap()]).spawn().unwrap(), "bad config");
    assert!(!out.status.success());
    assert!(out.stderr.contains("allowed_uids"), "{}", out.stderr);
}
