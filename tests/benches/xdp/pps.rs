//! Packets and bytes per second through a pod's veth, with the backstop on its host end and
//! without: a UDP flood and a TCP stream from the pod to sinks in the node's namespace,
//! counted at the sinks.
//!
//! UDP because the backstop judges every UDP datagram (a TCP segment only when it opens a
//! connection): it is the traffic the backstop costs most. The sender sends 64 datagrams per
//! `sendmmsg(2)` call as fast as it can for a window; the sink drains them with `recvmmsg(2)`
//! into a 16 MiB receive buffer. TCP because a bulk stream's segments are large (GSO) and an
//! XDP mode that handles them one copy at a time shows there. On this 2-CPU machine the
//! sender's CPU also runs the veth's receive path (XDP, the node's IP, UDP and TCP layers),
//! so what XDP costs shows as fewer datagrams and bytes sent and received per second.

use std::{
    net::{SocketAddrV4, UdpSocket},
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use aya::programs::XdpMode;
use egress_tests::spawn_in_netns;
use egress_user::loader::PassAllXdp;

/// Datagrams per `sendmmsg(2)` / `recvmmsg(2)` call.
pub const BATCH: usize = 64;
/// The payload: 18 bytes, so that the frame is Ethernet's minimum of 64 bytes with its FCS.
const PAYLOAD: [u8; 18] = *b"egress-bench-flood";

/// A thread in a network namespace that counts what a sink of its receives (datagrams or
/// bytes), until dropped.
pub struct Counting {
    received: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Counting {
    /// Runs `sink` in a thread in `netns`: it says when it is ready, then adds what it
    /// receives to the count until told to stop.
    fn start(
        netns: &str,
        what: &str,
        sink: impl FnOnce(&AtomicU64, &AtomicBool, std::sync::mpsc::Sender<()>) + Send + 'static,
    ) -> Self {
        let received = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (count, halt) = (Arc::clone(&received), Arc::clone(&stop));
        let ((), thread) = spawn_in_netns(netns, what, move |ready| sink(&count, &halt, ready));
        Self {
            received,
            stop,
            thread: Some(thread),
        }
    }

    /// Received so far.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}

impl Drop for Counting {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A UDP socket on `at` in the namespace `netns`, counting the datagrams it receives.
pub fn udp_sink(netns: &str, at: SocketAddrV4) -> Counting {
    Counting::start(netns, "UDP sink", move |count, halt, ready| {
        let socket = UdpSocket::bind(at).unwrap_or_else(|e| panic!("binding {at}: {e}"));
        set_int(&socket, libc::SO_RCVBUFFORCE, 16 << 20, "SO_RCVBUFFORCE");
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("SO_RCVTIMEO");
        ready.send(()).expect("the bench waits");
        let mut buffers = [[0u8; 64]; BATCH];
        while !halt.load(Ordering::Relaxed) {
            count.fetch_add(receive(&socket, &mut buffers), Ordering::Relaxed);
        }
    })
}

/// Sets an `int` option of `SOL_SOCKET`.
fn set_int(socket: &UdpSocket, option: libc::c_int, value: libc::c_int, name: &str) {
    // SAFETY: a valid socket and a pointer to an int, with its size.
    let ret = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&raw const value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(
        ret,
        0,
        "setsockopt {name}: {}",
        std::io::Error::last_os_error()
    );
}

/// One `recvmmsg(2)` into `buffers`: the datagrams received, 0 when the read timed out.
fn receive(socket: &UdpSocket, buffers: &mut [[u8; 64]; BATCH]) -> u64 {
    let mut iovecs: Vec<libc::iovec> = buffers
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        })
        .collect();
    let mut headers = headers(&mut iovecs);
    // SAFETY: `headers` points at `iovecs`, which point at `buffers`; all outlive the call.
    let n = unsafe {
        libc::recvmmsg(
            socket.as_raw_fd(),
            headers.as_mut_ptr(),
            BATCH as libc::c_uint,
            libc::MSG_WAITFORONE,
            std::ptr::null_mut(),
        )
    };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
            ),
            "recvmmsg: {e}"
        );
        return 0;
    }
    n as u64
}

/// One message header per iovec, without addresses.
fn headers(iovecs: &mut [libc::iovec]) -> Vec<libc::mmsghdr> {
    iovecs
        .iter_mut()
        .map(|iov| {
            // SAFETY: mmsghdr is plain data; all-zero is a valid value (no name, no control).
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            h.msg_hdr.msg_iov = iov;
            h.msg_hdr.msg_iovlen = 1;
            h
        })
        .collect()
}

