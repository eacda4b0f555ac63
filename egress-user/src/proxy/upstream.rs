//! Reaching an upstream: resolve the allowed host (the policy's `hosts` first, then DNS),
//! refuse addresses a rebinding name could smuggle in, dial, and originate TLS for https.
//!
//! [`Connector`] is what the pooled HTTP client ([`hyper_util::client::legacy::Client`]) calls
//! for a new connection. The pool is keyed by scheme and authority, so a connection made for
//! `https://a.test:443` is only ever reused for that protocol and host. The app's original
//! destination address never reaches the policy's [`Dialer`]: the resolve result is what
//! counts (only audit mode's own pool dials it, see [`super::audit`]).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use http::uri::Scheme;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use ipnet::IpNet;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::policy::{Policy, Protocol};

/// A boxed future, as [`Resolve`] returns.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Turns a host name into addresses. The proxy treats every answer as untrusted (see
/// [`AddrFilter`]); only the policy's `hosts` entries are trusted.
pub trait Resolve: Send + Sync + 'static {
    /// The addresses of `host` (a normalised name, or an IP literal, IPv6 in brackets).
    fn resolve(&self, host: &str) -> BoxFuture<io::Result<Vec<IpAddr>>>;
}

/// The system resolver (`getaddrinfo`, through [`tokio::net::lookup_host`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve(&self, host: &str) -> BoxFuture<io::Result<Vec<IpAddr>>> {
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        Box::pin(async move {
            Ok(tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .map(|a| a.ip())
                .collect())
        })
    }
}

/// The upstream address of a response, from the connection that carried it (found in the
/// response's extensions).
#[derive(Clone, Copy, Debug)]
pub(crate) struct UpstreamAddr(pub(crate) SocketAddr);

/// Why a connection to an upstream could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The client asked for a URI without a host (a bug).
    #[error("invalid upstream uri {0}")]
    BadUri(String),
    /// The resolver failed.
    #[error("resolving {host}")]
    Resolve {
        /// The host.
        host: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The resolver answered with no address.
    #[error("{host} has no addresses")]
    NoAddresses {
        /// The host.
        host: String,
    },
    /// Every address was refused by the rebinding filter.
    #[error(
        "{host} resolves only to refused addresses ({addrs}): bypass, loopback, link-local or \
         unspecified ranges are reachable only through a policy `hosts` entry or a tcp rule"
    )]
    Refused {
        /// The host.
        host: String,
        /// The refused addresses, comma-separated.
        addrs: String,
    },
    /// The TCP connection failed.
    #[error("connecting to {addr}")]
    Tcp {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Resolving, connecting and the handshake together took too long.
    #[error("connecting to {host} timed out after {timeout:?}")]
    Timeout {
        /// The host.
        host: String,
        /// The limit.
        timeout: Duration,
    },
    /// The host is not a valid TLS server name.
    #[error("{host} is not a valid tls server name")]
    ServerName {
        /// The host.
        host: String,
    },
    /// The TLS handshake failed: wrong CA, wrong name, expired, protocol mismatch.
    #[error("tls handshake with {host} ({addr})")]
    Tls {
        /// The host, which was the SNI and the name verified.
        host: String,
        /// The address.
        addr: SocketAddr,
        /// The rustls error, inside an I/O error.
        #[source]
        source: io::Error,
    },
}

/// Decides which resolved addresses the proxy may dial (against DNS rebinding: an allowed
/// public name that resolves to the node's own services or the cloud metadata address).
#[derive(Clone, Debug)]
pub(crate) struct AddrFilter {
    refused: Vec<IpNet>,
    allowed: Vec<(IpNet, Vec<u16>)>,
}

/// Always refused unless trusted: loopback (the node's own services), link-local (cloud
/// metadata at 169.254.169.254), and unspecified (0.0.0.0 reaches the local host).
const ALWAYS_REFUSED: [&str; 6] = [
    "127.0.0.0/8",
    "::1/128",
    "169.254.0.0/16",
    "fe80::/10",
    "0.0.0.0/8",
    "::/128",
];

