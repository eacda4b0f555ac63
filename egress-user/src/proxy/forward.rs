//! One app connection ([`Conn`], shared by its requests) and one request: check its framing,
//! its authority and the policy, rewrite it for the upstream (hop-by-hop fields, Host for
//! aliases, the upstream URI), send it through the pool, and stream the answer back; or answer
//! it here with the error's status and a plain reason.

use std::net::SocketAddr;
use std::sync::Arc;

use http::header::{CONNECTION, CONTENT_TYPE, HOST};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::{Body as _, Incoming};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::sync::{mpsc, watch};
use tracing::Instrument as _;

use super::Proxy;
use super::audit;
use super::body::{ReqBody, RequestLog, RespBody};
use super::error::{ProxyError, Side};
use super::events::RequestEvent;
use super::framing::{Framing, Verdicts};
use super::headers::{strip_hop_by_hop, wants_upgrade};
use super::idle::{Activity, IdleTimer, Stalled, until_idle};
use super::route::parse_authority;
use super::upstream::UpstreamAddr;
use crate::policy::HttpProtocol;

/// Where a connection's requests find the proxy (policy) that judges them.
#[derive(Clone)]
pub(crate) enum Current {
    /// One policy for the proxy's life.
    Fixed(Arc<Proxy>),
    /// The policy in force when each request arrives: after a reload, the next request on a
    /// kept-alive connection is judged by the new policy.
    Live(watch::Receiver<Arc<Proxy>>),
}

impl Current {
    /// The proxy in force now.
    pub(crate) fn get(&self) -> Arc<Proxy> {
        match self {
            Self::Fixed(proxy) => proxy.clone(),
            Self::Live(proxies) => proxies.borrow().clone(),
        }
    }
}

/// One accepted app connection, shared by its requests.
pub(crate) struct Conn {
    /// The policy; read again for every request.
    pub(crate) current: Current,
    pub(crate) events: mpsc::Sender<RequestEvent>,
    /// The app's end (the accepted socket's peer).
    pub(crate) client: SocketAddr,
    /// Where the app wanted to go; `None`: not redirected.
    pub(crate) orig_dst: Option<SocketAddr>,
    pub(crate) verdicts: Verdicts,
    /// The process that connected, when the kernel recorded it.
    pub(crate) process: Option<super::Process>,
    /// The pod's namespace the connection came from, when it came in through a pod's listener.
    pub(crate) origin: Option<Arc<super::Origin>>,
}

impl Conn {
    /// The framing verdict of the next request head; the guard queued it before hyper could
    /// parse that head.
    pub(crate) fn next_verdict(&self) -> Framing {
        let mut q = self.verdicts.lock().unwrap_or_else(|e| e.into_inner());
        q.pop_front().unwrap_or(Framing::Untracked)
    }
}

impl Conn {
    /// Answers one request from the app.
    pub(crate) async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<RespBody> {
        let framing = self.next_verdict();
        let path = req.uri().path_and_query().cloned();
        // The policy in force as this request arrives judges all of it.
        let proxy = self.current.get();
        let mut log = RequestLog::new(self.clone(), proxy, req.method().clone(), path);
        // A body the proxy does not read leaves the stream mid-message: close after answering.
        let unread_body = !req.body().is_end_stream();
        let close = framing == Framing::Untracked;
        match self.forward(req, framing, &mut log).await {
            Ok((resp, client_upgrade, timer)) => respond(resp, client_upgrade, timer, log, close),
            Err(err) => answer(err, log, close || unread_body),
        }
    }

