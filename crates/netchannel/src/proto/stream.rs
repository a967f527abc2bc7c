//! Per-vsocket byte-stream state: the sender's buffer accounting and the receiver's
//! reassembly and credit (sans-IO).
//!
//! Offsets are absolute 64-bit stream offsets starting at 0. The bytes themselves live in the
//! vsocket's rings (`crate::ring`); these structures only say which offsets may be written,
//! sent, freed, read or granted.
//!
//! Credit flow control: the receiver grants an absolute `limit`; the sender never sends a
//! byte at or beyond it. The receiver acknowledges by offset (`received`): the sender keeps
//! every byte at or above `acked` so that a segment lost with a channel can be sent again.

use super::reasm::Reassembly;
use super::ProtoError;

/// The sender half of one vsocket.
#[derive(Debug, Clone)]
pub struct TxState {
    /// Send buffer size in bytes.
    cap: u64,
    /// The peer has everything below this offset; the buffer below it is free.
    acked: u64,
    /// Next offset to hand to a channel.
    sched: u64,
    /// Highest offset ever handed to a channel (`sched` moves back on a rewind, this does not).
    sched_max: u64,
    /// The application has written everything below this offset.
    written: u64,
    /// Credit limit granted by the peer.
    limit: u64,
    /// Offset of the last segment that asked the peer for an acknowledgement.
    ack_asked: u64,
    /// `ack_asked` before the most recent segment was cut: restored when that segment is
    /// given back ([`TxState::unsend`]), whose request for an acknowledgement then never left.
    ack_asked_before: u64,
    /// Shutdown(Write) requested: FIN at `written` once every byte is scheduled.
    fin_wanted: bool,
    /// FIN has been handed to a channel.
    fin_sent: bool,
    /// The peer said it has the FIN (CREDIT with `FLAG_FIN_RECEIVED`).
    fin_acked: bool,
}

/// One segment handed out by [`TxState::next_segment`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Stream offset of the first byte.
    pub offset: u64,
    /// Number of bytes.
    pub len: u32,
    /// Ask the receiver to acknowledge promptly (the sender's buffer is filling).
    pub ack_request: bool,
}

impl TxState {
    /// A sender with `cap` bytes of buffer and the peer's initial credit `limit`.
    pub fn new(cap: u64, limit: u64) -> Self {
        TxState {
            cap,
            acked: 0,
            sched: 0,
            sched_max: 0,
            written: 0,
            limit,
            ack_asked: 0,
            ack_asked_before: 0,
            fin_wanted: false,
            fin_sent: false,
            fin_acked: false,
        }
    }

    /// Bytes the application may write now.
    pub fn space(&self) -> u64 {
        self.cap - (self.written - self.acked)
    }

    /// Offset the next application byte goes to.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Everything below this offset is acknowledged.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Next offset to schedule.
    pub fn scheduled(&self) -> u64 {
        self.sched
    }

    /// Credit limit granted by the peer.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes written but not yet acknowledged.
    pub fn unacked(&self) -> u64 {
        self.written - self.acked
    }

    /// The application wrote `n` more bytes (at most [`TxState::space`]).
    pub fn commit(&mut self, n: u64) {
        assert!(n <= self.space(), "commit beyond the send buffer");
        assert!(n == 0 || !self.fin_wanted, "write after shutdown");
        self.written += n;
    }

    /// Cut the next segment of at most `max` bytes, if data and credit allow.
    pub fn next_segment(&mut self, max: u32) -> Option<Segment> {
        let end = self.written.min(self.limit);
        if self.sched >= end {
            return None;
        }
        let len = (end - self.sched).min(max as u64) as u32;
        let offset = self.sched;
        self.sched += len as u64;
        self.sched_max = self.sched_max.max(self.sched);
        // Ask for an acknowledgement about four times per send buffer.
        let ack_request = self.sched.saturating_sub(self.ack_asked) >= (self.cap / 4).max(1);
        self.ack_asked_before = self.ack_asked;
        if ack_request {
            self.ack_asked = self.sched;
        }
        Some(Segment { offset, len, ack_request })
    }

