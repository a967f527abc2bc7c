//! Thread placement: the optional CPU lists of the engine's threads (`channel_worker_cpus`,
//! `latency_worker_cpus`, `copy_worker_cpus`), applied with `sched_setaffinity`.
//!
//! An edge module (a syscall and its checks); it knows nothing of channels or vsockets. A
//! list is checked when the host starts, against the CPUs this process may run on, so that a
//! CPU that does not exist or is outside the process's cpuset is reported with its key
//! instead of leaving a worker where the scheduler put it. An empty list pins nothing.

use std::io;

use crate::config::MAX_CPUS;

/// The CPUs the calling thread may run on now (`sched_getaffinity`), ascending.
pub fn allowed_cpus() -> io::Result<Vec<usize>> {
    // SAFETY: cpu_set_t is plain data; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid cpu_set_t of the size passed, written by the kernel.
    let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: CPU_ISSET reads the set it is given; `c` < CPU_SETSIZE.
    Ok((0..MAX_CPUS).filter(|&c| unsafe { libc::CPU_ISSET(c, &set) }).collect())
}

/// Check that every CPU of `cpus` (the value of config key `key`) is one this process may
/// run on. The error names the key, the CPU and the CPUs that are allowed.
pub fn check(key: &str, cpus: &[usize]) -> io::Result<()> {
    if cpus.is_empty() {
        return Ok(());
    }
    let allowed = allowed_cpus()?;
    match cpus.iter().find(|c| !allowed.contains(c)) {
        None => Ok(()),
        Some(c) => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "config key `{key}`: CPU {c} is not one this process may run on (allowed: {}); \
                 list CPUs from that set, or leave the key empty",
                describe(&allowed)
            ),
        )),
    }
}

/// Let the calling thread run only on `cpus`; nothing when `cpus` is empty.
pub fn pin_current_thread(cpus: &[usize]) -> io::Result<()> {
    if cpus.is_empty() {
        return Ok(());
    }
    // SAFETY: cpu_set_t is plain data; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus.iter().filter(|&&c| c < MAX_CPUS) {
        // SAFETY: CPU_SET writes bit `c` of `set`, and `c` < CPU_SETSIZE.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    // SAFETY: `set` is a valid cpu_set_t of the size passed; 0 is the calling thread.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Pin the calling thread (named `what` in the warning) to `cpus`, or log why it could not
/// be: the thread still runs, wherever the scheduler puts it. The lists were checked when
/// the host started, so this fails only when the process's cpuset shrank since.
pub fn pin_or_warn(what: &str, cpus: &[usize]) {
    if let Err(e) = pin_current_thread(cpus) {
        tracing::warn!(thread = what, cpus = %describe(cpus), error = %e, "a thread runs on any CPU: cannot pin it");
    }
}

/// "0-3,6" for a CPU list.
pub fn describe(cpus: &[usize]) -> String {
    let mut sorted = cpus.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut out = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        while i + 1 < sorted.len() && sorted[i + 1] == sorted[i] + 1 {
            i += 1;
        }
        out.push(if sorted[i] == start { start.to_string() } else { format!("{start}-{}", sorted[i]) });
        i += 1;
    }
    out.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_ranges() {
        assert_eq!(describe(&[3, 0, 1, 2, 6, 6]), "0-3,6");
        assert_eq!(describe(&[5]), "5");
        assert_eq!(describe(&[]), "");
    }

    #[test]
    fn pins_to_an_allowed_cpu_and_refuses_one_outside() {
        let allowed = allowed_cpus().unwrap();
        let first = allowed[0];
        // On a thread of its own, so the test runner's threads keep their placement.
        std::thread::spawn(move || {
            pin_current_thread(&[first]).unwrap();
            assert_eq!(allowed_cpus().unwrap(), [first]);
        })
        .join()
        .unwrap();
        check("copy_worker_cpus", &allowed).unwrap();
        let outside = (0..MAX_CPUS).find(|c| !allowed.contains(c)).unwrap();
        let e = check("copy_worker_cpus", &[first, outside]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(
            e.to_string().contains("copy_worker_cpus") && e.to_string().contains(&outside.to_string()),
            "{e}"
        );
    }
}
