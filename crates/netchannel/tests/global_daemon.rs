//! `deployment = "daemon"` in the file named by `NETCHANNEL_CONFIG`: `VStream::connect` and
//! `VListener::bind` go through the host's daemon instead of an engine in the process. Its
//! own test binary: the choice is process state.

mod common;

use std::io::{Read, Write};

use common::{addr_pair, within};
use netchannel::daemon::{Client, Server};
use netchannel::{Config, VListener, VStream};

#[test]
fn configuration_chooses_the_daemon() {
    within(60, || {
        let (a, b) = addr_pair();
        let dir = std::env::temp_dir().join(format!("netchannel-global-daemon-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let start = |listen, name: &str| {
            let mut cfg = Config { listen, ..Config::default() };
            cfg.daemon.socket = Some(dir.join(name));
            let server = Server::start(cfg).unwrap();
            let stop = server.stopper();
            std::thread::spawn(move || server.run());
            stop
        };
        let _sa = start(a, "a.sock");
        let _sb = start(b, "b.sock");
        let file = dir.join("app.toml");
        std::fs::write(
            &file,
            format!("deployment = \"daemon\"\n[daemon]\nsocket = \"{}\"\n", dir.join("a.sock").display()),
        )
        .unwrap();
        // SAFETY (of the env mutation): this test binary has this one test, set before any thread reads it.
        unsafe { std::env::set_var("NETCHANNEL_CONFIG", &file) };

        let peer = Client::connect(dir.join("b.sock")).unwrap();
        let l = peer.bind(7600).unwrap();
        let mut s = VStream::connect((b.ip(), 7600)).unwrap();
        assert!(s.is_daemon(), "VStream::connect used the daemon");
        let (mut t, _) = l.accept().unwrap();
        s.write_all(b"through the host's daemon").unwrap();
        let mut got = [0u8; 25];
        t.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"through the host's daemon");

        let gl = VListener::bind(("0.0.0.0", 7601)).unwrap();
        let mut u = peer.connect_stream(std::net::SocketAddr::new(a.ip(), 7601)).unwrap();
        let (mut v, _) = gl.accept().unwrap();
        assert!(v.is_daemon());
        u.write_all(b"y").unwrap();
        let mut one = [0u8; 1];
        v.read_exact(&mut one).unwrap();
        assert_eq!(&one, b"y");
        // The daemon lists the process's vsockets with its pid.
        let st = Client::connect(dir.join("a.sock")).unwrap().status().unwrap();
        let pid = std::process::id() as u64;
        assert!(st["vsockets"].as_array().unwrap().iter().filter(|v| v["pid"] == pid).count() >= 2, "{st}");
        let _ = std::fs::remove_dir_all(&dir);
    });
}
