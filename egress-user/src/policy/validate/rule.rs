//! `kind: EgressRule`: a destination and its ports. The destination decides what the rule is:
//! a CIDR or IP address with tcp and udp ports is a kernel rule ([`Rule`]); a host name or
//! `*.`-wildcard with tcp and udp ports is an FQDN rule ([`NameRule`]), judged by the kernel
//! by the addresses DNS answers gave for it; with http/https ports it is a proxy rule
//! ([`HttpRule`]). An address with http/https ports is refused with what to write instead.

use std::{collections::HashMap, fmt, sync::Arc};

use ipnet::IpNet;

use super::{EgressRule, Fields, Item, Walk};
use crate::policy::{
    addr, host,
    model::{
        HostPattern, HttpPort, HttpProtocol, HttpRule, NameRule, PortRule, Protocol, Rule,
        port_span,
    },
    report::join,
    yaml::{Entry, Node, ScalarKind, Value},
};

/// The field path of the destination, in messages.
const SERVICE_PATH: &str = "spec.destination.service";

/// A port's protocol as written: tcp and udp go to the kernel, http and https to the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PortProtocol {
    /// `tcp` or `udp`.
    Kernel(Protocol),
    /// `http` or `https`.
    Http(HttpProtocol),
}

impl PortProtocol {
    /// `tcp`, `udp`, `http` or `https`, in any case.
    fn named(text: &str) -> Option<Self> {
        [
            ("tcp", Self::Kernel(Protocol::Tcp)),
            ("udp", Self::Kernel(Protocol::Udp)),
            ("http", Self::Http(HttpProtocol::Http)),
            ("tls", Self::Http(HttpProtocol::Tls)),
            ("https", Self::Http(HttpProtocol::Https)),
        ]
        .into_iter()
        .find_map(|(name, protocol)| text.eq_ignore_ascii_case(name).then_some(protocol))
    }

    /// Whether the kernel judges it (tcp, udp) rather than the proxy (http, https).
    fn is_kernel(self) -> bool {
        matches!(self, Self::Kernel(_))
    }
}

impl fmt::Display for PortProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Kernel(protocol) => protocol.fmt(f),
            Self::Http(protocol) => protocol.fmt(f),
        }
    }
}

/// One checked `spec.ports[]` entry.
#[derive(Clone, Copy, Debug)]
struct PortSpec {
    /// 1..=65535.
    port: u16,
    /// The last port of its range (`endPort`), `port` when it has none.
    end: u16,
    /// Its protocol.
    protocol: PortProtocol,
    /// Line of the item, where a problem with the whole port is reported.
    line: usize,
    /// Line of the `protocol` value, where a protocol that does not fit is reported.
    protocol_line: usize,
}

impl PortSpec {
    /// The port as a kernel rule's, if it is tcp or udp.
    fn kernel(&self) -> Option<PortRule> {
        let PortProtocol::Kernel(protocol) = self.protocol else {
            return None;
        };
        Some(PortRule {
            port: self.port,
            end: self.end,
            protocol,
        })
    }

    /// The port as an http rule's, if it is http or https.
    fn http(&self) -> Option<HttpPort> {
        let PortProtocol::Http(protocol) = self.protocol else {
            return None;
        };
        Some(HttpPort {
            port: self.port,
            protocol,
        })
    }
}

/// `spec.destination.service`, classified.
enum Destination {
    /// A CIDR or a single address.
    Net(IpNet),
    /// A host name or wildcard, normalised.
    Host(HostPattern),
}

