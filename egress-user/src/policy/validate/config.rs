//! `kind: EgressConfig`: the settings of the whole policy (at most one such document): mode,
//! bypass ranges, the proxy's port and idle limit, extra CA files, static host addresses, the DNS resolvers
//! and the socket kinds allowed besides TCP and UDP.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    path::PathBuf,
    time::Duration,
};

use ipnet::IpNet;

use egress_common::MAX_PROTOCOL;

use super::{Fields, Int, Walk, parse_int};
use crate::policy::{
    addr::{self, AddrError},
    host::{self, HostError},
    model::{AllowSockets, Events, HostName, MAX_PROXY_IDLE_TIMEOUT_SECS, Mode, ProxySettings},
    report::join,
    yaml::{Node, ScalarKind, Value},
};

/// The `spec` fields of an EgressConfig.
const SPEC_FIELDS: &[&str] = &[
    "mode",
    "events",
    "bypass",
    "proxy",
    "caFiles",
    "hosts",
    "dns",
    "allowSockets",
];

/// What a `spec.allowSockets` entry may be, for messages.
const SOCKET_KINDS: &str = "raw, icmp, sctp, udplite, mptcp or a protocol number 0-262";

/// Why tcp and udp are never listed in `spec.allowSockets`.
const ALWAYS_ALLOWED: &str = "tcp and udp sockets are always allowed; rules judge their traffic";

/// The settings of a `kind: EgressConfig` document; `None` where the document says nothing.
#[derive(Clone, Debug, Default)]
pub(crate) struct Config {
    /// `spec.mode`, when given.
    pub(crate) mode: Option<Mode>,
    /// `spec.events`, when given.
    pub(crate) events: Option<Events>,
    /// `spec.bypass`, when given (an empty list is given).
    pub(crate) bypass: Option<Vec<IpNet>>,
    /// `spec.proxy`, when given.
    pub(crate) proxy: Option<ProxySettings>,
    /// `spec.caFiles` as written: [`super::super::load`] resolves relative paths against the
    /// directory of the file, which only it knows.
    pub(crate) ca_files: Option<Vec<(PathBuf, usize)>>,
    /// `spec.hosts`, names normalised.
    pub(crate) hosts: Option<BTreeMap<HostName, Vec<IpAddr>>>,
    /// `spec.allowSockets`, when given.
    pub(crate) allow_sockets: Option<AllowSockets>,
    /// `spec.dns.resolvers` and the line of the `dns` key, when given (an empty list is
    /// given: no DNS).
    pub(crate) dns: Option<(Vec<IpAddr>, usize)>,
}

