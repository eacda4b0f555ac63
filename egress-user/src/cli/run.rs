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
    sync::mpsc,
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
    /// Policy file (multi-document YAML); repeat for several. Without any, the embedded default
    /// policy is enforced (see `egress check --default`).
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
    let policy = if args.policy.is_empty() {
        policy::default_policy()
    } else {
        match policy::load_files(&args.policy) {
            Ok(policy) => policy,
            Err(errors) => {
                eprintln!("{errors}");
                eprintln!("egress: error: the policy is invalid; nothing was loaded");
                return Ok(ExitCode::FAILURE);
            }
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
    let mut enforcer = Enforcer::apply(&target, &policy)
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
    runtime.block_on(serve(&mut enforcer, proxy, listeners))?;
    tracing::info!(
        pin_dir = %args.pin_dir.display(),
        "stopping; enforcement stays in place (pinned); `egress unload` removes it"
    );
    Ok(ExitCode::SUCCESS)
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

/// Serves the proxy and logs kernel and proxy events until a termination signal.
async fn serve(
    enforcer: &mut Enforcer,
    proxy: Arc<Proxy>,
    listeners: Vec<std::net::TcpListener>,
) -> anyhow::Result<()> {
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut ring = enforcer
        .take_async_events()
        .context("watching the event ring buffer")?;
    let orig_dst = Arc::new(
        enforcer
            .take_orig_dst()
            .context("the original-destination map is missing")?,
    );
    let (tx, mut requests) = mpsc::channel::<RequestEvent>(EVENT_QUEUE);
    for listener in listeners {
        let address = listener.local_addr().context("proxy listener address")?;
        let listener = tokio::net::TcpListener::from_std(listener).context("proxy listener")?;
        let (proxy, orig_dst, tx) = (proxy.clone(), orig_dst.clone(), tx.clone());
        tokio::spawn(async move {
            if let Err(e) = proxy.serve(listener, orig_dst, tx).await {
                tracing::error!(%address, error = %e, "proxy listener failed");
            }
        });
    }
    loop {
        tokio::select! {
            _ = sigint.recv() => return Ok(()),
                        _ = sigterm.recv() => return Ok(()),
            Some(request) = requests.recv() => events::log_request(&request),
            guard = ring.readable_mut() => {
                let mut guard = guard.context("waiting for kernel events")?;
                let name = |row| enforcer.row_name(row).map(str::to_owned);
                for event in events::drain(guard.get_inner_mut(), name) {
                    events::log(&event);
                }
                guard.clear_ready();
            }
        }
    }
}
