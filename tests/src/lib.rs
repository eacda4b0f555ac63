//! Helpers shared by the integration tests, one file a job:
//!
//! - [`sandbox`]: a [`Sandbox`] per test (its own network namespace with no route out, its
//!   own cgroup, pin directory, run directory and temporary directory, all removed on drop,
//!   even when the test fails);
//! - [`agent`]: `egress run` in a sandbox, started through one builder ([`Sandbox::agent`]);
//! - [`client`]: the `egress` CLI as a client of that agent (`ctl`, `status -o json`, events);
//! - [`policy`]: policy documents ([`policy::Rule`]);
//! - [`probe`]: the `egress-probe` workload and its [`Outcome`]; [`sink`]: the TCP [`Sink`]
//!   that counts what reaches it; [`sinks`]: the UDP and SYN sinks of the non-TCP-connect
//!   egress vectors; [`vector`] runs `egress-vector`, [`matrix`] every vector over every
//!   family; [`workload`]: `egress-verdicts` of the soak tests; [`raw`]: `connect()` in a loop;
//! - [`hold`]: the descriptor-exhaustion attacker and the metrics scrape; [`upstream`]: the
//!   HTTP and TLS servers of the HTTP egress tests, [`world`] their whole world; [`pod`]: a
//!   second namespace wired to a sandbox as a pod to its node; [`node`] (feature `pods`): a
//!   real containerd on a sandbox and its pods; [`squatter`], [`follow`];
//! - [`dns_server`]: the [`DnsServer`] of the FQDN tests (records set while it runs, queries
//!   counted); [`resolve`]: the `egress-resolve` workload (glibc `getaddrinfo()`, then a
//!   connection) and its [`Resolved`] output.
//!
//! Network safety: every address here is assigned by the sandbox to a veth interface whose peer is also inside
//! the sandbox's own namespace (TEST-NET ranges and 2001:db8::/32), so a filter that failed
//! open still could not send a packet off the machine.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus},
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

/// Path of the `egress-resolve` workload (glibc `getaddrinfo()` against a given resolv.conf,
/// then a connection), for [`Sandbox::resolve`].
#[macro_export]
macro_rules! resolve_bin {
    () => {
        env!("CARGO_BIN_EXE_egress-resolve")
    };
}

/// Path of the `egress` CLI, from the integration test that calls it.
#[macro_export]
macro_rules! egress_bin {
    () => {
        env!("CARGO_BIN_EXE_egress-cli")
    };
}

pub mod agent;
pub mod client;
pub mod dns_server;
pub mod follow;
pub mod hold;
pub mod kube_api;
pub mod matrix;
#[cfg(feature = "pods")]
pub mod node;
pub mod pod;
pub mod policy;
pub mod poll;
pub mod probe;
pub mod raw;
pub mod resolve;
pub mod sandbox;
pub mod sink;
pub mod sinks;
pub mod squatter;
pub mod upstream;
pub mod vector;
pub mod workload;
pub mod world;

pub use agent::{Agent, Launch};
pub use client::{find_row, row_named, status_row};
pub use dns_server::{DnsServer, Zone, resolv_conf_text};
pub use hold::{Hold, sample};
pub use pod::PodNet;
pub use probe::Outcome;
pub use resolve::{Family, Lookup, Resolve, Resolved};
pub use sandbox::Sandbox;
pub use sink::{Sink, assert_accepted, setsockopt, setsockopt_int};
pub use sinks::{Datagram, MARKER, Syn, SynSink, UdpSink};
pub use vector::{Attempted, Vector};
pub use workload::{Counted, Workload};

/// A row of the kernel's counters: connections it `allowed`, `denied` and (audit mode) would
/// have denied.
pub fn counted(allowed: u64, denied: u64, would_deny: u64) -> egress_common::RuleCounters {
    egress_common::RuleCounters {
        allowed,
        denied,
        would_deny,
    }
}

/// Runs a command and panics with its output if it fails.
pub fn sh(args: &[&str]) {
    run_ok(
        Command::new(args[0]).args(&args[1..]),
        &format!("{args:?} (cargo xtask setup installs iproute2)"),
    );
}