    /// Give a segment back that was cut but could not be queued (the scheduler found no
    /// channel). Only the most recent segment can be given back. Its request for an
    /// acknowledgement is taken back too: the sender relies on every request above `acked`
    /// being on its way, or a full send buffer could wait for an acknowledgement nobody asked
    /// for (a receiver with a larger buffer acknowledges only every quarter of its own).
    pub fn unsend(&mut self, seg: Segment) {
        debug_assert_eq!(seg.offset + seg.len as u64, self.sched);
        self.sched = seg.offset;
        self.ack_asked = self.ack_asked_before;
    }

    /// The part of a queued segment still worth sending (bytes below `acked` are no longer
    /// in the buffer and the peer has them). `None` if nothing is left.
    pub fn clip(&self, offset: u64, len: u32) -> Option<(u64, u32)> {
        let end = offset + len as u64;
        let start = offset.max(self.acked);
        (start < end).then(|| (start, (end - start) as u32))
    }

    /// A CREDIT arrived. Returns whether buffer space was freed.
    pub fn on_credit(&mut self, received: u64, limit: u64) -> Result<bool, ProtoError> {
        if received > self.sched_max {
            return Err(ProtoError::AckBeyondSent { received, sent: self.sched_max });
        }
        if received > limit {
            return Err(ProtoError::LimitBelowAck { limit, received });
        }
        // CREDIT frames may be reordered across channels: keep the maxima.
        self.limit = self.limit.max(limit);
        let freed = received > self.acked;
        self.acked = self.acked.max(received);
        // After a rewind, bytes the peer acknowledges need not be sent again.
        self.sched = self.sched.max(self.acked);
        Ok(freed)
    }

    /// Re-send everything not acknowledged (a channel that may have carried it died).
    pub fn rewind(&mut self) {
        self.sched = self.acked;
        self.ack_asked = self.ack_asked.min(self.acked);
    }

    /// Shutdown(Write): a FIN follows the last written byte.
    pub fn shutdown(&mut self) {
        self.fin_wanted = true;
    }

    /// Whether shutdown was requested.
    pub fn is_shutdown(&self) -> bool {
        self.fin_wanted
    }

    /// The peer acknowledged the FIN at `offset` (a CREDIT with the FIN flag; it may arrive
    /// after a rewind made the FIN due again).
    pub fn on_fin_received(&mut self, offset: u64) -> Result<(), ProtoError> {
        if !self.fin_wanted || offset != self.written {
            return Err(ProtoError::FinAckMismatch { offset, end: self.fin_wanted.then_some(self.written) });
        }
        self.fin_acked = true;
        Ok(())
    }

    /// If the FIN is due now, its final offset; marks it sent.
    pub fn take_fin(&mut self) -> Option<u64> {
        if self.fin_wanted && !self.fin_sent && !self.fin_acked && self.sched == self.written {
            self.fin_sent = true;
            Some(self.written)
        } else {
            None
        }
    }

    /// Every byte and the FIN acknowledged: the sending half is finished.
    pub fn finished(&self) -> bool {
        self.fin_acked && self.acked == self.written
    }

    /// Forget that FIN was sent unless the peer acknowledged it: the channel that carried it
    /// may have died, so it must be sent again.
    pub fn rewind_fin(&mut self) {
        if !self.fin_acked {
            self.fin_sent = false;
        }
    }

    /// A channel that may have carried this vsocket's segments or FIN died: everything not
    /// acknowledged is due again ([`TxState::rewind`], [`TxState::rewind_fin`]). The
    /// receiver acknowledges by offset and discards copies, so sending again what did arrive
    /// is harmless.
    pub fn recover(&mut self) -> TxRecovery {
        self.rewind();
        self.rewind_fin();
        TxRecovery { resend_from: self.acked, fin_again: self.fin_wanted && !self.fin_acked }
    }

