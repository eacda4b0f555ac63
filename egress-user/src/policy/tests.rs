//! Policy loading tests: what valid documents mean, and for every kind of invalid input the
//! exact `FILE:LINE:` and the gist of the message.
//!
//! The tests of EgressRule documents with CIDR destinations and of the YAML layer are here;
//! host-name rules, Services and the EgressConfig have a submodule each.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use ipnet::IpNet;

use super::*;
use crate::testing::TempDir;

/// One rule, one field a line, so each test can break one field and know its line:
/// 1 kind, 2 metadata, 3 name, 4 spec, 5 destination, 6 service, 7 ports, 8 port, 9 protocol.
const RULE: &str = "\
kind: EgressRule
metadata:
  name: r1
spec:
  destination:
    service: 10.0.0.0/8
  ports:
    - port: 443
      protocol: tcp
";

/// The five documents of seed 003 (Istio's "Control Egress TCP Traffic" task), verbatim.
const SEED: &str = super::seeds::TCP;

/// `RULE` with the first `from` replaced by `to`.
fn rule_with(from: &str, to: &str) -> String {
    assert!(RULE.contains(from), "{from:?} is not in RULE");
    RULE.replacen(from, to, 1)
}

fn load(yaml: &str) -> Result<Policy, PolicyErrors> {
    load_sources(&[("p.yaml".to_owned(), yaml.as_bytes().to_vec())])
}

fn loaded(yaml: &str) -> Policy {
    load(yaml).unwrap_or_else(|e| panic!("should load, got:\n{e}"))
}

fn errors(yaml: &str) -> Vec<String> {
    match load(yaml) {
        Ok(policy) => panic!("should be rejected, got:\n{policy}"),
        Err(errors) => errors.0.iter().map(ToString::to_string).collect(),
    }
}

/// Asserts that `yaml` has exactly one error and that it starts with `expected`.
fn assert_rejected(yaml: &str, expected: &str) {
    let errors = errors(yaml);
    assert_eq!(errors.len(), 1, "expected one error, got {errors:#?}");
    assert!(
        errors[0].starts_with(expected),
        "expected {expected:?}\n     got {:?}",
        errors[0]
    );
}

fn net(text: &str) -> IpNet {
    text.parse().expect("valid literal")
}

#[test]
fn seed_rules_load_as_written() {
    let policy = loaded(SEED);
    assert_eq!(policy.mode, Mode::Enforce);
    assert_eq!(policy.bypass, default_bypass());
    let expected = [
        ("wikipedia-range1", "91.198.174.192/27", 1),
        ("wikipedia-range2", "103.102.166.224/27", 11),
        ("wikipedia-range3", "198.35.26.96/27", 21),
        ("wikipedia-range4", "208.80.153.224/27", 31),
        ("wikipedia-range5", "208.80.154.224/27", 41),
    ];
    let rules: Vec<Rule> = expected
        .iter()
        .map(|&(name, destination, line)| Rule {
            scope: None,
            name: name.to_owned(),
            origin: Origin {
                file: "p.yaml".to_owned(),
                line,
            },
            destination: net(destination),
            ports: vec![PortRule::new(443, Protocol::Tcp)],
        })
        .collect();
    assert_eq!(
        policy.rules,
        rules.into_iter().map(Arc::new).collect::<Vec<_>>()
    );
}

#[test]
fn normalised_form_of_the_seed() {
    assert_eq!(
        loaded(SEED).to_string(),
        "\
mode: enforce
bypass: 127.0.0.0/8, ::1/128
rules: 5
wikipedia-range1  91.198.174.192/27   443/tcp  (p.yaml:1)
wikipedia-range2  103.102.166.224/27  443/tcp  (p.yaml:11)
wikipedia-range3  198.35.26.96/27     443/tcp  (p.yaml:21)
wikipedia-range4  208.80.153.224/27   443/tcp  (p.yaml:31)
wikipedia-range5  208.80.154.224/27   443/tcp  (p.yaml:41)
http rules: 0
aliases: 0
proxy: port 15001
caFiles: none
hosts: 0
"
    );
}

#[test]
fn default_policy_loads() {
    let policy = default_policy();
    assert_eq!(policy.mode, Mode::Enforce);
    assert_eq!(policy.bypass, default_bypass());
    assert_eq!(policy.rules.len(), 5);
    assert_eq!(policy.rules[0].origin.file, DEFAULT_POLICY_NAME);
    // The default policy holds the seed's rules, unchanged.
    let seed = loaded(SEED);
    for (default, seed) in policy.rules.iter().zip(&seed.rules) {
        assert_eq!(
            (&default.name, default.destination, &default.ports),
            (&seed.name, seed.destination, &seed.ports)
        );
    }
}

