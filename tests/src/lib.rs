//! Helpers shared by the integration tests: a [`Sandbox`] per test (its own network namespace
//! with no route out, its own cgroup, its own pin directory, all removed on drop, even when the
//! test fails), a [`Sink`] server that counts what reaches it, and the probe that plays the
//! workload.
//!
//! [`hold`] has the descriptor-exhaustion attacker and the metrics scrape;
//! [`upstream`] has the HTTP and TLS servers of the HTTP egress tests; [`sinks`] the UDP and
//! SYN sinks of the non-TCP-connect egress vectors (`egress-vector`); [`pod`] a second
//! namespace wired to a sandbox as a pod to its node; [`vector`] runs `egress-vector`.
//!
//! Network safety: every address here is assigned by the sandbox to a veth interface whose peer is also inside
//! the sandbox's own namespace (TEST-NET ranges and 2001:db8::/32), so a filter that failed
//! open still could not send a packet off the machine.

use std::{
    fs,
    io::{BufRead as _, BufReader},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

/// The first test address (TEST-NET-1), on the sandbox's interface.
pub const V4_A: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// A second IPv4 address in another /24 (TEST-NET-2).
pub const V4_B: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
/// A third (TEST-NET-3).
pub const V4_C: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
/// The first IPv6 test address (documentation prefix).
pub const V6_A: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
/// A second IPv6 address in another /64.
pub const V6_B: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);

/// Path of the probe binary, from the integration test that calls it.
#[macro_export]
macro_rules! probe_bin {
    () => {
        env!("CARGO_BIN_EXE_egress-probe")
    };
}

/// Path of the `egress-squatter` workload (a process that takes the proxy's port), for
/// [`squatter::Squatter`].
#[macro_export]
macro_rules! squatter_bin {
    () => {
        env!("CARGO_BIN_EXE_egress-squatter")
    };
}

/// Path of the `egress-vector` workload (one egress attempt of a given kind), from the
/// integration test that calls it.
#[macro_export]
macro_rules! vector_bin {
    () => {
        env!("CARGO_BIN_EXE_egress-vector")
    };
}

/// Path of the `egress` CLI, from the integration test that calls it.
#[macro_export]
macro_rules! egress_bin {
    () => {
        env!("CARGO_BIN_EXE_egress-cli")
    };
}

pub mod follow;
pub mod hold;
pub mod matrix;
pub mod pod;
pub mod policy;
pub mod sinks;
pub mod squatter;
pub mod upstream;
pub mod vector;
pub mod world;

