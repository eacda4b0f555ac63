//! The cgroup/connect4 and connect6 programs, loaded into the running kernel by the library
//! (`Enforcer`), judged by what a workload process sees and by what the server receives.
//!
//! Every test runs in its own sandbox (network namespace with no route out, cgroup, pin
//! directory); see `egress_tests::Sandbox`.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Instant,
};

use egress_common::RuleCounters;
use egress_tests::{
    Outcome, Sandbox, V4_A, V4_B, V6_A, V6_B, assert_accepted, counted, mapped, probe_bin, sa,
};
use egress_user::{
    compile::{BYPASS_NAME, NO_RULE_NAME, PROXY_NAME},
    events::{self, EventRecord, Verdict},
    loader::Enforcer,
    pipeline,
    policy::{self, Mode, Origin, Policy, PortRule, Rule},
};

const PROBE: &str = probe_bin!();

use egress_tests::policy::{load as policy, tcp_rule as rule_yaml};

fn counters(enforcer: &Enforcer) -> HashMap<String, RuleCounters> {
    enforcer
        .counters()
        .expect("reading counters")
        .into_iter()
        .map(|c| (c.name, c.counters))
        .collect()
}

fn drain(
    enforcer: &mut Enforcer,
    ring: &mut aya::maps::RingBuf<aya::maps::MapData>,
) -> Vec<EventRecord> {
    events::drain(ring, |_, row| enforcer.row_name(row).map(str::to_owned))
}

/// Applies the policy `yaml` to the sandbox's cgroup.
fn enforce(sb: &Sandbox, yaml: &str) -> Enforcer {
    pipeline::apply(&sb.target(), &policy(yaml)).expect("apply")
}

/// For one family: a CIDR+port rule lets its own (address, port) through and nothing else,
/// counted at the servers, in the counters and in the events.
fn rule_allows_exactly_its_cidr_and_port(cidr: &str, inside: IpAddr, outside: IpAddr) {
    let sb = Sandbox::new();
    let ok = sb.sink(sa(inside, 8080));
    let wrong_port = sb.sink(sa(inside, 9090));
    let wrong_addr = sb.sink(sa(outside, 8080));
    let mut enforcer = enforce(&sb, &rule_yaml("net-a", cidr, 8080));
    let mut ring = enforcer.take_events().expect("events");

    sb.expect_verdicts(PROBE, &[ok.addr()], &[wrong_port.addr(), wrong_addr.addr()]);

    assert_eq!(ok.accepted(), 1, "the allowed server saw the connection");
    assert_eq!(
        wrong_port.accepted(),
        0,
        "a denied connection never reached the server"
    );
    assert_eq!(
        wrong_addr.accepted(),
        0,
        "a denied connection never reached the server"
    );

    let c = counters(&enforcer);
    assert_eq!(c["net-a"], counted(1, 0, 0));
    assert_eq!(c[NO_RULE_NAME], counted(0, 2, 0));
    assert_eq!(c[BYPASS_NAME], RuleCounters::default());

    let events = drain(&mut enforcer, &mut ring);
    let dests: Vec<SocketAddr> = events.iter().map(|e| e.destination).collect();
    assert_eq!(
        dests,
        vec![wrong_port.addr(), wrong_addr.addr()],
        "one event per denial: {events:#?}"
    );
    for e in &events {
        assert_eq!(e.verdict, Verdict::Deny);
        assert_eq!(e.rule, NO_RULE_NAME);
        assert_eq!(e.comm, "egress-probe");
        assert_eq!(e.cgroup_id, sb.cgroup_id());
        assert_eq!(e.generation, enforcer.generation());
        assert_eq!(e.via, egress_user::events::Via::Direct);
        assert!(e.pid > 0);
    }
    assert_eq!(
        enforcer.stats().expect("stats"),
        egress_common::Stats::default()
    );
}

#[test]
fn ipv4_rule_allows_exactly_its_cidr_and_port() {
    rule_allows_exactly_its_cidr_and_port("192.0.2.0/24", V4_A.into(), V4_B.into());
}

#[test]
fn ipv6_rule_allows_exactly_its_cidr_and_port() {
    rule_allows_exactly_its_cidr_and_port("2001:db8::/64", V6_A.into(), V6_B.into());
}

