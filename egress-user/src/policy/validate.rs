//! The schema walk: one YAML document in, one checked [`Item`] out, every problem reported
//! with the path and line of the field that has it.
//!
//! The walk never stops at the first error: a bad port does not hide a bad protocol on the
//! next line, so a user fixes a file in one round. What a document cannot check alone (a
//! duplicate name, a second EgressConfig) is left to [`super::load`].
//!
//! This module holds the dispatch on `kind` and the field helpers every kind uses; each kind
//! has its own submodule: [`rule`] (EgressRule), [`service`] (Service) and [`config`]
//! (EgressConfig).

mod config;
mod rule;
mod service;

pub(crate) use config::Config;

use std::sync::Arc;

use super::{
    model::{Alias, HttpRule, NameRule, Rule},
    report::{Report, join},
    yaml::{Entry, Node, ScalarKind, Value},
};

/// The fields every document may have, whatever its kind.
const DOCUMENT_FIELDS: &[&str] = &["apiVersion", "kind", "metadata", "spec"];
/// The `metadata` fields we read: a rule's `namespace` scopes it to that namespace's pods.
const METADATA_FIELDS: &[&str] = &["name", "namespace"];
/// The usual Kubernetes `metadata` fields, accepted so that manifests written for a cluster
/// load as they are, and ignored: they mean nothing to the filter.
const METADATA_IGNORED: &[&str] = &["labels", "annotations"];
/// The kinds a document may be, for messages.
const KINDS: &str = "EgressRule, EgressConfig or Service";

/// What one document turned out to be.
#[derive(Clone, Debug)]
pub(crate) enum Item {
    /// A `kind: EgressRule` document.
    Rule {
        /// `metadata.name` and its line, when it is a valid name, so duplicates are found even
        /// among rules that have other errors. Shared, as the rule, with the document cache.
        name: Option<(Arc<str>, usize)>,
        /// The rule, when the document has no error.
        rule: Option<EgressRule>,
    },
    /// A `kind: Service` document (an ExternalName alias).
    Service {
        /// Name, namespace and the name's line, when valid, for the duplicate checks.
        key: Option<Box<ServiceKey>>,
        /// The alias, when the document has no error.
        alias: Option<Box<Alias>>,
    },
    /// A `kind: EgressConfig` document.
    Config {
        /// Line of the `kind` value, where a second EgressConfig is reported.
        line: usize,
        /// The settings, when the document has no error.
        config: Option<Box<Config>>,
    },
}

/// A checked EgressRule: which list of the policy it goes to depends on its destination.
#[derive(Clone, Debug)]
pub(crate) enum EgressRule {
    /// A CIDR or IP destination with tcp and udp ports; shared with the document cache.
    Kernel(Arc<Rule>),
    /// A host-name destination with tcp/udp ports (an FQDN rule).
    Name(Box<NameRule>),
    /// A host-name destination with http/https ports.
    Http {
        /// The rule.
        rule: Box<HttpRule>,
        /// The line of each of `rule.ports`, for messages about a port.
        port_lines: Vec<usize>,
    },
}

/// Who a Service is: Services are unique by namespace and name.
#[derive(Clone, Debug)]
pub(crate) struct ServiceKey {
    /// `metadata.name`.
    pub(crate) name: String,
    /// `metadata.namespace`, `default` when absent.
    pub(crate) namespace: String,
    /// The namespace it was given (by its document, or `egress create -n`): the alias is for
    /// that namespace's pods only. `None`: for every managed workload.
    pub(crate) scope: Option<String>,
    /// Line of `metadata.name`.
    pub(crate) line: usize,
}

/// Checks one document (the root node of a non-empty YAML document). `None` when the document
/// is not a policy document at all (not a mapping, no or unknown kind): already reported.
pub(crate) fn document(root: &Node, report: &mut Report) -> Option<Item> {
    let mut walk = Walk {
        report,
        namespace: None,
    };
    let fields = walk.mapping("", root.line, root)?;
    let kind_entry = fields.get("kind");
    let Some(kind_entry) = kind_entry else {
        walk.report.field_error(
            root.line,
            "kind",
            format!("missing field (expected {KINDS})"),
        );
        return None;
    };
    let kind = walk.string("kind", &kind_entry.value)?;
    let line = kind_entry.value.line;
    match kind {
        "EgressRule" => Some(walk.rule(root, &fields)),
        "EgressConfig" => Some(Item::Config {
            line,
            config: walk.config(&fields).map(Box::new),
        }),
        "Service" => Some(walk.service(root, &fields)),
        other => {
            walk.report.field_error(
                line,
                "kind",
                format!("unknown kind `{other}` (expected {KINDS})"),
            );
            None
        }
    }
}

