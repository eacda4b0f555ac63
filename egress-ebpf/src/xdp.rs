//! `xdp`: the packet-level backstop on host-side veths (`egress run --xdp-iface`). A pod's
//! egress arrives there as ingress; a new TCP connection (SYN without ACK) or a UDP datagram
//! the rules do not allow is dropped, counted and reported, whatever socket sent it: this
//! catches what no socket hook of this host saw (a raw socket, a process outside the managed
//! cgroup, a socket made before the agent attached).
//!
//! Everything else passes: TCP segments of established connections (their SYN was judged),
//! ICMP and ICMPv6 (neighbour discovery, path MTU), non-IP frames, and IP fragments after the
//! first (the first carries the ports and was judged). Other IP protocols pass only when
//! `allowSockets` names them. A packet the program cannot parse far enough is dropped.

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    macros::xdp,
    programs::XdpContext,
};
use egress_common::{
    PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, ROW_BYPASS, ROW_NO_RULE, XDP_SCOPE,
    config_flags, hook, mode, reason, verdict,
};

use crate::{
    judge::{
        Dest, Judgement, Matched, Who, count, count_error, generation, lookup, protocol_allowed,
        report,
    },
    maps::CONFIG,
};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
/// IPv6 "no next header".
const IPPROTO_NONE: u8 = 59;
/// IPv6 extension headers walked before giving up: hop-by-hop, routing, destination options
/// and fragment, each at most once in a sane packet.
const MAX_EXT_HEADERS: usize = 4;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// `xdp` on a host-side veth.
///
/// # Minimum kernel version
///
/// 5.9 (XDP through a `bpf_link`, which the agent pins and swaps like the cgroup links).
#[xdp]
pub fn egress_xdp(ctx: XdpContext) -> u32 {
    match try_xdp(&ctx) {
        Ok(action) => action,
        Err(()) => {
            // Truncated headers or no config: fail closed.
            count_error();
            XDP_DROP
        }
    }
}

/// A pointer to a `T` at `offset` into the packet, if the packet is long enough.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*const T, ()> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return Err(());
    }
    Ok((start + offset) as *const T)
}

/// Reads a `T` at `offset`, unaligned.
#[inline(always)]
fn read<T: Copy>(ctx: &XdpContext, offset: usize) -> Result<T, ()> {
    let p = ptr_at::<T>(ctx, offset)?;
    // SAFETY: `ptr_at` checked the bounds against the packet's end.
    Ok(unsafe { core::ptr::read_unaligned(p) })
}

#[inline(always)]
fn read_be16(ctx: &XdpContext, offset: usize) -> Result<u16, ()> {
    read::<u16>(ctx, offset).map(u16::from_be)
}

fn try_xdp(ctx: &XdpContext) -> Result<u32, ()> {
    let mut off = ETH_HLEN;
    let mut ethertype = read_be16(ctx, 12)?;
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        ethertype = read_be16(ctx, ETH_HLEN + 2)?;
        off += 4;
    }
    match ethertype {
        ETH_P_IP => ipv4(ctx, off),
        ETH_P_IPV6 => ipv6(ctx, off),
        // ARP and the rest: not IP, nothing a rule speaks about.
        _ => Ok(XDP_PASS),
    }
}

fn ipv4(ctx: &XdpContext, off: usize) -> Result<u32, ()> {
    let ver_ihl: u8 = read(ctx, off)?;
    let ihl = usize::from(ver_ihl & 0x0f) * 4;
    if ihl < 20 {
        return Err(());
    }
    if read_be16(ctx, off + 6)? & 0x1fff != 0 {
        // A later fragment: no ports; its first fragment was judged.
        return Ok(XDP_PASS);
    }
    let proto: u8 = read(ctx, off + 9)?;
    let daddr: [u8; 4] = read(ctx, off + 16)?;
    let l4 = off + ihl;
    let Some(port) = l4_port(ctx, proto, l4, PROTO_ICMP)? else {
        return Ok(XDP_PASS);
    };
    judge(ctx, &Dest::v4(daddr, port, proto, hook::XDP))
}

