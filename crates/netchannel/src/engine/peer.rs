//! NetDriver, per peer host: the channel mesh to one peer, channel choice for segments and
//! control frames, and the vsockets parked until a channel has room.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Instant;

use crate::config::Config;
use crate::engine::channel::Channel;
use crate::engine::vsocket::VSock;
use crate::proto::sched::{self, Load};
use crate::wire::{Class, Frame};

/// Where a peer's mesh stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PeerState {
    /// Channels are being dialed.
    Dialing,
    /// At least one channel is up.
    Up,
    /// Every channel is down; the message says why.
    Dead(String),
}

/// One peer host as the NetDriver sees it.
pub(crate) struct Peer {
    /// The peer's channel address (its IP and the port it accepts channels on).
    pub key: SocketAddr,
    /// Our IP on the channels to this peer.
    pub local_ip: Mutex<Option<IpAddr>>,
    /// The peer's host id (changes when it restarts); 0 until known.
    pub host_id: AtomicU64,
    /// Live channels, kept per class so that choosing one allocates nothing.
    mesh: RwLock<[Vec<Arc<Channel>>; 2]>,
    cursors: [AtomicUsize; 2],
    /// Vsockets waiting for a channel with room, with the class whose channels they wait for.
    blocked: Mutex<Vec<(Class, Arc<VSock>)>>,
    pub state: Mutex<PeerState>,
    pub state_cv: Condvar,
    cap: usize,
    policy: crate::Policy,
    /// Channel loss and recovery (see `engine::recovery`).
    pub recovery: Recovery,
    /// The vsocket ports this peer announced it listens on (`wire`: LISTEN).
    pub announced: Mutex<super::announce::Announced>,
}

/// What the NetDriver tracks to bring a peer's channels back after they die.
#[derive(Default)]
pub(crate) struct Recovery {
    /// This host dialed the mesh, so it is the one that dials lost channels again.
    pub dialer: AtomicBool,
    /// Since when every channel has been down; `None` while one is up.
    pub down_since: Mutex<Option<Instant>>,
    /// Every channel went down: frames may have been lost with them, so the peer's vsockets
    /// recover as soon as one is back.
    pub needs_recover: AtomicBool,
    /// A watcher thread is dialing lost channels or timing the peer out.
    pub watching: AtomicBool,
    /// Held while an OPEN is handled, so a re-sent copy never opens a second vsocket.
    pub opening: Mutex<()>,
}

impl Peer {
    /// The span of work done for this peer host: its channel address as a field.
    pub fn span(&self) -> tracing::Span {
        tracing::error_span!("peer", addr = %self.key)
    }

    pub(crate) fn new(key: SocketAddr, cfg: &Config, state: PeerState) -> Arc<Peer> {
        Arc::new(Peer {
            key,
            local_ip: Mutex::new(None),
            host_id: AtomicU64::new(0),
            mesh: RwLock::new([Vec::new(), Vec::new()]),
            cursors: [AtomicUsize::new(0), AtomicUsize::new(0)],
            blocked: Mutex::new(Vec::new()),
            state: Mutex::new(state),
            state_cv: Condvar::new(),
            cap: cfg.channel_queue,
            policy: cfg.policy,
            recovery: Recovery::default(),
            announced: Mutex::new(super::announce::Announced::default()),
        })
    }

    /// What this peer's tombstones are filed under: its address and its host id, so that
    /// a restarted peer (a new host id, its vsocket ids counting from 1 again) never meets
    /// the tombs of its previous run.
    pub(crate) fn tomb_key(&self) -> (SocketAddr, u64) {
        (self.key, self.host_id.load(Ordering::Relaxed))
    }

    pub(crate) fn set_state(&self, s: PeerState) {
        *self.state.lock().unwrap() = s;
        self.state_cv.notify_all();
    }

    pub(crate) fn is_dead(&self) -> bool {
        matches!(*self.state.lock().unwrap(), PeerState::Dead(_))
    }

    /// A new channel joins the mesh.
    pub(crate) fn add_channel(&self, ch: Arc<Channel>) {
        self.mesh.write().unwrap()[ch.class as usize].push(ch);
    }

    /// How many channels are in the mesh.
    pub(crate) fn channel_count(&self) -> usize {
        self.mesh.read().unwrap().iter().map(Vec::len).sum()
    }

    /// Whether a channel of `class` with `index` is in the mesh.
    pub(crate) fn has_channel(&self, class: Class, index: u16) -> bool {
        self.mesh.read().unwrap()[class as usize].iter().any(|c| c.index == index)
    }

    /// Every channel (a snapshot), throughput first.
    pub(crate) fn channels(&self) -> Vec<Arc<Channel>> {
        self.mesh.read().unwrap().iter().flatten().cloned().collect()
    }

    /// Take every channel out of the mesh.
    pub(crate) fn take_channels(&self) -> Vec<Arc<Channel>> {
        self.mesh.write().unwrap().iter_mut().flat_map(std::mem::take).collect()
    }

