//! End-to-end tests of the proxy, over loopback only: a proxy on 127.0.0.1, upstreams on
//! 127.0.0.x, made-up names mapped by the policy's `hosts` or a map resolver (never DNS), and a
//! fake original-destination table. Denials are proven at the upstream: it saw nothing.

mod audit;
mod exchange;
mod http;
mod stream;
mod tls;

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt as _;
use http_body_util::combinators::BoxBody;
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;

use super::{BoxFuture, Proxy, ProxyBuilder, RequestEvent, Resolve};
use crate::policy::{HostPattern, HttpPort, HttpProtocol, HttpRule, Origin, Policy};

/// Generous: a test that needs it has failed anyway.
const WAIT: Duration = Duration::from_secs(10);

pub(super) type TestBody = BoxBody<Bytes, Infallible>;
type Handler = Arc<dyn Fn(Request<Incoming>) -> BoxFuture<Response<TestBody>> + Send + Sync>;

pub(super) fn full(s: impl Into<Bytes>) -> TestBody {
    http_body_util::Full::new(s.into()).boxed()
}

/// A body fed from a channel, for upstreams that stream.
pub(super) struct ChannelBody(pub(super) mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.get_mut()
            .0
            .poll_recv(cx)
            .map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

/// What an upstream saw of one request.
#[derive(Clone, Debug)]
pub(super) struct Seen {
    pub(super) method: String,
    pub(super) uri: String,
    pub(super) headers: hyper::HeaderMap,
}

/// A test upstream on loopback that counts connections and records requests.
pub(super) struct Upstream {
    pub(super) addr: SocketAddr,
    pub(super) conns: Arc<AtomicUsize>,
    pub(super) seen: Arc<Mutex<Vec<Seen>>>,
    pub(super) sni: Arc<Mutex<Vec<Option<String>>>>,
}

impl Upstream {
    /// Plain HTTP on `ip:0`, answering with [`echo`].
    pub(super) async fn start(ip: &str) -> Self {
        Self::with(&format!("{ip}:0"), None, handler(echo)).await
    }

    /// Plain or TLS on `addr`, answering with `handler`.
    pub(super) async fn with(
        addr: &str,
        tls: Option<Arc<rustls::ServerConfig>>,
        handler: Handler,
    ) -> Self {
        let listener = TcpListener::bind(addr)
            .await
            .unwrap_or_else(|e| panic!("binding a test upstream on {addr}: {e}"));
        let up = Upstream {
            addr: listener.local_addr().unwrap(),
            conns: Arc::default(),
            seen: Arc::default(),
            sni: Arc::default(),
        };
        let (conns, seen, sni) = (up.conns.clone(), up.seen.clone(), up.sni.clone());
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                conns.fetch_add(1, Ordering::SeqCst);
                let (seen, sni, handler, acceptor) =
                    (seen.clone(), sni.clone(), handler.clone(), acceptor.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        seen.lock().unwrap().push(Seen {
                            method: req.method().to_string(),
                            uri: req.uri().to_string(),
                            headers: req.headers().clone(),
                        });
                        let f = handler(req);
                        async move { Ok::<_, Infallible>(f.await) }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    let _ = match acceptor {
                        None => {
                            http.serve_connection(TokioIo::new(tcp), service)
                                .with_upgrades()
                                .await
                        }
                        Some(acceptor) => {
                            let Ok(tls) = acceptor.accept(tcp).await else {
                                return;
                            };
                            sni.lock()
                                .unwrap()
                                .push(tls.get_ref().1.server_name().map(str::to_owned));
                            http.serve_connection(TokioIo::new(tls), service)
                                .with_upgrades()
                                .await
                        }
                    };
                });
            }
        });
        up
    }

    pub(super) fn requests(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    pub(super) fn last(&self) -> Seen {
        self.seen
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("the upstream saw a request")
    }
}

pub(super) fn handler<F, Fut>(f: F) -> Handler
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<TestBody>> + Send + 'static,
{
    Arc::new(move |req| Box::pin(f(req)))
}

/// Answers 200 with `host=<Host> path=<path> body=<bytes read>`.
pub(super) async fn echo(req: Request<Incoming>) -> Response<TestBody> {
    let host = req
        .headers()
        .get("host")
        .map(|h| h.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let path = req.uri().path().to_owned();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes().len())
        .unwrap_or(0);
    Response::new(full(format!("host={host} path={path} body={body}")))
}

