//! Issue 13, the proxy port taken over: an unprivileged process in the managed cgroup binds
//! the proxy's address (127.0.0.1:15001 or [::1]:15001) before the agent starts, or while it
//! is down, hoping to receive other workloads' redirected HTTP (with their tokens and bodies).
//! The kernel redirects only to a listener the agent marked, so the victim's connect() is
//! refused (EPERM) with a `proxy-foreign` event, the squatter receives nothing, the agent says
//! it is not ready, and it takes its port back as soon as the port is free. Counted at the
//! sinks: the squatter's own count of what it received, and the upstream's.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    process::Command,
    time::Duration,
};

use egress_tests::{
    Agent, PodNet, V4_A, V6_A, egress_bin, output_text, probe_bin, sa,
    squatter::{Hold, Squatter},
    squatter_bin, workload_command,
    world::World,
};

const EGRESS: &str = egress_bin!();
const PROBE: &str = probe_bin!();
const SQUATTER: &str = squatter_bin!();

const PROXY_V4: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 15001);
const PROXY_V6: SocketAddr = SocketAddr::new(std::net::IpAddr::V6(Ipv6Addr::LOCALHOST), 15001);

/// A victim's request with a secret in it, to the upstream by name, over the given family:
/// an IPv4 destination is redirected to 127.0.0.1:15001, an IPv6 one to [::1]:15001.
fn victim(w: &World, family: SocketAddr) -> egress_tests::world::Response {
    let dest = if family.is_ipv4() {
        sa(V4_A, 80)
    } else {
        sa(V6_A, 80)
    };
    let req = "POST /upload HTTP/1.1\\r\\nHost: httpbin.test\\r\\nAuthorization: Bearer victim-secret\\r\\nContent-Length: 6\\r\\nConnection: close\\r\\n\\r\\nsecret";
    egress_tests::world::Response::parse(&w.sb.http(PROBE, req, &[dest]))
}

fn assert_refused(r: &egress_tests::world::Response) {
    assert!(
        r.raw.starts_with(&format!("error {} ", libc::EPERM)),
        "the victim's connect must be refused (EPERM): {}",
        r.raw
    );
}

fn assert_served(r: &egress_tests::world::Response) {
    assert_eq!(r.code(), 200, "{}", r.raw);
}

/// Waits for the agent to log that every proxy listener is its own again.
fn wait_reclaimed(agent: &Agent) {
    agent.wait_for_log(
        "ready: every proxy listener is the agent's",
        Duration::from_secs(5),
    );
}

/// Waits until `egress status` says ready (or panics after 10 s).
fn wait_ready(w: &World) {
    let mut out = String::new();
    let ready = egress_tests::eventually(Duration::from_secs(10), || {
        out = w.sb.ctl(EGRESS, &["status"]).1;
        out.lines().next().is_some_and(|l| l.ends_with(", ready"))
    });
    assert!(
        ready,
        "the agent never became ready; status:\n{out}\nlog:\n{}",
        w.agent().log()
    );
}

fn status(w: &World) -> String {
    let (ok, out, err) = w.sb.ctl(EGRESS, &["status"]);
    assert!(ok.success(), "{out}{err}");
    out
}

fn squat_before_start(proxy: SocketAddr) {
    let mut w = World::without_agent(EGRESS, PROBE);
    let squatter = Squatter::start(SQUATTER, &w.sb, proxy, Hold::Listen)
        .unwrap_or_else(|e| panic!("the squatter could not bind {proxy}: {e}"));
    w.start_agent();
    let agent = w.agent();
    assert!(agent.log().contains("not ready"), "{}", agent.log());
    let out = status(&w);
    assert!(out.contains(&format!("NOT listening on {proxy}")), "{out}");
    assert!(out.contains("held by pid"), "the holder is named: {out}");

    let r = victim(&w, proxy);
    assert_refused(&r);
    agent.wait_for_log("reason=proxy-foreign", Duration::from_secs(5));
    // The other family still works: only the squatted listener is missing.
    let other = if proxy.is_ipv4() { PROXY_V6 } else { PROXY_V4 };
    assert_served(&victim(&w, other));

    // The squatter goes; the agent takes the port within a second or two and serves.
    squatters_go(&w, vec![(squatter, "squatter")], &[proxy], 2);
}

