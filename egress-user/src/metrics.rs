//! Prometheus metrics: what the agent counts itself (reloads, proxied requests, lost proxy
//! events) and what the kernel programs counted (verdicts per rule row, their own health),
//! exposed in the OpenMetrics 1.0 text format on `GET /metrics` by [`serve`], beside the
//! `/healthz` and `/readyz` probes.
//!
//! The format is OpenMetrics text 1.0.0 (the only text format `prometheus-client` writes),
//! served as [`CONTENT_TYPE`]; Prometheus's default scrape protocols include it. So a counter
//! family `egress_reloads` has samples `egress_reloads_total{...}`, and the output ends in
//! `# EOF`.
//!
//! Series, all bounded: rule names come from the policy, statuses are three-digit codes, and
//! verdicts and reload results are fixed sets.
//! - `egress_reloads_total{result="ok|failed"}`
//! - `egress_proxy_requests_total{rule,status}`: `rule="(no rule)"` when no rule allowed the
//!   request, `status="0"` when the connection closed without an answer.
//! - `egress_proxy_request_duration_seconds{rule}`: histogram, [`LATENCY_BUCKETS`].
//! - `egress_proxy_events_dropped_total`
//! - `egress_proxy_connections` (held now), `egress_proxy_connections_limit`,
//!   `egress_proxy_connections_refused_total` (no room: every held one serving requests),
//!   `egress_proxy_connections_evicted_total` (pending ones closed to make room),
//!   `egress_open_fds` and `egress_fds_limit`: see [`crate::fds`] and
//!   [`crate::proxy::Admission`].
//! - `egress_verdicts_total{rule,verdict="allowed|denied|would_deny"}`,
//!   `egress_hook_verdicts_total{hook="connect|sendmsg|sock_create|xdp",verdict}`,
//!   `egress_generation`,
//!   `egress_events_lost_total`, `egress_kernel_errors_total`: read from the kernel's maps at
//!   each scrape (a [`KernelSnapshot`]).

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http::header::{ALLOW, CONTENT_TYPE as CONTENT_TYPE_HEADER, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// The `Content-Type` of [`Metrics::encode`]'s text: OpenMetrics 1.0.0.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The `rule` label of requests that no rule allowed (denied, malformed, refused TLS).
pub const NO_RULE: &str = crate::loader::NO_RULE_NAME;

/// Upper bounds (seconds) of the request-duration buckets: 0.1 ms to 10 s in 1-2.5-5 steps.
/// A proxied request on loopback takes a few hundred microseconds; a slow upstream, seconds.
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// How long a client may take to send a request head, idle keep-alive time included: a
/// client that opens a connection and sends nothing (or a byte a minute) is cut off then.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest request head accepted (hyper answers 431 above it); a scraper sends a few hundred
/// bytes.
const MAX_HEADER_SIZE: usize = 16 * 1024;

/// Kernel-side numbers read at scrape time (the agent fills this from the pinned maps).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelSnapshot {
    /// The policy generation the programs run.
    pub generation: u32,
    /// The verdict counters, one per rule row (reserved rows included).
    pub rules: Vec<RuleVerdicts>,
    /// Events the programs could not put in the ring buffer.
    pub events_lost: u64,
    /// Errors in the programs (each failed closed).
    pub errors: u64,
    /// The verdict counters by hook (`rule` holds the hook's name: connect, sendmsg,
    /// sock_create, xdp).
    pub hooks: Vec<RuleVerdicts>,
}

/// One rule row's verdict counters, summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RuleVerdicts {
    /// The rule's name (or the reserved row's, such as `(no rule)`).
    pub rule: String,
    /// Connections allowed.
    pub allowed: u64,
    /// Connections denied.
    pub denied: u64,
    /// Connections audit mode let through that enforce mode would have denied.
    pub would_deny: u64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleLabels {
    rule: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    rule: Arc<str>,
    status: u16,
}

/// The handles of one rule's series, so that a request whose series exist costs two read
/// locks and no allocation: `Family::get_or_create` would need an owned label set (a
/// `String` or `Arc<str>`) built for every lookup.
struct RuleSeries {
    rule: Arc<str>,
    duration: Histogram,
    by_status: RwLock<HashMap<u16, Counter>>,
}

