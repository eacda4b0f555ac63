//! What every hook shares: a destination as judged, the rule lookups, the counters and the
//! events. The hooks differ only in where the destination comes from and what a verdict does.

use aya_ebpf::{
    btf_maps::lpm_trie::Key,
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns,
    },
};
use egress_common::{
    AF_INET, Config, Event, KEY_PREFIX_BITS, LearnedKeyV4, LearnedKeyV6, MAX_PROTOCOL, ROW_PROXY,
    RuleKeyV4, RuleKeyV6, flags, verdict,
};

use crate::maps::{
    BYPASS_V4, BYPASS_V6, COUNTERS, EVENTS, HOOKS, LEARNED_V4, LEARNED_V6, RULESET_V4, RULESET_V6,
    SCOPE_IDS, SOCK_PROTOS, STATS,
};

/// `::ffff:0:0/96` as its third 32-bit word (network byte order), the mark of a v4-mapped
/// IPv6 address.
pub const V4_MAPPED_WORD: u32 = 0x0000_ffffu32.to_be();
/// `64:ff9b::/96` (NAT64, RFC 6052) as its first 32-bit word (network byte order); the next two
/// words are zero.
pub const NAT64_WORD: u32 = 0x0064_ff9bu32.to_be();

/// `127.0.0.1` in network byte order: what `0.0.0.0` means as a destination.
pub const LOOPBACK_V4: [u8; 4] = [127, 0, 0, 1];
/// `::1`: what `::` means as a destination.
pub const LOOPBACK_V6: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

/// A destination, as judged.
pub struct Dest {
    /// `AF_INET` or `AF_INET6`: which rule set judges it.
    pub family: u8,
    /// Bits of `egress_common::flags`.
    pub flags: u8,
    /// `PROTO_TCP` or `PROTO_UDP` (rule lookups), or another protocol (never in a rule).
    pub proto: u8,
    /// One of `egress_common::hook`.
    pub hook: u8,
    /// Network byte order.
    pub port: u16,
    /// Network byte order; IPv4 in the first four bytes.
    pub addr: [u8; 16],
}

impl Dest {
    /// An IPv4 destination.
    #[inline(always)]
    pub fn v4(addr: [u8; 4], port: u16, proto: u8, hook: u8) -> Self {
        Self {
            family: AF_INET,
            flags: 0,
            proto,
            hook,
            port,
            addr: v4_in_16(addr),
        }
    }

    /// An IPv6 destination given as four 32-bit words in network byte order. v4-mapped, NAT64
    /// (`64:ff9b::/96`) and 6to4 (`2002::/16`) addresses are judged as the IPv4 address they
    /// carry, with a flag saying so: an IPv4 rule never opens IPv6, and IPv6 rules never open
    /// IPv4 through a translator.
    #[inline(always)]
    pub fn v6(words: [u32; 4], port: u16, proto: u8, hook: u8) -> Self {
        let bytes = words_to_bytes(words);
        let (family, flags, addr) = if words[0] == 0 && words[1] == 0 && words[2] == V4_MAPPED_WORD
        {
            (AF_INET, flags::V4_MAPPED, v4_in_16(words[3].to_ne_bytes()))
        } else if words[0] == NAT64_WORD && words[1] == 0 && words[2] == 0 {
            (AF_INET, flags::NAT64, v4_in_16(words[3].to_ne_bytes()))
        } else if bytes[0] == 0x20 && bytes[1] == 0x02 {
            (
                AF_INET,
                flags::SIX_TO_FOUR,
                v4_in_16([bytes[2], bytes[3], bytes[4], bytes[5]]),
            )
        } else {
            (egress_common::AF_INET6, 0, bytes)
        };
        Self {
            family,
            flags,
            proto,
            hook,
            port,
            addr,
        }
    }
}

/// What matched a destination.
pub enum Matched {
    /// A bypass range.
    Bypass,
    /// A rule, with its counter row.
    Rule(u32),
}

/// The generation in force, read once: the number its verdict's event carries and, by its
/// parity, the slot of the rule sets holding its rules ([`lookup`]). A change of rules alone
/// writes the other slot, then this number; read twice, a verdict could come from one
/// generation's rules and carry the other's number.
#[inline(always)]
pub fn generation(config: &Config) -> u32 {
    // SAFETY: a valid reference to the map value; a volatile read so that the compiler reads
    // it exactly once and never reloads it for a later use.
    unsafe { core::ptr::read_volatile(&config.generation) }
}