#[test]
fn single_address_rules_match_only_that_address() {
    rule_allows_exactly_its_cidr_and_port("192.0.2.1", V4_A.into(), V4_B.into());
    rule_allows_exactly_its_cidr_and_port("2001:db8::1", V6_A.into(), V6_B.into());
}

/// Dual-stack sockets send IPv4 destinations through connect6 as ::ffff:a.b.c.d; they must be
/// judged by the IPv4 rules, both ways.
#[test]
fn v4_mapped_destinations_follow_the_ipv4_rules() {
    let sb = Sandbox::new();
    let ok = sb.sink(sa(V4_A, 8080));
    let denied = sb.sink(sa(V4_B, 8080));
    let yaml = rule_yaml("v4-a", "192.0.2.0/24", 8080) + &rule_yaml("v6-all", "::/0", 8080);
    let mut enforcer = enforce(&sb, &yaml);
    let mut ring = enforcer.take_events().expect("events");

    // An IPv6 rule for ::/0 does not open IPv4 through the mapped form.
    sb.expect_verdicts(PROBE, &[mapped(V4_A, 8080)], &[mapped(V4_B, 8080)]);
    assert_accepted(&[(&ok, 1), (&denied, 0)]);

    let c = counters(&enforcer);
    assert_eq!(c["v4-a"], counted(1, 0, 0));
    assert_eq!(c["v6-all"], RuleCounters::default());
    let events = drain(&mut enforcer, &mut ring);
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(
        events[0].destination,
        sa(V4_B, 8080),
        "reported as the IPv4 address it is"
    );
    assert_eq!(events[0].via, egress_user::events::Via::V4Mapped);
    assert_eq!(events[0].verdict, Verdict::Deny);
}

/// IPv4 rules never open IPv6: `0.0.0.0/0` allows every IPv4 destination on its port (also
/// in the mapped form) and no IPv6 one.
#[test]
fn an_ipv4_wildcard_never_opens_ipv6() {
    let sb = Sandbox::new();
    let v4 = sb.sink(sa(V4_A, 8080));
    let v6 = sb.sink(sa(V6_A, 8080));
    let mut enforcer = enforce(&sb, &rule_yaml("any-v4", "0.0.0.0/0", 8080));
    let mut ring = enforcer.take_events().expect("events");

    sb.expect_verdicts(PROBE, &[v4.addr(), mapped(V4_A, 8080)], &[v6.addr()]);
    assert_eq!(v4.accepted(), 2);
    assert_eq!(v6.accepted(), 0, "the IPv6 server never saw a connection");

    assert_eq!(counters(&enforcer)["any-v4"], counted(2, 0, 0));
    let events = drain(&mut enforcer, &mut ring);
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(events[0].destination, sa(V6_A, 8080));
    assert_eq!(events[0].verdict, Verdict::Deny);
}

/// Under the policy `yaml`, connects to sinks at 127.0.0.1:7001 and [::1]:7002, to the
/// unspecified address of each family on the same ports (which the kernel sends to loopback),
/// and to a sink at `other`:7003: the loopback ones must get through when `loopback_bypassed`
/// and the other must not, or the other way round; the sinks count what got through, the
/// `(bypass)` row counts it too and the `(no rule)` row the denials.
fn loopback_and_one_other(yaml: &str, loopback_bypassed: bool, other: IpAddr) {
    let sb = Sandbox::new();
    let lo4 = sb.sink(sa(Ipv4Addr::LOCALHOST, 7001));
    let lo6 = sb.sink(sa(Ipv6Addr::LOCALHOST, 7002));
    let other = sb.sink(sa(other, 7003));
    let enforcer = enforce(&sb, yaml);

    let loopback = vec![
        lo4.addr(),
        sa(Ipv4Addr::UNSPECIFIED, 7001),
        lo6.addr(),
        sa(Ipv6Addr::UNSPECIFIED, 7002),
    ];
    let (through, denied) = if loopback_bypassed {
        (loopback, vec![other.addr()])
    } else {
        (vec![other.addr()], loopback)
    };
    sb.expect_verdicts(PROBE, &through, &denied);
    let (each_loopback, elsewhere) = if loopback_bypassed { (2, 0) } else { (0, 1) };
    assert_eq!(lo4.accepted(), each_loopback);
    assert_eq!(lo6.accepted(), each_loopback);
    assert_eq!(other.accepted(), elsewhere);
    let c = counters(&enforcer);
    assert_eq!(c[BYPASS_NAME], counted(through.len() as u64, 0, 0), "{c:?}");
    assert_eq!(c[NO_RULE_NAME].denied, denied.len() as u64, "{c:?}");
}

