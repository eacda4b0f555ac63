//! The agent's loop: the proxy listeners, the control socket, the metrics endpoint, kernel
//! and proxy events (logged, counted and published to `egress events`), signals, the policy
//! files' watch, and the once-a-second chores, until SIGINT or SIGTERM.

#![forbid(unsafe_code)]

use std::{sync::Arc, time::SystemTime};

use anyhow::Context as _;
use tokio::{
    signal::unix::{Signal, SignalKind, signal},
    sync::{mpsc, watch as channel},
};

use crate::{
    compile::NO_RULE_NAME,
    control::{
        self, Request, Response,
        server::{Call, HubEvent},
    },
    events,
    loader::PinnedCounters,
    metrics::{self, KernelSnapshot, RuleVerdicts},
    proxy::{Origin, Proxy, RequestEvent},
    telemetry::LogLimit,
};

use super::{Agent, error::chain, health, occupancy, pod_nets, pods, redirects, watch};

/// Proxy events waiting to be logged; past this the proxy drops (and counts) them rather than
/// slow a request down. It holds [`REQUEST_BATCH`] of requests at well over 100,000 a second.
const EVENT_QUEUE: usize = 4096;

/// After a proxied request's event wakes the agent's main loop, further ones wait this long
/// and are then taken in one batch: under load the loop wakes 50 times a second instead of
/// once per request (a futex wake and a context switch each, with the proxy on another thread).
/// Metrics, logs and `egress events` see a request at most this much later.
const REQUEST_BATCH: std::time::Duration = std::time::Duration::from_millis(20);

/// Every this many seconds, the learned addresses that expired are removed (the kernel
/// already refuses them from their expiry on; this only frees their entries).
const DNS_SWEEP_TICKS: u64 = 10;

impl Agent {
    /// Answers one control request.
    pub(super) fn handle(&mut self, request: Request) -> Response {
        let result = match request {
            Request::Status => Ok(Response::Status(Box::new(self.status()))),
            Request::Get { kind, namespace } => {
                let kind = kind.to_string();
                let rules = self
                    .rows()
                    .into_iter()
                    .filter(|r| r.kind == kind)
                    .filter(|r| namespace.is_none() || r.namespace == namespace)
                    .collect();
                Ok(Response::Rules { rules })
            }
            Request::Create {
                source,
                text,
                namespace,
            } => self.create(&source, &text, namespace.as_deref()),
            Request::Delete {
                kind,
                names,
                namespace,
            } => self.delete(kind, &names, namespace.as_deref()),
            Request::Reload => {
                self.reload(true, "egress reload")
                    .map(|generation| Response::Applied {
                        generation,
                        message: "reloaded".to_owned(),
                    })
            }
            // The server answers these itself.
            Request::Events { .. } => {
                return Response::Error {
                    message: "events are served by the control socket".to_owned(),
                };
            }
        };
        result.unwrap_or_else(|e| Response::Error { message: chain(&e) })
    }