#[test]
fn ipv6_rule_and_multiple_ports() {
    let policy = loaded(
        "kind: EgressRule\nmetadata: {name: v6}\nspec:\n  destination: {service: 2001:db8::/32}\n  \
         ports: [{port: 443, protocol: TCP}, {port: 80, protocol: Tcp}]\n",
    );
    assert_eq!(policy.rules[0].destination, net("2001:db8::/32"));
    let ports: Vec<u16> = policy.rules[0].ports.iter().map(|p| p.port).collect();
    assert_eq!(ports, [443, 80]);
    assert!(
        policy.rules[0]
            .ports
            .iter()
            .all(|p| p.protocol == Protocol::Tcp)
    );
}

#[test]
fn udp_ports_and_one_port_as_both_tcp_and_udp() {
    let policy = loaded(&rule_with(
        "    - port: 443\n      protocol: tcp\n",
        "    - {port: 53, protocol: udp}\n    - {port: 53, protocol: TCP}\n    - {port: 123, \
         protocol: UDP}\n",
    ));
    let ports: Vec<(u16, Protocol)> = policy.rules[0]
        .ports
        .iter()
        .map(|p| (p.port, p.protocol))
        .collect();
    assert_eq!(
        ports,
        [
            (53, Protocol::Udp),
            (53, Protocol::Tcp),
            (123, Protocol::Udp)
        ]
    );
    assert!(
        policy
            .to_string()
            .contains("\nr1  10.0.0.0/8  53/udp, 53/tcp, 123/udp  (p.yaml:1)\n"),
        "{policy}"
    );
}

/// `endPort` makes a range of tcp or udp ports, both ends included, as Kubernetes
/// NetworkPolicy spells it; `endPort` equal to `port` is that one port. A range beside a
/// single port of the other protocol is fine (separate port spaces).
#[test]
fn port_ranges_load_with_both_ends_included() {
    let policy = loaded(&rule_with(
        "    - port: 443\n      protocol: tcp\n",
        "    - {port: 8000, endPort: 8999, protocol: tcp}\n    - {port: 443, endPort: 443, \
         protocol: tcp}\n    - {port: 8080, protocol: udp}\n    - {port: 9000, endPort: \
         65535, protocol: tcp}\n",
    ));
    let ports: Vec<(u16, u16, Protocol, usize)> = policy.rules[0]
        .ports
        .iter()
        .map(|p| (p.port, p.end, p.protocol, p.count()))
        .collect();
    assert_eq!(
        ports,
        [
            (8000, 8999, Protocol::Tcp, 1000),
            (443, 443, Protocol::Tcp, 1),
            (8080, 8080, Protocol::Udp, 1),
            (9000, 65535, Protocol::Tcp, 56536),
        ]
    );
    assert!(
        policy.to_string().contains(
            "\nr1  10.0.0.0/8  8000-8999/tcp, 443/tcp, 8080/udp, 9000-65535/tcp  (p.yaml:1)\n"
        ),
        "{policy}"
    );
}

/// `RULE` with `ports` as its `spec.ports` items (from line 8).
fn ports_rule(ports: &str) -> String {
    rule_with("    - port: 443\n      protocol: tcp\n", ports)
}

#[test]
fn wide_ipv6_destinations_contain_nat64_and_6to4_and_are_fine() {
    let all = loaded(&rule_with("10.0.0.0/8", "\"::/0\""));
    assert_eq!(all.rules[0].embedded_ranges(), Embedded::ALL);
    let global = loaded(&rule_with("10.0.0.0/8", "2000::/3"));
    assert_eq!(global.rules[0].embedded_ranges(), [Embedded::SixToFour]);
    let other = loaded(&rule_with("10.0.0.0/8", "2001:db8::/32"));
    assert!(other.rules[0].embedded_ranges().is_empty());
    let v4 = loaded(RULE);
    assert!(v4.rules[0].embedded_ranges().is_empty());
    let bypass = loaded("kind: EgressConfig\nspec: {bypass: [2000::/3]}\n");
    assert_eq!(bypass.bypass, [net("2000::/3")]);
}

#[test]
fn the_kernel_judges_mapped_nat64_and_6to4_addresses_as_ipv4() {
    let ip = |text: &str| text.parse::<std::net::IpAddr>().expect("valid literal");
    for (given, judged) in [
        ("64:ff9b::c000:201", "192.0.2.1"),
        ("2002:c000:201::1", "192.0.2.1"),
        ("::ffff:192.0.2.1", "192.0.2.1"),
        ("2001:db8::1", "2001:db8::1"),
        ("192.0.2.1", "192.0.2.1"),
    ] {
        assert_eq!(judged_as(ip(given)), ip(judged), "{given}");
    }
}

