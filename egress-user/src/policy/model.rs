//! The normalised policy: what every valid policy file means, independent of how it was
//! written. The compiler ([`crate::compile`]) turns this, and only this, into map entries.

use std::{
    borrow::Cow,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

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

/// Which kernel verdicts become events (EgressConfig `spec.events`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Events {
    /// Denials and audit mode's would-be denials only: an allowed connection is counted, not
    /// reported (the default; allowed connections can come at tens of thousands a second).
    #[default]
    Denied,
    /// Every verdict, allowed ones too.
    All,
}

impl fmt::Display for Events {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Denied => "denied",
            Self::All => "all",
        })
    }
}

/// The protocol of a rule's port: both are judged by the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    /// A TCP connection, judged at `connect()`.
    Tcp,
    /// UDP datagrams, judged at `connect()` of the socket or at each `sendmsg()` to an
    /// address.
    Udp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        })
    }
}

/// One `spec.ports[]` entry: a port, or a range of ports (`endPort`, as Kubernetes
/// NetworkPolicy spells it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortRule {
    /// 1..=65535: the port, or the first of the range.
    pub port: u16,
    /// The last port of the range, included: `endPort`, or `port` when there is none.
    pub end: u16,
    /// The protocol.
    pub protocol: Protocol,
}

impl PortRule {
    /// One port: `{port: N, protocol: P}`.
    pub const fn new(port: u16, protocol: Protocol) -> Self {
        Self {
            port,
            end: port,
            protocol,
        }
    }

    /// `{port: N, protocol: tcp}`.
    pub const fn tcp(port: u16) -> Self {
        Self::new(port, Protocol::Tcp)
    }

    /// Its ports, `port..=end`.
    pub fn ports(&self) -> std::ops::RangeInclusive<u16> {
        self.port..=self.end
    }

    /// How many ports it covers.
    pub fn count(&self) -> usize {
        usize::from(self.end - self.port) + 1
    }
}

/// `443/tcp`, or `8000-8999/tcp` for a range.
impl fmt::Display for PortRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", port_span(self.port, self.end), self.protocol)
    }
}

/// Ports `port..=end` as written in messages: `8080`, or `8000-8999`.
pub fn port_span(port: u16, end: u16) -> String {
    if end == port {
        port.to_string()
    } else {
        format!("{port}-{end}")
    }
}

/// One `kind: EgressRule` document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// `metadata.name`, unique in its namespace.
    pub name: String,
    /// `metadata.namespace`: the rule applies to that namespace's pods only. `None`: to every
    /// managed workload (pods of every namespace, host processes).
    pub scope: Option<String>,
    /// Where the document starts.
    pub origin: Origin,
    /// `spec.destination.service` as a network with no host bits set; a single address
    /// becomes a /32 or /128.
    pub destination: IpNet,
    /// `spec.ports`, in file order, each (port, protocol) once: a port may be both tcp and
    /// udp.
    pub ports: Vec<PortRule>,
}

/// The name a rule of `scope` goes by in counters, events and `egress status`:
/// `namespace/name`, or `name` for a node-wide rule (borrowed: no copy of each of 10,000
/// names when a policy is compiled).
pub fn scoped_name<'a>(scope: Option<&str>, name: &'a str) -> Cow<'a, str> {
    match scope {
        Some(ns) => Cow::Owned(format!("{ns}/{name}")),
        None => Cow::Borrowed(name),
    }
}

impl Rule {
    /// Its name in counters, events and `egress status` (see [`scoped_name`]).
    pub fn row_name(&self) -> Cow<'_, str> {
        scoped_name(self.scope.as_deref(), &self.name)
    }

    /// The IPv6 ranges with an embedded IPv4 address that this rule's destination contains:
    /// connections there are judged by the IPv4 rules, not by this rule (`::/0` contains both).
    /// A destination inside one of them is refused when the policy is loaded.
    pub fn embedded_ranges(&self) -> Vec<Embedded> {
        match self.destination {
            IpNet::V4(_) => Vec::new(),
            IpNet::V6(net) => Embedded::ALL
                .into_iter()
                .filter(|range| net.contains(&range.prefix()))
                .collect(),
        }
    }
}

