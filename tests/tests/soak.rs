//! Soak tests, as root: policy swaps and agent deaths while a workload connects without pause.
//! Every verdict is checked against the policy that judged it, and every connection is
//! counted at the sink.

use std::{
    collections::{HashMap, HashSet},
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use egress_tests::{Sandbox, Sink, Workload, egress_bin, follow::EventFollower, sa};

const EGRESS: &str = egress_bin!();
const VERDICTS: &str = env!("CARGO_BIN_EXE_egress-verdicts");
const PROBE: &str = env!("CARGO_BIN_EXE_egress-probe");

/// The agents log only their start (the workload's verdicts would fill the test's memory).
const QUIET: &str = "error,egress_user::cli::run=info";
/// The workload's pause after each round over its 7 targets: a few thousand connects a
/// second, enough to land in every generation without starving the agent of CPU.
const PAUSE: Duration = Duration::from_millis(1);

const V4_B: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const V6_A: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);

fn rule(name: &str, ip: IpAddr, port: u16) -> String {
    let prefix = if ip.is_ipv4() { 32 } else { 128 };
    egress_tests::policy::tcp_rule(name, format!("{ip}/{prefix}"), port)
}

/// A policy: its rules as (name, destination), and its YAML.
struct TestPolicy {
    allows: Vec<(&'static str, SocketAddr)>,
}

impl TestPolicy {
    fn yaml(&self, events: &str) -> String {
        let mut out = egress_tests::policy::config(&format!("  events: {events}\n"));
        for (name, dst) in &self.allows {
            out.push_str(&rule(name, dst.ip(), dst.port()));
        }
        out
    }

    fn rule_for(&self, dst: SocketAddr) -> Option<&'static str> {
        self.allows.iter().find(|(_, d)| *d == dst).map(|(n, _)| *n)
    }
}

/// Two policies with nothing in common: A allows ports 8001, 8002 and 8006 (IPv6), B allows
/// 8003, 8004 and 8007 (IPv6). Port 8005 neither allows. A connect judged by half of one and
/// half of the other would show as a verdict its generation's policy does not give.
fn policies() -> (TestPolicy, TestPolicy, Vec<SocketAddr>) {
    let a = TestPolicy {
        allows: vec![
            ("a-one", sa(Ipv4Addr::new(192, 0, 2, 1), 8001)),
            ("a-two", sa(V4_B, 8002)),
            ("a-six", sa(V6_A, 8006)),
        ],
    };
    let b = TestPolicy {
        allows: vec![
            ("b-three", sa(Ipv4Addr::new(192, 0, 2, 1), 8003)),
            ("b-four", sa(V4_B, 8004)),
            ("b-seven", sa(V6_A, 8007)),
        ],
    };
    let mut targets: Vec<SocketAddr> = a.allows.iter().chain(&b.allows).map(|(_, d)| *d).collect();
    targets.push(sa(Ipv4Addr::new(203, 0, 113, 1), 8005));
    (a, b, targets)
}

/// Writes `yaml` to `path` by rename, as a deployment tool would.
fn replace(path: &Path, yaml: &str) {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, yaml).expect("writing the policy");
    fs::rename(&tmp, path).expect("renaming the policy");
}

/// The policy file, with `yaml`, and a sink at each of `targets`.
fn policy_and_sinks(
    sb: &Sandbox,
    yaml: &str,
    targets: &[SocketAddr],
) -> (PathBuf, HashMap<SocketAddr, Sink>) {
    let file = sb.policy_file("policy.yaml", yaml);
    (file, targets.iter().map(|t| (*t, sb.sink(*t))).collect())
}