    /// Serves the proxy and the control socket, logs and publishes kernel and proxy events,
    /// and reloads on SIGHUP and on changes of the policy files, until SIGINT or SIGTERM.
    ///
    /// # Errors
    /// A signal handler, the ring buffer or a listener cannot be set up, or reading kernel
    /// events fails.
    pub async fn serve(
        &mut self,
        proxies: channel::Receiver<Arc<Proxy>>,
        control: std::os::unix::net::UnixListener,
        mut watch: Option<watch::PolicyWatch>,
        signals: Signals,
    ) -> anyhow::Result<()> {
        let Signals {
            mut sigint,
            mut sigterm,
            mut sighup,
        } = signals;
        // The ring buffer and the original-destination map are shared by every generation,
        // so these handles stay valid across reloads.
        let mut ring = self
            .enforcer
            .take_async_events()
            .context("watching the event ring buffer")?;
        let table = Arc::new(
            self.enforcer
                .take_orig_dst()
                .context("the original-destination map is missing")?,
        );
        let (tx, mut requests) = mpsc::channel::<RequestEvent>(EVENT_QUEUE);
        let to_serve = self
            .settings
            .listeners
            .to_serve()
            .context("proxy listeners")?;
        // Everything the agent holds for good is open now: share out the descriptor limit.
        let health = Arc::new(health::Health::measure());
        self.health = Some(health.clone());
        // The agent's own network namespace: its listeners' connections are recorded under it.
        let host = match crate::netns::current() {
            Ok(cookie) => Some(cookie),
            Err(e) => {
                tracing::error!(error = %e, "proxy: the kernel cannot tell network namespaces apart (SO_NETNS_COOKIE, Linux 5.14); redirected connections are refused");
                None
            }
        };
        let serving = Serving {
            proxies: proxies.clone(),
            table,
            events: tx.clone(),
            health: health.clone(),
        };
        let serve_proxy = |listener: std::net::TcpListener| -> anyhow::Result<()> {
            let origin = None;
            serving.spawn(listener, host.unwrap_or(0), origin)?;
            Ok(())
        };
        for listener in to_serve {
            serve_proxy(listener)?;
        }
        let (calls_tx, mut calls) = mpsc::channel::<Call>(16);
        let control =
            tokio::net::UnixListener::from_std(control).context("control socket listener")?;
        let (hub, control_health) = (self.hub.clone(), health.clone());
        tokio::spawn(async move {
            if let Err(e) = control::server::serve(control, calls_tx, hub).await {
                tracing::error!(error = %e, "control socket failed");
            }
            control_health.control_stopped();
        });
        let (ready, ready_rx) = channel::channel(self.ready());
        if let Some(listener) = self.settings.metrics.take() {
            self.serve_metrics(listener, ready_rx, health.clone())?;
        }
        let mut occupancy = occupancy::Occupancy::new(&self.settings.target.cgroup);
        let mut pods =
            self.settings.cri_socket.clone().and_then(
                |socket| match crate::cgroup::cgroup2_mount() {
                    Ok(root) => Some(pods::PodWatch::start(
                        socket,
                        root,
                        &self.settings.target.cgroup,
                        self.settings.pods.clone(),
                    )),
                    Err(e) => {
                        tracing::warn!(error = %e, "pods: not watched, events name cgroups only");
                        None
                    }
                },
            );
        let mut cluster = self.settings.cluster.take();
        if let Some(cluster) = cluster.as_mut() {
            cluster.spawn();
        }
        self.dns.sync(&self.enforcer);
        let mut ticks: u64 = 0;
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        // While `batching`, proxy events are left queued until `batch` fires (REQUEST_BATCH).
        let batch = tokio::time::sleep(REQUEST_BATCH);
        tokio::pin!(batch);
        let mut batching = false;
        loop {
            tokio::select! {
                _ = sigint.recv() => {
                    self.history.flush(&self.hub);
                    return Ok(());
                }
                _ = sigterm.recv() => {
                    self.history.flush(&self.hub);
                    return Ok(());
                }
                _ = sighup.recv() => {
                    let _ = self.reload(true, "SIGHUP");
                }
                () = changed(&mut watch) => {
                    let _ = self.reload(false, "policy files changed");
                }
                Some(call) = calls.recv() => {
                    let response = self.handle(call.request);
                    let _ = call.reply.send(response);
                }
                snapshot = cluster_changed(&mut cluster) => {
                    if let Some(cluster) = cluster.as_ref() {
                        self.sync_cluster(cluster, &snapshot);
                    }
                }
                () = pods_changed(&mut pods) => {
                    self.sync_pod_nets(pods.as_ref(), host, &serving);
                }
                _ = tick.tick() => {
                    ticks += 1;
                    self.dns.sync(&self.enforcer);
                    if ticks.is_multiple_of(DNS_SWEEP_TICKS) {
                        self.sweep_learned();
                    }
                    // Pod listeners that could not be bound are tried again.
                    self.sync_pod_nets(pods.as_ref(), host, &serving);
                    self.rescan_xdp();
                    occupancy.check(std::time::Instant::now());
                    for listener in self.retry_listeners() {
                        serve_proxy(listener)?;
                    }
                    self.log_limit.flush();
                    self.history.tick(&self.hub);
                    ready.send_replace(self.ready());
                    let dropped = self.proxies.borrow().events_dropped();
                    self.metrics.set_proxy_events_dropped(dropped);
                    let connections = health.admission.stats();
                    let open = crate::fds::open_fds().ok();
                    self.metrics.set_connections(&connections, open, health.budget.limit);
                }
                Some(request) = requests.recv(), if !batching => {
                    self.record_request(request);
                    batch.as_mut().reset(tokio::time::Instant::now() + REQUEST_BATCH);
                    batching = true;
                }
                () = &mut batch, if batching => {
                    let mut taken = 0;
                    while let Ok(request) = requests.try_recv() {
                        self.record_request(request);
                        taken += 1;
                    }
                    // Keep batching while requests keep coming; wake per event again when idle.
                    if taken > 0 {
                        batch.as_mut().reset(tokio::time::Instant::now() + REQUEST_BATCH);
                    } else {
                        batching = false;
                    }
                }
                guard = ring.readable_mut() => {
                    let mut guard = guard.context("waiting for kernel events")?;
                    // Clear first, then drain: the ring buffer wakes its reader only when the
                    // reader has caught up, so whatever is submitted after this point either
                    // is seen by this drain or raises a fresh readiness.
                    guard.clear_ready();
                    let name = |generation, row| self.row_name(generation, row);
                    for event in events::drain(guard.get_inner_mut(), name) {
                        events::log(&event, &self.log_limit);
                        let pod = pods.as_ref().and_then(|p| p.pod(event.cgroup_id));
                        if let Some(pod) = &pod {
                            self.metrics.pod_event(
                                &pod.to_string(),
                                &event.hook.to_string(),
                                &event.verdict.to_string(),
                            );
                        }
                        self.hub.publish(HubEvent::Connect(SystemTime::now(), event, pod));
                    }
                }
            }
        }
    }

