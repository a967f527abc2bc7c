//! The NetDriver's channel scheduler (sans-IO): which channel carries the next segment.
//!
//! The channel is chosen per segment. `round-robin` spreads consecutive segments over every
//! channel of the class whose queue is below its cap, so one vsocket uses every channel;
//! `hash` pins a vsocket to one channel (the next live one if that channel is down). A
//! channel whose queue of unsent bytes is at the cap is skipped; if none qualifies the
//! segment waits (the caller parks the vsocket until a channel drains).
//!
//! A vsocket also has a *home* channel ([`home`], by hashing the id of the vsocket's
//! connecting end, so that both hosts agree on it): its control frames (OPEN, OPEN_OK,
//! CREDIT, FIN) and its small segments ([`pick_small`]) go there, so that a short-lived
//! vsocket's frames stay on one channel and are read by one worker, instead of being spread
//! over every channel and woken on every worker.
//!
//! Within a channel, [`FrameQueue`] orders what leaves: control frames, then latency-class
//! segments, then bulk segments; and [`Batch`] caps how many frames and bytes one write
//! takes, which bounds the bulk a latency frame can find already handed to the socket ahead
//! of it.

use std::collections::VecDeque;

use crate::config::Policy;
use crate::wire::Class;

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
        // The first live channel from home on; the vsocket waits if it is full.
        Policy::Hash => pick_small(vsock, n, load, cap),
    }
}

/// The home channel of a vsocket among `n` (`n` > 0): `key` is the id of the vsocket's
/// connecting end. Fibonacci hashing spreads consecutive ids.
pub fn home(key: u32, n: usize) -> usize {
    ((key as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize % n
}

/// The channel for a small segment (or a control frame, with `cap` = `usize::MAX`): the
/// first live channel from the home one on, if its queue is below `cap`; `None` when it is
/// full (the caller then picks as for any segment) or every channel is down.
pub fn pick_small(key: u32, n: usize, load: impl Fn(usize) -> Load, cap: usize) -> Option<usize> {
    if n == 0 {
        return None;
    }
    let h = home(key, n);
    let i = (0..n).map(|k| (h + k) % n).find(|&i| load(i) != Load::Down)?;
    matches!(load(i), Load::Queued(q) if q < cap).then_some(i)
}

/// What leaves a channel's queue next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next<C, S> {
    /// A control frame (CREDIT, OPEN, FIN, RESET…).
    Control(C),
    /// A DATA segment.
    Segment(S),
}

/// The lanes of a channel's queue, in the order they leave: control frames, then segments of
/// latency-class vsockets, then segments of throughput-class (bulk) vsockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// CREDIT, OPEN, FIN, RESET… of either class.
    Control = 0,
    /// DATA of latency-class vsockets.
    Latency = 1,
    /// DATA of throughput-class vsockets.
    Bulk = 2,
}

impl Lane {
    /// The lane of a segment of a vsocket in `class`.
    pub fn of(class: Class) -> Lane {
        match class {
            Class::Latency => Lane::Latency,
            Class::Throughput => Lane::Bulk,
        }
    }
}

/// How much waits in one lane (or one whole queue).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Depth {
    /// Bytes on the wire the queued frames take (headers included).
    pub bytes: usize,
    /// Frames queued.
    pub frames: usize,
}

impl Depth {
    fn add(&mut self, len: usize) {
        self.bytes += len;
        self.frames += 1;
    }

    fn sub(&mut self, len: usize) {
        self.bytes -= len;
        self.frames -= 1;
    }
}

impl std::ops::AddAssign for Depth {
    fn add_assign(&mut self, o: Depth) {
        self.bytes += o.bytes;
        self.frames += o.frames;
    }
}

/// The caps on one batch of frames written to a channel in one syscall.
///
/// A frame is admitted while the batch holds fewer than `max_frames` frames and the batch's
/// bytes stay within `max_bytes`; a frame larger than `max_bytes` is admitted only into an
/// empty batch (it goes alone), so no batch ever exceeds either cap by more than that one
/// frame's own size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batch {
    max_bytes: usize,
    max_frames: usize,
    bytes: usize,
    frames: usize,
}

impl Batch {
    /// An empty batch with these caps (`max_frames` of 0 is taken as 1).
    pub fn new(max_bytes: usize, max_frames: usize) -> Batch {
        Batch { max_bytes, max_frames: max_frames.max(1), bytes: 0, frames: 0 }
    }

    /// Whether a frame of `len` bytes fits.
    pub fn admits(&self, len: usize) -> bool {
        self.frames < self.max_frames && (self.frames == 0 || self.bytes + len <= self.max_bytes)
    }

    fn add(&mut self, len: usize) {
        self.bytes += len;
        self.frames += 1;
    }

    /// Bytes admitted so far.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Frames admitted so far.
    pub fn frames(&self) -> usize {
        self.frames
    }
}

