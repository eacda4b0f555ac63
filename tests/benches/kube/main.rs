//! `cargo xtask bench kube`: EgressRules from a real Kubernetes API, from the object written to
//! the verdict changed in a pod, and the agent's memory with many objects.
//!
//! # Method
//! - One [`Sandbox`]: etcd and the Kubernetes CRD server ([`ApiServer`], the binaries the
//!   kube-api test step builds and caches; `cargo xtask bench kube` passes them), containerd
//!   with one pod `bench/sleep` created through the CRI ([`Node`]), and the release build of
//!   the agent (`egress run --cri-socket ... --kubeconfig ... --node-name bench-node`, node
//!   file: `mode: enforce` and nothing allowed), all in the sandbox's network namespace, which
//!   has no route out. Sinks listen on `192.0.2.1:8080` (A) and `198.51.100.1:8080` (B) on
//!   the sandbox's veth.
//! - The workload is `egress-verdict-poll` in the pod's own cgroup and network namespace: the
//!   agent puts it in namespace `bench`'s scope as it does any process of the pod.
//! - *Apply to enforced* (`--applies`, 100, after `--warmup` 3): one EgressRule `flip` in
//!   `bench` allows A or B, alternately. Each round the workload first confirms that the
//!   destination about to be allowed is still denied and starts connecting to it every
//!   `--poll-us` (1,000 us; a denied connect fails with EPERM inside `connect()`); then the
//!   bench sends the change, a merge PATCH of `spec.destination` (what `kubectl apply` sends for
//!   an object that exists, without a process start). Measured: from just before the request
//!   is sent to the return of the first connect that succeeds. The path: the API server's
//!   write to etcd, the watch event, the agent's wait for the burst to end (`QUIET`, 100 ms,
//!   by design: a burst of changes becomes one generation), the check of the whole policy and
//!   the new kernel generation. The table also gives the time minus those 100 ms. Then the
//!   previously allowed destination must be denied, at once.
//! - *Memory* (`--objects`, 10,000): the agent's resident memory (`VmRSS`, and the peak
//!   `VmHWM`, from /proc) with the one object in force, settled (two samples 1 s apart that
//!   agree within 1%); then `--objects` EgressRules created in namespace `bulk` (a /32 each in
//!   198.18.0.0/15, port 443 tcp; 16 requests in flight), until `egress get egressrules -n
//!   bulk` lists them all, and memory again once settled (every object's status written). The
//!   difference is what the objects add. Then a fresh agent is started against the same API
//!   (its state directory kept): time until all are in force, and its memory. Kernel maps
//!   are not in RSS (they are memlock'd kernel memory).
//! - *Pods* (`--pods`, 1,000): then, with that agent and the objects in force, that many pods
//!   of namespace `bulk` are created through the CRI one after another (a sandbox and a
//!   busybox container each, addresses from 198.19.0.0/21), until the agent has logged
//!   `proxy: listening inside the pod` for every one (the node file has an HTTP rule, so
//!   every pod gets the proxy's listeners in its network namespace, as in the pods bench),
//!   and its memory once settled: the agent with 10,000 objects and 1,000 pods.
//!
//! # Checks
//! The bench stops with an error when a verdict does not flip within 10 s, the other
//! destination is still allowed after a flip, the objects are not all in force within the
//! timeout, or the API refuses a request.
//!
//! # Options (after `cargo bench -p egress-tests --features kube-api --bench kube --`)
//! `--applies N` (100), `--warmup N` (3), `--poll-us N` (1000), `--objects N` (10000),
//! `--pods N` (1000, at most 2,000), `--out DIR` (write kube.md and kube.json there); `--etcd PATH` and `--apiserver PATH` (or
//! `EGRESS_TEST_ETCD`/`EGRESS_TEST_APISERVER`), which `cargo xtask bench kube` passes.

#[path = "../common/mod.rs"]
mod common;