    /// Removes the learned addresses that expired.
    fn sweep_learned(&self) {
        if self.enforcer.dns_listeners().is_empty() {
            return;
        }
        match self.dns.sweep(self.enforcer.pin_dir()) {
            Ok(swept) => {
                if swept.expired + swept.revoked > 0 {
                    tracing::debug!(?swept, "dns: swept the learned addresses");
                }
            }
            Err(e) => tracing::warn!(error = %e, "dns: sweeping the learned addresses"),
        }
    }

    /// Opens the proxy's listeners in new pods and closes those of pods that went.
    fn sync_pod_nets(
        &mut self,
        pods: Option<&pods::PodWatch>,
        host: Option<u64>,
        serving: &Serving,
    ) {
        let Some(pods) = pods else {
            return;
        };
        let now = pods.now();
        if now.scoped != self.pods {
            match self.enforcer.set_pods(&now.scoped) {
                Ok(()) => self.pods.clone_from(&now.scoped),
                Err(e) => {
                    tracing::error!(error = %e, "pods: putting the pods in their namespaces' scopes; they keep the node-wide rules only until it works")
                }
            }
        }
        let marking = MarkAndServe {
            enforcer: &self.enforcer,
            serving,
        };
        let port = self.policy.proxy.port;
        let gone = self.pod_nets.sync(&now.pods, port, host, &marking);
        self.pod_nets.sync_dns(&self.enforcer);
        if !gone.is_empty() {
            // A pod that went takes its metric series with it.
            let names: std::collections::HashSet<String> =
                now.pods.iter().map(|p| p.name.to_string()).collect();
            self.metrics.keep_pods(&names);
        }
        let proxy = self.proxies.borrow();
        for netns in gone {
            proxy.forget_netns(netns);
        }
    }

    /// Counts a proxied request in the metrics, logs it and publishes it to `egress events`.
    fn record_request(&self, request: RequestEvent) {
        self.metrics
            .proxy_request(request.rule.as_deref(), request.status, request.latency);
        if request.would_deny {
            self.metrics.proxy_would_deny();
        }
        if let Some(pod) = request.process.as_ref().and_then(|p| p.pod.as_deref()) {
            self.metrics
                .pod_event(pod, "http", crate::control::server::http_verdict(&request));
        }
        log_request(&request, &self.log_limit);
        self.hub.publish(HubEvent::Http(SystemTime::now(), request));
    }