/// Looks the destination up in the rule trie of its family in force for `generation` (slot
/// `generation & 1` of `RULESET_V4`/`RULESET_V6`), among the rule keys of `scope`, and, unless
/// a rule allows it, in the bypass trie ([`bypass_unless_rule`]); then, when `learned` (the
/// policy has FQDN rules) and nothing matched, among the addresses DNS answers taught `scope`,
/// while they have not expired.
#[inline(always)]
pub fn lookup(dest: &Dest, scope: u8, learned: bool, generation: u32) -> Option<Matched> {
    let slot = generation & 1;
    let matched = if dest.family == AF_INET {
        lookup_v4(dest, scope, slot)
    } else {
        lookup_v6(dest, scope, slot)
    };
    if matched.is_some() || !learned {
        return matched;
    }
    lookup_learned(dest, scope)
}

/// The learned-address lookup: one array read for the scope's stable id, one hash lookup.
#[inline(always)]
fn lookup_learned(dest: &Dest, scope: u8) -> Option<Matched> {
    let scope_id = *SCOPE_IDS.get(u32::from(scope))?;
    let entry = if dest.family == AF_INET {
        let key = LearnedKeyV4 {
            scope_id,
            port: dest.port,
            proto: dest.proto,
            _pad: 0,
            addr: [dest.addr[0], dest.addr[1], dest.addr[2], dest.addr[3]],
        };
        // SAFETY: a valid map value pointer, copied out at once.
        LEARNED_V4.get_ptr(&key).map(|p| unsafe { *p })?
    } else {
        let key = LearnedKeyV6 {
            scope_id,
            port: dest.port,
            proto: dest.proto,
            _pad: 0,
            addr: dest.addr,
            _pad2: 0,
        };
        // SAFETY: as above.
        LEARNED_V6.get_ptr(&key).map(|p| unsafe { *p })?
    };
    // SAFETY: a plain helper call without arguments.
    (unsafe { bpf_ktime_get_ns() } < entry.expires_ns).then_some(Matched::Rule(entry.row))
}

/// What matched, given the rule trie's answer `row` and, asked only when needed, whether the
/// destination is in a bypass range. A rule that allows the destination decides without the
/// bypass lookup (allowed either way; counted on the rule). A bypass range comes before a
/// redirect (a connection to the local host's port 80 is never sent to the proxy) and before
/// the deny of no key. The rule lookup first spares the hot path, an allowed connection, one
/// trie lookup: about 25-35 ns of the program's 230-270 here (docs/benchmarks.md, metric 2).
#[inline(always)]
fn bypass_unless_rule(row: Option<u32>, in_bypass: impl FnOnce() -> bool) -> Option<Matched> {
    match row {
        Some(row) if row != ROW_PROXY => Some(Matched::Rule(row)),
        _ if in_bypass() => Some(Matched::Bypass),
        row => row.map(Matched::Rule),
    }
}

#[inline(always)]
fn lookup_v4(dest: &Dest, scope: u8, slot: u32) -> Option<Matched> {
    let mut addr = [dest.addr[0], dest.addr[1], dest.addr[2], dest.addr[3]];
    if addr == [0, 0, 0, 0] {
        // connect() or sendto() to 0.0.0.0 reaches the local host.
        addr = LOOPBACK_V4;
    }
    let key = RuleKeyV4 {
        port: dest.port,
        proto: dest.proto,
        scope,
        addr,
    };
    // An empty slot (before the agent filled it) matches no rule.
    let row = RULESET_V4
        .get_value_ptr_mut(slot, &Key::new(KEY_PREFIX_BITS + 32, key))
        // SAFETY: a valid map value pointer, read at once.
        .map(|value| unsafe { (*value).row });
    bypass_unless_rule(row, || BYPASS_V4.get(&Key::new(32, addr)).is_some())
}

#[inline(always)]
fn lookup_v6(dest: &Dest, scope: u8, slot: u32) -> Option<Matched> {
    let mut addr = dest.addr;
    if addr == [0; 16] {
        // connect() or sendto() to :: reaches the local host.
        addr = LOOPBACK_V6;
    }
    let key = RuleKeyV6 {
        port: dest.port,
        proto: dest.proto,
        scope,
        addr,
    };
    // An empty slot (before the agent filled it) matches no rule.
    let row = RULESET_V6
        .get_value_ptr_mut(slot, &Key::new(KEY_PREFIX_BITS + 128, key))
        // SAFETY: a valid map value pointer, read at once.
        .map(|value| unsafe { (*value).row });
    bypass_unless_rule(row, || BYPASS_V6.get(&Key::new(128, addr)).is_some())
}

