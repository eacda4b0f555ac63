//! Upstream servers for the HTTP egress tests, inside a sandbox's network namespace: a plain
//! HTTP/1.1 server and a TLS one with a certificate from a CA the test generates. Each counts
//! and records what reached it (Host, path, TLS server name): the sink where "the upstream saw
//! nothing" is measured.

use std::{
    io::{BufRead as _, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

/// One request an upstream received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    /// The Host header.
    pub host: String,
    /// The request target.
    pub path: String,
    /// The TLS server name (SNI) of the connection, for the TLS server.
    pub sni: Option<String>,
    /// The client's address: where the connection came from.
    pub peer: Option<std::net::SocketAddr>,
}

/// A test certificate authority and what it signed.
pub struct TestCa {
    /// The CA certificate, PEM: what goes into `caFiles`.
    pub ca_pem: String,
    /// The server certificate chain, DER.
    pub chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    /// The server key, DER.
    pub key: rustls::pki_types::PrivateKeyDer<'static>,
}

impl TestCa {
    /// A fresh CA, and a server certificate from it for `names`.
    pub fn new(names: &[&str]) -> Self {
        let ca_key = rcgen::KeyPair::generate().expect("CA key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "egress test CA");
        let ca_cert = ca_params.self_signed(&ca_key).expect("CA certificate");
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().expect("server key");
        let params = rcgen::CertificateParams::new(
            names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>(),
        )
        .expect("server params");
        let cert = params.signed_by(&key, &issuer).expect("server certificate");
        Self {
            ca_pem: ca_cert.pem(),
            chain: vec![cert.der().clone()],
            key: rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        }
    }
}

/// An HTTP/1.1 server (plain or TLS) inside a sandbox.
pub struct Upstream {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Upstream {
    /// A plain HTTP server at `addr` in the namespace `netns`.
    pub fn http(netns: &str, addr: SocketAddr) -> Self {
        Self::start(netns, addr, None)
    }

    /// A TLS server at `addr` in `netns`, presenting `ca`'s server certificate.
    pub fn tls(netns: &str, addr: SocketAddr, ca: &TestCa) -> Self {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(ca.chain.clone(), ca.key.clone_key())
            .expect("server certificate");
        Self::start(netns, addr, Some(Arc::new(config)))
    }

    fn start(netns: &str, addr: SocketAddr, tls: Option<Arc<rustls::ServerConfig>>) -> Self {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (addr, thread) = {
            let (seen, stop) = (seen.clone(), stop.clone());
            crate::spawn_in_netns(netns, "upstream", move |tx| {
                let listener =
                    TcpListener::bind(addr).unwrap_or_else(|e| panic!("binding {addr}: {e}"));
                listener.set_nonblocking(true).expect("nonblocking");
                tx.send(listener.local_addr().expect("addr")).expect("send");
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            stream.set_nonblocking(false).expect("blocking");
                            let (seen, tls) = (seen.clone(), tls.clone());
                            thread::spawn(move || serve(stream, tls, &seen));
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            thread::sleep(Duration::from_millis(2));
                        }
                        Err(e) => panic!("accept: {e}"),
                    }
                }
            })
        };
        Self {
            addr,
            seen,
            stop,
            thread: Some(thread),
        }
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every request it has answered so far.
    pub fn seen(&self) -> Vec<Seen> {
        thread::sleep(Duration::from_millis(30));
        self.seen.lock().expect("seen").clone()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(stream: TcpStream, tls: Option<Arc<rustls::ServerConfig>>, seen: &Mutex<Vec<Seen>>) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(20)));
    let peer = stream.peer_addr().ok();
    match tls {
        None => {
            let _ = serve_http(stream, (None, peer), seen);
        }
        Some(config) => {
            let Ok(conn) = rustls::ServerConnection::new(config) else {
                return;
            };
            let mut tls = rustls::StreamOwned::new(conn, stream);
            // Finish the handshake to learn the server name the client sent.
            while tls.conn.is_handshaking() {
                if tls.conn.complete_io(&mut tls.sock).is_err() {
                    return;
                }
            }
            let sni = tls.conn.server_name().map(str::to_owned);
            let _ = serve_http(tls, (sni, peer), seen);
        }
    }
}

/// Answers HTTP/1.1 requests on one connection until the client closes or asks to.
/// `GET /big/N` answers with N bytes, produced as they are sent; anything else with a short
/// text naming what the server saw.
fn serve_http<S: Read + Write>(
    stream: S,
    (sni, peer): (Option<String>, Option<std::net::SocketAddr>),
    seen: &Mutex<Vec<Seen>>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream);
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line)? == 0 {
            return Ok(());
        }
        let mut host = String::new();
        let mut length = 0usize;
        let mut close = false;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                return Ok(());
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let (name, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.trim();
            match name.to_ascii_lowercase().as_str() {
                "host" => host = value.to_owned(),
                "content-length" => length = value.parse().unwrap_or(0),
                "connection" => close = value.eq_ignore_ascii_case("close"),
                _ => {}
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body)?;
        let path = request_line
            .split_whitespace()
            .nth(1)
            .unwrap_or("")
            .to_owned();
        seen.lock().expect("seen").push(Seen {
            host: host.clone(),
            path: path.clone(),
            sni: sni.clone(),
            peer,
        });
        let out = reader.get_mut();
        if let Some(n) = path
            .strip_prefix("/big/")
            .and_then(|n| n.parse::<u64>().ok())
        {
            write!(out, "HTTP/1.1 200 OK\r\nContent-Length: {n}\r\n\r\n")?;
            let chunk = vec![b'x'; 64 * 1024];
            let mut left = n;
            while left > 0 {
                let k = left.min(chunk.len() as u64) as usize;
                out.write_all(&chunk[..k])?;
                left -= k as u64;
            }
        } else {
            let body = format!(
                "upstream saw host={host} path={path} sni={}\n",
                sni.as_deref().unwrap_or("-")
            );
            write!(
                out,
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )?;
        }
        out.flush()?;
        if close {
            return Ok(());
        }
    }
}
