//! The DNS path of FQDN rules: the agent's DNS listeners, one per resolver of the policy, on
//! `127.0.0.1` or `[::1]` port [`DNS_LISTEN_PORT`](crate::policy::DNS_LISTEN_PORT)` + i`, UDP
//! and TCP.
//!
//! When the policy has FQDN rules, the kernel sends a workload's query to a resolver (a UDP
//! datagram, or a TCP connection to port 53) to the agent's listener for that resolver (only one the agent marked: see
//! `loader::Enforcer::mark_dns_socket`), and shows the answer as the resolver's
//! (`cgroup/recvmsg4`/`6`). For each query the agent:
//!
//! 1. asks the resolver the workload asked, from its own (exempt) socket;
//! 2. reads the answer: the question name, its CNAME chain, the addresses at its end
//!    ([`crate::dns::message::parse_answer`]);
//! 3. for every FQDN rule of the workload's scope that matches a name of the chain, allows
//!    each address on the rule's ports for the asking scope, until the answer's TTL (at least
//!    [`MIN_LEARNED_TTL`](crate::policy::MIN_LEARNED_TTL)) runs out
//!    ([`crate::loader::learned`]);
//! 4. only then sends the answer to the workload. If an address cannot be allowed (a map is
//!    full), the workload gets SERVFAIL instead: it never holds an address the kernel would
//!    refuse because the agent failed.
//!
//! While no marked listener is there (the agent is down or restarting, or has not opened it
//! yet), queries go to the resolver directly, as without FQDN rules: DNS keeps working, the
//! addresses already learned stay allowed (the maps are pinned), and only addresses learned
//! from no answer are refused until the agent is back.
//!
//! This serves the agent's own network namespace (host processes, and the pods on the host's
//! network), whose queries are learned for scope 0: the node-wide FQDN rules.

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError},
    time::Duration,
};

use tokio::net::UdpSocket;

use crate::{
    compile::stable_scope_id,
    dns::message::{self, Answer, Query},
    loader::{
        Enforcer, LoadError, PinDir,
        learned::{InForce, LearnedMaps, Swept},
    },
    netns::Netns,
    policy::{ALIAS_ADDRESS, ALIAS_TTL},
};

/// How long the agent waits for a resolver's answer: glibc's default timeout, after which
/// the workload has given up on this try anyway.
const RESOLVER_TIMEOUT: Duration = Duration::from_secs(5);

/// The largest DNS message over UDP (with EDNS).
const MAX_MESSAGE: usize = 65_535;

/// How long a TCP query connection may stay idle between queries (RFC 7766 suggests
/// seconds; stubs open one per query anyway).
const TCP_IDLE: Duration = Duration::from_secs(10);

/// Where a query came from: the scope its answers are learned for, and the network
/// namespace the agent asks the resolver from.
#[derive(Clone)]
pub struct Asker {
    /// The pin directory of the maps to learn into.
    pub pin_dir: PathBuf,
    /// The asking workloads' namespace (a pod's), or `None` for the agent's own network
    /// namespace (scope 0).
    pub namespace: Option<String>,
    /// A pod's network namespace: the listeners are bound there, and the resolver is asked
    /// from there (with the pod's address, under the CNI's policy for the pod, as its proxied
    /// requests are). `None`: the agent's own.
    pub netns: Option<Arc<Netns>>,
}

impl Asker {
    /// Runs `f` (which makes a socket) in the asker's network namespace.
    fn in_netns<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        match &self.netns {
            None => f(),
            Some(ns) => ns.run(f)?,
        }
    }

    /// As [`Asker::in_netns`], from async code.
    async fn in_netns_async<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        match &self.netns {
            None => f(),
            Some(ns) => ns.run_async(f).await?,
        }
    }
}

/// The learned-address maps of a pin directory, opened once and shared by the listeners.
#[derive(Default)]
struct Maps(Mutex<Option<LearnedMaps>>);

/// The agent's DNS listeners in one network namespace.
#[derive(Default)]
pub struct DnsListeners {
    /// By listener address: the resolver it is for, and its sockets, bound and marked, served
    /// once the agent's runtime runs.
    bound: HashMap<SocketAddr, Listener>,
    maps: Arc<Maps>,
    /// The namespace of the workloads served (a pod's), and the pod's network namespace;
    /// `None` for the agent's own.
    namespace: Option<String>,
    netns: Option<Arc<Netns>>,
}

