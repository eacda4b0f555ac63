//! The schema walk: one YAML document in, one checked [`Item`] out, every problem reported
//! with the path and line of the field that has it.
//!
//! The walk never stops at the first error: a bad port does not hide a bad protocol on the
//! next line, so a user fixes a file in one round. What a document cannot check alone (a
//! duplicate name, a second EgressConfig) is left to [`super::load`].

use std::collections::HashMap;

use ipnet::IpNet;

use super::{
    addr::{self, AddrError},
    model::{Mode, PortRule, Protocol, Rule},
    report::{Report, join},
    yaml::{Entry, Node, ScalarKind, Value},
};

/// The fields every document may have, whatever its kind.
const DOCUMENT_FIELDS: &[&str] = &["apiVersion", "kind", "metadata", "spec"];
/// The `metadata` fields we read.
const METADATA_FIELDS: &[&str] = &["name"];
/// The usual Kubernetes `metadata` fields, accepted so that manifests written for a cluster
/// load as they are, and ignored: they mean nothing to the filter.
const METADATA_IGNORED: &[&str] = &["namespace", "labels", "annotations"];

/// What one document turned out to be.
#[derive(Debug)]
pub(crate) enum Item {
    /// A `kind: EgressRule` document.
    Rule {
        /// `metadata.name` and its line, when it is a valid name, so duplicates are found even
        /// among rules that have other errors.
        name: Option<(String, usize)>,
        /// The rule, when the document has no error.
        rule: Option<Rule>,
    },
    /// A `kind: EgressConfig` document.
    Config {
        /// Line of the `kind` value, where a second EgressConfig is reported.
        line: usize,
        /// The settings, when the document has no error.
        config: Option<Config>,
    },
}

/// The settings of a `kind: EgressConfig` document.
#[derive(Debug, Default)]
pub(crate) struct Config {
    /// `spec.mode`, when given.
    pub(crate) mode: Option<Mode>,
    /// `spec.bypass`, when given (an empty list is given).
    pub(crate) bypass: Option<Vec<IpNet>>,
}

/// Checks one document (the root node of a non-empty YAML document). `None` when the document
/// is not a policy document at all (not a mapping, no or unknown kind): already reported.
pub(crate) fn document(root: &Node, report: &mut Report) -> Option<Item> {
    let mut walk = Walk { report };
    let fields = walk.mapping("", root.line, root)?;
    let kind_entry = fields.get("kind");
    let Some(kind_entry) = kind_entry else {
        walk.report.field_error(
            root.line,
            "kind",
            "missing field (expected EgressRule or EgressConfig)",
        );
        return None;
    };
    let kind = walk.string("kind", &kind_entry.value)?;
    let line = kind_entry.value.line;
    match kind {
        "EgressRule" => Some(walk.rule(root, &fields)),
        "EgressConfig" => Some(Item::Config {
            line,
            config: walk.config(&fields),
        }),
        "Service" => {
            walk.report.field_error(
                line,
                "kind",
                "Service is not supported yet (only EgressRule and EgressConfig)",
            );
            None
        }
        other => {
            walk.report.field_error(
                line,
                "kind",
                format!("unknown kind `{other}` (expected EgressRule or EgressConfig)"),
            );
            None
        }
    }
}

/// A mapping's entries by key.
struct Fields<'n> {
    /// Path of the mapping, `""` for a document.
    path: String,
    /// Where a missing field is reported: the line of the key that holds the mapping (or of
    /// the mapping itself for a document or a sequence item).
    line: usize,
    /// The entries by key.
    entries: HashMap<&'n str, &'n Entry>,
}

impl<'n> Fields<'n> {
    /// The entry for `key`, if present.
    fn get(&self, key: &str) -> Option<&'n Entry> {
        self.entries.get(key).copied()
    }
}

/// The walk over one document, carrying where errors go.
struct Walk<'r> {
    /// Where errors go.
    report: &'r mut Report,
}

