//! The agent's mark on its proxy listeners (`PROXY_LISTEN`, socket-local storage). The connect
//! programs redirect a connection to the proxy only when the socket listening at the proxy's
//! address carries this mark, so a process that binds the proxy port itself (while the agent
//! is down, or before it starts) never receives a redirected connection: the kernel refuses
//! the connection and reports why (`egress_common::reason`).
//!
//! The mark lives on the socket, not on an address: it goes away when the listener is closed,
//! so a stale mark can never vouch for another process's socket bound to the same port later.

use std::{
    net::{SocketAddr, TcpListener, UdpSocket},
    os::fd::AsRawFd,
};

use aya::maps::{Map, MapData, SkStorage};
use egress_common::{ProxyMark, maps};

use super::{LoadError, PinDir, error::map_err};

/// A socket the agent marks: a proxy or DNS TCP listener, or a DNS listener's UDP socket.
pub(super) trait Listening: AsRawFd {
    fn local_addr(&self) -> std::io::Result<SocketAddr>;
}

impl Listening for TcpListener {
    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        TcpListener::local_addr(self)
    }
}

impl Listening for UdpSocket {
    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        UdpSocket::local_addr(self)
    }
}

/// Marks each of `sockets` as the agent's in the `PROXY_LISTEN` map `map`.
pub(super) fn mark<S: Listening>(map: &mut Map, sockets: &[&S]) -> Result<(), LoadError> {
    let mut storage: SkStorage<&mut MapData, ProxyMark> =
        SkStorage::try_from(map).map_err(map_err(maps::PROXY_LISTEN, "opening"))?;
    for socket in sockets {
        let value = ProxyMark {
            pid: std::process::id(),
            port: socket.local_addr().map_or(0, |a| u32::from(a.port())),
        };
        storage
            .insert(*socket, value, 0)
            .map_err(map_err(maps::PROXY_LISTEN, "marking a listener"))?;
    }
    Ok(())
}

/// Marks `socket` in the pinned `PROXY_LISTEN` map of `pins`: a proxy listener opened after the
/// generation in force was applied (a port that was taken at start-up and freed later), or a
/// DNS listener (queries to a resolver go to the agent's DNS listener only through a socket
/// marked so).
pub(super) fn mark_pinned(pins: &PinDir, socket: &impl Listening) -> Result<(), LoadError> {
    let data = MapData::from_pin(pins.map(maps::PROXY_LISTEN))
        .map_err(map_err(maps::PROXY_LISTEN, "opening the pinned"))?;
    let mut map = Map::SkStorage(data);
    mark(&mut map, &[socket])
}