/// One resolver's listener: the tasks serving its UDP socket and TCP listener on the same
/// address (a stub resolver asks again over TCP when the UDP answer was cut), which own the
/// sockets: aborting them closes the listener and with it the agent's mark.
struct Listener {
    resolver: SocketAddr,
    tasks: Vec<tokio::task::AbortHandle>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl DnsListeners {
    /// The listeners of a pod of `namespace`, in its network namespace.
    pub fn in_pod(namespace: String, netns: Arc<Netns>) -> Self {
        Self {
            namespace: Some(namespace),
            netns: Some(netns),
            ..Self::default()
        }
    }

    fn asker(&self, pin_dir: &Path) -> Asker {
        Asker {
            pin_dir: pin_dir.to_owned(),
            namespace: self.namespace.clone(),
            netns: self.netns.clone(),
        }
    }

    /// Brings the listeners of the namespace in line with the generation in force, on the
    /// current runtime: binds the UDP and TCP listener of each of its resolvers, marks them as
    /// the agent's and serves them, in that order, and closes those of resolvers it no longer
    /// has. A listener is marked only once it is served: until then the kernel sends its
    /// resolver's queries to the resolver directly, never into a socket nobody reads. One that
    /// cannot be bound or marked is tried again at the next call (meanwhile its resolver's
    /// queries go to it directly and teach nothing).
    pub fn sync(&mut self, enforcer: &Enforcer) {
        let wanted = enforcer.dns_listeners();
        self.bound.retain(|address, listener| {
            wanted
                .iter()
                .any(|(resolver, at)| at == address && *resolver == listener.resolver)
        });
        let asker = self.asker(enforcer.pin_dir());
        for (resolver, address) in wanted {
            if self.bound.contains_key(&address) {
                continue;
            }
            let (udp, tcp) = match asker.in_netns(move || bind(address)) {
                Ok(sockets) => sockets,
                Err(e) => {
                    tracing::warn!(namespace = ?self.namespace, %address, %resolver, error = %e, "dns: cannot listen; queries to this resolver go to it directly and teach the kernel nothing (retrying every second)");
                    continue;
                }
            };
            let served = (|| {
                let maps = &self.maps;
                let u = serve_udp(udp.try_clone()?, resolver, asker.clone(), maps.clone())?;
                match serve_tcp(tcp.try_clone()?, resolver, asker.clone(), maps.clone()) {
                    Ok(t) => Ok(vec![u, t]),
                    Err(e) => {
                        u.abort();
                        Err(e)
                    }
                }
            })();
            let tasks = match served {
                Ok(tasks) => tasks,
                Err(e) => {
                    tracing::error!(%address, error = %e, "dns: serving a listener");
                    continue;
                }
            };
            // Dropped (its tasks aborted, the sockets closed) if it cannot be marked.
            let listener = Listener { resolver, tasks };
            // Served first, marked second: the first redirected query finds a reader.
            let marked = enforcer
                .mark_dns_socket(&udp)
                .and_then(|()| enforcer.mark_proxy_listener(&tcp));
            if let Err(e) = marked {
                tracing::error!(namespace = ?self.namespace, %address, error = %e, "dns: marking a listener; its resolver's queries go to it directly (retrying every second)");
                continue;
            }
            tracing::info!(namespace = ?self.namespace, %address, %resolver, "dns: listening for the queries to a resolver");
            self.bound.insert(address, listener);
        }
    }

    /// The listener addresses served.
    pub fn listening(&self) -> Vec<SocketAddr> {
        let mut addresses: Vec<SocketAddr> = self.bound.keys().copied().collect();
        addresses.sort();
        addresses
    }

    /// Removes expired learned addresses (and any the policy in force no longer allows).
    ///
    /// # Errors
    /// The maps cannot be opened or an entry cannot be removed.
    pub fn sweep(&self, pin_dir: &Path) -> Result<Swept, LoadError> {
        let in_force = InForce::of(pin_dir);
        let names = in_force.lock();
        let mut maps = self.maps.0.lock().unwrap_or_else(|e| e.into_inner());
        let maps = open_maps(&mut maps, pin_dir)?;
        maps.sweep(&names, true)
    }
}

/// Binds a DNS listener's UDP socket and TCP listener, non-blocking. The UDP socket gets
/// neither `SO_REUSEADDR` nor `SO_REUSEPORT`, the TCP listener only the standard library's
/// `SO_REUSEADDR` (as the proxy's): no other socket can share their address, which the
/// kernel's check of the listener relies on.
fn bind(address: SocketAddr) -> io::Result<(std::net::UdpSocket, std::net::TcpListener)> {
    let udp = std::net::UdpSocket::bind(address)?;
    udp.set_nonblocking(true)?;
    let tcp = super::listeners::listen(address)?;
    Ok((udp, tcp))
}

/// Serves a listener's UDP socket on the current runtime.
fn serve_udp(
    socket: std::net::UdpSocket,
    resolver: SocketAddr,
    asker: Asker,
    maps: Arc<Maps>,
) -> io::Result<tokio::task::AbortHandle> {
    let socket = Arc::new(UdpSocket::from_std(socket)?);
    let task = tokio::spawn(async move {
        let mut buf = vec![0u8; MAX_MESSAGE];
        loop {
            let (len, peer) = match socket.recv_from(&mut buf).await {
                Ok(got) => got,
                Err(e) => {
                    tracing::warn!(error = %e, "dns: receiving a query");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let query = buf[..len].to_vec();
            let (socket, asker, maps) = (socket.clone(), asker.clone(), maps.clone());
            tokio::spawn(async move {
                if let Some(reply) = answer(&query, resolver, Transport::Udp, &asker, &maps).await
                    && let Err(e) = socket.send_to(&reply, peer).await
                {
                    tracing::debug!(%peer, error = %e, "dns: sending an answer");
                }
            });
        }
    });
    Ok(task.abort_handle())
}

/// Serves a listener's TCP side on the current runtime: DNS over TCP (RFC 7766), each message
/// behind its two-byte length, any number of queries per connection, answered in order.
fn serve_tcp(
    listener: std::net::TcpListener,
    resolver: SocketAddr,
    asker: Asker,
    maps: Arc<Maps>,
) -> io::Result<tokio::task::AbortHandle> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let task = tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(got) => got,
                Err(e) => {
                    tracing::warn!(error = %e, "dns: accepting a TCP query connection");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let (asker, maps) = (asker.clone(), maps.clone());
            tokio::spawn(async move {
                if let Err(e) = serve_tcp_connection(stream, resolver, &asker, &maps).await {
                    tracing::debug!(%peer, error = %e, "dns: a TCP query connection ended");
                }
            });
        }
    });
    Ok(task.abort_handle())
}