use std::{
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use egress_tests::{
    Sandbox, V4_A, V4_B, egress_bin, enter_netns, eventually,
    kube_api::{ApiServer, runtime},
    monotonic_ns,
    node::Node,
    policy::{Rule, config},
    poll::Poller,
    sa,
};
use futures::StreamExt as _;
use kube::api::{Patch, PatchParams};

const EGRESS: &str = egress_bin!();
const POLL: &str = env!("CARGO_BIN_EXE_egress-verdict-poll");
const USAGE: &str = "options: --applies N --warmup N --poll-us N --objects N --pods N --out DIR --etcd PATH --apiserver PATH";
/// The agent's wait for a burst of changes to end (`egress_user::cluster::QUIET`).
const QUIET_MS: f64 = 100.0;
/// The namespace of the pod and of the object that flips.
const NAMESPACE: &str = "bench";
/// The namespace of the bulk objects, and of the bulk pods.
const BULK: &str = "bulk";
/// The pods' addresses: 2,046 of them, for `--pods` and the pod of [`NAMESPACE`].
const PODS_SUBNET: &str = "198.19.0.0/21";

struct Options {
    applies: usize,
    warmup: usize,
    poll: Duration,
    objects: usize,
    pods: usize,
    out: Option<PathBuf>,
}

fn parse(args: &[String]) -> Options {
    let mut options = Options {
        applies: 100,
        warmup: 3,
        poll: Duration::from_micros(1000),
        objects: 10_000,
        pods: 1_000,
        out: None,
    };
    let mut args = common::Flags::new(args, USAGE).with_separators();
    while let Some(arg) = args.next() {
        let flag = arg.as_str();
        match flag {
            "--bench" => {}
            "--applies" => options.applies = args.number(flag),
            "--warmup" => options.warmup = args.number(flag),
            "--poll-us" => options.poll = Duration::from_micros(args.number(flag)),
            "--objects" => options.objects = args.number(flag),
            "--pods" => options.pods = args.number(flag),
            "--out" => options.out = Some(args.dir(flag)),
            // From `cargo xtask bench kube`: the servers the kube-api step builds.
            "--etcd" | "--apiserver" => {
                let var = if flag == "--etcd" {
                    "EGRESS_TEST_ETCD"
                } else {
                    "EGRESS_TEST_APISERVER"
                };
                let path = args.dir(flag);
                // SAFETY: the bench has started no thread yet.
                unsafe { std::env::set_var(var, path) };
            }
            other => panic!("unknown argument {other:?}; {USAGE}"),
        }
    }
    assert!(options.applies >= 1, "{USAGE}");
    assert!(
        options.objects <= 65_536,
        "--objects: at most 65,536 (one /32 each in 198.18.0.0/16)"
    );
    assert!(
        options.pods <= 2_000,
        "--pods: at most 2,000 (addresses from {PODS_SUBNET})"
    );
    options
}

fn main() -> std::process::ExitCode {
    common::bench_main("kube", |args| run(&parse(args)))
}

/// The `flip` object allowing `dest`.
fn flip_rule(dest: SocketAddr) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "egress.dev/v1alpha1",
        "kind": "EgressRule",
        "metadata": {"name": "flip"},
        "spec": {
            "destination": {"service": format!("{}/32", dest.ip())},
            "ports": [{"port": dest.port(), "protocol": "tcp"}],
        },
    })
}

/// Bulk object `i`: 198.18.x.y/32 port 443.
fn bulk_rule(i: usize) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "egress.dev/v1alpha1",
        "kind": "EgressRule",
        "metadata": {"name": format!("bulk-{i:05}")},
        "spec": {
            "destination": {"service": format!("198.18.{}.{}/32", i / 256, i % 256)},
            "ports": [{"port": 443, "protocol": "tcp"}],
        },
    })
}

