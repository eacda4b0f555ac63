//! Kernel verdict events: decoding what the programs put in the `EVENTS` ring buffer, and
//! logging it with the rule's name.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use aya::maps::{MapData, RingBuf};
use egress_common::{AF_INET, Event, flags, hook, reason, verdict};

use crate::telemetry::LogLimit;

/// What the kernel decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// A rule allowed it.
    Allow,
    /// Denied: `connect()` failed with `EPERM`.
    Deny,
    /// Audit mode let it through; enforce mode would have denied it.
    WouldDeny,
    /// Destination in a bypass range.
    Bypass,
    /// Sent to the proxy, which judges the request (reported with `events: all` only).
    Redirect,
}

impl Verdict {
    fn from_raw(v: u8) -> Option<Self> {
        Some(match v {
            verdict::ALLOW => Self::Allow,
            verdict::DENY => Self::Deny,
            verdict::WOULD_DENY => Self::WouldDeny,
            verdict::BYPASS => Self::Bypass,
            verdict::REDIRECT => Self::Redirect,
            _ => return None,
        })
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
            Self::WouldDeny => "would-deny",
            Self::Bypass => "bypass",
            Self::Redirect => "redirect",
        })
    }
}

/// The hook that took a verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Hook {
    /// `cgroup/connect4`/`6`.
    Connect,
    /// `cgroup/sendmsg4`/`6`.
    Sendmsg,
    /// `cgroup/sock_create`.
    SockCreate,
    /// The XDP backstop.
    Xdp,
}

impl Hook {
    fn from_raw(h: u8) -> Option<Self> {
        Some(match h {
            hook::CONNECT => Self::Connect,
            hook::SENDMSG => Self::Sendmsg,
            hook::SOCK_CREATE => Self::SockCreate,
            hook::XDP => Self::Xdp,
            _ => return None,
        })
    }

    /// Every hook, in the order of `egress_common::hook`.
    pub const ALL: [Self; 4] = [Self::Connect, Self::Sendmsg, Self::SockCreate, Self::Xdp];
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Connect => "connect",
            Self::Sendmsg => "sendmsg",
            Self::SockCreate => "sock_create",
            Self::Xdp => "xdp",
        })
    }
}

/// How the application wrote a destination that was judged as IPv4.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// As it is shown.
    Direct,
    /// `::ffff:a.b.c.d` on an `AF_INET6` socket.
    V4Mapped,
    /// `64:ff9b::a.b.c.d` (NAT64).
    Nat64,
    /// `2002:AABB:CCDD::/48` (6to4).
    SixToFour,
}

impl fmt::Display for Via {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Direct => "",
            Self::V4Mapped => "v4-mapped",
            Self::Nat64 => "nat64",
            Self::SixToFour => "6to4",
        })
    }
}

/// Why a verdict was taken when the rules did not decide it (`egress_common::reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// The rules decided (or no rule matched).
    Rules,
    /// A connection for the proxy, refused because nothing listens on the proxy's port in the
    /// caller's network namespace (the agent is down, or has not opened it yet).
    ProxyAbsent,
    /// A connection for the proxy, refused because the socket listening on the proxy's port is
    /// not the agent's: another process holds the port.
    ProxyForeign,
}

impl Reason {
    fn from_raw(r: u8) -> Self {
        match r {
            reason::PROXY_ABSENT => Self::ProxyAbsent,
            reason::PROXY_FOREIGN => Self::ProxyForeign,
            // Unknown values come from a newer program: the verdict stands, the reason is
            // not ours to name.
            _ => Self::Rules,
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Rules => "",
            Self::ProxyAbsent => "proxy-absent",
            Self::ProxyForeign => "proxy-foreign",
        })
    }
}

/// An IP protocol number by name, as events show it.
pub fn protocol_name(proto: u16) -> String {
    match proto {
        1 => "icmp".to_owned(),
        6 => "tcp".to_owned(),
        17 => "udp".to_owned(),
        58 => "icmpv6".to_owned(),
        132 => "sctp".to_owned(),
        136 => "udplite".to_owned(),
        262 => "mptcp".to_owned(),
        other => format!("proto-{other}"),
    }
}

