//! Listener announcements (`wire`: LISTEN, UNLISTEN, LISTEN_SET): this host tells every
//! peer which vsocket ports it listens on, and keeps what each peer told it.
//!
//! Sending: every bind and every close of a port's last listener takes a sequence number
//! from one host-wide counter (under the listener table's lock, so the order of the
//! numbers is the order of the changes) and is sent to every peer with a channel up; every
//! channel that joins a peer's mesh carries a LISTEN_SET with the whole current set, so
//! that an announcement a dead channel lost is replaced when a channel comes back, and a
//! peer that reconnects (or restarts) learns the set anew.
//!
//! Receiving ([`Announced`]): per peer, the newest announcement per port, by sequence.
//!
//! Semantics for connects (`vsock::VStream::connect_start_in`): a confirmed connect to a
//! port the peer announced does not wait for OPEN_OK — its OPEN leaves with the first
//! bytes, within the credit the LISTEN granted, and a refusal (the listener closed while
//! its UNLISTEN was in flight, or its backlog was full) fails the first read or write with
//! `ConnectionRefused`. A connect to a port not announced waits for the answer as before:
//! the set is never taken as complete (a LISTEN may be in flight behind the OPEN, on
//! another channel, or not yet sent on a channel that just came up), so nothing is refused
//! locally.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::peer::Peer;
use super::HostInner;
use crate::engine::vsocket::VSock;
use crate::wire::{Class, Frame};

/// The listening ports a peer announced (LISTEN, UNLISTEN, LISTEN_SET; see the `wire`
/// module docs), as applied so far. Announcements come over several channels and may arrive
/// out of order: each carries the sender's sequence, and one is applied to a port only if
/// it is newer than what that port has. A withdrawn port keeps its sequence (so that a late
/// LISTEN does not bring it back) until a LISTEN_SET makes it moot.
///
/// What this holds is a hint: a port missing here may listen (its LISTEN still in flight),
/// and a port here may have closed a moment ago. A connect uses it only to skip the round
/// trip to a port held here; it never refuses on a port's absence.
#[derive(Debug, Default)]
pub(crate) struct Announced {
    /// The sequence of the newest LISTEN_SET applied: anything older is superseded.
    floor: u64,
    /// Per port: the sequence of its newest announcement, and the credit it grants an OPEN
    /// (`None`: withdrawn).
    ports: HashMap<u16, (u64, Option<u64>)>,
}

impl Announced {
    /// A LISTEN: `port` listens and grants an OPEN `credit` bytes.
    pub(crate) fn listen(&mut self, port: u16, seq: u64, credit: u64) {
        self.apply(port, seq, Some(credit));
    }

    /// An UNLISTEN: `port` no longer listens.
    pub(crate) fn unlisten(&mut self, port: u16, seq: u64) {
        self.apply(port, seq, None);
    }

    /// A LISTEN_SET: the sender's whole set follows with `seq`; everything older goes.
    pub(crate) fn set(&mut self, seq: u64) {
        if seq <= self.floor {
            return;
        }
        self.floor = seq;
        self.ports.retain(|_, (s, _)| *s >= seq);
    }

    fn apply(&mut self, port: u16, seq: u64, credit: Option<u64>) {
        if seq < self.floor {
            return;
        }
        match self.ports.get(&port) {
            Some(&(s, _)) if s >= seq => {}
            _ => {
                self.ports.insert(port, (seq, credit));
            }
        }
    }

    /// The credit an OPEN to `port` may carry, if the peer announced that it listens there.
    pub(crate) fn grant(&self, port: u16) -> Option<u64> {
        self.ports.get(&port).and_then(|&(_, credit)| credit)
    }

    /// The ports announced as listening, in order.
    pub(crate) fn listening(&self) -> Vec<u16> {
        let mut v: Vec<u16> = self.ports.iter().filter(|(_, (_, c))| c.is_some()).map(|(&p, _)| p).collect();
        v.sort_unstable();
        v
    }
}

impl HostInner {
    /// The next announcement sequence. Called with the listener table locked.
    fn next_announcement(&self) -> u64 {
        self.announce_seq.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// The LISTEN for `port`, just bound. Called with the listener table locked; the frame
    /// goes to the peers with [`HostInner::announce`] once it is let go.
    pub(crate) fn listen_frame(&self, port: u16) -> Frame<'static> {
        Frame::Listen { port, seq: self.next_announcement(), credit: self.cfg.open_credit as u64 }
    }

