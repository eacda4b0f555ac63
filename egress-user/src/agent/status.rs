//! What `egress status` and `egress get` show: every rule and alias in force with its
//! counters (the kernel's and the proxy's) and where it is defined, the reserved rows, and the
//! agent's own state.

#![forbid(unsafe_code)]

use std::collections::HashMap;

use egress_common::DNS_PORT;

use crate::{
    compile::{DNS_RULE_NAME, NO_RULE_NAME, RESERVED_ROWS},
    control::{ProxyStatus, RuleRow, Status},
    policy,
    state::Kind,
};

use super::Agent;

impl Agent {
    /// Where a rule or alias of the policy in force is defined.
    /// Where the rule or Service named `name` (as [`policy::scoped_name`] and
    /// [`service_name`] name them) is defined.
    pub(super) fn origin_of(&self, kind: Kind, name: &str) -> Option<String> {
        match kind {
            Kind::EgressRule if name == DNS_RULE_NAME => self
                .has_dns_rule()
                .then(|| self.policy.dns.source.to_string()),
            Kind::EgressRule => self
                .policy
                .rules
                .iter()
                .find(|r| r.row_name() == name)
                .map(|r| r.origin.to_string())
                .or_else(|| {
                    let rules = &self.policy.http_rules;
                    rules
                        .iter()
                        .find(|r| policy::scoped_name(r.scope.as_deref(), &r.name) == name)
                        .map(|r| r.origin.to_string())
                })
                .or_else(|| {
                    let rules = &self.policy.name_rules;
                    rules
                        .iter()
                        .find(|r| r.row_name() == name)
                        .map(|r| r.origin.to_string())
                }),
            Kind::Service => self
                .policy
                .aliases
                .iter()
                .find(|a| service_name(&a.namespace, &a.name) == name)
                .map(|a| a.origin.to_string()),
        }
    }

    /// Every rule and alias in force with its counters, then the reserved rows.
    pub(super) fn rows(&self) -> Vec<RuleRow> {
        let kernel: HashMap<String, egress_common::RuleCounters> = match self.enforcer.counters() {
            Ok(rows) => rows.into_iter().map(|r| (r.name, r.counters)).collect(),
            Err(e) => {
                tracing::warn!(error = %e, "reading the kernel counters");
                HashMap::new()
            }
        };
        let proxy: HashMap<Option<String>, u64> = self
            .proxies
            .borrow()
            .counters()
            .into_iter()
            .map(|s| (s.rule, s.requests))
            .collect();
        let created = self.settings.store.created_path().display().to_string();
        let objects: std::collections::HashSet<String> = self.cluster.source_names().collect();
        let row = |kind: Kind,
                   (namespace, name): (Option<&str>, &str),
                   allows: String,
                   origin: &policy::Origin| {
            // Counted under `namespace/name` for a rule of a namespace.
            let counted = match kind {
                Kind::EgressRule => policy::scoped_name(namespace, name).into_owned(),
                Kind::Service => name.to_owned(),
            };
            let k = kernel.get(&counted).copied().unwrap_or_default();
            RuleRow {
                kind: kind.to_string(),
                name: name.to_owned(),
                namespace: namespace.map(str::to_owned),
                allows,
                // An API object is named by itself; its document has no lines to point at.
                source: if objects.contains(origin.file.as_str()) {
                    origin.file.clone()
                } else {
                    origin.to_string()
                },
                created: origin.file == created,
                allowed: k.allowed,
                denied: k.denied,
                would_deny: k.would_deny,
                requests: proxy.get(&Some(counted)).copied().unwrap_or(0),
            }
        };
        let mut rows = Vec::new();
        for r in &self.policy.rules {
            let ports = join(r.ports.iter().map(ToString::to_string));
            let allows = format!("{} {ports}", r.destination);
            let who = (r.scope.as_deref(), r.name.as_str());
            rows.push(row(Kind::EgressRule, who, allows, &r.origin));
        }
        for r in &self.policy.http_rules {
            let ports = join(r.ports.iter().map(|p| format!("{}/{}", p.port, p.protocol)));
            let allows = format!("{} {ports}", r.host);
            let who = (r.scope.as_deref(), r.name.as_str());
            rows.push(row(Kind::EgressRule, who, allows, &r.origin));
        }
        for r in &self.policy.name_rules {
            // An FQDN rule allows what the answers for its names gave, on its ports.
            let ports = join(r.ports.iter().map(ToString::to_string));
            let allows = format!("{} {ports} (by DNS answer)", r.host);
            let who = (r.scope.as_deref(), r.name.as_str());
            rows.push(row(Kind::EgressRule, who, allows, &r.origin));
        }
        rows.extend(dns_row(
            &self.policy.dns,
            kernel.get(DNS_RULE_NAME).copied().unwrap_or_default(),
        ));
        for a in &self.policy.aliases {
            let ports = join(
                a.ports
                    .iter()
                    .map(|p| format!("{}/{p}", policy::Alias::protocol(*p))),
            );
            rows.push(row(
                Kind::Service,
                (Some(a.namespace.as_str()), a.name.as_str()),
                format!("{}.{} -> {} {ports}", a.name, a.namespace, a.external_name),
                &a.origin,
            ));
        }
        for (_, name) in RESERVED_ROWS {
            let k = kernel.get(name).copied().unwrap_or_default();
            rows.push(RuleRow {
                kind: "reserved".to_owned(),
                name: name.to_owned(),
                allowed: k.allowed,
                denied: k.denied,
                would_deny: k.would_deny,
                requests: if name == NO_RULE_NAME {
                    proxy.get(&None).copied().unwrap_or(0)
                } else {
                    0
                },
                ..RuleRow::default()
            });
        }
        rows
    }

