//! Deterministic simulation of one vsocket between two hosts over several channels (tests
//! only), quinn-proto style: the real stream states ([`TxState`]/[`RxState`]), the real
//! scheduler's channel choice ([`sched::pick_with`], [`sched::pick_small`]), the real
//! recovery decision ([`TxState::recover`], [`RxState::recovery_credit`]) and the real
//! tombstones ([`Tombstones`]), driven by a seeded PRNG through everything the network does
//! to them: segments reordered across channels, channels that stall, die (one, several,
//! all; during OPEN, mid-stream, during FIN) with the frames in flight on them, and come
//! back, and an outage longer than the peer-down timeout.
//!
//! End 0 opens the vsocket as `Host::connect` does when the port is announced: its OPEN
//! carries the first bytes written (within the acceptor's open credit), nothing else leaves
//! until OPEN_OK, and while it waits every recovery sends the same OPEN again
//! (`VSock::reopen_if_connecting`). End 1 has no vsocket until an OPEN arrives
//! (`HostInner::on_open`): it answers a copy for its live vsocket with OPEN_OK again, and a
//! copy that arrives after its vsocket left the table is found among the tombstones
//! ([`Tombstones::answer_open`]) and opens nothing.
//!
//! Each end mirrors what the engine does with these states (`vsock.rs`: `pump`, `on_data`
//! with claims and deferred segments, `on_credit`, `on_fin` holding the FIN's
//! acknowledgement for its own FIN, `recover`, `close` and retirement; `engine/recovery.rs`:
//! recover at once while a channel is left, on the next channel up otherwise, give the peer
//! up after the timeout). A channel is a TCP connection: reliable and ordered while it lives;
//! its death loses what its sender queued or wrote and the peer did not read, and each end
//! learns of it on its own time, meanwhile writing into the void.
//!
//! Asserted for every seed: one OPEN opens one vsocket, however many copies arrive; every
//! byte arrives exactly once, in order, with the content the writer wrote; no segment goes
//! past the credit the receiver granted; no frame but OPEN reaches the acceptor before its
//! vsocket exists; no protocol error;
//! both ends end (EOF read, every byte and the FIN acknowledged, the vsocket retired), or,
//! only where every channel stayed down past the timeout, fail with a typed reason; nothing
//! is left pending. A failing seed is printed with the call that replays it alone.

use std::collections::VecDeque;

use super::sched::{self, Load};
use super::stream::{Credit, RxState, Segment, TxState};
use super::tombs::{Stale, Tomb, Tombstones};
use crate::config::Policy;
use crate::wire::Frame;

/// splitmix64: a tiny seeded PRNG, the same sequence on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// In `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `p` in thousandths.
    fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}

/// The byte at `offset` of the stream written by end `from` under `seed`.
fn pattern(seed: u64, from: usize, offset: u64) -> u8 {
    let x = (offset ^ seed.rotate_left(17) ^ ((from as u64) << 61)).wrapping_mul(0x2545_F491_4F6C_DD1D);
    (x >> 56) as u8
}

/// A frame as it travels on a channel (DATA with its payload copied from the send ring
/// when written, as the engine's `writev` does).
#[derive(Debug, Clone)]
enum Msg {
    /// An OPEN with the stream's first bytes (from offset 0).
    Open(Vec<u8>),
    OpenOk,
    Data {
        offset: u64,
        payload: Vec<u8>,
        ack_request: bool,
    },
    Credit(Credit),
    Fin(u64),
    Reset,
}

/// A frame in a channel's queue, not yet written (a segment is a reference into the send
/// ring, clipped to what is still unacknowledged when written, as `VSock::segment_view` does).
#[derive(Debug, Clone)]
enum Queued {
    Segment(Segment),
    Control(Msg),
}

/// A DATA segment one end's channel reader claimed and is reading straight into the
/// receive ring (the engine's direct read): it completes with the next read of that
/// channel, or is released when the channel dies.
#[derive(Debug, Clone)]
struct Direct {
    offset: u64,
    payload: Vec<u8>,
    ack_request: bool,
}

