//! The EgressConfig's proxy port, `caFiles`, `hosts`, `dns` and `allowSockets`: what they
//! mean and what is refused.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::PathBuf,
};

use super::*;

/// An EgressConfig with every new setting, one field a line: 1 kind, 2 spec, 3 proxy,
/// 4 port, 5 caFiles, 6 and 7 the files, 8 hosts, 9 and 10 the hosts.
const CONFIG: &str = "\
kind: EgressConfig
spec:
  proxy:
    port: 15002
  caFiles:
    - /etc/egress/ca.pem
    - certs/extra.pem
  hosts:
    db.internal.test: [192.0.2.10, 2001:db8::10]
    Cache.Internal.Test.: 192.0.2.11
";

/// `CONFIG` with the first `from` replaced by `to`.
fn config_with(from: &str, to: &str) -> String {
    assert!(CONFIG.contains(from), "{from:?} is not in CONFIG");
    CONFIG.replacen(from, to, 1)
}

fn ip(text: &str) -> IpAddr {
    text.parse().expect("valid literal")
}

/// A directory holding `CONFIG` as `policy/config.yaml`, with its two CA files made real:
/// `/etc/egress/ca.pem` becomes `<dir>/ca.pem`, and `certs/extra.pem` is next to the policy.
pub(super) struct ConfigDir {
    /// The directory.
    pub(super) dir: PathBuf,
    /// The policy file.
    pub(super) file: PathBuf,
    /// The absolute CA file.
    pub(super) ca: PathBuf,
    /// Removes the directory when dropped.
    _tmp: TempDir,
}

impl ConfigDir {
    pub(super) fn new(name: &str) -> Self {
        let tmp = TempDir::new(name);
        let dir = tmp.0.clone();
        std::fs::create_dir_all(dir.join("policy/certs")).expect("temp dir");
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, ca_pem()).expect("write");
        std::fs::write(dir.join("policy/certs/extra.pem"), ca_pem()).expect("write");
        let file = dir.join("policy/config.yaml");
        let text = config_with("/etc/egress/ca.pem", &ca.display().to_string());
        std::fs::write(&file, text).expect("write");
        Self {
            dir,
            file,
            ca,
            _tmp: tmp,
        }
    }
}

/// A self-signed CA certificate, in PEM.
pub(super) fn ca_pem() -> String {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.self_signed(&key).expect("certificate").pem()
}

#[test]
fn proxy_idle_timeout_in_seconds() {
    let policy =
        loaded("kind: EgressConfig\nspec:\n  proxy:\n    port: 15002\n    idleTimeout: 300\n");
    assert_eq!(
        policy.proxy.idle_timeout,
        std::time::Duration::from_secs(300)
    );
    assert!(
        policy
            .to_string()
            .contains("\nproxy: port 15002, idle timeout 300s\n"),
        "{policy}"
    );
    // Alone, without a port.
    let policy = loaded("kind: EgressConfig\nspec:\n  proxy: {idleTimeout: 1}\n");
    assert_eq!(
        policy.proxy,
        ProxySettings {
            port: DEFAULT_PROXY_PORT,
            idle_timeout: std::time::Duration::from_secs(1)
        }
    );
}

#[test]
fn proxy_ca_files_and_hosts() {
    let files = ConfigDir::new("ca-files");
    let policy = load_files(std::slice::from_ref(&files.file))
        .unwrap_or_else(|e| panic!("should load, got:\n{e}"));
    assert_eq!(
        policy.proxy,
        ProxySettings {
            port: 15002,
            idle_timeout: DEFAULT_PROXY_IDLE_TIMEOUT
        }
    );
    // A relative path is relative to the policy file's directory, and made absolute.
    let extra = std::path::absolute(files.dir.join("policy/certs/extra.pem")).expect("absolute");
    assert_eq!(policy.ca_files, [files.ca.clone(), extra.clone()]);
    let hosts: BTreeMap<String, Vec<IpAddr>> = [
        ("cache.internal.test".to_owned(), vec![ip("192.0.2.11")]),
        (
            "db.internal.test".to_owned(),
            vec![ip("192.0.2.10"), ip("2001:db8::10")],
        ),
    ]
    .into();
    assert_eq!(policy.hosts, hosts);
    let shown = policy.to_string();
    assert!(
        shown.ends_with(&format!(
            "\nproxy: port 15002\n\
             caFiles: {}, {}\n\
             hosts: 2\n\
             cache.internal.test  192.0.2.11\n\
             db.internal.test     192.0.2.10, 2001:db8::10\n",
            files.ca.display(),
            extra.display()
        )),
        "{shown}"
    );
}