    /// A CREDIT frame arrived, acknowledging the FIN too if `fin_received`:
    /// [`TxState::on_credit`], then [`TxState::on_fin_received`] at `received`. Returns
    /// whether buffer space was freed.
    pub fn on_credit_frame(
        &mut self,
        received: u64,
        limit: u64,
        fin_received: bool,
    ) -> Result<bool, ProtoError> {
        let freed = self.on_credit(received, limit)?;
        if fin_received {
            self.on_fin_received(received)?;
        }
        Ok(freed)
    }
}

/// What the sending half of a vsocket sends again after a channel died
/// ([`TxState::recover`]): [`TxState::next_segment`] hands out the segments, and
/// [`TxState::take_fin`] the FIN once every byte before it is handed out again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxRecovery {
    /// Segments from this offset (the acknowledged one) to `written` are due again.
    pub resend_from: u64,
    /// The FIN is due again (requested and not acknowledged).
    pub fin_again: bool,
}

/// The receiver half of one vsocket.
#[derive(Debug, Clone)]
pub struct RxState {
    /// Receive buffer size: the credit window.
    cap: u64,
    /// The application has read everything below this offset.
    consumed: u64,
    /// Which ranges arrived.
    reasm: Reassembly,
    /// Credit limit last granted to the peer.
    granted: u64,
    /// In-order offset last acknowledged to the peer.
    acked_sent: u64,
    /// Acknowledge as soon as the in-order point reaches this offset (peer asked).
    ack_wanted: Option<u64>,
    /// The highest offset the peer asked an acknowledgement for and has not had one: a
    /// request above `ack_wanted` (they arrive out of order across channels) is not
    /// forgotten when `ack_wanted` is answered, or a sender whose buffer is full of bytes
    /// the receiver holds could wait forever (it asks once per quarter of its buffer).
    ack_wanted_max: u64,
    /// Final offset, once the peer's FIN arrived.
    fin: Option<u64>,
    /// A FIN arrived (the first, or a copy sent again after a channel died) and has not been
    /// acknowledged since: acknowledge it as soon as the stream is complete.
    fin_ack_due: bool,
    /// Ranges `(start, end)` claimed by writers that fill them into the receive buffer
    /// without holding the vsocket's lock ([`RxState::claim`]): none has arrived as far as
    /// `reasm` knows, they are disjoint, and nobody else writes them until they are
    /// completed or released. At most one per channel reading this vsocket's segments.
    claims: Vec<(u64, u64)>,
}

/// A CREDIT to send: `received` in order so far and the new `limit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credit {
    pub received: u64,
    pub limit: u64,
    /// The FIN arrived and `received` is the final offset (the stream is complete).
    pub fin_received: bool,
}

impl RxState {
    /// A receiver with a `cap`-byte buffer; the initial credit granted is `cap`.
    pub fn new(cap: u64) -> Self {
        RxState {
            cap,
            consumed: 0,
            reasm: Reassembly::new(0),
            granted: cap,
            acked_sent: 0,
            ack_wanted: None,
            ack_wanted_max: 0,
            fin: None,
            fin_ack_due: false,
            claims: Vec::new(),
        }
    }

    /// Credit limit granted so far.
    pub fn granted(&self) -> u64 {
        self.granted
    }

    /// Everything below this offset has arrived.
    pub fn in_order(&self) -> u64 {
        self.reasm.in_order()
    }

    /// Everything below this offset has been read by the application.
    pub fn consumed(&self) -> u64 {
        self.consumed
    }

    /// Bytes the application can read now.
    pub fn readable(&self) -> u64 {
        self.reasm.in_order() - self.consumed
    }

    /// The peer's FIN arrived and the application read everything before it.
    pub fn eof(&self) -> bool {
        self.fin == Some(self.consumed)
    }

    /// The peer's FIN arrived.
    pub fn fin(&self) -> Option<u64> {
        self.fin
    }

    /// Out-of-order ranges held.
    pub fn pending_ranges(&self) -> usize {
        self.reasm.pending_ranges()
    }

