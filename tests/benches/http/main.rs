//! `cargo xtask bench http`: the HTTP egress proxy against no proxy and against Envoy
//! (BENCHMARKS.md metrics 4 to 7): throughput and p99 for plain HTTP and for TLS origination,
//! latency added at a fixed 1000 req/s, and the proxy's memory and CPU.
//!
//! # Method
//! - One [`Sandbox`] (a fresh network namespace with no route out, a cgroup, a pin directory)
//!   holds everything: nginx as the upstream on `192.0.2.1:80` and `:443` (TLS, a certificate
//!   from a CA the bench makes), one worker, keep-alive, no access log, a fixed 1 KB body;
//!   Envoy (1 worker) listening on `127.0.0.1:10080`/`:10443`; and `egress run` enforcing a
//!   policy with `http`/`https` rules for `bench.test` on ports 80 and 443 on the sandbox's
//!   cgroup, its proxy on `127.0.0.1:15001`.
//! - Contenders: *direct* (the load generator to nginx's `192.0.2.1:80`), *egress* (the load
//!   generator in the managed cgroup, connecting to `203.0.113.1:80` or `:443`, where nothing
//!   listens: only the kernel's redirect to the proxy can answer) and *Envoy* (the load
//!   generator to Envoy's listeners). With the `pods` feature (`cargo xtask bench http` turns
//!   it on) also *egress from a pod*: containerd runs on the sandbox as on a node (see
//!   `egress_tests::node`), one pod `default/bench` is created through the CRI before the
//!   agent starts, the agent (the same one, given `--cri-socket`) learns it and opens its
//!   proxy listeners inside the pod's network namespace, and the load generator runs in the
//!   pod's network namespace and its container's cgroup (the host's `wrk`/`oha` binaries,
//!   `nsenter --net=/proc/PID/ns/net`: the pod's image has only busybox). Its requests go to
//!   `203.0.113.1`, the kernel redirects them to the listener inside the pod, and the proxy
//!   dials nginx from the pod's own namespace, across the pod's veth to the node: one hop more
//!   than the other contenders, as in a cluster. For TLS origination the client sends plain HTTP with
//!   `Host: bench.test:443`; the proxy speaks TLS 1.3 to nginx (SNI bench.test, the test CA the
//!   only trusted root, the name checked) over pooled connections.
//! - CPUs: the proxies run on CPU 0; the load generator on the last CPU. nginx runs on the
//!   load generator's CPU for the throughput runs (`--upstream-cpu`), so that a proxy has a
//!   core to itself and its number is what one core of proxy does; and on the proxies' CPU for
//!   the fixed-rate runs (`--rate-upstream-cpu`), so that direct crosses CPUs as often as a
//!   proxied request does (client to nginx and back, against client to proxy and back). With
//!   nginx beside the client, direct would pay no cross-CPU wake-up at all, and in this VM each
//!   one costs tens of microseconds: about +0.1 ms of "added latency" that was the layout's,
//!   not the proxy's. Every process of the bench runs at nice -10
//!   (`--nice`): this machine is shared, and a build landing on the proxies' CPU would
//!   otherwise take half of it for a few seconds, for one contender and not the next.
//! - Metrics 4 and 5: `wrk -t1 -c50 -d5s --latency` (keep-alive), as fast as it goes.
//!   Metric 6: `oha` at a fixed 1000 req/s over 16 connections for 5 s, with latency
//!   correction; the added latency is the contender's p50/p90/p99 minus direct's in the same
//!   round. Metric 7: `VmRSS` after start-up (idle) and half-way through the fixed-rate run;
//!   CPU (`utime + stime` of the whole process from `/proc/PID/stat`) per 1000 requests at
//!   1000 req/s and at full load.
//! - After a warm-up run per contender and protocol, the contenders are interleaved: each
//!   round runs plain (direct, egress, Envoy), then TLS (egress, Envoy), then the fixed rate
//!   (direct, egress, Envoy), each list starting one contender later than in the round before.
//!   Reported: median and min-max over rounds, and for egress the ratio to Envoy in the same
//!   round.
//!
//! # Checks
//! The bench stops with an error when: a run has a socket error or an answer with a status
//! of 400 or more (wrk's "Non-2xx or 3xx responses") or any non-2xx (oha); nginx's `stub_status`
//! counted fewer requests during a run than the client completed (a proxy answered itself);
//! something answers on `203.0.113.1:80`/`:443` outside the cgroup (a direct path for the
//! egress client); a proxy process exited.
//!
//! # Options (after `cargo bench -p egress-tests --bench http --`)
//! `--rounds N` (5), `--seconds N` (wrk run length, 5), `--warmup N` (seconds, 1),
//! `--connections N` (wrk, 50), `--rate N` (1000), `--rate-connections N` (16),
//! `--rate-seconds N` (5), `--contenders direct,egress,egress-pod,envoy` (egress-pod only with
//! the `pods` feature; it is in the default list then), `--upstream-cpu load|proxy|any`
//! (load), `--rate-upstream-cpu load|proxy|any` (proxy),
//! `--nice N` (-10; 0 leaves priorities alone),
//! `--agent-log FILTER` (the agent's `EGRESS_LOG`; default: unset, the agent's own default,
//! which logs a line per request; `info,egress_user::loader::events=warn` drops those lines
//! but keeps the `ready` line the bench waits for),
//! `--envoy PATH`, `--oha PATH` (`cargo xtask bench http` installs both and passes them),
//! `--no-rate` (skip metric 6 and oha).

