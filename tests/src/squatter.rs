//! A hostile workload on the proxy's port: `egress-squatter` run as an unprivileged user
//! (nobody) inside the managed cgroup and the sandbox's network namespace, with every line it
//! prints collected, so a test can count what it received.

use std::{
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    path::Path,
    process::{Child, Stdio},
    sync::{Arc, Mutex, mpsc},
    thread,
    time::Duration,
};

use crate::Sandbox;

/// The uid and gid the squatter runs as (`nobody`): no capability at all.
pub const NOBODY: u32 = 65534;

/// How the squatter holds the port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hold {
    /// Bound with `SO_REUSEADDR`, and listening.
    Listen,
    /// Bound with `SO_REUSEADDR`, not listening.
    BindReuseAddr,
    /// Bound without `SO_REUSEADDR`, not listening.
    Bind,
}

/// A running squatter, killed on drop.
pub struct Squatter {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Squatter {
    /// Starts `bin` (`squatter_bin!()`) on `addr` as nobody in `sandbox`'s cgroup and network
    /// namespace, holding it as `hold` says. Returns the squatter once it
    /// holds the port, or the error line it printed (`error <errno> <message>`).
    ///
    /// # Errors
    /// The squatter could not take the port.
    pub fn start(
        bin: &str,
        sandbox: &Sandbox,
        addr: SocketAddr,
        hold: Hold,
    ) -> Result<Self, String> {
        Self::start_in(bin, &sandbox.cgroup, &sandbox.name, addr, hold)
    }

    /// [`Squatter::start`] in the cgroup `cgroup` and the network namespace `netns` (a pod's).
    ///
    /// # Errors
    /// The squatter could not take the port.
    pub fn start_in(
        bin: &str,
        cgroup: &Path,
        netns: &str,
        addr: SocketAddr,
        hold: Hold,
    ) -> Result<Self, String> {
        let mut cmd = crate::workload_command(bin, Some(cgroup), netns);
        cmd.args(["--uid", &NOBODY.to_string()]);
        match hold {
            Hold::Listen => {}
            Hold::BindReuseAddr => {
                cmd.arg("--bind-only");
            }
            Hold::Bind => {
                cmd.args(["--bind-only", "--no-reuseaddr"]);
            }
        }
        let mut child = cmd
            .arg(addr.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting the squatter");
        let stdout = child.stdout.take().expect("stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        {
            let lines = lines.clone();
            thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    lines.lock().expect("lines").push(line.clone());
                    let _ = tx.send(line);
                }
            });
        }
        let mut squatter = Self { child, lines };
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(line) if line == "listening" || line == "bound" => Ok(squatter),
            Ok(line) => {
                let _ = squatter.child.wait();
                Err(line)
            }
            Err(_) => panic!("the squatter said nothing in 10 s"),
        }
    }

    /// What it received: one `stolen <bytes> <first line>` per connection.
    pub fn stolen(&self) -> Vec<String> {
        self.lines
            .lock()
            .expect("lines")
            .iter()
            .filter(|l| l.starts_with("stolen"))
            .cloned()
            .collect()
    }
}

impl Drop for Squatter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
