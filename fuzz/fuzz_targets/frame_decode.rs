//! Fuzz target: the frame decoder (`netchannel::wire`) on arbitrary bytes, read as a
//! channel reads them: frame after frame from one buffer.
//!
//! Invariants: decoding never panics; `Incomplete` asks for more than the buffer holds and
//! never for more than one maximal frame; a decoded frame re-encodes to a frame that decodes
//! to the same value and the same length; the header decoder agrees with the frame decoder.
#![no_main]

use libfuzzer_sys::fuzz_target;
use netchannel::wire::{self, Frame, WireError, HEADER_LEN, MAX_SEGMENT};

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while !rest.is_empty() {
        let header = wire::Header::decode(rest);
        match wire::decode(rest) {
            Ok((frame, used)) => {
                let h = header.expect("a frame decoded but its header did not");
                assert_eq!(used, h.frame_len());
                assert!((HEADER_LEN..=rest.len()).contains(&used));
                let mut buf = Vec::new();
                frame.encode(&mut buf);
                assert_eq!(buf.len(), frame.encoded_len());
                let (again, n) = wire::decode(&buf).expect("an encoded frame decodes");
                assert_eq!(n, buf.len());
                assert_eq!(again, frame);
                if !matches!(frame, Frame::Hello(_) | Frame::HelloOk(_)) {
                    // Every field is significant outside the handshake bodies: exact bytes.
                    assert_eq!(&buf[..], &rest[..used]);
                }
                rest = &rest[used..];
            }
            Err(WireError::Incomplete { needed }) => {
                assert!(needed > rest.len(), "Incomplete with {} bytes for {needed}", rest.len());
                assert!(needed <= HEADER_LEN + MAX_SEGMENT);
                break;
            }
            Err(e) => {
                // A channel closes on a malformed frame; here, skip a byte and go on so the
                // rest of the input is exercised too. The error must render.
                let _ = e.to_string();
                rest = &rest[1..];
            }
        }
    }
});
