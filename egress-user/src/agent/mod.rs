//! The running agent: the policy in force and the handles to the kernel and the proxy.
//!
//! By job: [`sources`] builds the policy from its sources; [`change`] every way it changes
//! (SIGHUP, a change of the policy files, `egress reload`, `egress create`, `egress delete`),
//! all through one path; [`status`] what `egress status` and `get` show; [`serve`] the loop
//! that serves the proxy, the control socket, the metrics and the events; [`redirects`] gives
//! the proxy the kernel's record of each redirect. Changes are handled one at a time, in the
//! order they arrive.

#![forbid(unsafe_code)]

mod change;
mod cluster;
pub mod dns;
pub mod error;
pub mod health;
mod history;
pub mod listeners;
mod names;
pub mod occupancy;
pub mod pod_nets;
pub mod pods;
mod redirects;
mod serve;
pub use serve::Signals;
pub mod sources;
mod status;
pub mod watch;

use std::{path::PathBuf, sync::Arc};

use anyhow::Context as _;
use tokio::sync::watch as channel;

use crate::{
    compile::{self, RowTable},
    control::server::EventHub,
    loader::{self, Enforcer, Target, features::Assessment},
    metrics::Metrics,
    pipeline,
    policy::Policy,
    proxy::Proxy,
    state::Store,
};

use sources::Built;

/// What the agent was started with.
pub struct Settings {
    /// Policy files and directories; none: the embedded default.
    pub paths: Vec<PathBuf>,
    /// The state directory (created rules).
    pub store: Store,
    /// The resolv.conf whose resolvers DNS is allowed to (unless the policy names its own),
    /// read again at every reload.
    pub resolv_conf: PathBuf,
    /// Where the programs go.
    pub target: Target,
    /// This kernel's features, assessed once at start (before anything was touched).
    pub kernel: Assessment,
    /// The proxy's listeners (bound, as far as possible, before anything was attached; the
    /// missing ones are tried again every second).
    pub listeners: listeners::ProxyListeners,
    /// The metrics listener, when metrics are served.
    pub metrics: Option<std::net::TcpListener>,
    /// The container runtime's CRI socket, when events are to name the node's pods.
    pub cri_socket: Option<PathBuf>,
    /// The node's pods when the agent starts: the first generation puts them in their
    /// namespaces' scopes, and they stay known until the runtime next answers.
    pub pods: Arc<pods::NodePods>,
    /// The Kubernetes API's EgressRule objects, when the agent watches them.
    pub cluster: Option<crate::cluster::Cluster>,
    /// The objects in force when the agent last ran (in `built` already): in force until the
    /// API's list arrives. [`Agent::start`] takes them (the settings keep no copy).
    pub cluster_rules: Vec<crate::cluster::RuleObject>,
}

/// The generation in force and its row table, for the metrics endpoint (which lists the names
/// when scraped: listing 10,000 of them on every reload took about 2 ms of it).
type Rows = Arc<(u32, Arc<RowTable>)>;

/// The running agent.
pub struct Agent {
    settings: Settings,
    enforcer: Enforcer,
    proxies: channel::Sender<Arc<Proxy>>,
    policy: Policy,
    /// A hash of the policy sources' bytes in force: a watch event that changed nothing
    /// reloads nothing.
    digest: u64,
    reloads_ok: u64,
    reloads_failed: u64,
    /// The last failed change's error, until a change succeeds (or the sources are back to
    /// those in force).
    last_error: Option<String>,
    hub: Arc<EventHub>,
    metrics: Arc<Metrics>,
    rows: channel::Sender<Rows>,
    /// The rows' names in the last generations: an event names its rule as the generation
    /// that judged it knew the row.
    names: names::RowNames,
    /// Bounds the log lines of denials; events and counters keep every one.
    log_limit: crate::telemetry::LogLimit,
    /// Descriptors, the proxy's connections and what can fail; set when serving starts.
    health: Option<Arc<health::Health>>,
    /// Keeps `egress events` history across restarts.
    history: history::HistoryWriter,
    /// The proxy's listeners inside the pods' network namespaces.
    pod_nets: pod_nets::PodNets,
    /// The node's pods (each pod's cgroup id and namespace): every generation puts them in
    /// their namespaces' scopes.
    pods: Vec<(u64, String)>,
    /// The Kubernetes API's EgressRule objects in force.
    cluster: cluster::ClusterRules,
    /// The DNS listeners of FQDN rules in the agent's own network namespace.
    dns: dns::DnsListeners,
}