#[test]
fn single_addresses_become_host_routes() {
    let v4 = loaded(&rule_with("10.0.0.0/8", "93.184.216.34"));
    assert_eq!(v4.rules[0].destination, net("93.184.216.34/32"));
    let v6 = loaded(&rule_with("10.0.0.0/8", "2606:2800:220:1::1"));
    assert_eq!(v6.rules[0].destination, net("2606:2800:220:1::1/128"));
}

#[test]
fn bypass_default_explicit_and_empty() {
    assert_eq!(loaded(RULE).bypass, default_bypass());
    let config = |spec: &str| format!("kind: EgressConfig\nspec:\n{spec}---\n{RULE}");
    let explicit = loaded(&config(
        "  mode: audit\n  events: all\n  bypass: [10.96.0.0/12, 10.0.0.1, fd00::/8]\n",
    ));
    assert_eq!(explicit.mode, Mode::Audit);
    assert_eq!(explicit.events, crate::policy::Events::All);
    assert_eq!(
        explicit.bypass,
        [net("10.96.0.0/12"), net("10.0.0.1/32"), net("fd00::/8")]
    );
    let empty = loaded(&config("  bypass: []\n"));
    assert_eq!(empty.bypass, []);
    assert_eq!(empty.mode, Mode::Enforce);
    assert_eq!(empty.events, crate::policy::Events::Denied);
    assert!(empty.to_string().contains("\nbypass: none\n"));
}

#[test]
fn kubernetes_extras_are_accepted_and_ignored() {
    let policy = loaded(&rule_with(
        "kind: EgressRule\nmetadata:\n",
        "apiVersion: config.istio.io/v1alpha2\nkind: EgressRule\nmetadata:\n  namespace: default\n  \
         labels: {app: sleep}\n  annotations:\n    note: \"x\"\n",
    ));
    assert_eq!(policy.rules[0].name, "r1");
    assert_eq!(policy.rules[0].origin.line, 1);
}

#[test]
fn empty_documents_are_skipped() {
    let policy = loaded(&format!(
        "# a comment\n---\n---\n# only a comment\n---\n{RULE}---\n...\n---\n~\n"
    ));
    assert_eq!(policy.rules.len(), 1);
    assert_eq!(policy.rules[0].origin.line, 6);
    assert!(loaded("").rules.is_empty());
    assert!(loaded("# nothing\n").rules.is_empty());
}

#[test]
fn sources_form_one_policy_in_order() {
    let policy = load_sources(&[
        ("a.yaml".to_owned(), SEED.as_bytes().to_vec()),
        ("b.yaml".to_owned(), rule_with("r1", "other").into_bytes()),
        (
            "c.yaml".to_owned(),
            b"kind: EgressConfig\nspec: {mode: audit}\n".to_vec(),
        ),
    ])
    .expect("valid");
    assert_eq!(policy.rules.len(), 6);
    assert_eq!(policy.rules[5].name, "other");
    assert_eq!(policy.rules[5].origin.file, "b.yaml");
    assert_eq!(policy.mode, Mode::Audit);
}

/// One test per kind of invalid input: `name, yaml, expected start of the only error`.
macro_rules! rejects {
    ($($name:ident: $yaml:expr => $expected:expr;)*) => {
        $(
            #[test]
            fn $name() {
                assert_rejected(&$yaml, $expected);
            }
        )*
    };
}

