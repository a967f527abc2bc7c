//! The library emits `tracing` events and never prints on its own: a program that embeds it
//! without installing a subscriber prints nothing on stderr, even when the engine has
//! something to warn about and `NETCHANNEL_LOG` asks for everything.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use netchannel::{Config, Host};

/// The embedding program (run by the test below in its own process): a host that is sent
/// garbage on its channel port, which the engine refuses with a warning event.
#[test]
#[ignore = "run as a child process by embedded_without_a_subscriber_prints_nothing"]
fn quiet_app_main() {
    let (a, _) = common::addr_pair();
    let host = Host::start(Config { listen: a, ..Config::default() }).expect("start host");
    let mut s = TcpStream::connect(host.local_addr()).expect("connect to the channel port");
    s.write_all(&[0xde; 64]).expect("write garbage");
    let deadline = Instant::now() + Duration::from_secs(10);
    while host.stats().channels_refused == 0 {
        assert!(Instant::now() < deadline, "the garbage channel was not refused");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn embedded_without_a_subscriber_prints_nothing() {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "quiet_app_main", "--ignored", "--nocapture", "--test-threads", "1"])
        .env("NETCHANNEL_LOG", "trace")
        .env("RUST_LOG", "trace")
        .stdin(Stdio::null())
        .output()
        .expect("run the embedding program");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stdout.contains("1 passed"), "the app failed: {stdout}\n{stderr}");
    assert!(stderr.is_empty(), "the library printed on its own: {stderr:?}");
}
