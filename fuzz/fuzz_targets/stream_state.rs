//! Fuzz target: the sans-IO vsocket state machines (`TxState`, `RxState`, `Reassembly`)
//! driven by a sequence of operations decoded from the input: the application writes,
//! reads and shuts down; the sender cuts segments onto one of four simulated channels;
//! frames in flight are delivered in any order, duplicated, or lost with a channel that
//! dies (after which both ends recover as the engine does: the sender rewinds, the receiver
//! re-announces its credit). A last phase delivers everything and checks that the stream
//! completes.
//!
//! Invariants: no panic; the sender never sends past the credit the receiver granted; an
//! honest sender is never judged a protocol violator; every stream byte is written into the
//! receive buffer exactly once, and the bytes read equal the bytes written; after the
//! settle phase the receiver has every byte and the FIN, and the sender knows it.
//! A second, independent `Reassembly` is checked against a bitmap model.
#![no_main]

use std::collections::VecDeque;

use libfuzzer_sys::fuzz_target;
use netchannel::proto::reasm::Reassembly;
use netchannel::proto::stream::{Credit, RxState, TxState};

/// Most stream bytes one run writes (keeps each run fast).
const TOTAL_MAX: u64 = 4096;
const CHANNELS: u8 = 4;

enum Msg {
    Data { offset: u64, len: u32, ack: bool },
    Credit(Credit),
    Fin(u64),
}

struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from(self.u8()?) << 8 | u16::from(self.u8()?))
    }
}

fn pattern(off: u64) -> u8 {
    (off.wrapping_mul(31) ^ (off >> 8)) as u8
}

struct Sim {
    tx: TxState,
    rx: RxState,
    seg_max: u32,
    /// Frames in flight (a deque: the settle phase takes them from the front).
    net: VecDeque<(u8, Msg)>,
    next_ch: u8,
    /// Receive buffer by absolute offset, and which bytes were written.
    buf: Vec<u8>,
    have: Vec<bool>,
    read: u64,
}

impl Sim {
    fn pump(&mut self) {
        while let Some(seg) = self.tx.next_segment(self.seg_max) {
            let end = seg.offset + u64::from(seg.len);
            assert!(seg.len >= 1 && seg.len <= self.seg_max);
            assert!(end <= self.tx.limit(), "segment past the credit limit");
            assert!(end <= self.rx.granted(), "sender used credit the receiver never granted");
            assert!(end <= self.tx.written());
            let ch = self.next_ch;
            self.next_ch = (self.next_ch + 1) % CHANNELS;
            self.net.push_back((ch, Msg::Data { offset: seg.offset, len: seg.len, ack: seg.ack_request }));
        }
        if let Some(f) = self.tx.take_fin() {
            assert_eq!(f, self.tx.written());
            self.net.push_back((self.next_ch, Msg::Fin(f)));
        }
    }

    fn credit(&mut self, ch: u8) {
        if let Some(c) = self.rx.credit_due() {
            assert!(c.received <= c.limit);
            self.net.push_back((ch, Msg::Credit(c)));
        }
    }

    fn deliver(&mut self, i: usize) {
        let (ch, msg) = self.net.remove(i).expect("index within the frames in flight");
        match msg {
            Msg::Data { offset, len, ack } => {
                let before = self.rx.in_order();
                let granted = self.rx.granted();
                let (buf, have) = (&mut self.buf, &mut self.have);
                self.rx
                    .on_data(offset, u64::from(len), ack, |s, e| {
                        assert!(s < e && s >= before && e <= granted && s >= offset);
                        assert!(e <= offset + u64::from(len));
                        if have.len() < e as usize {
                            have.resize(e as usize, false);
                            buf.resize(e as usize, 0);
                        }
                        for o in s..e {
                            assert!(!have[o as usize], "byte {o} written twice");
                            have[o as usize] = true;
                            buf[o as usize] = pattern(o);
                        }
                    })
                    .expect("an honest sender's DATA was refused");
                self.credit(ch);
            }
            Msg::Credit(c) => {
                self.tx.on_credit(c.received, c.limit).expect("an honest receiver's CREDIT was refused");
                if c.fin_received {
                    self.tx.on_fin_received(c.received).expect("FIN acknowledgement refused");
                }
                assert!(self.tx.unacked() <= self.tx.written());
                self.pump();
            }
            Msg::Fin(f) => {
                self.rx.on_fin(f).expect("an honest sender's FIN was refused");
                self.credit(ch);
            }
        }
    }

    fn read(&mut self, n: u64) {
        let n = n.min(self.rx.readable());
        let from = self.rx.consumed();
        for o in from..from + n {
            assert!(self.have[o as usize], "readable byte {o} never arrived");
            assert_eq!(self.buf[o as usize], pattern(o), "byte {o} differs");
        }
        self.rx.consume(n);
        self.read += n;
        let ch = self.next_ch;
        self.credit(ch);
    }

