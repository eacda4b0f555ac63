//! The accept loop and one app connection: admission (see [`super::admission`]), a span per
//! connection, a peek at the first byte (a TLS ClientHello is refused; in audit mode, a
//! connection that does not start like HTTP is relayed, see [`super::audit`]), then hyper's
//! HTTP/1.1 server with keep-alive and upgrades over the [`FramingGuard`].
//!
//! Time bounds on a client that sends slowly: the peek waits at most `header_read` for a first
//! byte, and hyper then gives each request head `header_read` in all (not per byte), so a
//! client that sends one byte every few seconds is cut after at most twice `header_read`.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tracing::Instrument as _;

use super::admission::{Admission, Limits};
use super::events::RequestEvent;
use super::forward::{Conn, Current};
use super::framing::FramingGuard;
use super::{OrigDst, Proxy};
use super::{audit, hello, passthrough};

/// A listener inside a pod's network namespace: the namespace's cookie (the kernel's record of
/// each redirect names it) and where upstream sockets for its connections are made.
pub struct Origin {
    /// The namespace's cookie.
    pub netns: u64,
    /// Makes the namespace's upstream sockets.
    pub sockets: Arc<dyn super::Sockets>,
    /// The pod's Kubernetes namespace: the rules of that namespace apply to its requests,
    /// besides the node-wide ones.
    pub namespace: Option<String>,
    /// The pod, `namespace/name`, as events name it.
    pub pod: Option<String>,
}

impl Proxy {
    /// Accepts app connections on `listener` and serves each on its own task, until the
    /// listener fails with an error that is not about one connection (or this future is
    /// dropped). `orig_dst` tells where each connection was going; every request and every
    /// refused connection is reported on `events`, without ever waiting for room in it.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        orig_dst: Arc<dyn OrigDst>,
        events: mpsc::Sender<RequestEvent>,
    ) -> io::Result<()> {
        let admission = Arc::new(Admission::new(Limits::UNLIMITED));
        let current = Current::Fixed(self);
        accept_loop(current, listener, (orig_dst, None), events, admission).await
    }

    /// As [`Proxy::serve`], for a policy that changes: each request is judged by the proxy
    /// `proxies` holds when the request arrives, so a reload (send a new `Proxy` for the new
    /// policy) applies at once, to kept-alive connections too, without closing the listener.
    /// A request already under way finishes with the proxy it started with. Counters belong
    /// to each `Proxy`. `admission` bounds the connections held (shared by every listener of
    /// the agent): a connection it has no room for is closed at once. A listener inside a
    /// pod's network namespace has its `origin`: its connections' upstream sockets are made
    /// there.
    pub async fn serve_reloadable(
        proxies: watch::Receiver<Arc<Proxy>>,
        listener: TcpListener,
        (orig_dst, origin): (Arc<dyn OrigDst>, Option<Arc<Origin>>),
        events: mpsc::Sender<RequestEvent>,
        admission: Arc<Admission>,
    ) -> io::Result<()> {
        let current = Current::Live(proxies);
        accept_loop(current, listener, (orig_dst, origin), events, admission).await
    }
}

async fn accept_loop(
    current: Current,
    listener: TcpListener,
    (orig_dst, origin): (Arc<dyn OrigDst>, Option<Arc<Origin>>),
    events: mpsc::Sender<RequestEvent>,
    admission: Arc<Admission>,
) -> io::Result<()> {
    tracing::info!(listen = %listener.local_addr()?, "http egress proxy listening");
    loop {
        let (stream, client) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) if accept_error_is_per_connection(&e) => {
                tracing::warn!(error = %e, "accept failed; going on");
                // Out of descriptors: give connections a moment to close.
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        // No room: closed before it costs anything more (the admission counts and logs it).
        let Some(ticket) = admission.admit(client.ip(), head_waiting(&stream)) else {
            continue;
        };
        let ticket = Arc::new(ticket);
        let (orig, process) = match orig_dst.lookup_with_process(client) {
            Some((dst, process)) => (Some(dst), process),
            None => (None, None),
        };
        let span = tracing::info_span!(
            "proxy_conn",
            %client,
            orig_dst = orig.map(tracing::field::display),
        );
        let conn = connection(
            current.clone(),
            stream,
            client,
            (orig, process),
            (events.clone(), origin.clone()),
            ticket.clone(),
        );
        let held = async move {
            tokio::select! {
                () = conn => {}
                () = ticket.evicted() => {
                    tracing::debug!("no request yet and the proxy is full: closed to make room");
                }
            }
        };
        tokio::spawn(held.instrument(span));
    }
}

