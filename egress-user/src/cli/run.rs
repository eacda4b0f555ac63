//! `egress run`: the agent.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use anyhow::Context as _;

use crate::{
    agent::{
        Agent, Settings,
        listeners::ProxyListeners,
        sources::{self, SourceError},
        watch::PolicyWatch,
    },
    cgroup, cgroupns,
    cli::ResolvConf,
    control::{self, DEFAULT_SOCKET},
    loader::{DEFAULT_PIN_DIR, Target, features},
    state::{DEFAULT_STATE_DIR, Store},
    telemetry,
};

/// Arguments of `egress run`.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Policy file (multi-document YAML) or directory of them (`*.yaml`, `*.yml`, read in name
    /// order); repeat for several. Without any, the embedded default policy is enforced (see
    /// `egress check --default`). The files are watched: a change is applied once they have
    /// been quiet for 200 ms; SIGHUP (or `egress reload`) reloads at once.
    #[arg(long = "policy", value_name = "FILE")]
    pub policy: Vec<PathBuf>,
    /// The managed cgroup v2 directory. By default, with `--cri-socket`, the cgroup that holds
    /// the node's pods, found from the runtime's layout (`kubepods.slice` under the systemd
    /// cgroup driver, `kubepods` under cgroupfs: the common top of the pods' cgroups, or the
    /// one that exists); without it, `<cgroup2 mount>/egress` (created if missing). A path
    /// given here must exist, unless `--create-cgroup`: a mistyped path would otherwise
    /// enforce on a new, empty cgroup.
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<PathBuf>,
    /// Create the `--cgroup` directory if it does not exist.
    #[arg(long, requires = "cgroup")]
    pub create_cgroup: bool,
    /// Where programs and maps are pinned (mounts bpffs at /sys/fs/bpf if needed).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// Where rules made with `egress create` (`created.yaml`) and the last 1024 events of
    /// `egress events` (`events.jsonl`) are kept, across restarts.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// The control socket for `egress status|get|create|delete|reload|events` (root only).
    #[arg(long, value_name = "PATH", env = "EGRESS_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// `--resolv-conf`.
    #[command(flatten)]
    pub resolv_conf: ResolvConf,
    /// Do not watch the policy files; reload only on SIGHUP or `egress reload`.
    #[arg(long)]
    pub no_watch: bool,
    /// Serve Prometheus metrics (`/metrics`) and probes (`/healthz`: the agent can do its job,
    /// 503 with the reasons otherwise; `/readyz`: programs attached and the policy applied) on
    /// this address, e.g. 127.0.0.1:9464. Off by default.
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Attach the XDP backstop to this host-side interface (repeat, or comma-separate, for
    /// several): a pod's egress arrives there as ingress, and a TCP SYN or UDP datagram the
    /// rules do not allow is dropped there, whatever socket sent it. An exact name must exist
    /// in the agent's network namespace; a prefix ending in `*` (`veth*`, `cali*`; quote it)
    /// matches every such interface, rescanned every second, so new pods' veths are covered.
    /// An interface no longer named is detached at the next start or reload.
    #[arg(long = "xdp-iface", value_name = "IFACE", value_delimiter = ',')]
    pub xdp_iface: Vec<String>,
    /// The container runtime's CRI socket (containerd: /run/containerd/containerd.sock): the
    /// agent learns the node's pods there (listed every second, and at once when a cgroup
    /// appears), opens the proxy's listeners inside each pod, puts each pod in its namespace's
    /// scope, and events name the pod (`namespace/name`) of a cgroup below a pod's. Off by
    /// default (no pods: events name cgroup ids).
    #[arg(long, value_name = "PATH", env = "EGRESS_CRI_SOCKET")]
    pub cri_socket: Option<PathBuf>,
    /// Join the cgroup namespace of this file before anything else: the host's,
    /// /proc/1/ns/cgroup, when the agent runs in a container that shares the host's PID
    /// namespace. containerd gives a container a private cgroup namespace, where
    /// /proc/self/cgroup reads `0::/`; the agent finds its own cgroup there (its own upstream
    /// connections are exempt by it), so in a pod it needs the host's view. Off by default.
    #[arg(long, value_name = "PATH", env = "EGRESS_HOST_CGROUPNS")]
    pub host_cgroupns: Option<PathBuf>,
    /// Watch the EgressRule objects (egressrules.egress.dev, deploy/crds.yaml) of every
    /// namespace in the Kubernetes API this kubeconfig names: each is in force for its
    /// namespace's pods, beside the policy files, and its `status.nodes` says so for this
    /// node. Until the API's first list arrives the objects in force when the agent last ran
    /// stay in force (kept in the state directory), and an API outage changes nothing.
    #[arg(
        long,
        value_name = "FILE",
        env = "EGRESS_KUBECONFIG",
        conflicts_with = "in_cluster"
    )]
    pub kubeconfig: Option<PathBuf>,
    /// As `--kubeconfig`, with the pod's service account (the DaemonSet's way).
    #[arg(long, env = "EGRESS_IN_CLUSTER")]
    pub in_cluster: bool,
    /// This node's name in the EgressRules' status (the DaemonSet passes the pod's
    /// `spec.nodeName`). Default: the host name.
    #[arg(long, value_name = "NAME", env = "NODE_NAME")]
    pub node_name: Option<String>,
}