#[test]
fn default_bypass_is_loopback_and_unspecified_counts_as_loopback() {
    let yaml = "kind: EgressConfig\nspec:\n  mode: enforce\n";
    loopback_and_one_other(yaml, true, V4_A.into());
}

#[test]
fn explicit_bypass_replaces_the_default_so_loopback_is_filtered() {
    let yaml = "kind: EgressConfig\nspec:\n  bypass: [198.51.100.0/24]\n";
    loopback_and_one_other(yaml, false, V4_B.into());

    // `bypass: []` filters loopback too.
    let sb = Sandbox::new();
    let lo4 = sb.sink(sa(Ipv4Addr::LOCALHOST, 7001));
    let _enforcer = enforce(&sb, "kind: EgressConfig\nspec:\n  bypass: []\n");
    assert_eq!(sb.connect(PROBE, lo4.addr()), Outcome::Denied);
    assert_eq!(lo4.accepted(), 0);
}

/// The kernel asks the rule trie first and the bypass ranges only when no rule allows the
/// destination: a loopback destination that a rule allows is counted on that rule, one on an
/// HTTP egress port still goes where the app sent it (never to the proxy), and one no key
/// matches is still a bypass. Counted at the sinks: with no proxy listening, a redirect would
/// have been refused, as the same port on another address is.
#[test]
fn a_rule_counts_what_it_allows_in_a_bypass_range_and_redirect_ports_stay_bypassed() {
    let sb = Sandbox::new();
    let ruled = sb.sink(sa(Ipv4Addr::LOCALHOST, 7001));
    let http_lo4 = sb.sink(sa(Ipv4Addr::LOCALHOST, 7002));
    let http_lo6 = sb.sink(sa(Ipv6Addr::LOCALHOST, 7002));
    let http_elsewhere = sb.sink(sa(V4_A, 7002));
    let unruled = sb.sink(sa(Ipv4Addr::LOCALHOST, 7003));
    let yaml = rule_yaml("loopback-7001", "127.0.0.1", 7001)
        + "---\nkind: EgressRule\nmetadata: {name: web}\nspec:\n  destination: {service: web.test}\n  \
           ports: [{port: 7002, protocol: http}]\n";
    let enforcer = enforce(&sb, &yaml);

    sb.expect_verdicts(
        PROBE,
        &[
            ruled.addr(),
            http_lo4.addr(),
            http_lo6.addr(),
            unruled.addr(),
        ],
        &[http_elsewhere.addr()],
    );
    assert_eq!(ruled.accepted(), 1);
    assert_eq!(
        http_lo4.accepted(),
        1,
        "a loopback HTTP port is not redirected"
    );
    assert_eq!(
        http_lo6.accepted(),
        1,
        "a loopback HTTP port is not redirected"
    );
    assert_eq!(unruled.accepted(), 1);
    assert_eq!(http_elsewhere.accepted(), 0);
    let c = counters(&enforcer);
    assert_eq!(c["loopback-7001"], counted(1, 0, 0), "{c:?}");
    assert_eq!(c[BYPASS_NAME], counted(3, 0, 0), "{c:?}");
    // The redirect refused: nobody listens on the proxy's port.
    assert_eq!(c[PROXY_NAME], counted(0, 1, 0), "{c:?}");
}

#[test]
fn audit_mode_lets_through_and_records_a_would_deny() {
    let sb = Sandbox::new();
    let ruled = sb.sink(sa(V4_A, 8080));
    let unruled = sb.sink(sa(V6_A, 8080));
    let yaml = "kind: EgressConfig\nspec:\n  mode: audit\n---\n".to_owned()
        + &rule_yaml("a", "192.0.2.0/24", 8080);
    let p = policy(&yaml);
    assert_eq!(p.mode, Mode::Audit);
    let mut enforcer = pipeline::apply(&sb.target(), &p).expect("apply");
    let mut ring = enforcer.take_events().expect("events");

    sb.expect_verdicts(PROBE, &[ruled.addr(), unruled.addr()], &[]);
    assert_eq!(ruled.accepted(), 1);
    assert_eq!(unruled.accepted(), 1, "audit mode does not block");
    let c = counters(&enforcer);
    assert_eq!(c["a"], counted(1, 0, 0));
    assert_eq!(c[NO_RULE_NAME], counted(0, 0, 1));
    let events = drain(&mut enforcer, &mut ring);
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(events[0].verdict, Verdict::WouldDeny);
    assert_eq!(events[0].destination, unruled.addr());
}

