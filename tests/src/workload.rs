//! [`Workload`]: `egress-verdicts` connecting from a sandbox until stopped, and its counts.

use std::{
    net::SocketAddr,
    process::{Child, Stdio},
    time::Duration,
};

use crate::Sandbox;

/// What [`Workload`] counted for one target.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counted {
    /// Connections established.
    pub connected: u64,
    /// `connect()` failed with `EPERM`: the filter denied it.
    pub denied: u64,
    /// Any other error.
    pub failed: u64,
}

/// `egress-verdicts` running in a sandbox's cgroup and netns: connects to its targets in turn
/// until [`Workload::stop`].
pub struct Workload {
    child: Child,
}

impl Workload {
    /// Starts it (`bin` is `env!("CARGO_BIN_EXE_egress-verdicts")`) and waits until it runs.
    /// With `pause`, it sleeps that long after each round over the targets.
    pub fn start(sandbox: &Sandbox, bin: &str, targets: &[SocketAddr], pause: Duration) -> Self {
        let mut child = sandbox
            .workload(bin)
            .arg("--pause-us")
            .arg(pause.as_micros().to_string())
            .args(targets.iter().map(ToString::to_string))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting egress-verdicts");
        let stdout = child.stdout.as_mut().expect("stdout");
        let mut first = [0u8; 6];
        std::io::Read::read_exact(stdout, &mut first).expect("egress-verdicts started");
        assert_eq!(&first, b"ready\n");
        Self { child }
    }

    /// Stops it and returns its counts per target, and its failure lines.
    pub fn stop(mut self) -> (std::collections::HashMap<SocketAddr, Counted>, Vec<String>) {
        drop(self.child.stdin.take());
        let out = self
            .child
            .wait_with_output()
            .expect("egress-verdicts output");
        assert!(out.status.success(), "egress-verdicts: {out:?}");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut counts = std::collections::HashMap::new();
        let mut failures = Vec::new();
        for line in text.lines() {
            if line.starts_with("failure ") {
                failures.push(line.to_owned());
                continue;
            }
            let mut words = line.split_whitespace();
            let addr: SocketAddr = words.next().expect("address").parse().expect("address");
            let mut c = Counted::default();
            for word in words {
                let (key, value) = word.split_once('=').expect("key=value");
                let value: u64 = value.parse().expect("count");
                match key {
                    "connected" => c.connected = value,
                    "denied" => c.denied = value,
                    "failed" => c.failed = value,
                    other => panic!("unknown count {other}"),
                }
            }
            counts.insert(addr, c);
        }
        (counts, failures)
    }
}
