//! Reassembly by offset (receiver side of a vsocket).
//!
//! Segments of one vsocket may travel on different channels and arrive in any order, more
//! than once. [`Reassembly`] records which byte ranges of the stream have arrived and tells
//! the caller which parts of a new segment are new, so that the caller writes each stream
//! byte into the receive buffer exactly once. Bytes below the in-order point were delivered
//! already and are discarded.

use std::collections::BTreeMap;

use super::ProtoError;

/// Largest number of disjoint out-of-order ranges kept before the peer is judged abusive.
pub const MAX_RANGES: usize = 4096;

/// Which stream ranges have arrived.
#[derive(Debug, Clone)]
pub struct Reassembly {
    /// Every byte below this offset has arrived.
    in_order: u64,
    /// Out-of-order ranges `start -> end` (end exclusive), disjoint, non-adjacent, all above `in_order`.
    ranges: BTreeMap<u64, u64>,
    /// Highest end offset of any range seen.
    max_end: u64,
}

impl Reassembly {
    /// A stream whose bytes below `start` are already accounted for.
    pub fn new(start: u64) -> Self {
        Reassembly { in_order: start, ranges: BTreeMap::new(), max_end: start }
    }

    /// Every byte below this offset has arrived.
    pub fn in_order(&self) -> u64 {
        self.in_order
    }

    /// Highest stream offset (exclusive) of any byte that has arrived.
    pub fn max_end(&self) -> u64 {
        self.max_end
    }

    /// Number of out-of-order ranges held.
    pub fn pending_ranges(&self) -> usize {
        self.ranges.len()
    }

    /// Whether no byte of `[off, end)` has arrived yet.
    pub fn is_new(&self, off: u64, end: u64) -> bool {
        off >= self.in_order && self.ranges.range(..end).next_back().is_none_or(|(_, &e)| e <= off)
    }

