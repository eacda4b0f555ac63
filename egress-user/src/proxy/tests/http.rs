//! Plain HTTP: authority checks on every request, framing, hop-by-hop fields, pooling,
//! upgrades, events and counters.

use std::sync::atomic::Ordering;

use hyper::{Request, Response, StatusCode};

use super::*;
use crate::policy::{Alias, HttpProtocol::Http};

#[tokio::test]
async fn allowed_host_reaches_the_upstream_and_a_forbidden_one_does_not() {
    let (up, port, mut h) = httpbin().await;

    let mut c = h.connect(orig(port)).await;
    c.get(&format!("httpbin.test:{port}"), "/headers")
        .await
        .assert_echoed(&format!("httpbin.test:{port}"), "/headers");
    assert_eq!(up.requests(), 1);

    let mut c = h.connect(orig(port)).await;
    let r = c.get(&format!("evil.test:{port}"), "/").await;
    r.assert_is(
        403,
        "egress: host evil.test is not allowed: no http rule or alias names it\n",
    );
    assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));
    assert_eq!(up.requests(), 1, "the upstream saw the forbidden request");

    let ok = h.event().await;
    assert_eq!(
        (ok.rule.as_deref(), ok.status, ok.host.as_str()),
        (Some("web"), 200, "httpbin.test")
    );
    let denied = h.event().await;
    assert_eq!(
        (denied.rule, denied.status, denied.host.as_str()),
        (None, 403, "evil.test")
    );
}

#[tokio::test]
async fn every_request_on_a_kept_alive_connection_is_checked() {
    let (up, port, h) = httpbin().await;
    let mut c = h.connect(orig(port)).await;
    // Three pipelined requests in one write; the second is for another host.
    c.send(&format!(
        "GET /1 HTTP/1.1\r\nHost: httpbin.test\r\n\r\n\
         GET /2 HTTP/1.1\r\nHost: evil.test\r\n\r\n\
         GET /3 HTTP/1.1\r\nHost: httpbin.test:{port}\r\n\r\n"
    ))
    .await;
    let statuses = [c.response().await, c.response().await, c.response().await].map(|r| r.status);
    assert_eq!(statuses, [200, 403, 200]);
    let paths: Vec<_> = up
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|s| s.uri.clone())
        .collect();
    assert_eq!(paths, ["/1", "/3"]);
    // And one more on the same connection afterwards.
    assert_eq!(c.get("evil.test", "/4").await.status, 403);
    assert_eq!(c.get("httpbin.test", "/5").await.status, 200);
    assert_eq!(up.requests(), 3);
}

#[tokio::test]
async fn wildcards_cover_subdomains_only() {
    let up = Upstream::start("127.0.0.1").await;
    let port = up.addr.port();
    let names = [
        "a.example.test",
        "a.b.example.test",
        "example.test",
        "aexample.test",
    ];
    let h = Harness::start(policy(
        vec![rule("wild", "*.example.test", port, Http)],
        &names,
    ))
    .await;
    let mut c = h.connect(orig(port)).await;
    assert_eq!(c.get("a.example.test", "/").await.status, 200);
    assert_eq!(c.get("a.b.example.test", "/").await.status, 200);
    assert_eq!(c.get("example.test", "/").await.status, 403);
    assert_eq!(c.get("aexample.test", "/").await.status, 403);
    assert_eq!(up.requests(), 2);
}

#[tokio::test]
async fn case_and_a_trailing_dot_do_not_matter() {
    let (up, port, h) = httpbin().await;
    let mut c = h.connect(orig(port)).await;
    assert_eq!(
        c.get(&format!("HTTPBIN.Test.:{port}"), "/").await.status,
        200
    );
    assert_eq!(c.get("Httpbin.test.", "/").await.status, 200);
    // The upstream gets the Host the app sent.
    assert_eq!(up.last().headers["host"], "Httpbin.test.");
}

#[tokio::test]
async fn absolute_form_wins_over_host() {
    let (up, port, h) = httpbin().await;
    let mut c = h.connect(orig(port)).await;
    let r = c
        .exchange(&format!(
            "GET http://httpbin.test:{port}/abs?q=1 HTTP/1.1\r\nHost: evil.test\r\n\r\n"
        ))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = up.last();
    assert_eq!(seen.uri, "/abs?q=1");
    assert_eq!(
        seen.headers["host"],
        format!("httpbin.test:{port}").as_str()
    );

    c.send(&format!(
        "GET http://evil.test/ HTTP/1.1\r\nHost: httpbin.test:{port}\r\n\r\n"
    ))
    .await;
    c.response()
        .await
        .assert_says(403, "host evil.test is not allowed");
    assert_eq!(up.requests(), 1);
}

