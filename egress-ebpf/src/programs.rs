//! `cgroup/connect4` and `cgroup/connect6`: thin entry points around one decision path; and
//! the programs that keep a redirected connection's original destination: `sockops` (for the
//! proxy) and `cgroup/getpeername4`/`6` (for the app).

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, bpf_sock_addr},
    btf_maps::lpm_trie::Key,
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_socket_cookie, bpf_ktime_get_ns,
    },
    macros::{cgroup_sock_addr, sock_ops},
    programs::{SockAddrContext, SockOpsContext},
};
use egress_common::{
    AF_INET, AF_INET6, Event, KEY_PREFIX_BITS, OrigDst, PROTO_TCP, PeerKey, ROW_BYPASS,
    ROW_NO_RULE, ROW_PROXY, RuleKeyV4, RuleKeyV6, config_flags, flags, mode, verdict,
};

use crate::maps::{
    BYPASS_V4, BYPASS_V6, CONFIG, COUNTERS, EVENTS, HTTP_PORTS, ORIG_COOKIE, ORIG_PEER, RULES_V4,
    RULES_V6, STATS,
};

/// `connect()` goes ahead.
const RET_ALLOW: i32 = 1;
/// `connect()` fails with `EPERM`.
const RET_DENY: i32 = 0;

/// `SOCK_STREAM`: the only socket type judged here (datagram sockets are a later issue and
/// pass untouched; see the README's coverage table).
const SOCK_STREAM: u32 = 1;

/// `::ffff:0:0/96` as its third 32-bit word (network byte order), the mark of a v4-mapped
/// IPv6 address.
const V4_MAPPED_WORD: u32 = 0x0000_ffffu32.to_be();

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

/// `cgroup/getpeername4`: an app whose connection was redirected to the proxy sees the
/// destination it asked for, not the proxy. Never changes anything else; always returns 1.
///
/// # Minimum kernel version
///
/// 5.8.
#[cgroup_sock_addr(getpeername4)]
pub fn egress_getpeername4(ctx: SockAddrContext) -> i32 {
    if let Some(orig) = orig_of(&ctx) {
        let sa = sock_addr_mut(&ctx);
        sa.user_ip4 = u32::from_ne_bytes([orig.addr[0], orig.addr[1], orig.addr[2], orig.addr[3]]);
        sa.user_port = u32::from(orig.port);
    }
    1
}

/// `cgroup/getpeername6`, for IPv6 and v4-mapped redirected sockets.
///
/// # Minimum kernel version
///
/// 5.8.
#[cgroup_sock_addr(getpeername6)]
pub fn egress_getpeername6(ctx: SockAddrContext) -> i32 {
    if let Some(orig) = orig_of(&ctx) {
        let a = orig.addr;
        let words = if orig.family == AF_INET {
            [
                0,
                0,
                V4_MAPPED_WORD,
                u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
            ]
        } else {
            [
                u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
                u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
                u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
                u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
            ]
        };
        let sa = sock_addr_mut(&ctx);
        write_ip6(sa, words);
        sa.user_port = u32::from(orig.port);
    }
    1
}

/// `sockops`: when a redirected connection is established (the client got the proxy's
/// SYN-ACK, before it sends the ACK that lets the proxy's `accept()` return), files its
/// original destination under the client socket's address, which is the peer address the
/// proxy sees. A failure leaves the proxy without an original destination, and the proxy
/// then refuses the connection: this fails closed.
///
/// # Minimum kernel version
///
/// 5.8 (socket cookies in sock_ops programs via `bpf_get_socket_cookie`).
#[sock_ops]
pub fn egress_sockops(ctx: SockOpsContext) -> u32 {
    if ctx.op() == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && record_peer(&ctx).is_err() {
        count_error();
    }
    1
}