async fn serve_tcp_connection(
    mut stream: tokio::net::TcpStream,
    resolver: SocketAddr,
    asker: &Asker,
    maps: &Maps,
) -> io::Result<()> {
    loop {
        let query = match read_framed(&mut stream).await {
            Ok(query) => query,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        };
        let Some(reply) = answer(&query, resolver, Transport::Tcp, asker, maps).await else {
            // Nothing to answer with: the stub sees the connection close and tries again.
            return Ok(());
        };
        write_framed(&mut stream, &reply).await?;
    }
}

/// One DNS message over TCP: its two-byte length, then the message.
async fn read_framed(stream: &mut tokio::net::TcpStream) -> io::Result<Vec<u8>> {
    use tokio::io::AsyncReadExt as _;
    let len = tokio::time::timeout(TCP_IDLE, stream.read_u16())
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "idle"))??;
    let mut message = vec![0u8; usize::from(len)];
    tokio::time::timeout(RESOLVER_TIMEOUT, stream.read_exact(&mut message))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "a message cut short"))??;
    Ok(message)
}

async fn write_framed(stream: &mut tokio::net::TcpStream, message: &[u8]) -> io::Result<()> {
    use tokio::io::AsyncWriteExt as _;
    let len = u16::try_from(message.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "a message over 65,535 bytes"))?;
    let mut framed = Vec::with_capacity(message.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(message);
    stream.write_all(&framed).await
}

/// How the workload asked, and so how the agent asks the resolver.
#[derive(Clone, Copy, Debug)]
enum Transport {
    Udp,
    Tcp,
}

