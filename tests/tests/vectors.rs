//! Self-tests of the egress-vector tooling, with no egress filter loaded: every vector of
//! `egress-vector`, over IPv4, IPv6 and v4-mapped IPv6, from a sandbox's own namespace and
//! from a pod ([`PodNet`]) behind a veth, reaches its sink and is counted there. A filtered
//! test that later counts zero at the same sink therefore shows the filter stopped it, not
//! the tool.
//!
//! Where the kernel itself cannot carry a vector for a family (the raw sockets and v4-mapped
//! addresses), the test asserts exactly what happens instead, and says why.

use std::{
    net::{IpAddr, SocketAddr},
    process::Command,
    time::Duration,
};

use egress_tests::{
    Attempted, PodNet, Sandbox, Sink, SynSink, UdpSink, V4_A, V4_B, V6_A, V6_B, Vector, mapped, sa,
    vector::attempt, vector_bin,
};

const VECTOR: &str = vector_bin!();
const TIMEOUT: Duration = Duration::from_secs(3);

/// The address forms a vector is tried with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    V4,
    V6,
    /// `[::ffff:a.b.c.d]` from an AF_INET6 socket.
    Mapped,
}

const FAMILIES: [Family; 3] = [Family::V4, Family::V6, Family::Mapped];

/// Where a vector's traffic is counted.
enum AnySink {
    Tcp(Sink),
    Udp(UdpSink),
    Syn(SynSink),
}

/// What a case should come to.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Expect {
    /// `ok`, and counted once at the sink (from the expected source, with the payload).
    Arrives,
    /// `ok` from the tool (the kernel took the packet), nothing reaches the sink, and the
    /// sink's namespace counts one more IPv6 packet it had no route for (`Ip6InNoRoutes`).
    DroppedNoRoute,
    /// The tool fails at this stage with this errno, and nothing reaches the sink.
    Fails(&'static str, i32),
}

