//! Recycled vsocket memory: each app process keeps the shared regions (and doorbells) of
//! its finished vsockets mapped, and the daemon puts its next vsockets in them, instead of
//! creating, sealing, mapping and unmapping a memfd and an eventfd per vsocket (whose
//! `munmap` TLB shootdowns alone were a fifth of the daemon's CPU on short connections).
//!
//! Deployment layer, both sides. A region is only ever reused by the process that held it:
//!
//! * The daemon keeps one [`Pools`] entry per app process *table* — the pid from
//!   `SO_PEERCRED` and a token the process drew — holding every region it handed that table,
//!   by slot number, and one doorbell for them all. A vsocket's response names its slot; the
//!   memfd and the doorbell come with it only the first time ([`Response::Stream`]'s
//!   `mapped`), and the app keeps the first copy of the table's doorbell it gets (closing
//!   later ones), so a pooled vsocket costs the program one descriptor: its proxy end. The
//!   daemon tells which of a table's vsockets rang by their `need_kick` (0 once the app
//!   rang; see `shm`).
//! * The app keeps one [`SlotTable`] per `Client` (each with its own token, so two clients
//!   of one process never share a pool; the process-wide `Client::global` is one). A
//!   vsocket holds its slot through a
//!   [`Lease`]; when the last handle lets go, the slot goes back to the table and the next
//!   request tells the daemon (`PoolNote::released`). Only then, and only once the engine
//!   has let go of the region too (the vsocket is over: nothing but the pool holds it), may
//!   the daemon reuse it: its header is reset ([`Region::reset_for_reuse`]) and checked by
//!   the app ([`Region::check_fresh`]). A read after close cannot see the next vsocket's
//!   bytes: the handle that would read is gone before the slot is released.
//! * Fork: a child inherits every mapping of its parent, and may give up privileges. A
//!   region mapped in this process when it forked is never reused: its slot is discarded
//!   (`PoolNote::discarded`: unmapped here, freed by the daemon) when it is let go, and free
//!   slots of before the fork are discarded at the next request. Fork is seen by a
//!   `pthread_atfork` handler; a child created without one (`posix_spawn`, `vfork`) execs or
//!   exits and takes no mapping along. A forked child that goes on using a `Client` of its
//!   parent uses no table (its requests carry no note: its vsockets come unpooled, memfd and
//!   all, and are unmapped when done); its own new `Client`s have their own.
//! * Memory: the app keeps at most [`POOL_MAX`] free slots per table and discards regions
//!   whose vsocket moved more than [`KEEP`] bytes either way (a bulk stream amortises its
//!   region), so a pool pins at most `POOL_MAX × (4 KiB + 2 × KEEP)` of touched pages per
//!   process. The daemon holds no more free slots than that per table whatever the app
//!   says, gives a region's pages back to the kernel before reuse if it was used beyond
//!   `KEEP` anyway, and drops a process's pools when its last control connection ends.

use std::collections::HashMap;
use std::io::{self, ErrorKind};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};
use serde::{Deserialize, Serialize};

use crate::shm::{self, Region};

/// Most free regions an app keeps mapped per table (and the daemon holds per table).
pub const POOL_MAX: usize = 32;
/// A region whose vsocket moved more than this many bytes either way is not kept for reuse.
pub const KEEP: u64 = 128 << 10;

/// What an app tells the daemon about its table with a request that may open a vsocket.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PoolNote {
    /// The table's token (with the process's pid, the daemon's key for its pool).
    pub token: u64,
    /// Slots let go of and kept mapped: the daemon may put a new vsocket in them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub released: Vec<u32>,
    /// Slots let go of and unmapped: the daemon frees them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub discarded: Vec<u32>,
}

/// Forks of this process seen so far (bumped before and after each, see the module docs).
static FORKS: AtomicU64 = AtomicU64::new(0);

extern "C" fn count_fork() {
    FORKS.fetch_add(1, Ordering::SeqCst);
}

fn watch_forks() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    // SAFETY: the handlers only touch an atomic, which is async-signal-safe.
    ONCE.call_once(|| unsafe {
        libc::pthread_atfork(Some(count_fork), Some(count_fork), None);
    });
}

fn getpid() -> i32 {
    // SAFETY: getpid has no preconditions.
    unsafe { libc::getpid() }
}

/// App side: one `Client`'s mappings of the regions its daemon handed it.
pub(crate) struct SlotTable {
    /// The process the table belongs to (a forked child inherits it and must not use it).
    pid: i32,
    token: u64,
    inner: Mutex<TableInner>,
    /// The table's one doorbell, shared by all its vsockets (sent with the first of them).
    bell: Mutex<Option<Arc<OwnedFd>>>,
}