/// Runs `cmd` (`what`) to its end and returns its stdout as text; fails the test with its
/// stdout and stderr unless it succeeds.
pub fn run_ok(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {what}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed ({}): {stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Waits for `child` at most `limit`: its exit status, or `None` once it has been killed (and
/// reaped) for running longer, so that a hang fails the test instead of the suite.
pub fn wait_within(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("waiting for a child") {
            return Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A workload binary (`bin`, one of `tests/src/bin`) about to run inside the network namespace
/// `netns`, and first in `cgroup` when given: `bin [--cgroup CGROUP] --netns NETNS`, to which
/// the caller adds the workload's own arguments. The workload reads these two with [`place`].
pub fn workload_command(bin: &str, cgroup: Option<&Path>, netns: &str) -> Command {
    let mut cmd = Command::new(bin);
    if let Some(cgroup) = cgroup {
        cmd.arg("--cgroup").arg(cgroup);
    }
    cmd.args(["--netns", netns]);
    cmd
}

/// Runs `cmd` to its end and returns its stdout and stderr as text; `what` names it if it
/// cannot be started.
pub fn output_text(cmd: &mut Command, what: &str) -> (String, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {what}: {e}"));
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The first line `child` writes to its stdout (piped), newline included; `what` names it if
/// that cannot be read. Whatever else the read took from the pipe is dropped: for workloads
/// that write nothing more until told to.
pub fn first_line(child: &mut Child, what: &str) -> String {
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.as_mut().expect("a piped stdout")),
        &mut line,
    )
    .unwrap_or_else(|e| panic!("{what}'s first line: {e}"));
    line
}

/// Polls `done` until it is true (then true) or `timeout` has passed (then false): for what
/// the agent does on its own time (a reload, a log line, an event).
pub fn eventually(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Moves the calling process into the cgroup v2 directory `dir` (the workloads' `--cgroup`).
pub fn join_cgroup(dir: &str) {
    fs::write(
        format!("{dir}/cgroup.procs"),
        std::process::id().to_string(),
    )
    .unwrap_or_else(|e| panic!("joining cgroup {dir}: {e}"));
}

/// A workload's `--cgroup DIR` or `--netns NAME` (`flag`), its value the next of `args`:
/// joins that cgroup (as the agent's `egress_user::cgroup::join` does) or enters that
/// network namespace.
pub fn place(flag: &str, args: &mut impl Iterator<Item = String>) {
    let value = args
        .next()
        .unwrap_or_else(|| panic!("{flag} needs a value"));
    match flag {
        "--cgroup" => egress_user::cgroup::join(value.as_ref())
            .unwrap_or_else(|e| panic!("joining cgroup {value}: {e}")),
        "--netns" => enter_netns(&value),
        other => panic!("{other} is neither --cgroup nor --netns"),
    }
}

/// Moves the calling thread into the network namespace `name` (under `/run/netns/`), or the
/// one at a path (`/proc/PID/ns/net`).
pub fn enter_netns(name: &str) {
    // A path (a pod's `/proc/PID/ns/net`) or a name under /run/netns.
    let path = if name.starts_with('/') {
        name.to_owned()
    } else {
        format!("/run/netns/{name}")
    };
    let ns = fs::File::open(&path).unwrap_or_else(|e| panic!("opening netns {name}: {e}"));
    // SAFETY: a valid namespace fd; setns changes only this thread's namespace.
    let ret = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(ret, 0, "setns({name}): {}", std::io::Error::last_os_error());
}

/// Runs `f` on a thread inside the network namespace `netns` and returns what it returns (a
/// panic there is passed on): a client in the sandbox's network, without a workload process.
pub fn in_netns<R: Send + 'static>(netns: &str, f: impl FnOnce() -> R + Send + 'static) -> R {
    let netns = netns.to_owned();
    std::thread::spawn(move || {
        enter_netns(&netns);
        f()
    })
    .join()
    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// Starts a server thread inside the network namespace `netns`: `body` runs there and sends
/// what its starter waits for (its bound address) once it is ready. Returns that and the
/// thread; panics with the thread's own panic, or naming `what`, if nothing comes within 5 s.
pub fn spawn_in_netns<T: Send + 'static>(
    netns: &str,
    what: &str,
    body: impl FnOnce(std::sync::mpsc::Sender<T>) + Send + 'static,
) -> (T, std::thread::JoinHandle<()>) {
    let (tx, rx) = std::sync::mpsc::channel();
    let netns = netns.to_owned();
    let thread = std::thread::spawn(move || {
        enter_netns(&netns);
        body(tx);
    });
    match rx.recv_timeout(Duration::from_secs(5)) {
        Ok(ready) => (ready, thread),
        Err(_) => match thread.join() {
            Err(panic) => std::panic::resume_unwind(panic),
            Ok(()) => panic!("the {what} did not start"),
        },
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

/// Writes a policy file in a fresh temporary directory and returns its path.
pub fn policy_file(dir: &Path, name: &str, yaml: &str) -> PathBuf {
    fs::create_dir_all(dir).expect("policy dir");
    let path = dir.join(name);
    fs::write(&path, yaml).expect("writing policy");
    path
}

/// 10000 -> "10,000": counts in the benchmarks' reports.
pub fn thousands(n: impl Into<u64>) -> String {
    let s = n.into().to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
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