/// Runs every vector over every family from `netns` to sinks in `sink_ns`, at `v4`/`v6`,
/// expecting sources `src4`/`src6`; returns the failures, one line each.
fn run_matrix(
    netns: &str,
    sink_ns: &str,
    (v4, v6): (std::net::Ipv4Addr, std::net::Ipv6Addr),
    (src4, src6): (IpAddr, IpAddr),
    base_port: u16,
    expect: impl Fn(Vector, Family) -> Expect,
) -> Vec<String> {
    let mut failures = Vec::new();
    for (fi, family) in FAMILIES.into_iter().enumerate() {
        for (vi, vector) in Vector::ALL.into_iter().enumerate() {
            let port = base_port + (fi * 10 + vi) as u16;
            let (sink_addr, target, src) = match family {
                Family::V4 => (sa(v4, port), sa(v4, port), src4),
                Family::V6 => (sa(v6, port), sa(v6, port), src6),
                Family::Mapped => (sa(v4, port), mapped(v4, port), src4),
            };
            let sink = match vector {
                Vector::Tcp | Vector::Uring => AnySink::Tcp(Sink::start(sink_ns, sink_addr)),
                Vector::Tfo => AnySink::Tcp(Sink::start_tfo(sink_ns, sink_addr)),
                Vector::UdpConnected | Vector::UdpSendto | Vector::RawUdp => {
                    AnySink::Udp(UdpSink::start(sink_ns, sink_addr))
                }
                Vector::RawSyn => AnySink::Syn(SynSink::start(sink_ns, sink_addr)),
            };
            let no_routes = ip6_in_no_routes(sink_ns);
            let got = attempt(VECTOR, netns, None, vector, target, TIMEOUT);
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

/// The `Ip6InNoRoutes` counter of a namespace: IPv6 packets it received and had no route for.
fn ip6_in_no_routes(netns: &str) -> u64 {
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
        Expect::Arrives | Expect::DroppedNoRoute if *got != Attempted::Ok => {
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
            let got = s.datagrams();
            if !arrives {
                return if got.is_empty() {
                    Ok(())
                } else {
                    Err(format!("the sink received {got:?}"))
                };
            }
            let [d] = got.as_slice() else {
                return Err(format!(
                    "the sink received {} datagrams: {got:?}",
                    got.len()
                ));
            };
            if d.payload != payload || !d.marked() || d.from.ip() != src {
                return Err(format!("the sink received {d:?}"));
            }
            if vector == Vector::RawUdp && d.from.port() != 40000 {
                return Err(format!("raw UDP from port {}, not 40000", d.from.port()));
            }
        }
        AnySink::Syn(s) => {
            let got = s.syns();
            if !arrives {
                return if got.is_empty() {
                    Ok(())
                } else {
                    Err(format!("the sink saw {got:?}"))
                };
            }
            let [syn] = got.as_slice() else {
                return Err(format!("the sink saw {} SYNs: {got:?}", got.len()));
            };
            if syn.payload != payload || syn.from != SocketAddr::new(src, 40001) {
                return Err(format!("the sink saw {syn:?}"));
            }
        }
    }
    Ok(())
}

/// Every vector and family, from a process in the sandbox's own namespace to the sandbox's
/// addresses (so over loopback).
#[test]
fn every_vector_reaches_its_sink_from_the_sandbox() {
    let sb = Sandbox::new();
    let failures = run_matrix(
        &sb.name,
        &sb.name,
        (V4_A, V6_A),
        (V4_A.into(), V6_A.into()),
        21000,
        |vector, family| match (vector, family) {
            // An AF_INET6 raw socket sends what it is given as IPv6: unlike TCP and UDP
            // sockets, it never hands a v4-mapped destination to IPv4. The sandbox has no IPv6
            // route covering ::ffff:0:0/96, so sendto() fails there.
            (Vector::RawUdp | Vector::RawSyn, Family::Mapped) => {
                Expect::Fails("send", libc::ENETUNREACH)
            }
            _ => Expect::Arrives,
        },
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Every vector and family, from a pod to the node's addresses, through the veth pair.
#[test]
fn every_vector_reaches_its_sink_from_a_pod() {
    let sb = Sandbox::new();
    let pod = PodNet::new(&sb);
    let failures = run_matrix(
        pod.pod_netns(),
        &sb.name,
        (V4_B, V6_B),
        (pod.pod_v4().into(), pod.pod_v6().into()),
        22000,
        |vector, family| match (vector, family) {
            // As from the sandbox, the AF_INET6 raw socket sends IPv6 to ::ffff:a.b.c.d; but
            // the pod has an IPv6 default route, so the packet goes out on `pv` and reaches
            // the node's `hv<N>` (where an XDP filter would see an IPv6 packet with a
            // v4-mapped destination). The node has no route for it and drops it, counting
            // Ip6InNoRoutes (and answers ICMPv6 unreachable); nothing reaches the IPv4 sink.
            (Vector::RawUdp | Vector::RawSyn, Family::Mapped) => Expect::DroppedNoRoute,
            _ => Expect::Arrives,
        },
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The pod and the node reach each other both ways: the node's own processes connect to and
/// send to the pod's addresses, over IPv4 and IPv6.
#[test]
fn the_node_reaches_the_pod_too() {
    let sb = Sandbox::new();
    let pod = PodNet::new(&sb);
    for (i, ip) in [IpAddr::from(pod.pod_v4()), pod.pod_v6().into()]
        .into_iter()
        .enumerate()
    {
        let (tcp_port, udp_port) = (23000 + i as u16 * 2, 23001 + i as u16 * 2);
        let tcp = Sink::start(pod.pod_netns(), sa(ip, tcp_port));
        let udp = UdpSink::start(pod.pod_netns(), sa(ip, udp_port));
        let got = attempt(VECTOR, &sb.name, None, Vector::Tcp, tcp.addr(), TIMEOUT);
        assert_eq!(got, Attempted::Ok, "tcp to {}", tcp.addr());
        let got = attempt(
            VECTOR,
            &sb.name,
            None,
            Vector::UdpSendto,
            udp.addr(),
            TIMEOUT,
        );
        assert_eq!(got, Attempted::Ok, "udp-sendto to {}", udp.addr());
        assert_eq!(tcp.accepted(), 1, "tcp to {}", tcp.addr());
        assert_eq!(udp.count(), 1, "udp to {}", udp.addr());
    }
}

/// The pod's only way anywhere is its end of the pair, into the node's namespace.
#[test]
fn a_pod_has_no_way_out_but_the_node() {
    let sb = Sandbox::new();
    let pod = PodNet::new(&sb);
    let links = ip(&["-n", pod.pod_netns(), "-o", "link", "show"]);
    let names: Vec<&str> = links
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n))
        .collect();
    assert_eq!(names, ["lo", PodNet::POD_IFACE], "{links}");
    // The peer of `pv` is the node's `hv<N>`, in the sandbox's namespace.
    let host = ip(&["-n", &sb.name, "-o", "link", "show", pod.host_iface()]);
    assert!(host.contains(pod.host_iface()), "{host}");
    for family in ["-4", "-6"] {
        let routes = ip(&["-n", pod.pod_netns(), family, "route", "show"]);
        for route in routes.lines() {
            assert!(
                route.contains("dev pv") || route.contains("dev lo"),
                "{routes}"
            );
        }
    }
}

/// A pod and its sandbox are gone after a test panics with them alive.
#[test]
fn a_panicking_test_leaves_no_pod_behind() {
    let names = std::sync::Mutex::new(None);
    let result = std::panic::catch_unwind(|| {
        let sb = Sandbox::new();
        let pod = PodNet::new(&sb);
        *names.lock().expect("names") = Some((sb.name.clone(), pod.pod_netns().to_owned()));
        panic!("a failing test");
    });
    assert!(result.is_err());
    let (node, pod) = names.into_inner().expect("names").expect("created");
    let list = ip(&["netns", "list"]);
    for ns in [&node, &pod] {
        assert!(
            !list
                .lines()
                .any(|l| l.split_whitespace().next() == Some(ns)),
            "{ns} is still there: {list}"
        );
    }
}

/// Runs `ip ARGS` and returns its stdout; panics if it fails.
fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
