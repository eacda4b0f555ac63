//! The proxy's listeners: `127.0.0.1` and `[::1]` on the proxy port, where the kernel sends
//! redirected connections.
//!
//! A listener that cannot be bound (another process holds the port: a squatter in the managed
//! cgroup, or a leftover of something else) does not stop the agent: the kernel programs
//! redirect only to a listener the agent marked (`loader::Generation::open`), so
//! until the agent has its own listener there, the connections meant for the proxy are refused
//! with a `proxy-absent` or `proxy-foreign` event and never reach the other process. The agent
//! keeps enforcing everything else, reports itself not ready, names the process that holds the
//! port when it can, and tries again every second.
//!
//! A host without IPv6 on loopback (`[::1]` cannot be assigned) has no IPv6 listener to wait
//! for: its redirected IPv6 connections are refused in the kernel (`proxy-absent`).

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener},
};

/// The proxy's listeners, bound and missing.
#[derive(Debug)]
pub struct ProxyListeners {
    /// Listeners bound so far, in the order of [`ProxyListeners::addresses`]; the agent
    /// serves each once, and keeps a duplicate of its descriptor here to mark it again in
    /// every new generation.
    bound: Vec<TcpListener>,
    /// Addresses still to bind, with the error of the last attempt.
    missing: Vec<Missing>,
}

/// An address the agent wants to listen on and could not.
#[derive(Debug)]
pub struct Missing {
    /// The address.
    pub address: SocketAddr,
    /// Why the last attempt failed, with the process holding the port when it was found.
    pub error: String,
}

impl ProxyListeners {
    /// The addresses the proxy listens on for `port`.
    pub fn addresses(port: u16) -> [SocketAddr; 2] {
        [
            SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            SocketAddr::from((Ipv6Addr::LOCALHOST, port)),
        ]
    }

    /// Binds what can be bound now. Never fails: what could not be bound is
    /// [`ProxyListeners::missing`] and is tried again by [`ProxyListeners::retry`].
    pub fn bind(port: u16) -> Self {
        let mut listeners = Self {
            bound: Vec::new(),
            missing: Vec::new(),
        };
        for address in Self::addresses(port) {
            match listen(address) {
                Ok(listener) => listeners.bound.push(listener),
                Err(e) if address.is_ipv6() && no_ipv6(&e) => {
                    tracing::warn!(
                        %address,
                        error = %e,
                        "proxy: this host has no IPv6 loopback; redirected IPv6 connections are refused"
                    );
                }
                Err(e) => {
                    let error = describe(address, &e);
                    tracing::error!(%address, %error, "proxy: cannot listen; connections for the proxy on this address are refused until it can (retrying every second)");
                    listeners.missing.push(Missing { address, error });
                }
            }
        }
        listeners
    }

    /// Tries the missing addresses again; returns the listeners bound by this call (the
    /// caller marks and serves them).
    pub fn retry(&mut self) -> Vec<TcpListener> {
        let mut new = Vec::new();
        let mut still = Vec::new();
        for missing in std::mem::take(&mut self.missing) {
            match listen(missing.address) {
                Ok(listener) => {
                    tracing::info!(address = %missing.address, "proxy: listening now");
                    new.push(listener);
                }
                Err(e) => {
                    let error = describe(missing.address, &e);
                    if error != missing.error {
                        tracing::error!(address = %missing.address, %error, "proxy: still cannot listen");
                    }
                    still.push(Missing {
                        address: missing.address,
                        error,
                    });
                }
            }
        }
        self.missing = still;
        for listener in &new {
            match listener.try_clone() {
                Ok(dup) => self.bound.push(dup),
                Err(e) => tracing::warn!(error = %e, "proxy: keeping a listener's descriptor"),
            }
        }
        new
    }

    /// Listeners to serve: duplicates of every bound one (the originals stay here).
    ///
    /// # Errors
    /// A descriptor cannot be duplicated.
    pub fn to_serve(&self) -> io::Result<Vec<TcpListener>> {
        self.bound.iter().map(TcpListener::try_clone).collect()
    }

    /// The bound listeners, to mark in a new generation.
    pub fn bound(&self) -> Vec<&TcpListener> {
        self.bound.iter().collect()
    }

    /// The addresses listened on.
    pub fn listening(&self) -> Vec<SocketAddr> {
        self.bound
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// What is still missing.
    pub fn missing(&self) -> &[Missing] {
        &self.missing
    }

    /// Whether every listener the proxy needs is there.
    pub fn complete(&self) -> bool {
        self.missing.is_empty()
    }
}

/// Binds and listens on `address`, non-blocking. The standard library sets `SO_REUSEADDR`
/// before `bind()`, so connections left in TIME-WAIT by an earlier agent do not hold the port;
/// it never sets `SO_REUSEPORT`, so no other socket can share the port with the agent's
/// listener (which the kernel's check of the listener relies on).
pub(super) fn listen(address: SocketAddr) -> io::Result<TcpListener> {
    let listener = TcpListener::bind(address)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Whether `e` says that the host has no IPv6 loopback (IPv6 disabled or not built).
pub(super) fn no_ipv6(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EADDRNOTAVAIL | libc::EAFNOSUPPORT | libc::EPROTONOSUPPORT)
    )
}

