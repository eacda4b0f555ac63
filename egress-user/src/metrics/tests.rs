//! Tests of [`super`] (metrics.rs).

use std::net::SocketAddr;
use std::sync::Mutex;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::time::timeout;

use super::serve::{Endpoints, MAX_HEADER_SIZE, serve_with};
use super::*;
use std::io;
use tokio::{net::TcpListener, sync::watch};

/// Every sample line as series -> value; panics on a series written twice.
fn samples(text: &str) -> HashMap<String, String> {
    let mut samples = HashMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("sample line without a value: {line:?}"));
        let old = samples.insert(series.to_owned(), value.to_owned());
        assert!(old.is_none(), "series written twice: {series}\n{text}");
    }
    samples
}

/// The value of `series`, which must be there.
fn value(samples: &HashMap<String, String>, series: &str) -> String {
    samples
        .get(series)
        .unwrap_or_else(|| panic!("no series {series} in {samples:#?}"))
        .clone()
}

/// The `# TYPE` lines as (family, type), in order.
fn types(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| {
            let (name, kind) = l.split_once(' ').expect("type line has a type");
            (name.to_owned(), kind.to_owned())
        })
        .collect()
}

fn snapshot(generation: u32, rules: &[(&str, u64, u64, u64)]) -> KernelSnapshot {
    KernelSnapshot {
        generation,
        rules: rules
            .iter()
            .map(|&(rule, allowed, denied, would_deny)| RuleVerdicts {
                rule: rule.to_owned(),
                allowed,
                denied,
                would_deny,
            })
            .collect(),
        events_lost: 4,
        errors: 1,
        hooks: vec![
            RuleVerdicts {
                rule: "connect".to_owned(),
                allowed: 11,
                denied: 2,
                would_deny: 0,
            },
            RuleVerdicts {
                rule: "xdp".to_owned(),
                allowed: 0,
                denied: 5,
                would_deny: 1,
            },
        ],
    }
}

const MS: Duration = Duration::from_millis(1);

#[test]
fn encodes_agent_and_kernel_numbers() {
    let m = Metrics::new();
    m.reload(true);
    m.reload(true);
    m.reload(false);
    m.proxy_request(Some("web"), 200, 3 * MS);
    m.proxy_request(Some("web"), 200, 4 * MS);
    m.proxy_request(Some("web"), 503, 2000 * MS);
    m.proxy_request(None, 403, MS / 10);
    m.proxy_request(None, 0, MS);
    m.set_proxy_events_dropped(5);
    m.set_proxy_events_dropped(7);
    let mut conns = crate::proxy::AdmissionStats {
        open: 12,
        limit: 400,
        refused: 2,
        evicted: 30,
        ..Default::default()
    };
    m.set_connections(&conns, Some(77), 1024);
    conns.evicted = 35;
    m.set_connections(&conns, None, 1024);
    let kernel = snapshot(
        3,
        &[("(no rule)", 0, 3, 0), ("a", 10, 3, 2), ("b", 1, 0, 0)],
    );
    let text = m.encode(&kernel);

    assert!(text.ends_with("\n# EOF\n"), "{text}");
    let lines: Vec<&str> = text.lines().collect();
    for line in [
        "# TYPE egress_reloads counter",
        "egress_reloads_total{result=\"ok\"} 2",
        "egress_reloads_total{result=\"failed\"} 1",
        "# TYPE egress_verdicts counter",
        "egress_verdicts_total{rule=\"a\",verdict=\"allowed\"} 10",
        "egress_verdicts_total{rule=\"a\",verdict=\"denied\"} 3",
        "egress_verdicts_total{rule=\"a\",verdict=\"would_deny\"} 2",
        "egress_verdicts_total{rule=\"(no rule)\",verdict=\"denied\"} 3",
        "# TYPE egress_hook_verdicts counter",
        "egress_hook_verdicts_total{hook=\"connect\",verdict=\"allowed\"} 11",
        "egress_hook_verdicts_total{hook=\"xdp\",verdict=\"denied\"} 5",
        "egress_hook_verdicts_total{hook=\"xdp\",verdict=\"would_deny\"} 1",
        "# TYPE egress_generation gauge",
        "egress_generation 3",
        "# TYPE egress_events_lost counter",
        "egress_events_lost_total 4",
        "# TYPE egress_kernel_errors counter",
        "egress_kernel_errors_total 1",
        "# TYPE egress_proxy_events_dropped counter",
        "egress_proxy_events_dropped_total 7",
        "egress_proxy_connections 12",
        "egress_proxy_connections_limit 400",
        "egress_proxy_connections_refused_total 2",
        "egress_proxy_connections_evicted_total 35",
        "egress_open_fds 77",
        "egress_fds_limit 1024",
        "# TYPE egress_proxy_request_duration_seconds histogram",
        "# UNIT egress_proxy_request_duration_seconds seconds",
    ] {
        assert!(lines.contains(&line), "no line {line:?} in\n{text}");
    }

    let s = samples(&text);
    let requests = |rule: &str, status: &str| {
        value(
            &s,
            &format!("egress_proxy_requests_total{{rule=\"{rule}\",status=\"{status}\"}}"),
        )
    };
    assert_eq!(requests("web", "200"), "2");
    assert_eq!(requests("web", "503"), "1");
    assert_eq!(requests("(no rule)", "403"), "1");
    assert_eq!(requests("(no rule)", "0"), "1");
    // Only the pairs seen: 4 request series.
    let request_series = s
        .keys()
        .filter(|k| k.starts_with("egress_proxy_requests_total"))
        .count();
    assert_eq!(request_series, 4);
    assert_eq!(
        value(
            &s,
            "egress_proxy_request_duration_seconds_count{rule=\"web\"}"
        ),
        "3"
    );
    assert_eq!(
        value(
            &s,
            "egress_proxy_request_duration_seconds_count{rule=\"(no rule)\"}"
        ),
        "2"
    );
    // 3 verdicts for each of the 3 rows.
    let verdict_series = s
        .keys()
        .filter(|k| k.starts_with("egress_verdicts_total"))
        .count();
    assert_eq!(verdict_series, 9);

    // Every family once, with the type Prometheus needs to read it right.
    let types = types(&text);
    let mut names: Vec<&str> = types.iter().map(|(n, _)| n.as_str()).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "egress_events_lost",
            "egress_fds_limit",
            "egress_generation",
            "egress_hook_verdicts",
            "egress_kernel_errors",
            "egress_open_fds",
            "egress_proxy_connections",
            "egress_proxy_connections_evicted",
            "egress_proxy_connections_limit",
            "egress_proxy_connections_refused",
            "egress_proxy_events_dropped",
            "egress_proxy_request_duration_seconds",
            "egress_proxy_requests",
            "egress_proxy_would_deny",
            "egress_reloads",
            "egress_verdicts",
        ]
    );
}