/// True when the policy lets sockets (and, at the XDP backstop, packets) of this protocol
/// through besides TCP and UDP (EgressConfig `allowSockets`).
#[inline(always)]
pub fn protocol_allowed(proto: u32) -> bool {
    proto <= MAX_PROTOCOL && SOCK_PROTOS.get(proto).is_some_and(|v| *v != 0)
}

/// A verdict and the counter row it is booked on.
pub struct Judgement {
    /// One of `egress_common::verdict`.
    pub verdict: u8,
    /// Counter row.
    pub row: u32,
    /// Generation of the policy that judged.
    pub generation: u32,
    /// One of `egress_common::reason`.
    pub reason: u8,
}

/// Who a verdict was about: the calling task, or for XDP, the interface.
pub struct Who {
    /// `pid << 32 | tid`; for XDP the ifindex in the low half.
    pub pid_tgid: u64,
    /// cgroup v2 id, 0 for XDP.
    pub cgroup_id: u64,
    /// The task's comm, zero for XDP.
    pub comm: [u8; 16],
}

impl Who {
    /// The task running the hook (not for XDP: these helpers need a process context).
    #[inline(always)]
    pub fn current() -> Self {
        Self {
            pid_tgid: bpf_get_current_pid_tgid(),
            // SAFETY: a plain helper call without arguments.
            cgroup_id: unsafe { bpf_get_current_cgroup_id() },
            comm: bpf_get_current_comm().unwrap_or([0; 16]),
        }
    }
}

/// Books the verdict on its counter row and its hook's row. A row outside the map (a corrupt
/// rule value) is not counted, and does not change the verdict.
#[inline(always)]
pub fn count(judgement: &Judgement, hook: u8) {
    if let Some(counters) = COUNTERS.get_ptr_mut(judgement.row) {
        // SAFETY: a valid per-CPU slot of COUNTERS; nothing else on this CPU writes it while
        // this program runs.
        bump(unsafe { &mut *counters }, judgement.verdict);
    }
    if let Some(counters) = HOOKS.get_ptr_mut(u32::from(hook)) {
        // SAFETY: as above, a slot of HOOKS.
        bump(unsafe { &mut *counters }, judgement.verdict);
    }
}

#[inline(always)]
fn bump(counters: &mut egress_common::RuleCounters, v: u8) {
    match v {
        verdict::DENY => counters.denied += 1,
        verdict::WOULD_DENY => counters.would_deny += 1,
        _ => counters.allowed += 1,
    }
}

/// Counts an internal error (the caller fails closed).
#[inline(always)]
pub fn count_error() {
    if let Some(stats) = STATS.get_ptr_mut(0) {
        // SAFETY: a valid per-CPU slot of STATS; nothing else on this CPU writes it while this
        // program runs.
        unsafe { (*stats).errors += 1 };
    }
}

/// Sends an event to the agent. A full ring buffer loses the event, never the verdict.
#[inline(always)]
pub fn report(dest: &Dest, judgement: &Judgement, who: &Who) {
    let Some(mut entry) = EVENTS.reserve_untyped::<Event>(0) else {
        if let Some(stats) = STATS.get_ptr_mut(0) {
            // SAFETY: as in `count_error`.
            unsafe { (*stats).events_lost += 1 };
        }
        return;
    };
    entry.write(Event {
        // SAFETY: a plain helper call without arguments.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        cgroup_id: who.cgroup_id,
        pid: (who.pid_tgid >> 32) as u32,
        tid: who.pid_tgid as u32,
        row: judgement.row,
        generation: judgement.generation,
        verdict: judgement.verdict,
        family: dest.family,
        proto: dest.proto,
        flags: dest.flags,
        port: dest.port,
        hook: dest.hook,
        reason: judgement.reason,
        addr: dest.addr,
        comm: who.comm,
    });
    entry.submit(0);
}

/// IPv4 in the first four bytes of sixteen.
#[inline(always)]
pub fn v4_in_16(v4: [u8; 4]) -> [u8; 16] {
    let mut addr = [0u8; 16];
    addr[0] = v4[0];
    addr[1] = v4[1];
    addr[2] = v4[2];
    addr[3] = v4[3];
    addr
}

/// Four network-order words as sixteen bytes.
#[inline(always)]
pub fn words_to_bytes(words: [u32; 4]) -> [u8; 16] {
    let mut addr = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = words[i].to_ne_bytes();
        addr[i * 4] = b[0];
        addr[i * 4 + 1] = b[1];
        addr[i * 4 + 2] = b[2];
        addr[i * 4 + 3] = b[3];
        i += 1;
    }
    addr
}
