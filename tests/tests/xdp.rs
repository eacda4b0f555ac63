//! The XDP backstop: `egress run --xdp-iface IF` on the host side of a pod's veth pair. A
//! "pod" namespace ([`PodNet`]) sits behind a veth whose host end is in the sandbox (the
//! node); its workload runs outside the managed cgroup, so no socket hook sees it: raw
//! sockets, UDP and TCP alike meet only the XDP program. What the rules allow arrives at the
//! node's sinks; what they do not is dropped on the veth, counted on the xdp hook and
//! reported as events naming the interface.

use std::{net::SocketAddr, time::Duration};

use egress_tests::{
    Agent, Attempted, PodNet, Sandbox, V4_A, V4_B, V6_A, V6_B, Vector, egress_bin,
    matrix::{Expect, Family, Matrix, TIMEOUT, cases_rule},
    vector::attempt,
    vector_bin,
};

const EGRESS: &str = egress_bin!();
const VECTOR: &str = vector_bin!();
const BASE_PORT: u16 = 25000;
/// Short enough that a dropped SYN is sent once (Linux retransmits the first after 1 s).
const SHORT: Duration = Duration::from_millis(500);

/// An EgressRule allowing `service` on every port the matrix uses, over tcp and udp.
fn rule(name: &str, service: &str) -> String {
    cases_rule(name, service, BASE_PORT)
}

/// Starts an agent enforcing `yaml` with the XDP backstop on `iface`.
fn agent(sb: &Sandbox, yaml: &str, iface: &str) -> Agent {
    let policy = sb.policy_file("policy.yaml", yaml);
    sb.agent(EGRESS)
        .policy(&policy, &["--xdp-iface", iface])
        .start()
}

/// One UDP datagram from the pod to `to` (outside any managed cgroup).
fn datagram_from_pod(pod: &PodNet, to: SocketAddr) -> Attempted {
    attempt(
        VECTOR,
        pod.pod_netns(),
        None,
        Vector::UdpSendto,
        to,
        TIMEOUT,
    )
}

fn status(sb: &Sandbox) -> serde_json::Value {
    sb.status_json(EGRESS)
}

fn counts(value: &serde_json::Value, key: &str, name: &str) -> (u64, u64, u64) {
    let row = value[key]
        .as_array()
        .expect("an array")
        .iter()
        .find(|r| r[if key == "hooks" { "hook" } else { "name" }] == name)
        .unwrap_or_else(|| panic!("no {name} in {key}: {value:#}"));
    (
        row["allowed"].as_u64().expect("allowed"),
        row["denied"].as_u64().expect("denied"),
        row["would_deny"].as_u64().expect("would_deny"),
    )
}

#[test]
fn the_xdp_backstop_drops_what_no_socket_hook_saw() {
    let sb = Sandbox::new();
    let pod = PodNet::new(&sb);
    let yaml = rule("v4-a", "192.0.2.1") + &rule("v6-a", "2001:db8::1");
    let agent = agent(&sb, &yaml, pod.host_iface());
    let st = status(&sb);
    assert_eq!(
        st["xdp_ifaces"],
        serde_json::json!([pod.host_iface()]),
        "{st:#}"
    );
    // Attached in generic mode: on a veth, driver mode copies every packet the pod sends.
    let link = egress_tests::run_ok(
        std::process::Command::new("ip").args([
            "-n",
            &sb.name,
            "-d",
            "link",
            "show",
            "dev",
            pod.host_iface(),
        ]),
        "ip link show",
    );
    assert!(link.contains("xdpgeneric"), "{link}");

    // Allowed destinations: everything arrives, raw sockets included (the pod's workload is
    // outside the managed cgroup, so sock_create never refused them). As without a filter, a
    // raw packet to a v4-mapped address crosses the veth as IPv6 and the node has no route
    // for it.
    let from_pod = Matrix::new(VECTOR, pod.pod_netns(), None, &sb.name);
    let failures = from_pod.run(
        (V4_A, V6_A),
        (pod.pod_v4().into(), pod.pod_v6().into()),
        BASE_PORT,
        |vector, family| match (vector, family) {
            (Vector::RawUdp | Vector::RawSyn, Family::Mapped) => Expect::DroppedNoRoute,
            _ => Expect::Arrives,
        },
    );
    assert!(
        failures.is_empty(),
        "allowed destinations:\n{}",
        failures.join("\n")
    );
    let after_allowed = status(&sb);

    // Denied destinations: the SYN or datagram leaves the pod and is dropped on the veth.
    // TCP waits for an answer that never comes; a datagram's sender cannot tell.
    let failures = Matrix {
        timeout: SHORT,
        ..from_pod
    }
    .run(
        (V4_B, V6_B),
        (pod.pod_v4().into(), pod.pod_v6().into()),
        BASE_PORT,
        |vector, _| match vector {
            Vector::Tcp | Vector::Tfo | Vector::Uring => Expect::Fails("connect", libc::ETIMEDOUT),
            Vector::UdpConnected | Vector::UdpSendto | Vector::RawUdp | Vector::RawSyn => {
                Expect::Vanishes
            }
            Vector::Ping | Vector::Udplite | Vector::Mptcp => {
                unreachable!("not in the matrix (Vector::ALL)")
            }
        },
    );
    assert!(
        failures.is_empty(),
        "denied destinations:\n{}",
        failures.join("\n")
    );

    // Counted on the xdp hook only: 7 vectors x 3 families each way (one SYN per TCP attempt).
    let st = status(&sb);
    assert_eq!(
        counts(&after_allowed, "hooks", "xdp"),
        (21, 0, 0),
        "{after_allowed:#}"
    );
    assert_eq!(counts(&st, "hooks", "xdp"), (21, 21, 0), "{st:#}");
    for hook in ["connect", "sendmsg", "sock_create"] {
        assert_eq!(counts(&st, "hooks", hook), (0, 0, 0), "{hook}: {st:#}");
    }
    // IPv4 and v4-mapped on the IPv4 rule, IPv6 on its own.
    assert_eq!(counts(&st, "rules", "v4-a"), (14, 0, 0), "{st:#}");
    assert_eq!(counts(&st, "rules", "v6-a"), (7, 0, 0), "{st:#}");
    assert_eq!(counts(&st, "rules", "(no rule)"), (0, 21, 0), "{st:#}");

    // Every drop is an event naming the interface, the protocol and the destination.
    let events = sb.events_json(EGRESS);
    assert_eq!(events.len(), 21, "{events:#?}");
    let (mut tcp, mut udp, mut mapped) = (0, 0, 0);
    for e in &events {
        assert_eq!(e["source"], "xdp", "{e}");
        assert_eq!(e["verdict"], "deny", "{e}");
        assert_eq!(e["iface"], pod.host_iface(), "{e}");
        assert_eq!(e["pid"], 0, "{e}");
        let dst = e["destination"].as_str().expect("destination");
        assert!(
            dst.starts_with("198.51.100.1:") || dst.starts_with("[2001:db8:1::1]:"),
            "{e}"
        );
        match e["protocol"].as_str() {
            Some("tcp") => tcp += 1,
            Some("udp") => udp += 1,
            other => panic!("protocol {other:?}: {e}"),
        }
        if e["via"] == "v4-mapped" {
            mapped += 1;
        }
    }
    // tcp, tfo, uring and raw SYNs; connected, unconnected and raw UDP.
    assert_eq!((tcp, udp), (12, 9), "{events:#?}");
    // Only the raw packets cross the veth with a v4-mapped destination; dual-stack TCP and
    // UDP sockets send IPv4.
    assert_eq!(mapped, 2, "{events:#?}");
    drop(agent);
}