impl Agent {
    /// Puts `built` (see [`sources::build`]) in force: the first generation, or a takeover of
    /// pinned programs left by an earlier agent. Returns the agent and the proxy channel.
    ///
    /// # Errors
    /// The proxy cannot be configured (a CA file), or the kernel refused the policy.
    pub fn start(
        mut settings: Settings,
        built: Built,
    ) -> anyhow::Result<(Self, channel::Receiver<Arc<Proxy>>)> {
        built.log_warnings();
        let Built { policy, digest, .. } = built;
        let proxy = Arc::new(Proxy::new(&policy).context("configuring the proxy")?);
        let enforcer = pipeline::enforce(
            &settings.target,
            &settings.kernel,
            &policy,
            &settings.listeners.bound(),
            &settings.pods.scoped,
        )
        .with_context(|| {
            format!(
                "enforcing the policy on {}",
                settings.target.cgroup.display()
            )
        })?;
        proxy.set_generation(enforcer.generation());
        let pods = settings.pods.scoped.clone();
        let cluster = cluster::ClusterRules::restored(std::mem::take(&mut settings.cluster_rules));
        let (proxies, rx) = channel::channel(proxy);
        let hub = Arc::<EventHub>::default();
        let history = history::HistoryWriter::restore(settings.store.history_path(), &hub);
        let rows = channel::Sender::new(Arc::new((enforcer.generation(), enforcer.rows().clone())));
        let mut agent = Self {
            digest,
            settings,
            enforcer,
            proxies,
            policy,
            reloads_ok: 0,
            reloads_failed: 0,
            last_error: None,
            hub,
            history,
            metrics: Arc::new(Metrics::new()),
            rows,
            names: names::RowNames::default(),
            log_limit: crate::telemetry::LogLimit::new(),
            health: None,
            pod_nets: pod_nets::PodNets::default(),
            pods,
            cluster,
            dns: dns::DnsListeners::default(),
        };
        agent.remember_names();
        crate::memory::release_soon();
        Ok((agent, rx))
    }

    /// Opens, serves and marks the DNS listeners of the agent's own network namespace (on the
    /// current runtime): `egress run` does it before it says it is ready, so that the first
    /// query of a workload already goes through the agent.
    pub fn start_dns(&mut self) {
        self.dns.sync(&self.enforcer);
    }

    /// Tells the metrics endpoint and the event namer about the generation now in force.
    fn generation_changed(&mut self) {
        self.rows.send_replace(Arc::new((
            self.enforcer.generation(),
            Arc::clone(self.enforcer.rows()),
        )));
        self.remember_names();
    }

    /// Keeps the row table of the generation in force, for naming its events.
    fn remember_names(&mut self) {
        let table = Arc::clone(self.enforcer.rows());
        if let Some(previous) = self.names.push(self.generation(), table) {
            // The last handle on a 10,000-rule table, most often: freed off the reload's way.
            change::drop_elsewhere(previous);
        }
    }

    /// The name of `row` as `generation` knew it.
    fn row_name(&self, generation: u32, row: u32) -> Option<String> {
        if let Some(name) = compile::reserved_row_name(row) {
            return Some(name.to_owned());
        }
        self.names.name(generation, row).map(str::to_owned)
    }

    /// The policy's sources: the files (or the default), the created rules, then the API's
    /// objects in force.
    fn sources(&self) -> Vec<crate::policy::PolicySource> {
        let mut sources = sources::list(&self.settings.paths, &self.settings.store);
        sources.extend(self.cluster.sources());
        sources
    }

    /// The generation in force.
    pub fn generation(&self) -> u32 {
        self.enforcer.generation()
    }

    /// The policy in force.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Where events for `egress events` go.
    pub fn hub(&self) -> Arc<EventHub> {
        self.hub.clone()
    }

    /// Whether the pinned links enforce on the managed cgroup (read from the kernel, not
    /// remembered: `egress unload` may have detached them).
    fn attached(&self) -> bool {
        let target = &self.settings.target;
        crate::cgroup::id(&target.cgroup).ok().is_some_and(|id| {
            loader::enforced_cgroups(&target.pin_dir).is_ok_and(|ids| ids.contains(&id))
        })
    }

    /// The first proxy listener still missing, as `ADDR: why`.
    pub fn missing_listener(&self) -> Option<String> {
        self.settings
            .listeners
            .missing()
            .first()
            .map(|m| format!("{}: {}", m.address, m.error))
    }

    /// Whether the agent does its whole job: the programs enforce on the managed cgroup and
    /// every proxy listener is the agent's.
    fn ready(&self) -> bool {
        self.attached() && self.settings.listeners.complete()
    }

    /// Binds the proxy listeners that were missing, if their port is free now, and marks them
    /// as the agent's; returns those to serve. A listener that cannot be marked is closed
    /// again (the kernel would refuse connections to it anyway) and tried again later.
    fn retry_listeners(&mut self) -> Vec<std::net::TcpListener> {
        if self.settings.listeners.complete() {
            return Vec::new();
        }
        let mut serve = Vec::new();
        for listener in self.settings.listeners.retry() {
            match self.enforcer.mark_proxy_listener(&listener) {
                Ok(()) => serve.push(listener),
                Err(e) => tracing::error!(error = %e, "proxy: marking a new listener"),
            }
        }
        if !serve.is_empty() && self.ready() {
            tracing::info!(
                listening = ?self.settings.listeners.listening(),
                "ready: every proxy listener is the agent's"
            );
        }
        serve
    }

    /// With an `--xdp-iface` prefix pattern (`veth*`), attaches the XDP backstop to matching
    /// interfaces that appeared since the last look (a new pod's veth) and forgets those that
    /// went; at most a second after a pod starts.
    fn rescan_xdp(&mut self) {
        let patterns = &self.settings.target.xdp_ifaces;
        if !patterns.iter().any(|p| p.ends_with('*')) {
            return;
        }
        match self.enforcer.sync_xdp(patterns) {
            Ok(true) => {
                tracing::info!(ifaces = ?self.enforcer.xdp_ifaces(), "XDP backstop interfaces changed")
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "XDP backstop: rescanning the interfaces"),
        }
    }
}
