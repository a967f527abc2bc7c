//! Virtual socket layer: a vsocket's memory shared between the daemon and one application
//! process, and the doorbells that tell each side the other moved.
//!
//! One sealed memfd per vsocket holds a one-page [`Header`] followed by the send ring and the
//! receive ring (`crate::ring::Ring`, the same ring type the embedded host uses with private
//! memory). When the vsocket is over, its region serves the next vsocket of the same app
//! process, reset ([`Region::reset_for_reuse`], checked by [`Region::check_fresh`]), rather
//! than being unmapped (`crate::daemon::regions`). The header carries each side's stream positions as atomics; only one side ever
//! writes a given field:
//!
//! | field | written by | meaning |
//! |---|---|---|
//! | `tx_written` | app | the app has put every send byte below this offset in the send ring |
//! | `rx_consumed` | app | the app has read every receive byte below this offset |
//! | `app_flags` | app | `SHUT_WR` (half close), `CLOSED` (the app let go of the vsocket) |
//! | `tx_acked` | engine | the peer holds every send byte below this: the ring below it is free |
//! | `rx_in_order` | engine | every receive byte below this offset is in the receive ring |
//! | `rx_fin`, `state` | engine | `FIN` (end of stream at `rx_fin`), `ERROR` (`error_kind`, `error_msg`), `OPENING` (no answer to the OPEN yet) |
//!
//! Doorbells, each one-sided so that a busy stream costs no syscall per message:
//! * app → engine: after moving a position the app swaps `need_kick` to 0 and writes the
//!   vsocket's eventfd only if it was 1 (every other ring also stores 0 first: the vsockets
//!   of one app table share one eventfd, and `need_kick` 0 is how the daemon tells which
//!   rang). The daemon's poller sets `need_kick` back to 1 only when it has spun idle for a
//!   while and is about to sleep (and re-reads the positions after setting it, so no update
//!   is missed).
//! * engine → app: the engine bumps `seq` after every change and issues a futex wake only if
//!   `app_waiters` is non-zero. A waiting app thread spins briefly, then registers in
//!   `app_waiters`, re-checks and sleeps on `seq` (a shared futex on the mapping).
//!
//! With a readiness proxy (`crate::daemon::proxy`, the preload shim's data path) the header
//! also holds two gates, `rx_gate` and `tx_gate`, written by both sides with atomic swaps and
//! compare-and-swaps only, and the app's futex locks `rx_lock`/`tx_lock`, which live here so
//! that forked processes sharing a vsocket exclude each other. The daemon acts on a gate only
//! by sending or receiving records on its own end of the proxy, so a lying app can only
//! confuse its own readiness.
//!
//! The daemon validates everything the app writes (positions only move forward and within
//! the buffers); a lie disconnects that app and harms no other. The memfd is sealed against
//! shrinking, so an app cannot make the daemon fault on the mapping.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::time::Duration;

/// `Header::magic`: "NCSHM" and a layout version.
pub const MAGIC: u64 = 0x4e43_5348_4d00_0001;
/// Bytes before the send ring.
pub const HEADER_BYTES: usize = 4096;
/// Longest error message carried in the header.
pub const ERROR_MSG_MAX: usize = 480;

/// `app_flags`: the app shut down writing (FIN after the last written byte).
pub const SHUT_WR: u32 = 1;
/// `app_flags`: the app closed the vsocket (dropped its last handle).
pub const CLOSED: u32 = 2;
/// `app_flags`: the app's shim found its readiness proxy read by a call it cannot see
/// (io_uring, a raw system call): the daemon resets the vsocket.
pub const BYPASSED: u32 = 4;
/// `state`: the peer's FIN arrived; the stream ends at `rx_fin`.
pub const FIN: u32 = 1;
/// `state`: the vsocket failed; `error_kind` and `error_msg` say how.
pub const ERROR: u32 = 2;
/// `state`: the vsocket is connecting (its OPEN not answered yet): the readiness proxy's OUT
/// gate stays plugged (a shim's non-blocking connect, EINPROGRESS) until the answer clears it.
pub const OPENING: u32 = 4;

