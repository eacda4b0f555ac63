//! `cargo xtask bench connect`: what the egress filter costs a `connect()`, against no filter
//! and against the netfilter ways of writing the same allow-list (BENCHMARKS.md metrics 1
//! and 2).
//!
//! # Method
//! - Every contender gets its own [`Sandbox`](egress_tests::Sandbox) (a fresh network
//!   namespace with no route out, a cgroup, a pin directory) and its own sink on
//!   `192.0.2.1:8080`, an address on the sandbox's veth, so the measured path is the filtered
//!   one and not the loopback bypass.
//! - The ruleset is 10,000 CIDR+port rules: 9,999 distinct networks (/29 to /32) in
//!   198.18.0.0/15 with a spread of ports, and the target `192.0.2.1/32` port 8080 last. The
//!   netfilter contenders get the same list: the target last is the worst case of a linear
//!   iptables chain and makes no difference to an LPM trie or an nft set. Another egress
//!   contender connects to a port no rule allows (the deny path).
//! - Rule scaling (metric 3): egress, iptables-nft and the nft set each also hold 1,000,
//!   100,000 and 1,000,000 keys (`--scale`), in the same rounds. Above 16,384 keys the
//!   networks are /32s in 198.18.0.0/15, and 1,000,000 keys are 100,000 rules of 10 ports (a
//!   rule takes one of egress's 131,070 counter rows). The netfilter rulesets load in
//!   parallel (iptables-nft-restore takes about 30 s for 1,000,000 rules, nft about 80 s).
//!   A contender whose connect takes longer than its block budget allows gets fewer untimed
//!   warm-up connects (at most a tenth of the budget), so iptables' 1,000,000-rule walk
//!   (tens of ms per SYN) does not stall the rounds.
//! - Each contender has one load generator (`egress-connect-loop --serve`) in its cgroup and
//!   namespace, pinned to the last CPU (the sinks' accept threads take CPU 0). It times only
//!   the `connect()` of `socket(); connect(); close()`, and closes with `SO_LINGER 0` (a RST,
//!   no TIME_WAIT), so 100,000s of connects to one destination never run out of ports.
//! - Contenders are interleaved a block at a time: a round runs one block per contender (100
//!   untimed connects, then up to `--count` timed ones or `--budget-ms`, which is what limits
//!   iptables), each round starting one contender later. This machine's load drifts by 10-20 %
//!   within a second, so rounds are kept to a fraction of a second and there are many of them.
//!   Reported: median and min-max over rounds of each block's mean; the ratio to "no filter"
//!   in the same round (median, min-max) for the means and for the p50s; the p50 ratio is the
//!   steadier one here.
//! - Program run time (metric 2) is measured in a second phase with `BPF_ENABLE_STATS` on:
//!   stats cost two clock reads per program run, so they stay off while connects are timed.
//!
//! Semantics of the netfilter contenders: stateless, and only a new connection's SYN is
//! judged (the first rule accepts every TCP packet that is not a bare SYN), as the
//! `cgroup/connect4` hook judges each `connect()` once; the SYN-ACK and the RST never walk the
//! rules. This is the cheapest honest form of the allow-list for them (no conntrack).
//!
//! # Checks
//! Numbers mean nothing if the filter did not judge the connections, so the bench stops with
//! an error when: a connect that should succeed fails (or a denied one succeeds); a sink did
//! not see exactly the connections the client made; the egress target rule's `allowed`
//! counter (or the `(no rule)` row's `denied` counter) did not move by exactly the number of
//! connects; a netfilter ruleset let through a connection it should reject; the programs'
//! `run_cnt` did not move by the number of connects.

mod client;
#[path = "../common/mod.rs"]
mod common;
mod contender;
mod report;
mod rulesets;
mod run_time;
mod sink;

use std::{
    fs,
    process::ExitCode,
    thread,
    time::{Duration, Instant},
};

