//! NetDriver, channel loss and recovery: what happens when a channel to a peer dies.
//!
//! * One channel dies, others live: every vsocket of the peer sends its unacknowledged bytes
//!   (and an unacknowledged FIN) again on the others and re-announces its credit
//!   ([`VSock::recover`]); nothing is lost, because the receiver acknowledges by offset.
//! * The host that dialed the mesh dials every lost channel again, with exponential backoff
//!   (`reconnect_backoff_ms` doubling up to `reconnect_backoff_max_ms`), from a watcher thread
//!   per peer. The accepting host waits for it.
//! * Every channel down: vsockets wait; when the first channel is back they recover. Only
//!   when every channel has been down longer than `peer_down_timeout_ms` does the peer fail,
//!   its vsockets with `ConnectionReset` naming it. A peer that announced an orderly shutdown
//!   fails at once; one that answers a re-dial with a new host id has restarted, and its old
//!   vsockets fail at once too.
//! * Frames that arrive for a vsocket this host no longer has (a RESET or a FIN
//!   acknowledgement was lost with a channel, or this host gave the peer up while the peer
//!   kept waiting) are answered from a bounded table of *tombstones* (`proto::tombs`, which
//!   decides the answer; this module sends it): a FIN of a stream that ended cleanly is
//!   acknowledged again, anything else of a vsocket that ended badly gets a RESET, so the
//!   peer's vsocket fails instead of waiting forever.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use crate::engine::channel::{self, Channel};
use crate::engine::peer::Peer;
use crate::engine::vsocket::VSock;
use crate::engine::HostInner;
use crate::proto::tombs::{Stale, Tomb};
use crate::wire::Class;

/// Longest one attempt to dial a lost channel may take.
const REDIAL_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest a watcher sleeps at once, so that it sees the host shut down promptly.
const WATCH_TICK: Duration = Duration::from_millis(50);
fn class_name(c: Class) -> &'static str {
    match c {
        Class::Throughput => "throughput",
        Class::Latency => "latency",
    }
}

impl HostInner {
    /// A channel to `peer` died and its worker let go of it.
    pub(crate) fn on_channel_down(
        self: &Arc<Self>,
        peer: &Arc<Peer>,
        ch: &Arc<Channel>,
        why: &channel::Down,
    ) {
        let reason = tracing::field::display(why);
        let _span = ch.span(peer.key).entered();
        let left = peer.remove_channel(ch);
        if self.is_closing() || peer.is_dead() {
            return;
        }
        if matches!(why, channel::Down::PeerShutdown) {
            // The peer host said it is going away: its vsockets cannot come back.
            if left == 0 {
                tracing::info!(reason, "every channel to the peer is down");
            }
            self.retire_peer(peer, &why.to_string());
            return;
        }
        if left == 0 && !peer.recovery.dialer.load(Ordering::Acquire) && self.peer_vsocks(peer).is_empty() {
            // Nothing waits for a peer that dialed us and has no vsocket: forget it now
            // rather than hold it (and a watcher thread) for `peer_down_timeout_ms`; it dials
            // again when it needs to. Bounds what fake peers that connect and go cost.
            peer.set_state(crate::engine::peer::PeerState::Dead("every channel closed".into()));
            self.forget_peer(peer);
            peer.take_parked();
            return;
        }
        if left == 0 {
            {
                let mut since = peer.recovery.down_since.lock().unwrap();
                since.get_or_insert_with(Instant::now);
            }
            peer.recovery.needs_recover.store(true, Ordering::Release);
            tracing::warn!(
                reason,
                wait_ms = self.cfg.peer_down_timeout.as_millis() as u64,
                "every channel to the peer is down; its vsockets wait for one to come back"
            );
            // A channel added meanwhile may have missed the flag: recover now if one is up.
            if peer.channel_count() > 0 && peer.recovery.needs_recover.swap(false, Ordering::AcqRel) {
                self.recover_vsockets(peer);
            }
        } else {
            tracing::info!(reason, left, "channel down; the channels left carry its unacknowledged segments");
            self.recover_vsockets(peer);
        }
        self.watch_peer(peer);
    }

