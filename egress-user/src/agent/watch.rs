//! Watching the policy files: inotify (through the `notify` crate) on each policy directory,
//! and on the directory of each policy file (editors and Kubernetes ConfigMap updates replace
//! files by renaming, which a watch on the file itself would miss).
//!
//! Changes come in bursts (a ConfigMap update swaps a symlink and several files; an editor
//! writes, renames and chmods), so the agent waits until [`QUIET`] has passed without a change
//! before it reloads, and then reloads only if the policy's bytes differ from what is in force.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    time::Duration,
};

use notify::{RecommendedWatcher, RecursiveMode, Watcher as _};
use tokio::sync::mpsc;

/// How long the files must stay unchanged before a reload.
pub const QUIET: Duration = Duration::from_millis(200);

/// A running watch; dropping it stops watching.
pub struct PolicyWatch {
    _watcher: RecommendedWatcher,
    changes: mpsc::Receiver<()>,
    /// When the last change of a burst not yet reported was seen. Kept here, not in the
    /// future, so that [`PolicyWatch::changed`] is cancel-safe: the agent's loop drops it
    /// whenever another event comes first, and the burst must not be forgotten then.
    last_change: Option<tokio::time::Instant>,
}

impl PolicyWatch {
    /// Watches the directories that hold `paths` (and each path that is a directory).
    ///
    /// # Errors
    /// inotify cannot be set up, or a directory cannot be watched.
    pub fn new(paths: &[PathBuf]) -> notify::Result<Self> {
        let (tx, changes) = mpsc::channel(1);
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                match event {
                    // Access events (a read of the files) are not changes.
                    Ok(e) if e.kind.is_access() => {}
                    // A full channel already holds a wake-up; that is enough.
                    Ok(_) => {
                        let _ = tx.try_send(());
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "watching the policy files");
                        let _ = tx.try_send(());
                    }
                }
            })?;
        for dir in directories(paths) {
            watcher.watch(&dir, RecursiveMode::NonRecursive)?;
            tracing::debug!(dir = %dir.display(), "watching for policy changes");
        }
        Ok(Self {
            _watcher: watcher,
            changes,
            last_change: None,
        })
    }

    /// Waits for a change, then for [`QUIET`] without one. Cancel-safe.
    pub async fn changed(&mut self) {
        loop {
            let Some(last) = self.last_change else {
                if self.changes.recv().await.is_none() {
                    // The watcher is gone: never report a change again.
                    std::future::pending::<()>().await;
                }
                self.last_change = Some(tokio::time::Instant::now());
                continue;
            };
            tokio::select! {
                () = tokio::time::sleep_until(last + QUIET) => {
                    self.last_change = None;
                    return;
                }
                more = self.changes.recv() => match more {
                    Some(()) => self.last_change = Some(tokio::time::Instant::now()),
                    None => {
                        self.last_change = None;
                        return;
                    }
                },
            }
        }
    }
}

/// The directories to watch: each path that is a directory, and the parent of each other path.
fn directories(paths: &[PathBuf]) -> BTreeSet<PathBuf> {
    paths
        .iter()
        .map(|p| {
            if p.is_dir() {
                p.clone()
            } else {
                match p.parent() {
                    Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
                    _ => Path::new(".").to_owned(),
                }
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TempDir;

    #[tokio::test]
    async fn a_rename_over_a_watched_file_is_seen_once_it_settles() {
        let dir = TempDir::new("watch");
        let file = dir.file("policy.yaml", "a");
        let mut watch = PolicyWatch::new(std::slice::from_ref(&file)).unwrap();
        // Nothing changed: no wake-up.
        let quiet = tokio::time::timeout(QUIET * 3, watch.changed()).await;
        assert!(quiet.is_err(), "woke up without a change");
        let tmp = dir.join(".policy.yaml.tmp");
        std::fs::write(&tmp, "b").unwrap();
        std::fs::rename(&tmp, &file).unwrap();
        // Interrupted (as the agent's loop does when another event comes first) while the
        // burst settles: the change is still reported afterwards.
        let interrupted = tokio::time::timeout(QUIET / 4, watch.changed()).await;
        assert!(interrupted.is_err(), "reported before the files were quiet");
        tokio::time::timeout(Duration::from_secs(5), watch.changed())
            .await
            .expect("the rename is seen");
    }

    #[test]
    fn files_are_watched_through_their_directory() {
        let got = directories(&[
            PathBuf::from("/etc/egress/a.yaml"),
            PathBuf::from("/etc/egress/b.yaml"),
            PathBuf::from("rel.yaml"),
        ]);
        let want: BTreeSet<PathBuf> = [PathBuf::from("/etc/egress"), PathBuf::from(".")].into();
        assert_eq!(got, want);
    }
}
