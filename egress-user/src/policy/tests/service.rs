//! `kind: Service` documents (ExternalName aliases): the seed's documents as written, what
//! they mean, and what is refused.

use super::*;

/// The two Service documents of seed 000 (Istio's "Configuring Egress with Envoy" task),
/// verbatim, joined into one stream.
const SEED_SERVICES: &str = crate::policy::seeds::SERVICES;

/// One Service, one field a line: 1 apiVersion, 2 kind, 3 metadata, 4 name, 5 spec, 6 type,
/// 7 externalName, 8 ports, 9 port.
const SERVICE: &str = "\
apiVersion: v1
kind: Service
metadata:
  name: httpbin
spec:
  type: ExternalName
  externalName: httpbin.test
  ports:
  - port: 80
";

/// `SERVICE` with the first `from` replaced by `to`.
fn service_with(from: &str, to: &str) -> String {
    assert!(SERVICE.contains(from), "{from:?} is not in SERVICE");
    SERVICE.replacen(from, to, 1)
}

#[test]
fn seed_services_load_as_written() {
    let policy = loaded(SEED_SERVICES);
    assert!(policy.rules.is_empty());
    assert!(policy.http_rules.is_empty());
    let alias = |name: &str, line, external_name: &str, port| Alias {
        scope: None,
        name: name.to_owned(),
        namespace: "default".to_owned(),
        origin: Origin {
            file: "p.yaml".to_owned(),
            line,
        },
        external_name: external_name.to_owned(),
        ports: vec![port],
    };
    assert_eq!(
        policy.aliases,
        [
            alias("httpbin", 1, "httpbin.org", 80),
            alias("securegoogle", 11, "www.google.com", 443),
        ]
    );
    assert_eq!(
        policy.aliases[0].hostnames(),
        [
            "httpbin",
            "httpbin.default",
            "httpbin.default.svc",
            "httpbin.default.svc.cluster.local"
        ]
    );
    assert_eq!(Alias::protocol(80), HttpProtocol::Http);
    assert_eq!(Alias::protocol(443), HttpProtocol::Https);
}

#[test]
fn normalised_form_of_the_seed_services() {
    assert_eq!(
        loaded(SEED_SERVICES).to_string(),
        "\
mode: enforce
bypass: 127.0.0.0/8, ::1/128
rules: 0
http rules: 0
aliases: 2
alias httpbin (httpbin, httpbin.default, httpbin.default.svc, httpbin.default.svc.cluster.local) -> httpbin.org 80/http                                (p.yaml:1)
alias securegoogle (securegoogle, securegoogle.default, securegoogle.default.svc, securegoogle.default.svc.cluster.local) -> www.google.com 443/https  (p.yaml:11)
proxy: port 15001
caFiles: none
hosts: 0
"
    );
}

#[test]
fn kubernetes_fields_of_a_service_are_understood() {
    let policy = loaded(&service_with(
        "  name: httpbin\n",
        "  name: httpbin\n  namespace: egress\n  labels: {app: httpbin}\n  annotations:\n    \
         note: x\n",
    ));
    let alias = &policy.aliases[0];
    assert_eq!(alias.namespace, "egress");
    assert_eq!(alias.hostnames()[3], "httpbin.egress.svc.cluster.local");
    let policy = loaded(&service_with(
        "  - port: 80\n",
        "  - port: 80\n    name: http\n    protocol: TCP\n    targetPort: 80\n  - {port: 443, \
         name: https, protocol: tcp}\n  - port: 8080\n",
    ));
    assert_eq!(policy.aliases[0].ports, [80, 443, 8080]);
    assert!(
        policy
            .to_string()
            .contains(") -> httpbin.test 80/http, 443/https, 8080/http  (p.yaml:1)\n"),
        "{policy}"
    );
    // The external name is normalised like any host name.
    let policy = loaded(&service_with("httpbin.test", "Bücher.Test."));
    assert_eq!(policy.aliases[0].external_name, "xn--bcher-kva.test");
    // apiVersion may be left out.
    assert_eq!(
        loaded(&service_with("apiVersion: v1\n", "")).aliases.len(),
        1
    );
}

#[test]
fn services_and_rules_have_separate_name_spaces() {
    let rule = RULE.replace("r1", "httpbin");
    let other_namespace = service_with("  name: httpbin\n", "  name: other\n  namespace: x\n");
    let policy = loaded(&format!("{SERVICE}---\n{rule}---\n{other_namespace}"));
    assert_eq!(policy.aliases.len(), 2);
    assert_eq!(policy.rules[0].name, "httpbin");
}