#[tokio::test]
async fn the_port_must_be_the_one_the_app_connected_to() {
    let (up, port, h) = httpbin().await;
    // An explicit other port in Host.
    let mut c = h.connect(orig(port)).await;
    c.get("httpbin.test:81", "/").await.assert_is(
        400,
        &format!(
            "egress: port 81 in the request does not match port {port} the app connected to\n"
        ),
    );
    // A connection to a port the rule does not name.
    let other = if port == 65535 { 65534 } else { port + 1 };
    let mut c = h.connect(orig(other)).await;
    c.get("httpbin.test", "/").await.assert_is(
        403,
        &format!(
            "egress: host httpbin.test is not allowed on port {other} (its rules allow port {port})\n"
        ),
    );
    assert_eq!(up.requests(), 0);
}

#[tokio::test]
async fn connect_and_unredirected_connections_are_refused() {
    let (up, port, mut h) = httpbin().await;

    let mut c = h.connect(orig(port)).await;
    let r = c
        .exchange(&format!(
            "CONNECT httpbin.test:{port} HTTP/1.1\r\nHost: httpbin.test:{port}\r\n\r\n"
        ))
        .await;
    assert_eq!(r.status, 405);
    assert!(r.text().contains("connect is refused"), "{}", r.text());
    assert!(c.closed().await);

    let mut c = h.connect_unredirected().await;
    let r = c.get("httpbin.test", "/").await;
    assert_eq!(r.status, 400);
    assert!(
        r.text().starts_with("egress: not a redirected connection"),
        "{}",
        r.text()
    );
    assert_eq!(r.header("connection"), Some("close"));
    assert!(c.closed().await);
    assert_eq!(up.conns.load(Ordering::SeqCst), 0);
    // The events name the host even for requests refused before the policy was consulted.
    for _ in 0..2 {
        let ev = h.event().await;
        assert_eq!(
            (ev.host.as_str(), ev.rule.as_deref()),
            ("httpbin.test", None)
        );
        assert!(matches!(ev.status, 400 | 405), "{ev:?}");
    }
}

#[tokio::test]
async fn ambiguous_framing_is_refused() {
    let (up, port, h) = httpbin().await;
    let cases = [
        (
            "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
            "content-length with transfer-encoding",
        ),
        (
            "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
            "content-length with transfer-encoding",
        ),
        (
            "Content-Length: 5\r\nContent-Length: 5\r\n",
            "more than one content-length",
        ),
    ];
    for (framing, why) in cases {
        let mut c = h.connect(orig(port)).await;
        let r = c
            .exchange(&format!(
                "POST / HTTP/1.1\r\nHost: httpbin.test\r\n{framing}\r\n0\r\n\r\n"
            ))
            .await;
        assert_eq!(r.status, 400, "{framing:?}");
        assert_eq!(
            r.text(),
            format!("egress: ambiguous message framing: {why}\n")
        );
        assert!(c.closed().await, "{framing:?}: connection left open");
    }
    // Different lengths: hyper refuses those itself.
    let mut c = h.connect(orig(port)).await;
    let raw =
        "POST / HTTP/1.1\r\nHost: httpbin.test\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab";
    assert_eq!(c.exchange(raw).await.status, 400);
    assert_eq!(up.requests(), 0);
}

#[tokio::test]
async fn hop_by_hop_fields_stay_on_their_hop() {
    let up = Upstream::with(
        "127.0.0.1:0",
        None,
        handler(|_req| async {
            let mut r = Response::new(full("ok"));
            r.headers_mut()
                .insert("connection", "x-resp".parse().unwrap());
            r.headers_mut().insert("x-resp", "1".parse().unwrap());
            r.headers_mut().insert("x-end", "2".parse().unwrap());
            r
        }),
    )
    .await;
    let port = up.addr.port();
    let h = Harness::one_rule("web", "httpbin.test", port).await;
    let mut c = h.connect(orig(port)).await;
    let raw = "GET / HTTP/1.1\r\nHost: httpbin.test\r\nConnection: x-foo, keep-alive\r\nX-Foo: 1\r\n\
         X-Keep: 2\r\nKeep-Alive: timeout=5\r\nProxy-Authorization: Basic eDp5\r\nTE: trailers\r\n\r\n";
    let r = c.exchange(raw).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-resp"), None);
    assert_eq!(r.header("x-end"), Some("2"));
    let seen = up.last();
    for gone in ["connection", "x-foo", "keep-alive", "proxy-authorization"] {
        assert!(!seen.headers.contains_key(gone), "upstream saw {gone}");
    }
    assert_eq!(seen.headers["x-keep"], "2");
    assert_eq!(seen.headers["te"], "trailers");
}