/// Whether a whole request head (up to its blank line) already waits on a just-accepted
/// connection: a peek that never waits (a no-op waker; the connection's task peeks again and
/// registers its own). A head longer than the peek buffer counts as not there yet.
fn head_waiting(stream: &TcpStream) -> bool {
    let mut buf = [0u8; 2048];
    let mut read = tokio::io::ReadBuf::new(&mut buf);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match stream.poll_peek(&mut cx, &mut read) {
        std::task::Poll::Ready(Ok(_)) => read.filled().windows(4).any(|w| w == b"\r\n\r\n"),
        _ => false,
    }
}

/// Accept errors that concern one connection or a passing shortage, not the listener: an
/// accept loop logs them and goes on.
pub fn accept_error_is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ECONNABORTED
                | libc::ECONNRESET
                | libc::EINTR
                | libc::EMFILE
                | libc::ENFILE
                | libc::ENOBUFS
                | libc::ENOMEM
                | libc::EPROTO
                | libc::EPERM
                | libc::ETIMEDOUT
        )
    )
}

async fn connection(
    current: Current,
    stream: TcpStream,
    client: SocketAddr,
    (orig_dst, process): (Option<SocketAddr>, Option<super::Process>),
    (events, origin): (mpsc::Sender<RequestEvent>, Option<Arc<Origin>>),
    ticket: Arc<super::admission::Ticket>,
) {
    let _ = stream.set_nodelay(true);
    // Connection-level settings (time limits) come from the policy in force at accept().
    let proxy = current.get();
    let mut first = [0u8; 1];
    match tokio::time::timeout(proxy.timeouts.header_read, stream.peek(&mut first)).await {
        Ok(Ok(1..)) => {}
        Ok(Ok(_)) => return, // closed before sending anything
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "connection failed before a request");
            return;
        }
        Err(_) => {
            tracing::debug!("no request in time; closing");
            return;
        }
    }
    let mut refused = None;
    if first[0] == hello::HANDSHAKE {
        let port = orig_dst.map_or(443, |d| d.port());
        match passthrough::judge(&proxy, &stream, port, origin.as_deref()).await {
            passthrough::Judged::Allowed { sni, slot } => {
                let at = (sni, slot, port);
                let to = (&events, origin);
                return passthrough::relay(&proxy, stream, client, (orig_dst, process), to, at)
                    .await;
            }
            passthrough::Judged::Refused { why, .. } => refused = Some(why),
        }
    }
    if proxy.audit
        && !audit::starts_http(first[0])
        && let Some(orig) = orig_dst
    {
        return audit::relay(&proxy, stream, client, (orig, process), &events).await;
    }
    if let Some(why) = refused {
        return refuse_tls(&proxy, stream, client, (orig_dst, process), &events, why).await;
    }

    let guard = FramingGuard::new(stream);
    let conn = Arc::new(Conn {
        current,
        events,
        client,
        orig_dst,
        verdicts: guard.verdicts(),
        process,
        origin,
    });
    let service = service_fn(move |req| {
        // A whole request head arrived: this connection is no longer one to evict.
        ticket.served();
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(conn.handle(req).await) }
    });
    let served = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(proxy.timeouts.header_read)
        .keep_alive(true)
        .serve_connection(TokioIo::new(guard), service)
        .with_upgrades()
        .await;
    if let Err(e) = served {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// The app did its own TLS on an HTTP egress port and no `tls` rule allows it
/// ([`passthrough::judge`] says why): answered with an alert, reported with its SNI.
async fn refuse_tls(
    proxy: &Proxy,
    mut stream: TcpStream,
    client: SocketAddr,
    (orig_dst, process): (Option<SocketAddr>, Option<super::Process>),
    events: &mpsc::Sender<RequestEvent>,
    reason: String,
) {
    let start = Instant::now();
    let sni = hello::read_sni_and_refuse(&mut stream).await;
    drop(stream);
    tracing::debug!(sni = sni.as_deref().unwrap_or(""), "{reason}");
    let counters = &proxy.counters;
    counters.record(counters.no_rule(), 0, true, 0, 0);
    let host = sni.unwrap_or_default();
    let event = RequestEvent::connection(proxy, host, client, (orig_dst, process), start, reason);
    counters.emit(events, event);
}
