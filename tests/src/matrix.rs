//! The table-driven runner of the vector tests: every `egress-vector` vector over IPv4, IPv6
//! and v4-mapped IPv6, each against its own sink on its own port, checked against what the
//! caller expects of each (vector, family), counted at the sink.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    process::Command,
    time::Duration,
};

use crate::{Attempted, Sink, SynSink, UdpSink, Vector, mapped, sa, vector::attempt};

/// How long each attempt may wait.
pub const TIMEOUT: Duration = Duration::from_secs(3);

/// The address forms a vector is tried with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// `a.b.c.d` from an AF_INET socket.
    V4,
    /// An IPv6 address from an AF_INET6 socket.
    V6,
    /// `[::ffff:a.b.c.d]` from an AF_INET6 socket.
    Mapped,
}

/// Every family.
pub const FAMILIES: [Family; 3] = [Family::V4, Family::V6, Family::Mapped];

/// Where a vector's traffic is counted.
pub enum AnySink {
    /// TCP connections.
    Tcp(Sink),
    /// UDP datagrams.
    Udp(UdpSink),
    /// TCP SYNs (raw).
    Syn(SynSink),
}

impl AnySink {
    /// The sink that counts `vector`'s traffic to `addr`, started inside `netns`. Panics for
    /// `ping`, which has no sink socket ([`echo_requests`](crate::sinks::echo_requests)
    /// counts it).
    pub fn start(vector: Vector, netns: &str, addr: SocketAddr) -> Self {
        match vector {
            Vector::Tcp | Vector::Uring | Vector::Mptcp => Self::Tcp(Sink::start(netns, addr)),
            Vector::Tfo => Self::Tcp(Sink::start_tfo(netns, addr)),
            Vector::UdpConnected | Vector::UdpSendto | Vector::RawUdp => {
                Self::Udp(UdpSink::start(netns, addr))
            }
            Vector::Udplite => Self::Udp(UdpSink::start_lite(netns, addr)),
            Vector::RawSyn => Self::Syn(SynSink::start(netns, addr)),
            Vector::Ping => panic!("ping has no sink socket; count it with echo_requests"),
        }
    }
}

/// What a case should come to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expect {
    /// `ok`, and counted once at the sink (from the expected source, with the payload).
    Arrives,
    /// `ok` from the tool (the kernel took the packet), nothing reaches the sink, and the
    /// sink's namespace counts one more IPv6 packet it had no route for (`Ip6InNoRoutes`).
    DroppedNoRoute,
    /// The tool fails at this stage with this errno, and nothing reaches the sink.
    Fails(&'static str, i32),
    /// `ok` from the tool (a datagram or a raw packet left), and nothing reaches the sink
    /// nor goes unrouted: something on the way dropped it (the XDP backstop).
    Vanishes,
}

/// Where the vectors run: from `netns` (inside `cgroup` when given) to sinks in `sink_ns`,
/// with `bin` (`vector_bin!()`); `timeout` bounds each attempt ([`TIMEOUT`] unless the caller
/// counts retransmissions).
#[derive(Clone, Copy, Debug)]
pub struct Matrix<'a> {
    pub bin: &'a str,
    pub timeout: Duration,
    pub netns: &'a str,
    pub cgroup: Option<&'a Path>,
    pub sink_ns: &'a str,
}

impl<'a> Matrix<'a> {
    /// From `netns` (inside `cgroup` when given) to sinks in `sink_ns`, with `bin`, each
    /// attempt bounded by [`TIMEOUT`].
    pub fn new(bin: &'a str, netns: &'a str, cgroup: Option<&'a Path>, sink_ns: &'a str) -> Self {
        Self {
            bin,
            timeout: TIMEOUT,
            netns,
            cgroup,
            sink_ns,
        }
    }

    /// Runs every vector over every family to sinks at `v4`/`v6`, expecting sources
    /// `src4`/`src6`, on ports from `base_port` on; returns the failures, one line each.
    pub fn run(
        &self,
        (v4, v6): (std::net::Ipv4Addr, std::net::Ipv6Addr),
        (src4, src6): (IpAddr, IpAddr),
        base_port: u16,
        expect: impl Fn(Vector, Family) -> Expect,
    ) -> Vec<String> {
        let Self {
            bin,
            timeout,
            netns,
            cgroup,
            sink_ns,
        } = *self;
        let mut failures = Vec::new();
        for (fi, family) in FAMILIES.into_iter().enumerate() {
            for (vi, vector) in Vector::ALL.into_iter().enumerate() {
                let port = case_port(base_port, fi, vi);
                let (sink_addr, target, src) = match family {
                    Family::V4 => (sa(v4, port), sa(v4, port), src4),
                    Family::V6 => (sa(v6, port), sa(v6, port), src6),
                    Family::Mapped => (sa(v4, port), mapped(v4, port), src4),
                };
                let sink = AnySink::start(vector, sink_ns, sink_addr);
                let no_routes = ip6_in_no_routes(sink_ns);
                let got = attempt(bin, netns, cgroup, vector, target, timeout);
                let want = expect(vector, family);
                let case = format!("{vector} to {target} ({family:?})");
                let no_route = ip6_in_no_routes(sink_ns) - no_routes;
                let checked = check(&sink, vector, src, &got, &want).and_then(|()| {
                    let wanted = u64::from(want == Expect::DroppedNoRoute);
                    if no_route == wanted {
                        Ok(())
                    } else {
                        Err(format!("Ip6InNoRoutes grew by {no_route}, not {wanted}"))
                    }
                });
                if let Err(why) = checked {
                    failures.push(format!(
                        "{case}: {why} (tool said {got:?}, wanted {want:?})"
                    ));
                } else {
                    eprintln!("{case}: {got:?}, as expected ({want:?})");
                }
            }
        }
        failures
    }
}