/// What the workload gets for `bytes`: the resolver's answer once its addresses are allowed,
/// SERVFAIL when they cannot be, nothing when the query is not one (dropped, as a resolver
/// would) or the resolver did not answer in time (the workload tries again).
async fn answer(
    bytes: &[u8],
    resolver: SocketAddr,
    transport: Transport,
    asker: &Asker,
    maps: &Maps,
) -> Option<Vec<u8>> {
    let query = match message::parse_query(bytes) {
        Ok(query) => query,
        Err(e) => {
            tracing::debug!(error = %e, "dns: dropped a datagram that is not a query");
            return None;
        }
    };
    if let Some(reply) = alias_answer(asker, &query) {
        return Some(reply);
    }
    let asked = match transport {
        Transport::Udp => ask(bytes, resolver, asker).await,
        Transport::Tcp => ask_tcp(bytes, resolver, asker).await,
    };
    let reply = match asked {
        Ok(reply) => reply,
        Err(e) => {
            tracing::debug!(%query, %resolver, error = %e, "dns: no answer from the resolver");
            return None;
        }
    };
    let answer = match message::parse_answer(&reply, &query) {
        Ok(answer) => answer,
        Err(e) => {
            tracing::warn!(%query, %resolver, error = %e, "dns: the resolver's answer does not answer the query; SERVFAIL");
            return Some(message::servfail(&query));
        }
    };
    // Uncontended, the few map writes are made here, on the runtime's thread: handing the
    // thread's work to another first (`block_in_place`) costs more than they do. A change of
    // policy holds the lock of the rules in force while it swaps programs or sweeps learned
    // addresses (milliseconds); then the wait is made where the runtime can spare a thread.
    let learned = learn(asker, maps, &query, &answer, Wait::No).unwrap_or_else(|| {
        tokio::task::block_in_place(|| learn(asker, maps, &query, &answer, Wait::Yes))
            .expect("a learn that waits for the locks always ends")
    });
    match learned {
        Ok(_) => Some(reply),
        Err(e) => {
            tracing::error!(%query, error = %e, "dns: cannot allow the answer's addresses; SERVFAIL (failing closed)");
            Some(message::servfail(&query))
        }
    }
}

/// The agent's own answer when `query` asks for the name of an alias the asker may use
/// ([`ALIAS_ADDRESS`]); `None` for every other name.
fn alias_answer(asker: &Asker, query: &Query) -> Option<Vec<u8>> {
    let in_force = InForce::of(&asker.pin_dir);
    let names = in_force.lock();
    let alias = names.aliases.iter().find(|alias| {
        (alias.scope.is_none() || alias.scope == asker.namespace)
            && alias.hostnames.iter().any(|h| h == query.name())
    })?;
    tracing::debug!(%query, alias = %alias.hostnames[0], "dns: answered an alias's name");
    Some(message::synthesized(query, ALIAS_ADDRESS, ALIAS_TTL))
}

/// Sends `query` to `resolver` from a socket of the agent's and returns the first datagram
/// that comes back.
async fn ask(query: &[u8], resolver: SocketAddr, asker: &Asker) -> io::Result<Vec<u8>> {
    let local: SocketAddr = match resolver.ip() {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = asker
        .in_netns_async(move || {
            let socket = std::net::UdpSocket::bind(local)?;
            socket.set_nonblocking(true)?;
            Ok(socket)
        })
        .await?;
    let socket = UdpSocket::from_std(socket)?;
    socket.connect(resolver).await?;
    socket.send(query).await?;
    let mut buf = vec![0u8; MAX_MESSAGE];
    let len = tokio::time::timeout(RESOLVER_TIMEOUT, socket.recv(&mut buf))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer in 5 s"))??;
    buf.truncate(len);
    Ok(buf)
}

/// Sends `query` to `resolver` over TCP from a socket of the agent's and returns the answer.
async fn ask_tcp(query: &[u8], resolver: SocketAddr, asker: &Asker) -> io::Result<Vec<u8>> {
    tokio::time::timeout(RESOLVER_TIMEOUT, async {
        let socket = asker
            .in_netns_async(move || {
                if resolver.is_ipv4() {
                    tokio::net::TcpSocket::new_v4()
                } else {
                    tokio::net::TcpSocket::new_v6()
                }
            })
            .await?;
        let mut stream = socket.connect(resolver).await?;
        write_framed(&mut stream, query).await?;
        read_framed(&mut stream).await
    })
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer in 5 s"))?
}

/// Whether [`learn`] waits for its locks.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Wait {
    Yes,
    No,
}

impl Wait {
    /// Takes `mutex`, waiting for it only with [`Wait::Yes`]; `None` when another holds it and
    /// this does not wait. A poisoned lock is taken all the same: its holder's writes to the
    /// maps and the rules in force are each whole.
    fn take<T>(self, mutex: &Mutex<T>) -> Option<MutexGuard<'_, T>> {
        match mutex.try_lock() {
            Ok(guard) => Some(guard),
            Err(TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(TryLockError::WouldBlock) => match self {
                Self::Yes => Some(mutex.lock().unwrap_or_else(PoisonError::into_inner)),
                Self::No => None,
            },
        }
    }
}

