//! Descriptor exhaustion from a managed workload (issue 13, section 2): an agent started with
//! a soft and hard open-file limit of 1024, and 2,000 connections from the managed cgroup
//! that each send half a request head and wait. Good requests must still be served (counted
//! at the upstream), the control socket must answer and reload, and `/healthz` must tell the
//! truth. Everything runs in the test's own network namespace.

use std::{fs, net::SocketAddr, time::Duration};

use egress_tests::{Hold, V4_A, egress_bin, probe_bin, sa, world::World};

const EGRESS: &str = egress_bin!();
const PROBE: &str = probe_bin!();
const HOLD: &str = env!("CARGO_BIN_EXE_egress-hold");
const METRICS: u16 = 9464;
const ATTACK: usize = 2000;

/// The HTTP tests' world with an agent limited to 1024 descriptors, serving metrics.
fn world() -> World {
    let mut w = World::without_agent(EGRESS, PROBE);
    let metrics = format!("127.0.0.1:{METRICS}");
    w.start_agent_with(
        &["--metrics-addr", &metrics, "--no-watch"],
        Some((1024, 1024)),
    );
    w
}

/// One good request from the managed cgroup, over its own connection: its status line.
fn get(w: &World, path: &str) -> String {
    let r = w.get(target(), "httpbin.test", path);
    if r.status.is_empty() {
        r.raw.trim().to_owned()
    } else {
        r.status
    }
}

/// How many requests whose path starts with `prefix` reached the upstream.
fn seen(w: &World, prefix: &str) -> usize {
    w.http
        .seen()
        .iter()
        .filter(|s| s.path.starts_with(prefix))
        .count()
}

fn open_fds(w: &World) -> usize {
    fs::read_dir(format!("/proc/{}/fd", w.agent().pid()))
        .expect("the agent's fds")
        .count()
}

fn target() -> SocketAddr {
    sa(V4_A, 80)
}

/// The agent was given 1024:4096 and runs with 4096: the soft limit is raised to the hard one.
#[test]
fn the_agent_raises_its_soft_descriptor_limit_to_the_hard_one() {
    let mut w = World::without_agent(EGRESS, PROBE);
    w.start_agent_with(&[], Some((1024, 4096)));
    let agent = w.agent();
    let limits = fs::read_to_string(format!("/proc/{}/limits", agent.pid())).expect("limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files");
    let n: Vec<&str> = line.split_whitespace().collect();
    assert_eq!((n[3], n[4]), ("4096", "4096"), "{line}");
    assert!(
        agent.log().contains("raised the soft open-file limit"),
        "{}",
        agent.log()
    );
}

/// 2,000 half-sent requests (the proxy's pending connections are evicted oldest first, and the
/// attacker reopens each one closed) do not stop good requests, the control socket, a
/// reload or the metrics endpoint.
#[test]
fn half_sent_requests_at_a_1024_limit_starve_nothing() {
    let w = world();
    let idle = open_fds(&w);
    let hold = Hold::start(
        &w.sb,
        HOLD,
        ATTACK,
        "GET / HTTP/1.1\\r\\nHost: httpbin.test\\r\\n",
        target(),
    );
    let during = open_fds(&w);

    let statuses: Vec<String> = (0..7).map(|i| get(&w, &format!("/good-{i}"))).collect();
    let served = seen(&w, "/good-");

    let (status, out, err) = w.sb.ctl(EGRESS, &["status"]);
    assert!(status.success(), "egress status during the attack: {err}");
    let connections = out
        .lines()
        .find(|l| l.starts_with("connections:"))
        .unwrap_or("")
        .to_owned();
    let (reloaded, out, err) = w.sb.ctl(EGRESS, &["reload"]);
    assert!(
        reloaded.success(),
        "egress reload during the attack: {out}{err}"
    );
    let (health, body) = w.sb.scrape(METRICS, "/healthz");
    let evicted = w.metric(METRICS, "egress_proxy_connections_evicted_total");
    let refused = w.metric(METRICS, "egress_proxy_connections_refused_total");
    let (held, held_failed) = (hold.held, hold.failed);
    let (reopened, failed) = hold.stop();

    eprintln!(
        "figures: attacker held {held} of {ATTACK} (failed {held_failed}), reopened {reopened} \
         (failed {failed}); good requests served {served} of 7 ({statuses:?}); agent fds idle \
         {idle}, during {during}; proxy evicted {evicted}, refused {refused}; status \
         `{connections}`; reload ok; /healthz {health} {body:?}"
    );
    assert_eq!(
        served, 7,
        "good requests reaching the upstream: {statuses:?}"
    );
    assert!(
        during < 1024,
        "the agent holds {during} descriptors at a limit of 1024"
    );
    assert!(evicted > 0.0, "the attack never filled the proxy");
    assert_eq!(health, "HTTP/1.1 200 OK", "{body}");
}

/// A workload that fills every place with kept-alive connections that each had a request
/// answered (nothing to evict) gets new connections refused: `/healthz` then fails and says
/// why, `egress status` still answers and shows it, and both recover once it lets go.
#[test]
fn healthz_fails_while_the_proxy_refuses_and_recovers() {
    let w = world();
    let hold = Hold::start(
        &w.sb,
        HOLD,
        ATTACK,
        "GET / HTTP/1.1\\r\\nHost: denied.test\\r\\n\\r\\n",
        target(),
    );
    let (health, body) = w.sb.scrape(METRICS, "/healthz");
    let (status, out, err) = w.sb.ctl(EGRESS, &["status"]);
    let refused = w.metric(METRICS, "egress_proxy_connections_refused_total");
    drop(hold);
    eprintln!("figures: /healthz {health} {body:?}; refused {refused}");
    assert_eq!(health, "HTTP/1.1 503 Service Unavailable", "{body}");
    assert!(body.contains("proxy: refusing connections"), "{body}");
    assert!(status.success(), "egress status: {err}");
    assert!(out.contains("health:      UNHEALTHY"), "{out}");
    assert!(refused > 0.0);

    // Refusals stop with the flood; the probe recovers 5 s after the last one.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (health, body) = w.sb.scrape(METRICS, "/healthz");
        if health == "HTTP/1.1 200 OK" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still unhealthy: {body}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}
