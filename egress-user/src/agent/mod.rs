//! The running agent: the policy in force, and every way it changes (SIGHUP, a change of the
//! policy files, `egress reload`, `egress create`, `egress delete`), what `egress status`,
//! `get` and `events` show, and the loop that serves all of it.
//!
//! Every change takes one path, [`Agent::apply`]: the whole policy (the policy files, or the
//! embedded default, plus the created rules in the state directory, and the DNS resolvers of
//! resolv.conf unless the policy names its own) is read and validated first; an invalid one
//! changes nothing and the error is logged and counted. A valid one goes
//! to the proxy first (so a removed host is refused at once) and then to the kernel as a new
//! generation, swapped in atomically; if the kernel refuses it, the proxy gets the old policy
//! back. Changes are handled one at a time, in the order they arrive.

#![forbid(unsafe_code)]

pub mod health;
mod history;
pub mod listeners;
pub mod occupancy;
pub mod watch;

use std::{
    collections::HashMap,
    hash::{Hash as _, Hasher as _},
    path::{Path, PathBuf},
    sync::Arc,
    time::SystemTime,
};

use anyhow::Context as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{mpsc, watch as channel},
};

use egress_common::DNS_PORT;

use crate::{
    compile::DNS_RULE_NAME,
    control::{
        self, ProxyStatus, Request, Response, RuleRow, Status,
        server::{Call, EventHub, HubEvent},
    },
    events,
    loader::{self, Enforcer, PinnedCounters, Target},
    metrics::{self, KernelSnapshot, Metrics, RuleVerdicts},
    policy::{self, Policy, PolicySource},
    proxy::{Proxy, RequestEvent},
    state::{self, Kind, Store},
};

/// Proxy events waiting to be logged; past this the proxy drops (and counts) them rather than
/// slow a request down. It holds [`REQUEST_BATCH`] of requests at well over 100,000 a second.
const EVENT_QUEUE: usize = 4096;

/// After a proxied request's event wakes the agent's main loop, further ones wait this long
/// and are then taken in one batch: under load the loop wakes 50 times a second instead of
/// once per request (a futex wake and a context switch each, with the proxy on another thread).
/// Metrics, logs and `egress events` see a request at most this much later.
const REQUEST_BATCH: std::time::Duration = std::time::Duration::from_millis(20);

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
    /// The proxy's listeners (bound, as far as possible, before anything was attached; the
    /// missing ones are tried again every second).
    pub listeners: listeners::ProxyListeners,
    /// The metrics listener, when metrics are served.
    pub metrics: Option<std::net::TcpListener>,
}

/// The generation in force and its counter rows with their names, for the metrics endpoint.
type Rows = Arc<(u32, Vec<(u32, String)>)>;

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
    last_error: Option<String>,
    hub: Arc<EventHub>,
    metrics: Arc<Metrics>,
    rows: channel::Sender<Rows>,
    /// The row tables of the last [`NAMED_GENERATIONS`] generations, newest last: an event
    /// names its rule as the generation that judged it knew the row.
    names: std::collections::VecDeque<(u32, Arc<crate::compile::RowTable>)>,
    /// Bounds the log lines of denials; events and counters keep every one.
    log_limit: crate::telemetry::LogLimit,
    /// Descriptors, the proxy's connections and what can fail; set when serving starts.
    health: Option<Arc<health::Health>>,
    /// Keeps `egress events` history across restarts.
    history: history::HistoryWriter,
}

/// How many generations' row tables are kept to name events with. Events wait in the ring
/// buffer for milliseconds; one older than this many reloads is named by its row number.
const NAMED_GENERATIONS: usize = 16;

