//! Issue 14, item 2: audit mode audits HTTP ports too. A connection to an HTTP egress port
//! that no rule allows goes to the agent's proxy, which passes what it would refuse on to
//! where the app sent it and reports a would-deny; when the agent's proxy is not there (the
//! agent down, or a squatter on its port), the kernel lets the connection go where the app
//! sent it, unchanged, with a would-deny event saying why. Counted at the sinks: the upstream
//! the app addressed saw the request, a squatter saw nothing.

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use egress_tests::{
    V4_A, egress_bin, probe_bin, sa,
    squatter::{Hold, Squatter},
    squatter_bin, status_row,
    world::{self, Response, World},
};

const EGRESS: &str = egress_bin!();
const PROBE: &str = probe_bin!();
const SQUATTER: &str = squatter_bin!();

const METRICS: u16 = 9464;

const PROXY_V4: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 15001);

/// The HTTP tests' world with its policy in audit mode, agent running.
fn audit_world() -> World {
    let mut w = World::without_agent(EGRESS, PROBE);
    let enforcing = world::policy();
    let policy = enforcing.replacen("spec:\n", "spec:\n  mode: audit\n", 1);
    assert_ne!(
        policy, enforcing,
        "the world's policy starts with its EgressConfig"
    );
    std::fs::write(w.dir.join("policy.yaml"), policy).expect("audit policy");
    w.start_agent_with(&["--metrics-addr", &format!("127.0.0.1:{METRICS}")], None);
    w
}

#[test]
fn a_request_no_rule_allows_reaches_the_address_the_app_chose_and_is_reported() {
    let w = audit_world();
    // 192.0.2.1 is httpbin.test's address, but no rule names `nobody.test`: enforce mode
    // answers 403 (tests/tests/http.rs); audit mode passes it on.
    let r = w.get(sa(V4_A, 80), "nobody.test", "/audit-test");
    assert_eq!(r.code(), 200, "{}", r.raw);
    let seen = w.http.seen();
    assert_eq!(seen.len(), 1, "the upstream saw the request: {seen:?}");
    assert_eq!(
        (seen[0].host.as_str(), seen[0].path.as_str()),
        ("nobody.test", "/audit-test")
    );
    // An allowed request is served as in enforce mode.
    let r = w.get(sa(V4_A, 80), "httpbin.test", "/allowed");
    assert_eq!(r.code(), 200, "{}", r.raw);
    assert_eq!(w.http.seen().len(), 2);

    let events = w.sb.events_json(EGRESS);
    let would: Vec<_> = events
        .iter()
        .filter(|e| e["source"] == "http" && e["verdict"] == "would-deny")
        .collect();
    assert_eq!(would.len(), 1, "one would-deny http event: {events:#?}");
    assert_eq!(would[0]["host"], "nobody.test");
    assert_eq!(would[0]["status"], 200);
    assert!(
        would[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("enforce would refuse it: host nobody.test")),
        "{}",
        would[0]
    );
    assert_eq!(w.metric(METRICS, "egress_proxy_would_deny_total"), 1.0);
    let (_, text, _) = w.sb.ctl(EGRESS, &["status"]);
    assert!(
        text.contains("1 passed on by audit mode (would refuse)"),
        "{text}"
    );
}

#[test]
fn with_the_proxy_absent_or_squatted_connections_go_where_the_app_sent_them() {
    let mut w = audit_world();
    let agent = w.agent.take().expect("agent");
    agent.signal(libc::SIGKILL);
    let _ = agent.wait();

    let request = "GET /direct HTTP/1.1\\r\\nHost: httpbin.test\\r\\nConnection: close\\r\\n\\r\\n";
    // Down, nobody on the port: not redirected, not refused: straight to the upstream.
    let r = Response::parse(&w.sb.http(PROBE, request, &[sa(V4_A, 80)]));
    assert_eq!(r.code(), 200, "{}", r.raw);
    // Down, a squatter on the proxy's port: it gets nothing, the upstream gets the request.
    let squatter =
        Squatter::start(SQUATTER, &w.sb, PROXY_V4, Hold::Listen).expect("squatting 127.0.0.1");
    let r = Response::parse(&w.sb.http(PROBE, request, &[sa(V4_A, 80)]));
    assert_eq!(r.code(), 200, "{}", r.raw);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        squatter.stolen(),
        Vec::<String>::new(),
        "the squatter got nothing"
    );
    let seen = w.http.seen();
    assert_eq!(seen.len(), 2, "the upstream saw both: {seen:?}");
    assert!(seen.iter().all(|s| s.path == "/direct"), "{seen:?}");

    // The restarted agent reads what the kernel kept: two would-denies on (proxy), with why.
    w.start_agent();
    let agent = w.agent();
    agent.wait_for_log("reason=proxy-absent", Duration::from_secs(5));
    agent.wait_for_log("reason=proxy-foreign", Duration::from_secs(5));
    let status = w.sb.status_json(EGRESS);
    let proxy = status_row(&status, "(proxy)");
    assert_eq!(
        (proxy["would_deny"].as_u64(), proxy["denied"].as_u64()),
        (Some(2), Some(0)),
        "{proxy}"
    );
    drop(squatter);
}