/// After a moment for anything in flight, fails the test if any of `squatters` (each with
/// what to call it) received something; then they go, and the agent takes its ports back,
/// says it is ready and serves at each of `proxies`. The upstream has then seen `seen`
/// requests: only the served ones.
fn squatters_go(w: &World, squatters: Vec<(Squatter, &str)>, proxies: &[SocketAddr], seen: usize) {
    std::thread::sleep(Duration::from_millis(300));
    for (squatter, who) in &squatters {
        assert_eq!(
            squatter.stolen(),
            Vec::<String>::new(),
            "the {who} received nothing"
        );
    }
    drop(squatters);
    wait_reclaimed(w.agent());
    wait_ready(w);
    for proxy in proxies {
        assert_served(&victim(w, *proxy));
    }
    assert_eq!(
        w.http.seen().len(),
        seen,
        "the upstream saw only the served requests"
    );
}

#[test]
fn an_ipv4_squatter_before_the_agent_starts_receives_nothing() {
    squat_before_start(PROXY_V4);
}

#[test]
fn an_ipv6_squatter_before_the_agent_starts_receives_nothing() {
    squat_before_start(PROXY_V6);
}

#[test]
fn with_the_agent_running_a_squatter_cannot_take_the_port() {
    let w = World::new(EGRESS, PROBE);
    for proxy in [PROXY_V4, PROXY_V6] {
        for hold in [Hold::Listen, Hold::BindReuseAddr, Hold::Bind] {
            match Squatter::start(SQUATTER, &w.sb, proxy, hold) {
                Err(line) => assert!(
                    line.starts_with(&format!("error {} ", libc::EADDRINUSE)),
                    "{line}"
                ),
                Ok(s) => panic!(
                    "a squatter bound {proxy} beside the agent (it got {:?})",
                    s.stolen()
                ),
            }
        }
        assert_served(&victim(&w, proxy));
    }
}

#[test]
fn while_the_agent_is_down_a_squatter_receives_nothing_and_the_events_say_why() {
    let mut w = World::new(EGRESS, PROBE);
    assert_served(&victim(&w, PROXY_V4));
    let agent = w.agent.take().expect("agent");
    agent.signal(libc::SIGKILL);
    let _ = agent.wait();

    // Down, nobody on the port: refused, never sent anywhere (`proxy-absent`).
    assert_refused(&victim(&w, PROXY_V4));
    assert_refused(&victim(&w, PROXY_V6));
    // Down, a squatter on each family: refused (`proxy-foreign`), the squatters get nothing.
    let s4 = Squatter::start(SQUATTER, &w.sb, PROXY_V4, Hold::Listen).expect("squatting 127.0.0.1");
    let s6 = Squatter::start(SQUATTER, &w.sb, PROXY_V6, Hold::Listen).expect("squatting [::1]");
    for _ in 0..3 {
        assert_refused(&victim(&w, PROXY_V4));
        assert_refused(&victim(&w, PROXY_V6));
    }
    // An agent started now cannot listen; it enforces, says it is not ready, and reads the
    // events the kernel kept while it was down.
    w.start_agent();
    let agent = w.agent();
    assert!(agent.log().contains("not ready"), "{}", agent.log());
    agent.wait_for_log("reason=proxy-absent", Duration::from_secs(5));
    agent.wait_for_log("reason=proxy-foreign", Duration::from_secs(5));
    assert_refused(&victim(&w, PROXY_V4));
    let out = status(&w);
    assert!(out.contains("NOT listening on 127.0.0.1:15001"), "{out}");
    assert!(out.contains("NOT listening on [::1]:15001"), "{out}");
    // (proxy) counts the refusals as denials: 2 while down without a squatter, 6 with them,
    // 1 now.
    let json = w.sb.status_json(EGRESS);
    let proxy_row = egress_tests::status_row(&json, "(proxy)");
    assert_eq!(proxy_row["denied"], 9, "{proxy_row}");

    squatters_go(
        &w,
        vec![(s4, "IPv4 squatter"), (s6, "IPv6 squatter")],
        &[PROXY_V4, PROXY_V6],
        3,
    );
}