/// The shared header of one vsocket (see the module docs for who writes what).
#[repr(C)]
pub struct Header {
    pub magic: AtomicU64,
    pub tx_cap: AtomicU64,
    pub rx_cap: AtomicU64,
    _p0: [u64; 5],
    // App-written.
    pub tx_written: AtomicU64,
    pub rx_consumed: AtomicU64,
    pub app_flags: AtomicU32,
    _p1: [u32; 11],
    // Engine-written.
    pub tx_acked: AtomicU64,
    pub rx_in_order: AtomicU64,
    pub rx_fin: AtomicU64,
    pub state: AtomicU32,
    pub error_kind: AtomicU32,
    _p2: [u64; 4],
    // Doorbells.
    pub seq: AtomicU32,
    pub app_waiters: AtomicU32,
    pub need_kick: AtomicU32,
    // Readiness proxy gates (both sides; see `crate::daemon::proxy`).
    pub rx_gate: AtomicU32,
    pub tx_gate: AtomicU32,
    /// Futex locks of the app side, shared by every process holding the vsocket (fork).
    pub rx_lock: AtomicU32,
    pub tx_lock: AtomicU32,
    /// App-written: the app closed the IN gate and then found data; the daemon re-opens it.
    pub rx_reopen: AtomicU32,
    _p3: [u32; 8],
    pub error_len: AtomicU32,
    pub error_msg: [AtomicU8; ERROR_MSG_MAX],
}

const _: () = assert!(std::mem::size_of::<Header>() <= HEADER_BYTES);

/// `io::ErrorKind` carried in `error_kind`.
pub fn kind_code(kind: io::ErrorKind) -> u32 {
    use io::ErrorKind::*;
    match kind {
        ConnectionReset => 1,
        ConnectionAborted => 2,
        ConnectionRefused => 3,
        TimedOut => 4,
        BrokenPipe => 5,
        PermissionDenied => 6,
        _ => 7,
    }
}

/// The `io::ErrorKind` of an `error_kind` code.
pub fn code_kind(code: u32) -> io::ErrorKind {
    use io::ErrorKind::*;
    match code {
        1 => ConnectionReset,
        2 => ConnectionAborted,
        3 => ConnectionRefused,
        4 => TimedOut,
        5 => BrokenPipe,
        6 => PermissionDenied,
        _ => Other,
    }
}

impl Header {
    /// The error stored by the engine, if the `ERROR` state bit is set.
    pub fn error(&self) -> Option<io::Error> {
        if self.state.load(Ordering::Acquire) & ERROR == 0 {
            return None;
        }
        let len = (self.error_len.load(Ordering::Relaxed) as usize).min(ERROR_MSG_MAX);
        let bytes: Vec<u8> = self.error_msg[..len].iter().map(|b| b.load(Ordering::Relaxed)).collect();
        let kind = code_kind(self.error_kind.load(Ordering::Relaxed));
        Some(io::Error::new(kind, String::from_utf8_lossy(&bytes).into_owned()))
    }

    /// Store an error and set the `ERROR` bit (first error wins). Engine side.
    pub fn set_error(&self, kind: io::ErrorKind, msg: &str) {
        if self.state.load(Ordering::Acquire) & ERROR != 0 {
            return;
        }
        let mut end = msg.len().min(ERROR_MSG_MAX);
        while !msg.is_char_boundary(end) {
            end -= 1;
        }
        for (slot, b) in self.error_msg.iter().zip(&msg.as_bytes()[..end]) {
            slot.store(*b, Ordering::Relaxed);
        }
        self.error_len.store(end as u32, Ordering::Relaxed);
        self.error_kind.store(kind_code(kind), Ordering::Relaxed);
        self.state.fetch_or(ERROR, Ordering::Release);
    }

