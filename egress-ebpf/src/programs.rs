//! The cgroup programs: `cgroup/connect4`/`connect6` (TCP connections and connected datagram
//! sockets), `cgroup/sendmsg4`/`sendmsg6` (datagrams sent to an address) and
//! `cgroup/sock_create` (socket kinds) around one decision path; and the programs that keep a
//! redirected connection's original destination: `sockops` (for the proxy) and
//! `cgroup/getpeername4`/`6` (for the app); and, for FQDN rules, the DNS path: a UDP query to
//! a resolver goes to the agent's DNS listener, and `cgroup/recvmsg4`/`6` show its answer as
//! the resolver's.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_F_CURRENT_NETNS, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, bpf_sock_addr, bpf_sock_tuple,
    },
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_socket_cookie,
        generated::{
            bpf_get_current_ancestor_cgroup_id, bpf_get_netns_cookie, bpf_sk_lookup_tcp,
            bpf_sk_lookup_udp, bpf_sk_release, bpf_sk_storage_get,
        },
    },
    macros::{cgroup_sock, cgroup_sock_addr, sock_ops},
    programs::{SockAddrContext, SockContext, SockOpsContext},
};
use egress_common::{
    AF_INET, AF_INET6, DNS_PORT, DnsSlot, MAX_RESOLVERS, OrigDst, PROTO_TCP, PROTO_UDP, PeerKey,
    ROW_BYPASS, ROW_NO_RULE, ROW_PROXY, SCOPE_DEPTH, config_flags, flags, hook, mode, reason,
    verdict,
};

use crate::{
    judge::{
        Dest, Judgement, LOOPBACK_V4, Matched, NAT64_WORD, V4_MAPPED_WORD, Who, count, count_error,
        generation, lookup, protocol_allowed, report, v4_in_16, words_to_bytes,
    },
    maps::{CONFIG, DNS_SLOTS, ORIG_COOKIE, ORIG_PEER, PROXY_LISTEN, SCOPES},
};

/// The operation goes ahead.
const RET_ALLOW: i32 = 1;
/// The operation fails with `EPERM`.
const RET_DENY: i32 = 0;

/// `SOCK_RAW`.
const SOCK_RAW: u32 = 3;

/// `cgroup/connect4`: TCP connections, and `connect()` on UDP sockets.
///
/// # Minimum kernel version
///
/// 5.8: the hook is 4.17; the helpers it calls on every verdict (`bpf_get_current_pid_tgid`,
/// `bpf_get_current_comm`, `bpf_get_current_cgroup_id`) 5.7 in this program type;
/// `bpf_get_socket_cookie` 4.20; the ring buffer 5.8. Attached through a `bpf_link` (5.7).
#[cgroup_sock_addr(connect4)]
pub fn egress_connect4(ctx: SockAddrContext) -> i32 {
    finish(try_addr4(&ctx, hook::CONNECT))
}

/// `cgroup/connect6`, including IPv4-mapped destinations on dual-stack sockets, which the
/// kernel sends only here and which are judged by the IPv4 rules (as are NAT64 and 6to4
/// destinations).
///
/// # Minimum kernel version
///
/// 5.8, as connect4.
#[cgroup_sock_addr(connect6)]
pub fn egress_connect6(ctx: SockAddrContext) -> i32 {
    finish(try_addr6(&ctx, hook::CONNECT))
}

/// `cgroup/sendmsg4`: a datagram sent with a destination address (`sendto`, `sendmsg` with
/// `msg_name`) on an unconnected UDP socket. A connected socket's datagrams were judged at
/// `connect()`.
///
/// # Minimum kernel version
///
/// 5.8 (4.18 for the hook; the helpers and the ring buffer as connect4).
#[cgroup_sock_addr(sendmsg4)]
pub fn egress_sendmsg4(ctx: SockAddrContext) -> i32 {
    finish(try_addr4(&ctx, hook::SENDMSG))
}

