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
//! - `egress_proxy_would_deny_total`: requests and connections audit mode passed on that
//!   enforce mode would refuse (also in `egress_proxy_requests_total`, as `(no rule)`).
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

#![forbid(unsafe_code)]

mod serve;

pub use serve::{HEADER_READ_TIMEOUT, HealthCheck, serve};

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// The `Content-Type` of [`Metrics::encode`]'s text: OpenMetrics 1.0.0.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The `rule` label of requests that no rule allowed (denied, malformed, refused TLS).
pub const NO_RULE: &str = crate::compile::NO_RULE_NAME;

/// Upper bounds (seconds) of the request-duration buckets: 0.1 ms to 10 s in 1-2.5-5 steps.
/// A proxied request on loopback takes a few hundred microseconds; a slow upstream, seconds.
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

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
struct PodLabels {
    /// `namespace/name`.
    pod: String,
    /// The hook of a kernel verdict (`connect`, `sendmsg`, ...), or `http`.
    source: String,
    /// As `egress events` says it (`deny`, `allow`, `would-deny`, `refused`, `error`).
    verdict: String,
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

/// One (source, verdict) counter of a pod.
type PodSeries = (String, String, Counter);

/// The agent's metrics: a registry of its own families, plus the kernel's numbers added at
/// each [`encode`](Metrics::encode).
pub struct Metrics {
    registry: Registry,
    reloads: Family<ReloadLabels, Counter>,
    requests: Family<RequestLabels, Counter>,
    durations: Family<RuleLabels, Histogram, fn() -> Histogram>,
    pods: Family<PodLabels, Counter>,
    would_deny: Counter,
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
    /// Each pod's (source, verdict) counters, for [`Metrics::pod_event`].
    by_pod: RwLock<HashMap<Box<str>, Vec<PodSeries>>>,
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
        let pods = Family::<PodLabels, Counter>::default();
        registry.register(
            "egress_pod_events",
            "Events of the node's pods (with --cri-socket): kernel verdicts that made an event \
             (denials, and audit mode's would-denials) by hook, and proxied requests (source \
             http), by pod (namespace/name) and verdict; a pod's series go when it goes",
            pods.clone(),
        );
        let would_deny = Counter::default();
        registry.register(
            "egress_proxy_would_deny",
            "Requests and connections audit mode passed on that enforce mode would refuse",
            would_deny.clone(),
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
            pods,
            would_deny,
            events_dropped,
            events_dropped_seen: AtomicU64::new(0),
            connections,
            connections_limit,
            connections_refused,
            connections_evicted,
            open_fds,
            fds_limit,
            by_rule: RwLock::default(),
            by_pod: RwLock::default(),
        }
    }

    /// One event of pod `pod` (`namespace/name`): a kernel verdict (`source` its hook) or a
    /// proxied request (`http`), with its verdict as `egress events` names it. Once a pod's
    /// (source, verdict) pair has been seen this takes two read locks and allocates nothing.
    pub fn pod_event(&self, pod: &str, source: &str, verdict: &str) {
        let find = |series: &[PodSeries]| {
            series
                .iter()
                .find(|(s, v, _)| s == source && v == verdict)
                .map(|(_, _, c)| c.clone())
        };
        if let Some(counter) = self
            .by_pod
            .read()
            .expect("pod series")
            .get(pod)
            .and_then(|series| find(series))
        {
            counter.inc();
            return;
        }
        let mut by_pod = self.by_pod.write().expect("pod series");
        let series = by_pod.entry(pod.into()).or_default();
        let counter = match find(series) {
            Some(counter) => counter,
            None => {
                let counter = self
                    .pods
                    .get_or_create(&PodLabels {
                        pod: pod.to_owned(),
                        source: source.to_owned(),
                        verdict: verdict.to_owned(),
                    })
                    .clone();
                series.push((source.to_owned(), verdict.to_owned(), counter.clone()));
                counter
            }
        };
        counter.inc();
    }

    /// Drops the series of the pods not in `pods` (`namespace/name`): pods that went.
    pub fn keep_pods(&self, pods: &std::collections::HashSet<String>) {
        let mut by_pod = self.by_pod.write().expect("pod series");
        by_pod.retain(|pod, series| {
            let keep = pods.contains(&**pod);
            if !keep {
                for (source, verdict, _) in series.iter() {
                    self.pods.remove(&PodLabels {
                        pod: pod.to_string(),
                        source: source.clone(),
                        verdict: verdict.clone(),
                    });
                }
            }
            keep
        });
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

    /// One request or connection audit mode passed on (also counted by [`Self::proxy_request`]).
    pub fn proxy_would_deny(&self) {
        self.would_deny.inc();
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

#[cfg(test)]
mod tests;
