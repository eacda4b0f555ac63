//! The metrics endpoint: `/metrics`, `/healthz` and `/readyz` over HTTP/1.1.

use std::{convert::Infallible, io, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{
    Method, Request, Response, StatusCode,
    header::{ALLOW, CONTENT_TYPE as CONTENT_TYPE_HEADER, HeaderValue},
};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::watch};

use super::{CONTENT_TYPE, KernelSnapshot, Metrics};

/// How long a client may take to send a request head, idle keep-alive time included: a
/// client that opens a connection and sends nothing (or a byte a minute) is cut off then.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest request head accepted (hyper answers 431 above it); a scraper sends a few hundred
/// bytes.
pub(super) const MAX_HEADER_SIZE: usize = 16 * 1024;

/// What keeps the agent from doing its job (one line each); empty: healthy.
pub type HealthCheck = Arc<dyn Fn() -> Vec<String> + Send + Sync>;

/// What every connection's handler shares.
pub(super) struct Endpoints {
    pub(super) metrics: Arc<Metrics>,
    pub(super) snapshot: Arc<dyn Fn() -> KernelSnapshot + Send + Sync>,
    pub(super) ready: watch::Receiver<bool>,
    pub(super) health: HealthCheck,
}

/// Serves `GET /metrics` ([`Metrics::encode`] with a fresh `snapshot()` per scrape),
/// `GET /healthz` (200 `ok` while `health()` finds nothing wrong, else 503 `unhealthy` and
/// one line per problem) and `GET /readyz` (200 `ready` while `*ready.borrow()` is true, else
/// 503 `not ready`); 404 for other paths, 405 for other methods. Runs until the listener fails
/// with an error that is not about one connection.
///
/// Each connection is served on its own task by hyper's HTTP/1.1 server, with keep-alive; a
/// client has [`HEADER_READ_TIMEOUT`] to send each request head, and a head may be 16 KiB.
/// At most [`METRICS_CONNECTIONS`](crate::fds::METRICS_CONNECTIONS) are served at once; a
/// further one is closed at accept, so the endpoint never holds more descriptors than the
/// agent keeps for it.
/// The snapshot and the encoding run on the blocking pool: reading every counter row is a
/// system call per row.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    snapshot: Arc<dyn Fn() -> KernelSnapshot + Send + Sync>,
    ready: watch::Receiver<bool>,
    health: HealthCheck,
) -> io::Result<()> {
    serve_with(
        listener,
        Endpoints {
            metrics,
            snapshot,
            ready,
            health,
        },
        HEADER_READ_TIMEOUT,
    )
    .await
}

pub(super) async fn serve_with(
    listener: TcpListener,
    endpoints: Endpoints,
    header_read_timeout: Duration,
) -> io::Result<()> {
    let endpoints = Arc::new(endpoints);
    let places = Arc::new(tokio::sync::Semaphore::new(crate::fds::METRICS_CONNECTIONS));
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .max_header_size(MAX_HEADER_SIZE)
        .keep_alive(true);
    tracing::info!(listen = %listener.local_addr()?, "metrics endpoint listening");
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) if crate::proxy::accept_error_is_per_connection(&e) => {
                tracing::warn!(error = %e, "metrics accept failed; going on");
                // Out of descriptors: give connections a moment to close.
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        let Ok(place) = places.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "metrics: too many connections; closing a new one");
            continue;
        };
        let endpoints = endpoints.clone();
        let service = service_fn(move |req| {
            let endpoints = endpoints.clone();
            async move { Ok::<_, Infallible>(endpoints.handle(req).await) }
        });
        let conn = http.serve_connection(TokioIo::new(stream), service);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "metrics connection ended with an error");
            }
            drop(place);
        });
    }
}

impl Endpoints {
    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path();
        if !matches!(path, "/metrics" | "/healthz" | "/readyz") {
            return text(StatusCode::NOT_FOUND, "not found");
        }
        if req.method() != Method::GET {
            let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
            resp.headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET"));
            return resp;
        }
        match path {
            "/metrics" => self.scrape().await,
            "/healthz" => {
                let problems = (self.health)();
                if problems.is_empty() {
                    text(StatusCode::OK, "ok")
                } else {
                    let body = format!("unhealthy\n{}\n", problems.join("\n"));
                    let mut resp = text(StatusCode::SERVICE_UNAVAILABLE, "");
                    *resp.body_mut() = Full::new(Bytes::from(body));
                    resp
                }
            }
            "/readyz" if *self.ready.borrow() => text(StatusCode::OK, "ready"),
            "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready"),
            _ => text(StatusCode::NOT_FOUND, "not found"),
        }
    }

    async fn scrape(&self) -> Response<Full<Bytes>> {
        let metrics = self.metrics.clone();
        let snapshot = self.snapshot.clone();
        match tokio::task::spawn_blocking(move || metrics.encode(&snapshot())).await {
            Ok(body) => {
                let mut resp = Response::new(Full::new(Bytes::from(body)));
                resp.headers_mut()
                    .insert(CONTENT_TYPE_HEADER, HeaderValue::from_static(CONTENT_TYPE));
                resp
            }
            Err(e) => {
                tracing::error!(error = %e, "reading metrics failed");
                text(StatusCode::INTERNAL_SERVER_ERROR, "reading metrics failed")
            }
        }
    }
}

/// A plain-text response.
fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE_HEADER,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