fn record_peer(ctx: &SockOpsContext) -> Result<(), ()> {
    // SAFETY: a plain helper call on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(orig) = ORIG_COOKIE.get_ptr(cookie) else {
        // Not a redirected connection: nothing to do.
        return Ok(());
    };
    // SAFETY: a valid map value pointer, copied out at once.
    let orig = unsafe { *orig };
    // SAFETY: the kernel hands every sockops program a valid context.
    let ops = unsafe { &*ctx.ops };
    // local_port is the one field of bpf_sock_ops in host byte order.
    let port = (ops.local_port as u16).to_be();
    let words = [
        ops.local_ip6[0],
        ops.local_ip6[1],
        ops.local_ip6[2],
        ops.local_ip6[3],
    ];
    let key = if ops.family == u32::from(AF_INET) {
        PeerKey {
            addr: v4_in_16(ops.local_ip4.to_ne_bytes()),
            port,
            family: AF_INET,
            _pad: 0,
        }
    } else if words[0] == 0 && words[1] == 0 && words[2] == V4_MAPPED_WORD {
        // A dual-stack socket talking IPv4: the proxy's IPv4 listener sees an IPv4 peer.
        PeerKey {
            addr: v4_in_16(words[3].to_ne_bytes()),
            port,
            family: AF_INET,
            _pad: 0,
        }
    } else {
        PeerKey {
            addr: words_to_bytes(words),
            port,
            family: AF_INET6,
            _pad: 0,
        }
    };
    ORIG_PEER.insert(key, orig, 0).map_err(|_| ())
}

/// The recorded original destination of the context's socket, if it was redirected.
#[inline(always)]
fn orig_of(ctx: &SockAddrContext) -> Option<OrigDst> {
    // SAFETY: a plain helper call on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: a valid map value pointer, copied out at once.
    ORIG_COOKIE.get_ptr(cookie).map(|p| unsafe { *p })
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

/// What the hook does with the connection.
enum Outcome {
    /// `connect()` goes ahead unchanged.
    Allow,
    /// `connect()` fails with `EPERM`.
    Deny,
    /// Rewrite the destination to the proxy on this port (network byte order); the original
    /// destination is already recorded.
    Redirect(u16),
}

/// Maps a decision to the program's return value. An error fails closed.
#[inline(always)]
fn finish(result: Result<i32, ()>) -> i32 {
    match result {
        Ok(ret) => ret,
        Err(()) => {
            count_error();
            RET_DENY
        }
    }
}

#[inline(always)]
fn count_error() {
    if let Some(stats) = STATS.get_ptr_mut(0) {
        // SAFETY: a valid per-CPU slot of STATS; nothing else on this CPU writes it while this
        // program runs.
        unsafe { (*stats).errors += 1 };
    }
}

#[inline(always)]
fn sock_addr(ctx: &SockAddrContext) -> &bpf_sock_addr {
    // SAFETY: the kernel hands every cgroup/sock_addr program a valid context.
    unsafe { &*ctx.sock_addr }
}

#[inline(always)]
#[expect(
    clippy::mut_from_ref,
    reason = "the kernel context is writable through its pointer"
)]
fn sock_addr_mut(ctx: &SockAddrContext) -> &mut bpf_sock_addr {
    // SAFETY: as in `sock_addr`; connect and getpeername programs may write the address.
    unsafe { &mut *ctx.sock_addr }
}

/// Writes `user_ip6` one 32-bit word at a time. The verifier only accepts 4-byte stores
/// there ("invalid bpf_context access" for an 8- or 16-byte store), and the compiler could
/// merge a plain array assignment into wider stores.
#[inline(always)]
fn write_ip6(sa: &mut bpf_sock_addr, words: [u32; 4]) {
    // SAFETY: in-bounds fields of the context.
    unsafe {
        core::ptr::write_volatile(&mut sa.user_ip6[0], words[0]);
        core::ptr::write_volatile(&mut sa.user_ip6[1], words[1]);
        core::ptr::write_volatile(&mut sa.user_ip6[2], words[2]);
        core::ptr::write_volatile(&mut sa.user_ip6[3], words[3]);
    }
}

