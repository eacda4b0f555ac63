//! The agent's file descriptors: the open-file limit it runs with, and how that limit is
//! shared out so that a workload flooding the proxy can never take the descriptors the control
//! socket, a policy reload or the metrics endpoint need.
//!
//! A process inherits a soft `RLIMIT_NOFILE` of 1024 from most service managers and shells,
//! while the hard limit is far higher (524,288 under systemd). At 1024, about 1,100 half-sent
//! requests from a managed workload used to exhaust the agent: the control socket's accept
//! loop died on `EMFILE` and a reload could not open its programs. So the agent raises the
//! soft limit to the hard one at start ([`raise_nofile_limit`]), and splits what it has into a
//! [`Budget`]: what it already holds, a reserve for the control plane, and the rest for the
//! proxy's app connections (each of which may hold an upstream socket too).

#![forbid(unsafe_code)]

use std::io;

/// Descriptors kept out of the proxy's reach, beyond those the agent holds when it starts
/// serving, for the control plane:
/// - a policy reload opens a whole new generation (every program, map and link, and the ELF
///   it parses) while the old one is still held: `reload_fds` more, measured at start;
/// - `egress status`/`events` clients, each one socket ([`CONTROL_CONNECTIONS`] at once is
///   plenty for an operator);
/// - metrics scrapes ([`METRICS_CONNECTIONS`]);
/// - slack for what the runtime opens on the way (the file watch re-reading files, the
///   resolv.conf read at every reload, the kernel event ring).
pub const RESERVE_SLACK: usize = 64;

/// Control-socket clients served at once; more wait in the socket's backlog.
pub const CONTROL_CONNECTIONS: usize = 32;

/// Metrics and probe connections served at once; more are closed at accept.
pub const METRICS_CONNECTIONS: usize = 32;

/// What went wrong with the descriptor limit.
#[derive(Debug, thiserror::Error)]
pub enum FdsError {
    /// getrlimit or setrlimit failed.
    #[error("RLIMIT_NOFILE: {op}")]
    Rlimit {
        /// `getrlimit` or `setrlimit`.
        op: &'static str,
        /// The system's error.
        #[source]
        source: io::Error,
    },
}

/// A soft and a hard `RLIMIT_NOFILE`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NofileLimit {
    /// What the kernel enforces now.
    pub soft: u64,
    /// How far the soft limit may be raised without privilege.
    pub hard: u64,
}

/// The descriptor limit now.
///
/// # Errors
/// getrlimit failed.
pub fn nofile_limit() -> Result<NofileLimit, FdsError> {
    let (soft, hard) =
        rlimit::getrlimit(rlimit::Resource::NOFILE).map_err(|source| FdsError::Rlimit {
            op: "getrlimit",
            source,
        })?;
    Ok(NofileLimit { soft, hard })
}

/// Raises the soft descriptor limit to the hard one and returns the limit before and after.
/// An unlimited hard limit (rare: the kernel caps it at `fs.nr_open`) is left alone, since
/// setrlimit refuses a soft limit above `fs.nr_open`.
///
/// # Errors
/// getrlimit or setrlimit failed.
pub fn raise_nofile_limit() -> Result<(NofileLimit, NofileLimit), FdsError> {
    let before = nofile_limit()?;
    if before.soft >= before.hard || before.hard == rlimit::INFINITY {
        return Ok((before, before));
    }
    rlimit::setrlimit(rlimit::Resource::NOFILE, before.hard, before.hard).map_err(|source| {
        FdsError::Rlimit {
            op: "setrlimit",
            source,
        }
    })?;
    Ok((before, nofile_limit()?))
}

/// How many descriptors this process has open now (the entries of `/proc/self/fd`, less the
/// one reading them).
///
/// # Errors
/// `/proc/self/fd` cannot be read (no descriptor left to open it, for one).
pub fn open_fds() -> io::Result<usize> {
    let n = std::fs::read_dir("/proc/self/fd")?.count();
    Ok(n.saturating_sub(1))
}

/// How the descriptor limit is shared out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    /// The soft limit.
    pub limit: usize,
    /// Kept for the control plane (see [`RESERVE_SLACK`]); the proxy never gets these.
    pub reserve: usize,
    /// App connections the proxy holds at most. Each may hold an upstream connection too,
    /// so it is half of what is left once the agent's own and the reserve are taken.
    pub proxy_connections: usize,
}

impl Budget {
    /// The budget under a soft limit of `limit`, for an agent that holds `held` descriptors
    /// and whose reload opens `reload_fds` more while the old generation is still open.
    pub fn new(limit: u64, held: usize, reload_fds: usize) -> Self {
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        let reserve = reload_fds + CONTROL_CONNECTIONS + METRICS_CONNECTIONS + RESERVE_SLACK;
        let left = limit.saturating_sub(held).saturating_sub(reserve);
        Self {
            limit,
            reserve,
            // At least a few, so a tiny limit still serves (and /healthz says it is tight).
            proxy_connections: (left / 2).max(4),
        }
    }

    /// Whether `open` descriptors eat into the reserve: the control plane may then fail, and
    /// `/healthz` says so.
    pub fn under_pressure(&self, open: usize) -> bool {
        open + self.reserve / 2 >= self.limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_is_raised_to_the_hard_one() {
        let start = nofile_limit().expect("getrlimit");
        // Lower the soft limit (the 1024 a service manager hands out); raising it back to the
        // hard one needs no privilege, so this works for any user.
        let low = start.hard.min(512);
        rlimit::setrlimit(rlimit::Resource::NOFILE, low, start.hard).expect("setrlimit");
        let (before, after) = raise_nofile_limit().expect("raise");
        assert_eq!(before.soft, low);
        assert_eq!(after.soft, start.hard);
        assert_eq!(nofile_limit().expect("getrlimit").soft, start.hard);
    }

    #[test]
    fn the_budget_leaves_the_reserve_to_the_control_plane() {
        let b = Budget::new(1024, 40, 60);
        assert_eq!(b.reserve, 60 + 32 + 32 + 64);
        // What is left after the agent's own 40 and the reserve, halved for upstreams.
        assert_eq!(b.proxy_connections, (1024 - 40 - 188) / 2);
        // A full proxy (two descriptors a connection) still leaves the whole reserve.
        assert!(40 + 2 * b.proxy_connections + b.reserve <= 1024);
        assert!(!b.under_pressure(40 + 2 * b.proxy_connections));
        assert!(b.under_pressure(1024 - b.reserve / 2));
        // A limit too small for the reserve still lets a few connections through.
        assert_eq!(Budget::new(100, 40, 60).proxy_connections, 4);
    }
}
