//! Self-tests of the egress-vector tooling, with no egress filter loaded: every vector of
//! `egress-vector`, over IPv4, IPv6 and v4-mapped IPv6, from a sandbox's own namespace and
//! from a pod ([`PodNet`]) behind a veth, reaches its sink and is counted there. A filtered
//! test that later counts zero at the same sink therefore shows the filter stopped it, not
//! the tool.
//!
//! Where the kernel itself cannot carry a vector for a family (the raw sockets and v4-mapped
//! addresses), the test asserts exactly what happens instead, and says why.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    process::Command,
};

use egress_tests::{
    Attempted, PodNet, Sandbox, Sink, UdpSink, V4_A, V4_B, V6_A, V6_B, Vector,
    matrix::{Expect, Family, Matrix, TIMEOUT},
    sa,
    vector::attempt,
    vector_bin,
};

const VECTOR: &str = vector_bin!();

/// Every vector and family, from a process in the sandbox's own namespace to the sandbox's
/// addresses (so over loopback).
#[test]
fn every_vector_reaches_its_sink_from_the_sandbox() {
    let sb = Sandbox::new();
    // An AF_INET6 raw socket sends what it is given as IPv6: unlike TCP and UDP sockets, it
    // never hands a v4-mapped destination to IPv4. The sandbox has no IPv6 route covering
    // ::ffff:0:0/96, so sendto() fails there.
    every_vector_arrives(
        &sb,
        &sb.name,
        (V4_A, V6_A),
        (V4_A.into(), V6_A.into()),
        21000,
        Expect::Fails("send", libc::ENETUNREACH),
    );
}

/// Every vector and family, from a pod to the node's addresses, through the veth pair.
#[test]
fn every_vector_reaches_its_sink_from_a_pod() {
    let sb = Sandbox::new();
    let pod = PodNet::new(&sb);
    // As from the sandbox, the AF_INET6 raw socket sends IPv6 to ::ffff:a.b.c.d; but the pod
    // has an IPv6 default route, so the packet goes out on `pv` and reaches the node's
    // `hv<N>` (where an XDP filter would see an IPv6 packet with a v4-mapped destination).
    // The node has no route for it and drops it, counting Ip6InNoRoutes (and answers ICMPv6
    // unreachable); nothing reaches the IPv4 sink.
    every_vector_arrives(
        &sb,
        pod.pod_netns(),
        (V4_B, V6_B),
        (pod.pod_v4().into(), pod.pod_v6().into()),
        22000,
        Expect::DroppedNoRoute,
    );
}

/// Runs every vector over every family from the namespace `from` (its addresses `sources`)
/// to sinks at `dests`, on ports from `base_port`, in the sandbox's namespace, unfiltered:
/// each must arrive, but for the raw vectors to a v4-mapped address, which the kernel does not
/// carry to IPv4 and which must come to `raw_mapped` instead.
fn every_vector_arrives(
    sb: &Sandbox,
    from: &str,
    dests: (Ipv4Addr, Ipv6Addr),
    sources: (IpAddr, IpAddr),
    base_port: u16,
    raw_mapped: Expect,
) {
    let failures = Matrix::new(VECTOR, from, None, &sb.name).run(
        dests,
        sources,
        base_port,
        |vector, family| match (vector, family) {
            (Vector::RawUdp | Vector::RawSyn, Family::Mapped) => raw_mapped.clone(),
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