rejects! {
    host_bits_set: rule_with("10.0.0.0/8", "10.0.0.1/24")
        => "p.yaml:6: spec.destination.service: `10.0.0.1/24` has host bits set; did you mean `10.0.0.0/24`?";
    prefix_over_32: rule_with("10.0.0.0/8", "10.0.0.0/33")
        => "p.yaml:6: spec.destination.service: `10.0.0.0/33`: prefix length 33 is over 32";
    prefix_over_128: rule_with("10.0.0.0/8", "2001:db8::/129")
        => "p.yaml:6: spec.destination.service: `2001:db8::/129`: prefix length 129 is over 128";
    leading_zero_octet: rule_with("10.0.0.0/8", "010.0.0.1")
        => "p.yaml:6: spec.destination.service: `010.0.0.1`: octet `010` has a leading zero";
    octet_out_of_range: rule_with("10.0.0.0/8", "256.1.1.1")
        => "p.yaml:6: spec.destination.service: `256.1.1.1`: octet `256` is over 255";
    ipv4_mapped_destination: rule_with("10.0.0.0/8", "\"::ffff:10.0.0.1\"")
        => "p.yaml:6: spec.destination.service: `::ffff:10.0.0.1` is an IPv4-mapped IPv6 network";
    nat64_destination: rule_with("10.0.0.0/8", "64:ff9b::c000:200/120")
        => "p.yaml:6: spec.destination.service: `64:ff9b::c000:200/120` lies inside the NAT64 \
            (64:ff9b::/96) range, whose destinations the kernel judges by the IPv4 rules as their \
            embedded IPv4 address, never by IPv6 rules or bypass ranges; write `192.0.2.0/24`";
    six_to_four_destination: rule_with("10.0.0.0/8", "2002:c000:0200::/40")
        => "p.yaml:6: spec.destination.service: `2002:c000:0200::/40` lies inside the 6to4 \
            (2002::/16) range, whose destinations the kernel judges by the IPv4 rules as their \
            embedded IPv4 address, never by IPv6 rules or bypass ranges; write `192.0.2.0/24`";
    nat64_bypass: "kind: EgressConfig\nspec:\n  bypass:\n    - 10.0.0.0/8\n    - 64:ff9b::a00:0/104\n"
        => "p.yaml:5: spec.bypass[1]: `64:ff9b::a00:0/104` lies inside the NAT64 (64:ff9b::/96) \
            range, whose destinations the kernel judges by the IPv4 rules as their embedded IPv4 \
            address, never by IPv6 rules or bypass ranges; write `10.0.0.0/8`";
    garbage_destination: rule_with("10.0.0.0/8", "not/an/address")
        => "p.yaml:6: spec.destination.service: `not/an/address` is not a CIDR or an IP address";
    port_zero: rule_with("443", "0")
        => "p.yaml:8: spec.ports[0].port: 0 is not a valid port (1-65535)";
    port_negative: rule_with("443", "-1")
        => "p.yaml:8: spec.ports[0].port: -1 is not a valid port (1-65535)";
    port_over_65535: rule_with("443", "65536")
        => "p.yaml:8: spec.ports[0].port: 65536 is not a valid port (1-65535)";
    port_huge: rule_with("443", "99999999999999999999999")
        => "p.yaml:8: spec.ports[0].port: 99999999999999999999999 is not a valid port";
    port_leading_zero: rule_with("443", "0443")
        => "p.yaml:8: spec.ports[0].port: `0443` has a leading zero";
    port_name_string: rule_with("443", "\"https\"")
        => "p.yaml:8: spec.ports[0].port: expected a port number (1-65535), found a string \"https\"";
    port_quoted_number: rule_with("443", "\"443\"")
        => "p.yaml:8: spec.ports[0].port: expected a port number (1-65535), found a string \"443\"";
    port_float: rule_with("443", "443.5")
        => "p.yaml:8: spec.ports[0].port: expected a port number (1-65535), found a float `443.5`";
    port_bool: rule_with("443", "true")
        => "p.yaml:8: spec.ports[0].port: expected a port number (1-65535), found a boolean `true`";
    unknown_protocol: rule_with("tcp", "sctp")
        => "p.yaml:9: spec.ports[0].protocol: unknown protocol `sctp` (expected tcp, udp, http, \
            https or tls)";
    http_with_cidr: rule_with("tcp", "http")
        => "p.yaml:6: spec.destination.service: http, https and tls rules need a host name destination, \
            and `10.0.0.0/8` is an address; use protocol tcp or udp for an IP/CIDR";
    https_with_ip: rule_with("tcp", "HTTPS").replace("10.0.0.0/8", "192.0.2.1")
        => "p.yaml:6: spec.destination.service: http, https and tls rules need a host name destination, \
            and `192.0.2.1/32` is an address";
    duplicate_udp_port: rule_with("      protocol: tcp\n",
            "      protocol: udp\n    - {port: 443, protocol: UDP}\n")
        => "p.yaml:10: spec.ports[1]: duplicate port 443/udp (also spec.ports[0])";
    duplicate_after_tcp_and_udp: rule_with("      protocol: tcp\n",
            "      protocol: tcp\n    - {port: 443, protocol: udp}\n    - {port: 443, protocol: tcp}\n")
        => "p.yaml:11: spec.ports[2]: duplicate port 443/tcp (also spec.ports[0])";
    udp_with_http: rule_with("      protocol: tcp\n",
            "      protocol: udp\n    - {port: 80, protocol: http}\n")
        => "p.yaml:10: spec.ports[1].protocol: `http` and `udp` (spec.ports[0]) cannot share a \
            rule: tcp and udp ports are judged by the kernel and http/https ports by the proxy; \
            write two rules";
    same_port_tcp_and_http: rule_with("      protocol: tcp\n",
            "      protocol: tcp\n    - {port: 443, protocol: https}\n")
        => "p.yaml:10: spec.ports[1].protocol: `https` and `tcp` (spec.ports[0]) cannot share a \
            rule";
    range_reversed: ports_rule("    - {port: 8999, endPort: 8000, protocol: tcp}\n")
        => "p.yaml:8: spec.ports[0].endPort: 8000 is below port 8999 (a range is port to \
            endPort, both included)";
    range_end_over_65535: ports_rule("    - {port: 8000, endPort: 65536, protocol: udp}\n")
        => "p.yaml:8: spec.ports[0].endPort: 65536 is not a valid port (1-65535)";
    range_end_zero: ports_rule("    - {port: 8000, endPort: 0, protocol: tcp}\n")
        => "p.yaml:8: spec.ports[0].endPort: 0 is not a valid port (1-65535)";
    range_end_a_string: ports_rule("    - {port: 8000, endPort: \"8999\", protocol: tcp}\n")
        => "p.yaml:8: spec.ports[0].endPort: expected a port number (1-65535), found a string";
    range_without_port: ports_rule("    - {endPort: 8999, protocol: tcp}\n")
        => "p.yaml:8: spec.ports[0].port: missing field";
    range_holds_a_later_port: ports_rule(
            "    - {port: 8000, endPort: 8999, protocol: tcp}\n    - {port: 8999, protocol: tcp}\n")
        => "p.yaml:9: spec.ports[1]: port 8999/tcp is already in spec.ports[0] (8000-8999/tcp)";
    range_over_an_earlier_port: ports_rule(
            "    - {port: 8000, protocol: tcp}\n    - {port: 7000, endPort: 8000, protocol: tcp}\n")
        => "p.yaml:9: spec.ports[1]: ports 7000-8000/tcp overlap spec.ports[0] (8000/tcp); each \
            port is in one entry of a rule";
    ranges_overlap: ports_rule(
            "    - {port: 8000, endPort: 8999, protocol: udp}\n    - {port: 8999, endPort: 9100, protocol: udp}\n")
        => "p.yaml:9: spec.ports[1]: ports 8999-9100/udp overlap spec.ports[0] (8000-8999/udp)";
    unknown_kind: rule_with("EgressRule", "DestinationRule")
        => "p.yaml:1: kind: unknown kind `DestinationRule` (expected EgressRule, EgressConfig or Service)";
    kind_case_matters: rule_with("EgressRule", "egressrule")
        => "p.yaml:1: kind: unknown kind `egressrule`";
    missing_kind: rule_with("kind: EgressRule\n", "apiVersion: v1\n")
        => "p.yaml:1: kind: missing field (expected EgressRule, EgressConfig or Service)";
    unknown_top_level_field: format!("{RULE}status: {{}}\n")
        => "p.yaml:10: status: unknown field (expected apiVersion, kind, metadata or spec)";
    unknown_metadata_field: rule_with("  name: r1\n", "  name: r1\n  uid: x\n")
        => "p.yaml:4: metadata.uid: unknown field (expected name or namespace)";
    unknown_spec_field: rule_with("spec:\n", "spec:\n  hosts: [a]\n")
        => "p.yaml:5: spec.hosts: unknown field (expected destination or ports)";
    unknown_destination_field: rule_with("    service: 10.0.0.0/8\n", "    service: 10.0.0.0/8\n    port: 443\n")
        => "p.yaml:7: spec.destination.port: unknown field (expected service)";
    unknown_port_field: rule_with("      protocol: tcp\n", "      protocol: tcp\n      name: web\n")
        => "p.yaml:10: spec.ports[0].name: unknown field (expected port, endPort or protocol)";
    missing_metadata: rule_with("metadata:\n  name: r1\n", "")
        => "p.yaml:1: metadata: missing field";
    missing_name: rule_with("  name: r1\n", "  namespace: default\n")
        => "p.yaml:2: metadata.name: missing field";
    missing_spec: "kind: EgressRule\nmetadata: {name: r1}\n"
        => "p.yaml:1: spec: missing field";
    missing_destination: rule_with("  destination:\n    service: 10.0.0.0/8\n", "")
        => "p.yaml:4: spec.destination: missing field";
    missing_service: rule_with("    service: 10.0.0.0/8\n", "    {}\n")
        => "p.yaml:5: spec.destination.service: missing field";
    missing_ports: rule_with("  ports:\n    - port: 443\n      protocol: tcp\n", "")
        => "p.yaml:4: spec.ports: missing field";
    missing_port: rule_with("    - port: 443\n      protocol", "    - protocol")
        => "p.yaml:8: spec.ports[0].port: missing field";
    missing_protocol: rule_with("    - port: 443\n      protocol: tcp\n", "    - port: 443\n")
        => "p.yaml:8: spec.ports[0].protocol: missing field";
    no_ports: rule_with("  ports:\n    - port: 443\n      protocol: tcp\n", "  ports: []\n")
        => "p.yaml:7: spec.ports: a rule needs at least one port";
    duplicate_port: rule_with("      protocol: tcp\n", "      protocol: tcp\n    - {port: 443, protocol: TCP}\n")
        => "p.yaml:10: spec.ports[1]: duplicate port 443/tcp (also spec.ports[0])";
    spec_is_a_string: "kind: EgressRule\nmetadata: {name: r1}\nspec: allow-all\n"
        => "p.yaml:3: spec: expected a mapping, found a string \"allow-all\"";
    ports_is_a_mapping: rule_with("    - port: 443\n      protocol: tcp\n", "    port: 443\n")
        => "p.yaml:8: spec.ports: expected a sequence, found a mapping";
    metadata_is_empty: rule_with("metadata:\n  name: r1\n", "metadata:\n")
        => "p.yaml:2: metadata: expected a mapping, found nothing";
    name_is_a_number: rule_with("name: r1", "name: 42")
        => "p.yaml:3: metadata.name: expected a string, found an integer `42`";
    name_is_not_dns: rule_with("name: r1", "name: My Rule")
        => "p.yaml:3: metadata.name: \"My Rule\" is not a valid name";
    document_is_a_list: "- kind: EgressRule\n"
        => "p.yaml:1: document: expected a mapping, found a sequence";
    duplicate_name: format!("{RULE}---\n{}", rule_with("10.0.0.0/8", "10.1.0.0/16"))
        => "p.yaml:13: metadata.name: duplicate name `r1` (the first is at p.yaml:3)";
    duplicate_key: rule_with("    service: 10.0.0.0/8\n", "    service: 10.0.0.0/8\n    service: 0.0.0.0/0\n")
        => "p.yaml:7: spec.destination.service: duplicate key (the first `service` is on line 6)";
    second_config: format!("kind: EgressConfig\n---\n{RULE}---\nkind: EgressConfig\nspec: {{mode: audit}}\n")
        => "p.yaml:13: kind: a second EgressConfig (the first is at p.yaml:1); at most one is allowed";
    invalid_mode: "kind: EgressConfig\nspec:\n  mode: block\n"
        => "p.yaml:3: spec.mode: unknown mode `block` (expected enforce or audit)";
    unknown_config_field: "kind: EgressConfig\nspec:\n  proxyPort: 15001\n"
        => "p.yaml:3: spec.proxyPort: unknown field (expected mode, events, bypass, proxy, caFiles, \
            hosts, dns or allowSockets)";
    invalid_events: "kind: EgressConfig\nspec:\n  events: allowed\n"
        => "p.yaml:3: spec.events: unknown events setting `allowed` (expected denied or all)";
    bypass_host_name: "kind: EgressConfig\nspec:\n  bypass:\n    - 10.0.0.0/8\n    - kubernetes.default\n"
        => "p.yaml:5: spec.bypass[1]: `kubernetes.default` is a host name; bypass entries are CIDRs or IP addresses";
    bypass_host_bits: "kind: EgressConfig\nspec: {bypass: [10.0.0.1/8]}\n"
        => "p.yaml:2: spec.bypass[0]: `10.0.0.1/8` has host bits set; did you mean `10.0.0.0/8`?";
    bypass_duplicate: "kind: EgressConfig\nspec: {bypass: [10.0.0.0/8, 10.0.0.0/8]}\n"
        => "p.yaml:2: spec.bypass[1]: duplicate of spec.bypass[0] (10.0.0.0/8)";
    bypass_not_a_list: "kind: EgressConfig\nspec: {bypass: 10.0.0.0/8}\n"
        => "p.yaml:2: spec.bypass: expected a sequence, found a string \"10.0.0.0/8\"";
    yaml_syntax_error: rule_with("    service: 10.0.0.0/8\n", "    service: [10.0.0.0/8\n")
        => "p.yaml:7: invalid YAML: ";
    unterminated_quote: rule_with("name: r1", "name: 'r1")
        => "p.yaml:3: invalid YAML: ";
    anchors_rejected: rule_with("name: r1", "name: &n r1")
        => "p.yaml:3: metadata.name: YAML anchors are not supported";
    unsupported_tag: rule_with("443", "!!int 443")
        => "p.yaml:8: spec.ports[0].port: YAML tag `!!int` is not supported here";
    custom_tag: rule_with("10.0.0.0/8", "!cidr 10.0.0.0/8")
        => "p.yaml:6: spec.destination.service: YAML tag `!cidr` is not supported here";
    integer_key: rule_with("    service: 10.0.0.0/8\n", "    service: 10.0.0.0/8\n    443: x\n")
        => "p.yaml:7: spec.destination: key `443` is an integer, not a string";
    mapping_key: "kind: EgressConfig\n? {a: 1}\n: x\n"
        => "p.yaml:2: mapping keys must be strings, found a mapping";
    too_deep: format!("kind: EgressRule\nx: {}{}\n", "[".repeat(100), "]".repeat(100))
        => "p.yaml:2: x";
}

