//! What the unit tests of several modules share.

use std::{
    ops::Deref,
    path::{Path, PathBuf},
};

/// A fresh, empty directory (`tempfile`'s, named `egress-NAME-…`), removed with what it holds
/// when dropped, even when the test fails.
pub(crate) struct TempDir(
    pub(crate) PathBuf,
    #[expect(dead_code, reason = "held for its Drop, which removes the directory")]
    tempfile::TempDir,
);

impl TempDir {
    pub(crate) fn new(name: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("egress-{name}-"))
            .tempdir()
            .expect("create temp dir");
        Self(dir.path().to_owned(), dir)
    }

    /// The file `name` in the directory, holding `contents`.
    pub(crate) fn file(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, contents).expect("write temp file");
        path
    }
}

/// The directory's path, so that a test writes `dir.join("a.yaml")`.
impl Deref for TempDir {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.0
    }
}

/// Asserts that `parse` refuses every text of `cases` with a message that contains the part
/// the case expects.
#[track_caller]
pub(crate) fn assert_refused_saying<T: std::fmt::Debug, E: std::fmt::Display>(
    parse: impl Fn(&str) -> Result<T, E>,
    cases: &[(&str, &str)],
) {
    for (text, expected) in cases {
        let error = parse(text).expect_err(text).to_string();
        assert!(error.contains(expected), "{text}: {error}");
    }
}