#[test]
fn pod_events_are_counted_by_pod_source_and_verdict_until_the_pod_goes() {
    let m = Metrics::new();
    m.pod_event("team-a/web", "connect", "deny");
    m.pod_event("team-a/web", "connect", "deny");
    m.pod_event("team-a/web", "http", "allow");
    m.pod_event("team-b/db", "http", "deny");
    let text = m.encode(&KernelSnapshot::default());
    let s = samples(&text);
    let series = |pod: &str, source: &str, verdict: &str| {
        format!(
            "egress_pod_events_total{{pod=\"{pod}\",source=\"{source}\",verdict=\"{verdict}\"}}"
        )
    };
    assert_eq!(value(&s, &series("team-a/web", "connect", "deny")), "2");
    assert_eq!(value(&s, &series("team-a/web", "http", "allow")), "1");
    assert_eq!(value(&s, &series("team-b/db", "http", "deny")), "1");
    // team-a/web went: its series go, team-b/db's stay.
    m.keep_pods(&["team-b/db".to_owned()].into());
    let s = samples(&m.encode(&KernelSnapshot::default()));
    assert!(
        !s.contains_key(&series("team-a/web", "connect", "deny")),
        "{s:#?}"
    );
    assert_eq!(value(&s, &series("team-b/db", "http", "deny")), "1");
}

#[test]
fn histogram_buckets_are_cumulative_and_inclusive() {
    let m = Metrics::new();
    let micros = Duration::from_micros;
    // 50 us and exactly 100 us fall in le=0.0001 (bounds are inclusive), 0.3 ms in
    // le=0.0005, 7 ms in le=0.01, 20 s only in +Inf.
    for latency in [micros(50), micros(100), micros(300), 7 * MS, 20_000 * MS] {
        m.proxy_request(Some("h"), 200, latency);
    }
    let text = m.encode(&KernelSnapshot::default());
    let s = samples(&text);
    let bucket = |le: &str| {
        value(
            &s,
            &format!("egress_proxy_request_duration_seconds_bucket{{le=\"{le}\",rule=\"h\"}}"),
        )
        .parse::<u64>()
        .expect("a bucket count is an integer")
    };
    let expected = [
        ("0.0001", 2),
        ("0.00025", 2),
        ("0.0005", 3),
        ("0.001", 3),
        ("0.0025", 3),
        ("0.005", 3),
        ("0.01", 4),
        ("0.025", 4),
        ("0.05", 4),
        ("0.1", 4),
        ("0.25", 4),
        ("0.5", 4),
        ("1.0", 4),
        ("2.5", 4),
        ("5.0", 4),
        ("10.0", 4),
        ("+Inf", 5),
    ];
    for (le, count) in expected {
        assert_eq!(bucket(le), count, "bucket le={le}\n{text}");
    }
    // No other buckets than these 17.
    let buckets = s.keys().filter(|k| k.contains("_bucket{")).count();
    assert_eq!(buckets, expected.len());
    assert_eq!(
        value(
            &s,
            "egress_proxy_request_duration_seconds_count{rule=\"h\"}"
        ),
        "5"
    );
    let sum: f64 = value(&s, "egress_proxy_request_duration_seconds_sum{rule=\"h\"}")
        .parse()
        .expect("the sum is a number");
    assert!((sum - 20.00745).abs() < 1e-9, "sum {sum}");
}

