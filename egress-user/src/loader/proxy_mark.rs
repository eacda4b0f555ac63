//! The agent's mark on its proxy listeners (`PROXY_LISTEN`, socket-local storage). The connect
//! programs redirect a connection to the proxy only when the socket listening at the proxy's
//! address carries this mark, so a process that binds the proxy port itself (while the agent
//! is down, or before it starts) never receives a redirected connection: the kernel refuses
//! the connection and reports why (`egress_common::reason`).
//!
//! The mark lives on the socket, not on an address: it goes away when the listener is closed,
//! so a stale mark can never vouch for another process's socket bound to the same port later.

use std::net::TcpListener;

use aya::maps::{Map, MapData, SkStorage};
use egress_common::{ProxyMark, maps};

use super::{LoadError, PinDir, error::map_err};

/// Marks each of `listeners` as the agent's in the `PROXY_LISTEN` map `map`.
pub(super) fn mark(map: &mut Map, listeners: &[&TcpListener]) -> Result<(), LoadError> {
    let mut storage: SkStorage<&mut MapData, ProxyMark> =
        SkStorage::try_from(map).map_err(map_err(maps::PROXY_LISTEN, "opening"))?;
    for listener in listeners {
        let value = ProxyMark {
            pid: std::process::id(),
            port: listener.local_addr().map_or(0, |a| u32::from(a.port())),
        };
        storage
            .insert(*listener, value, 0)
            .map_err(map_err(maps::PROXY_LISTEN, "marking a proxy listener"))?;
    }
    Ok(())
}

/// Marks a DNS listener `socket` in the pinned `PROXY_LISTEN` map of `pins`: queries to a
/// resolver go to the agent's DNS listener only through a socket marked so.
pub(super) fn mark_pinned_socket(
    pins: &PinDir,
    socket: &std::net::UdpSocket,
) -> Result<(), LoadError> {
    let data = MapData::from_pin(pins.map(maps::PROXY_LISTEN))
        .map_err(map_err(maps::PROXY_LISTEN, "opening the pinned"))?;
    let mut map = Map::SkStorage(data);
    let mut storage: SkStorage<&mut MapData, ProxyMark> =
        SkStorage::try_from(&mut map).map_err(map_err(maps::PROXY_LISTEN, "opening"))?;
    let value = ProxyMark {
        pid: std::process::id(),
        port: socket.local_addr().map_or(0, |a| u32::from(a.port())),
    };
    storage
        .insert(socket, value, 0)
        .map_err(map_err(maps::PROXY_LISTEN, "marking a DNS listener"))
}

/// Marks `listener` in the pinned `PROXY_LISTEN` map of `pins`: for a listener opened after the
/// generation in force was applied (a port that was taken at start-up and freed later).
pub(super) fn mark_pinned(pins: &PinDir, listener: &TcpListener) -> Result<(), LoadError> {
    let data = MapData::from_pin(pins.map(maps::PROXY_LISTEN))
        .map_err(map_err(maps::PROXY_LISTEN, "opening the pinned"))?;
    let mut map = Map::SkStorage(data);
    mark(&mut map, &[listener])
}