#[test]
fn processes_outside_the_cgroup_are_not_filtered() {
    let sb = Sandbox::new();
    let server = sb.sink(sa(V4_A, 8080));
    let enforcer = enforce(&sb, "kind: EgressConfig\nspec:\n  mode: enforce\n");
    assert_eq!(sb.connect_outside(PROBE, server.addr()), Outcome::Connected);
    assert_eq!(sb.connect(PROBE, server.addr()), Outcome::Denied);
    assert_eq!(
        server.accepted(),
        1,
        "only the process outside the cgroup got through"
    );
    let c = counters(&enforcer);
    assert_eq!(
        c[NO_RULE_NAME].denied, 1,
        "the outside process was never judged"
    );
}

/// A reload is a new generation swapped in place: the new rules apply at once, counters of
/// rules that stay are kept, and the generation in events moves on.
#[test]
fn a_second_apply_swaps_the_policy_in_place_and_keeps_counters() {
    let sb = Sandbox::new();
    let [a, b] = sb.sinks(V4_A, [8080, 9090]);
    let keep = rule_yaml("keep", "192.0.2.0/24", 8080);
    let first = enforce(
        &sb,
        &(keep.clone() + &rule_yaml("old", "192.0.2.0/24", 7000)),
    );
    sb.expect_verdicts(PROBE, &[a.addr()], &[b.addr()]);
    let g1 = first.generation();
    drop(first);

    let mut second = enforce(&sb, &(keep + &rule_yaml("new", "192.0.2.0/24", 9090)));
    assert_eq!(second.generation(), g1 + 1);
    let mut ring = second.take_events().expect("events");
    sb.expect_verdicts(PROBE, &[b.addr()], &[sa(V4_A, 7000)]);
    assert_accepted(&[(&a, 1), (&b, 1)]);
    let c = counters(&second);
    assert_eq!(
        c["keep"],
        counted(1, 0, 0),
        "a rule that stays keeps its counters"
    );
    assert_eq!(c["new"], counted(1, 0, 0));
    assert!(!c.contains_key("old"));
    let events = drain(&mut second, &mut ring);
    let deny: Vec<_> = events
        .iter()
        .filter(|e| e.verdict == Verdict::Deny)
        .collect();
    assert_eq!(
        deny.last().map(|e| e.generation),
        Some(g1 + 1),
        "{events:#?}"
    );
}

/// 100,000 CIDR rules load and judge correctly: the lookup is one LPM trie walk, not a scan.
#[test]
fn one_hundred_thousand_rules_load_and_work() {
    let sb = Sandbox::new();
    sb.add_addr("198.18.1.2/32");
    sb.add_addr("198.19.255.1/32");
    let first = u32::from(Ipv4Addr::new(198, 18, 0, 0));
    let rules: Vec<_> = (0..100_000u32)
        .map(|i| Rule {
            scope: None,
            name: format!("r{i}"),
            origin: Origin {
                file: "gen.yaml".into(),
                line: 1,
            },
            destination: ipnet::Ipv4Net::new(Ipv4Addr::from(first + i), 32)
                .expect("/32")
                .into(),
            ports: vec![PortRule::tcp(8080)],
        })
        .map(std::sync::Arc::new)
        .collect();
    let p = Policy {
        mode: Mode::Enforce,
        bypass: policy::default_bypass(),
        rules,
        ..Policy::default()
    };
    let ok = sb.sink(sa(Ipv4Addr::new(198, 18, 1, 2), 8080));
    let denied = sb.sink(sa(Ipv4Addr::new(198, 19, 255, 1), 8080));
    let started = Instant::now();
    let enforcer = pipeline::apply(&sb.target(), &p).expect("apply 100k rules");
    eprintln!("100k rules applied in {:?}", started.elapsed());
    sb.expect_verdicts(PROBE, &[ok.addr()], &[denied.addr()]);
    assert_accepted(&[(&ok, 1), (&denied, 0)]);
    let c = counters(&enforcer);
    assert_eq!(c.len(), 100_003);
    assert_eq!(c["r258"], counted(1, 0, 0), "198.18.1.2 is rule 258");
}