/// Where the agent's policy comes from: the files (directories expanded, `*.yaml`/`*.yml` in
/// name order) or the embedded default, then the created rules.
pub fn sources(paths: &[PathBuf], store: &Store) -> Vec<PolicySource> {
    let mut out = Vec::new();
    if paths.is_empty() {
        out.push(PolicySource::Text {
            name: policy::DEFAULT_POLICY_NAME.to_owned(),
            bytes: policy::DEFAULT_POLICY.as_bytes().to_vec(),
        });
    }
    for path in paths {
        match std::fs::read_dir(path) {
            Ok(entries) => {
                let mut found: Vec<PathBuf> = entries
                    .filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
                    .collect();
                found.sort();
                out.extend(found.into_iter().map(PolicySource::File));
            }
            // Not a directory (or unreadable): loading reports it with the path.
            Err(_) => out.push(PolicySource::File(path.clone())),
        }
    }
    let created = store.created_path();
    if created.exists() {
        out.push(PolicySource::File(created));
    }
    out
}

/// Fills `policy`'s DNS resolvers from `resolv_conf` unless the policy names its own, and logs
/// what was wrong with the file (a line without a usable address, a missing file).
///
/// # Errors
/// The file exists but cannot be read.
pub fn fill_resolvers(policy: &mut Policy, resolv_conf: &Path) -> Result<(), String> {
    let warnings = policy
        .fill_resolvers(resolv_conf)
        .map_err(|e| e.to_string())?;
    for warning in warnings {
        tracing::warn!(problem = %warning, "dns: resolv.conf");
    }
    Ok(())
}

/// A hash of the sources' names and bytes, and of resolv.conf's (an unreadable file hashes its
/// error): a reload that would change nothing is skipped.
fn digest(sources: &[PolicySource], resolv_conf: &Path) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    let resolv_conf = PolicySource::File(resolv_conf.to_owned());
    for source in sources.iter().chain([&resolv_conf]) {
        match source {
            PolicySource::File(path) => {
                path.hash(&mut h);
                // Bounded and never blocking, as loading reads it: a FIFO named as a policy
                // file must not hang the watcher (loading then reports it).
                match policy::read::read_bounded(path, policy::MAX_FILE_SIZE) {
                    Ok(bytes) => bytes.hash(&mut h),
                    Err(e) => e.to_string().hash(&mut h),
                }
            }
            PolicySource::Text { name, bytes } => {
                name.hash(&mut h);
                bytes.hash(&mut h);
            }
        }
    }
    h.finish()
}

/// Logs the policy's warnings (an empty policy, ...) as `FILE:LINE: message`, as `egress
/// check` prints them.
fn log_warnings(policy: &Policy) {
    for warning in &policy.warnings {
        tracing::warn!(%warning, "policy warning");
    }
}

impl Agent {
    /// Puts `policy` (loaded from `sources`, see [`sources`]) in force: the first generation,
    /// or a takeover of pinned programs left by an earlier agent. Returns the agent and the
    /// proxy channel.
    ///
    /// # Errors
    /// The proxy cannot be configured (a CA file), or the kernel refused the policy.
    pub fn start(
        settings: Settings,
        sources: &[PolicySource],
        policy: Policy,
    ) -> anyhow::Result<(Self, channel::Receiver<Arc<Proxy>>)> {
        log_warnings(&policy);
        let proxy = Arc::new(Proxy::new(&policy).context("configuring the proxy")?);
        let enforcer =
            Enforcer::apply_with_proxy(&settings.target, &policy, &settings.listeners.bound())
                .with_context(|| {
                    format!(
                        "enforcing the policy on {}",
                        settings.target.cgroup.display()
                    )
                })?;
        proxy.set_generation(enforcer.generation());
        let (proxies, rx) = channel::channel(proxy);
        let hub = Arc::<EventHub>::default();
        let history = history::HistoryWriter::restore(settings.store.history_path(), &hub);
        let rows = channel::Sender::new(Arc::new((enforcer.generation(), enforcer.row_names())));
        let mut agent = Self {
            digest: digest(sources, &settings.resolv_conf),
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
            names: std::collections::VecDeque::new(),
            log_limit: crate::telemetry::LogLimit::new(),
            health: None,
        };
        agent.remember_names();
        Ok((agent, rx))
    }