/// `cgroup/sendmsg6`, v4-mapped, NAT64 and 6to4 destinations judged as IPv4.
///
/// # Minimum kernel version
///
/// 5.8 (as sendmsg4).
#[cgroup_sock_addr(sendmsg6)]
pub fn egress_sendmsg6(ctx: SockAddrContext) -> i32 {
    finish(try_addr6(&ctx, hook::SENDMSG))
}

/// `cgroup/sock_create`: a socket of the managed cgroup may be TCP or UDP; a raw socket, or
/// any other inet protocol (SCTP, UDP-Lite, MPTCP, ICMP ping sockets...), only when the
/// EgressConfig's `allowSockets` names it. Their traffic would never reach the connect and
/// sendmsg hooks' rules. Runs for `AF_INET` and `AF_INET6` sockets only (the kernel does not
/// run it for `AF_PACKET`; see the README's coverage table).
///
/// # Minimum kernel version
///
/// 5.8 (4.10 for the hook; the pid, comm and cgroup helpers 5.7 in `cgroup_sock` programs;
/// the ring buffer 5.8).
#[cgroup_sock(sock_create)]
pub fn egress_sock_create(ctx: SockContext) -> i32 {
    finish(try_sock_create(&ctx))
}

/// `cgroup/getpeername4`: an app whose connection was redirected to the proxy sees the
/// destination it asked for, not the proxy. Never changes anything else; always returns 1.
///
/// # Minimum kernel version
///
/// 5.8 (the attach type; `bpf_get_socket_cookie` here is 4.20). Optional: without it the
/// agent runs, and says so; the app then sees the proxy's address in `getpeername()`.
#[cgroup_sock_addr(getpeername4)]
pub fn egress_getpeername4(ctx: SockAddrContext) -> i32 {
    if let Some(orig) = orig_of(&ctx) {
        let sa = sock_addr_mut(&ctx);
        sa.user_ip4 = u32::from_ne_bytes([orig.addr[0], orig.addr[1], orig.addr[2], orig.addr[3]]);
        sa.user_port = u32::from(orig.port);
    }
    1
}

/// `cgroup/getpeername6`, for IPv6, v4-mapped and NAT64 redirected sockets.
///
/// # Minimum kernel version
///
/// 5.8 (the attach type; `bpf_get_socket_cookie` here is 4.20). Optional: without it the
/// agent runs, and says so; the app then sees the proxy's address in `getpeername()`.
#[cgroup_sock_addr(getpeername6)]
pub fn egress_getpeername6(ctx: SockAddrContext) -> i32 {
    if let Some(orig) = orig_of(&ctx) {
        let words = ip6_words(&orig.addr, orig.family, orig.flags);
        let sa = sock_addr_mut(&ctx);
        write_ip6(sa, words);
        sa.user_port = u32::from(orig.port);
    }
    1
}

/// `cgroup/recvmsg4`: a datagram read with its source address (`recvfrom`, `recvmsg`) that
/// came from the agent's DNS listener for a resolver shows that resolver as its source, so a
/// stub resolver that checks where its answer came from (glibc does) takes it. Only while the
/// socket bound there is the agent's (marked in `PROXY_LISTEN`): what another process bound
/// to that port after the agent died sends keeps its own source, and a stub that checks drops
/// it. Changes nothing else; always returns 1.
///
/// # Minimum kernel version
///
/// 5.2 (the attach type).
#[cgroup_sock_addr(recvmsg4)]
pub fn egress_recvmsg4(ctx: SockAddrContext) -> i32 {
    let sa = sock_addr(&ctx);
    if sa.user_ip4 == u32::from_ne_bytes(LOOPBACK_V4)
        && let Some(slot) = dns_slot_of_listener(sa.user_port as u16, AF_INET)
        && agent_answers(&ctx, slot)
    {
        let sa = sock_addr_mut(&ctx);
        sa.user_ip4 = u32::from_ne_bytes([slot.addr[0], slot.addr[1], slot.addr[2], slot.addr[3]]);
        sa.user_port = u32::from(slot.port);
    }
    1
}

