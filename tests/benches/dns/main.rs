//! `cargo xtask bench dns`: what FQDN rules cost (issue 18).
//!
//! # Method
//! Two agents (the release `egress` CLI), each in its own [`Sandbox`] (a network namespace
//! with no route out, a cgroup, a pin directory), with the same DNS server of the bench's own
//! in the sandbox at 192.0.2.53 (`egress_tests::DnsServer`) as the resolver of its resolv.conf,
//! and the same CIDR rule (198.51.100.10/32, 443/tcp):
//! - *agent*: the policy also has the FQDN rule `*.bench.test` on 443/tcp, so every query to
//!   the resolver goes through the agent's DNS listener, which asks the resolver, writes the
//!   answer's address into `LEARNED_V4`, then answers;
//! - *direct*: no FQDN rule, so the DNS path is off and queries go to the resolver directly.
//!
//! 1. DNS latency: `egress-probe --dns-query www.bench.test 192.0.2.53:53 N` from each sandbox's
//!    managed cgroup: N queries one at a time from one unconnected UDP socket (the same name each
//!    time: each answer is learned again, as with no client cache), each round trip timed in the
//!    client. `--rounds` blocks of `--queries`, alternating the two sides. p50, p99, max.
//! 2. Connects: on the *agent* side, `egress-connect-loop` (one process per block, the
//!    `connect()` call timed) to 192.0.2.10:443, allowed only by the learned entry (looked up
//!    after the rule trie misses), and to 198.51.100.10:443, allowed by the CIDR rule's key,
//!    alternating, `--rounds` blocks each; connects per second from the mean.
//! 3. 10,000 names with rotating answers, on the *agent* side: `nN.bench.test` (N < `--names`)
//!    each answered with two addresses in 198.18.0.0/15; glibc (`egress-resolve`, one process)
//!    resolves every name; then every name's answer changes to two new addresses and glibc
//!    resolves them all again. After each round: the learned entries, the learned maps' kernel
//!    memory (`bpftool map show`, `bytes_memlock`), the agent's RSS, and the round's time.
//!
//! # Checks
//! Every query is answered with the name's address; every connect succeeds; every lookup of
//! the 10,000 succeeds; the learned entries are as many as the answers' addresses.
//!
//! # Options (after `cargo bench -p egress-tests --bench dns --`)
//! `--rounds N` (5), `--queries N` (1000), `--connects N` (20000), `--names N` (10000).

#[path = "../common/mod.rs"]
mod common;
// The connect bench's sink: a blocking accept with a 4096 backlog (the tests' `Sink` polls, and
// a connect loop would fill its backlog and wait a second for each dropped SYN).
#[path = "../connect/sink.rs"]
#[allow(dead_code)]
mod sink;

use std::{
    net::{IpAddr, Ipv4Addr},
    path::Path,
    process::Command,
    time::Instant,
};

use egress_tests::{Agent, DnsServer, Family, Sandbox, resolv_conf_text, sa};
use egress_user::loader::{PinDir, learned::LearnedMaps};

const EGRESS: &str = env!("CARGO_BIN_EXE_egress-cli");
const PROBE: &str = env!("CARGO_BIN_EXE_egress-probe");
const LOOP: &str = env!("CARGO_BIN_EXE_egress-connect-loop");
const RESOLVE: &str = env!("CARGO_BIN_EXE_egress-resolve");

const RESOLVER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 53);
/// `www.bench.test`.
const NAMED: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
/// Allowed by the CIDR rule.
const CIDR: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);

struct Options {
    rounds: usize,
    queries: usize,
    connects: u64,
    names: usize,
}

fn parse(args: &[String]) -> Options {
    let mut o = Options {
        rounds: 5,
        queries: 1000,
        connects: 20_000,
        names: 10_000,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut number = || -> usize {
            it.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{arg} needs a number"))
        };
        match arg.as_str() {
            "--rounds" => o.rounds = number(),
            "--queries" => o.queries = number(),
            "--connects" => o.connects = number() as u64,
            "--names" => o.names = number(),
            "--bench" => {}
            other => {
                panic!("unknown option {other}: --rounds N --queries N --connects N --names N")
            }
        }
    }
    o
}

/// One side: a sandbox, its DNS server, its sinks and its agent.
struct Side {
    sb: Sandbox,
    dns: DnsServer,
    _sinks: Vec<sink::FastSink>,
    agent: Agent,
}