#[path = "../common/mod.rs"]
mod common;
mod load;
mod options;
mod report;
mod servers;

use std::{
    fs,
    path::{Path, PathBuf},
    process::ExitCode,
    thread,
    time::{Duration, Instant},
};

use common::procfs;
use egress_tests::{Sandbox, V4_A, V4_C, sa, upstream::TestCa};
use load::{Oha, RateRun, Target, Wrk, WrkRun};
pub use options::{Kind, Options, USAGE, UpstreamCpu, parse};
use servers::{Daemon, ENVOY_PLAIN, ENVOY_TLS, HOST, Nginx, Pin};

fn main() -> ExitCode {
    common::bench_main("http", |args| {
        let options = parse(args);
        run(&options);
    })
}

/// One wrk run of a contender, with what the proxy and the upstream did meanwhile.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub run: WrkRun,
    /// The proxy's CPU seconds per 1000 requests.
    pub cpu_per_1k: Option<f64>,
}

/// One fixed-rate run of a contender.
#[derive(Clone, Copy, Debug)]
pub struct RateSample {
    pub run: RateRun,
    pub cpu_per_1k: Option<f64>,
    /// The proxy's resident memory half-way through, MiB.
    pub rss_mib: Option<f64>,
}

/// A contender: where its client connects, its proxy process, its results.
pub struct Contender {
    pub kind: Kind,
    /// The proxy it owns (none for direct, and for egress from a pod when the egress
    /// contender's agent serves the pod too).
    pub daemon: Option<Daemon>,
    /// The proxy's process, whose CPU and memory are measured (the agent's for both egress
    /// contenders).
    pub proxy_pid: Option<u32>,
    /// The network namespace its clients run in.
    pub net: PathBuf,
    pub plain_url: String,
    /// None: the contender does not originate TLS (direct).
    pub tls_url: Option<String>,
    /// The cgroup its clients join (egress).
    pub cgroup: Option<PathBuf>,
    pub idle_rss_mib: Option<f64>,
    pub peak_rss_mib: Option<f64>,
    pub plain: Vec<Sample>,
    pub tls: Vec<Sample>,
    pub rate: Vec<RateSample>,
}

/// What the bench measures in one run.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Phase {
    Plain,
    Tls,
    Rate,
}

/// Everything one run of a contender needs.
struct Bench<'a> {
    options: &'a Options,
    nginx: &'a Nginx,
    dir: &'a Path,
    load: Pin,
}

