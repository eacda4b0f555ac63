//! Tests of [`super`] (compile.rs).

use super::*;
use crate::policy::{Origin, PortRule, Rule, default_bypass};

fn origin(line: usize) -> Origin {
    Origin {
        file: "t.yaml".to_owned(),
        line,
    }
}

fn rule(name: &str, dest: &str, ports: &[u16]) -> Rule {
    Rule {
        scope: None,
        name: name.to_owned(),
        origin: origin(1),
        destination: dest.parse().unwrap(),
        ports: ports.iter().map(|&port| PortRule::tcp(port)).collect(),
    }
}

/// Compiles `p` as generation 1, with no rows in the kernel yet; the rule keys of the
/// node-wide scope only (see [`node_wide`]).
fn compile_first(p: &Policy) -> Compiled {
    node_wide(compile(p, &StoredRows::default(), 1).unwrap())
}

/// `c` with the allow keys of scope 0 only: the XDP backstop's copies (scope 255) and the
/// redirect keys left out, which the scope tests below check.
fn node_wide(mut c: Compiled) -> Compiled {
    c.rules_v4
        .retain(|(_, k, v)| k.scope == 0 && v.row != ROW_PROXY);
    c.rules_v6
        .retain(|(_, k, v)| k.scope == 0 && v.row != ROW_PROXY);
    c
}

/// The rows `c` leaves in the kernel, stored by generation `generation`.
fn stored_by(c: &Compiled, generation: u32) -> StoredRows {
    RowTable::from_rule_info(
        c.rows
            .rows()
            .into_iter()
            .map(|(row, name)| (row, rule_info(name, generation))),
    )
}

fn policy(rules: Vec<Rule>) -> Policy {
    Policy {
        mode: Mode::Enforce,
        bypass: default_bypass(),
        rules: rules.into_iter().map(std::sync::Arc::new).collect(),
        ..Policy::default()
    }
}

#[test]
fn keys_carry_port_in_network_order_and_prefix_past_port_and_proto() {
    let p = policy(vec![
        rule("a", "192.0.2.0/24", &[443, 8080]),
        rule("b", "2001:db8::/32", &[22]),
    ]);
    let c = node_wide(compile(&p, &StoredRows::default(), 7).unwrap());
    assert_eq!(
        c.config,
        Config {
            mode: mode::ENFORCE,
            generation: 7,
            row_limit: FIRST_RULE_ROW + 2,
            proxy_port: crate::policy::DEFAULT_PROXY_PORT.to_be(),
            flags: 0,
            agent_cgroup: 0,
        }
    );
    assert!(c.http_ports.is_empty());
    assert_eq!(c.rules_v4.len(), 2);
    let (prefix, key, value) = c.rules_v4[0];
    assert_eq!(prefix, 32 + 24);
    assert_eq!(key.addr, [192, 0, 2, 0]);
    // Network byte order: the first byte in memory is the high byte of 443 (0x01bb).
    assert_eq!(key.port.to_ne_bytes(), [0x01, 0xbb]);
    assert_eq!(key.proto, PROTO_TCP);
    assert_eq!(value.row, FIRST_RULE_ROW);
    let (prefix, key, value) = c.rules_v6[0];
    assert_eq!(prefix, 32 + 32);
    assert_eq!(key.port.to_ne_bytes(), [0, 22]);
    assert_eq!(value.row, FIRST_RULE_ROW + 1);
    assert_eq!(c.bypass_v4, vec![(8, [127, 0, 0, 0], 1)]);
    assert_eq!(c.bypass_v6.len(), 1);
    assert_eq!(c.bypass_v6[0].0, 128);
}

#[test]
fn http_rule_and_alias_ports_go_to_the_proxy() {
    use crate::policy::{Alias, HostPattern, HttpPort, HttpProtocol, HttpRule};
    let mut p = policy(vec![rule("a", "192.0.2.0/24", &[8080])]);
    p.http_rules.push(HttpRule {
        scope: None,
        name: "web".into(),
        origin: origin(1),
        host: HostPattern::Exact("httpbin.test".into()),
        ports: [(80, HttpProtocol::Http), (443, HttpProtocol::Https)]
            .map(|(port, protocol)| HttpPort { port, protocol })
            .into(),
    });
    p.aliases.push(Alias {
        scope: None,
        name: "httpbin".into(),
        namespace: "default".into(),
        origin: origin(9),
        external_name: "httpbin.test".into(),
        ports: vec![80, 8000],
    });
    p.proxy.port = 15999;
    let c = compile_first(&p);
    assert_eq!(c.http_ports, vec![80, 443, 8000]);
    assert_eq!(c.config.proxy_port.to_ne_bytes(), 15999u16.to_be_bytes());
    // HTTP rules are the proxy's: they take no counter row and no rule key.
    assert_eq!(c.rows.len(), 1);
    assert_eq!(c.rules_v4.len(), 1);
}