    /// Serves `/metrics`, `/healthz` and `/readyz` on `listener`. Kernel counters are read from
    /// their pins at each scrape, on the metrics server's threads, so a scrape never waits
    /// for a reload and a reload never waits for a scrape.
    fn serve_metrics(
        &self,
        listener: std::net::TcpListener,
        ready: channel::Receiver<bool>,
        health: Arc<health::Health>,
    ) -> anyhow::Result<()> {
        let address = listener.local_addr().context("metrics listener address")?;
        let listener = tokio::net::TcpListener::from_std(listener).context("metrics listener")?;
        let counters = PinnedCounters::open(&self.settings.target.pin_dir)
            .context("opening the pinned counters for metrics")?;
        let rows = self.rows.subscribe();
        let (metrics, connections) = (self.metrics.clone(), health.clone());
        let snapshot = Arc::new(move || {
            metrics.set_connections(
                &connections.admission.stats(),
                crate::fds::open_fds().ok(),
                connections.budget.limit,
            );
            let rows = rows.borrow().clone();
            let counts = counters
                .rows(&crate::loader::row_names(&rows.1))
                .unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "metrics: reading the kernel counters");
                    Vec::new()
                });
            let stats = counters.stats().unwrap_or_default();
            KernelSnapshot {
                generation: rows.0,
                rules: counts
                    .into_iter()
                    .map(|r| RuleVerdicts {
                        rule: r.name,
                        allowed: r.counters.allowed,
                        denied: r.counters.denied,
                        would_deny: r.counters.would_deny,
                    })
                    .collect(),
                events_lost: stats.events_lost,
                errors: stats.errors,
                hooks: counters
                    .hooks()
                    .unwrap_or_default()
                    .into_iter()
                    .map(|h| RuleVerdicts {
                        rule: h.name,
                        allowed: h.counters.allowed,
                        denied: h.counters.denied,
                        would_deny: h.counters.would_deny,
                    })
                    .collect(),
            }
        });
        let metrics = self.metrics.clone();
        tracing::info!(%address, "metrics: serving /metrics, /healthz and /readyz");
        tokio::spawn(async move {
            let health: metrics::HealthCheck = Arc::new(move || health.problems());
            if let Err(e) = metrics::serve(listener, metrics, snapshot, ready, health).await {
                tracing::error!(%address, error = %e, "metrics listener failed");
            }
        });
        Ok(())
    }
}

/// What serving a proxy listener takes: the proxy in force, the kernel's records of
/// redirects, where request events go, and the connection bounds.
struct Serving {
    proxies: channel::Receiver<Arc<Proxy>>,
    table: Arc<crate::loader::OrigDstTable>,
    events: mpsc::Sender<RequestEvent>,
    health: Arc<health::Health>,
}

impl Serving {
    /// Serves `listener`, whose connections the kernel records under the network namespace
    /// `netns`, on a task of its own; `origin` for a listener inside a pod.
    fn spawn(
        &self,
        listener: std::net::TcpListener,
        netns: u64,
        origin: Option<Arc<Origin>>,
    ) -> anyhow::Result<tokio::task::AbortHandle> {
        let address = listener.local_addr().context("proxy listener address")?;
        let listener = tokio::net::TcpListener::from_std(listener).context("proxy listener")?;
        let orig_dst: Arc<dyn crate::proxy::OrigDst> = Arc::new(redirects::InNetns {
            table: self.table.clone(),
            netns,
            pod: origin.as_ref().and_then(|o| o.pod.clone()),
        });
        let (proxies, tx) = (self.proxies.clone(), self.events.clone());
        let (admission, health) = (self.health.admission.clone(), self.health.clone());
        health.listener_started();
        let task = tokio::spawn(async move {
            let served =
                Proxy::serve_reloadable(proxies, listener, (orig_dst, origin), tx, admission).await;
            if let Err(e) = served {
                tracing::error!(%address, error = %e, "proxy listener failed");
            }
            health.listener_stopped();
        });
        Ok(task.abort_handle())
    }
}