    /// Record `[off, off + len)` as arrived. Calls `new_part(start, end)` for each sub-range
    /// that had not arrived before, in increasing order; the caller copies exactly those bytes.
    pub fn insert(
        &mut self,
        off: u64,
        len: u64,
        mut new_part: impl FnMut(u64, u64),
    ) -> Result<(), ProtoError> {
        let end = off.checked_add(len).ok_or(ProtoError::Overflow { offset: off, len })?;
        let mut start = off.max(self.in_order);
        if start >= end {
            return Ok(()); // wholly a duplicate
        }
        self.max_end = self.max_end.max(end);
        // Walk the existing ranges that overlap or touch [start, end), emitting the gaps and
        // merging everything into one range.
        let mut merged_start = start;
        let mut merged_end = end;
        // A range starting before `start` may overlap it.
        if let Some((&s, &e)) = self.ranges.range(..=start).next_back() {
            if e >= start {
                merged_start = s;
                merged_end = merged_end.max(e);
                start = start.max(e);
                self.ranges.remove(&s);
            }
        }
        while start < end {
            let next = self.ranges.range(start..).next().map(|(&s, &e)| (s, e));
            match next {
                Some((s, e)) if s <= end => {
                    if s > start {
                        new_part(start, s);
                    }
                    merged_end = merged_end.max(e);
                    start = e.max(start);
                    self.ranges.remove(&s);
                }
                _ => {
                    new_part(start, end);
                    start = end;
                }
            }
        }
        // Absorb a range that starts exactly at merged_end (adjacent).
        if let Some(e) = self.ranges.remove(&merged_end) {
            merged_end = e;
        }
        if merged_start <= self.in_order {
            self.in_order = merged_end;
        } else {
            self.ranges.insert(merged_start, merged_end);
            if self.ranges.len() > MAX_RANGES {
                return Err(ProtoError::TooManyGaps);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn deliver(r: &mut Reassembly, seen: &mut [u8], off: u64, len: u64) {
        r.insert(off, len, |s, e| {
            for b in &mut seen[s as usize..e as usize] {
                *b += 1;
            }
        })
        .unwrap();
    }

    #[test]
    fn is_new_sees_arrived_bytes_and_nothing_else() {
        let mut r = Reassembly::new(10);
        r.insert(20, 10, |_, _| {}).unwrap();
        assert!(!r.is_new(5, 12), "below the in-order point");
        assert!(r.is_new(10, 20) && r.is_new(30, 40), "gaps next to the range");
        assert!(!r.is_new(15, 21) && !r.is_new(29, 35) && !r.is_new(22, 25) && !r.is_new(0, 100));
    }

    #[test]
    fn in_order_and_gaps() {
        let mut r = Reassembly::new(0);
        let mut seen = vec![0u8; 100];
        deliver(&mut r, &mut seen, 10, 10);
        assert_eq!(r.in_order(), 0);
        assert_eq!(r.pending_ranges(), 1);
        deliver(&mut r, &mut seen, 30, 10);
        deliver(&mut r, &mut seen, 0, 10);
        assert_eq!(r.in_order(), 20);
        deliver(&mut r, &mut seen, 15, 20); // overlaps both sides
        assert_eq!(r.in_order(), 40);
        assert_eq!(r.pending_ranges(), 0);
        assert!(seen[..40].iter().all(|&b| b == 1));
        deliver(&mut r, &mut seen, 0, 40); // pure duplicate
        assert!(seen[..40].iter().all(|&b| b == 1));
    }

    #[test]
    fn adjacent_ranges_merge() {
        let mut r = Reassembly::new(0);
        let mut seen = vec![0u8; 100];
        deliver(&mut r, &mut seen, 20, 10);
        deliver(&mut r, &mut seen, 10, 10);
        assert_eq!(r.pending_ranges(), 1);
        deliver(&mut r, &mut seen, 30, 5);
        assert_eq!(r.pending_ranges(), 1);
        deliver(&mut r, &mut seen, 0, 10);
        assert_eq!(r.in_order(), 35);
    }

    #[test]
    fn overflow_is_an_error() {
        let mut r = Reassembly::new(0);
        assert!(r.insert(u64::MAX - 1, 10, |_, _| {}).is_err());
    }

    #[test]
    fn too_many_gaps_is_an_error() {
        let mut r = Reassembly::new(0);
        let mut res = Ok(());
        for i in 0..=MAX_RANGES as u64 {
            res = r.insert(10 + 2 * i, 1, |_, _| {});
        }
        assert!(res.is_err());
    }

    proptest! {
        /// Segments in random order, some duplicated and overlapping: every byte is
        /// reported new exactly once and the stream ends fully in order.
        #[test]
        fn random_order_with_duplicates(
            cuts in proptest::collection::vec(1u64..2000, 1..60),
            order_seed in any::<u64>(),
            dups in proptest::collection::vec((0usize..60, 0u64..500, 0u64..3000), 0..30),
        ) {
            let mut segs = Vec::new();
            let mut off = 0u64;
            for c in &cuts {
                segs.push((off, *c));
                off += c;
            }
            let total = off;
            for (i, shift, len) in &dups {
                let (o, l) = segs[i % segs.len()];
                let start = o.saturating_sub(*shift);
                let len = (*len).min(total - start).max(1);
                let _ = l;
                segs.push((start, len));
            }
            // Deterministic shuffle.
            let mut x = order_seed | 1;
            for i in (1..segs.len()).rev() {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                segs.swap(i, (x % (i as u64 + 1)) as usize);
            }
            let mut r = Reassembly::new(0);
            let mut seen = vec![0u8; total as usize];
            for (o, l) in segs {
                deliver(&mut r, &mut seen, o, l);
                // Invariant: everything below in_order has been seen.
                prop_assert!(seen[..r.in_order() as usize].iter().all(|&b| b == 1));
            }
            prop_assert_eq!(r.in_order(), total);
            prop_assert_eq!(r.pending_ranges(), 0);
            prop_assert!(seen.iter().all(|&b| b == 1));
        }
    }
}