/// Sends datagrams to `to` from the namespace `netns` as fast as it can for `window`; returns
/// how many the kernel took.
pub fn flood(netns: &str, to: SocketAddrV4, window: Duration) -> u64 {
    let (sent_tx, sent_rx) = std::sync::mpsc::channel();
    let ((), thread) = spawn_in_netns(netns, "UDP flood", move |ready| {
        let socket = UdpSocket::bind("0.0.0.0:0").expect("binding the sender");
        socket
            .connect(to)
            .unwrap_or_else(|e| panic!("connecting to {to}: {e}"));
        ready.send(()).expect("the bench waits");
        let mut payloads = [PAYLOAD; BATCH];
        let mut iovecs: Vec<libc::iovec> = payloads
            .iter_mut()
            .map(|p| libc::iovec {
                iov_base: p.as_mut_ptr().cast(),
                iov_len: p.len(),
            })
            .collect();
        let mut headers = headers(&mut iovecs);
        let (mut sent, mut refused) = (0u64, 0u64);
        let end = Instant::now() + window;
        while Instant::now() < end {
            // SAFETY: `headers` points at `iovecs`, which point at `payloads`; all outlive
            // the call.
            let n = unsafe {
                libc::sendmmsg(
                    socket.as_raw_fd(),
                    headers.as_mut_ptr(),
                    BATCH as libc::c_uint,
                    0,
                )
            };
            if n >= 0 {
                sent += n as u64;
                continue;
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                // A full queue on the way: the datagram is lost, as a flood's would be.
                Some(libc::ENOBUFS | libc::EAGAIN | libc::EINTR) => refused += 1,
                _ => panic!("sendmmsg to {to}: {e}"),
            }
        }
        assert!(
            sent > 0,
            "no datagram to {to} was sent in {window:?} ({refused} calls refused)"
        );
        sent_tx.send(sent).expect("the bench waits");
    });
    thread.join().expect("the flood thread panicked");
    sent_rx.recv().expect("the flood reports what it sent")
}

/// A program that passes every packet, linked to `iface` of the namespace `netns` in `mode`
/// (`egress_user::loader::PassAllXdp`); detached when dropped. `XdpMode::Driver` is what the
/// kernel picks on a veth when asked for no mode (the skb converted into an `xdp_buff`);
/// `XdpMode::Skb`, generic mode, is the agent's mode for the backstop.
pub fn pass_all(netns: &str, iface: &str, mode: XdpMode) -> PassAllXdp {
    let iface = iface.to_owned();
    egress_tests::in_netns(netns, move || {
        let name = std::ffi::CString::new(iface.clone()).expect("no NUL");
        // SAFETY: a NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert_ne!(ifindex, 0, "{iface}: {}", std::io::Error::last_os_error());
        PassAllXdp::attach(ifindex, mode)
            .unwrap_or_else(|e| panic!("a pass-all XDP program on {iface} ({mode:?}): {e}"))
    })
}

/// A TCP listener on `at` in the namespace `netns`, counting the bytes its connections
/// bring, one connection at a time.
pub fn tcp_sink(netns: &str, at: SocketAddrV4) -> Counting {
    Counting::start(netns, "TCP sink", move |count, halt, ready| {
        let listener =
            std::net::TcpListener::bind(at).unwrap_or_else(|e| panic!("listening on {at}: {e}"));
        listener.set_nonblocking(true).expect("O_NONBLOCK");
        ready.send(()).expect("the bench waits");
        let mut buffer = vec![0u8; 1 << 20];
        while !halt.load(Ordering::Relaxed) {
            let mut stream = match listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                Err(e) => panic!("accepting on {at}: {e}"),
            };
            stream.set_nonblocking(false).expect("blocking reads");
            loop {
                match std::io::Read::read(&mut stream, &mut buffer) {
                    Ok(0) => break,
                    Ok(n) => {
                        count.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Err(e) => panic!("reading on {at}: {e}"),
                }
            }
        }
    })
}

/// Writes to one TCP connection to `to`, from the namespace `netns`, as fast as it can for
/// `window`, then closes it; returns the bytes written.
pub fn stream(netns: &str, to: SocketAddrV4, window: Duration) -> u64 {
    let netns = netns.to_owned();
    std::thread::spawn(move || {
        egress_tests::enter_netns(&netns);
        let mut connection =
            std::net::TcpStream::connect(to).unwrap_or_else(|e| panic!("connecting to {to}: {e}"));
        let chunk = vec![0x5au8; 256 << 10];
        let mut written = 0u64;
        let end = Instant::now() + window;
        while Instant::now() < end {
            written += std::io::Write::write(&mut connection, &chunk)
                .unwrap_or_else(|e| panic!("writing to {to}: {e}")) as u64;
        }
        written
    })
    .join()
    .expect("the stream thread panicked")
}