/// The agent's metrics: a registry of its own families, plus the kernel's numbers added at
/// each [`encode`](Metrics::encode).
pub struct Metrics {
    registry: Registry,
    reloads: Family<ReloadLabels, Counter>,
    requests: Family<RequestLabels, Counter>,
    durations: Family<RuleLabels, Histogram, fn() -> Histogram>,
    events_dropped: Counter,
    /// The last running total given to [`Metrics::set_proxy_events_dropped`].
    events_dropped_seen: AtomicU64,
    connections: Gauge,
    connections_limit: Gauge,
    connections_refused: Counter,
    connections_evicted: Counter,
    open_fds: Gauge,
    fds_limit: Gauge,
    by_rule: RwLock<HashMap<Box<str>, RuleSeries>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every family; both reload results start at 0, so that a first failure is a
    /// change `increase()` sees.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let reloads = Family::<ReloadLabels, Counter>::default();
        for result in ["ok", "failed"] {
            // Creates the series; the guard it returns is let go at once.
            let _ = reloads.get_or_create(&ReloadLabels { result });
        }
        registry.register(
            "egress_reloads",
            "Policy reloads, by result (failed: invalid policy, or the kernel refused it)",
            reloads.clone(),
        );
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "egress_proxy_requests",
            "Requests the HTTP proxy finished, and connections it refused, by rule and status \
             (0: closed without an answer)",
            requests.clone(),
        );
        let durations: Family<RuleLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(|| Histogram::new(LATENCY_BUCKETS));
        registry.register_with_unit(
            "egress_proxy_request_duration",
            "From the start of a proxied request to the end of its response body, by rule",
            Unit::Seconds,
            durations.clone(),
        );
        let events_dropped = Counter::default();
        registry.register(
            "egress_proxy_events_dropped",
            "Proxy request events lost because their queue was full",
            events_dropped.clone(),
        );
        let gauge = |registry: &mut Registry, name: &str, help: &str| {
            let g = Gauge::default();
            registry.register(name, help, g.clone());
            g
        };
        let counter = |registry: &mut Registry, name: &str, help: &str| {
            let c = Counter::default();
            registry.register(name, help, c.clone());
            c
        };
        let connections = gauge(
            &mut registry,
            "egress_proxy_connections",
            "App connections the HTTP proxy holds",
        );
        let connections_limit = gauge(
            &mut registry,
            "egress_proxy_connections_limit",
            "App connections the HTTP proxy may hold (from the descriptor limit)",
        );
        let connections_refused = counter(
            &mut registry,
            "egress_proxy_connections_refused",
            "App connections closed at accept: every held connection was serving requests",
        );
        let connections_evicted = counter(
            &mut registry,
            "egress_proxy_connections_evicted",
            "App connections closed before their first request to make room for new ones",
        );
        let open_fds = gauge(
            &mut registry,
            "egress_open_fds",
            "File descriptors the agent has open",
        );
        let fds_limit = gauge(
            &mut registry,
            "egress_fds_limit",
            "The agent's soft RLIMIT_NOFILE",
        );
        Self {
            registry,
            reloads,
            requests,
            durations,
            events_dropped,
            events_dropped_seen: AtomicU64::new(0),
            connections,
            connections_limit,
            connections_refused,
            connections_evicted,
            open_fds,
            fds_limit,
            by_rule: RwLock::default(),
        }
    }

    /// A reload finished: ok or failed (invalid policy, kernel refused it...).
    pub fn reload(&self, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.reloads.get_or_create(&ReloadLabels { result }).inc();
    }

    /// One proxied request (or refused connection), from a
    /// [`RequestEvent`](crate::proxy::RequestEvent): counts it by rule (`None`: [`NO_RULE`])
    /// and status (0: closed without an answer), and observes its latency.
    ///
    /// Runs at the event rate (tens of thousands a second): once a (rule, status) pair has
    /// been seen, this takes two uncontended read locks and the histogram's mutex, and
    /// allocates nothing.
    pub fn proxy_request(&self, rule: Option<&str>, status: u16, latency: Duration) {
        let rule = rule.unwrap_or(NO_RULE);
        let secs = latency.as_secs_f64();
        {
            let by_rule = self.by_rule.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(series) = by_rule.get(rule) {
                series.duration.observe(secs);
                self.count(series, status);
                return;
            }
        }
        // First request of this rule: create its series (another thread may just have).
        let mut by_rule = self.by_rule.write().unwrap_or_else(PoisonError::into_inner);
        let series = by_rule.entry(rule.into()).or_insert_with(|| {
            let rule: Arc<str> = rule.into();
            RuleSeries {
                duration: self
                    .durations
                    .get_or_create_owned(&RuleLabels { rule: rule.clone() }),
                rule,
                by_status: RwLock::default(),
            }
        });
        series.duration.observe(secs);
        self.count(series, status);
    }

    /// Counts one request of `series`' rule with `status`, creating its counter on first use.
    fn count(&self, series: &RuleSeries, status: u16) {
        if let Some(counter) = series
            .by_status
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&status)
        {
            counter.inc();
            return;
        }
        let mut by_status = series
            .by_status
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let counter = by_status.entry(status).or_insert_with(|| {
            self.requests.get_or_create_owned(&RequestLabels {
                rule: series.rule.clone(),
                status,
            })
        });
        counter.inc();
    }

    /// Proxy events dropped because the queue was full, as the proxy's running total.
    ///
    /// The exported counter grows by the difference from the last total given. A reload's new
    /// proxy goes on from its predecessor's total; a total smaller than the last one still
    /// means the source started again from zero, so it all counts as new.
    pub fn set_proxy_events_dropped(&self, total: u64) {
        let last = self.events_dropped_seen.swap(total, Relaxed);
        let new = total.checked_sub(last).unwrap_or(total);
        if new > 0 {
            self.events_dropped.inc_by(new);
        }
    }

    /// The proxy's connections and the agent's descriptors now. `stats` holds running
    /// totals (the admission lives as long as the agent), which the counters take on. Called
    /// every second and at each scrape, so a scrape shows the totals of that moment.
    pub fn set_connections(
        &self,
        stats: &crate::proxy::AdmissionStats,
        open_fds: Option<usize>,
        fds_limit: usize,
    ) {
        let gauge = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
        self.connections.set(gauge(stats.open));
        self.connections_limit.set(gauge(stats.limit));
        // The tick and a scrape may both call this at once; the counters hold the running
        // totals, and `fetch_max` never lets one go back or count growth twice.
        for (counter, total) in [
            (&self.connections_refused, stats.refused),
            (&self.connections_evicted, stats.evicted),
        ] {
            counter.inner().fetch_max(total, Relaxed);
        }
        if let Some(open) = open_fds {
            self.open_fds.set(gauge(open));
        }
        self.fds_limit.set(gauge(fds_limit));
    }

    /// The OpenMetrics text exposition ([`CONTENT_TYPE`]) of the agent's families and of
    /// `kernel`, ending in `# EOF`.
    ///
    /// The kernel's numbers are totals kept by the maps, so they are exported as constant
    /// counters (`ConstCounter`) by a [`Collector`], the way `prometheus-client` exports
    /// values that something else counts. The collector goes in a small registry made for
    /// this call, not in the long-lived one: `Collector` must be `'static`, and the snapshot
    /// is borrowed for this call only, so a registered collector would need shared mutable
    /// state between concurrent scrapes. Nothing is registered twice: each call's registry
    /// is dropped with it.
    pub fn encode(&self, kernel: &KernelSnapshot) -> String {
        let mut kernel_registry = Registry::default();
        kernel_registry.register_collector(Box::new(KernelCollector(kernel.clone())));
        let mut text = String::with_capacity(4096);
        // Writing to a String cannot fail, and neither can encoding these metric types; were
        // it to, the scraper gets an exposition without `# EOF`, which it rejects whole.
        let encoded = encode_registry(&mut text, &self.registry)
            .and_then(|()| encode_registry(&mut text, &kernel_registry))
            .and_then(|()| encode_eof(&mut text));
        if encoded.is_err() {
            tracing::error!("encoding metrics failed");
        }
        text
    }
}

