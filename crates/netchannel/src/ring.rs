//! Virtual socket layer: the byte ring that holds one direction of a vsocket's stream.
//!
//! A ring of `cap` bytes is indexed by absolute stream offset modulo `cap`. It does not know
//! which offsets are valid: the vsocket state machines (`crate::proto::stream`) say which
//! region each party owns, and the callers uphold that no two parties touch the same bytes
//! at once. That contract is why the accessors are `unsafe`.
//!
//! Memory is mapped from the kernel, which provides zeroed pages lazily: a vsocket that moves
//! few bytes costs little resident memory and no set-up time, whatever its buffer size.
//! A [`RingPool`] recycles the memory of closed vsockets.

use std::sync::{Arc, Mutex, Weak};

/// A fixed-size byte ring.
pub struct Ring {
    ptr: *mut u8,
    cap: usize,
    /// Where the memory goes back to when the ring is dropped.
    pool: Option<Weak<RingPool>>,
    /// Shared memory the ring lives in (a daemon-served vsocket), kept mapped while the ring
    /// lives; such a ring is neither pooled nor unmapped by itself.
    region: Option<Arc<crate::shm::Region>>,
}

/// Recycles ring memory between vsockets, sparing an `mmap`/`munmap` pair (and the page
/// faults and TLB shootdowns they bring) for each short-lived vsocket. A recycled ring holds
/// old bytes, which is harmless: no offset is read before it has been written.
#[derive(Debug)]
pub struct RingPool {
    free: Mutex<Vec<(usize, usize)>>,
    max_bytes: usize,
}

impl RingPool {
    /// A pool that keeps at most `max_bytes` of free ring memory.
    pub fn new(max_bytes: usize) -> Arc<RingPool> {
        Arc::new(RingPool { free: Mutex::new(Vec::new()), max_bytes })
    }

    /// A ring of `cap` bytes, recycled if one is free.
    pub fn take(self: &Arc<Self>, cap: usize) -> Ring {
        let reused = {
            let mut free = self.free.lock().unwrap();
            free.iter().position(|&(_, c)| c == cap).map(|i| free.swap_remove(i))
        };
        let mut ring = match reused {
            Some((addr, cap)) => Ring { ptr: addr as *mut u8, cap, pool: None, region: None },
            None => Ring::new(cap),
        };
        ring.pool = Some(Arc::downgrade(self));
        ring
    }

    /// Keep `ring`'s memory if there is room; false if the caller must unmap it.
    fn give_back(&self, ptr: *mut u8, cap: usize) -> bool {
        let mut free = self.free.lock().unwrap();
        let held: usize = free.iter().map(|&(_, c)| c).sum();
        if held + cap > self.max_bytes {
            return false;
        }
        free.push((ptr as usize, cap));
        true
    }
}

impl Drop for RingPool {
    fn drop(&mut self) {
        for &(addr, cap) in self.free.get_mut().unwrap().iter() {
            // SAFETY: mapped by `Ring::new` with this length, owned by the pool alone.
            unsafe { libc::munmap(addr as *mut libc::c_void, cap) };
        }
    }
}

// SAFETY: the ring is plain memory; concurrent access is coordinated by the vsocket state
// (each region has one owner at a time), as the `unsafe` accessors require of callers.
unsafe impl Send for Ring {}
// SAFETY: as above.
unsafe impl Sync for Ring {}

/// A contiguous piece of a ring region: a raw pointer and a length.
#[derive(Debug, Clone, Copy)]
pub struct RawPart {
    pub ptr: *mut u8,
    pub len: usize,
}