    /// Put every field a vsocket moves back to its initial state (positions, flags, state,
    /// error, doorbells, gates, futex locks) and write the layout fields anew from the
    /// daemon's own record of them: a region about to serve another vsocket. Daemon side.
    fn reset(&self, tx_cap: usize, rx_cap: usize) {
        for w in [&self.tx_written, &self.rx_consumed, &self.tx_acked, &self.rx_in_order, &self.rx_fin] {
            w.store(0, Ordering::Relaxed);
        }
        for w in [
            &self.app_flags,
            &self.state,
            &self.error_kind,
            &self.seq,
            &self.app_waiters,
            &self.rx_gate,
            &self.tx_gate,
            &self.rx_lock,
            &self.tx_lock,
            &self.rx_reopen,
        ] {
            w.store(0, Ordering::Relaxed);
        }
        if self.error_len.swap(0, Ordering::Relaxed) != 0 {
            for b in &self.error_msg {
                b.store(0, Ordering::Relaxed);
            }
        }
        self.tx_cap.store(tx_cap as u64, Ordering::Relaxed);
        self.rx_cap.store(rx_cap as u64, Ordering::Relaxed);
        self.need_kick.store(1, Ordering::Relaxed);
        self.magic.store(MAGIC, Ordering::Release);
    }

    /// Whether the header is that of a new vsocket with rings of `tx_cap` and `rx_cap`
    /// bytes: every field the app writes (positions, flags, its gate, its locks, its
    /// waiter count) at zero, nothing acknowledged. The engine's fields may have moved
    /// already (an accepted vsocket's first bytes, an error). App side.
    fn is_fresh(&self, tx_cap: usize, rx_cap: usize) -> bool {
        let app64 = [&self.tx_written, &self.rx_consumed, &self.tx_acked];
        let app32 = [
            &self.app_flags,
            &self.app_waiters,
            &self.tx_gate,
            &self.rx_lock,
            &self.tx_lock,
            &self.rx_reopen,
        ];
        self.magic.load(Ordering::Acquire) == MAGIC
            && self.tx_cap.load(Ordering::Relaxed) == tx_cap as u64
            && self.rx_cap.load(Ordering::Relaxed) == rx_cap as u64
            && self.rx_in_order.load(Ordering::Relaxed) <= rx_cap as u64
            && app64.iter().all(|w| w.load(Ordering::Relaxed) == 0)
            && app32.iter().all(|w| w.load(Ordering::Relaxed) == 0)
    }

    /// Tell the app something changed: bump `seq`, wake sleepers if any. Engine side.
    pub fn ring_app(&self) {
        self.seq.fetch_add(1, Ordering::SeqCst);
        if self.app_waiters.load(Ordering::SeqCst) != 0 {
            futex_wake(&self.seq);
        }
    }
}

/// A vsocket's shared memory: the sealed memfd and its mapping.
pub struct Region {
    fd: Option<OwnedFd>,
    /// Daemon side: end B of the vsocket's readiness proxy, if it has one.
    proxy: std::sync::RwLock<Option<OwnedFd>>,
    /// Daemon side: `shutdown(B, SHUT_WR)` was done (the app saw the FIN).
    proxy_fin: std::sync::atomic::AtomicBool,
    /// Daemon side: opening the IN gate and sending its token are one step (so that a look
    /// at B's queue never falls between them).
    proxy_tx: std::sync::Mutex<()>,
    /// Daemon side: `rx_consumed` at the last look with the IN gate open.
    rx_seen: AtomicU64,
    /// Daemon side: something the shim cannot see (an io_uring operation, a raw system call)
    /// read a readiness record off end A or wrote one into B: the vsocket is to be reset.
    stray: std::sync::atomic::AtomicBool,
    /// Daemon side: its slot in the app process's pool (`crate::daemon::regions`), if pooled.
    slot: std::sync::OnceLock<u32>,
    ptr: *mut u8,
    len: usize,
    tx_cap: usize,
    rx_cap: usize,
}

// SAFETY: the mapping is plain shared memory; the header is atomics and the rings follow the
// ownership rules of the vsocket state machines (module docs of `crate::engine::vsocket`).
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

fn cvt(r: libc::c_int, what: &str) -> io::Result<libc::c_int> {
    if r < 0 {
        let e = io::Error::last_os_error();
        Err(io::Error::new(e.kind(), format!("{what}: {e}")))
    } else {
        Ok(r)
    }
}

