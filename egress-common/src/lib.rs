//! The map schema shared by the egress kernel programs (`egress-ebpf`) and the agent
//! (`egress-user`): the kernel/user ABI.
//!
//! Every type here is `#[repr(C)]`, `Copy`, free of padding (explicit `_pad` fields instead),
//! and has its size asserted beside it, because the kernel and the agent are built by different
//! compilers for different targets and must agree byte for byte. Addresses and ports are kept
//! in network byte order, exactly as `struct bpf_sock_addr` delivers them, so the kernel side
//! never swaps bytes on the hot path.
//!
//! Map names are ABI too: the agent pins each map at `<pin dir>/<NAME>`, and operators read
//! them with `bpftool map dump pinned /sys/fs/bpf/egress/<NAME>`.
#![no_std]

/// Names of the maps, as the kernel sees them (at most 15 bytes) and as they are pinned.
pub mod maps {
    /// `Array<Config>`, one entry: the mode and generation of the policy in force.
    pub const CONFIG: &str = "CONFIG";
    /// `LpmTrie<RuleKeyV4, RuleValue>`: IPv4 allow rules, keyed by port, protocol and CIDR.
    pub const RULES_V4: &str = "RULES_V4";
    /// `LpmTrie<RuleKeyV6, RuleValue>`: IPv6 allow rules.
    pub const RULES_V6: &str = "RULES_V6";
    /// `ArrayOfMaps<RULES_V4's type, 2>`: the IPv4 rule tries, the only way the programs reach
    /// the rules. Generation `g` is judged by the trie in slot `g & 1`. A change of rules alone
    /// writes the other slot, then the generation number in [`CONFIG`] (the one write that puts
    /// it in force), without new programs; the pin `RULES_V4` follows the trie in force.
    pub const RULESET_V4: &str = "RULESET_V4";
    /// `ArrayOfMaps<RULES_V6's type, 2>`: the IPv6 rule tries, as [`RULESET_V4`].
    pub const RULESET_V6: &str = "RULESET_V6";
    /// `LpmTrie<[u8; 4], u32>`: IPv4 destinations that are never filtered.
    pub const BYPASS_V4: &str = "BYPASS_V4";
    /// `LpmTrie<[u8; 16], u32>`: IPv6 destinations that are never filtered.
    pub const BYPASS_V6: &str = "BYPASS_V6";
    /// `PerCpuArray<RuleCounters>`: verdict counters, one row per rule plus the reserved rows.
    pub const COUNTERS: &str = "COUNTERS";
    /// `Array<RuleInfo>`: which rule name owns each counter row.
    pub const RULE_INFO: &str = "RULE_INFO";
    /// `PerCpuArray<Stats>`, one entry: the programs' own health counters.
    pub const STATS: &str = "STATS";
    /// `RingBuf` of [`Event`](crate::Event): deny and would-deny verdicts.
    pub const EVENTS: &str = "EVENTS";
    /// `HashMap<u64, u32>`: the cgroup id of a pod (and of each of its containers the agent
    /// has seen) to its scope (1..=[`MAX_SCOPES`](crate::MAX_SCOPES), the namespace with rules
    /// it belongs to). A socket's scope is that of the nearest of its cgroup and the cgroup's
    /// ancestors found here (at most [`SCOPE_DEPTH`](crate::SCOPE_DEPTH) levels below the
    /// root); none found: scope 0, the node-wide rules only.
    pub const SCOPES: &str = "SCOPES";
    /// `LruHashMap<u64, OrigDst>`: original destination of a redirected socket, by socket
    /// cookie (written by connect4/6, read by sock_ops and getpeername4/6).
    pub const ORIG_BY_COOKIE: &str = "ORIG_COOKIE";
    /// `LruHashMap<PeerKey, OrigDst>`: original destination of a redirected connection, by
    /// the client socket's own address: what the proxy sees as the peer of `accept()`.
    pub const ORIG_BY_PEER: &str = "ORIG_PEER";
    /// `Array<u32>` indexed by IP protocol number (0..=[`MAX_PROTOCOL`](crate::MAX_PROTOCOL)):
    /// 1 for protocols a socket inside the managed cgroup may be created with besides TCP and
    /// UDP (EgressConfig `allowSockets`), and that the XDP backstop lets through.
    pub const SOCK_PROTOS: &str = "SOCK_PROTOS";
    /// `PerCpuArray<RuleCounters>`, one row per [`hook`](crate::hook): verdicts by the hook
    /// that took them.
    pub const HOOKS: &str = "HOOKS";
    /// `SkStorage<ProxyMark>` (socket-local storage): set by the agent on each proxy listener
    /// it made. A redirect goes ahead only when the socket listening at the redirect target in
    /// the connecting socket's network namespace carries this mark; the mark dies with the
    /// socket, so a listener of another process (a squatter on the proxy port) never has it.
    pub const PROXY_LISTEN: &str = "PROXY_LISTEN";
    /// `Array<DnsSlot>`, [`MAX_RESOLVERS`](crate::MAX_RESOLVERS) entries: the policy's DNS
    /// resolvers, each with the agent's DNS listener port for it. A UDP query to a resolver
    /// goes to that listener (when the policy has FQDN rules and the agent's marked listener
    /// is there), and `cgroup/recvmsg4`/`6` show the answer as coming from the resolver.
    pub const DNS_SLOTS: &str = "DNS_SLOTS";
    /// `Array<u64>`, 256 entries: the stable id of each scope of this generation (a hash of
    /// its namespace's name; 0 for scope 0, [`XDP_LEARNED`](crate::XDP_LEARNED) for
    /// [`XDP_SCOPE`](crate::XDP_SCOPE)), under which the addresses its DNS answers taught are
    /// kept in [`LEARNED_V4`]/[`LEARNED_V6`]. Scope numbers change between generations; these
    /// ids do not.
    pub const SCOPE_IDS: &str = "SCOPE_IDS";
    /// `HashMap<LearnedKeyV4, Learned>`: IPv4 addresses that a DNS answer to a workload of a
    /// scope gave for a name an FQDN rule allows, on that rule's ports, until they expire.
    /// Written by the agent before it releases the answer to the workload; survives
    /// generations and agent restarts.
    pub const LEARNED_V4: &str = "LEARNED_V4";
    /// `HashMap<LearnedKeyV6, Learned>`: the same for IPv6 addresses.
    pub const LEARNED_V6: &str = "LEARNED_V6";