/// One decoded event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventRecord {
    /// The verdict.
    pub verdict: Verdict,
    /// The counter row it was booked on.
    pub row: u32,
    /// The rule's name (or `(no rule)`), as the agent knows the row.
    pub rule: String,
    /// Process id.
    pub pid: u32,
    /// Thread id.
    pub tid: u32,
    /// The thread's `comm`.
    pub comm: String,
    /// The caller's cgroup v2 id.
    pub cgroup_id: u64,
    /// Destination as judged (an IPv4-mapped, NAT64 or 6to4 destination shows as IPv4);
    /// unspecified for a socket creation.
    pub destination: SocketAddr,
    /// How the application wrote the destination.
    pub via: Via,
    /// The hook that took the verdict.
    pub hook: Hook,
    /// Why, when the rules did not decide it.
    pub reason: Reason,
    /// IP protocol number (for a socket creation, the socket's protocol).
    pub protocol: u16,
    /// A raw socket (socket creation verdicts).
    pub raw: bool,
    /// The interface the packet arrived on (XDP verdicts).
    pub ifindex: Option<u32>,
    /// The policy generation that judged it.
    pub generation: u32,
    /// `CLOCK_MONOTONIC` nanoseconds.
    pub ts_ns: u64,
}

/// Decodes one ring buffer record; `None` for a record of the wrong size or an unknown verdict.
/// `rule_name(generation, row)` names the row as that generation knew it: a row freed by a
/// later generation may since have been given to another rule.
pub fn decode(bytes: &[u8], rule_name: impl Fn(u32, u32) -> Option<String>) -> Option<EventRecord> {
    if bytes.len() < size_of::<Event>() {
        return None;
    }
    // SAFETY: the buffer holds at least size_of::<Event>() bytes, Event is Pod (any bit pattern
    // is valid), and read_unaligned makes no alignment assumption.
    let e: Event = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    let ip = if e.family == AF_INET {
        IpAddr::V4(Ipv4Addr::new(e.addr[0], e.addr[1], e.addr[2], e.addr[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(e.addr))
    };
    let comm_len = e.comm.iter().position(|b| *b == 0).unwrap_or(e.comm.len());
    let hook = Hook::from_raw(e.hook)?;
    let (port, protocol) = if hook == Hook::SockCreate {
        // No destination: the port field carries the full protocol number.
        (0, u16::from_be(e.port))
    } else {
        (u16::from_be(e.port), u16::from(e.proto))
    };
    let via = if e.flags & flags::V4_MAPPED != 0 {
        Via::V4Mapped
    } else if e.flags & flags::NAT64 != 0 {
        Via::Nat64
    } else if e.flags & flags::SIX_TO_FOUR != 0 {
        Via::SixToFour
    } else {
        Via::Direct
    };
    Some(EventRecord {
        verdict: Verdict::from_raw(e.verdict)?,
        row: e.row,
        rule: rule_name(e.generation, e.row)
            .unwrap_or_else(|| format!("row {} of generation {}", e.row, e.generation)),
        pid: e.pid,
        tid: e.tid,
        comm: String::from_utf8_lossy(&e.comm[..comm_len]).into_owned(),
        cgroup_id: e.cgroup_id,
        destination: SocketAddr::new(ip, port),
        via,
        hook,
        reason: Reason::from_raw(e.reason),
        protocol,
        raw: e.flags & flags::RAW != 0,
        ifindex: (hook == Hook::Xdp).then_some(e.tid),
        generation: e.generation,
        ts_ns: e.ts_ns,
    })
}

/// Reads every event now in the ring buffer.
pub fn drain(
    ring: &mut RingBuf<MapData>,
    rule_name: impl Fn(u32, u32) -> Option<String>,
) -> Vec<EventRecord> {
    let mut out = Vec::new();
    while let Some(item) = ring.next() {
        match decode(&item, &rule_name) {
            Some(record) => out.push(record),
            None => tracing::warn!(len = item.len(), "undecodable event from the kernel"),
        }
    }
    out
}

/// Logs an event: denials as warnings (as many as `limit` lets through, per cgroup and
/// destination), the rest as info.
pub fn log(e: &EventRecord, limit: &LogLimit) {
    macro_rules! emit {
        ($level:ident) => {
            tracing::$level!(
                verdict = %e.verdict,
                rule = %e.rule,
                pid = e.pid,
                comm = %e.comm,
                cgroup_id = e.cgroup_id,
                destination = %e.destination,
                protocol = %protocol_name(e.protocol),
                raw = e.raw,
                via = %e.via,
                reason = %e.reason,
                ifindex = e.ifindex.unwrap_or(0),
                generation = e.generation,
                "{} {}{}",
                e.hook,
                e.verdict,
                match e.reason {
                    Reason::Rules => "",
                    Reason::ProxyAbsent => ": nothing listens on the proxy port (agent down?)",
                    Reason::ProxyForeign =>
                        ": the proxy port is held by a process that is not the agent",
                }
            )
        };
    }
    match e.verdict {
        Verdict::Deny | Verdict::WouldDeny => {
            let key = format!(
                "cgroup {} -> {} {}",
                e.cgroup_id,
                protocol_name(e.protocol),
                e.destination
            );
            if limit.admit(&key) {
                emit!(warn);
            }
        }
        Verdict::Allow | Verdict::Bypass | Verdict::Redirect => emit!(info),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use egress_common::{AF_INET6, PROTO_TCP};

    fn raw(e: &Event) -> Vec<u8> {
        // SAFETY: Event is Pod; viewing it as bytes is sound.
        unsafe {
            std::slice::from_raw_parts(std::ptr::from_ref(e).cast::<u8>(), size_of::<Event>())
        }
        .to_vec()
    }

    fn event(family: u8, addr: [u8; 16], verdict: u8) -> Event {
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"curl");
        Event {
            ts_ns: 5,
            cgroup_id: 77,
            pid: 10,
            tid: 11,
            row: 0,
            generation: 3,
            verdict,
            family,
            proto: PROTO_TCP,
            flags: flags::V4_MAPPED,
            port: 443u16.to_be(),
            hook: 0,
            reason: 0,
            addr,
            comm,
        }
    }

    #[test]
    fn decodes_an_ipv4_deny() {
        let mut addr = [0; 16];
        addr[..4].copy_from_slice(&[192, 0, 2, 7]);
        let r = decode(&raw(&event(AF_INET, addr, verdict::DENY)), |g, _| {
            (g == 3).then(|| "(no rule)".into())
        })
        .unwrap();
        assert_eq!(r.verdict, Verdict::Deny);
        assert_eq!(r.destination, "192.0.2.7:443".parse().unwrap());
        assert_eq!(r.comm, "curl");
        assert_eq!(r.via, Via::V4Mapped);
        assert_eq!((r.hook, r.protocol, r.ifindex), (Hook::Connect, 6, None));
        assert_eq!((r.pid, r.tid, r.cgroup_id, r.generation), (10, 11, 77, 3));
        assert_eq!(r.rule, "(no rule)");
    }

    #[test]
    fn decodes_an_ipv6_would_deny() {
        let addr: Ipv6Addr = "2001:db8::9".parse().unwrap();
        let r = decode(
            &raw(&event(AF_INET6, addr.octets(), verdict::WOULD_DENY)),
            |_, _| None,
        )
        .unwrap();
        assert_eq!(r.verdict, Verdict::WouldDeny);
        assert_eq!(r.destination, "[2001:db8::9]:443".parse().unwrap());
        assert_eq!(r.rule, "row 0 of generation 3");
    }

    #[test]
    fn decodes_nat64_xdp_and_socket_creation_verdicts() {
        let mut e = event(
            AF_INET,
            [198, 51, 100, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            verdict::DENY,
        );
        e.flags = flags::NAT64;
        e.hook = hook::XDP;
        e.proto = egress_common::PROTO_UDP;
        let r = decode(&raw(&e), |_, _| None).unwrap();
        assert_eq!((r.hook, r.via, r.protocol), (Hook::Xdp, Via::Nat64, 17));
        assert_eq!(r.ifindex, Some(11), "the tid field carries the ifindex");
        assert_eq!(r.destination, "198.51.100.9:443".parse().unwrap());

        let mut e = event(AF_INET6, [0; 16], verdict::DENY);
        e.flags = flags::RAW;
        e.hook = hook::SOCK_CREATE;
        e.proto = 0;
        e.port = 262u16.to_be();
        let r = decode(&raw(&e), |_, _| None).unwrap();
        assert_eq!((r.hook, r.raw, r.protocol), (Hook::SockCreate, true, 262));
        assert_eq!(r.destination.port(), 0);
        assert_eq!(protocol_name(r.protocol), "mptcp");
    }

    #[test]
    fn rejects_short_records_and_unknown_verdicts() {
        assert!(decode(&[0; 8], |_, _| None).is_none());
        assert!(decode(&raw(&event(AF_INET, [0; 16], 99)), |_, _| None).is_none());
        let mut unknown_hook = event(AF_INET, [0; 16], verdict::DENY);
        unknown_hook.hook = 9;
        assert!(decode(&raw(&unknown_hook), |_, _| None).is_none());
    }
}