/// One channel: a TCP connection between the two ends.
#[derive(Debug, Default)]
struct Chan {
    /// The connection exists.
    alive: bool,
    /// End `i` uses the channel (it has not yet learnt it died).
    up: [bool; 2],
    /// End `i` learns of the death at this time.
    notice_at: [u64; 2],
    /// Frames end `i` queued, not yet written.
    queue: [VecDeque<Queued>; 2],
    /// Frames end `i` wrote that the other end has not read.
    wire: [VecDeque<Msg>; 2],
    /// Neither written nor read before this time.
    stalled_until: u64,
    /// The direct read in progress at end `i`.
    direct: [Option<Direct>; 2],
}

impl Chan {
    fn queued_bytes(&self, me: usize) -> usize {
        self.queue[me]
            .iter()
            .map(|q| match q {
                Queued::Segment(s) => s.len as usize,
                Queued::Control(_) => 16,
            })
            .sum()
    }
}

/// How one end's vsocket ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Both streams complete, every byte and both FINs acknowledged.
    Clean,
    /// Every channel was down longer than the peer-down timeout: the peer was given up.
    PeerLost,
    /// The peer answered with a RESET (its end gave this vsocket up first).
    Reset,
    /// The acceptor: no OPEN ever arrived (the opener failed first).
    NeverOpened,
}

/// One end: the app, its vsocket's states and rings, its view of the channels.
struct End {
    me: usize,
    tx: TxState,
    rx: RxState,
    send_ring: Vec<u8>,
    recv_ring: Vec<u8>,
    seg_size: u32,
    /// Bytes the app writes in all.
    total: u64,
    /// How often each byte of the peer's stream was written into the receive ring.
    arrivals: Vec<u8>,
    /// Segments that arrived over a claimed range, taken in when no claim overlaps them.
    deferred: Vec<(u64, bool, Vec<u8>)>,
    /// The round-robin position of the scheduler.
    cursor: usize,
    /// Every channel went down: recover on the next one up.
    needs_recover: bool,
    down_since: Option<u64>,
    /// The app closed (it read EOF and wrote everything).
    closed: bool,
    /// The vsocket left the table, and how it ended.
    fate: Option<Fate>,
    tombs: Tombstones<u8>,
    /// The opener (end 0) has had no OPEN_OK yet.
    connecting: bool,
    /// The bytes its OPEN carries (0 until the OPEN is sent), for each copy.
    open_payload: Option<u32>,
    /// A copy of the OPEN decided on while connecting, queued at this time whatever has
    /// happened since: the engine's `HostInner::on_channel_up` asks each connecting vsocket
    /// to send its OPEN again from the thread that added the channel, which can be
    /// preempted between the look and the send while the whole exchange runs to its end.
    late_open: Option<u64>,
    /// The acceptor (end 1): an OPEN opened its vsocket.
    opened: bool,
    /// The acceptor's credit for an OPEN's bytes (`open_credit`).
    open_credit: u64,
}

/// The peer-down timeout, in steps.
const TIMEOUT: u64 = 400;
/// The per-channel queue cap of the scheduler, in bytes.
const QUEUE_CAP: usize = 48 << 10;

impl End {
    fn new(me: usize, rng: &mut Rng, peer_rx_cap: u64, own_rx_cap: u64, total: u64, peer_total: u64) -> End {
        let tx_cap = rng.range(512, 24 << 10);
        End {
            me,
            tx: TxState::new(tx_cap, peer_rx_cap),
            rx: RxState::new(own_rx_cap),
            send_ring: vec![0; tx_cap as usize],
            recv_ring: vec![0; own_rx_cap as usize],
            seg_size: rng.range(64, 6000) as u32,
            total,
            arrivals: vec![0; peer_total as usize],
            deferred: Vec::new(),
            cursor: 0,
            needs_recover: false,
            down_since: None,
            closed: false,
            fate: None,
            tombs: Tombstones::new(8),
            connecting: false,
            open_payload: None,
            late_open: None,
            opened: false,
            open_credit: 0,
        }
    }

    fn live(&self) -> bool {
        self.fate.is_none()
    }

    /// The acceptor before an OPEN arrived: no vsocket exists on its host yet.
    fn unopened(&self) -> bool {
        self.me == 1 && !self.opened
    }

