//! Part 1: the time glibc's `getaddrinfo()` takes for one A query, through the agent's DNS
//! path against straight to the resolver, in interleaved blocks.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr},
    time::Instant,
};

use egress_common::PROTO_TCP;
use egress_tests::{Resolved, resolve::Latencies};

use crate::{
    Options, check_interrupted,
    world::{World, nth},
};

/// The name every lookup of the *same name* contenders asks, and its address.
pub const SAME_NAME: &str = "www.bench.test";
const SAME_ADDR: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
/// The *new name* contenders ask `dN.bench.test`, answered with `DISTINCT_BASE + N`.
const DISTINCT_BASE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The answers' TTL: every entry learned here outlives the bench.
const TTL: u32 = 3600;

/// A CIDR rule both policies have, so that the direct policy is not empty (it allows nothing
/// the bench uses).
const OTHER_RULE: &str = "\
kind: EgressRule
metadata: {name: other}
spec:
  destination: {service: 203.0.113.0/24}
  ports: [{port: 443, protocol: tcp}]
";

/// The FQDN rule of the *agent* policy.
const FQDN_RULE: &str = "\
kind: EgressRule
metadata: {name: bench}
spec:
  destination: {service: \"*.bench.test\"}
  ports: [{port: 443, protocol: tcp}]
";

/// Which way the queries go.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Path {
    /// No FQDN rule: the DNS path is off, glibc's query goes to the resolver.
    Direct,
    /// An FQDN rule matches: the query goes to the agent's listener, which asks the
    /// resolver, learns the answer's address, then answers.
    Agent,
}

/// What each lookup asks.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Names {
    /// [`SAME_NAME`] every time (each answer is learned again: no cache in glibc).
    Same,
    /// A name never asked before, each with an address of its own (each answer is a new
    /// entry).
    Distinct,
}

/// One contender's measurements.
pub struct Series {
    pub path: Path,
    pub names: Names,
    /// Every timed lookup, microseconds, in order.
    pub samples: Vec<u64>,
    /// Each block's percentiles, as `egress-resolve` summed them up.
    pub blocks: Vec<Latencies>,
    /// The first lookup of each process (it also reads resolv.conf and nsswitch.conf):
    /// reported apart, not in `samples`.
    pub firsts: Vec<u64>,
}

/// Part 1's results.
pub struct Results {
    pub series: Vec<Series>,
    /// Lookups per block and measured rounds.
    pub lookups: usize,
    pub rounds: usize,
    /// Entries the *agent* side learned (the new names' plus the same name's).
    pub learned: usize,
    pub seconds: f64,
}

impl Series {
    pub fn label(&self) -> String {
        format!(
            "{}, {}",
            match self.path {
                Path::Direct => "direct",
                Path::Agent => "through the agent",
            },
            match self.names {
                Names::Same => "same name",
                Names::Distinct => "a new name each lookup",
            }
        )
    }
}

