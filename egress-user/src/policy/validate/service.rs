//! `kind: Service` with `spec.type: ExternalName`, as Kubernetes writes it: an alias. A request
//! for Host `httpbin` (or `httpbin.<namespace>[.svc[.cluster.local]]`) goes to
//! `spec.externalName` on the same port. The documents of Istio's "Configuring Egress with
//! Envoy" task load as written:
//!
//! ```yaml
//! apiVersion: v1
//! kind: Service
//! metadata:
//!   name: httpbin
//! spec:
//!   type: ExternalName
//!   externalName: httpbin.org
//!   ports:
//!   - port: 80
//! ```
//!
//! Only what an ExternalName Service means is accepted; fields that would mean something else
//! in a cluster (a selector, a differing targetPort) are refused rather than ignored, so a
//! Service never silently does less than its author expects.

use std::collections::HashMap;

use super::{Fields, Item, ServiceKey, Walk, is_dns_label};
use crate::policy::{
    host::{self, HostError},
    model::{Alias, HostName},
    report::join,
    yaml::{Entry, Node, ScalarKind, Value},
};

/// The only `apiVersion` of a Service.
const API_VERSION: &str = "v1";
/// The namespace of a Service that names none, as in Kubernetes.
const DEFAULT_NAMESPACE: &str = "default";
/// The `spec` fields of an ExternalName Service.
const SPEC_FIELDS: &[&str] = &["type", "externalName", "ports"];
/// The fields of a `spec.ports[]` entry.
const PORT_FIELDS: &[&str] = &["port", "name", "protocol", "targetPort"];