/// The port of the case of family `fi` and vector `vi` (their indexes in [`FAMILIES`] and
/// [`Vector::ALL`]) when the cases start at `base_port`.
fn case_port(base_port: u16, fi: usize, vi: usize) -> u16 {
    base_port + (fi * 10 + vi) as u16
}

/// An EgressRule allowing `service` over tcp and udp on every port [`Matrix::run`] gives its
/// cases from `base_port` (one per family and vector).
pub fn cases_rule(name: &str, service: &str, base_port: u16) -> String {
    let ports = (0..FAMILIES.len())
        .flat_map(|fi| (0..Vector::ALL.len()).map(move |vi| case_port(base_port, fi, vi)));
    crate::policy::Rule::new(name, service)
        .tcp_and_udp(ports)
        .to_string()
}

/// The `Ip6InNoRoutes` counter of a namespace: IPv6 packets it received and had no route for.
pub fn ip6_in_no_routes(netns: &str) -> u64 {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "cat", "/proc/net/snmp6"])
        .output()
        .expect("reading snmp6");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("Ip6InNoRoutes"))
        .unwrap_or_else(|| panic!("no Ip6InNoRoutes in {netns}'s snmp6: {text}"))
        .trim()
        .parse()
        .expect("a count")
}

/// Checks one case: what the tool said against `want`, and what the sink counted.
fn check(
    sink: &AnySink,
    vector: Vector,
    src: IpAddr,
    got: &Attempted,
    want: &Expect,
) -> Result<(), String> {
    match want {
        Expect::Arrives | Expect::DroppedNoRoute | Expect::Vanishes if *got != Attempted::Ok => {
            return Err("the tool did not report ok".into());
        }
        Expect::Fails(stage, errno) if !got.failed_with(stage, *errno) => {
            return Err("the tool did not fail as expected".into());
        }
        _ => {}
    }
    let arrives = *want == Expect::Arrives;
    let payload = vector.payload();
    match sink {
        AnySink::Tcp(s) => {
            let (accepted, syn_data) = (s.accepted(), s.syn_data());
            let wanted = usize::from(arrives);
            if accepted != wanted {
                return Err(format!("the sink accepted {accepted}, not {wanted}"));
            }
            if arrives && s.peers()[0].ip() != src {
                return Err(format!("the peer was {}, not {src}", s.peers()[0]));
            }
            // TFO must really carry its data in the SYN, or it tests nothing TCP doesn't.
            let syn_wanted = usize::from(arrives && vector == Vector::Tfo);
            if syn_data != syn_wanted {
                return Err(format!(
                    "{syn_data} connections had data in the SYN, not {syn_wanted}"
                ));
            }
        }
        AnySink::Udp(s) => {
            let Some(d) = at_most_one(s.datagrams(), arrives, "received", "datagrams")? else {
                return Ok(());
            };
            if d.payload != payload || !d.marked() || d.from.ip() != src {
                return Err(format!("the sink received {d:?}"));
            }
            if vector == Vector::RawUdp && d.from.port() != 40000 {
                return Err(format!("raw UDP from port {}, not 40000", d.from.port()));
            }
        }
        AnySink::Syn(s) => {
            let Some(syn) = at_most_one(s.syns(), arrives, "saw", "SYNs")? else {
                return Ok(());
            };
            if syn.payload != payload || syn.from != SocketAddr::new(src, 40001) {
                return Err(format!("the sink saw {syn:?}"));
            }
        }
    }
    Ok(())
}

/// What a sink recorded (`verb` and `what` name it in errors), when exactly one item was to
/// arrive (`Some` of it) or none was (`None`); anything else is an error.
fn at_most_one<T: std::fmt::Debug>(
    got: Vec<T>,
    arrives: bool,
    verb: &str,
    what: &str,
) -> Result<Option<T>, String> {
    if !arrives {
        return if got.is_empty() {
            Ok(None)
        } else {
            Err(format!("the sink {verb} {got:?}"))
        };
    }
    let len = got.len();
    match <[T; 1]>::try_from(got) {
        Ok([one]) => Ok(Some(one)),
        Err(got) => Err(format!("the sink {verb} {len} {what}: {got:?}")),
    }
}
