//! Channel authentication with a pre-shared key: the proofs exchanged in the channel
//! handshake (HELLO / HELLO_OK / AUTH / AUTH_OK, see `crate::wire`).
//!
//! The key never crosses the wire. Each side proves it holds the key by a keyed hash
//! (HMAC-SHA256) over the whole handshake *transcript* ([`Transcript`]): a role label
//! (acceptor or dialer), the HELLO body as the dialer sent it (version, channel class and
//! index, the dialer's host id, the listen address it claims, its nonce `Nd`), the acceptor's
//! version, host id and nonce `Na` from HELLO_OK, and both ends of the TCP connection the
//! handshake runs on (dialer's address, acceptor's address). So no proof is valid anywhere
//! but in the one handshake, role and connection it was made for: a recorded handshake
//! cannot be replayed (fresh nonces), an acceptor's proof cannot be handed back as an
//! answer to the same host's dial (another role label, other host ids, another connection),
//! and a handshake relayed to a third host fails (other connection addresses). This is the
//! construction of SSH's exchange hash and TLS's Finished messages, without their key
//! exchange: channels carry no encryption, so there is no session key to derive. The
//! `hmac`/`sha2` crates already used here suffice; a Noise handshake (`snow`) would add a
//! Diffie-Hellman exchange whose keys nothing would use.
//!
//! Binding the connection's addresses means authenticated channels do not cross a NAT
//! that rewrites them (both hosts must see the same two addresses).

use std::net::{IpAddr, SocketAddr};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::wire::{Class, Hello, AUTH_PROOF_LEN};

/// First bytes of every proof's input: the construction and its version.
const DOMAIN: &[u8] = b"netchannel channel handshake v2";
/// Role byte of the accepting host's proof (HELLO_OK).
const ACCEPTOR: u8 = 1;
/// Role byte of the dialing host's proof (AUTH).
const DIALER: u8 = 2;

/// Everything both proofs of one handshake cover. Each side fills it from what it sent and
/// received and from its own view of the TCP connection.
#[derive(Debug, Clone, Copy)]
pub struct Transcript {
    /// The dialer's HELLO (its class, index, host id, claimed listen address, nonce `Nd`).
    pub hello: Hello,
    /// The protocol version in the acceptor's HELLO_OK.
    pub acceptor_version: u16,
    /// The accepting host's id, from HELLO_OK.
    pub acceptor_id: u64,
    /// The acceptor's nonce `Na`, from HELLO_OK.
    pub na: [u8; 16],
    /// The dialing end of the TCP connection (IP and port).
    pub dialer: SocketAddr,
    /// The accepting end of the TCP connection (IP and port).
    pub acceptor: SocketAddr,
}

/// An address in a fixed 18-byte form: IPv6 (IPv4-mapped for IPv4) and port, so that both
/// sides write the same bytes whether their sockets see IPv4 or IPv4-mapped IPv6.
fn addr_bytes(a: SocketAddr) -> [u8; 18] {
    let ip = match a.ip().to_canonical() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let mut out = [0u8; 18];
    out[..16].copy_from_slice(&ip.octets());
    out[16..].copy_from_slice(&a.port().to_be_bytes());
    out
}

fn mac(key: &[u8], role: u8, t: &Transcript) -> Hmac<Sha256> {
    let mut m = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    // Every field has a fixed length, so the input parses one way only.
    m.update(DOMAIN);
    m.update(&[role]);
    let mut hello = [0u8; Hello::LEN];
    t.hello.encode(&mut hello);
    m.update(&hello);
    m.update(&[match t.hello.class {
        Class::Throughput => 0,
        Class::Latency => 1,
    }]);
    m.update(&t.acceptor_version.to_be_bytes());
    m.update(&t.acceptor_id.to_be_bytes());
    m.update(&t.na);
    m.update(&addr_bytes(t.dialer));
    m.update(&addr_bytes(t.acceptor));
    m
}

/// The accepting host's proof (sent in HELLO_OK).
pub fn acceptor_proof(key: &[u8], t: &Transcript) -> [u8; AUTH_PROOF_LEN] {
    mac(key, ACCEPTOR, t).finalize().into_bytes().into()
}

/// The dialing host's proof (sent in AUTH).
pub fn dialer_proof(key: &[u8], t: &Transcript) -> [u8; AUTH_PROOF_LEN] {
    mac(key, DIALER, t).finalize().into_bytes().into()
}