#[tokio::test]
async fn upstream_connections_are_pooled() {
    let (up, port, h) = httpbin().await;
    for i in 0..5 {
        let mut c = h.connect(orig(port)).await;
        assert_eq!(c.get("httpbin.test", &format!("/{i}")).await.status, 200);
    }
    assert_eq!(up.requests(), 5);
    assert_eq!(
        up.conns.load(Ordering::SeqCst),
        1,
        "one pooled upstream connection"
    );
}

#[tokio::test]
async fn an_alias_sends_its_names_to_the_external_name() {
    let up = Upstream::start("127.0.0.1").await;
    let port = up.addr.port();
    let mut p = policy(vec![], &["httpbin.test"]);
    p.aliases.push(Alias {
        scope: None,
        name: "httpbin".into(),
        namespace: "default".into(),
        origin: origin(),
        external_name: "httpbin.test".into(),
        ports: vec![port],
    });
    let mut h = Harness::start(p).await;
    let mut c = h.connect(orig(port)).await;
    for host in [
        "httpbin",
        "httpbin.default",
        "httpbin.default.svc",
        "HTTPBIN.default.svc.cluster.local.",
    ] {
        c.get(host, "/get")
            .await
            .assert_echoed(&format!("httpbin.test:{port}"), "/get");
        assert_eq!(h.event().await.rule.as_deref(), Some("httpbin"));
    }
    assert_eq!(c.get("httpbin.other", "/").await.status, 403);
    assert_eq!(up.requests(), 4);
    let stats = h.proxy.counters();
    assert_eq!(
        (
            stats[0].rule.as_deref(),
            stats[0].alias,
            stats[0].status_2xx
        ),
        (Some("httpbin"), true, 4)
    );
}

