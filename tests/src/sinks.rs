//! Sinks for what is not a TCP connection: [`UdpSink`] counts UDP (or UDP-Lite) datagrams,
//! [`SynSink`] counts TCP SYNs (such as the raw ones `egress-vector raw-syn` builds) whether
//! or not anything completes a handshake. Like the TCP [`Sink`](crate::Sink), each runs on its
//! own thread inside a named network namespace and stops on drop; counting at the sink is how
//! a test tells "the filter stopped it" from "the tool never sent it". Pings need no server:
//! [`echo_requests`] counts the ICMP echo requests a namespace received.
//!
//! `egress-vector` puts [`MARKER`] in every payload it sends, so a test can tell its own
//! traffic from anything else that reaches a sink.

use std::{
    mem,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use crate::{Sandbox, Sink, sh, spawn_in_netns};

/// The bytes every payload of `egress-vector` starts with.
pub const MARKER: &[u8] = b"egress-vector";

/// How long a count waits for packets still in flight, as [`Sink::accepted`] does.
const SETTLE: Duration = Duration::from_millis(30);

/// One UDP datagram a [`UdpSink`] received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Datagram {
    /// Its source.
    pub from: SocketAddr,
    /// Its payload.
    pub payload: Vec<u8>,
}

impl Datagram {
    /// Whether it came from `egress-vector` (its payload starts with [`MARKER`]).
    pub fn marked(&self) -> bool {
        self.payload.starts_with(MARKER)
    }
}

/// One TCP segment with SYN set and ACK clear that a [`SynSink`] saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Syn {
    /// Its source address and port.
    pub from: SocketAddr,
    /// Its payload (data in the SYN, as `egress-vector raw-syn` sends [`MARKER`] in it).
    pub payload: Vec<u8>,
}

/// What a sink thread shares with its handle.
struct Shared<T> {
    seen: Mutex<Vec<T>>,
    stop: AtomicBool,
}

impl<T: Clone> Shared<T> {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            seen: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        })
    }

    fn push(&self, item: T) {
        self.seen.lock().expect("sink records").push(item);
    }

    fn all(&self) -> Vec<T> {
        thread::sleep(SETTLE);
        self.seen.lock().expect("sink records").clone()
    }

    fn wait_for(&self, n: usize, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let count = self.seen.lock().expect("sink records").len();
            if count >= n || Instant::now() >= deadline {
                return count;
            }
            thread::sleep(Duration::from_millis(5));
        }
    }
}

/// A thread inside a network namespace that records what reaches an address (a [`UdpSink`]
/// its datagrams, a [`SynSink`] its SYNs), stopped on drop.
pub struct Recording<T> {
    addr: SocketAddr,
    shared: Arc<Shared<T>>,
    thread: Option<thread::JoinHandle<()>>,
}

/// A UDP server inside a network namespace that records every datagram reaching it.
pub type UdpSink = Recording<Datagram>;

/// Counts TCP SYNs (SYN set, ACK clear) that reach an address and port inside a network
/// namespace, whether or not anything listens there.
///
/// It is a raw `IPPROTO_TCP` socket bound to the address: the kernel hands raw sockets a copy
/// of every packet of their protocol it delivers locally (`raw_local_deliver` for IPv4,
/// `ipv6_raw_deliver` for IPv6) before TCP sees it, and binding filters on the destination
/// address. IPv4 copies start with the IP header, IPv6 copies with the TCP header (the
/// source comes from `recvfrom`). Verified on this kernel by `tests/vectors.rs` for both
/// families, over loopback and over a veth.
pub type SynSink = Recording<Syn>;