impl Region {
    /// Create a sealed memfd for a vsocket with the given ring sizes, and map it. Daemon side.
    pub fn create(tx_cap: usize, rx_cap: usize) -> io::Result<Region> {
        let len = HEADER_BYTES + tx_cap + rx_cap;
        // SAFETY: the name is a NUL-terminated literal.
        let fd = cvt(
            unsafe {
                libc::memfd_create(
                    c"netchannel-vsocket".as_ptr(),
                    libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
                )
            },
            "memfd_create",
        )?;
        // SAFETY: fd was just created and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: ftruncate and fcntl on our own fd.
        unsafe {
            cvt(libc::ftruncate(fd.as_raw_fd(), len as libc::off_t), "sizing the vsocket memory")?;
            cvt(
                libc::fcntl(
                    fd.as_raw_fd(),
                    libc::F_ADD_SEALS,
                    libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
                ),
                "sealing the vsocket memory",
            )?;
        }
        let r = Region::map_fd(fd, len, tx_cap, rx_cap)?;
        let h = r.header();
        h.tx_cap.store(tx_cap as u64, Ordering::Relaxed);
        h.rx_cap.store(rx_cap as u64, Ordering::Relaxed);
        h.need_kick.store(1, Ordering::Relaxed);
        h.magic.store(MAGIC, Ordering::Release);
        Ok(r)
    }

    /// Map a vsocket memfd received from the daemon, checking its size and header. App side.
    pub fn open(fd: OwnedFd) -> io::Result<Region> {
        // SAFETY: fstat into a zeroed stat buffer.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        cvt(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) }, "fstat of the vsocket memory")?;
        let len = st.st_size as usize;
        let bad = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
        if len < HEADER_BYTES {
            return Err(bad(format!("vsocket memory of {len} bytes is smaller than its header")));
        }
        let mut r = Region::map_fd(fd, len, 0, 0)?;
        let h = r.header();
        if h.magic.load(Ordering::Acquire) != MAGIC {
            return Err(bad("vsocket memory has a bad magic number (daemon of another version?)".into()));
        }
        let (tx, rx) = (h.tx_cap.load(Ordering::Relaxed), h.rx_cap.load(Ordering::Relaxed));
        if tx == 0 || rx == 0 || HEADER_BYTES as u64 + tx + rx != len as u64 {
            return Err(bad(format!("vsocket memory of {len} bytes does not hold rings of {tx} + {rx}")));
        }
        r.tx_cap = tx as usize;
        r.rx_cap = rx as usize;
        Ok(r)
    }

