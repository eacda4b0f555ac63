//! `egress events --follow -o json` collected in the background, for tests that count every
//! event a running agent publishes.

use std::{
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use crate::Sandbox;

/// A running `egress events --follow --recent 0 -o json` and the lines it printed so far.
pub struct EventFollower {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl EventFollower {
    /// Starts following the agent of `sb` (`egress` is the CLI's path).
    pub fn start(sb: &Sandbox, egress: &str) -> Self {
        let mut child = Command::new(egress)
            .args([
                "events", "--follow", "--recent", "0", "-o", "json", "--socket",
            ])
            .arg(sb.socket())
            .stdout(Stdio::piped())
            .spawn()
            .expect("egress events");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().expect("stdout");
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                sink.lock().expect("lines").push(line);
            }
        });
        Self { child, lines }
    }

    /// Makes sure the follower is subscribed before the test's traffic starts: `egress events
    /// --follow` subscribes some time after it starts, and events published before that go
    /// to no one (under CPU load, the first 94 connects' events once did). Connects with
    /// `probe` to `marker` (which must be denied) until an event arrives; returns how many
    /// events the markers made, to count with the rest.
    pub fn wait_subscribed(&self, sb: &Sandbox, probe: &str, marker: SocketAddr) -> usize {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.count() == 0 {
            assert!(Instant::now() < deadline, "the follower never saw an event");
            let _ = sb.connect(probe, marker);
            std::thread::sleep(Duration::from_millis(100));
        }
        self.count()
    }

    /// Events seen so far.
    pub fn count(&self) -> usize {
        self.lines.lock().expect("lines").len()
    }

    /// Waits until at least `n` events were seen, or `timeout` passed; returns the count.
    pub fn wait_for(&self, n: usize, timeout: Duration) -> usize {
        crate::eventually(timeout, || self.count() >= n);
        self.count()
    }

    /// Stops following and returns every event, parsed.
    pub fn stop(mut self) -> Vec<serde_json::Value> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let lines = self.lines.lock().expect("lines");
        lines
            .iter()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("event {l}: {e}")))
            .collect()
    }
}

impl Drop for EventFollower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
