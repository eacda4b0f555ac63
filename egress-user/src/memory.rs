//! Giving the heap's free pages back to the kernel once a policy change has settled.
//!
//! A reload of a 10,000-object policy builds tens of megabytes it frees again (the sources'
//! text, the checked documents, the compiled rows). glibc keeps freed memory for reuse and
//! returns only the top of each heap by itself, so the agent's resident memory stayed at its
//! peak: with 10,000 EgressRule objects, 38 MiB of the heap were free but resident
//! (`malloc_info`), and `malloc_trim` took RSS from 92 to 75 MiB. The node's memory
//! accounting (and the pod's limit in a DaemonSet) counts those pages.
//!
//! [`release_soon`] asks a thread of its own to call `malloc_trim(0)` once changes have
//! stopped for [`QUIET`]: off the way to the reload's answer, once per burst, and after the
//! old policy was freed on its own thread. `malloc_trim` walks the free chunks of every arena;
//! allocations on other threads wait for their arena's lock meanwhile (its time is in the
//! debug log line it writes).

#![deny(unsafe_code)]

use std::{
    sync::{
        OnceLock,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

/// How long changes must have stopped before the free pages are given back.
pub const QUIET: Duration = Duration::from_millis(500);

static TRIMMER: OnceLock<Option<mpsc::Sender<()>>> = OnceLock::new();

/// How many trims have run (read by the tests).
static TRIMS: AtomicU64 = AtomicU64::new(0);

/// Gives the heap's free pages back to the kernel once no call has come for [`QUIET`].
/// Never blocks; where glibc's allocator is not the one in use, does nothing.
pub fn release_soon() {
    let sender = TRIMMER.get_or_init(|| {
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("egress-trim".into())
            .spawn(move || trimmer(&rx))
            .inspect_err(
                |e| tracing::warn!(error = %e, "memory: no thread to give free pages back"),
            )
            .ok()
            .map(|_| tx)
    });
    if let Some(sender) = sender {
        let _ = sender.send(());
    }
}

/// How many times the free pages were given back so far.
#[cfg(test)]
fn trims() -> u64 {
    TRIMS.load(Ordering::Relaxed)
}

fn trimmer(requests: &mpsc::Receiver<()>) {
    while requests.recv().is_ok() {
        // Until the burst is over.
        loop {
            match requests.recv_timeout(QUIET) {
                Ok(()) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => break,
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
        }
        let before = resident_kib();
        let start = Instant::now();
        let released = trim();
        TRIMS.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            released,
            took_us = start.elapsed().as_micros(),
            rss_kib_before = before,
            rss_kib_after = resident_kib(),
            "memory: free heap pages given back"
        );
    }
}

/// `malloc_trim(0)`: every arena's free pages, not only the top of the heap. Whether any
/// memory was given back.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() -> bool {
    // SAFETY: `malloc_trim` takes no pointer and is thread-safe (it locks each arena).
    #[expect(
        unsafe_code,
        reason = "malloc_trim is glibc's only way to return free pages"
    )]
    let released = unsafe { libc::malloc_trim(0) };
    released != 0
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() -> bool {
    false
}

/// This process's resident memory (`VmRSS`), in KiB; 0 if unreadable.
pub fn resident_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The two tests trim: one must not run while the other measures.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// Freed memory that glibc kept resident goes back to the kernel: RSS falls by most of
    /// what was freed. Every 16th block stays allocated, so the freed pages sit between live
    /// ones and glibc's own trim of the heap's top cannot give them back. It runs alone in
    /// a child test process: the process's RSS is what it measures, and other tests (the
    /// proxy's bounded-memory stream) measure it too.
    #[test]
    fn a_trim_gives_back_freed_pages_between_live_ones() {
        const CHILD: &str = "EGRESS_TRIM_TEST_CHILD";
        if std::env::var_os(CHILD).is_none() {
            let child = std::process::Command::new(std::env::current_exe().expect("test binary"))
                .args([
                    "--exact",
                    "memory::tests::a_trim_gives_back_freed_pages_between_live_ones",
                ])
                .env(CHILD, "1")
                .output()
                .expect("running the test alone");
            assert!(
                child.status.success(),
                "the trim test, run alone, failed ({}):\n{}{}",
                child.status,
                String::from_utf8_lossy(&child.stdout),
                String::from_utf8_lossy(&child.stderr)
            );
            return;
        }
        const BLOCKS: usize = 128 * 1024;
        const SIZE: usize = 1024;
        let blocks: Vec<Vec<u8>> = (0..BLOCKS)
            .map(|i| vec![u8::try_from(i % 251).expect("below 251"); SIZE])
            .collect();
        let kept: Vec<Vec<u8>> = blocks
            .into_iter()
            .enumerate()
            .filter_map(|(i, block)| (i % 16 == 0).then_some(block))
            .collect();
        let freed_kib = (BLOCKS - kept.len()) * SIZE / 1024;
        let before = resident_kib();
        assert!(trim(), "malloc_trim gave nothing back");
        let after = resident_kib();
        assert!(
            before.saturating_sub(after) >= freed_kib as u64 / 2,
            "RSS {before} -> {after} KiB after freeing {freed_kib} KiB"
        );
        assert!(
            kept.iter()
                .enumerate()
                .all(|(i, b)| b[0] == u8::try_from(i * 16 % 251).expect("below 251"))
        );
    }

    /// The trimming thread runs once a burst of requests has stopped.
    #[test]
    fn a_burst_of_requests_trims_once_it_is_over() {
        let _one = ONE_AT_A_TIME.lock();
        let before = trims();
        let start = Instant::now();
        for _ in 0..5 {
            release_soon();
            std::thread::sleep(QUIET / 10);
        }
        while trims() == before {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "no trim within 10 s of the burst"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            start.elapsed() >= QUIET,
            "trimmed before the burst was over"
        );
    }
}