/// Resolves from a fixed map, as DNS would (untrusted); `hang.test` never answers; anything
/// else is not found. Tests never reach real DNS.
#[derive(Default)]
pub(super) struct MapResolver(pub(super) HashMap<String, Vec<IpAddr>>);

impl Resolve for MapResolver {
    fn resolve(&self, host: &str) -> BoxFuture<io::Result<Vec<IpAddr>>> {
        if host == "hang.test" {
            return Box::pin(std::future::pending());
        }
        let r = self
            .0
            .get(host)
            .cloned()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such test name"));
        Box::pin(async move { r })
    }
}

pub(super) fn origin() -> Origin {
    Origin {
        file: "test.yaml".into(),
        line: 1,
    }
}

pub(super) fn rule(name: &str, host: &str, port: u16, protocol: HttpProtocol) -> HttpRule {
    let host = match host.strip_prefix("*.") {
        Some(suffix) => HostPattern::Wildcard(suffix.into()),
        None => HostPattern::Exact(host.into()),
    };
    HttpRule {
        scope: None,
        name: name.into(),
        origin: origin(),
        host,
        ports: vec![HttpPort { port, protocol }],
    }
}

/// A policy whose `hosts` map every given name to 127.0.0.1.
pub(super) fn policy(rules: Vec<HttpRule>, names: &[&str]) -> Policy {
    let mut p = Policy {
        http_rules: rules,
        ..Policy::default()
    };
    for n in names {
        p.hosts
            .insert((*n).to_owned(), vec!["127.0.0.1".parse().unwrap()]);
    }
    p
}

/// A running proxy on 127.0.0.1 with a fake original-destination table.
pub(super) struct Harness {
    pub(super) proxy: Arc<Proxy>,
    pub(super) addr: SocketAddr,
    pub(super) events: mpsc::Receiver<RequestEvent>,
    orig: Arc<Mutex<HashMap<SocketAddr, SocketAddr>>>,
}

impl Harness {
    pub(super) async fn start(policy: Policy) -> Self {
        Self::build(Proxy::builder(&policy).resolver(Arc::new(MapResolver::default()))).await
    }

    pub(super) async fn build(builder: ProxyBuilder<'_>) -> Self {
        let proxy = Arc::new(
            builder
                .without_system_roots()
                .build()
                .expect("proxy builds"),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let orig: Arc<Mutex<HashMap<SocketAddr, SocketAddr>>> = Arc::default();
        let table = orig.clone();
        let lookup = move |peer: SocketAddr| table.lock().unwrap().get(&peer).copied();
        let (tx, events) = mpsc::channel(1024);
        tokio::spawn(proxy.clone().serve(listener, Arc::new(lookup), tx));
        Harness {
            proxy,
            addr,
            events,
            orig,
        }
    }

    /// A proxy whose policy has one plain-http rule `name` for `host` on `port`, with `host`
    /// mapped to 127.0.0.1.
    pub(super) async fn one_rule(name: &str, host: &str, port: u16) -> Self {
        Self::start(policy(
            vec![rule(name, host, port, HttpProtocol::Http)],
            &[host],
        ))
        .await
    }

    /// A connection that the fake kernel redirected from `orig`.
    pub(super) async fn connect(&self, orig: SocketAddr) -> Client {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        self.orig
            .lock()
            .unwrap()
            .insert(socket.local_addr().unwrap(), orig);
        Client::new(socket.connect(self.addr).await.unwrap())
    }

    /// A connection the kernel knows nothing about.
    pub(super) async fn connect_unredirected(&self) -> Client {
        Client::new(TcpStream::connect(self.addr).await.unwrap())
    }

    pub(super) async fn event(&mut self) -> RequestEvent {
        tokio::time::timeout(WAIT, self.events.recv())
            .await
            .expect("an event in time")
            .expect("events open")
    }
}

/// An [`echo`] upstream on 127.0.0.1, its port, and a proxy allowing `httpbin.test` there
/// (rule `web`): the setup most plain-HTTP tests share.
pub(super) async fn httpbin() -> (Upstream, u16, Harness) {
    let up = Upstream::start("127.0.0.1").await;
    let port = up.addr.port();
    let h = Harness::one_rule("web", "httpbin.test", port).await;
    (up, port, h)
}

/// The original destination the tests pretend the app asked for: a loopback address nothing
/// listens on, so dialling it instead of resolving the host would fail.
pub(super) fn orig(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 9], port))
}

