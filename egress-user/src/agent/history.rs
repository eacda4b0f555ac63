//! Keeps the event history of `egress events` across agent restarts: read back at start, and
//! written to the state directory at most once a second (and at exit) on a blocking thread,
//! so neither the request path nor the agent's loop waits for the disk. The file and its
//! format are [`crate::control::history`]'s.

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use crate::control::{history, server::EventHub};

/// The writer of one agent's history file.
pub(super) struct HistoryWriter {
    path: PathBuf,
    /// The newest event written (or being written).
    seen: u64,
    /// A write is under way: the next one waits for the tick after it, rather than race it
    /// for the temporary file.
    busy: Arc<AtomicBool>,
}

impl HistoryWriter {
    /// Restores the history at `path` into `hub`. A history that cannot be used is logged and
    /// left out: the agent starts with none rather than not at all.
    pub(super) fn restore(path: PathBuf, hub: &EventHub) -> Self {
        match history::load(&path) {
            Ok(events) if events.is_empty() => {}
            Ok(events) => {
                tracing::info!(
                    events = events.len(),
                    file = %path.display(),
                    "event history of the previous run restored for egress events"
                );
                hub.restore(events);
            }
            Err(e) => tracing::warn!(
                error = format!("{:#}", anyhow::Error::from(e)),
                "the event history is unusable; egress events starts empty (the file is \
                 replaced at the next event)"
            ),
        }
        let mut seen = 0;
        // What was just read back needs no writing.
        let _ = hub.recent_since(&mut seen);
        Self {
            path,
            seen,
            busy: Arc::default(),
        }
    }

    /// Writes the history in the background if there were events since the last write.
    pub(super) fn tick(&mut self, hub: &EventHub) {
        if self.busy.load(Ordering::Acquire) {
            return;
        }
        let Some(events) = hub.recent_since(&mut self.seen) else {
            return;
        };
        self.busy.store(true, Ordering::Release);
        let (path, busy) = (self.path.clone(), self.busy.clone());
        tokio::task::spawn_blocking(move || {
            if let Err(e) = history::save(&path, &events) {
                tracing::warn!(file = %path.display(), error = %e, "writing the event history");
            }
            busy.store(false, Ordering::Release);
        });
    }

    /// Writes the history now, at exit (after any write under way).
    pub(super) fn flush(&mut self, hub: &EventHub) {
        while self.busy.load(Ordering::Acquire) {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        if let Some(events) = hub.recent_since(&mut self.seen)
            && let Err(e) = history::save(&self.path, &events)
        {
            tracing::warn!(file = %self.path.display(), error = %e, "writing the event history");
        }
    }
}