    /// Maps that belong to one policy generation: a new policy gets new ones, filled completely
    /// before the programs that use them are swapped in.
    pub const PER_GENERATION: [&str; 11] = [
        CONFIG,
        RULES_V4,
        RULES_V6,
        RULESET_V4,
        RULESET_V6,
        BYPASS_V4,
        BYPASS_V6,
        SCOPES,
        SOCK_PROTOS,
        DNS_SLOTS,
        SCOPE_IDS,
    ];
    /// Maps that outlive generations and agent restarts: reopened from their pins. The
    /// original-destination maps are here so a reload never loses a connection in flight.
    /// The proxy's listener marks are here too: they are set once per listener, not per
    /// generation. So are the addresses learned from DNS answers, keyed by stable scope ids.
    pub const SHARED: [&str; 10] = [
        COUNTERS,
        RULE_INFO,
        STATS,
        EVENTS,
        ORIG_BY_COOKIE,
        ORIG_BY_PEER,
        HOOKS,
        PROXY_LISTEN,
        LEARNED_V4,
        LEARNED_V6,
    ];
}

/// Names of the kernel programs (their function names in `egress-ebpf`).
pub mod programs {
    /// `cgroup/connect4`.
    pub const CONNECT4: &str = "egress_connect4";
    /// `cgroup/connect6`.
    pub const CONNECT6: &str = "egress_connect6";
    /// `sockops`: moves a redirected connection's original destination to the key the proxy
    /// can build from `accept()`'s peer address.
    pub const SOCK_OPS: &str = "egress_sockops";
    /// `cgroup/getpeername4`: shows the app the original destination of a redirected socket.
    pub const GETPEERNAME4: &str = "egress_getpeername4";
    /// `cgroup/getpeername6`.
    pub const GETPEERNAME6: &str = "egress_getpeername6";
    /// `cgroup/sendmsg4`: UDP datagrams sent with a destination address (`sendto`).
    pub const SENDMSG4: &str = "egress_sendmsg4";
    /// `cgroup/sendmsg6`.
    pub const SENDMSG6: &str = "egress_sendmsg6";
    /// `cgroup/sock_create`: refuses raw sockets and protocols other than TCP and UDP.
    pub const SOCK_CREATE: &str = "egress_sock_create";
    /// `xdp`: the packet-level backstop on host-side veths (`egress run --xdp-iface`).
    pub const XDP: &str = "egress_xdp";
    /// `cgroup/recvmsg4`: an answer from the agent's DNS listener shows the resolver the
    /// query was sent to as its source.
    pub const RECVMSG4: &str = "egress_recvmsg4";
    /// `cgroup/recvmsg6`.
    pub const RECVMSG6: &str = "egress_recvmsg6";
}

