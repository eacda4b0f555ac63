//! The `egress` command line: one file per verb.

use std::process::ExitCode;

/// Entry point of the `egress` binary.
pub fn main() -> ExitCode {
    ExitCode::SUCCESS
}