impl Walk<'_> {
    /// Reports `found` where `expected` was wanted, unless it was reported already.
    fn wrong_type(&mut self, path: &str, node: &Node, expected: &str) {
        if !matches!(node.value, Value::Invalid) {
            self.report.field_error(
                node.line,
                path,
                format!("expected {expected}, found {}", node.value.describe()),
            );
        }
    }

    /// `node` as a mapping whose keys are all in `known` or `ignored`; any other key is
    /// reported as an unknown field (and left out). `line` is where a missing field will be
    /// reported.
    fn mapping_of<'n>(
        &mut self,
        path: &str,
        line: usize,
        node: &'n Node,
        known: &[&str],
        ignored: &[&str],
    ) -> Option<Fields<'n>> {
        let Value::Map(entries) = &node.value else {
            self.wrong_type(path, node, "a mapping");
            return None;
        };
        let mut fields = Fields {
            path: path.to_owned(),
            line,
            entries: HashMap::new(),
        };
        for entry in entries {
            if known.contains(&entry.key.as_str()) {
                fields.entries.insert(&entry.key, entry);
            } else if !ignored.contains(&entry.key.as_str()) {
                self.report.field_error(
                    entry.key_line,
                    &join(path, &entry.key),
                    format!("unknown field (expected {})", one_of(known)),
                );
            }
        }
        Some(fields)
    }

    /// A document's top level: only [`DOCUMENT_FIELDS`], checked once the kind is known.
    fn mapping<'n>(&mut self, path: &str, line: usize, node: &'n Node) -> Option<Fields<'n>> {
        if !matches!(node.value, Value::Map(_)) {
            self.wrong_type("document", node, "a mapping");
            return None;
        }
        self.mapping_of(path, line, node, DOCUMENT_FIELDS, &[])
    }

    /// The field `key` of `fields`, reporting it when missing.
    fn require<'n>(&mut self, fields: &Fields<'n>, key: &str) -> Option<&'n Entry> {
        let entry = fields.get(key);
        if entry.is_none() {
            self.report
                .field_error(fields.line, &join(&fields.path, key), "missing field");
        }
        entry
    }

    /// The field `key` as a mapping with the given fields.
    fn sub_mapping<'n>(
        &mut self,
        fields: &Fields<'n>,
        key: &str,
        known: &[&str],
        ignored: &[&str],
        required: bool,
    ) -> Option<Fields<'n>> {
        let entry = if required {
            self.require(fields, key)?
        } else {
            fields.get(key)?
        };
        let path = join(&fields.path, key);
        self.mapping_of(&path, entry.key_line, &entry.value, known, ignored)
    }

    /// `node` as a string.
    fn string<'n>(&mut self, path: &str, node: &'n Node) -> Option<&'n str> {
        match &node.value {
            Value::Scalar(s) if s.kind == ScalarKind::Str => Some(&s.text),
            _ => {
                self.wrong_type(path, node, "a string");
                None
            }
        }
    }

    /// `metadata.name`: required on a rule, optional on the config.
    fn name(&mut self, doc: &Fields<'_>, required: bool) -> Option<(String, usize)> {
        let metadata =
            self.sub_mapping(doc, "metadata", METADATA_FIELDS, METADATA_IGNORED, required)?;
        let entry = if required {
            self.require(&metadata, "name")?
        } else {
            metadata.get("name")?
        };
        let name = self.string("metadata.name", &entry.value)?;
        if !is_dns_subdomain(name) {
            self.report.field_error(
                entry.value.line,
                "metadata.name",
                format!(
                    "\"{}\" is not a valid name (lowercase letters, digits, '-' and '.', \
                     starting and ending with a letter or digit, at most 253 characters)",
                    name.escape_debug()
                ),
            );
            return None;
        }
        Some((name.to_owned(), entry.value.line))
    }

    /// A `kind: EgressRule` document.
    fn rule(&mut self, root: &Node, doc: &Fields<'_>) -> Item {
        let errors_before = self.report.error_count();
        let name = self.name(doc, true);
        let spec = self.sub_mapping(doc, "spec", &["destination", "ports"], &[], true);
        let destination = spec.as_ref().and_then(|spec| self.destination(spec));
        let ports = spec.as_ref().and_then(|spec| self.ports(spec));
        let rule = match (&name, destination, ports) {
            (Some((name, _)), Some(destination), Some(ports))
                if self.report.error_count() == errors_before =>
            {
                Some(Rule {
                    name: name.clone(),
                    origin: self.report.origin(root.line),
                    destination,
                    ports,
                })
            }
            _ => None,
        };
        Item::Rule { name, rule }
    }

    /// `spec.destination.service`.
    fn destination(&mut self, spec: &Fields<'_>) -> Option<IpNet> {
        let destination = self.sub_mapping(spec, "destination", &["service"], &[], true)?;
        let entry = self.require(&destination, "service")?;
        let path = "spec.destination.service";
        let service = self.string(path, &entry.value)?;
        match addr::parse_net(service) {
            Ok(net) => Some(net),
            Err(AddrError::HostName { .. }) => {
                self.report.field_error(
                    entry.value.line,
                    path,
                    format!(
                        "host name destinations (`{service}`) are not supported yet; \
                         use a CIDR or an IP address"
                    ),
                );
                None
            }
            Err(e) => {
                self.report
                    .field_error(entry.value.line, path, e.to_string());
                None
            }
        }
    }

    /// `spec.ports`: at least one, no duplicates.
    fn ports(&mut self, spec: &Fields<'_>) -> Option<Vec<PortRule>> {
        let entry = self.require(spec, "ports")?;
        let Value::Seq(items) = &entry.value.value else {
            self.wrong_type("spec.ports", &entry.value, "a sequence");
            return None;
        };
        if items.is_empty() {
            self.report.field_error(
                entry.value.line,
                "spec.ports",
                "a rule needs at least one port",
            );
            return None;
        }
        let mut ports = Vec::with_capacity(items.len());
        let mut seen: HashMap<PortRule, usize> = HashMap::new();
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            let path = format!("spec.ports[{i}]");
            let Some(fields) = self.mapping_of(&path, item.line, item, &["port", "protocol"], &[])
            else {
                ok = false;
                continue;
            };
            let port = self
                .require(&fields, "port")
                .and_then(|e| self.port(&path, e));
            let protocol = self
                .require(&fields, "protocol")
                .and_then(|e| self.protocol(&path, e));
            let (Some(port), Some(protocol)) = (port, protocol) else {
                ok = false;
                continue;
            };
            let rule = PortRule { port, protocol };
            // Rejected rather than merged: a repeated port is more often a typo for another
            // one (443 twice where 8443 was meant) than a deliberate repeat.
            if let Some(first) = seen.get(&rule) {
                self.report.field_error(
                    item.line,
                    &path,
                    format!("duplicate port {port}/{protocol} (also spec.ports[{first}])"),
                );
                ok = false;
                continue;
            }
            seen.insert(rule, i);
            ports.push(rule);
        }
        ok.then_some(ports)
    }

    /// `spec.ports[i].port`: an integer 1..=65535.
    fn port(&mut self, path: &str, entry: &Entry) -> Option<u16> {
        let path = join(path, "port");
        let node = &entry.value;
        let text = match &node.value {
            Value::Scalar(s) if s.kind == ScalarKind::Int => &s.text,
            _ => {
                self.wrong_type(&path, node, "a port number (1-65535)");
                return None;
            }
        };
        // The core schema's integer forms: 443, +443, 0x1bb, 0o673.
        let unsigned = text.strip_prefix('+').unwrap_or(text);
        let port = if let Some(hex) = unsigned.strip_prefix("0x") {
            u16::from_str_radix(hex, 16).ok()
        } else if let Some(octal) = unsigned.strip_prefix("0o") {
            u16::from_str_radix(octal, 8).ok()
        } else if unsigned.len() > 1 && unsigned.starts_with('0') {
            // YAML 1.2 reads 0443 as 443 and YAML 1.1 (PyYAML, Go's yaml.v2) as octal 291:
            // refuse the ambiguity rather than pick one.
            self.report.field_error(
                node.line,
                &path,
                format!("`{text}` has a leading zero, which some YAML readers take as octal"),
            );
            return None;
        } else {
            unsigned.parse::<u16>().ok()
        };
        match port {
            Some(port) if port != 0 => Some(port),
            _ => {
                self.report.field_error(
                    node.line,
                    &path,
                    format!("{text} is not a valid port (1-65535)"),
                );
                None
            }
        }
    }

    /// `spec.ports[i].protocol`: `tcp` in any case, as the Istio docs write both.
    fn protocol(&mut self, path: &str, entry: &Entry) -> Option<Protocol> {
        let path = join(path, "protocol");
        let text = self.string(&path, &entry.value)?;
        let message = match text.to_ascii_lowercase().as_str() {
            "tcp" => return Some(Protocol::Tcp),
            "http" | "https" | "udp" => {
                format!("protocol `{text}` is not supported yet (only tcp for now)")
            }
            _ => format!("unknown protocol `{text}` (expected tcp)"),
        };
        self.report.field_error(entry.value.line, &path, message);
        None
    }

    /// A `kind: EgressConfig` document.
    fn config(&mut self, doc: &Fields<'_>) -> Option<Config> {
        let errors_before = self.report.error_count();
        // The config needs no name, but one is checked like a rule's when given.
        self.name(doc, false);
        let mut config = Config::default();
        if let Some(spec) = self.sub_mapping(doc, "spec", &["mode", "bypass"], &[], false) {
            if let Some(entry) = spec.get("mode") {
                config.mode = self.mode(&entry.value);
            }
            if let Some(entry) = spec.get("bypass") {
                config.bypass = self.bypass(&entry.value);
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

    /// `spec.bypass`: CIDRs or single addresses, no duplicates.
    fn bypass(&mut self, node: &Node) -> Option<Vec<IpNet>> {
        let Value::Seq(items) = &node.value else {
            self.wrong_type("spec.bypass", node, "a sequence");
            return None;
        };
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
}

/// `a, b or c`, for "expected ..." messages.
fn one_of(names: &[&str]) -> String {
    match names {
        [] => "nothing".to_owned(),
        [one] => (*one).to_owned(),
        [rest @ .., last] => format!("{} or {last}", rest.join(", ")),
    }
}

/// A Kubernetes object name (RFC 1123 subdomain): names end up in `egress status` columns and
/// in events, where spaces or control characters would garble the output.
fn is_dns_subdomain(name: &str) -> bool {
    let ok_byte = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    !name.is_empty()
        && name.len() <= 253
        && name.bytes().all(|b| ok_byte(b) || b == b'-' || b == b'.')
        && name.bytes().next().is_some_and(ok_byte)
        && name.bytes().last().is_some_and(ok_byte)
}
