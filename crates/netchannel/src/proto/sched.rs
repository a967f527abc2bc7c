//! The NetDriver's channel scheduler (sans-IO): which channel carries the next segment.
//!
//! The channel is chosen per segment. `round-robin` spreads consecutive segments over every
//! channel of the class whose queue is below its cap, so one vsocket uses every channel;
//! `hash` pins a vsocket to one channel (the next live one if that channel is down). A
//! channel whose queue of unsent bytes is at the cap is skipped; if none qualifies the
//! segment waits (the caller parks the vsocket until a channel drains).

use std::collections::VecDeque;

use crate::config::Policy;

/// The load of one channel as the scheduler sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Load {
    /// Unsent bytes queued on a live channel.
    Queued(usize),
    /// The channel is down: never chosen.
    Down,
}

/// Pick a channel index among `loads` for the next segment of vsocket `vsock`.
///
/// `cursor` is the round-robin position shared by every vsocket of the peer and class; it is
/// advanced past the chosen channel. `cap` is the per-channel queue cap in bytes.
pub fn pick(policy: Policy, cursor: &mut usize, vsock: u32, loads: &[Load], cap: usize) -> Option<usize> {
    pick_with(policy, cursor, vsock, loads.len(), |i| loads[i], cap)
}

/// [`pick`] over `n` channels whose loads `load(i)` reads on demand (no allocation: this
/// runs once per segment).
pub fn pick_with(
    policy: Policy,
    cursor: &mut usize,
    vsock: u32,
    n: usize,
    load: impl Fn(usize) -> Load,
    cap: usize,
) -> Option<usize> {
    if n == 0 {
        return None;
    }
    let fits = |i: usize| matches!(load(i), Load::Queued(q) if q < cap);
    match policy {
        Policy::RoundRobin => {
            let start = *cursor % n;
            let i = (0..n).map(|k| (start + k) % n).find(|&i| fits(i))?;
            *cursor = i + 1;
            Some(i)
        }
        Policy::Hash => {
            // Fibonacci hashing spreads consecutive ids.
            let home = ((vsock as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize % n;
            // The first live channel from home on; the vsocket waits if it is full.
            let i = (0..n).map(|k| (home + k) % n).find(|&i| load(i) != Load::Down)?;
            fits(i).then_some(i)
        }
    }
}

/// What leaves a channel's queue next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next<C, S> {
    /// A control frame (CREDIT, OPEN, FIN, RESET…).
    Control(C),
    /// A DATA segment.
    Segment(S),
}

/// A channel's queue of frames waiting to be written. Control frames always leave before
/// queued segments, so credit, open and close never wait behind bulk in our own queue; each
/// kind leaves in the order it came.
#[derive(Debug, Clone)]
pub struct FrameQueue<C, S> {
    control: VecDeque<C>,
    segments: VecDeque<S>,
}

impl<C, S> Default for FrameQueue<C, S> {
    fn default() -> Self {
        FrameQueue { control: VecDeque::new(), segments: VecDeque::new() }
    }
}

impl<C, S> FrameQueue<C, S> {
    /// Queue a control frame.
    pub fn push_control(&mut self, c: C) {
        self.control.push_back(c);
    }

    /// Queue a segment.
    pub fn push_segment(&mut self, s: S) {
        self.segments.push_back(s);
    }

    /// The next frame to write: the oldest control frame, else the oldest segment.
    pub fn pop(&mut self) -> Option<Next<C, S>> {
        match self.control.pop_front() {
            Some(c) => Some(Next::Control(c)),
            None => self.segments.pop_front().map(Next::Segment),
        }
    }

    /// Nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.control.is_empty() && self.segments.is_empty()
    }

    /// Drop everything queued.
    pub fn clear(&mut self) {
        self.control.clear();
        self.segments.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Load::*;

    #[test]
    fn round_robin_spreads_and_skips_full_and_down() {
        let mut c = 0;
        let loads = [Queued(0), Queued(0), Queued(0)];
        let picks: Vec<_> =
            (0..6).map(|_| pick(Policy::RoundRobin, &mut c, 7, &loads, 100).unwrap()).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        let loads = [Queued(100), Down, Queued(5)];
        let mut c = 0;
        assert_eq!(pick(Policy::RoundRobin, &mut c, 7, &loads, 100), Some(2));
        assert_eq!(pick(Policy::RoundRobin, &mut c, 7, &loads, 100), Some(2));
        let loads = [Queued(100), Down, Queued(100)];
        assert_eq!(pick(Policy::RoundRobin, &mut c, 7, &loads, 100), None);
        assert_eq!(pick(Policy::RoundRobin, &mut c, 7, &[], 100), None);
    }

    #[test]
    fn control_frames_overtake_queued_segments() {
        let mut q: FrameQueue<&str, u32> = FrameQueue::default();
        for s in 0..100 {
            q.push_segment(s);
        }
        q.push_control("credit");
        q.push_segment(100);
        q.push_control("fin");
        assert_eq!(q.pop(), Some(Next::Control("credit")));
        assert_eq!(q.pop(), Some(Next::Control("fin")));
        for s in 0..=100 {
            assert_eq!(q.pop(), Some(Next::Segment(s)), "segments keep their order");
        }
        assert_eq!(q.pop(), None);
        assert!(q.is_empty());
    }

    #[test]
    fn hash_pins_a_vsocket() {
        let loads = [Queued(0); 4];
        let mut c = 0;
        for v in 1..50u32 {
            let first = pick(Policy::Hash, &mut c, v, &loads, 100).unwrap();
            for _ in 0..5 {
                assert_eq!(pick(Policy::Hash, &mut c, v, &loads, 100), Some(first));
            }
        }
        // Different vsockets land on different channels.
        let homes: std::collections::HashSet<_> =
            (1..50u32).map(|v| pick(Policy::Hash, &mut c, v, &loads, 100).unwrap()).collect();
        assert_eq!(homes.len(), 4);
    }

    #[test]
    fn hash_waits_when_home_full_and_moves_when_down() {
        let mut c = 0;
        let v = 3;
        let home = pick(Policy::Hash, &mut c, v, &[Queued(0); 4], 100).unwrap();
        let mut loads = [Queued(0); 4];
        loads[home] = Queued(100);
        assert_eq!(pick(Policy::Hash, &mut c, v, &loads, 100), None);
        loads[home] = Down;
        let moved = pick(Policy::Hash, &mut c, v, &loads, 100).unwrap();
        assert_eq!(moved, (home + 1) % 4);
    }
}