use common::thousands;
use contender::{Contender, Expect, Kind, chain};
use egress_tests::{V4_A, sa};
use egress_user::pipeline;
use report::{Context, print_report, us};
use rulesets::{iptables_rules, nft_rules, policy_keys};
use run_time::measure_run_time;

/// The port every contender's sink listens on and the policy allows.
pub const PORT: u16 = 8080;
/// A port the policy does not allow (the denied-path contender connects here).
pub const DENIED_PORT: u16 = 9090;
/// The name of the rule that allows the target.
pub const TARGET_RULE: &str = "target";
/// Ports the generated rules spread over.
pub const PORTS: [u16; 10] = [80, 443, 8080, 5432, 6379, 9200, 3306, 8443, 25, 53];

pub const USAGE: &str = "usage: cargo bench -p egress-tests --bench connect -- [--rounds N] [--count N] \
                     [--budget-ms MS] [--warmup N] [--stats-rounds N] [--rules N] [--sink-cpu other|same|any] \
                     [--scale N,N,...] [--no-netfilter] [--no-1m] [--out DIR]";

/// Where the sinks' accept threads run, relative to the client's CPU.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum SinkCpu {
    /// CPU 0, the client on the last CPU.
    Other,
    /// The client's CPU.
    Same,
    /// Wherever the scheduler likes.
    Any,
}

/// Command-line options (after `cargo bench ... --`).
pub struct Options {
    /// Rounds of metric 1: each runs one block per contender.
    pub rounds: usize,
    /// Timed connects per block.
    pub count: u64,
    /// A block stops early after this long (iptables with 10,000 rules needs it).
    pub budget_ms: u64,
    /// Untimed connects before each block.
    pub warmup: u64,
    /// Rounds of metric 2.
    pub stats_rounds: usize,
    /// Rules of the main ruleset.
    pub rules: usize,
    pub sink_cpu: SinkCpu,
    /// Run the iptables-nft and nft contenders.
    pub netfilter: bool,
    /// Key counts of the rule-scaling contenders (metric 3); `rules` is always one of them.
    pub scale: Vec<usize>,
    /// Where to write `connect.md` and `connect.json` (besides printing the report).
    pub out: Option<std::path::PathBuf>,
}

fn parse(args: &[String]) -> Options {
    let mut options = Options {
        rounds: 50,
        count: 2000,
        budget_ms: 150,
        warmup: 100,
        stats_rounds: 10,
        rules: 10_000,
        sink_cpu: SinkCpu::Other,
        netfilter: true,
        scale: vec![1_000, 10_000, 100_000, 1_000_000],
        out: None,
    };
    let mut args = common::Flags::new(args, USAGE);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            // cargo bench passes --bench to a harness = false target.
            "--bench" => {}
            "--rounds" => options.rounds = args.number::<u64>("--rounds") as usize,
            "--count" => options.count = args.number::<u64>("--count"),
            "--budget-ms" => options.budget_ms = args.number::<u64>("--budget-ms"),
            "--warmup" => options.warmup = args.number::<u64>("--warmup"),
            "--stats-rounds" => {
                options.stats_rounds = args.number::<u64>("--stats-rounds") as usize
            }
            "--rules" => options.rules = args.number::<u64>("--rules") as usize,
            "--sink-cpu" => {
                options.sink_cpu = match args.next().map(String::as_str) {
                    Some("other") => SinkCpu::Other,
                    Some("same") => SinkCpu::Same,
                    Some("any") => SinkCpu::Any,
                    other => panic!("--sink-cpu other|same|any, not {other:?}"),
                }
            }
            "--no-netfilter" => options.netfilter = false,
            "--no-1m" => options.scale.retain(|&n| n < 1_000_000),
            "--scale" => {
                let list = args
                    .next()
                    .unwrap_or_else(|| panic!("--scale needs a list; {USAGE}"));
                options.scale = list
                    .split(',')
                    .map(|n| {
                        n.trim()
                            .replace('_', "")
                            .parse()
                            .unwrap_or_else(|e| panic!("--scale {list}: {e}"))
                    })
                    .collect();
            }
            "--out" => options.out = Some(args.dir("--out")),
            other => panic!("unknown argument {other:?}; {USAGE}"),
        }
    }
    assert!(
        options.rounds >= 1 && options.count >= 1 && options.stats_rounds >= 1,
        "{USAGE}"
    );
    assert!(
        (2..=rulesets::ONE_PORT_MAX).contains(&options.rules),
        "--rules must be 2..=16384 (a /29 slot each in 198.18.0.0/15)"
    );
    for &n in &options.scale {
        assert!(
            (2..=rulesets::ONE_PORT_MAX).contains(&n)
                || (n <= 1_000_000 && n.is_multiple_of(n.div_ceil(100_000))),
            "--scale {n}: 2..=16384, or up to 1,000,000 in whole rules of up to 10 ports (100,000, 1,000,000)"
        );
    }
    if !options.scale.contains(&options.rules) {
        options.scale.push(options.rules);
    }
    options.scale.sort_unstable();
    options.scale.dedup();
    options
}