    /// A channel joined `peer`'s mesh: if every channel had been down, frames may have been
    /// lost with them, so the peer's vsockets recover on it.
    pub(crate) fn on_channel_up(self: &Arc<Self>, peer: &Arc<Peer>) {
        *peer.recovery.down_since.lock().unwrap() = None;
        if peer.recovery.needs_recover.swap(false, Ordering::AcqRel) {
            tracing::info!(peer = %peer.key, "a channel to the peer is back: its vsockets go on");
            self.recover_vsockets(peer);
        } else {
            // The answer to an OPEN can be lost on a channel the peer has not yet seen die,
            // after this host already sent its last OPEN: connects still waiting ask again.
            for v in self.peer_vsocks(peer) {
                v.reopen_if_connecting();
            }
        }
    }

    /// Every vsocket of `peer` sends again what a dead channel may have lost.
    fn recover_vsockets(&self, peer: &Arc<Peer>) {
        for v in self.peer_vsocks(peer) {
            v.recover();
        }
        // And the vsockets that left the table say their last word again.
        let words = self.tombstones.lock().unwrap().last_words(&peer.tomb_key());
        for a in words {
            peer.send_control(Class::Latency, a.remote, &a.frame);
        }
    }

    /// Start the peer's watcher thread unless one runs: it dials lost channels again (if this
    /// host dialed them) and gives the peer up after `peer_down_timeout_ms` without channels.
    pub(crate) fn watch_peer(self: &Arc<Self>, peer: &Arc<Peer>) {
        if peer.recovery.watching.swap(true, Ordering::AcqRel) {
            return;
        }
        let host = Arc::downgrade(self);
        let p = peer.clone();
        let spawned = std::thread::Builder::new().name("nc-peer-watch".into()).spawn(move || watch(host, p));
        if let Err(e) = spawned {
            peer.recovery.watching.store(false, Ordering::Release);
            tracing::error!(peer = %peer.key, error = %e, "cannot start the watcher of the peer's channels");
        }
    }

    /// Whether `peer` lacks channels that a watcher should bring back or time out.
    fn peer_needs_watch(&self, peer: &Peer) -> bool {
        if self.is_closing() || peer.is_dead() {
            return false;
        }
        peer.channel_count() == 0
            || (peer.recovery.dialer.load(Ordering::Acquire)
                && self.channel_plan().any(|(c, i)| !peer.has_channel(c, i)))
    }

    /// Every channel of a mesh this host dials: throughput first, then latency.
    pub(crate) fn channel_plan(&self) -> impl Iterator<Item = (Class, u16)> {
        (0..self.cfg.throughput_channels as u16)
            .map(|i| (Class::Throughput, i))
            .chain((0..self.cfg.latency_channels as u16).map(|i| (Class::Latency, i)))
    }

    /// One round of the watcher: the pause before the next, or `None` when it is done.
    fn watch_step(self: &Arc<Self>, peer: &Arc<Peer>, backoff: &mut Option<Duration>) -> Option<Duration> {
        if !self.peer_needs_watch(peer) {
            return None;
        }
        if peer.recovery.dialer.load(Ordering::Acquire) {
            let missing: Vec<_> = self.channel_plan().filter(|&(c, i)| !peer.has_channel(c, i)).collect();
            for (class, index) in missing {
                match self.redial(peer, class, index) {
                    Ok(true) => *backoff = None,
                    Ok(false) => return None,
                    Err(e) => {
                        // The first failure of an outage is said; the retries that follow
                        // (with backoff) only at debug level.
                        if backoff.is_none() {
                            tracing::warn!(
                                class = class_name(class),
                                index,
                                peer = %peer.key,
                                error = %e,
                                "dialing a lost channel again failed; retrying with backoff"
                            );
                        } else {
                            tracing::debug!(
                                class = class_name(class),
                                index,
                                error = %e,
                                "dialing a lost channel again failed"
                            );
                        }
                        break;
                    }
                }
            }
            if !self.peer_needs_watch(peer) {
                return None;
            }
        }
        let since = *peer.recovery.down_since.lock().unwrap();
        let timeout = self.cfg.peer_down_timeout;
        let left = match since {
            Some(t) if peer.channel_count() == 0 => {
                let left = timeout.saturating_sub(t.elapsed());
                if left.is_zero() {
                    let why = format!(
                        "every channel has been down for more than {} ms (peer_down_timeout_ms)",
                        timeout.as_millis()
                    );
                    tracing::warn!(why = %why, "giving up the peer host");
                    self.retire_peer(peer, &why);
                    return None;
                }
                left
            }
            _ => Duration::MAX,
        };
        let next =
            backoff.map_or(self.cfg.reconnect_backoff, |b| (b * 2).min(self.cfg.reconnect_backoff_max));
        *backoff = Some(next);
        Some(next.min(left))
    }

