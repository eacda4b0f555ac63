//! The `egress-probe` workload run from a sandbox: one connect (or HTTP requests) from inside
//! its managed cgroup and network namespace, and what came of it.

use std::{net::SocketAddr, process::Command};

use crate::Sandbox;

impl Sandbox {
    /// Runs the probe in HTTP mode from inside the managed cgroup: `request` goes to each
    /// address over its own connection, all open at once. Returns the probe's stdout.
    pub fn http(&self, probe: &str, request: &str, addrs: &[SocketAddr]) -> String {
        let out = Command::new(probe)
            .arg("--cgroup")
            .arg(&self.cgroup)
            .args(["--netns", &self.name, "--http", request])
            .args(addrs.iter().map(ToString::to_string))
            .output()
            .expect("running the probe");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Connects from inside the managed cgroup and the namespace.
    pub fn connect(&self, probe: &str, addr: SocketAddr) -> Outcome {
        self.run_probe(probe, addr, true)
    }

    /// Connects from inside the namespace but outside the managed cgroup.
    pub fn connect_outside(&self, probe: &str, addr: SocketAddr) -> Outcome {
        self.run_probe(probe, addr, false)
    }

    fn run_probe(&self, probe: &str, addr: SocketAddr, in_cgroup: bool) -> Outcome {
        let mut cmd = Command::new(probe);
        if in_cgroup {
            cmd.arg("--cgroup").arg(&self.cgroup);
        }
        let out = cmd
            .args(["--netns", &self.name])
            .arg(addr.to_string())
            .output()
            .expect("running the probe");
        Outcome::parse(
            &String::from_utf8_lossy(&out.stdout),
            &String::from_utf8_lossy(&out.stderr),
        )
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
