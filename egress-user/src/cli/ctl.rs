//! What the verbs that talk to a running agent share: the socket option, one request with its
//! answer, and printing tables.

use std::path::PathBuf;

use crate::control::{
    DEFAULT_SOCKET, Request, Response, RuleRow,
    client::{self},
};

/// The control socket option.
#[derive(clap::Args, Debug, Clone)]
pub struct SocketArg {
    /// The running agent's control socket (root only).
    #[arg(long, value_name = "PATH", env = "EGRESS_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
}

/// `-n/--namespace`, as `istioctl create -f rule.yaml -n default` and `kubectl -n` take it:
/// the namespace whose rules the verb works on. A namespace's rules apply to its pods only.
#[derive(clap::Args, Debug, Clone)]
pub struct NamespaceArg {
    /// The namespace whose rules to work on (its pods'); without it, the node-wide rules.
    #[arg(short = 'n', long = "namespace", value_name = "NS", value_parser = parse_namespace)]
    pub namespace: Option<String>,
}

/// A Kubernetes namespace name: an RFC 1123 label.
pub fn parse_namespace(ns: &str) -> Result<String, String> {
    let ok = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let valid = (1..=63).contains(&ns.len())
        && ns.bytes().all(|b| ok(b) || b == b'-')
        && ns.bytes().next().is_some_and(ok)
        && ns.bytes().last().is_some_and(ok);
    if valid {
        Ok(ns.to_owned())
    } else {
        Err(format!(
            "`{ns}` is not a namespace name (lowercase letters, digits and '-', starting and \
             ending with a letter or digit, at most 63 characters)"
        ))
    }
}

/// Output formats.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Output {
    /// A table for people.
    #[default]
    Table,
    /// JSON, for scripts.
    Json,
}

/// Sends `request` and returns the answer; the agent's error answer becomes an error.
pub fn call(socket: &SocketArg, request: &Request) -> anyhow::Result<Response> {
    match client::call(&socket.socket, request)? {
        Response::Error { message } => Err(anyhow::anyhow!("{message}")),
        other => Ok(other),
    }
}

/// Sends a request that changes the policy and prints what it did and the new generation.
pub fn apply(socket: &SocketArg, request: &Request) -> anyhow::Result<()> {
    match call(socket, request)? {
        Response::Applied {
            generation,
            message,
        } => println!("{message} (generation {generation})"),
        other => anyhow::bail!("unexpected answer from the agent: {other:?}"),
    }
    Ok(())
}

/// Prints rows as an aligned table.
pub fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        println!("{}", out.trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// The rule table `status` and `get` print.
pub fn print_rules(rules: &[RuleRow]) {
    let rows: Vec<Vec<String>> = rules
        .iter()
        .map(|r| {
            vec![
                r.kind.clone(),
                r.namespace.clone().unwrap_or_else(|| "*".to_owned()),
                r.name.clone(),
                r.allows.clone(),
                r.allowed.to_string(),
                r.denied.to_string(),
                r.would_deny.to_string(),
                r.requests.to_string(),
                if r.created {
                    format!("created ({})", r.source)
                } else {
                    r.source.clone()
                },
            ]
        })
        .collect();
    print_table(
        &[
            "KIND",
            "NAMESPACE",
            "NAME",
            "ALLOWS",
            "ALLOWED",
            "DENIED",
            "WOULD-DENY",
            "HTTP-REQS",
            "SOURCE",
        ],
        &rows,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_are_rfc_1123_labels() {
        assert_eq!(parse_namespace("default").as_deref(), Ok("default"));
        assert_eq!(parse_namespace("team-a").as_deref(), Ok("team-a"));
        for bad in ["", "Team", "-a", "a-", "a.b", &"a".repeat(64)] {
            let refused = parse_namespace(bad).expect_err(bad);
            assert!(refused.contains("is not a namespace name"), "{refused}");
        }
    }
}