#[test]
fn defaults_when_not_given() {
    let policy = loaded(RULE);
    assert_eq!(policy.proxy.port, DEFAULT_PROXY_PORT);
    assert!(policy.ca_files.is_empty());
    assert!(policy.hosts.is_empty());
    let policy = loaded("kind: EgressConfig\nspec:\n  proxy: {}\n  caFiles: []\n  hosts: {}\n");
    assert_eq!(policy.proxy, ProxySettings::default());
    assert!(policy.ca_files.is_empty());
    assert!(policy.hosts.is_empty());
}

/// An EgressConfig whose spec opens with `head` and goes on with a list of `entries`, one a
/// line, indented by `indent` spaces.
fn config_list(head: &str, indent: usize, entries: &[&str]) -> String {
    let entries: String = entries
        .iter()
        .map(|e| format!("{:indent$}- {e}\n", ""))
        .collect();
    format!("kind: EgressConfig\nspec:\n{head}{entries}")
}

/// An EgressConfig whose `dns.resolvers` has one entry a line, from line 5 (`dns` is on 3).
fn resolvers(entries: &[&str]) -> String {
    config_list("  dns:\n    resolvers:\n", 6, entries)
}

#[test]
fn dns_resolvers_from_the_config() {
    let policy = loaded(&resolvers(&[
        "192.0.2.53",
        "2001:db8::53",
        "64:ff9b::c000:235",
    ]));
    assert_eq!(
        policy.dns,
        Dns {
            resolvers: vec![
                ip("192.0.2.53"),
                ip("2001:db8::53"),
                ip("64:ff9b::c000:235")
            ],
            source: DnsSource::Config(Origin {
                file: "p.yaml".to_owned(),
                line: 3,
            }),
        }
    );
    assert!(
        policy.to_string().contains(
            "\nbypass: 127.0.0.0/8, ::1/128\ndns: 192.0.2.53, 2001:db8::53, 64:ff9b::c000:235 \
             (from p.yaml:3)\nrules: 0\n"
        ),
        "{policy}"
    );
    let none = loaded("kind: EgressConfig\nspec:\n  dns: {resolvers: []}\n");
    assert!(none.dns.resolvers.is_empty());
    assert_eq!(
        none.dns.source,
        DnsSource::Config(Origin {
            file: "p.yaml".to_owned(),
            line: 3,
        })
    );
    assert!(
        none.to_string().contains("\ndns: none (from p.yaml:3)\n"),
        "{none}"
    );
}

#[test]
fn dns_is_not_filled_by_loading_alone() {
    let policy = loaded(RULE);
    assert_eq!(policy.dns, Dns::default());
    assert_eq!(policy.dns.source, DnsSource::None);
    assert!(!policy.to_string().contains("dns:"), "{policy}");
}

/// An EgressConfig whose `allowSockets` has one entry a line, from line 4.
fn sockets(entries: &[&str]) -> String {
    config_list("  allowSockets:\n", 4, entries)
}

#[test]
fn allow_sockets_names_and_numbers() {
    let policy = loaded(&sockets(&[
        "raw", "ICMP", "sctp", "udplite", "mptcp", "0", "255", "47",
    ]));
    assert!(policy.allow_sockets.raw);
    assert_eq!(
        policy.allow_sockets.protocols,
        BTreeSet::from([0, 1, 47, 58, 132, 136, 255, 262])
    );
    assert!(
        policy.to_string().contains(
            "\nallowSockets: raw, 0, 1 (icmp), 47, 58 (icmpv6), 132 (sctp), 136 (udplite), 255, \
             262 (mptcp)\n"
        ),
        "{policy}"
    );
    let one = loaded(&sockets(&["58"]));
    assert!(!one.allow_sockets.raw);
    assert_eq!(one.allow_sockets.protocols, BTreeSet::from([58]));
}

