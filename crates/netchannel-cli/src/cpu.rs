//! CPU time accounting for benchmarks: seconds of user + system CPU consumed by the whole
//! process (`getrusage(RUSAGE_SELF)`: app threads, channel workers and copy workers together)
//! or by the calling thread alone (`getrusage(RUSAGE_THREAD)`).
//!
//! Benchmarks report CPU seconds beside throughput, so that "faster" can be told apart from
//! "faster because it burned more cores".

use std::mem::MaybeUninit;

fn rusage_seconds(who: libc::c_int) -> f64 {
    let mut ru = MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `ru` points to writable memory of the size of `struct rusage`; getrusage only
    // writes into it, and `who` is one of the constants the kernel accepts.
    let rc = unsafe { libc::getrusage(who, ru.as_mut_ptr()) };
    if rc != 0 {
        return 0.0;
    }
    // SAFETY: getrusage returned 0, so it filled the whole struct (and it was zeroed anyway).
    let ru = unsafe { ru.assume_init() };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Child processes (benchmark daemons) whose CPU counts as this process's while registered.
static CHILDREN: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());

/// Count `pid`'s CPU in [`process_seconds`] from now on.
pub fn add_child(pid: u32) {
    CHILDREN.lock().unwrap().push(pid);
}

/// Stop counting `pid`'s CPU.
pub fn remove_child(pid: u32) {
    CHILDREN.lock().unwrap().retain(|&p| p != pid);
}

/// User + system CPU seconds of a live process, from `/proc/PID/stat`; 0 if unreadable.
fn proc_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else { return 0.0 };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no memory arguments.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (ticks(11) + ticks(12)) / hz
}

/// User + system CPU seconds consumed so far by every thread of this process, plus those of
/// the registered child processes ([`add_child`]: the daemons of `--backend daemon`).
pub fn process_seconds() -> f64 {
    let children: f64 = CHILDREN.lock().unwrap().iter().map(|&p| proc_seconds(p)).sum();
    rusage_seconds(libc::RUSAGE_SELF) + children
}

/// User + system CPU seconds consumed so far by the calling thread.
pub fn thread_seconds() -> f64 {
    rusage_seconds(libc::RUSAGE_THREAD)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn burn() -> u64 {
        let start = std::time::Instant::now();
        let mut x = 1u64;
        while start.elapsed() < std::time::Duration::from_millis(50) {
            for _ in 0..10_000 {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
        }
        x
    }

    #[test]
    fn counters_grow_with_work() {
        let p0 = process_seconds();
        let t0 = thread_seconds();
        burn();
        let t1 = thread_seconds();
        let p1 = process_seconds();
        assert!(t1 > t0, "thread CPU {t0} -> {t1}");
        assert!(p1 > p0, "process CPU {p0} -> {p1}");
        assert!(p1 >= t1 - 1e-3);
    }

    #[test]
    fn proc_stat_of_this_process_counts() {
        // Burn CPU time, not wall time: on a loaded machine 50 ms of wall time may be less
        // than one clock tick of CPU.
        let t0 = thread_seconds();
        while thread_seconds() - t0 < 0.1 {
            burn();
        }
        let own = proc_seconds(std::process::id());
        assert!(own > 0.0 && own <= process_seconds() + 0.05, "{own}");
        assert_eq!(proc_seconds(u32::MAX), 0.0);
    }
}