    /// The OPEN, carrying the bytes from offset 0 that the first one carried.
    fn open_msg(&self) -> Msg {
        let n = self.open_payload.unwrap_or(0) as usize;
        Msg::Open(self.send_ring[..n].to_vec())
    }

    /// Queue control frames on the vsocket's control channel (`Peer::send_controls`):
    /// dropped if no channel is up, as the engine drops them.
    fn send_controls(&self, chans: &mut [Chan], msgs: Vec<Msg>) {
        let me = self.me;
        let c = sched::pick_small(
            1,
            chans.len(),
            |i| if chans[i].up[me] { Load::Queued(0) } else { Load::Down },
            usize::MAX,
        );
        if let Some(c) = c {
            chans[c].queue[me].extend(msgs.into_iter().map(Queued::Control));
        }
    }

    fn send_credit(&self, chans: &mut [Chan], c: Option<Credit>) {
        if let Some(c) = c {
            self.send_controls(chans, vec![Msg::Credit(c)]);
        }
    }

    /// `VSock::pump`: every segment data and credit allow to a channel, then FIN when due
    /// (with an acknowledgement of the peer's FIN held back for it).
    fn pump(&mut self, chans: &mut [Chan], peer_granted: u64, seed: u64) {
        if !self.live() || self.unopened() {
            return;
        }
        if self.connecting {
            // The OPEN leaves with the first pump, carrying the first segment written (the
            // open credit bounds it); nothing more until OPEN_OK.
            if self.open_payload.is_none() {
                let n = self.tx.next_segment(self.seg_size).map_or(0, |seg| seg.len);
                self.open_payload = Some(n);
                self.send_controls(chans, vec![self.open_msg()]);
            }
            return;
        }
        let me = self.me;
        while let Some(seg) = self.tx.next_segment(self.seg_size) {
            let end = seg.offset + u64::from(seg.len);
            assert!(
                end <= peer_granted,
                "seed {seed}: end {me} sends up to {end}, past the credit {peer_granted} granted"
            );
            let loads: Vec<Load> = chans
                .iter()
                .map(|c| if c.up[me] { Load::Queued(c.queued_bytes(me)) } else { Load::Down })
                .collect();
            match sched::pick(Policy::RoundRobin, &mut self.cursor, 1, &loads, QUEUE_CAP) {
                Some(c) => chans[c].queue[me].push_back(Queued::Segment(seg)),
                None => {
                    self.tx.unsend(seg);
                    break;
                }
            }
        }
        if let Some(offset) = self.tx.take_fin() {
            let held = self.rx.credit_due();
            let msgs = held.map(Msg::Credit).into_iter().chain([Msg::Fin(offset)]).collect();
            self.send_controls(chans, msgs);
        }
    }

    /// `VSock::recover`: what a dead channel may have lost is sent again.
    fn recover(&mut self, chans: &mut [Chan], peer_granted: u64, seed: u64) {
        if !self.live() {
            // `HostInner::recover_vsockets`: the tomb says its last word again.
            let msgs = self.tombs.last_words(&0).into_iter().map(|a| Self::tomb_msg(a.frame, seed)).collect();
            self.send_controls(chans, msgs);
            return;
        }
        if self.unopened() {
            return;
        }
        let again = self.tx.recover();
        assert_eq!(again.resend_from, self.tx.acked());
        assert_eq!(
            self.tx.scheduled(),
            self.tx.acked(),
            "seed {seed}: recovery sends from the acknowledged offset"
        );
        if self.reopen_pending(chans) {
            return;
        }
        self.pump(chans, peer_granted, seed);
        let credit = self.rx.recovery_credit();
        self.send_controls(chans, vec![Msg::Credit(credit)]);
    }

    /// `VSock::reopen_if_connecting`: a connect still waiting sends its OPEN again (the OPEN
    /// or its answer may have been lost). Returns whether it was connecting.
    fn reopen_pending(&self, chans: &mut [Chan]) -> bool {
        if self.connecting && self.open_payload.is_some() {
            self.send_controls(chans, vec![self.open_msg()]);
        }
        self.connecting
    }

