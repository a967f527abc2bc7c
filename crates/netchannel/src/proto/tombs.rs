//! Tombstones (sans-IO): what answers a late frame for a vsocket that left the table.
//!
//! A vsocket leaves its host's table once both halves are finished or failed; frames of it
//! may still arrive afterwards: copies sent again after a channel died, a FIN whose
//! acknowledgement was lost with a channel, or anything of a vsocket this host gave up (a
//! RESET lost, the peer given up while the peer kept waiting). [`Tombstones`] remembers the
//! last vsockets that left (bounded: the oldest are forgotten first) and says what each late
//! frame is answered with ([`Tombstones::answer`]): a FIN of a stream that ended cleanly is
//! acknowledged again, anything else of a vsocket that ended badly gets one RESET, so the
//! peer's vsocket fails instead of waiting forever; late copies of a clean stream get
//! nothing. A copy of the OPEN that opened a vsocket which has left already (sent again
//! after a channel died, arriving after the whole short exchange) is found by the peer's id
//! ([`Tombstones::answer_open`]) and opens nothing. The engine sends what it returns.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

use crate::wire::{Frame, Reason};

/// Vsockets a host remembers after they left its table, by default.
pub const TOMBSTONES: usize = 16 << 10;

/// The message of the RESET that answers a late frame of a vsocket that ended badly.
pub const GONE: &str = "the vsocket no longer exists on this host";

/// How a vsocket that left the table ended, as far as its late frames care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Cleanly: both FINs exchanged and acknowledged, no error. The final offset of the
    /// stream received.
    Clean(u64),
    /// With an error, or before its streams were complete: the peer's late frames get a RESET.
    Failed,
    /// Failed, and a late frame got its RESET already: nothing more is said.
    ResetSent,
}

/// A vsocket that left the table, as much as is needed to answer its peer's late frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tomb<P> {
    /// The peer host (its key in the engine).
    pub peer: P,
    /// The peer's id for the vsocket.
    pub remote: u32,
    /// How it ended.
    pub end: End,
}

impl<P> Tomb<P> {
    /// The tomb of a vsocket that ended cleanly at `clean_end` (the final offset received),
    /// or badly (`None`).
    pub fn new(peer: P, remote: u32, clean_end: Option<u64>) -> Self {
        Tomb { peer, remote, end: clean_end.map_or(End::Failed, End::Clean) }
    }
}

/// A frame for a vsocket that is not in the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stale {
    /// DATA ending at this offset.
    Data(u64),
    /// A CREDIT.
    Credit,
    /// FIN at this offset.
    Fin(u64),
    /// An OPEN (a copy of the one that opened the vsocket).
    Open,
}

/// The frame that answers a late frame, to the peer's vsocket `remote`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The peer's id for the vsocket (the key that picks the channel, as for its other
    /// control frames).
    pub remote: u32,
    /// A CREDIT acknowledging the FIN again, or a RESET.
    pub frame: Frame<'static>,
}

/// Recently retired vsockets, by local id (bounded: oldest forgotten first).
///
/// Invariants: `order` holds each key of `map` exactly once, oldest first; `by_remote` maps
/// the (peer, peer's id) of each tomb in `map` to its local id, and nothing else.
#[derive(Debug, Clone)]
pub struct Tombstones<P> {
    map: HashMap<u32, Tomb<P>>,
    order: VecDeque<u32>,
    by_remote: HashMap<(P, u32), u32>,
    /// Most tombs held.
    cap: usize,
}

impl<P: Hash + Eq + Clone> Default for Tombstones<P> {
    fn default() -> Self {
        Tombstones::new(TOMBSTONES)
    }
}

impl<P: Hash + Eq + Clone> Tombstones<P> {
    /// A table that holds at most `cap` tombs.
    pub fn new(cap: usize) -> Self {
        Tombstones { map: HashMap::new(), order: VecDeque::new(), by_remote: HashMap::new(), cap }
    }

    /// Tombs held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether no tomb is held.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The tomb of local vsocket `id`, if it is still remembered.
    pub fn get(&self, id: u32) -> Option<&Tomb<P>> {
        self.map.get(&id)
    }

    /// Remember local vsocket `id`, which left the table (a second burial of the same id
    /// replaces the first, and makes it the newest). The oldest tomb is forgotten when the
    /// table is full.
    pub fn bury(&mut self, id: u32, tomb: Tomb<P>) {
        if let Some(old) = self.map.remove(&id) {
            self.order.retain(|&x| x != id);
            self.unindex(&old, id);
        }
        self.by_remote.insert((tomb.peer.clone(), tomb.remote), id);
        self.map.insert(id, tomb);
        self.order.push_back(id);
        while self.order.len() > self.cap {
            if let Some(old) = self.order.pop_front() {
                if let Some(t) = self.map.remove(&old) {
                    self.unindex(&t, old);
                }
            }
        }
    }