/// `cgroup/recvmsg6`: as recvmsg4, for IPv6 sockets: `[::1]` answers for an IPv6 resolver,
/// `::ffff:127.0.0.1` for an IPv4 one asked through a dual-stack socket.
///
/// # Minimum kernel version
///
/// 5.2 (the attach type).
#[cgroup_sock_addr(recvmsg6)]
pub fn egress_recvmsg6(ctx: SockAddrContext) -> i32 {
    let sa = sock_addr(&ctx);
    let words = [
        sa.user_ip6[0],
        sa.user_ip6[1],
        sa.user_ip6[2],
        sa.user_ip6[3],
    ];
    let port = sa.user_port as u16;
    let loopback_v6 = words == [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];
    let loopback_mapped = words == [0, 0, V4_MAPPED_WORD, u32::from_ne_bytes(LOOPBACK_V4)];
    let slot = if loopback_v6 {
        dns_slot_of_listener(port, AF_INET6)
    } else if loopback_mapped {
        dns_slot_of_listener(port, AF_INET)
    } else {
        None
    };
    if let Some(slot) = slot
        && agent_answers(&ctx, slot)
    {
        let words = ip6_words(&slot.addr, slot.family, 0);
        let sa = sock_addr_mut(&ctx);
        write_ip6(sa, words);
        sa.user_port = u32::from(slot.port);
    }
    1
}

/// Whether the UDP socket bound to the loopback listener of `slot`, in the reader's network
/// namespace, is the agent's DNS listener (marked in `PROXY_LISTEN`).
#[inline(always)]
fn agent_answers(ctx: &SockAddrContext, slot: DnsSlot) -> bool {
    let family = if slot.family == AF_INET6 {
        ProxyFamily::V6
    } else {
        ProxyFamily::V4
    };
    listener_check(ctx, slot.listen_port, family, true) == reason::RULES
}

/// An address as an IPv6 socket shows it, four network-order words: an IPv4 one (`family`
/// `AF_INET`, in the first four bytes) as `::ffff:a.b.c.d`, or as `64:ff9b::a.b.c.d` when
/// `flags` say the app gave it in NAT64 form.
#[inline(always)]
fn ip6_words(a: &[u8; 16], family: u8, flags_: u8) -> [u32; 4] {
    let first = u32::from_ne_bytes([a[0], a[1], a[2], a[3]]);
    if family == AF_INET && flags_ & flags::NAT64 != 0 {
        [NAT64_WORD, 0, 0, first]
    } else if family == AF_INET {
        [0, 0, V4_MAPPED_WORD, first]
    } else {
        [
            first,
            u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
            u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
            u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
        ]
    }
}

/// The resolver whose agent DNS listener is on `listen_port` (network byte order) in
/// `family`, when the policy has FQDN rules.
#[inline(always)]
fn dns_slot_of_listener(listen_port: u16, family: u8) -> Option<DnsSlot> {
    let config = CONFIG.get(0)?;
    if config.flags & config_flags::DNS == 0 || listen_port == 0 {
        return None;
    }
    find_dns_slot(|slot| slot.listen_port == listen_port && slot.family == family).copied()
}

/// The first resolver slot of `DNS_SLOTS` that `wanted` picks. Slots are filled from the
/// first: the first unused one ends the search.
#[inline(always)]
fn find_dns_slot(wanted: impl Fn(&DnsSlot) -> bool) -> Option<&'static DnsSlot> {
    let mut i = 0;
    while i < MAX_RESOLVERS {
        let slot = DNS_SLOTS.get(i)?;
        if slot.listen_port == 0 {
            return None;
        }
        if wanted(slot) {
            return Some(slot);
        }
        i += 1;
    }
    None
}

