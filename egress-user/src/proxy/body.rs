//! Bodies that stream through the proxy frame by frame (never collected), counting bytes on
//! the way, and [`RequestLog`], which reports a request once its response is over.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::Method;
use http::uri::PathAndQuery;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::Proxy;
use super::error::BodyError;
use super::events::RequestEvent;
use super::forward::Conn;
use super::idle::{Activity, IdleTimer};

/// What is known about one request; on drop (the response body finished or was abandoned, or
/// the tunnel closed) it counts the request and sends its [`RequestEvent`].
pub(crate) struct RequestLog {
    conn: Arc<Conn>,
    /// The policy that judges this request (and counts it).
    pub(crate) proxy: Arc<Proxy>,
    start: Instant,
    method: Method,
    path: Option<PathAndQuery>,
    /// The normalised host, once known.
    pub(crate) host: String,
    /// The counters slot: the rule's or alias's, or "no rule".
    pub(crate) slot: usize,
    /// The status sent to the app.
    pub(crate) status: u16,
    /// Body bytes read from the app, counted by [`ReqBody`].
    pub(crate) bytes_in: Arc<AtomicU64>,
    /// Body bytes sent to the app.
    pub(crate) bytes_out: u64,
    /// The upstream address, once connected.
    pub(crate) upstream: Option<SocketAddr>,
    /// Why the proxy answered itself, or why the body ended early.
    pub(crate) reason: Option<String>,
    /// Audit mode passed the request on; enforce would refuse it.
    pub(crate) would_deny: bool,
}

impl RequestLog {
    pub(crate) fn new(
        conn: Arc<Conn>,
        proxy: Arc<Proxy>,
        method: Method,
        path: Option<PathAndQuery>,
    ) -> Self {
        let slot = proxy.counters.no_rule();
        Self {
            conn,
            proxy,
            start: Instant::now(),
            method,
            path,
            host: String::new(),
            slot,
            status: 0,
            bytes_in: Arc::default(),
            bytes_out: 0,
            upstream: None,
            reason: None,
            would_deny: false,
        }
    }
}

impl Drop for RequestLog {
    fn drop(&mut self) {
        let counters = &self.proxy.counters;
        let bytes_in = self.bytes_in.load(Relaxed);
        if self.would_deny {
            counters.record_would_deny(self.slot, self.status, bytes_in, self.bytes_out);
        } else {
            let denied = self.status == 403;
            counters.record(self.slot, self.status, denied, bytes_in, self.bytes_out);
        }
        let event = RequestEvent {
            rule: counters.name(self.slot).map(str::to_owned),
            host: std::mem::take(&mut self.host),
            method: self.method.as_str().to_owned(),
            path: self
                .path
                .as_ref()
                .map_or_else(String::new, |p| p.as_str().to_owned()),
            status: self.status,
            bytes_in,
            bytes_out: self.bytes_out,
            latency: self.start.elapsed(),
            client: self.conn.client,
            orig_dst: self.conn.orig_dst,
            upstream: self.upstream,
            reason: self.reason.take(),
            would_deny: self.would_deny,
            generation: self.proxy.generation(),
            process: self.conn.process.clone(),
        };
        counters.emit(&self.conn.events, event);
    }
}

/// The app's request body on its way upstream, counted; every frame is activity, and a
/// failure is kept in the [`Activity`] as the app's.
pub(crate) struct ReqBody {
    inner: Incoming,
    count: Arc<AtomicU64>,
    activity: Arc<Activity>,
}

impl ReqBody {
    pub(crate) fn new(inner: Incoming, count: Arc<AtomicU64>, activity: Arc<Activity>) -> Self {
        Self {
            inner,
            count,
            activity,
        }
    }
}

/// What the upstream client is told when the app's body fails; the real error waits in the
/// [`Activity`] for the one who answers the app.
#[derive(Debug, thiserror::Error)]
#[error("the app's request body failed")]
pub(crate) struct AppBodyFailed;

impl Body for ReqBody {
    type Data = Bytes;
    type Error = AppBodyFailed;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, AppBodyFailed>>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        this.activity.set_app_pending(r.is_pending());
        match r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    this.count.fetch_add(d.len() as u64, Relaxed);
                }
                this.activity.touch();
                Poll::Ready(Some(Ok(f)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.activity.app_failed(e);
                Poll::Ready(Some(Err(AppBodyFailed)))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

enum Kind {
    /// The upstream's body, and the timer that cuts it when the exchange goes idle.
    Stream(Incoming, IdleTimer),
    Full(Option<Bytes>),
}

/// The body the app gets: the upstream's, streamed, or one the proxy wrote.
pub(crate) struct RespBody {
    kind: Kind,
    log: Option<RequestLog>,
}

impl RespBody {
    /// The upstream's body, streamed, and cut (the app's connection closed) once nothing has
    /// moved either way for the timer's limit; `log` is reported when it ends.
    pub(crate) fn stream(body: Incoming, timer: IdleTimer, log: RequestLog) -> Self {
        Self {
            kind: Kind::Stream(body, timer),
            log: Some(log),
        }
    }

    /// A body the proxy wrote; `log`, if any, is reported when it has been sent.
    pub(crate) fn full(bytes: impl Into<Bytes>, log: Option<RequestLog>) -> Self {
        Self {
            kind: Kind::Full(Some(bytes.into())),
            log,
        }
    }

    /// No body (a 101 answer, whose log goes with the tunnel).
    pub(crate) fn empty() -> Self {
        Self {
            kind: Kind::Full(None),
            log: None,
        }
    }

    fn sent(&mut self, n: usize) {
        if let Some(log) = &mut self.log {
            log.bytes_out += n as u64;
        }
    }
}

impl Body for RespBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let r = match &mut this.kind {
            Kind::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Kind::Stream(s, timer) => match Pin::new(s).poll_frame(cx) {
                Poll::Ready(Some(Ok(f))) => {
                    timer.touch();
                    Poll::Ready(Some(Ok(f)))
                }
                Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(BodyError::Upstream(e)))),
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending if timer.poll_expired(cx) => {
                    Poll::Ready(Some(Err(BodyError::Idle(timer.idle()))))
                }
                Poll::Pending => Poll::Pending,
            },
        };
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    this.sent(d.len());
                }
            }
            Poll::Ready(Some(Err(e))) => {
                let reason = super::error::chain(e);
                tracing::debug!(%reason, "response body cut");
                if let Some(log) = &mut this.log {
                    log.reason = Some(reason);
                }
                this.log = None;
            }
            // The end: report now rather than when hyper gets round to dropping the body.
            Poll::Ready(None) => this.log = None,
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(b) => b.is_none(),
            Kind::Stream(s, _) => s.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Stream(s, _) => s.size_hint(),
        }
    }
}
