//! [`Agent`]: an `egress run` started inside a sandbox's network namespace, stopped on drop;
//! and [`Launch`], the one way to start it ([`Sandbox::agent`]).

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use crate::{Sandbox, wait_within};

/// How long an agent may take to say whether it is ready. Generous: the kernel matrix runs
/// the suite under QEMU without acceleration on a shared 2-CPU machine, where reading a
/// 20,000-rule policy alone took 19 s; this bounds a hang, it does not measure speed
/// (`cargo xtask bench` does).
const READY_WITHIN: Duration = Duration::from_secs(120);

/// An `egress run` agent started as a child process, stopped on drop.
pub struct Agent {
    child: Child,
    /// Everything the agent wrote to stderr so far (its log).
    pub log: Arc<Mutex<String>>,
}

/// How to start `egress run` in a sandbox: made by [`Sandbox::agent`], ended by
/// [`Launch::start`] (an agent that becomes ready) or [`Launch::run_to_exit`] (one expected
/// to refuse to start).
///
/// The agent runs in the sandbox's network namespace, where the proxy must run for the
/// loopback redirect to reach it. `nsenter --net` switches only the network namespace: `ip
/// netns exec` would also remount /sys, hiding the cgroup2 and bpffs mounts. Its arguments
/// get the sandbox's `--state-dir`, `--socket` and `--resolv-conf` unless they have their own.
#[must_use = "a Launch does nothing until start() or run_to_exit()"]
pub struct Launch<'a> {
    sandbox: &'a Sandbox,
    egress: &'a str,
    args: Vec<String>,
    log: String,
    env: Vec<(String, String)>,
    nofile: Option<(u64, u64)>,
    cgroup: Option<PathBuf>,
    hosts: Option<PathBuf>,
}

impl Sandbox {
    /// Starts describing an `egress run` of the binary `egress` (`egress_bin!()`) in this
    /// sandbox.
    pub fn agent<'a>(&'a self, egress: &'a str) -> Launch<'a> {
        Launch {
            sandbox: self,
            egress,
            args: Vec::new(),
            log: "info".to_owned(),
            env: Vec::new(),
            nofile: None,
            cgroup: None,
            hosts: None,
        }
    }
}