impl<T: Clone + Send + 'static> Recording<T> {
    /// Runs `body` on a thread inside `netns`; it reports its bound address on the channel
    /// (or panics with why it could not start, which this passes on).
    fn spawn(
        netns: &str,
        what: String,
        body: impl FnOnce(&Shared<T>, std::sync::mpsc::Sender<SocketAddr>) + Send + 'static,
    ) -> Self {
        let shared = Shared::new();
        let (addr, thread) = {
            let shared = shared.clone();
            spawn_in_netns(netns, &what, move |tx| body(&shared, tx))
        };
        Self {
            addr,
            shared,
            thread: Some(thread),
        }
    }

    /// The address it records what reaches.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What it recorded so far, in order (after waiting briefly for any in flight).
    pub fn all(&self) -> Vec<T> {
        self.shared.all()
    }

    /// How many it recorded so far (after waiting briefly for any in flight).
    pub fn count(&self) -> usize {
        self.all().len()
    }

    /// Waits until at least `n` arrived or `timeout` passed; returns the count.
    pub fn wait_for(&self, n: usize, timeout: Duration) -> usize {
        self.shared.wait_for(n, timeout)
    }
}

impl<T> Drop for Recording<T> {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl UdpSink {
    /// Binds `addr` inside the network namespace `netns` and starts receiving. An IPv4
    /// address also receives what an AF_INET6 socket sends to its `::ffff:a.b.c.d` form.
    pub fn start(netns: &str, addr: SocketAddr) -> Self {
        Self::start_protocol(netns, addr, libc::IPPROTO_UDP)
    }

    /// Like [`UdpSink::start`], for UDP-Lite (IP protocol 136) datagrams: the same datagram
    /// API on a `socket(AF, SOCK_DGRAM, IPPROTO_UDPLITE)`, which takes only datagrams whose
    /// checksum covers them whole (what `egress-vector udplite` sends).
    pub fn start_lite(netns: &str, addr: SocketAddr) -> Self {
        Self::start_protocol(netns, addr, libc::IPPROTO_UDPLITE)
    }

    fn start_protocol(netns: &str, addr: SocketAddr, protocol: libc::c_int) -> Self {
        let ns = netns.to_owned();
        let what = if protocol == libc::IPPROTO_UDP {
            "UDP"
        } else {
            "UDP-Lite"
        };
        Self::spawn(
            netns,
            format!("{what} sink at {addr}"),
            move |shared, tx| {
                let socket = datagram_socket(addr, protocol)
                    .unwrap_or_else(|e| panic!("binding {what} {addr} in {ns}: {e}"));
                socket
                    .set_read_timeout(Some(Duration::from_millis(5)))
                    .expect("read timeout");
                tx.send(socket.local_addr().expect("local addr"))
                    .expect("send addr");
                let mut buf = vec![0u8; 65536];
                while !shared.stop.load(Ordering::Relaxed) {
                    match socket.recv_from(&mut buf) {
                        Ok((n, from)) => shared.push(Datagram {
                            from,
                            payload: buf[..n].to_vec(),
                        }),
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) => {}
                        Err(e) => panic!("receiving on {what} {addr}: {e}"),
                    }
                }
            },
        )
    }

    /// Every datagram received so far, in order (after waiting briefly for any in flight).
    pub fn datagrams(&self) -> Vec<Datagram> {
        self.all()
    }
}

/// A datagram socket of `protocol` (UDP or UDP-Lite) bound to `addr`. UDP-Lite has the
/// datagram API of UDP, so the standard library's `UdpSocket` drives either once made.
fn datagram_socket(addr: SocketAddr, protocol: libc::c_int) -> std::io::Result<UdpSocket> {
    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, protocol) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor socket() just returned, owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let (storage, len) = crate::raw::sockaddr(addr);
    // SAFETY: a valid socket and a sockaddr of `len` bytes.
    if unsafe { libc::bind(fd.as_raw_fd(), std::ptr::from_ref(&storage).cast(), len) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(UdpSocket::from(fd))
}