/// The hooks that take verdicts: rows of [`maps::HOOKS`] and values of [`Event::hook`].
pub mod hook {
    /// `cgroup/connect4`/`6`: TCP connections and connected datagram sockets.
    pub const CONNECT: u8 = 0;
    /// `cgroup/sendmsg4`/`6`: datagrams sent to an address.
    pub const SENDMSG: u8 = 1;
    /// `cgroup/sock_create`: socket creation (raw sockets, other protocols).
    pub const SOCK_CREATE: u8 = 2;
    /// `xdp` on a host-side veth: packets no socket hook of this host judged.
    pub const XDP: u8 = 3;
    /// Rows of [`maps::HOOKS`](super::maps::HOOKS).
    pub const COUNT: u32 = 4;
}

/// Capacity of the rule tries (LPM tries are not preallocated, so this costs nothing unused).
pub const MAX_RULE_KEYS: u32 = 1 << 20;
/// Capacity of the bypass tries.
pub const MAX_BYPASS: u32 = 4096;
/// Rows of [`maps::COUNTERS`] and [`maps::RULE_INFO`]: the reserved rows plus one per rule.
pub const COUNTER_ROWS: u32 = 1 << 17;
/// Size of the event ring buffer in bytes (a power of two, a multiple of the page size).
pub const EVENTS_BYTES: u32 = 1 << 20;
/// Entries of each original-destination map: redirected connections being set up at once
/// (LRU: the oldest are evicted, long after their connection was accepted).
pub const MAX_REDIRECTS: u32 = 1 << 16;
/// Entries of [`maps::SCOPES`]: pods (their cgroups) on one node.
pub const MAX_SCOPED_CGROUPS: u32 = 1 << 16;
/// Scopes a policy may have besides the node-wide one: namespaces with rules of their own.
/// A rule key's scope is one byte; [`XDP_SCOPE`] is the last value.
pub const MAX_SCOPES: u8 = 254;
/// The scope of the keys the XDP backstop judges packets by when the policy has scopes: every
/// scope's rules (a packet carries no cgroup to find its scope from). Without scopes it
/// judges by scope 0, which then holds every rule.
pub const XDP_SCOPE: u8 = 255;
/// How many levels below the cgroup root a socket's cgroup ancestors are looked up in
/// [`maps::SCOPES`] (a container's cgroup is 3 to 5 levels down under kubelet's layouts).
pub const SCOPE_DEPTH: u32 = 8;
/// Highest protocol number in [`maps::SOCK_PROTOS`]: `IPPROTO_MPTCP` (262), the one inet
/// protocol above 255.
pub const MAX_PROTOCOL: u32 = 262;

/// Entries of [`maps::DNS_SLOTS`]: resolvers whose queries the agent can answer (the policy
/// may name more; queries to the others are not learned from). glibc and musl read at most
/// three nameservers from resolv.conf. Each slot is one more turn of the loops that look a
/// resolver up, which the verifier walks in full: at 16 they took two thirds of the time to
/// load a generation's programs (connect6 57 ms of 104; at 1, 19 of 36).
pub const MAX_RESOLVERS: u32 = 4;
/// Entries of [`maps::SCOPE_IDS`]: every scope byte.
pub const SCOPE_ID_ROWS: u32 = 256;
/// Capacity of each learned-address map (not preallocated: an entry costs memory only once
/// it is written).
pub const MAX_LEARNED: u32 = 1 << 18;
/// The scope id ([`maps::SCOPE_IDS`]) of [`XDP_SCOPE`]: the addresses learned by any scope,
/// for the XDP backstop, which cannot tell scopes apart.
pub const XDP_LEARNED: u64 = u64::MAX;

