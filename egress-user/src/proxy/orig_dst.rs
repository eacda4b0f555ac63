//! Where a redirected connection was going. The kernel side records the destination an app's
//! `connect()` asked for before it rewrites the connection to the proxy; the proxy asks for it
//! by the accepted socket's peer address (the app's end of the connection).

use std::net::SocketAddr;

/// The original destination of a redirected connection.
pub trait OrigDst: Send + Sync + 'static {
    /// The destination the app asked for, for a redirected connection whose client end
    /// (the accepted socket's peer address) is `peer`. None: not a redirected connection.
    fn lookup(&self, peer: SocketAddr) -> Option<SocketAddr>;

    /// [`OrigDst::lookup`], with the process that made the connection when the lookup knows
    /// it (the kernel's table does; a plain function does not).
    fn lookup_with_process(&self, peer: SocketAddr) -> Option<(SocketAddr, Option<Process>)> {
        self.lookup(peer).map(|dst| (dst, None))
    }
}

/// The process that made a redirected connection, as the kernel saw it at `connect()`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Process {
    /// Its pid (thread group id).
    pub pid: u32,
    /// Its command name.
    pub comm: String,
    /// Its pod (`namespace/name`), when the connection came in through a pod's listener.
    pub pod: Option<String>,
}

/// Any `Fn(peer) -> Option<destination>` is a lookup (handy in tests and for fixed setups).
impl<F> OrigDst for F
where
    F: Fn(SocketAddr) -> Option<SocketAddr> + Send + Sync + 'static,
{
    fn lookup(&self, peer: SocketAddr) -> Option<SocketAddr> {
        self(peer)
    }
}