#[test]
fn audit_mode_compiles_to_audit() {
    let mut p = policy(vec![]);
    p.mode = Mode::Audit;
    assert_eq!(compile_first(&p).config.mode, mode::AUDIT);
}

#[test]
fn events_all_sets_the_config_flag() {
    let mut p = policy(vec![]);
    assert_eq!(compile_first(&p).config.flags, 0);
    p.events = Events::All;
    assert_eq!(compile_first(&p).config.flags, config_flags::EVENTS_ALL);
}

#[test]
fn allow_sockets_compile_to_the_raw_flag_and_sock_protos() {
    let mut p = policy(vec![]);
    let c = compile_first(&p);
    assert_eq!(c.config.flags & config_flags::ALLOW_RAW, 0);
    assert!(c.sock_protos.is_empty());
    p.allow_sockets.raw = true;
    p.allow_sockets.protocols = [262, 1, 58, 132].into();
    p.events = Events::All;
    let c = compile_first(&p);
    assert_eq!(
        c.config.flags,
        config_flags::ALLOW_RAW | config_flags::EVENTS_ALL
    );
    assert_eq!(c.sock_protos, [1, 58, 132, 262]);
}

fn with_resolvers(mut p: Policy, resolvers: &[&str]) -> Policy {
    p.dns = crate::policy::Dns {
        resolvers: resolvers.iter().map(|r| r.parse().unwrap()).collect(),
        source: crate::policy::DnsSource::ResolvConf("/etc/resolv.conf".into()),
    };
    p
}

#[test]
fn resolvers_become_the_dns_rule_after_the_users_rules() {
    let mut user = rule("own-dns", "192.0.2.53/32", &[53]);
    user.ports.push(PortRule::new(5353, Protocol::Udp));
    let p = with_resolvers(
        policy(vec![user]),
        &[
            "192.0.2.53",
            "2001:db8::53",
            "64:ff9b::c000:236",
            "2002:c000:236::1",
        ],
    );
    let c = compile_first(&p);
    let user_row = c.rows.row("own-dns").unwrap();
    let dns_row = c.rows.row(DNS_RULE_NAME).unwrap();
    assert_eq!((user_row, dns_row), (FIRST_RULE_ROW, FIRST_RULE_ROW + 1));
    assert_eq!(c.config.row_limit, FIRST_RULE_ROW + 2);
    let v4: Vec<(u32, [u8; 4], u16, u8, u32)> = c
        .rules_v4
        .iter()
        .map(|(prefix, k, v)| (*prefix, k.addr, u16::from_be(k.port), k.proto, v.row))
        .collect();
    assert_eq!(
        v4,
        [
            (64, [192, 0, 2, 53], 53, PROTO_TCP, user_row),
            (64, [192, 0, 2, 53], 5353, PROTO_UDP, user_row),
            // 53/tcp to 192.0.2.53 is the user's rule's already: skipped, not reported.
            (64, [192, 0, 2, 53], 53, PROTO_UDP, dns_row),
            // The NAT64 and 6to4 resolvers are judged as 192.0.2.54: one pair of keys.
            (64, [192, 0, 2, 54], 53, PROTO_UDP, dns_row),
            (64, [192, 0, 2, 54], 53, PROTO_TCP, dns_row),
        ]
    );
    let v6: Vec<(u32, u16, u8, u32)> = c
        .rules_v6
        .iter()
        .map(|(prefix, k, v)| (*prefix, u16::from_be(k.port), k.proto, v.row))
        .collect();
    assert_eq!(
        v6,
        [(160, 53, PROTO_UDP, dns_row), (160, 53, PROTO_TCP, dns_row)]
    );
    assert_eq!(
        c.rules_v6[0].1.addr,
        "2001:db8::53"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets()
    );
    assert!(c.shadowed.is_empty(), "{:?}", c.shadowed);
}