/// Counter row for connections that matched no rule (denied, or would-be denied in audit).
pub const ROW_NO_RULE: u32 = 0;
/// Counter row for connections to a bypass destination.
pub const ROW_BYPASS: u32 = 1;
/// Counter row for connections redirected to the proxy (the proxy counts per rule). A rule key
/// whose value is this row is a redirect: a TCP connection on its port (any address, in its
/// scope) that no more specific key allows goes to the proxy.
pub const ROW_PROXY: u32 = 2;
/// First counter row that belongs to a rule.
pub const FIRST_RULE_ROW: u32 = 3;

/// Values of [`Config::mode`].
pub mod mode {
    /// Deny what no rule allows: `connect()` fails with `EPERM`.
    pub const ENFORCE: u32 = 0;
    /// Allow everything, but report what enforce mode would have denied.
    pub const AUDIT: u32 = 1;
}

/// Values of [`Event::verdict`].
pub mod verdict {
    /// A rule allowed the connection.
    pub const ALLOW: u8 = 1;
    /// No rule allowed it; `connect()` failed with `EPERM`.
    pub const DENY: u8 = 2;
    /// Audit mode: no rule allowed it, it went ahead, enforce mode would have denied it.
    pub const WOULD_DENY: u8 = 3;
    /// The destination is in a bypass range.
    pub const BYPASS: u8 = 4;
    /// Redirected to the proxy, which judges the request.
    pub const REDIRECT: u8 = 5;
}

/// Values of [`Event::reason`]: why a verdict was taken when no rule decided it.
pub mod reason {
    /// The rules (or their absence) decided.
    pub const RULES: u8 = 0;
    /// The connection was to be redirected to the proxy, but nothing listens at the proxy's
    /// address in the connecting socket's network namespace (the agent is down, or has not
    /// opened that listener yet): refused rather than sent anywhere else.
    pub const PROXY_ABSENT: u8 = 1;
    /// The connection was to be redirected to the proxy, but the socket listening at the
    /// proxy's address is not one the agent made (no [`maps::PROXY_LISTEN`](crate::maps)
    /// mark): another process holds the port. Refused, so that it never receives the
    /// connection.
    pub const PROXY_FOREIGN: u8 = 2;
}

/// The value of [`maps::PROXY_LISTEN`] on a socket the agent listens on for the proxy.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProxyMark {
    /// The agent's process id when it set the mark (for `bpftool map dump`; the programs only
    /// check that a mark exists).
    pub pid: u32,
    /// The listener's port, host byte order.
    pub port: u32,
}
const _: () = assert!(size_of::<ProxyMark>() == 8);

/// Bits of [`Config::flags`].
pub mod config_flags {
    /// Report every verdict as an event (EgressConfig `events: all`), not only denials.
    pub const EVENTS_ALL: u16 = 1;
    /// The policy has scopes (namespaces with rules of their own): the hooks look a socket's
    /// scope up ([`maps::SCOPES`](crate::maps)). Without it every socket is in scope 0 and the
    /// lookup is skipped.
    pub const SCOPED: u16 = 4;
    /// Raw sockets (`SOCK_RAW`, any protocol) may be created in the managed cgroup
    /// (EgressConfig `allowSockets: [raw]`).
    pub const ALLOW_RAW: u16 = 2;
    /// The policy has FQDN rules: UDP queries to a resolver of
    /// [`maps::DNS_SLOTS`](crate::maps) go to the agent's DNS listener, and a destination no
    /// rule key allows is looked up among the learned addresses
    /// ([`maps::LEARNED_V4`](crate::maps)).
    pub const DNS: u16 = 8;
}

