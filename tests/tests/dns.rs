//! DNS through a running agent (`egress run --resolv-conf FILE`): the resolvers of the
//! resolv.conf, or of the EgressConfig's `dns.resolvers`, may be queried on 53/udp and
//! 53/tcp (the implicit `(dns)` rule), and DNS anywhere else is denied unless a rule allows
//! it. Every query is one of `egress-vector`'s `udp-sendto`, `udp-connected` and `tcp`, from
//! the managed cgroup, counted at UDP and TCP sinks on port 53 of each server address, then in
//! `egress status -o json`.

use std::{
    fs,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use egress_tests::{
    Agent, Attempted, Sandbox, Sink, UdpSink, V4_B, V4_C, Vector, egress_bin, find_row, sa,
    status_row, vector::attempt, vector_bin,
};

const EGRESS: &str = egress_bin!();
const VECTOR: &str = vector_bin!();
const TIMEOUT: Duration = Duration::from_secs(3);
const EPERM: i32 = libc::EPERM;

/// The resolver of the first resolv.conf, added to the sandbox as a /32.
const RESOLVER: &str = "192.0.2.53";
/// An IPv6 resolver, added to the sandbox as a /128.
const RESOLVER6: &str = "2001:db8::53";

/// The three ways a query leaves: (vector, the stage a denial fails at).
const QUERIES: [(Vector, &str); 3] = [
    (Vector::UdpSendto, "send"),
    (Vector::UdpConnected, "connect"),
    (Vector::Tcp, "connect"),
];

/// A DNS server address: a UDP and a TCP sink on its port 53.
struct Server {
    ip: IpAddr,
    udp: UdpSink,
    tcp: Sink,
}

impl Server {
    fn start(sb: &Sandbox, ip: IpAddr) -> Self {
        Self {
            ip,
            udp: sb.udp_sink(sa(ip, 53)),
            tcp: sb.sink(sa(ip, 53)),
        }
    }

    fn addr(&self) -> SocketAddr {
        sa(self.ip, 53)
    }

    /// (datagrams, connections) received so far.
    fn seen(&self) -> (usize, usize) {
        (self.udp.count(), self.tcp.accepted())
    }
}

/// One query of kind `vector` to `addr` from the managed cgroup.
fn query(sb: &Sandbox, vector: Vector, addr: SocketAddr) -> Attempted {
    attempt(VECTOR, &sb.name, Some(&sb.cgroup), vector, addr, TIMEOUT)
}

/// Every query to `server` from the managed cgroup gets through, and arrives.
fn allowed(sb: &Sandbox, server: &Server) {
    let before = server.seen();
    for (vector, _) in QUERIES {
        let got = query(sb, vector, server.addr());
        assert_eq!(got, Attempted::Ok, "{vector} to {}", server.addr());
    }
    assert_eq!(
        server.seen(),
        (before.0 + 2, before.1 + 1),
        "(datagrams, connections) at {}",
        server.addr()
    );
}

/// Every query to `server` from the managed cgroup fails with EPERM, and nothing arrives.
fn denied(sb: &Sandbox, server: &Server) {
    let before = server.seen();
    for (vector, stage) in QUERIES {
        let got = query(sb, vector, server.addr());
        assert!(
            got.failed_with(stage, EPERM),
            "{vector} to {}: {got:?}, wanted EPERM at {stage}",
            server.addr()
        );
    }
    assert_eq!(
        server.seen(),
        before,
        "(datagrams, connections) at {}",
        server.addr()
    );
}

/// Every query to each of `allowed` gets through and arrives; every one to each of `denied`
/// fails with EPERM and nothing arrives.
fn expect_dns(sb: &Sandbox, allowed: &[&Server], denied: &[&Server]) {
    for server in allowed {
        self::allowed(sb, server);
    }
    for server in denied {
        self::denied(sb, server);
    }
}

/// `egress status -o json`, parsed.
fn status(sb: &Sandbox) -> serde_json::Value {
    sb.status_json(EGRESS)
}

/// The row named `name`, if the status has one.
fn row<'a>(status: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    find_row(status, "rules", name)
}

/// (allowed, denied) of the row named `name`; panics with the status when there is none.
fn counted(status: &serde_json::Value, name: &str) -> (u64, u64) {
    let r = status_row(status, name);
    (
        r["allowed"].as_u64().expect("allowed"),
        r["denied"].as_u64().expect("denied"),
    )
}