#[test]
fn no_resolvers_no_dns_row() {
    let p = with_resolvers(policy(vec![rule("a", "192.0.2.1/32", &[443])]), &[]);
    let c = compile_first(&p);
    assert_eq!(c.rows.row(DNS_RULE_NAME), None);
    assert_eq!(c.rows.len(), 1);
    assert_eq!(c.rules_v4.len(), 1);
    // Not filled at all: no DNS either.
    let c = compile_first(&policy(vec![rule("a", "192.0.2.1/32", &[443])]));
    assert_eq!(c.rows.row(DNS_RULE_NAME), None);
}

#[test]
fn the_dns_row_is_stable_across_reloads() {
    let first = compile_first(&with_resolvers(
        policy(vec![rule("a", "192.0.2.1/32", &[1])]),
        &["192.0.2.53"],
    ));
    let stored = stored_by(&first, 1);
    // A new rule comes first and the resolvers change: (dns) keeps its row.
    let second = compile(
        &with_resolvers(
            policy(vec![
                rule("new", "192.0.2.2/32", &[1]),
                rule("a", "192.0.2.1/32", &[1]),
            ]),
            &["192.0.2.54"],
        ),
        &stored,
        2,
    )
    .unwrap();
    assert_eq!(
        second.rows.row(DNS_RULE_NAME),
        first.rows.row(DNS_RULE_NAME)
    );
    assert_eq!(second.rows.row("a"), first.rows.row("a"));
    assert_eq!(second.rows.len(), 3);
}

#[test]
fn same_key_twice_is_kept_by_the_first_rule_and_reported() {
    let p = policy(vec![
        rule("a", "192.0.2.0/24", &[443]),
        rule("b", "192.0.2.0/24", &[443, 80]),
    ]);
    let c = compile_first(&p);
    assert_eq!(c.rules_v4.len(), 2);
    assert_eq!(c.shadowed.len(), 1);
    assert_eq!(c.shadowed[0].rule, "b");
    assert_eq!(c.shadowed[0].by, "a");
}

#[test]
fn udp_ports_compile_to_udp_keys_beside_tcp_ones() {
    let mut dns = rule("dns", "192.0.2.53/32", &[53]);
    dns.ports.insert(0, PortRule::new(53, Protocol::Udp));
    let mut again = rule("again", "192.0.2.53/32", &[]);
    again.ports.push(PortRule::new(53, Protocol::Udp));
    let c = compile_first(&policy(vec![dns, again]));
    let keys: Vec<(u16, u8)> = c
        .rules_v4
        .iter()
        .map(|(_, k, _)| (u16::from_be(k.port), k.proto))
        .collect();
    assert_eq!(keys, [(53, PROTO_UDP), (53, PROTO_TCP)]);
    assert_eq!(
        c.shadowed,
        [Shadowed {
            rule: "again".into(),
            by: "dns".into(),
            key: "192.0.2.53/32 53/udp".into(),
        }]
    );
}

#[test]
fn rows_survive_a_recompile_and_new_names_never_take_a_row_still_in_force() {
    let first = compile_first(&policy(vec![
        rule("a", "192.0.2.1/32", &[1]),
        rule("b", "192.0.2.2/32", &[1]),
    ]));
    let stored = stored_by(&first, 1);
    // "a" goes away, "c" arrives before "b" in file order: "b" keeps its row.
    let second = compile(
        &policy(vec![
            rule("c", "192.0.2.3/32", &[1]),
            rule("b", "192.0.2.2/32", &[1]),
        ]),
        &stored,
        2,
    )
    .unwrap();
    assert_eq!(second.rows.row("b"), first.rows.row("b"));
    assert_ne!(
        second.rows.row("c"),
        first.rows.row("a"),
        "a's row is still counted on by generation 1 until the swap"
    );
    assert_eq!(second.rows.len(), 2);
    // What RULE_INFO holds once the second is in force (what an agent keeps instead of reading
    // it back): "b" as generation 1 wrote it, "c" as generation 2 writes it, "a" freed.
    let held = [
        (second.rows.row("b").unwrap(), rule_info("b", 1)),
        (second.rows.row("c").unwrap(), rule_info("c", 2)),
    ];
    assert_eq!(
        stored.after(&second.rows, 2),
        RowTable::from_rule_info(held)
    );
    // One generation later a's row is free and is reused.
    let stored = stored_by(&second, 2);
    let third = compile(
        &policy(vec![
            rule("c", "192.0.2.3/32", &[1]),
            rule("b", "192.0.2.2/32", &[1]),
            rule("d", "192.0.2.4/32", &[1]),
        ]),
        &stored,
        3,
    )
    .unwrap();
    assert_eq!(
        third.rows.row("d"),
        first.rows.row("a"),
        "the freed row is reused"
    );
    assert_eq!(third.rows.row("c"), second.rows.row("c"));
}

