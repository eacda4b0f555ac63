//! FQDN rules: EgressRule documents with a host-name or `*.`-wildcard destination and tcp/udp
//! ports, as seed 003 would have written them with names.

use super::*;

/// An EgressRule with `service` and `ports` (flow mappings, one a line from line 8).
fn name_rule(name: &str, service: &str, ports: &[&str]) -> String {
    let ports: String = ports.iter().map(|p| format!("    - {p}\n")).collect();
    format!(
        "kind: EgressRule\nmetadata:\n  name: {name}\nspec:\n  destination:\n    service: \
         {service}\n  ports:\n{ports}"
    )
}

#[test]
fn host_names_with_tcp_and_udp_ports_are_fqdn_rules() {
    let yaml = format!(
        "{}---\n{}---\n{}",
        name_rule(
            "wikipedia",
            "www.Wikipedia.TEST.",
            &["{port: 443, protocol: TCP}", "{port: 80, protocol: tcp}"]
        ),
        name_rule(
            "wikis",
            "\"*.wikipedia.test\"",
            &[
                "{port: 443, protocol: tcp}",
                "{port: 8000, endPort: 8009, protocol: udp}"
            ]
        ),
        "kind: EgressRule\nmetadata:\n  name: ntp\n  namespace: team-a\nspec:\n  destination:\n    \
         service: ntp.test\n  ports:\n    - {port: 123, protocol: udp}\n"
    );
    let policy = loaded(&yaml);
    assert!(policy.rules.is_empty() && policy.http_rules.is_empty());
    let names: Vec<(String, String, Vec<String>)> = policy
        .name_rules
        .iter()
        .map(|r| {
            (
                r.row_name().into_owned(),
                r.host.to_string(),
                r.ports.iter().map(ToString::to_string).collect(),
            )
        })
        .collect();
    assert_eq!(
        names,
        [
            (
                "wikipedia".to_owned(),
                "www.wikipedia.test".to_owned(),
                vec!["443/tcp".to_owned(), "80/tcp".to_owned()]
            ),
            (
                "wikis".to_owned(),
                "*.wikipedia.test".to_owned(),
                vec!["443/tcp".to_owned(), "8000-8009/udp".to_owned()]
            ),
            (
                "team-a/ntp".to_owned(),
                "ntp.test".to_owned(),
                vec!["123/udp".to_owned()]
            ),
        ]
    );
    assert_eq!(policy.name_rules[0].origin.line, 1);
    // A namespace's FQDN rule makes it a scope, as its other rules do.
    assert_eq!(policy.scopes(), ["team-a"]);
    // `egress check` lists them.
    let shown = policy.to_string();
    assert!(shown.contains("fqdn rules: 3"), "{shown}");
    assert!(
        shown.lines().any(|l| l.starts_with("wikis ")
            && l.contains(" *.wikipedia.test ")
            && l.contains(" 443/tcp, 8000-8009/udp ")
            && l.ends_with("(p.yaml:11)")),
        "{shown}"
    );
}

#[test]
fn the_rule_hash_changes_with_the_name_and_the_pattern_only() {
    let hash = |name: &str, service: &str, port: &str| {
        loaded(&name_rule(name, service, &[port])).name_rules[0].learned_hash()
    };
    let base = hash("w", "www.wikipedia.test", "{port: 443, protocol: tcp}");
    assert_eq!(
        base,
        hash("w", "www.wikipedia.test", "{port: 80, protocol: tcp}"),
        "ports are checked entry by entry, not by the hash"
    );
    assert_ne!(
        base,
        hash("v", "www.wikipedia.test", "{port: 443, protocol: tcp}")
    );
    assert_ne!(
        base,
        hash("w", "\"*.wikipedia.test\"", "{port: 443, protocol: tcp}")
    );
}

rejects! {
    fqdn_rule_mixing_tcp_and_http: name_rule("web", "example.test",
            &["{port: 443, protocol: tcp}", "{port: 80, protocol: http}"])
        => "p.yaml:9: spec.ports[1].protocol: `http` and `tcp` (spec.ports[0]) cannot share a \
            rule: tcp and udp ports are judged by the kernel and http/https ports by the proxy; \
            write two rules";
    fqdn_rule_with_a_bare_wildcard: name_rule("web", "\"*\"", &["{port: 443, protocol: tcp}"])
        => "p.yaml:6: spec.destination.service:";
    fqdn_rule_with_a_bad_name: name_rule("web", "bad_name!.test", &["{port: 443, protocol: tcp}"])
        => "p.yaml:6: spec.destination.service:";
}
