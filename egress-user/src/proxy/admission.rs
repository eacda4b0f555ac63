//! Which app connections the proxy keeps: a bound on what one workload can hold, so that a
//! flood of half-sent requests can neither starve other requests nor take the descriptors the
//! agent's control plane needs (see [`crate::fds`]).
//!
//! Two limits, both on connections the proxy holds open:
//! - `connections`: all of them, from every client. The agent sets it from its descriptor
//!   budget, below the limit less a reserve.
//! - `pending_per_source`: those of one source that have not yet sent a complete request
//!   head. A source is the client's IP address: for a redirected connection the kernel keeps
//!   the app's own address as the client end, so processes on the host all share `127.0.0.1`
//!   (or `::1`) and this is then a second bound on all pending connections; a pod's own
//!   address (once pods reach the proxy) would be one source per pod.
//!
//! A new connection over either limit evicts the *oldest pending* connection (of its source,
//! or of anyone for the total) rather than being refused: a slowloris client that opens
//! thousands of connections and sends half a head on each only ever holds the newest few, and
//! a good client, whose head follows its `connect()` at once, gets in and is served. Only when
//! every held connection has sent a request (a connection serving requests is never evicted)
//! is a new one refused: closed at once, counted, and logged at most once a second.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// How long after the last refusal [`Admission::stats`] still reports the proxy as refusing.
const REFUSING_FOR: Duration = Duration::from_secs(5);

/// The proxy's connection limits (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// App connections held at most, from all clients.
    pub connections: usize,
    /// Connections of one source without a complete request head, at most.
    pub pending_per_source: usize,
}

impl Limits {
    /// No limits (tests, benchmarks, embedding).
    pub const UNLIMITED: Self = Self {
        connections: usize::MAX,
        pending_per_source: usize::MAX,
    };

    /// The limits for a proxy that may hold `connections`: one source may keep a quarter of
    /// them pending, so a single flooding workload leaves room for the others' requests.
    pub fn for_connections(connections: usize) -> Self {
        Self {
            connections,
            pending_per_source: (connections / 4).max(1),
        }
    }
}

/// What the admission has done, for `egress status`, metrics and `/healthz`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AdmissionStats {
    /// App connections held now.
    pub open: usize,
    /// Of them, without a complete request head yet.
    pub pending: usize,
    /// The `connections` limit.
    pub limit: usize,
    /// Connections closed at accept since start: every held one was serving requests.
    pub refused: u64,
    /// Pending connections closed to make room for a new one, since start.
    pub evicted: u64,
    /// A connection was refused in the last few seconds: requests are being turned away.
    pub refusing: bool,
}

/// The shared record of held connections. One per agent, shared by its listeners and kept
/// across reloads.
#[derive(Debug)]
pub struct Admission {
    limits: Limits,
    state: Mutex<State>,
    refused: AtomicU64,
    evicted: AtomicU64,
}

#[derive(Debug, Default)]
struct State {
    next_id: u64,
    /// Every held connection: its source, whether it is still pending, how to evict it.
    live: HashMap<u64, Entry>,
    /// Pending connections by id (ids grow, so the first is the oldest) and per source.
    pending: BTreeMap<u64, IpAddr>,
    pending_by_source: HashMap<IpAddr, BTreeSet<u64>>,
    last_refusal: Option<Instant>,
    /// Refusals not yet logged, and when the last log line was written.
    unlogged: u64,
    last_log: Option<Instant>,
}

#[derive(Debug)]
struct Entry {
    source: IpAddr,
    evict: Arc<Notify>,
}

impl State {
    /// Forgets pending connection `id` (of `source`) as pending.
    fn unpend(&mut self, id: u64, source: IpAddr) {
        self.pending.remove(&id);
        if let Some(ids) = self.pending_by_source.get_mut(&source) {
            ids.remove(&id);
            if ids.is_empty() {
                self.pending_by_source.remove(&source);
            }
        }
    }

    /// Closes held connection `id`: it stops counting now, and its task drops the socket.
    fn evict(&mut self, id: u64) {
        if let Some(entry) = self.live.remove(&id) {
            self.unpend(id, entry.source);
            entry.evict.notify_one();
        }
    }
}

impl Admission {
    /// An admission with these limits.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            state: Mutex::default(),
            refused: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a new connection from `source`, evicting the oldest pending one if a limit is
    /// reached; `None`: no room (every held connection serves requests), close it. `head`:
    /// a whole request head is already waiting on the connection, so it starts out served.
    ///
    /// Why `head` matters: the accept loop takes a burst of connections (up to tokio's
    /// budget of 128) before their tasks run and read anything, so under a flood a good
    /// client's connection would be the oldest pending one again before its head was read.
    pub fn admit(self: &Arc<Self>, source: IpAddr, head: bool) -> Option<Ticket> {
        let mut state = self.lock();
        let own = state
            .pending_by_source
            .get(&source)
            .map_or(0, BTreeSet::len);
        if !head
            && own >= self.limits.pending_per_source
            && let Some(&oldest) = state.pending_by_source.get(&source).and_then(|s| s.first())
        {
            state.evict(oldest);
            self.evicted.fetch_add(1, Relaxed);
        }
        if state.live.len() >= self.limits.connections {
            match state.pending.first_key_value().map(|(id, _)| *id) {
                Some(oldest) => {
                    state.evict(oldest);
                    self.evicted.fetch_add(1, Relaxed);
                }
                None => {
                    self.refuse(&mut state);
                    return None;
                }
            }
        }
        let id = state.next_id;
        state.next_id += 1;
        let evict = Arc::new(Notify::new());
        state.live.insert(
            id,
            Entry {
                source,
                evict: evict.clone(),
            },
        );
        if !head {
            state.pending.insert(id, source);
            state
                .pending_by_source
                .entry(source)
                .or_default()
                .insert(id);
        }
        Some(Ticket {
            admission: self.clone(),
            id,
            source,
            served: AtomicBool::new(head),
            evict,
        })
    }

