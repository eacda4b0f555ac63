//! The connect benches' load generator: a running `egress-connect-loop --serve` in a sandbox's
//! managed cgroup and network namespace, which runs one block of timed connects per request.
//! The connect bench and the DNS bench (`#[path]`) drive it.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::SocketAddr,
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
};

use egress_tests::Sandbox;

/// One block's summary, as the load generator printed it.
#[derive(Clone, Copy, Default)]
pub struct Round {
    /// Connects made, warm-up included.
    pub total: u64,
    /// Connects timed.
    pub count: u64,
    /// Mean, median and 99th percentile of the timed connects.
    pub mean_ns: u64,
    pub p50_ns: u64,
    pub p99_ns: u64,
}

/// A running `egress-connect-loop --serve` to one target, optionally pinned to a CPU.
pub struct Client {
    /// Named so in its errors.
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Client {
    /// Starts the load generator in `sandbox`'s cgroup and namespace, its connects to
    /// `target` expected to succeed (`connected`) or to fail with `EPERM`, and waits until it
    /// is in place.
    pub fn start(
        name: &str,
        sandbox: &Sandbox,
        target: SocketAddr,
        connected: bool,
        cpu: Option<usize>,
    ) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_egress-connect-loop"));
        cmd.arg("--cgroup")
            .arg(&sandbox.cgroup)
            .args(["--netns", &sandbox.name]);
        if let Some(cpu) = cpu {
            cmd.args(["--cpu", &cpu.to_string()]);
        }
        cmd.args(["--expect", if connected { "connected" } else { "denied" }]);
        let mut child = cmd
            .args(["--serve", &target.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting egress-connect-loop");
        let stdin = child.stdin.take();
        let mut client = Self {
            name: name.to_owned(),
            stdout: BufReader::new(child.stdout.take().expect("stdout")),
            stdin,
            child,
        };
        let ready = client.line();
        assert_eq!(ready, "ready", "{name}: the load generator said {ready:?}");
        client
    }

    /// The next line the client prints; panics (its error is on our stderr) when it exited.
    fn line(&mut self) -> String {
        let mut line = String::new();
        let n = self
            .stdout
            .read_line(&mut line)
            .expect("reading the load generator");
        if n == 0 {
            let status = self.child.wait();
            panic!(
                "{}: the load generator exited ({status:?}); its error is above",
                self.name
            );
        }
        line.trim().to_owned()
    }

    /// Runs one block (`warmup` untimed connects, then up to `count` timed ones or until
    /// `budget_ms`) and returns its summary.
    pub fn block(&mut self, warmup: u64, count: u64, budget_ms: u64) -> Round {
        let stdin = self.stdin.as_mut().expect("stdin open until drop");
        writeln!(stdin, "{warmup} {count} {budget_ms}")
            .and_then(|()| stdin.flush())
            .expect("driving the load generator");
        let line = self.line();
        let field = |key: &str| -> u64 {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| {
                    panic!(
                        "{}: no {key} in the load generator's output {line:?}",
                        self.name
                    )
                })
        };
        Round {
            total: field("total"),
            count: field("count"),
            mean_ns: field("mean_ns"),
            p50_ns: field("p50_ns"),
            p99_ns: field("p99_ns"),
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // End of input ends the client.
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}