#[test]
fn kernel_numbers_are_the_snapshot_given_each_time() {
    let m = Metrics::new();
    let first = m.encode(&snapshot(1, &[("a", 1, 2, 3)]));
    let second = m.encode(&snapshot(2, &[("a", 5, 2, 3), ("b", 0, 1, 0)]));
    assert_eq!(types(&first), types(&second));
    let s = samples(&second);
    assert_eq!(value(&s, "egress_generation"), "2");
    assert_eq!(
        value(&s, "egress_verdicts_total{rule=\"a\",verdict=\"allowed\"}"),
        "5"
    );
    assert_eq!(
        value(&s, "egress_verdicts_total{rule=\"b\",verdict=\"denied\"}"),
        "1"
    );
    // Two rows with one name add up instead of writing one series twice.
    let text = m.encode(&snapshot(2, &[("a", 1, 0, 0), ("a", 2, 0, 0)]));
    assert_eq!(
        value(
            &samples(&text),
            "egress_verdicts_total{rule=\"a\",verdict=\"allowed\"}"
        ),
        "3"
    );
    // A rule name that needs escaping stays one well-formed label value.
    let text = m.encode(&snapshot(2, &[("q\"\\", 1, 0, 0)]));
    assert!(
        text.lines()
            .any(|l| l == r#"egress_verdicts_total{rule="q\"\\",verdict="allowed"} 1"#),
        "{text}"
    );
}

#[test]
fn dropped_events_follow_the_running_total_across_restarts() {
    let m = Metrics::new();
    let dropped = || {
        value(
            &samples(&m.encode(&KernelSnapshot::default())),
            "egress_proxy_events_dropped_total",
        )
    };
    assert_eq!(dropped(), "0");
    m.set_proxy_events_dropped(3);
    m.set_proxy_events_dropped(3);
    assert_eq!(dropped(), "3");
    // A new proxy's count starts at 0: its 2 are new drops.
    m.set_proxy_events_dropped(2);
    assert_eq!(dropped(), "5");
    m.set_proxy_events_dropped(6);
    assert_eq!(dropped(), "9");
}

/// A response read off the wire.
struct Resp {
    status: u16,
    content_type: Option<String>,
    allow: Option<String>,
    body: String,
}

/// Sends one request with `Connection: close` and reads the whole response.
async fn request(addr: SocketAddr, method: &str, path: &str) -> Resp {
    let exchange = async {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.expect("send");
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.expect("read");
        raw
    };
    let raw = timeout(Duration::from_secs(10), exchange)
        .await
        .expect("response in time");
    let raw = String::from_utf8(raw).expect("utf-8 response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a complete head");
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line in {raw:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    Resp {
        status,
        content_type: header("content-type"),
        allow: header("allow"),
        body: body.to_owned(),
    }
}

struct Server {
    addr: SocketAddr,
    generation: Arc<Mutex<u32>>,
    ready: watch::Sender<bool>,
    problems: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<io::Result<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn start(header_read_timeout: Duration) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local address");
    let generation = Arc::new(Mutex::new(1));
    let g = generation.clone();
    let snapshot = Arc::new(move || {
        let generation = *g.lock().expect("generation lock");
        snapshot(generation, &[("a", u64::from(generation), 3, 0)])
    });
    let metrics = Arc::new(Metrics::new());
    metrics.reload(true);
    let (ready, ready_rx) = watch::channel(false);
    let problems: Arc<Mutex<Vec<String>>> = Arc::default();
    let p = problems.clone();
    let health: HealthCheck = Arc::new(move || p.lock().expect("problems lock").clone());
    let endpoints = Endpoints {
        metrics,
        snapshot,
        ready: ready_rx,
        health,
    };
    let task = tokio::spawn(serve_with(listener, endpoints, header_read_timeout));
    Server {
        addr,
        generation,
        ready,
        problems,
        task,
    }
}

#[tokio::test]
async fn serves_metrics_and_probes() {
    let server = start(HEADER_READ_TIMEOUT).await;
    let addr = server.addr;

    let resp = request(addr, "GET", "/metrics").await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.content_type.as_deref(), Some(CONTENT_TYPE));
    let s = samples(&resp.body);
    assert_eq!(value(&s, "egress_generation"), "1");
    assert_eq!(value(&s, "egress_reloads_total{result=\"ok\"}"), "1");
    assert!(resp.body.ends_with("# EOF\n"));

    // Each scrape reads the kernel again.
    *server.generation.lock().expect("generation lock") = 2;
    let resp = request(addr, "GET", "/metrics?x=1").await;
    assert_eq!(resp.status, 200);
    let s = samples(&resp.body);
    assert_eq!(value(&s, "egress_generation"), "2");
    assert_eq!(
        value(&s, "egress_verdicts_total{rule=\"a\",verdict=\"allowed\"}"),
        "2"
    );

    let resp = request(addr, "GET", "/healthz").await;
    assert_eq!((resp.status, resp.body.as_str()), (200, "ok"));
    // The agent cannot do its job: the probe fails and says why.
    *server.problems.lock().expect("problems lock") = vec![
        "control socket: stopped accepting".to_owned(),
        "descriptors: 1000 open".to_owned(),
    ];
    let resp = request(addr, "GET", "/healthz").await;
    assert_eq!(
        (resp.status, resp.body.as_str()),
        (
            503,
            "unhealthy\ncontrol socket: stopped accepting\ndescriptors: 1000 open\n"
        )
    );
    server.problems.lock().expect("problems lock").clear();
    assert_eq!(request(addr, "GET", "/healthz").await.status, 200);

    let resp = request(addr, "GET", "/readyz").await;
    assert_eq!((resp.status, resp.body.as_str()), (503, "not ready"));
    server.ready.send_replace(true);
    let resp = request(addr, "GET", "/readyz").await;
    assert_eq!((resp.status, resp.body.as_str()), (200, "ready"));
    server.ready.send_replace(false);
    let resp = request(addr, "GET", "/readyz").await;
    assert_eq!(resp.status, 503);

    assert_eq!(request(addr, "GET", "/").await.status, 404);
    assert_eq!(request(addr, "GET", "/metricsx").await.status, 404);
    let resp = request(addr, "POST", "/metrics").await;
    assert_eq!(resp.status, 405);
    assert_eq!(resp.allow.as_deref(), Some("GET"));
    assert_eq!(request(addr, "HEAD", "/healthz").await.status, 405);
    assert_eq!(request(addr, "DELETE", "/readyz").await.status, 405);
}

#[tokio::test]
async fn a_stalled_client_blocks_no_one_and_is_cut_off() {
    let server = start(Duration::from_millis(300)).await;
    let addr = server.addr;

    // Half a request head, then nothing.
    let mut stalled = TcpStream::connect(addr).await.expect("connect");
    stalled
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("send");
    // Another that sends nothing at all.
    let mut silent = TcpStream::connect(addr).await.expect("connect");

    let resp = request(addr, "GET", "/healthz").await;
    assert_eq!(resp.status, 200);
    assert_eq!(request(addr, "GET", "/metrics").await.status, 200);

    // Both are closed once the head timeout passes.
    for s in [&mut stalled, &mut silent] {
        let mut rest = Vec::new();
        let read = timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
        assert!(read.is_ok(), "connection still open after the head timeout");
    }

    // A head over the limit is refused, and the server goes on.
    let big = format!(
        "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(MAX_HEADER_SIZE)
    );
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(big.as_bytes()).await.expect("send");
    let mut raw = Vec::new();
    let _ = timeout(Duration::from_secs(5), s.read_to_end(&mut raw))
        .await
        .expect("answered in time");
    let raw = String::from_utf8_lossy(&raw);
    assert!(raw.starts_with("HTTP/1.1 431"), "{raw}");
    assert_eq!(request(addr, "GET", "/healthz").await.status, 200);
}

#[tokio::test]
async fn connections_past_the_cap_are_closed_and_the_cap_frees_up() {
    let server = start(Duration::from_millis(500)).await;
    let addr = server.addr;
    let mut held = Vec::new();
    for _ in 0..crate::fds::METRICS_CONNECTIONS {
        held.push(TcpStream::connect(addr).await.expect("connect"));
    }
    // Let the server accept them all before the one too many.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut extra = TcpStream::connect(addr).await.expect("connect");
    let _ = extra
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let mut raw = Vec::new();
    let _ = timeout(Duration::from_millis(400), extra.read_to_end(&mut raw))
        .await
        .expect("closed at once, before the head timeout");
    assert!(raw.is_empty(), "{}", String::from_utf8_lossy(&raw));
    // Once they close, their places serve again.
    drop(held);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(request(addr, "GET", "/healthz").await.status, 200);
}