    fn map_fd(fd: OwnedFd, len: usize, tx_cap: usize, rx_cap: usize) -> io::Result<Region> {
        // SAFETY: a shared mapping of the whole memfd, no address hint; checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(e.kind(), format!("cannot map {len} bytes of vsocket memory: {e}")));
        }
        Ok(Region {
            fd: Some(fd),
            proxy: std::sync::RwLock::new(None),
            proxy_fin: std::sync::atomic::AtomicBool::new(false),
            proxy_tx: std::sync::Mutex::new(()),
            rx_seen: AtomicU64::new(0),
            stray: std::sync::atomic::AtomicBool::new(false),
            slot: std::sync::OnceLock::new(),
            ptr: ptr.cast(),
            len,
            tx_cap,
            rx_cap,
        })
    }

    /// Make this region ready for another vsocket of the same app process (see
    /// `crate::daemon::regions`): the header back to its initial state, the readiness proxy
    /// gone, and, if the last vsocket moved more than `keep` bytes either way, the ring
    /// pages given back to the kernel (`FALLOC_FL_PUNCH_HOLE`), so that a pooled region pins
    /// little memory. Old ring bytes below that stay: harmless, as no offset is read before
    /// it has been written. Daemon side; `&mut` because no vsocket may use it meanwhile.
    pub fn reset_for_reuse(&mut self, keep: u64) {
        let h = self.header();
        let touched = h.tx_written.load(Ordering::Relaxed).max(h.rx_in_order.load(Ordering::Relaxed));
        if touched > keep {
            if let Some(fd) = &self.fd {
                // SAFETY: fallocate on our own memfd; the seals forbid growing and shrinking,
                // not punching (the size stays, the pages read as zeros again).
                unsafe {
                    libc::fallocate(
                        fd.as_raw_fd(),
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        HEADER_BYTES as libc::off_t,
                        (self.tx_cap + self.rx_cap) as libc::off_t,
                    );
                }
            }
        }
        self.header().reset(self.tx_cap, self.rx_cap);
        *self.proxy.get_mut().unwrap_or_else(|p| p.into_inner()) = None;
        *self.proxy_fin.get_mut() = false;
        *self.rx_seen.get_mut() = 0;
        *self.stray.get_mut() = false;
    }

    /// Check that a region the daemon names for a new vsocket was reset: every field the
    /// app writes at zero, the layout unchanged (see `Header::is_fresh`). App side.
    pub fn check_fresh(&self) -> io::Result<()> {
        if self.header().is_fresh(self.tx_cap, self.rx_cap) {
            return Ok(());
        }
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the daemon reused a vsocket memory region that was not reset (daemon of another version?)",
        ))
    }

    /// The shared header.
    pub fn header(&self) -> &Header {
        // SAFETY: the mapping is at least HEADER_BYTES long, page aligned, and Header is
        // made of atomics only, valid for any bit pattern.
        unsafe { &*(self.ptr as *const Header) }
    }

    /// The memfd (to hand to the app); none once [`Region::close_fd`] let it go.
    pub fn fd(&self) -> Option<&OwnedFd> {
        self.fd.as_ref()
    }

    /// Close the memfd and keep only the mapping (an app holds one descriptor less).
    pub fn close_fd(&mut self) {
        self.fd = None;
    }

    /// Daemon side: record the region's slot in its app process's pool (once).
    pub(crate) fn set_slot(&self, slot: u32) {
        let _ = self.slot.set(slot);
    }

    /// Daemon side: the region's slot in its app process's pool, if pooled.
    pub(crate) fn slot(&self) -> Option<u32> {
        self.slot.get().copied()
    }

    /// Daemon side: give the vsocket its readiness proxy end B.
    pub fn set_proxy(&self, b: OwnedFd) {
        *self.proxy.write().unwrap_or_else(|p| p.into_inner()) = Some(b);
    }

    /// Daemon side: the raw fd of end B, if the proxy is still open.
    pub fn proxy_fd(&self) -> Option<RawFd> {
        self.proxy.read().unwrap_or_else(|p| p.into_inner()).as_ref().map(|b| b.as_raw_fd())
    }

    /// Daemon side: whether something that bypassed the shim (io_uring, a raw system call)
    /// read or wrote the readiness proxy's end A (see [`Region::drive_proxy`]).
    pub fn proxy_bypassed(&self) -> bool {
        self.stray.load(Ordering::SeqCst)
    }

    /// Tell the app something changed: wake futex sleepers, and drive the readiness proxy's
    /// gates if the vsocket has one. Engine side.
    /// Returns whether it opened the proxy's IN gate (the app was waiting to read).
    pub fn ring_app(&self) -> bool {
        let h = self.header();
        h.ring_app();
        self.proxy_fd().is_some() && self.drive_proxy()
    }

    /// Daemon side: bring the proxy's gates in line with the header (see
    /// `crate::daemon::proxy`): open IN when there is something to read, FIN as a half close
    /// of B, an error as the close of B (the app's fd then reports ERR|HUP), and unplug OUT
    /// when the send ring has room again. Returns whether it opened the IN gate (sent a
    /// token: the app had read everything before).
    pub fn drive_proxy(&self) -> bool {
        let guard = self.proxy.read().unwrap_or_else(|p| p.into_inner());
        let Some(b) = guard.as_ref().map(|b| b.as_raw_fd()) else { return false };
        let mut opened = false;
        let h = self.header();
        let state = h.state.load(Ordering::SeqCst);
        if h.app_flags.load(Ordering::SeqCst) & BYPASSED != 0 {
            self.stray.store(true, Ordering::SeqCst);
        }
        if state & ERROR != 0 {
            drop(guard);
            // Closing B with the base record unread in its queue resets A (ECONNRESET).
            let b = self.proxy.write().unwrap_or_else(|p| p.into_inner()).take();
            drop(b);
            return false;
        }
        let readable = h.rx_in_order.load(Ordering::SeqCst) > h.rx_consumed.load(Ordering::SeqCst)
            || state & FIN != 0
            || h.rx_reopen.load(Ordering::SeqCst) != 0;
        if readable {
            let _one = self.proxy_tx.lock().unwrap_or_else(|p| p.into_inner());
            h.rx_reopen.store(0, Ordering::SeqCst);
            let consumed = h.rx_consumed.load(Ordering::SeqCst);
            if h.rx_gate.swap(GATE_OPEN, Ordering::SeqCst) != GATE_OPEN {
                proxy_send(b, &[TOKEN]);
                opened = true;
                self.rx_seen.store(consumed, Ordering::SeqCst);
            } else if self.rx_seen.swap(consumed, Ordering::SeqCst) == consumed
                && state & FIN == 0
                && !self.proxy_fin.load(Ordering::SeqCst)
                && unread_by_a(b) == Some(0)
                && h.rx_gate.load(Ordering::SeqCst) == GATE_OPEN
                && !hung_up(b)
            {
                // The gate stayed open and the app has not read the ring since it opened,
                // yet A's token is gone: only the app's own close_in may take it (after its
                // OPEN -> CLOSING), so something that bypassed the shim read A.
                self.stray.store(true, Ordering::SeqCst);
            }
        }
        if state & FIN != 0 && !self.proxy_fin.swap(true, Ordering::SeqCst) {
            // SAFETY: shutdown of our own socket.
            unsafe { libc::shutdown(b, libc::SHUT_WR) };
        }
        if h.tx_gate.load(Ordering::SeqCst) == TX_PLUGGED && state & OPENING == 0 {
            let cap = self.tx_cap as u64;
            let used = h.tx_written.load(Ordering::SeqCst).saturating_sub(h.tx_acked.load(Ordering::SeqCst));
            if cap.saturating_sub(used) >= low_water(cap)
                && h.tx_gate
                    .compare_exchange(TX_PLUGGED, TX_UNPLUGGING, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
            {
                // The queue is [old base, plug, new base]: take the first two. Anything else
                // was written into A by something that bypassed the shim.
                let mut buf = [0u8; PLUG_MAX];
                for want_base in [true, false] {
                    // SAFETY: a live buffer; non-blocking receive on our own socket.
                    let n = unsafe { libc::recv(b, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
                    let ok = if want_base { n == 1 && buf[0] == b'b' } else { n >= 512 && buf[0] == 0 };
                    if !ok {
                        self.stray.store(true, Ordering::SeqCst);
                    }
                }
                h.tx_gate.store(TX_OPEN, Ordering::SeqCst);
            }
        }
        opened
    }

    /// Start of the send ring and its capacity.
    pub fn tx_area(&self) -> (*mut u8, usize) {
        // SAFETY: HEADER_BYTES < len.
        (unsafe { self.ptr.add(HEADER_BYTES) }, self.tx_cap)
    }

    /// Start of the receive ring and its capacity.
    pub fn rx_area(&self) -> (*mut u8, usize) {
        // SAFETY: HEADER_BYTES + tx_cap < len.
        (unsafe { self.ptr.add(HEADER_BYTES + self.tx_cap) }, self.rx_cap)
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: mapped in map_fd with this length; no reference outlives the Region.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// `rx_gate`: no token queued on A (A is not readable). The zero state.
pub const GATE_CLOSED: u32 = 0;
/// `rx_gate`: a token is queued on A (or on its way).
pub const GATE_OPEN: u32 = 1;
/// `rx_gate`: the app is taking the token out.
pub const GATE_CLOSING: u32 = 2;
/// `tx_gate`: A is writable. The zero state.
pub const TX_OPEN: u32 = 0;
/// `tx_gate`: a plug record sits in B's queue, A is not writable.
pub const TX_PLUGGED: u32 = 1;
/// `tx_gate`: the daemon is taking the plug out.
pub const TX_UNPLUGGING: u32 = 2;
/// The record that makes A readable.
pub const TOKEN: u8 = b't';
/// Largest plug record.
pub const PLUG_MAX: usize = 8192;

/// Free send space below which the app plugs OUT (TCP's rule: half the buffer).
pub fn low_water(cap: u64) -> u64 {
    cap / 2
}

/// Bytes sent on unix socket `fd` that its peer has not read yet (SIOCOUTQ).
fn unread_by_a(fd: RawFd) -> Option<i32> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int.
    (unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut n) } == 0).then_some(n)
}

/// Whether the peer of `fd` closed (every descriptor of it).
fn hung_up(fd: RawFd) -> bool {
    let mut p = libc::pollfd { fd, events: 0, revents: 0 };
    // SAFETY: one valid pollfd, no wait.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n == 1 && p.revents & libc::POLLHUP != 0
}

/// Send one record on a proxy end, never blocking; a full queue (EAGAIN) is ignored: the
/// gate it would open is open already.
pub fn proxy_send(fd: RawFd, rec: &[u8]) -> bool {
    // SAFETY: a live buffer; MSG_DONTWAIT|MSG_NOSIGNAL so a dead peer neither blocks nor
    // raises SIGPIPE.
    unsafe { libc::send(fd, rec.as_ptr().cast(), rec.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) >= 0 }
}

/// Sleep on a shared futex word while it holds `expected`, at most `timeout`.
pub fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts =
        libc::timespec { tv_sec: timeout.as_secs() as libc::time_t, tv_nsec: timeout.subsec_nanos() as _ };
    // SAFETY: word is a valid aligned u32 in (possibly shared) memory; ts lives across the call.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
        );
    }
}