impl RunArgs {
    /// The Kubernetes API to watch, if any.
    fn cluster(&self) -> anyhow::Result<Option<crate::cluster::Cluster>> {
        let connect = match (&self.kubeconfig, self.in_cluster) {
            (Some(path), _) => crate::cluster::Connect::Kubeconfig(path.clone()),
            (None, true) => crate::cluster::Connect::InCluster,
            (None, false) => return Ok(None),
        };
        let node = match &self.node_name {
            Some(name) => name.clone(),
            None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .context("reading the host name for --node-name")?
                .trim()
                .to_owned(),
        };
        anyhow::ensure!(!node.is_empty(), "--node-name is empty");
        Ok(Some(crate::cluster::Cluster::new(connect, node)))
    }
}

/// Runs the agent until SIGINT or SIGTERM.
pub fn run(args: &RunArgs) -> anyhow::Result<ExitCode> {
    telemetry::init();
    // Before anything reads a cgroup path, and while this is the only thread: a cgroup
    // namespace is per thread, and the runtime's threads inherit this one's.
    if let Some(namespace) = &args.host_cgroupns {
        cgroupns::join(namespace)?;
        tracing::info!(
            namespace = %namespace.display(),
            "joined the cgroup namespace"
        );
    }
    // A service manager's soft limit of 1024 is exhausted by ~1,100 half-sent requests; the
    // hard limit is what the host allows this agent. The budget is shared out in serve().
    match crate::fds::raise_nofile_limit() {
        Ok((before, after)) if before != after => tracing::info!(
            from = before.soft,
            to = after.soft,
            "descriptors: raised the soft open-file limit to the hard one"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "descriptors: could not raise the open-file limit"),
    }
    // The kernel first: on one that lacks what the policy needs, refuse before anything is
    // bound, created or loaded, naming every missing feature; on one without an optional
    // feature, say what is lost.
    // Assessed once: the agent and every generation it builds go by this assessment.
    let kernel = match features::kernel().assess(!args.xdp_iface.is_empty()) {
        Ok(assessment) => assessment,
        Err(unsupported) => {
            eprintln!("egress: error: {unsupported}");
            return Ok(ExitCode::FAILURE);
        }
    };
    kernel.log();
    // The pods already on the node: their cgroups tell where pods live, and they go into
    // their namespaces' scopes with the first generation, so a restarted agent's takeover
    // never leaves them with the node-wide rules only.
    let pods = args
        .cri_socket
        .as_deref()
        .map(crate::agent::pods::initial)
        .unwrap_or_default();
    let cgroup = match (&args.cgroup, &args.cri_socket) {
        (Some(path), _) => {
            if !args.create_cgroup {
                cgroup::require_existing(path)?;
            }
            path.clone()
        }
        (None, Some(socket)) => {
            let root = cgroup::cgroup2_mount()?;
            let pod_dirs: Vec<&std::path::Path> = pods.iter().map(|p| p.cgroup.as_path()).collect();
            let found = crate::cri::kubepods(&root, &pod_dirs).with_context(|| {
                format!(
                    "finding the cgroup of the pods of the runtime at {}: give --cgroup",
                    socket.display()
                )
            })?;
            tracing::info!(cgroup = %found.display(), "the pods' cgroup, from the runtime's layout");
            found
        }
        (None, None) => cgroup::default_cgroup()?,
    };
    let pods = std::sync::Arc::new(crate::agent::pods::NodePods::new(pods));
    let store = Store::open(&args.state_dir).context("opening the state directory")?;
    // Everything that can fail on the user side comes before the kernel is touched: the
    // control socket (a second agent stops here), the proxy listeners (they must be there
    // before any program sends a connection to them) and the policy.
    let control = control::server::bind(&args.socket).context("binding the control socket")?;
    let cluster = args.cluster()?;
    // The API's objects last in force stay in force until its first list arrives.
    let mut cluster_rules = if cluster.is_some() {
        crate::cluster::restore(&store)
    } else {
        Vec::new()
    };
    let files = sources::list(&args.policy, &store);
    let mut initial = files.clone();
    initial.extend(cluster_rules.iter().map(crate::cluster::RuleObject::source));
    // The sources are moved into what is built: their text (about 600 bytes per API object)
    // is not kept for the agent's lifetime.
    let mut built = sources::build(initial, &args.resolv_conf.path);
    if let Err(SourceError::Invalid(errors)) = &built
        && !cluster_rules.is_empty()
    {
        // Changed files that no longer go with the objects recorded: the files win, and the
        // API's objects are judged again when its list arrives.
        tracing::error!(%errors, "kubernetes: the EgressRules last in force do not go with the policy files; starting without them until the API answers");
        cluster_rules.clear();
        built = sources::build(files, &args.resolv_conf.path);
    }
    let built = match built {
        Ok(built) => built,
        Err(SourceError::Invalid(errors)) => {
            eprintln!("{errors}");
            eprintln!("egress: error: the policy is invalid; nothing was loaded");
            let _ = std::fs::remove_file(&args.socket);
            return Ok(ExitCode::FAILURE);
        }
        Err(e) => {
            eprintln!("egress: error: {e}; nothing was loaded");
            let _ = std::fs::remove_file(&args.socket);
            return Ok(ExitCode::FAILURE);
        }
    };
    let listeners = ProxyListeners::bind(built.policy.proxy.port);
    let metrics = match args.metrics_addr {
        Some(addr) => {
            let l = std::net::TcpListener::bind(addr)
                .with_context(|| format!("metrics: listening on {addr}"))?;
            l.set_nonblocking(true)
                .context("metrics: non-blocking listener")?;
            Some(l)
        }
        None => None,
    };
    let settings = Settings {
        pods,
        paths: args.policy.clone(),
        store,
        resolv_conf: args.resolv_conf.path.clone(),
        target: Target {
            pin_dir: args.pin_dir.clone(),
            cgroup: cgroup.clone(),
            xdp_ifaces: args.xdp_iface.clone(),
        },
        kernel,
        listeners,
        metrics,
        cri_socket: args.cri_socket.clone(),
        cluster,
        cluster_rules,
    };
    let (mut agent, proxies) = Agent::start(settings, built)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // A blocking thread started by the main loop would inherit its SCHED_BATCH.
        .on_thread_start(|| {
            let _ = crate::sched::as_before();
        })
        .build()
        .context("starting the async runtime")?;
    // Before the ready line: a workload's first query goes through the DNS path, and a signal
    // sent once the agent says it is ready is handled.
    let signals = runtime.block_on(async {
        agent.start_dns();
        crate::agent::Signals::install()
    })?;
    if let Some(missing) = agent.missing_listener() {
        tracing::warn!(
            generation = agent.generation(),
            missing = %missing,
            "not ready: enforcing egress policy, but the proxy does not listen on every address; connections for the proxy there are refused"
        );
    } else {
        tracing::info!(
            generation = agent.generation(),
            mode = %agent.policy().mode,
            rules = agent.policy().rules.len(),
            dns_resolvers = agent.policy().dns.resolvers.len(),
            dns_from = %agent.policy().dns.source,
            cgroup = %cgroup.display(),
            pin_dir = %args.pin_dir.display(),
            socket = %args.socket.display(),
            "ready: enforcing egress policy"
        );
    }
    eprint!("{}", next_steps(args, &cgroup));
    let served = runtime.block_on(async {
        // This thread runs the agent's main loop from here on: its batches of request events
        // and its housekeeping wait for the proxy's workers instead of interrupting them.
        if let Err(e) = crate::sched::background() {
            tracing::warn!(error = %e, "the agent's main loop keeps the default scheduling policy");
        }
        let watch = if args.no_watch || args.policy.is_empty() {
            None
        } else {
            Some(PolicyWatch::new(&args.policy).context("watching the policy files")?)
        };
        agent.serve(proxies, control, watch, signals).await
    });
    let _ = std::fs::remove_file(&args.socket);
    served?;
    tracing::info!(
        pin_dir = %args.pin_dir.display(),
        "stopping; enforcement stays in place (pinned); `egress unload` removes it"
    );
    Ok(ExitCode::SUCCESS)
}

