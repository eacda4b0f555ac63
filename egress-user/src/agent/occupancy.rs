//! Whether anything is in the managed cgroup: a cgroup with no process and no child cgroup for
//! a while filters nothing, which usually means `--cgroup` names the wrong one (a node whose
//! pods live under another path, a service started outside it). The agent says so once, and
//! again after the cgroup was in use and emptied.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

/// How long the managed cgroup may stay empty before the agent warns.
pub const EMPTY_WARN_AFTER: Duration = Duration::from_secs(60);

/// Overrides [`EMPTY_WARN_AFTER`] in milliseconds, for the tests only.
pub const EMPTY_WARN_AFTER_ENV: &str = "EGRESS_EMPTY_CGROUP_WARN_AFTER_MS";

/// Watches the managed cgroup for emptiness.
#[derive(Debug)]
pub struct Occupancy {
    cgroup: PathBuf,
    after: Duration,
    /// Since when it has been empty, if it is.
    empty_since: Option<Instant>,
    /// Whether this stretch of emptiness was reported.
    warned: bool,
}

impl Occupancy {
    /// Watches `cgroup`.
    pub fn new(cgroup: &Path) -> Self {
        let after = std::env::var(EMPTY_WARN_AFTER_ENV)
            .ok()
            .and_then(|ms| ms.parse().ok())
            .map_or(EMPTY_WARN_AFTER, Duration::from_millis);
        Self {
            cgroup: cgroup.to_owned(),
            after,
            empty_since: None,
            warned: false,
        }
    }

    /// Looks again (once a second); logs a warning when the cgroup has been empty for
    /// [`EMPTY_WARN_AFTER`].
    pub fn check(&mut self, now: Instant) {
        if !is_empty(&self.cgroup) {
            self.empty_since = None;
            self.warned = false;
            return;
        }
        let since = *self.empty_since.get_or_insert(now);
        if !self.warned && now.duration_since(since) >= self.after {
            self.warned = true;
            tracing::warn!(
                cgroup = %self.cgroup.display(),
                empty_for_s = now.duration_since(since).as_secs(),
                "the managed cgroup has no process and no child cgroup: nothing is filtered; is --cgroup the cgroup the workloads run in?"
            );
        }
    }
}

/// No process in `cgroup.procs` and no child cgroup. An unreadable cgroup counts as not
/// empty: this is a hint, and a wrong one must not be loud.
fn is_empty(cgroup: &Path) -> bool {
    let procs = std::fs::read_to_string(cgroup.join("cgroup.procs"));
    let no_procs = procs.is_ok_and(|p| p.trim().is_empty());
    let no_children = std::fs::read_dir(cgroup).is_ok_and(|entries| {
        !entries
            .filter_map(Result::ok)
            .any(|e| e.path().join("cgroup.procs").exists())
    });
    no_procs && no_children
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TempDir;

    #[test]
    fn emptiness_is_judged_by_processes_and_child_cgroups() {
        let dir = TempDir::new("occ");
        std::fs::create_dir_all(dir.join("child")).expect("dirs");
        std::fs::write(dir.join("cgroup.procs"), "").expect("procs");
        assert!(is_empty(&dir));
        std::fs::write(dir.join("child/cgroup.procs"), "").expect("procs");
        assert!(!is_empty(&dir), "a child cgroup");
        std::fs::remove_file(dir.join("child/cgroup.procs")).expect("rm");
        std::fs::write(dir.join("cgroup.procs"), "42\n").expect("procs");
        assert!(!is_empty(&dir), "a process");
        assert!(
            !is_empty(&dir.join("missing")),
            "unreadable counts as in use"
        );
    }
}