impl Walk<'_> {
    /// A `kind: EgressRule` document.
    pub(super) fn rule(&mut self, root: &Node, doc: &Fields<'_>) -> Item {
        let errors_before = self.report.error_count();
        let (name, namespace) = self.name(doc, true);
        // A rule of a namespace applies to that namespace's pods; one of none to every managed
        // workload. Its name is unique in its namespace: `namespace/name` in the whole policy.
        let scope = namespace
            .map(|(ns, _)| ns)
            .or_else(|| self.namespace.clone());
        let name = name.map(|(name, line)| match &scope {
            Some(ns) => (format!("{ns}/{name}"), line),
            None => (name, line),
        });
        let spec = self.sub_mapping(doc, "spec", &["destination", "ports"], &[], true);
        let destination = spec.as_ref().and_then(|spec| self.destination(spec));
        let ports = spec.as_ref().and_then(|spec| self.ports(spec));
        // One family of protocols per rule, checked even when the destination is wrong.
        let ports = ports.filter(|ports| self.one_family(ports));
        let rule = match (destination, ports) {
            (Some((destination, line)), Some(ports)) => self.pair(destination, line, &ports),
            _ => None,
        };
        let rule = match (&name, rule) {
            (Some((name, _)), Some(rule)) if self.report.error_count() == errors_before => {
                let name = match &scope {
                    Some(ns) => name[ns.len() + 1..].to_owned(),
                    None => name.clone(),
                };
                let origin = self.report.origin(root.line);
                Some(match rule {
                    Paired::Kernel(destination, ports) => EgressRule::Kernel(Arc::new(Rule {
                        name,
                        scope,
                        origin,
                        destination,
                        ports,
                    })),
                    Paired::Name(host, ports) => EgressRule::Name(Box::new(NameRule {
                        name,
                        scope,
                        origin,
                        host,
                        ports,
                    })),
                    Paired::Http(host, ports, port_lines) => EgressRule::Http {
                        rule: Box::new(HttpRule {
                            name,
                            scope,
                            origin,
                            host,
                            ports,
                        }),
                        port_lines,
                    },
                })
            }
            _ => None,
        };
        Item::Rule {
            name: name.map(|(name, line)| (Arc::from(name), line)),
            rule,
        }
    }

    /// Whether the ports are all tcp/udp or all http/https (reported when not): the two go to
    /// different places, the kernel and the proxy, with different kinds of destination.
    fn one_family(&mut self, ports: &[PortSpec]) -> bool {
        let Some(first) = ports.first() else {
            return true;
        };
        if let Some((i, other)) = ports
            .iter()
            .enumerate()
            .find(|(_, p)| p.protocol.is_kernel() != first.protocol.is_kernel())
        {
            self.report.field_error(
                other.protocol_line,
                &format!("spec.ports[{i}].protocol"),
                format!(
                    "`{}` and `{}` (spec.ports[0]) cannot share a rule: tcp and udp ports are \
                     judged by the kernel and http/https ports by the proxy; write two rules",
                    other.protocol, first.protocol
                ),
            );
            return false;
        }
        true
    }

    /// Checks that the destination and the ports (of one family) go together: tcp/udp with
    /// an address, http/https with a host name.
    fn pair(
        &mut self,
        destination: Destination,
        service_line: usize,
        ports: &[PortSpec],
    ) -> Option<Paired> {
        let first = ports.first()?;
        let is_kernel = first.protocol.is_kernel();
        match destination {
            Destination::Net(net) if is_kernel => Some(Paired::Kernel(
                net,
                ports.iter().filter_map(PortSpec::kernel).collect(),
            )),
            Destination::Host(host) if !is_kernel => Some(Paired::Http(
                host,
                ports.iter().filter_map(PortSpec::http).collect(),
                ports.iter().map(|p| p.line).collect(),
            )),
            Destination::Host(host) => Some(Paired::Name(
                host,
                ports.iter().filter_map(PortSpec::kernel).collect(),
            )),
            Destination::Net(net) => {
                self.report.field_error(
                    service_line,
                    SERVICE_PATH,
                    format!(
                        "http, https and tls rules need a host name destination, and `{net}` is an \
                         address; use protocol tcp or udp for an IP/CIDR"
                    ),
                );
                None
            }
        }
    }

    /// `spec.destination.service` and the line of its value: what looks like an address is
    /// parsed as one (so `10.0.0.1/24` gets the address's message), anything else as a host
    /// name or wildcard.
    fn destination(&mut self, spec: &Fields<'_>) -> Option<(Destination, usize)> {
        let destination = self.sub_mapping(spec, "destination", &["service"], &[], true)?;
        let entry = self.require(&destination, "service")?;
        let service = self.string(SERVICE_PATH, &entry.value)?;
        let line = entry.value.line;
        let looks_like_address = service.contains(['/', ':'])
            || service.bytes().all(|b| b.is_ascii_digit() || b == b'.');
        let parsed = if service.is_empty() {
            Err(
                "the destination is empty (expected a CIDR, an IP address or a host name)"
                    .to_owned(),
            )
        } else if looks_like_address {
            addr::parse_net(service)
                .and_then(|net| addr::not_embedded(service, net))
                .map(Destination::Net)
                .map_err(|e| e.to_string())
        } else {
            host::parse_pattern(service)
                .map(Destination::Host)
                .map_err(|e| e.to_string())
        };
        match parsed {
            Ok(destination) => Some((destination, line)),
            Err(message) => {
                self.report.field_error(line, SERVICE_PATH, message);
                None
            }
        }
    }

    /// `spec.ports`: at least one, each port once with each protocol. One port may be both
    /// tcp and udp (53/tcp and 53/udp), never both http and https, nor kernel and proxy. A
    /// tcp or udp entry may be a range (`endPort`, both ends included), which may not overlap
    /// another entry of its protocol in the rule.
    fn ports(&mut self, spec: &Fields<'_>) -> Option<Vec<PortSpec>> {
        let items = self.port_items(spec, "a rule needs at least one port")?;
        let mut ports: Vec<PortSpec> = Vec::with_capacity(items.len());
        // Single ports by number, and the ranges: a repeat is found without comparing every
        // pair of a long list of single ports.
        let mut seen: HashMap<u16, Vec<usize>> = HashMap::new();
        let mut ranges: Vec<usize> = Vec::new();
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            let path = format!("spec.ports[{i}]");
            let Some(fields) = self.mapping_of(
                &*path,
                item.line,
                item,
                &["port", "endPort", "protocol"],
                &[],
            ) else {
                ok = false;
                continue;
            };
            let port = self
                .require(&fields, "port")
                .and_then(|e| self.port(&path, e));
            let protocol = self
                .require(&fields, "protocol")
                .and_then(|e| self.protocol(&path, e).map(|p| (p, e.value.line)));
            let end = fields.get("endPort").map(|e| {
                let end_path = join(&path, "endPort");
                (self.port_value(&end_path, &e.value), e.value.line, end_path)
            });
            let (Some(port), Some((protocol, protocol_line))) = (port, protocol) else {
                ok = false;
                continue;
            };
            let end = match end {
                None => port,
                Some((None, _, _)) => {
                    ok = false;
                    continue;
                }
                Some((Some(end), line, end_path)) => {
                    let problem = if !protocol.is_kernel() {
                        Some(format!(
                            "a port range cannot be {protocol}: the proxy takes each of its ports \
                             on its own; list the ports"
                        ))
                    } else if end < port {
                        Some(format!(
                            "{end} is below port {port} (a range is port to endPort, both \
                             included)"
                        ))
                    } else {
                        None
                    };
                    if let Some(problem) = problem {
                        self.report.field_error(line, &end_path, problem);
                        ok = false;
                        continue;
                    }
                    end
                }
            };
            // Rejected rather than merged: a repeated port is more often a typo for another
            // one (443 twice where 8443 was meant) than a deliberate repeat, and one port
            // cannot be both plain and TLS-originating. TCP and UDP are separate port spaces,
            // so 53/tcp beside 53/udp is two keys, not a repeat; a tcp port beside an http one
            // is left to `one_family`, which says why they cannot share a rule. A range that
            // overlaps another entry is refused for the same reason.
            let clashes = |earlier: &PortSpec| {
                let both_http = !earlier.protocol.is_kernel() && !protocol.is_kernel();
                (earlier.protocol == protocol || both_http)
                    && earlier.port <= end
                    && port <= earlier.end
            };
            let candidates: Vec<usize> = if end == port {
                seen.get(&port)
                    .into_iter()
                    .flatten()
                    .chain(&ranges)
                    .copied()
                    .collect()
            } else {
                (0..ports.len()).collect()
            };
            let earlier = candidates
                .into_iter()
                .filter(|&j| clashes(&ports[j]))
                .min()
                .map(|j| (j, ports[j]));
            if let Some((first, earlier)) = earlier {
                let message = if earlier.protocol == protocol
                    && earlier.port == earlier.end
                    && port == end
                {
                    format!("duplicate port {port}/{protocol} (also spec.ports[{first}])")
                } else if earlier.protocol == protocol && port == end {
                    format!(
                        "port {port}/{protocol} is already in spec.ports[{first}] ({}/{protocol})",
                        port_span(earlier.port, earlier.end)
                    )
                } else if earlier.protocol == protocol {
                    format!(
                        "ports {}/{protocol} overlap spec.ports[{first}] ({}/{protocol}); \
                         each port is in one entry of a rule",
                        port_span(port, end),
                        port_span(earlier.port, earlier.end)
                    )
                } else {
                    format!(
                        "port {port} is already spec.ports[{first}] as {port}/{}; \
                         a port has one protocol in a rule",
                        earlier.protocol
                    )
                };
                self.report.field_error(item.line, &path, message);
                ok = false;
                continue;
            }
            if end == port {
                seen.entry(port).or_default().push(ports.len());
            } else {
                ranges.push(ports.len());
            }
            ports.push(PortSpec {
                port,
                end,
                protocol,
                line: item.line,
                protocol_line,
            });
        }
        ok.then_some(ports)
    }

    /// `spec.ports[i].protocol`: tcp, udp, http, https or tls, in any case, as the Istio docs
    /// write both `tcp` and `HTTP`.
    fn protocol(&mut self, path: &str, entry: &Entry) -> Option<PortProtocol> {
        // The usual case without building the path, which only a message needs.
        if let Value::Scalar(s) = &entry.value.value
            && s.kind == ScalarKind::Str
            && let Some(protocol) = PortProtocol::named(&s.text)
        {
            return Some(protocol);
        }
        let path = format!("{path}.protocol");
        let text = self.string(&path, &entry.value)?;
        match PortProtocol::named(text) {
            Some(protocol) => Some(protocol),
            None => {
                self.report.field_error(
                    entry.value.line,
                    &path,
                    format!(
                        "unknown protocol `{}` (expected tcp, udp, http, https or tls)",
                        text.escape_debug()
                    ),
                );
                None
            }
        }
    }
}

/// A destination and ports that go together.
enum Paired {
    /// An address range and tcp/udp ports.
    Kernel(IpNet, Vec<PortRule>),
    /// A host pattern and tcp/udp ports: an FQDN rule.
    Name(HostPattern, Vec<PortRule>),
    /// A host pattern, http/https ports and the line of each port.
    Http(HostPattern, Vec<HttpPort>, Vec<usize>),
}