impl AddrFilter {
    pub(crate) fn new(policy: &Policy) -> Self {
        let mut refused: Vec<IpNet> = policy.bypass.clone();
        refused.extend(
            ALWAYS_REFUSED
                .iter()
                .map(|n| n.parse::<IpNet>().expect("valid literal")),
        );
        let allowed = policy
            .rules
            .iter()
            .map(|r| {
                let tcp = r.ports.iter().filter(|p| p.protocol == Protocol::Tcp);
                (r.destination, tcp.map(|p| p.port).collect())
            })
            .collect();
        Self { refused, allowed }
    }

    /// True when `ip:port`, an answer from DNS, may be dialled: outside every refused range, or
    /// inside a tcp rule that allows that port.
    pub(crate) fn allows(&self, ip: IpAddr, port: u16) -> bool {
        let ip = ip.to_canonical();
        !self.refused.iter().any(|n| n.contains(&ip))
            || self
                .allowed
                .iter()
                .any(|(n, ports)| n.contains(&ip) && ports.contains(&port))
    }
}

/// Where the upstream sockets of one pod's requests are made: in the pod's own network
/// namespace, so that they leave with the pod's address and under the CNI's policy for it.
pub trait Sockets: Send + Sync + 'static {
    /// A new TCP socket, IPv6 when `v6`, not yet connected.
    fn tcp(&self, v6: bool) -> BoxFuture<io::Result<tokio::net::TcpSocket>>;
}

/// Everything a new upstream connection needs; shared by every clone of the [`Connector`].
pub(crate) struct Dialer {
    pub(crate) hosts: HashMap<String, Vec<IpAddr>>,
    pub(crate) resolver: Arc<dyn Resolve>,
    pub(crate) filter: AddrFilter,
    pub(crate) tls: TlsConnector,
    pub(crate) connect_timeout: Duration,
}

impl Dialer {
    /// The addresses to try for `host:port`, trusted `hosts` entries as they are, DNS answers
    /// filtered.
    async fn addresses(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, ConnectError> {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        if let Some(ips) = self.hosts.get(bare) {
            return Ok(ips.iter().map(|&ip| SocketAddr::new(ip, port)).collect());
        }
        let ips = self
            .resolver
            .resolve(host)
            .await
            .map_err(|source| ConnectError::Resolve {
                host: host.to_owned(),
                source,
            })?;
        if ips.is_empty() {
            return Err(ConnectError::NoAddresses {
                host: host.to_owned(),
            });
        }
        let (ok, refused): (Vec<IpAddr>, Vec<IpAddr>) = ips
            .into_iter()
            .partition(|&ip| self.filter.allows(ip, port));
        if !refused.is_empty() {
            let addrs = refused
                .iter()
                .map(IpAddr::to_string)
                .collect::<Vec<_>>()
                .join(", ");
            tracing::warn!(
                host,
                addrs,
                "refusing upstream addresses in protected ranges"
            );
            if ok.is_empty() {
                return Err(ConnectError::Refused {
                    host: host.to_owned(),
                    addrs,
                });
            }
        }
        Ok(ok.into_iter().map(|ip| SocketAddr::new(ip, port)).collect())
    }

    /// Resolve, dial the first address that answers, and for https shake hands with SNI and
    /// verification against `host`.
    async fn connect(
        self: Arc<Self>,
        uri: Uri,
        sockets: Option<Arc<dyn Sockets>>,
    ) -> Result<UpstreamIo, ConnectError> {
        let host = uri
            .host()
            .ok_or_else(|| ConnectError::BadUri(uri.to_string()))?;
        let https = uri.scheme() == Some(&Scheme::HTTPS);
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let deadline = tokio::time::Instant::now() + self.connect_timeout;
        let (tcp, addr) = self.dial_host(host, port, sockets.as_deref()).await?;
        let stream = if https {
            let handshake = self.handshake(host, addr, tcp);
            tokio::time::timeout_at(deadline, handshake)
                .await
                .unwrap_or_else(|_| {
                    Err(ConnectError::Timeout {
                        host: host.to_owned(),
                        timeout: self.connect_timeout,
                    })
                })
                .map(|tls| Stream::Tls(Box::new(tls)))?
        } else {
            Stream::Plain(tcp)
        };
        Ok(UpstreamIo {
            io: TokioIo::new(stream),
            addr,
        })
    }

    /// Resolves `host` (the policy's `hosts` first; DNS answers filtered) and connects to the
    /// first of its addresses on `port` that answers, from `sockets` (a pod's namespace) when
    /// given, within the connect limit: the TCP stream and the address it reached.
    pub(crate) async fn dial_host(
        &self,
        host: &str,
        port: u16,
        sockets: Option<&dyn Sockets>,
    ) -> Result<(TcpStream, SocketAddr), ConnectError> {
        let timeout = self.connect_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let work = async {
            let addrs = self.addresses(host, port).await?;
            let mut last = None;
            for (i, &addr) in addrs.iter().enumerate() {
                // An address that drops SYNs must not eat the time the next one needs: each
                // try gets an equal share of what is left, at least a second.
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                let tries_left = u32::try_from(addrs.len() - i).unwrap_or(u32::MAX);
                let share = (left / tries_left).max(Duration::from_secs(1));
                let tried = tokio::time::timeout(share, dial(addr, sockets))
                    .await
                    .unwrap_or_else(|_| {
                        Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))
                    });
                match tried {
                    Ok(tcp) => {
                        let _ = tcp.set_nodelay(true);
                        return Ok((tcp, addr));
                    }
                    Err(source) => {
                        tracing::debug!(%addr, error = %source, "upstream address failed");
                        last = Some(ConnectError::Tcp { addr, source });
                    }
                }
            }
            Err(last.unwrap_or_else(|| ConnectError::NoAddresses {
                host: host.to_owned(),
            }))
        };
        tokio::time::timeout_at(deadline, work)
            .await
            .unwrap_or_else(|_| {
                Err(ConnectError::Timeout {
                    host: host.to_owned(),
                    timeout,
                })
            })
    }

    async fn handshake(
        &self,
        host: &str,
        addr: SocketAddr,
        tcp: TcpStream,
    ) -> Result<TlsStream<TcpStream>, ConnectError> {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let name = ServerName::try_from(bare.to_owned()).map_err(|_| ConnectError::ServerName {
            host: host.to_owned(),
        })?;
        self.tls
            .connect(name, tcp)
            .await
            .map_err(|source| ConnectError::Tls {
                host: host.to_owned(),
                addr,
                source,
            })
    }
}