    async fn forward(
        &self,
        mut req: Request<Incoming>,
        framing: Framing,
        log: &mut RequestLog,
    ) -> Result<(Response<Incoming>, Option<OnUpgrade>, IdleTimer), ProxyError> {
        // RFC 9112 3.2.2: an absolute-form target wins over Host, which is then replaced.
        let absolute = req.uri().authority().is_some();
        let port = request_authority(&req).map(|(host, port)| {
            // Known before any refusal, so that every event names the host it can.
            log.host = host.into_owned();
            port
        });
        if let Framing::Ambiguous(why) = framing {
            return Err(ProxyError::AmbiguousFraming(why));
        }
        let orig = self.orig_dst.ok_or(ProxyError::NotRedirected {
            client: self.client,
        })?;
        if req.method() == Method::CONNECT {
            return Err(ProxyError::ConnectMethod);
        }
        let proxy = log.proxy.clone();
        let judged = port.and_then(|port| {
            if let Some(port) = port.filter(|&p| p != orig.port()) {
                return Err(ProxyError::PortMismatch {
                    request: port,
                    connection: orig.port(),
                });
            }
            let scope = self.origin.as_ref().and_then(|o| o.namespace.as_deref());
            proxy.routes.decide(&log.host, orig.port(), scope)
        });
        // `None`: audit mode passes the request on to where the app sent it.
        let target = match judged {
            Ok(target) => {
                log.slot = target.slot;
                Some(target)
            }
            Err(e) if proxy.audit && audit::passes_on(&e) => {
                log.would_deny = true;
                log.reason = Some(format!("{}: {e}", audit::WOULD_REFUSE));
                None
            }
            Err(e) => return Err(e),
        };

        let upgrade = wants_upgrade(req.headers());
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        strip_hop_by_hop(&mut parts.headers, upgrade);
        if let Some(host) = target.and_then(|t| t.host_header.as_ref()) {
            parts.headers.insert(HOST, host.clone());
        } else if absolute && let Some(a) = parts.uri.authority() {
            let host = HeaderValue::from_str(a.as_str())
                .map_err(|e| ProxyError::BuildRequest(e.into()))?;
            parts.headers.insert(HOST, host);
        }
        let authority = match target.map(|t| &t.authority) {
            Some(Some(a)) => a.clone(),
            Some(None) => Authority::try_from(format!("{}:{}", log.host, orig.port()))
                .map_err(|e| ProxyError::BuildRequest(e.into()))?,
            // Audit mode: the app's own destination, an address.
            None => Authority::try_from(orig.to_string())
                .map_err(|e| ProxyError::BuildRequest(e.into()))?,
        };
        let mut uri = http::uri::Parts::default();
        uri.scheme = Some(match target.map(|t| t.protocol) {
            Some(HttpProtocol::Https) => Scheme::HTTPS,
            Some(HttpProtocol::Http) | None => Scheme::HTTP,
            // `Routes::decide` never returns a passthrough port's target for a request.
            Some(HttpProtocol::Tls) => {
                return Err(ProxyError::Denied {
                    host: log.host.clone(),
                });
            }
        });
        uri.authority = Some(authority.clone());
        uri.path_and_query = Some(
            parts
                .uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
        );
        parts.uri = Uri::from_parts(uri).map_err(|e| ProxyError::BuildRequest(e.into()))?;
        parts.version = Version::HTTP_11;
        // The idle clock starts once the connect limit has passed: a slow connect is reported
        // as one (504 naming the connect), and then the upstream has the whole idle limit.
        let activity = Arc::new(Activity::new(proxy.timeouts.connect));
        let req = Request::from_parts(
            parts,
            ReqBody::new(body, log.bytes_in.clone(), activity.clone()),
        );
        let mut timer = IdleTimer::new(activity.clone(), proxy.timeouts.idle);
        let request = match target {
            Some(_) => proxy.client_for(self.origin.as_deref()).request(req),
            None => proxy.direct.request(req),
        };
        let sent = until_idle(&mut timer, request).await;
        let resp = match sent {
            Ok(Ok(resp)) => resp,
            // The app's body failed (malformed chunks, cut short): the client's fault, whatever
            // the upstream client made of it.
            Ok(Err(source)) => {
                return Err(match activity.take_app_error() {
                    Some(e) => ProxyError::RequestBody(e),
                    None => ProxyError::Upstream {
                        authority: authority.to_string(),
                        source,
                    },
                });
            }
            Err(Stalled::App) => {
                return Err(ProxyError::AppIdle {
                    idle: proxy.timeouts.idle,
                });
            }
            Err(Stalled::Upstream) => {
                return Err(ProxyError::UpstreamIdle {
                    authority: authority.to_string(),
                    idle: proxy.timeouts.idle,
                });
            }
        };
        log.upstream = resp.extensions().get::<UpstreamAddr>().map(|a| a.0);
        Ok((resp, client_upgrade, timer))
    }
}