/// Allows the answer's addresses for every FQDN rule in force that applies to the asker and
/// matches a name of the chain. Returns the number of map entries written; `None`, having
/// written nothing, when `wait` is [`Wait::No`] and a lock is held.
fn learn(
    asker: &Asker,
    maps: &Maps,
    query: &Query,
    answer: &Answer,
    wait: Wait,
) -> Option<Result<usize, LoadError>> {
    if answer.addrs.is_empty() {
        return Some(Ok(0));
    }
    let in_force = InForce::of(&asker.pin_dir);
    let names = wait.take(in_force.mutex())?;
    // The asker's own scope when its namespace has rules of its own; else scope 0.
    let namespace = asker.namespace.as_deref().filter(|ns| {
        names
            .scopes
            .binary_search_by(|s| s.as_str().cmp(ns))
            .is_ok()
    });
    let scope_id = stable_scope_id(namespace);
    let xdp = !names.scopes.is_empty();
    let rules: Vec<_> = names
        .names
        .iter()
        .filter(|rule| rule.scope.is_none() || rule.scope.as_deref() == namespace)
        .filter(|rule| answer.chain.iter().any(|name| rule.host.matches(name)))
        .collect();
    if rules.is_empty() {
        return Some(Ok(0));
    }
    let mut opened = wait.take(&maps.0)?;
    let learned = match open_maps(&mut opened, &asker.pin_dir) {
        Ok(learned) => learned,
        Err(e) => return Some(Err(e)),
    };
    let mut written = 0;
    for rule in &rules {
        for &(addr, ttl) in answer.addrs.iter().filter(|(addr, _)| learnable(*addr)) {
            match learned.allow(scope_id, xdp, rule, addr, Duration::from_secs(ttl.into())) {
                Ok(n) => written += n,
                Err(e) => return Some(Err(e)),
            }
        }
    }
    tracing::debug!(
        %query,
        rules = ?rules.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
        addresses = answer.addrs.len(),
        written,
        "dns: learned"
    );
    Some(Ok(written))
}

/// Whether an answer's address may be learned: never the host's own, link-local (cloud
/// metadata services live at 169.254.169.254), multicast, broadcast or unspecified
/// addresses, whatever name a DNS answer gives them (DNS rebinding). Only a CIDR rule or a
/// bypass range can allow those.
pub fn learnable(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(v4) => {
            !(v4.is_loopback()
                || v4.is_link_local()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.is_unspecified())
        }
        IpAddr::V6(v6) => {
            !(v6.is_loopback()
                || v6.is_unicast_link_local()
                || v6.is_multicast()
                || v6.is_unspecified())
        }
    }
}

/// The maps, opened on first use.
fn open_maps<'a>(
    slot: &'a mut Option<LearnedMaps>,
    pin_dir: &Path,
) -> Result<&'a mut LearnedMaps, LoadError> {
    if slot.is_none() {
        *slot = Some(LearnedMaps::open(&PinDir::new(pin_dir))?);
    }
    Ok(slot.as_mut().expect("just opened"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_waits_only_when_told_and_takes_a_poisoned_lock() {
        let mutex = Arc::new(Mutex::new(0u32));
        // Free: both take it.
        assert!(Wait::No.take(&mutex).is_some());
        assert!(Wait::Yes.take(&mutex).is_some());

        // Held by another thread: No gives up, Yes waits until the holder lets go.
        let (held_tx, held_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let holder = std::thread::spawn({
            let mutex = Arc::clone(&mutex);
            move || {
                let mut guard = mutex.lock().expect("lock");
                held_tx.send(()).expect("send");
                release_rx.recv().expect("recv");
                *guard = 7;
            }
        });
        held_rx.recv().expect("held");
        assert!(Wait::No.take(&mutex).is_none());
        release_tx.send(()).expect("release");
        assert_eq!(Wait::Yes.take(&mutex).map(|g| *g), Some(7));
        holder.join().expect("join");

        // Poisoned (its holder panicked): taken all the same, by both.
        let poisoner = std::thread::spawn({
            let mutex = Arc::clone(&mutex);
            move || {
                let _guard = mutex.lock().expect("lock");
                panic!("poisoning the lock on purpose");
            }
        });
        assert!(poisoner.join().is_err());
        assert!(mutex.is_poisoned());
        assert_eq!(Wait::No.take(&mutex).map(|g| *g), Some(7));
        assert_eq!(Wait::Yes.take(&mutex).map(|g| *g), Some(7));
    }
}
