//! The workload for egress vectors other than a plain TCP connect: joins a cgroup and a
//! network namespace, makes exactly one egress attempt of the given kind, and reports it.
//!
//! Usage: `egress-vector [--cgroup DIR] [--netns NAME] [--timeout-ms N] VECTOR ADDR:PORT`
//!
//! It prints one line: `ok`, or `error <stage> <errno> <message>`, where `stage` names the step
//! that failed (`socket`, `setsockopt`, `io_uring`, `connect`, `getsockname`, `send`, `recv`)
//! and `errno` is the error number (a timeout is reported as `ETIMEDOUT`); it exits 0 on `ok`
//! and 1 otherwise. Bad arguments make it panic (exit 101).
//!
//! Vectors (every payload starts with `egress-vector <VECTOR>`, so sinks can tell it apart):
//! - `tcp`: a blocking TCP `connect()` (`SO_SNDTIMEO` bounds it), then `send()` of the payload.
//! - `tfo`: TCP Fast Open: `sendto(payload, MSG_FASTOPEN, ADDR)` on a fresh socket, never
//!   `connect()`, with `TCP_FASTOPEN_NO_COOKIE` so the payload rides in the SYN even without a
//!   cookie from an earlier connection; then it waits for the handshake (writable, `SO_ERROR`
//!   0). A denied attempt fails at stage `send` (the syscall is `sendto`).
//! - `uring`: `IORING_OP_CONNECT` through io_uring, bounded by a linked timeout, then a plain
//!   `send()`. A negative CQE result is reported as the errno at stage `connect`; stage
//!   `io_uring` is the ring itself failing.
//! - `udp-connected`: a UDP `connect()`, then `send()` of one datagram.
//! - `udp-sendto`: one unconnected `sendto()` of a datagram.
//! - `raw-udp`: `socket(AF, SOCK_RAW, IPPROTO_UDP)` and a hand-built UDP header (source port
//!   40000, destination ADDR's port) plus payload. IPv4: the kernel builds the IP header, and
//!   the UDP checksum is 0 (legal, "none"). IPv6: `IPV6_CHECKSUM` 6 makes the kernel fill it.
//! - `raw-syn`: `socket(AF, SOCK_RAW, IPPROTO_TCP)` and a hand-built TCP SYN (no ACK; source
//!   port 40001) carrying the payload. IPv4: the checksum is computed here over the
//!   pseudo-header, with the source address the kernel picks, learnt by `connect()` on the raw
//!   socket and `getsockname()` (a raw socket's connect is only a route lookup, and it keeps
//!   the vector to one socket); IPv6: `IPV6_CHECKSUM` 16 makes the kernel fill it.
//!
//! Socket kinds other than TCP, UDP and raw, which `cgroup/sock_create` judges (none of them
//! is in the bypass matrix):
//! - `ping`: an ICMP echo request (ICMPv6 for an IPv6 address) carrying the payload, sent with
//!   `sendto()` on a ping socket (`socket(AF, SOCK_DGRAM, IPPROTO_ICMP)`, or `IPPROTO_ICMPV6`),
//!   then a wait for the echo reply with the socket's id and the request's sequence number.
//!   `ok` once the reply is in; none within the timeout is `ETIMEDOUT` at stage `recv`. ADDR's
//!   port is ignored. The kernel refuses a ping socket (`EACCES`) to a caller whose group is
//!   outside the namespace's `net.ipv4.ping_group_range`, which is empty (`1 0`) in a new
//!   namespace, before any eBPF program sees the socket.
//! - `udplite`: one unconnected `sendto()` of a datagram on a UDP-Lite socket
//!   (`socket(AF, SOCK_DGRAM, IPPROTO_UDPLITE)`), full checksum coverage (the default).
//! - `mptcp`: as `tcp`, on an MPTCP socket (`socket(AF, SOCK_STREAM, IPPROTO_MPTCP)`); against
//!   a plain TCP listener the connection falls back to TCP.
//!
//! `a.b.c.d:p` uses an AF_INET socket, `[v6]:p` an AF_INET6 one, and `[::ffff:a.b.c.d]:p` an
//! AF_INET6 socket to the v4-mapped address: for TCP and UDP with `IPV6_V6ONLY` off (the
//! dual-stack case); for the raw vectors as it is (a raw socket refuses `IPV6_V6ONLY`, and is
//! never v6-only unless the namespace's `bindv6only` says so), whatever the kernel then does.