impl Side {
    fn start(fqdn: bool) -> Self {
        let sb = Sandbox::new();
        sb.add_addrs(&[
            format!("{RESOLVER}/32"),
            format!("{NAMED}/32"),
            format!("{CIDR}/32"),
        ]);
        egress_tests::sh(&[
            "ip",
            "-n",
            &sb.name,
            "route",
            "add",
            "local",
            "198.18.0.0/15",
            "dev",
            "lo",
        ]);
        let dns = sb.dns_server(sa(RESOLVER, 53));
        dns.set_a("www.bench.test", &[NAMED], 3600);
        std::fs::write(
            sb.resolv_conf(),
            resolv_conf_text(&[IpAddr::V4(RESOLVER)], "timeout:2 attempts:2"),
        )
        .expect("resolv.conf");
        let mut yaml = egress_tests::policy::tcp_rule("cidr", format!("{CIDR}/32"), 443);
        if fqdn {
            yaml.push_str(
                "kind: EgressRule\nmetadata:\n  name: names\nspec:\n  destination:\n    service: \
                 \"*.bench.test\"\n  ports:\n  - {port: 443, protocol: tcp}\n",
            );
        }
        let policy = sb.policy_file("policy.yaml", &yaml);
        let sinks = vec![
            sink::FastSink::start(&sb.name, sa(NAMED, 443), None),
            sink::FastSink::start(&sb.name, sa(CIDR, 443), None),
        ];
        let agent = sb
            .agent(EGRESS)
            .policy(&policy, &["--no-watch"])
            .log("info")
            .start();
        Self {
            sb,
            dns,
            _sinks: sinks,
            agent,
        }
    }

    /// `n` queries for www.bench.test from the managed cgroup: each round trip in us.
    fn queries(&self, n: usize) -> Vec<f64> {
        let (out, err) = egress_tests::output_text(
            self.sb.workload(PROBE).args([
                "--dns-query",
                "www.bench.test",
                &sa(RESOLVER, 53).to_string(),
                &n.to_string(),
            ]),
            "egress-probe",
        );
        let mut lines = out.lines();
        let first = lines.next().unwrap_or_default();
        assert!(
            first.ends_with(&format!("addrs {NAMED}")),
            "a query was not answered: {out}{err}"
        );
        let latencies = lines
            .find_map(|l| l.strip_prefix("latency_us "))
            .unwrap_or_else(|| panic!("no latencies: {out}{err}"));
        latencies
            .split(',')
            .map(|v| v.parse().expect("a number"))
            .collect()
    }

    /// A block of `count` timed connects to `addr`: the mean ns per connect.
    fn connects(&self, addr: Ipv4Addr, count: u64) -> f64 {
        let (out, err) = egress_tests::output_text(
            Command::new(LOOP).args([
                "--cgroup",
                &self.sb.cgroup.display().to_string(),
                "--netns",
                &self.sb.name,
                "--warmup",
                "500",
                "--count",
                &count.to_string(),
                "--expect",
                "connected",
                &sa(addr, 443).to_string(),
            ]),
            "egress-connect-loop",
        );
        out.split_whitespace()
            .find_map(|w| w.strip_prefix("mean_ns="))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("connects to {addr}: {out}{err}"))
    }

    fn learned(&self) -> usize {
        LearnedMaps::open(&PinDir::new(&self.sb.pin_dir))
            .expect("learned maps")
            .entries()
            .len()
    }

    /// `bytes_memlock` of the two learned maps.
    fn learned_memory(&self) -> u64 {
        ["LEARNED_V4", "LEARNED_V6"]
            .iter()
            .map(|map| memlock(&self.sb.pin_dir.join(map)))
            .sum()
    }

    fn agent_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.agent.pid()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }
}

/// A pinned map's `bytes_memlock`, from bpftool.
fn memlock(pin: &Path) -> u64 {
    let out = Command::new("bpftool")
        .args(["map", "show", "pinned"])
        .arg(pin)
        .arg("-j")
        .output()
        .expect("bpftool");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    json["bytes_memlock"]
        .as_u64()
        .or_else(|| json["bytes_memlock"].as_str().and_then(|s| s.parse().ok()))
        .unwrap_or(0)
}

/// (p50, p99, max) by nearest rank.
fn percentiles(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let rank = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    (rank(0.50), rank(0.99), v[v.len() - 1])
}

fn main() -> std::process::ExitCode {
    common::bench_main("dns", |args| run(&parse(args)))
}

