//! Policy documents for the tests: one builder, instead of a `format!` of YAML in every test
//! file. Every document ends in `---`, so that documents concatenate into a policy.

use std::fmt::{self, Display};

use egress_user::policy::Policy;

/// An `EgressRule` document: a destination and its ports.
#[derive(Clone, Debug)]
pub struct Rule {
    name: String,
    service: String,
    ports: Vec<(u16, &'static str)>,
}

impl Rule {
    /// A rule `name` for destination `service` (a CIDR, an address or a host), no port yet.
    pub fn new(name: &str, service: impl Display) -> Self {
        Self {
            name: name.to_owned(),
            service: service.to_string(),
            ports: Vec::new(),
        }
    }

    /// Allows TCP to `port`.
    pub fn tcp(mut self, port: u16) -> Self {
        self.ports.push((port, "tcp"));
        self
    }

    /// Allows UDP to `port`.
    pub fn udp(mut self, port: u16) -> Self {
        self.ports.push((port, "udp"));
        self
    }

    /// Allows `port` over `protocol` (`tcp`, `udp`, `http`, `https`).
    pub fn port(mut self, port: u16, protocol: &'static str) -> Self {
        self.ports.push((port, protocol));
        self
    }

    /// Allows TCP and UDP to each of `ports`.
    pub fn tcp_and_udp(self, ports: impl IntoIterator<Item = u16>) -> Self {
        ports.into_iter().fold(self, |rule, p| rule.tcp(p).udp(p))
    }
}

impl Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "kind: EgressRule\nmetadata:\n  name: {}\nspec:\n  destination:\n    service: \"{}\"\n  ports:\n",
            self.name, self.service
        )?;
        for (port, protocol) in &self.ports {
            write!(f, "    - port: {port}\n      protocol: {protocol}\n")?;
        }
        f.write_str("---\n")
    }
}

/// A one-port TCP rule's YAML: the most common rule of the tests.
pub fn tcp_rule(name: &str, service: impl Display, port: u16) -> String {
    Rule::new(name, service).tcp(port).to_string()
}

/// A one-port TCP rule for TEST-NET-1 (192.0.2.0/24, the sandbox's first network) as a single
/// document, without the `---` that ends [`Rule`]'s: what `egress create -f -` reads, and a
/// policy file of one rule. Its name is on line 3, its port on line 8 (where a bad port is
/// reported).
pub fn test_net_rule(name: &str, port: u16) -> String {
    let doc = tcp_rule(name, "192.0.2.0/24", port);
    doc.strip_suffix("---\n").expect("a document").to_owned()
}

/// An `EgressConfig` document with `spec` (its lines, each indented by two spaces).
pub fn config(spec: &str) -> String {
    format!("kind: EgressConfig\nmetadata:\n  name: config\nspec:\n{spec}---\n")
}

/// `yaml` parsed and checked as the agent would (as file `test.yaml`); an invalid test policy
/// fails the test with the checker's message.
pub fn load(yaml: &str) -> Policy {
    egress_user::policy::load_sources(&[("test.yaml".to_owned(), yaml.as_bytes().to_vec())])
        .unwrap_or_else(|e| panic!("test policy is invalid:\n{e}\n{yaml}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_concatenate_into_a_valid_policy() {
        let yaml = config("  mode: audit\n")
            + &tcp_rule("a", "192.0.2.0/24", 80)
            + &Rule::new("b", "2001:db8::1")
                .tcp_and_udp([53, 54])
                .to_string();
        let p = load(&yaml);
        assert_eq!(p.rules.len(), 2);
        assert_eq!(p.rules[1].ports.len(), 4);
        assert_eq!(p.mode, egress_user::policy::Mode::Audit);
    }
}