#[test]
fn non_utf8_names_offset_and_line() {
    let mut bytes = RULE.as_bytes().to_vec();
    let offset = RULE.find("r1").expect("present");
    bytes[offset] = 0xff;
    let errors = load_sources(&[("p.yaml".to_owned(), bytes)]).expect_err("invalid");
    assert_eq!(
        errors.0[0].to_string(),
        format!("p.yaml:3: invalid UTF-8 at byte offset {offset} (policy files must be UTF-8)")
    );
    assert_eq!(errors.0.len(), 1);
}

#[test]
fn std_str_tag_makes_a_string() {
    let policy = loaded(&rule_with("name: r1", "name: !!str 42"));
    assert_eq!(policy.rules[0].name, "42");
}

#[test]
fn billion_laughs_is_rejected_fast() {
    let mut yaml = String::from(
        "a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n",
    );
    for (name, previous) in ["b", "c", "d", "e", "f", "g", "h", "i"]
        .iter()
        .zip(["a", "b", "c", "d", "e", "f", "g", "h"])
    {
        let aliases = vec![format!("*{previous}"); 9].join(",");
        yaml.push_str(&format!("{name}: &{name} [{aliases}]\n"));
    }
    let start = Instant::now();
    let errors = errors(&yaml);
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "took {:?}",
        start.elapsed()
    );
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("p.yaml:2: b[0]: YAML aliases are not supported")),
        "{errors:#?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("p.yaml:1: a: YAML anchors are not supported")),
        "{errors:#?}"
    );
}