/// The (hook, protocol) of the agent's deny events (`egress events -o json`), sorted, once
/// there are `n` (the agent reads the ring buffer on its own time); each must be a query to
/// 198.51.100.1:53 by `egress-vector` from the sandbox's cgroup, on `(no rule)`.
fn deny_events(sb: &Sandbox, n: usize) -> Vec<(String, String)> {
    let mut events = Vec::new();
    let is_deny = |e: &&serde_json::Value| e["verdict"] == "deny";
    egress_tests::eventually(Duration::from_secs(5), || {
        events = sb.events_json(EGRESS);
        events.iter().filter(is_deny).count() >= n
    });
    let denials: Vec<&serde_json::Value> = events.iter().filter(is_deny).collect();
    assert_eq!(denials.len(), n, "{events:#?}");
    let mut got: Vec<(String, String)> = denials
        .iter()
        .map(|e| {
            assert_eq!(e["destination"], "198.51.100.1:53", "{e}");
            assert_eq!(e["rule"], "(no rule)", "{e}");
            assert_eq!(e["comm"], "egress-vector", "{e}");
            assert_eq!(e["cgroup_id"], sb.cgroup_id(), "{e}");
            (
                e["source"].as_str().expect("source").to_owned(),
                e["protocol"].as_str().expect("protocol").to_owned(),
            )
        })
        .collect();
    got.sort();
    got
}

/// `egress reload`, which must succeed.
fn reload(sb: &Sandbox, agent: &Agent) {
    let (ok, out, err) = sb.ctl(EGRESS, &["reload"]);
    assert!(
        ok.success(),
        "egress reload: {out}{err}\nagent log:\n{}",
        agent.log()
    );
}

/// A policy that says nothing about port 53: one unrelated rule.
const UNRELATED: &str = "kind: EgressRule\nmetadata:\n  name: web\nspec:\n  destination:\n    service: 203.0.113.0/24\n  ports:\n    - port: 443\n      protocol: tcp\n";

/// A sandbox with a nameserver: its resolv.conf names `resolver`, and DNS servers listen at
/// the resolver and at `other`.
struct Resolving {
    sb: Sandbox,
    resolv: PathBuf,
    policy: PathBuf,
    resolver: Server,
    other: Server,
    agent: Agent,
}

impl Resolving {
    /// Puts `resolver` on the sandbox's interface as a /`bits`, writes a resolv.conf naming it
    /// and the policy `yaml`, starts the two servers, and starts the agent on the policy with
    /// `--resolv-conf` and no watch of the policy files, so that only `egress reload` reloads.
    fn start(resolver: &str, bits: u8, yaml: &str, other: IpAddr) -> Self {
        let sb = Sandbox::new();
        sb.add_addr(&format!("{resolver}/{bits}"));
        let resolv = sb.policy_file("resolv.conf", &format!("nameserver {resolver}\n"));
        let policy = sb.policy_file("policy.yaml", yaml);
        let resolver = Server::start(&sb, resolver.parse().expect("ip"));
        let other = Server::start(&sb, other);
        let agent = sb
            .agent(EGRESS)
            .policy(
                &policy,
                &[
                    "--resolv-conf",
                    resolv.to_str().expect("utf-8 path"),
                    "--no-watch",
                ],
            )
            .start();
        Self {
            sb,
            resolv,
            policy,
            resolver,
            other,
            agent,
        }
    }

    /// [`Resolving::start`] on a policy that says nothing about port 53; then checks that
    /// every query to the resolver gets through and every one to `other` is denied, counted
    /// on `(dns)` and `(no rule)` in `egress status`, where `(dns)` names the resolver.
    fn only_the_resolver(resolver: &str, bits: u8, other: IpAddr) -> Self {
        let r = Self::start(resolver, bits, UNRELATED, other);
        expect_dns(&r.sb, &[&r.resolver], &[&r.other]);
        let s = status(&r.sb);
        let dns = status_row(&s, "(dns)");
        assert_eq!(dns["allows"], format!("{resolver} udp/53,tcp/53"), "{dns}");
        assert_eq!(counted(&s, "(dns)"), (3, 0));
        assert_eq!(counted(&s, "(no rule)"), (0, 3));
        r
    }
}

/// The nameserver of resolv.conf may be queried over udp (sendto and connected) and tcp; the
/// same queries to another address's port 53 are denied and never arrive; `egress status`
/// counts them on `(dns)` and `(no rule)`. A rewritten resolv.conf is in force from the next
/// `egress reload` on, not before.
#[test]
fn the_resolv_conf_nameserver_is_allowed_and_reread_at_reload() {
    let Resolving {
        sb,
        resolv,
        resolver: first,
        other,
        agent,
        ..
    } = Resolving::only_the_resolver(RESOLVER, 32, V4_B.into());
    let s = status(&sb);
    let dns = status_row(&s, "(dns)");
    assert_eq!(dns["source"], resolv.display().to_string(), "{dns}");
    assert_eq!(counted(&s, "web"), (0, 0));
    let denials = deny_events(&sb, 3);
    assert_eq!(
        denials,
        [
            ("connect".to_owned(), "tcp".to_owned()),
            ("connect".to_owned(), "udp".to_owned()),
            ("sendmsg".to_owned(), "udp".to_owned()),
        ]
    );

    // Rewritten, but not reloaded: the old resolver stays the one allowed.
    fs::write(&resolv, "nameserver 198.51.100.1\n").expect("rewriting resolv.conf");
    expect_dns(&sb, &[&first], &[&other]);

    reload(&sb, &agent);
    expect_dns(&sb, &[&other], &[&first]);
    let s = status(&sb);
    let dns = status_row(&s, "(dns)");
    assert_eq!(dns["allows"], "198.51.100.1 udp/53,tcp/53", "{dns}");
    assert_eq!(s["generation"], 2, "{s:#}");
    // The row is the same rule across the reload: its counters carry on.
    assert_eq!(counted(&s, "(dns)"), (9, 0));
    assert_eq!(counted(&s, "(no rule)"), (0, 9));
    drop(agent);
}