    /// A DATA segment arrived. Checks it against the credit granted and the FIN, then calls
    /// `new_part(start, end)` for each range not received before (the caller copies those bytes).
    /// The segment must not overlap a claim ([`RxState::overlaps_claim`]).
    pub fn on_data(
        &mut self,
        offset: u64,
        len: u64,
        ack_request: bool,
        new_part: impl FnMut(u64, u64),
    ) -> Result<(), ProtoError> {
        let end = self.check_data(offset, len)?;
        debug_assert!(!self.overlaps_claim(offset, len), "DATA over a claimed range");
        self.reasm.insert(offset, len, new_part)?;
        if ack_request {
            self.ask_ack(end);
        }
        Ok(())
    }

    /// Claim the DATA segment `[offset, offset + len)` for writing into the receive buffer
    /// outside the vsocket's lock (a reader that reads its payload straight from the channel
    /// into the buffer, or copies it there unlocked). Checks it as [`RxState::on_data`] does;
    /// `Ok(true)` if claimed: no byte of it has arrived and no other claim overlaps it. Then
    /// the claimer, and nobody else, writes those bytes, and calls [`RxState::complete`]
    /// (they arrived) or [`RxState::release`] (they did not: the channel died). `Ok(false)`
    /// (nothing claimed) for an empty segment or one that overlaps what arrived or is claimed:
    /// the caller takes the usual way.
    pub fn claim(&mut self, offset: u64, len: u64) -> Result<bool, ProtoError> {
        let end = self.check_data(offset, len)?;
        if len == 0 || !self.reasm.is_new(offset, end) || self.overlaps_claim(offset, len) {
            return Ok(false);
        }
        self.claims.push((offset, end));
        Ok(true)
    }

    /// Whether `[offset, offset + len)` overlaps a claimed range.
    pub fn overlaps_claim(&self, offset: u64, len: u64) -> bool {
        let end = offset.saturating_add(len);
        self.claims.iter().any(|&(s, e)| s < end && offset < e)
    }

    /// Whether any range is claimed.
    pub fn has_claims(&self) -> bool {
        !self.claims.is_empty()
    }

    /// The claimed segment `[offset, offset + len)` is in the receive buffer now: it has
    /// arrived, as [`RxState::on_data`] would record it.
    ///
    /// # Panics
    /// If that range was not claimed.
    pub fn complete(&mut self, offset: u64, len: u64, ack_request: bool) -> Result<(), ProtoError> {
        self.release(offset, len);
        let end = offset + len;
        let mut whole = true;
        self.reasm.insert(offset, len, |s, e| whole &= s == offset && e == end)?;
        debug_assert!(whole, "a claimed range arrived in part before it was completed");
        if ack_request {
            self.ask_ack(end);
        }
        Ok(())
    }

    /// Give up the claim on `[offset, offset + len)`: its bytes did not arrive (they come
    /// again, from the sender's recovery).
    ///
    /// # Panics
    /// If that range was not claimed.
    pub fn release(&mut self, offset: u64, len: u64) {
        let i = self
            .claims
            .iter()
            .position(|&c| c == (offset, offset + len))
            .expect("release of a range that is not claimed");
        self.claims.swap_remove(i);
    }

    /// The peer asked for an acknowledgement once everything below `end` has arrived.
    fn ask_ack(&mut self, end: u64) {
        self.ack_wanted = Some(self.ack_wanted.map_or(end, |w| w.min(end)));
        self.ack_wanted_max = self.ack_wanted_max.max(end);
    }

    /// Checks a DATA segment against the credit granted and the FIN; its end offset.
    fn check_data(&self, offset: u64, len: u64) -> Result<u64, ProtoError> {
        let end = offset.checked_add(len).ok_or(ProtoError::Overflow { offset, len })?;
        if end > self.granted {
            return Err(ProtoError::BeyondCredit { end, granted: self.granted });
        }
        if let Some(fin) = self.fin {
            if end > fin {
                return Err(ProtoError::BeyondFin { end, fin });
            }
        }
        Ok(end)
    }