/// What a user runs next, printed once the agent is up: a first run should not leave them
/// guessing. The commands carry the flags this agent was started with (a non-default cgroup,
/// socket or pin directory) and name the binary as it was started (`target/debug/egress` under
/// `cargo xtask run`), so they can be pasted as they are.
fn next_steps(args: &RunArgs, cgroup: &std::path::Path) -> String {
    let egress = invoked_as();
    let cgroup_flag = match &args.cgroup {
        Some(path) => format!(" --cgroup {}", path.display()),
        None => String::new(),
    };
    let socket_flag = if args.socket == std::path::Path::new(DEFAULT_SOCKET) {
        String::new()
    } else {
        format!(" --socket {}", args.socket.display())
    };
    let pin_flag = if args.pin_dir == std::path::Path::new(DEFAULT_PIN_DIR) {
        String::new()
    } else {
        format!(" --pin-dir {}", args.pin_dir.display())
    };
    format!(
        "next, as root in another terminal:\n  \
         {egress} exec{cgroup_flag}{pin_flag} -- curl -sS http://192.0.2.1/   run a command in {cgroup} (filtered)\n  \
         {egress} events --follow{socket_flag}   watch its verdicts\n  \
         {egress} status{socket_flag}   rules and their counters\n\
         stop: Ctrl-C here (enforcement stays, pinned), then {egress} unload{pin_flag}\n",
        cgroup = cgroup.display()
    )
}

/// `egress` when the running binary is the one PATH finds under that name, else its path.
fn invoked_as() -> String {
    let Ok(exe) = std::env::current_exe() else {
        return "egress".to_owned();
    };
    let on_path = std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path)
            .any(|dir| std::fs::canonicalize(dir.join("egress")).is_ok_and(|found| found == exe))
    });
    if on_path {
        "egress".to_owned()
    } else {
        exe.display().to_string()
    }
}