impl Bench<'_> {
    fn target<'c>(&'c self, c: &'c Contender, phase: Phase) -> Target<'c> {
        let (url, host) = match phase {
            Phase::Plain | Phase::Rate => (c.plain_url.as_str(), HOST),
            Phase::Tls => (
                c.tls_url.as_deref().expect("a TLS contender"),
                "bench.test:443",
            ),
        };
        Target {
            name: c.kind.name(),
            url,
            host,
            net: &c.net,
            cgroup: c.cgroup.as_deref(),
            pin: self.load,
            dir: self.dir,
            hint: match c.kind {
                Kind::Egress => {
                    "Nothing listens at the egress client's destination: only the kernel's \
                     redirect to the agent's proxy answers there. Is `egress run` proxying ports \
                     80 and 443 (see the agent's log, egress.log in the bench directory)?"
                }
                Kind::EgressPod => {
                    "Nothing listens at the pod's destination: only the kernel's redirect to the \
                     listener the agent opened inside the pod answers there. Did the agent \
                     learn the pod from containerd (egress.log, containerd.log)?"
                }
                Kind::Direct | Kind::Envoy => "",
            },
        }
    }

    fn wrk(&self) -> Wrk {
        Wrk {
            connections: self.options.connections,
            seconds: self.options.seconds,
        }
    }

    fn oha(&self) -> Oha {
        Oha {
            bin: self.options.oha.clone().expect("checked in parse"),
            rate: self.options.rate,
            connections: self.options.rate_connections,
            seconds: self.options.rate_seconds,
        }
    }

    /// Checks that nginx answered at least the `completed` requests the client saw since
    /// `before` (its counter then), and returns the new counter.
    fn check_upstream(&self, c: &Contender, phase: Phase, before: u64, completed: u64) -> u64 {
        let after = self.nginx.requests();
        // The status request that read `after` counts itself.
        let seen = after - before - 1;
        assert!(
            seen >= completed,
            "{} ({phase:?}): the client completed {completed} requests but nginx answered only \
             {seen}: something other than the upstream answered",
            c.kind.name()
        );
        after
    }

    /// A wrk run of `seconds` (0: the configured length).
    fn wrk_run(&self, c: &mut Contender, phase: Phase, seconds: u64) -> Sample {
        let seconds = if seconds == 0 {
            self.options.seconds
        } else {
            seconds
        };
        let pid = c.proxy_pid;
        let before = self.nginx.requests();
        let cpu = pid.map(procfs::cpu_seconds);
        let run = self.wrk().run(&self.target(c, phase), seconds);
        let cpu_per_1k = pid
            .zip(cpu)
            .map(|(pid, cpu)| (procfs::cpu_seconds(pid) - cpu) / run.requests as f64 * 1000.0);
        self.check_upstream(c, phase, before, run.requests);
        if let Some(d) = c.daemon.as_mut() {
            d.check_alive();
        }
        Sample { run, cpu_per_1k }
    }

    fn rate_run(&self, c: &mut Contender) -> RateSample {
        let pid = c.proxy_pid;
        let before = self.nginx.requests();
        let cpu = pid.map(procfs::cpu_seconds);
        // Resident memory half-way through the run.
        let half = Duration::from_millis(self.options.rate_seconds * 500);
        let rss = pid.map(|pid| {
            thread::spawn(move || {
                thread::sleep(half);
                procfs::rss_mib(pid)
            })
        });
        let run = self.oha().run(&self.target(c, Phase::Rate));
        let rss_mib = rss.map(|t| t.join().expect("RSS sampler"));
        let cpu_per_1k = pid
            .zip(cpu)
            .map(|(pid, cpu)| (procfs::cpu_seconds(pid) - cpu) / run.requests as f64 * 1000.0);
        self.check_upstream(c, Phase::Rate, before, run.requests);
        if let Some(d) = c.daemon.as_mut() {
            d.check_alive();
        }
        RateSample {
            run,
            cpu_per_1k,
            rss_mib,
        }
    }
}