    /// The peer's FIN arrived with its final offset.
    pub fn on_fin(&mut self, offset: u64) -> Result<(), ProtoError> {
        // Claimed bytes count as arrived: their DATA came before this FIN.
        let max_end = self.claims.iter().map(|c| c.1).fold(self.reasm.max_end(), u64::max);
        if offset < max_end || offset > self.granted {
            return Err(ProtoError::FinBeforeData { offset, data_end: max_end, granted: self.granted });
        }
        match self.fin {
            Some(f) if f != offset => Err(ProtoError::FinMoved { first: f, second: offset }),
            _ => {
                self.fin = Some(offset);
                // Acknowledge the end of the stream as soon as it is all here (again for a
                // copy: the sender re-sends FIN when its acknowledgement may have been lost).
                self.fin_ack_due = true;
                Ok(())
            }
        }
    }

    /// The CREDIT that re-announces this receiver's state after a channel died (a CREDIT in
    /// flight on it may have been lost): the in-order point, the limit granted, and whether
    /// that is the end of the stream (acknowledging the FIN again). It marks nothing sent:
    /// it repeats what was said or would be, and the sender keeps the maxima.
    pub fn recovery_credit(&self) -> Credit {
        let received = self.reasm.in_order();
        Credit { received, limit: self.granted, fin_received: self.fin == Some(received) }
    }

    /// The application read `n` bytes (at most [`RxState::readable`]).
    pub fn consume(&mut self, n: u64) {
        assert!(n <= self.readable(), "consume beyond the readable bytes");
        self.consumed += n;
    }

    /// A CREDIT is due if the window moved by a quarter of the buffer, the in-order point
    /// moved by a quarter of the buffer since the last acknowledgement, the window is full,
    /// the peer asked for an acknowledgement that the in-order point now covers, or the stream
    /// is complete and its FIN not acknowledged since it (or a copy) arrived. Marks it sent.
    pub fn credit_due(&mut self) -> Option<Credit> {
        self.credit_due_if(true)
    }

    /// [`RxState::credit_due`], except that the FIN's acknowledgement alone does not make a
    /// CREDIT due: a receiver that will send its own FIN soon lets that FIN carry it (the
    /// next `credit_due` still owes it), as TCP's FIN acknowledges the peer's.
    pub fn credit_due_holding_fin(&mut self) -> Option<Credit> {
        self.credit_due_if(false)
    }

