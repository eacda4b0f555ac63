//! `cargo xtask bench pods`: what a pod costs the agent (issue 19, item 4): the time from a
//! pod sandbox ready to its scope enforced and to its proxy listeners open, and the agent's
//! memory per pod with its listeners.
//!
//! # Method
//! - A [`Sandbox`] as a node: containerd with runc and the CNI `ptp` plugin ([`Node`], as the
//!   pods tests), and `egress run --cri-socket` on a policy with an HTTP rule (so every pod
//!   gets proxy listeners in its network namespace) and a CIDR rule of namespace `bench` (so
//!   its pods get a scope of their own).
//! - `--pods` pods of `bench` are created one after another through the CRI, as kubelet does
//!   (`RunPodSandbox`, then a container). For each, from the moment `RunPodSandbox` returned
//!   (the sandbox ready, its container not yet created):
//!   - *scope enforced*: until the pod's cgroup is in the generation's `SCOPES` map, read
//!     from its pin every millisecond by a thread of the bench (the first time each cgroup id
//!     is seen there is kept);
//!   - *listeners open*: until the agent's log line `proxy: listening inside the pod` for the
//!     pod, by the line's own timestamp (the agent's clock is the bench's).
//!   - a negative time: before `RunPodSandbox` returned (the agent sees the cgroup appear).
//! - Memory: the agent's `VmRSS` once it settled with no pod, and after the last pod's
//!   listeners are open, per pod.
//!
//! # Checks
//! Every pod's cgroup is put in the scope of `bench` (the scope the policy's order gives it);
//! from every pod a connect to `192.0.2.1:8080`, which only the namespace's rule allows,
//! arrives at the node's sink, and one to port 9090 is refused with `EPERM`.
//!
//! # Options (after `cargo bench -p egress-tests --features pods --bench pods --`)
//! `--pods N` (40; the CNI range holds about 60), `--out DIR` (also write `pods.md` and
//! `pods.json` there).

#[path = "../common/mod.rs"]
mod common;

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt as _,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use common::procfs::status_kib;
use egress_common::maps;
use egress_tests::{Sandbox, V4_A, egress_bin, eventually, node::Node, policy::config, sa};
use egress_user::loader::PinDir;

const EGRESS: &str = egress_bin!();
const USAGE: &str =
    "usage: cargo bench -p egress-tests --features pods --bench pods -- [--pods N] [--out DIR]";

/// The namespace of the bench's pods, and its rule: the only one allowing 192.0.2.1:8080.
const NAMESPACE: &str = "bench";
const ALLOWED_PORT: u16 = 8080;
const DENIED_PORT: u16 = 9090;
/// `bench` is the first namespace with rules: scope 1.
const SCOPE: u32 = 1;

const POLICY: &str = "\
kind: EgressRule
metadata: {name: web}
spec:
  destination: {service: httpbin.test}
  ports: [{port: 80, protocol: http}]
---
kind: EgressRule
metadata: {name: sink, namespace: bench}
spec:
  destination: {service: 192.0.2.1/32}
  ports: [{port: 8080, protocol: tcp}]
";

struct Options {
    pods: usize,
    out: Option<PathBuf>,
}

fn parse(args: &[String]) -> Options {
    let mut options = Options {
        pods: 40,
        out: None,
    };
    let mut args = common::Flags::new(args, USAGE);
    while let Some(arg) = args.next() {
        let flag = arg.as_str();
        match flag {
            "--bench" => {}
            "--pods" => options.pods = args.number(flag),
            "--out" => options.out = Some(args.dir(flag)),
            other => panic!("unknown argument {other:?}; {USAGE}"),
        }
    }
    assert!(
        (1..=60).contains(&options.pods),
        "--pods must be 1..=60 (the CNI range); {USAGE}"
    );
    options
}

fn main() -> std::process::ExitCode {
    common::bench_main("pods", |args| run(&parse(args)))
}