/// The agent's DNS listener port (network byte order) for a query to `dest` (a UDP datagram
/// or connect, or a TCP connect), when `dest` is one of the policy's resolvers, the policy has
/// FQDN rules, the caller is not the agent, and the socket listening there in the caller's
/// network namespace (UDP socket or TCP listener) is the agent's (marked in `PROXY_LISTEN`).
/// Otherwise `None`: the query goes to the resolver unchanged (the resolver is allowed either
/// way; an answer the agent did not see teaches the kernel nothing, so connections to its
/// addresses stay refused unless a rule allows them).
#[inline(always)]
fn dns_listener(
    ctx: &SockAddrContext,
    dest: &Dest,
    protocol: u32,
    proxy: ProxyFamily,
) -> Option<u16> {
    let udp = protocol == u32::from(PROTO_UDP);
    if !(udp || protocol == u32::from(PROTO_TCP) && dest.hook == hook::CONNECT)
        || dest.port != DNS_PORT.to_be()
        || dest.flags & (flags::NAT64 | flags::SIX_TO_FOUR) != 0
    {
        return None;
    }
    let config = CONFIG.get(0)?;
    if config.flags & config_flags::DNS == 0 {
        return None;
    }
    // SAFETY: a plain helper call without arguments.
    if config.agent_cgroup != 0 && unsafe { bpf_get_current_cgroup_id() } == config.agent_cgroup {
        // The agent's own queries to the resolver.
        return None;
    }
    let slot = find_dns_slot(|slot| {
        slot.family == dest.family && slot.port == dest.port && same_addr(&slot.addr, &dest.addr)
    })?;
    (listener_check(ctx, slot.listen_port, proxy, udp) == reason::RULES).then_some(slot.listen_port)
}

/// Whether two 16-byte addresses are equal, compared as four words (no `memcmp` in BPF).
#[inline(always)]
fn same_addr(a: &[u8; 16], b: &[u8; 16]) -> bool {
    let word = |x: &[u8; 16], i: usize| u32::from_ne_bytes([x[i], x[i + 1], x[i + 2], x[i + 3]]);
    word(a, 0) == word(b, 0)
        && word(a, 4) == word(b, 4)
        && word(a, 8) == word(b, 8)
        && word(a, 12) == word(b, 12)
}