#[test]
fn stored_rows_are_sorted_so_contains_can_search() {
    let stored = RowTable::from_rule_info(
        [9, 3, 7, 5]
            .into_iter()
            .map(|row| (row, rule_info(&format!("r{row}"), 1))),
    );
    for row in [3, 5, 7, 9] {
        assert!(stored.contains(row), "{row}");
    }
    for row in [0, 4, 8, 10] {
        assert!(!stored.contains(row), "{row}");
    }
}

#[test]
fn long_names_that_share_a_prefix_keep_their_own_rows() {
    let long_a = format!("{}-a", "x".repeat(70));
    let long_b = format!("{}-b", "x".repeat(70));
    let first = compile_first(&policy(vec![
        rule(&long_a, "192.0.2.1/32", &[1]),
        rule(&long_b, "192.0.2.2/32", &[1]),
    ]));
    let stored = stored_by(&first, 1);
    let second = compile(
        &policy(vec![
            rule(&long_b, "192.0.2.2/32", &[1]),
            rule(&long_a, "192.0.2.1/32", &[1]),
        ]),
        &stored,
        2,
    )
    .unwrap();
    assert_eq!(second.rows.row(&long_a), first.rows.row(&long_a));
    assert_eq!(second.rows.row(&long_b), first.rows.row(&long_b));
}

#[test]
fn a_stored_row_is_found_behind_another_of_the_same_hash_and_length() {
    // Row 10 holds a name of the same FNV hash and length as `alpha` but other bytes (what a
    // hash collision stores): `alpha` must still find its own row 11 behind it, and a new
    // name must take neither.
    let mut impostor = rule_info("alpha", 1);
    impostor.name[4] = b'z';
    let stored = RowTable::from_rule_info([
        (FIRST_RULE_ROW + 10, impostor),
        (FIRST_RULE_ROW + 11, rule_info("alpha", 1)),
    ]);
    let table = stored.assign(["alpha", "beta"]).unwrap();
    assert_eq!(table.row("alpha"), Some(FIRST_RULE_ROW + 11));
    let beta = table.row("beta").unwrap();
    assert!(
        beta != FIRST_RULE_ROW + 10 && beta != FIRST_RULE_ROW + 11,
        "{beta}"
    );
}

#[test]
fn too_many_rules_is_an_error_not_a_partial_policy() {
    let names: Vec<String> = (0..COUNTER_ROWS).map(|i| format!("r{i}")).collect();
    let err = StoredRows::default()
        .assign(names.iter().map(String::as_str))
        .unwrap_err();
    assert!(matches!(err, CompileError::TooManyRules { .. }), "{err}");
}

#[test]
fn too_many_bypass_ranges_is_an_error() {
    let mut p = policy(vec![]);
    p.bypass = (0..=MAX_BYPASS)
        .map(|i| {
            ipnet::Ipv4Net::new(std::net::Ipv4Addr::from(i << 8), 24)
                .unwrap()
                .into()
        })
        .collect();
    let err = compile(&p, &StoredRows::default(), 1).unwrap_err();
    assert!(matches!(err, CompileError::TooManyBypass { .. }), "{err}");
}

/// An HTTP rule for `host` on port 80, in `scope`.
fn http_rule(name: &str, scope: Option<&str>, host: &str) -> crate::policy::HttpRule {
    use crate::policy::{HostPattern, HttpPort, HttpProtocol};
    crate::policy::HttpRule {
        name: name.into(),
        scope: scope.map(str::to_owned),
        origin: origin(1),
        host: HostPattern::Exact(host.into()),
        ports: vec![HttpPort {
            port: 80,
            protocol: HttpProtocol::Http,
        }],
    }
}