/// An IPv6 range whose addresses carry an IPv4 address. The kernel judges a destination there
/// by the IPv4 rules as the embedded IPv4 address (the event says which range it came from),
/// never by the IPv6 rules, as it does for IPv4-mapped addresses (`::ffff:a.b.c.d`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Embedded {
    /// NAT64's well-known prefix, `64:ff9b::/96` (RFC 6052): the last 32 bits.
    Nat64,
    /// 6to4, `2002::/16` (RFC 3056): the 32 bits after the prefix, `2002:AABB:CCDD::/48`.
    SixToFour,
}

impl Embedded {
    /// Both ranges.
    pub const ALL: [Self; 2] = [Self::Nat64, Self::SixToFour];

    /// The range.
    pub fn prefix(self) -> Ipv6Net {
        match self {
            Self::Nat64 => Ipv6Net::new_assert(Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0, 0), 96),
            Self::SixToFour => Ipv6Net::new_assert(Ipv6Addr::new(0x2002, 0, 0, 0, 0, 0, 0, 0), 16),
        }
    }

    /// The bit where the IPv4 address starts: the length of the prefix.
    fn offset(self) -> u8 {
        self.prefix().prefix_len()
    }

    /// The range `addr` is in, if any.
    pub fn of(addr: Ipv6Addr) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|range| range.prefix().contains(&addr))
    }

    /// The IPv4 address embedded in `addr` (which is in this range).
    pub fn ipv4(self, addr: Ipv6Addr) -> Ipv4Addr {
        let bits = u128::from(addr);
        let shift = 128 - 32 - u32::from(self.offset());
        // Truncation intended: the 32 bits after the prefix.
        Ipv4Addr::from((bits >> shift) as u32)
    }

    /// The IPv4 network the kernel judges the addresses of `net` as, when `net` lies inside
    /// this range: its embedded bits, at most 32 of them (a 6to4 /64 is one IPv4 address).
    pub fn ipv4_net(self, net: Ipv6Net) -> Option<Ipv4Net> {
        if !self.prefix().contains(&net) {
            return None;
        }
        let len = (net.prefix_len() - self.offset()).min(32);
        Ipv4Net::new(self.ipv4(net.network()), len)
            .ok()
            .map(|net| net.trunc())
    }
}

impl fmt::Display for Embedded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Nat64 => write!(f, "NAT64 ({})", self.prefix()),
            Self::SixToFour => write!(f, "6to4 ({})", self.prefix()),
        }
    }
}

/// The address the kernel judges a connection to `addr` as: the IPv4 address inside an
/// IPv4-mapped, NAT64 or 6to4 address; anything else as it is.
pub fn judged_as(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(_) => addr,
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                IpAddr::V4(v4)
            } else if let Some(range) = Embedded::of(v6) {
                IpAddr::V4(range.ipv4(v6))
            } else {
                addr
            }
        }
    }
}

/// A normalised host name: ASCII (IDN converted to punycode), lowercase, no trailing dot.
pub type HostName = String;

/// The destination of an HTTP rule.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum HostPattern {
    /// Exactly this host.
    Exact(HostName),
    /// `*.suffix`: any host strictly below `suffix` (`a.suffix`, `a.b.suffix`), never
    /// `suffix` itself. Holds the suffix without the `*.`.
    Wildcard(HostName),
}

impl HostPattern {
    /// True when `host` (already normalised) is allowed by this pattern.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            Self::Exact(name) => host == name,
            Self::Wildcard(suffix) => host
                .strip_suffix(suffix.as_str())
                .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(name) => f.write_str(name),
            Self::Wildcard(suffix) => write!(f, "*.{suffix}"),
        }
    }
}