/// `dns.resolvers` in the EgressConfig overrides resolv.conf (which is then not read, even
/// when it changes), and `resolvers: []` allows no DNS at all.
#[test]
fn the_egress_config_resolvers_override_resolv_conf() {
    let Resolving {
        sb,
        resolv,
        policy,
        resolver: first,
        other: c,
        agent,
    } = Resolving::only_the_resolver(RESOLVER, 32, V4_C.into());
    let b = Server::start(&sb, V4_B.into());

    let config = |resolvers: &str| {
        format!(
            "{UNRELATED}---\nkind: EgressConfig\nmetadata: {{name: config}}\nspec:\n  dns:\n    resolvers: {resolvers}\n"
        )
    };
    fs::write(&policy, config("[203.0.113.1]")).expect("rewriting the policy");
    reload(&sb, &agent);
    expect_dns(&sb, &[&c], &[&first, &b]);
    let s = status(&sb);
    let dns = status_row(&s, "(dns)");
    assert_eq!(dns["allows"], "203.0.113.1 udp/53,tcp/53", "{dns}");
    // `dns:` is line 14 of the rewritten file.
    assert_eq!(dns["source"], format!("{}:14", policy.display()), "{dns}");

    // resolv.conf changes and is read at no reload while the EgressConfig names resolvers.
    fs::write(&resolv, "nameserver 198.51.100.1\n").expect("rewriting resolv.conf");
    reload(&sb, &agent);
    expect_dns(&sb, &[&c], &[&b, &first]);

    fs::write(&policy, config("[]")).expect("rewriting the policy");
    reload(&sb, &agent);
    expect_dns(&sb, &[], &[&first, &b, &c]);
    let s = status(&sb);
    assert!(
        row(&s, "(dns)").is_none(),
        "no resolvers, no (dns) row: {s:#}"
    );
    drop(agent);
}

/// A udp rule for port 53 allows DNS to its destination like any other udp traffic, with no
/// resolver at all; and a rule naming a resolver's exact address keeps that key, so its
/// queries count on the rule's row while the other protocol stays on `(dns)`.
#[test]
fn an_explicit_udp_rule_allows_dns_where_it_says() {
    let rule = |service: &str| {
        format!(
            "kind: EgressRule\nmetadata:\n  name: dns-rule\nspec:\n  destination:\n    service: {service}\n  ports:\n    - port: 53\n      protocol: udp\n"
        )
    };
    let yaml = format!(
        "{}---\nkind: EgressConfig\nmetadata: {{name: config}}\nspec:\n  dns:\n    resolvers: []\n",
        rule("198.51.100.0/24")
    );
    let Resolving {
        sb,
        policy,
        resolver: first,
        other: b,
        agent,
        ..
    } = Resolving::start(RESOLVER, 32, &yaml, V4_B.into());

    // udp to 198.51.100.1:53 by the rule; tcp there is not in it; the resolver of
    // resolv.conf is not one ([] in the config).
    let before = b.seen();
    for (vector, stage) in QUERIES {
        let got = query(&sb, vector, b.addr());
        if vector == Vector::Tcp {
            assert!(got.failed_with(stage, EPERM), "{vector}: {got:?}");
        } else {
            assert_eq!(got, Attempted::Ok, "{vector}");
        }
    }
    assert_eq!(b.seen(), (before.0 + 2, before.1));
    denied(&sb, &first);
    let s = status(&sb);
    assert_eq!(counted(&s, "dns-rule"), (2, 0));
    assert_eq!(counted(&s, "(no rule)"), (0, 4));
    assert!(row(&s, "(dns)").is_none(), "{s:#}");

    // The resolver from resolv.conf, and a rule for its exact address over udp.
    fs::write(&policy, rule(RESOLVER)).expect("rewriting the policy");
    reload(&sb, &agent);
    expect_dns(&sb, &[&first], &[&b]);
    let s = status(&sb);
    assert_eq!(counted(&s, "dns-rule"), (2 + 2, 0), "{s:#}");
    assert_eq!(counted(&s, "(dns)"), (1, 0), "{s:#}");
    drop(agent);
}

/// An IPv6 nameserver is allowed as an IPv4 one is; another IPv6 address's port 53 is not.
#[test]
fn an_ipv6_nameserver_is_allowed() {
    Resolving::only_the_resolver(RESOLVER6, 128, egress_tests::V6_B.into());
}