    /// Drop the `by_remote` entry of `tomb`, just taken out of `map`, if it still names
    /// local id `id` (a newer tomb of the same peer's id keeps its own).
    fn unindex(&mut self, tomb: &Tomb<P>, id: u32) {
        let key = (tomb.peer.clone(), tomb.remote);
        if self.by_remote.get(&key) == Some(&id) {
            self.by_remote.remove(&key);
        }
    }

    /// An OPEN arrived from `peer` whose vsocket `remote` opened one of this table's tombs:
    /// `None` when no tomb knows it (the OPEN is new), else `Some` with what answers the
    /// copy ([`Tombstones::answer`] of a [`Stale::Open`]: nothing after a clean end, one
    /// RESET after a bad one). The copy opens nothing either way.
    pub fn answer_open(&mut self, peer: &P, remote: u32) -> Option<Option<Answer>> {
        let id = *self.by_remote.get(&(peer.clone(), remote))?;
        Some(self.answer(peer, id, Stale::Open))
    }

    /// A frame `what` arrived from `peer` for local vsocket `id`, which is not in the table:
    /// the frame that answers it, if any. A FIN of a clean end is acknowledged again (the
    /// acknowledgement was lost); late copies of a clean stream get nothing; anything else
    /// of a vsocket that ended badly, or that contradicts its clean end, gets one RESET
    /// (later frames then get nothing). Frames of an id this table does not know, or that
    /// come from another peer than the vsocket's, get nothing.
    pub fn answer(&mut self, peer: &P, id: u32, what: Stale) -> Option<Answer> {
        let tomb = self.map.get_mut(&id).filter(|t| t.peer == *peer)?;
        let frame = match (what, tomb.end) {
            (Stale::Fin(off), End::Clean(end)) if off == end => {
                Some(Frame::Credit { vsock: tomb.remote, received: end, limit: end, fin_received: true })
            }
            (Stale::Data(e), End::Clean(end)) if e <= end => None,
            (Stale::Credit | Stale::Open, End::Clean(_)) => None,
            (_, End::ResetSent) => None,
            _ => {
                tomb.end = End::ResetSent;
                Some(Frame::Reset { vsock: tomb.remote, reason: Reason::Closed, message: GONE })
            }
        }?;
        Some(Answer { remote: tomb.remote, frame })
    }

