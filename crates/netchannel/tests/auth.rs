//! Channel authentication with a pre-shared key: hosts with the same key talk; a host with
//! another key, or without one, is refused with an error that says so, and the refusing host
//! counts it.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::path::PathBuf;

use common::{at, two_hosts_with, within};
use netchannel::Config;

fn key_file(name: &str, key: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("netchannel-auth-{}-{name}", std::process::id()));
    std::fs::write(&p, format!("{key}\n")).unwrap();
    p
}

fn with_key(path: Option<PathBuf>) -> impl Fn(&mut Config) {
    move |c: &mut Config| c.auth_key_file = path.clone()
}

#[test]
fn hosts_with_the_same_key_talk() {
    within(60, || {
        let k = key_file("same", "correct horse battery staple");
        let (a, b) = two_hosts_with(with_key(Some(k.clone())), with_key(Some(k)));
        let l = b.bind(7100).unwrap();
        let mut c = a.connect(at(&b, 7100)).unwrap();
        let (mut s, _) = l.accept().unwrap();
        c.write_all(b"authenticated").unwrap();
        let mut got = [0u8; 13];
        s.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"authenticated");
        assert_eq!(b.stats().channels_refused, 0);
    });
}

#[test]
fn a_host_with_another_key_is_refused() {
    within(60, || {
        let ka = key_file("a", "the key of host A, long enough");
        let kb = key_file("b", "the key of host B, long enough");
        let (a, b) = two_hosts_with(with_key(Some(ka)), with_key(Some(kb)));
        let _l = b.bind(7200).unwrap();
        let e = a.connect(at(&b, 7200)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
        assert!(e.to_string().contains("key"), "{e}");
        assert!(e.to_string().contains(&b.local_addr().ip().to_string()), "names the peer: {e}");
    });
}

#[test]
fn a_host_without_a_key_is_refused_by_one_that_requires_it() {
    within(60, || {
        let kb = key_file("only-b", "only B has a key here, 16+ bytes");
        let (a, b) = two_hosts_with(with_key(None), with_key(Some(kb)));
        let _l = b.bind(7300).unwrap();
        let e = a.connect(at(&b, 7300)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
        assert!(e.to_string().contains("auth"), "{e}");
        assert!(b.stats().channels_refused >= 1, "the refusing host counts it");
    });
}

#[test]
fn a_host_with_a_key_refuses_a_peer_that_does_not_authenticate() {
    within(60, || {
        let ka = key_file("only-a", "only A has a key here, 16+ bytes");
        let (a, b) = two_hosts_with(with_key(Some(ka)), with_key(None));
        let _l = b.bind(7400).unwrap();
        let e = a.connect(at(&b, 7400)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
        assert!(e.to_string().contains("does not authenticate"), "{e}");
    });
}

#[test]
fn a_short_or_missing_key_file_fails_at_start_naming_the_key() {
    let short = key_file("short", "too short");
    let c = Config { auth_key_file: Some(short), ..Config::default() };
    let e = netchannel::Host::start(c).unwrap_err();
    assert!(e.to_string().contains("auth_key_file"), "{e}");
    let c = Config { auth_key_file: Some("/nonexistent/key".into()), ..Config::default() };
    let e = netchannel::Host::start(c).unwrap_err();
    assert!(e.to_string().contains("auth_key_file") && e.to_string().contains("/nonexistent/key"), "{e}");
}