/// A channel's queue of frames waiting to be written, in three [`Lane`]s. Control frames
/// leave first, then latency-class segments, then bulk segments: credit, open and close
/// never wait behind segments, and a latency-class segment never waits behind a bulk one
/// in our own queue (only behind what was already handed to the socket). Each lane keeps
/// the order its frames came in. Every frame is queued with its size on the wire, so the
/// queue knows its depth per lane and can fill a [`Batch`].
#[derive(Debug, Clone)]
pub struct FrameQueue<C, S> {
    control: VecDeque<(C, usize)>,
    /// Latency-class segments, then bulk segments.
    segments: [VecDeque<(S, usize)>; 2],
    depth: [Depth; 3],
}

impl<C, S> Default for FrameQueue<C, S> {
    fn default() -> Self {
        FrameQueue {
            control: VecDeque::new(),
            segments: [VecDeque::new(), VecDeque::new()],
            depth: [Depth::default(); 3],
        }
    }
}

impl<C, S> FrameQueue<C, S> {
    /// Queue a control frame of `len` bytes.
    pub fn push_control(&mut self, c: C, len: usize) {
        self.control.push_back((c, len));
        self.depth[Lane::Control as usize].add(len);
    }

    /// Queue a segment of `len` bytes on the wire of a vsocket in `class`.
    pub fn push_segment(&mut self, s: S, len: usize, class: Class) {
        let lane = Lane::of(class);
        self.segments[lane as usize - 1].push_back((s, len));
        self.depth[lane as usize].add(len);
    }

    /// The lane the next frame leaves from, and its size; `urgent_only` looks at the control
    /// and latency lanes only.
    fn head(&self, urgent_only: bool) -> Option<(Lane, usize)> {
        if let Some((_, len)) = self.control.front() {
            return Some((Lane::Control, *len));
        }
        if let Some((_, len)) = self.segments[0].front() {
            return Some((Lane::Latency, *len));
        }
        match self.segments[1].front() {
            Some((_, len)) if !urgent_only => Some((Lane::Bulk, *len)),
            _ => None,
        }
    }

    fn take(&mut self, lane: Lane) -> Option<Next<C, S>> {
        let next = match lane {
            Lane::Control => self.control.pop_front().map(|(c, len)| (Next::Control(c), len)),
            Lane::Latency | Lane::Bulk => {
                self.segments[lane as usize - 1].pop_front().map(|(s, len)| (Next::Segment(s), len))
            }
        };
        next.map(|(n, len)| {
            self.depth[lane as usize].sub(len);
            n
        })
    }

    /// The next frame to write: the oldest control frame, else the oldest latency segment,
    /// else the oldest bulk segment.
    pub fn pop(&mut self) -> Option<Next<C, S>> {
        let (lane, _) = self.head(false)?;
        self.take(lane)
    }

    /// The next frame, if `batch` admits it (it is then counted in the batch). With
    /// `urgent_only`, bulk segments stay queued.
    pub fn pop_within(&mut self, batch: &mut Batch, urgent_only: bool) -> Option<Next<C, S>> {
        let (lane, len) = self.head(urgent_only)?;
        if !batch.admits(len) {
            return None;
        }
        batch.add(len);
        self.take(lane)
    }

    /// What waits in `lane`.
    pub fn depth(&self, lane: Lane) -> Depth {
        self.depth[lane as usize]
    }

    /// What waits in every lane together.
    pub fn total(&self) -> Depth {
        let mut d = Depth::default();
        for l in self.depth {
            d += l;
        }
        d
    }

    /// Control frames or latency segments are queued.
    pub fn has_urgent(&self) -> bool {
        !self.control.is_empty() || !self.segments[0].is_empty()
    }

