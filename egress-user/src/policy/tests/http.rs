//! EgressRule documents with a host-name or `*.`-wildcard destination: http/https rules for
//! the proxy, the normal form of host names, and what is refused.

use super::*;

/// An EgressRule, one field a line: 1 kind, 2 metadata, 3 name, 4 spec, 5 destination,
/// 6 service, 7 ports, then one line per entry of `ports` (flow mappings) from line 8.
fn host_rule(name: &str, service: &str, ports: &[&str]) -> String {
    let ports: String = ports.iter().map(|p| format!("    - {p}\n")).collect();
    format!(
        "kind: EgressRule\nmetadata:\n  name: {name}\nspec:\n  destination:\n    service: \
         {service}\n  ports:\n{ports}"
    )
}

/// `host_rule` with one port, 80/http.
fn http_rule(service: &str) -> String {
    host_rule("web", service, &["{port: 80, protocol: http}"])
}

fn origin(line: usize) -> Origin {
    Origin {
        file: "p.yaml".to_owned(),
        line,
    }
}

#[test]
fn http_and_https_host_rules() {
    let yaml = format!(
        "{}---\n{}",
        host_rule(
            "web",
            "Example.TEST.",
            &["{port: 80, protocol: HTTP}", "{port: 443, protocol: https}"]
        ),
        host_rule(
            "wild",
            "\"*.bücher.test\"",
            &["{port: 8443, protocol: HTTPS}"]
        ),
    );
    let policy = loaded(&yaml);
    assert!(policy.rules.is_empty());
    assert_eq!(
        policy.http_rules,
        [
            HttpRule {
                scope: None,
                name: "web".to_owned(),
                origin: origin(1),
                host: HostPattern::Exact("example.test".to_owned()),
                ports: vec![
                    HttpPort {
                        port: 80,
                        protocol: HttpProtocol::Http,
                    },
                    HttpPort {
                        port: 443,
                        protocol: HttpProtocol::Https,
                    },
                ],
            },
            HttpRule {
                scope: None,
                name: "wild".to_owned(),
                origin: origin(11),
                host: HostPattern::Wildcard("xn--bcher-kva.test".to_owned()),
                ports: vec![HttpPort {
                    port: 8443,
                    protocol: HttpProtocol::Https,
                }],
            },
        ]
    );
    let shown = policy.to_string();
    assert!(
        shown.contains(
            "\nhttp rules: 2\n\
             web   example.test          80/http, 443/https  (p.yaml:1)\n\
             wild  *.xn--bcher-kva.test  8443/https          (p.yaml:11)\n"
        ),
        "{shown}"
    );
}

#[test]
fn tcp_and_http_rules_live_side_by_side() {
    let yaml = format!("{RULE}---\n{}", http_rule("httpbin.test"));
    let policy = loaded(&yaml);
    assert_eq!(policy.rules.len(), 1);
    assert_eq!(policy.http_rules.len(), 1);
    assert_eq!(
        policy.http_rules[0].host,
        HostPattern::Exact("httpbin.test".to_owned())
    );
}

#[test]
fn host_names_are_normalised() {
    for (written, normal) in [
        ("bücher.test", "xn--bcher-kva.test"),
        ("BÜCHER.test", "xn--bcher-kva.test"),
        ("example.test.", "example.test"),
        ("WWW.Example.Test", "www.example.test"),
        ("\"*.Example.Test.\"", "*.example.test"),
        ("httpbin", "httpbin"),
        ("\"*.example.co.uk\"", "*.example.co.uk"),
    ] {
        let policy = loaded(&http_rule(written));
        assert_eq!(policy.http_rules[0].host.to_string(), normal, "{written}");
    }
}

#[test]
fn wildcards_match_only_strictly_below_their_suffix() {
    let policy = loaded(&http_rule("\"*.example.test\""));
    let host = &policy.http_rules[0].host;
    assert_eq!(host, &HostPattern::Wildcard("example.test".to_owned()));
    assert!(host.matches("a.example.test"));
    assert!(host.matches("a.b.example.test"));
    assert!(!host.matches("example.test"));
    assert!(!host.matches("badexample.test"));
    assert!(!host.matches("a.example.test.other.test"));
    // The proxy normalises a request's Host the same way before matching.
    let request = normalise_host("A.Example.Test.").expect("valid");
    assert!(host.matches(&request));
}

