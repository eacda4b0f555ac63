//! Bodies stream both ways without being buffered whole; names that resolve to protected
//! addresses are refused; slow and unreachable upstreams get 504 and 502.

use std::sync::atomic::Ordering;

use tokio::sync::oneshot;

use super::*;
use crate::policy::HttpProtocol::Http;
use crate::policy::{PortRule, Rule};

pub(super) const CHUNK_LEN: usize = 64 * 1024;
static CHUNK: [u8; CHUNK_LEN] = [b'x'; CHUNK_LEN];
const MB: usize = 1 << 20;

/// An upstream answering every request with `chunks` chunks of 64 KiB and a Content-Length;
/// after `gate.0` chunks it waits for `gate.1`, if given.
pub(super) async fn generator(
    chunks: usize,
    gate: Option<(usize, oneshot::Receiver<()>)>,
) -> Upstream {
    let gate = Arc::new(Mutex::new(gate));
    Upstream::with(
        "127.0.0.1:0",
        None,
        handler(move |_req| {
            let gate = gate.lock().unwrap().take();
            async move {
                let (tx, rx) = mpsc::channel(2);
                tokio::spawn(async move {
                    let (wait_at, mut gate) = match gate {
                        Some((at, g)) => (at, Some(g)),
                        None => (usize::MAX, None),
                    };
                    for i in 0..chunks {
                        if i == wait_at
                            && let Some(g) = gate.take()
                        {
                            let _ = g.await;
                        }
                        if tx.send(Bytes::from_static(&CHUNK)).await.is_err() {
                            return;
                        }
                    }
                });
                Response::builder()
                    .header("content-length", chunks * CHUNK_LEN)
                    .body(BoxBody::new(ChannelBody(rx)))
                    .unwrap()
            }
        }),
    )
    .await
}