use std::{
    io,
    mem::MaybeUninit,
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd as _,
    process::ExitCode,
    time::{Duration, Instant},
};

use egress_tests::setsockopt_int;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use sys::{initial_sequence, tcp4_checksum, wait_connected, wait_ready};

mod sys;

/// Source port of the raw UDP datagram.
const RAW_UDP_SPORT: u16 = 40000;
/// Source port of the raw SYN.
const RAW_SYN_SPORT: u16 = 40001;
/// A ping socket's protocol, and the types of its echo request and reply: ICMP (RFC 792)
/// and ICMPv6 (RFC 4443).
const ECHO_V4: (libc::c_int, u8, u8) = (libc::IPPROTO_ICMP, 8, 0);
const ECHO_V6: (libc::c_int, u8, u8) = (libc::IPPROTO_ICMPV6, 128, 129);

/// Why the attempt failed: the step, the errno and its text.
struct Failure {
    stage: &'static str,
    errno: i32,
    message: String,
}

impl Failure {
    fn new(stage: &'static str, errno: i32) -> Self {
        let text = io::Error::from_raw_os_error(errno).to_string();
        let message = match text.rfind(" (os error ") {
            Some(i) => text[..i].to_owned(),
            None => text,
        };
        Self {
            stage,
            errno,
            message,
        }
    }

    fn from_io(stage: &'static str, e: &io::Error) -> Self {
        Self::new(stage, e.raw_os_error().unwrap_or(libc::EIO))
    }

    fn timed_out(stage: &'static str, what: &str, timeout: Duration) -> Self {
        let mut f = Self::new(stage, libc::ETIMEDOUT);
        f.message = format!("{what} timed out after {} ms", timeout.as_millis());
        f
    }
}

type Step<T> = Result<T, Failure>;

fn main() -> ExitCode {
    let usage = "usage: egress-vector [--cgroup DIR] [--netns NAME] [--timeout-ms N] \
                 tcp|tfo|uring|udp-connected|udp-sendto|raw-udp|raw-syn|ping|udplite|mptcp \
                 ADDR:PORT";
    let mut args = std::env::args().skip(1);
    let mut timeout = Duration::from_secs(3);
    let mut positional = Vec::new();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--cgroup" => egress_tests::join_cgroup(&args.next().expect(usage)),
            "--netns" => egress_tests::enter_netns(&args.next().expect(usage)),
            "--timeout-ms" => {
                let ms = args.next().expect(usage).parse().expect("--timeout-ms N");
                timeout = Duration::from_millis(ms);
            }
            _ => positional.push(arg),
        }
    }
    let [vector, addr] = positional.as_slice() else {
        panic!("{usage}");
    };
    let addr: SocketAddr = addr.parse().expect("ADDR:PORT");
    let payload = format!("egress-vector {vector}").into_bytes();
    let attempt = Attempt {
        addr,
        timeout,
        payload,
    };
    let result = match vector.as_str() {
        "tcp" => attempt.stream(0),
        "tfo" => attempt.tfo(),
        "uring" => attempt.uring(),
        "udp-connected" => attempt.datagram(0, true),
        "udp-sendto" => attempt.datagram(0, false),
        "raw-udp" => attempt.raw_udp(),
        "raw-syn" => attempt.raw_syn(),
        "ping" => attempt.ping(),
        "udplite" => attempt.datagram(libc::IPPROTO_UDPLITE, false),
        "mptcp" => attempt.stream(libc::IPPROTO_MPTCP),
        other => panic!("unknown vector {other}; {usage}"),
    };
    match result {
        Ok(()) => {
            println!("ok");
            ExitCode::SUCCESS
        }
        Err(f) => {
            println!("error {} {} {}", f.stage, f.errno, f.message);
            ExitCode::FAILURE
        }
    }
}

