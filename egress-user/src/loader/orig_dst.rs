//! The proxy's view of redirected connections: where each was going and which process made
//! it, as the kernel recorded it, keyed by the client end the proxy accepts.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Mutex,
};

use aya::maps::MapData;
use egress_common::{AF_INET, OrigDst, PeerKey};

/// Where redirected connections were going, keyed by the client end of the connection (the
/// peer address the proxy's `accept()` returns), as the sockops program files them.
pub struct OrigDstTable(pub(super) Mutex<aya::maps::HashMap<MapData, PeerKey, OrigDst>>);

/// What the kernel recorded for one redirected connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Redirect {
    /// The address the app connected to.
    pub dst: SocketAddr,
    /// The process that called `connect()` (pid and command), when the kernel recorded one.
    pub process: Option<(u32, String)>,
}

impl OrigDstTable {
    /// What was recorded for the connection whose client end is `peer` in the network
    /// namespace whose cookie is `netns` (the namespace of the listener that accepted it),
    /// taken out of the table (a later connection from the same address and port gets its own
    /// entry).
    pub fn take(&self, netns: u64, peer: SocketAddr) -> Option<Redirect> {
        let key = peer_key(netns, peer);
        let mut map = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let orig = map.get(&key, 0).ok()?;
        // Best effort: the LRU map evicts it anyway.
        let _ = map.remove(&key);
        Some(Redirect {
            dst: orig_to_socket_addr(&orig),
            process: orig_process(&orig),
        })
    }
}

/// The process the kernel recorded with a redirect; none for pid 0 (no process recorded).
fn orig_process(orig: &OrigDst) -> Option<(u32, String)> {
    (orig.pid != 0).then(|| {
        let len = orig
            .comm
            .iter()
            .position(|b| *b == 0)
            .unwrap_or(orig.comm.len());
        (
            orig.pid,
            String::from_utf8_lossy(&orig.comm[..len]).into_owned(),
        )
    })
}

/// The key the sockops program files a connection under: IPv4 (also a v4-mapped client) in
/// the first four bytes.
fn peer_key(netns: u64, peer: SocketAddr) -> PeerKey {
    let port = peer.port().to_be();
    match peer.ip().to_canonical() {
        IpAddr::V4(ip) => {
            let mut addr = [0; 16];
            addr[..4].copy_from_slice(&ip.octets());
            PeerKey {
                addr,
                port,
                family: AF_INET,
                _pad: 0,
                _pad2: 0,
                netns,
            }
        }
        IpAddr::V6(ip) => PeerKey {
            addr: ip.octets(),
            port,
            family: egress_common::AF_INET6,
            _pad: 0,
            _pad2: 0,
            netns,
        },
    }
}

fn orig_to_socket_addr(orig: &OrigDst) -> SocketAddr {
    let ip = if orig.family == AF_INET && orig.flags & egress_common::flags::NAT64 != 0 {
        // The app asked for 64:ff9b::a.b.c.d; it was judged as a.b.c.d.
        let [a, b, c, d] = [orig.addr[0], orig.addr[1], orig.addr[2], orig.addr[3]];
        IpAddr::V6(Ipv6Addr::new(
            0x64,
            0xff9b,
            0,
            0,
            0,
            0,
            u16::from_be_bytes([a, b]),
            u16::from_be_bytes([c, d]),
        ))
    } else if orig.family == AF_INET {
        IpAddr::V4(Ipv4Addr::new(
            orig.addr[0],
            orig.addr[1],
            orig.addr[2],
            orig.addr[3],
        ))
    } else {
        IpAddr::V6(Ipv6Addr::from(orig.addr))
    };
    SocketAddr::new(ip, u16::from_be(orig.port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_keys_match_what_sockops_files() {
        let k = peer_key(7, "127.0.0.1:40000".parse().unwrap());
        assert_eq!(k.netns, 7);
        assert_eq!(&k.addr[..4], &[127, 0, 0, 1]);
        assert_eq!(k.addr[4..], [0; 12]);
        assert_eq!(k.port.to_ne_bytes(), 40000u16.to_be_bytes());
        assert_eq!(k.family, AF_INET);
        // A v4-mapped peer is filed as IPv4, like sockops does for dual-stack sockets.
        assert_eq!(peer_key(7, "[::ffff:127.0.0.1]:40000".parse().unwrap()), k);
        // The same address and port in another pod's network namespace is another key.
        assert_ne!(peer_key(8, "127.0.0.1:40000".parse().unwrap()), k);
        let k6 = peer_key(7, "[::1]:5".parse().unwrap());
        assert_eq!(k6.family, egress_common::AF_INET6);
        assert_eq!(k6.addr[15], 1);
    }

    #[test]
    fn original_destinations_convert_back() {
        let mut addr = [0; 16];
        addr[..4].copy_from_slice(&[192, 0, 2, 1]);
        let v4 = OrigDst {
            addr,
            port: 80u16.to_be(),
            family: AF_INET,
            flags: 0,
            ..OrigDst::default()
        };
        assert_eq!(orig_to_socket_addr(&v4), "192.0.2.1:80".parse().unwrap());
        let v6 = OrigDst {
            addr: "2001:db8::1".parse::<Ipv6Addr>().unwrap().octets(),
            port: 443u16.to_be(),
            family: egress_common::AF_INET6,
            flags: 0,
            ..OrigDst::default()
        };
        assert_eq!(
            orig_to_socket_addr(&v6),
            "[2001:db8::1]:443".parse().unwrap()
        );
        let nat64 = OrigDst {
            addr: [192, 0, 2, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            port: 80u16.to_be(),
            family: AF_INET,
            flags: egress_common::flags::NAT64,
            ..OrigDst::default()
        };
        assert_eq!(
            orig_to_socket_addr(&nat64),
            "[64:ff9b::192.0.2.7]:80".parse().unwrap()
        );
    }
}