#[test]
fn namespaces_get_scopes_with_the_node_wide_rules_in_every_one() {
    let mut shared = rule("shared", "192.0.2.0/24", &[443]);
    shared.name = "shared".into();
    let mut a = rule("web", "198.51.100.0/24", &[8080]);
    a.scope = Some("team-a".into());
    // The same name in another namespace is another rule.
    let mut b = rule("web", "203.0.113.0/24", &[8080]);
    b.scope = Some("default".into());
    let mut p = policy(vec![a, shared, b]);
    p.http_rules
        .push(http_rule("api", Some("team-a"), "api.test"));
    let c = compile(&p, &StoredRows::default(), 1).unwrap();
    assert_eq!(c.scopes, ["default", "team-a"]);
    assert_ne!(c.config.flags & config_flags::SCOPED, 0);
    // Rows by scoped name.
    let shared_row = c.rows.row("shared").unwrap();
    let a_row = c.rows.row("team-a/web").unwrap();
    let b_row = c.rows.row("default/web").unwrap();
    assert_eq!(c.rows.len(), 3);
    let keys = |scope: u8| -> Vec<([u8; 4], u16, u32)> {
        let mut k: Vec<_> = c
            .rules_v4
            .iter()
            .filter(|(_, k, _)| k.scope == scope)
            .map(|(_, k, v)| (k.addr, u16::from_be(k.port), v.row))
            .collect();
        k.sort_unstable();
        k
    };
    // Scope 0 (host processes, pods of other namespaces): the node-wide rule only.
    assert_eq!(keys(0), [([192, 0, 2, 0], 443, shared_row)]);
    // default (1): node-wide and its own; team-a (2): node-wide, its own and the redirect of
    // its HTTP rule's port.
    assert_eq!(
        keys(1),
        [
            ([192, 0, 2, 0], 443, shared_row),
            ([203, 0, 113, 0], 8080, b_row)
        ]
    );
    assert_eq!(
        keys(2),
        [
            ([0, 0, 0, 0], 80, ROW_PROXY),
            ([192, 0, 2, 0], 443, shared_row),
            ([198, 51, 100, 0], 8080, a_row)
        ]
    );
    // The XDP backstop's scope: every scope's rules, no redirect.
    assert_eq!(
        keys(XDP_SCOPE),
        [
            ([192, 0, 2, 0], 443, shared_row),
            ([198, 51, 100, 0], 8080, a_row),
            ([203, 0, 113, 0], 8080, b_row)
        ]
    );
    // Pods are put in their namespace's scope; a namespace without rules has none.
    let pods = [
        (10, "team-a".to_owned()),
        (11, "kube-system".to_owned()),
        (12, "default".to_owned()),
    ];
    assert_eq!(scoped_cgroups(&c.scopes, &pods), [(10, 2), (12, 1)]);
}

#[test]
fn redirects_are_per_scope_and_a_tcp_rule_on_the_whole_port_wins() {
    let mut p = policy(vec![rule("open-80", "0.0.0.0/0", &[80])]);
    p.http_rules.push(http_rule("node-api", None, "api.test"));
    let c = compile(&p, &StoredRows::default(), 1).unwrap();
    assert!(c.scopes.is_empty());
    assert_eq!(c.config.flags & config_flags::SCOPED, 0);
    // 0.0.0.0/0 on 80/tcp is the rule's: no IPv4 redirect; [::]/0 has none, so IPv6 goes to
    // the proxy.
    let proxied_v4 = c
        .rules_v4
        .iter()
        .filter(|(_, _, v)| v.row == ROW_PROXY)
        .count();
    let proxied_v6: Vec<_> = c
        .rules_v6
        .iter()
        .filter(|(_, _, v)| v.row == ROW_PROXY)
        .map(|(len, k, _)| (*len, u16::from_be(k.port), k.proto, k.scope))
        .collect();
    assert_eq!(proxied_v4, 0);
    assert_eq!(proxied_v6, [(KEY_PREFIX_BITS, 80, PROTO_TCP, 0)]);
}

#[test]
fn too_many_scopes_is_an_error() {
    let rules = (0..=u32::from(MAX_SCOPES))
        .map(|i| {
            let mut r = rule("r", "192.0.2.0/24", &[443]);
            r.scope = Some(format!("ns{i}"));
            r
        })
        .collect();
    let err = compile(&policy(rules), &StoredRows::default(), 1).unwrap_err();
    assert!(
        matches!(
            err,
            CompileError::TooManyScopes {
                scopes: 255,
                max: 254
            }
        ),
        "{err}"
    );
}

