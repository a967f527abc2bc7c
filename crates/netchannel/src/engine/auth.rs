//! Channel authentication with a pre-shared key: the proofs exchanged in the channel
//! handshake (HELLO / HELLO_OK / AUTH / AUTH_OK, see `crate::wire`). The key never crosses
//! the wire; each side proves it holds the key by a keyed hash (HMAC-SHA256) over both
//! sides' fresh nonces, so a recorded handshake cannot be replayed.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::wire::AUTH_PROOF_LEN;

/// Label of the accepting host's proof.
const ACCEPTOR: &[u8] = b"netchannel acceptor";
/// Label of the dialing host's proof.
const DIALER: &[u8] = b"netchannel dialer";

/// The shortest key accepted, in bytes.
pub const MIN_KEY_LEN: usize = 16;

fn mac(key: &[u8], label: &[u8], first: &[u8; 16], second: &[u8; 16]) -> Hmac<Sha256> {
    let mut m = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    m.update(label);
    m.update(first);
    m.update(second);
    m
}

/// The accepting host's proof over the dialer's nonce `nd` and its own `na`.
pub fn acceptor_proof(key: &[u8], nd: &[u8; 16], na: &[u8; 16]) -> [u8; AUTH_PROOF_LEN] {
    mac(key, ACCEPTOR, nd, na).finalize().into_bytes().into()
}

/// The dialing host's proof over the acceptor's nonce `na` and its own `nd`.
pub fn dialer_proof(key: &[u8], na: &[u8; 16], nd: &[u8; 16]) -> [u8; AUTH_PROOF_LEN] {
    mac(key, DIALER, na, nd).finalize().into_bytes().into()
}

/// Check an acceptor's proof in constant time.
pub fn check_acceptor(key: &[u8], nd: &[u8; 16], na: &[u8; 16], proof: &[u8]) -> bool {
    mac(key, ACCEPTOR, nd, na).verify_slice(proof).is_ok()
}

/// Check a dialer's proof in constant time.
pub fn check_dialer(key: &[u8], na: &[u8; 16], nd: &[u8; 16], proof: &[u8]) -> bool {
    mac(key, DIALER, na, nd).verify_slice(proof).is_ok()
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

    #[test]
    fn proofs_check_only_with_the_same_key_and_nonces() {
        let (nd, na) = ([1u8; 16], [2u8; 16]);
        let key = b"0123456789abcdef-secret";
        let p = acceptor_proof(key, &nd, &na);
        assert!(check_acceptor(key, &nd, &na, &p));
        assert!(!check_acceptor(b"another key of 16+ bytes", &nd, &na, &p));
        assert!(!check_acceptor(key, &na, &nd, &p), "nonces are not interchangeable");
        let d = dialer_proof(key, &na, &nd);
        assert_ne!(d, p, "the two roles' proofs differ, so one cannot be reflected as the other");
        assert!(check_dialer(key, &na, &nd, &d));
        assert!(!check_dialer(key, &na, &nd, &p));
        assert!(!check_dialer(key, &na, &nd, &[0u8; 32]));
    }
}