/// Connects to `addr`, from a socket `sockets` makes when given (a pod's namespace), else from
/// the agent's own namespace.
pub(crate) async fn dial(addr: SocketAddr, sockets: Option<&dyn Sockets>) -> io::Result<TcpStream> {
    // Tests may only reach this machine: a filter bug must not send a packet anywhere else.
    if cfg!(test) && !addr.ip().to_canonical().is_loopback() {
        return Err(io::Error::other(format!(
            "test safety net: refusing to dial {addr}"
        )));
    }
    match sockets {
        Some(sockets) => sockets.tcp(addr.is_ipv6()).await?.connect(addr).await,
        None => TcpStream::connect(addr).await,
    }
}

/// The [`tower_service::Service`] a pooled client calls to open a connection: the policy's
/// [`Dialer`], or audit mode's pool to the apps' original destinations.
#[derive(Clone)]
pub(crate) enum Connector {
    /// The policy's way: hosts entries or filtered DNS answers, then TLS for https; from the
    /// sockets of a pod's namespace when there are any.
    Dialer(Arc<Dialer>, Option<Arc<dyn Sockets>>),
    /// [`super::audit::connect_direct`] within this connect limit.
    Direct { connect_timeout: Duration },
}

impl tower_service::Service<Uri> for Connector {
    type Response = UpstreamIo;
    type Error = ConnectError;
    type Future = BoxFuture<Result<UpstreamIo, ConnectError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        match self {
            Self::Dialer(dialer, sockets) => Box::pin(dialer.clone().connect(uri, sockets.clone())),
            Self::Direct { connect_timeout } => {
                Box::pin(super::audit::connect_direct(uri, *connect_timeout))
            }
        }
    }
}

/// A plain or TLS upstream stream.
pub(crate) enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(s) => s.is_write_vectored(),
            Self::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// An upstream connection as the HTTP client sees it; it reports its peer address.
pub(crate) struct UpstreamIo {
    io: TokioIo<Stream>,
    addr: SocketAddr,
}

impl UpstreamIo {
    /// A plain TCP connection to `addr`.
    pub(crate) fn plain(tcp: TcpStream, addr: SocketAddr) -> Self {
        Self {
            io: TokioIo::new(Stream::Plain(tcp)),
            addr,
        }
    }
}

