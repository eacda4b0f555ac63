//! The rulesets: the egress policies, and the same allow-list for iptables and nft.

use std::{
    io::Write as _,
    net::Ipv4Addr,
    process::{Command, Stdio},
};

use egress_tests::V4_A;
use egress_user::policy::{Mode, Origin, Policy, PortRule, Rule, default_bypass};
use ipnet::{IpNet, Ipv4Net};

use crate::{PORT, PORTS, TARGET_RULE};

/// The networks of the generated rules: rule `i` gets the /29 slot `i` of 198.18.0.0/15 and a
/// prefix length of 29 to 32 inside it, so no two overlap.
pub fn network(i: usize) -> Ipv4Net {
    let base = u32::from(Ipv4Addr::new(198, 18, 0, 0)) + (i as u32) * 8;
    Ipv4Net::new(Ipv4Addr::from(base), 29 + (i % 4) as u8).expect("prefix <= 32")
}

/// A TCP rule named `name` from the generated line `i`.
pub fn rule(i: usize, name: String, destination: IpNet, ports: &[u16]) -> Rule {
    Rule {
        scope: None,
        name,
        origin: Origin {
            file: "<bench>".into(),
            line: i + 1,
        },
        destination,
        ports: ports.iter().map(|&port| PortRule::tcp(port)).collect(),
    }
}

/// `rules` rules of one port each: `rules - 1` generated ones and the target last.
pub fn policy_one_port(rules: usize) -> Policy {
    let mut list: Vec<Rule> = (0..rules - 1)
        .map(|i| {
            rule(
                i,
                format!("r{i}"),
                network(i).into(),
                &[PORTS[i % PORTS.len()]],
            )
        })
        .collect();
    list.push(rule(
        rules,
        TARGET_RULE.into(),
        Ipv4Net::new(V4_A, 32).expect("/32").into(),
        &[PORT],
    ));
    Policy {
        mode: Mode::Enforce,
        bypass: default_bypass(),
        rules: list.into_iter().map(std::sync::Arc::new).collect(),
        ..Policy::default()
    }
}

/// Rules of a policy above [`ONE_PORT_MAX`] keys: at most this many (a rule takes a counter
/// row, and there are 131,070), each a /32 in 198.18.0.0/15.
const WIDE_RULES_MAX: usize = 100_000;

/// The largest key count [`policy_one_port`] can write (a /29 slot each in 198.18.0.0/15).
pub const ONE_PORT_MAX: usize = 16_384;

/// A policy of exactly `keys` (network, port) keys, the target's last: up to
/// [`ONE_PORT_MAX`] keys, [`policy_one_port`]; above, up to 100,000 rules of /32s in
/// 198.18.0.0/15 with up to 10 ports each (1,000,000 keys: 100,000 rules of 10 ports; a rule
/// per key would exceed the counter rows, and the trie holds a million keys either way).
pub fn policy_keys(keys: usize) -> Policy {
    if keys <= ONE_PORT_MAX {
        return policy_one_port(keys);
    }
    let ports = keys.div_ceil(WIDE_RULES_MAX);
    assert!(
        ports <= PORTS.len() && keys.is_multiple_of(ports),
        "{keys} keys: at most {} ports per rule, and a whole number of rules",
        PORTS.len()
    );
    let rules = keys / ports;
    let ports_of = |i: usize| -> Vec<u16> {
        if ports == 1 {
            vec![PORTS[i % PORTS.len()]]
        } else {
            PORTS[..ports].to_vec()
        }
    };
    let mut list: Vec<Rule> = (0..rules - 1)
        .map(|i| {
            let addr = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + i as u32);
            rule(
                i,
                format!("r{i}"),
                Ipv4Net::new(addr, 32).expect("/32").into(),
                &ports_of(i),
            )
        })
        .collect();
    let mut target_ports = vec![PORT];
    target_ports.extend(PORTS.iter().copied().filter(|&p| p != PORT).take(ports - 1));
    list.push(rule(
        rules,
        TARGET_RULE.into(),
        Ipv4Net::new(V4_A, 32).expect("/32").into(),
        &target_ports,
    ));
    Policy {
        mode: Mode::Enforce,
        bypass: default_bypass(),
        rules: list.into_iter().map(std::sync::Arc::new).collect(),
        ..Policy::default()
    }
}

/// (network, port) of every key of a policy, in policy order.
pub fn keys(policy: &Policy) -> impl Iterator<Item = (IpNet, u16)> + '_ {
    policy
        .rules
        .iter()
        .flat_map(|r| r.ports.iter().map(move |p| (r.destination, p.port)))
}

/// The allow-list as an iptables-restore file: non-SYN packets accepted first, then one rule
/// per key, then a TCP reset for any other new connection.
pub fn iptables_rules(policy: &Policy) -> String {
    let mut out =
        String::from("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n");
    out.push_str("-A OUTPUT -p tcp ! --syn -j ACCEPT\n");
    for (net, port) in keys(policy) {
        out.push_str(&format!(
            "-A OUTPUT -d {net} -p tcp --dport {port} -j ACCEPT\n"
        ));
    }
    out.push_str("-A OUTPUT -p tcp -j REJECT --reject-with tcp-reset\nCOMMIT\n");
    out
}

/// The allow-list as one nft rule over an interval set of `address . port`.
pub fn nft_rules(policy: &Policy) -> String {
    let elements: Vec<String> = keys(policy)
        .map(|(net, port)| format!("{net} . {port}"))
        .collect();
    format!(
        "table ip egress_bench {{\n\
         \tset allow {{\n\t\ttype ipv4_addr . inet_service\n\t\tflags interval\n\t\telements = {{ {} }}\n\t}}\n\
         \tchain output {{\n\t\ttype filter hook output priority filter; policy accept;\n\
         \t\ttcp flags & (fin | syn | rst | ack) != syn accept\n\
         \t\tip daddr . tcp dport @allow accept\n\
         \t\tmeta l4proto tcp reject with tcp reset\n\t}}\n}}\n",
        elements.join(",\n")
    )
}

/// Runs `ip netns exec <netns> <args>` with `input` on stdin; panics with its output on failure.
pub fn netns_exec(netns: &str, args: &[&str], input: &str) {
    let mut child = Command::new("ip")
        .args(["netns", "exec", netns])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "running {args:?}: {e} (`cargo xtask bench connect` installs iptables and nftables)"
            )
        });
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("writing the ruleset");
    let out = child
        .wait_with_output()
        .expect("waiting for the ruleset loader");
    assert!(
        out.status.success(),
        "{args:?} in netns {netns} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Namespaces with rules of their own in the scoped contender.
pub const SCOPES: usize = 10;

/// [`policy_keys`] with, besides its node-wide rules, [`SCOPES`] namespaces (`ns-0`...) of ten
/// rules each, on networks no other rule has (198.19.128.0/17): each namespace's scope then
/// holds every node-wide key too.
pub fn policy_scoped(keys: usize) -> Policy {
    let mut policy = policy_keys(keys);
    let base = u32::from(Ipv4Addr::new(198, 19, 128, 0));
    for ns in 0..SCOPES {
        for j in 0..10 {
            let i = ns * 10 + j;
            let net = Ipv4Net::new(Ipv4Addr::from(base + (i as u32) * 8), 29).expect("/29");
            let mut r = rule(i, format!("s{j}"), net.into(), &[PORT]);
            r.scope = Some(format!("ns-{ns}"));
            policy.rules.push(std::sync::Arc::new(r));
        }
    }
    policy
}