/// Encodes one [`KernelSnapshot`].
#[derive(Debug)]
struct KernelCollector(KernelSnapshot);

impl Collector for KernelCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let kernel = &self.0;
        // Rows are one per rule, so names are unique; should two rows share one (a reserved
        // row named like a rule), they add up rather than make two series with one name.
        let mut rows: BTreeMap<&str, [u64; 3]> = BTreeMap::new();
        for r in &kernel.rules {
            let sums = rows.entry(r.rule.as_str()).or_default();
            for (sum, v) in sums.iter_mut().zip([r.allowed, r.denied, r.would_deny]) {
                *sum = sum.saturating_add(v);
            }
        }
        let mut verdicts = encoder.encode_descriptor(
            "egress_verdicts",
            "Connections the kernel programs decided, by rule row and verdict.",
            None,
            MetricType::Counter,
        )?;
        for (rule, counts) in &rows {
            for (verdict, count) in ["allowed", "denied", "would_deny"].into_iter().zip(counts) {
                let labels = [("rule", *rule), ("verdict", verdict)];
                ConstCounter::new(*count).encode(verdicts.encode_family(&labels)?)?;
            }
        }

        let mut by_hook = encoder.encode_descriptor(
            "egress_hook_verdicts",
            "Verdicts of the kernel programs by the hook that took them (connect, sendmsg, \
             sock_create, xdp) and verdict.",
            None,
            MetricType::Counter,
        )?;
        for h in &kernel.hooks {
            for (verdict, count) in ["allowed", "denied", "would_deny"].into_iter().zip([
                h.allowed,
                h.denied,
                h.would_deny,
            ]) {
                let labels = [("hook", h.rule.as_str()), ("verdict", verdict)];
                ConstCounter::new(count).encode(by_hook.encode_family(&labels)?)?;
            }
        }

        let gauge = ConstGauge::new(i64::from(kernel.generation));
        gauge.encode(encoder.encode_descriptor(
            "egress_generation",
            "The policy generation the kernel programs run.",
            None,
            gauge.metric_type(),
        )?)?;
        for (name, help, value) in [
            (
                "egress_events_lost",
                "Verdict events the kernel programs lost to a full ring buffer.",
                kernel.events_lost,
            ),
            (
                "egress_kernel_errors",
                "Errors in the kernel programs (each failed closed).",
                kernel.errors,
            ),
        ] {
            let counter = ConstCounter::new(value);
            counter.encode(encoder.encode_descriptor(
                name,
                help,
                None,
                counter.metric_type(),
            )?)?;
        }
        Ok(())
    }
}

