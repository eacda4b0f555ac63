//! `egress-verdict-poll` driven from a test or benchmark: one connect at a time from inside a
//! cgroup and network namespace, or a poll until a verdict flips, timed with
//! `CLOCK_MONOTONIC` (see `src/bin/egress_verdict_poll.rs`).

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::SocketAddr,
    path::Path,
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    time::Duration,
};

use crate::Sandbox;

/// What a `wait` found.
pub struct Flip {
    /// When the first connect with the new verdict returned.
    pub at_ns: u64,
    /// When the last connect with the old verdict returned: the verdict changed in between.
    pub last_old_ns: u64,
}

/// `egress-verdict-poll` running in a sandbox's cgroup and network namespace; killed on drop
/// (and with the cgroup, when the sandbox goes).
pub struct Poller {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Poller {
    /// Starts it in the sandbox's cgroup and network namespace (`bin` is
    /// `CARGO_BIN_EXE_egress-verdict-poll`) and waits until it runs.
    pub fn start(bin: &str, sandbox: &Sandbox) -> Self {
        Self::start_in(bin, &sandbox.cgroup, &sandbox.name)
    }

    /// Starts it in cgroup `cgroup` and network namespace `netns` (a name under /run/netns or
    /// a path such as a pod's `/proc/PID/ns/net`) and waits until it runs.
    pub fn start_in(bin: &str, cgroup: &Path, netns: &str) -> Self {
        let mut child = Command::new(bin)
            .arg("--cgroup")
            .arg(cgroup)
            .arg("--netns")
            .arg(netns)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting egress-verdict-poll");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut poller = Self {
            child,
            stdin,
            stdout,
        };
        assert_eq!(poller.read_line(), "ready");
        poller
    }

    fn read_line(&mut self) -> String {
        let mut line = String::new();
        let n = self
            .stdout
            .read_line(&mut line)
            .expect("reading egress-verdict-poll");
        assert!(n > 0, "egress-verdict-poll exited");
        line.trim().to_owned()
    }

    fn send(&mut self, command: &str) {
        writeln!(self.stdin, "{command}").expect("writing to egress-verdict-poll");
        self.stdin.flush().expect("flushing");
    }

    /// One connect from inside the cgroup: `connected`, `denied` or `error ...`.
    pub fn check(&mut self, addr: SocketAddr) -> String {
        self.send(&format!("check {addr}"));
        self.read_line()
    }

    /// Asks it to poll `addr` until it connects; returns once it confirmed that `addr` is
    /// still denied, so that the change can start. Then [`Poller::flipped`] gets the result.
    pub fn start_wait(&mut self, addr: SocketAddr, interval: Duration, timeout: Duration) {
        self.send(&format!(
            "wait {addr} connected {} {}",
            interval.as_micros(),
            timeout.as_millis()
        ));
        let line = self.read_line();
        assert_eq!(
            line, "polling",
            "before the change, {addr} should still be denied"
        );
    }

    /// The result of the wait started by [`Poller::start_wait`].
    pub fn flipped(&mut self) -> Result<Flip, String> {
        let line = self.read_line();
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
                .and_then(|v| v.parse::<u64>().ok())
        };
        match (field("at_ns"), field("last_old_ns")) {
            (Some(at_ns), Some(last_old_ns)) if line.starts_with("flipped") => {
                Ok(Flip { at_ns, last_old_ns })
            }
            _ => Err(line),
        }
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