#[inline(always)]
fn words_to_bytes(words: [u32; 4]) -> [u8; 16] {
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
    match decide(ctx, dest)? {
        Outcome::Allow => Ok(RET_ALLOW),
        Outcome::Deny => Ok(RET_DENY),
        Outcome::Redirect(port) => {
            // Only user_ip4/user_port are writable here: the rewrite lives in each hook, not
            // in the shared decide() ("invalid bpf_context access off=8 size=4" otherwise).
            let sa = sock_addr_mut(ctx);
            sa.user_ip4 = u32::from_ne_bytes(LOOPBACK_V4);
            sa.user_port = u32::from(port);
            Ok(RET_ALLOW)
        }
    }
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
    let dest = if words[0] == 0 && words[1] == 0 && words[2] == V4_MAPPED_WORD {
        Dest {
            family: AF_INET,
            flags: flags::V4_MAPPED,
            port,
            addr: v4_in_16(words[3].to_ne_bytes()),
        }
    } else {
        Dest {
            family: AF_INET6,
            flags: 0,
            port,
            addr: words_to_bytes(words),
        }
    };
    let v4_mapped = dest.family == AF_INET;
    match decide(ctx, dest)? {
        Outcome::Allow => Ok(RET_ALLOW),
        Outcome::Deny => Ok(RET_DENY),
        Outcome::Redirect(port) => {
            // A dual-stack socket headed for IPv4 reaches the proxy's IPv4 listener through
            // ::ffff:127.0.0.1; an IPv6 destination goes to [::1].
            let words = if v4_mapped {
                [0, 0, V4_MAPPED_WORD, u32::from_ne_bytes(LOOPBACK_V4)]
            } else {
                [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])]
            };
            let sa = sock_addr_mut(ctx);
            write_ip6(sa, words);
            sa.user_port = u32::from(port);
            Ok(RET_ALLOW)
        }
    }
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
fn decide(ctx: &SockAddrContext, dest: Dest) -> Result<Outcome, ()> {
    let config = CONFIG.get(0).ok_or(())?;
    // SAFETY: a plain helper call without arguments.
    if config.agent_cgroup != 0 && unsafe { bpf_get_current_cgroup_id() } == config.agent_cgroup {
        // The agent's own sockets: the proxy's upstream connections must not be redirected
        // to the proxy itself. Exempt by cgroup id, which a workload cannot forge (a mark
        // can be set by anyone holding CAP_NET_RAW).
        return Ok(Outcome::Allow);
    }
    let judged = if dest.family == AF_INET {
        judge_v4(&dest)
    } else {
        judge_v6(&dest)
    };
    let (verdict, row, outcome) = match judged {
        Some(Matched::Bypass) => (verdict::BYPASS, ROW_BYPASS, Outcome::Allow),
        Some(Matched::Rule(row)) => (verdict::ALLOW, row, Outcome::Allow),
        None if is_http_port(dest.port) => {
            record_redirect(ctx, &dest)?;
            (
                verdict::REDIRECT,
                ROW_PROXY,
                Outcome::Redirect(config.proxy_port),
            )
        }
        None if config.mode == mode::AUDIT => (verdict::WOULD_DENY, ROW_NO_RULE, Outcome::Allow),
        None => (verdict::DENY, ROW_NO_RULE, Outcome::Deny),
    };
    let judgement = Judgement {
        verdict,
        row,
        generation: config.generation,
    };
    count(&judgement);
    if verdict == verdict::DENY
        || verdict == verdict::WOULD_DENY
        || config.flags & config_flags::EVENTS_ALL != 0
    {
        report(&dest, &judgement);
    }
    Ok(outcome)
}

#[inline(always)]
fn is_http_port(port_be: u16) -> bool {
    HTTP_PORTS
        .get(u32::from(u16::from_be(port_be)))
        .is_some_and(|v| *v != 0)
}

/// Records where a connection that goes to the proxy was going. Without the record the
/// connection must not go ahead (the proxy could not judge it): an error here denies it.
#[inline(always)]
fn record_redirect(ctx: &SockAddrContext, dest: &Dest) -> Result<(), ()> {
    // SAFETY: a plain helper call on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let orig = OrigDst {
        addr: dest.addr,
        port: dest.port,
        family: dest.family,
        flags: dest.flags,
    };
    ORIG_COOKIE.insert(cookie, orig, 0).map_err(|_| ())
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
        hook: 0,
        _pad: 0,
        addr: dest.addr,
        comm,
    });
    entry.submit(0);
}