    /// Keeps the row table of the generation in force, for naming its events.
    fn remember_names(&mut self) {
        if self.names.len() == NAMED_GENERATIONS {
            self.names.pop_front();
        }
        let table = Arc::new(self.enforcer.rows().clone());
        self.names.push_back((self.generation(), table));
    }

    /// The name of `row` as `generation` knew it.
    fn row_name(&self, generation: u32, row: u32) -> Option<String> {
        match row {
            egress_common::ROW_NO_RULE => Some(loader::NO_RULE_NAME.to_owned()),
            egress_common::ROW_BYPASS => Some(loader::BYPASS_NAME.to_owned()),
            egress_common::ROW_PROXY => Some(loader::PROXY_NAME.to_owned()),
            _ => self
                .names
                .iter()
                .rev()
                .find(|(g, _)| *g == generation)
                .and_then(|(_, table)| table.name(row).map(str::to_owned)),
        }
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

    /// Reads the policy sources again and applies them; unless `force`, only if their bytes
    /// changed. Returns the generation in force.
    fn reload(&mut self, force: bool, why: &str) -> Result<u32, String> {
        let sources = sources(&self.settings.paths, &self.settings.store);
        if !force && digest(&sources, &self.settings.resolv_conf) == self.digest {
            if let Some(error) = self.last_error.take() {
                // A broken file removed, or put back as it was: the sources are again those of
                // the policy in force, so the last failure no longer describes them.
                tracing::info!(
                    why,
                    generation = self.generation(),
                    previous_error = %error.lines().next().unwrap_or(""),
                    "policy sources are back to the policy in force; the last reload error is cleared"
                );
            } else {
                tracing::debug!(why, "policy sources unchanged; nothing to reload");
            }
            return Ok(self.generation());
        }
        self.apply(&sources, why)
    }

    /// Validates `sources` as a whole and puts them in force (see the module docs). Every
    /// outcome is logged and counted.
    fn apply(&mut self, sources: &[PolicySource], why: &str) -> Result<u32, String> {
        let generation = self.generation();
        let result = self.try_apply(sources);
        self.metrics.reload(result.is_ok());
        match &result {
            Ok(new) => {
                self.reloads_ok += 1;
                self.last_error = None;
                tracing::info!(
                    why,
                    generation = new,
                    rules = self.policy.rules.len(),
                    http_rules = self.policy.http_rules.len(),
                    aliases = self.policy.aliases.len(),
                    dns_resolvers = self.policy.dns.resolvers.len(),
                    "reloaded: new policy in force"
                );
            }
            Err(e) => {
                self.reloads_failed += 1;
                self.last_error = Some(e.clone());
                for line in e.lines() {
                    tracing::error!(why, error = %line, "reload: error");
                }
                tracing::error!(
                    why,
                    generation,
                    "reload failed; the running policy stays in force"
                );
            }
        }
        result
    }

    fn try_apply(&mut self, sources: &[PolicySource]) -> Result<u32, String> {
        let mut policy = policy::load_mixed(sources).map_err(|e| e.to_string())?;
        log_warnings(&policy);
        // Read at every reload, so a changed resolv.conf is in force from the next one on.
        fill_resolvers(&mut policy, &self.settings.resolv_conf)?;
        if policy.proxy.port != self.policy.proxy.port {
            return Err(format!(
                "changing the proxy port ({} to {}) needs a restart of the agent",
                self.policy.proxy.port, policy.proxy.port
            ));
        }
        let proxy = {
            // Counts of the rules that stay go on (`egress status`, like the kernel's rows).
            let previous = self.proxies.borrow();
            Proxy::builder(&policy)
                .counting_after(&previous)
                // The number the kernel will give it (the agent alone moves generations on);
                // set again from the kernel's answer below.
                .generation(loader::next_generation(self.generation()))
                .build()
                // The whole chain: `ca file F: cannot read it: <why>`, not just its first link.
                .map_err(|e| format!("{:#}", anyhow::Error::from(e)))?
        };
        let previous = self.proxies.send_replace(Arc::new(proxy));
        let applied = tokio::task::block_in_place(|| {
            Enforcer::apply_with_proxy(
                &self.settings.target,
                &policy,
                &self.settings.listeners.bound(),
            )
        });
        match applied {
            Ok(enforcer) => {
                self.proxies.borrow().set_generation(enforcer.generation());
                self.rows
                    .send_replace(Arc::new((enforcer.generation(), enforcer.row_names())));
                self.enforcer = enforcer;
                self.remember_names();
                self.policy = policy;
                self.digest = digest(sources, &self.settings.resolv_conf);
                Ok(self.generation())
            }
            Err(e) => {
                self.proxies.send_replace(previous);
                Err(format!("{:#}", anyhow::Error::from(e)))
            }
        }
    }

    /// `egress create`: adds the documents of `text`, if the whole policy with them is valid
    /// and the kernel takes it; otherwise nothing changes, on disk or in force.
    fn create(&mut self, source: &str, text: &str) -> Result<Response, String> {
        let docs = state::split(source, text).map_err(|e| format!("{e}\nnothing was created"))?;
        if docs.is_empty() {
            return Err(format!("{source}: no EgressRule or Service document"));
        }
        let old = self.settings.store.documents()?;
        let mut candidate = sources(&self.settings.paths, &self.settings.store);
        candidate.push(PolicySource::Text {
            name: source.to_owned(),
            bytes: text.as_bytes().to_vec(),
        });
        let mut policy =
            policy::load_mixed(&candidate).map_err(|e| format!("{e}\nnothing was created"))?;
        // Its warnings are logged by the reload that follows.
        policy
            .fill_resolvers(&self.settings.resolv_conf)
            .map_err(|e| format!("{e}\nnothing was created"))?;
        let mut new = old.clone();
        new.extend(docs.iter().cloned());
        let names = describe(&docs);
        self.change_store(&old, &new, &format!("create {names}"))
            .map(|generation| Response::Applied {
                generation,
                message: format!("created {names}"),
            })
    }

    /// `egress delete`: removes created documents by name; all of them or none.
    fn delete(&mut self, kind: Kind, names: &[String]) -> Result<Response, String> {
        let old = self.settings.store.documents()?;
        let mut problems = Vec::new();
        for name in names {
            if old.iter().any(|d| d.kind == kind && &d.name == name) {
                continue;
            }
            problems.push(match self.origin_of(kind, name) {
                Some(origin) => format!(
                    "{kind} `{name}` comes from {origin}, not from `egress create`; edit that file"
                ),
                None => format!("no {kind} named `{name}`"),
            });
        }
        if !problems.is_empty() {
            problems.push("nothing was deleted".to_owned());
            return Err(problems.join("\n"));
        }
        let (gone, new): (Vec<_>, Vec<_>) = old
            .iter()
            .cloned()
            .partition(|d| d.kind == kind && names.contains(&d.name));
        let names = describe(&gone);
        self.change_store(&old, &new, &format!("delete {names}"))
            .map(|generation| Response::Applied {
                generation,
                message: format!("deleted {names}"),
            })
    }

    /// Saves `new` as the created documents and applies the result; puts `old` back on disk if
    /// the policy cannot be applied.
    fn change_store(
        &mut self,
        old: &[state::Document],
        new: &[state::Document],
        why: &str,
    ) -> Result<u32, String> {
        self.settings
            .store
            .save(new)
            .map_err(|e| format!("saving the created rules: {e}"))?;
        self.reload(true, why).inspect_err(|_| {
            if let Err(e) = self.settings.store.save(old) {
                tracing::error!(error = %e, "putting the created rules back failed");
            }
        })
    }

    /// Where a rule or alias of the policy in force is defined.
    fn origin_of(&self, kind: Kind, name: &str) -> Option<String> {
        match kind {
            Kind::EgressRule if name == DNS_RULE_NAME => self
                .has_dns_rule()
                .then(|| self.policy.dns.source.to_string()),
            Kind::EgressRule => self
                .policy
                .rules
                .iter()
                .find(|r| r.name == name)
                .map(|r| r.origin.to_string())
                .or_else(|| {
                    let rules = &self.policy.http_rules;
                    rules
                        .iter()
                        .find(|r| r.name == name)
                        .map(|r| r.origin.to_string())
                }),
            Kind::Service => self
                .policy
                .aliases
                .iter()
                .find(|a| a.name == name)
                .map(|a| a.origin.to_string()),
        }
    }

    /// Every rule and alias in force with its counters, then the reserved rows.
    fn rows(&self) -> Vec<RuleRow> {
        let kernel: HashMap<String, egress_common::RuleCounters> = match self.enforcer.counters() {
            Ok(rows) => rows.into_iter().map(|r| (r.name, r.counters)).collect(),
            Err(e) => {
                tracing::warn!(error = %e, "reading the kernel counters");
                HashMap::new()
            }
        };
        let proxy: HashMap<Option<String>, u64> = self
            .proxies
            .borrow()
            .counters()
            .into_iter()
            .map(|s| (s.rule, s.requests))
            .collect();
        let created = self.settings.store.created_path().display().to_string();
        let row = |kind: Kind, name: &str, allows: String, origin: &policy::Origin| {
            let k = kernel.get(name).copied().unwrap_or_default();
            RuleRow {
                kind: kind.to_string(),
                name: name.to_owned(),
                allows,
                source: origin.to_string(),
                created: origin.file == created,
                allowed: k.allowed,
                denied: k.denied,
                would_deny: k.would_deny,
                requests: proxy.get(&Some(name.to_owned())).copied().unwrap_or(0),
            }
        };
        let mut rows = Vec::new();
        for r in &self.policy.rules {
            let ports = join(r.ports.iter().map(|p| format!("{}/{}", p.port, p.protocol)));
            rows.push(row(
                Kind::EgressRule,
                &r.name,
                format!("{} {ports}", r.destination),
                &r.origin,
            ));
        }
        for r in &self.policy.http_rules {
            let ports = join(r.ports.iter().map(|p| format!("{}/{}", p.port, p.protocol)));
            rows.push(row(
                Kind::EgressRule,
                &r.name,
                format!("{} {ports}", r.host),
                &r.origin,
            ));
        }
        rows.extend(dns_row(
            &self.policy.dns,
            kernel.get(DNS_RULE_NAME).copied().unwrap_or_default(),
        ));
        for a in &self.policy.aliases {
            let ports = join(
                a.ports
                    .iter()
                    .map(|p| format!("{}/{p}", policy::Alias::protocol(*p))),
            );
            rows.push(row(
                Kind::Service,
                &a.name,
                format!("{}.{} -> {} {ports}", a.name, a.namespace, a.external_name),
                &a.origin,
            ));
        }
        for name in [
            loader::NO_RULE_NAME,
            loader::BYPASS_NAME,
            loader::PROXY_NAME,
        ] {
            let k = kernel.get(name).copied().unwrap_or_default();
            rows.push(RuleRow {
                kind: "reserved".to_owned(),
                name: name.to_owned(),
                allowed: k.allowed,
                denied: k.denied,
                would_deny: k.would_deny,
                requests: if name == loader::NO_RULE_NAME {
                    proxy.get(&None).copied().unwrap_or(0)
                } else {
                    0
                },
                ..RuleRow::default()
            });
        }
        rows
    }

    /// Whether the policy in force has the implicit DNS rule: it has resolvers.
    fn has_dns_rule(&self) -> bool {
        !self.policy.dns.resolvers.is_empty()
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

    /// `egress status`.
    fn status(&self) -> Status {
        let target = &self.settings.target;
        let attached = self.attached();
        let proxy = self.proxies.borrow().clone();
        let counters = proxy.counters();
        let stats = self.enforcer.stats().unwrap_or_default();
        let mut sources: Vec<String> = if self.settings.paths.is_empty() {
            vec![policy::DEFAULT_POLICY_NAME.to_owned()]
        } else {
            self.settings
                .paths
                .iter()
                .map(|p| p.display().to_string())
                .collect()
        };
        sources.push(self.settings.store.created_path().display().to_string());
        Status {
            ready: attached && self.settings.listeners.complete(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: std::process::id(),
            mode: self.policy.mode.to_string(),
            generation: self.generation(),
            cgroup: target.cgroup.display().to_string(),
            pin_dir: target.pin_dir.display().to_string(),
            attached,
            sources,
            rules: self.rows(),
            proxy: ProxyStatus {
                listening: self
                    .settings
                    .listeners
                    .listening()
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
                missing: self
                    .settings
                    .listeners
                    .missing()
                    .iter()
                    .map(|m| format!("{}: {}", m.address, m.error))
                    .collect(),
                requests: counters.iter().map(|c| c.requests).sum(),
                denied: counters.iter().map(|c| c.denied).sum(),
                would_deny: counters.iter().map(|c| c.would_deny).sum(),
                events_dropped: proxy.events_dropped(),
                ..self
                    .health
                    .as_ref()
                    .map(|h| h.proxy_status())
                    .unwrap_or_default()
            },
            reloads_ok: self.reloads_ok,
            reloads_failed: self.reloads_failed,
            last_error: self.last_error.clone(),
            events_lost: stats.events_lost,
            kernel_errors: stats.errors,
            hooks: self
                .enforcer
                .hooks()
                .unwrap_or_default()
                .into_iter()
                .map(|h| crate::control::HookRow {
                    hook: h.name,
                    allowed: h.counters.allowed,
                    denied: h.counters.denied,
                    would_deny: h.counters.would_deny,
                })
                .collect(),
            xdp_ifaces: self.enforcer.xdp_ifaces(),
            kernel: loader::features::kernel().release.clone(),
            degraded: loader::features::kernel()
                .assess(!target.xdp_ifaces.is_empty())
                .map(|a| a.degraded_lines())
                .unwrap_or_default(),
            problems: self
                .health
                .as_ref()
                .map(|h| h.problems())
                .unwrap_or_default(),
        }
    }

    /// Answers one control request.
    fn handle(&mut self, request: Request) -> Response {
        let result = match request {
            Request::Status => Ok(Response::Status(Box::new(self.status()))),
            Request::Get { kind } => {
                let kind = kind.to_string();
                let rules = self.rows().into_iter().filter(|r| r.kind == kind).collect();
                Ok(Response::Rules { rules })
            }
            Request::Create { source, text } => self.create(&source, &text),
            Request::Delete { kind, names } => self.delete(kind, &names),
            Request::Reload => {
                self.reload(true, "egress reload")
                    .map(|generation| Response::Applied {
                        generation,
                        message: "reloaded".to_owned(),
                    })
            }
            // The server answers these itself.
            Request::Events { .. } => Err("events are served by the control socket".to_owned()),
        };
        result.unwrap_or_else(|message| Response::Error { message })
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
    ) -> anyhow::Result<()> {
        let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
        let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
        let mut sighup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
        // The ring buffer and the original-destination map are shared by every generation,
        // so these handles stay valid across reloads.
        let mut ring = self
            .enforcer
            .take_async_events()
            .context("watching the event ring buffer")?;
        let orig_dst = Arc::new(
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
        let serve_proxy = |listener: std::net::TcpListener| -> anyhow::Result<()> {
            let address = listener.local_addr().context("proxy listener address")?;
            let listener = tokio::net::TcpListener::from_std(listener).context("proxy listener")?;
            let (proxies, orig_dst, tx) = (proxies.clone(), orig_dst.clone(), tx.clone());
            let (admission, health) = (health.admission.clone(), health.clone());
            health.listener_started();
            tokio::spawn(async move {
                let served =
                    Proxy::serve_reloadable(proxies, listener, orig_dst, tx, admission).await;
                if let Err(e) = served {
                    tracing::error!(%address, error = %e, "proxy listener failed");
                }
                health.listener_stopped();
            });
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
                _ = tick.tick() => {
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
                        self.hub.publish(HubEvent::Connect(SystemTime::now(), event));
                    }
                }
            }
        }
    }
}

impl Agent {
    /// Counts a proxied request in the metrics, logs it and publishes it to `egress events`.
    fn record_request(&self, request: RequestEvent) {
        self.metrics
            .proxy_request(request.rule.as_deref(), request.status, request.latency);
        if request.would_deny {
            self.metrics.proxy_would_deny();
        }
        events::log_request(&request, &self.log_limit);
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
            let counts = counters.rows(&rows.1).unwrap_or_else(|e| {
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

/// The next settled change of the policy files; never, without a watch.
async fn changed(watch: &mut Option<watch::PolicyWatch>) {
    match watch {
        Some(w) => w.changed().await,
        None => std::future::pending().await,
    }
}

/// The row `egress status` and `get` show for the implicit DNS rule, when the policy has
/// resolvers: its source is where the resolvers come from (a resolv.conf, or the EgressConfig).
fn dns_row(dns: &policy::Dns, k: egress_common::RuleCounters) -> Option<RuleRow> {
    if dns.resolvers.is_empty() {
        return None;
    }
    Some(RuleRow {
        kind: Kind::EgressRule.to_string(),
        name: DNS_RULE_NAME.to_owned(),
        allows: format!(
            "{} udp/{DNS_PORT},tcp/{DNS_PORT}",
            join(dns.resolvers.iter().map(ToString::to_string))
        ),
        source: dns.source.to_string(),
        created: false,
        allowed: k.allowed,
        denied: k.denied,
        would_deny: k.would_deny,
        requests: 0,
    })
}

fn join(items: impl Iterator<Item = String>) -> String {
    items.collect::<Vec<_>>().join(",")
}

/// `egressrule/a, service/b` for messages.
fn describe(docs: &[state::Document]) -> String {
    join(docs.iter().map(|d| format!("{}/{}", d.kind, d.name))).replace(',', ", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dns_rule_row_names_its_resolvers_and_their_source() {
        let mut dns = policy::Dns {
            resolvers: vec![
                "192.0.2.53".parse().unwrap(),
                "2001:db8::53".parse().unwrap(),
            ],
            source: policy::DnsSource::ResolvConf("/etc/resolv.conf".into()),
        };
        let counters = egress_common::RuleCounters {
            allowed: 7,
            denied: 0,
            would_deny: 1,
        };
        let row = dns_row(&dns, counters).expect("resolvers");
        assert_eq!(
            row,
            RuleRow {
                kind: "egressrule".to_owned(),
                name: "(dns)".to_owned(),
                allows: "192.0.2.53,2001:db8::53 udp/53,tcp/53".to_owned(),
                source: "/etc/resolv.conf".to_owned(),
                created: false,
                allowed: 7,
                denied: 0,
                would_deny: 1,
                requests: 0,
            }
        );
        dns.source = policy::DnsSource::Config(policy::Origin {
            file: "p.yaml".to_owned(),
            line: 3,
        });
        assert_eq!(
            dns_row(&dns, counters).expect("resolvers").source,
            "p.yaml:3"
        );
        dns.resolvers.clear();
        assert_eq!(dns_row(&dns, counters), None);
    }

    #[test]
    fn a_changed_resolv_conf_changes_the_digest() {
        let dir = std::env::temp_dir().join(format!("egress-digest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let resolv_conf = dir.join("resolv.conf");
        std::fs::write(&resolv_conf, "nameserver 192.0.2.53\n").expect("write");
        let sources = [PolicySource::Text {
            name: "p.yaml".to_owned(),
            bytes: b"kind: EgressConfig\n".to_vec(),
        }];
        let before = digest(&sources, &resolv_conf);
        assert_eq!(digest(&sources, &resolv_conf), before);
        std::fs::write(&resolv_conf, "nameserver 192.0.2.54\n").expect("write");
        let after = digest(&sources, &resolv_conf);
        std::fs::remove_file(&resolv_conf).expect("remove");
        let missing = digest(&sources, &resolv_conf);
        let _ = std::fs::remove_dir_all(&dir);
        assert_ne!(after, before);
        assert_ne!(missing, after);
    }
}