#[derive(Default)]
struct TableInner {
    slots: HashMap<u32, Slot>,
    released: Vec<u32>,
    discarded: Vec<u32>,
}

struct Slot {
    region: Arc<Region>,
    kick: Arc<OwnedFd>,
    in_use: bool,
    /// [`FORKS`] when it was mapped: a fork since then shares the mapping with a child.
    forks: u64,
}

/// A vsocket's hold on a slot of its process's table: the region and the doorbell. Dropped
/// by the vsocket's last handle, after its last look at the region.
pub(crate) struct Lease {
    table: Arc<SlotTable>,
    slot: u32,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.table.give_back(self.slot);
    }
}

/// The memory and doorbell of a vsocket the daemon just handed this process.
pub(crate) struct Adopted {
    pub region: Arc<Region>,
    pub kick: Arc<OwnedFd>,
    /// The slot it holds, if pooled.
    pub lease: Option<Lease>,
}

impl SlotTable {
    /// A new, empty table of this process.
    pub(crate) fn new() -> Arc<SlotTable> {
        watch_forks();
        Arc::new(SlotTable {
            pid: getpid(),
            token: random_token(),
            inner: Mutex::default(),
            bell: Mutex::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TableInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What to tell the daemon with a request that may open a vsocket; `None` in a process
    /// that inherited the table (it then gets unpooled regions).
    pub(crate) fn note(&self) -> Option<PoolNote> {
        if getpid() != self.pid {
            return None;
        }
        let forks = FORKS.load(Ordering::SeqCst);
        let mut t = self.lock();
        let stale: Vec<u32> =
            t.slots.iter().filter(|(_, s)| !s.in_use && s.forks != forks).map(|(id, _)| *id).collect();
        for id in stale {
            t.slots.remove(&id);
            t.released.retain(|r| *r != id);
            t.discarded.push(id);
        }
        Some(PoolNote {
            token: self.token,
            released: std::mem::take(&mut t.released),
            discarded: std::mem::take(&mut t.discarded),
        })
    }

    /// The last handle of `slot`'s vsocket let go: keep it for the next vsocket, or unmap
    /// it (shared with a forked child, used for bulk, or the table is full).
    fn give_back(&self, slot: u32) {
        let forks = FORKS.load(Ordering::SeqCst);
        let mut t = self.lock();
        let free = t.slots.values().filter(|s| !s.in_use).count();
        let Some(s) = t.slots.get_mut(&slot) else { return };
        s.in_use = false;
        let h = s.region.header();
        let bulk =
            h.tx_written.load(Ordering::Relaxed) > KEEP || h.rx_in_order.load(Ordering::Relaxed) > KEEP;
        if s.forks != forks || bulk || free >= POOL_MAX {
            t.slots.remove(&slot);
            t.discarded.push(slot);
        } else {
            t.released.push(slot);
        }
    }

    /// Take the region of a vsocket the daemon handed over: `slot` (if pooled), whether
    /// this process has it `mapped` already, and the descriptors that came with the answer
    /// (memfd and doorbell first, unless `mapped`). A pooled vsocket's doorbell is the
    /// table's: the first copy received is kept, later ones (with new regions) are closed,
    /// so that the table's vsockets cost one descriptor each (their proxy end), not two.
    pub(crate) fn adopt(
        self: &Arc<Self>,
        slot: Option<u32>,
        mapped: bool,
        fds: &mut impl Iterator<Item = OwnedFd>,
    ) -> io::Result<Adopted> {
        let bad = |m: String| io::Error::new(ErrorKind::InvalidData, m);
        if mapped {
            let slot = slot.ok_or_else(|| bad("the daemon named no region for a vsocket".into()))?;
            let mut t = self.lock();
            let s = t.slots.get_mut(&slot).filter(|s| !s.in_use).ok_or_else(|| {
                bad(format!(
                    "the daemon reused vsocket memory slot {slot}, which this process does not hold free"
                ))
            })?;
            s.region.check_fresh()?;
            s.in_use = true;
            let (region, kick) = (s.region.clone(), s.kick.clone());
            drop(t);
            return Ok(Adopted { region, kick, lease: Some(Lease { table: self.clone(), slot }) });
        }
        let (Some(mem), Some(kick)) = (fds.next(), fds.next()) else {
            return Err(bad("the daemon sent a vsocket without its memory".into()));
        };
        let kick = match slot {
            Some(_) => self
                .bell
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_or_insert_with(|| Arc::new(kick))
                .clone(),
            None => Arc::new(kick),
        };
        // Read before mapping: a fork from here on counts as sharing the mapping.
        let forks = FORKS.load(Ordering::SeqCst);
        let mut region = Region::open(mem)?;
        // One descriptor less: the mapping is all it needs.
        region.close_fd();
        let region = Arc::new(region);
        let Some(slot) = slot else { return Ok(Adopted { region, kick, lease: None }) };
        let mut t = self.lock();
        if t.slots.get(&slot).is_some_and(|s| s.in_use) {
            return Err(bad(format!("the daemon handed vsocket memory slot {slot} twice")));
        }
        t.slots.insert(slot, Slot { region: region.clone(), kick: kick.clone(), in_use: true, forks });
        drop(t);
        Ok(Adopted { region, kick, lease: Some(Lease { table: self.clone(), slot }) })
    }
}

fn random_token() -> u64 {
    static N: AtomicU64 = AtomicU64::new(0);
    let t =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    t ^ (u64::from(getpid() as u32) << 32)
        ^ N.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// Daemon side: one app table's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct PoolKey {
    pub pid: i32,
    pub token: u64,
}

/// Daemon side: a vsocket's app → daemon doorbell, registered with the poller under
/// `token` (edge-triggered) for as long as it lives, across the vsockets of a pooled slot.
pub(crate) struct Doorbell {
    pub kick: OwnedFd,
    pub token: u64,
    registry: Arc<Registry>,
}

impl Doorbell {
    /// A new eventfd registered with the poller's `registry` under `token`, edge-triggered
    /// (as mio registers everything): every ring is a new edge, so its counter is never read
    /// back (it cannot fill up: 2^64 − 2 rings).
    pub(crate) fn new(registry: &Arc<Registry>, token: u64) -> io::Result<Doorbell> {
        let kick = shm::eventfd()?;
        registry.register(&mut SourceFd(&kick.as_raw_fd()), Token(token as usize), Interest::READABLE)?;
        Ok(Doorbell { kick, token, registry: registry.clone() })
    }

    pub(crate) fn fd(&self) -> RawFd {
        self.kick.as_raw_fd()
    }
}

impl Drop for Doorbell {
    fn drop(&mut self) {
        // The app's duplicate keeps the eventfd open: take it out of the set explicitly (a
        // failure, already gone, is harmless).
        let _ = self.registry.deregister(&mut SourceFd(&self.kick.as_raw_fd()));
    }
}

/// Whether the app of a pooled slot holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    /// Never named to the app (its memfd was not sent yet).
    Never,
    /// Named in a response: the app holds it until it says it let go.
    ByApp,
    /// The app let go and keeps it mapped.
    Free,
}

struct PoolSlot {
    region: Arc<Region>,
    held: Held,
}

impl PoolSlot {
    /// Free for a new vsocket: nothing but the pool holds the region (the engine's vsocket
    /// is over) and the app does not hold it.
    fn is_free(&self) -> bool {
        self.held != Held::ByApp && Arc::strong_count(&self.region) == 1
    }
}

#[derive(Default)]
struct Pool {
    slots: HashMap<u32, PoolSlot>,
    next: u32,
    /// The table's doorbell, rung for any of its vsockets (the app keeps one descriptor of
    /// it, not one per vsocket).
    bell: Option<Arc<Doorbell>>,
}

/// How a served vsocket's region is named to its app.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Naming {
    /// The slot, if pooled.
    pub slot: Option<u32>,
    /// The app has it mapped: no memfd or doorbell goes with the answer.
    pub mapped: bool,
}

/// Daemon side: every app table's regions.
#[derive(Default)]
pub(crate) struct Pools {
    pools: Mutex<HashMap<PoolKey, Pool>>,
    /// Regions put in a pool, and vsockets served in a reused one.
    pub created: AtomicU64,
    pub reused: AtomicU64,
}

impl Pools {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PoolKey, Pool>> {
        self.pools.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Take in what the app says about its slots.
    pub(crate) fn note(&self, pid: i32, note: &PoolNote) {
        let mut pools = self.lock();
        let pool = pools.entry(PoolKey { pid, token: note.token }).or_default();
        for id in &note.discarded {
            pool.slots.remove(id);
        }
        for id in &note.released {
            if let Some(s) = pool.slots.get_mut(id) {
                if s.held == Held::ByApp {
                    s.held = Held::Free;
                }
            }
        }
        // However many the app says it keeps, hold no more than an honest app would.
        let mut free: Vec<u32> =
            pool.slots.iter().filter(|(_, s)| s.held == Held::Free).map(|(id, _)| *id).collect();
        free.sort_unstable();
        for id in free.iter().skip(POOL_MAX) {
            pool.slots.remove(id);
        }
    }