impl Launch<'_> {
    /// Adds `egress run` arguments.
    pub fn args<S: AsRef<str>>(mut self, args: &[S]) -> Self {
        self.args.extend(args.iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Adds the sandbox's [`Sandbox::run_args`] for `policy`, then `extra`.
    pub fn policy(self, policy: &Path, extra: &[&str]) -> Self {
        let args = self.sandbox.run_args(policy, extra);
        self.args(&args)
    }

    /// The log filter (`EGRESS_LOG`, `info` unless set), for tests whose agent would
    /// otherwise log more than the test can hold. It must let the `ready` line through
    /// (target `egress_user::cli::run`, info).
    pub fn log(mut self, filter: &str) -> Self {
        filter.clone_into(&mut self.log);
        self
    }

    /// Extra environment variables for the agent, such as `EGRESS_KERNEL_FEATURES_HIDE`
    /// (which makes it see a kernel without those features); `EGRESS_LOG` here overrides
    /// [`Launch::log`].
    pub fn env(mut self, vars: &[(&str, &str)]) -> Self {
        self.env
            .extend(vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        self
    }

    /// `RLIMIT_NOFILE` set to `soft`:`hard` for the agent, as a service manager would.
    pub fn nofile(mut self, soft: u64, hard: u64) -> Self {
        self.nofile = Some((soft, hard));
        self
    }

    /// The agent first joins `cgroup`.
    pub fn cgroup(mut self, cgroup: &Path) -> Self {
        self.cgroup = Some(cgroup.to_owned());
        self
    }

    /// The agent sees `hosts` as its `/etc/hosts` (through a private mount namespace), so its
    /// proxy resolves names with the system resolver as on a real host.
    pub fn hosts(mut self, hosts: &Path) -> Self {
        self.hosts = Some(hosts.to_owned());
        self
    }

    /// `egress run ARGS` as a command, not yet spawned. Every step execs in place, so the
    /// child's pid is the agent's.
    fn command(&self) -> Command {
        let netns = format!("--net=/run/netns/{}", self.sandbox.name);
        let mut cmd = if self.cgroup.is_none() && self.hosts.is_none() {
            let mut cmd = Command::new("nsenter");
            cmd.arg(netns).arg(self.egress);
            cmd
        } else {
            let mut script = String::new();
            if let Some(cg) = &self.cgroup {
                script += &format!("echo $$ > '{}/cgroup.procs' && ", cg.display());
            }
            if let Some(h) = &self.hosts {
                script += &format!("mount --bind '{}' /etc/hosts && ", h.display());
            }
            script += &format!("exec nsenter {netns} \"$@\"");
            let mut cmd = if self.hosts.is_some() {
                let mut c = Command::new("unshare");
                c.args(["-m", "--propagation", "private", "sh"]);
                c
            } else {
                Command::new("sh")
            };
            cmd.args(["-c", &script, "sh", self.egress]);
            cmd
        };
        cmd.env("EGRESS_LOG", &self.log)
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        if let Some((soft, hard)) = self.nofile {
            use std::os::unix::process::CommandExt as _;
            // SAFETY: setrlimit is async-signal-safe, and the closure touches nothing else.
            unsafe {
                cmd.pre_exec(move || {
                    let lim = libc::rlimit {
                        rlim_cur: soft,
                        rlim_max: hard,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        cmd.arg("run")
            .args(self.sandbox.agent_args(&self.args))
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        cmd
    }

    /// Starts the agent and waits until it logs that it is ready (or, when it could not open
    /// every proxy listener, that it is not).
    pub fn start(self) -> Agent {
        let mut child = self.command().spawn().expect("starting the agent");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let log = log.clone();
            let stderr = child.stderr.take().expect("stderr");
            thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    // `ready: enforcing ...`, or `not ready: ...` when the agent started but
                    // lacks a listener (a squatter holds the proxy port).
                    let ready = line.contains("ready: ");
                    {
                        let mut log = log.lock().expect("log");
                        log.push_str(&line);
                        log.push('\n');
                    }
                    // Only once the line is in the log, so whoever waits for it can read it.
                    if ready {
                        let _ = tx.send(());
                    }
                }
            });
        }
        let mut agent = Agent { child, log };
        if rx.recv_timeout(READY_WITHIN).is_err() {
            let status = agent.child.try_wait();
            panic!(
                "the agent did not become ready ({status:?}); its log:\n{}",
                agent.log()
            );
        }
        agent
    }

    /// Runs the agent expected to refuse to start: returns its exit status and log. Panics
    /// (killing it) if it is still running after 30 s, that is, if it did not refuse.
    pub fn run_to_exit(self) -> (ExitStatus, String) {
        let mut child = self.command().spawn().expect("starting the agent");
        let mut stderr = child.stderr.take().expect("stderr");
        let reader = thread::spawn(move || {
            let mut log = String::new();
            let _ = std::io::Read::read_to_string(&mut stderr, &mut log);
            log
        });
        let Some(status) = wait_within(&mut child, Duration::from_secs(30)) else {
            panic!(
                "the agent did not exit; its log:\n{}",
                reader.join().unwrap_or_default()
            );
        };
        (status, reader.join().expect("log reader"))
    }
}

impl Agent {
    /// The agent's process id (`nsenter` execs it in place).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        self.log.lock().expect("log").clone()
    }

    /// Waits until the log contains `needle`, or panics with the log after `timeout`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) {
        assert!(
            crate::eventually(timeout, || self.log().contains(needle)),
            "the agent never logged {needle:?}; its log:\n{}",
            self.log()
        );
    }

    /// Sends a signal to the agent.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        let ret = unsafe { libc::kill(self.child.id() as i32, sig) };
        assert_eq!(ret, 0, "kill: {}", std::io::Error::last_os_error());
    }

    /// Waits for the agent to exit and returns its exit status.
    pub fn wait(mut self) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not exit; its log:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
