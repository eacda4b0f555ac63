//! The `egress-probe` workload run from a sandbox: one connect (or HTTP requests) from inside
//! its managed cgroup and network namespace, and what came of it.

use std::{net::SocketAddr, process::Command};

use crate::{Sandbox, output_text, workload_command};

impl Sandbox {
    /// The workload `bin` about to run in this sandbox's managed cgroup and network namespace
    /// ([`workload_command`]), for the caller to add its arguments to.
    pub fn workload(&self, bin: &str) -> Command {
        workload_command(bin, Some(&self.cgroup), &self.name)
    }

    /// Runs the probe in HTTP mode from inside the managed cgroup: `request` goes to each
    /// address over its own connection, all open at once. Returns the probe's stdout.
    pub fn http(&self, probe: &str, request: &str, addrs: &[SocketAddr]) -> String {
        let (stdout, _) = output_text(
            self.workload(probe)
                .args(["--http", request])
                .args(addrs.iter().map(ToString::to_string)),
            "the probe",
        );
        stdout
    }

    /// Connects from inside the managed cgroup and the namespace.
    pub fn connect(&self, probe: &str, addr: SocketAddr) -> Outcome {
        self.run_probe(probe, addr, true)
    }

    /// Connects from inside the managed cgroup to each of `connected` in turn, failing the test
    /// unless each connects, then to each of `denied`, failing it unless the filter denies each
    /// (EPERM).
    pub fn expect_verdicts(&self, probe: &str, connected: &[SocketAddr], denied: &[SocketAddr]) {
        let want = [(connected, Outcome::Connected), (denied, Outcome::Denied)];
        for (addrs, outcome) in want {
            for addr in addrs {
                assert_eq!(self.connect(probe, *addr), outcome, "connect to {addr}");
            }
        }
    }

    /// Connects from inside the namespace but outside the managed cgroup.
    pub fn connect_outside(&self, probe: &str, addr: SocketAddr) -> Outcome {
        self.run_probe(probe, addr, false)
    }

    fn run_probe(&self, probe: &str, addr: SocketAddr, in_cgroup: bool) -> Outcome {
        let cgroup = in_cgroup.then_some(self.cgroup.as_path());
        let (stdout, stderr) = output_text(
            workload_command(probe, cgroup, &self.name).arg(addr.to_string()),
            "the probe",
        );
        Outcome::parse(&stdout, &stderr)
    }
}

/// What a probe's connect() did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The connection was established.
    Connected,
    /// connect() failed with EPERM: the filter denied it.
    Denied,
    /// Anything else (refused, timed out, probe failure), with its text.
    Other(String),
}

impl Outcome {
    fn parse(stdout: &str, stderr: &str) -> Self {
        let line = stdout.trim();
        if line == "connected" {
            Self::Connected
        } else if line.starts_with(&format!("error {} ", libc::EPERM)) {
            Self::Denied
        } else {
            Self::Other(format!("{line} {stderr}"))
        }
    }
}