    /// Channel `ch` died: its frames are lost; both ends recover as `VSock::recover` does.
    fn kill(&mut self, ch: u8) {
        self.net.retain(|(c, _)| *c != ch);
        self.tx.rewind();
        self.tx.rewind_fin();
        let received = self.rx.in_order();
        let c = Credit { received, limit: self.rx.granted(), fin_received: self.rx.fin() == Some(received) };
        let alive = (ch + 1) % CHANNELS;
        self.net.push_back((alive, Msg::Credit(c)));
        self.pump();
    }
}

fn reassembly_model(ops: &mut Bytes<'_>) {
    const N: usize = 1024;
    let mut r = Reassembly::new(0);
    let mut have = [false; N];
    while let (Some(off), Some(len)) = (ops.u16(), ops.u8()) {
        let (off, len) = (u64::from(off) % N as u64, u64::from(len).min(N as u64 - u64::from(off) % N as u64));
        let mut parts = Vec::new();
        let in_order = r.in_order();
        r.insert(off, len, |s, e| parts.push((s, e))).expect("ranges within 1 KiB are never too many");
        let mut expect = Vec::new();
        let mut o = off.max(in_order);
        while o < off + len {
            if have[o as usize] {
                o += 1;
                continue;
            }
            let s = o;
            while o < off + len && !have[o as usize] {
                o += 1;
            }
            expect.push((s, o));
        }
        assert_eq!(parts, expect, "new parts of [{off}, {})", off + len);
        for &(s, e) in &parts {
            have[s as usize..e as usize].iter_mut().for_each(|h| *h = true);
        }
        let first_gap = have.iter().position(|h| !h).unwrap_or(N) as u64;
        assert_eq!(r.in_order(), first_gap);
    }
}

fuzz_target!(|data: &[u8]| {
    let mut ops = Bytes(data);
    let Some(mode) = ops.u8() else { return };
    if mode & 0x80 != 0 {
        return reassembly_model(&mut ops);
    }
    let (Some(tc), Some(rc), Some(sm)) = (ops.u16(), ops.u16(), ops.u8()) else { return };
    let tx_cap = 16 + u64::from(tc) % 4096;
    let rx_cap = 16 + u64::from(rc) % 4096;
    let mut sim = Sim {
        tx: TxState::new(tx_cap, rx_cap),
        rx: RxState::new(rx_cap),
        seg_max: 1 + u32::from(sm) * 4,
        net: VecDeque::new(),
        next_ch: 0,
        buf: Vec::new(),
        have: Vec::new(),
        read: 0,
    };
    while let Some(op) = ops.u8() {
        let arg = ops.u8().unwrap_or(0);
        match op % 8 {
            0 => {
                let n = (u64::from(arg) * 8 + 1).min(sim.tx.space()).min(TOTAL_MAX - sim.tx.written());
                if !sim.tx.is_shutdown() {
                    sim.tx.commit(n);
                    assert!(sim.tx.unacked() <= tx_cap);
                }
            }
            1 => sim.pump(),
            2 | 3 if !sim.net.is_empty() => sim.deliver(arg as usize % sim.net.len()),
            4 if !sim.net.is_empty() => {
                // Duplicate a frame in flight (a re-sent copy racing the original).
                let i = arg as usize % sim.net.len();
                let copy = match &sim.net[i].1 {
                    Msg::Data { offset, len, ack } => Msg::Data { offset: *offset, len: *len, ack: *ack },
                    Msg::Credit(c) => Msg::Credit(*c),
                    Msg::Fin(f) => Msg::Fin(*f),
                };
                sim.net.push_back(((sim.net[i].0 + 1) % CHANNELS, copy));
            }
            5 => sim.read(u64::from(arg) * 4),
            6 => sim.kill(arg % CHANNELS),
            7 if !sim.tx.is_shutdown() => sim.tx.shutdown(),
            _ => {}
        }
    }
    // Settle: no more losses; deliver everything, read everything, until nothing moves.
    let shut = sim.tx.is_shutdown();
    for _ in 0..1_000_000 {
        sim.pump();
        if sim.net.is_empty() {
            sim.read(u64::MAX);
            if sim.net.is_empty() {
                break;
            }
        }
        while !sim.net.is_empty() {
            sim.deliver(0);
        }
    }
    assert_eq!(sim.rx.in_order(), sim.tx.written(), "stream did not complete");
    assert_eq!(sim.read, sim.tx.written());
    if shut {
        // Without a FIN, acknowledgements are lazy (a quarter of the buffer, or when asked);
        // the FIN makes the receiver acknowledge the whole stream.
        assert_eq!(sim.tx.acked(), sim.tx.written(), "sender never learned the stream arrived");
        assert_eq!(sim.rx.fin(), Some(sim.tx.written()));
        assert!(sim.rx.eof());
        assert!(sim.tx.finished(), "sender never learned the FIN arrived");
    }
});