#[test]
fn allow_sockets_default_to_nothing() {
    for policy in [
        loaded(RULE),
        loaded("kind: EgressConfig\nspec: {allowSockets: []}\n"),
    ] {
        assert_eq!(policy.allow_sockets, AllowSockets::default());
        assert!(!policy.allow_sockets.raw);
        assert!(policy.allow_sockets.protocols.is_empty());
        assert!(!policy.to_string().contains("allowSockets"), "{policy}");
    }
}

rejects! {
    dns_not_a_mapping: "kind: EgressConfig\nspec:\n  dns: [192.0.2.53]\n"
        => "p.yaml:3: spec.dns: expected a mapping, found a sequence";
    dns_without_resolvers: "kind: EgressConfig\nspec:\n  dns: {}\n"
        => "p.yaml:3: spec.dns.resolvers: missing field";
    dns_unknown_field: "kind: EgressConfig\nspec:\n  dns:\n    resolvers: []\n    search: [a.test]\n"
        => "p.yaml:5: spec.dns.search: unknown field (expected resolvers)";
    dns_resolvers_not_a_list: "kind: EgressConfig\nspec:\n  dns:\n    resolvers: 192.0.2.53\n"
        => "p.yaml:4: spec.dns.resolvers: expected a sequence, found a string \"192.0.2.53\"";
    dns_network: resolvers(&["192.0.2.53", "192.0.2.0/24"])
        => "p.yaml:6: spec.dns.resolvers[1]: `192.0.2.0/24` is a network; a single IP address is \
            needed here";
    dns_host_name: resolvers(&["dns.example.test"])
        => "p.yaml:5: spec.dns.resolvers[0]: `dns.example.test` is a host name; a resolver is an \
            IP address";
    dns_ipv4_mapped: resolvers(&["\"::ffff:192.0.2.53\""])
        => "p.yaml:5: spec.dns.resolvers[0]: `::ffff:192.0.2.53` is an IPv4-mapped IPv6 address, \
            which the kernel judges as `192.0.2.53`; write `192.0.2.53`";
    dns_unspecified: resolvers(&["0.0.0.0"])
        => "p.yaml:5: spec.dns.resolvers[0]: `0.0.0.0` is not an address a host can have";
    dns_bad_octet: resolvers(&["192.0.2.053"])
        => "p.yaml:5: spec.dns.resolvers[0]: `192.0.2.053`: octet `053` has a leading zero";
    dns_duplicate: resolvers(&["2001:db8::53", "192.0.2.53", "2001:DB8:0::53"])
        => "p.yaml:7: spec.dns.resolvers[2]: duplicate of spec.dns.resolvers[0] (2001:db8::53)";
    dns_number: resolvers(&["53"])
        => "p.yaml:5: spec.dns.resolvers[0]: expected a string, found an integer `53`";
    sockets_tcp: sockets(&["raw", "tcp"])
        => "p.yaml:5: spec.allowSockets[1]: `tcp`: tcp and udp sockets are always allowed; rules \
            judge their traffic";
    sockets_udp: sockets(&["UDP"])
        => "p.yaml:4: spec.allowSockets[0]: `UDP`: tcp and udp sockets are always allowed; rules \
            judge their traffic";
    sockets_6: sockets(&["6"])
        => "p.yaml:4: spec.allowSockets[0]: `6`: tcp and udp sockets are always allowed";
    sockets_17: sockets(&["17"])
        => "p.yaml:4: spec.allowSockets[0]: `17`: tcp and udp sockets are always allowed";
    sockets_hex: sockets(&["0x11"])
        => "p.yaml:4: spec.allowSockets[0]: `0x11` is not written in decimal; write 17 (numbers \
            are written in plain decimal here)";
    sockets_unknown: sockets(&["ping"])
        => "p.yaml:4: spec.allowSockets[0]: unknown socket kind `ping` (expected raw, icmp, sctp, \
            udplite, mptcp or a protocol number 0-262)";
    sockets_quoted_number: sockets(&["\"132\""])
        => "p.yaml:4: spec.allowSockets[0]: unknown socket kind `132` (expected raw, icmp, sctp, \
            udplite, mptcp or a protocol number 0-262)";
    sockets_too_big: sockets(&["263"])
        => "p.yaml:4: spec.allowSockets[0]: 263 is not a protocol number (0-262)";
    sockets_negative: sockets(&["-1"])
        => "p.yaml:4: spec.allowSockets[0]: -1 is not a protocol number (0-262)";
    sockets_leading_zero: sockets(&["0132"])
        => "p.yaml:4: spec.allowSockets[0]: `0132` has a leading zero, which some YAML readers \
            take as octal";
    sockets_duplicate_name: sockets(&["sctp", "udplite", "SCTP"])
        => "p.yaml:6: spec.allowSockets[2]: `SCTP` repeats spec.allowSockets[0] (`sctp`)";
    sockets_number_and_name: sockets(&["132", "sctp"])
        => "p.yaml:5: spec.allowSockets[1]: `sctp` repeats spec.allowSockets[0] (`132`)";
    sockets_icmpv6_inside_icmp: sockets(&["icmp", "58"])
        => "p.yaml:5: spec.allowSockets[1]: `58` repeats spec.allowSockets[0] (`icmp`)";
    sockets_raw_twice: sockets(&["raw", "raw"])
        => "p.yaml:5: spec.allowSockets[1]: `raw` repeats spec.allowSockets[0] (`raw`)";
    sockets_float: sockets(&["1.5"])
        => "p.yaml:4: spec.allowSockets[0]: expected a socket kind (raw, icmp, sctp, udplite, \
            mptcp or a protocol number 0-262), found a float `1.5`";
    sockets_not_a_list: "kind: EgressConfig\nspec:\n  allowSockets: raw\n"
        => "p.yaml:3: spec.allowSockets: expected a sequence, found a string \"raw\"";
    proxy_port_zero: config_with("port: 15002", "port: 0")
        => "p.yaml:4: spec.proxy.port: 0 is not a valid port (1-65535)";
    proxy_port_too_big: config_with("port: 15002", "port: 70000")
        => "p.yaml:4: spec.proxy.port: 70000 is not a valid port (1-65535)";
    proxy_port_string: config_with("port: 15002", "port: \"15002\"")
        => "p.yaml:4: spec.proxy.port: expected a port number (1-65535), found a string \"15002\"";
    proxy_unknown_field: config_with("    port: 15002\n", "    port: 15002\n    address: 0.0.0.0\n")
        => "p.yaml:5: spec.proxy.address: unknown field (expected port or idleTimeout)";
    proxy_idle_zero: config_with("    port: 15002\n", "    port: 15002\n    idleTimeout: 0\n")
        => "p.yaml:5: spec.proxy.idleTimeout: 0 is not a valid idle timeout (1-3600 seconds)";
    proxy_idle_too_long: config_with("    port: 15002\n", "    port: 15002\n    idleTimeout: 3601\n")
        => "p.yaml:5: spec.proxy.idleTimeout: 3601 is not a valid idle timeout (1-3600 seconds)";
    proxy_idle_negative: config_with("    port: 15002\n", "    port: 15002\n    idleTimeout: -5\n")
        => "p.yaml:5: spec.proxy.idleTimeout: -5 is not a valid idle timeout (1-3600 seconds)";
    proxy_idle_with_unit: config_with("    port: 15002\n", "    port: 15002\n    idleTimeout: 60s\n")
        => "p.yaml:5: spec.proxy.idleTimeout: expected a number of seconds, found a string \"60s\"";
    proxy_not_a_mapping: config_with("  proxy:\n    port: 15002\n", "  proxy: 15002\n")
        => "p.yaml:3: spec.proxy: expected a mapping, found an integer `15002`";
    ca_files_not_a_list: config_with(
            "  caFiles:\n    - /etc/egress/ca.pem\n    - certs/extra.pem\n",
            "  caFiles: /etc/egress/ca.pem\n")
        => "p.yaml:5: spec.caFiles: expected a sequence, found a string \"/etc/egress/ca.pem\"";
    ca_files_empty_path: config_with("certs/extra.pem", "\"\"")
        => "p.yaml:7: spec.caFiles[1]: the path is empty";
    ca_files_nul: config_with("certs/extra.pem", "\"a\\0b\"")
        => "p.yaml:7: spec.caFiles[1]: the path contains a NUL character";
    ca_files_duplicate: config_with("certs/extra.pem", "/etc/egress/ca.pem")
        => "p.yaml:7: spec.caFiles[1]: duplicate of spec.caFiles[0] (/etc/egress/ca.pem)";
    ca_files_number: config_with("certs/extra.pem", "42")
        => "p.yaml:7: spec.caFiles[1]: expected a string, found an integer `42`";
    hosts_bad_address: config_with("192.0.2.10,", "192.0.2.300,")
        => "p.yaml:9: spec.hosts.db.internal.test[0]: `192.0.2.300`: octet `300` is over 255";
    hosts_bad_single_address: config_with("192.0.2.11", "192.0.2.011")
        => "p.yaml:10: spec.hosts.Cache.Internal.Test.: `192.0.2.011`: octet `011` has a leading zero";
    hosts_network: config_with("192.0.2.10,", "192.0.2.0/24,")
        => "p.yaml:9: spec.hosts.db.internal.test[0]: `192.0.2.0/24` is a network; a single IP \
            address is needed here";
    hosts_unspecified: config_with("192.0.2.11", "0.0.0.0")
        => "p.yaml:10: spec.hosts.Cache.Internal.Test.: `0.0.0.0` is not an address a host can \
            have";
    hosts_ipv4_mapped: config_with("2001:db8::10", "\"::ffff:192.0.2.10\"")
        => "p.yaml:9: spec.hosts.db.internal.test[1]: `::ffff:192.0.2.10` is an IPv4-mapped IPv6 \
            address; write `192.0.2.10`";
    hosts_name_as_address: config_with("192.0.2.11", "db.internal.test")
        => "p.yaml:10: spec.hosts.Cache.Internal.Test.: `db.internal.test` is a host name; \
            spec.hosts entries map names to IP addresses";
    hosts_duplicate_address: config_with("2001:db8::10", "192.0.2.10")
        => "p.yaml:9: spec.hosts.db.internal.test[1]: duplicate of \
            spec.hosts.db.internal.test[0] (192.0.2.10)";
    hosts_no_address: config_with("[192.0.2.10, 2001:db8::10]", "[]")
        => "p.yaml:9: spec.hosts.db.internal.test: a host needs at least one address";
    hosts_null_address: config_with(" [192.0.2.10, 2001:db8::10]", "")
        => "p.yaml:9: spec.hosts.db.internal.test: expected an IP address or a list of them, \
            found nothing";
    hosts_key_is_an_ip: config_with("db.internal.test:", "192.0.2.1:")
        => "p.yaml:9: spec.hosts.192.0.2.1: `192.0.2.1` is an IP address; spec.hosts maps host \
            names to addresses";
    hosts_key_is_a_wildcard: config_with("db.internal.test:", "\"*.internal.test\":")
        => "p.yaml:9: spec.hosts.*.internal.test: `*.internal.test` is a wildcard; each \
            spec.hosts entry names one host";
    hosts_key_bad_label: config_with("db.internal.test:", "db_1.internal.test:")
        => "p.yaml:9: spec.hosts.db_1.internal.test: `db_1.internal.test`: label `db_1` may hold \
            only letters, digits and '-'";
    hosts_same_host_twice: config_with("Cache.Internal.Test.", "DB.internal.test.")
        => "p.yaml:10: spec.hosts.DB.internal.test.: the same host as `db.internal.test` on line 9 \
            (both are `db.internal.test`)";
    hosts_not_a_mapping: config_with(
            "  hosts:\n    db.internal.test: [192.0.2.10, 2001:db8::10]\n    \
             Cache.Internal.Test.: 192.0.2.11\n",
            "  hosts: [db.internal.test]\n")
        => "p.yaml:8: spec.hosts: expected a mapping of host names to addresses, found a sequence";
}