/// `--xdp-iface 'hv*'`: a pod started after the agent gets the backstop within the rescan
/// (a second), and its interface is forgotten when the pod goes.
#[test]
fn a_prefix_pattern_covers_pods_that_start_later() {
    let sb = Sandbox::new();
    let agent = agent(&sb, &rule("v4-a", "192.0.2.1"), "hv*");
    assert_eq!(status(&sb)["xdp_ifaces"], serde_json::json!([]));

    let pod = PodNet::new(&sb);
    let wait_for = |want: serde_json::Value| {
        let mut got = serde_json::Value::Null;
        let shown = egress_tests::eventually(Duration::from_secs(5), || {
            got = status(&sb)["xdp_ifaces"].clone();
            got == want
        });
        assert!(shown, "xdp_ifaces stayed {got}, not {want}");
    };
    wait_for(serde_json::json!([pod.host_iface()]));

    let allowed = egress_tests::UdpSink::start(&sb.name, egress_tests::sa(V4_A, BASE_PORT + 4));
    let denied = egress_tests::UdpSink::start(&sb.name, egress_tests::sa(V4_B, BASE_PORT + 4));
    for sink in [&allowed, &denied] {
        let got = datagram_from_pod(&pod, sink.addr());
        assert_eq!(got, Attempted::Ok, "to {}", sink.addr());
    }
    assert_eq!(
        allowed.wait_for(1, TIMEOUT),
        1,
        "the allowed datagram arrived"
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        denied.count(),
        0,
        "the denied datagram was dropped on the veth"
    );
    assert_eq!(counts(&status(&sb), "hooks", "xdp"), (1, 1, 0));

    drop(pod);
    wait_for(serde_json::json!([]));
    drop(agent);
}

/// Audit mode at the backstop: what enforce mode would drop passes, and is counted and
/// reported as a would-deny.
#[test]
fn in_audit_mode_the_backstop_passes_and_reports_would_deny() {
    let sb = Sandbox::new();
    let pod = PodNet::new(&sb);
    let yaml =
        "kind: EgressConfig\nspec:\n  mode: audit\n---\n".to_owned() + &rule("v4-a", "192.0.2.1");
    let agent = agent(&sb, &yaml, pod.host_iface());
    let sink = egress_tests::UdpSink::start(&sb.name, egress_tests::sa(V4_B, BASE_PORT + 4));
    let got = datagram_from_pod(&pod, sink.addr());
    assert_eq!(got, Attempted::Ok);
    assert_eq!(sink.wait_for(1, TIMEOUT), 1, "audit mode let it through");
    assert_eq!(counts(&status(&sb), "hooks", "xdp"), (0, 0, 1));
    let events = sb.events_json(EGRESS);
    let e = events.first().expect("an event");
    assert_eq!(
        (&e["source"], &e["verdict"]),
        (&serde_json::json!("xdp"), &serde_json::json!("would-deny")),
        "{events:#?}"
    );
    assert_eq!(events.len(), 1, "{events:#?}");
    drop(agent);
}
