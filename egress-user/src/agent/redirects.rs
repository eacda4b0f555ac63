//! The proxy asks where a redirected connection was going and which process made it; the
//! kernel's record of each redirect ([`OrigDstTable`]) answers. The agent wires the two
//! together here, so that neither the loader nor the proxy knows the other.

#![forbid(unsafe_code)]

use std::net::SocketAddr;

use crate::{
    loader::{OrigDstTable, Redirect},
    proxy::{OrigDst, Process},
};

impl OrigDst for OrigDstTable {
    fn lookup(&self, peer: SocketAddr) -> Option<SocketAddr> {
        self.take(peer).map(|r| r.dst)
    }

    fn lookup_with_process(&self, peer: SocketAddr) -> Option<(SocketAddr, Option<Process>)> {
        self.take(peer).map(|Redirect { dst, process }| {
            (dst, process.map(|(pid, comm)| Process { pid, comm }))
        })
    }
}
