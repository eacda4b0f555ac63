//! Part 2: `connect()` to an address an FQDN rule allows (a learned entry, looked up after
//! the rule keys miss) against one a CIDR rule allows (a rule key), on the same agent,
//! interleaved a block at a time.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    process::Command,
    time::Instant,
};

use egress_common::PROTO_TCP;
use egress_tests::sa;

pub use crate::client::Round;
use crate::{Options, check_interrupted, client::Client, sink::FastSink, world::World};

const LOOP: &str = env!("CARGO_BIN_EXE_egress-connect-loop");

/// The FQDN rule's name and its address.
const NAME: &str = "www.bench.test";
const BY_NAME: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
/// The address the CIDR rule allows.
const BY_CIDR: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
const PORT: u16 = 443;
/// The answer's TTL: the entry outlives the bench.
const TTL: u32 = 3600;

const POLICY: &str = "\
kind: EgressRule
metadata: {name: by-name}
spec:
  destination: {service: www.bench.test}
  ports: [{port: 443, protocol: tcp}]
---
kind: EgressRule
metadata: {name: by-cidr}
spec:
  destination: {service: 198.51.100.10/32}
  ports: [{port: 443, protocol: tcp}]
";

/// One destination's blocks.
pub struct Series {
    /// `FQDN-allowed (learned entry)` or `CIDR-allowed (rule key)`.
    pub label: &'static str,
    pub rule: &'static str,
    pub target: SocketAddr,
    pub blocks: Vec<Round>,
}

/// Part 2's results.
pub struct Results {
    /// The FQDN destination first, then the CIDR one.
    pub series: [Series; 2],
    pub client_cpu: Option<usize>,
    pub seconds: f64,
}

/// Runs part 2.
pub fn run(options: &Options) -> Results {
    let started = Instant::now();
    eprintln!("bench dns: part 2, connects to a learned address against a CIDR-allowed one...");
    let world = World::start(
        "connects",
        POLICY,
        &[format!("{BY_NAME}/32"), format!("{BY_CIDR}/32")],
    );
    world.dns.set_a(NAME, &[BY_NAME], TTL);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    // As in the connect bench: the sinks' accept threads on CPU 0, the client on the last.
    let (sink_cpu, client_cpu) = if cpus > 1 {
        (Some(0), Some(cpus - 1))
    } else {
        (None, None)
    };
    let targets = [sa(BY_NAME, PORT), sa(BY_CIDR, PORT)];
    let sinks = targets.map(|t| FastSink::start(&world.sb.name, t, sink_cpu));

    // Not allowed before its name is resolved...
    let denied = Command::new(LOOP)
        .arg("--cgroup")
        .arg(&world.sb.cgroup)
        .args(["--netns", &world.sb.name, "--expect", "denied"])
        .args(["--warmup", "0", "--count", "1", &targets[0].to_string()])
        .output()
        .expect("running egress-connect-loop");
    assert!(
        denied.status.success(),
        "{} should be refused before {NAME} is resolved: {}",
        targets[0],
        String::from_utf8_lossy(&denied.stderr)
    );
    // ...and allowed by the entry one lookup through the agent writes.
    let got = world.resolve(1, |r| r.run(&[NAME]));
    assert_eq!(
        got.lookups[0].addrs,
        Ok(vec![IpAddr::V4(BY_NAME)]),
        "{NAME}: {got:?}"
    );
    let learned: Vec<_> = world
        .learned()
        .into_iter()
        .map(|e| (e.0, e.1, e.2, e.3))
        .collect();
    assert_eq!(
        learned,
        [(0, PORT, PROTO_TCP, IpAddr::V4(BY_NAME))],
        "the one entry {NAME}'s answer teaches"
    );

    let mut series = [
        Series {
            label: "FQDN-allowed (learned entry)",
            rule: "by-name",
            target: targets[0],
            blocks: Vec::new(),
        },
        Series {
            label: "CIDR-allowed (rule key)",
            rule: "by-cidr",
            target: targets[1],
            blocks: Vec::new(),
        },
    ];
    let allowed_before = series.each_ref().map(|s| world.allowed(s.rule));
    let accepted_before = sinks.each_ref().map(|s| s.wait_for(0));
    let mut clients = series
        .each_ref()
        .map(|s| Client::start(s.label, &world.sb, s.target, true, client_cpu));
    let mut totals = [0u64; 2];
    let rounds = options.connect_warmup_rounds + options.connect_rounds;
    eprintln!(
        "bench dns: {rounds} rounds ({} warm-up), one block per destination each; mean ns FQDN/CIDR:",
        options.connect_warmup_rounds
    );
    for round in 0..rounds {
        check_interrupted();
        let mut means = [0u64; 2];
        // Alternating which goes first.
        for i in [round % 2, 1 - round % 2] {
            let block = clients[i].block(
                options.connect_warmup,
                options.connect_count,
                options.connect_budget_ms,
            );
            totals[i] += block.total;
            means[i] = block.mean_ns;
            if round >= options.connect_warmup_rounds {
                series[i].blocks.push(block);
            }
        }
        if (round + 1).is_multiple_of(20) || round + 1 == rounds {
            eprintln!("  round {:>3}: {} / {}", round + 1, means[0], means[1]);
        }
    }
    drop(clients);
    // Counted at the sinks and in the rules' counters: every connect arrived and was judged
    // by the rule meant to allow it.
    for i in 0..2 {
        let accepted = sinks[i].wait_for(accepted_before[i] + totals[i]) - accepted_before[i];
        assert_eq!(
            accepted, totals[i],
            "{}: the sink accepted {accepted} of {} connects",
            series[i].label, totals[i]
        );
        let allowed = world.allowed(series[i].rule) - allowed_before[i];
        assert_eq!(
            allowed, totals[i],
            "{}: rule {} counted {allowed} of {} connects",
            series[i].label, series[i].rule, totals[i]
        );
    }
    Results {
        series,
        client_cpu,
        seconds: started.elapsed().as_secs_f64(),
    }
}