/// `VmRSS` and `VmHWM` of `pid`, in KiB.
fn memory(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/status: {e}"));
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// The resident memory once it stopped moving: two samples 1 s apart within 1% (at most 60 s).
fn settled_memory(pid: u32) -> (u64, u64) {
    let mut last = memory(pid);
    for _ in 0..60 {
        std::thread::sleep(Duration::from_secs(1));
        let now = memory(pid);
        if now.0.abs_diff(last.0) * 100 <= last.0 {
            return now;
        }
        last = now;
    }
    last
}

/// How many rules of `namespace` the agent has in force (`egress get egressrules -n NS`).
fn in_force(sb: &Sandbox, namespace: &str) -> usize {
    let (ok, out, err) = sb.ctl(
        EGRESS,
        &["get", "egressrules", "-n", namespace, "-o", "json"],
    );
    assert!(ok.success(), "egress get: {out}{err}");
    let rules: Vec<serde_json::Value> = serde_json::from_str(&out).expect("egress get -o json");
    rules.len()
}

/// How many pods of [`BULK`] the agent's `log` says have the proxy's listeners.
fn listening(log: &str) -> usize {
    let prefix = format!("pod={BULK}/");
    log.lines()
        .filter(|l| l.contains("proxy: listening inside the pod"))
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with(&prefix)))
        .collect::<std::collections::HashSet<_>>()
        .len()
}