/// Bits of [`Event::flags`].
pub mod flags {
    /// The application passed an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) to an `AF_INET6`
    /// socket; it was judged by the IPv4 rules and [`Event::addr`](crate::Event) holds the
    /// IPv4 address.
    pub const V4_MAPPED: u8 = 1;
    /// The destination was a NAT64 address (`64:ff9b::a.b.c.d`, RFC 6052); it was judged by
    /// the IPv4 rules as `a.b.c.d`, which [`Event::addr`](crate::Event) holds.
    pub const NAT64: u8 = 2;
    /// The destination was a 6to4 address (`2002:AABB:CCDD::/48`, RFC 3056); it was judged by
    /// the IPv4 rules as the embedded `AA.BB.CC.DD`, which [`Event::addr`](crate::Event) holds.
    pub const SIX_TO_FOUR: u8 = 4;
    /// A `cgroup/sock_create` verdict on a `SOCK_RAW` socket ([`Event::proto`](crate::Event)
    /// is its protocol; there is no destination).
    pub const RAW: u8 = 8;
}

/// `IPPROTO_TCP`, as it appears in [`RuleKeyV4::proto`] and [`Event::proto`].
pub const PROTO_TCP: u8 = 6;
/// `IPPROTO_UDP`.
pub const PROTO_UDP: u8 = 17;
/// `AF_INET`, as it appears in [`Event::family`].
pub const AF_INET: u8 = 2;
/// `AF_INET6`.
pub const AF_INET6: u8 = 10;

/// `IPPROTO_ICMP`.
pub const PROTO_ICMP: u8 = 1;
/// `IPPROTO_ICMPV6`.
pub const PROTO_ICMPV6: u8 = 58;
/// DNS: datagrams and connections to this port go to the resolvers' implicit rule.
pub const DNS_PORT: u16 = 53;

/// Bits of a rule key that precede the address: port (16), protocol (8), scope (8). The LPM
/// prefix length of a key is `KEY_PREFIX_BITS + cidr_len`, so port and protocol always match
/// exactly and the address matches by CIDR, in one lookup.
pub const KEY_PREFIX_BITS: u32 = 32;

/// The one entry of [`maps::CONFIG`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// [`mode::ENFORCE`] or [`mode::AUDIT`].
    pub mode: u32,
    /// Generation number of the policy, increasing with every policy the agent applies.
    pub generation: u32,
    /// One past the highest counter row this generation uses: the agent reads [`RuleInfo`]
    /// rows only below it, so a reload costs the number of rules, not [`COUNTER_ROWS`].
    pub row_limit: u32,
    /// The proxy's port, network byte order: redirected connections go to 127.0.0.1 or
    /// [::1] on this port.
    pub proxy_port: u16,
    /// Bits of [`config_flags`].
    pub flags: u16,
    /// cgroup v2 id of the agent: its own sockets (the proxy's upstream connections) are
    /// never judged nor redirected. 0 when the agent is not below the managed cgroup.
    pub agent_cgroup: u64,
}
const _: () = assert!(size_of::<Config>() == 24);

/// A destination as the application gave it to `connect()`, and who called it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    /// Network byte order; an IPv4 address (also when the app gave `::ffff:a.b.c.d`) fills the
    /// first 4 bytes.
    pub addr: [u8; 16],
    /// Network byte order.
    pub port: u16,
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u8,
    /// Bits of [`flags`] ([`flags::V4_MAPPED`]: give it back to the app in mapped form).
    pub flags: u8,
    /// The process (thread group id, host byte order) that called `connect()`: the proxy's
    /// events name it, as the kernel's do.
    pub pid: u32,
    /// Its command name, NUL-padded (`bpf_get_current_comm`).
    pub comm: [u8; 16],
    /// The network namespace cookie of the connecting socket (`bpf_get_netns_cookie`): which
    /// namespace's proxy listener the connection goes to, and so which pod made it.
    pub netns: u64,
}
const _: () = assert!(size_of::<OrigDst>() == 48);

/// The client end of a redirected connection, as the proxy sees it in `accept()`, in the
/// network namespace the connection was made in: two pods' connections from the same loopback
/// address and port are two keys.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PeerKey {
    /// The network namespace cookie of the client socket (and so of the proxy listener that
    /// accepts it), as [`OrigDst::netns`].
    pub netns: u64,
    /// Network byte order; IPv4 (also a v4-mapped client) in the first 4 bytes.
    pub addr: [u8; 16],
    /// Network byte order.
    pub port: u16,
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u8,
    /// Always zero.
    pub _pad: u8,
    /// Always zero.
    pub _pad2: u32,
}
const _: () = assert!(size_of::<PeerKey>() == 32);

