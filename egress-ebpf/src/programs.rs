//! `cgroup/connect4` and `cgroup/connect6`: thin entry points around one decision path.

use aya_ebpf::{
    bindings::bpf_sock_addr,
    btf_maps::lpm_trie::Key,
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns,
    },
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use egress_common::{
    AF_INET, AF_INET6, Event, KEY_PREFIX_BITS, PROTO_TCP, ROW_BYPASS, ROW_NO_RULE, RuleKeyV4,
    RuleKeyV6, flags, mode, verdict,
};

use crate::maps::{BYPASS_V4, BYPASS_V6, CONFIG, COUNTERS, EVENTS, RULES_V4, RULES_V6, STATS};

/// `connect()` goes ahead.
const RET_ALLOW: i32 = 1;
/// `connect()` fails with `EPERM`.
const RET_DENY: i32 = 0;

/// `SOCK_STREAM`: the only socket type judged here (datagram sockets are a later issue and
/// pass untouched; see the README's coverage table).
const SOCK_STREAM: u32 = 1;

/// `127.0.0.1` in network byte order: what `0.0.0.0` means as a connect destination.
const LOOPBACK_V4: [u8; 4] = [127, 0, 0, 1];
/// `::1`: what `::` means as a connect destination.
const LOOPBACK_V6: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

/// The destination of one `connect()`, as judged.
struct Dest {
    /// `AF_INET` or `AF_INET6`: which rule set judged it.
    family: u8,
    /// Bits of `egress_common::flags`.
    flags: u8,
    /// Network byte order.
    port: u16,
    /// Network byte order; IPv4 in the first four bytes.
    addr: [u8; 16],
}

/// A verdict and the counter row it is booked on.
struct Judgement {
    verdict: u8,
    row: u32,
    generation: u32,
}

/// `cgroup/connect4`.
///
/// # Minimum kernel version
///
/// 6.1 (see the crate docs for why).
#[cgroup_sock_addr(connect4)]
pub fn egress_connect4(ctx: SockAddrContext) -> i32 {
    finish(try_connect4(&ctx))
}

/// `cgroup/connect6`, including IPv4-mapped destinations on dual-stack sockets, which the
/// kernel sends only here and which are judged by the IPv4 rules.
///
/// # Minimum kernel version
///
/// 6.1 (see the crate docs for why).
#[cgroup_sock_addr(connect6)]
pub fn egress_connect6(ctx: SockAddrContext) -> i32 {
    finish(try_connect6(&ctx))
}

/// Maps a decision to the program's return value. An error fails closed.
#[inline(always)]
fn finish(result: Result<i32, ()>) -> i32 {
    match result {
        Ok(ret) => ret,
        Err(()) => {
            if let Some(stats) = STATS.get_ptr_mut(0) {
                // SAFETY: a valid per-CPU slot of STATS; nothing else on this CPU writes it
                // while this program runs.
                unsafe { (*stats).errors += 1 };
            }
            RET_DENY
        }
    }
}

#[inline(always)]
fn sock_addr(ctx: &SockAddrContext) -> &bpf_sock_addr {
    // SAFETY: the kernel hands every cgroup/sock_addr program a valid context.
    unsafe { &*ctx.sock_addr }
}

fn try_connect4(ctx: &SockAddrContext) -> Result<i32, ()> {
    let sa = sock_addr(ctx);
    if sa.type_ != SOCK_STREAM {
        return Ok(RET_ALLOW);
    }
    let dest = Dest {
        family: AF_INET,
        flags: 0,
        port: sa.user_port as u16,
        addr: v4_in_16(sa.user_ip4.to_ne_bytes()),
    };
    decide(dest)
}

fn try_connect6(ctx: &SockAddrContext) -> Result<i32, ()> {
    let sa = sock_addr(ctx);
    if sa.type_ != SOCK_STREAM {
        return Ok(RET_ALLOW);
    }
    let words = [
        sa.user_ip6[0],
        sa.user_ip6[1],
        sa.user_ip6[2],
        sa.user_ip6[3],
    ];
    let port = sa.user_port as u16;
    // ::ffff:a.b.c.d: the words are in network byte order, so compare against the big-endian
    // form of 0x0000ffff.
    let dest = if words[0] == 0 && words[1] == 0 && words[2] == 0x0000_ffffu32.to_be() {
        Dest {
            family: AF_INET,
            flags: flags::V4_MAPPED,
            port,
            addr: v4_in_16(words[3].to_ne_bytes()),
        }
    } else {
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
        Dest {
            family: AF_INET6,
            flags: 0,
            port,
            addr,
        }
    };
    decide(dest)
}

