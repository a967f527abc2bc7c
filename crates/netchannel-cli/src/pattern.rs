//! The deterministic byte pattern that every bulk benchmark sends and verifies.
//!
//! The byte at stream offset `o` is `TABLE[o % PERIOD]`, where `TABLE` holds [`PERIOD`]
//! pseudo-random bytes drawn from a fixed seed by splitmix64. `PERIOD` is prime, so the
//! pattern never lines up with power-of-two write sizes, segment sizes or buffer sizes: a
//! segment delivered at the wrong offset, duplicated or dropped is caught by [`check`].
//! [`fill`] and [`check`] work on whole slices of the table (memcpy/memcmp speed), so
//! verification does not limit a multi-GB/s stream, and a sender can write straight out of a
//! [`Source`] without copying at all.

use std::fmt;
use std::sync::OnceLock;

/// Length of the pattern's period in bytes (a prime, just under 1 MiB).
pub const PERIOD: usize = 1_048_573;

/// Seed of the table ("netchann" in ASCII); changing it changes every pattern byte.
const SEED: u64 = 0x6e65_7463_6861_6e6e;

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The pattern table, generated once per process.
fn table() -> &'static [u8] {
    static TABLE: OnceLock<Box<[u8]>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut state = SEED;
        let mut t = Vec::with_capacity(PERIOD + 8);
        while t.len() < PERIOD {
            t.extend_from_slice(&splitmix64(&mut state).to_le_bytes());
        }
        t.truncate(PERIOD);
        t.into_boxed_slice()
    })
}

fn phase(offset: u64) -> usize {
    (offset % PERIOD as u64) as usize
}

/// The pattern byte at absolute stream offset `offset`.
pub fn byte_at(offset: u64) -> u8 {
    table()[phase(offset)]
}

/// Fill `buf` with the pattern bytes of stream offsets `offset..offset + buf.len()`.
pub fn fill(offset: u64, buf: &mut [u8]) {
    let t = table();
    let mut pos = phase(offset);
    let mut done = 0;
    while done < buf.len() {
        let n = (PERIOD - pos).min(buf.len() - done);
        buf[done..done + n].copy_from_slice(&t[pos..pos + n]);
        done += n;
        pos = 0;
    }
}

/// The first byte of a received buffer that differs from the pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mismatch {
    /// Absolute stream offset of the bad byte.
    pub offset: u64,
    /// The pattern byte that belongs there.
    pub expected: u8,
    /// The byte that was received.
    pub got: u8,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "offset {}: expected {:#04x} got {:#04x}", self.offset, self.expected, self.got)
    }
}

/// Check that `buf` holds the pattern bytes of offsets `offset..offset + buf.len()`.
///
/// Compares whole slices (memcmp); only a chunk that differs is scanned byte by byte to find
/// the first bad offset.
pub fn check(offset: u64, buf: &[u8]) -> Result<(), Mismatch> {
    let t = table();
    let mut pos = phase(offset);
    let mut done = 0;
    while done < buf.len() {
        let n = (PERIOD - pos).min(buf.len() - done);
        let got = &buf[done..done + n];
        let want = &t[pos..pos + n];
        if got != want {
            let i =
                got.iter().zip(want).position(|(g, w)| g != w).expect("slices differ, so some byte differs");
            return Err(Mismatch { offset: offset + (done + i) as u64, expected: want[i], got: got[i] });
        }
        done += n;
        pos = 0;
    }
    Ok(())
}

/// A read-only run of pattern bytes from which any `len <= max_len` bytes at any offset can be
/// borrowed without copying: the table repeated to `PERIOD + max_len` bytes.
pub struct Source {
    bytes: Vec<u8>,
    max_len: usize,
}

impl Source {
    /// A source for slices of at most `max_len` bytes (uses `PERIOD + max_len` bytes of memory).
    pub fn new(max_len: usize) -> Source {
        let mut bytes = vec![0u8; PERIOD + max_len];
        fill(0, &mut bytes);
        Source { bytes, max_len }
    }

