//! The bypass matrix: every way out that `egress-vector` knows ({TCP connect, TCP Fast Open,
//! io_uring connect, connected UDP, unconnected UDP sendto, raw UDP, raw TCP SYN} x {IPv4,
//! IPv6, v4-mapped IPv6}), from inside the managed cgroup, against a destination the policy
//! allows and one it does not. Counted at the sinks (each case has its own), then in the
//! per-rule and per-hook counters and in the events.
//!
//! The table of docs/coverage.md is this matrix in words.

use std::collections::HashMap;

use egress_common::RuleCounters;
use egress_tests::{
    Sandbox, V4_A, V4_B, V6_A, V6_B, Vector,
    matrix::{Expect, Matrix, cases_rule},
    vector_bin,
};
use egress_user::{
    compile::NO_RULE_NAME,
    events::{self, Hook, Verdict},
    pipeline,
};

const VECTOR: &str = vector_bin!();
const BASE_PORT: u16 = 24000;
const EPERM: i32 = libc::EPERM;

/// An EgressRule allowing `service` on every case port, over tcp and udp.
fn rule(name: &str, service: &str) -> String {
    cases_rule(name, service, BASE_PORT)
}

fn by_name(rows: Vec<egress_user::loader::RowCount>) -> HashMap<String, RuleCounters> {
    rows.into_iter().map(|r| (r.name, r.counters)).collect()
}

fn counts(allowed: u64, denied: u64) -> RuleCounters {
    RuleCounters {
        allowed,
        denied,
        would_deny: 0,
    }
}

#[test]
fn every_vector_is_judged_allowed_and_denied_over_every_family() {
    let sb = Sandbox::new();
    let yaml = rule("v4-a", "192.0.2.1") + &rule("v6-a", "2001:db8::1");
    let policy = egress_tests::policy::load(&yaml);
    let mut enforcer = pipeline::apply(&sb.target(), &policy).expect("apply");
    let mut ring = enforcer.take_events().expect("events");
    let matrix = Matrix::new(VECTOR, &sb.name, Some(sb.cgroup.as_path()), &sb.name);

    // Allowed destinations: TCP and UDP get through whatever the API; a raw socket is refused
    // at socket(), before it could send anything anywhere.
    let failures = matrix.run(
        (V4_A, V6_A),
        (V4_A.into(), V6_A.into()),
        BASE_PORT,
        |vector, _| match vector {
            Vector::RawUdp | Vector::RawSyn => Expect::Fails("socket", EPERM),
            _ => Expect::Arrives,
        },
    );
    assert!(
        failures.is_empty(),
        "allowed destinations:\n{}",
        failures.join("\n")
    );

    // Denied destinations (same ports, addresses no rule names): every vector fails with
    // EPERM at the call the kernel judged, and no sink sees anything.
    let failures = matrix.run(
        (V4_B, V6_B),
        (V4_B.into(), V6_B.into()),
        BASE_PORT,
        |vector, _| match vector {
            Vector::Tcp | Vector::Uring | Vector::UdpConnected => Expect::Fails("connect", EPERM),
            // sendto() is the call that connects (TFO) or names the destination (UDP).
            Vector::Tfo | Vector::UdpSendto => Expect::Fails("send", EPERM),
            Vector::RawUdp | Vector::RawSyn => Expect::Fails("socket", EPERM),
            other => unreachable!("{other} is not in Vector::ALL"),
        },
    );
    assert!(
        failures.is_empty(),
        "denied destinations:\n{}",
        failures.join("\n")
    );

    // 5 vectors get through per family: IPv4 and v4-mapped on the IPv4 rule, IPv6 on its own.
    let rules = by_name(enforcer.counters().expect("counters"));
    // A v4-mapped sendto() on an AF_INET6 UDP socket meets two sendmsg hooks on its way
    // (the kernel's IPv6 and IPv4 paths): both judge it by the IPv4 rule, so an allowed one
    // is counted twice, and a denied one stops at the first.
    assert_eq!(rules["v4-a"], counts(10 + 1, 0), "{rules:?}");
    assert_eq!(rules["v6-a"], counts(5, 0), "{rules:?}");
    // Denied: 5 vectors x 3 families at the socket hooks, and 2 raw vectors x 3 families x 2
    // destinations at sock_create.
    assert_eq!(rules[NO_RULE_NAME], counts(0, 15 + 12), "{rules:?}");

    // Which hook judged what: connect4/6 took tcp, tfo, uring and connected UDP; sendmsg4/6
    // took sendto; sock_create refused the raw sockets; XDP saw nothing (not attached).
    let hooks = by_name(enforcer.hooks().expect("hooks"));
    assert_eq!(hooks["connect"], counts(12, 12), "{hooks:?}");
    assert_eq!(hooks["sendmsg"], counts(3 + 1, 3), "{hooks:?}");
    assert_eq!(hooks["sock_create"], counts(0, 12), "{hooks:?}");
    assert_eq!(hooks["xdp"], counts(0, 0), "{hooks:?}");

    // One event per denial, naming the hook, protocol and destination.
    let events = events::drain(&mut ring, |_, row| {
        enforcer.row_name(row).map(str::to_owned)
    });
    assert_eq!(events.len(), 27, "{events:#?}");
    let mut by_hook: HashMap<(Hook, u16), usize> = HashMap::new();
    for e in &events {
        assert_eq!(e.verdict, Verdict::Deny, "{e:?}");
        assert_eq!(e.rule, NO_RULE_NAME, "{e:?}");
        assert_eq!(e.comm, "egress-vector", "{e:?}");
        assert_eq!(e.cgroup_id, sb.cgroup_id(), "{e:?}");
        *by_hook.entry((e.hook, e.protocol)).or_default() += 1;
        match e.hook {
            Hook::SockCreate => assert!(e.raw, "{e:?}"),
            _ => {
                assert!(!e.raw, "{e:?}");
                let ip = e.destination.ip();
                assert!(ip == V4_B || ip == V6_B, "denied destination {ip}: {e:?}");
            }
        }
    }
    let expected: HashMap<(Hook, u16), usize> = [
        ((Hook::Connect, 6), 9),
        ((Hook::Connect, 17), 3),
        ((Hook::Sendmsg, 17), 3),
        ((Hook::SockCreate, 17), 6),
        ((Hook::SockCreate, 6), 6),
    ]
    .into_iter()
    .collect();
    assert_eq!(by_hook, expected);
    let mapped = events
        .iter()
        .filter(|e| e.via == events::Via::V4Mapped)
        .count();
    assert_eq!(
        mapped, 5,
        "one v4-mapped denial per socket-hook vector: {events:#?}"
    );
    assert_eq!(
        enforcer.stats().expect("stats"),
        egress_common::Stats::default()
    );
}