/// A mapping's entries by key.
///
/// The entries are a list searched in order rather than a hash map: only known fields are in
/// it, two to six of them, and a policy of 10,000 rules has 50,000 of these mappings.
struct Fields<'n> {
    /// Path of the mapping, `""` for a document.
    path: String,
    /// Where a missing field is reported: the line of the key that holds the mapping (or of
    /// the mapping itself for a document or a sequence item).
    line: usize,
    /// The entries, each key once (the YAML tree has no duplicate keys).
    entries: Vec<&'n Entry>,
}

impl<'n> Fields<'n> {
    /// The entry for `key`, if present.
    fn get(&self, key: &str) -> Option<&'n Entry> {
        self.entries.iter().find(|e| e.key == key).copied()
    }
}

/// A name and the line it is on.
type Named = (String, usize);

/// The walk over one document, carrying where errors go.
struct Walk<'r> {
    /// Where errors go.
    report: &'r mut Report,
    /// The namespace of a rule that names none: none for a policy file (the rule is
    /// node-wide).
    namespace: Option<String>,
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
        path: impl Into<String> + AsRef<str>,
        line: usize,
        node: &'n Node,
        known: &[&str],
        ignored: &[&str],
    ) -> Option<Fields<'n>> {
        let Value::Map(entries) = &node.value else {
            self.wrong_type(path.as_ref(), node, "a mapping");
            return None;
        };
        let mut fields = Fields {
            path: path.into(),
            line,
            entries: Vec::with_capacity(entries.len().min(known.len())),
        };
        for entry in entries {
            if known.contains(&entry.key.as_str()) {
                fields.entries.push(entry);
            } else if !ignored.contains(&entry.key.as_str()) {
                self.report.field_error(
                    entry.key_line,
                    &join(&fields.path, &entry.key),
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
        self.mapping_of(path, entry.key_line, &entry.value, known, ignored)
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

    /// `metadata.name` (required on a rule, optional on the config) and `metadata.namespace`
    /// (a namespace name, with its line), each when given and valid.
    fn name(&mut self, doc: &Fields<'_>, required: bool) -> (Option<Named>, Option<Named>) {
        let Some(metadata) =
            self.sub_mapping(doc, "metadata", METADATA_FIELDS, METADATA_IGNORED, required)
        else {
            return (None, None);
        };
        let namespace = metadata.get("namespace").and_then(|ns| {
            let line = ns.value.line;
            self.label("metadata.namespace", &ns.value, "namespace", false)
                .map(|ns| (ns, line))
        });
        let entry = if required {
            self.require(&metadata, "name")
        } else {
            metadata.get("name")
        };
        let Some(entry) = entry else {
            return (None, namespace);
        };
        let Some(name) = self.string("metadata.name", &entry.value) else {
            return (None, namespace);
        };
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
            return (None, namespace);
        }
        (Some((name.to_owned(), entry.value.line)), namespace)
    }

    /// The field `port` of the mapping at `path`: an integer 1..=65535.
    fn port(&mut self, path: &str, entry: &Entry) -> Option<u16> {
        // The usual case without building the path, which only a message needs.
        if let Value::Scalar(s) = &entry.value.value
            && s.kind == ScalarKind::Int
            && let Int::Value(n) = parse_int(&s.text)
            && let Ok(port) = u16::try_from(n)
            && port != 0
        {
            return Some(port);
        }
        self.port_value(&join(path, "port"), &entry.value)
    }

    /// `node` (at `path`) as a port: an integer 1..=65535, written without a leading zero.
    fn port_value(&mut self, path: &str, node: &Node) -> Option<u16> {
        let text = match &node.value {
            Value::Scalar(s) if s.kind == ScalarKind::Int => &s.text,
            _ => {
                self.wrong_type(path, node, "a port number (1-65535)");
                return None;
            }
        };
        let port = match parse_int(text) {
            Int::Value(n) => u16::try_from(n).ok(),
            Int::NotDecimal(value) => {
                self.not_decimal(path, node, text, value);
                return None;
            }
            Int::Invalid => None,
        };
        match port {
            Some(port) if port != 0 => Some(port),
            _ => {
                self.report.field_error(
                    node.line,
                    path,
                    format!("{text} is not a valid port (1-65535)"),
                );
                None
            }
        }
    }

    /// Reports an integer not written in plain decimal ([`Int::NotDecimal`]).
    fn not_decimal(&mut self, path: &str, node: &Node, text: &str, value: Option<u64>) {
        let unsigned = text.strip_prefix('+').unwrap_or(text);
        let (why, value) = if unsigned.starts_with("0x") || unsigned.starts_with("0o") {
            ("is not written in decimal", value)
        } else if unsigned.len() > 1 && unsigned.starts_with('0') {
            // Whether 443 or 291 was meant cannot be told: no hint.
            (
                "has a leading zero, which some YAML readers take as octal",
                None,
            )
        } else {
            ("has a sign", value)
        };
        let write = value.map(|v| format!("; write {v}")).unwrap_or_default();
        self.report.field_error(
            node.line,
            path,
            format!("`{text}` {why}{write} (numbers are written in plain decimal here)"),
        );
    }

    /// `node` (at `path`) as one of the keywords of `choices`, in any case (as every keyword
    /// value); `what` names the setting when it is none of them.
    fn keyword<T: Copy>(
        &mut self,
        path: &str,
        node: &Node,
        what: &str,
        choices: &[(&str, T)],
    ) -> Option<T> {
        let text = self.string(path, node)?;
        let found = choices
            .iter()
            .find(|(name, _)| text.eq_ignore_ascii_case(name));
        if found.is_none() {
            let names: Vec<&str> = choices.iter().map(|(name, _)| *name).collect();
            self.report.field_error(
                node.line,
                path,
                format!("unknown {what} `{text}` (expected {})", one_of(&names)),
            );
        }
        found.map(|(_, value)| *value)
    }

    /// `spec.ports` of `spec`: a sequence of at least one item. `empty` is the error for an
    /// empty one.
    fn port_items<'n>(&mut self, spec: &Fields<'n>, empty: &str) -> Option<&'n [Node]> {
        let entry = self.require(spec, "ports")?;
        let items = self.sequence("spec.ports", &entry.value)?;
        if items.is_empty() {
            self.report
                .field_error(entry.value.line, "spec.ports", empty);
            return None;
        }
        Some(items)
    }

    /// `node` (at `path`) as a sequence.
    fn sequence<'n>(&mut self, path: &str, node: &'n Node) -> Option<&'n [Node]> {
        if let Value::Seq(items) = &node.value {
            Some(items)
        } else {
            self.wrong_type(path, node, "a sequence");
            None
        }
    }
}

