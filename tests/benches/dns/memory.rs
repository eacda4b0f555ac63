//! Part 3: what 10,000 names with rotating answers leave in the kernel and in the agent.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
    thread,
    time::{Duration, Instant},
};

use egress_common::PROTO_TCP;
use egress_tests::resolve::Latencies;

use crate::{
    Options, check_interrupted,
    common::thousands,
    world::{Footprint, World, nth},
};

/// The answers of the first round: `nN.bench.test` gets `FIRST + 2N` and `FIRST + 2N + 1`.
const FIRST: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 0);
/// The second round's (the rotated answers), in the other half of 198.18.0.0/15.
const SECOND: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 0);
/// The second round's TTL: its entries outlive the bench.
const SECOND_TTL: u32 = 3600;
/// How often the agent removes expired entries (docs/policy.md, "For how long").
const SWEEP_EVERY: Duration = Duration::from_secs(10);

const POLICY: &str = "\
kind: EgressRule
metadata: {name: bench}
spec:
  destination: {service: \"*.bench.test\"}
  ports: [{port: 443, protocol: tcp}]
";

/// One round of lookups of every name.
pub struct Round {
    /// From starting `egress-resolve` to its exit (every name, one process).
    pub seconds: f64,
    /// Its lookups' `getaddrinfo()` times.
    pub latency: Latencies,
    /// The agent's CPU time during the round.
    pub agent_cpu_s: f64,
}

/// Part 3's results.
pub struct Results {
    pub names: usize,
    pub first_ttl: u32,
    /// The agent after start-up, after each round, and once the first round's entries expired
    /// and were swept (with how long after the first round's end that was seen).
    pub idle: Footprint,
    pub after: [Footprint; 2],
    pub swept: (Footprint, f64),
    pub rounds: [Round; 2],
    pub seconds: f64,
}

fn name(i: usize) -> String {
    format!("n{i}.bench.test")
}

/// The two answers of name `i` in a round whose addresses start at `base`.
fn answers(base: Ipv4Addr, i: usize) -> [Ipv4Addr; 2] {
    [nth(base, 2 * i), nth(base, 2 * i + 1)]
}

/// Runs part 3.
pub fn run(options: &Options) -> Results {
    let started = Instant::now();
    let n = options.names;
    eprintln!(
        "bench dns: part 3, {} names with rotating answers...",
        thousands(n)
    );
    let world = World::start("names", POLICY, &[]);
    for i in 0..n {
        world
            .dns
            .set_a(&name(i), &answers(FIRST, i), options.first_ttl);
    }
    let names: Vec<String> = (0..n).map(name).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let idle = world.footprint();
    assert_eq!(idle.entries_v4, 0, "a fresh agent has learned nothing");

    let first_started = Instant::now();
    let first = round(&world, &names, FIRST, 1);
    let first_ended = Instant::now();
    let after_first = world.footprint();
    let expected_first: BTreeSet<Ipv4Addr> = (0..n).flat_map(|i| answers(FIRST, i)).collect();
    assert!(
        first_ended - first_started < Duration::from_secs(options.first_ttl.into()),
        "the first round took {:?}, longer than its answers' TTL ({} s): raise --first-ttl-s",
        first_ended - first_started,
        options.first_ttl
    );
    assert_eq!(
        learned_v4(&world),
        expected_first,
        "after the first round: every answer's two addresses, on 443/tcp for scope 0"
    );

    check_interrupted();
    for i in 0..n {
        world.dns.set_a(&name(i), &answers(SECOND, i), SECOND_TTL);
    }
    let second = round(&world, &names, SECOND, 2);
    let after_second = world.footprint();
    let expected_second: BTreeSet<Ipv4Addr> = (0..n).flat_map(|i| answers(SECOND, i)).collect();
    let held = learned_v4(&world);
    assert!(
        held.is_superset(&expected_second),
        "after the second round every new address is learned"
    );
    // Until the first round's answers expire, both rounds' addresses are allowed.
    if first_started.elapsed() < Duration::from_secs(options.first_ttl.into()) {
        assert_eq!(
            held.len(),
            4 * n,
            "both rounds' addresses until the first ones expire"
        );
    }

    // The first round's entries expire `first_ttl` after they were written; the agent's sweep
    // removes them within SWEEP_EVERY; the second round's stay.
    check_interrupted();
    let deadline = first_ended + Duration::from_secs(options.first_ttl.into()) + SWEEP_EVERY * 2;
    let swept = loop {
        let held = learned_v4(&world);
        if held == expected_second {
            break (world.footprint(), first_ended.elapsed().as_secs_f64());
        }
        assert!(
            Instant::now() < deadline,
            "{:.0?} after the first round, {} entries are held, not the second round's {} alone",
            first_ended.elapsed(),
            held.len(),
            expected_second.len()
        );
        check_interrupted();
        thread::sleep(Duration::from_millis(250));
    };
    Results {
        names: n,
        first_ttl: options.first_ttl,
        idle,
        after: [after_first, after_second],
        swept,
        rounds: [first, second],
        seconds: started.elapsed().as_secs_f64(),
    }
}

/// Resolves every name once (one `egress-resolve`) and checks each answer.
fn round(world: &World, names: &[&str], base: Ipv4Addr, which: usize) -> Round {
    let cpu_before = world.agent_cpu_s();
    let started = Instant::now();
    let got = world.resolve(names.len(), |r| r.run(names));
    let seconds = started.elapsed().as_secs_f64();
    let agent_cpu_s = world.agent_cpu_s() - cpu_before;
    assert!(
        got.summary.lookup_errors.is_empty() && got.lookups.len() == names.len(),
        "round {which}: {} of {} lookups, errors {:?}",
        got.lookups.len(),
        names.len(),
        got.summary.lookup_errors
    );
    for (i, lookup) in got.lookups.iter().enumerate() {
        let mut addrs = lookup.addrs.clone().unwrap_or_default();
        addrs.sort();
        let want = answers(base, i).map(IpAddr::V4);
        assert!(
            lookup.name == names[i] && addrs == want,
            "round {which}: {} should resolve to {want:?}, got {lookup:?}",
            names[i]
        );
    }
    eprintln!(
        "  round {which}: {} lookups in {seconds:.1} s, agent CPU {agent_cpu_s:.2} s",
        thousands(names.len())
    );
    Round {
        seconds,
        latency: got.summary.latency_us.expect("--latencies"),
        agent_cpu_s,
    }
}

/// The learned IPv4 addresses, checking that every entry is for scope 0 on 443/tcp.
fn learned_v4(world: &World) -> BTreeSet<Ipv4Addr> {
    world
        .learned()
        .into_iter()
        .map(|(scope, port, proto, addr, _)| {
            assert_eq!(
                (scope, port, proto),
                (0, 443, PROTO_TCP),
                "an entry other than scope 0, 443/tcp: {addr}"
            );
            match addr {
                IpAddr::V4(v4) => v4,
                IpAddr::V6(v6) => panic!("an IPv6 entry from A answers: {v6}"),
            }
        })
        .collect()
}