fn run(options: &Options) {
    let started = Instant::now();
    let cpus = thread::available_parallelism().map_or(1, |n| n.get());
    let (proxy_cpu, load_cpu) = if cpus > 1 {
        (Some(0), Some(cpus - 1))
    } else {
        (None, None)
    };
    let place = |place| match place {
        UpstreamCpu::Load => load_cpu,
        UpstreamCpu::Proxy => proxy_cpu,
        UpstreamCpu::Any => None,
    };
    let upstream_cpu = place(options.upstream_cpu);
    let rate_upstream_cpu = place(options.rate_upstream_cpu);
    let pin = |cpu| Pin {
        cpu,
        nice: options.nice,
    };
    let sandbox = Sandbox::new();
    let dir = sandbox.dir("bench-http");
    eprintln!(
        "bench http: sandbox {}, files in {}",
        sandbox.name,
        dir.display()
    );

    let ca = TestCa::new(&[HOST]);
    let ca_path = dir.join("ca.pem");
    fs::write(&ca_path, &ca.ca_pem).expect("ca.pem");
    let nginx = Nginx::start(&dir, &sandbox.name, pin(upstream_cpu), &ca);
    check_no_direct_path(&sandbox.name);

    // The pod (a containerd pod on the sandbox, as on a node) before the agent, which learns
    // it from the runtime when it starts.
    #[cfg(feature = "pods")]
    let mut node = options
        .contenders
        .contains(&Kind::EgressPod)
        .then(|| egress_tests::node::Node::start(&sandbox));
    #[cfg(feature = "pods")]
    let pod = node.as_mut().map(|node| {
        let pod = node.pod("default", "bench");
        PodAt {
            name: pod.name.clone(),
            net: pod.netns_path(),
            cgroup: pod.cgroup_dir(),
            cri_socket: node.socket().to_owned(),
        }
    });
    #[cfg(not(feature = "pods"))]
    let pod: Option<PodAt> = None;
    let setup = Setup {
        options,
        sandbox: &sandbox,
        dir: &dir,
        ca_path: &ca_path,
        pin: pin(proxy_cpu),
        pod: pod.as_ref(),
    };
    let mut contenders: Vec<Contender> = Vec::new();
    for &kind in &options.contenders {
        // One agent serves both egress contenders: the first one starts it.
        let agent = contenders
            .iter()
            .find(|c| matches!(c.kind, Kind::Egress | Kind::EgressPod))
            .and_then(|c| c.proxy_pid);
        contenders.push(setup.start(kind, agent));
    }
    // Let start-up settle before the idle footprint.
    thread::sleep(Duration::from_secs(1));
    for c in &mut contenders {
        c.idle_rss_mib = c.proxy_pid.map(procfs::rss_mib);
    }
    let setup = started.elapsed();

    let bench = Bench {
        options,
        nginx: &nginx,
        dir: &dir,
        load: pin(load_cpu),
    };
    let phases: Vec<Phase> = [Phase::Plain, Phase::Tls, Phase::Rate]
        .into_iter()
        .filter(|&p| p != Phase::Rate || !options.no_rate)
        .collect();
    let originates_tls: Vec<bool> = contenders.iter().map(|c| c.tls_url.is_some()).collect();
    let runs_in = |phase: Phase| -> Vec<usize> {
        (0..originates_tls.len())
            .filter(|&i| phase != Phase::Tls || originates_tls[i])
            .collect()
    };

    eprintln!(
        "bench http: warm-up, {} s per contender and protocol",
        options.warmup
    );
    for phase in [Phase::Plain, Phase::Tls] {
        for i in runs_in(phase) {
            let c = &mut contenders[i];
            let s = bench.wrk_run(c, phase, options.warmup);
            eprintln!(
                "  {:<18} {phase:?}: {:.0} req/s, p99 {:.2} ms",
                c.kind.name(),
                s.run.rps,
                s.run.p99_ms
            );
        }
    }

    eprintln!(
        "bench http: {} rounds; wrk {} s per run, oha {} req/s for {} s",
        options.rounds, options.seconds, options.rate, options.rate_seconds
    );
    for round in 0..options.rounds {
        for &phase in &phases {
            nginx.move_to(if phase == Phase::Rate {
                rate_upstream_cpu
            } else {
                upstream_cpu
            });
            let order = runs_in(phase);
            let n = order.len();
            let mut line = Vec::new();
            for k in 0..n {
                let i = order[(round + k) % n];
                let c = &mut contenders[i];
                match phase {
                    Phase::Plain | Phase::Tls => {
                        let s = bench.wrk_run(c, phase, 0);
                        line.push(format!(
                            "{} {:.0}/s p99 {:.2}ms",
                            short(c.kind),
                            s.run.rps,
                            s.run.p99_ms
                        ));
                        if phase == Phase::Plain {
                            c.plain.push(s);
                        } else {
                            c.tls.push(s);
                        }
                    }
                    Phase::Rate => {
                        let s = bench.rate_run(c);
                        line.push(format!(
                            "{} p50 {:.3} p99 {:.3}ms",
                            short(c.kind),
                            s.run.p50_ms,
                            s.run.p99_ms
                        ));
                        c.rate.push(s);
                    }
                }
            }
            eprintln!("  round {:>2} {phase:<5?}: {}", round + 1, line.join(", "));
        }
    }
    for c in &mut contenders {
        c.peak_rss_mib = c.proxy_pid.map(procfs::peak_rss_mib);
    }

    let shown = report::Shown {
        wrk: bench
            .wrk()
            .shown(&bench.target(&contenders[0], Phase::Plain)),
        oha: (!options.no_rate).then(|| {
            bench
                .oha()
                .shown(&bench.target(&contenders[0], Phase::Rate))
        }),
        proxy_cpu,
        load_cpu,
        upstream_cpu,
        rate_upstream_cpu,
        setup,
        elapsed: started.elapsed(),
    };
    report::print(options, &contenders, &shown);
    drop(contenders);
    drop(nginx);
}