    /// A tombstone's frame as it travels.
    fn tomb_msg(frame: Frame<'_>, seed: u64) -> Msg {
        match frame {
            Frame::Credit { received, limit, fin_received, .. } => {
                Msg::Credit(Credit { received, limit, fin_received })
            }
            Frame::Reset { .. } => Msg::Reset,
            other => panic!("seed {seed}: a tombstone answered with {other:?}"),
        }
    }

    /// Copy the new part `[s, e)` of a segment at `offset` into the receive ring.
    fn copy_in(ring: &mut [u8], arrivals: &mut [u8], offset: u64, payload: &[u8], s: u64, e: u64, seed: u64) {
        let cap = ring.len() as u64;
        for o in s..e {
            ring[(o % cap) as usize] = payload[(o - offset) as usize];
            let a = &mut arrivals[o as usize];
            *a += 1;
            assert_eq!(*a, 1, "seed {seed}: byte {o} written into the receive ring twice");
        }
    }

    /// `VSock::on_data`, with the claim a channel reader takes for a direct read.
    fn on_data(
        &mut self,
        chans: &mut [Chan],
        ch: Option<usize>,
        (offset, payload, ack): (u64, Vec<u8>, bool),
        seed: u64,
        rng: &mut Rng,
    ) {
        let len = payload.len() as u64;
        if self.closed {
            assert!(offset + len <= self.rx.in_order(), "seed {seed}: new data after the app closed");
            return;
        }
        if self.rx.overlaps_claim(offset, len) {
            self.deferred.push((offset, ack, payload));
            return;
        }
        if let Some(c) = ch.filter(|_| rng.chance(300)) {
            if self.rx.claim(offset, len).unwrap_or_else(|e| panic!("seed {seed}: end {}: {e}", self.me)) {
                chans[c].direct[self.me] = Some(Direct { offset, payload, ack_request: ack });
                return;
            }
        }
        let (ring, arrivals) = (&mut self.recv_ring, &mut self.arrivals);
        self.rx
            .on_data(offset, len, ack, |s, e| Self::copy_in(ring, arrivals, offset, &payload, s, e, seed))
            .unwrap_or_else(|e| panic!("seed {seed}: end {} refused legal DATA: {e}", self.me));
        self.arrived(chans, seed, rng);
    }

    /// The direct read of `d` finished: `VSock::finish_rx`.
    fn finish_direct(&mut self, chans: &mut [Chan], d: Direct, seed: u64, rng: &mut Rng) {
        let len = d.payload.len() as u64;
        Self::copy_in(
            &mut self.recv_ring,
            &mut self.arrivals,
            d.offset,
            &d.payload,
            d.offset,
            d.offset + len,
            seed,
        );
        self.rx
            .complete(d.offset, len, d.ack_request)
            .unwrap_or_else(|e| panic!("seed {seed}: end {}: {e}", self.me));
        self.arrived(chans, seed, rng);
    }

    /// `VSock::arrived`: a CREDIT if one is due, then the deferred segments no claim holds.
    fn arrived(&mut self, chans: &mut [Chan], seed: u64, rng: &mut Rng) {
        let c = self.rx.credit_due();
        self.send_credit(chans, c);
        self.take_deferred(chans, seed, rng);
    }

    fn take_deferred(&mut self, chans: &mut [Chan], seed: u64, rng: &mut Rng) {
        let rx = &self.rx;
        let (ready, wait): (Vec<_>, Vec<_>) = std::mem::take(&mut self.deferred)
            .into_iter()
            .partition(|(o, _, p)| !rx.overlaps_claim(*o, p.len() as u64));
        self.deferred = wait;
        for (o, ack, p) in ready {
            self.on_data(chans, None, (o, p, ack), seed, rng);
        }
    }

    /// `VSock::maybe_retire`: the app let go and both halves are finished.
    fn maybe_retire(&mut self) {
        if self.live() && self.closed && self.tx.finished() && self.rx.fin().is_some() {
            self.fate = Some(Fate::Clean);
            let clean_end = self.rx.fin().filter(|&f| f == self.rx.in_order());
            self.tombs.bury(1, Tomb::new(0, 2, clean_end));
        }
    }