/// How the proxy talks to the upstream of an HTTP rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HttpProtocol {
    /// Plain HTTP to host:port.
    Http,
    /// The app speaks plain HTTP; the proxy originates TLS to host:port (SNI = host,
    /// certificate verified against the system roots plus `caFiles`).
    Https,
    /// TLS passthrough: the app does its own TLS; the proxy reads the ClientHello's server
    /// name (SNI), and when it matches the rule relays the connection unmodified to its own
    /// resolution of that name on the same port (never to the address the app gave).
    Tls,
}

impl fmt::Display for HttpProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Http => "http",
            Self::Https => "https",
            Self::Tls => "tls",
        })
    }
}

/// One port of an HTTP rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HttpPort {
    /// 1..=65535: the port the app connects to, and the upstream port.
    pub port: u16,
    /// Plain or TLS-originating.
    pub protocol: HttpProtocol,
}

/// An `EgressRule` whose destination is a host name or `*.`-wildcard, with http/https ports:
/// connections to those ports go through the proxy, which allows a request when its
/// authority matches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpRule {
    /// `metadata.name`, unique among the EgressRules of its namespace.
    pub name: String,
    /// `metadata.namespace`, as [`Rule::scope`]: the pods the proxy allows it for.
    pub scope: Option<String>,
    /// Where the document starts.
    pub origin: Origin,
    /// `spec.destination.service`.
    pub host: HostPattern,
    /// `spec.ports`, http or https, in file order.
    pub ports: Vec<HttpPort>,
}

/// An `EgressRule` whose destination is a host name or `*.`-wildcard with tcp/udp ports (an
/// FQDN rule): the kernel allows connections on those ports to the addresses that DNS answers
/// to a workload of the rule's scope gave for a matching name (the question or a name on its
/// CNAME chain), learned by the agent before the answer reaches the workload, for the
/// answer's TTL (at least [`MIN_LEARNED_TTL`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NameRule {
    /// `metadata.name`, unique among the EgressRules of its namespace.
    pub name: String,
    /// `metadata.namespace`, as [`Rule::scope`].
    pub scope: Option<String>,
    /// Where the document starts.
    pub origin: Origin,
    /// `spec.destination.service`.
    pub host: HostPattern,
    /// `spec.ports`, tcp or udp, in file order (ranges allowed).
    pub ports: Vec<PortRule>,
}

/// The address the agent's DNS path answers for the names of an ExternalName alias
/// (`httpbin`, `httpbin.default.svc.cluster.local`), when the policy has resolvers: a
/// reserved (class E) address, so it is nobody's. A connection to it on the alias's port is
/// redirected to the proxy like any other on an HTTP egress port, and the proxy picks the
/// alias by the request's Host; on any other port it is refused.
pub const ALIAS_ADDRESS: Ipv4Addr = Ipv4Addr::new(240, 240, 0, 1);

/// The TTL of the agent's answers for alias names.
pub const ALIAS_TTL: u32 = 30;

/// The first of the agent's DNS listener ports: the listener for the policy's resolver `i`
/// is on `DNS_LISTEN_PORT + i`, on 127.0.0.1 and [::1] of each network namespace it serves.
pub const DNS_LISTEN_PORT: u16 = 15053;

/// The shortest time a learned address stays allowed, whatever the answer's TTL (0 or 1 s
/// TTLs would expire before the app connects).
pub const MIN_LEARNED_TTL: std::time::Duration = std::time::Duration::from_secs(5);

impl NameRule {
    /// Its name in counters, events and `egress status` (see [`scoped_name`]).
    pub fn row_name(&self) -> Cow<'_, str> {
        scoped_name(self.scope.as_deref(), &self.name)
    }

    /// The hash the kernel keeps beside each address this rule allowed: a new policy keeps
    /// the address only while a rule of the same name and pattern is in it.
    pub fn learned_hash(&self) -> u64 {
        egress_common::fnv1a64(format!("{}\0{}", self.row_name(), self.host).as_bytes())
    }
}

