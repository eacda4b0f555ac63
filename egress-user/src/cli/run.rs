//! `egress run`: the agent.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    process::ExitCode,
    sync::Arc,
};

use anyhow::Context as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{mpsc, watch},
};

use crate::{
    cgroup, events,
    loader::{DEFAULT_PIN_DIR, Enforcer, Target},
    policy,
    proxy::{Proxy, RequestEvent},
    telemetry,
};

/// Proxy events waiting to be logged; past this the proxy drops (and counts) them rather than
/// slow a request down.
const EVENT_QUEUE: usize = 4096;

/// Arguments of `egress run`.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Policy file (multi-document YAML) or directory of them (`*.yaml`, `*.yml`, read in name
    /// order); repeat for several. Without any, the embedded default policy is enforced (see
    /// `egress check --default`). SIGHUP reloads them.
    #[arg(long = "policy", value_name = "FILE")]
    pub policy: Vec<PathBuf>,
    /// The managed cgroup v2 directory, created if missing (default: `<cgroup2 mount>/egress`).
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<PathBuf>,
    /// Where programs and maps are pinned (mounts bpffs at /sys/fs/bpf if needed).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
}

/// Runs the agent until SIGINT or SIGTERM.
pub fn run(args: &RunArgs) -> anyhow::Result<ExitCode> {
    telemetry::init();
    let policy = match load_policy(&args.policy) {
        Ok(policy) => policy,
        Err(errors) => {
            eprintln!("{errors}");
            eprintln!("egress: error: the policy is invalid; nothing was loaded");
            return Ok(ExitCode::FAILURE);
        }
    };
    let cgroup = match &args.cgroup {
        Some(path) => path.clone(),
        None => cgroup::default_cgroup()?,
    };
    // Everything that can fail on the user side comes before the kernel is touched, and the
    // proxy listens before any program can send a connection to it.
    let proxy = Arc::new(Proxy::new(&policy).context("configuring the proxy")?);
    let listeners = bind_proxy(policy.proxy.port)?;
    let target = Target {
        pin_dir: args.pin_dir.clone(),
        cgroup: cgroup.clone(),
    };
    let enforcer = Enforcer::apply(&target, &policy)
        .with_context(|| format!("enforcing the policy on {}", cgroup.display()))?;
    tracing::info!(
        generation = enforcer.generation(),
        mode = %policy.mode,
        rules = policy.rules.len(),
        cgroup = %cgroup.display(),
        pin_dir = %args.pin_dir.display(),
        "ready: enforcing egress policy"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let (proxies, proxy_rx) = watch::channel(proxy);
    let mut agent = Agent {
        paths: args.policy.clone(),
        target,
        proxy_port: policy.proxy.port,
        enforcer,
        proxies,
    };
    runtime.block_on(agent.serve(proxy_rx, listeners))?;
    tracing::info!(
        pin_dir = %args.pin_dir.display(),
        "stopping; enforcement stays in place (pinned); `egress unload` removes it"
    );
    Ok(ExitCode::SUCCESS)
}

/// The policy in `paths` (files, or directories of `*.yaml`/`*.yml` files), or the embedded
/// default when there are none.
fn load_policy(paths: &[PathBuf]) -> Result<policy::Policy, policy::PolicyErrors> {
    if paths.is_empty() {
        return Ok(policy::default_policy());
    }
    let mut files = Vec::new();
    for path in paths {
        match std::fs::read_dir(path) {
            Ok(entries) => {
                let mut found: Vec<PathBuf> = entries
                    .filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
                    .collect();
                found.sort();
                files.extend(found);
            }
            // Not a directory (or unreadable): load_files reports it with the path.
            Err(_) => files.push(path.clone()),
        }
    }
    policy::load_files(&files)
}

/// The running agent: what it needs to reload.
struct Agent {
    paths: Vec<PathBuf>,
    target: Target,
    proxy_port: u16,
    enforcer: Enforcer,
    proxies: watch::Sender<Arc<Proxy>>,
}

impl Agent {
    /// Reloads the policy. Everything is validated first; an invalid policy, or one the
    /// kernel maps cannot hold, changes nothing and the running one stays in force. A valid
    /// one goes to the proxy first (so a removed host is refused at once) and then to the
    /// kernel as a new generation, swapped in atomically.
    fn reload(&mut self) {
        let generation = self.enforcer.generation();
        let policy = match load_policy(&self.paths) {
            Ok(policy) => policy,
            Err(errors) => {
                for d in &errors.0 {
                    tracing::error!(error = %d, "reload: invalid policy");
                }
                tracing::error!(
                    generation,
                    errors = errors.0.len(),
                    "reload failed: the policy is invalid; the running policy stays in force"
                );
                return;
            }
        };
        if policy.proxy.port != self.proxy_port {
            tracing::error!(
                generation,
                from = self.proxy_port,
                to = policy.proxy.port,
                "reload failed: changing the proxy port needs a restart; the running policy stays in force"
            );
            return;
        }
        let proxy = match Proxy::new(&policy) {
            Ok(proxy) => Arc::new(proxy),
            Err(e) => {
                tracing::error!(generation, error = %e, "reload failed: the running policy stays in force");
                return;
            }
        };
        let previous = self.proxies.send_replace(proxy);
        match tokio::task::block_in_place(|| Enforcer::apply(&self.target, &policy)) {
            Ok(enforcer) => {
                self.enforcer = enforcer;
                tracing::info!(
                    generation = self.enforcer.generation(),
                    rules = policy.rules.len(),
                    http_rules = policy.http_rules.len(),
                    "reloaded: new policy in force"
                );
            }
            Err(e) => {
                self.proxies.send_replace(previous);
                tracing::error!(generation, error = %format!("{:#}", anyhow::Error::from(e)), "reload failed: the running policy stays in force");
            }
        }
    }

    /// Serves the proxy, logs kernel and proxy events, and reloads on SIGHUP, until SIGINT
    /// or SIGTERM.
    async fn serve(
        &mut self,
        proxies: watch::Receiver<Arc<Proxy>>,
        listeners: Vec<std::net::TcpListener>,
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
        for listener in listeners {
            let address = listener.local_addr().context("proxy listener address")?;
            let listener = tokio::net::TcpListener::from_std(listener).context("proxy listener")?;
            let (proxies, orig_dst, tx) = (proxies.clone(), orig_dst.clone(), tx.clone());
            tokio::spawn(async move {
                if let Err(e) = Proxy::serve_reloadable(proxies, listener, orig_dst, tx).await {
                    tracing::error!(%address, error = %e, "proxy listener failed");
                }
            });
        }
        loop {
            tokio::select! {
                _ = sigint.recv() => return Ok(()),
                _ = sigterm.recv() => return Ok(()),
                _ = sighup.recv() => self.reload(),
                Some(request) = requests.recv() => events::log_request(&request),
                guard = ring.readable_mut() => {
                    let mut guard = guard.context("waiting for kernel events")?;
                    let name = |row| self.enforcer.row_name(row).map(str::to_owned);
                    for event in events::drain(guard.get_inner_mut(), name) {
                        events::log(&event);
                    }
                    guard.clear_ready();
                }
            }
        }
    }
}

/// Binds the proxy's listeners: 127.0.0.1 and [::1] on `port`, where the kernel sends
/// redirected IPv4 and IPv6 connections. A host without IPv6 gets only the IPv4 listener (its
/// redirected IPv6 connections then fail: nothing falls back to a direct connection).
fn bind_proxy(port: u16) -> anyhow::Result<Vec<std::net::TcpListener>> {
    let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut listeners =
        vec![std::net::TcpListener::bind(v4).with_context(|| format!("proxy: listening on {v4}"))?];
    let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
    match std::net::TcpListener::bind(v6) {
        Ok(l) => listeners.push(l),
        Err(e) => {
            tracing::warn!(address = %v6, error = %e, "proxy: no IPv6 listener; redirected IPv6 connections will fail")
        }
    }
    for l in &listeners {
        l.set_nonblocking(true)
            .context("proxy: non-blocking listener")?;
    }
    Ok(listeners)
}