/// One egress attempt to `addr`.
struct Attempt {
    addr: SocketAddr,
    timeout: Duration,
    payload: Vec<u8>,
}

impl Attempt {
    /// The socket family for the address: AF_INET6 for any IPv6 form, v4-mapped included.
    fn domain(&self) -> Domain {
        Domain::for_address(self.addr)
    }

    fn is_mapped(&self) -> bool {
        matches!(self.addr.ip(), IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some())
    }

    /// A socket of type `ty` and protocol `proto` (0: TCP or UDP, by the type) for the
    /// address; dual-stack for a v4-mapped one.
    fn inet_socket(&self, ty: Type, proto: libc::c_int) -> Step<Socket> {
        let socket = socket(self.domain(), ty, proto)?;
        if self.is_mapped() {
            socket
                .set_only_v6(false)
                .map_err(|e| Failure::from_io("setsockopt", &e))?;
        }
        Ok(socket)
    }

    /// `tcp` (`proto` 0) and `mptcp`: connect, then send.
    fn stream(&self, proto: libc::c_int) -> Step<()> {
        let socket = self.inet_socket(Type::STREAM, proto)?;
        socket
            .set_write_timeout(Some(self.timeout))
            .map_err(|e| Failure::from_io("setsockopt", &e))?;
        if let Err(e) = socket.connect(&self.addr.into()) {
            // A blocking connect() cut short by SO_SNDTIMEO returns EINPROGRESS.
            if e.raw_os_error() == Some(libc::EINPROGRESS) {
                return Err(Failure::timed_out("connect", "connect", self.timeout));
            }
            return Err(Failure::from_io("connect", &e));
        }
        send(&socket, &self.payload)
    }

    fn tfo(&self) -> Step<()> {
        let socket = self.inet_socket(Type::STREAM, 0)?;
        socket
            .set_nonblocking(true)
            .map_err(|e| Failure::from_io("setsockopt", &e))?;
        setsockopt_int(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_FASTOPEN_NO_COOKIE,
            1,
        )
        .map_err(|e| Failure::from_io("setsockopt", &e))?;
        // EINPROGRESS: the SYN left without the data (no TFO for this route after all); the
        // data then goes once the handshake completes.
        let in_syn = match socket.send_to_with_flags(
            &self.payload,
            &self.addr.into(),
            libc::MSG_FASTOPEN | libc::MSG_NOSIGNAL,
        ) {
            Ok(_) => true,
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => false,
            Err(e) => return Err(Failure::from_io("send", &e)),
        };
        wait_connected(&socket, Instant::now() + self.timeout, self.timeout)?;
        if in_syn {
            Ok(())
        } else {
            send(&socket, &self.payload)
        }
    }