/// What keeps the agent from doing its job (one line each); empty: healthy.
pub type HealthCheck = Arc<dyn Fn() -> Vec<String> + Send + Sync>;

/// What every connection's handler shares.
struct Endpoints {
    metrics: Arc<Metrics>,
    snapshot: Arc<dyn Fn() -> KernelSnapshot + Send + Sync>,
    ready: watch::Receiver<bool>,
    health: HealthCheck,
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

async fn serve_with(
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

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::Mutex;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpStream;
    use tokio::time::timeout;

    use super::*;

    /// Every sample line as series -> value; panics on a series written twice.
    fn samples(text: &str) -> HashMap<String, String> {
        let mut samples = HashMap::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (series, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("sample line without a value: {line:?}"));
            let old = samples.insert(series.to_owned(), value.to_owned());
            assert!(old.is_none(), "series written twice: {series}\n{text}");
        }
        samples
    }

    /// The value of `series`, which must be there.
    fn value(samples: &HashMap<String, String>, series: &str) -> String {
        samples
            .get(series)
            .unwrap_or_else(|| panic!("no series {series} in {samples:#?}"))
            .clone()
    }

    /// The `# TYPE` lines as (family, type), in order.
    fn types(text: &str) -> Vec<(String, String)> {
        text.lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(|l| {
                let (name, kind) = l.split_once(' ').expect("type line has a type");
                (name.to_owned(), kind.to_owned())
            })
            .collect()
    }