pub use hold::{Hold, sample};
pub use pod::PodNet;
pub use sinks::{Datagram, MARKER, Syn, SynSink, UdpSink};
pub use vector::{Attempted, Vector};

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// Runs a command and panics with its output if it fails.
pub fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("running {args:?}: {e} (cargo xtask setup installs iproute2)"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Moves the calling process into the cgroup v2 directory `dir` (the workloads' `--cgroup`).
pub fn join_cgroup(dir: &str) {
    fs::write(
        format!("{dir}/cgroup.procs"),
        std::process::id().to_string(),
    )
    .unwrap_or_else(|e| panic!("joining cgroup {dir}: {e}"));
}

/// Moves the calling thread into the named network namespace.
pub fn enter_netns(name: &str) {
    let ns = fs::File::open(format!("/run/netns/{name}"))
        .unwrap_or_else(|e| panic!("opening netns {name}: {e}"));
    // SAFETY: a valid namespace fd; setns changes only this thread's namespace.
    let ret = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(ret, 0, "setns({name}): {}", std::io::Error::last_os_error());
}

/// One test's private world: a network namespace, a cgroup and a pin directory, unique to
/// this process and test, removed on drop.
pub struct Sandbox {
    /// Namespace name (also the leaf name of the cgroup and pin directory).
    pub name: String,
    /// The managed cgroup for this test.
    pub cgroup: PathBuf,
    /// The pin directory for this test.
    pub pin_dir: PathBuf,
    /// The agent's state directory and control socket live here (`state/`, `egress.sock`).
    pub run_dir: PathBuf,
}

impl Sandbox {
    /// Creates the sandbox. Panics (with the reason) when not root or the kernel lacks
    /// something the tests need: these tests never skip silently.
    pub fn new() -> Self {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "the integration tests load eBPF programs and must run as root (use `cargo xtask test`)"
        );
        let name = format!(
            "egt{}x{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        sh(&["ip", "netns", "add", &name]);
        let sandbox = Self {
            cgroup: egress_user::cgroup::cgroup2_mount()
                .expect("the tests need a cgroup v2 mount")
                .join("egress-tests")
                .join(&name),
            pin_dir: Path::new(egress_user::loader::BPFFS_MOUNT)
                .join("egress-tests")
                .join(&name),
            run_dir: Path::new("/run/egress-tests").join(&name),
            name,
        };
        // From here on Drop cleans up whatever was made.
        let n = sandbox.name.as_str();
        sh(&["ip", "-n", n, "link", "set", "lo", "up"]);
        // A veth pair with both ends inside the namespace: somewhere to put addresses, and no
        // way out of the namespace (this kernel has no dummy driver).
        sh(&[
            "ip", "-n", n, "link", "add", "d0", "type", "veth", "peer", "name", "d1",
        ]);
        sh(&["ip", "-n", n, "link", "set", "d0", "up"]);
        sh(&["ip", "-n", n, "link", "set", "d1", "up"]);
        for addr in ["192.0.2.1/24", "198.51.100.1/24", "203.0.113.1/24"] {
            sh(&["ip", "-n", n, "addr", "add", addr, "dev", "d0"]);
        }
        for addr in ["2001:db8::1/64", "2001:db8:1::1/64"] {
            sh(&[
                "ip", "-n", n, "-6", "addr", "add", addr, "dev", "d0", "nodad",
            ]);
        }
        fs::create_dir_all(&sandbox.cgroup)
            .unwrap_or_else(|e| panic!("creating {}: {e}", sandbox.cgroup.display()));
        // bpffs is not mounted at boot: mount it as the agent does, so that a test which makes
        // or reads pins before any agent ran works on a fresh machine too.
        egress_user::loader::ensure_bpffs().unwrap_or_else(|e| {
            panic!(
                "mounting bpffs at {}: {e}",
                egress_user::loader::BPFFS_MOUNT
            )
        });
        sandbox
    }

    /// Writes the hosts file `ip netns exec` gives processes in this namespace
    /// (`/etc/netns/NAME/hosts`): made-up names for the test's own addresses.
    pub fn hosts(&self, lines: &str) {
        let dir = Path::new("/etc/netns").join(&self.name);
        fs::create_dir_all(&dir).expect("creating /etc/netns/NAME");
        fs::write(
            dir.join("hosts"),
            format!("127.0.0.1 localhost\n::1 localhost\n{lines}\n"),
        )
        .expect("writing hosts");
    }

    /// Adds many addresses at once (`ip -batch`).
    pub fn add_addrs(&self, cidrs: &[String]) {
        let batch: String = cidrs
            .iter()
            .map(|c| format!("addr add {c} dev d0 nodad\n"))
            .collect();
        let file = std::env::temp_dir().join(format!("{}-addrs", self.name));
        fs::write(&file, batch).expect("batch file");
        sh(&[
            "ip",
            "-n",
            &self.name,
            "-batch",
            file.to_str().expect("utf-8"),
        ]);
        let _ = fs::remove_file(file);
    }

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

    /// Adds an address to the sandbox's interface (`ip addr add ... dev d0`).
    pub fn add_addr(&self, cidr: &str) {
        sh(&[
            "ip", "-n", &self.name, "addr", "add", cidr, "dev", "d0", "nodad",
        ]);
    }

    /// The target for the loader.
    pub fn target(&self) -> egress_user::loader::Target {
        egress_user::loader::Target {
            pin_dir: self.pin_dir.clone(),
            cgroup: self.cgroup.clone(),
            xdp_ifaces: Vec::new(),
        }
    }

    /// The cgroup id of the managed cgroup.
    pub fn cgroup_id(&self) -> u64 {
        egress_user::cgroup::id(&self.cgroup).expect("cgroup id")
    }

    /// Starts a server inside the namespace at `addr`.
    pub fn sink(&self, addr: SocketAddr) -> Sink {
        Sink::start(&self.name, addr)
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

impl Default for Sandbox {
    fn default() -> Self {
        Self::new()
    }
}

impl Sandbox {
    /// The agent's state directory in this sandbox.
    pub fn state_dir(&self) -> PathBuf {
        self.run_dir.join("state")
    }

    /// The agent's control socket in this sandbox.
    pub fn socket(&self) -> PathBuf {
        self.run_dir.join("egress.sock")
    }

    /// `egress run` arguments for this sandbox: `--policy POLICY`, its `--cgroup`,
    /// `--pin-dir`, `--state-dir` and `--socket` (unless `extra` has one), then `extra`. Every
    /// agent a test starts uses these, so none touches the host's default paths.
    pub fn run_args<'a>(&'a self, policy: &'a Path, extra: &[&'a str]) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "--policy".into(),
            policy.display().to_string(),
            "--cgroup".into(),
            self.cgroup.display().to_string(),
            "--pin-dir".into(),
            self.pin_dir.display().to_string(),
        ];
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        let given: Vec<&str> = extra.to_vec();
        args = self.agent_args_given(args, &given);
        args
    }

    /// `args` with this sandbox's `--state-dir`, `--socket` and `--resolv-conf` added, unless
    /// given.
    fn agent_args<S: AsRef<str>>(&self, args: &[S]) -> Vec<String> {
        let out: Vec<String> = args.iter().map(|a| a.as_ref().to_owned()).collect();
        let given: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
        self.agent_args_given(out.clone(), &given)
    }

    fn agent_args_given(&self, mut out: Vec<String>, given: &[&str]) -> Vec<String> {
        let has = |flag: &str| {
            given
                .iter()
                .any(|a| *a == flag || a.starts_with(&format!("{flag}=")))
        };
        if !has("--state-dir") {
            out.push("--state-dir".into());
            out.push(self.state_dir().display().to_string());
        }
        if !has("--socket") {
            out.push("--socket".into());
            out.push(self.socket().display().to_string());
        }
        if !has("--resolv-conf") {
            // The host's resolv.conf would add its nameservers as a `(dns)` rule: the tests
            // see the same policy on every machine only with a resolv.conf of their own,
            // empty unless a test says otherwise.
            out.push("--resolv-conf".into());
            out.push(self.resolv_conf().display().to_string());
        }
        out
    }

    /// The sandbox's own resolv.conf (`--resolv-conf` of its agents), created empty: no DNS
    /// unless a test writes nameservers into it.
    pub fn resolv_conf(&self) -> PathBuf {
        let path = self.run_dir.join("resolv.conf");
        if !path.exists() {
            fs::create_dir_all(&self.run_dir)
                .unwrap_or_else(|e| panic!("creating {}: {e}", self.run_dir.display()));
            fs::write(&path, "# egress tests: no nameservers\n")
                .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        }
        path
    }

    /// Runs `egress VERB ARGS... --socket <this sandbox's>` (a client of the agent) and returns
    /// its exit status, stdout and stderr.
    pub fn ctl(&self, egress: &str, verb: &[&str]) -> (std::process::ExitStatus, String, String) {
        let out = Command::new(egress)
            .args(verb)
            .arg("--socket")
            .arg(self.socket())
            .output()
            .expect("running the egress client");
        (
            out.status,
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `egress status -o json` of this sandbox's agent, parsed (fails the test if it fails).
    pub fn status_json(&self, egress: &str) -> serde_json::Value {
        let (ok, out, err) = self.ctl(egress, &["status", "-o", "json"]);
        assert!(ok.success(), "egress status failed: {out}{err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("status is not JSON ({e}): {out}"))
    }

    /// [`Sandbox::ctl`] with `stdin` fed to the client, that fails the test (killing the
    /// client) if it has not exited within `timeout`: for requests that once hung (a reload
    /// reading a FIFO), so that a regression fails instead of hanging the suite. A client that
    /// stops reading stdin early (input over its limit) is not an error here.
    pub fn ctl_within(
        &self,
        egress: &str,
        verb: &[&str],
        stdin: &[u8],
        timeout: Duration,
    ) -> (std::process::ExitStatus, String, String) {
        use std::io::{Read as _, Write as _};
        let mut child = Command::new(egress)
            .args(verb)
            .arg("--socket")
            .arg(self.socket())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running the egress client");
        let mut input = child.stdin.take().expect("stdin");
        let stdin = stdin.to_vec();
        // Broken pipe when the client stops reading: that is its business, judged by its exit.
        let writer = thread::spawn(move || drop(input.write_all(&stdin)));
        let drain = |mut pipe: Box<dyn std::io::Read + Send>| {
            thread::spawn(move || {
                let mut text = String::new();
                let _ = pipe.read_to_string(&mut text);
                text
            })
        };
        let out = drain(Box::new(child.stdout.take().expect("stdout")));
        let err = drain(Box::new(child.stderr.take().expect("stderr")));
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = child.try_wait().expect("waiting for the client") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "`egress {}` did not finish within {timeout:?}",
                    verb.join(" ")
                );
            }
            thread::sleep(Duration::from_millis(20));
        };
        let _ = writer.join();
        (
            status,
            out.join().expect("stdout"),
            err.join().expect("stderr"),
        )
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Err(e) = egress_user::loader::unload(&self.pin_dir) {
            eprintln!("cleanup: unloading {}: {e:#}", self.pin_dir.display());
        }
        let _ = fs::remove_dir(&self.pin_dir);
        let _ = fs::remove_dir_all(&self.run_dir);
        let kill = self.cgroup.join("cgroup.kill");
        if kill.exists() {
            let _ = fs::write(kill, "1");
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.cgroup.exists()
            && remove_cgroup_tree(&self.cgroup).is_err()
            && Instant::now() < deadline
        {
            thread::sleep(Duration::from_millis(20));
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        let _ = fs::remove_dir_all(Path::new("/etc/netns").join(&self.name));
    }
}

/// Removes a cgroup and the cgroups below it, deepest first (a cgroup with a child cannot be
/// removed): a test may leave one made by `egress run --create-cgroup` below its sandbox's.
fn remove_cgroup_tree(path: &Path) -> std::io::Result<()> {
    for entry in fs::read_dir(path)?.filter_map(Result::ok) {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_cgroup_tree(&entry.path())?;
        }
    }
    fs::remove_dir(path)
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

/// A TCP server inside a sandbox that accepts and counts every connection that reaches it:
/// the sink where "the server never saw it" is measured.
///
/// A connection counts once `accept()` returns it: after the handshake, or, for a TCP Fast
/// Open connection the server accepted data in the SYN of ([`Sink::start_tfo`]), as soon as
/// that SYN arrives. Each accepted connection is closed at once, after reading whatever data
/// is already there (the SYN's data), so that the close is a FIN rather than a RST.
pub struct Sink {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    syn_data: Arc<AtomicUsize>,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

/// `TCPI_OPT_SYN_DATA` (linux/tcp.h): on a server's socket, the SYN carried data it accepted.
const TCPI_OPT_SYN_DATA: u8 = 32;

impl Sink {
    /// Starts a server at `addr` inside the network namespace `netns`.
    pub fn start(netns: &str, addr: SocketAddr) -> Self {
        Self::start_with(netns, addr, false)
    }

    /// Like [`Sink::start`], and the server takes data in the SYN (TCP Fast Open) without a
    /// cookie: this turns the server side of TFO on for the whole namespace
    /// (`net.ipv4.tcp_fastopen = 3`, which covers IPv6 too) and sets `TCP_FASTOPEN` and
    /// `TCP_FASTOPEN_NO_COOKIE` on the listener.
    pub fn start_tfo(netns: &str, addr: SocketAddr) -> Self {
        Self::start_with(netns, addr, true)
    }

    fn start_with(netns: &str, addr: SocketAddr, tfo: bool) -> Self {
        let accepted = Arc::new(AtomicUsize::new(0));
        let syn_data = Arc::new(AtomicUsize::new(0));
        let peers = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let netns = netns.to_owned();
        let thread = {
            let (accepted, syn_data, peers, stop) = (
                accepted.clone(),
                syn_data.clone(),
                peers.clone(),
                stop.clone(),
            );
            thread::spawn(move || {
                enter_netns(&netns);
                if tfo {
                    // /proc/sys/net is the namespace of the thread that opens it.
                    fs::write("/proc/sys/net/ipv4/tcp_fastopen", "3")
                        .unwrap_or_else(|e| panic!("enabling TFO in {netns}: {e}"));
                }
                let listener = TcpListener::bind(addr)
                    .unwrap_or_else(|e| panic!("binding {addr} in {netns}: {e}"));
                if tfo {
                    for (opt, val) in [(libc::TCP_FASTOPEN, 16), (libc::TCP_FASTOPEN_NO_COOKIE, 1)]
                    {
                        setsockopt_int(listener.as_raw_fd(), libc::IPPROTO_TCP, opt, val)
                            .unwrap_or_else(|e| panic!("TFO option {opt} on {addr}: {e}"));
                    }
                }
                listener.set_nonblocking(true).expect("nonblocking");
                tx.send(listener.local_addr().expect("local addr"))
                    .expect("send addr");
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, peer)) => {
                            if took_syn_data(&stream) {
                                syn_data.fetch_add(1, Ordering::SeqCst);
                            }
                            peers.lock().expect("peers").push(peer);
                            accepted.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            thread::sleep(Duration::from_millis(2))
                        }
                        Err(e) => panic!("accept on {addr}: {e}"),
                    }
                }
            })
        };
        let addr = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the sink did not start");
        Self {
            addr,
            accepted,
            syn_data,
            peers,
            stop,
            thread: Some(thread),
        }
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far. Waits briefly for in-flight accepts to land, so that a
    /// connection the client saw established is counted.
    pub fn accepted(&self) -> usize {
        thread::sleep(Duration::from_millis(30));
        self.accepted.load(Ordering::SeqCst)
    }

    /// Of the connections accepted so far, those whose data came in the SYN (TCP Fast Open,
    /// with a sink made by [`Sink::start_tfo`]). Waits as [`Sink::accepted`] does.
    pub fn syn_data(&self) -> usize {
        thread::sleep(Duration::from_millis(30));
        self.syn_data.load(Ordering::SeqCst)
    }

    /// Peer addresses of the accepted connections.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().expect("peers").clone()
    }
}

