//! The workload of the integration tests: joins a cgroup and a network namespace, then either
//! makes one TCP connection and reports the outcome, or speaks HTTP over it.
//!
//! Usage:
//! - `egress-probe [--cgroup DIR] [--netns NAME] ADDR:PORT` prints `connected` or
//!   `error <errno> <message>`.
//! - `egress-probe [--cgroup DIR] [--netns NAME] --http REQUEST ADDR:PORT...` connects to every
//!   address first (so the connections are open at the same time), then on each sends
//!   REQUEST (with `\r\n` written as the two characters backslash-r backslash-n, and `{addr}`
//!   replaced by that connection's address), and prints for each, in order:
//!   `peer <getpeername()>` or `error <errno> <message>`, then `status <status line>`,
//!   `bytes <response bytes>`, and the first 4 KiB of the response between `begin` and `end`.
//!
//! - With `--tls NAME --ca FILE` before `--http`, each connection first does the app's own TLS
//!   handshake (rustls, trusting only the CA in FILE) with NAME as its server name (SNI; an IP
//!   address as NAME sends none), and the request goes over it; a failed handshake prints
//!   `error 0 tls: <why>`.
//!
//! - `egress-probe ... --dns-query NAME ADDR:PORT` sends one A query for NAME from an
//!   unconnected UDP socket (`sendto`) and waits 5 s for the answer (`recvfrom`): prints
//!   `from <the answer's source address> addrs <the A records, comma-separated>`, as a stub
//!   resolver that checks where its answer came from (musl's) sees it. `--dns-query NAME
//!   ADDR:PORT REPEAT` asks REPEAT times, one query at a time, and adds a line
//!   `latency_us <each query's round trip in microseconds, comma-separated>` (the DNS
//!   benchmark's client).
//!
//! An `[::ffff:a.b.c.d]:port` address makes an AF_INET6 socket, the dual-stack case.
//! `--local-port N` binds each socket to port N (any address) before it connects. `--netns`
//! takes a name under `/run/netns/` or a path (a pod's `/proc/PID/ns/net`).

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    process::ExitCode,
    time::Duration,
};

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut targets = Vec::new();
    let mut request = None;
    let mut local_port = None;
    let mut tls_name = None;
    let mut ca = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--tls" => tls_name = Some(args.next().expect("--tls NAME")),
            "--dns-query" => {
                let name = args.next().expect("--dns-query NAME");
                let server = args
                    .next()
                    .expect("--dns-query NAME ADDR:PORT")
                    .parse::<SocketAddr>()
                    .expect("ADDR:PORT");
                let repeat = args
                    .next()
                    .map_or(1, |n| n.parse::<usize>().expect("REPEAT"));
                return dns_query(&name, server, repeat);
            }
            "--ca" => ca = Some(args.next().expect("--ca FILE")),
            "--cgroup" => egress_tests::join_cgroup(&args.next().expect("--cgroup DIR")),
            "--netns" => {
                let name = args.next().expect("--netns NAME");
                egress_tests::enter_netns(&name);
            }
            "--local-port" => {
                local_port = Some(
                    args.next()
                        .expect("--local-port N")
                        .parse::<u16>()
                        .expect("a port"),
                );
            }
            "--http" => {
                request = Some(
                    args.next()
                        .expect("--http REQUEST")
                        .replace("\\r\\n", "\r\n"),
                )
            }
            addr => targets.push(addr.parse::<SocketAddr>().expect("ADDR:PORT")),
        }
    }
    assert!(
        !targets.is_empty(),
        "usage: egress-probe [--cgroup DIR] [--netns NAME] [--local-port N] [--http REQUEST] \
         ADDR:PORT..."
    );
    let Some(request) = request else {
        return connect_once(targets[0], local_port);
    };
    let tls = tls_name.map(|name| {
        let ca = ca.expect("--tls needs --ca FILE");
        (name, tls_config(&ca))
    });
    let conns: Vec<_> = targets
        .iter()
        .map(|t| (t, connect(*t, local_port)))
        .collect();
    let mut failed = false;
    for (target, conn) in conns {
        let request = request.replace("{addr}", &target.to_string());
        let exchanged = conn.and_then(|mut s| match &tls {
            None => exchange(&mut s, &request),
            Some((name, config)) => exchange_tls(s, name, config, &request),
        });
        match exchanged {
            Ok(out) => print!("{out}"),
            Err(e) => {
                failed = true;
                println!("error {} {e}", e.raw_os_error().unwrap_or(0));
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// A connection to `target` (at most 3 s), from `local_port` if given.
fn connect(target: SocketAddr, local_port: Option<u16>) -> std::io::Result<TcpStream> {
    let Some(port) = local_port else {
        return TcpStream::connect_timeout(&target, Duration::from_secs(3));
    };
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(target),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    let any: std::net::IpAddr = if target.is_ipv4() {
        std::net::Ipv4Addr::UNSPECIFIED.into()
    } else {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    };
    socket.bind(&SocketAddr::new(any, port).into())?;
    socket.connect_timeout(&target.into(), Duration::from_secs(3))?;
    Ok(socket.into())
}

fn connect_once(target: SocketAddr, local_port: Option<u16>) -> ExitCode {
    match connect(target, local_port) {
        Ok(_) => {
            println!("connected");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("error {} {e}", e.raw_os_error().unwrap_or(0));
            ExitCode::FAILURE
        }
    }
}

/// A client configuration trusting only the CA certificates in the PEM file `ca`.
fn tls_config(ca: &str) -> std::sync::Arc<rustls::ClientConfig> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let pem = std::fs::read(ca).unwrap_or_else(|e| panic!("reading {ca}: {e}"));
    let mut roots = rustls::RootCertStore::empty();
    for cert in
        <rustls_pki_types::CertificateDer<'_> as rustls_pki_types::pem::PemObject>::pem_slice_iter(
            &pem,
        )
    {
        roots.add(cert.expect("a PEM certificate")).expect("a CA");
    }
    std::sync::Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// The app's own TLS to `name` over `stream`, then [`exchange`] over it.
fn exchange_tls(
    stream: TcpStream,
    name: &str,
    config: &std::sync::Arc<rustls::ClientConfig>,
    request: &str,
) -> std::io::Result<String> {
    let server = rustls_pki_types::ServerName::try_from(name.to_owned())
        .map_err(|e| std::io::Error::other(format!("tls: {e}")))?;
    let conn = rustls::ClientConnection::new(config.clone(), server)
        .map_err(|e| std::io::Error::other(format!("tls: {e}")))?;
    let mut tls = rustls::StreamOwned::new(conn, stream);
    tls.sock.set_read_timeout(Some(Duration::from_secs(10)))?;
    while tls.conn.is_handshaking() {
        tls.conn
            .complete_io(&mut tls.sock)
            .map_err(|e| std::io::Error::other(format!("tls: {e}")))?;
    }
    exchange(&mut tls, request)
}

/// Sends the request and reads until the server closes (or 10 s pass).
fn exchange<S: Read + Write + Peer>(stream: &mut S, request: &str) -> std::io::Result<String> {
    let peer = stream.peer()?;
    stream.write_all(request.as_bytes())?;
    let mut head = Vec::new();
    let mut total = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                total += n as u64;
                if head.len() < 4096 {
                    let take = n.min(4096 - head.len());
                    head.extend_from_slice(&buf[..take]);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            // A TLS server that closes without close_notify (the upstream's Connection: close).
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e),
        }
    }
    let text = String::from_utf8_lossy(&head);
    let status = text.lines().next().unwrap_or("");
    // Its pid, for tests that look for the process in the proxy's events.
    let pid = std::process::id();
    Ok(format!(
        "pid {pid}\npeer {peer}\nstatus {status}\nbytes {total}\nbegin\n{text}\nend\n"
    ))
}