#[test]
fn every_error_is_reported_sorted_by_file_then_line() {
    let first = format!(
        "{}---\nkind: Nope\n---\n{}",
        rule_with("443", "0").replace("tcp", "quic"),
        rule_with("10.0.0.0/8", "10.0.0.1/8").replace("r1", "r2")
    );
    let second = format!("{RULE}bogus: 1\n");
    let errors = load_sources(&[
        ("b.yaml".to_owned(), first.into_bytes()),
        ("a.yaml".to_owned(), second.into_bytes()),
    ])
    .expect_err("invalid");
    let lines: Vec<String> = errors.0.iter().map(ToString::to_string).collect();
    let expected = [
        "b.yaml:8: spec.ports[0].port: 0 is not a valid port (1-65535)",
        "b.yaml:9: spec.ports[0].protocol: unknown protocol `quic` (expected tcp, udp, http, https or tls)",
        "b.yaml:11: kind: unknown kind `Nope` (expected EgressRule, EgressConfig or Service)",
        "b.yaml:18: spec.destination.service: `10.0.0.1/8` has host bits set; did you mean `10.0.0.0/8`?",
        "a.yaml:3: metadata.name: duplicate name `r1` (the first is at b.yaml:3)",
        "a.yaml:10: bogus: unknown field (expected apiVersion, kind, metadata or spec)",
    ];
    assert_eq!(lines, expected);
    assert_eq!(errors.to_string(), expected.join("\n"));
}