#[test]
fn same_host_and_port_in_two_rules_is_fine_when_they_agree() {
    let yaml = format!(
        "{}---\n{}",
        host_rule("a", "example.test", &["{port: 443, protocol: https}"]),
        host_rule("b", "EXAMPLE.test", &["{port: 443, protocol: HTTPS}"]),
    );
    assert_eq!(loaded(&yaml).http_rules.len(), 2);
}

#[test]
fn a_host_port_cannot_be_http_in_one_rule_and_https_in_another() {
    let yaml = format!(
        "{}---\n{}",
        host_rule("a", "example.test", &["{port: 443, protocol: https}"]),
        host_rule(
            "b",
            "example.test",
            &["{port: 80, protocol: http}", "{port: 443, protocol: http}"]
        ),
    );
    assert_rejected(
        &yaml,
        "p.yaml:18: spec.ports[1]: example.test port 443 is http here but https in rule `a` \
         (at p.yaml:8); a host's port has one protocol",
    );
}

#[test]
fn http_and_tcp_rules_share_the_name_space() {
    let yaml = format!(
        "{RULE}---\n{}",
        http_rule("example.test").replace("web", "r1")
    );
    assert_rejected(
        &yaml,
        "p.yaml:13: metadata.name: duplicate name `r1` (the first is at p.yaml:3)",
    );
}

#[test]
fn labels_and_names_have_a_length_limit() {
    let long_label = "a".repeat(64);
    assert_rejected(
        &http_rule(&format!("{long_label}.test")),
        &format!(
            "p.yaml:6: spec.destination.service: `{long_label}.test`: label `{long_label}` is \
             longer than 63 characters"
        ),
    );
    let name = format!("{0}.{0}.{0}.{1}", "a".repeat(63), "b".repeat(62));
    assert_eq!(name.len(), 254);
    assert_rejected(
        &http_rule(&name),
        &format!(
            "p.yaml:6: spec.destination.service: `{name}` is 254 characters long in ASCII; a \
             host name has at most 253"
        ),
    );
    // 253 is fine, and so is a trailing dot on top of it.
    let name = format!("{0}.{0}.{0}.{1}", "a".repeat(63), "b".repeat(61));
    assert_eq!(
        loaded(&http_rule(&format!("{name}."))).http_rules[0]
            .host
            .to_string(),
        name
    );
}

