//! The generation in force: its counters, row names, events, original destinations and XDP
//! interfaces, as the agent reads them between changes.

use std::{io, path::Path};

use aya::{
    Ebpf,
    maps::{MapData, PerCpuArray, RingBuf},
};
use egress_common::{RuleCounters, Stats, maps};

use super::{
    LoadError, OrigDstTable, PinDir, RowCount,
    counters::{hook_rows, sum_rows, sum_stats},
    error::map_err,
    proxy_mark, xdp,
};
use crate::compile::{self, RowTable};

/// The policy in force on one cgroup, and the handles to read its counters and events.
pub struct Enforcer {
    pub(super) pins: PinDir,
    // The current generation's object: its programs are behind the pinned links and its maps
    // hold the policy. Kept so that counters and the row table can be read.
    pub(super) ebpf: Ebpf,
    pub(super) rows: std::sync::Arc<RowTable>,
    pub(super) generation: u32,
    /// The policy's scopes (namespaces with rules of their own); scope id `i + 1` each.
    pub(super) scopes: Vec<String>,
    /// The resolvers whose queries go to the agent's DNS listeners (none without FQDN rules).
    pub(super) dns_slots: Vec<egress_common::DnsSlot>,
    /// What the policy in force puts in the kernel besides its rules.
    pub(super) shape: super::rules::Shape,
    /// One past the highest row the policy in force uses (`Config::row_limit`).
    pub(super) row_limit: u32,
    /// The rows `RULE_INFO` holds for the policy in force.
    pub(super) stored: compile::StoredRows,
    /// The IPv4 rule tries in the two slots of `RULESET_V4`.
    pub(super) v4: super::rules::Tries<egress_common::RuleKeyV4>,
    /// The IPv6 rule tries in the two slots of `RULESET_V6`.
    pub(super) v6: super::rules::Tries<egress_common::RuleKeyV6>,
    /// Whether programs that read the previous generation number may still be running.
    pub(super) readers: super::rules::Readers,
}

impl Enforcer {
    /// Marks a proxy listener opened after this generation was applied as the agent's, so that
    /// redirected connections may go to it (see [`super::Generation::open`]).
    ///
    /// # Errors
    /// The pinned `PROXY_LISTEN` map cannot be opened or written.
    pub fn mark_proxy_listener(&self, listener: &std::net::TcpListener) -> Result<(), LoadError> {
        proxy_mark::mark_pinned(&self.pins, listener)
    }

    /// Puts the node's pods (each pod's cgroup id and namespace) in their scopes in the
    /// generation in force: the pods of a namespace with rules of its own get that namespace's
    /// rules from their next `connect()`; the others (and pods gone) the node-wide ones only.
    ///
    /// # Errors
    /// The `SCOPES` map cannot be written (more pods than it holds).
    pub fn set_pods(&mut self, pods: &[(u64, String)]) -> Result<(), LoadError> {
        let entries = crate::compile::scoped_cgroups(&self.scopes, pods);
        super::fill::fill_scopes(&mut self.ebpf, &entries)
    }

    /// Marks a DNS listener socket as the agent's, so that queries to a resolver may go to it.
    ///
    /// # Errors
    /// The pinned `PROXY_LISTEN` map cannot be opened or written.
    pub fn mark_dns_socket(&self, socket: &std::net::UdpSocket) -> Result<(), LoadError> {
        proxy_mark::mark_pinned(&self.pins, socket)
    }

    /// The DNS listeners this generation sends queries to: (resolver, listener address).
    pub fn dns_listeners(&self) -> Vec<(std::net::SocketAddr, std::net::SocketAddr)> {
        self.dns_slots
            .iter()
            .map(|slot| {
                let (resolver, listener): (std::net::IpAddr, std::net::IpAddr) =
                    if slot.family == egress_common::AF_INET {
                        let a = slot.addr;
                        (
                            std::net::Ipv4Addr::new(a[0], a[1], a[2], a[3]).into(),
                            std::net::Ipv4Addr::LOCALHOST.into(),
                        )
                    } else {
                        (
                            std::net::Ipv6Addr::from(slot.addr).into(),
                            std::net::Ipv6Addr::LOCALHOST.into(),
                        )
                    };
                (
                    std::net::SocketAddr::new(resolver, u16::from_be(slot.port)),
                    std::net::SocketAddr::new(listener, u16::from_be(slot.listen_port)),
                )
            })
            .collect()
    }

    /// The policy's scopes: namespaces with rules of their own, sorted (scope id `i + 1`).
    pub fn scopes(&self) -> &[String] {
        &self.scopes
    }

    /// The generation in force.
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// The pin directory.
    pub fn pin_dir(&self) -> &Path {
        self.pins.path()
    }