impl Walk<'_> {
    /// A `kind: EgressConfig` document.
    pub(super) fn config(&mut self, doc: &Fields<'_>) -> Option<Config> {
        let errors_before = self.report.error_count();
        // The config needs no name, but one is checked like a rule's when given. It applies
        // to the whole node: a namespace would mean something it does not do.
        if let (_, Some((namespace, line))) = self.name(doc, false) {
            self.report.field_error(
                line,
                "metadata.namespace",
                format!(
                    "namespace \"{namespace}\": an EgressConfig applies to the whole node; \
                     remove metadata.namespace"
                ),
            );
        }
        let mut config = Config::default();
        if let Some(spec) = self.sub_mapping(doc, "spec", SPEC_FIELDS, &[], false) {
            if let Some(entry) = spec.get("mode") {
                config.mode = self.mode(&entry.value);
            }
            if let Some(entry) = spec.get("events") {
                config.events = self.events(&entry.value);
            }
            if let Some(entry) = spec.get("bypass") {
                config.bypass = self.bypass(&entry.value);
            }
            config.proxy = self.proxy(&spec);
            if let Some(entry) = spec.get("caFiles") {
                config.ca_files = self.ca_files(&entry.value);
            }
            if let Some(entry) = spec.get("hosts") {
                config.hosts = self.hosts(&entry.value);
            }
            config.dns = self.dns(&spec);
            if let Some(entry) = spec.get("allowSockets") {
                config.allow_sockets = self.allow_sockets(&entry.value);
            }
        }
        (self.report.error_count() == errors_before).then_some(config)
    }

    /// `spec.mode`: enforce or audit.
    fn mode(&mut self, node: &Node) -> Option<Mode> {
        let modes = [("enforce", Mode::Enforce), ("audit", Mode::Audit)];
        self.keyword("spec.mode", node, "mode", &modes)
    }

    /// `spec.events`: denied or all.
    fn events(&mut self, node: &Node) -> Option<Events> {
        let settings = [("denied", Events::Denied), ("all", Events::All)];
        self.keyword("spec.events", node, "events setting", &settings)
    }

    /// `spec.bypass`: CIDRs or single addresses, no duplicates.
    fn bypass(&mut self, node: &Node) -> Option<Vec<IpNet>> {
        let items = self.sequence("spec.bypass", node)?;
        let mut nets: Vec<IpNet> = Vec::with_capacity(items.len());
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            let path = format!("spec.bypass[{i}]");
            let Some(text) = self.string(&path, item) else {
                ok = false;
                continue;
            };
            match addr::parse_net(text).and_then(|net| addr::not_embedded(text, net)) {
                Ok(net) if net.prefix_len() == 0 => {
                    self.report
                        .field_error(item.line, &path, everything_bypassed(net));
                    ok = false;
                }
                Ok(net) => {
                    if let Some(first) = nets.iter().position(|n| *n == net) {
                        self.report.field_error(
                            item.line,
                            &path,
                            format!("duplicate of spec.bypass[{first}] ({net})"),
                        );
                        ok = false;
                    }
                    nets.push(net);
                }
                Err(AddrError::HostName { .. }) => {
                    self.report.field_error(
                        item.line,
                        &path,
                        format!(
                            "`{text}` is a host name; bypass entries are CIDRs or IP addresses"
                        ),
                    );
                    ok = false;
                }
                Err(e) => {
                    self.report.field_error(item.line, &path, e.to_string());
                    ok = false;
                }
            }
        }
        // Ranges that together cover a whole family (`0.0.0.0/1` and `128.0.0.0/1`) are the
        // same mistake spelt in two lines.
        if ok && let Some(all) = covered_family(&nets) {
            self.report
                .field_error(node.line, "spec.bypass", everything_bypassed(all));
            ok = false;
        }
        ok.then_some(nets)
    }

    /// `spec.proxy`: `{port: N, idleTimeout: SECONDS}`; defaults for what is not given.
    fn proxy(&mut self, spec: &Fields<'_>) -> Option<ProxySettings> {
        let proxy = self.sub_mapping(spec, "proxy", &["port", "idleTimeout"], &[], false)?;
        let mut settings = ProxySettings::default();
        let port = proxy.get("port").map(|e| self.port("spec.proxy", e));
        let idle = proxy
            .get("idleTimeout")
            .map(|e| self.idle_timeout(&e.value));
        if let Some(port) = port {
            settings.port = port?;
        }
        if let Some(idle) = idle {
            settings.idle_timeout = idle?;
        }
        Some(settings)
    }

    /// `spec.proxy.idleTimeout`: whole seconds, 1 to [`MAX_PROXY_IDLE_TIMEOUT_SECS`].
    fn idle_timeout(&mut self, node: &Node) -> Option<Duration> {
        const PATH: &str = "spec.proxy.idleTimeout";
        let text = match &node.value {
            Value::Scalar(s) if s.kind == ScalarKind::Int => &s.text,
            _ => {
                self.wrong_type(PATH, node, "a number of seconds");
                return None;
            }
        };
        match parse_int(text) {
            Int::Value(n @ 1..=MAX_PROXY_IDLE_TIMEOUT_SECS) => Some(Duration::from_secs(n)),
            Int::NotDecimal(value) => {
                self.not_decimal(PATH, node, text, value);
                None
            }
            Int::Value(_) | Int::Invalid => {
                self.report.field_error(
                    node.line,
                    PATH,
                    format!(
                        "{text} is not a valid idle timeout (1-{MAX_PROXY_IDLE_TIMEOUT_SECS} \
                         seconds)"
                    ),
                );
                None
            }
        }
    }

    /// `spec.caFiles`: paths of PEM files, each with its line. The files are read once the
    /// policy file's directory is known (a relative path is relative to it): see
    /// `load::check_ca_files`.
    fn ca_files(&mut self, node: &Node) -> Option<Vec<(PathBuf, usize)>> {
        let items = self.sequence("spec.caFiles", node)?;
        let mut paths: Vec<(PathBuf, usize)> = Vec::with_capacity(items.len());
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            let path = format!("spec.caFiles[{i}]");
            let Some(text) = self.string(&path, item) else {
                ok = false;
                continue;
            };
            let problem = if text.is_empty() {
                Some("the path is empty".to_owned())
            } else if text.contains('\0') {
                Some("the path contains a NUL character, which no file name can".to_owned())
            } else {
                paths
                    .iter()
                    .position(|(p, _)| p.as_os_str() == text)
                    .map(|first| format!("duplicate of spec.caFiles[{first}] ({text})"))
            };
            if let Some(problem) = problem {
                self.report.field_error(item.line, &path, problem);
                ok = false;
            }
            paths.push((PathBuf::from(text), item.line));
        }
        ok.then_some(paths)
    }

    /// `spec.hosts`: `{name: address}` or `{name: [address, ...]}`, names normalised and each
    /// given once.
    fn hosts(&mut self, node: &Node) -> Option<BTreeMap<HostName, Vec<IpAddr>>> {
        let Value::Map(entries) = &node.value else {
            self.wrong_type("spec.hosts", node, "a mapping of host names to addresses");
            return None;
        };
        let mut hosts = BTreeMap::new();
        let mut lines: HashMap<HostName, (usize, &str)> = HashMap::new();
        let mut ok = true;
        for entry in entries {
            let path = join("spec.hosts", &entry.key);
            let name = self.hosts_name(&path, &entry.key, entry.key_line);
            let addresses = self.host_addresses(&path, &entry.value);
            let (Some(name), Some(addresses)) = (name, addresses) else {
                ok = false;
                continue;
            };
            if let Some((first_line, first)) = lines.get(&name) {
                self.report.field_error(
                    entry.key_line,
                    &path,
                    format!("the same host as `{first}` on line {first_line} (both are `{name}`)"),
                );
                ok = false;
                continue;
            }
            lines.insert(name.clone(), (entry.key_line, &entry.key));
            hosts.insert(name, addresses);
        }
        ok.then_some(hosts)
    }

    /// A `spec.hosts` key: one host name.
    fn hosts_name(&mut self, path: &str, key: &str, line: usize) -> Option<HostName> {
        match host::normalise_host(key) {
            Ok(name) => Some(name),
            Err(error) => {
                let message = match error {
                    HostError::IpAddress { text } => format!(
                        "`{text}` is an IP address; spec.hosts maps host names to addresses"
                    ),
                    HostError::WildcardNotAllowed { text } => {
                        format!("`{text}` is a wildcard; each spec.hosts entry names one host")
                    }
                    other => other.to_string(),
                };
                self.report.field_error(line, path, message);
                None
            }
        }
    }

    /// A `spec.hosts` value: one address or a non-empty list of distinct ones.
    fn host_addresses(&mut self, path: &str, node: &Node) -> Option<Vec<IpAddr>> {
        let items = match &node.value {
            Value::Seq(items) => items.iter().collect(),
            Value::Scalar(scalar) if scalar.kind == ScalarKind::Str => vec![node],
            _ => {
                self.wrong_type(path, node, "an IP address or a list of them");
                return None;
            }
        };
        if items.is_empty() {
            self.report
                .field_error(node.line, path, "a host needs at least one address");
            return None;
        }
        let list = matches!(node.value, Value::Seq(_));
        self.distinct_addresses(path, list, items, |text, error| match error {
            AddrError::HostName { .. } => {
                format!("`{text}` is a host name; spec.hosts entries map names to IP addresses")
            }
            e => e.to_string(),
        })
    }

    /// `items` as IP addresses, each once: an item of a `list` is at `path[i]`, else at
    /// `path`; a repeated one is refused naming the first, one that is not an address with
    /// what `refusal` says of its text and error.
    fn distinct_addresses<'n>(
        &mut self,
        path: &str,
        list: bool,
        items: impl IntoIterator<Item = &'n Node>,
        refusal: impl Fn(&str, AddrError) -> String,
    ) -> Option<Vec<IpAddr>> {
        let mut addresses: Vec<IpAddr> = Vec::new();
        let mut ok = true;
        for (i, item) in items.into_iter().enumerate() {
            let item_path = if list {
                format!("{path}[{i}]")
            } else {
                path.to_owned()
            };
            let Some(text) = self.string(&item_path, item) else {
                ok = false;
                continue;
            };
            let message = match addr::parse_ip(text) {
                Ok(address) => match addresses.iter().position(|a| *a == address) {
                    None => {
                        addresses.push(address);
                        continue;
                    }
                    Some(first) => format!("duplicate of {path}[{first}] ({address})"),
                },
                Err(e) => refusal(text, e),
            };
            self.report.field_error(item.line, &item_path, message);
            ok = false;
        }
        ok.then_some(addresses)
    }

    /// `spec.dns`: `{resolvers: [address, ...]}`, single addresses, each once.
    fn dns(&mut self, spec: &Fields<'_>) -> Option<(Vec<IpAddr>, usize)> {
        let dns = self.sub_mapping(spec, "dns", &["resolvers"], &[], false)?;
        let entry = self.require(&dns, "resolvers")?;
        let items = self.sequence("spec.dns.resolvers", &entry.value)?;
        let resolvers = self.distinct_addresses(
            "spec.dns.resolvers",
            true,
            items,
            |text, error| match error {
                AddrError::HostName { .. } => {
                    format!("`{text}` is a host name; a resolver is an IP address")
                }
                AddrError::MappedAddress { ipv4, .. } => format!(
                    "`{text}` is an IPv4-mapped IPv6 address, which the kernel judges as \
                     `{ipv4}`; write `{ipv4}`"
                ),
                e => e.to_string(),
            },
        )?;
        Some((resolvers, dns.line))
    }

    /// `spec.allowSockets`: socket kinds besides TCP and UDP, each once.
    fn allow_sockets(&mut self, node: &Node) -> Option<AllowSockets> {
        let items = self.sequence("spec.allowSockets", node)?;
        let mut allowed = AllowSockets::default();
        // Which entry allowed what (`None`: raw sockets), for the duplicate message.
        let mut by: HashMap<Option<u16>, (usize, String)> = HashMap::new();
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            let path = format!("spec.allowSockets[{i}]");
            let Some((text, kinds)) = self.socket_kind(&path, item) else {
                ok = false;
                continue;
            };
            if let Some((first, first_text)) = kinds.iter().find_map(|kind| by.get(kind)) {
                self.report.field_error(
                    item.line,
                    &path,
                    format!("`{text}` repeats spec.allowSockets[{first}] (`{first_text}`)"),
                );
                ok = false;
                continue;
            }
            for kind in kinds {
                by.insert(kind, (i, text.clone()));
                match kind {
                    None => allowed.raw = true,
                    Some(protocol) => {
                        allowed.protocols.insert(protocol);
                    }
                }
            }
        }
        ok.then_some(allowed)
    }

    /// One `spec.allowSockets` entry as written, and what it allows: `None` for raw sockets,
    /// else protocol numbers.
    fn socket_kind(&mut self, path: &str, node: &Node) -> Option<(String, Vec<Option<u16>>)> {
        let (text, kinds) = match &node.value {
            Value::Scalar(s) if s.kind == ScalarKind::Str => {
                let kinds = match s.text.to_ascii_lowercase().as_str() {
                    "raw" => Ok(vec![None]),
                    "icmp" => Ok(vec![Some(1), Some(58)]),
                    "sctp" => Ok(vec![Some(132)]),
                    "udplite" => Ok(vec![Some(136)]),
                    "mptcp" => Ok(vec![Some(262)]),
                    "tcp" | "udp" => Err(format!("`{}`: {ALWAYS_ALLOWED}", s.text)),
                    _ => Err(format!(
                        "unknown socket kind `{}` (expected {SOCKET_KINDS})",
                        s.text.escape_debug()
                    )),
                };
                (&s.text, kinds)
            }
            Value::Scalar(s) if s.kind == ScalarKind::Int => {
                let kinds = match parse_int(&s.text) {
                    Int::Value(6 | 17) => Err(format!("`{}`: {ALWAYS_ALLOWED}", s.text)),
                    Int::Value(n) if n <= u64::from(MAX_PROTOCOL) => {
                        Ok(vec![Some(u16::try_from(n).ok()?)])
                    }
                    Int::NotDecimal(value) => {
                        self.not_decimal(path, node, &s.text, value);
                        return None;
                    }
                    Int::Value(_) | Int::Invalid => Err(format!(
                        "{} is not a protocol number (0-{MAX_PROTOCOL})",
                        s.text
                    )),
                };
                (&s.text, kinds)
            }
            _ => {
                self.wrong_type(path, node, &format!("a socket kind ({SOCKET_KINDS})"));
                return None;
            }
        };
        match kinds {
            Ok(kinds) => Some((text.clone(), kinds)),
            Err(message) => {
                self.report.field_error(node.line, path, message);
                None
            }
        }
    }
}

