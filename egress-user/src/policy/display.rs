//! The normalised form of a policy, as `egress check` prints it.
//!
//! ```text
//! mode: enforce
//! bypass: 127.0.0.0/8, ::1/128
//! dns: 192.0.2.53, 2001:db8::53 (from /etc/resolv.conf)
//! scopes: team-a (and node-wide)
//! rules: 2
//! wikipedia-range1  91.198.174.192/27  443/tcp            (seed.yaml:1)
//! example-v6        2001:db8::/32      443/tcp, 8443/tcp  (seed.yaml:11)
//! http rules: 1
//! team-a/httpbin-rule  httpbin.test  80/http, 443/https  (seed.yaml:21)
//! aliases: 1
//! alias httpbin (httpbin, httpbin.default, httpbin.default.svc, httpbin.default.svc.cluster.local) -> httpbin.test 80/http  (seed.yaml:31)
//! proxy: port 15001
//! caFiles: none
//! hosts: 1
//! httpbin.test  192.0.2.10, 2001:db8::10
//! ```
//!
//! Everything is shown as the filter and the proxy will use it: single addresses as /32 or
//! /128, host names in their ASCII form, protocols lowercase, alias ports with the protocol
//! the proxy speaks upstream, defaults spelt out (`events` and `allowSockets` appear only when
//! they are not the default; `dns` once the resolvers are filled, with where they came from;
//! `scopes` when rules name namespaces). A rule of a namespace is named `namespace/name`.
//! Rules keep their file order and columns are aligned, so two outputs can be diffed line by
//! line and read at a glance. Each rule ends with the `FILE:LINE` of its document, to find it
//! again.

use std::fmt;

use super::model::{Alias, AllowSockets, DnsSource, Origin, Policy};

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "mode: {}", self.mode)?;
        if self.events != super::model::Events::default() {
            writeln!(f, "events: {}", self.events)?;
        }
        if self.bypass.is_empty() {
            // Not an empty line: with no bypass even loopback is filtered, worth saying.
            writeln!(f, "bypass: none")?;
        } else {
            writeln!(f, "bypass: {}", list(&self.bypass))?;
        }
        match (&self.dns.source, self.dns.resolvers.as_slice()) {
            (DnsSource::None, _) => {}
            (source, []) => writeln!(f, "dns: none (from {source})")?,
            (source, resolvers) => writeln!(f, "dns: {} (from {source})", list(resolvers))?,
        }
        if self.allow_sockets != AllowSockets::default() {
            let raw = self.allow_sockets.raw.then(|| "raw".to_owned());
            let protocols = self.allow_sockets.protocols.iter().map(|&p| {
                AllowSockets::protocol_name(p)
                    .map_or_else(|| p.to_string(), |n| format!("{p} ({n})"))
            });
            writeln!(
                f,
                "allowSockets: {}",
                list(raw.into_iter().chain(protocols))
            )?;
        }

        let scopes = self.scopes();
        if !scopes.is_empty() {
            // Each namespace's pods get its rules and the node-wide ones; every other workload
            // the node-wide ones only.
            writeln!(f, "scopes: {} (and node-wide)", list(&scopes))?;
        }

        writeln!(f, "rules: {}", self.rules.len())?;
        let rows = self.rules.iter().map(|rule| {
            rule_row(
                &rule.row_name(),
                rule.destination,
                rule.ports.iter(),
                &rule.origin,
            )
        });
        table(f, rows)?;

        writeln!(f, "http rules: {}", self.http_rules.len())?;
        let rows = self.http_rules.iter().map(|rule| {
            let ports = rule
                .ports
                .iter()
                .map(|p| format!("{}/{}", p.port, p.protocol));
            let name = super::model::scoped_name(rule.scope.as_deref(), &rule.name);
            rule_row(&name, &rule.host, ports, &rule.origin)
        });
        table(f, rows)?;

        // Shown when there are some, so that the listing of other policies stays as it was.
        if !self.name_rules.is_empty() {
            writeln!(f, "fqdn rules: {}", self.name_rules.len())?;
            let rows = self.name_rules.iter().map(|rule| {
                rule_row(
                    &rule.row_name(),
                    &rule.host,
                    rule.ports.iter(),
                    &rule.origin,
                )
            });
            table(f, rows)?;
        }

        writeln!(f, "aliases: {}", self.aliases.len())?;
        let rows = self.aliases.iter().map(|alias| {
            let ports = alias
                .ports
                .iter()
                .map(|&port| format!("{port}/{}", Alias::protocol(port)));
            (
                [format!(
                    "alias {} ({}) -> {} {}{}",
                    alias.name,
                    alias.hostnames().join(", "),
                    alias.external_name,
                    list(ports),
                    alias
                        .scope
                        .as_ref()
                        .map_or_else(String::new, |ns| format!(" for {ns}'s pods")),
                )],
                Some(alias.origin.to_string()),
            )
        });
        table(f, rows)?;

        write!(f, "proxy: port {}", self.proxy.port)?;
        // Shown when set, so that the listing of a policy without it stays as it was.
        if self.proxy.idle_timeout != super::DEFAULT_PROXY_IDLE_TIMEOUT {
            write!(f, ", idle timeout {}s", self.proxy.idle_timeout.as_secs())?;
        }
        writeln!(f)?;
        if self.ca_files.is_empty() {
            writeln!(f, "caFiles: none")?;
        } else {
            writeln!(
                f,
                "caFiles: {}",
                list(self.ca_files.iter().map(|p| p.display()))
            )?;
        }
        writeln!(f, "hosts: {}", self.hosts.len())?;
        let rows = self
            .hosts
            .iter()
            .map(|(name, addresses)| ([name.clone(), list(addresses)], None));
        table(f, rows)
    }
}

/// A rule's row: its name, what it allows, its ports as `port/protocol`, and where it is
/// written.
fn rule_row(
    name: &str,
    allows: impl fmt::Display,
    ports: impl Iterator<Item = impl fmt::Display>,
    origin: &Origin,
) -> ([String; 3], Option<String>) {
    (
        [name.to_owned(), allows.to_string(), list(ports)],
        Some(origin.to_string()),
    )
}

/// `a, b, c`.
fn list<T: fmt::Display>(items: impl IntoIterator<Item = T>) -> String {
    items
        .into_iter()
        .map(|item| item.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Rows of `N` columns, each padded to the column's widest cell and separated by two spaces,
/// then the origin in parentheses when there is one. The last column is not padded when no
/// origin follows it, so no line ends in spaces.
fn table<const N: usize>(
    f: &mut fmt::Formatter<'_>,
    rows: impl Iterator<Item = ([String; N], Option<String>)>,
) -> fmt::Result {
    let rows: Vec<_> = rows.collect();
    let mut widths = [0; N];
    for (cells, _) in &rows {
        for (width, cell) in widths.iter_mut().zip(cells) {
            *width = (*width).max(cell.chars().count());
        }
    }
    for (cells, origin) in &rows {
        let mut line = String::new();
        for (i, (cell, width)) in cells.iter().zip(widths).enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(cell);
            if i + 1 < N || origin.is_some() {
                line.extend(std::iter::repeat_n(' ', width - cell.chars().count()));
            }
        }
        match origin {
            Some(origin) => writeln!(f, "{line}  ({origin})")?,
            None => writeln!(f, "{line}")?,
        }
    }
    Ok(())
}