fn run(o: &Options) {
    let agent = Side::start(true);
    let direct = Side::start(false);
    let mut report = String::from("# FQDN rules: the DNS path's cost\n\n");
    report.push_str(&common::machine_line());

    // 1. DNS latency, alternating.
    let (mut via, mut straight) = (Vec::new(), Vec::new());
    for _ in 0..o.rounds {
        via.extend(agent.queries(o.queries));
        straight.extend(direct.queries(o.queries));
    }
    let (v50, v99, vmax) = percentiles(via);
    let (d50, d99, dmax) = percentiles(straight);
    report.push_str(&format!(
        "\n## DNS answer latency (one A query at a time, {} x {} each, alternating)\n\n\
         | path | p50 us | p99 us | max us |\n|---|---|---|---|\n\
         | direct to the resolver | {d50:.0} | {d99:.0} | {dmax:.0} |\n\
         | through the agent (learned before the answer) | {v50:.0} | {v99:.0} | {vmax:.0} |\n\
         | added | {:+.0} | {:+.0} | |\n",
        o.rounds,
        o.queries,
        v50 - d50,
        v99 - d99,
    ));

    // 2. Connects to a learned address against a CIDR-allowed one.
    assert!(agent.learned() >= 1, "www.bench.test was not learned");
    let (mut named, mut cidr) = (Vec::new(), Vec::new());
    for _ in 0..o.rounds {
        named.push(agent.connects(NAMED, o.connects));
        cidr.push(agent.connects(CIDR, o.connects));
    }
    let (n_mean, _, _) = common::summary(named.into_iter());
    let (c_mean, _, _) = common::summary(cidr.into_iter());
    report.push_str(&format!(
        "\n## connect() to an FQDN-allowed address against a CIDR-allowed one ({} blocks of {} \
         connects each, alternating; median of the blocks' means)\n\n\
         | allowed by | ns per connect | connects/s (one process) |\n|---|---|---|\n\
         | CIDR rule key | {c_mean:.0} | {:.0} |\n\
         | learned entry (FQDN rule) | {n_mean:.0} | {:.0} |\n\
         | ratio FQDN / CIDR (connects/s) | | {:.3}x |\n",
        o.rounds,
        o.connects,
        1e9 / c_mean,
        1e9 / n_mean,
        c_mean / n_mean,
    ));

    // 3. 10,000 names, answers rotated once.
    let names: Vec<String> = (0..o.names).map(|i| format!("n{i}.bench.test")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let addr = |i: usize, k: usize| {
        let j = 2 * i + k;
        Ipv4Addr::new(
            198,
            18 + (j / 65_000) as u8,
            ((j % 65_000) / 250) as u8,
            (j % 250 + 1) as u8,
        )
    };
    let base = (
        agent.learned(),
        agent.learned_memory(),
        agent.agent_rss_kib(),
    );
    report.push_str(&format!(
        "\n## {} names, two addresses each, rotated once\n\n\
         | after | lookups | time | learned entries | learned maps' kernel memory | agent RSS |\n\
         |---|---|---|---|---|---|\n| start | | | {} | {} KiB | {} KiB |\n",
        common::thousands(o.names),
        base.0,
        base.1 / 1024,
        base.2,
    ));
    for (round, offset) in [("first answers", 0), ("rotated answers", o.names)] {
        for (i, name) in names.iter().enumerate() {
            agent
                .dns
                .set_a(name, &[addr(i + offset, 0), addr(i + offset, 1)], 3600);
        }
        let start = Instant::now();
        let got = agent
            .sb
            .resolve(RESOLVE, &agent.sb.resolv_conf())
            .family(Family::V4)
            .quiet()
            .run(&refs);
        let took = start.elapsed();
        assert!(
            got.summary.lookup_errors.is_empty() && got.summary.lookups == o.names as u64,
            "{round}: {:?}",
            got.summary
        );
        let learned = agent.learned();
        report.push_str(&format!(
            "| {round} | {} | {:.2} s | {} | {} KiB | {} KiB |\n",
            common::thousands(o.names),
            took.as_secs_f64(),
            common::thousands(learned),
            agent.learned_memory() / 1024,
            agent.agent_rss_kib(),
        ));
    }
    report.push_str(
        "\nEntries expire with their TTL (here an hour): rotated answers add entries until the \
         agent's sweep removes the expired ones, every 10 s.\n",
    );
    drop(direct);
    print!("{report}");
}