impl SynSink {
    /// Starts counting SYNs to `addr` inside `netns`. A `::ffff:a.b.c.d` address counts the
    /// IPv4 packets to `a.b.c.d`, which is what travels for it.
    pub fn start(netns: &str, addr: SocketAddr) -> Self {
        let addr = match addr.ip() {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => SocketAddr::new(v4.into(), addr.port()),
                None => addr,
            },
            IpAddr::V4(_) => addr,
        };
        let ns = netns.to_owned();
        Self::spawn(netns, format!("SYN sink at {addr}"), move |shared, tx| {
            let fd = raw_tcp_socket(addr)
                .unwrap_or_else(|e| panic!("raw TCP socket at {addr} in {ns}: {e}"));
            tx.send(addr).expect("send addr");
            let mut buf = vec![0u8; 65536];
            while !shared.stop.load(Ordering::Relaxed) {
                let Some((n, from)) = recv_from(&fd, &mut buf)
                    .unwrap_or_else(|e| panic!("receiving on raw TCP at {addr}: {e}"))
                else {
                    continue;
                };
                if let Some(syn) = parse_syn(&buf[..n], from, addr.port()) {
                    shared.push(syn);
                }
            }
        })
    }

    /// Every SYN seen so far, in order (after waiting briefly for any in flight).
    pub fn syns(&self) -> Vec<Syn> {
        self.all()
    }
}

/// A raw `IPPROTO_TCP` socket of `addr`'s family bound to its address, with a 5 ms receive
/// timeout so its thread can notice a stop.
fn raw_tcp_socket(addr: SocketAddr) -> std::io::Result<OwnedFd> {
    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket(2).
    let fd = unsafe {
        libc::socket(
            family,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_TCP,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor socket() just returned, owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // Raw sockets take no port: bind to the address alone.
    let (storage, len) = crate::raw::sockaddr(SocketAddr::new(addr.ip(), 0));
    // SAFETY: a valid socket and a sockaddr of `len` bytes.
    if unsafe { libc::bind(fd.as_raw_fd(), std::ptr::from_ref(&storage).cast(), len) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: 5_000,
    };
    crate::setsockopt(
        fd.as_raw_fd(),
        libc::SOL_SOCKET,
        libc::SO_RCVTIMEO,
        &timeout,
    )?;
    Ok(fd)
}

/// `recvfrom()`: the length and source, or `None` when the receive timeout passed.
fn recv_from(fd: &OwnedFd, buf: &mut [u8]) -> std::io::Result<Option<(usize, IpAddr)>> {
    // SAFETY: sockaddr_storage is plain data; zeroed is valid.
    let mut from: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let mut len = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: a valid socket, a buffer of its own length, and a sockaddr_storage of `len`.
    let n = unsafe {
        libc::recvfrom(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            0,
            std::ptr::from_mut(&mut from).cast(),
            &mut len,
        )
    };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        return match e.kind() {
            std::io::ErrorKind::WouldBlock
            | std::io::ErrorKind::TimedOut
            | std::io::ErrorKind::Interrupted => Ok(None),
            _ => Err(e),
        };
    }
    let ip = match i32::from(from.ss_family) {
        libc::AF_INET => {
            // SAFETY: the kernel filled an AF_INET address; storage is aligned for it.
            let sin: &libc::sockaddr_in = unsafe { &*std::ptr::from_ref(&from).cast() };
            IpAddr::V4(Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes()))
        }
        libc::AF_INET6 => {
            // SAFETY: the kernel filled an AF_INET6 address; storage is aligned for it.
            let sin6: &libc::sockaddr_in6 = unsafe { &*std::ptr::from_ref(&from).cast() };
            IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr))
        }
        other => panic!("recvfrom on a raw socket gave address family {other}"),
    };
    Ok(Some((n as usize, ip)))
}