    /// A region of `tx_cap` + `rx_cap` bytes for a new vsocket of table `key`: a free one
    /// of its pool, reset, or a new one (the table's doorbell, registered in `registry` under a
    /// token from `token`, is made with its first region). The slot stays unnamed until
    /// [`Pools::name`].
    pub(crate) fn take(
        &self,
        key: PoolKey,
        tx_cap: usize,
        rx_cap: usize,
        registry: &Arc<Registry>,
        token: impl FnOnce() -> u64,
    ) -> io::Result<Arc<Region>> {
        let mut pools = self.lock();
        let pool = pools.entry(key).or_default();
        let fits = |s: &PoolSlot| s.region.tx_area().1 == tx_cap && s.region.rx_area().1 == rx_cap;
        for s in pool.slots.values_mut().filter(|s| s.held != Held::ByApp && fits(s)) {
            // Only the pool holds it (no vsocket, no handle, no weak reference): ours alone.
            if let Some(region) = Arc::get_mut(&mut s.region) {
                region.reset_for_reuse(KEEP);
                self.reused.fetch_add(1, Ordering::Relaxed);
                return Ok(s.region.clone());
            }
        }
        let region = Arc::new(Region::create(tx_cap, rx_cap)?);
        if pool.bell.is_none() {
            pool.bell = Some(Arc::new(Doorbell::new(registry, token())?));
        }
        pool.next = pool.next.wrapping_add(1);
        let slot = pool.next;
        region.set_slot(slot);
        pool.slots.insert(slot, PoolSlot { region: region.clone(), held: Held::Never });
        self.created.fetch_add(1, Ordering::Relaxed);
        Ok(region)
    }