    /// A channel to `peer` died: what each of its tombs said last may have been lost with it
    /// (written after the peer learnt of the death, into a connection nobody reads), and no
    /// live vsocket is left to say it again, as [`crate::proto::stream::RxState::recovery_credit`]
    /// does for the live ones. The frames that say it again, one per tomb of `peer`: a clean
    /// end acknowledges its peer's FIN again, a bad end sends its RESET again (a copy the peer
    /// has seen changes nothing: its vsocket is finished or gone). Without them a peer whose
    /// FIN's acknowledgement was lost so would wait for it as long as its channels live.
    /// At most one frame per tomb held, and only when a channel dies.
    pub fn last_words(&self, peer: &P) -> Vec<Answer> {
        self.order
            .iter()
            .filter_map(|id| self.map.get(id))
            .filter(|t| t.peer == *peer)
            .map(|t| Answer {
                remote: t.remote,
                frame: match t.end {
                    End::Clean(end) => {
                        Frame::Credit { vsock: t.remote, received: end, limit: end, fin_received: true }
                    }
                    End::Failed | End::ResetSent => {
                        Frame::Reset { vsock: t.remote, reason: Reason::Closed, message: GONE }
                    }
                },
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_bounded_and_forgets_the_oldest_first() {
        let mut t = Tombstones::new(3);
        for id in 1..=5 {
            t.bury(id, Tomb::new(0u8, 100 + id, None));
        }
        assert_eq!(t.len(), 3);
        assert!(t.get(1).is_none() && t.get(2).is_none(), "the oldest two are forgotten");
        assert_eq!(t.get(3).map(|x| x.remote), Some(103));
        // Burying an id again makes it the newest: 4 is the oldest now.
        t.bury(3, Tomb::new(0u8, 203, Some(7)));
        t.bury(6, Tomb::new(0u8, 106, None));
        assert_eq!(t.len(), 3);
        assert!(t.get(4).is_none());
        assert_eq!(t.get(3).map(|x| (x.remote, x.end)), Some((203, End::Clean(7))));
        assert!(t.get(5).is_some() && t.get(6).is_some());
    }

    #[test]
    fn a_clean_end_acknowledges_its_fin_again_and_ignores_late_copies() {
        let mut t = Tombstones::new(8);
        t.bury(1, Tomb::new(0u8, 9, Some(500)));
        let ack = Answer {
            remote: 9,
            frame: Frame::Credit { vsock: 9, received: 500, limit: 500, fin_received: true },
        };
        assert_eq!(t.answer(&0, 1, Stale::Fin(500)), Some(ack.clone()));
        assert_eq!(t.answer(&0, 1, Stale::Fin(500)), Some(ack), "every copy of the FIN");
        assert_eq!(t.answer(&0, 1, Stale::Data(500)), None);
        assert_eq!(t.answer(&0, 1, Stale::Data(10)), None);
        assert_eq!(t.answer(&0, 1, Stale::Credit), None);
        assert_eq!(t.get(1).map(|x| x.end), Some(End::Clean(500)));
    }

    #[test]
    fn a_bad_end_or_a_contradiction_gets_one_reset() {
        let reset = Some(Answer {
            remote: 9,
            frame: Frame::Reset { vsock: 9, reason: Reason::Closed, message: GONE },
        });
        let mut t = Tombstones::new(8);
        t.bury(1, Tomb::new(0u8, 9, None));
        assert_eq!(t.answer(&0, 1, Stale::Credit), reset);
        assert_eq!(t.answer(&0, 1, Stale::Data(3)), None, "one RESET, then nothing");
        assert_eq!(t.answer(&0, 1, Stale::Fin(3)), None);
        // DATA past the clean end, or a FIN at another offset, contradicts it.
        t.bury(2, Tomb::new(0u8, 9, Some(100)));
        assert_eq!(t.answer(&0, 2, Stale::Data(101)), reset);
        t.bury(3, Tomb::new(0u8, 9, Some(100)));
        assert_eq!(t.answer(&0, 3, Stale::Fin(99)), reset);
        assert_eq!(t.len(), 3, "answered tombs stay, so the order stays exact");
    }

    #[test]
    fn unknown_ids_and_other_peers_get_nothing() {
        let mut t = Tombstones::new(8);
        t.bury(1, Tomb::new(0u8, 9, None));
        assert_eq!(t.answer(&0, 2, Stale::Credit), None);
        assert_eq!(t.answer(&1, 1, Stale::Credit), None, "another peer's frame");
        assert_eq!(t.get(1).map(|x| x.end), Some(End::Failed), "left as it was");
    }

    #[test]
    fn a_copy_of_an_open_is_found_by_the_peers_id_and_opens_nothing() {
        let mut t = Tombstones::new(2);
        assert_eq!(t.answer_open(&0u8, 9), None, "an OPEN no tomb knows is new");
        t.bury(1, Tomb::new(0u8, 9, Some(500)));
        t.bury(2, Tomb::new(0u8, 10, None));
        assert_eq!(t.answer_open(&0, 9), Some(None), "a clean end: nothing said, nothing opened");
        assert_eq!(t.answer_open(&1, 9), None, "another peer's vsocket 9 is another vsocket");
        let reset =
            Answer { remote: 10, frame: Frame::Reset { vsock: 10, reason: Reason::Closed, message: GONE } };
        assert_eq!(t.answer_open(&0, 10), Some(Some(reset)), "a bad end: one RESET");
        assert_eq!(t.answer_open(&0, 10), Some(None), "then nothing");
        // Forgetting a tomb forgets its peer's id too; burying the same local id again with
        // another peer's id files it under the new one only.
        t.bury(3, Tomb::new(0u8, 11, Some(1)));
        assert_eq!(t.answer_open(&0, 9), None, "tomb 1 was the oldest: forgotten");
        t.bury(3, Tomb::new(0u8, 12, Some(1)));
        assert_eq!(t.answer_open(&0, 11), None);
        assert_eq!(t.answer_open(&0, 12), Some(None));
        assert_eq!(t.by_remote.len(), t.len(), "one index entry per tomb");
    }

    #[test]
    fn a_lost_channel_makes_every_tomb_of_its_peer_say_its_last_word_again() {
        let mut t = Tombstones::new(8);
        t.bury(1, Tomb::new(0u8, 9, Some(500)));
        t.bury(2, Tomb::new(0u8, 10, None));
        t.bury(3, Tomb::new(1u8, 11, Some(7)));
        assert!(t.answer(&0, 2, Stale::Credit).is_some());
        let words = t.last_words(&0);
        assert_eq!(
            words,
            vec![
                Answer {
                    remote: 9,
                    frame: Frame::Credit { vsock: 9, received: 500, limit: 500, fin_received: true }
                },
                Answer {
                    remote: 10,
                    frame: Frame::Reset { vsock: 10, reason: Reason::Closed, message: GONE }
                },
            ],
            "peer 0's tombs, oldest first; a RESET already sent is sent again"
        );
        assert_eq!(t.last_words(&2), vec![]);
    }
}
