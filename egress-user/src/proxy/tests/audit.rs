//! Audit mode (issue 14): what the policy would refuse is passed on to where the app sent it
//! and reported as a would-deny; what a rule allows is served as in enforce mode. Proven at
//! the upstreams: which one saw the request, and with which Host.

use super::*;
use crate::policy::Mode;

fn audit(rules: Vec<HttpRule>, names: &[&str]) -> Policy {
    let mut p = policy(rules, names);
    p.mode = Mode::Audit;
    p
}

#[tokio::test]
async fn a_host_no_rule_names_reaches_the_apps_destination_with_its_own_host() {
    let dest = Upstream::start("127.0.0.1").await;
    // Enforce mode first: 403, and the destination sees nothing.
    let mut h = Harness::start(policy(vec![], &[])).await;
    let mut c = h.connect(dest.addr).await;
    assert_eq!(c.get("nobody.test", "/x").await.status, 403);
    assert!(!h.event().await.would_deny);
    assert_eq!(dest.requests(), 0);

    let mut h = Harness::start(audit(vec![], &[])).await;
    let mut c = h.connect(dest.addr).await;
    let r = c.get("nobody.test", "/audit-test?q=1").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(dest.requests(), 1, "the app's destination answered");
    let seen = dest.last();
    assert_eq!(seen.uri, "/audit-test?q=1");
    assert_eq!(seen.headers["host"], "nobody.test");
    // A second request on the kept-alive connection is passed on too.
    let r = c.get("nobody.test", "/again").await;
    assert_eq!(r.status, 200);
    assert_eq!(dest.requests(), 2);

    let ev = h.event().await;
    assert!(ev.would_deny, "{ev:?}");
    assert_eq!((ev.status, ev.rule.as_deref()), (200, None));
    assert_eq!(ev.upstream, Some(dest.addr));
    let reason = ev.reason.unwrap();
    assert!(
        reason.starts_with("audit mode passed it on; enforce would refuse it: host nobody.test"),
        "{reason}"
    );
    let _ = h.event().await;
    let none = h.proxy.counters().pop().unwrap();
    assert_eq!((none.requests, none.would_deny, none.denied), (2, 2, 0));
}

#[tokio::test]
async fn an_allowed_host_still_goes_where_its_rule_says() {
    let allowed = Upstream::start("127.0.0.1").await;
    let port = allowed.addr.port();
    let mut h = Harness::start(audit(
        vec![rule("web", "web.test", port, HttpProtocol::Http)],
        &["web.test"],
    ))
    .await;
    // The app's destination is an address nothing listens on: a rule's request is resolved
    // by name, as in enforce mode, not sent there.
    let mut c = h.connect(orig(port)).await;
    let r = c.get(&format!("web.test:{port}"), "/ok").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(allowed.requests(), 1);
    let ev = h.event().await;
    assert!(!ev.would_deny);
    assert_eq!(ev.rule.as_deref(), Some("web"));
    assert_eq!(h.proxy.counters()[0].would_deny, 0);
}

#[tokio::test]
async fn a_port_mismatch_is_passed_on_and_an_unreachable_destination_is_502_saying_both() {
    let dest = Upstream::start("127.0.0.1").await;
    let mut h = Harness::start(audit(vec![], &[])).await;
    let mut c = h.connect(dest.addr).await;
    let r = c.get("x.test:1", "/").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let ev = h.event().await;
    assert!(ev.would_deny);
    assert!(ev.reason.unwrap().contains("does not match port"));

    // Nothing listens at the app's destination: the app gets what the proxy got, 502.
    let mut c = h.connect(orig(80)).await;
    let r = c.get("nobody.test", "/").await;
    assert_eq!(r.status, 502, "{}", r.text());
    let ev = h.event().await;
    assert!(ev.would_deny);
    let reason = ev.reason.unwrap();
    assert!(
        reason.contains("enforce would refuse it: host nobody.test") && reason.contains("then "),
        "{reason}"
    );
}

#[tokio::test]
async fn ambiguous_framing_is_still_refused() {
    let dest = Upstream::start("127.0.0.1").await;
    let h = Harness::start(audit(vec![], &[])).await;
    let mut c = h.connect(dest.addr).await;
    let raw = "POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
    assert_eq!(c.exchange(raw).await.status, 400);
    assert_eq!(dest.requests(), 0);
}

#[tokio::test]
async fn bytes_that_are_not_http_are_relayed_both_ways() {
    // An echo server where the app connected: another protocol on an HTTP port.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dest = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).await.unwrap();
        s.write_all(&buf[..n]).await.unwrap();
    });
    let mut h = Harness::start(audit(vec![], &[])).await;
    let c = h.connect(dest).await;
    let mut tcp = c.io.into_inner();
    tcp.write_all(b"ssh-2.0-test\r\n").await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut back))
        .await
        .expect("the echo in time")
        .unwrap();
    assert_eq!(back, b"ssh-2.0-test\r\n");
    drop(tcp);
    let ev = h.event().await;
    assert!(ev.would_deny);
    assert_eq!((ev.bytes_in, ev.bytes_out), (14, 14));
    assert!(
        ev.reason.unwrap().contains("does not speak http"),
        "the event says what it was"
    );
    assert_eq!(h.proxy.counters().pop().unwrap().would_deny, 1);
}