    fn snapshot(generation: u32, rules: &[(&str, u64, u64, u64)]) -> KernelSnapshot {
        KernelSnapshot {
            generation,
            rules: rules
                .iter()
                .map(|&(rule, allowed, denied, would_deny)| RuleVerdicts {
                    rule: rule.to_owned(),
                    allowed,
                    denied,
                    would_deny,
                })
                .collect(),
            events_lost: 4,
            errors: 1,
            hooks: vec![
                RuleVerdicts {
                    rule: "connect".to_owned(),
                    allowed: 11,
                    denied: 2,
                    would_deny: 0,
                },
                RuleVerdicts {
                    rule: "xdp".to_owned(),
                    allowed: 0,
                    denied: 5,
                    would_deny: 1,
                },
            ],
        }
    }

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn encodes_agent_and_kernel_numbers() {
        let m = Metrics::new();
        m.reload(true);
        m.reload(true);
        m.reload(false);
        m.proxy_request(Some("web"), 200, 3 * MS);
        m.proxy_request(Some("web"), 200, 4 * MS);
        m.proxy_request(Some("web"), 503, 2000 * MS);
        m.proxy_request(None, 403, MS / 10);
        m.proxy_request(None, 0, MS);
        m.set_proxy_events_dropped(5);
        m.set_proxy_events_dropped(7);
        let mut conns = crate::proxy::AdmissionStats {
            open: 12,
            limit: 400,
            refused: 2,
            evicted: 30,
            ..Default::default()
        };
        m.set_connections(&conns, Some(77), 1024);
        conns.evicted = 35;
        m.set_connections(&conns, None, 1024);
        let kernel = snapshot(
            3,
            &[("(no rule)", 0, 3, 0), ("a", 10, 3, 2), ("b", 1, 0, 0)],
        );
        let text = m.encode(&kernel);

        assert!(text.ends_with("\n# EOF\n"), "{text}");
        let lines: Vec<&str> = text.lines().collect();
        for line in [
            "# TYPE egress_reloads counter",
            "egress_reloads_total{result=\"ok\"} 2",
            "egress_reloads_total{result=\"failed\"} 1",
            "# TYPE egress_verdicts counter",
            "egress_verdicts_total{rule=\"a\",verdict=\"allowed\"} 10",
            "egress_verdicts_total{rule=\"a\",verdict=\"denied\"} 3",
            "egress_verdicts_total{rule=\"a\",verdict=\"would_deny\"} 2",
            "egress_verdicts_total{rule=\"(no rule)\",verdict=\"denied\"} 3",
            "# TYPE egress_hook_verdicts counter",
            "egress_hook_verdicts_total{hook=\"connect\",verdict=\"allowed\"} 11",
            "egress_hook_verdicts_total{hook=\"xdp\",verdict=\"denied\"} 5",
            "egress_hook_verdicts_total{hook=\"xdp\",verdict=\"would_deny\"} 1",
            "# TYPE egress_generation gauge",
            "egress_generation 3",
            "# TYPE egress_events_lost counter",
            "egress_events_lost_total 4",
            "# TYPE egress_kernel_errors counter",
            "egress_kernel_errors_total 1",
            "# TYPE egress_proxy_events_dropped counter",
            "egress_proxy_events_dropped_total 7",
            "egress_proxy_connections 12",
            "egress_proxy_connections_limit 400",
            "egress_proxy_connections_refused_total 2",
            "egress_proxy_connections_evicted_total 35",
            "egress_open_fds 77",
            "egress_fds_limit 1024",
            "# TYPE egress_proxy_request_duration_seconds histogram",
            "# UNIT egress_proxy_request_duration_seconds seconds",
        ] {
            assert!(lines.contains(&line), "no line {line:?} in\n{text}");
        }

        let s = samples(&text);
        let requests = |rule: &str, status: &str| {
            value(
                &s,
                &format!("egress_proxy_requests_total{{rule=\"{rule}\",status=\"{status}\"}}"),
            )
        };
        assert_eq!(requests("web", "200"), "2");
        assert_eq!(requests("web", "503"), "1");
        assert_eq!(requests("(no rule)", "403"), "1");
        assert_eq!(requests("(no rule)", "0"), "1");
        // Only the pairs seen: 4 request series.
        let request_series = s
            .keys()
            .filter(|k| k.starts_with("egress_proxy_requests_total"))
            .count();
        assert_eq!(request_series, 4);
        assert_eq!(
            value(
                &s,
                "egress_proxy_request_duration_seconds_count{rule=\"web\"}"
            ),
            "3"
        );
        assert_eq!(
            value(
                &s,
                "egress_proxy_request_duration_seconds_count{rule=\"(no rule)\"}"
            ),
            "2"
        );
        // 3 verdicts for each of the 3 rows.
        let verdict_series = s
            .keys()
            .filter(|k| k.starts_with("egress_verdicts_total"))
            .count();
        assert_eq!(verdict_series, 9);

        // Every family once, with the type Prometheus needs to read it right.
        let types = types(&text);
        let mut names: Vec<&str> = types.iter().map(|(n, _)| n.as_str()).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "egress_events_lost",
                "egress_fds_limit",
                "egress_generation",
                "egress_hook_verdicts",
                "egress_kernel_errors",
                "egress_open_fds",
                "egress_proxy_connections",
                "egress_proxy_connections_evicted",
                "egress_proxy_connections_limit",
                "egress_proxy_connections_refused",
                "egress_proxy_events_dropped",
                "egress_proxy_request_duration_seconds",
                "egress_proxy_requests",
                "egress_reloads",
                "egress_verdicts",
            ]
        );
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_inclusive() {
        let m = Metrics::new();
        let micros = Duration::from_micros;
        // 50 us and exactly 100 us fall in le=0.0001 (bounds are inclusive), 0.3 ms in
        // le=0.0005, 7 ms in le=0.01, 20 s only in +Inf.
        for latency in [micros(50), micros(100), micros(300), 7 * MS, 20_000 * MS] {
            m.proxy_request(Some("h"), 200, latency);
        }
        let text = m.encode(&KernelSnapshot::default());
        let s = samples(&text);
        let bucket = |le: &str| {
            value(
                &s,
                &format!("egress_proxy_request_duration_seconds_bucket{{le=\"{le}\",rule=\"h\"}}"),
            )
            .parse::<u64>()
            .expect("a bucket count is an integer")
        };
        let expected = [
            ("0.0001", 2),
            ("0.00025", 2),
            ("0.0005", 3),
            ("0.001", 3),
            ("0.0025", 3),
            ("0.005", 3),
            ("0.01", 4),
            ("0.025", 4),
            ("0.05", 4),
            ("0.1", 4),
            ("0.25", 4),
            ("0.5", 4),
            ("1.0", 4),
            ("2.5", 4),
            ("5.0", 4),
            ("10.0", 4),
            ("+Inf", 5),
        ];
        for (le, count) in expected {
            assert_eq!(bucket(le), count, "bucket le={le}\n{text}");
        }
        // No other buckets than these 17.
        let buckets = s.keys().filter(|k| k.contains("_bucket{")).count();
        assert_eq!(buckets, expected.len());
        assert_eq!(
            value(
                &s,
                "egress_proxy_request_duration_seconds_count{rule=\"h\"}"
            ),
            "5"
        );
        let sum: f64 = value(&s, "egress_proxy_request_duration_seconds_sum{rule=\"h\"}")
            .parse()
            .expect("the sum is a number");
        assert!((sum - 20.00745).abs() < 1e-9, "sum {sum}");
    }

    #[test]
    fn kernel_numbers_are_the_snapshot_given_each_time() {
        let m = Metrics::new();
        let first = m.encode(&snapshot(1, &[("a", 1, 2, 3)]));
        let second = m.encode(&snapshot(2, &[("a", 5, 2, 3), ("b", 0, 1, 0)]));
        assert_eq!(types(&first), types(&second));
        let s = samples(&second);
        assert_eq!(value(&s, "egress_generation"), "2");
        assert_eq!(
            value(&s, "egress_verdicts_total{rule=\"a\",verdict=\"allowed\"}"),
            "5"
        );
        assert_eq!(
            value(&s, "egress_verdicts_total{rule=\"b\",verdict=\"denied\"}"),
            "1"
        );
        // Two rows with one name add up instead of writing one series twice.
        let text = m.encode(&snapshot(2, &[("a", 1, 0, 0), ("a", 2, 0, 0)]));
        assert_eq!(
            value(
                &samples(&text),
                "egress_verdicts_total{rule=\"a\",verdict=\"allowed\"}"
            ),
            "3"
        );
        // A rule name that needs escaping stays one well-formed label value.
        let text = m.encode(&snapshot(2, &[("q\"\\", 1, 0, 0)]));
        assert!(
            text.lines()
                .any(|l| l == r#"egress_verdicts_total{rule="q\"\\",verdict="allowed"} 1"#),
            "{text}"
        );
    }

    #[test]
    fn dropped_events_follow_the_running_total_across_restarts() {
        let m = Metrics::new();
        let dropped = || {
            value(
                &samples(&m.encode(&KernelSnapshot::default())),
                "egress_proxy_events_dropped_total",
            )
        };
        assert_eq!(dropped(), "0");
        m.set_proxy_events_dropped(3);
        m.set_proxy_events_dropped(3);
        assert_eq!(dropped(), "3");
        // A new proxy's count starts at 0: its 2 are new drops.
        m.set_proxy_events_dropped(2);
        assert_eq!(dropped(), "5");
        m.set_proxy_events_dropped(6);
        assert_eq!(dropped(), "9");
    }

    /// A response read off the wire.
    struct Resp {
        status: u16,
        content_type: Option<String>,
        allow: Option<String>,
        body: String,
    }

    /// Sends one request with `Connection: close` and reads the whole response.
    async fn request(addr: SocketAddr, method: &str, path: &str) -> Resp {
        let exchange = async {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            let req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            s.write_all(req.as_bytes()).await.expect("send");
            let mut raw = Vec::new();
            s.read_to_end(&mut raw).await.expect("read");
            raw
        };
        let raw = timeout(Duration::from_secs(10), exchange)
            .await
            .expect("response in time");
        let raw = String::from_utf8(raw).expect("utf-8 response");
        let (head, body) = raw.split_once("\r\n\r\n").expect("a complete head");
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("bad status line in {raw:?}"));
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let header = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        Resp {
            status,
            content_type: header("content-type"),
            allow: header("allow"),
            body: body.to_owned(),
        }
    }

    struct Server {
        addr: SocketAddr,
        generation: Arc<Mutex<u32>>,
        ready: watch::Sender<bool>,
        problems: Arc<Mutex<Vec<String>>>,
        task: tokio::task::JoinHandle<io::Result<()>>,
    }

    impl Drop for Server {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    async fn start(header_read_timeout: Duration) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local address");
        let generation = Arc::new(Mutex::new(1));
        let g = generation.clone();
        let snapshot = Arc::new(move || {
            let generation = *g.lock().expect("generation lock");
            snapshot(generation, &[("a", u64::from(generation), 3, 0)])
        });
        let metrics = Arc::new(Metrics::new());
        metrics.reload(true);
        let (ready, ready_rx) = watch::channel(false);
        let problems: Arc<Mutex<Vec<String>>> = Arc::default();
        let p = problems.clone();
        let health: HealthCheck = Arc::new(move || p.lock().expect("problems lock").clone());
        let endpoints = Endpoints {
            metrics,
            snapshot,
            ready: ready_rx,
            health,
        };
        let task = tokio::spawn(serve_with(listener, endpoints, header_read_timeout));
        Server {
            addr,
            generation,
            ready,
            problems,
            task,
        }
    }

    #[tokio::test]
    async fn serves_metrics_and_probes() {
        let server = start(HEADER_READ_TIMEOUT).await;
        let addr = server.addr;

        let resp = request(addr, "GET", "/metrics").await;
        assert_eq!(resp.status, 200);
        assert_eq!(resp.content_type.as_deref(), Some(CONTENT_TYPE));
        let s = samples(&resp.body);
        assert_eq!(value(&s, "egress_generation"), "1");
        assert_eq!(value(&s, "egress_reloads_total{result=\"ok\"}"), "1");
        assert!(resp.body.ends_with("# EOF\n"));

        // Each scrape reads the kernel again.
        *server.generation.lock().expect("generation lock") = 2;
        let resp = request(addr, "GET", "/metrics?x=1").await;
        assert_eq!(resp.status, 200);
        let s = samples(&resp.body);
        assert_eq!(value(&s, "egress_generation"), "2");
        assert_eq!(
            value(&s, "egress_verdicts_total{rule=\"a\",verdict=\"allowed\"}"),
            "2"
        );

        let resp = request(addr, "GET", "/healthz").await;
        assert_eq!((resp.status, resp.body.as_str()), (200, "ok"));
        // The agent cannot do its job: the probe fails and says why.
        *server.problems.lock().expect("problems lock") = vec![
            "control socket: stopped accepting".to_owned(),
            "descriptors: 1000 open".to_owned(),
        ];
        let resp = request(addr, "GET", "/healthz").await;
        assert_eq!(
            (resp.status, resp.body.as_str()),
            (
                503,
                "unhealthy\ncontrol socket: stopped accepting\ndescriptors: 1000 open\n"
            )
        );
        server.problems.lock().expect("problems lock").clear();
        assert_eq!(request(addr, "GET", "/healthz").await.status, 200);

        let resp = request(addr, "GET", "/readyz").await;
        assert_eq!((resp.status, resp.body.as_str()), (503, "not ready"));
        server.ready.send_replace(true);
        let resp = request(addr, "GET", "/readyz").await;
        assert_eq!((resp.status, resp.body.as_str()), (200, "ready"));
        server.ready.send_replace(false);
        let resp = request(addr, "GET", "/readyz").await;
        assert_eq!(resp.status, 503);

        assert_eq!(request(addr, "GET", "/").await.status, 404);
        assert_eq!(request(addr, "GET", "/metricsx").await.status, 404);
        let resp = request(addr, "POST", "/metrics").await;
        assert_eq!(resp.status, 405);
        assert_eq!(resp.allow.as_deref(), Some("GET"));
        assert_eq!(request(addr, "HEAD", "/healthz").await.status, 405);
        assert_eq!(request(addr, "DELETE", "/readyz").await.status, 405);
    }

    #[tokio::test]
    async fn a_stalled_client_blocks_no_one_and_is_cut_off() {
        let server = start(Duration::from_millis(300)).await;
        let addr = server.addr;

        // Half a request head, then nothing.
        let mut stalled = TcpStream::connect(addr).await.expect("connect");
        stalled
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("send");
        // Another that sends nothing at all.
        let mut silent = TcpStream::connect(addr).await.expect("connect");

        let resp = request(addr, "GET", "/healthz").await;
        assert_eq!(resp.status, 200);
        assert_eq!(request(addr, "GET", "/metrics").await.status, 200);

        // Both are closed once the head timeout passes.
        for s in [&mut stalled, &mut silent] {
            let mut rest = Vec::new();
            let read = timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
            assert!(read.is_ok(), "connection still open after the head timeout");
        }

        // A head over the limit is refused, and the server goes on.
        let big = format!(
            "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
            "a".repeat(MAX_HEADER_SIZE)
        );
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(big.as_bytes()).await.expect("send");
        let mut raw = Vec::new();
        let _ = timeout(Duration::from_secs(5), s.read_to_end(&mut raw))
            .await
            .expect("answered in time");
        let raw = String::from_utf8_lossy(&raw);
        assert!(raw.starts_with("HTTP/1.1 431"), "{raw}");
        assert_eq!(request(addr, "GET", "/healthz").await.status, 200);
    }

    #[tokio::test]
    async fn connections_past_the_cap_are_closed_and_the_cap_frees_up() {
        let server = start(Duration::from_millis(500)).await;
        let addr = server.addr;
        let mut held = Vec::new();
        for _ in 0..crate::fds::METRICS_CONNECTIONS {
            held.push(TcpStream::connect(addr).await.expect("connect"));
        }
        // Let the server accept them all before the one too many.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut extra = TcpStream::connect(addr).await.expect("connect");
        let _ = extra
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await;
        let mut raw = Vec::new();
        let _ = timeout(Duration::from_millis(400), extra.read_to_end(&mut raw))
            .await
            .expect("closed at once, before the head timeout");
        assert!(raw.is_empty(), "{}", String::from_utf8_lossy(&raw));
        // Once they close, their places serve again.
        drop(held);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(request(addr, "GET", "/healthz").await.status, 200);
    }
}