    /// The UNLISTEN for `port`, whose last listener just closed (listener table locked).
    pub(crate) fn unlisten_frame(&self, port: u16) -> Frame<'static> {
        Frame::Unlisten { port, seq: self.next_announcement() }
    }

    /// The whole set, to send on a channel that just joined a peer's mesh: LISTEN_SET, then
    /// a LISTEN per listening port, all with one new sequence.
    pub(crate) fn listen_set_frames(&self) -> Vec<Frame<'static>> {
        if !self.cfg.announce_listeners {
            return Vec::new();
        }
        let listeners = self.listeners.lock().unwrap();
        let seq = self.next_announcement();
        let credit = self.cfg.open_credit as u64;
        let mut ports: Vec<u16> = listeners.keys().copied().collect();
        drop(listeners);
        ports.sort_unstable();
        std::iter::once(Frame::ListenSet { seq })
            .chain(ports.into_iter().map(|port| Frame::Listen { port, seq, credit }))
            .collect()
    }

    /// Send a LISTEN or UNLISTEN to every peer with a channel up. A peer without one gets
    /// the whole set when a channel joins its mesh.
    pub(crate) fn announce(&self, frame: &Frame<'_>) {
        if !self.cfg.announce_listeners {
            return;
        }
        let peers: Vec<Arc<Peer>> = self.peers.lock().unwrap().values().cloned().collect();
        for p in peers {
            if !p.is_dead() {
                p.send_control(Class::Throughput, 0, frame);
            }
        }
    }

    /// `vs` holds a frame back for the next one it sends, at most about [`PARK_GRACE`]:
    /// a connect to an announced port its OPEN, for the first bytes (should its app not
    /// write, read, shut down or close in time, the OPEN goes bare, so that a connection the
    /// app opens and then leaves alone still reaches the listener's `accept`, as a TCP
    /// connect does, and a server that speaks first is not kept waiting); the accepting end
    /// of an OPEN that carried bytes its OPEN_OK, for its response (should its app not
    /// answer in time — not accepted yet, or slow — the OPEN_OK goes alone, so the opener
    /// gets the whole window, not only the open credit, as TCP buffers for a listener that
    /// has not accepted yet). `worker` (the vsocket's home channel's) ticks for it.
    ///
    /// [`PARK_GRACE`]: super::channel::PARK_GRACE
    pub(crate) fn owe_frame(&self, vs: &Arc<VSock>, worker: usize) {
        self.owed_opens.lock().unwrap().push((Instant::now(), Arc::downgrade(vs)));
        self.any_owed.store(true, Ordering::SeqCst);
        // Listed first, then the ticking looked at (`channel::keep_ticking` the other way).
        super::channel::start_ticking(self, worker);
    }

    /// Whether a frame may be owed ([`HostInner::owe_frame`]).
    pub(crate) fn opens_owed(&self) -> bool {
        self.any_owed.load(Ordering::SeqCst)
    }

    /// A ticking worker: send the frames owed for at least `at_least`; forget those sent.
    pub(crate) fn send_owed(&self, at_least: Duration) {
        if !self.opens_owed() {
            return;
        }
        let due: Vec<Arc<VSock>> = {
            let mut owed = self.owed_opens.lock().unwrap();
            let mut due = Vec::new();
            owed.retain(|(since, vs)| {
                let Some(vs) = vs.upgrade().filter(|v| v.owes_frame()) else { return false };
                if since.elapsed() >= at_least {
                    due.push(vs);
                    return false;
                }
                true
            });
            self.any_owed.store(!owed.is_empty(), Ordering::SeqCst);
            due
        };
        for vs in due {
            vs.send_owed_frames();
        }
    }

    /// A LISTEN, UNLISTEN or LISTEN_SET arrived from `peer`.
    pub(crate) fn on_announcement(&self, peer: &Peer, frame: &Frame<'_>) {
        let mut a = peer.announced.lock().unwrap();
        match *frame {
            Frame::Listen { port, seq, credit } => a.listen(port, seq, credit),
            Frame::Unlisten { port, seq } => a.unlisten(port, seq),
            Frame::ListenSet { seq } => a.set(seq),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Announced;

    #[test]
    fn announcements_apply_in_sequence_order_per_port() {
        let mut a = Announced::default();
        a.listen(80, 1, 100);
        assert_eq!(a.grant(80), Some(100));
        // bind (1), close (2), bind (3) of one port, arriving 3, 1, 2: the port listens.
        let mut b = Announced::default();
        b.listen(80, 3, 7);
        b.listen(80, 1, 5);
        b.unlisten(80, 2);
        assert_eq!(b.grant(80), Some(7));
        // bind (1), close (2), arriving 2, 1: the port does not listen.
        let mut c = Announced::default();
        c.unlisten(80, 2);
        c.listen(80, 1, 5);
        assert_eq!(c.grant(80), None);
        // Other ports are independent of each other.
        c.listen(81, 1, 5);
        assert_eq!(c.grant(81), Some(5));
        assert_eq!(c.listening(), vec![81]);
    }

    #[test]
    fn a_listen_set_replaces_what_is_older() {
        let mut a = Announced::default();
        a.listen(80, 1, 5);
        a.listen(81, 2, 5);
        // A channel died with the UNLISTEN of 80 (seq 3); the set sent on its successor
        // (seq 5) holds 81 and 82 only.
        a.set(5);
        a.listen(81, 5, 5);
        a.listen(82, 5, 9);
        assert_eq!(a.listening(), vec![81, 82]);
        // Announcements older than the set, arriving late over another channel, are moot.
        a.listen(80, 4, 5);
        a.unlisten(82, 4);
        assert_eq!(a.listening(), vec![81, 82]);
        // An older set arriving after a newer one changes nothing.
        a.set(4);
        a.listen(80, 4, 5);
        assert_eq!(a.listening(), vec![81, 82]);
        // Newer announcements apply.
        a.unlisten(81, 6);
        a.listen(80, 7, 1);
        assert_eq!(a.listening(), vec![80, 82]);
        assert_eq!(a.grant(80), Some(1));
    }
}