/// The maps are BTF-defined and pinned, so `bpftool map dump pinned` shows named fields: what
/// an operator reads on a node.
#[test]
fn bpftool_shows_the_pinned_maps_with_field_names() {
    let sb = Sandbox::new();
    let server = sb.sink(sa(V4_A, 443));
    let _enforcer = enforce(&sb, &rule_yaml("web", "192.0.2.0/24", 443));
    assert_eq!(sb.connect(PROBE, server.addr()), Outcome::Connected);
    let dump = |map: &str| {
        let out = std::process::Command::new("bpftool")
            .args(["map", "dump", "pinned"])
            .arg(sb.pin_dir.join(map))
            .output()
            .expect("running bpftool (cargo xtask setup installs it)");
        assert!(out.status.success(), "bpftool map dump {map}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let rules = dump("RULES_V4");
    // 443 in network byte order, read back as a little-endian u16: 0xbb01.
    for needle in [
        "\"prefix_len\": 56",
        "\"port\": 47873",
        "\"proto\": 6",
        "\"addr\": [192,0,2,0",
        "\"row\": 3",
    ] {
        assert!(
            rules.contains(needle),
            "{needle} missing from RULES_V4:\n{rules}"
        );
    }
    let config = dump("CONFIG");
    assert!(
        config.contains("\"mode\": 0") && config.contains("\"generation\": 1"),
        "{config}"
    );
    let counters = dump("COUNTERS");
    assert!(counters.contains("\"allowed\": 1"), "{counters}");
    for map in ["RULES_V6", "BYPASS_V4", "BYPASS_V6", "RULE_INFO", "STATS"] {
        assert!(sb.pin_dir.join(map).exists(), "{map} is pinned");
    }
    assert!(
        sb.pin_dir.join("links/connect4").exists() && sb.pin_dir.join("links/connect6").exists()
    );
}

/// NAT64 (`64:ff9b::a.b.c.d`) and 6to4 (`2002:AABB:CCDD::/48`) destinations carry an IPv4
/// address: they are judged by the IPv4 rules, and an IPv6 rule, even `::/0`, never opens IPv4
/// through a translator. The translated addresses are assigned inside the sandbox, so the
/// sinks count what got through.
#[test]
fn nat64_and_6to4_destinations_are_judged_by_their_ipv4_address() {
    let sb = Sandbox::new();
    let nat64 = |v4: Ipv4Addr| -> Ipv6Addr {
        let [a, b, c, d] = v4.octets();
        Ipv6Addr::new(
            0x64,
            0xff9b,
            0,
            0,
            0,
            0,
            u16::from_be_bytes([a, b]),
            u16::from_be_bytes([c, d]),
        )
    };
    let six_to_four = |v4: Ipv4Addr| -> Ipv6Addr {
        let [a, b, c, d] = v4.octets();
        Ipv6Addr::new(
            0x2002,
            u16::from_be_bytes([a, b]),
            u16::from_be_bytes([c, d]),
            0,
            0,
            0,
            0,
            1,
        )
    };
    let targets = [
        (nat64(V4_A), true, events::Via::Nat64),
        (nat64(V4_B), false, events::Via::Nat64),
        (six_to_four(V4_A), true, events::Via::SixToFour),
        (six_to_four(V4_B), false, events::Via::SixToFour),
    ];
    for (ip, _, _) in &targets {
        sb.add_addr(&format!("{ip}/128"));
    }
    let sinks: Vec<_> = targets
        .iter()
        .map(|(ip, _, _)| sb.sink(sa(*ip, 7000)))
        .collect();
    // The IPv4 rule allows V4_A only; the IPv6 rule allows every IPv6 address on the port.
    let yaml = rule_yaml("v4-a", "192.0.2.1", 7000) + &rule_yaml("all-v6", "::/0", 7000);
    let mut enforcer = enforce(&sb, &yaml);
    let mut ring = enforcer.take_events().expect("events");

    for ((ip, allow, _), sink) in targets.iter().zip(&sinks) {
        let expected = if *allow {
            Outcome::Connected
        } else {
            Outcome::Denied
        };
        assert_eq!(sb.connect(PROBE, sink.addr()), expected, "connect to {ip}");
        assert_eq!(sink.accepted(), usize::from(*allow), "sink at {ip}");
    }

    let c = counters(&enforcer);
    assert_eq!(
        c["v4-a"],
        counted(2, 0, 0),
        "judged by the IPv4 rule: {c:?}"
    );
    assert_eq!(
        c["all-v6"],
        RuleCounters::default(),
        "never by the IPv6 rule"
    );
    assert_eq!(c[NO_RULE_NAME].denied, 2);

    let events = drain(&mut enforcer, &mut ring);
    let seen: Vec<(SocketAddr, events::Via)> =
        events.iter().map(|e| (e.destination, e.via)).collect();
    assert_eq!(
        seen,
        vec![
            (sa(V4_B, 7000), events::Via::Nat64),
            (sa(V4_B, 7000), events::Via::SixToFour)
        ],
        "denials name the embedded IPv4 address and how it was written: {events:#?}"
    );
}

/// `endPort`: a range allows its ports, both ends included, and not one port past either end:
/// TCP at connect(), UDP at sendto(), over IPv4 and IPv6, counted at the sinks (the ports past
/// the ends never see anything) and on the rules' counters.
#[test]
fn port_ranges_allow_both_ends_and_nothing_past_them() {
    use egress_tests::{Attempted, Vector, vector::attempt, vector_bin};
    let sb = Sandbox::new();
    let range = |name: &str, net: &str| {
        format!(
            "kind: EgressRule\nmetadata: {{name: {name}}}\nspec:\n  destination: {{service: \
             \"{net}\"}}\n  ports:\n  - {{port: 8000, endPort: 8002, protocol: tcp}}\n  - {{port: \
             5000, endPort: 5001, protocol: udp}}\n---\n"
        )
    };
    let yaml = range("range4", "192.0.2.0/24") + &range("range6", "2001:db8::/64");
    let mut enforcer = enforce(&sb, &yaml);
    let mut ring = enforcer.take_events().expect("events");
    let mut denied = Vec::new();
    for (ip, name) in [
        (IpAddr::from(V4_A), "range4"),
        (IpAddr::from(V6_A), "range6"),
    ] {
        denied.extend([7999, 8003, 4999, 5002].map(|p| sa(ip, p)));
        let [below, first, last, above] = [7999, 8000, 8002, 8003].map(|p| sb.sink(sa(ip, p)));
        sb.expect_verdicts(
            PROBE,
            &[first.addr(), last.addr()],
            &[below.addr(), above.addr()],
        );
        assert_accepted(&[(&below, 0), (&first, 1), (&last, 1), (&above, 0)]);

        let udp = [4999, 5000, 5001, 5002].map(|p| sb.udp_sink(sa(ip, p)));
        let sent = udp.each_ref().map(|sink| {
            attempt(
                vector_bin!(),
                &sb.name,
                Some(&sb.cgroup),
                Vector::UdpSendto,
                sink.addr(),
                std::time::Duration::from_secs(3),
            )
        });
        assert!(sent[0].failed_with("send", libc::EPERM), "{:?}", sent[0]);
        assert_eq!(sent[1], Attempted::Ok);
        assert_eq!(sent[2], Attempted::Ok);
        assert!(sent[3].failed_with("send", libc::EPERM), "{:?}", sent[3]);
        let timeout = std::time::Duration::from_secs(3);
        assert_eq!(udp[1].wait_for(1, timeout), 1, "5000/udp got the datagram");
        assert_eq!(udp[2].wait_for(1, timeout), 1, "5001/udp got the datagram");
        assert_eq!(
            udp[0].count() + udp[3].count(),
            0,
            "a denied datagram arrived"
        );

        let c = counters(&enforcer);
        assert_eq!(c[name], counted(4, 0, 0), "{name}");
    }
    // Two TCP and two UDP denials per family, each an event naming the port past the end.
    assert_eq!(counters(&enforcer)[NO_RULE_NAME], counted(0, 8, 0));
    let events = drain(&mut enforcer, &mut ring);
    let seen: Vec<SocketAddr> = events.iter().map(|e| e.destination).collect();
    assert_eq!(seen, denied, "{events:#?}");
    assert!(events.iter().all(|e| e.verdict == Verdict::Deny));
}