fn short(kind: Kind) -> &'static str {
    match kind {
        Kind::Direct => "direct",
        Kind::Egress => "egress",
        Kind::EgressPod => "pod",
        Kind::Envoy => "envoy",
    }
}

/// The egress client connects to `203.0.113.1`, where nothing listens: without the kernel's
/// redirect to the proxy its connections are refused. Checked from outside the cgroup.
fn check_no_direct_path(netns: &str) {
    for port in [80, 443] {
        let addr = sa(V4_C, port);
        match servers::get(netns, addr, HOST, "/") {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
            other => panic!(
                "{addr} must refuse connections (it is the egress client's unreachable \
                 destination), got {other:?}"
            ),
        }
    }
}

/// The pod the egress-pod contender's clients run in (feature `pods`).
pub struct PodAt {
    /// `namespace/name`, as the agent's log names it.
    pub name: String,
    /// Its network namespace, for `nsenter --net`.
    pub net: PathBuf,
    /// Its container's cgroup.
    pub cgroup: PathBuf,
    /// The CRI socket of its runtime, which the agent watches.
    pub cri_socket: PathBuf,
}

/// Where a contender's proxy comes from: the sandbox, the pod (if any) and an egress agent
/// already started for the other egress contender, which serves both.
struct Setup<'a> {
    options: &'a Options,
    sandbox: &'a Sandbox,
    dir: &'a Path,
    ca_path: &'a Path,
    pin: Pin,
    pod: Option<&'a PodAt>,
}