/// When each cgroup id first appeared in `SCOPES`, and with which scope: a thread reading the
/// pinned map every millisecond until dropped.
struct ScopeWatch {
    seen: Arc<Mutex<HashMap<u64, (Instant, u32)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl ScopeWatch {
    fn start(pin: PathBuf) -> Self {
        let seen = Arc::new(Mutex::new(HashMap::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (into, until) = (seen.clone(), stop.clone());
        let thread = thread::spawn(move || {
            while !until.load(Ordering::SeqCst) {
                // Opened each time: a new generation pins a map of its own.
                if let Ok(data) = MapData::from_pin(&pin) {
                    let map = Map::HashMap(data);
                    if let Ok(scopes) = BpfHashMap::<_, u64, u32>::try_from(&map) {
                        let now = Instant::now();
                        let mut seen = into.lock().expect("lock");
                        for (cgroup, scope) in scopes.iter().filter_map(Result::ok) {
                            seen.entry(cgroup).or_insert((now, scope));
                        }
                    }
                }
                thread::sleep(Duration::from_millis(1));
            }
        });
        Self {
            seen,
            stop,
            thread: Some(thread),
        }
    }

    fn get(&self, cgroup: u64) -> Option<(Instant, u32)> {
        self.seen.lock().expect("lock").get(&cgroup).copied()
    }
}

impl Drop for ScopeWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Seconds since the epoch of an agent log line's timestamp (`2026-12-06T04:13:45.749459Z`).
fn log_time(line: &str) -> Option<f64> {
    let stamp = line.split_whitespace().next()?.strip_suffix('Z')?;
    let (date, time) = stamp.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.split(':');
    let h: f64 = t.next()?.parse().ok()?;
    let min: f64 = t.next()?.parse().ok()?;
    let s: f64 = t.next()?.parse().ok()?;
    // Days from the civil date (proleptic Gregorian), as `days_from_civil`.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days as f64 * 86_400.0 + h * 3600.0 + min * 60.0 + s)
}

fn epoch_seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs_f64()
}

/// One pod's numbers, ms after its sandbox was ready.
struct Timing {
    scope_ms: f64,
    listeners_ms: f64,
}

fn run(options: &Options) {
    let started = Instant::now();
    let sb = Sandbox::new();
    sb.add_addrs(&[format!("{V4_A}/32")]);
    let sink = sb.sink(sa(V4_A, ALLOWED_PORT));
    let hosts = "  hosts:\n    httpbin.test: [192.0.2.1]\n";
    let policy = sb.policy_file("p.yaml", &(config(hosts) + POLICY));
    eprintln!("bench pods: starting containerd...");
    let mut node = Node::start(&sb);
    let socket = node.socket().display().to_string();
    let agent = sb
        .agent(EGRESS)
        .policy(&policy, &["--cri-socket", &socket])
        .log("info")
        .start();
    // Settled: the first poll of the runtime done, nothing else going on.
    thread::sleep(Duration::from_secs(2));
    let rss_before = status_kib(agent.pid(), "VmRSS");
    let watch = ScopeWatch::start(PinDir::new(&sb.pin_dir).map(maps::SCOPES));
    eprintln!("bench pods: {} pods, one after another...", options.pods);
    let mut pods = Vec::new();
    let mut timings = Vec::new();
    for i in 0..options.pods {
        let pod = node.pod(NAMESPACE, &format!("p{i}"));
        let (ready, ready_wall) = pod.sandbox_ready;
        let pod_cgroup = pod
            .cgroup_dir()
            .parent()
            .map(|dir| {
                std::fs::metadata(dir)
                    .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
                    .ino()
            })
            .expect("a container's cgroup has a parent");
        let mut scoped = None;
        let in_scope = eventually(Duration::from_secs(5), || {
            scoped = watch.get(pod_cgroup);
            scoped.is_some()
        });
        assert!(
            in_scope,
            "{}: its cgroup {pod_cgroup} never came into SCOPES; {}",
            pod.name,
            agent.log()
        );
        let (at, scope) = scoped.expect("seen");
        assert_eq!(scope, SCOPE, "{}: in scope {scope}", pod.name);
        let mut line = None;
        let listening = eventually(Duration::from_secs(5), || {
            line = agent
                .log()
                .lines()
                .find(|l| l.contains("listening inside the pod") && l.contains(&pod.name))
                .map(str::to_owned);
            line.is_some()
        });
        assert!(listening, "{}: no listeners; {}", pod.name, agent.log());
        let logged = line.as_deref().and_then(log_time).expect("a log timestamp");
        let signed_ms = |later: Option<Duration>, earlier: Option<Duration>| match (later, earlier)
        {
            (Some(d), _) => d.as_secs_f64() * 1e3,
            (_, Some(d)) => -d.as_secs_f64() * 1e3,
            _ => 0.0,
        };
        timings.push(Timing {
            scope_ms: signed_ms(
                at.checked_duration_since(ready),
                ready.checked_duration_since(at),
            ),
            listeners_ms: (logged - epoch_seconds(ready_wall)) * 1e3,
        });
        pods.push(pod);
    }
    let rss_after = status_kib(agent.pid(), "VmRSS");
    drop(watch);
    // Enforced: the namespace's rule lets every pod reach the sink, nothing else.
    for pod in &pods {
        node.assert_connects(pod, sa(V4_A, ALLOWED_PORT));
        node.assert_refused(pod, sa(V4_A, DENIED_PORT));
    }
    assert!(
        eventually(Duration::from_secs(5), || sink.accepted() == pods.len()),
        "the sink accepted {} connects of {}",
        sink.accepted(),
        pods.len()
    );
    report(
        options,
        &timings,
        rss_before,
        rss_after,
        started.elapsed().as_secs_f64(),
    );
}

/// The value at quantile `q` of `values` (nearest rank).
fn rank(values: &[f64], q: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[i - 1]
}

fn report(options: &Options, timings: &[Timing], rss_before: u64, rss_after: u64, seconds: f64) {
    let scope: Vec<f64> = timings.iter().map(|t| t.scope_ms).collect();
    let listeners: Vec<f64> = timings.iter().map(|t| t.listeners_ms).collect();
    let per_pod_kib = rss_after.saturating_sub(rss_before) as f64 / timings.len() as f64;
    let mut out = String::from(
        "\n## Pods: from a sandbox ready to its scope enforced, and the agent's memory per pod\n\n",
    );
    out.push_str(&common::machine_line());
    out.push_str(&format!(
        "- command: `cargo xtask bench pods` ({} pods of namespace `bench` created one after another through containerd's CRI, in {seconds:.0} s)\n\
         - from `RunPodSandbox` returning: *scope* until the pod's cgroup is in `SCOPES` (the pinned map read every ms), \
         *listeners* until the agent's `listening inside the pod` line; negative: before `RunPodSandbox` returned\n\n",
        timings.len()
    ));
    out.push_str("| from the sandbox ready to | p50 ms | p99 ms | max ms | target |\n|---|---|---|---|---|\n");
    for (what, values, target) in [
        ("its scope enforced", &scope, "p99 <= 50 ms"),
        ("its proxy listeners open", &listeners, "-"),
    ] {
        out.push_str(&format!(
            "| {what} | {:.1} | {:.1} | {:.1} | {target} |\n",
            rank(values, 0.5),
            rank(values, 0.99),
            rank(values, 1.0)
        ));
    }
    out.push_str(&format!(
        "\nThe agent's memory: VmRSS {rss_before} KiB with no pod, {rss_after} KiB with {} pods: **{per_pod_kib:.0} KiB per pod** \
         with its listeners (target <= 64 KiB: {}). Scope p99 target: {}.\n",
        timings.len(),
        if per_pod_kib <= 64.0 { "met" } else { "missed" },
        if rank(&scope, 0.99) <= 50.0 { "met" } else { "missed" },
    ));
    let json = serde_json::json!({
        "bench": "pods",
        "machine": common::machine_json(),
        "pods": timings.len(),
        "scope_ms": {"p50": rank(&scope, 0.5), "p99": rank(&scope, 0.99), "max": rank(&scope, 1.0), "all": scope},
        "listeners_ms": {"p50": rank(&listeners, 0.5), "p99": rank(&listeners, 0.99), "max": rank(&listeners, 1.0), "all": listeners},
        "rss_kib": {"before": rss_before, "after": rss_after, "per_pod": per_pod_kib},
        "seconds": seconds,
    });
    common::publish(options.out.as_deref(), "pods", &out, &json);
}