    /// Which rule owns each row (shared: the agent keeps the tables of recent generations to
    /// name their events).
    pub fn rows(&self) -> &std::sync::Arc<RowTable> {
        &self.rows
    }

    /// The name of a row: a rule name, or the reserved rows' names.
    pub fn row_name(&self, row: u32) -> Option<&str> {
        compile::reserved_row_name(row).or_else(|| self.rows.name(row))
    }

    /// The reserved rows and every rule row of this generation, with their names.
    pub fn row_names(&self) -> Vec<(u32, String)> {
        row_names(&self.rows)
    }

    /// Counters of the reserved rows and every rule of the policy, summed over CPUs.
    pub fn counters(&self) -> Result<Vec<RowCount>, LoadError> {
        let counters: PerCpuArray<_, RuleCounters> =
            PerCpuArray::try_from(self.ebpf.map(maps::COUNTERS).expect("object has COUNTERS"))
                .map_err(map_err(maps::COUNTERS, "opening"))?;
        sum_rows(&counters, &self.row_names())
    }

    /// Verdicts by hook (`connect`, `sendmsg`, `sock_create`, `xdp`), summed over CPUs.
    pub fn hooks(&self) -> Result<Vec<RowCount>, LoadError> {
        let hooks: PerCpuArray<_, RuleCounters> =
            PerCpuArray::try_from(self.ebpf.map(maps::HOOKS).expect("object has HOOKS"))
                .map_err(map_err(maps::HOOKS, "opening"))?;
        sum_rows(&hooks, &hook_rows())
    }

    /// Brings the XDP backstop in line with the interfaces `patterns` name now: attaches this
    /// generation's program to new ones (a pod's veth that appeared since), detaches it from
    /// those that no longer match, and forgets links whose interface is gone. Returns whether
    /// anything changed. Exact names that do not exist are left out, not an error.
    pub fn sync_xdp(&mut self, patterns: &[String]) -> Result<bool, LoadError> {
        let wanted = xdp::resolve(patterns, false)?;
        let existing = xdp::pinned(&self.pins)?;
        let mut have: Vec<(String, u32)> = existing
            .iter()
            .map(|l| (l.iface.clone(), l.ifindex))
            .collect();
        have.sort();
        if have == wanted {
            return Ok(false);
        }
        xdp::apply(&mut self.ebpf, &self.pins, &wanted, existing)?;
        Ok(true)
    }

    /// Interfaces with the XDP backstop attached (from the pins).
    pub fn xdp_ifaces(&self) -> Vec<String> {
        xdp::pinned(&self.pins)
            .map(|links| {
                links
                    .into_iter()
                    .filter(|l| l.ifindex != 0)
                    .map(|l| l.iface)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The programs' own health counters, summed over CPUs.
    pub fn stats(&self) -> Result<Stats, LoadError> {
        let stats: PerCpuArray<_, Stats> =
            PerCpuArray::try_from(self.ebpf.map(maps::STATS).expect("object has STATS"))
                .map_err(map_err(maps::STATS, "opening"))?;
        sum_stats(&stats)
    }

    /// Takes the table of redirected connections' original destinations, for the proxy
    /// (once; later calls return `None`).
    pub fn take_orig_dst(&mut self) -> Option<OrigDstTable> {
        let map = self.ebpf.take_map(maps::ORIG_BY_PEER)?;
        let map = aya::maps::HashMap::try_from(map).ok()?;
        Some(OrigDstTable(std::sync::Mutex::new(map)))
    }

    /// Takes the event ring buffer (once; later calls return `None`).
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.ebpf
            .take_map(maps::EVENTS)
            .and_then(|m| RingBuf::try_from(m).ok())
    }

    /// Takes the event ring buffer, registered with the current tokio runtime so that
    /// `readable_mut().await` wakes when the kernel submits an event.
    pub fn take_async_events(&mut self) -> io::Result<tokio::io::unix::AsyncFd<RingBuf<MapData>>> {
        let ring = self
            .take_events()
            .ok_or_else(|| io::Error::other("the event ring buffer was already taken"))?;
        // SAFETY: the RingBuf owns its map fd (MapData holds an OwnedFd) and returns the same
        // fd from as_raw_fd() until it is dropped, which happens only when the AsyncFd is.
        unsafe { tokio::io::unix::AsyncFd::register(ring) }.map_err(|e| e.into_parts().1)
    }
}

/// The reserved rows and every rule row of `table`, with their names, sorted by row within
/// each.
pub fn row_names(table: &RowTable) -> Vec<(u32, String)> {
    let reserved = compile::RESERVED_ROWS.map(|(row, name)| (row, name.to_owned()));
    let rules = table.rows().into_iter().map(|(r, n)| (r, n.to_owned()));
    reserved.into_iter().chain(rules).collect()
}