    fn refuse(&self, state: &mut State) {
        self.refused.fetch_add(1, Relaxed);
        let now = Instant::now();
        state.last_refusal = Some(now);
        state.unlogged += 1;
        if state
            .last_log
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
        {
            tracing::warn!(
                refused = state.unlogged,
                limit = self.limits.connections,
                "proxy: connection limit reached and every connection is serving requests; \
                 refusing new connections"
            );
            state.unlogged = 0;
            state.last_log = Some(now);
        }
    }

    /// What it holds now and has done since start.
    pub fn stats(&self) -> AdmissionStats {
        let state = self.lock();
        AdmissionStats {
            open: state.live.len(),
            pending: state.pending.len(),
            limit: self.limits.connections,
            refused: self.refused.load(Relaxed),
            evicted: self.evicted.load(Relaxed),
            refusing: state
                .last_refusal
                .is_some_and(|t| t.elapsed() < REFUSING_FOR),
        }
    }
}

/// One held connection; dropping it frees its place.
#[derive(Debug)]
pub struct Ticket {
    admission: Arc<Admission>,
    id: u64,
    source: IpAddr,
    served: AtomicBool,
    evict: Arc<Notify>,
}

impl Ticket {
    /// The connection sent a complete request head: from now on it is never evicted.
    pub fn served(&self) {
        if !self.served.swap(true, Relaxed) {
            self.admission.lock().unpend(self.id, self.source);
        }
    }

    /// Resolves when the connection was evicted to make room: drop it then.
    pub async fn evicted(&self) {
        self.evict.notified().await;
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut state = self.admission.lock();
        if state.live.remove(&self.id).is_some() {
            state.unpend(self.id, self.source);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 7));

    fn is_evicted(t: &Ticket) -> bool {
        // A stored permit makes `notified` ready at once.
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        let fut = std::pin::pin!(t.evicted());
        fut.poll(&mut cx).is_ready()
    }

    use std::future::Future as _;

    fn admission(connections: usize, pending_per_source: usize) -> Arc<Admission> {
        Arc::new(Admission::new(Limits {
            connections,
            pending_per_source,
        }))
    }

    #[test]
    fn a_full_proxy_evicts_the_oldest_pending_connection() {
        let adm = admission(3, 10);
        let t: Vec<Ticket> = (0..3).map(|_| adm.admit(A, false).expect("room")).collect();
        t[0].served();
        // Full: the oldest *pending* one (t[1]) goes, not the one serving requests.
        let t3 = adm.admit(B, false).expect("room made");
        assert!(!is_evicted(&t[0]));
        assert!(is_evicted(&t[1]));
        assert!(!is_evicted(&t[2]));
        let s = adm.stats();
        assert_eq!((s.open, s.pending, s.evicted, s.refused), (3, 2, 1, 0));
        // Dropping the evicted ticket (its task ending) does not free a second place.
        let mut t = t;
        drop(t.remove(1));
        assert_eq!(adm.stats().open, 3);
        drop(t3);
        assert_eq!(adm.stats().open, 2);
    }

    #[test]
    fn a_proxy_full_of_serving_connections_refuses_and_says_so() {
        let adm = admission(2, 10);
        let t: Vec<Ticket> = (0..2).map(|_| adm.admit(A, false).expect("room")).collect();
        for x in &t {
            x.served();
        }
        assert!(adm.admit(A, false).is_none());
        let s = adm.stats();
        assert_eq!((s.open, s.refused, s.refusing), (2, 1, true));
        drop(t);
        assert!(adm.admit(A, false).is_some());
    }

    #[test]
    fn one_source_keeps_only_its_newest_pending_connections() {
        let adm = admission(100, 2);
        let other = adm.admit(B, false).expect("room");
        let flood: Vec<Ticket> = (0..5).map(|_| adm.admit(A, false).expect("room")).collect();
        let evicted: Vec<bool> = flood.iter().map(is_evicted).collect();
        assert_eq!(evicted, [true, true, true, false, false]);
        assert!(
            !is_evicted(&other),
            "another source's connection was evicted"
        );
        assert_eq!(adm.stats().open, 3);
        // A connection that has sent its request no longer counts as pending.
        flood[4].served();
        let _more = adm.admit(A, false).expect("room");
        assert!(!is_evicted(&flood[3]));
        // A connection whose head is already there is admitted served: never evicted.
        let ready = adm.admit(A, true).expect("room");
        let later: Vec<Ticket> = (0..4).map(|_| adm.admit(A, false).expect("room")).collect();
        assert!(!is_evicted(&ready));
        assert!(is_evicted(&later[0]) && !is_evicted(&later[3]));
        // Two of A's, and B's one.
        assert_eq!(adm.stats().pending, 3);
    }
}
