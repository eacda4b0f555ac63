//! Scheduling the agent's own work behind the proxy's requests.
//!
//! The agent's main loop shares the CPUs with the proxy's runtime workers: it takes the
//! proxy's request events in batches (a log line and the metrics of each request), reads the
//! kernel's events, answers control requests and runs the 1 s housekeeping tick. Under the
//! default policy a thread that wakes up preempts the thread running on its CPU, so every
//! batch interrupted a worker in the middle of requests for as long as the batch took.
//! [`background`] puts the calling thread under `SCHED_BATCH`: it keeps its share of the CPU
//! (its nice value counts as before), but its wake-ups no longer preempt a running thread; it
//! runs when a CPU is idle or at the end of the running thread's slice.
//!
//! A thread inherits its creator's policy. Threads that serve requests and may be created by
//! the main loop (the runtime's blocking threads, the namespace worker) call [`as_before`]
//! when they start.

#![deny(unsafe_code)]

use std::{io, sync::OnceLock};

/// The policy [`background`] replaced, and its parameters.
static BEFORE: OnceLock<(libc::c_int, libc::sched_param)> = OnceLock::new();

/// Puts the calling thread (not the process) under `SCHED_BATCH`, and remembers the policy it
/// had for [`as_before`]. Needs no privilege: it only gives up wake-up preemption.
pub fn background() -> io::Result<()> {
    let before = current()?;
    BEFORE.get_or_init(|| before);
    set(libc::SCHED_BATCH, &zero_param())
}

/// Puts the calling thread back under the policy [`background`] replaced; nothing if it never
/// ran.
pub fn as_before() -> io::Result<()> {
    match BEFORE.get() {
        Some((policy, param)) => set(*policy, param),
        None => Ok(()),
    }
}

/// The calling thread's policy and parameters.
#[expect(unsafe_code, reason = "sched_getscheduler has no safe wrapper in std")]
fn current() -> io::Result<(libc::c_int, libc::sched_param)> {
    // SAFETY: no pointer; pid 0 is the calling thread.
    let policy = unsafe { libc::sched_getscheduler(0) };
    if policy < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut param = zero_param();
    // SAFETY: a valid `sched_param` to write, for the call's duration.
    if unsafe { libc::sched_getparam(0, &raw mut param) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((policy, param))
}

#[expect(unsafe_code, reason = "sched_setscheduler has no safe wrapper in std")]
fn set(policy: libc::c_int, param: &libc::sched_param) -> io::Result<()> {
    // SAFETY: a valid `sched_param` for the call's duration; pid 0 is the calling thread.
    if unsafe { libc::sched_setscheduler(0, policy, param) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Priority 0, the only one of the non-real-time policies.
#[expect(
    unsafe_code,
    reason = "sched_param's other fields differ between C libraries"
)]
fn zero_param() -> libc::sched_param {
    // SAFETY: plain integers; all zeroes is priority 0.
    unsafe { std::mem::zeroed() }
}

#[cfg(test)]
mod tests {
    fn policy() -> libc::c_int {
        super::current().expect("sched_getscheduler").0
    }

    #[test]
    fn only_the_calling_thread_becomes_batch_and_its_threads_can_go_back() {
        let before = policy();
        assert_ne!(before, libc::SCHED_BATCH);
        let (batch, inherited, restored) = std::thread::spawn(|| {
            super::background().expect("SCHED_BATCH needs no privilege");
            let child = std::thread::spawn(|| {
                let inherited = policy();
                super::as_before().expect("back to the policy before");
                (inherited, policy())
            });
            let (inherited, restored) = child.join().expect("child thread");
            (policy(), inherited, restored)
        })
        .join()
        .expect("test thread");
        assert_eq!(batch, libc::SCHED_BATCH, "the thread that asked");
        assert_eq!(
            inherited,
            libc::SCHED_BATCH,
            "a thread it created inherits it"
        );
        assert_eq!(restored, before, "and can go back to the policy before");
        assert_eq!(policy(), before, "the other threads keep their policy");
    }
}