/// A parsed response.
#[derive(Debug)]
pub(super) struct Resp {
    pub(super) status: u16,
    pub(super) headers: Vec<(String, String)>,
    pub(super) body: Vec<u8>,
}

impl Resp {
    pub(super) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub(super) fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Asserts the status and that the body says `part`, showing the body if not.
    #[track_caller]
    pub(super) fn assert_says(&self, status: u16, part: &str) {
        assert_eq!(self.status, status, "{}", self.text());
        assert!(self.text().contains(part), "{}", self.text());
    }

    /// Asserts the status and the whole body.
    #[track_caller]
    pub(super) fn assert_is(&self, status: u16, text: &str) {
        assert_eq!((self.status, self.text().as_str()), (status, text));
    }

    /// Asserts a 200 from [`echo`] for `host` (the Host it got) and `path`, with no body.
    #[track_caller]
    pub(super) fn assert_echoed(&self, host: &str, path: &str) {
        assert_eq!(self.status, 200, "{}", self.text());
        assert_eq!(self.text(), format!("host={host} path={path} body=0"));
    }
}

/// A raw HTTP/1.1 client, so tests control every byte (pipelining, bad framing).
pub(super) struct Client {
    pub(super) io: BufReader<TcpStream>,
}

impl Client {
    pub(super) fn new(s: TcpStream) -> Self {
        Self {
            io: BufReader::new(s),
        }
    }

    pub(super) async fn send(&mut self, raw: &str) {
        self.io.get_mut().write_all(raw.as_bytes()).await.unwrap();
    }

    /// Sends `raw` and reads the response to it.
    pub(super) async fn exchange(&mut self, raw: &str) -> Resp {
        self.send(raw).await;
        self.response().await
    }

    pub(super) async fn get(&mut self, host: &str, path: &str) -> Resp {
        self.exchange(&format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n"))
            .await
    }

    /// Reads the head of the next response: status and headers.
    pub(super) async fn head(&mut self) -> (u16, Vec<(String, String)>) {
        let mut line = String::new();
        tokio::time::timeout(WAIT, self.io.read_line(&mut line))
            .await
            .expect("a response in time")
            .unwrap();
        let status = line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("status line {line:?}"));
        let mut headers = Vec::new();
        loop {
            line.clear();
            self.io.read_line(&mut line).await.unwrap();
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            let (k, v) = l.split_once(':').expect("header line");
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
        (status, headers)
    }

    pub(super) async fn response(&mut self) -> Resp {
        let (status, headers) = self.head().await;
        let mut resp = Resp {
            status,
            headers,
            body: Vec::new(),
        };
        if resp
            .header("transfer-encoding")
            .is_some_and(|t| t.contains("chunked"))
        {
            loop {
                let mut line = String::new();
                self.io.read_line(&mut line).await.unwrap();
                let n = usize::from_str_radix(line.trim(), 16).unwrap();
                let mut chunk = vec![0; n + 2];
                self.io.read_exact(&mut chunk).await.unwrap();
                if n == 0 {
                    break;
                }
                resp.body.extend_from_slice(&chunk[..n]);
            }
        } else if let Some(n) = resp.header("content-length") {
            resp.body = vec![0; n.parse().unwrap()];
            self.io.read_exact(&mut resp.body).await.unwrap();
        } else if !(status == 101 || status == 204 || status == 304) {
            self.io.read_to_end(&mut resp.body).await.unwrap();
        }
        resp
    }

    /// Fills `buf` from the connection, failing the test after [`WAIT`].
    pub(super) async fn read_in_time(&mut self, buf: &mut [u8]) {
        tokio::time::timeout(WAIT, self.io.read_exact(buf))
            .await
            .expect("the bytes in time")
            .unwrap();
    }

    /// True when the proxy closed the connection (after any bytes still unread).
    pub(super) async fn closed(&mut self) -> bool {
        let mut rest = Vec::new();
        matches!(
            tokio::time::timeout(WAIT, self.io.read_to_end(&mut rest)).await,
            Ok(Ok(_))
        )
    }
}