    /// Dial one lost channel. `Ok(false)`: the peer restarted meanwhile and was given up.
    fn redial(self: &Arc<Self>, peer: &Arc<Peer>, class: Class, index: u16) -> io::Result<bool> {
        let deadline = Instant::now() + self.cfg.connect_timeout.min(REDIAL_TIMEOUT);
        let (s, id) = self.dial(peer, class, index, deadline)?;
        let known = peer.host_id.load(Ordering::Relaxed);
        if known != 0 && id != known {
            let _ = s.shutdown(std::net::Shutdown::Both);
            tracing::warn!(peer = %peer.key, "the peer host restarted (new host id): its vsockets are reset");
            self.retire_peer(peer, "the peer host restarted");
            return Ok(false);
        }
        self.add_channel(peer, s, class, index)?;
        self.totals.channels_redialed.fetch_add(1, Ordering::Relaxed);
        tracing::info!(peer = %peer.key, class = class_name(class), index, "channel is back");
        Ok(true)
    }

    /// The tomb that remembers a vsocket leaving the table, to answer its peer's late
    /// frames (none for one the peer never knew: no remote id).
    pub(crate) fn tomb_of(&self, vs: &VSock) -> Option<Tomb<(std::net::SocketAddr, u64)>> {
        let remote = vs.remote_id();
        (remote != 0).then(|| Tomb::new(vs.peer.tomb_key(), remote, vs.clean_end()))
    }

    /// A frame arrived from `peer` for vsocket `id`, which is not in the table: send what
    /// its tombstone answers ([`crate::proto::tombs::Tombstones::answer`]).
    pub(crate) fn on_stale_frame(&self, peer: &Peer, id: u32, what: Stale) {
        let answer = self.tombstones.lock().unwrap().answer(&peer.tomb_key(), id, what);
        if let Some(a) = answer {
            peer.send_control(Class::Latency, a.remote, &a.frame);
        }
    }
}

/// The watcher thread of one peer.
fn watch(host: Weak<HostInner>, peer: Arc<Peer>) {
    let _span = peer.span().entered();
    let mut backoff = None;
    loop {
        let pause = host.upgrade().and_then(|h| h.watch_step(&peer, &mut backoff));
        match pause {
            Some(d) => {
                let until = Instant::now() + d;
                loop {
                    let now = Instant::now();
                    let closing = match host.upgrade() {
                        Some(h) => h.is_closing(),
                        None => true,
                    };
                    if now >= until || closing {
                        break;
                    }
                    std::thread::sleep((until - now).min(WATCH_TICK));
                }
            }
            None => {
                peer.recovery.watching.store(false, Ordering::Release);
                // A channel may have died after the last look, while this thread still held
                // the flag: look once more.
                let again = host.upgrade().is_some_and(|h| h.peer_needs_watch(&peer));
                if again && !peer.recovery.watching.swap(true, Ordering::AcqRel) {
                    continue;
                }
                return;
            }
        }
    }
}