    /// Whether the policy in force has the implicit DNS rule: it has resolvers.
    fn has_dns_rule(&self) -> bool {
        !self.policy.dns.resolvers.is_empty()
    }

    /// `egress status`.
    pub(super) fn status(&self) -> Status {
        let target = &self.settings.target;
        let attached = self.attached();
        let proxy = self.proxies.borrow().clone();
        let counters = proxy.counters();
        let stats = self.enforcer.stats().unwrap_or_default();
        let mut sources: Vec<String> = if self.settings.paths.is_empty() {
            vec![policy::DEFAULT_POLICY_NAME.to_owned()]
        } else {
            self.settings
                .paths
                .iter()
                .map(|p| p.display().to_string())
                .collect()
        };
        sources.push(self.settings.store.created_path().display().to_string());
        Status {
            ready: attached && self.settings.listeners.complete(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: std::process::id(),
            mode: self.policy.mode.to_string(),
            generation: self.generation(),
            cgroup: target.cgroup.display().to_string(),
            pin_dir: target.pin_dir.display().to_string(),
            attached,
            sources,
            rules: self.rows(),
            proxy: ProxyStatus {
                listening: self
                    .settings
                    .listeners
                    .listening()
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
                missing: self
                    .settings
                    .listeners
                    .missing()
                    .iter()
                    .map(|m| format!("{}: {}", m.address, m.error))
                    .collect(),
                requests: counters.iter().map(|c| c.requests).sum(),
                denied: counters.iter().map(|c| c.denied).sum(),
                would_deny: counters.iter().map(|c| c.would_deny).sum(),
                events_dropped: proxy.events_dropped(),
                ..self
                    .health
                    .as_ref()
                    .map(|h| h.proxy_status())
                    .unwrap_or_default()
            },
            reloads_ok: self.reloads_ok,
            reloads_failed: self.reloads_failed,
            last_error: self.last_error.clone(),
            events_lost: stats.events_lost,
            kernel_errors: stats.errors,
            hooks: self
                .enforcer
                .hooks()
                .unwrap_or_default()
                .into_iter()
                .map(|h| crate::control::HookRow {
                    hook: h.name,
                    allowed: h.counters.allowed,
                    denied: h.counters.denied,
                    would_deny: h.counters.would_deny,
                })
                .collect(),
            xdp_ifaces: self.enforcer.xdp_ifaces(),
            kernel: self.settings.kernel.release.clone(),
            degraded: self.settings.kernel.degraded_lines(),
            problems: self
                .health
                .as_ref()
                .map(|h| h.problems())
                .unwrap_or_default(),
        }
    }
}

/// The row `egress status` and `get` show for the implicit DNS rule, when the policy has
/// resolvers: its source is where the resolvers come from (a resolv.conf, or the EgressConfig).
fn dns_row(dns: &policy::Dns, k: egress_common::RuleCounters) -> Option<RuleRow> {
    if dns.resolvers.is_empty() {
        return None;
    }
    Some(RuleRow {
        kind: Kind::EgressRule.to_string(),
        name: DNS_RULE_NAME.to_owned(),
        namespace: None,
        allows: format!(
            "{} udp/{DNS_PORT},tcp/{DNS_PORT}",
            join(dns.resolvers.iter().map(ToString::to_string))
        ),
        source: dns.source.to_string(),
        created: false,
        allowed: k.allowed,
        denied: k.denied,
        would_deny: k.would_deny,
        requests: 0,
    })
}

fn join(items: impl Iterator<Item = String>) -> String {
    items.collect::<Vec<_>>().join(",")
}

/// A Service's name in messages: `name` in `default`, else `namespace/name`.
pub(super) fn service_name(namespace: &str, name: &str) -> String {
    if namespace == "default" {
        name.to_owned()
    } else {
        format!("{namespace}/{name}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dns_rule_row_names_its_resolvers_and_their_source() {
        let mut dns = policy::Dns {
            resolvers: vec![
                "192.0.2.53".parse().unwrap(),
                "2001:db8::53".parse().unwrap(),
            ],
            source: policy::DnsSource::ResolvConf("/etc/resolv.conf".into()),
        };
        let counters = egress_common::RuleCounters {
            allowed: 7,
            denied: 0,
            would_deny: 1,
        };
        let row = dns_row(&dns, counters).expect("resolvers");
        assert_eq!(
            row,
            RuleRow {
                kind: "egressrule".to_owned(),
                name: "(dns)".to_owned(),
                namespace: None,
                allows: "192.0.2.53,2001:db8::53 udp/53,tcp/53".to_owned(),
                source: "/etc/resolv.conf".to_owned(),
                created: false,
                allowed: 7,
                denied: 0,
                would_deny: 1,
                requests: 0,
            }
        );
        dns.source = policy::DnsSource::Config(policy::Origin {
            file: "p.yaml".to_owned(),
            line: 3,
        });
        assert_eq!(
            dns_row(&dns, counters).expect("resolvers").source,
            "p.yaml:3"
        );
        dns.resolvers.clear();
        assert_eq!(dns_row(&dns, counters), None);
    }
}
