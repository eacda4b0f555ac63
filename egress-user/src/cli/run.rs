//! `egress run`: the agent.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    cgroup, events,
    loader::{DEFAULT_PIN_DIR, Enforcer, Target},
    policy, telemetry,
};

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
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(&mut enforcer))?;
    tracing::info!(
        pin_dir = %args.pin_dir.display(),
        "stopping; enforcement stays in place (pinned); `egress unload` removes it"
    );
    Ok(ExitCode::SUCCESS)
}

/// Logs kernel events until a termination signal.
async fn serve(enforcer: &mut Enforcer) -> anyhow::Result<()> {
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut ring = enforcer
        .take_async_events()
        .context("watching the event ring buffer")?;
    loop {
        tokio::select! {
            _ = sigint.recv() => return Ok(()),
            _ = sigterm.recv() => return Ok(()),
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
