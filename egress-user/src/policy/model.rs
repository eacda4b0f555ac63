//! The normalised policy: what every valid policy file means, independent of how it was
//! written. The compiler ([`crate::compile`]) turns this, and only this, into map entries.

use std::fmt;

use ipnet::IpNet;

/// Where a document or a field came from, for messages of the form `FILE:LINE: ...`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    /// The file name as the user gave it (or `<default>` for the embedded policy).
    pub file: String,
    /// 1-based line number.
    pub line: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file, self.line)
    }
}

/// What the kernel does with a connection no rule allows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// Deny it: `connect()` fails with `EPERM`.
    #[default]
    Enforce,
    /// Let it through and report it as a would-deny.
    Audit,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Enforce => "enforce",
            Self::Audit => "audit",
        })
    }
}

/// The protocol of a rule's port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// A TCP connection, judged at `connect()`.
    Tcp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
        })
    }
}

/// One `spec.ports[]` entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortRule {
    /// 1..=65535.
    pub port: u16,
    /// The protocol.
    pub protocol: Protocol,
}

/// One `kind: EgressRule` document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// `metadata.name`, unique in the policy.
    pub name: String,
    /// Where the document starts.
    pub origin: Origin,
    /// `spec.destination.service` as a network with no host bits set; a single address
    /// becomes a /32 or /128.
    pub destination: IpNet,
    /// `spec.ports`, in file order, without duplicates.
    pub ports: Vec<PortRule>,
}

/// A whole validated policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// From `kind: EgressConfig` `spec.mode`; enforce when absent.
    pub mode: Mode,
    /// From `kind: EgressConfig` `spec.bypass`; [`default_bypass`] when absent. An explicit
    /// list replaces the default, so `bypass: []` filters loopback too.
    pub bypass: Vec<IpNet>,
    /// Every EgressRule, in the order of the files and of the documents in them.
    pub rules: Vec<Rule>,
}

/// The bypass ranges when the policy names none: loopback, `127.0.0.0/8` and `::1/128`.
pub fn default_bypass() -> Vec<IpNet> {
    vec![
        "127.0.0.0/8".parse().expect("valid literal"),
        "::1/128".parse().expect("valid literal"),
    ]
}

/// One thing wrong with the input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    /// Where it is wrong.
    pub origin: Origin,
    /// What is wrong, lowercase, no trailing period.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.origin, self.message)
    }
}

/// Every error found in a policy, in file and line order. A policy with any is rejected whole.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct PolicyErrors(pub Vec<Diagnostic>);

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}