/// The request's normalised host and explicit port, from the absolute-form URI or else the
/// single Host header.
fn request_authority<B>(
    req: &Request<B>,
) -> Result<(std::borrow::Cow<'_, str>, Option<u16>), ProxyError> {
    if let Some(a) = req.uri().authority() {
        return parse_authority(a.as_str());
    }
    let mut hosts = req.headers().get_all(HOST).iter();
    let host = hosts.next().ok_or(ProxyError::MissingHost)?;
    if hosts.next().is_some() {
        return Err(ProxyError::MultipleHosts);
    }
    let host = host.to_str().map_err(|_| {
        ProxyError::InvalidHost(String::from_utf8_lossy(host.as_bytes()).into_owned())
    })?;
    parse_authority(host)
}

/// The upstream's answer, on its way to the app: streamed, or for a 101 the two upgraded
/// connections joined.
fn respond(
    mut resp: Response<Incoming>,
    client_upgrade: Option<OnUpgrade>,
    timer: IdleTimer,
    mut log: RequestLog,
    close: bool,
) -> Response<RespBody> {
    log.status = resp.status().as_u16();
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some(client_upgrade) = client_upgrade else {
            let why = "upstream switched protocols without an upgrade request";
            tracing::warn!(host = %log.host, "{why}");
            log.status = StatusCode::BAD_GATEWAY.as_u16();
            log.reason = Some(why.to_owned());
            return plain(
                StatusCode::BAD_GATEWAY,
                format!("egress: {why}\n"),
                log,
                true,
            );
        };
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        let (mut parts, _) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers, true);
        tokio::spawn(tunnel(client_upgrade, upstream_upgrade, log).in_current_span());
        return Response::from_parts(parts, RespBody::empty());
    }
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers, false);
    // After an upgrade request the framing guard stopped; a refused upgrade ends the connection.
    if close || client_upgrade.is_some() {
        parts
            .headers
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    Response::from_parts(parts, RespBody::stream(body, timer, log))
}

/// Joins the app's and the upstream's upgraded connections until either side closes.
async fn tunnel(client: OnUpgrade, upstream: OnUpgrade, mut log: RequestLog) {
    match tokio::try_join!(client, upstream) {
        Ok((client, upstream)) => {
            let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
            match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                Ok((to_upstream, to_client)) => {
                    log.bytes_in
                        .store(to_upstream, std::sync::atomic::Ordering::Relaxed);
                    log.bytes_out = to_client;
                }
                Err(e) => log.reason = Some(format!("tunnel ended with an error: {e}")),
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "upgrade failed");
            log.reason = Some(format!("upgrade failed: {e}"));
        }
    }
}

/// The proxy's own answer to a request it did not forward.
fn answer(err: ProxyError, mut log: RequestLog, close: bool) -> Response<RespBody> {
    let status = err.status();
    let reason = err.reason();
    // The consumer of the events logs every request (and the proxy logs a failure whose event
    // is dropped): one line per request, not two.
    match err.side() {
        Side::Client => tracing::debug!(host = %log.host, %status, %reason, "request refused"),
        Side::Upstream => tracing::debug!(host = %log.host, %status, %reason, "upstream failed"),
        Side::Internal => tracing::error!(host = %log.host, %status, %reason, "internal error"),
    }
    let body = format!("egress: {reason}\n");
    log.status = status.as_u16();
    log.reason = Some(match log.reason.take() {
        // Audit mode passed it on, and then it failed: say both.
        Some(audit) if log.would_deny => format!("{audit}; then {reason}"),
        _ => reason,
    });
    plain(status, body, log, close || err.closes_connection())
}

fn plain(status: StatusCode, body: String, log: RequestLog, close: bool) -> Response<RespBody> {
    let mut resp = Response::new(RespBody::full(body, Some(log)));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if close {
        headers.insert(CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}
