//! The event history on disk: the last [`RECENT_EVENTS`] events of `egress events`, kept in the
//! agent's state directory so that a restarted agent still lists what happened before it.
//!
//! The file (`<state-dir>/events.jsonl`) holds one event a line, oldest first, each a JSON
//! object as `egress events -o json` prints it. The agent rewrites it whole (a new file renamed
//! over the old one, so a crash leaves the old or the new, never half of one) at most once a
//! second, and only when there were new events, away from the request path: publishing an
//! event costs nothing more than it did. Events of the last second before a crash are lost.
//!
//! A file that cannot be read or parsed is reported and ignored: the agent starts with an
//! empty history rather than not at all.

use std::{
    fs,
    io::{self, Write as _},
    path::{Path, PathBuf},
};

use super::{WireEvent, server::RECENT_EVENTS};
use crate::policy::read::read_bounded;

pub use crate::state::HISTORY_FILE;

/// The largest history file read: [`RECENT_EVENTS`] events of about 400 bytes each, with room
/// for long reasons and hosts; anything larger was not written by the agent.
const MAX_HISTORY_SIZE: u64 = 4 * 1024 * 1024;

/// Why the history file was not taken.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// It could not be read (a directory, over the size limit, no permission).
    #[error("{}: cannot read it", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: crate::policy::read::ReadError,
    },
    /// A line is not an event.
    #[error("{}:{line}: not an event", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What the JSON parser said.
        #[source]
        source: serde_json::Error,
    },
}

/// The history at `path`, oldest first, at most [`RECENT_EVENTS`] of them; none when the file
/// does not exist.
///
/// # Errors
/// The file exists but cannot be read, or a line of it is not an event: the caller warns and
/// starts empty.
pub fn load(path: &Path) -> Result<Vec<WireEvent>, HistoryError> {
    let bytes = match read_bounded(path, MAX_HISTORY_SIZE) {
        Ok(bytes) => bytes,
        Err(crate::policy::read::ReadError::Open(e)) if e.kind() == io::ErrorKind::NotFound => {
            return Ok(Vec::new());
        }
        Err(source) => {
            return Err(HistoryError::Read {
                path: path.to_owned(),
                source,
            });
        }
    };
    let mut events = Vec::new();
    for (i, line) in bytes.split(|b| *b == b'\n').enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let event = serde_json::from_slice(line).map_err(|source| HistoryError::Parse {
            path: path.to_owned(),
            line: i + 1,
            source,
        })?;
        events.push(event);
    }
    let skip = events.len().saturating_sub(RECENT_EVENTS);
    events.drain(..skip);
    Ok(events)
}

/// Writes `events` as the history at `path` (mode 0600): into a temporary file beside it,
/// then renamed over it.
///
/// # Errors
/// The file cannot be written or renamed.
pub fn save(path: &Path, events: &[WireEvent]) -> io::Result<()> {
    let mut text = Vec::with_capacity(events.len() * 256);
    for event in events {
        serde_json::to_writer(&mut text, event)?;
        text.push(b'\n');
    }
    let tmp = path.with_extension("jsonl.tmp");
    let mut file = crate::state::create_private(&tmp)?;
    file.write_all(&text)?;
    fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TempDir;

    fn event(n: u32) -> WireEvent {
        WireEvent {
            time: format!("2026-12-03T00:00:{:02}.000Z", n % 60),
            source: "http".into(),
            verdict: "allow".into(),
            rule: "web".into(),
            generation: n,
            ..WireEvent::default()
        }
    }

    #[test]
    fn saved_events_load_back_in_order_and_bounded() {
        let dir = TempDir::new("history-round-trip");
        let path = dir.0.join(HISTORY_FILE);
        assert_eq!(load(&path).expect("no file is no history"), []);
        let many: Vec<_> = (0..RECENT_EVENTS as u32 + 5).map(event).collect();
        save(&path, &many).expect("save");
        let back = load(&path).expect("load");
        assert_eq!(back.len(), RECENT_EVENTS);
        assert_eq!(back[0], event(5));
        assert_eq!(back.last(), many.last());
    }

    #[test]
    fn a_corrupt_file_is_an_error_naming_its_line() {
        let dir = TempDir::new("history-corrupt");
        let path = dir.0.join(HISTORY_FILE);
        save(&path, &[event(1)]).expect("save");
        let mut text = fs::read_to_string(&path).expect("read");
        text.push_str("{\"time\": tru\n");
        fs::write(&path, text).expect("write");
        let e = load(&path).expect_err("corrupt");
        assert!(
            e.to_string().ends_with("events.jsonl:2: not an event"),
            "{e}"
        );
    }
}