impl Ring {
    /// A zeroed ring of `cap` bytes (`cap` > 0), mapped straight from the kernel: its pages
    /// are zero-filled on first touch, so creating a ring costs no memset whatever its size
    /// (a heap allocation would be recycled dirty memory and need clearing).
    pub fn new(cap: usize) -> Ring {
        assert!(cap > 0, "ring capacity must be positive");
        // SAFETY: an anonymous private mapping with no address hint; checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                cap,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            panic!("cannot map a {cap}-byte vsocket buffer: {}", std::io::Error::last_os_error());
        }
        Ring { ptr: ptr.cast(), cap, pool: None, region: None }
    }

    /// The send ring (`tx`) or the receive ring of a vsocket's shared memory.
    pub fn in_region(region: &Arc<crate::shm::Region>, tx: bool) -> Ring {
        let (ptr, cap) = if tx { region.tx_area() } else { region.rx_area() };
        assert!(cap > 0, "ring capacity must be positive");
        Ring { ptr, cap, pool: None, region: Some(region.clone()) }
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// The region `[offset, offset + len)` as at most two contiguous parts.
    ///
    /// # Panics
    /// If `len` exceeds the capacity.
    pub fn parts(&self, offset: u64, len: usize) -> [RawPart; 2] {
        assert!(len <= self.cap, "region of {len} bytes exceeds ring of {}", self.cap);
        let start = (offset % self.cap as u64) as usize;
        let first = len.min(self.cap - start);
        // SAFETY: start < cap, so the pointer stays inside the allocation.
        let p0 = unsafe { self.ptr.add(start) };
        [RawPart { ptr: p0, len: first }, RawPart { ptr: self.ptr, len: len - first }]
    }

    /// Copy `src` into the ring at stream offset `offset`.
    ///
    /// # Safety
    /// The caller must own `[offset, offset + src.len())`: no other thread reads or writes
    /// those ring bytes until this call returns.
    pub unsafe fn write(&self, offset: u64, src: &[u8]) {
        let [a, b] = self.parts(offset, src.len());
        // SAFETY: parts are inside the allocation and, by the caller's contract, unshared.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), a.ptr, a.len);
            std::ptr::copy_nonoverlapping(src.as_ptr().add(a.len), b.ptr, b.len);
        }
    }

    /// Copy ring bytes at stream offset `offset` into `dst`.
    ///
    /// # Safety
    /// No other thread may write `[offset, offset + dst.len())` until this call returns.
    pub unsafe fn read(&self, offset: u64, dst: &mut [u8]) {
        let [a, b] = self.parts(offset, dst.len());
        // SAFETY: as for `write`, with the roles reversed.
        unsafe {
            std::ptr::copy_nonoverlapping(a.ptr, dst.as_mut_ptr(), a.len);
            std::ptr::copy_nonoverlapping(b.ptr, dst.as_mut_ptr().add(a.len), b.len);
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        if self.region.is_some() {
            return; // the region unmaps its memory when its last user goes
        }
        if let Some(pool) = self.pool.as_ref().and_then(Weak::upgrade) {
            if pool.give_back(self.ptr, self.cap) {
                return;
            }
        }
        // SAFETY: mapped in `new` with this length and not used after this.
        unsafe { libc::munmap(self.ptr.cast(), self.cap) };
    }
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ring({} bytes)", self.cap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wraps_around() {
        let r = Ring::new(10);
        let mut out = [0u8; 6];
        // SAFETY: single-threaded test.
        unsafe {
            r.write(7, &[1, 2, 3, 4, 5, 6]);
            r.read(7, &mut out);
        }
        assert_eq!(out, [1, 2, 3, 4, 5, 6]);
        let [a, b] = r.parts(27, 6);
        assert_eq!((a.len, b.len), (3, 3));
    }

    #[test]
    fn pool_recycles_within_its_bound() {
        let pool = RingPool::new(3 << 16);
        let a = pool.take(1 << 16);
        let addr = a.ptr as usize;
        drop(a);
        let b = pool.take(1 << 16);
        assert_eq!(b.ptr as usize, addr, "memory recycled");
        let c = pool.take(1 << 17);
        let d = pool.take(1 << 17);
        drop(b);
        drop(c);
        drop(d); // over the bound: unmapped, not kept
        let held: usize = pool.free.lock().unwrap().iter().map(|&(_, c)| c).sum();
        assert!(held <= 3 << 16, "pool holds {held} bytes");
    }
}
