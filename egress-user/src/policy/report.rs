//! The error (and warning) collector every stage of loading writes to: one per source file, so that messages
//! come out grouped by file and sorted by line however late a stage finds them (a duplicate
//! name is only noticed after every document of every file has been read).

use super::model::{Diagnostic, Origin};

/// Most errors kept for one file. A 64 MiB file of `- {port: 0}` lines would otherwise produce
/// millions of messages (and gigabytes of them); past this many, the rest of the file is not
/// worth reading until the first ones are fixed.
pub(crate) const MAX_ERRORS_PER_FILE: usize = 100;

/// The errors found in one source file.
#[derive(Debug)]
pub(crate) struct Report {
    /// The file name as messages show it.
    file: String,
    /// What is wrong so far, in the order found.
    diagnostics: Vec<Diagnostic>,
    /// Set once [`MAX_ERRORS_PER_FILE`] is reached: further errors are dropped.
    full: bool,
    /// What is almost certainly a mistake but still means something (an empty policy), in the
    /// order found; they never fail a load.
    warnings: Vec<Diagnostic>,
}

impl Report {
    /// An empty report for `file`.
    pub(crate) fn new(file: &str) -> Self {
        Self {
            file: file.to_owned(),
            diagnostics: Vec::new(),
            full: false,
            warnings: Vec::new(),
        }
    }

    /// Where `line` of this file is, for messages that point at another place.
    pub(crate) fn origin(&self, line: usize) -> Origin {
        Origin {
            file: self.file.clone(),
            line,
        }
    }

    /// Records that something is wrong at `line` (1-based).
    pub(crate) fn error(&mut self, line: usize, message: impl Into<String>) {
        if self.full {
            return;
        }
        if self.diagnostics.len() == MAX_ERRORS_PER_FILE {
            self.full = true;
            self.diagnostics.push(Diagnostic {
                origin: self.origin(line),
                message: format!(
                    "too many errors ({MAX_ERRORS_PER_FILE}); the rest of this file is not checked"
                ),
            });
            return;
        }
        self.diagnostics.push(Diagnostic {
            origin: self.origin(line),
            message: message.into(),
        });
    }

    /// Records an error about the field at `path` (`spec.ports[0].port`), or about the whole
    /// document when `path` is empty.
    pub(crate) fn field_error(&mut self, line: usize, path: &str, message: impl AsRef<str>) {
        let message = message.as_ref();
        if path.is_empty() {
            self.error(line, message);
        } else {
            self.error(line, format!("{path}: {message}"));
        }
    }

    /// Records a warning at `line`: shown by `egress check` and logged by the agent as
    /// `FILE:LINE: warning: message`, never a reason to refuse the policy.
    pub(crate) fn warning(&mut self, line: usize, message: impl Into<String>) {
        if self.warnings.len() < MAX_ERRORS_PER_FILE {
            self.warnings.push(Diagnostic {
                origin: self.origin(line),
                message: message.into(),
            });
        }
    }

    /// The warnings in line order.
    pub(crate) fn take_warnings(&mut self) -> Vec<Diagnostic> {
        let mut warnings = std::mem::take(&mut self.warnings);
        warnings.sort_by_key(|d| d.origin.line);
        warnings
    }

    /// Whether the error limit was reached, so a caller can stop early.
    pub(crate) fn is_full(&self) -> bool {
        self.full
    }

    /// How many errors were reported so far, to tell whether a step added any.
    pub(crate) fn error_count(&self) -> usize {
        self.diagnostics.len()
    }

    /// Whether anything was reported.
    pub(crate) fn has_errors(&self) -> bool {
        !self.diagnostics.is_empty()
    }

    /// Whether a warning was reported.
    pub(crate) fn has_warnings(&self) -> bool {
        !self.warnings.is_empty()
    }

    /// The errors in line order; errors on the same line keep the order they were found in.
    pub(crate) fn into_sorted(self) -> Vec<Diagnostic> {
        let mut diagnostics = self.diagnostics;
        // The "too many errors" note stays last whatever its line: it is about what follows.
        let note = if self.full { diagnostics.pop() } else { None };
        diagnostics.sort_by_key(|d| d.origin.line);
        diagnostics.extend(note);
        diagnostics
    }
}

/// `parent.child`, or `child` at the top of a document.
pub(crate) fn join(parent: &str, child: &str) -> String {
    if parent.is_empty() {
        child.to_owned()
    } else {
        format!("{parent}.{child}")
    }
}