impl Walk<'_> {
    /// A `kind: Service` document.
    pub(super) fn service(&mut self, root: &Node, doc: &Fields<'_>) -> Item {
        let errors_before = self.report.error_count();
        self.api_version(doc);
        let key = self.service_metadata(doc);
        let target = self.external_name_spec(doc);
        let alias = match (&key, target) {
            (Some(key), Some((external_name, ports)))
                if self.report.error_count() == errors_before =>
            {
                Some(Alias {
                    name: key.name.clone(),
                    namespace: key.namespace.clone(),
                    scope: key.scope.clone(),
                    origin: self.report.origin(root.line),
                    external_name,
                    ports,
                })
            }
            _ => None,
        };
        Item::Service {
            key: key.map(Box::new),
            alias: alias.map(Box::new),
        }
    }

    /// `apiVersion`: optional, `v1` when given.
    fn api_version(&mut self, doc: &Fields<'_>) {
        let Some(entry) = doc.get("apiVersion") else {
            return;
        };
        if let Some(version) = self.string("apiVersion", &entry.value)
            && version != API_VERSION
        {
            self.report.field_error(
                entry.value.line,
                "apiVersion",
                format!(
                    "a Service is apiVersion {API_VERSION}, not `{}`",
                    version.escape_debug()
                ),
            );
        }
    }

    /// `metadata.name` (a DNS label: it becomes the host name clients use) and
    /// `metadata.namespace`.
    fn service_metadata(&mut self, doc: &Fields<'_>) -> Option<ServiceKey> {
        let metadata = self.sub_mapping(
            doc,
            "metadata",
            &["name", "namespace"],
            &["labels", "annotations"],
            true,
        )?;
        let scope = match metadata.get("namespace") {
            None => Some(self.namespace.clone()),
            Some(entry) => self
                .label("metadata.namespace", &entry.value, "namespace", false)
                .map(Some),
        };
        let namespace = scope
            .clone()
            .map(|s| s.unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned()));
        let entry = self.require(&metadata, "name")?;
        let name = self.label("metadata.name", &entry.value, "Service name", true)?;
        Some(ServiceKey {
            name,
            namespace: namespace?,
            scope: scope?,
            line: entry.value.line,
        })
    }

    /// `node` as a DNS label; `what` names it in the message.
    pub(super) fn label(
        &mut self,
        path: &str,
        node: &Node,
        what: &str,
        letter_first: bool,
    ) -> Option<String> {
        let text = self.string(path, node)?;
        if is_dns_label(text, letter_first) {
            return Some(text.to_owned());
        }
        let start = if letter_first {
            "a letter"
        } else {
            "a letter or digit"
        };
        self.report.field_error(
            node.line,
            path,
            format!(
                "\"{}\" is not a valid {what} (a DNS label: lowercase letters, digits and '-', \
                 starting with {start} and ending with a letter or digit, at most 63 \
                 characters; it becomes part of the host names clients use)",
                text.escape_debug()
            ),
        );
        None
    }

    /// `spec`: `type: ExternalName`, `externalName` and `ports`. Any other type is reported
    /// alone: its other fields (a selector, a clusterIP) would only add noise.
    fn external_name_spec(&mut self, doc: &Fields<'_>) -> Option<(HostName, Vec<u16>)> {
        let spec_entry = self.require(doc, "spec")?;
        if let Value::Map(entries) = &spec_entry.value.value {
            match entries.iter().find(|e| e.key == "type") {
                None => {
                    self.report.field_error(
                        spec_entry.key_line,
                        "spec.type",
                        "missing field (only type ExternalName is supported: a Service here \
                         is an alias for an external host)",
                    );
                    return None;
                }
                Some(entry) => {
                    let kind = self.string("spec.type", &entry.value)?;
                    // A keyword value: any case, as every keyword value.
                    if !kind.eq_ignore_ascii_case("ExternalName") {
                        self.report.field_error(
                            entry.value.line,
                            "spec.type",
                            format!(
                                "Service type `{}` is not supported (only type ExternalName \
                                 is supported: a Service here is an alias for an external host)",
                                kind.escape_debug()
                            ),
                        );
                        return None;
                    }
                }
            }
        }
        let spec = self.mapping_of(
            "spec",
            spec_entry.key_line,
            &spec_entry.value,
            SPEC_FIELDS,
            &[],
        )?;
        let external_name = self
            .require(&spec, "externalName")
            .and_then(|entry| self.external_name(entry));
        let ports = self.service_ports(&spec);
        Some((external_name?, ports?))
    }

    /// `spec.externalName`: one DNS name, normalised.
    fn external_name(&mut self, entry: &Entry) -> Option<HostName> {
        const PATH: &str = "spec.externalName";
        let text = self.string(PATH, &entry.value)?;
        match host::normalise_host(text) {
            Ok(name) => Some(name),
            Err(error) => {
                let message = match error {
                    HostError::IpAddress { text } => format!(
                        "`{text}` is an IP address; externalName must be a DNS name (an \
                         ExternalName Service is a DNS alias; for an address, write an \
                         EgressRule with a CIDR destination)"
                    ),
                    HostError::WildcardNotAllowed { text } => {
                        format!("`{text}` is a wildcard; externalName must be one host name")
                    }
                    other => other.to_string(),
                };
                self.report.field_error(entry.value.line, PATH, message);
                None
            }
        }
    }

    /// `spec.ports`: at least one, each port once, TCP only.
    fn service_ports(&mut self, spec: &Fields<'_>) -> Option<Vec<u16>> {
        let items = self.port_items(
            spec,
            "an ExternalName Service needs at least one port (the ports requests arrive on)",
        )?;
        let mut ports = Vec::with_capacity(items.len());
        let mut seen: HashMap<u16, usize> = HashMap::new();
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            let path = format!("spec.ports[{i}]");
            let Some(port) = self.service_port(&path, item) else {
                ok = false;
                continue;
            };
            if let Some(first) = seen.get(&port) {
                self.report.field_error(
                    item.line,
                    &path,
                    format!("duplicate port {port} (also spec.ports[{first}])"),
                );
                ok = false;
                continue;
            }
            seen.insert(port, i);
            ports.push(port);
        }
        ok.then_some(ports)
    }

    /// One `spec.ports[]` entry: `port`, and optionally `name`, `protocol: TCP` and a
    /// `targetPort` equal to `port`.
    fn service_port(&mut self, path: &str, item: &Node) -> Option<u16> {
        let fields = self.mapping_of(path, item.line, item, PORT_FIELDS, &[])?;
        let errors_before = self.report.error_count();
        let port = self
            .require(&fields, "port")
            .and_then(|e| self.port(path, e));
        if let Some(entry) = fields.get("name") {
            self.string(&join(path, "name"), &entry.value);
        }
        if let Some(entry) = fields.get("protocol") {
            let protocol_path = join(path, "protocol");
            if let Some(protocol) = self.string(&protocol_path, &entry.value)
                && !protocol.eq_ignore_ascii_case("tcp")
            {
                self.report.field_error(
                    entry.value.line,
                    &protocol_path,
                    format!(
                        "only TCP is supported for a Service port, not `{}`",
                        protocol.escape_debug()
                    ),
                );
            }
        }
        if let Some(entry) = fields.get("targetPort") {
            self.target_port(path, entry, port);
        }
        port.filter(|_| self.report.error_count() == errors_before)
    }

    /// `targetPort`: Kubernetes ignores it for an ExternalName Service (the client connects to
    /// the external name on the port it used), and so do we; a different one is refused so
    /// nobody expects a port mapping that never happens.
    fn target_port(&mut self, path: &str, entry: &Entry, port: Option<u16>) {
        let target_path = join(path, "targetPort");
        let node = &entry.value;
        if let Value::Scalar(scalar) = &node.value
            && scalar.kind == ScalarKind::Str
        {
            self.report.field_error(
                node.line,
                &target_path,
                format!(
                    "a named targetPort (`{}`) means nothing for an ExternalName Service: \
                     requests go to externalName on the same port; remove it",
                    scalar.text.escape_debug()
                ),
            );
            return;
        }
        if let (Some(target), Some(port)) = (self.port_value(&target_path, node), port)
            && target != port
        {
            self.report.field_error(
                node.line,
                &target_path,
                format!(
                    "targetPort {target} differs from port {port}: requests go to externalName \
                     on the same port, so remove targetPort or make it {port}"
                ),
            );
        }
    }
}