/// An upstream that upgrades to an echo of raw bytes.
async fn ws_echo(mut req: Request<Incoming>) -> Response<TestBody> {
    if req.headers().get("upgrade").is_none() {
        return Response::new(full("not an upgrade"));
    }
    let on = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let mut io = TokioIo::new(on.await.unwrap());
        let mut buf = [0u8; 64];
        while let Ok(n @ 1..) = io.read(&mut buf).await {
            io.write_all(&buf[..n]).await.unwrap();
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("upgrade", "websocket")
        .header("connection", "upgrade")
        .header("sec-websocket-accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
        .body(full(""))
        .unwrap()
}

#[tokio::test]
async fn websocket_upgrades_only_to_an_allowed_authority() {
    let up = Upstream::with("127.0.0.1:0", None, handler(ws_echo)).await;
    let port = up.addr.port();
    let mut h = Harness::one_rule("ws", "ws.test", port).await;
    let upgrade = |host: &str| {
        format!(
            "GET /chat HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
    };
    let mut c = h.connect(orig(port)).await;
    let r = c.exchange(&upgrade("evil.test")).await;
    assert_eq!(r.status, 403);
    assert_eq!(up.conns.load(Ordering::SeqCst), 0);
    assert_eq!(h.event().await.status, 403);

    let mut c = h.connect(orig(port)).await;
    c.send(&upgrade("ws.test")).await;
    let (status, headers) = c.head().await;
    assert_eq!(status, 101);
    assert!(
        headers.contains(&("upgrade".into(), "websocket".into())),
        "{headers:?}"
    );
    assert!(
        headers
            .iter()
            .any(|(k, v)| k == "sec-websocket-accept" && v == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
    );
    let seen = up.last();
    assert_eq!(seen.headers["upgrade"], "websocket");
    assert_eq!(
        seen.headers["sec-websocket-key"],
        "dGhlIHNhbXBsZSBub25jZQ=="
    );
    c.send("hello through the tunnel").await;
    let mut back = [0u8; 24];
    c.read_in_time(&mut back).await;
    assert_eq!(&back, b"hello through the tunnel");
    // After the 101 the bytes are not HTTP to the proxy, and not checked: a request for another
    // host goes to the same upstream connection as any other bytes (here, echoed back), never
    // to another server and never as a request of its own.
    let smuggled = "GET / HTTP/1.1\r\nHost: evil.test\r\n\r\n";
    c.send(smuggled).await;
    let mut back = vec![0u8; smuggled.len()];
    c.read_in_time(&mut back).await;
    assert_eq!(back, smuggled.as_bytes());
    assert_eq!((up.requests(), up.conns.load(Ordering::SeqCst)), (1, 1));
    drop(c);
    let ev = h.event().await;
    assert_eq!(
        (ev.status, ev.rule.as_deref(), ev.bytes_in, ev.bytes_out),
        (
            101,
            Some("ws"),
            24 + smuggled.len() as u64,
            24 + smuggled.len() as u64
        )
    );

    // Only WebSocket: an h2c tunnel could carry requests for other hosts. The request goes on
    // as a plain one, and the connection closes after it.
    let mut c = h.connect(orig(port)).await;
    let raw = "GET / HTTP/1.1\r\nHost: ws.test\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\n\
         HTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n";
    let r = c.exchange(raw).await;
    assert_eq!((r.status, r.text().as_str()), (200, "not an upgrade"));
    assert!(!up.last().headers.contains_key("upgrade"));
    assert!(c.closed().await);
    let ev = h.event().await;
    assert_eq!((ev.status, ev.rule.as_deref()), (200, Some("ws")));
}

#[tokio::test]
async fn events_and_counters_describe_each_request() {
    let up = Upstream::start("127.0.0.1").await;
    let port = up.addr.port();
    let mut h = Harness::start(policy(
        vec![
            rule("web", "httpbin.test", port, Http),
            rule("unused", "other.test", port, Http),
        ],
        &["httpbin.test"],
    ))
    .await;
    let mut c = h.connect(orig(port)).await;
    let client = c.io.get_ref().local_addr().unwrap();
    let raw = "POST /post?x=1 HTTP/1.1\r\nHost: httpbin.test\r\nContent-Length: 5\r\n\r\nhello";
    let r = c.exchange(raw).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        (up.last().method.as_str(), r.text().as_str()),
        ("POST", "host=httpbin.test path=/post body=5")
    );
    assert_eq!(c.get("nope.test", "/x").await.status, 403);

    let ev = h.event().await;
    assert_eq!(ev.rule.as_deref(), Some("web"));
    assert_eq!(
        (ev.host.as_str(), ev.method.as_str(), ev.path.as_str()),
        ("httpbin.test", "POST", "/post?x=1")
    );
    assert_eq!(
        (ev.status, ev.bytes_in, ev.bytes_out),
        (200, 5, r.body.len() as u64)
    );
    assert_eq!(
        (ev.client, ev.orig_dst, ev.upstream),
        (client, Some(orig(port)), Some(up.addr))
    );
    assert_eq!(ev.reason, None);
    let ev = h.event().await;
    assert_eq!((ev.rule, ev.status, ev.upstream), (None, 403, None));
    assert!(ev.reason.unwrap().contains("nope.test"));

    let stats = h.proxy.counters();
    assert_eq!(stats.len(), 3);
    let web = &stats[0];
    assert_eq!(
        (web.requests, web.status_2xx, web.bytes_in, web.bytes_out),
        (1, 1, 5, r.body.len() as u64)
    );
    assert_eq!(stats[1].requests, 0);
    let none = &stats[2];
    assert_eq!(
        (
            none.rule.as_deref(),
            none.requests,
            none.status_4xx,
            none.denied
        ),
        (None, 1, 1, 1)
    );
    assert_eq!(h.proxy.events_dropped(), 0);
}

#[tokio::test]
async fn a_reload_applies_to_the_next_request_on_every_connection() {
    let up = Upstream::start("127.0.0.1").await;
    let port = up.addr.port();
    let build = |p: Policy| {
        let b = Proxy::builder(&p).resolver(Arc::new(MapResolver::default()));
        Arc::new(b.without_system_roots().build().unwrap())
    };
    let allowing = build(policy(
        vec![rule("web", "httpbin.test", port, Http)],
        &["httpbin.test"],
    ));
    let denying = build(policy(vec![], &["httpbin.test"]));
    let (reload, proxies) = tokio::sync::watch::channel(allowing.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let lookup = move |_| Some(orig(port));
    let (tx, _events) = mpsc::channel(16);
    tokio::spawn(Proxy::serve_reloadable(
        proxies,
        listener,
        (Arc::new(lookup), None),
        tx,
        Arc::new(crate::proxy::Admission::new(
            crate::proxy::Limits::UNLIMITED,
        )),
    ));

    // A kept-alive connection opened under the allowing policy...
    let mut kept = Client::new(TcpStream::connect(addr).await.unwrap());
    assert_eq!(kept.get("httpbin.test", "/").await.status, 200);
    // ...is judged by the new one from its next request: a removed host is gone at once.
    reload.send(denying.clone()).unwrap();
    assert_eq!(kept.get("httpbin.test", "/").await.status, 403);
    let mut fresh = Client::new(TcpStream::connect(addr).await.unwrap());
    assert_eq!(fresh.get("httpbin.test", "/").await.status, 403);
    // And back: the same kept-alive connection gets through again.
    reload.send(allowing.clone()).unwrap();
    assert_eq!(kept.get("httpbin.test", "/").await.status, 200);
    assert_eq!(
        up.requests(),
        2,
        "the upstream saw only the allowed requests"
    );
    assert_eq!(allowing.counters()[0].status_2xx, 2);
    assert_eq!(denying.counters().last().unwrap().denied, 2);
}

/// Counts the upstream sockets it makes (in the test's own namespace).
#[derive(Default)]
struct CountingSockets(std::sync::atomic::AtomicUsize);

impl crate::proxy::Sockets for CountingSockets {
    fn tcp(&self, v6: bool) -> crate::proxy::BoxFuture<std::io::Result<tokio::net::TcpSocket>> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Box::pin(async move {
            if v6 {
                tokio::net::TcpSocket::new_v6()
            } else {
                tokio::net::TcpSocket::new_v4()
            }
        })
    }
}

#[tokio::test]
async fn a_pods_requests_go_out_from_its_own_sockets_in_a_pool_of_its_own() {
    let up = Upstream::start("127.0.0.1").await;
    let port = up.addr.port();
    let p = policy(
        vec![rule("web", "httpbin.test", port, Http)],
        &["httpbin.test"],
    );
    let proxy = Proxy::builder(&p).resolver(Arc::new(MapResolver::default()));
    let proxy = Arc::new(proxy.without_system_roots().build().unwrap());
    let (_reload, proxies) = tokio::sync::watch::channel(proxy.clone());
    let admission = Arc::new(crate::proxy::Admission::new(
        crate::proxy::Limits::UNLIMITED,
    ));
    let (tx, _events) = mpsc::channel(16);
    // Two pods' listeners, each with its namespace's sockets.
    let mut pods = Vec::new();
    for netns in [11, 12] {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let sockets = Arc::new(CountingSockets::default());
        let origin = Arc::new(crate::proxy::Origin {
            netns,
            sockets: sockets.clone(),
            namespace: None,
            pod: None,
        });
        let lookup = move |_| Some(orig(port));
        pods.push((listener.local_addr().unwrap(), sockets));
        tokio::spawn(Proxy::serve_reloadable(
            proxies.clone(),
            listener,
            (Arc::new(lookup), Some(origin)),
            tx.clone(),
            admission.clone(),
        ));
    }
    for (addr, _) in &pods {
        for _ in 0..2 {
            let mut c = Client::new(TcpStream::connect(addr).await.unwrap());
            assert_eq!(c.get("httpbin.test", "/").await.status, 200);
        }
    }
    assert_eq!(up.requests(), 4);
    // Each pod's upstream connection came from its own sockets and was reused by its own
    // second request only: one socket each, never the other pod's pooled connection.
    for (_, sockets) in &pods {
        assert_eq!(sockets.0.load(std::sync::atomic::Ordering::SeqCst), 1);
    }
    // A pod that went takes its pool with it: its next request makes a new connection.
    proxy.forget_netns(11);
    let mut c = Client::new(TcpStream::connect(pods[0].0).await.unwrap());
    assert_eq!(c.get("httpbin.test", "/").await.status, 200);
    assert_eq!(pods[0].1.0.load(std::sync::atomic::Ordering::SeqCst), 2);
}
