//! Logging: one place configures tracing, from one environment variable, `EGRESS_LOG`
//! (an `EnvFilter` directive such as `info` or `egress_user=debug`; default `info`).

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
