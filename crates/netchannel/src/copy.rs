//! Virtual socket layer: the copy worker pool.
//!
//! One application thread's large read or write is split into chunks that `copy_workers`
//! threads copy in parallel while the application thread copies its own share; the call
//! returns when every chunk is done. With 0 workers the application thread copies alone.
//! This is how one app thread uses several cores' worth of memory bandwidth.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// Smallest chunk handed to a worker: smaller copies are not worth the hand-off.
pub const MIN_CHUNK: usize = 64 << 10;

/// One contiguous copy.
#[derive(Debug, Clone, Copy)]
pub struct CopyTask {
    pub src: *const u8,
    pub dst: *mut u8,
    pub len: usize,
}

// SAFETY: a task is only handed to a worker while its submitter blocks in `CopyPool::run`,
// which keeps both buffers alive and unshared until every task is done.
unsafe impl Send for CopyTask {}

struct Batch {
    remaining: Mutex<usize>,
    done: Condvar,
}

/// Queued chunks with the batch each belongs to, and whether the pool is stopping.
type Jobs = (VecDeque<(CopyTask, Arc<Batch>)>, bool);

struct Queue {
    jobs: Mutex<Jobs>,
    ready: Condvar,
}

/// A pool of copy workers.
pub struct CopyPool {
    queue: Arc<Queue>,
    workers: Vec<JoinHandle<()>>,
    threshold: usize,
}

impl CopyPool {
    /// Start `workers` copy threads, each allowed only on `cpus` (empty: anywhere); copies of
    /// at least `threshold` bytes are split.
    pub fn new(workers: usize, threshold: usize, cpus: &[usize]) -> std::io::Result<CopyPool> {
        let queue = Arc::new(Queue { jobs: Mutex::new((VecDeque::new(), false)), ready: Condvar::new() });
        let mut handles = Vec::new();
        for i in 0..workers {
            let q = queue.clone();
            let cpus = cpus.to_vec();
            handles.push(std::thread::Builder::new().name(format!("nc-copy-{i}")).spawn(move || {
                crate::placement::pin_or_warn("a copy worker", &cpus);
                worker(&q)
            })?);
        }
        Ok(CopyPool { queue, workers: handles, threshold })
    }

    /// Number of worker threads.
    pub fn workers(&self) -> usize {
        self.workers.len()
    }

    /// Copy every task, splitting large ones among the workers; returns when all are done.
    ///
    /// # Safety
    /// Each task's `src` must be valid for reads and `dst` for writes of `len` bytes, the
    /// destinations must not overlap each other or any source, and nothing else may write
    /// them until this call returns.
    pub unsafe fn run(&self, tasks: &[CopyTask]) {
        let total: usize = tasks.iter().map(|t| t.len).sum();
        if self.workers.is_empty() || total < self.threshold {
            for t in tasks {
                // SAFETY: the caller's contract.
                unsafe { std::ptr::copy_nonoverlapping(t.src, t.dst, t.len) };
            }
            return;
        }
        // Split into one share per thread (workers + this one), at least MIN_CHUNK each.
        let shares = self.workers.len() + 1;
        let chunk = total.div_ceil(shares).max(MIN_CHUNK);
        let mut chunks = Vec::new();
        for t in tasks {
            let mut done = 0;
            while done < t.len {
                let n = chunk.min(t.len - done);
                // SAFETY: done + n <= len, inside both buffers.
                chunks.push(unsafe { CopyTask { src: t.src.add(done), dst: t.dst.add(done), len: n } });
                done += n;
            }
        }
        let mine = chunks.pop().expect("at least one chunk");
        let batch = Arc::new(Batch { remaining: Mutex::new(chunks.len()), done: Condvar::new() });
        if !chunks.is_empty() {
            let mut q = self.queue.jobs.lock().unwrap();
            for c in chunks {
                q.0.push_back((c, batch.clone()));
            }
            drop(q);
            self.queue.ready.notify_all();
        }
        // SAFETY: the caller's contract.
        unsafe { std::ptr::copy_nonoverlapping(mine.src, mine.dst, mine.len) };
        // Help with our own batch if workers are busy elsewhere, then wait.
        loop {
            let job = {
                let mut q = self.queue.jobs.lock().unwrap();
                let pos = q.0.iter().position(|(_, b)| Arc::ptr_eq(b, &batch));
                pos.and_then(|p| q.0.remove(p))
            };
            match job {
                Some((t, b)) => {
                    // SAFETY: the caller's contract.
                    unsafe { std::ptr::copy_nonoverlapping(t.src, t.dst, t.len) };
                    *b.remaining.lock().unwrap() -= 1;
                }
                None => break,
            }
        }
        let mut left = batch.remaining.lock().unwrap();
        while *left > 0 {
            left = batch.done.wait(left).unwrap();
        }
    }
}

fn worker(q: &Queue) {
    loop {
        let (task, batch) = {
            let mut jobs = q.jobs.lock().unwrap();
            loop {
                if let Some(j) = jobs.0.pop_front() {
                    break j;
                }
                if jobs.1 {
                    return;
                }
                jobs = q.ready.wait(jobs).unwrap();
            }
        };
        // SAFETY: the submitter blocks in `run` until this task is counted done.
        unsafe { std::ptr::copy_nonoverlapping(task.src, task.dst, task.len) };
        let mut left = batch.remaining.lock().unwrap();
        *left -= 1;
        if *left == 0 {
            batch.done.notify_all();
        }
    }
}

impl Drop for CopyPool {
    fn drop(&mut self) {
        self.queue.jobs.lock().unwrap().1 = true;
        self.queue.ready.notify_all();
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parallel_copy_is_exact() {
        for workers in [0, 1, 3] {
            let pool = CopyPool::new(workers, 256 << 10, &[]).unwrap();
            let src: Vec<u8> = (0..3_000_001u32).map(|i| (i * 7 + i / 255) as u8).collect();
            let mut dst = vec![0u8; src.len()];
            let (a, b) = src.split_at(1_000_000);
            let (da, db) = dst.split_at_mut(1_000_000);
            let tasks = [
                CopyTask { src: a.as_ptr(), dst: da.as_mut_ptr(), len: a.len() },
                CopyTask { src: b.as_ptr(), dst: db.as_mut_ptr(), len: b.len() },
            ];
            // SAFETY: disjoint buffers owned by this test, alive across the call.
            unsafe { pool.run(&tasks) };
            assert!(src == dst, "copy with {workers} workers differs");
        }
    }
}