/// Whether the server accepted data in this connection's SYN (TCP Fast Open). Also reads
/// whatever data is already queued, so that closing the connection sends a FIN, not the RST
/// that unread data would: a TFO client checking its socket after the handshake then sees no
/// error.
fn took_syn_data(stream: &std::net::TcpStream) -> bool {
    // SAFETY: tcp_info is plain data; zeroed is valid.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: a valid socket and a buffer of `len` bytes.
    let ret = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            std::ptr::from_mut(&mut info).cast(),
            &mut len,
        )
    };
    assert_eq!(ret, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
    let mut buf = [0u8; 4096];
    // SAFETY: a valid socket and a buffer of its own length; MSG_DONTWAIT never blocks.
    while unsafe {
        libc::recv(
            stream.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    } > 0
    {}
    info.tcpi_options & TCPI_OPT_SYN_DATA != 0
}

/// `setsockopt()` with an `int` value.
pub fn setsockopt_int(
    fd: std::os::fd::RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> std::io::Result<()> {
    // SAFETY: a pointer to an int and its size.
    let ret = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            std::ptr::from_ref(&value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if ret == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A socket address from an IP and port.
pub fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// The IPv4-mapped IPv6 form of an IPv4 address (`::ffff:a.b.c.d`).
pub fn mapped(v4: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), port)
}

/// An `egress run` agent started as a child process, stopped on drop.
pub struct Agent {
    child: Child,
    /// Everything the agent wrote to stderr so far (its log).
    pub log: Arc<Mutex<String>>,
}

impl Agent {
    /// Starts `egress run` with the given arguments and waits until it logs that it is ready
    /// (or, when it could not open every proxy listener, that it is not).
    pub fn start(egress: &str, args: &[&str]) -> Self {
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        Self::spawn(Command::new(egress), &args)
    }

    /// Starts `egress run` inside the sandbox's network namespace, where the proxy must run
    /// for the loopback redirect to reach it. `nsenter --net` switches only the network
    /// namespace: `ip netns exec` would also remount /sys, hiding the cgroup2 and bpffs mounts.
    pub fn start_in<S: AsRef<str>>(sandbox: &Sandbox, egress: &str, args: &[S]) -> Self {
        Self::start_in_logging(sandbox, egress, args, "info")
    }

    /// [`Agent::start_in`] with the log filter `log` (`EGRESS_LOG`), for tests whose agent
    /// would otherwise log more than the test can hold. It must let the `ready` line through
    /// (target `egress_user::cli::run`, info).
    pub fn start_in_logging<S: AsRef<str>>(
        sandbox: &Sandbox,
        egress: &str,
        args: &[S],
        log: &str,
    ) -> Self {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", sandbox.name))
            .arg(egress)
            .env("EGRESS_LOG", log);
        Self::spawn(cmd, &sandbox.agent_args(args))
    }

    /// Like [`Agent::start_in`], but the agent first joins `cgroup` (when given) and sees
    /// `hosts` as its `/etc/hosts` (when given, through a private mount namespace), so its
    /// proxy resolves names with the system resolver as on a real host.
    pub fn start_in_with<S: AsRef<str>>(
        sandbox: &Sandbox,
        egress: &str,
        args: &[S],
        cgroup: Option<&Path>,
        hosts: Option<&Path>,
    ) -> Self {
        let mut script = String::new();
        if let Some(cg) = cgroup {
            script += &format!("echo $$ > '{}/cgroup.procs' && ", cg.display());
        }
        if let Some(h) = hosts {
            script += &format!("mount --bind '{}' /etc/hosts && ", h.display());
        }
        script += &format!("exec nsenter --net=/run/netns/{} \"$@\"", sandbox.name);
        // Every step execs in place, so the child's pid is the agent's.
        let mut cmd = if hosts.is_some() {
            let mut c = Command::new("unshare");
            c.args(["-m", "--propagation", "private"]);
            c.arg("sh");
            c
        } else {
            Command::new("sh")
        };
        cmd.args(["-c", &script, "sh", egress]);
        Self::spawn(cmd, &sandbox.agent_args(args))
    }

    /// Starts `egress run` as [`Agent::start_in_with`] does and returns its exit status and
    /// log, for an agent expected to refuse to start.
    pub fn run_to_exit<S: AsRef<str>>(
        sandbox: &Sandbox,
        egress: &str,
        args: &[S],
        cgroup: &Path,
    ) -> (std::process::ExitStatus, String) {
        let script = format!(
            "echo $$ > '{}/cgroup.procs' && exec nsenter --net=/run/netns/{} \"$@\"",
            cgroup.display(),
            sandbox.name
        );
        let out = Command::new("sh")
            .args(["-c", &script, "sh", egress, "run"])
            .args(sandbox.agent_args(args))
            .output()
            .expect("running the agent");
        (
            out.status,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// [`Agent::start_in`] with extra environment variables for the agent, such as
    /// `EGRESS_KERNEL_FEATURES_HIDE` (which makes it see a kernel without those features).
    pub fn start_in_env<S: AsRef<str>>(
        sandbox: &Sandbox,
        egress: &str,
        args: &[S],
        env: &[(&str, &str)],
    ) -> Self {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", sandbox.name))
            .arg(egress)
            .envs(env.iter().copied());
        Self::spawn(cmd, &sandbox.agent_args(args))
    }

    /// [`Agent::start_in`] with `RLIMIT_NOFILE` set to `soft`:`hard` for the agent, as a
    /// service manager would start it.
    pub fn start_in_nofile<S: AsRef<str>>(
        sandbox: &Sandbox,
        egress: &str,
        args: &[S],
        (soft, hard): (u64, u64),
    ) -> Self {
        use std::os::unix::process::CommandExt as _;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", sandbox.name))
            .arg(egress);
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
        Self::spawn(cmd, &sandbox.agent_args(args))
    }

    /// Runs `egress run` as [`Agent::start_in_env`] does, for an agent expected to refuse to
    /// start: returns its exit status and log. Panics (killing it) if it is still running
    /// after 30 s, that is, if it did not refuse.
    pub fn run_to_exit_env<S: AsRef<str>>(
        sandbox: &Sandbox,
        egress: &str,
        args: &[S],
        env: &[(&str, &str)],
    ) -> (std::process::ExitStatus, String) {
        let mut child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", sandbox.name))
            .arg(egress)
            .arg("run")
            .args(sandbox.agent_args(args))
            .env("EGRESS_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting the agent");
        let mut stderr = child.stderr.take().expect("stderr");
        let reader = thread::spawn(move || {
            let mut log = String::new();
            let _ = std::io::Read::read_to_string(&mut stderr, &mut log);
            log
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the agent did not exit; its log:\n{}",
                    reader.join().unwrap_or_default()
                );
            }
            thread::sleep(Duration::from_millis(20));
        };
        (status, reader.join().expect("log reader"))
    }

    /// The agent's process id (`nsenter` execs it in place).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn spawn(mut cmd: Command, args: &[String]) -> Self {
        if !cmd.get_envs().any(|(k, _)| k == "EGRESS_LOG") {
            cmd.env("EGRESS_LOG", "info");
        }
        let mut child = cmd
            .arg("run")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting the agent");
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
        let mut agent = Self { child, log };
        if rx.recv_timeout(Duration::from_secs(30)).is_err() {
            let status = agent.child.try_wait();
            panic!(
                "the agent did not become ready ({status:?}); its log:\n{}",
                agent.log()
            );
        }
        agent
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        self.log.lock().expect("log").clone()
    }

    /// Waits until the log contains `needle`, or panics with the log after `timeout`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.log().contains(needle) {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        panic!(
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
    pub fn wait(mut self) -> std::process::ExitStatus {
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
        let mut child = Command::new(bin)
            .arg("--cgroup")
            .arg(&sandbox.cgroup)
            .arg("--netns")
            .arg(&sandbox.name)
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

/// Writes a policy file in a fresh temporary directory and returns its path.
pub fn policy_file(dir: &Path, name: &str, yaml: &str) -> PathBuf {
    fs::create_dir_all(dir).expect("policy dir");
    let path = dir.join(name);
    fs::write(&path, yaml).expect("writing policy");
    path
}

/// `CLOCK_MONOTONIC` in nanoseconds: one clock for every process on the host, so a time taken
/// in one process (a benchmark renaming a policy file) and one taken in another (a workload
/// seeing the new verdict) can be subtracted. `Instant` reads the same clock but does not
/// expose its value.
pub fn monotonic_ns() -> u64 {
    // SAFETY: timespec is plain data; clock_gettime only writes it.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: a valid clock id and a valid pointer to a timespec.
    let ret = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(ret, 0, "clock_gettime: {}", std::io::Error::last_os_error());
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Raw `connect()` for workloads that connect in a loop: one socket per call with
/// `SO_LINGER {on, 0}`, so `close()` sends a RST and leaves no TIME_WAIT behind (100,000
/// connects to one destination would otherwise run out of ephemeral ports within seconds).
pub mod raw {
    use std::{
        mem,
        net::SocketAddr,
        time::{Duration, Instant},
    };

    /// The target as a `sockaddr_storage` and its length.
    pub fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
        // SAFETY: sockaddr_storage is plain data; zeroed is valid.
        let mut storage: libc::sockaddr_storage = unsafe { mem::zeroed() };
        let len = match addr {
            SocketAddr::V4(a) => {
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: a.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_ne_bytes(a.ip().octets()),
                    },
                    sin_zero: [0; 8],
                };
                // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
                unsafe { std::ptr::write(std::ptr::from_mut(&mut storage).cast(), sin) };
                mem::size_of::<libc::sockaddr_in>()
            }
            SocketAddr::V6(a) => {
                let sin6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: a.port().to_be(),
                    sin6_flowinfo: a.flowinfo(),
                    sin6_addr: libc::in6_addr {
                        s6_addr: a.ip().octets(),
                    },
                    sin6_scope_id: a.scope_id(),
                };
                // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
                unsafe { std::ptr::write(std::ptr::from_mut(&mut storage).cast(), sin6) };
                mem::size_of::<libc::sockaddr_in6>()
            }
        };
        (storage, len as libc::socklen_t)
    }

    /// One socket, connect, close. Returns how long `connect()` took and what it returned: a
    /// denied connect fails inside `connect()` and is timed the same way.
    pub fn connect_once(
        family: libc::c_int,
        addr: &libc::sockaddr_storage,
        len: libc::socklen_t,
    ) -> (Duration, std::io::Result<()>) {
        // SAFETY: plain syscalls on a descriptor this function owns and closes on every path.
        unsafe {
            let fd = libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            if fd < 0 {
                return (Duration::ZERO, Err(std::io::Error::last_os_error()));
            }
            let linger = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            let ret = libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                std::ptr::from_ref(&linger).cast(),
                mem::size_of::<libc::linger>() as libc::socklen_t,
            );
            if ret != 0 {
                let e = std::io::Error::last_os_error();
                libc::close(fd);
                return (Duration::ZERO, Err(e));
            }
            let start = Instant::now();
            let ret = libc::connect(fd, std::ptr::from_ref(addr).cast(), len);
            let took = start.elapsed();
            let result = if ret == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            };
            libc::close(fd);
            (took, result)
        }
    }

    /// Connects to `addr` once (socket, connect, close): `Ok` when connected, else the error
    /// (`EPERM` when the filter denied it).
    pub fn connect(addr: SocketAddr) -> std::io::Result<()> {
        let family = if addr.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        };
        let (storage, len) = sockaddr(addr);
        connect_once(family, &storage, len).1
    }
}

/// The row of rule `name` in a parsed `egress status -o json` (fails the test if there is none).
pub fn status_row<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    status["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("no rule {name} in {status:#}"))
}