/// Runs part 1: two worlds (direct and agent), each with the same zone; `--rounds` rounds
/// after `--warmup`, each one block of `--lookups` per contender, the order rotating.
pub fn run(options: &Options) -> Results {
    let started = Instant::now();
    let blocks = options.warmup + options.rounds;
    let distinct_total = blocks * options.lookups;
    eprintln!("bench dns: part 1, DNS answer latency: starting two agents...");
    let world = |path: Path| {
        let policy = match path {
            Path::Direct => OTHER_RULE.to_owned(),
            Path::Agent => format!("{OTHER_RULE}---\n{FQDN_RULE}"),
        };
        let w = World::start(&format!("{path:?}"), &policy, &[]);
        w.dns.set_a(SAME_NAME, &[SAME_ADDR], TTL);
        for i in 0..distinct_total {
            w.dns
                .set_a(&distinct_name(i), &[nth(DISTINCT_BASE, i)], TTL);
        }
        w
    };
    let direct = world(Path::Direct);
    let agent = world(Path::Agent);
    let mut series: Vec<Series> = [
        (Path::Direct, Names::Same),
        (Path::Agent, Names::Same),
        (Path::Direct, Names::Distinct),
        (Path::Agent, Names::Distinct),
    ]
    .into_iter()
    .map(|(path, names)| Series {
        path,
        names,
        samples: Vec::new(),
        blocks: Vec::new(),
        firsts: Vec::new(),
    })
    .collect();
    // Which new name each new-name contender asks next.
    let mut next = [0usize; 2];
    eprintln!(
        "bench dns: {blocks} rounds ({} warm-up) of {} lookups per contender; p50/p99 us:",
        options.warmup, options.lookups
    );
    for round in 0..blocks {
        check_interrupted();
        let count = series.len();
        let mut line = Vec::new();
        for k in (0..count).map(|k| (round + k) % count) {
            let s = &mut series[k];
            let world = if s.path == Path::Direct {
                &direct
            } else {
                &agent
            };
            let block_started = egress_user::loader::learned::monotonic_ns();
            let (got, expected) = match s.names {
                Names::Same => (
                    world.resolve(options.lookups, |r| {
                        r.rounds(options.lookups as u64, std::time::Duration::ZERO)
                            .run(&[SAME_NAME])
                    }),
                    vec![(SAME_NAME.to_owned(), SAME_ADDR); options.lookups],
                ),
                Names::Distinct => {
                    let from = &mut next[usize::from(s.path == Path::Agent)];
                    let expected: Vec<(String, Ipv4Addr)> = (*from..*from + options.lookups)
                        .map(|i| (distinct_name(i), nth(DISTINCT_BASE, i)))
                        .collect();
                    *from += options.lookups;
                    let names: Vec<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
                    (world.resolve(names.len(), |r| r.run(&names)), expected)
                }
            };
            check_block(&got, &expected, &s.label());
            if s.path == Path::Agent {
                check_learned(world, &expected, block_started, &s.label());
            }
            let times: Vec<u64> = got
                .lookups
                .iter()
                .map(|l| l.latency_us.expect("--latencies"))
                .collect();
            let summary = got.summary.latency_us.expect("--latencies");
            line.push(format!("[{k}] {}/{}", summary.p50, summary.p99));
            if round >= options.warmup {
                s.firsts.push(times[0]);
                s.samples.extend(&times[1..]);
                s.blocks.push(summary);
            }
        }
        if round < options.warmup || (round + 1).is_multiple_of(10) || round + 1 == blocks {
            eprintln!(
                "  round {:>3}{}: {}",
                round + 1,
                if round < options.warmup {
                    " (warm-up)"
                } else {
                    ""
                },
                line.join("  ")
            );
        }
    }
    // DNS was never redirected in the direct world: nothing was learned there.
    let direct_learned = direct.learned();
    assert!(
        direct_learned.is_empty(),
        "the direct world (no FQDN rule) learned {} entries: its queries went through an agent",
        direct_learned.len()
    );
    let learned = agent.learned().len();
    assert_eq!(
        learned,
        next[1] + 1,
        "the agent world should hold one entry per new name plus {SAME_NAME}'s"
    );
    Results {
        series,
        lookups: options.lookups,
        rounds: options.rounds,
        learned,
        seconds: started.elapsed().as_secs_f64(),
    }
}

fn distinct_name(i: usize) -> String {
    format!("d{i}.bench.test")
}

/// Every lookup succeeded with the expected address.
fn check_block(got: &Resolved, expected: &[(String, Ipv4Addr)], label: &str) {
    assert!(
        got.summary.lookup_errors.is_empty() && got.lookups.len() == expected.len(),
        "{label}: {} of {} lookups, errors {:?}",
        got.lookups.len(),
        expected.len(),
        got.summary.lookup_errors
    );
    for (lookup, (name, addr)) in got.lookups.iter().zip(expected) {
        assert!(
            lookup.name == *name && lookup.addrs == Ok(vec![IpAddr::V4(*addr)]),
            "{label}: {name} should resolve to {addr}, got {lookup:?}"
        );
    }
}

/// The agent learned every answer of the block: each address is allowed on 443/tcp for
/// scope 0, until at least `TTL` after the block started (so the same name's entry was
/// written again during this block, not only before it).
fn check_learned(world: &World, expected: &[(String, Ipv4Addr)], since_ns: u64, label: &str) {
    let expiry: HashMap<IpAddr, u64> = world
        .learned()
        .into_iter()
        .filter(|e| (e.0, e.1, e.2) == (0, 443, PROTO_TCP))
        .map(|e| (e.3, e.4.expires_ns))
        .collect();
    let ttl_ns = u64::from(TTL) * 1_000_000_000;
    for (name, addr) in expected {
        let found = expiry
            .get(&IpAddr::V4(*addr))
            .is_some_and(|&expires| expires >= since_ns + ttl_ns);
        assert!(
            found,
            "{label}: {name}'s answer {addr} was not learned during the block; the agent's log:\n{}",
            world.agent.log()
        );
    }
}
