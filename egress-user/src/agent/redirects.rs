//! The proxy asks where a redirected connection was going and which process made it; the
//! kernel's record of each redirect ([`OrigDstTable`]) answers. The agent wires the two
//! together here, so that neither the loader nor the proxy knows the other.

#![forbid(unsafe_code)]

use std::{net::SocketAddr, sync::Arc};

use crate::{
    loader::{OrigDstTable, Redirect},
    proxy::{OrigDst, Process},
};

/// The kernel's records of the connections made in one network namespace: what a proxy
/// listener in that namespace asks (the same client address and port in two pods are two
/// connections).
pub struct InNetns {
    /// The table every namespace shares.
    pub table: Arc<OrigDstTable>,
    /// The namespace's cookie.
    pub netns: u64,
    /// The pod whose namespace it is (`namespace/name`); `None` for the agent's own.
    pub pod: Option<String>,
}

impl OrigDst for InNetns {
    fn lookup(&self, peer: SocketAddr) -> Option<SocketAddr> {
        self.table.take(self.netns, peer).map(|r| r.dst)
    }

    fn lookup_with_process(&self, peer: SocketAddr) -> Option<(SocketAddr, Option<Process>)> {
        self.table
            .take(self.netns, peer)
            .map(|Redirect { dst, process }| {
                let pod = self.pod.clone();
                (dst, process.map(|(pid, comm)| Process { pid, comm, pod }))
            })
    }
}
