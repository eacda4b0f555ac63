//! [`Hold`]: the descriptor-exhaustion attacker (`egress-hold`) running in a sandbox's cgroup
//! and netns, and [`Sandbox::scrape`], a read of the agent's metrics endpoint.

use std::{
    net::SocketAddr,
    process::{Child, Command, Stdio},
};

use crate::{Sandbox, first_line};

/// `egress-hold` holding half-sent requests open from the sandbox's managed cgroup.
pub struct Hold {
    child: Child,
    /// Connections open after the first round, and connects that failed in it.
    pub held: u64,
    /// See `held`.
    pub failed: u64,
}

impl Hold {
    /// Opens `count` connections to `addr` from inside the managed cgroup, sends `send` on
    /// each (`\r\n` as backslash-r backslash-n) and returns once all were tried; they stay open
    /// (and closed ones are reopened) until [`Hold::stop`] or drop. `bin` is
    /// `env!("CARGO_BIN_EXE_egress-hold")`.
    pub fn start(sandbox: &Sandbox, bin: &str, count: usize, send: &str, addr: SocketAddr) -> Self {
        let mut child = sandbox
            .workload(bin)
            .args(["--count", &count.to_string()])
            .args(["--send", send, &addr.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting egress-hold");
        let (held, failed) = parse(&first_line(&mut child, "egress-hold"), "held");
        Self {
            child,
            held,
            failed,
        }
    }

    /// Closes every connection; returns how many it reopened after the other end closed them,
    /// and how many connects failed, while holding.
    pub fn stop(mut self) -> (u64, u64) {
        drop(self.child.stdin.take());
        let out = std::mem::replace(&mut self.child, dummy())
            .wait_with_output()
            .expect("egress-hold output");
        assert!(out.status.success(), "egress-hold: {out:?}");
        parse(&String::from_utf8_lossy(&out.stdout), "reopened")
    }
}

/// `WORD A failed B` -> (A, B).
fn parse(line: &str, word: &str) -> (u64, u64) {
    let line = line
        .lines()
        .find(|l| l.starts_with(word))
        .unwrap_or_else(|| panic!("no `{word}` line in {line:?}"));
    let n: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (n[0], n[1])
}

/// A finished child, to leave in place of the one [`Hold::stop`] waited for.
fn dummy() -> Child {
    let mut c = Command::new("true").spawn().expect("true");
    let _ = c.wait();
    c
}

impl Drop for Hold {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Sandbox {
    /// `GET path` from the agent's metrics listener at `127.0.0.1:port` inside the sandbox:
    /// (status line, body). From a thread that enters the sandbox's netns (the agent's
    /// loopback), not from the workload cgroup: the scraper is not a workload.
    pub fn scrape(&self, port: u16, path: &str) -> (String, String) {
        let path = path.to_owned();
        crate::in_netns(&self.name, move || {
            use std::io::{Read as _, Write as _};
            let mut stream =
                std::net::TcpStream::connect(("127.0.0.1", port)).expect("connecting to /metrics");
            write!(
                stream,
                "GET {path} HTTP/1.1\r\nHost: metrics\r\nConnection: close\r\n\r\n"
            )
            .expect("sending the request");
            let mut response = String::new();
            stream
                .read_to_string(&mut response)
                .expect("reading the response");
            let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
            let status = head.lines().next().unwrap_or("").to_owned();
            (status, body.to_owned())
        })
    }
}

/// The value of the sample `series` (name and labels exactly as exposed) in a metrics body.
pub fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines().find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok())?
    })
}
