//! Reading a file the operator named (a policy file, a `caFiles` entry, resolv.conf) without
//! ever blocking and without ever holding more than a bound.
//!
//! A plain `std::fs::read` of a FIFO blocks until some process opens it for writing: one
//! named in `caFiles` hung `egress reload` and, since the agent answers one control request at
//! a time, `egress status` behind it. `/dev/zero` never ends, and a character device can do
//! something just by being opened (a tape rewinds, a serial line raises DTR). So only regular
//! files are read: the type is checked before opening (so a device or FIFO is never opened),
//! the file is opened with `O_NONBLOCK` (so a FIFO swapped in after that check does not block
//! the open), and the type of what was opened is checked again on the descriptor (`fstat`),
//! which is what the bytes then come from. The read itself is bounded too, for a regular file
//! that grows while it is read.

use std::{
    fs::{FileType, OpenOptions},
    io::{self, Read as _},
    os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _},
    path::Path,
};

/// Why a file could not be had. Messages say what the file is and why it is refused; the
/// caller says which file (policy messages carry it as `FILE:LINE`).
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// `open()` or `stat()` failed (missing, permission denied, ...): the OS's words.
    #[error("{0}")]
    Open(io::Error),
    /// A directory, FIFO, socket or device.
    #[error("it is {0}, not a regular file")]
    NotRegular(&'static str),
    /// Larger than the limit (the size when the metadata told it).
    #[error("it is larger than the {} limit{}", size_shown(*limit), .size.map(|s| format!(" ({s} bytes)")).unwrap_or_default())]
    TooLarge {
        /// The limit, in bytes.
        limit: u64,
        /// The file's size, if known before reading.
        size: Option<u64>,
    },
    /// Reading failed part-way: the OS's words.
    #[error("{0}")]
    Read(io::Error),
}

impl From<ReadError> for io::Error {
    /// Keeps the OS error (and its kind: a caller may treat `NotFound` apart) and wraps the
    /// others as invalid data.
    fn from(error: ReadError) -> Self {
        match error {
            ReadError::Open(e) | ReadError::Read(e) => e,
            other => io::Error::new(io::ErrorKind::InvalidData, other),
        }
    }
}

/// The contents of the regular file at `path` (symbolic links followed), at most `limit`
/// bytes; see the module docs for what is refused and why.
///
/// # Errors
/// See [`ReadError`].
pub fn read_bounded(path: &Path, limit: u64) -> Result<Vec<u8>, ReadError> {
    let before = std::fs::metadata(path).map_err(ReadError::Open)?;
    regular(before.file_type())?;
    let file = OpenOptions::new()
        .read(true)
        // O_NOCTTY: a terminal swapped in must not become our controlling terminal.
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(ReadError::Open)?;
    let metadata = file.metadata().map_err(ReadError::Open)?;
    regular(metadata.file_type())?;
    if metadata.len() > limit {
        return Err(ReadError::TooLarge {
            limit,
            size: Some(metadata.len()),
        });
    }
    read_to_limit(file, limit)
}

/// Up to `limit` bytes of `reader`, or [`ReadError::TooLarge`] if there are more: never a
/// silent prefix.
///
/// # Errors
/// Reading failed, or there is more than `limit`.
pub fn read_to_limit(reader: impl io::Read, limit: u64) -> Result<Vec<u8>, ReadError> {
    let mut bytes = Vec::new();
    reader
        .take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(ReadError::Read)?;
    if bytes.len() as u64 > limit {
        return Err(ReadError::TooLarge { limit, size: None });
    }
    Ok(bytes)
}

/// Refuses anything but a regular file, saying what it is.
fn regular(file_type: FileType) -> Result<(), ReadError> {
    let what = if file_type.is_file() {
        return Ok(());
    } else if file_type.is_dir() {
        "a directory"
    } else if file_type.is_fifo() {
        "a FIFO (named pipe)"
    } else if file_type.is_char_device() {
        "a character device"
    } else if file_type.is_block_device() {
        "a block device"
    } else if file_type.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    };
    Err(ReadError::NotRegular(what))
}

/// `64 MiB`, `4 KiB`, `100 bytes`: a limit as people write it.
pub fn size_shown(bytes: u64) -> String {
    const KIB: u64 = 1024;
    const MIB: u64 = 1024 * KIB;
    if bytes >= MIB && bytes.is_multiple_of(MIB) {
        format!("{} MiB", bytes / MIB)
    } else if bytes >= KIB && bytes.is_multiple_of(KIB) {
        format!("{} KiB", bytes / KIB)
    } else {
        format!("{bytes} bytes")
    }
}

/// Makes a FIFO at `path` (with mkfifo(1), to keep unsafe code out of this crate's tests).
#[cfg(test)]
pub(crate) fn mkfifo(path: &Path) {
    let status = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("run mkfifo");
    assert!(status.success(), "mkfifo {}: {status}", path.display());
}

/// Runs `f` on another thread and fails the test if it has not returned within 5 s, so a
/// regression that blocks (on a FIFO) fails instead of hanging the suite.
#[cfg(test)]
pub(crate) fn promptly<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(5))
        .expect("blocked for more than 5 s")
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::testing::TempDir;

    #[test]
    fn special_files_are_refused_without_blocking() {
        let dir = TempDir::new("read-special");
        let fifo = dir.0.join("fifo");
        mkfifo(&fifo);
        let cases = [
            (fifo, "it is a FIFO (named pipe), not a regular file"),
            (dir.0.clone(), "it is a directory, not a regular file"),
            (
                PathBuf::from("/dev/zero"),
                "it is a character device, not a regular file",
            ),
        ];
        for (path, expected) in cases {
            let shown = path.display().to_string();
            let error = promptly(move || read_bounded(&path, 1024)).expect_err(&shown);
            assert_eq!(error.to_string(), expected, "{shown}");
        }
    }

    #[test]
    fn a_missing_file_keeps_the_os_cause_and_kind() {
        let error = read_bounded(Path::new("/nonexistent/egress-x"), 1024).expect_err("missing");
        assert_eq!(error.to_string(), "No such file or directory (os error 2)");
        assert_eq!(io::Error::from(error).kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn the_limit_is_an_error_never_a_prefix() {
        let dir = TempDir::new("read-limit");
        let path = dir.0.join("big");
        std::fs::write(&path, vec![b'x'; 1025]).expect("write");
        let error = read_bounded(&path, 1024).expect_err("too large");
        assert_eq!(
            error.to_string(),
            "it is larger than the 1 KiB limit (1025 bytes)"
        );
        std::fs::write(&path, vec![b'x'; 1024]).expect("write");
        assert_eq!(read_bounded(&path, 1024).expect("at the limit").len(), 1024);
        // A stream (stdin) has no size to check first: the read itself stops.
        let error = read_to_limit(&[b'y'; 11][..], 10).expect_err("too large");
        assert_eq!(error.to_string(), "it is larger than the 10 bytes limit");
        assert_eq!(read_to_limit(&[b'y'; 10][..], 10).expect("fits").len(), 10);
    }
}
