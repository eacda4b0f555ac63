//! Running `egress-vector` (one egress attempt of a given kind) from a test, and reading its
//! answer. The binary's own doc comment (src/bin/egress_vector.rs) says what each vector does.

use std::{fmt, net::SocketAddr, path::Path, time::Duration};

use crate::{output_text, workload_command};

/// A kind of egress attempt `egress-vector` makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Vector {
    /// TCP `connect()`, then `send()`.
    Tcp,
    /// TCP Fast Open: `sendto(MSG_FASTOPEN)` without `connect()`, data in the SYN.
    Tfo,
    /// `IORING_OP_CONNECT` through io_uring, then `send()`.
    Uring,
    /// UDP `connect()`, then `send()`.
    UdpConnected,
    /// UDP unconnected `sendto()`.
    UdpSendto,
    /// A hand-built UDP datagram on a raw `IPPROTO_UDP` socket.
    RawUdp,
    /// A hand-built TCP SYN on a raw `IPPROTO_TCP` socket.
    RawSyn,
    /// An ICMP (ICMPv6) echo request on a ping socket, and its reply.
    Ping,
    /// One datagram on a UDP-Lite socket, with `sendto()`.
    Udplite,
    /// An MPTCP `connect()` (TCP fallback against a plain listener), then `send()`.
    Mptcp,
}

impl Vector {
    /// The bypass matrix: every TCP, UDP and raw vector.
    pub const ALL: [Vector; 7] = [
        Vector::Tcp,
        Vector::Tfo,
        Vector::Uring,
        Vector::UdpConnected,
        Vector::UdpSendto,
        Vector::RawUdp,
        Vector::RawSyn,
    ];

    /// The socket kinds other than TCP, UDP and raw: `cgroup/sock_create` refuses them unless
    /// `allowSockets` names them. Not in [`Vector::ALL`] (the bypass matrix, whose every
    /// vector runs over every address family against a rule-judged destination). Their
    /// sinks: [`echo_requests`](crate::sinks::echo_requests) for ping (the namespace answers
    /// it), [`UdpSink::start_lite`](crate::UdpSink::start_lite), a TCP [`Sink`](crate::Sink)
    /// for MPTCP.
    pub const SOCKET_KINDS: [Vector; 3] = [Vector::Ping, Vector::Udplite, Vector::Mptcp];

    /// Its name on the `egress-vector` command line.
    pub fn name(self) -> &'static str {
        match self {
            Vector::Tcp => "tcp",
            Vector::Tfo => "tfo",
            Vector::Uring => "uring",
            Vector::UdpConnected => "udp-connected",
            Vector::UdpSendto => "udp-sendto",
            Vector::RawUdp => "raw-udp",
            Vector::RawSyn => "raw-syn",
            Vector::Ping => "ping",
            Vector::Udplite => "udplite",
            Vector::Mptcp => "mptcp",
        }
    }

    /// The payload it sends (every one starts with [`MARKER`](crate::MARKER)).
    pub fn payload(self) -> Vec<u8> {
        format!("egress-vector {}", self.name()).into_bytes()
    }
}

impl fmt::Display for Vector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What one `egress-vector` run reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attempted {
    /// `ok`: every step succeeded.
    Ok,
    /// `error <stage> <errno> <message>`.
    Error {
        /// The step that failed (`socket`, `setsockopt`, `io_uring`, `connect`,
        /// `getsockname`, `send`, `recv`).
        stage: String,
        /// Its errno.
        errno: i32,
        /// The errno's text.
        message: String,
    },
}

impl Attempted {
    /// Parses the binary's output line. Panics on anything else, with the stderr.
    pub fn parse(stdout: &str, stderr: &str) -> Self {
        let line = stdout.trim();
        if line == "ok" {
            return Self::Ok;
        }
        let parsed = line.strip_prefix("error ").and_then(|rest| {
            let mut words = rest.splitn(3, ' ');
            let stage = words.next()?.to_owned();
            let errno = words.next()?.parse().ok()?;
            Some(Self::Error {
                stage,
                errno,
                message: words.next().unwrap_or("").to_owned(),
            })
        });
        parsed.unwrap_or_else(|| panic!("egress-vector printed {line:?}; stderr: {stderr}"))
    }

    /// Whether it failed at `stage` with `errno`.
    pub fn failed_with(&self, stage: &str, errno: i32) -> bool {
        matches!(self, Self::Error { stage: s, errno: e, .. } if s == stage && *e == errno)
    }
}

/// Runs `egress-vector` (`bin` is `vector_bin!()`) once: from inside `cgroup` when given,
/// inside the network namespace `netns`, with `timeout` for whatever it waits on.
pub fn attempt(
    bin: &str,
    netns: &str,
    cgroup: Option<&Path>,
    vector: Vector,
    addr: SocketAddr,
    timeout: Duration,
) -> Attempted {
    let (stdout, stderr) = output_text(
        workload_command(bin, cgroup, netns)
            .arg("--timeout-ms")
            .arg(timeout.as_millis().to_string())
            .arg(vector.name())
            .arg(addr.to_string()),
        "egress-vector",
    );
    Attempted::parse(&stdout, &stderr)
}