    fn uring(&self) -> Step<()> {
        use io_uring::{IoUring, opcode, squeue, types};

        let socket = self.inet_socket(Type::STREAM, 0)?;
        let mut ring = IoUring::new(4).map_err(|e| Failure::from_io("io_uring", &e))?;
        let sa = SockAddr::from(self.addr);
        let ts = types::Timespec::new()
            .sec(self.timeout.as_secs())
            .nsec(self.timeout.subsec_nanos());
        let connect =
            opcode::Connect::new(types::Fd(socket.as_raw_fd()), sa.as_ptr().cast(), sa.len())
                .build()
                .flags(squeue::Flags::IO_LINK)
                .user_data(1);
        let timeout = opcode::LinkTimeout::new(&ts).build().user_data(2);
        // SAFETY: `sa` and `ts` outlive the ring's use of them: both completions are reaped
        // below, before either goes out of scope.
        unsafe {
            let mut sq = ring.submission();
            sq.push(&connect)
                .map_err(|_| Failure::new("io_uring", libc::EBUSY))?;
            sq.push(&timeout)
                .map_err(|_| Failure::new("io_uring", libc::EBUSY))?;
        }
        let mut results = [None, None];
        while results.iter().any(Option::is_none) {
            match ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Failure::from_io("io_uring", &e)),
            }
            for cqe in ring.completion() {
                if let Some(slot) = results.get_mut((cqe.user_data() as usize).wrapping_sub(1)) {
                    *slot = Some(cqe.result());
                }
            }
        }
        let (connected, timer) = (results[0].unwrap_or(0), results[1].unwrap_or(0));
        if connected == -libc::ECANCELED && timer == -libc::ETIME {
            return Err(Failure::timed_out(
                "connect",
                "io_uring connect",
                self.timeout,
            ));
        }
        if connected < 0 {
            return Err(Failure::new("connect", -connected));
        }
        send(&socket, &self.payload)
    }

    /// The UDP vectors (`proto` 0) and `udplite`: one datagram, with `connect()` and `send()`
    /// or with `sendto()`.
    fn datagram(&self, proto: libc::c_int, connected: bool) -> Step<()> {
        let socket = self.inet_socket(Type::DGRAM, proto)?;
        if connected {
            socket
                .connect(&self.addr.into())
                .map_err(|e| Failure::from_io("connect", &e))?;
            return send(&socket, &self.payload);
        }
        sendto(&socket, &self.payload, self.addr)
    }

    fn raw_udp(&self) -> Step<()> {
        let socket = socket(self.domain(), Type::RAW, libc::IPPROTO_UDP)?;
        if self.domain() == Domain::IPV6 {
            // The UDP checksum is at offset 6 of what we hand the kernel.
            setsockopt_int(
                socket.as_raw_fd(),
                libc::IPPROTO_IPV6,
                libc::IPV6_CHECKSUM,
                6,
            )
            .map_err(|e| Failure::from_io("setsockopt", &e))?;
        }
        let mut datagram = Vec::with_capacity(8 + self.payload.len());
        datagram.extend_from_slice(&RAW_UDP_SPORT.to_be_bytes());
        datagram.extend_from_slice(&self.addr.port().to_be_bytes());
        datagram.extend_from_slice(&(8 + self.payload.len() as u16).to_be_bytes());
        datagram.extend_from_slice(&[0, 0]);
        datagram.extend_from_slice(&self.payload);
        // An IPv6 raw socket takes port 0 or its own protocol in the address; IPv4 ignores it.
        sendto(&socket, &datagram, SocketAddr::new(self.addr.ip(), 0))
    }

    fn raw_syn(&self) -> Step<()> {
        let socket = socket(self.domain(), Type::RAW, libc::IPPROTO_TCP)?;
        let target = SocketAddr::new(self.addr.ip(), 0);
        let mut segment = Vec::with_capacity(20 + self.payload.len());
        segment.extend_from_slice(&RAW_SYN_SPORT.to_be_bytes());
        segment.extend_from_slice(&self.addr.port().to_be_bytes());
        segment.extend_from_slice(&initial_sequence().to_be_bytes());
        segment.extend_from_slice(&0u32.to_be_bytes()); // no ACK number
        segment.push(5 << 4); // 20-byte header, no options
        segment.push(0x02); // SYN
        segment.extend_from_slice(&65535u16.to_be_bytes()); // window
        segment.extend_from_slice(&[0, 0]); // checksum, below
        segment.extend_from_slice(&[0, 0]); // urgent pointer
        segment.extend_from_slice(&self.payload);
        match self.addr.ip() {
            IpAddr::V4(dst) => {
                // The source the kernel picks: `connect()` on the raw socket (a route lookup;
                // it also makes the socket take packets from `target` only, which does not
                // matter for sending), then `getsockname()`.
                socket
                    .connect(&target.into())
                    .map_err(|e| Failure::from_io("connect", &e))?;
                let src = *local_addr(&socket)?
                    .as_socket_ipv4()
                    .ok_or_else(|| Failure::new("getsockname", libc::EAFNOSUPPORT))?
                    .ip();
                let sum = tcp4_checksum(src, dst, &segment);
                segment[16..18].copy_from_slice(&sum.to_be_bytes());
            }
            IpAddr::V6(_) => {
                // The TCP checksum is at offset 16 of what we hand the kernel.
                setsockopt_int(
                    socket.as_raw_fd(),
                    libc::IPPROTO_IPV6,
                    libc::IPV6_CHECKSUM,
                    16,
                )
                .map_err(|e| Failure::from_io("setsockopt", &e))?;
            }
        }
        sendto(&socket, &segment, target)
    }

    fn ping(&self) -> Step<()> {
        let (proto, request, reply) = if self.domain() == Domain::IPV4 {
            ECHO_V4
        } else {
            ECHO_V6
        };
        let socket = socket(self.domain(), Type::DGRAM, proto)?;
        // Type, code, checksum and id (the kernel fills both: the id is the socket's), then
        // the sequence number and the payload.
        let sequence = (std::process::id() as u16) | 1;
        let mut message = vec![request, 0, 0, 0, 0, 0];
        message.extend_from_slice(&sequence.to_be_bytes());
        message.extend_from_slice(&self.payload);
        sendto(&socket, &message, SocketAddr::new(self.addr.ip(), 0))?;
        // The id the kernel gave the request: the socket's "port", bound by sendto().
        let id = local_addr(&socket)?
            .as_socket()
            .ok_or_else(|| Failure::new("getsockname", libc::EAFNOSUPPORT))?
            .port();
        let deadline = Instant::now() + self.timeout;
        let mut buf = [MaybeUninit::<u8>::uninit(); 2048];
        loop {
            wait_ready(
                &socket,
                libc::POLLIN,
                deadline,
                ("recv", "echo reply"),
                self.timeout,
            )?;
            // MSG_DONTWAIT: a wake-up with nothing to read must not block past the deadline.
            let got = match socket.recv_with_flags(&mut buf, libc::MSG_DONTWAIT) {
                Ok(got) => got,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) =>
                {
                    continue;
                }
                Err(e) => return Err(Failure::from_io("recv", &e)),
            };
            // SAFETY: recv() initialised the first `got` bytes.
            let message: &[u8] = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast(), got) };
            // A ping socket hands over the ICMP message without the IP header.
            if message.len() >= 8
                && message[0] == reply
                && message[4..6] == id.to_be_bytes()
                && message[6..8] == sequence.to_be_bytes()
            {
                return Ok(());
            }
        }
    }
}