/// p-th percentile, nearest rank, of sorted `v`.
fn percentile(v: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

fn run(options: &Options) {
    let started = Instant::now();
    let sb = Sandbox::new();
    enter_netns(&sb.name);
    let api = ApiServer::start(&sb.dir("api"));
    let rt = runtime();
    rt.block_on(api.apply_crds());
    let (a, b) = (sa(V4_A, 8080), sa(V4_B, 8080));
    let _sinks = (sb.sinks(V4_A, [8080]), sb.sinks(V4_B, [8080]));
    let policy = sb.policy_file(
        "node.yaml",
        // Enforce, and one HTTP rule, so that every pod gets the proxy's listeners in its
        // network namespace.
        &(config("  mode: enforce\n  hosts:\n    httpbin.test: [192.0.2.1]\n")
            + &Rule::new("web", "httpbin.test")
                .port(80, "http")
                .to_string()),
    );
    let mut node = Node::start_with_subnet(&sb, PODS_SUBNET);
    let pod = node.pod(NAMESPACE, "sleep");
    let args = [
        "--policy".to_owned(),
        policy.display().to_string(),
        "--pin-dir".to_owned(),
        sb.pin_dir.display().to_string(),
        "--cri-socket".to_owned(),
        node.socket().display().to_string(),
        "--kubeconfig".to_owned(),
        api.kubeconfig.display().to_string(),
        "--node-name".to_owned(),
        "bench-node".to_owned(),
    ];
    let agent = sb.agent(EGRESS).args(&args).start();
    let netns = pod.netns_path().display().to_string();
    let mut poller = Poller::start_in(POLL, &pod.cgroup_dir(), &netns);
    assert_eq!(poller.check(a), "denied", "nothing allowed yet");

    // Apply to enforced.
    let rules = rt.block_on(api.rules(NAMESPACE));
    rt.block_on(api.create_rule(NAMESPACE, &flip_rule(a)));
    assert!(
        eventually(Duration::from_secs(10), || poller.check(a) == "connected"),
        "the first object never took effect:\n{}",
        agent.log()
    );
    let mut allowed = a;
    let mut times_ms = Vec::with_capacity(options.applies);
    let mut resolution_ms = Vec::with_capacity(options.applies);
    for round in 0..options.warmup + options.applies {
        let next = if allowed == a { b } else { a };
        let patch = serde_json::json!({"spec": flip_rule(next)["spec"]});
        poller.start_wait(next, options.poll, Duration::from_secs(10));
        let sent = monotonic_ns();
        rt.block_on(rules.patch("flip", &PatchParams::default(), &Patch::Merge(&patch)))
            .unwrap_or_else(|e| panic!("patching flip: {e}"));
        let flip = poller.flipped().unwrap_or_else(|line| {
            panic!(
                "round {round}: {next} never allowed ({line}):\n{}",
                agent.log()
            )
        });
        assert_eq!(
            poller.check(allowed),
            "denied",
            "round {round}: {allowed} still allowed after the flip"
        );
        allowed = next;
        if round >= options.warmup {
            times_ms.push((flip.at_ns - sent) as f64 / 1e6);
            resolution_ms.push((flip.at_ns - flip.last_old_ns) as f64 / 1e6);
        }
    }
    drop(poller);
    let mut sorted = times_ms.clone();
    sorted.sort_by(f64::total_cmp);
    let (p50, p99, max) = (
        percentile(&sorted, 50.0),
        percentile(&sorted, 99.0),
        sorted[sorted.len() - 1],
    );
    let resolution = common::summary(resolution_ms.iter().copied()).0;
    eprintln!("kube: apply to enforced p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms");

    // Memory with many objects.
    let before = settled_memory(agent.pid());
    let created = Instant::now();
    rt.block_on(async {
        let bulk = api.rules(BULK).await;
        futures::stream::iter(0..options.objects)
            .map(|i| {
                let bulk = bulk.clone();
                async move {
                    let object: kube::api::DynamicObject =
                        serde_json::from_value(bulk_rule(i)).expect("an object");
                    bulk.create(&kube::api::PostParams::default(), &object)
                        .await
                        .unwrap_or_else(|e| panic!("creating bulk-{i}: {e}"));
                }
            })
            .buffer_unordered(16)
            .collect::<()>()
            .await;
    });
    let create_s = created.elapsed().as_secs_f64();
    let all_in_force = eventually(Duration::from_secs(300), || {
        in_force(&sb, BULK) == options.objects
    });
    assert!(
        all_in_force,
        "{} of {} objects in force after 300 s:\n{}",
        in_force(&sb, BULK),
        options.objects,
        agent.log()
    );
    let in_force_s = created.elapsed().as_secs_f64();
    let after = settled_memory(agent.pid());
    eprintln!(
        "kube: {} objects created in {create_s:.1} s, all in force {in_force_s:.1} s after the \
         first; RSS {} -> {} KiB",
        options.objects, before.0, after.0
    );

    // A fresh agent against the same API, with the objects there.
    agent.signal(libc::SIGTERM);
    let _ = agent.wait();
    let restarted = Instant::now();
    let agent = sb.agent(EGRESS).args(&args).start();
    let restart_ready_s = restarted.elapsed().as_secs_f64();
    assert!(
        eventually(Duration::from_secs(300), || in_force(&sb, BULK)
            == options.objects),
        "after a restart, not every object is in force:\n{}",
        agent.log()
    );
    let restart_in_force_s = restarted.elapsed().as_secs_f64();
    let restarted_memory = settled_memory(agent.pid());

    // Pods, with the objects in force.
    let pods_started = Instant::now();
    for i in 0..options.pods {
        node.pod(BULK, &format!("p{i}"));
        if (i + 1) % 100 == 0 {
            eprintln!(
                "kube: {} pods in {:.0} s",
                i + 1,
                pods_started.elapsed().as_secs_f64()
            );
        }
    }
    let pods_create_s = pods_started.elapsed().as_secs_f64();
    let all_listening = eventually(Duration::from_secs(120), || {
        listening(&agent.log()) == options.pods
    });
    assert!(
        all_listening,
        "{} of {} pods have the proxy's listeners after 120 s:\n{}",
        listening(&agent.log()),
        options.pods,
        agent.log()
    );
    let pods_listening_s = pods_started.elapsed().as_secs_f64();
    let with_pods = settled_memory(agent.pid());
    eprintln!(
        "kube: {} pods created in {pods_create_s:.0} s; RSS {} -> {} KiB",
        options.pods, restarted_memory.0, with_pods.0
    );
    drop(agent);
    let removing = Instant::now();
    drop(node);
    eprintln!(
        "kube: pods removed in {:.0} s",
        removing.elapsed().as_secs_f64()
    );

    let mib = |kib: u64| kib as f64 / 1024.0;
    let n = common::thousands(options.objects);
    let p = common::thousands(options.pods);
    let mut out = String::new();
    out.push_str("\n## EgressRules from the Kubernetes API\n\n");
    out.push_str(&common::machine_line());
    out.push_str(&format!(
        "- etcd and the Kubernetes CRD server, containerd with one pod, the release agent; \
         method in tests/benches/kube/main.rs\n\n\
         ### Apply to enforced ({} applies, {} warm-up)\n\n\
         From the PATCH of an EgressRule sent to the first connect from the pod that the new \
         object allows (polled every {} us; resolution median {resolution:.2} ms). It includes \
         the agent's {QUIET_MS:.0} ms wait for a burst of changes to end.\n\n\
         | | p50 | p99 | max |\n|---|---|---|---|\n\
         | apply to enforced | {p50:.1} ms | {p99:.1} ms | {max:.1} ms |\n\
         | minus the {QUIET_MS:.0} ms wait | {:.1} ms | {:.1} ms | {:.1} ms |\n\n",
        options.applies,
        options.warmup,
        options.poll.as_micros(),
        p50 - QUIET_MS,
        p99 - QUIET_MS,
        max - QUIET_MS,
    ));
    out.push_str(&format!(
        "### The agent's memory with {n} EgressRule objects\n\n\
         | | VmRSS | VmHWM (peak) |\n|---|---|---|\n\
         | one object | {:.1} MiB | {:.1} MiB |\n\
         | {n} objects in force, statuses written | {:.1} MiB | {:.1} MiB |\n\
         | added by {n} objects | {:.1} MiB ({:.2} KiB per object) | |\n\
         | a fresh agent started with the {n} objects | {:.1} MiB | {:.1} MiB |\n\n\
         {n} objects created in {create_s:.1} s (16 requests in flight), all in force \
         {in_force_s:.1} s after the first create; a fresh agent was ready in \
         {restart_ready_s:.1} s and had all {n} in force {restart_in_force_s:.1} s after it \
         started.\n\n\
         ### The agent's memory with {n} EgressRule objects and {p} pods\n\n\
         The fresh agent, its {n} objects in force, then {p} pods of namespace `{BULK}` (which the \
         {n} objects' rules scope) created one after another through containerd's CRI, in \
         {pods_create_s:.0} s, each with the proxy's listeners in its network namespace \
         {pods_listening_s:.0} s after the first was created:\n\n\
         | | VmRSS | VmHWM (peak) |\n|---|---|---|\n\
         | {n} objects, {p} pods | {:.1} MiB | {:.1} MiB |\n\
         | added by {p} pods | {:.1} MiB ({:.1} KiB per pod) | |\n",
        mib(before.0),
        mib(before.1),
        mib(after.0),
        mib(after.1),
        mib(after.0.saturating_sub(before.0)),
        after.0.saturating_sub(before.0) as f64 / options.objects as f64,
        mib(restarted_memory.0),
        mib(restarted_memory.1),
        mib(with_pods.0),
        mib(with_pods.1),
        mib(with_pods.0.saturating_sub(restarted_memory.0)),
        with_pods.0.saturating_sub(restarted_memory.0) as f64 / options.pods.max(1) as f64,
    ));
    let json = serde_json::json!({
        "machine": common::machine_json(),
        "seconds": started.elapsed().as_secs_f64(),
        "apply_to_enforced_ms": {"p50": p50, "p99": p99, "max": max, "n": times_ms.len(),
                                 "all": times_ms},
        "memory_kib": {"one_object": before.0, "objects": after.0, "objects_peak": after.1,
                       "restarted": restarted_memory.0, "n": options.objects,
                       "with_pods": with_pods.0, "with_pods_peak": with_pods.1,
                       "pods": options.pods},
        "bulk_seconds": {"create": create_s, "in_force": in_force_s,
                         "restart_ready": restart_ready_s, "restart_in_force": restart_in_force_s,
                         "pods_create": pods_create_s, "pods_listening": pods_listening_s},
    });
    common::publish(options.out.as_deref(), "kube", &out, &json);
}