    /// Give the vsocket up with `fate` (a RESET, or the peer lost): it leaves the table.
    fn fail(&mut self, fate: Fate) {
        if self.live() {
            self.fate = Some(fate);
            if !self.unopened() {
                self.tombs.bury(1, Tomb::new(0, 2, None));
            }
        }
    }

    /// A frame arrived from channel `ch`.
    fn handle(
        &mut self,
        chans: &mut [Chan],
        ch: usize,
        msg: Msg,
        peer_granted: u64,
        seed: u64,
        rng: &mut Rng,
    ) {
        if let Msg::Open(payload) = msg {
            return self.on_open(chans, ch, payload, seed, rng);
        }
        assert!(!self.unopened(), "seed {seed}: {msg:?} reached the acceptor before any OPEN");
        if !self.live() {
            // The engine's stale-frame path: the tombstone answers.
            let what = match &msg {
                Msg::Data { offset, payload, .. } => Stale::Data(offset + payload.len() as u64),
                Msg::Credit(_) => Stale::Credit,
                Msg::Fin(o) => Stale::Fin(*o),
                Msg::Reset | Msg::OpenOk => return,
                Msg::Open(_) => unreachable!("handled above"),
            };
            if let Some(a) = self.tombs.answer(&0, 1, what) {
                self.send_controls(chans, vec![Self::tomb_msg(a.frame, seed)]);
            }
            return;
        }
        match msg {
            Msg::Open(_) => unreachable!("handled above"),
            Msg::OpenOk => {
                if std::mem::take(&mut self.connecting) {
                    // `VSock::on_open_ok`: the acceptor's whole receive buffer is granted.
                    self.tx
                        .on_credit(0, peer_granted)
                        .unwrap_or_else(|e| panic!("seed {seed}: OPEN_OK's credit refused: {e}"));
                    self.pump(chans, peer_granted, seed);
                    self.maybe_retire();
                }
            }
            Msg::Data { offset, payload, ack_request } => {
                self.on_data(chans, Some(ch), (offset, payload, ack_request), seed, rng)
            }
            Msg::Credit(c) => {
                self.tx
                    .on_credit_frame(c.received, c.limit, c.fin_received)
                    .unwrap_or_else(|e| panic!("seed {seed}: end {} refused a legal CREDIT: {e}", self.me));
                self.pump(chans, peer_granted, seed);
                self.maybe_retire();
            }
            Msg::Fin(offset) => {
                let hold = !self.tx.is_shutdown();
                self.rx
                    .on_fin(offset)
                    .unwrap_or_else(|e| panic!("seed {seed}: end {} refused a legal FIN: {e}", self.me));
                let c = if hold { self.rx.credit_due_holding_fin() } else { self.rx.credit_due() };
                self.send_credit(chans, c);
                self.maybe_retire();
            }
            Msg::Reset => self.fail(Fate::Reset),
        }
    }

    /// `HostInner::on_open` on the acceptor: the first OPEN opens the vsocket (and its bytes
    /// arrive as DATA at offset 0); a copy for the live vsocket is answered again, its bytes
    /// discarded by offset unless the first ones were lost; a copy for a vsocket that left
    /// the table already opens nothing, and its tomb answers.
    fn on_open(&mut self, chans: &mut [Chan], ch: usize, payload: Vec<u8>, seed: u64, rng: &mut Rng) {
        assert_eq!(self.me, 1, "seed {seed}: an OPEN reached the opener");
        assert!(
            payload.len() as u64 <= self.open_credit,
            "seed {seed}: an OPEN carries {} bytes, past the open credit {}",
            payload.len(),
            self.open_credit
        );
        if !self.live() {
            if let Some(answer) = self.tombs.answer_open(&0, 2) {
                let msgs = answer.into_iter().map(|a| Self::tomb_msg(a.frame, seed)).collect();
                return self.send_controls(chans, msgs);
            }
            if self.unopened() {
                // Given up before any OPEN arrived (an outage past the timeout): the host
                // has nothing of it.
                return;
            }
            panic!("seed {seed}: a copy of the OPEN found neither the vsocket nor its tomb");
        }
        self.opened = true;
        self.send_controls(chans, vec![Msg::OpenOk]);
        if !payload.is_empty() {
            self.on_data(chans, Some(ch), (0, payload, false), seed, rng);
        }
    }