/// The peer address of a connection, plain or under TLS.
trait Peer {
    fn peer(&self) -> std::io::Result<SocketAddr>;
}

impl Peer for TcpStream {
    fn peer(&self) -> std::io::Result<SocketAddr> {
        let peer = self.peer_addr()?;
        self.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(peer)
    }
}

impl Peer for rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    fn peer(&self) -> std::io::Result<SocketAddr> {
        self.sock.peer_addr()
    }
}

/// A query for `name` to `server` from an unconnected UDP socket, `repeat` times; prints where
/// the (last) answer came from and its addresses, and with `repeat > 1` each round trip.
fn dns_query(name: &str, server: SocketAddr, repeat: usize) -> ExitCode {
    use hickory_proto::{
        op::{Message, MessageType, OpCode, Query},
        rr::{Name, RData, RecordType},
    };
    let any: std::net::IpAddr = if server.is_ipv4() {
        std::net::Ipv4Addr::UNSPECIFIED.into()
    } else {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    };
    let socket = std::net::UdpSocket::bind((any, 0)).expect("a UDP socket");
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("a timeout");
    let mut latencies = Vec::with_capacity(repeat);
    let mut last = String::new();
    for i in 0..repeat.max(1) {
        let mut query = Message::new(i as u16, MessageType::Query, OpCode::Query);
        query.metadata.recursion_desired = true;
        query.add_query(Query::query(
            Name::from_ascii(format!("{name}.")).expect("a name"),
            RecordType::A,
        ));
        let bytes = query.to_vec().expect("a query");
        let start = std::time::Instant::now();
        if let Err(e) = socket.send_to(&bytes, server) {
            println!("error {} {e}", e.raw_os_error().unwrap_or(0));
            return ExitCode::FAILURE;
        }
        let mut buf = [0u8; 4096];
        let (n, from) = loop {
            match socket.recv_from(&mut buf) {
                // An answer to an earlier query that timed out: not this one's.
                Ok((n, _)) if n >= 2 && u16::from_be_bytes([buf[0], buf[1]]) != i as u16 => {}
                Ok(got) => break got,
                Err(e) => {
                    println!("error {} {e}", e.raw_os_error().unwrap_or(0));
                    return ExitCode::FAILURE;
                }
            }
        };
        latencies.push(start.elapsed().as_micros());
        let addrs: Vec<String> = Message::from_vec(&buf[..n])
            .map(|m| {
                m.answers
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::A(a) => Some(a.0.to_string()),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        last = format!("from {from} addrs {}", addrs.join(","));
    }
    println!("{last}");
    if repeat > 1 {
        let list: Vec<String> = latencies.iter().map(u128::to_string).collect();
        println!("latency_us {}", list.join(","));
    }
    ExitCode::SUCCESS
}