/// A `kind: Service` with `spec.type: ExternalName`: requests whose Host is the service's name
/// (see [`Alias::hostnames`]) go to `external_name` on the same port; port 443 means TLS
/// origination, any other port plain HTTP. An alias is itself an allow rule for
/// `external_name` on its ports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Alias {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace`, `default` when absent.
    pub namespace: String,
    /// The namespace whose pods the alias is for, when the document (or `egress create -n`)
    /// names one; `None`: every managed workload (host processes included), as a rule without
    /// a namespace.
    pub scope: Option<String>,
    /// Where the document starts.
    pub origin: Origin,
    /// `spec.externalName`, normalised.
    pub external_name: HostName,
    /// `spec.ports[].port`.
    pub ports: Vec<u16>,
}

impl Alias {
    /// The Host names that select this alias: `name`, `name.ns`, `name.ns.svc`,
    /// `name.ns.svc.cluster.local`.
    pub fn hostnames(&self) -> [String; 4] {
        let (n, ns) = (&self.name, &self.namespace);
        [
            n.clone(),
            format!("{n}.{ns}"),
            format!("{n}.{ns}.svc"),
            format!("{n}.{ns}.svc.cluster.local"),
        ]
    }

    /// How the proxy reaches the upstream on `port`.
    pub fn protocol(port: u16) -> HttpProtocol {
        if port == 443 {
            HttpProtocol::Https
        } else {
            HttpProtocol::Http
        }
    }
}

/// The proxy's settings (`kind: EgressConfig` `spec.proxy`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxySettings {
    /// The port the proxy listens on, on 127.0.0.1 and [::1]; redirected connections go there.
    pub port: u16,
    /// `idleTimeout`: how long a proxied exchange may go without a byte moving either way
    /// before the proxy gives up on it (504 or 408, or a response cut short).
    pub idle_timeout: std::time::Duration,
}

/// The port the proxy listens on when the policy names none.
pub const DEFAULT_PROXY_PORT: u16 = 15001;

/// The proxy's idle limit when the policy names none.
pub const DEFAULT_PROXY_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// The largest `idleTimeout`, in seconds: an hour. A stalled exchange holds an upstream
/// connection and a task until then.
pub const MAX_PROXY_IDLE_TIMEOUT_SECS: u64 = 3600;

impl Default for ProxySettings {
    fn default() -> Self {
        Self {
            port: DEFAULT_PROXY_PORT,
            idle_timeout: DEFAULT_PROXY_IDLE_TIMEOUT,
        }
    }
}

/// Which sockets besides TCP and UDP a process in the managed cgroup may create
/// (`kind: EgressConfig` `spec.allowSockets`). Nothing by default.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllowSockets {
    /// `raw`: raw sockets (`SOCK_RAW`, any protocol).
    pub raw: bool,
    /// IP protocol numbers (0..=[`egress_common::MAX_PROTOCOL`]) other sockets may be created
    /// with: `icmp` is 1 and 58 (ping sockets), `sctp` 132, `udplite` 136, `mptcp` 262. Never
    /// 6 or 17: TCP and UDP sockets are always allowed, and rules judge their traffic.
    pub protocols: std::collections::BTreeSet<u16>,
}

impl AllowSockets {
    /// The name of a protocol `allowSockets` knows by name (`icmp` for 1 and `icmpv6` for 58,
    /// which `icmp` allows together).
    pub fn protocol_name(protocol: u16) -> Option<&'static str> {
        match protocol {
            1 => Some("icmp"),
            58 => Some("icmpv6"),
            132 => Some("sctp"),
            136 => Some("udplite"),
            262 => Some("mptcp"),
            _ => None,
        }
    }
}

/// Where the DNS resolvers of a policy come from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum DnsSource {
    /// Not filled yet: the policy was loaded, and [`Policy::fill_resolvers`] not called. It
    /// compiles to no DNS at all.
    #[default]
    None,
    /// The EgressConfig's `spec.dns`, at this place.
    Config(Origin),
    /// The `nameserver` lines of this resolv.conf file.
    ResolvConf(std::path::PathBuf),
}

