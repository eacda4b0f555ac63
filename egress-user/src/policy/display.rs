//! The normalised form of a policy, as `egress check` prints it.
//!
//! ```text
//! mode: enforce
//! bypass: 127.0.0.0/8, ::1/128
//! rules: 2
//! wikipedia-range1  91.198.174.192/27  443/tcp            (seed.yaml:1)
//! example-v6        2001:db8::/32      443/tcp, 8443/tcp  (seed.yaml:11)
//! ```
//!
//! Everything is shown as the filter will use it: single addresses as /32 or /128, protocols
//! lowercase, the default bypass spelt out. Rules keep their file order and columns are
//! aligned, so two outputs can be diffed line by line and read at a glance. Each rule ends
//! with the `FILE:LINE` of its document, to find it again.

use std::fmt;

use super::model::Policy;

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "mode: {}", self.mode)?;
        if self.bypass.is_empty() {
            // Not an empty line: with no bypass even loopback is filtered, worth saying.
            writeln!(f, "bypass: none")?;
        } else {
            let bypass: Vec<String> = self.bypass.iter().map(ToString::to_string).collect();
            writeln!(f, "bypass: {}", bypass.join(", "))?;
        }
        writeln!(f, "rules: {}", self.rules.len())?;
        let rows: Vec<[String; 3]> = self
            .rules
            .iter()
            .map(|rule| {
                let ports: Vec<String> = rule
                    .ports
                    .iter()
                    .map(|p| format!("{}/{}", p.port, p.protocol))
                    .collect();
                [
                    rule.name.clone(),
                    rule.destination.to_string(),
                    ports.join(", "),
                ]
            })
            .collect();
        let width = |column: usize| rows.iter().map(|r| r[column].len()).max().unwrap_or(0);
        let (name_width, destination_width, ports_width) = (width(0), width(1), width(2));
        for (rule, [name, destination, ports]) in self.rules.iter().zip(&rows) {
            writeln!(
                f,
                "{name:<name_width$}  {destination:<destination_width$}  \
                 {ports:<ports_width$}  ({})",
                rule.origin
            )?;
        }
        Ok(())
    }
}