#[test]
fn error_count_is_capped_per_file() {
    let ports = "    - {port: 0, protocol: tcp}\n".repeat(500);
    let yaml = rule_with("    - port: 443\n      protocol: tcp\n", &ports);
    let errors = errors(&yaml);
    assert_eq!(errors.len(), super::report::MAX_ERRORS_PER_FILE + 1);
    assert!(
        errors.last().expect("some").contains("too many errors"),
        "{errors:#?}"
    );
}

#[test]
fn oversized_source_is_rejected() {
    let huge = vec![b'#'; usize::try_from(MAX_FILE_SIZE).expect("fits") + 1];
    let errors = load_sources(&[("big.yaml".to_owned(), huge)]).expect_err("too big");
    assert_eq!(errors.0.len(), 1);
    assert!(
        errors.0[0]
            .to_string()
            .starts_with("big.yaml:1: the source is too large"),
        "{errors}"
    );
}

#[test]
fn files_unreadable_or_oversized_are_errors() {
    let dir = TempDir::new("policy-test");
    let big = dir.join("big.yaml");
    // Sparse: the size check must refuse it from the metadata, without reading 64 MiB.
    std::fs::File::create(&big)
        .and_then(|f| f.set_len(MAX_FILE_SIZE + 1))
        .expect("sparse file");
    // A valid file among them adds nothing, and does not stop the others being checked.
    let good = dir.file("good.yaml", RULE);
    let missing = dir.join("missing.yaml");
    let result = load_files(&[good, big.clone(), missing.clone(), dir.0.clone()]);
    let lines: Vec<String> = result
        .expect_err("invalid")
        .0
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(lines.len(), 3, "{lines:#?}");
    assert_eq!(
        lines,
        [
            format!(
                "{}:1: cannot read the policy file: it is larger than the 64 MiB limit ({} bytes)",
                big.display(),
                MAX_FILE_SIZE + 1
            ),
            format!(
                "{}:1: cannot read the policy file: No such file or directory (os error 2)",
                missing.display()
            ),
            format!(
                "{}:1: cannot read the policy file: it is a directory, not a regular file",
                dir.display()
            ),
        ]
    );
}

