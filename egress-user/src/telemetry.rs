//! Logging: one place configures tracing, from one environment variable, `EGRESS_LOG`
//! (an `EnvFilter` directive such as `info` or `egress_user=debug`; default `info`).

#![forbid(unsafe_code)]

use std::io::IsTerminal as _;

use tracing_subscriber::{EnvFilter, fmt};

/// The environment variable that sets the log filter.
pub const LOG_ENV: &str = "EGRESS_LOG";

/// Installs the global subscriber, writing to standard error, in colour only on a terminal
/// (a log file or journald gets plain `key=value` text). Calling it twice is harmless.
pub fn init() {
    let filter = EnvFilter::try_from_env(LOG_ENV).unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// Bounds the WARN lines of denials (kernel deny and would-deny verdicts, proxy refusals),
/// which a workload can cause as fast as it can call `connect()`: 20,000 lines in 0.3 s buried
/// everything else in the log. Per window of one second it lets through the first
/// [`LogLimit::PER_KEY`] lines of each key (a cgroup and a destination, or a client and a
/// host) and at most [`LogLimit::PER_WINDOW`] in all, and counts the rest; the next denial
/// after the window, or [`LogLimit::flush`] (the agent calls it every second), logs one
/// summary line for them. Only the log is bounded: `egress events`, the event ring buffer and
/// every counter still see each denial.
#[derive(Debug, Default)]
pub struct LogLimit {
    window: std::sync::Mutex<Window>,
}

#[derive(Debug, Default)]
struct Window {
    /// When the window began; `None` before the first denial.
    start: Option<std::time::Instant>,
    /// Lines let through in this window, in all.
    logged: u32,
    /// Per key: lines let through and lines held back in this window.
    per_key: std::collections::HashMap<String, (u32, u64)>,
    /// Lines held back in this window.
    suppressed: u64,
    /// The key held back most, and how often.
    top: Option<(String, u64)>,
}

/// The lines a window held back, for its summary line.
#[derive(Debug, PartialEq, Eq)]
pub struct Suppressed {
    /// How many.
    pub count: u64,
    /// The key held back most, and how often.
    pub top: (String, u64),
}

impl LogLimit {
    /// Lines per key per window.
    pub const PER_KEY: u32 = 5;
    /// Lines per window in all.
    pub const PER_WINDOW: u32 = 50;
    /// The window.
    pub const WINDOW: std::time::Duration = std::time::Duration::from_secs(1);
    /// Distinct keys remembered per window: a scan of many destinations must not grow the
    /// map without bound; past this, every key counts against the window's total only.
    const MAX_KEYS: usize = 4096;

    /// A limiter with nothing logged yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// True when a denial line for `key` may be logged now. Logs the summary of the window
    /// before first, if it is over.
    pub fn admit(&self, key: &str) -> bool {
        let (admit, summary) = self.admit_at(key, std::time::Instant::now());
        if let Some(s) = summary {
            log_summary(&s);
        }
        admit
    }

    /// Logs the summary of the window, if it is over and held lines back.
    pub fn flush(&self) {
        if let Some(s) = self.flush_at(std::time::Instant::now()) {
            log_summary(&s);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Window> {
        self.window.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// [`LogLimit::admit`] at `now`: whether to log, and the summary of a window that ended.
    fn admit_at(&self, key: &str, now: std::time::Instant) -> (bool, Option<Suppressed>) {
        let mut guard = self.lock();
        let w = &mut *guard;
        let summary = w.roll(now);
        let known = w.per_key.len() < Self::MAX_KEYS || w.per_key.contains_key(key);
        let for_key = if known {
            w.per_key.entry(key.to_owned()).or_default().0
        } else {
            Self::PER_KEY
        };
        if w.logged < Self::PER_WINDOW && for_key < Self::PER_KEY {
            w.logged += 1;
            if let Some(k) = w.per_key.get_mut(key) {
                k.0 += 1;
            }
            return (true, summary);
        }
        w.suppressed += 1;
        // The top key is found among the remembered ones: a count for every key would be the
        // unbounded map that MAX_KEYS prevents.
        if let Some(k) = w.per_key.get_mut(key) {
            k.1 += 1;
            match &mut w.top {
                Some((top, n)) if top == key => *n = k.1,
                Some((_, n)) if *n >= k.1 => {}
                _ => w.top = Some((key.to_owned(), k.1)),
            }
        }
        (false, summary)
    }

    /// [`LogLimit::flush`] at `now`.
    fn flush_at(&self, now: std::time::Instant) -> Option<Suppressed> {
        let mut w = self.lock();
        let summary = w.roll(now);
        // Nothing after a quiet window: the next denial starts a new one.
        if w.start
            .is_some_and(|s| now.duration_since(s) >= Self::WINDOW)
        {
            *w = Window::default();
        }
        summary
    }
}

impl Window {
    /// Starts a new window if this one is over (or none began), returning what the old one
    /// held back.
    fn roll(&mut self, now: std::time::Instant) -> Option<Suppressed> {
        match self.start {
            Some(s) if now.duration_since(s) < LogLimit::WINDOW => None,
            _ => {
                let old = std::mem::take(self);
                self.start = Some(now);
                (old.suppressed > 0).then(|| Suppressed {
                    count: old.suppressed,
                    top: old.top.unwrap_or_default(),
                })
            }
        }
    }
}

fn log_summary(s: &Suppressed) {
    tracing::warn!(
        suppressed = s.count,
        top = %s.top.0,
        top_count = s.top.1,
        "... and {} more denials and refused requests in the last second, not logged one by one \
         (egress events and the counters have every one)",
        s.count
    );
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    /// Offers each (key, time) to `limit` and counts the lines it lets through; all in one
    /// window, so no summary is due on the way.
    fn logged(limit: &LogLimit, offers: impl Iterator<Item = (String, Instant)>) -> u32 {
        offers
            .map(|(key, at)| {
                let (admit, summary) = limit.admit_at(&key, at);
                assert_eq!(summary, None, "{key}");
                u32::from(admit)
            })
            .sum()
    }

    #[test]
    fn a_burst_from_one_key_logs_a_few_lines_and_one_summary() {
        let limit = LogLimit::new();
        let t0 = Instant::now();
        let burst = (0..2000u64).map(|i| {
            (
                "cgroup 7 -> 192.0.2.1:80".to_owned(),
                t0 + Duration::from_micros(i * 100),
            )
        });
        assert_eq!(logged(&limit, burst), LogLimit::PER_KEY);
        // Nothing until the window is over, then one summary with all the rest.
        assert_eq!(limit.flush_at(t0 + Duration::from_millis(500)), None);
        assert_eq!(
            limit.flush_at(t0 + Duration::from_secs(1)),
            Some(Suppressed {
                count: 2000 - u64::from(LogLimit::PER_KEY),
                top: ("cgroup 7 -> 192.0.2.1:80".to_owned(), 1995)
            })
        );
        // The next window logs again.
        assert!(
            limit
                .admit_at("cgroup 7 -> 192.0.2.1:80", t0 + Duration::from_secs(3))
                .0
        );
    }

    #[test]
    fn many_keys_are_bounded_in_all_and_the_summary_comes_with_the_next_denial() {
        let limit = LogLimit::new();
        let t0 = Instant::now();
        let keys =
            (0..20_000u32).map(|i| (format!("cgroup 7 -> 192.0.2.{}:{}", i % 250, i / 250), t0));
        assert_eq!(logged(&limit, keys), LogLimit::PER_WINDOW);
        let (admit, summary) = limit.admit_at("other", t0 + Duration::from_millis(1500));
        assert!(admit);
        assert_eq!(
            summary.map(|s| s.count),
            Some(20_000 - u64::from(LogLimit::PER_WINDOW))
        );
        assert!(limit.lock().per_key.len() <= LogLimit::MAX_KEYS);
    }

    #[test]
    fn a_quiet_window_logs_no_summary() {
        let limit = LogLimit::new();
        let t0 = Instant::now();
        assert!(limit.admit_at("a", t0).0);
        assert_eq!(limit.flush_at(t0 + Duration::from_secs(2)), None);
    }
}
