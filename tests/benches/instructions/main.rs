//! `cargo xtask bench instructions`: instructions the HTTP proxy executes per request,
//! counted by callgrind (issue 6). Instruction counts, unlike times, repeat exactly for the
//! same binary and input whatever else the machine does, so they can be compared between
//! commits.
//!
//! # Method
//! - One process, a single-threaded tokio runtime, loopback only: an upstream that answers
//!   every request with a fixed 2-byte body on a kept-alive connection; the proxy
//!   (`Proxy::serve`) with one plain-HTTP rule for `bench.test`, pinned to the upstream's
//!   address by the policy's `hosts` (no DNS), and an original-destination lookup that names
//!   the upstream; a client that
//!   sends `GET /` requests one after another on one kept-alive connection.
//! - The bench re-runs itself under `valgrind --tool=callgrind` with `--requests A` and
//!   `--requests B`, counting every instruction of the process (user space). Instructions
//!   per request = (Ir(B) - Ir(A)) / (B - A), so start-up (building the proxy, loading the CA
//!   roots) cancels out.
//! - It does the same with the client talking to the upstream directly (`--direct`). The
//!   proxy's cost per request is the difference: the proxied request's instructions (proxy,
//!   hyper on both sides, the runtime's extra scheduling) minus the direct one's (client,
//!   upstream, runtime). Callgrind's `--toggle-collect` cannot isolate the proxy instead: it
//!   flips collection at every entry of a matching function, so nested proxy functions
//!   switch it off, and hyper's connection tasks run outside them.
//!
//! - A reload's user-space work at [`RELOAD_RULES`] rules, counted the same way: the child
//!   parses a policy file of that many CIDR+port rules (`policy::load_sources`), compiles it
//!   into map entries (`compile::compile`) and builds the proxy's configuration (`Proxy::new`),
//!   0, 1 or 5 times. The first reload reads every document (*a cold reload*); each later one
//!   changes one rule's port (to 1 and back), finds all the other documents as the one before
//!   left them and reuses them (*a one-rule edit*, the mean of [`EDITS`]). The kernel's part
//!   (map writes, program verification) runs outside the process and is not counted.
//!
//! # Regressions in CI
//! `--check FILE` compares the three counts (request path, cold reload, one-rule edit) with a
//! recorded baseline (`tests/baselines/instructions.json`) and fails when one is more than its
//! `tolerance` (5 %) above it: a change that makes one of them 10 % slower fails CI, with no timing
//! involved. The counts depend on the exact build (compiler, static glibc, profile), so the
//! baseline is recorded by the same command CI runs, `cargo xtask test --step instructions`,
//! with `EGRESS_RECORD_BASELINE=1` (then `--record FILE` writes it). A count more than the
//! tolerance below the baseline passes, and says to record the gain.
//!
//! Arguments: `--requests-a N` (default 200), `--requests-b N` (default 1200), `--out DIR`
//! (also write `instructions.md` and `instructions.json` there), `--check FILE`, `--record
//! FILE`; `--child --requests N [--direct]` and `--child --reloads N` are the runs under
//! valgrind. Needs valgrind (Debian package `valgrind`); `cargo xtask bench instructions` and
//! `cargo xtask test` install it.

mod baseline;
#[path = "../common/mod.rs"]
mod common;

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::{Command, ExitCode},
    sync::Arc,
};