impl fmt::Display for DnsSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => f.write_str("not read"),
            Self::Config(origin) => origin.fmt(f),
            Self::ResolvConf(path) => path.display().fmt(f),
        }
    }
}

/// The DNS resolvers the processes of the managed cgroup may query: port 53, udp and tcp.
/// They compile to an implicit rule named [`crate::compile::DNS_RULE_NAME`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Dns {
    /// Single addresses, without duplicates (no IPv4-mapped ones: those are given as IPv4).
    /// Empty: no DNS is allowed (besides what a rule or bypass range allows).
    pub resolvers: Vec<IpAddr>,
    /// Where they come from.
    pub source: DnsSource,
}

/// A whole validated policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// From `kind: EgressConfig` `spec.mode`; enforce when absent.
    pub mode: Mode,
    /// Which kernel verdicts become events.
    pub events: Events,
    /// From `kind: EgressConfig` `spec.bypass`; [`default_bypass`] when absent. An explicit
    /// list replaces the default, so `bypass: []` filters loopback too.
    pub bypass: Vec<IpNet>,
    /// Every EgressRule with a CIDR/IP destination, in the order of the files and documents.
    /// Shared with the document cache (`policy::cache`): a reload reuses the unchanged rules
    /// of the last load without copying them.
    pub rules: Vec<Arc<Rule>>,
    /// Every EgressRule with a host-name destination and http/https ports, in file order.
    pub http_rules: Vec<HttpRule>,
    /// Every EgressRule with a host-name destination and tcp/udp ports (FQDN rules), in file
    /// order.
    pub name_rules: Vec<NameRule>,
    /// Every ExternalName Service, in file order.
    pub aliases: Vec<Alias>,
    /// `spec.proxy` of the EgressConfig.
    pub proxy: ProxySettings,
    /// `spec.caFiles` of the EgressConfig: extra trusted roots (PEM), added to the system roots.
    pub ca_files: Vec<std::path::PathBuf>,
    /// `spec.hosts` of the EgressConfig: static name overrides the proxy uses before DNS, for
    /// hosts without DNS. Addresses given here are trusted as the operator's own choice.
    pub hosts: std::collections::BTreeMap<HostName, Vec<std::net::IpAddr>>,
    /// `spec.allowSockets` of the EgressConfig: socket kinds besides TCP and UDP.
    pub allow_sockets: AllowSockets,
    /// `spec.dns` of the EgressConfig, or (after [`Policy::fill_resolvers`]) the resolvers of
    /// resolv.conf.
    pub dns: Dns,
    /// What the policy means but is almost certainly not what was meant (an empty policy, ...),
    /// in file and line order: `egress check` prints them and the agent logs them as
    /// `FILE:LINE: warning: message`; they never refuse the policy.
    pub warnings: Vec<Diagnostic>,
}

impl Policy {
    /// The namespaces with rules of their own, sorted, each once.
    pub fn scopes(&self) -> Vec<String> {
        let mut scopes: Vec<String> = self
            .rules
            .iter()
            .filter_map(|r| r.scope.clone())
            .chain(self.http_rules.iter().filter_map(|r| r.scope.clone()))
            .chain(self.name_rules.iter().filter_map(|r| r.scope.clone()))
            .chain(self.aliases.iter().filter_map(|a| a.scope.clone()))
            .collect();
        scopes.sort_unstable();
        scopes.dedup();
        scopes
    }
}

impl Default for Policy {
    /// Enforce mode, the default bypass ranges, no rules: everything but loopback denied.
    fn default() -> Self {
        Self {
            mode: Mode::default(),
            events: Events::default(),
            bypass: default_bypass(),
            rules: Vec::new(),
            http_rules: Vec::new(),
            name_rules: Vec::new(),
            aliases: Vec::new(),
            proxy: ProxySettings::default(),
            ca_files: Vec::new(),
            hosts: std::collections::BTreeMap::new(),
            allow_sockets: AllowSockets::default(),
            dns: Dns::default(),
            warnings: Vec::new(),
        }
    }
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