#[inline(always)]
fn v4_in_16(v4: [u8; 4]) -> [u8; 16] {
    let mut addr = [0u8; 16];
    addr[0] = v4[0];
    addr[1] = v4[1];
    addr[2] = v4[2];
    addr[3] = v4[3];
    addr
}

/// The one decision path for both families.
fn decide(dest: Dest) -> Result<i32, ()> {
    let config = CONFIG.get(0).ok_or(())?;
    let judged = if dest.family == AF_INET {
        judge_v4(&dest)
    } else {
        judge_v6(&dest)
    };
    let (verdict, row, ret) = match judged {
        Some(Matched::Bypass) => (verdict::BYPASS, ROW_BYPASS, RET_ALLOW),
        Some(Matched::Rule(row)) => (verdict::ALLOW, row, RET_ALLOW),
        None if config.mode == mode::AUDIT => (verdict::WOULD_DENY, ROW_NO_RULE, RET_ALLOW),
        None => (verdict::DENY, ROW_NO_RULE, RET_DENY),
    };
    let judgement = Judgement {
        verdict,
        row,
        generation: config.generation,
    };
    count(&judgement);
    if verdict == verdict::DENY || verdict == verdict::WOULD_DENY {
        report(&dest, &judgement);
    }
    Ok(ret)
}

enum Matched {
    Bypass,
    Rule(u32),
}

fn judge_v4(dest: &Dest) -> Option<Matched> {
    let mut addr = [dest.addr[0], dest.addr[1], dest.addr[2], dest.addr[3]];
    if addr == [0, 0, 0, 0] {
        // connect() to 0.0.0.0 reaches the local host.
        addr = LOOPBACK_V4;
    }
    if BYPASS_V4.get(&Key::new(32, addr)).is_some() {
        return Some(Matched::Bypass);
    }
    let key = RuleKeyV4 {
        port: dest.port,
        proto: PROTO_TCP,
        _pad: 0,
        addr,
    };
    RULES_V4
        .get(&Key::new(KEY_PREFIX_BITS + 32, key))
        .map(|value| Matched::Rule(value.row))
}

fn judge_v6(dest: &Dest) -> Option<Matched> {
    let mut addr = dest.addr;
    if addr == [0; 16] {
        // connect() to :: reaches the local host.
        addr = LOOPBACK_V6;
    }
    if BYPASS_V6.get(&Key::new(128, addr)).is_some() {
        return Some(Matched::Bypass);
    }
    let key = RuleKeyV6 {
        port: dest.port,
        proto: PROTO_TCP,
        _pad: 0,
        addr,
    };
    RULES_V6
        .get(&Key::new(KEY_PREFIX_BITS + 128, key))
        .map(|value| Matched::Rule(value.row))
}

/// Books the verdict on its counter row. A row outside the map (a corrupt rule value) is not
/// counted, and does not change the verdict.
#[inline(always)]
fn count(judgement: &Judgement) {
    let Some(counters) = COUNTERS.get_ptr_mut(judgement.row) else {
        return;
    };
    // SAFETY: a valid per-CPU slot of COUNTERS; nothing else on this CPU writes it while this
    // program runs.
    let counters = unsafe { &mut *counters };
    match judgement.verdict {
        verdict::DENY => counters.denied += 1,
        verdict::WOULD_DENY => counters.would_deny += 1,
        _ => counters.allowed += 1,
    }
}

/// Sends an event to the agent. A full ring buffer loses the event, never the verdict.
#[inline(always)]
fn report(dest: &Dest, judgement: &Judgement) {
    let Some(mut entry) = EVENTS.reserve_untyped::<Event>(0) else {
        if let Some(stats) = STATS.get_ptr_mut(0) {
            // SAFETY: as in `finish`.
            unsafe { (*stats).events_lost += 1 };
        }
        return;
    };
    let pid_tgid = bpf_get_current_pid_tgid();
    let comm = bpf_get_current_comm().unwrap_or([0; 16]);
    entry.write(Event {
        // SAFETY: plain helper calls without arguments.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        // SAFETY: as above.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        pid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        row: judgement.row,
        generation: judgement.generation,
        verdict: judgement.verdict,
        family: dest.family,
        proto: PROTO_TCP,
        flags: dest.flags,
        port: dest.port,
        _pad: 0,
        addr: dest.addr,
        comm,
    });
    entry.submit(0);
}