/// Check an acceptor's proof in constant time.
pub fn check_acceptor(key: &[u8], t: &Transcript, proof: &[u8]) -> bool {
    mac(key, ACCEPTOR, t).verify_slice(proof).is_ok()
}

/// Check a dialer's proof in constant time.
pub fn check_dialer(key: &[u8], t: &Transcript, proof: &[u8]) -> bool {
    mac(key, DIALER, t).verify_slice(proof).is_ok()
}

/// A fresh random nonce.
pub fn nonce() -> [u8; 16] {
    let mut n = [0u8; 16];
    n[..8].copy_from_slice(&super::random_u64().to_ne_bytes());
    n[8..].copy_from_slice(&super::random_u64().to_ne_bytes());
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transcript() -> Transcript {
        Transcript {
            hello: Hello {
                version: crate::wire::VERSION,
                class: Class::Throughput,
                index: 0,
                host_id: 11,
                listen: "127.0.0.1:9000".parse().unwrap(),
                nonce: [1; 16],
            },
            acceptor_version: crate::wire::VERSION,
            acceptor_id: 22,
            na: [2; 16],
            dialer: "127.0.0.1:40000".parse().unwrap(),
            acceptor: "127.0.0.2:9000".parse().unwrap(),
        }
    }

    #[test]
    fn proofs_check_only_with_the_same_key_and_transcript() {
        let key = b"0123456789abcdef-secret";
        let t = transcript();
        let p = acceptor_proof(key, &t);
        assert!(check_acceptor(key, &t, &p));
        assert!(!check_acceptor(b"another key of 16+ bytes", &t, &p));
        let d = dialer_proof(key, &t);
        assert_ne!(d, p, "the two roles' proofs differ, so one cannot be reflected as the other");
        assert!(check_dialer(key, &t, &d));
        assert!(!check_dialer(key, &t, &p));
        assert!(!check_acceptor(key, &t, &d));
        assert!(!check_dialer(key, &t, &[0u8; 32]));
    }

    #[test]
    fn every_field_of_the_transcript_is_covered() {
        let key = b"0123456789abcdef-secret";
        let t = transcript();
        let p = acceptor_proof(key, &t);
        let mut variants = Vec::new();
        let mut v = t;
        v.hello.nonce = [3; 16];
        variants.push(("Nd", v));
        let mut v = t;
        v.na = [3; 16];
        variants.push(("Na", v));
        let mut v = t;
        std::mem::swap(&mut v.hello.nonce, &mut v.na);
        variants.push(("nonces swapped", v));
        let mut v = t;
        v.hello.host_id = 33;
        variants.push(("dialer id", v));
        let mut v = t;
        v.acceptor_id = 33;
        variants.push(("acceptor id", v));
        let mut v = t;
        std::mem::swap(&mut v.hello.host_id, &mut v.acceptor_id);
        variants.push(("ids swapped", v));
        let mut v = t;
        v.hello.listen = "127.0.0.3:9000".parse().unwrap();
        variants.push(("claimed listen address", v));
        let mut v = t;
        v.hello.class = Class::Latency;
        variants.push(("class", v));
        let mut v = t;
        v.hello.index = 1;
        variants.push(("index", v));
        let mut v = t;
        v.acceptor_version = 9;
        variants.push(("acceptor version", v));
        let mut v = t;
        v.dialer = "127.0.0.3:40000".parse().unwrap();
        variants.push(("dialer address", v));
        let mut v = t;
        v.acceptor = "127.0.0.3:9000".parse().unwrap();
        variants.push(("acceptor address", v));
        let mut v = t;
        std::mem::swap(&mut v.dialer, &mut v.acceptor);
        variants.push(("addresses swapped", v));
        for (what, v) in variants {
            assert!(!check_acceptor(key, &v, &p), "the proof does not cover the {what}");
        }
    }

    #[test]
    fn ipv4_and_ipv4_mapped_addresses_are_the_same_connection() {
        let key = b"0123456789abcdef-secret";
        let t = transcript();
        let mut mapped = t;
        mapped.acceptor = "[::ffff:127.0.0.2]:9000".parse().unwrap();
        assert!(check_acceptor(key, &mapped, &acceptor_proof(key, &t)));
    }
}
