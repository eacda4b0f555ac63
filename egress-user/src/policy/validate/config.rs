//! `kind: EgressConfig`: the settings of the whole policy (at most one such document): mode,
//! bypass ranges, the proxy's port, extra CA files and static host addresses.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    path::PathBuf,
};

use ipnet::IpNet;

use super::{Fields, Walk};
use crate::policy::{
    addr::{self, AddrError},
    host::{self, HostError},
    model::{Events, HostName, Mode, ProxySettings},
    report::join,
    yaml::{Node, ScalarKind, Value},
};

/// The `spec` fields of an EgressConfig.
const SPEC_FIELDS: &[&str] = &["mode", "events", "bypass", "proxy", "caFiles", "hosts"];

/// The settings of a `kind: EgressConfig` document; `None` where the document says nothing.
#[derive(Debug, Default)]
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
    pub(crate) ca_files: Option<Vec<PathBuf>>,
    /// `spec.hosts`, names normalised.
    pub(crate) hosts: Option<BTreeMap<HostName, Vec<IpAddr>>>,
}

impl Walk<'_> {
    /// A `kind: EgressConfig` document.
    pub(super) fn config(&mut self, doc: &Fields<'_>) -> Option<Config> {
        let errors_before = self.report.error_count();
        // The config needs no name, but one is checked like a rule's when given.
        self.name(doc, false);
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
        }
        (self.report.error_count() == errors_before).then_some(config)
    }

    /// `spec.mode`.
    fn mode(&mut self, node: &Node) -> Option<Mode> {
        match self.string("spec.mode", node)? {
            "enforce" => Some(Mode::Enforce),
            "audit" => Some(Mode::Audit),
            other => {
                self.report.field_error(
                    node.line,
                    "spec.mode",
                    format!("unknown mode `{other}` (expected enforce or audit)"),
                );
                None
            }
        }
    }

    /// `spec.events`.
    fn events(&mut self, node: &Node) -> Option<Events> {
        match self.string("spec.events", node)? {
            "denied" => Some(Events::Denied),
            "all" => Some(Events::All),
            other => {
                self.report.field_error(
                    node.line,
                    "spec.events",
                    format!("unknown events setting `{other}` (expected denied or all)"),
                );
                None
            }
        }
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
            match addr::parse_net(text) {
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
        ok.then_some(nets)
    }

    /// `spec.proxy`: `{port: N}`; the default port when the port is not given.
    fn proxy(&mut self, spec: &Fields<'_>) -> Option<ProxySettings> {
        let proxy = self.sub_mapping(spec, "proxy", &["port"], &[], false)?;
        let Some(entry) = proxy.get("port") else {
            return Some(ProxySettings::default());
        };
        let port = self.port("spec.proxy", entry)?;
        Some(ProxySettings { port })
    }

    /// `spec.caFiles`: paths of PEM files, not read here (the proxy reads them, and a policy
    /// is checked on machines that do not have them).
    fn ca_files(&mut self, node: &Node) -> Option<Vec<PathBuf>> {
        let items = self.sequence("spec.caFiles", node)?;
        let mut paths: Vec<PathBuf> = Vec::with_capacity(items.len());
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
                    .position(|p| p.as_os_str() == text)
                    .map(|first| format!("duplicate of spec.caFiles[{first}] ({text})"))
            };
            if let Some(problem) = problem {
                self.report.field_error(item.line, &path, problem);
                ok = false;
            }
            paths.push(PathBuf::from(text));
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
        let mut addresses: Vec<IpAddr> = Vec::with_capacity(items.len());
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
                Err(AddrError::HostName { .. }) => {
                    format!("`{text}` is a host name; spec.hosts entries map names to IP addresses")
                }
                Err(e) => e.to_string(),
            };
            self.report.field_error(item.line, &item_path, message);
            ok = false;
        }
        ok.then_some(addresses)
    }
}