    /// The pattern bytes of offsets `offset..offset + len`.
    ///
    /// # Panics
    /// If `len` exceeds the `max_len` given to [`Source::new`].
    pub fn slice(&self, offset: u64, len: usize) -> &[u8] {
        assert!(len <= self.max_len, "slice of {len} bytes from a Source of {}", self.max_len);
        let pos = phase(offset);
        &self.bytes[pos..pos + len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_deterministic_and_not_degenerate() {
        let t = table();
        assert_eq!(t.len(), PERIOD);
        // Fixed by the seed: a change here changes what old runs sent.
        let mut state = SEED;
        assert_eq!(&t[..8], &splitmix64(&mut state).to_le_bytes());
        let mut counts = [0usize; 256];
        for &b in t {
            counts[b as usize] += 1;
        }
        let expected = PERIOD / 256;
        for (value, &c) in counts.iter().enumerate() {
            assert!(c > expected / 2 && c < expected * 2, "byte {value} occurs {c} times");
        }
    }

    #[test]
    fn fill_matches_byte_at_across_the_period_boundary() {
        for start in [0u64, 1, PERIOD as u64 - 3, 5 * PERIOD as u64 - 1, 1 << 40] {
            let mut buf = vec![0u8; 2 * PERIOD + 17];
            fill(start, &mut buf);
            for (i, &b) in buf.iter().enumerate().step_by(997) {
                assert_eq!(b, byte_at(start + i as u64), "start {start} index {i}");
            }
            assert_eq!(buf[PERIOD], buf[0]);
            assert_eq!(check(start, &buf), Ok(()));
        }
    }

    #[test]
    fn check_accepts_empty_and_rejects_a_shifted_stream() {
        assert_eq!(check(12345, &[]), Ok(()));
        let mut buf = vec![0u8; 4096];
        fill(1000, &mut buf);
        // The same bytes claimed one offset later: a misplaced segment.
        let e = check(1001, &buf).unwrap_err();
        assert_eq!(e.offset, 1001, "{e}");
    }

    #[test]
    fn check_reports_the_exact_offset_of_a_single_flipped_byte() {
        let mut state = 0x5eed_u64;
        let len = 3 * PERIOD / 2;
        let mut buf = vec![0u8; len];
        for round in 0..40 {
            let start = splitmix64(&mut state) % (1 << 36);
            fill(start, &mut buf);
            // A random position, plus the edges of the buffer and of the period.
            let i = match round {
                0 => 0,
                1 => len - 1,
                2 => PERIOD - phase(start),
                _ => (splitmix64(&mut state) % len as u64) as usize,
            };
            let bit = 1u8 << (splitmix64(&mut state) % 8);
            let good = buf[i];
            buf[i] ^= bit;
            let e = check(start, &buf).unwrap_err();
            assert_eq!(e, Mismatch { offset: start + i as u64, expected: good, got: good ^ bit });
            buf[i] = good;
            assert_eq!(check(start, &buf), Ok(()));
        }
    }

    #[test]
    fn source_slices_equal_fill() {
        let s = Source::new(3 * PERIOD);
        for offset in [0u64, 7, PERIOD as u64 - 1, 10 * PERIOD as u64 + 5] {
            let mut want = vec![0u8; 3 * PERIOD];
            fill(offset, &mut want);
            assert_eq!(s.slice(offset, want.len()), &want[..]);
            assert_eq!(s.slice(offset, 0), &[] as &[u8]);
        }
    }

    #[test]
    #[should_panic(expected = "slice of")]
    fn source_rejects_an_oversized_slice() {
        Source::new(16).slice(0, 17);
    }

    #[test]
    fn mismatch_names_offset_and_bytes() {
        let m = Mismatch { offset: 123456, expected: 0x1f, got: 0 };
        assert_eq!(m.to_string(), "offset 123456: expected 0x1f got 0x00");
    }
}