    /// Nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.control.is_empty() && self.segments.iter().all(VecDeque::is_empty)
    }

    /// Drop everything queued.
    pub fn clear(&mut self) {
        self.control.clear();
        for s in &mut self.segments {
            s.clear();
        }
        self.depth = [Depth::default(); 3];
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn small_segments_go_home_unless_it_is_full_or_down() {
        let n = 4;
        for key in [1u32, 2, 3, 77, u32::MAX] {
            let h = home(key, n);
            let loads = [Load::Queued(0); 4];
            assert_eq!(pick_small(key, n, |i| loads[i], 100), Some(h));
            // Home is down: the next live one.
            let mut l = loads;
            l[h] = Load::Down;
            assert_eq!(pick_small(key, n, |i| l[i], 100), Some((h + 1) % n));
            // Home is full: none (the caller picks as for bulk).
            let mut l = loads;
            l[h] = Load::Queued(100);
            assert_eq!(pick_small(key, n, |i| l[i], 100), None);
            // Control frames (no cap) stay home however full.
            assert_eq!(pick_small(key, n, |i| l[i], usize::MAX), Some(h));
            assert_eq!(pick_small(key, n, |_| Load::Down, usize::MAX), None);
        }
        assert_eq!(pick_small(1, 0, |_| Load::Queued(0), 100), None);
        // Consecutive ids spread over the channels.
        let homes: std::collections::HashSet<usize> = (1..=16).map(|k| home(k, n)).collect();
        assert_eq!(homes.len(), n);
    }

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
            q.push_segment(s, 1000, Class::Throughput);
        }
        q.push_control("credit", 30);
        q.push_segment(100, 1000, Class::Throughput);
        q.push_control("fin", 20);
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

    #[test]
    fn a_latency_segment_behind_n_bulk_units_leaves_before_them() {
        for n in [1usize, 7, 100, 1000] {
            let mut q: FrameQueue<&str, (char, usize)> = FrameQueue::default();
            for i in 0..n {
                q.push_segment(('b', i), 64 << 10, Class::Throughput);
            }
            q.push_segment(('l', 0), 4096, Class::Latency);
            q.push_control("credit", 40);
            q.push_segment(('l', 1), 4096, Class::Latency);
            assert_eq!(q.pop(), Some(Next::Control("credit")));
            assert_eq!(q.pop(), Some(Next::Segment(('l', 0))), "behind {n} bulk units");
            assert_eq!(q.pop(), Some(Next::Segment(('l', 1))));
            for i in 0..n {
                assert_eq!(q.pop(), Some(Next::Segment(('b', i))), "bulk keeps its order");
            }
            assert!(q.is_empty());
        }
    }

    #[test]
    fn a_latency_segment_waits_behind_at_most_one_batch_of_bulk() {
        // The writer took a batch of bulk; a latency segment queued now leads the next batch.
        let (cap, frames) = (256 << 10, 256);
        let mut q: FrameQueue<(), (char, usize)> = FrameQueue::default();
        for i in 0..100 {
            q.push_segment(('b', i), (64 << 10) + 32, Class::Throughput);
        }
        let mut first = Batch::new(cap, frames);
        while q.pop_within(&mut first, false).is_some() {}
        assert!(first.bytes() <= cap && first.frames() > 0);
        q.push_segment(('l', 0), 4096 + 32, Class::Latency);
        let mut second = Batch::new(cap, frames);
        assert_eq!(q.pop_within(&mut second, false), Some(Next::Segment(('l', 0))));
    }

    #[test]
    fn batches_never_exceed_their_caps() {
        // A deterministic mix of frame sizes and lanes, drained batch by batch under many caps.
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut rand = move |m: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % m as u64) as usize
        };
        for (max_bytes, max_frames) in [(4096, 1), (16 << 10, 4), (256 << 10, 256), (64 << 10, 1000), (1, 8)]
        {
            let mut q: FrameQueue<usize, usize> = FrameQueue::default();
            let mut sizes = Vec::new();
            for i in 0..2000 {
                let len = 16 + rand(70_000);
                sizes.push(len);
                match rand(3) {
                    0 => q.push_control(i, len),
                    1 => q.push_segment(i, len, Class::Latency),
                    _ => q.push_segment(i, len, Class::Throughput),
                }
            }
            let mut seen = 0;
            while !q.is_empty() {
                let mut b = Batch::new(max_bytes, max_frames);
                let mut bytes = 0;
                let mut frames = 0;
                while let Some(n) = q.pop_within(&mut b, false) {
                    let id = match n {
                        Next::Control(i) | Next::Segment(i) => i,
                    };
                    bytes += sizes[id];
                    frames += 1;
                }
                assert!(frames >= 1, "a batch always takes at least one frame");
                assert!(frames <= max_frames);
                assert!(bytes <= max_bytes || frames == 1, "{bytes} > {max_bytes} in {frames} frames");
                assert_eq!((b.bytes(), b.frames()), (bytes, frames));
                seen += frames;
            }
            assert_eq!(seen, 2000);
        }
    }

    #[test]
    fn urgent_batches_leave_bulk_queued_and_depths_add_up() {
        let mut q: FrameQueue<&str, u32> = FrameQueue::default();
        q.push_segment(1, 1000, Class::Throughput);
        q.push_segment(2, 500, Class::Latency);
        q.push_control("open", 50);
        assert_eq!(q.depth(Lane::Bulk), Depth { bytes: 1000, frames: 1 });
        assert_eq!(q.depth(Lane::Latency), Depth { bytes: 500, frames: 1 });
        assert_eq!(q.depth(Lane::Control), Depth { bytes: 50, frames: 1 });
        assert_eq!(q.total(), Depth { bytes: 1550, frames: 3 });
        assert!(q.has_urgent());
        let mut b = Batch::new(1 << 20, 100);
        assert_eq!(q.pop_within(&mut b, true), Some(Next::Control("open")));
        assert_eq!(q.pop_within(&mut b, true), Some(Next::Segment(2)));
        assert_eq!(q.pop_within(&mut b, true), None, "bulk waits for the worker");
        assert!(!q.has_urgent() && !q.is_empty());
        assert_eq!(q.total(), Depth { bytes: 1000, frames: 1 });
        assert_eq!(q.pop_within(&mut b, false), Some(Next::Segment(1)));
        assert_eq!(q.total(), Depth::default());
        q.push_segment(3, 10, Class::Latency);
        q.clear();
        assert!(q.is_empty() && q.total() == Depth::default());
    }
}