use egress_user::{compile, policy, proxy::Proxy};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |name: &str, default: u64| -> u64 {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .map_or(default, |v| {
                v.parse()
                    .unwrap_or_else(|_| panic!("{name} takes a number, not {v:?}"))
            })
    };
    let path_arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .map(|i| PathBuf::from(args.get(i + 1).unwrap_or_else(|| panic!("{name} FILE"))))
    };
    if args.iter().any(|a| a == "--child") {
        if args.iter().any(|a| a == "--reloads") {
            return reloads(value("--reloads", 1));
        }
        return child(
            value("--requests", 100),
            args.iter().any(|a| a == "--direct"),
        );
    }
    if !args.iter().any(|a| a == "--bench") {
        // `cargo test --all-targets` builds and runs bench targets without --bench: a quick
        // run of the request loop itself, no valgrind.
        return child(20, false);
    }
    let (a, b) = (value("--requests-a", 200), value("--requests-b", 1200));
    assert!(b > a, "--requests-b must be larger than --requests-a");
    let proxied = (
        callgrind(&["--requests", &a.to_string()]),
        callgrind(&["--requests", &b.to_string()]),
    );
    let direct = (
        callgrind(&["--requests", &a.to_string(), "--direct"]),
        callgrind(&["--requests", &b.to_string(), "--direct"]),
    );
    let reload = [
        callgrind(&["--reloads", "0"]),
        callgrind(&["--reloads", "1"]),
        callgrind(&["--reloads", &(1 + EDITS).to_string()]),
    ];
    let cold = reload[1].saturating_sub(reload[0]);
    let edit = reload[2].saturating_sub(reload[1]) / EDITS;
    let per = |(x, y): (u64, u64)| y.saturating_sub(x) as f64 / (b - a) as f64;
    let mut out = String::from("\n## Proxy instructions per request (callgrind)\n\n");
    out.push_str(&format!(
        "- command: `cargo xtask bench instructions` ({a} and {b} plain-HTTP keep-alive requests, one connection, \
         single-threaded runtime)\n- kernel `{}`, valgrind {}\n\n",
        common::command_output("uname", &["-r"]),
        common::command_output("valgrind", &["--version"]),
    ));
    out.push_str(&format!(
        "| client to | Ir at {a} requests | Ir at {b} requests | instructions per request |\n|---|---|---|---|\n"
    ));
    for (what, (x, y)) in [
        ("the proxy, then the upstream", proxied),
        ("the upstream directly", direct),
    ] {
        out.push_str(&format!(
            "| {what} | {} | {} | {:.0} |\n",
            common::thousands(x as usize),
            common::thousands(y as usize),
            per((x, y))
        ));
    }
    let path = per(proxied) - per(direct);
    out.push_str(&format!(
        "\n**The proxy's request path: {path:.0} instructions per request** (the difference).\n"
    ));
    out.push_str(&format!(
        "\nA reload's user-space work at {} rules (parse, compile, proxy configuration): **{} \
         instructions** when every document is new, **{} instructions** after a one-rule edit \
         (the other documents reused).\n",
        common::thousands(RELOAD_RULES),
        common::thousands(cold as usize),
        common::thousands(edit as usize),
    ));
    let counts = Counts {
        proxy_path_per_request: path.round() as u64,
        reload: cold,
        reload_edit: edit,
    };
    let json = serde_json::json!({
        "machine": common::machine_json(),
        "requests": [a, b],
        "proxied_ir": [proxied.0, proxied.1],
        "direct_ir": [direct.0, direct.1],
        "proxied_per_request": per(proxied),
        "direct_per_request": per(direct),
        "proxy_path_per_request": path,
        "reload_rules": RELOAD_RULES,
        "reload_ir": reload,
        "reload_cold": cold,
        "reload_edit": edit,
    });
    let out_dir = path_arg("--out");
    common::publish(out_dir.as_deref(), "instructions", &out, &json);
    if let Some(file) = path_arg("--record") {
        baseline::record(&file, counts);
    }
    match path_arg("--check") {
        Some(file) => baseline::check(&file, counts),
        None => ExitCode::SUCCESS,
    }
}

/// The policy size of the reload count: the issue's 10,000-rule reload.
const RELOAD_RULES: usize = 10_000;

/// One-rule edits the edit count is the mean of. A count is the difference of two runs, and
/// a run's total moves by about 0.5 % between runs (hash seeds): a few million instructions,
/// about a tenth of one edit (41 M). Over sixteen edits that is under 1 %, well inside the
/// tolerance (over four, it moved 1.8 % when an edit was twice as large).
const EDITS: u64 = 16;

/// The counts CI checks.
#[derive(Clone, Copy, Debug)]
pub struct Counts {
    /// The proxy's request path: proxied minus direct, per request.
    proxy_path_per_request: u64,
    /// One reload's user-space work at [`RELOAD_RULES`] rules, every document new.
    reload: u64,
    /// The same after a one-rule edit: the other documents reused.
    reload_edit: u64,
}

/// The workload of the reload count: `reloads` times what the agent does in its own process
/// for a new policy file of [`RELOAD_RULES`] rules, short of the kernel: parse and check it,
/// compile it into map entries, build the proxy's configuration. Each time after the first,
/// one rule's port differs from the time before.
fn reloads(reloads: u64) -> ExitCode {
    egress_user::proxy::install_crypto_provider();
    // Both texts made whatever `reloads` is, so that making them is not counted in the
    // difference between runs: as written, then with one rule's port changed.
    let texts = [
        reload_policy(RELOAD_RULES, None),
        reload_policy(RELOAD_RULES, Some(0)),
    ];
    for generation in 1..=reloads {
        // 1: every document new; then each generation changes the one rule's port, to 1 and
        // back.
        let yaml = texts[usize::from(generation % 2 == 0)].clone();
        let policy = policy::load_sources(&[("policy.yaml".to_owned(), yaml.into_bytes())])
            .unwrap_or_else(|e| panic!("the reload policy: {e}"));
        let compiled = compile::compile(
            &policy,
            &compile::StoredRows::default(),
            u32::try_from(generation).expect("a few generations"),
        )
        .unwrap_or_else(|e| panic!("compiling the reload policy: {e}"));
        let proxy = Proxy::new(&policy).expect("proxy configuration");
        std::hint::black_box((compiled, proxy));
    }
    ExitCode::SUCCESS
}