fn ipv6(ctx: &XdpContext, off: usize) -> Result<u32, ()> {
    let mut next: u8 = read(ctx, off + 6)?;
    let daddr: [u32; 4] = read(ctx, off + 24)?;
    let mut l4 = off + 40;
    for _ in 0..MAX_EXT_HEADERS {
        match next {
            // Hop-by-hop, routing, destination options: length in 8-octet units, not
            // counting the first 8.
            0 | 43 | 60 => {
                // One read per header (see l4_port).
                let head: [u8; 2] = read(ctx, l4)?;
                next = head[0];
                l4 += (usize::from(head[1]) + 1) * 8;
            }
            // Fragment header: 8 octets; a later fragment has no ports.
            44 => {
                let head: [u8; 4] = read(ctx, l4)?;
                if u16::from_be_bytes([head[2], head[3]]) & 0xfff8 != 0 {
                    return Ok(XDP_PASS);
                }
                next = head[0];
                l4 += 8;
            }
            _ => break,
        }
    }
    if next == IPPROTO_NONE {
        return Ok(XDP_PASS);
    }
    // More extension headers than a sane packet has end up as "another protocol" below,
    // which no allowSockets entry names: dropped.
    let Some(port) = l4_port(ctx, next, l4, PROTO_ICMPV6)? else {
        return Ok(XDP_PASS);
    };
    judge(ctx, &Dest::v6(daddr, port, next, hook::XDP))
}

/// The destination port (network byte order) of a packet to judge, or `None` for one that
/// passes unjudged: a TCP segment that opens nothing, this family's ICMP, or a protocol
/// `allowSockets` names. Other protocols are judged with port 0 (no rule matches them).
#[inline(always)]
fn l4_port(ctx: &XdpContext, proto: u8, l4: usize, icmp: u8) -> Result<Option<u16>, ()> {
    if proto == PROTO_TCP {
        // One bounds check for everything read: the verifier does not carry a check at one
        // variable offset over to a load at another.
        let head: [u8; 14] = read(ctx, l4)?;
        let tcp_flags = head[13];
        if tcp_flags & TCP_SYN == 0 || tcp_flags & TCP_ACK != 0 {
            return Ok(None);
        }
        return Ok(Some(u16::from_ne_bytes([head[2], head[3]])));
    }
    if proto == PROTO_UDP {
        let head: [u8; 4] = read(ctx, l4)?;
        return Ok(Some(u16::from_ne_bytes([head[2], head[3]])));
    }
    if proto == icmp || protocol_allowed(u32::from(proto)) {
        return Ok(None);
    }
    Ok(Some(0))
}

fn judge(ctx: &XdpContext, dest: &Dest) -> Result<u32, ()> {
    let config = CONFIG.get(0).ok_or(())?;
    // A packet carries no cgroup: with scopes, the keys of every scope (their own copy);
    // without, scope 0 holds every rule.
    let scope = if config.flags & config_flags::SCOPED != 0 {
        XDP_SCOPE
    } else {
        0
    };
    let generation = generation(config);
    let matched = if dest.proto == PROTO_TCP || dest.proto == PROTO_UDP {
        lookup(
            dest,
            scope,
            config.flags & config_flags::DNS != 0,
            generation,
        )
    } else {
        None
    };
    let (verdict, row, action) = match matched {
        Some(Matched::Bypass) => (verdict::BYPASS, ROW_BYPASS, XDP_PASS),
        Some(Matched::Rule(row)) => (verdict::ALLOW, row, XDP_PASS),
        None if config.mode == mode::AUDIT => (verdict::WOULD_DENY, ROW_NO_RULE, XDP_PASS),
        None => (verdict::DENY, ROW_NO_RULE, XDP_DROP),
    };
    let judgement = Judgement {
        verdict,
        row,
        generation,
        reason: reason::RULES,
    };
    count(&judgement, hook::XDP);
    if verdict == verdict::DENY
        || verdict == verdict::WOULD_DENY
        || config.flags & config_flags::EVENTS_ALL != 0
    {
        let who = Who {
            pid_tgid: ctx.ingress_ifindex() as u64,
            cgroup_id: 0,
            comm: [0; 16],
        };
        report(dest, &judgement, &who);
    }
    Ok(action)
}