/// `0.0.0.0/0` or `::/0` if `nets` together cover that whole family. (`IpNet::aggregate` does
/// not merge two /1s into a /0, so the sizes of the merged, disjoint ranges are added up.)
fn covered_family(nets: &[IpNet]) -> Option<IpNet> {
    let merged = IpNet::aggregate(&nets.to_vec());
    let v4: u64 = merged
        .iter()
        .filter_map(|n| match n {
            IpNet::V4(n) => Some(1u64 << (32 - u32::from(n.prefix_len()))),
            IpNet::V6(_) => None,
        })
        .sum();
    if v4 == 1 << 32 {
        return Some("0.0.0.0/0".parse().expect("valid literal"));
    }
    // 2^128 does not fit a u128: the sum overflows exactly when every address is covered.
    let v6 = merged
        .iter()
        .filter_map(|n| match n {
            IpNet::V6(n) => Some(n.prefix_len()),
            IpNet::V4(_) => None,
        })
        .try_fold(0u128, |sum, len| {
            sum.checked_add(1u128.checked_shl(128 - u32::from(len)).unwrap_or(0))
        });
    v6.is_none().then(|| "::/0".parse().expect("valid literal"))
}

/// Why a bypass range of a whole address family is refused: it turns filtering off for that
/// family, silently (nothing is counted or reported there), which a range in a list does not
/// look like. Audit mode is the switch for "let everything through but show it".
fn everything_bypassed(net: IpNet) -> String {
    let family = if net.addr().is_ipv4() { "IPv4" } else { "IPv6" };
    format!(
        "{net} would bypass every {family} destination: nothing would be filtered, counted or \
         reported there; to let traffic through while watching it use `mode: audit`, and to \
         stop filtering stop the agent"
    )
}