#[test]
fn an_alias_of_a_named_namespace_redirects_its_ports_for_that_namespace_only() {
    use crate::policy::Alias;
    let alias = |name: &str, scope: Option<&str>, port| Alias {
        name: name.into(),
        namespace: scope.unwrap_or("default").into(),
        scope: scope.map(str::to_owned),
        origin: origin(1),
        external_name: "httpbin.test".into(),
        ports: vec![port],
    };
    let mut p = policy(vec![]);
    // As the seeds write them (no namespace): every workload's; and one of team-a.
    p.aliases.push(alias("httpbin", None, 80));
    p.aliases.push(alias("teambin", Some("team-a"), 8080));
    let c = compile(&p, &StoredRows::default(), 1).unwrap();
    assert_eq!(c.scopes, ["team-a"]);
    let redirects = |scope: u8| -> Vec<u16> {
        let mut ports: Vec<u16> = c
            .rules_v4
            .iter()
            .filter(|(_, k, v)| k.scope == scope && v.row == ROW_PROXY)
            .map(|(_, k, _)| u16::from_be(k.port))
            .collect();
        ports.sort_unstable();
        ports
    };
    assert_eq!(redirects(0), [80]);
    assert_eq!(redirects(1), [80, 8080]);
    assert!(redirects(XDP_SCOPE).is_empty());
}

fn range_rule(name: &str, dest: &str, port: u16, end: u16, protocol: Protocol) -> Rule {
    let mut r = rule(name, dest, &[]);
    r.ports.push(PortRule {
        port,
        end,
        protocol,
    });
    r
}

/// The (port, protocol, row) of `c`'s IPv4 keys, sorted.
fn v4_ports(c: &Compiled) -> Vec<(u16, u8, u32)> {
    let mut ports: Vec<_> = c
        .rules_v4
        .iter()
        .map(|(_, k, v)| (u16::from_be(k.port), k.proto, v.row))
        .collect();
    ports.sort_unstable();
    ports
}

/// A range is one exact-port key per port, both ends included (the kernel's one lookup
/// matches the port before the address's prefix), with the same prefix length and row.
#[test]
fn a_port_range_is_one_key_per_port_from_port_to_end_port() {
    let c = compile_first(&policy(vec![
        range_rule("r", "192.0.2.0/24", 8000, 8003, Protocol::Tcp),
        range_rule("top", "192.0.2.0/24", 65534, 65535, Protocol::Udp),
    ]));
    let r = FIRST_RULE_ROW;
    assert_eq!(
        v4_ports(&c),
        [
            (8000, PROTO_TCP, r),
            (8001, PROTO_TCP, r),
            (8002, PROTO_TCP, r),
            (8003, PROTO_TCP, r),
            (65534, PROTO_UDP, r + 1),
            (65535, PROTO_UDP, r + 1),
        ]
    );
    assert!(c.rules_v4.iter().all(|(len, _, _)| *len == 32 + 24));
    assert!(c.shadowed.is_empty(), "{:?}", c.shadowed);
}

/// Ports of a later rule's range that an earlier rule holds stay the earlier rule's, and are
/// reported once per run of ports, not once per port; the rest are the later rule's.
#[test]
fn a_range_overlapping_an_earlier_rule_is_reported_as_spans() {
    let mut a = rule("a", "192.0.2.0/24", &[8005]);
    a.ports.push(PortRule {
        port: 8010,
        end: 8012,
        protocol: Protocol::Tcp,
    });
    let b = range_rule("b", "192.0.2.0/24", 8000, 8015, Protocol::Tcp);
    let c = compile_first(&policy(vec![a, b]));
    let keys = v4_ports(&c);
    let owner = |port: u16| keys.iter().find(|(p, _, _)| *p == port).map(|k| k.2);
    let (ra, rb) = (Some(FIRST_RULE_ROW), Some(FIRST_RULE_ROW + 1));
    assert_eq!(
        [8000, 8004, 8005, 8006, 8009, 8010, 8012, 8013, 8015].map(owner),
        [rb, rb, ra, rb, rb, ra, ra, rb, rb]
    );
    assert_eq!(keys.len(), 16);
    let spans: Vec<(&str, &str, &str)> = c
        .shadowed
        .iter()
        .map(|s| (s.rule.as_str(), s.by.as_str(), s.key.as_str()))
        .collect();
    assert_eq!(
        spans,
        [
            ("b", "a", "192.0.2.0/24 8005/tcp"),
            ("b", "a", "192.0.2.0/24 8010-8012/tcp")
        ]
    );
}

