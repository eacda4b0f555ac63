//! Policy files: parse, validate and normalise Istio-style multi-document YAML.
//!
//! The entry points are [`load_files`] and [`load_sources`]; both return a complete
//! [`Policy`] or every error found, each as `FILE:LINE: what is wrong`. Nothing partial ever
//! comes out, so nothing invalid can reach a map. Unless its EgressConfig names them, a policy
//! to enforce then gets its DNS resolvers from resolv.conf ([`Policy::fill_resolvers`]).

#![forbid(unsafe_code)]

mod addr;
pub mod ca;
mod cache;
mod display;
pub mod dns;
mod host;
mod load;
mod model;
pub mod read;
mod report;
/// The policy documents of the seeds, Istio's tasks, verbatim: the five EgressRules of
/// *Control Egress TCP Traffic* and the two ExternalName Services of *Configuring Egress with
/// Envoy*. One copy, for every test that reads them.
#[cfg(test)]
pub(crate) mod seeds {
    /// Seed 003's EgressRules.
    pub(crate) const TCP: &str = include_str!("seeds/tcp.yaml");
    /// Seed 000's Services.
    pub(crate) const SERVICES: &str = include_str!("seeds/services.yaml");
}
#[cfg(test)]
mod tests;
mod validate;
mod yaml;

pub(crate) use cache::digest;
pub use host::{HostError, LabelProblem, MAX_HOST_LEN, MAX_LABEL_LEN, normalise_host};
pub use load::{
    MAX_FILE_SIZE, PolicySource, ReadSource, default_policy, load_files, load_mixed, load_read,
    load_read_whole, load_sources, read_sources,
};
pub use model::{
    ALIAS_ADDRESS, ALIAS_TTL, Alias, AllowSockets, DEFAULT_PROXY_IDLE_TIMEOUT, DEFAULT_PROXY_PORT,
    DNS_LISTEN_PORT, Diagnostic, Dns, DnsSource, Embedded, Events, HostName, HostPattern, HttpPort,
    HttpProtocol, HttpRule, MIN_LEARNED_TTL, Mode, NameRule, Origin, Policy, PolicyErrors,
    PortRule, Protocol, ProxySettings, Rule, default_bypass, judged_as, port_span, scoped_name,
};

/// The policy `egress run` enforces when no `--policy` is given (`egress check --default`).
pub const DEFAULT_POLICY: &str = include_str!("default.yaml");
/// The file name the default policy's messages carry.
pub const DEFAULT_POLICY_NAME: &str = "<default>";
