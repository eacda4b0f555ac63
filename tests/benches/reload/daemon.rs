//! `egress run` as a child process whose log lines are kept with the moment each arrived.

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use egress_tests::{Sandbox, monotonic_ns};

/// The log line `egress run` prints once the programs are attached and the policy is in force.
pub const READY: &str = "ready: enforcing egress policy";
/// The log line of every applied reload.
pub const RELOADED: &str = "reloaded: new policy in force";

/// One log line and when it arrived (`CLOCK_MONOTONIC` ns).
#[derive(Clone)]
pub struct Line {
    pub at_ns: u64,
    pub text: String,
}

/// A running `egress run`, stopped (SIGKILL) on drop.
pub struct Agent {
    child: Child,
    lines: Arc<Mutex<Vec<Line>>>,
    /// `CLOCK_MONOTONIC` just before the process was spawned.
    pub spawned_ns: u64,
}

impl Agent {
    /// Starts `egress run --policy <dir>` on the sandbox's cgroup, pin directory, state
    /// directory and control socket, inside the sandbox's network namespace (where its proxy
    /// listens), with `EGRESS_LOG=info`. Does not wait for it to be ready.
    pub fn spawn(bin: &Path, sandbox: &Sandbox, policy_dir: &Path, watch: bool) -> Self {
        let mut cmd = Command::new("nsenter");
        // Only the network namespace: `ip netns exec` would remount /sys and hide the cgroup2
        // and bpffs mounts.
        cmd.arg(format!("--net=/run/netns/{}", sandbox.name))
            .arg(bin)
            .arg("run")
            .arg("--policy")
            .arg(policy_dir)
            .arg("--cgroup")
            .arg(&sandbox.cgroup)
            .arg("--pin-dir")
            .arg(&sandbox.pin_dir)
            .arg("--state-dir")
            .arg(sandbox.state_dir())
            .arg("--socket")
            .arg(sandbox.socket())
            .env(egress_user::telemetry::LOG_ENV, "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if !watch {
            cmd.arg("--no-watch");
        }
        let spawned_ns = monotonic_ns();
        let mut child = cmd.spawn().expect("starting egress run (nsenter)");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("stderr");
        {
            let lines = lines.clone();
            thread::spawn(move || {
                for text in BufReader::new(stderr).lines().map_while(Result::ok) {
                    let at_ns = monotonic_ns();
                    lines.lock().expect("log").push(Line { at_ns, text });
                }
            });
        }
        Self {
            child,
            lines,
            spawned_ns,
        }
    }

    /// How many lines so far.
    pub fn line_count(&self) -> usize {
        self.lines.lock().expect("log").len()
    }

    /// The lines from index `from` on.
    pub fn lines_from(&self, from: usize) -> Vec<Line> {
        let lines = self.lines.lock().expect("log");
        lines.get(from..).unwrap_or_default().to_vec()
    }

    /// The last `n` lines, for error messages.
    pub fn tail(&self, n: usize) -> String {
        let lines = self.lines.lock().expect("log");
        let from = lines.len().saturating_sub(n);
        lines[from..]
            .iter()
            .map(|l| l.text.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Waits for the first line at index `from` or later that contains `needle`; returns its
    /// index and the line. Panics, with the log, on timeout, if the agent exits, or if a line
    /// says a reload failed.
    pub fn wait_for(&mut self, from: usize, needle: &str, timeout: Duration) -> (usize, Line) {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let lines = self.lines.lock().expect("log");
                for (i, line) in lines.iter().enumerate().skip(from) {
                    if line.text.contains(needle) {
                        return (i, line.clone());
                    }
                    assert!(
                        !line.text.contains("reload failed") && !line.text.contains("ERROR"),
                        "the agent reported an error:\n{}",
                        line.text
                    );
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                thread::sleep(Duration::from_millis(50));
                panic!(
                    "the agent exited ({status}) before logging {needle:?}; its log:\n{}",
                    self.tail(40)
                );
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not log {needle:?} within {timeout:?}; its log:\n{}",
                self.tail(40)
            );
            thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The log line that follows a change put in force, with `proxy_ms` and `kernel_ms`.
pub const IN_FORCE: &str = "kernel: policy in force";

/// The `name=V` field of a log line, in milliseconds (the agent prints them `name="12.3"`
/// or `name=12.3`).
pub fn ms_field(line: &str, name: &str) -> Option<f64> {
    let prefix = format!("{name}=");
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(prefix.as_str()))
        .and_then(|v| v.trim_matches('"').parse().ok())
}

/// The `generation=N` field of a log line.
pub fn generation_of(line: &str) -> Option<u32> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("generation="))
        .and_then(|g| g.parse().ok())
}
