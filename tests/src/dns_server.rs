//! [`DnsServer`]: a DNS server inside a sandbox that answers from records the test sets (and
//! changes) while it runs, and counts the queries that reach it. It answers as the recursive
//! resolver of a workload's resolv.conf does ([`zone`] says how), over UDP and TCP, so that
//! glibc (and the agent on the DNS path) see what they see in production.
//!
//! Network safety: it holds only names under `.test` and hands out only documentation,
//! loopback or unspecified addresses ([`Zone`] panics on anything else), and it listens only
//! inside the namespace it is started in.

pub mod zone;

use std::{
    collections::BinaryHeap,
    io::{self, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

pub use zone::{Asked, MAX_CNAME_HOPS, NEGATIVE_TTL, Transport, Zone, answer};

use crate::{Sandbox, spawn_in_netns};

/// How often the server threads look at their stop flag.
const POLL: Duration = Duration::from_millis(50);

/// What the server threads share with the handle.
struct Shared {
    zone: Mutex<Zone>,
    asked: Mutex<Vec<Asked>>,
    delay: Mutex<Duration>,
    stop: AtomicBool,
}

impl Shared {
    /// Answers `query` from the zone and records its question.
    fn answer(&self, query: &[u8], transport: Transport) -> Option<Vec<u8>> {
        let (bytes, asked) = answer(&self.zone.lock().expect("zone"), query, transport)?;
        if let Some(asked) = asked {
            self.asked.lock().expect("asked").push(asked);
        }
        Some(bytes)
    }

    fn delay(&self) -> Duration {
        *self.delay.lock().expect("delay")
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

/// A DNS server on 53/udp and 53/tcp (or another port) of an address inside a network
/// namespace, answering from a [`Zone`] the test changes while it runs, counting what it is
/// asked, stopped on drop. glibc's resolv.conf takes no port: for a workload's nameserver,
/// start it on port 53.
pub struct DnsServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Sandbox {
    /// Starts a DNS server inside the namespace at `addr` (UDP and TCP).
    pub fn dns_server(&self, addr: SocketAddr) -> DnsServer {
        DnsServer::start(&self.name, addr)
    }
}

impl DnsServer {
    /// Starts a server at `addr` (UDP and TCP on the same port; port 0 picks one) inside the
    /// network namespace `netns`, with an empty zone.
    pub fn start(netns: &str, addr: SocketAddr) -> Self {
        let shared = Arc::new(Shared {
            zone: Mutex::new(Zone::new()),
            asked: Mutex::new(Vec::new()),
            delay: Mutex::new(Duration::ZERO),
            stop: AtomicBool::new(false),
        });
        let ns = netns.to_owned();
        let (addr, udp) = {
            let shared = shared.clone();
            spawn_in_netns(netns, "DNS server (udp)", move |tx| {
                let socket = UdpSocket::bind(addr)
                    .unwrap_or_else(|e| panic!("binding {addr}/udp in {ns}: {e}"));
                tx.send(socket.local_addr().expect("local addr"))
                    .expect("send addr");
                serve_udp(&socket, &shared);
            })
        };
        let ns = netns.to_owned();
        let ((), tcp) = {
            let shared = shared.clone();
            spawn_in_netns(netns, "DNS server (tcp)", move |tx| {
                let listener = TcpListener::bind(addr)
                    .unwrap_or_else(|e| panic!("binding {addr}/tcp in {ns}: {e}"));
                listener.set_nonblocking(true).expect("nonblocking");
                tx.send(()).expect("send ready");
                serve_tcp(&listener, &shared);
            })
        };
        Self {
            addr,
            shared,
            threads: vec![udp, tcp],
        }
    }

    /// The address it listens on (UDP and TCP).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sets the A records of `name` ([`Zone::set_a`]); the next query sees them.
    pub fn set_a(&self, name: &str, ips: &[Ipv4Addr], ttl: u32) {
        self.zone().set_a(name, ips, ttl);
    }

    /// Sets the AAAA records of `name` ([`Zone::set_aaaa`]).
    pub fn set_aaaa(&self, name: &str, ips: &[Ipv6Addr], ttl: u32) {
        self.zone().set_aaaa(name, ips, ttl);
    }

    /// Makes `name` an alias of `target` ([`Zone::set_cname`]).
    pub fn set_cname(&self, name: &str, target: &str, ttl: u32) {
        self.zone().set_cname(name, target, ttl);
    }

    /// Removes `name` ([`Zone::remove`]): NXDOMAIN from the next query on.
    pub fn remove(&self, name: &str) {
        self.zone().remove(name);
    }

    /// Holds every answer back by `delay` from now on (zero: answer at once). Queries are
    /// counted when they arrive; a UDP answer still pending when the server stops is never
    /// sent.
    pub fn set_delay(&self, delay: Duration) {
        *self.shared.delay.lock().expect("delay") = delay;
    }

    /// Questions received so far, over both transports (one per query message with a
    /// question; glibc asks A and AAAA in two).
    pub fn queries(&self) -> usize {
        self.shared.asked.lock().expect("asked").len()
    }

    /// Questions received so far for `name` (any type, any case, with or without the final
    /// dot), not counting the names its CNAMEs lead to.
    pub fn queries_for(&self, name: &str) -> usize {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        self.shared
            .asked
            .lock()
            .expect("asked")
            .iter()
            .filter(|a| a.name == name)
            .count()
    }

    /// Every question received so far, in order.
    pub fn asked(&self) -> Vec<Asked> {
        self.shared.asked.lock().expect("asked").clone()
    }

    fn zone(&self) -> std::sync::MutexGuard<'_, Zone> {
        self.shared.zone.lock().expect("zone")
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// An answer waiting for its time ([`DnsServer::set_delay`]), ordered soonest first.
struct Pending {
    due: Instant,
    to: SocketAddr,
    bytes: Vec<u8>,
}

impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        self.due == other.due
    }
}

impl Eq for Pending {}

impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Pending {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        other.due.cmp(&self.due)
    }
}

/// The UDP loop: one thread, delayed answers in a heap, so that answers held back overlap as
/// they would at a slow resolver (glibc's A and AAAA queries wait once, not twice).
fn serve_udp(socket: &UdpSocket, shared: &Shared) {
    let mut pending: BinaryHeap<Pending> = BinaryHeap::new();
    let mut buf = vec![0u8; 65535];
    while !shared.stopped() {
        let now = Instant::now();
        while pending.peek().is_some_and(|p| p.due <= now) {
            let p = pending.pop().expect("peeked");
            let _ = socket.send_to(&p.bytes, p.to);
        }
        let wait = pending
            .peek()
            .map_or(POLL, |p| p.due.saturating_duration_since(now).min(POLL))
            .max(Duration::from_millis(1));
        socket.set_read_timeout(Some(wait)).expect("read timeout");
        let (len, from) = match socket.recv_from(&mut buf) {
            Ok(got) => got,
            Err(e)
                if matches!(
                    e.kind(),
                    // Interrupted: a signal came (a SIGSTOP/SIGCONT of the process, say).
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                continue;
            }
            Err(e) => panic!("DNS server recv: {e}"),
        };
        let Some(bytes) = shared.answer(&buf[..len], Transport::Udp) else {
            continue;
        };
        let delay = shared.delay();
        if delay.is_zero() {
            let _ = socket.send_to(&bytes, from);
        } else {
            pending.push(Pending {
                due: Instant::now() + delay,
                to: from,
                bytes,
            });
        }
    }
}

/// The TCP loop: a thread per connection (scoped, so all end with the server).
fn serve_tcp(listener: &TcpListener, shared: &Shared) {
    thread::scope(|scope| {
        while !shared.stopped() {
            match listener.accept() {
                Ok((stream, _)) => {
                    scope.spawn(move || serve_connection(stream, shared));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    thread::sleep(Duration::from_millis(2))
                }
                Err(e) => panic!("DNS server accept: {e}"),
            }
        }
    });
}

/// Answers length-prefixed queries on one connection until the client closes it (or sends
/// something that is not DNS, or the server stops).
fn serve_connection(mut stream: TcpStream, shared: &Shared) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(POLL));
    loop {
        let mut prefix = [0u8; 2];
        if !read_full(&mut stream, &mut prefix, shared) {
            return;
        }
        let mut query = vec![0u8; usize::from(u16::from_be_bytes(prefix))];
        if !read_full(&mut stream, &mut query, shared) {
            return;
        }
        let Some(bytes) = shared.answer(&query, Transport::Tcp) else {
            return;
        };
        let deadline = Instant::now() + shared.delay();
        while Instant::now() < deadline {
            if shared.stopped() {
                return;
            }
            thread::sleep(deadline.saturating_duration_since(Instant::now()).min(POLL));
        }
        let len = u16::try_from(bytes.len()).expect("a DNS message fits in 64 KiB");
        let mut framed = len.to_be_bytes().to_vec();
        framed.extend_from_slice(&bytes);
        if stream.write_all(&framed).is_err() {
            return;
        }
    }
}