/// An integer scalar's value.
enum Int {
    /// The value (negative numbers and numbers past `u64` are [`Int::Invalid`]).
    Value(u64),
    /// Not plain decimal, and refused rather than read one way: `0443` (YAML 1.2 reads it as
    /// 443 and YAML 1.1 readers such as PyYAML and Go's yaml.v2 as octal 291), and `0x1bb`,
    /// `0o673`, `+443` (the core schema reads them as 443, but a reviewer reading `port:
    /// 0o673` does not see 443, and a YAML 1.1 reader sees the string `0o673`). The value, if
    /// any, goes in the message.
    NotDecimal(Option<u64>),
    /// Not a non-negative integer that fits.
    Invalid,
}

/// The core schema's integer forms: `443`, and (as [`Int::NotDecimal`]) `+443`, `0x1bb`,
/// `0o673`, `0443`.
fn parse_int(text: &str) -> Int {
    let unsigned = text.strip_prefix('+').unwrap_or(text);
    let (value, decimal) = if let Some(hex) = unsigned.strip_prefix("0x") {
        (u64::from_str_radix(hex, 16).ok(), false)
    } else if let Some(octal) = unsigned.strip_prefix("0o") {
        (u64::from_str_radix(octal, 8).ok(), false)
    } else {
        let leading_zero = unsigned.len() > 1 && unsigned.starts_with('0');
        (unsigned.parse::<u64>().ok(), !leading_zero)
    };
    match value {
        Some(value) if decimal && unsigned.len() == text.len() => Int::Value(value),
        // `0o1777777777777777777777` is as much a mistake as `0o673`: say that first.
        value if !decimal || unsigned.len() != text.len() => Int::NotDecimal(value),
        _ => Int::Invalid,
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

/// An RFC 1123 label (a Kubernetes namespace): lowercase letters, digits and '-', starting and
/// ending with a letter or digit, at most 63 characters. With `letter_first`, an RFC 1035
/// label (a Kubernetes Service name), which must start with a letter.
fn is_dns_label(name: &str, letter_first: bool) -> bool {
    let ok_byte = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let first_ok = |b: u8| {
        if letter_first {
            b.is_ascii_lowercase()
        } else {
            ok_byte(b)
        }
    };
    (1..=63).contains(&name.len())
        && name.bytes().all(|b| ok_byte(b) || b == b'-')
        && name.bytes().next().is_some_and(first_ok)
        && name.bytes().last().is_some_and(ok_byte)
}
