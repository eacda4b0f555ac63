//! The idle limit (a steady slow upload outlasting it goes through, a stall in either
//! direction is cut after it, blamed on the side that stalled) and the app's own body errors
//! (a malformed chunked body is the app's 400, not the upstream's 502).

use std::sync::atomic::Ordering;
use std::time::Instant;

use tokio::sync::oneshot;

use super::stream::{CHUNK_LEN, generator};
use super::*;
use crate::policy::HttpProtocol::Http;
use crate::proxy::Timeouts;

/// Short limits, so that the tests take a second or two.
const CONNECT: Duration = Duration::from_millis(200);
const IDLE: Duration = Duration::from_millis(400);

/// A proxy with the short limits, allowing `host` to `up`.
async fn proxy_for(host: &str, up: &Upstream) -> Harness {
    let p = policy(vec![rule("up", host, up.addr.port(), Http)], &[host]);
    let t = Timeouts {
        connect: CONNECT,
        idle: IDLE,
        ..Timeouts::default()
    };
    Harness::build(
        Proxy::builder(&p)
            .resolver(Arc::new(MapResolver::default()))
            .timeouts(t),
    )
    .await
}

#[tokio::test]
async fn a_slow_steady_upload_longer_than_the_idle_limit_reaches_the_upstream_whole() {
    let up = Upstream::start("127.0.0.1").await;
    let mut h = proxy_for("up.test", &up).await;
    let mut c = h.connect(orig(up.addr.port())).await;
    // 40 pieces of 1 KiB, one every 50 ms: 2 s in all, five times the idle limit (and more
    // than connect + idle), never idle for more than an eighth of it.
    let (pieces, piece) = (40, 1024);
    c.send(&format!(
        "POST /upload HTTP/1.1\r\nHost: up.test\r\nContent-Length: {}\r\n\r\n",
        pieces * piece
    ))
    .await;
    let start = Instant::now();
    for _ in 0..pieces {
        tokio::time::sleep(Duration::from_millis(50)).await;
        c.io.get_mut().write_all(&vec![b'u'; piece]).await.unwrap();
    }
    let r = c.response().await;
    assert!(start.elapsed() > CONNECT + IDLE * 3);
    // The upstream's echo counts the body bytes it read: all of them, in one request.
    assert_eq!(
        (r.status, r.text()),
        (
            200,
            format!("host=up.test path=/upload body={}", pieces * piece)
        )
    );
    assert_eq!(up.requests(), 1);
    let ev = h.event().await;
    assert_eq!((ev.status, ev.bytes_in), (200, (pieces * piece) as u64));
}

#[tokio::test]
async fn an_upload_the_app_stops_sending_is_408_after_the_idle_limit() {
    let up = Upstream::start("127.0.0.1").await;
    let mut h = proxy_for("up.test", &up).await;
    let mut c = h.connect(orig(up.addr.port())).await;
    let start = Instant::now();
    let raw = "POST /upload HTTP/1.1\r\nHost: up.test\r\nContent-Length: 1000\r\n\r\nten bytes!";
    let r = c.exchange(raw).await;
    let took = start.elapsed();
    assert_eq!(
        (r.status, r.text()),
        (
            408,
            "egress: the request body stalled: no bytes from the app for 400ms\n".to_owned()
        )
    );
    assert!(took >= IDLE, "{took:?}");
    assert!(took < CONNECT + IDLE + Duration::from_secs(2), "{took:?}");
    assert!(
        c.closed().await,
        "the rest of the body would be read as a request"
    );
    let ev = h.event().await;
    assert_eq!((ev.status, ev.bytes_in), (408, 10));
}

#[tokio::test]
async fn an_upstream_that_stops_reading_an_upload_is_504_after_the_idle_limit() {
    // Accepts, never reads: once the socket buffers are full, nothing moves.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let seen = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            seen.fetch_add(1, Ordering::SeqCst);
            held.push(s);
        }
    });
    let up = Upstream {
        addr,
        conns: Arc::default(),
        seen: Arc::default(),
        sni: Arc::default(),
    };
    let mut h = proxy_for("sink.test", &up).await;
    let c = h.connect(orig(addr.port())).await;
    let (mut read, mut write) = c.io.into_inner().into_split();
    let size = 64 * 1024 * 1024;
    let writer = tokio::spawn(async move {
        let head =
            format!("POST /upload HTTP/1.1\r\nHost: sink.test\r\nContent-Length: {size}\r\n\r\n");
        write.write_all(head.as_bytes()).await?;
        let piece = vec![b'u'; CHUNK_LEN];
        for _ in 0..size / CHUNK_LEN {
            write.write_all(&piece).await?;
        }
        Ok::<_, io::Error>(())
    });
    // The answer comes while the app is still writing; read it, not to the end of the stream.
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    let want = format!(
        "egress: upstream sink.test:{} was idle: no bytes either way for 400ms\n",
        addr.port()
    );
    while !String::from_utf8_lossy(&answer).ends_with(&want) {
        let n = tokio::time::timeout(WAIT, read.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no answer in time: {}", String::from_utf8_lossy(&answer)))
            .unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&answer));
        answer.extend_from_slice(&buf[..n]);
    }
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 504 "), "{answer}");
    writer.abort();
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    let ev = h.event().await;
    assert_eq!(ev.status, 504);
    assert!(ev.bytes_in < size as u64, "{}", ev.bytes_in);
}

#[tokio::test]
async fn a_response_that_stops_midway_is_cut_after_the_idle_limit() {
    // One chunk of two, then the upstream waits for a gate that never opens.
    let (_never, gate) = oneshot::channel();
    let up = generator(2, Some((1, gate))).await;
    let mut h = proxy_for("half.test", &up).await;
    let mut c = h.connect(orig(up.addr.port())).await;
    c.send("GET / HTTP/1.1\r\nHost: half.test\r\n\r\n").await;
    assert_eq!(c.head().await.0, 200);
    let start = Instant::now();
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, c.io.read_to_end(&mut got))
        .await
        .expect("the proxy cut the stalled response")
        .unwrap();
    // The app sees a connection closed short of the Content-Length, never a whole body.
    assert_eq!(got.len(), CHUNK_LEN);
    assert!(start.elapsed() >= IDLE - Duration::from_millis(100));
    let ev = h.event().await;
    assert_eq!(
        (ev.status, ev.bytes_out, ev.reason.as_deref()),
        (
            200,
            CHUNK_LEN as u64,
            Some("idle: no bytes either way for 400ms")
        )
    );
}

#[tokio::test]
async fn a_malformed_chunked_body_is_the_apps_400_not_an_upstream_failure() {
    let up = Upstream::start("127.0.0.1").await;
    let mut h = proxy_for("up.test", &up).await;
    let mut c = h.connect(orig(up.addr.port())).await;
    // `zz` is no chunk size.
    let raw = "POST /chunks HTTP/1.1\r\nHost: up.test\r\nTransfer-Encoding: chunked\r\n\r\n\
         5\r\nhello\r\nzz\r\n";
    let r = c.exchange(raw).await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(
        r.text().starts_with("egress: invalid request body: "),
        "{}",
        r.text()
    );
    assert!(c.closed().await);
    let ev = h.event().await;
    assert_eq!((ev.status, ev.rule.as_deref()), (400, Some("up")));
    // Counted as the app's error on the rule that allowed it, not as an upstream failure.
    let stats = &h.proxy.counters()[0];
    assert_eq!(
        (stats.rule.as_deref(), stats.status_4xx, stats.status_5xx),
        (Some("up"), 1, 0)
    );
}