/// Fills `buf` from `stream`, waiting out read timeouts until the server stops; false at
/// end of stream, on an error, or once stopped.
fn read_full(stream: &mut TcpStream, buf: &mut [u8], shared: &Shared) -> bool {
    let mut filled = 0;
    while filled < buf.len() {
        match stream.read(&mut buf[filled..]) {
            Ok(0) => return false,
            Ok(n) => filled += n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if shared.stopped() {
                    return false;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    true
}

/// The text of a resolv.conf naming `servers` (each on port 53, glibc takes no port), then
/// `options` (e.g. `"timeout:1 attempts:1"`; empty for glibc's defaults, 5 s and 2 tries).
pub fn resolv_conf_text(servers: &[IpAddr], options: &str) -> String {
    let mut text: String = servers
        .iter()
        .map(|s| format!("nameserver {s}\n"))
        .collect();
    if !options.is_empty() {
        text.push_str(&format!("options {options}\n"));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_text_names_the_servers() {
        let text = resolv_conf_text(
            &[
                IpAddr::V4(Ipv4Addr::new(192, 0, 2, 53)),
                IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 10)),
            ],
            "timeout:1 attempts:1",
        );
        assert_eq!(
            text,
            "nameserver 192.0.2.53\nnameserver 2001:db8::a\noptions timeout:1 attempts:1\n"
        );
    }
}