rejects! {
    service_type_cluster_ip: service_with("type: ExternalName", "type: ClusterIP")
        => "p.yaml:6: spec.type: Service type `ClusterIP` is not supported (only type \
            ExternalName is supported: a Service here is an alias for an external host)";
    service_type_alone_is_reported: "apiVersion: v1\nkind: Service\nmetadata: {name: web}\n\
            spec:\n  type: ClusterIP\n  selector: {app: web}\n  ports: [{port: 80, targetPort: 8080}]\n"
        => "p.yaml:5: spec.type: Service type `ClusterIP` is not supported";
    service_type_missing: service_with("  type: ExternalName\n", "")
        => "p.yaml:5: spec.type: missing field (only type ExternalName is supported";
    missing_external_name: service_with("  externalName: httpbin.test\n", "")
        => "p.yaml:5: spec.externalName: missing field";
    external_name_is_an_ip: service_with("httpbin.test", "192.0.2.1")
        => "p.yaml:7: spec.externalName: `192.0.2.1` is an IP address; externalName must be a DNS \
            name (an ExternalName Service is a DNS alias; for an address, write an EgressRule \
            with a CIDR destination)";
    external_name_is_an_ipv6: service_with("httpbin.test", "\"2001:db8::1\"")
        => "p.yaml:7: spec.externalName: `2001:db8::1` is an IP address";
    external_name_is_a_wildcard: service_with("httpbin.test", "\"*.example.test\"")
        => "p.yaml:7: spec.externalName: `*.example.test` is a wildcard; externalName must be one \
            host name";
    external_name_bad_label: service_with("httpbin.test", "http_bin.test")
        => "p.yaml:7: spec.externalName: `http_bin.test`: label `http_bin` may hold only letters";
    external_name_not_a_string: service_with("httpbin.test", "[a]")
        => "p.yaml:7: spec.externalName: expected a string, found a sequence";
    duplicate_service: format!("{SERVICE}---\n{}", service_with("httpbin.test", "other.test"))
        => "p.yaml:14: metadata.name: duplicate Service `httpbin` in namespace `default` (the \
            first is at p.yaml:4)";
    duplicate_service_explicit_namespace: format!("{SERVICE}---\n{}",
            service_with("  name: httpbin\n", "  name: httpbin\n  namespace: default\n"))
        => "p.yaml:14: metadata.name: duplicate Service `httpbin` in namespace `default`";
    short_name_in_two_namespaces: format!("{SERVICE}---\n{}",
            service_with("  name: httpbin\n", "  namespace: prod\n  name: httpbin\n"))
        => "p.yaml:15: metadata.name: Service `httpbin` in namespace `prod` would answer to the \
            host name `httpbin`, which the Service in namespace `default` (at p.yaml:4) already \
            does; the proxy cannot tell a client's namespace, so give one of them another name";
    service_name_with_dots: service_with("name: httpbin", "name: httpbin.ext")
        => "p.yaml:4: metadata.name: \"httpbin.ext\" is not a valid Service name (a DNS label";
    service_name_starting_with_a_digit: service_with("name: httpbin", "name: 1httpbin")
        => "p.yaml:4: metadata.name: \"1httpbin\" is not a valid Service name";
    service_name_missing: service_with("  name: httpbin\n", "  labels: {}\n")
        => "p.yaml:3: metadata.name: missing field";
    service_namespace_invalid: service_with("  name: httpbin\n", "  name: httpbin\n  namespace: Prod\n")
        => "p.yaml:5: metadata.namespace: \"Prod\" is not a valid namespace";
    service_unknown_metadata: service_with("  name: httpbin\n", "  name: httpbin\n  uid: x\n")
        => "p.yaml:5: metadata.uid: unknown field (expected name or namespace)";
    service_api_version: service_with("apiVersion: v1", "apiVersion: apps/v1")
        => "p.yaml:1: apiVersion: a Service is apiVersion v1, not `apps/v1`";
    service_unknown_spec_field: service_with("  ports:\n", "  selector: {app: web}\n  ports:\n")
        => "p.yaml:8: spec.selector: unknown field (expected type, externalName or ports)";
    service_missing_ports: service_with("  ports:\n  - port: 80\n", "")
        => "p.yaml:5: spec.ports: missing field";
    service_no_ports: service_with("  ports:\n  - port: 80\n", "  ports: []\n")
        => "p.yaml:8: spec.ports: an ExternalName Service needs at least one port";
    service_port_zero: service_with("port: 80", "port: 0")
        => "p.yaml:9: spec.ports[0].port: 0 is not a valid port (1-65535)";
    service_duplicate_port: service_with("  - port: 80\n", "  - port: 80\n  - port: 80\n")
        => "p.yaml:10: spec.ports[1]: duplicate port 80 (also spec.ports[0])";
    service_udp_port: service_with("  - port: 80\n", "  - port: 80\n    protocol: UDP\n")
        => "p.yaml:10: spec.ports[0].protocol: only TCP is supported for a Service port, not `UDP`";
    service_target_port_differs: service_with("  - port: 80\n", "  - port: 80\n    targetPort: 8080\n")
        => "p.yaml:10: spec.ports[0].targetPort: targetPort 8080 differs from port 80: requests go \
            to externalName on the same port, so remove targetPort or make it 80";
    service_named_target_port: service_with("  - port: 80\n", "  - port: 80\n    targetPort: web\n")
        => "p.yaml:10: spec.ports[0].targetPort: a named targetPort (`web`) means nothing for an \
            ExternalName Service";
    service_unknown_port_field: service_with("  - port: 80\n", "  - port: 80\n    nodePort: 30080\n")
        => "p.yaml:10: spec.ports[0].nodePort: unknown field (expected port, name, protocol or \
            targetPort)";
}

#[test]
fn a_service_that_names_its_namespace_is_for_that_namespaces_pods() {
    let named = service_with(
        "metadata:\n  name: httpbin\n",
        "metadata:\n  name: httpbin\n  namespace: team-a\n",
    );
    let alias = &loaded(&named).aliases[0];
    assert_eq!(
        (alias.namespace.as_str(), alias.scope.as_deref()),
        ("team-a", Some("team-a"))
    );
    assert_eq!(loaded(&named).scopes(), ["team-a"]);
    // Without one: in `default` for its host names, for every workload.
    let alias = &loaded(SERVICE).aliases[0];
    assert_eq!(
        (alias.namespace.as_str(), alias.scope.as_deref()),
        ("default", None)
    );
}