/// The data part of an IPv4 rule key (the LPM trie adds the `u32` prefix length before it).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RuleKeyV4 {
    /// Destination port, network byte order.
    pub port: u16,
    /// IP protocol ([`PROTO_TCP`] or [`PROTO_UDP`]).
    pub proto: u8,
    /// The scope the key belongs to (inside the matched prefix): 0 for sockets of no scope
    /// (host processes, pods of namespaces without rules of their own), a namespace's scope
    /// (see [`maps::SCOPES`]), or [`XDP_SCOPE`]. The node-wide rules are in every scope.
    pub scope: u8,
    /// Destination address, network byte order.
    pub addr: [u8; 4],
}
const _: () = assert!(size_of::<RuleKeyV4>() == 8);

/// The data part of an IPv6 rule key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RuleKeyV6 {
    /// Destination port, network byte order.
    pub port: u16,
    /// IP protocol ([`PROTO_TCP`] or [`PROTO_UDP`]).
    pub proto: u8,
    /// The scope, as [`RuleKeyV4::scope`].
    pub scope: u8,
    /// Destination address, network byte order.
    pub addr: [u8; 16],
}
const _: () = assert!(size_of::<RuleKeyV6>() == 20);

/// Value of a rule key: which rule it belongs to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RuleValue {
    /// The rule's row in [`maps::COUNTERS`] and [`maps::RULE_INFO`].
    pub row: u32,
}
const _: () = assert!(size_of::<RuleValue>() == 4);

/// One entry of [`maps::DNS_SLOTS`]: a resolver and the agent's listener for its queries.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsSlot {
    /// The resolver's address, network byte order; IPv4 in the first 4 bytes.
    pub addr: [u8; 16],
    /// The resolver's port ([`DNS_PORT`]), network byte order.
    pub port: u16,
    /// The agent's listener port for this resolver, on 127.0.0.1 and [::1] of each network
    /// namespace, network byte order. 0: an unused slot.
    pub listen_port: u16,
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u8,
    /// Always zero.
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<DnsSlot>() == 24);

/// A learned IPv4 destination: (scope id, port, protocol, address), matched exactly.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LearnedKeyV4 {
    /// The stable id of the asking workload's scope ([`maps::SCOPE_IDS`]).
    pub scope_id: u64,
    /// Network byte order.
    pub port: u16,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    /// Always zero.
    pub _pad: u8,
    /// Network byte order.
    pub addr: [u8; 4],
}
const _: () = assert!(size_of::<LearnedKeyV4>() == 16);

/// A learned IPv6 destination.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LearnedKeyV6 {
    /// As [`LearnedKeyV4::scope_id`].
    pub scope_id: u64,
    /// Network byte order.
    pub port: u16,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    /// Always zero.
    pub _pad: u8,
    /// Network byte order.
    pub addr: [u8; 16],
    /// Always zero.
    pub _pad2: u32,
}
const _: () = assert!(size_of::<LearnedKeyV6>() == 32);

/// Value of a learned destination.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Learned {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) after which a new connection is no longer
    /// allowed by this entry. Connections made before are never cut.
    pub expires_ns: u64,
    /// FNV-1a 64 of the FQDN rule's name and pattern that allowed it: a new policy keeps the
    /// entry only while the same rule, unchanged, is in it.
    pub rule_hash: u64,
    /// The rule's counter row.
    pub row: u32,
    /// Always zero.
    pub _pad: u32,
}
const _: () = assert!(size_of::<Learned>() == 24);

/// One row of [`maps::COUNTERS`] (per CPU; the agent sums the CPUs).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleCounters {
    /// Connections allowed (by this rule, or by a bypass range on [`ROW_BYPASS`]).
    pub allowed: u64,
    /// Connections denied (only on [`ROW_NO_RULE`]).
    pub denied: u64,
    /// Connections that audit mode let through and enforce mode would have denied.
    pub would_deny: u64,
}
const _: () = assert!(size_of::<RuleCounters>() == 24);

/// Longest rule name kept in [`RuleInfo::name`]; longer names are told apart by
/// [`RuleInfo::name_hash`].
pub const RULE_NAME_LEN: usize = 64;