    /// The app writes a random amount, shuts down when all is written, reads a random amount
    /// (checking every byte), and closes once it read EOF and wrote everything.
    fn app(&mut self, chans: &mut [Chan], peer_granted: u64, seed: u64, rng: &mut Rng) {
        if !self.live() || self.closed || self.unopened() {
            return;
        }
        let left = self.total - self.tx.written();
        let n = rng.below(self.tx.space().min(left) + 1);
        if n > 0 {
            let cap = self.send_ring.len() as u64;
            let w = self.tx.written();
            for o in w..w + n {
                self.send_ring[(o % cap) as usize] = pattern(seed, self.me, o);
            }
            self.tx.commit(n);
        }
        if self.tx.written() == self.total && !self.tx.is_shutdown() {
            self.tx.shutdown();
        }
        self.pump(chans, peer_granted, seed);
        let n = rng.below(self.rx.readable() + 1);
        if n > 0 {
            let cap = self.recv_ring.len() as u64;
            let c = self.rx.consumed();
            for o in c..c + n {
                let want = pattern(seed, 1 - self.me, o);
                assert_eq!(
                    self.recv_ring[(o % cap) as usize],
                    want,
                    "seed {seed}: end {} read a wrong byte at {o}",
                    self.me
                );
            }
            self.rx.consume(n);
            let credit = self.rx.credit_due();
            self.send_credit(chans, credit);
        }
        if self.rx.eof() && self.tx.is_shutdown() {
            self.closed = true;
            self.maybe_retire();
        }
    }
}

/// How much the network misbehaves in one run.
struct Weather {
    /// Per-step chance (per mille) that a live channel dies.
    kill: u64,
    /// Per-step chance that every live channel dies at once.
    kill_all: u64,
    /// Per-step chance that a dead channel (both ends know) comes back.
    revive: u64,
    /// Per-step chance that a channel stalls.
    stall: u64,
    /// Longest an end takes to learn a channel died.
    notice: u64,
    /// Every channel goes down at this step and stays down past the timeout.
    blackout_at: Option<u64>,
    /// No channel dies after this step, and every dead one comes back.
    calm_after: u64,
}