/// The SYN in a packet a raw TCP socket received (with its IPv4 header when `from` is IPv4,
/// without for IPv6), if it is one (SYN set, ACK clear) to `port`.
fn parse_syn(packet: &[u8], from: IpAddr, port: u16) -> Option<Syn> {
    let tcp = match from {
        IpAddr::V4(_) => {
            let ihl = usize::from(*packet.first()? & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([*packet.get(2)?, *packet.get(3)?]));
            packet.get(ihl..total.min(packet.len()))?
        }
        IpAddr::V6(_) => packet,
    };
    let sport = u16::from_be_bytes([*tcp.first()?, *tcp.get(1)?]);
    let dport = u16::from_be_bytes([*tcp.get(2)?, *tcp.get(3)?]);
    let offset = usize::from(*tcp.get(12)? >> 4) * 4;
    let flags = *tcp.get(13)?;
    let (syn, ack) = (flags & 0x02 != 0, flags & 0x10 != 0);
    (dport == port && syn && !ack).then(|| Syn {
        from: SocketAddr::new(from, sport),
        payload: tcp.get(offset..).unwrap_or_default().to_vec(),
    })
}

/// ICMP echo requests the network namespace `netns` has received for `family`'s protocol
/// (`InEchos` of `/proc/net/snmp` for an IPv4 address, `Icmp6InEchos` of `/proc/net/snmp6`
/// for IPv6). A namespace's kernel answers pings itself, so this counter is the sink of
/// `egress-vector ping`: nothing else in a test's own namespace sends echo requests.
pub fn echo_requests(netns: &str, family: IpAddr) -> u64 {
    let file = if family.is_ipv4() {
        "/proc/net/snmp"
    } else {
        "/proc/net/snmp6"
    };
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", netns, "cat", file])
        .output()
        .expect("reading the ICMP counters");
    let text = String::from_utf8_lossy(&out.stdout);
    let value = if family.is_ipv4() {
        // Two `Icmp:` lines: the names, then the values.
        let mut lines = text.lines().filter(|l| l.starts_with("Icmp:"));
        let (names, values) = (lines.next(), lines.next());
        names.zip(values).and_then(|(names, values)| {
            let at = names.split_whitespace().position(|n| n == "InEchos")?;
            values.split_whitespace().nth(at)
        })
    } else {
        text.lines()
            .find_map(|l| l.strip_prefix("Icmp6InEchos"))
            .map(str::trim)
    };
    value
        .unwrap_or_else(|| panic!("no echo request counter in {netns}'s {file}: {text}"))
        .parse()
        .expect("a count")
}

impl Sandbox {
    /// Lets every group open ping sockets in the sandbox's namespace
    /// (`net.ipv4.ping_group_range`, which covers ICMPv6 too). A new namespace allows none
    /// (`1 0`), and the kernel refuses a ping socket with `EACCES` for that before any eBPF
    /// program sees it.
    pub fn allow_ping(&self) {
        sh(&[
            "ip",
            "netns",
            "exec",
            &self.name,
            "sysctl",
            "-qw",
            "net.ipv4.ping_group_range=0 2147483647",
        ]);
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &self.name, "cat"])
            .arg("/proc/sys/net/ipv4/ping_group_range")
            .output()
            .expect("reading ping_group_range");
        let range = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            range.split_whitespace().collect::<Vec<_>>(),
            ["0", "2147483647"],
            "ping_group_range in {}",
            self.name
        );
    }

    /// Starts a [`UdpSink`] inside the sandbox's namespace at `addr`.
    pub fn udp_sink(&self, addr: SocketAddr) -> UdpSink {
        UdpSink::start(&self.name, addr)
    }

    /// Starts a UDP-Lite [`UdpSink`] ([`UdpSink::start_lite`]) inside the sandbox's namespace
    /// at `addr`.
    pub fn udplite_sink(&self, addr: SocketAddr) -> UdpSink {
        UdpSink::start_lite(&self.name, addr)
    }

    /// Starts a [`SynSink`] inside the sandbox's namespace for `addr`.
    pub fn syn_sink(&self, addr: SocketAddr) -> SynSink {
        SynSink::start(&self.name, addr)
    }

    /// Starts a TCP [`Sink`] that takes data in the SYN ([`Sink::start_tfo`]) inside the
    /// sandbox's namespace at `addr`.
    pub fn tfo_sink(&self, addr: SocketAddr) -> Sink {
        Sink::start_tfo(&self.name, addr)
    }
}
