//! Virtual socket layer: the byte ring that holds one direction of a vsocket's stream.
//!
//! A ring of `cap` bytes is indexed by absolute stream offset modulo `cap`. It does not know
//! which offsets are valid: the vsocket state machines (`crate::proto::stream`) say which
//! region each party owns, and the callers uphold that no two parties touch the same bytes
//! at once. That contract is why the accessors are `unsafe`.
//!
//! Memory is mapped from the kernel, which provides zeroed pages lazily: a vsocket that moves
//! few bytes costs little resident memory and no set-up time, whatever its buffer size.

/// A fixed-size byte ring.
pub struct Ring {
    ptr: *mut u8,
    cap: usize,
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
        Ring { ptr: ptr.cast(), cap }
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
}