/// The error, and for `EADDRINUSE` the processes that hold the port, when `/proc` says.
fn describe(address: SocketAddr, e: &io::Error) -> String {
    if e.raw_os_error() != Some(libc::EADDRINUSE) {
        return e.to_string();
    }
    let holders = holders(address);
    if holders.is_empty() {
        format!(
            "{e} (no listening socket of another process was found: a socket bound without listening, or one in another state)"
        )
    } else {
        format!("{e}; held by {}", holders.join(", "))
    }
}

/// The processes (`pid N (comm)`) with a TCP socket on `address` (or on the wildcard address
/// of its port) in this network namespace, read from `/proc/net/tcp{,6}` and the processes'
/// descriptors.
fn holders(address: SocketAddr) -> Vec<String> {
    let inodes: Vec<u64> = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .flat_map(|table| socket_inodes(&table, address))
        .collect();
    if inodes.is_empty() {
        return Vec::new();
    }
    let own = std::process::id();
    let mut found = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == own {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|target| {
                target
                    .to_str()
                    .and_then(|t| t.strip_prefix("socket:["))
                    .and_then(|t| t.strip_suffix(']'))
                    .and_then(|t| t.parse::<u64>().ok())
                    .is_some_and(|inode| inodes.contains(&inode))
            })
        });
        if holds {
            let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
            found.push(format!("pid {pid} ({})", comm.trim()));
        }
    }
    found
}

/// Inodes of the sockets in a `/proc/net/tcp` or `tcp6` table bound where they conflict with
/// `address`: its port, on its IP address, the wildcard address, or (in `tcp6`) the
/// IPv4-mapped form of either.
fn socket_inodes(table: &str, address: SocketAddr) -> Vec<u64> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            let (ip, port) = fields.get(1)?.split_once(':')?;
            let port = u16::from_str_radix(port, 16).ok()?;
            let ip = proc_ip(ip)?;
            let inode = fields.get(9)?.parse::<u64>().ok()?;
            let ip = match ip {
                IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
                v4 => v4,
            };
            let conflicts = ip == address.ip()
                || ip.is_unspecified() && ip.is_ipv4() == address.is_ipv4()
                || ip == IpAddr::V6(Ipv6Addr::UNSPECIFIED);
            (port == address.port() && inode != 0 && conflicts).then_some(inode)
        })
        .collect()
}

/// An address as `/proc/net/tcp{,6}` prints it: 32-bit words in host byte order, in hex.
fn proc_ip(hex: &str) -> Option<IpAddr> {
    let word = |i: usize| -> Option<[u8; 4]> {
        Some(
            u32::from_str_radix(hex.get(i * 8..i * 8 + 8)?, 16)
                .ok()?
                .to_ne_bytes(),
        )
    };
    match hex.len() {
        8 => Some(IpAddr::V4(Ipv4Addr::from(word(0)?))),
        32 => {
            let mut bytes = [0u8; 16];
            for i in 0..4 {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            Some(IpAddr::V6(Ipv6Addr::from(bytes)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_inodes_of_a_port_in_proc_net_tcp() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:3A99 00000000:0000 0A 00000000:00000000 00:00000000 00000000 65534        0 4242 1 0000000000000000 100 0 0 10 0
   1: 0100007F:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 77 1 0000000000000000 100 0 0 10 0
   2: 0100007F:3A99 0100007F:D431 06 00000000:00000000 03:00001770 00000000     0        0 0 3 0000000000000000
";
        // 0x3A99 = 15001; the TIME-WAIT entry (inode 0) belongs to no process.
        let v4 = |port| SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        assert_eq!(socket_inodes(table, v4(15001)), vec![4242]);
        assert_eq!(socket_inodes(table, v4(80)), vec![77]);
        assert!(socket_inodes(table, v4(443)).is_empty());
        // 127.0.0.1 does not conflict with [::1].
        assert!(socket_inodes(table, SocketAddr::from((Ipv6Addr::LOCALHOST, 15001))).is_empty());
        let table6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:3A99 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000 65534        0 5151 1 0000000000000000 100 0 0 10 0
   1: 00000000000000000000000000000000:0050 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 6161 1 0000000000000000 100 0 0 10 0
";
        // [::1]:15001, and a dual-stack wildcard on :80 that takes 127.0.0.1:80 as well.
        assert_eq!(
            socket_inodes(table6, SocketAddr::from((Ipv6Addr::LOCALHOST, 15001))),
            vec![5151]
        );
        assert!(socket_inodes(table6, v4(15001)).is_empty());
        assert_eq!(socket_inodes(table6, v4(80)), vec![6161]);
    }

    #[test]
    fn a_port_held_by_this_process_is_missing_and_comes_back_when_freed() {
        // Another socket of this process takes a free port first, as a squatter would.
        let squatter = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        let port = squatter.local_addr().expect("addr").port();
        let mut listeners = ProxyListeners::bind(port);
        assert!(!listeners.complete());
        assert_eq!(
            listeners.missing()[0].address,
            SocketAddr::from((Ipv4Addr::LOCALHOST, port))
        );
        assert!(
            listeners.missing()[0].error.contains("in use"),
            "{:?}",
            listeners.missing()
        );
        assert!(listeners.retry().is_empty());
        drop(squatter);
        let new = listeners.retry();
        assert_eq!(new.len(), 1);
        assert!(listeners.complete());
        assert!(
            listeners
                .listening()
                .contains(&SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
        );
    }
}