/// A range over every address on an HTTP egress port takes the port from the proxy, as the
/// single port does (the documented precedence): connections to it are allowed directly.
#[test]
fn a_range_over_every_address_holds_the_http_ports_it_covers() {
    let mut p = policy(vec![range_rule("low", "0.0.0.0/0", 1, 1024, Protocol::Tcp)]);
    p.http_rules.push(http_rule("api", None, "api.test"));
    let c = compile(&p, &StoredRows::default(), 1).unwrap();
    assert!(!c.rules_v4.iter().any(|(_, _, v)| v.row == ROW_PROXY));
    assert!(
        c.rules_v6
            .iter()
            .any(|(_, k, v)| v.row == ROW_PROXY && u16::from_be(k.port) == 80)
    );
}

/// A range that takes the policy past the tries' capacity is refused with its rule and
/// entry named, and stops being expanded there: 1-65535 in 20 scopes (node-wide rules go
/// into each, and into the XDP backstop's and the node-wide one) is 22 * 65,535 keys.
#[test]
fn a_range_past_the_key_capacity_is_an_error_naming_the_rule() {
    let mut rules = vec![range_rule(
        "all-ports",
        "192.0.2.0/24",
        1,
        65535,
        Protocol::Tcp,
    )];
    rules[0].origin = origin(12);
    rules.extend((0..20).map(|i| {
        let mut r = rule("r", "198.51.100.0/24", &[443]);
        r.scope = Some(format!("ns{i}"));
        r
    }));
    let err = compile(&policy(rules), &StoredRows::default(), 1).unwrap_err();
    assert_eq!(
        err.to_string(),
        "rule `all-ports` (t.yaml:12): ports 1-65535/tcp take the policy past 1048576 rule keys \
         (a range needs one key per port, destination and scope, here 22 scopes); narrow the \
         range or the scopes it is in"
    );
    // Without scopes the same rule fits: 65,535 keys in scope 0.
    let fits = policy(vec![range_rule(
        "all-ports",
        "192.0.2.0/24",
        1,
        65535,
        Protocol::Tcp,
    )]);
    assert_eq!(
        compile(&fits, &StoredRows::default(), 1)
            .unwrap()
            .rules_v4
            .len(),
        65535
    );
}

/// An FQDN rule: `host` on tcp `ports`, in namespace `scope` (`None`: node-wide).
fn name_rule(
    name: &str,
    host: &str,
    scope: Option<&str>,
    ports: &[u16],
) -> crate::policy::NameRule {
    crate::policy::NameRule {
        name: name.to_owned(),
        scope: scope.map(str::to_owned),
        origin: origin(1),
        host: match host.strip_prefix("*.") {
            Some(suffix) => HostPattern::Wildcard(suffix.to_owned()),
            None => HostPattern::Exact(host.to_owned()),
        },
        ports: ports.iter().map(|&port| PortRule::tcp(port)).collect(),
    }
}