    /// The vsocket in `region` is being handed to table `key`: how to name it, and the
    /// table's doorbell if it is pooled (else it needs a doorbell of its own). A region of another table of the same
    /// process leaves its pool and goes as an unpooled one; of another process's table, only
    /// if that app never had it mapped (else `PermissionDenied`: it is never shown to
    /// another process).
    pub(crate) fn name(
        &self,
        key: Option<PoolKey>,
        pid: i32,
        region: &Arc<Region>,
    ) -> io::Result<(Naming, Option<Arc<Doorbell>>)> {
        let unpooled = Naming { slot: None, mapped: false };
        let Some(slot) = region.slot() else { return Ok((unpooled, None)) };
        let mut pools = self.lock();
        if let Some(k) = key {
            if let Some(p) = pools.get_mut(&k) {
                if let (Some(s), Some(bell)) = (p.slots.get_mut(&slot), p.bell.clone()) {
                    if Arc::ptr_eq(&s.region, region) {
                        let mapped = s.held == Held::Free;
                        s.held = Held::ByApp;
                        return Ok((Naming { slot: Some(slot), mapped }, Some(bell)));
                    }
                }
            }
        }
        let owner = pools.iter_mut().find_map(|(k, p)| {
            let s = p.slots.get(&slot).filter(|s| Arc::ptr_eq(&s.region, region))?;
            Some((*k, s.held))
        });
        if let Some((k, held)) = owner {
            if k.pid != pid && held != Held::Never {
                return Err(io::Error::new(
                    ErrorKind::PermissionDenied,
                    format!(
                        "the vsocket's memory was mapped by process {}: it is never shown to another",
                        k.pid
                    ),
                ));
            }
            // Out of its pool for good: the vsocket goes with its own doorbell, unpooled.
            if let Some(p) = pools.get_mut(&k) {
                p.slots.remove(&slot);
            }
        }
        Ok((unpooled, None))
    }

    /// Process `pid` has no control connection left: its pools go (regions still used by a
    /// vsocket live on with it).
    pub(crate) fn drop_process(&self, pid: i32) {
        self.lock().retain(|k, _| k.pid != pid);
    }

    /// Per table: pid, regions held, regions free for reuse.
    pub(crate) fn status(&self) -> Vec<serde_json::Value> {
        let pools = self.lock();
        let mut v: Vec<_> = pools
            .iter()
            .map(|(k, p)| {
                let free = p.slots.values().filter(|s| s.is_free()).count();
                (k.pid, p.slots.len(), free)
            })
            .collect();
        v.sort_unstable();
        v.into_iter()
            .map(|(pid, regions, free)| serde_json::json!({"pid": pid, "regions": regions, "free": free}))
            .collect()
    }
}