/// `rules` EgressRules as an operator writes them, one /32 in 198.18.0.0/15 each on one of
/// ten ports, as the reload bench's filler; rule `edited`, if any, on port 1 instead.
fn reload_policy(rules: usize, edited: Option<usize>) -> String {
    const PORTS: [u16; 10] = [80, 443, 8080, 5432, 6379, 9200, 3306, 8443, 25, 53];
    let mut yaml = String::new();
    for i in 0..rules {
        let ip = Ipv4Addr::from(
            u32::from(Ipv4Addr::new(198, 18, 0, 0)) + u32::try_from(i).expect("small"),
        );
        let port = if Some(i) == edited {
            1
        } else {
            PORTS[i % PORTS.len()]
        };
        yaml.push_str(&format!(
            "---\nkind: EgressRule\nmetadata:\n  name: filler-{i}\nspec:\n  destination:\n    service: {ip}/32\n  ports:\n  - port: {port}\n    protocol: tcp\n"
        ));
    }
    yaml
}

/// Runs this binary's child (`--child` and `args`) under callgrind and returns the
/// instructions the process executed.
fn callgrind(args: &[&str]) -> u64 {
    let exe = std::env::current_exe().expect("own path");
    let tmp = tempfile::tempdir().expect("temporary directory");
    let out = tmp.path().join("callgrind.out");
    let mut cmd = Command::new("valgrind");
    cmd.arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}", out.display()));
    cmd.arg(&exe).arg("--child").args(args);
    let status = cmd
        .output()
        .unwrap_or_else(|e| panic!("running valgrind (Debian package valgrind): {e}"));
    assert!(
        status.status.success(),
        "valgrind failed: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    let text =
        std::fs::read_to_string(&out).unwrap_or_else(|e| panic!("reading {}: {e}", out.display()));
    text.lines()
        .find_map(|l| {
            l.strip_prefix("totals:")
                .or_else(|| l.strip_prefix("summary:"))
        })
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no totals line in the callgrind output"))
}

/// The workload: upstream, proxy and client in one single-threaded runtime; with `direct`
/// the client skips the proxy (which is still built and listening, so start-up is the same).
fn child(requests: u64, direct: bool) -> ExitCode {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let upstream = TcpListener::bind((loopback, 0)).await.expect("upstream");
        let upstream_addr = upstream.local_addr().expect("addr");
        tokio::spawn(serve_upstream(upstream));

        // The proxy dials loopback only for a name the operator pinned there (`hosts`).
        let yaml = format!(
            "kind: EgressConfig\nspec:\n  hosts:\n    bench.test: [127.0.0.1]\n---\nkind: EgressRule\nmetadata: {{name: bench}}\nspec:\n  destination: {{service: bench.test}}\n  ports: [{{port: {}, protocol: http}}]\n",
            upstream_addr.port()
        );
        let policy = policy::load_sources(&[("bench.yaml".to_owned(), yaml.into_bytes())])
            .unwrap_or_else(|e| panic!("bench policy: {e}"));
        egress_user::proxy::install_crypto_provider();
        let proxy = Proxy::new(&policy).expect("proxy");
        let listener = TcpListener::bind((loopback, 0)).await.expect("proxy listener");
        let proxy_addr = listener.local_addr().expect("addr");
        let (tx, mut rx) = mpsc::channel(1024);
        tokio::spawn(async move { while rx.recv().await.is_some() {} });
        let orig = move |_peer: SocketAddr| Some(upstream_addr);
        tokio::spawn(Arc::new(proxy).serve(listener, Arc::new(orig), tx));

        let to = if direct { upstream_addr } else { proxy_addr };
        let stream = TcpStream::connect(to).await.expect("connect");
        let (read, mut write) = stream.into_split();
        let mut read = BufReader::new(read);
        let request = format!(
            "GET / HTTP/1.1\r\nHost: bench.test:{}\r\n\r\n",
            upstream_addr.port()
        );
        for i in 0..requests {
            write.write_all(request.as_bytes()).await.expect("send");
            let (status, body) = read_response(&mut read).await;
            assert_eq!(
                status,
                200,
                "request {i}: {}",
                String::from_utf8_lossy(&body)
            );
        }
    });
    ExitCode::SUCCESS
}

/// Reads one response (status line, headers, a content-length body); returns the status and
/// the body.
async fn read_response<R: tokio::io::AsyncBufRead + Unpin>(read: &mut R) -> (u16, Vec<u8>) {
    let mut line = String::new();
    read.read_line(&mut line).await.expect("status line");
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {line:?}"));
    let mut length = 0usize;
    loop {
        line.clear();
        read.read_line(&mut line).await.expect("header");
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().expect("content-length");
        }
    }
    let mut body = vec![0; length];
    read.read_exact(&mut body).await.expect("body");
    (status, body)
}

/// Answers every request on every connection with `200` and a 2-byte body.
async fn serve_upstream(listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut read = BufReader::new(read);
            let mut line = String::new();
            loop {
                // One request: lines until the blank one (GET, no body).
                loop {
                    line.clear();
                    match read.read_line(&mut line).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) if line == "\r\n" => break,
                        Ok(_) => {}
                    }
                }
                let response = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                if write.write_all(response).await.is_err() {
                    return;
                }
            }
        });
    }
}