/// `socket()` (with `SOCK_CLOEXEC`, as socket2 makes every socket).
fn socket(domain: Domain, ty: Type, proto: libc::c_int) -> Step<Socket> {
    Socket::new(domain, ty, Some(Protocol::from(proto))).map_err(|e| Failure::from_io("socket", &e))
}

/// `send()` of all of `data` on a connected socket.
fn send(socket: &Socket, data: &[u8]) -> Step<()> {
    let n = socket
        .send_with_flags(data, libc::MSG_NOSIGNAL)
        .map_err(|e| Failure::from_io("send", &e))?;
    sent(n, data.len())
}

/// `sendto()` of all of `data` to `addr`.
fn sendto(socket: &Socket, data: &[u8], addr: SocketAddr) -> Step<()> {
    let n = socket
        .send_to_with_flags(data, &addr.into(), libc::MSG_NOSIGNAL)
        .map_err(|e| Failure::from_io("send", &e))?;
    sent(n, data.len())
}

/// A send that took `n` of the `want` bytes: all of them, or a failure saying how many.
fn sent(n: usize, want: usize) -> Step<()> {
    if n != want {
        let mut f = Failure::new("send", libc::EMSGSIZE);
        f.message = format!("sent {n} of {want} bytes");
        return Err(f);
    }
    Ok(())
}

/// The socket's local address (`getsockname()`).
fn local_addr(socket: &Socket) -> Step<SockAddr> {
    socket
        .local_addr()
        .map_err(|e| Failure::from_io("getsockname", &e))
}