/// One row of [`maps::RULE_INFO`]: the rule that owns a counter row.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleInfo {
    /// Length of the full name in bytes; 0 marks a free row.
    pub name_len: u32,
    /// Generation that last assigned this row.
    pub generation: u32,
    /// FNV-1a 64 of the full name.
    pub name_hash: u64,
    /// The first [`RULE_NAME_LEN`] bytes of the name, zero padded.
    pub name: [u8; RULE_NAME_LEN],
}
const _: () = assert!(size_of::<RuleInfo>() == 80);

impl Default for RuleInfo {
    fn default() -> Self {
        Self {
            name_len: 0,
            generation: 0,
            name_hash: 0,
            name: [0; RULE_NAME_LEN],
        }
    }
}

/// The one entry of [`maps::STATS`] (per CPU): the programs' own health.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Events dropped because the ring buffer was full (the verdict itself stood).
    pub events_lost: u64,
    /// Verdicts taken on an internal error path (always deny: the programs fail closed).
    pub errors: u64,
}
const _: () = assert!(size_of::<Stats>() == 16);

/// A verdict the kernel reports through [`maps::EVENTS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// `bpf_ktime_get_ns()` at the verdict (CLOCK_MONOTONIC).
    pub ts_ns: u64,
    /// cgroup v2 id of the process that called `connect()`.
    pub cgroup_id: u64,
    /// Process id (thread group id); 0 for [`hook::XDP`] (no process context).
    pub pid: u32,
    /// Thread id; for [`hook::XDP`], the ifindex of the interface the packet arrived on.
    pub tid: u32,
    /// Counter row of the rule that decided, or [`ROW_NO_RULE`].
    pub row: u32,
    /// Generation of the policy that judged it ([`Config::generation`]).
    pub generation: u32,
    /// One of [`verdict`].
    pub verdict: u8,
    /// [`AF_INET`] or [`AF_INET6`]: the family the destination was judged as (for
    /// [`hook::SOCK_CREATE`], the socket's family).
    pub family: u8,
    /// IP protocol ([`PROTO_TCP`], [`PROTO_UDP`], or for [`hook::SOCK_CREATE`] and
    /// [`hook::XDP`] any other).
    pub proto: u8,
    /// Bits of [`flags`].
    pub flags: u8,
    /// Destination port, network byte order (0 for [`hook::SOCK_CREATE`]).
    pub port: u16,
    /// One of [`hook`]: which hook took the verdict. Agents before issue 5 wrote 0 here,
    /// which is [`hook::CONNECT`], the only hook they had.
    pub hook: u8,
    /// One of [`reason`]; programs before issue 13 wrote 0 here ([`reason::RULES`]).
    pub reason: u8,
    /// Destination address, network byte order; an IPv4 address fills the first 4 bytes.
    pub addr: [u8; 16],
    /// `comm` of the calling thread, NUL padded.
    pub comm: [u8; 16],
}
const _: () = assert!(size_of::<Event>() == 72);

/// FNV-1a, 64 bit: the hash in [`RuleInfo::name_hash`].
pub const fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    hash
}

#[cfg(feature = "user")]
mod pod {
    use super::{
        Config, DnsSlot, Event, Learned, LearnedKeyV4, LearnedKeyV6, OrigDst, PeerKey, ProxyMark,
        RuleCounters, RuleInfo, RuleKeyV4, RuleKeyV6, RuleValue, Stats,
    };

    // SAFETY: as below: repr(C), Copy, integers and byte arrays only, sizes asserted.
    unsafe impl aya::Pod for DnsSlot {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Learned {}
    // SAFETY: as above.
    unsafe impl aya::Pod for LearnedKeyV4 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for LearnedKeyV6 {}

    // SAFETY: every type is #[repr(C)], Copy, made only of integers and byte arrays, with its
    // size asserted equal to the sum of its fields, so it has no padding and every bit pattern
    // is valid.
    unsafe impl aya::Pod for Config {}
    // SAFETY: as above.
    unsafe impl aya::Pod for RuleKeyV4 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for RuleKeyV6 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for RuleValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for RuleCounters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for RuleInfo {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Stats {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Event {}
    // SAFETY: as above.
    unsafe impl aya::Pod for OrigDst {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PeerKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ProxyMark {}
}