rejects! {
    bare_wildcard: http_rule("\"*\"")
        => "p.yaml:6: spec.destination.service: `*` alone would allow every host; name a domain, \
            as in `*.example.test`";
    wildcard_over_com: http_rule("\"*.com\"")
        => "p.yaml:6: spec.destination.service: `*.com` would allow every domain under the public \
            suffix `com`; name a domain below it, as in `*.example.com`";
    wildcard_over_co_uk: http_rule("\"*.co.uk\"")
        => "p.yaml:6: spec.destination.service: `*.co.uk` would allow every domain under the \
            public suffix `co.uk`";
    wildcard_over_private_suffix: http_rule("\"*.github.io\"")
        => "p.yaml:6: spec.destination.service: `*.github.io` would allow every domain under the \
            public suffix `github.io`";
    wildcard_over_unlisted_tld: http_rule("\"*.test\"")
        => "p.yaml:6: spec.destination.service: `*.test` would allow every domain under the \
            top-level domain `test`";
    wildcard_not_first: http_rule("\"a.*.example.test\"")
        => "p.yaml:6: spec.destination.service: `a.*.example.test`: `*` may only be the whole \
            first label";
    wildcard_inside_label: http_rule("\"*example.test\"")
        => "p.yaml:6: spec.destination.service: `*example.test`: `*` may only be the whole first \
            label";
    bad_label_character: http_rule("a_b.example.test")
        => "p.yaml:6: spec.destination.service: `a_b.example.test`: label `a_b` may hold only \
            letters, digits and '-'";
    bad_label_hyphen: http_rule("-a.example.test")
        => "p.yaml:6: spec.destination.service: `-a.example.test`: label `-a` starts or ends \
            with '-'";
    empty_label: http_rule("a..example.test")
        => "p.yaml:6: spec.destination.service: `a..example.test`: label `` is empty";
    numeric_last_label: http_rule("example.123")
        => "p.yaml:6: spec.destination.service: `example.123` ends in a number, so clients read \
            it as an IP address, not a host name";
    broken_punycode: http_rule("xn--a.example.test")
        => "p.yaml:6: spec.destination.service: `xn--a.example.test` is not a valid \
            internationalised host name";
    empty_destination: http_rule("\"\"")
        => "p.yaml:6: spec.destination.service: the destination is empty (expected a CIDR, an \
            IP address or a host name)";
    mixed_http_then_tcp: host_rule("web", "example.test",
            &["{port: 80, protocol: http}", "{port: 443, protocol: tcp}"])
        => "p.yaml:9: spec.ports[1].protocol: `tcp` and `http` (spec.ports[0]) cannot share a \
            rule: tcp and udp ports are judged by the kernel and http/https ports by the proxy; \
            write two rules";
    mixed_tcp_then_https: host_rule("web", "192.0.2.0/24",
            &["{port: 22, protocol: tcp}", "{port: 443, protocol: https}"])
        => "p.yaml:9: spec.ports[1].protocol: `https` and `tcp` (spec.ports[0]) cannot share a \
            rule";
    one_port_two_protocols: host_rule("web", "example.test",
            &["{port: 80, protocol: http}", "{port: 80, protocol: https}"])
        => "p.yaml:9: spec.ports[1]: port 80 is already spec.ports[0] as 80/http; a port has one \
            protocol in a rule";
    duplicate_http_port: host_rule("web", "example.test",
            &["{port: 80, protocol: http}", "{port: 80, protocol: HTTP}"])
        => "p.yaml:9: spec.ports[1]: duplicate port 80/http (also spec.ports[0])";
    http_range: host_rule("web", "example.test", &["{port: 8000, endPort: 8010, protocol: http}"])
        => "p.yaml:8: spec.ports[0].endPort: a port range cannot be http: the proxy takes each \
            of its ports on its own; list the ports";
    https_range_of_one: host_rule("web", "example.test",
            &["{port: 443, endPort: 443, protocol: https}"])
        => "p.yaml:8: spec.ports[0].endPort: a port range cannot be https";
    grpc_is_unknown: host_rule("web", "example.test", &["{port: 80, protocol: GRPC}"])
        => "p.yaml:8: spec.ports[0].protocol: unknown protocol `GRPC` (expected tcp, udp, http, \
            https or tls)";
}

#[test]
fn mixed_ports_are_reported_even_with_a_bad_destination() {
    let yaml = host_rule(
        "web",
        "\"*.co.uk\"",
        &["{port: 80, protocol: http}", "{port: 22, protocol: tcp}"],
    );
    let errors = errors(&yaml);
    assert_eq!(errors.len(), 2, "{errors:#?}");
    assert!(errors[0].starts_with("p.yaml:6: spec.destination.service: `*.co.uk`"));
    assert!(errors[1].starts_with("p.yaml:9: spec.ports[1].protocol: `tcp` and `http`"));
}

#[test]
fn tls_ports_are_passthrough_ports_of_the_proxy() {
    let p = loaded(&host_rule(
        "api",
        "\"*.api.test\"",
        &["{port: 443, protocol: tls}", "{port: 8443, protocol: TLS}"],
    ));
    assert_eq!(
        p.http_rules[0].ports,
        [
            HttpPort {
                port: 443,
                protocol: HttpProtocol::Tls
            },
            HttpPort {
                port: 8443,
                protocol: HttpProtocol::Tls
            }
        ]
    );
    assert!(p.to_string().contains("443/tls, 8443/tls"), "{p}");
}

rejects! {
    tls_with_an_address: host_rule("web", "192.0.2.1", &["{port: 443, protocol: tls}"])
        => "p.yaml:6: spec.destination.service: http, https and tls rules need a host name \
            destination, and `192.0.2.1/32` is an address";
    tls_range: host_rule("web", "api.test", &["{port: 443, endPort: 444, protocol: tls}"])
        => "p.yaml:8: spec.ports[0].endPort: a port range cannot be tls";
    tls_beside_tcp: host_rule("web", "api.test",
            &["{port: 443, protocol: tls}", "{port: 22, protocol: tcp}"])
        => "p.yaml:9: spec.ports[1].protocol: `tcp` and `tls` (spec.ports[0]) cannot share a rule";
}