/// Wake every thread (of any process) sleeping on `word`.
pub fn futex_wake(word: &AtomicU32) {
    // SAFETY: as for futex_wait; FUTEX_WAKE reads no memory besides the word's address.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, i32::MAX);
    }
}

/// A new non-blocking eventfd (the app → daemon doorbell of one vsocket).
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd has no memory arguments.
    let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) }, "eventfd")?;
    // SAFETY: fresh fd, owned here.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Ring an eventfd doorbell.
pub fn eventfd_ring(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64; a full counter (EAGAIN) already means "rung".
    unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
}

/// Clear an eventfd doorbell.
pub fn eventfd_clear(fd: RawFd) {
    let mut v: u64 = 0;
    // SAFETY: reads 8 bytes into a live u64; EAGAIN (not rung) is fine.
    unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_round_trip_through_the_fd() {
        let a = Region::create(8192, 4096).unwrap();
        a.header().tx_written.store(77, Ordering::Release);
        // SAFETY: writing inside the send area of our own mapping.
        unsafe { *a.tx_area().0 = 42 };
        // SAFETY: dup of a valid fd.
        let dup = unsafe { OwnedFd::from_raw_fd(libc::dup(a.fd().unwrap().as_raw_fd())) };
        let b = Region::open(dup).unwrap();
        assert_eq!(b.header().tx_written.load(Ordering::Acquire), 77);
        assert_eq!(b.tx_area().1, 8192);
        assert_eq!(b.rx_area().1, 4096);
        // SAFETY: reading inside the send area of the second mapping.
        assert_eq!(unsafe { *b.tx_area().0 }, 42, "both mappings see the same memory");
        // Sealed: the app side cannot shrink the memory under the daemon.
        // SAFETY: ftruncate on our fd; expected to fail.
        let r = unsafe { libc::ftruncate(b.fd().unwrap().as_raw_fd(), 10) };
        assert!(r < 0, "sealed memfd must not shrink");
    }

    #[test]
    fn error_is_carried_once() {
        let a = Region::create(4096, 4096).unwrap();
        let h = a.header();
        assert!(h.error().is_none());
        h.set_error(io::ErrorKind::ConnectionReset, "connection reset by 127.0.0.2:7000");
        h.set_error(io::ErrorKind::TimedOut, "second");
        let e = h.error().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
        assert_eq!(e.to_string(), "connection reset by 127.0.0.2:7000");
    }

    #[test]
    fn a_forged_header_is_refused() {
        let a = Region::create(4096, 4096).unwrap();
        a.header().rx_cap.store(1 << 40, Ordering::Relaxed);
        // SAFETY: dup of a valid fd.
        let dup = unsafe { OwnedFd::from_raw_fd(libc::dup(a.fd().unwrap().as_raw_fd())) };
        let e = Region::open(dup).err().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn a_reset_region_is_fresh_again_and_a_used_one_is_not() {
        let mut a = Region::create(8192, 8192).unwrap();
        // SAFETY: dup of a valid fd.
        let dup = unsafe { OwnedFd::from_raw_fd(libc::dup(a.fd().unwrap().as_raw_fd())) };
        let app = Region::open(dup).unwrap();
        app.check_fresh().unwrap();
        // A vsocket's life, from both sides: positions, flags, gates, locks, an error.
        let h = app.header();
        h.tx_written.store(5000, Ordering::Release);
        h.rx_consumed.store(300, Ordering::Release);
        h.app_flags.store(SHUT_WR | CLOSED, Ordering::Release);
        h.tx_gate.store(TX_PLUGGED, Ordering::Release);
        h.rx_lock.store(2, Ordering::Release);
        h.app_waiters.store(1, Ordering::Release);
        a.header().tx_acked.store(5000, Ordering::Release);
        a.header().rx_in_order.store(300, Ordering::Release);
        a.header().set_error(io::ErrorKind::ConnectionReset, "reset by the peer");
        assert!(app.check_fresh().is_err(), "a used header is not fresh");
        // A lying app rewrote the layout too: the daemon writes it anew from its own record.
        h.rx_cap.store(1 << 40, Ordering::Relaxed);
        a.reset_for_reuse(1 << 20);
        app.check_fresh().unwrap();
        let h = app.header();
        assert!(h.error().is_none());
        assert_eq!(h.state.load(Ordering::Acquire), 0);
        assert_eq!(h.need_kick.load(Ordering::Acquire), 1, "the doorbell is armed again");
        assert_eq!(h.rx_cap.load(Ordering::Acquire), 8192);
        // Beyond `keep`, the ring pages go back to the kernel: they read as zeros.
        // SAFETY: writing inside our own send area.
        unsafe { *a.tx_area().0.add(100) = 7 };
        a.header().tx_written.store(200, Ordering::Release);
        a.reset_for_reuse(1 << 20);
        // SAFETY: reading inside the app's mapping of the same area.
        assert_eq!(unsafe { *app.tx_area().0.add(100) }, 7, "below keep the bytes stay");
        a.header().tx_written.store(200, Ordering::Release);
        a.reset_for_reuse(100);
        // SAFETY: as above.
        assert_eq!(unsafe { *app.tx_area().0.add(100) }, 0, "punched pages read as zeros");
        app.check_fresh().unwrap();
    }

    #[test]
    fn futex_wakes_a_sleeper() {
        let a = std::sync::Arc::new(Region::create(4096, 4096).unwrap());
        let b = a.clone();
        // Read before the sleeper starts: a loaded machine may start it after the ring below.
        let s = a.header().seq.load(Ordering::SeqCst);
        let t = std::thread::spawn(move || {
            let h = b.header();
            h.app_waiters.fetch_add(1, Ordering::SeqCst);
            let start = std::time::Instant::now();
            while h.seq.load(Ordering::SeqCst) == s && start.elapsed() < Duration::from_secs(10) {
                futex_wait(&h.seq, s, Duration::from_secs(10));
            }
            start.elapsed()
        });
        std::thread::sleep(Duration::from_millis(50));
        a.header().ring_app();
        assert!(t.join().unwrap() < Duration::from_secs(10));
    }
}