    fn credit_due_if(&mut self, fin_alone: bool) -> Option<Credit> {
        let quarter = (self.cap / 4).max(1);
        let limit = self.consumed + self.cap;
        let in_order = self.reasm.in_order();
        let asked = self.ack_wanted.is_some_and(|w| in_order >= w && in_order > self.acked_sent);
        let complete = self.fin == Some(in_order);
        let fin_due = fin_alone && complete && self.fin_ack_due;
        // A full window will not move until the application reads: acknowledge what is here
        // so the sender can free its buffer meanwhile.
        let window_full = in_order == self.granted && in_order > self.acked_sent;
        if limit - self.granted >= quarter
            || in_order - self.acked_sent >= quarter
            || asked
            || window_full
            || fin_due
        {
            if self.ack_wanted.is_some_and(|w| in_order >= w) {
                // Answered; a higher request still waiting becomes the next one.
                self.ack_wanted = (self.ack_wanted_max > in_order).then_some(self.ack_wanted_max);
            }
            if complete {
                self.fin_ack_due = false;
            }
            self.granted = self.granted.max(limit);
            self.acked_sent = in_order;
            Some(Credit { received: in_order, limit: self.granted, fin_received: complete })
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drive a sender and a receiver against each other with no channels in between and
    /// check that credit is never exceeded and the stream completes.
    #[test]
    fn credit_is_never_exceeded() {
        let cap_rx = 1000u64;
        let mut tx = TxState::new(300, cap_rx);
        let mut rx = RxState::new(cap_rx);
        let total = 10_000u64;
        let mut produced = 0u64;
        let mut delivered = 0u64;
        for step in 0..100_000 {
            let w = tx.space().min(total - produced).min(77);
            tx.commit(w);
            produced += w;
            if produced == total && !tx.is_shutdown() {
                tx.shutdown();
            }
            while let Some(seg) = tx.next_segment(64) {
                assert!(seg.offset + seg.len as u64 <= tx.limit());
                rx.on_data(seg.offset, seg.len as u64, seg.ack_request, |s, e| delivered += e - s).unwrap();
            }
            if let Some(f) = tx.take_fin() {
                rx.on_fin(f).unwrap();
            }
            // The application reads slowly.
            if step % 3 == 0 {
                let n = rx.readable().min(50);
                rx.consume(n);
            }
            if let Some(c) = rx.credit_due() {
                tx.on_credit(c.received, c.limit).unwrap();
                if c.fin_received {
                    tx.on_fin_received(c.received).unwrap();
                }
            }
            if rx.eof() && tx.finished() {
                assert_eq!(delivered, total);
                return;
            }
        }
        panic!("stream did not finish: tx {tx:?} rx {rx:?}");
    }

    #[test]
    fn small_send_buffer_still_gets_acks() {
        // Sender buffer much smaller than a quarter of the receive window: the sender's
        // ack requests must keep it going even though the window never moves a quarter.
        let mut tx = TxState::new(100, 1 << 20);
        let mut rx = RxState::new(1 << 20);
        let mut sent = 0;
        for _ in 0..1000 {
            let w = tx.space();
            tx.commit(w);
            while let Some(seg) = tx.next_segment(10) {
                rx.on_data(seg.offset, seg.len as u64, seg.ack_request, |_, _| {}).unwrap();
            }
            let n = rx.readable();
            rx.consume(n);
            if let Some(c) = rx.credit_due() {
                tx.on_credit(c.received, c.limit).unwrap();
            }
            sent = tx.written();
        }
        assert!(sent > 10_000, "sender stalled at {sent}");
    }

    #[test]
    fn a_segment_given_back_takes_its_ack_request_back() {
        // A small send buffer, a large receive window: only the sender's requests bring
        // acknowledgements. The segment that asks is given back (no channel had room) and cut
        // again: it must ask again, or the full buffer waits forever.
        let mut tx = TxState::new(100, 1 << 20);
        let mut rx = RxState::new(1 << 20);
        tx.commit(100);
        let mut asked = false;
        while let Some(seg) = tx.next_segment(10) {
            if seg.ack_request && !asked {
                asked = true;
                tx.unsend(seg);
                continue;
            }
            rx.on_data(seg.offset, seg.len as u64, seg.ack_request, |_, _| {}).unwrap();
        }
        assert!(asked);
        assert_eq!(tx.space(), 0);
        let c = rx.credit_due().expect("the re-cut segments asked for an acknowledgement");
        assert!(tx.on_credit(c.received, c.limit).unwrap());
        assert!(tx.space() > 0);
    }

    #[test]
    fn a_higher_ack_request_is_not_forgotten_when_a_lower_one_is_answered() {
        // Requests arrive out of order across channels: the one for 300 first, while 0..100
        // is missing, then the one for 100. Answering 100 must leave 300 asked for.
        let mut rx = RxState::new(1 << 20);
        rx.on_data(200, 100, true, |_, _| {}).unwrap();
        rx.on_data(100, 100, false, |_, _| {}).unwrap();
        rx.on_data(0, 100, true, |_, _| {}).unwrap();
        assert_eq!(rx.credit_due().map(|c| c.received), Some(300), "both answered at once");
        let mut rx = RxState::new(1 << 20);
        rx.on_data(200, 100, true, |_, _| {}).unwrap();
        rx.on_data(0, 100, true, |_, _| {}).unwrap();
        assert_eq!(rx.credit_due().map(|c| c.received), Some(100));
        assert_eq!(rx.credit_due(), None, "nothing new");
        rx.on_data(100, 100, false, |_, _| {}).unwrap();
        assert_eq!(rx.credit_due().map(|c| c.received), Some(300), "the request for 300 still stands");
    }

    #[test]
    fn overrun_and_bad_acks_are_errors() {
        let mut rx = RxState::new(100);
        assert!(rx.on_data(90, 20, false, |_, _| {}).is_err());
        rx.on_data(0, 10, false, |_, _| {}).unwrap();
        assert!(rx.on_fin(5).is_err(), "FIN below received data");
        rx.on_fin(10).unwrap();
        assert!(rx.on_data(10, 1, false, |_, _| {}).is_err(), "data beyond FIN");
        assert!(rx.on_fin(11).is_err(), "second FIN differs");

        let mut tx = TxState::new(100, 100);
        tx.commit(50);
        tx.next_segment(20).unwrap();
        assert!(tx.on_credit(30, 200).is_err(), "ack beyond what was sent");
        assert!(tx.on_credit(10, 5).is_err(), "limit below ack");
        assert!(tx.on_credit(20, 200).unwrap());
        // Reordered older CREDIT does not move anything back.
        assert!(!tx.on_credit(10, 150).unwrap());
        assert_eq!(tx.acked(), 20);
        assert_eq!(tx.limit(), 200);
    }

    #[test]
    fn rewind_resends_unacked_and_clip_trims() {
        let mut tx = TxState::new(1000, 1000);
        tx.commit(300);
        let a = tx.next_segment(100).unwrap();
        let _b = tx.next_segment(100).unwrap();
        tx.on_credit(150, 1000).unwrap();
        assert_eq!(tx.clip(a.offset, a.len), None);
        assert_eq!(tx.clip(100, 100), Some((150, 50)));
        tx.rewind();
        let c = tx.next_segment(1000).unwrap();
        assert_eq!((c.offset, c.len), (150, 150));
    }

    #[test]
    fn acks_of_data_sent_before_a_rewind_are_accepted() {
        let mut tx = TxState::new(1000, 1000);
        tx.commit(300);
        tx.next_segment(300).unwrap();
        tx.rewind();
        assert_eq!(tx.scheduled(), 0);
        // The peer had received it all on the channel that later died.
        assert!(tx.on_credit(300, 1000).unwrap());
        assert_eq!(tx.scheduled(), 300, "acknowledged bytes are not sent again");
        assert_eq!(tx.next_segment(100), None);
        assert!(tx.on_credit(301, 1000).is_err());
    }

    #[test]
    fn fin_waits_for_all_data() {
        let mut tx = TxState::new(1000, 1000);
        tx.commit(10);
        tx.shutdown();
        assert_eq!(tx.take_fin(), None);
        tx.next_segment(100).unwrap();
        assert_eq!(tx.take_fin(), Some(10));
        assert_eq!(tx.take_fin(), None);
        assert!(!tx.finished());
        tx.on_credit(10, 1000).unwrap();
        assert!(!tx.finished(), "the FIN itself is not acknowledged yet");
        // The channel that carried the FIN died: it is due again.
        tx.rewind();
        tx.rewind_fin();
        assert_eq!(tx.take_fin(), Some(10));
        assert!(tx.on_fin_received(9).is_err());
        tx.on_fin_received(10).unwrap();
        assert!(tx.finished());
        tx.rewind();
        tx.rewind_fin();
        assert_eq!(tx.take_fin(), None, "an acknowledged FIN is never sent again");
    }

    #[test]
    fn a_fin_that_overtakes_the_data_is_still_acknowledged() {
        // Found by the stream_state fuzz target: FIN first, then segments asking for an
        // acknowledgement of an earlier offset must not cancel the FIN's acknowledgement.
        let mut rx = RxState::new(4000);
        rx.on_fin(280).unwrap();
        assert_eq!(rx.credit_due(), None);
        rx.on_data(0, 106, true, |_, _| {}).unwrap();
        assert_eq!(rx.credit_due().map(|c| (c.received, c.fin_received)), Some((106, false)));
        rx.on_data(106, 174, false, |_, _| {}).unwrap();
        assert_eq!(rx.credit_due().map(|c| (c.received, c.fin_received)), Some((280, true)));
        assert_eq!(rx.credit_due(), None);
        // A copy of the FIN (its acknowledgement may have been lost) is acknowledged again.
        rx.on_fin(280).unwrap();
        assert_eq!(rx.credit_due().map(|c| (c.received, c.fin_received)), Some((280, true)));
    }

    #[test]
    fn fin_is_acknowledged_when_complete() {
        let mut rx = RxState::new(1 << 20);
        rx.on_data(50, 50, false, |_, _| {}).unwrap();
        rx.on_fin(100).unwrap();
        assert_eq!(rx.credit_due(), None, "stream not complete yet");
        rx.on_data(0, 50, false, |_, _| {}).unwrap();
        assert_eq!(rx.credit_due(), Some(Credit { received: 100, limit: 1 << 20, fin_received: true }));
        assert_eq!(rx.credit_due(), None);
        rx.consume(100);
        assert!(rx.eof());
    }

    #[test]
    fn a_held_fin_acknowledgement_is_still_owed() {
        let mut rx = RxState::new(1 << 20);
        rx.on_data(0, 100, false, |_, _| {}).unwrap();
        rx.on_fin(100).unwrap();
        assert_eq!(rx.credit_due_holding_fin(), None, "the FIN alone waits for the local FIN");
        assert_eq!(rx.credit_due(), Some(Credit { received: 100, limit: 1 << 20, fin_received: true }));
        assert_eq!(rx.credit_due(), None);
        // A CREDIT due for another reason acknowledges the FIN with it.
        let mut rx = RxState::new(400);
        rx.on_data(0, 400, false, |_, _| {}).unwrap();
        rx.on_fin(400).unwrap();
        let c = rx.credit_due_holding_fin().expect("the window is full");
        assert!(c.fin_received);
        assert_eq!(rx.credit_due(), None);
    }

    #[test]
    fn a_claim_takes_only_new_unclaimed_ranges_and_completes_as_data() {
        let mut rx = RxState::new(1000);
        rx.on_data(100, 100, false, |_, _| {}).unwrap();
        // Over bytes that arrived, or touching none of them but overlapping a claim: refused.
        assert!(!rx.claim(150, 100).unwrap(), "overlaps what arrived");
        assert!(!rx.claim(0, 0).unwrap(), "empty");
        assert!(rx.claim(0, 100).unwrap(), "all new");
        assert!(!rx.claim(50, 10).unwrap(), "overlaps the claim");
        assert!(rx.overlaps_claim(99, 5) && !rx.overlaps_claim(100, 5));
        assert!(rx.claim(200, 100).unwrap(), "adjacent to what arrived");
        assert_eq!(rx.in_order(), 0, "claimed bytes are not readable");
        rx.complete(0, 100, false).unwrap();
        assert_eq!(rx.in_order(), 200);
        assert!(rx.has_claims());
        rx.complete(200, 100, true).unwrap();
        assert_eq!(rx.in_order(), 300);
        assert!(!rx.has_claims());
        // The acknowledgement the completed segment asked for is due.
        assert_eq!(rx.credit_due(), Some(Credit { received: 300, limit: 1000, fin_received: false }));
    }

    #[test]
    fn a_released_claim_can_be_claimed_again_and_claims_obey_credit_and_fin() {
        let mut rx = RxState::new(1000);
        assert!(rx.claim(0, 500).unwrap());
        rx.release(0, 500);
        assert!(!rx.has_claims());
        assert_eq!(rx.in_order(), 0, "released bytes did not arrive");
        assert!(rx.claim(0, 500).unwrap(), "free to claim again");
        assert!(rx.claim(900, 200).is_err(), "beyond the credit granted");
        // A FIN below a claimed end contradicts the DATA being read.
        assert!(rx.on_fin(400).is_err());
        rx.on_fin(600).unwrap();
        assert!(rx.claim(550, 100).is_err(), "beyond the FIN");
        rx.complete(0, 500, false).unwrap();
        rx.on_data(500, 100, false, |_, _| {}).unwrap();
        assert_eq!(rx.credit_due().map(|c| c.fin_received), Some(true));
    }
}