/// Resident memory of this process, in bytes.
fn rss() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<usize>()
        .unwrap()
        * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mb_response_streams_through_in_bounded_memory() {
    let up = generator(1600, None).await;
    let port = up.addr.port();
    let h = Harness::one_rule("big", "big.test", port).await;
    let mut c = h.connect(orig(port)).await;
    let before = rss();
    c.send("GET /bytes HTTP/1.1\r\nHost: big.test\r\n\r\n")
        .await;
    let (status, headers) = c.head().await;
    assert_eq!(status, 200);
    assert!(
        headers.contains(&("content-length".into(), (100 * MB).to_string())),
        "{headers:?}"
    );
    let (mut got, mut peak) = (0, before);
    let mut buf = vec![0u8; CHUNK_LEN];
    while got < 100 * MB {
        let n = tokio::time::timeout(WAIT, c.io.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed after {got} bytes");
        got += n;
        if got % (8 * MB) < n {
            peak = peak.max(rss());
        }
    }
    assert_eq!(got, 100 * MB);
    let growth = peak.saturating_sub(before);
    assert!(
        growth < 40 * MB,
        "resident memory grew by {} MiB for a 100 MiB body",
        growth / MB
    );
}

#[tokio::test]
async fn the_app_reads_the_start_before_the_upstream_sends_the_end() {
    let (open, gate) = oneshot::channel();
    // 1 MiB, then the upstream waits until the app has seen half of it.
    let up = generator(32, Some((16, gate))).await;
    let port = up.addr.port();
    let h = Harness::one_rule("big", "big.test", port).await;
    let mut c = h.connect(orig(port)).await;
    c.send("GET / HTTP/1.1\r\nHost: big.test\r\n\r\n").await;
    assert_eq!(c.head().await.0, 200);
    let mut first = vec![0u8; MB / 2];
    tokio::time::timeout(WAIT, c.io.read_exact(&mut first))
        .await
        .expect("the proxy held back the start of the body")
        .unwrap();
    open.send(()).unwrap();
    let mut rest = vec![0u8; 2 * MB - MB / 2];
    c.read_in_time(&mut rest).await;
}

#[tokio::test]
async fn a_request_body_reaches_the_upstream_while_the_app_still_sends() {
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<usize>();
    let up = Upstream::with(
        "127.0.0.1:0",
        None,
        handler(move |req: Request<Incoming>| {
            let seen_tx = seen_tx.clone();
            async move {
                let mut body = req.into_body();
                let mut n = 0;
                while let Some(Ok(frame)) = body.frame().await {
                    if let Ok(d) = frame.into_data() {
                        n += d.len();
                        let _ = seen_tx.send(n);
                    }
                }
                Response::new(full(format!("got {n}")))
            }
        }),
    )
    .await;
    let port = up.addr.port();
    let mut h = Harness::one_rule("up", "up.test", port).await;
    let mut c = h.connect(orig(port)).await;
    c.send(&format!(
        "POST /upload HTTP/1.1\r\nHost: up.test\r\nContent-Length: {}\r\n\r\n",
        2 * MB
    ))
    .await;
    let half = vec![b'y'; MB];
    c.io.get_mut().write_all(&half).await.unwrap();
    // The upstream has the first mebibyte before the app sends the second.
    tokio::time::timeout(WAIT, async { while seen_rx.recv().await.unwrap() < MB {} })
        .await
        .expect("the proxy held back the request body");
    c.io.get_mut().write_all(&half).await.unwrap();
    let r = c.response().await;
    assert_eq!((r.status, r.text()), (200, format!("got {}", 2 * MB)));
    assert_eq!(h.event().await.bytes_in, 2 * MB as u64);
}

#[tokio::test]
async fn names_that_resolve_to_protected_addresses_are_refused() {
    let up = Upstream::start("127.0.0.1").await;
    let port = up.addr.port();
    let mut p = Policy {
        http_rules: vec![
            rule("r", "rebind.test", port, Http),
            rule("m", "meta.test", port, Http),
        ],
        ..Policy::default()
    };
    let dns = || {
        let mut dns = MapResolver::default();
        dns.0
            .insert("rebind.test".into(), vec!["127.0.0.1".parse().unwrap()]);
        dns.0
            .insert("meta.test".into(), vec!["169.254.169.254".parse().unwrap()]);
        Arc::new(dns)
    };
    let h = Harness::build(Proxy::builder(&p).resolver(dns())).await;
    let mut c = h.connect(orig(port)).await;
    for (host, addr) in [
        ("rebind.test", "127.0.0.1"),
        ("meta.test", "169.254.169.254"),
    ] {
        c.get(host, "/").await.assert_says(
            502,
            &format!("{host} resolves only to refused addresses ({addr})"),
        );
    }
    assert_eq!(up.conns.load(Ordering::SeqCst), 0);

    // A tcp rule for the range and port is the operator's explicit permission.
    p.rules.push(std::sync::Arc::new(Rule {
        scope: None,
        name: "local".into(),
        origin: origin(),
        destination: "127.0.0.0/8".parse().unwrap(),
        ports: vec![PortRule::tcp(port)],
    }));
    let h = Harness::build(Proxy::builder(&p).resolver(dns())).await;
    let mut c = h.connect(orig(port)).await;
    assert_eq!(c.get("rebind.test", "/").await.status, 200);
    assert_eq!(up.requests(), 1);
}

#[tokio::test]
async fn silent_upstreams_are_504_and_unreachable_ones_502() {
    // Accepts and reads, never answers.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let mut p = policy(
        vec![
            rule("slow", "slow.test", port, Http),
            rule("hang", "hang.test", port, Http),
            rule("down", "down.test", port, Http),
        ],
        &["slow.test"],
    );
    p.hosts
        .insert("down.test".into(), vec!["127.0.0.2".parse().unwrap()]);
    // The idle clock starts once the connect budget has passed, so a slow connect is
    // reported as one whatever the two limits are.
    let t = crate::proxy::Timeouts {
        connect: Duration::from_millis(200),
        idle: Duration::from_millis(900),
        ..Default::default()
    };
    let builder = Proxy::builder(&p)
        .resolver(Arc::new(MapResolver::default()))
        .timeouts(t);
    let h = Harness::build(builder).await;
    let mut c = h.connect(orig(port)).await;
    c.get("slow.test", "/").await.assert_is(
        504,
        &format!("egress: upstream slow.test:{port} was idle: no bytes either way for 900ms\n"),
    );
    let r = c.get("hang.test", "/").await;
    assert_eq!(r.status, 504);
    assert!(
        r.text()
            .ends_with("connecting to hang.test timed out after 200ms\n"),
        "{}",
        r.text()
    );
    c.get("down.test", "/").await.assert_says(
        502,
        &format!("connecting to 127.0.0.2:{port}: Connection refused"),
    );
}
