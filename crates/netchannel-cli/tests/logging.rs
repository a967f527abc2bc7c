//! The binary's log subscriber: `netchannel up` logs what it serves (info by default) with
//! timestamps, as text or as JSON lines (`--log-format json`), the library's spans as context
//! (a refused channel names the address it came from), and `NETCHANNEL_LOG` filters it.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::Child;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use serde_json::Value;

use common::{finish, free_tcp_port, netchannel, KillOnDrop, TempDir};

const TIMEOUT: Duration = Duration::from_secs(30);

/// `netchannel up` on a fresh socket and port with `extra` arguments and `log` as
/// NETCHANNEL_LOG; waits for `ready` on stderr, sends garbage to its channel port, waits for
/// `refused`, stops it with SIGINT and returns every stderr line.
fn daemon_log(tag: &str, extra: &[&str], log: &str, ready: &str, refused: &str) -> Vec<String> {
    let dir = TempDir::new(tag);
    std::fs::create_dir_all(&dir.0).unwrap();
    let port = free_tcp_port();
    let listen = format!("127.0.0.1:{port}");
    let config = dir.0.join("up.toml");
    let socket = dir.0.join("up.sock");
    std::fs::write(&config, format!("listen = \"{listen}\"\n[daemon]\nsocket = \"{}\"\n", socket.display()))
        .unwrap();
    let mut args = vec!["up", "--config", config.to_str().unwrap()];
    args.extend_from_slice(extra);
    let mut child = KillOnDrop(Some(netchannel(&args).env("NETCHANNEL_LOG", log).spawn().unwrap()));
    let err = BufReader::new(child.0.as_mut().unwrap().stderr.take().unwrap());
    let (tx, rx) = mpsc::channel();
    let lines = thread::spawn(move || {
        let mut all = Vec::new();
        for line in err.lines().map_while(Result::ok) {
            let _ = tx.send(line.clone());
            all.push(line);
        }
        all
    });
    let wait_for = |what: &str| loop {
        let line = rx.recv_timeout(TIMEOUT).unwrap_or_else(|_| panic!("no line with {what:?} on stderr"));
        if line.contains(what) {
            break;
        }
    };
    wait_for(ready);
    // (`ready` may be printed before the engine listens.)
    let deadline = std::time::Instant::now() + TIMEOUT;
    let mut s = loop {
        match TcpStream::connect(&listen) {
            Ok(s) => break s,
            Err(e) => assert!(std::time::Instant::now() < deadline, "connect to {listen}: {e}"),
        }
        thread::sleep(Duration::from_millis(20));
    };
    s.write_all(&[0xde; 64]).unwrap();
    wait_for(refused);
    let c: Child = child.0.take().unwrap();
    // SAFETY: kill(2) on our own child's pid; no memory is passed.
    unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGINT) };
    let out = finish(c, "netchannel up");
    assert!(out.status.success(), "netchannel up failed: {}", out.status);
    lines.join().unwrap()
}

#[test]
fn up_logs_json_lines_with_the_span_of_a_refused_channel() {
    let lines = daemon_log("log-json", &["--log-format", "json"], "info", "daemon up", "refused a channel");
    let events: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let up = events.iter().find(|e| e["fields"]["message"] == "daemon up").expect("a daemon up event");
    assert_eq!(up["level"], "INFO", "{up}");
    assert!(up["timestamp"].as_str().is_some_and(|t| t.starts_with("20")), "{up}");
    assert!(up["fields"]["apps"].as_str().is_some_and(|a| a.ends_with("up.sock")), "{up}");
    let refused = events
        .iter()
        .find(|e| e["fields"]["message"] == "refused a channel")
        .expect("a refused channel event");
    assert_eq!(refused["level"], "WARN", "{refused}");
    assert_eq!(refused["span"]["name"], "channel", "{refused}");
    assert!(refused["span"]["from"].as_str().is_some_and(|f| f.starts_with("127.0.0.1:")), "{refused}");
    assert!(events.iter().any(|e| e["fields"]["message"] == "daemon stopped"), "{lines:?}");
}

#[test]
fn netchannel_log_filters_the_text_lines() {
    let lines = daemon_log("log-text", &[], "warn", "not authenticated", "refused a channel");
    assert!(lines.iter().all(|l| !l.contains("INFO")), "info lines despite NETCHANNEL_LOG=warn: {lines:?}");
    let refused = lines.iter().find(|l| l.contains("refused a channel")).unwrap();
    assert!(refused.contains(" WARN ") && refused.contains("channel{from=127.0.0.1:"), "{refused}");
    assert!(refused.starts_with("20"), "a timestamp first: {refused}");
}