#[test]
fn fqdn_rules_get_rows_dns_slots_and_the_dns_flag_and_no_rule_keys() {
    let mut p = policy(vec![rule("web", "192.0.2.0/24", &[443])]);
    p.name_rules = vec![
        name_rule("wiki", "www.wikipedia.test", None, &[443]),
        name_rule("wikis", "*.wikipedia.test", Some("team-a"), &[443, 80]),
    ];
    p.dns.resolvers = vec![
        "192.0.2.53".parse().unwrap(),
        "2001:db8::53".parse().unwrap(),
    ];
    let c = compile(&p, &StoredRows::default(), 1).unwrap();
    assert_ne!(c.config.flags & config_flags::DNS, 0);
    // Rows: the CIDR rule, the FQDN rules, then (dns).
    let rows = c.rows.rows();
    let names: Vec<&str> = rows.iter().map(|(_, n)| *n).collect();
    assert_eq!(names, ["web", "wiki", "team-a/wikis", DNS_RULE_NAME]);
    assert_eq!(
        c.names
            .iter()
            .map(|n| (n.name.as_str(), n.row, n.scope.as_deref()))
            .collect::<Vec<_>>(),
        [
            ("wiki", rows[1].0, None),
            ("team-a/wikis", rows[2].0, Some("team-a"))
        ]
    );
    assert_eq!(c.names[0].hash, p.name_rules[0].learned_hash());
    // No rule key of their own: only what DNS answers teach opens them.
    let rows_of_names = [rows[1].0, rows[2].0];
    assert!(
        !c.rules_v4
            .iter()
            .any(|(_, _, v)| rows_of_names.contains(&v.row))
    );
    assert!(
        !c.rules_v6
            .iter()
            .any(|(_, _, v)| rows_of_names.contains(&v.row))
    );
    // One slot per resolver, each with its listener port.
    assert_eq!(c.dns_slots.len(), 2);
    assert_eq!(c.dns_slots[0].family, egress_common::AF_INET);
    assert_eq!(&c.dns_slots[0].addr[..4], &[192, 0, 2, 53]);
    assert_eq!(u16::from_be(c.dns_slots[0].port), 53);
    assert_eq!(u16::from_be(c.dns_slots[0].listen_port), DNS_LISTEN_PORT);
    assert_eq!(c.dns_slots[1].family, egress_common::AF_INET6);
    assert_eq!(
        u16::from_be(c.dns_slots[1].listen_port),
        DNS_LISTEN_PORT + 1
    );
    // Scope ids: 0 for the node-wide scope, a stable id for team-a, the XDP backstop's own.
    assert_eq!(
        c.scope_ids,
        [
            (0, 0),
            (1, stable_scope_id(Some("team-a"))),
            (u32::from(XDP_SCOPE), XDP_LEARNED)
        ]
    );
}

#[test]
fn without_fqdn_rules_nothing_goes_to_the_dns_path() {
    let mut p = policy(vec![rule("web", "192.0.2.0/24", &[443])]);
    p.dns.resolvers = vec!["192.0.2.53".parse().unwrap()];
    let c = compile(&p, &StoredRows::default(), 1).unwrap();
    assert_eq!(c.config.flags & config_flags::DNS, 0);
    assert!(c.dns_slots.is_empty() && c.names.is_empty());
}

#[test]
fn stable_scope_ids_do_not_depend_on_the_other_scopes() {
    let id = stable_scope_id(Some("team-b"));
    let mut p = policy(vec![]);
    p.name_rules = vec![name_rule("w", "a.test", Some("team-b"), &[443])];
    let alone = compile(&p, &StoredRows::default(), 1).unwrap();
    p.name_rules
        .insert(0, name_rule("w", "a.test", Some("team-a"), &[443]));
    let with_a = compile(&p, &StoredRows::default(), 1).unwrap();
    // team-b is scope 1 alone and scope 2 beside team-a, with one id.
    assert!(alone.scope_ids.contains(&(1, id)));
    assert!(with_a.scope_ids.contains(&(2, id)));
    assert_ne!(id, 0);
    assert_ne!(id, XDP_LEARNED);
    assert_eq!(stable_scope_id(None), 0);
}

#[test]
fn aliases_turn_the_dns_path_on_when_there_is_a_resolver() {
    let alias = crate::policy::Alias {
        name: "httpbin".to_owned(),
        namespace: "default".to_owned(),
        scope: None,
        origin: origin(1),
        external_name: "httpbin.test".to_owned(),
        ports: vec![80],
    };
    let mut p = policy(vec![]);
    p.aliases = vec![alias];
    let c = compile(&p, &StoredRows::default(), 1).unwrap();
    assert_eq!(
        c.config.flags & config_flags::DNS,
        0,
        "no resolver: nothing to ask"
    );
    assert!(c.alias_names.is_empty());
    p.dns.resolvers = vec!["192.0.2.53".parse().unwrap()];
    let c = compile(&p, &StoredRows::default(), 1).unwrap();
    assert_ne!(c.config.flags & config_flags::DNS, 0);
    assert_eq!(c.dns_slots.len(), 1);
    assert_eq!(
        c.alias_names,
        [AliasName {
            hostnames: vec![
                "httpbin".to_owned(),
                "httpbin.default".to_owned(),
                "httpbin.default.svc".to_owned(),
                "httpbin.default.svc.cluster.local".to_owned()
            ],
            scope: None
        }]
    );
}