/// 1,000 reloads alternating between two policies while a workload connects without pause to
/// destinations each allows and one neither does: every verdict is the one its generation's
/// policy gives, each sink saw exactly the connections the workload saw succeed, and nothing
/// failed otherwise.
#[test]
fn a_thousand_alternating_reloads_judge_every_connect_by_one_whole_policy() {
    let sb = Sandbox::new();
    let (a, b, targets) = policies();
    let (file, sinks) = policy_and_sinks(&sb, &a.yaml("all"), &targets);
    let agent = sb
        .agent(EGRESS)
        .policy(&file, &["--no-watch"])
        .log(QUIET)
        .start();
    let follower = EventFollower::start(&sb, EGRESS);
    // One denied connect to an address outside the targets, seen by the follower, proves it
    // listens before the workload starts; the check below counts it as any other denial.
    let marker = sa(Ipv4Addr::new(203, 0, 113, 1), 9);
    follower.wait_subscribed(&sb, PROBE, marker);
    let markers = follower.count() as u64;
    // Generation -> which policy it holds; the agent started with A.
    let mut judged_by: HashMap<u64, usize> = HashMap::from([(1, 0)]);
    let workload = Workload::start(&sb, VERDICTS, &targets, PAUSE);
    let started = Instant::now();
    let mut reload_times = Vec::with_capacity(1000);
    for i in 1..=1000usize {
        let which = i % 2;
        replace(&file, &[&a, &b][which].yaml("all"));
        let t = Instant::now();
        let (ok, out, err) = sb.ctl(EGRESS, &["reload"]);
        reload_times.push(t.elapsed());
        assert!(ok.success(), "reload {i}: {err}");
        let generation: u64 = out
            .trim()
            .strip_prefix("reloaded: generation ")
            .and_then(|s| s.strip_suffix(" in force"))
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("reload {i}: {out}"));
        assert_eq!(generation, i as u64 + 1, "one generation per reload");
        judged_by.insert(generation, which);
    }
    let elapsed = started.elapsed();
    let (counts, failures) = workload.stop();
    assert!(failures.is_empty(), "{failures:#?}");
    let total: u64 = counts.values().map(|c| c.connected + c.denied).sum();
    // Wait for every verdict to arrive as an event.
    let deadline = Instant::now() + Duration::from_secs(30);
    while (follower.count() as u64) < total + markers && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let events = follower.stop();
    let status = {
        let (_, out, _) = sb.ctl(EGRESS, &["status", "-o", "json"]);
        serde_json::from_str::<serde_json::Value>(&out).expect("status")
    };
    assert_eq!(status["events_lost"], 0, "the ring buffer kept up");

    let policies = [&a, &b];
    let mut generations = HashSet::new();
    let mut per_target: HashMap<SocketAddr, (u64, u64)> = HashMap::new();
    for e in &events {
        assert_eq!(e["source"], "connect", "{e}");
        let dst: SocketAddr = e["destination"]
            .as_str()
            .expect("destination")
            .parse()
            .expect("addr");
        let generation = e["generation"].as_u64().expect("generation");
        let which = *judged_by
            .get(&generation)
            .unwrap_or_else(|| panic!("{e}: generation {generation} was never applied"));
        generations.insert(generation);
        let expected = policies[which].rule_for(dst);
        match (expected, e["verdict"].as_str()) {
            (Some(rule), Some("allow")) => assert_eq!(e["rule"], rule, "{e}"),
            (None, Some("deny")) => assert_eq!(e["rule"], "(no rule)", "{e}"),
            _ => panic!(
                "{e}: generation {generation} holds policy {} which gives {dst} {}",
                ["A", "B"][which],
                if expected.is_some() { "allow" } else { "deny" }
            ),
        }
        let t = per_target.entry(dst).or_default();
        if e["verdict"] == "allow" {
            t.0 += 1;
        } else {
            t.1 += 1;
        }
    }
    for target in &targets {
        let c = counts[target];
        assert_eq!(
            sinks[target].accepted() as u64,
            c.connected,
            "{target}: the sink saw exactly the connections that succeeded"
        );
        assert_eq!(
            per_target.get(target).copied().unwrap_or_default(),
            (c.connected, c.denied),
            "{target}: one event per connect"
        );
    }
    assert_eq!(
        counts[&targets[6]].connected, 0,
        "nothing ever allowed 8005"
    );
    assert!(
        generations.len() > 500,
        "the workload ran across most generations: {}",
        generations.len()
    );
    reload_times.sort();
    eprintln!(
        "1000 reloads in {elapsed:?}; {total} connects judged across {} generations; \
         reload-to-enforced (egress reload round trip) p50 {:?} p99 {:?} max {:?}",
        generations.len(),
        reload_times[500],
        reload_times[990],
        reload_times[999]
    );
    drop(agent);
}

/// The agent is SIGKILLed 20 times while a workload connects without pause, and restarted
/// each time: the pinned programs never stop enforcing, so no denied connect ever succeeds
/// and no allowed connect ever fails, with or without an agent.
#[test]
fn twenty_sigkills_under_load_let_nothing_through_and_block_nothing_allowed() {
    let sb = Sandbox::new();
    let (a, _, targets) = policies();
    let (file, sinks) = policy_and_sinks(&sb, &a.yaml("denied"), &targets);
    let mut agent = sb.agent(EGRESS).policy(&file, &[]).log(QUIET).start();
    let workload = Workload::start(&sb, VERDICTS, &targets, PAUSE);
    for round in 0..20u64 {
        // Die at a different point each round: while idle, and right after starting.
        std::thread::sleep(Duration::from_millis(30 + 17 * (round % 7)));
        agent.signal(libc::SIGKILL);
        let status = agent.wait();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL)
        );
        // A moment with no agent at all.
        std::thread::sleep(Duration::from_millis(50));
        agent = sb.agent(EGRESS).policy(&file, &[]).log(QUIET).start();
        let log = agent.log();
        assert!(
            log.contains(&format!("generation={}", round + 2)),
            "restart {round} took over as the next generation: {log}"
        );
    }
    std::thread::sleep(Duration::from_millis(200));
    let (counts, failures) = workload.stop();
    assert!(failures.is_empty(), "{failures:#?}");
    for target in &targets {
        let c = counts[target];
        if a.rule_for(*target).is_some() {
            assert_eq!((c.denied, c.failed), (0, 0), "{target} is allowed: {c:?}");
            assert!(c.connected > 0, "{target}: {c:?}");
        } else {
            assert_eq!((c.connected, c.failed), (0, 0), "{target} is denied: {c:?}");
            assert!(c.denied > 0, "{target}: {c:?}");
        }
        assert_eq!(
            sinks[target].accepted() as u64,
            c.connected,
            "{target}: the sink saw exactly the connections that succeeded"
        );
    }
    drop(agent);
}