#[test]
fn a_bound_socket_that_does_not_listen_does_not_stop_the_agent() {
    // Without SO_REUSEADDR it keeps the agent from binding: the agent starts anyway, not
    // ready, and nothing listens at the redirect target (`proxy-absent`).
    let mut w = World::without_agent(EGRESS, PROBE);
    let squatter =
        Squatter::start(SQUATTER, &w.sb, PROXY_V4, Hold::Bind).expect("binding 127.0.0.1");
    w.start_agent();
    let agent = w.agent();
    assert!(agent.log().contains("not ready"), "{}", agent.log());
    assert_refused(&victim(&w, PROXY_V4));
    agent.wait_for_log("reason=proxy-absent", Duration::from_secs(5));
    assert_served(&victim(&w, PROXY_V6));
    drop(squatter);
    wait_reclaimed(agent);
    assert_served(&victim(&w, PROXY_V4));

    // With SO_REUSEADDR the agent binds beside it and listens; the squatter can no longer
    // listen there, and receives nothing.
    let mut w = World::without_agent(EGRESS, PROBE);
    let squatter =
        Squatter::start(SQUATTER, &w.sb, PROXY_V4, Hold::BindReuseAddr).expect("binding 127.0.0.1");
    w.start_agent();
    assert!(
        !w.agent().log().contains("not ready"),
        "{}",
        w.agent().log()
    );
    assert_served(&victim(&w, PROXY_V4));
    assert_eq!(squatter.stolen(), Vec::<String>::new());
    assert_eq!(w.http.seen().len(), 1);
}

#[test]
fn a_restart_with_time_wait_leftovers_on_the_proxy_port_is_ready_at_once() {
    let mut w = World::new(EGRESS, PROBE);
    // `Connection: close`: the proxy closes first, so each connection leaves a TIME-WAIT
    // socket on the proxy's side of the port.
    for _ in 0..5 {
        assert_served(&victim(&w, PROXY_V4));
        assert_served(&victim(&w, PROXY_V6));
    }
    let agent = w.agent.take().expect("agent");
    agent.signal(libc::SIGKILL);
    let _ = agent.wait();
    // TIME-WAIT (state 06) sockets whose local port is 15001 (3A99), as the namespace's
    // /proc/net/tcp{,6} list them (no `ss` in the kernel matrix's guests).
    let tables = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", w.sb.name))
        .args(["cat", "/proc/net/tcp", "/proc/net/tcp6"])
        .output()
        .expect("reading /proc/net/tcp in the sandbox");
    let left = String::from_utf8_lossy(&tables.stdout)
        .lines()
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.get(1).is_some_and(|local| local.ends_with(":3A99"))
                && fields.get(3) == Some(&"06")
        })
        .count();
    assert!(
        left > 0,
        "the test needs TIME-WAIT sockets on :15001 to mean anything"
    );
    let started = std::time::Instant::now();
    w.start_agent();
    let agent = w.agent();
    assert!(
        !agent.log().contains("not ready"),
        "{left} TIME-WAIT sockets kept the agent from listening: {}",
        agent.log()
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_served(&victim(&w, PROXY_V4));
    assert_served(&victim(&w, PROXY_V6));
}

#[test]
fn in_another_network_namespace_only_the_agents_own_listener_there_would_do() {
    // The agent listens (marked) in the node's namespace. A workload of the managed cgroup in
    // a pod's namespace, where the agent has no listener, is refused (`proxy-absent`): the
    // check looks in the caller's own namespace, as the redirect does. A squatter on the
    // pod's own loopback gets nothing either (`proxy-foreign`), though the node's listener is
    // marked: a mark vouches for one socket, not for an address.
    let w = World::new(EGRESS, PROBE);
    let pod = PodNet::new(&w.sb);
    let from_pod = || {
        let (stdout, _) = output_text(
            workload_command(PROBE, Some(&w.sb.cgroup), pod.pod_netns())
                .arg("--http")
                .arg("GET / HTTP/1.1\\r\\nHost: httpbin.test\\r\\nConnection: close\\r\\n\\r\\n")
                .arg(sa(V4_A, 80).to_string()),
            "the probe",
        );
        egress_tests::world::Response::parse(&stdout)
    };
    assert_refused(&from_pod());
    w.agent()
        .wait_for_log("reason=proxy-absent", Duration::from_secs(5));
    let squatter = Squatter::start_in(
        SQUATTER,
        &w.sb.cgroup,
        pod.pod_netns(),
        PROXY_V4,
        Hold::Listen,
    )
    .expect("squatting the pod's loopback");
    assert_refused(&from_pod());
    w.agent()
        .wait_for_log("reason=proxy-foreign", Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(squatter.stolen(), Vec::<String>::new());
    // The node's own workloads are served all along.
    assert_served(&victim(&w, PROXY_V4));
    assert_eq!(w.http.seen().len(), 1);
}