// After `rejects!`, so the submodules can use it.
mod config;
mod http;
mod input;
mod names;
mod service;

#[test]
fn a_rules_namespace_scopes_it_and_names_are_unique_per_namespace() {
    let rule = |ns: &str, name: &str| {
        format!(
            "kind: EgressRule\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  destination: {{service: 192.0.2.0/24}}\n  ports: [{{port: 443, protocol: tcp}}]\n"
        )
    };
    let p = loaded(&rule("team-a", "r"));
    assert_eq!(p.rules[0].scope.as_deref(), Some("team-a"));
    assert_eq!(p.rules[0].name, "r");
    assert_eq!(p.rules[0].row_name(), "team-a/r");
    assert_eq!(p.scopes(), ["team-a"]);
    // Without a namespace: node-wide.
    let node = rule("x", "r").replace("  namespace: x\n", "");
    assert_eq!(loaded(&node).rules[0].scope, None);
    // The same name in two namespaces, and node-wide: three rules.
    let three = format!("{}---\n{}---\n{node}", rule("a", "r"), rule("b", "r"));
    assert_eq!(loaded(&three).rules.len(), 3);
    // Twice in one namespace: a duplicate.
    let twice = format!("{}---\n{}", rule("a", "r"), rule("a", "r"));
    assert_rejected(
        &twice,
        "p.yaml:11: metadata.name: duplicate name `a/r` (the first is at p.yaml:3)",
    );
    assert_rejected(
        &rule("Team_A", "r"),
        "p.yaml:4: metadata.namespace: \"Team_A\" is not a valid namespace",
    );
    // Labels and annotations stay accepted and ignored.
    let labelled = rule("default", "r").replace("  namespace: default\n", "  labels: {app: x}\n");
    assert_eq!(loaded(&labelled).rules.len(), 1);
    // An EgressConfig is node-wide.
    assert_rejected(
        "kind: EgressConfig\nmetadata:\n  namespace: default\nspec:\n  mode: audit\n",
        "p.yaml:3: metadata.namespace: namespace \"default\": an EgressConfig applies to the whole node; remove metadata.namespace",
    );
}

/// A whole load (the agent's) drops the cached documents of sources that are gone.
#[test]
fn a_whole_load_forgets_the_documents_of_sources_no_longer_loaded() {
    let text = |name: &str| PolicySource::Text {
        name: name.to_owned(),
        bytes: format!(
            "kind: EgressRule\nmetadata:\n  name: {name}\nspec:\n  destination:\n    \
             service: 192.0.2.0/24\n  ports:\n  - port: 443\n    protocol: tcp\n"
        )
        .into_bytes(),
    };
    // Names of this test's own: other tests' whole loads may drop them meanwhile, never add them.
    let (kept, gone) = ("cache-kept-7c1e", "cache-gone-7c1e");
    let both = read_sources([text(kept), text(gone)]);
    let mut cached = false;
    for _ in 0..100 {
        load_read_whole(&both).expect("valid");
        if cache::holds(gone) {
            cached = true;
            break;
        }
    }
    assert!(cached, "a clean source's documents are cached");
    // The whole policy without it: gone from the cache.
    load_read_whole(&read_sources([text(kept)])).expect("valid");
    assert!(
        !cache::holds(gone),
        "a source no longer loaded keeps its documents"
    );
}
