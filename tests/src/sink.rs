//! [`Sink`]: a TCP server inside a sandbox that counts what reaches it.

use std::{
    fs,
    net::{IpAddr, SocketAddr, TcpListener},
    os::fd::AsRawFd as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread,
    time::Duration,
};

use crate::{Sandbox, spawn_in_netns};

/// A TCP server inside a sandbox that accepts and counts every connection that reaches it:
/// the sink where "the server never saw it" is measured.
///
/// A connection counts once `accept()` returns it: after the handshake, or, for a TCP Fast
/// Open connection the server accepted data in the SYN of ([`Sink::start_tfo`]), as soon as
/// that SYN arrives. Each accepted connection is closed at once, after reading whatever data
/// is already there (the SYN's data), so that the close is a FIN rather than a RST.
pub struct Sink {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    syn_data: Arc<AtomicUsize>,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Sandbox {
    /// Starts a server inside the namespace at `addr`.
    pub fn sink(&self, addr: SocketAddr) -> Sink {
        Sink::start(&self.name, addr)
    }

    /// Starts a server inside the namespace at `ip` on each of `ports`, in that order.
    pub fn sinks<const N: usize>(&self, ip: impl Into<IpAddr>, ports: [u16; N]) -> [Sink; N] {
        let ip = ip.into();
        ports.map(|port| self.sink(SocketAddr::new(ip, port)))
    }
}

/// `TCPI_OPT_SYN_DATA` (linux/tcp.h): on a server's socket, the SYN carried data it accepted.
const TCPI_OPT_SYN_DATA: u8 = 32;

impl Sink {
    /// Starts a server at `addr` inside the network namespace `netns`.
    pub fn start(netns: &str, addr: SocketAddr) -> Self {
        Self::start_with(netns, addr, false)
    }

    /// Like [`Sink::start`], and the server takes data in the SYN (TCP Fast Open) without a
    /// cookie: this turns the server side of TFO on for the whole namespace
    /// (`net.ipv4.tcp_fastopen = 3`, which covers IPv6 too) and sets `TCP_FASTOPEN` and
    /// `TCP_FASTOPEN_NO_COOKIE` on the listener.
    pub fn start_tfo(netns: &str, addr: SocketAddr) -> Self {
        Self::start_with(netns, addr, true)
    }

    fn start_with(netns: &str, addr: SocketAddr, tfo: bool) -> Self {
        let accepted = Arc::new(AtomicUsize::new(0));
        let syn_data = Arc::new(AtomicUsize::new(0));
        let peers = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let ns = netns.to_owned();
        let (addr, thread) = {
            let (accepted, syn_data, peers, stop) = (
                accepted.clone(),
                syn_data.clone(),
                peers.clone(),
                stop.clone(),
            );
            spawn_in_netns(netns, "sink", move |tx| {
                if tfo {
                    // /proc/sys/net is the namespace of the thread that opens it.
                    fs::write("/proc/sys/net/ipv4/tcp_fastopen", "3")
                        .unwrap_or_else(|e| panic!("enabling TFO in {ns}: {e}"));
                }
                let listener = TcpListener::bind(addr)
                    .unwrap_or_else(|e| panic!("binding {addr} in {ns}: {e}"));
                if tfo {
                    for (opt, val) in [(libc::TCP_FASTOPEN, 16), (libc::TCP_FASTOPEN_NO_COOKIE, 1)]
                    {
                        setsockopt_int(listener.as_raw_fd(), libc::IPPROTO_TCP, opt, val)
                            .unwrap_or_else(|e| panic!("TFO option {opt} on {addr}: {e}"));
                    }
                }
                listener.set_nonblocking(true).expect("nonblocking");
                tx.send(listener.local_addr().expect("local addr"))
                    .expect("send addr");
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, peer)) => {
                            if took_syn_data(&stream) {
                                syn_data.fetch_add(1, Ordering::SeqCst);
                            }
                            peers.lock().expect("peers").push(peer);
                            accepted.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            thread::sleep(Duration::from_millis(2))
                        }
                        Err(e) => panic!("accept on {addr}: {e}"),
                    }
                }
            })
        };
        Self {
            addr,
            accepted,
            syn_data,
            peers,
            stop,
            thread: Some(thread),
        }
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far. Waits briefly for in-flight accepts to land, so that a
    /// connection the client saw established is counted.
    pub fn accepted(&self) -> usize {
        thread::sleep(Duration::from_millis(30));
        self.accepted.load(Ordering::SeqCst)
    }

    /// Of the connections accepted so far, those whose data came in the SYN (TCP Fast Open,
    /// with a sink made by [`Sink::start_tfo`]). Waits as [`Sink::accepted`] does.
    pub fn syn_data(&self) -> usize {
        thread::sleep(Duration::from_millis(30));
        self.syn_data.load(Ordering::SeqCst)
    }

    /// Peer addresses of the accepted connections.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().expect("peers").clone()
    }
}

/// Fails the test unless each sink of `want` has accepted the number of connections beside
/// it ([`Sink::accepted`]): what reached the servers, whatever the clients were told.
pub fn assert_accepted(want: &[(&Sink, usize)]) {
    for (sink, count) in want {
        assert_eq!(
            sink.accepted(),
            *count,
            "connections accepted at {}",
            sink.addr()
        );
    }
}

/// Whether the server accepted data in this connection's SYN (TCP Fast Open). Also reads
/// whatever data is already queued, so that closing the connection sends a FIN, not the RST
/// that unread data would: a TFO client checking its socket after the handshake then sees no
/// error.
fn took_syn_data(stream: &std::net::TcpStream) -> bool {
    // SAFETY: tcp_info is plain data; zeroed is valid.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: a valid socket and a buffer of `len` bytes.
    let ret = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            std::ptr::from_mut(&mut info).cast(),
            &mut len,
        )
    };
    assert_eq!(ret, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
    let mut buf = [0u8; 4096];
    // SAFETY: a valid socket and a buffer of its own length; MSG_DONTWAIT never blocks.
    while unsafe {
        libc::recv(
            stream.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    } > 0
    {}
    info.tcpi_options & TCPI_OPT_SYN_DATA != 0
}

/// `setsockopt()` with an `int` value.
pub fn setsockopt_int(
    fd: std::os::fd::RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> std::io::Result<()> {
    setsockopt(fd, level, name, &value)
}

/// `setsockopt()` with `value`, the plain C value the option reads (an `int`, a `timeval`
/// for `SO_RCVTIMEO`/`SO_SNDTIMEO`, a `linger` for `SO_LINGER`), passed by pointer and size.
pub fn setsockopt<T: Copy>(
    fd: std::os::fd::RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> std::io::Result<()> {
    // SAFETY: a pointer to a `T` and its size; the kernel only reads it.
    let ret = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            std::ptr::from_ref(value).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if ret == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
