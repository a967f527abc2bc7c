//! The process-wide host behind `VStream::connect` / `VListener::bind`, configured by the
//! file named in `NETCHANNEL_CONFIG`. Its own test binary: the global host is process state.

mod common;

use std::io::{Read, Write};

use common::{addr_pair, within};
use netchannel::{Config, Host, VListener, VStream};

#[test]
fn the_global_host_starts_once_from_netchannel_config_and_talks() {
    within(60, || {
        let (a, b) = addr_pair();
        let file = std::env::temp_dir().join(format!("netchannel-global-{}.toml", std::process::id()));
        std::fs::write(&file, format!("listen = \"{a}\"\nthroughput_channels = 2\n")).unwrap();
        // SAFETY (of the env mutation): this test binary has this one test, set before any thread reads it.
        unsafe { std::env::set_var("NETCHANNEL_CONFIG", &file) };
        // Many threads asking at once get the same host, started once.
        let addrs: Vec<_> = (0..4)
            .map(|_| std::thread::spawn(|| Host::global().map(|h| h.local_addr())))
            .map(|t| t.join().unwrap().expect("global host"))
            .collect();
        assert!(addrs.iter().all(|x| *x == a), "{addrs:?}");
        assert_eq!(Host::global().unwrap().config().throughput_channels, 2, "the file was read");

        let peer = Host::start(Config { listen: b, ..Config::default() }).unwrap();
        let l = peer.bind(7500).unwrap();
        let mut s = VStream::connect((b.ip(), 7500)).unwrap();
        let (mut t, _) = l.accept().unwrap();
        s.write_all(b"through the global host").unwrap();
        let mut got = [0u8; 23];
        t.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"through the global host");
        // VListener::bind uses the global host too.
        let gl = VListener::bind(("0.0.0.0", 7501)).unwrap();
        assert_eq!(gl.local_addr().unwrap().port(), 7501);
        let mut u = peer.connect(std::net::SocketAddr::new(a.ip(), 7501)).unwrap();
        let (mut v, _) = gl.accept().unwrap();
        u.write_all(b"x").unwrap();
        let mut one = [0u8; 1];
        v.read_exact(&mut one).unwrap();
        assert_eq!(&one, b"x");
    });
}