fn main() -> ExitCode {
    common::bench_main("connect", |args| {
        let options = parse(args);
        run(&options);
    })
}

fn run(options: &Options) {
    let started = Instant::now();
    let cpus = thread::available_parallelism().map_or(1, |n| n.get());
    let client_cpu = (cpus > 1).then_some(cpus - 1);
    let sink_cpu = match options.sink_cpu {
        SinkCpu::Other => client_cpu.map(|_| 0),
        SinkCpu::Same => client_cpu,
        SinkCpu::Any => None,
    };
    let stats_were_on =
        fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").is_ok_and(|s| s.trim() != "0");
    let target = sa(V4_A, PORT);
    eprintln!(
        "bench connect: setting up the contenders ({} rules; scaling over {} keys)...",
        thousands(options.rules),
        options
            .scale
            .iter()
            .map(|&n| thousands(n))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut contenders = vec![Contender::new(
        "no filter",
        target,
        Expect::Connected,
        sink_cpu,
    )];
    let mut notes = Vec::new();
    for &keys in &options.scale {
        let policy = policy_keys(keys);
        let name = format!("egress, {}", describe(&policy, keys));
        eprintln!("bench connect: {name}: loading...");
        let contender =
            Contender::new(name, target, Expect::Connected, sink_cpu).of(Kind::Egress, keys);
        let loading = Instant::now();
        match pipeline::apply(&contender.sandbox.target(), &policy) {
            Ok(enforcer) if loading.elapsed() < Duration::from_secs(60) => {
                contenders.push(contender.enforced_by(enforcer, loading.elapsed()));
            }
            Ok(_) => notes.push(format!(
                "egress with {} keys took {:.1?} to load (over 60 s): not measured",
                thousands(keys),
                loading.elapsed()
            )),
            // The main ruleset must load; a scaling one that does not is reported.
            Err(e) if keys != options.rules => notes.push(format!(
                "egress with {} keys did not load: {}",
                thousands(keys),
                chain(&e)
            )),
            Err(e) => panic!("loading the {}-rule policy: {}", thousands(keys), chain(&e)),
        }
    }
    if options.netfilter {
        let mut rulesets = Vec::new();
        for &keys in &options.scale {
            let policy = policy_keys(keys);
            let n = thousands(keys);
            rulesets.push((
                Contender::new(
                    format!("iptables-nft, {n} rules in OUTPUT"),
                    target,
                    Expect::Connected,
                    sink_cpu,
                )
                .of(Kind::IptablesNft, keys),
                &["iptables-nft-restore"][..],
                iptables_rules(&policy),
            ));
            rulesets.push((
                Contender::new(
                    format!("nft interval set, {n} elements"),
                    target,
                    Expect::Connected,
                    sink_cpu,
                )
                .of(Kind::NftSet, keys),
                &["nft", "-f", "-"][..],
                nft_rules(&policy),
            ));
        }
        eprintln!(
            "bench connect: loading {} netfilter rulesets in parallel (1,000,000 rules take a minute or two)...",
            rulesets.len()
        );
        thread::scope(|scope| {
            for (contender, loader, rules) in &mut rulesets {
                scope.spawn(move || contender.load_ruleset(loader, rules));
            }
        });
        contenders.extend(rulesets.into_iter().map(|(contender, _, _)| contender));
    }
    // Scopes: the main ruleset node-wide, ten namespaces with rules of their own, and the
    // client's cgroup in one of them, as a pod's: the hooks walk the cgroup's ancestors to
    // find its scope, then look up the scope's copy of the keys.
    contenders.push(
        Contender::new(
            format!(
                "egress, {} rules + {} namespaces, socket in a scope",
                thousands(options.rules),
                rulesets::SCOPES
            ),
            target,
            Expect::Connected,
            sink_cpu,
        )
        .of(Kind::EgressScoped, options.rules)
        .with_egress_in_scope(&rulesets::policy_scoped(options.rules), "ns-5"),
    );
    contenders.push(
        Contender::new(
            format!("egress, {} rules, denied (EPERM)", thousands(options.rules)),
            sa(V4_A, DENIED_PORT),
            Expect::Denied,
            sink_cpu,
        )
        .of(Kind::EgressDenied, options.rules)
        .with_egress(&policy_keys(options.rules)),
    );
    let setup = started.elapsed();

    // Metric 1: connect() cost, contenders interleaved a block at a time.
    eprintln!(
        "bench connect: {} rounds of {} contenders, blocks of {} connects (or {} ms) after {} warm-up; mean us:",
        options.rounds,
        contenders.len(),
        options.count,
        options.budget_ms,
        options.warmup
    );
    for (i, c) in contenders.iter().enumerate() {
        eprintln!("  [{i}] {}", c.name);
    }
    for c in &mut contenders {
        c.begin();
        // Start the client and warm everything up once, untimed; a slow contender gets at most
        // a tenth of its block budget of untimed connects from then on.
        let first = c.block(client_cpu, 0, options.count, options.budget_ms);
        let budget_ns = options.budget_ms * 1_000_000;
        c.warmup = options
            .warmup
            .min(budget_ns / 10 / first.mean_ns.max(1))
            .max(1);
    }
    let count = contenders.len();
    for round in 0..options.rounds {
        // Each round starts one contender later, so none always follows the same one (a block
        // after iptables' 10,000-rule walk starts with colder caches).
        for i in (0..count).map(|k| (round + k) % count) {
            let c = &mut contenders[i];
            let r = c.block(client_cpu, c.warmup, options.count, options.budget_ms);
            c.rounds.push(r);
        }
        let means: Vec<String> = contenders
            .iter()
            .enumerate()
            .map(|(i, c)| format!("[{i}] {:.2}", us(c.rounds[round].mean_ns as f64)))
            .collect();
        eprintln!("  round {:>3}: {}", round + 1, means.join(" "));
    }
    for c in &contenders {
        c.verify();
    }

    // Metric 2: program run time, stats on.
    eprintln!(
        "bench connect: program run time with BPF_ENABLE_STATS, {} rounds...",
        options.stats_rounds
    );
    let mut measured: Vec<&mut Contender> = contenders
        .iter_mut()
        .filter(|c| c.enforcer.is_some())
        .collect();
    let run_times = measure_run_time(&mut measured, options, client_cpu);

    let context = Context {
        stats_were_on,
        setup,
        elapsed: started.elapsed(),
        client_cpu,
        sink_cpu,
    };
    print_report(options, &contenders, &run_times, &notes, &context);
}

/// "10,000 rules" for a policy of one key per rule, "1,000,000 keys (100,000 rules)" otherwise.
fn describe(policy: &egress_user::policy::Policy, keys: usize) -> String {
    if policy.rules.len() == keys {
        format!("{} rules", thousands(keys))
    } else {
        format!(
            "{} keys ({} rules)",
            thousands(keys),
            thousands(policy.rules.len())
        )
    }
}