/// Marks a pod's listener in the generation in force, then serves it.
struct MarkAndServe<'a> {
    enforcer: &'a crate::loader::Enforcer,
    serving: &'a Serving,
}

impl pod_nets::Serve for MarkAndServe<'_> {
    fn mark(&self, listener: &std::net::TcpListener) -> anyhow::Result<()> {
        Ok(self.enforcer.mark_proxy_listener(listener)?)
    }

    fn serve(
        &self,
        listener: std::net::TcpListener,
        origin: Arc<Origin>,
    ) -> tokio::task::AbortHandle {
        let netns = origin.netns;
        match self.serving.spawn(listener, netns, Some(origin)) {
            Ok(task) => task,
            Err(e) => {
                tracing::error!(error = %e, "proxy: serving a pod listener");
                tokio::spawn(async {}).abort_handle()
            }
        }
    }
}

/// The next change of the node's pods; never, without a pod watch.
async fn pods_changed(pods: &mut Option<pods::PodWatch>) {
    match pods {
        Some(p) => p.changed().await,
        None => std::future::pending().await,
    }
}

/// The Kubernetes API's objects, once a change has settled; never, without a watch.
async fn cluster_changed(
    cluster: &mut Option<crate::cluster::Cluster>,
) -> crate::cluster::Snapshot {
    match cluster {
        Some(c) => c.changed().await,
        None => std::future::pending().await,
    }
}

/// The next settled change of the policy files; never, without a watch.
async fn changed(watch: &mut Option<watch::PolicyWatch>) {
    match watch {
        Some(w) => w.changed().await,
        None => std::future::pending().await,
    }
}

/// Logs a proxied request (or a connection the proxy refused) in the same form as the
/// kernel's verdicts: refusals and errors as warnings (as many as `limit` lets through, per
/// client address and host), the rest as info.
fn log_request(e: &RequestEvent, limit: &LogLimit) {
    let rule = e.rule.as_deref().unwrap_or(NO_RULE_NAME);
    let orig_dst = e.orig_dst.map(|a| a.to_string()).unwrap_or_default();
    let upstream = e.upstream.map(|a| a.to_string()).unwrap_or_default();
    let reason = e.reason.as_deref().unwrap_or("");
    macro_rules! emit {
        ($level:ident) => {
            tracing::$level!(
                rule = %rule,
                pod = %e.process.as_ref().and_then(|p| p.pod.as_deref()).unwrap_or(""),
                host = %e.host,
                method = %e.method,
                path = %e.path,
                status = e.status,
                bytes_in = e.bytes_in,
                bytes_out = e.bytes_out,
                latency_ms = format_args!("{:.2}", e.latency.as_secs_f64() * 1000.0),
                client = %e.client,
                orig_dst = %orig_dst,
                upstream = %upstream,
                reason = %reason,
                "http {}{}",
                e.status,
                if e.would_deny { " would-deny" } else { "" }
            )
        };
    }
    if e.would_deny || e.status == 0 || e.status >= 400 {
        if limit.admit(&format!("http {} -> {}", e.client.ip(), e.host)) {
            emit!(warn);
        }
    } else {
        emit!(info);
    }
}

/// The agent's handlers for SIGINT, SIGTERM (stop) and SIGHUP (reload). `egress run` installs
/// them before it says it is ready: a signal sent once the ready line is out is never lost to
/// a handler not yet in place (under the kernel guests' emulation a SIGTERM sent right after
/// the ready line once went unanswered).
pub struct Signals {
    sigint: Signal,
    sigterm: Signal,
    sighup: Signal,
}

impl Signals {
    /// Installs the three handlers; on the agent's runtime.
    ///
    /// # Errors
    /// A handler cannot be installed.
    pub fn install() -> anyhow::Result<Self> {
        Ok(Self {
            sigint: signal(SignalKind::interrupt()).context("installing SIGINT handler")?,
            sigterm: signal(SignalKind::terminate()).context("installing SIGTERM handler")?,
            sighup: signal(SignalKind::hangup()).context("installing SIGHUP handler")?,
        })
    }
}