impl Setup<'_> {
    /// Starts the agent: the sandbox's cgroup managed, the pods of the runtime (if any)
    /// learned from its CRI socket.
    fn start_egress(&self) -> Daemon {
        let policy = self.dir.join("policy.yaml");
        fs::write(
            &policy,
            format!(
                "kind: EgressConfig\nmetadata: {{name: config}}\nspec:\n  caFiles: [{}]\n  \
                 hosts: {{{HOST}: [{V4_A}]}}\n---\nkind: EgressRule\nmetadata: {{name: bench-http}}\n\
                 spec:\n  destination: {{service: {HOST}}}\n  ports: [{{port: 80, protocol: http}}, \
                 {{port: 443, protocol: https}}]\n",
                self.ca_path.display()
            ),
        )
        .expect("policy.yaml");
        if let Err(e) = egress_user::policy::load_files(std::slice::from_ref(&policy)) {
            panic!("the bench's egress policy does not load:\n{e}");
        }
        let cri: Vec<String> = self
            .pod
            .map(|p| vec!["--cri-socket".into(), p.cri_socket.display().to_string()])
            .unwrap_or_default();
        servers::start_egress(
            Path::new(env!("CARGO_BIN_EXE_egress-cli")),
            self.dir,
            self.sandbox,
            self.pin,
            &policy,
            &cri,
            self.options.agent_log.as_deref(),
        )
    }

    /// Starts a contender's proxy; `agent` is the egress agent another contender owns.
    fn start(&self, kind: Kind, agent: Option<u32>) -> Contender {
        let sandbox_net = PathBuf::from(format!("/run/netns/{}", self.sandbox.name));
        let egress = |owned: Option<Daemon>| {
            let pid = owned.as_ref().map(Daemon::pid).or(agent);
            (owned, pid)
        };
        let (daemon, proxy_pid, plain_url, tls_url, cgroup, net) = match kind {
            Kind::Direct => (
                None,
                None,
                format!("http://{}/", sa(V4_A, 80)),
                None,
                None,
                sandbox_net,
            ),
            Kind::Egress => {
                let (daemon, pid) = egress(agent.is_none().then(|| self.start_egress()));
                (
                    daemon,
                    pid,
                    format!("http://{}/", sa(V4_C, 80)),
                    Some(format!("http://{}/", sa(V4_C, 443))),
                    Some(self.sandbox.cgroup.clone()),
                    sandbox_net,
                )
            }
            Kind::EgressPod => {
                let pod = self.pod.expect("a pod for the egress-pod contender");
                let (daemon, pid) = egress(agent.is_none().then(|| self.start_egress()));
                wait_for_pod_listeners(&self.dir.join("egress.log"), &pod.name);
                (
                    daemon,
                    pid,
                    format!("http://{}/", sa(V4_C, 80)),
                    Some(format!("http://{}/", sa(V4_C, 443))),
                    Some(pod.cgroup.clone()),
                    pod.net.clone(),
                )
            }
            Kind::Envoy => {
                let bin = self.options.envoy.as_deref().expect("checked in parse");
                let daemon =
                    servers::start_envoy(bin, self.dir, &self.sandbox.name, self.pin, self.ca_path);
                let pid = daemon.pid();
                (
                    Some(daemon),
                    Some(pid),
                    format!("http://{ENVOY_PLAIN}/"),
                    Some(format!("http://{ENVOY_TLS}/")),
                    None,
                    sandbox_net,
                )
            }
        };
        Contender {
            kind,
            daemon,
            proxy_pid,
            net,
            plain_url,
            tls_url,
            cgroup,
            idle_rss_mib: None,
            peak_rss_mib: None,
            plain: Vec::new(),
            tls: Vec::new(),
            rate: Vec::new(),
        }
    }
}

/// Waits until the agent's log says it listens inside the pod `name` (it learns the pod from
/// the runtime, then opens the proxy's listeners in the pod's network namespace).
fn wait_for_pod_listeners(log: &Path, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = fs::read_to_string(log).unwrap_or_default();
        if text
            .lines()
            .any(|l| l.contains("listening inside the pod") && l.contains(name))
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the agent did not listen inside pod {name} within 30 s; its log ({}):\n{}",
            log.display(),
            servers::tail(&text, 30)
        );
        thread::sleep(Duration::from_millis(50));
    }
}