impl Connection for UpstreamIo {
    fn connected(&self) -> Connected {
        Connected::new().extra(UpstreamAddr(self.addr))
    }
}

impl hyper::rt::Read for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for UpstreamIo {
    forward_writes_to!(io);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{PortRule, Rule};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn filter_refuses_protected_ranges_from_dns() {
        let policy = Policy {
            bypass: vec!["10.96.0.0/12".parse().unwrap()],
            ..Policy::default()
        };
        let f = AddrFilter::new(&policy);
        for refused in [
            "10.96.0.1",
            "169.254.169.254",
            "fe80::1",
            "127.0.0.1",
            "127.1.2.3",
            "::1",
            "0.0.0.0",
            "::",
            "::ffff:169.254.169.254",
            "::ffff:127.0.0.1",
            "::ffff:10.100.0.1",
        ] {
            assert!(!f.allows(ip(refused), 80), "{refused} allowed");
        }
        for allowed in [
            "10.0.0.1",
            "192.0.2.1",
            "2001:db8::1",
            "::ffff:192.0.2.1",
            "10.112.0.1",
        ] {
            assert!(f.allows(ip(allowed), 80), "{allowed} refused");
        }
    }

    /// A filter for a policy with one rule `name` for 169.254.169.254/32 port 80 over `protocol`.
    fn metadata_rule(name: &str, protocol: Protocol) -> AddrFilter {
        let rule = Rule {
            scope: None,
            name: name.into(),
            origin: crate::policy::Origin {
                file: "t".into(),
                line: 1,
            },
            destination: "169.254.169.254/32".parse().unwrap(),
            ports: vec![PortRule::new(80, protocol)],
        };
        AddrFilter::new(&Policy {
            rules: vec![std::sync::Arc::new(rule)],
            ..Policy::default()
        })
    }

    #[test]
    fn tcp_rule_on_the_port_lifts_the_refusal() {
        let f = metadata_rule("meta", Protocol::Tcp);
        assert!(f.allows(ip("169.254.169.254"), 80));
        assert!(!f.allows(ip("169.254.169.254"), 8080));
        assert!(!f.allows(ip("169.254.169.253"), 80));
    }

    #[test]
    fn a_udp_port_does_not_lift_the_refusal() {
        let f = metadata_rule("dns", Protocol::Udp);
        assert!(!f.allows(ip("169.254.169.254"), 80));
    }

    struct Fixed(Vec<IpAddr>);
    impl Resolve for Fixed {
        fn resolve(&self, _: &str) -> BoxFuture<io::Result<Vec<IpAddr>>> {
            let ips = self.0.clone();
            Box::pin(async move { Ok(ips) })
        }
    }

    fn dialer(policy: &Policy, dns: Vec<IpAddr>) -> Dialer {
        let tls =
            super::super::tls::client_config(&[], super::super::tls::SystemRoots::Skip).unwrap();
        Dialer {
            hosts: policy.hosts.clone().into_iter().collect(),
            resolver: Arc::new(Fixed(dns)),
            filter: AddrFilter::new(policy),
            tls: TlsConnector::from(tls),
            connect_timeout: Duration::from_secs(5),
        }
    }

    #[tokio::test]
    async fn hosts_entries_are_trusted_dns_answers_filtered() {
        let mut policy = Policy::default();
        policy
            .hosts
            .insert("trusted.test".into(), vec![ip("127.0.0.1")]);
        let d = dialer(
            &policy,
            vec![ip("169.254.1.1"), ip("127.0.0.1"), ip("192.0.2.7")],
        );
        let a = d.addresses("trusted.test", 80).await.unwrap();
        assert_eq!(a, vec!["127.0.0.1:80".parse().unwrap()]);
        let a = d.addresses("other.test", 81).await.unwrap();
        assert_eq!(a, vec!["192.0.2.7:81".parse().unwrap()]);

        let d = dialer(&policy, vec![ip("169.254.1.1"), ip("fe80::1")]);
        let e = d.addresses("rebind.test", 80).await.unwrap_err();
        assert!(
            e.to_string().starts_with(
                "rebind.test resolves only to refused addresses (169.254.1.1, fe80::1)"
            ),
            "{e}"
        );
    }
}
