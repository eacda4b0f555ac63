//! Every map the kernel programs use. Names are ABI (`egress_common::maps`): the agent pins
//! each at `<pin dir>/<NAME>` and `bpftool map dump pinned ...` shows their BTF field names.

use aya_ebpf::bindings::BPF_F_NO_PREALLOC;
use aya_ebpf::{
    btf_maps::{Array, ArrayOfMaps, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, SkStorage},
    macros::btf_map,
};
use egress_common::{
    COUNTER_ROWS, Config, DnsSlot, EVENTS_BYTES, Event, Learned, LearnedKeyV4, LearnedKeyV6,
    MAX_BYPASS, MAX_LEARNED, MAX_PROTOCOL, MAX_REDIRECTS, MAX_RESOLVERS, MAX_RULE_KEYS,
    MAX_SCOPED_CGROUPS, OrigDst, PeerKey, ProxyMark, RuleCounters, RuleInfo, RuleKeyV4, RuleKeyV6,
    RuleValue, SCOPE_ID_ROWS, Stats, hook,
};

/// The policy's mode and generation (one entry).
#[btf_map]
pub static CONFIG: Array<Config, 1> = Array::new();

/// IPv4 allow rules and redirects: (port, protocol, scope, CIDR) -> rule row.
pub type RulesV4 = LpmTrie<RuleKeyV4, RuleValue, { MAX_RULE_KEYS as usize }>;
/// IPv6 allow rules and redirects: (port, protocol, scope, CIDR) -> rule row.
pub type RulesV6 = LpmTrie<RuleKeyV6, RuleValue, { MAX_RULE_KEYS as usize }>;

/// The IPv4 rule tries: generation `g` looks its rules up in slot `g & 1` (the parity of the
/// generation number it read once, so one number both picks the rules and labels the event).
/// The programs reach the rules only through it, so the agent puts a change of rules alone in
/// force without new programs: it writes the other slot, then `CONFIG`'s generation
/// (`egress_common::maps::RULESET_V4`).
#[btf_map]
pub static RULESET_V4: ArrayOfMaps<RulesV4, 2> = ArrayOfMaps::new();

/// The IPv6 rule tries, as `RULESET_V4`.
#[btf_map]
pub static RULESET_V6: ArrayOfMaps<RulesV6, 2> = ArrayOfMaps::new();

/// The generation's first IPv4 rule trie, put in its slot of `RULESET_V4` by the agent; also
/// the model (type, size, BTF) of the tries it makes for later changes of rules. The programs
/// never read it directly.
#[btf_map]
pub static RULES_V4: RulesV4 = LpmTrie::new();

/// The generation's first IPv6 rule trie, as `RULES_V4`.
#[btf_map]
pub static RULES_V6: RulesV6 = LpmTrie::new();

/// IPv4 destinations never filtered (value unused).
#[btf_map]
pub static BYPASS_V4: LpmTrie<[u8; 4], u32, { MAX_BYPASS as usize }> = LpmTrie::new();

/// IPv6 destinations never filtered (value unused).
#[btf_map]
pub static BYPASS_V6: LpmTrie<[u8; 16], u32, { MAX_BYPASS as usize }> = LpmTrie::new();

/// Verdict counters per rule row, per CPU.
#[btf_map]
pub static COUNTERS: PerCpuArray<RuleCounters, { COUNTER_ROWS as usize }> = PerCpuArray::new();

/// Which rule owns each counter row. Written by the agent only; the programs never read it,
/// but it lives in this object so that it is created, typed (BTF) and pinned with the rest.
#[btf_map]
pub static RULE_INFO: Array<RuleInfo, { COUNTER_ROWS as usize }> = Array::new();

/// The programs' own health counters (one entry, per CPU).
#[btf_map]
pub static STATS: PerCpuArray<Stats, 1> = PerCpuArray::new();

/// Deny and would-deny events for the agent.
#[btf_map]
pub static EVENTS: RingBuf<Event, { EVENTS_BYTES as usize }> = RingBuf::new();

/// A pod's cgroup id to its scope (`egress_common::maps::SCOPES`).
#[btf_map]
pub static SCOPES: HashMap<u64, u32, { MAX_SCOPED_CGROUPS as usize }> = HashMap::new();

/// Original destination of a redirected socket, by socket cookie.
#[btf_map]
pub static ORIG_COOKIE: LruHashMap<u64, OrigDst, { MAX_REDIRECTS as usize }> = LruHashMap::new();

/// Original destination of a redirected connection, by the client socket's address.
#[btf_map]
pub static ORIG_PEER: LruHashMap<PeerKey, OrigDst, { MAX_REDIRECTS as usize }> = LruHashMap::new();

/// Protocol numbers (index) a socket may be created with besides TCP and UDP, and that the XDP
/// backstop lets through: 1, else 0.
#[btf_map]
pub static SOCK_PROTOS: Array<u32, { MAX_PROTOCOL as usize + 1 }> = Array::new();

/// Verdict counters per hook (`egress_common::hook`), per CPU.
#[btf_map]
pub static HOOKS: PerCpuArray<RuleCounters, { hook::COUNT as usize }> = PerCpuArray::new();

/// The agent's mark on each proxy listener it made (socket-local storage, keyed by the socket;
/// the agent sets it through the listener's fd). A redirect is refused unless the listener at
/// the redirect target carries it.
#[btf_map]
pub static PROXY_LISTEN: SkStorage<ProxyMark> = SkStorage::new();

/// The policy's resolvers and the agent's DNS listener port for each
/// (`egress_common::maps::DNS_SLOTS`).
#[btf_map]
pub static DNS_SLOTS: Array<DnsSlot, { MAX_RESOLVERS as usize }> = Array::new();

/// Each scope's stable id, under which its learned addresses are kept.
#[btf_map]
pub static SCOPE_IDS: Array<u64, { SCOPE_ID_ROWS as usize }> = Array::new();

/// IPv4 addresses learned from DNS answers, per scope id, port and protocol.
#[btf_map]
pub static LEARNED_V4: HashMap<
    LearnedKeyV4,
    Learned,
    { MAX_LEARNED as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// IPv6 addresses learned from DNS answers.
#[btf_map]
pub static LEARNED_V6: HashMap<
    LearnedKeyV6,
    Learned,
    { MAX_LEARNED as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();