    /// Run `f` on the channels of `class`, or of the other class if it has none.
    fn with_class<T>(&self, class: Class, f: impl FnOnce(&[Arc<Channel>]) -> T) -> T {
        let mesh = self.mesh.read().unwrap();
        let mine = &mesh[class as usize];
        f(if mine.is_empty() { &mesh[1 - class as usize] } else { mine })
    }

    /// The channel for the next segment of a vsocket whose home key is `home` (see
    /// [`sched::home`]), or `None` if every channel is full. A `small` segment goes to the
    /// home channel while it has room, so that a small vsocket's frames stay on one channel.
    pub(crate) fn pick_segment_channel(&self, class: Class, home: u32, small: bool) -> Option<Arc<Channel>> {
        self.with_class(class, |chans| {
            let load = |i: usize| {
                let c = &chans[i];
                if c.up.load(Ordering::Acquire) {
                    Load::Queued(c.queued.load(Ordering::Relaxed))
                } else {
                    Load::Down
                }
            };
            if small {
                if let Some(i) = sched::pick_small(home, chans.len(), load, self.cap) {
                    return Some(chans[i].clone());
                }
            }
            let vsock = home;
            let cursor = &self.cursors[class as usize];
            let mut pos = cursor.load(Ordering::Relaxed);
            let i = sched::pick_with(self.policy, &mut pos, vsock, chans.len(), load, self.cap)?;
            cursor.store(pos, Ordering::Relaxed);
            Some(chans[i].clone())
        })
    }

    /// A channel for a control frame of a vsocket in `class` whose home key is `home`:
    /// control frames go ahead of segments in a channel's queue, so the vsocket's home
    /// channel (or the next live one) carries them, beside its small segments.
    pub(crate) fn control_channel(&self, class: Class, home: u32) -> Option<Arc<Channel>> {
        self.with_class(class, |chans| {
            let up =
                |i: usize| if chans[i].up.load(Ordering::Acquire) { Load::Queued(0) } else { Load::Down };
            sched::pick_small(home, chans.len(), up, usize::MAX).map(|i| chans[i].clone())
        })
    }

    /// Queue a control frame of the vsocket with home key `home` to this peer; false if no
    /// channel is up.
    pub(crate) fn send_control(&self, class: Class, home: u32, frame: &Frame<'_>) -> bool {
        match self.control_channel(class, home) {
            Some(ch) => {
                ch.push_frame(frame);
                true
            }
            None => false,
        }
    }

    /// [`Peer::send_controls`] for frames nobody waits for ([`Channel::push_lazy`]).
    pub(crate) fn send_controls_lazy(&self, class: Class, home: u32, frames: &[Frame<'_>]) -> bool {
        match self.control_channel(class, home) {
            Some(ch) => {
                ch.push_lazy(frames);
                true
            }
            None => false,
        }
    }

    /// [`Peer::send_control`] for several frames, written together.
    pub(crate) fn send_controls(&self, class: Class, home: u32, frames: &[Frame<'_>]) -> bool {
        match self.control_channel(class, home) {
            Some(ch) => {
                ch.push_frames(frames);
                true
            }
            None => false,
        }
    }

    /// Park a vsocket until some channel of the class it waits for drains below its cap.
    pub(crate) fn park(&self, vs: &Arc<VSock>) {
        let mut b = self.blocked.lock().unwrap();
        if !b.iter().any(|(_, x)| Arc::ptr_eq(x, vs)) {
            b.push((vs.class(), vs.clone()));
        }
    }

    /// A channel of `class` drained: let the vsockets parked waiting for that class's
    /// channels (or for the other class, when it has no channels and borrows these) schedule
    /// again. A latency channel draining so leaves parked bulk vsockets alone: the thread that
    /// wrote a latency frame does not go on to schedule bulk.
    pub(crate) fn unblock(&self, class: Class) {
        let parked: Vec<Arc<VSock>> = {
            let mut b = self.blocked.lock().unwrap();
            if b.is_empty() {
                return;
            }
            let mesh = self.mesh.read().unwrap();
            let wakes = |c: Class| c == class || mesh[c as usize].is_empty();
            let (go, stay) = std::mem::take(&mut *b).into_iter().partition(|(c, _)| wakes(*c));
            *b = stay;
            go.into_iter().map(|(_, v)| v).collect()
        };
        for vs in parked {
            vs.pump();
        }
    }

    /// Take `ch` out of the mesh; returns how many channels are left.
    pub(crate) fn remove_channel(&self, ch: &Arc<Channel>) -> usize {
        let mut mesh = self.mesh.write().unwrap();
        mesh[ch.class as usize].retain(|c| !Arc::ptr_eq(c, ch));
        mesh.iter().map(Vec::len).sum()
    }

    pub(crate) fn take_parked(&self) -> Vec<Arc<VSock>> {
        std::mem::take(&mut *self.blocked.lock().unwrap()).into_iter().map(|(_, v)| v).collect()
    }
}