/// `sockops`: when a redirected connection is established (the client got the proxy's
/// SYN-ACK, before it sends the ACK that lets the proxy's `accept()` return), files its
/// original destination under the client socket's address, which is the peer address the
/// proxy sees. A failure leaves the proxy without an original destination, and the proxy
/// then refuses the connection: this fails closed.
///
/// # Minimum kernel version
///
/// 5.7: sock_ops programs are 4.13 and `bpf_get_socket_cookie` in them 4.20; the program is
/// attached through a cgroup `bpf_link`, 5.7.
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
            _pad2: 0,
            netns: orig.netns,
        }
    } else if words[0] == 0 && words[1] == 0 && words[2] == V4_MAPPED_WORD {
        // A dual-stack socket talking IPv4: the proxy's IPv4 listener sees an IPv4 peer.
        PeerKey {
            addr: v4_in_16(words[3].to_ne_bytes()),
            port,
            family: AF_INET,
            _pad: 0,
            _pad2: 0,
            netns: orig.netns,
        }
    } else {
        PeerKey {
            addr: words_to_bytes(words),
            port,
            family: AF_INET6,
            _pad: 0,
            _pad2: 0,
            netns: orig.netns,
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

/// What the hook does with the operation.
enum Outcome {
    /// It goes ahead unchanged.
    Allow,
    /// It fails with `EPERM`.
    Deny,
    /// Rewrite the destination to the proxy on this port (network byte order); the original
    /// destination is already recorded.
    Redirect(u16),
}

/// Maps a decision to the program's return value. An error fails closed.
#[inline(always)]
fn finish(result: Result<i32, ()>) -> i32 {
    match result {
        // Spelled out so that the verifier sees a return value of 0 or 1 even when the
        // compiler passes the result through the stack.
        Ok(RET_ALLOW) => RET_ALLOW,
        Ok(_) => RET_DENY,
        Err(()) => {
            count_error();
            RET_DENY
        }
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

/// The protocol a socket's traffic is judged as, and whether it is a raw socket.
#[inline(always)]
fn socket_kind(sa: &bpf_sock_addr) -> (u8, bool) {
    let raw = sa.type_ == SOCK_RAW;
    let proto = if sa.protocol <= 255 {
        sa.protocol as u8
    } else {
        // IPPROTO_MPTCP (262): never in a rule; `other_allowed` looks the full number up.
        0
    };
    (proto, raw)
}

fn try_addr4(ctx: &SockAddrContext, hook: u8) -> Result<i32, ()> {
    let sa = sock_addr(ctx);
    let (proto, raw) = socket_kind(sa);
    let mut dest = Dest::v4(sa.user_ip4.to_ne_bytes(), sa.user_port as u16, proto, hook);
    if sa.family == u32::from(AF_INET6) {
        // sendmsg4 on a dual-stack socket: the app wrote ::ffff:a.b.c.d and the kernel's
        // IPv4 path shows it here as a.b.c.d.
        dest.flags = flags::V4_MAPPED;
    }
    match decide(ctx, &dest, raw, sa.protocol, ProxyFamily::V4)? {
        Outcome::Allow => {
            if !raw && let Some(port) = dns_listener(ctx, &dest, sa.protocol, ProxyFamily::V4) {
                if dest.hook == hook::CONNECT {
                    // A connected query socket: getpeername() shows the resolver.
                    record_redirect(ctx, &dest)?;
                }
                let sa = sock_addr_mut(ctx);
                sa.user_ip4 = u32::from_ne_bytes(LOOPBACK_V4);
                sa.user_port = u32::from(port);
            }
            Ok(RET_ALLOW)
        }
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

fn try_addr6(ctx: &SockAddrContext, hook: u8) -> Result<i32, ()> {
    let sa = sock_addr(ctx);
    let (proto, raw) = socket_kind(sa);
    let words = [
        sa.user_ip6[0],
        sa.user_ip6[1],
        sa.user_ip6[2],
        sa.user_ip6[3],
    ];
    let dest = Dest::v6(words, sa.user_port as u16, proto, hook);
    // Where a redirect of this socket goes: see the rewrite below.
    let proxy = if dest.flags & flags::V4_MAPPED != 0 {
        ProxyFamily::V4
    } else {
        ProxyFamily::V6
    };
    match decide(ctx, &dest, raw, sa.protocol, proxy)? {
        Outcome::Allow => {
            if !raw && let Some(port) = dns_listener(ctx, &dest, sa.protocol, proxy) {
                if dest.hook == hook::CONNECT {
                    record_redirect(ctx, &dest)?;
                }
                let words = loopback_words(proxy);
                let sa = sock_addr_mut(ctx);
                write_ip6(sa, words);
                sa.user_port = u32::from(port);
            }
            Ok(RET_ALLOW)
        }
        Outcome::Deny => Ok(RET_DENY),
        Outcome::Redirect(port) => {
            // A dual-stack socket headed for IPv4 reaches the proxy's IPv4 listener through
            // ::ffff:127.0.0.1; an IPv6 destination (NAT64 too: the socket may be IPv6-only)
            // goes to [::1].
            let words = loopback_words(proxy);
            let sa = sock_addr_mut(ctx);
            write_ip6(sa, words);
            sa.user_port = u32::from(port);
            Ok(RET_ALLOW)
        }
    }
}

/// The agent's loopback address, as an IPv6 socket reaches it: `::ffff:127.0.0.1` for its
/// IPv4 listeners (a dual-stack socket headed for an IPv4-mapped address), `[::1]` otherwise.
#[inline(always)]
fn loopback_words(family: ProxyFamily) -> [u32; 4] {
    match family {
        ProxyFamily::V4 => [0, 0, V4_MAPPED_WORD, u32::from_ne_bytes(LOOPBACK_V4)],
        ProxyFamily::V6 => [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])],
    }
}

/// True when a socket that is not plain TCP or UDP may be used (EgressConfig `allowSockets`).
#[inline(always)]
fn other_allowed(config_flags_: u16, raw: bool, protocol: u32) -> bool {
    if raw {
        config_flags_ & config_flags::ALLOW_RAW != 0
    } else {
        protocol_allowed(protocol)
    }
}

/// Which of the proxy's listeners a redirect of the socket goes to: `127.0.0.1` (IPv4 sockets,
/// and dual-stack sockets headed for an IPv4-mapped address) or `[::1]`.
#[derive(Clone, Copy)]
enum ProxyFamily {
    V4,
    V6,
}

/// The one decision path of the connect and sendmsg hooks, both families.
#[inline(always)]
fn decide(
    ctx: &SockAddrContext,
    dest: &Dest,
    raw: bool,
    protocol: u32,
    proxy: ProxyFamily,
) -> Result<Outcome, ()> {
    let config = CONFIG.get(0).ok_or(())?;
    // SAFETY: a plain helper call without arguments.
    if config.agent_cgroup != 0 && unsafe { bpf_get_current_cgroup_id() } == config.agent_cgroup {
        // The agent's own sockets: the proxy's upstream connections must not be redirected
        // to the proxy itself. Exempt by cgroup id, which a workload cannot forge (a mark
        // can be set by anyone holding CAP_NET_RAW).
        return Ok(Outcome::Allow);
    }
    let scope = if config.flags & config_flags::SCOPED != 0 {
        socket_scope()
    } else {
        0
    };
    let generation = generation(config);
    let judged = if !raw && (protocol == u32::from(PROTO_TCP) || protocol == u32::from(PROTO_UDP)) {
        lookup(
            dest,
            scope,
            config.flags & config_flags::DNS != 0,
            generation,
        )
    } else if other_allowed(config.flags, raw, protocol) {
        // allowSockets lets this kind of socket through without rules: booked as a bypass.
        Some(Matched::Bypass)
    } else {
        // Created before the agent attached, or handed in from outside the cgroup: a socket
        // sock_create would have refused is refused here too.
        None
    };
    // A redirect key of the scope: no rule allows the destination directly, and the port is
    // one of the scope's HTTP egress ports.
    let redirect = matches!(judged, Some(Matched::Rule(ROW_PROXY)));
    let judged = if redirect { None } else { judged };
    let redirectable = redirect
        && dest.hook == hook::CONNECT
        && !raw
        && protocol == u32::from(PROTO_TCP)
        // A 6to4 address cannot be rebuilt from the IPv4 address alone for getpeername.
        && dest.flags & flags::SIX_TO_FOUR == 0;
    let (verdict, row, outcome, why) = match judged {
        Some(Matched::Bypass) => (verdict::BYPASS, ROW_BYPASS, Outcome::Allow, reason::RULES),
        Some(Matched::Rule(row)) => (verdict::ALLOW, row, Outcome::Allow, reason::RULES),
        None if redirectable => {
            match listener_check(ctx, config.proxy_port, proxy, false) {
                reason::RULES => {
                    record_redirect(ctx, dest)?;
                    (
                        verdict::REDIRECT,
                        ROW_PROXY,
                        Outcome::Redirect(config.proxy_port),
                        reason::RULES,
                    )
                }
                // Nobody, or somebody other than the agent, listens where the connection would
                // go: never redirected there, since that process could read it. Audit mode
                // lets the connection go where the app sent it, unchanged, as a would-deny.
                why if config.mode == mode::AUDIT => {
                    (verdict::WOULD_DENY, ROW_PROXY, Outcome::Allow, why)
                }
                why => (verdict::DENY, ROW_PROXY, Outcome::Deny, why),
            }
        }
        None if config.mode == mode::AUDIT => (
            verdict::WOULD_DENY,
            ROW_NO_RULE,
            Outcome::Allow,
            reason::RULES,
        ),
        None => (verdict::DENY, ROW_NO_RULE, Outcome::Deny, reason::RULES),
    };
    let judgement = Judgement {
        verdict,
        row,
        generation,
        reason: why,
    };
    count(&judgement, dest.hook);
    if verdict == verdict::DENY
        || verdict == verdict::WOULD_DENY
        || config.flags & config_flags::EVENTS_ALL != 0
    {
        report(dest, &judgement, &Who::current());
    }
    Ok(outcome)
}

fn try_sock_create(ctx: &SockContext) -> Result<i32, ()> {
    // SAFETY: the kernel hands every cgroup/sock program a valid context.
    let sk = unsafe { &*ctx.sock };
    let raw = sk.type_ == SOCK_RAW;
    let protocol = sk.protocol;
    if !raw && (protocol == u32::from(PROTO_TCP) || protocol == u32::from(PROTO_UDP)) {
        // Their traffic meets the connect and sendmsg hooks.
        return Ok(RET_ALLOW);
    }
    let config = CONFIG.get(0).ok_or(())?;
    // SAFETY: a plain helper call without arguments.
    if config.agent_cgroup != 0 && unsafe { bpf_get_current_cgroup_id() } == config.agent_cgroup {
        return Ok(RET_ALLOW);
    }
    let (verdict, row, ret) = if other_allowed(config.flags, raw, protocol) {
        (verdict::BYPASS, ROW_BYPASS, RET_ALLOW)
    } else if config.mode == mode::AUDIT {
        (verdict::WOULD_DENY, ROW_NO_RULE, RET_ALLOW)
    } else {
        (verdict::DENY, ROW_NO_RULE, RET_DENY)
    };
    let judgement = Judgement {
        verdict,
        row,
        generation: config.generation,
        reason: reason::RULES,
    };
    count(&judgement, hook::SOCK_CREATE);
    if verdict != verdict::BYPASS || config.flags & config_flags::EVENTS_ALL != 0 {
        let dest = Dest {
            family: sk.family as u8,
            flags: if raw { flags::RAW } else { 0 },
            proto: if protocol <= 255 { protocol as u8 } else { 0 },
            hook: hook::SOCK_CREATE,
            // No destination yet: the port field carries the full protocol number (MPTCP is
            // 262), network byte order.
            port: (protocol as u16).to_be(),
            addr: [0; 16],
        };
        report(&dest, &judgement, &Who::current());
    }
    Ok(ret)
}

/// The scope of the calling task's sockets: that of its own cgroup when that is in `SCOPES`
/// (a container of a pod the agent has seen: one lookup), else of the first of the cgroup's
/// ancestors from the top that is (a pod's cgroup, for a container the agent has not seen
/// yet), at most [`SCOPE_DEPTH`] levels below the root; 0 when none is (a host process, a pod
/// of a namespace without rules of its own, a pod the agent has not seen yet: the node-wide
/// rules only).
#[inline(always)]
fn socket_scope() -> u8 {
    let read = |scope: *const u32| {
        // SAFETY: a valid map value pointer, read at once.
        let scope = unsafe { *scope };
        if scope <= 255 { scope as u8 } else { 0 }
    };
    // SAFETY: a plain helper call without arguments.
    if let Some(scope) = SCOPES.get_ptr(unsafe { bpf_get_current_cgroup_id() }) {
        return read(scope);
    }
    let mut level = 1;
    while level <= SCOPE_DEPTH {
        // SAFETY: a plain helper call; 0 past the task's own level.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
        if id == 0 {
            break;
        }
        if let Some(scope) = SCOPES.get_ptr(id) {
            return read(scope);
        }
        level += 1;
    }
    0
}

/// Whether the socket listening where a redirect would send the connection (the agent's
/// loopback address on `port_be`, in the connecting socket's own network namespace: the
/// proxy's TCP listener, or with `udp` a DNS listener) is one the agent made:
/// [`reason::RULES`] if it is, else why not ([`reason::PROXY_ABSENT`],
/// [`reason::PROXY_FOREIGN`]). Only a listener the agent marked in `PROXY_LISTEN` passes; the
/// mark lives on the socket and dies with it, so a process that binds the port while the agent
/// is down (or before it starts) never receives a redirected connection.
///
/// The lookup is the kernel's own listener lookup for that address and port, as the SYN will
/// meet it: the agent's listeners are bound without `SO_REUSEPORT`, so no other socket can
/// share their address and port, and a socket bound to a device or to the wildcard address
/// cannot be bound beside them.
#[inline(always)]
fn listener_check(ctx: &SockAddrContext, port_be: u16, family: ProxyFamily, udp: bool) -> u8 {
    // SAFETY: an all-zero tuple is a valid value of this plain C union.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let size = match family {
        ProxyFamily::V4 => {
            let loopback = u32::from_ne_bytes(LOOPBACK_V4);
            // Writing a union's fields is safe; nothing reads them back here.
            tuple.__bindgen_anon_1.ipv4.saddr = loopback;
            tuple.__bindgen_anon_1.ipv4.daddr = loopback;
            tuple.__bindgen_anon_1.ipv4.dport = port_be;
            size_of::<u32>() * 2 + size_of::<u16>() * 2
        }
        ProxyFamily::V6 => {
            let loopback = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];
            tuple.__bindgen_anon_1.ipv6.saddr = loopback;
            tuple.__bindgen_anon_1.ipv6.daddr = loopback;
            tuple.__bindgen_anon_1.ipv6.dport = port_be;
            size_of::<bpf_sock_tuple>()
        }
    };
    // The source port 0 matches no established socket, so the lookup finds the listener. A
    // negative netns id means the connecting socket's own network namespace (each pod's, for
    // a pod).
    // SAFETY: a helper call with the program's context and a tuple on this stack frame.
    let sk = unsafe {
        if udp {
            bpf_sk_lookup_udp(
                ctx.as_ptr(),
                &mut tuple,
                size as u32,
                BPF_F_CURRENT_NETNS as u64,
                0,
            )
        } else {
            bpf_sk_lookup_tcp(
                ctx.as_ptr(),
                &mut tuple,
                size as u32,
                BPF_F_CURRENT_NETNS as u64,
                0,
            )
        }
    };
    if sk.is_null() {
        return reason::PROXY_ABSENT;
    }
    // SAFETY: `sk` is the socket the lookup returned and still holds; the map pointer is the
    // map definition's address, which the loader relocates.
    let mark = unsafe {
        bpf_sk_storage_get(
            core::ptr::from_ref(&PROXY_LISTEN).cast_mut().cast(),
            sk.cast(),
            core::ptr::null_mut(),
            0,
        )
    };
    // SAFETY: releases the reference the lookup took; `sk` is not used after this.
    unsafe { bpf_sk_release(sk.cast()) };
    if mark.is_null() {
        reason::PROXY_FOREIGN
    } else {
        reason::RULES
    }
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
        // The caller of connect(), for the proxy's events (the redirect hides it otherwise).
        pid: (bpf_get_current_pid_tgid() >> 32) as u32,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
        // SAFETY: a plain helper call on the program's own context.
        netns: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
    };
    ORIG_COOKIE.insert(cookie, orig, 0).map_err(|_| ())
}