/// Run one seed; returns both ends' fates. Panics (with the seed) on any broken invariant.
fn run(seed: u64) -> [Fate; 2] {
    let mut rng = Rng(seed);
    let n = rng.range(1, 4) as usize;
    let totals = [rng.below(3) * rng.range(0, 40_000), rng.below(3) * rng.range(0, 40_000)];
    let rx_caps = [rng.range(256, 16 << 10), rng.range(256, 16 << 10)];
    let weather = Weather {
        kill: [0, 2, 8, 25][rng.below(4) as usize],
        kill_all: [0, 0, 1, 4][rng.below(4) as usize],
        revive: rng.range(5, 60),
        stall: rng.range(0, 30),
        notice: rng.range(0, 30),
        blackout_at: rng.chance(60).then(|| rng.below(600)),
        calm_after: rng.range(200, 3000),
    };
    // What the acceptor's host grants an OPEN's bytes (`open_credit`): the opener's first
    // credit, until OPEN_OK grants the receive buffer.
    let open_credit = rng.range(0, rx_caps[1].min(4096));
    let mut ends = [
        End::new(0, &mut rng, open_credit, rx_caps[0], totals[0], totals[1]),
        End::new(1, &mut rng, rx_caps[0], rx_caps[1], totals[1], totals[0]),
    ];
    ends[0].connecting = true;
    ends[1].open_credit = open_credit;
    let mut chans: Vec<Chan> =
        (0..n).map(|_| Chan { alive: true, up: [true; 2], ..Chan::default() }).collect();
    let replay = format!(
        "replay with: cargo test -p netchannel --lib proto::sim::tests::replay -- --ignored (SEED={seed})"
    );
    // Whether an outage ever outlasted the timeout (only then may an end fail).
    let mut outage_expired = false;
    let mut now = 0u64;
    loop {
        now += 1;
        assert!(
            now < 200_000,
            "seed {seed}: stuck; {replay}\nend 0 ({:?}): tx {:?} rx {:?}\nend 1 ({:?}): tx {:?} rx {:?}",
            ends[0].fate,
            ends[0].tx,
            ends[0].rx,
            ends[1].fate,
            ends[1].tx,
            ends[1].rx
        );
        let calm = now > weather.calm_after && weather.blackout_at.is_none_or(|b| now > b + 3 * TIMEOUT);
        // The network's moves.
        let all = !calm && (weather.blackout_at == Some(now) || rng.chance(weather.kill_all));
        for ch in chans.iter_mut() {
            if ch.alive && (all || (!calm && rng.chance(weather.kill))) {
                ch.alive = false;
                ch.wire = Default::default();
                for i in 0..2 {
                    ch.notice_at[i] = now + rng.below(weather.notice + 1);
                }
            }
            if rng.chance(weather.stall) {
                ch.stalled_until = now + rng.range(1, 50);
            }
        }
        // Ends learn of deaths.
        for c in 0..n {
            for i in 0..2 {
                if !chans[c].alive && chans[c].up[i] && chans[c].notice_at[i] <= now {
                    chans[c].up[i] = false;
                    chans[c].queue[i].clear();
                    let lost = chans[c].direct[i].take();
                    let peer_granted = ends[1 - i].rx.granted();
                    let e = &mut ends[i];
                    if let Some(d) = lost {
                        // `VSock::release_rx`: the bytes come again.
                        e.rx.release(d.offset, d.payload.len() as u64);
                        e.take_deferred(&mut chans, seed, &mut rng);
                    }
                    let left = chans.iter().filter(|ch| ch.up[i]).count();
                    if left == 0 {
                        e.down_since.get_or_insert(now);
                        e.needs_recover = true;
                    } else {
                        e.recover(&mut chans, peer_granted, seed);
                    }
                }
            }
        }
        // Dead channels come back (the dialer's re-dial), except during a blackout.
        let in_blackout = weather.blackout_at.is_some_and(|b| now >= b && now <= b + 2 * TIMEOUT);
        for c in 0..n {
            let known_dead = !chans[c].alive && !chans[c].up[0] && !chans[c].up[1];
            if known_dead && !in_blackout && (calm || rng.chance(weather.revive)) {
                chans[c] = Chan { alive: true, up: [true; 2], ..Chan::default() };
                for i in 0..2 {
                    let peer_granted = ends[1 - i].rx.granted();
                    let e = &mut ends[i];
                    e.down_since = None;
                    if std::mem::take(&mut e.needs_recover) {
                        e.recover(&mut chans, peer_granted, seed);
                    } else if e.connecting && e.open_payload.is_some() && e.late_open.is_none() {
                        e.late_open = Some(now + rng.below(300));
                    }
                }
            }
        }
        // The peer-down timeout (an acceptor without a vsocket has nothing to give up).
        for e in ends.iter_mut() {
            if e.down_since.is_some_and(|t| now - t > TIMEOUT) && !e.unopened() {
                e.down_since = None;
                outage_expired = true;
                e.fail(Fate::PeerLost);
            }
        }
        // A late copy of the OPEN is queued.
        for e in ends.iter_mut() {
            if e.late_open.is_some_and(|t| t <= now) {
                e.late_open = None;
                e.send_controls(&mut chans, vec![e.open_msg()]);
            }
        }
        // Apps.
        for i in 0..2 {
            if rng.chance(500) {
                let peer_granted = ends[1 - i].rx.granted();
                ends[i].app(&mut chans, peer_granted, seed, &mut rng);
            }
        }
        // Channels write what is queued and read what arrived, in random order.
        for _ in 0..rng.range(1, 2 * n as u64 + 2) {
            let c = rng.below(n as u64) as usize;
            let i = rng.below(2) as usize;
            if chans[c].stalled_until > now {
                continue;
            }
            if rng.chance(500) {
                // End i writes a few queued frames.
                for _ in 0..rng.range(1, 8) {
                    let Some(q) = chans[c].queue[i].pop_front() else { break };
                    let msg = match q {
                        Queued::Control(m) => Some(m),
                        Queued::Segment(s) => ends[i].tx.clip(s.offset, s.len).map(|(o, l)| {
                            let cap = ends[i].send_ring.len() as u64;
                            let payload = (o..o + u64::from(l))
                                .map(|x| ends[i].send_ring[(x % cap) as usize])
                                .collect();
                            Msg::Data { offset: o, payload, ack_request: s.ack_request }
                        }),
                    };
                    if let (Some(m), true) = (msg, chans[c].alive) {
                        chans[c].wire[i].push_back(m);
                    }
                }
                // A drained queue lets parked segments go (`Peer::unblock`).
                let peer_granted = ends[1 - i].rx.granted();
                ends[i].pump(&mut chans, peer_granted, seed);
            } else {
                // End 1 - i reads one frame (finishing a direct read first).
                let j = 1 - i;
                if !chans[c].up[j] {
                    continue;
                }
                let peer_granted = ends[i].rx.granted();
                if let Some(d) = chans[c].direct[j].take() {
                    ends[j].finish_direct(&mut chans, d, seed, &mut rng);
                    continue;
                }
                let Some(m) = chans[c].wire[i].pop_front() else { continue };
                ends[j].handle(&mut chans, c, m, peer_granted, seed, &mut rng);
            }
        }
        let quiet = chans.iter().all(|c| {
            c.queue.iter().all(|q| q.is_empty())
                && c.wire.iter().all(|w| w.is_empty())
                && c.direct.iter().all(|d| d.is_none())
        });
        if ends.iter().all(|e| !e.live() || e.unopened()) && quiet {
            break;
        }
    }
    if ends[1].unopened() {
        ends[1].fate = Some(Fate::NeverOpened);
    }
    let fates = [ends[0].fate.unwrap(), ends[1].fate.unwrap()];
    for (i, e) in ends.iter().enumerate() {
        match e.fate.unwrap() {
            Fate::NeverOpened => assert!(
                ends[0].fate != Some(Fate::Clean) && outage_expired,
                "seed {seed}: the acceptor never saw an OPEN though the opener ended {:?}; {replay}",
                ends[0].fate
            ),
            Fate::Clean => {
                let peer_total = ends[1 - i].total;
                assert!(
                    e.rx.eof() && e.rx.consumed() == peer_total,
                    "seed {seed}: end {i} ended clean without the whole stream; {replay}"
                );
                assert!(e.arrivals.iter().all(|&a| a == 1), "seed {seed}: end {i} missed bytes; {replay}");
                assert!(
                    e.tx.finished() && e.tx.unacked() == 0,
                    "seed {seed}: end {i} left unacknowledged bytes; {replay}"
                );
                assert!(
                    e.rx.pending_ranges() == 0 && !e.rx.has_claims() && e.deferred.is_empty(),
                    "seed {seed}: end {i} left segments pending; {replay}"
                );
            }
            Fate::PeerLost | Fate::Reset => assert!(
                outage_expired,
                "seed {seed}: end {i} failed ({:?}) though no outage outlasted the timeout; {replay}",
                e.fate
            ),
        }
    }
    fates
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Seeds run in CI; `NETCHANNEL_SIM_SEEDS` runs more.
    const SEEDS: u64 = 3000;

    #[test]
    fn every_seed_delivers_every_byte_once_or_fails_typed() {
        let seeds = std::env::var("NETCHANNEL_SIM_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(SEEDS);
        let mut clean = 0;
        let mut failed = 0;
        for seed in 0..seeds {
            match run(seed) {
                [Fate::Clean, Fate::Clean] => clean += 1,
                _ => failed += 1,
            }
        }
        // The weather is mild enough that most runs end cleanly, and some outages outlast
        // the timeout: both outcomes are exercised.
        assert!(clean > seeds * 8 / 10, "only {clean} of {seeds} seeds ended cleanly");
        assert!(failed > 0, "no seed exercised an outage past the timeout");
    }

    /// Replay one seed: `SEED=n cargo test -p netchannel --lib proto::sim::tests::replay -- --ignored`.
    #[test]
    #[ignore]
    fn replay() {
        let seed = std::env::var("SEED").expect("SEED=<n>").parse().expect("a number");
        println!("{:?}", run(seed));
    }
}
