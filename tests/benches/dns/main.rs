//! `cargo xtask bench dns`: what FQDN rules cost (BENCHMARKS.md metric 10): the time an app's
//! DNS lookup takes through the agent's DNS path against straight to the resolver; connects to
//! an address an FQDN rule allows against one a CIDR rule allows; and the learned entries and
//! memory that 10,000 names with rotating answers leave.
//!
//! # Method
//! - Every agent is the release build of the `egress` CLI, `egress run --no-watch` in its own
//!   [`Sandbox`](egress_tests::Sandbox) (a fresh network namespace with no route out, a cgroup,
//!   a pin directory, all removed when the bench ends, also when it fails). Each sandbox has the
//!   bench's own DNS server ([`egress_tests::DnsServer`], threads of the bench process inside
//!   the namespace) at `192.0.2.53`, the only nameserver of the sandbox's resolv.conf (`options
//!   timeout:2 attempts:2`), which the agent reads too: the resolver is allowed by the implicit
//!   `(dns)` rule. Names are under `.bench.test`, addresses in TEST-NET and 198.18.0.0/15, all
//!   on the sandbox's own veth. The app is `egress-resolve`: glibc's `getaddrinfo()` with
//!   `AF_INET` (one A query per lookup, no cache: glibc has none without nscd), in the managed
//!   cgroup, each call timed in the process (`--latencies`). Everything runs at nice `--nice`.
//! - **1. DNS answer latency.** Two sandboxes with the same DNS server setup: *direct*, whose
//!   policy has a CIDR rule and no FQDN rule (so the DNS path is off and glibc's query goes to
//!   the resolver), and *agent*, whose policy also has the FQDN rule `*.bench.test` 443/tcp
//!   (so the kernel sends the query to the agent's listener, which asks the resolver, writes
//!   the answer's address into `LEARNED_V4`, then answers). Each side is measured two ways:
//!   the *same name* (`www.bench.test`) every lookup, which the agent learns again each time
//!   (the realistic case: an app that resolves its API's name before each request), and a
//!   *new name* every lookup (`dN.bench.test`, each with an address of its own: each answer is
//!   a new map entry). The four contenders run interleaved, one block of `--lookups` lookups
//!   (one process) per contender per round, the order rotating, `--warmup` rounds first, then
//!   `--rounds`. Reported: p50/p90/p99/max over all lookups pooled, the first lookup of each
//!   process left out (it also reads resolv.conf and nsswitch.conf; its median is shown
//!   apart), and the agent minus direct, pooled and per round (median and min-max over rounds
//!   of the difference of the blocks' p50s and p99s, which `egress-resolve` summed up).
//! - **2. Connects.** One agent whose policy has the FQDN rule `www.bench.test` 443/tcp and the
//!   CIDR rule `198.51.100.10/32` 443/tcp, a fast sink on each address (the connect bench's
//!   `FastSink`, on CPU 0). `192.0.2.10:443` is refused until one lookup through the agent (TTL
//!   3600 s) writes its entry; then one `egress-connect-loop --serve` per destination (the
//!   connect bench's load generator, pinned to the last CPU; only `connect()` is timed) runs a
//!   block (100 untimed connects, then up to `--connects` timed or `--budget-ms`) per
//!   destination per round, alternating which goes first, 2 warm-up rounds, then
//!   `--connect-rounds`. Reported: median (min-max) over rounds of the block means and p50s,
//!   connects per second (1 / mean connect time) and the ratio FQDN / CIDR per round.
//! - **3. 10,000 names.** One agent with the FQDN rule `*.bench.test` 443/tcp; the zone has
//!   `--names` names `nN.bench.test`, each with two A records in 198.18.0.0/16 (TTL
//!   `--first-ttl-s`, 20 s). One `egress-resolve` resolves them all in turn; then every name's
//!   answer changes to two new addresses in 198.19.0.0/16 (TTL 3600 s) and it resolves them
//!   all again; then the bench waits until the agent's sweep (every 10 s) has removed the
//!   first round's expired entries. At each point: `LEARNED_V4`'s entries, its and
//!   `LEARNED_V6`'s kernel memory (`bpftool map show pinned ... -j`, `bytes_memlock`: for these
//!   maps without preallocation, what the entries take), the agent's `VmRSS` and `VmHWM`; per
//!   round its time, the lookups' p50/p99 and the agent's CPU time.
//!
//! # Checks
//! The bench stops with an error when: a lookup fails or gives another address than the zone's
//! (every lookup is checked, in both rounds of part 3 both addresses); an agent-side answer was
//! not learned during its block (the same name's entry must expire at least TTL after the
//! block started), or the direct side learned anything; the FQDN destination is not refused
//! before its lookup, or a connect to either destination fails; a sink did not accept every
//! connect or a rule's `allowed` counter did not move by exactly the connects made; part 3's
//! learned addresses are not exactly the answers' (both rounds' until the first ones expire,
//! the second's alone after the sweep, which must come within TTL + 20 s); an `egress-resolve`
//! run takes longer than 30 s plus 20 ms a lookup (it is killed: a resolver that stops
//! answering would otherwise cost 4 s a lookup).
//!
//! # Options (after `cargo bench -p egress-tests --bench dns --`)
//! `--rounds N` (50), `--lookups N` (300 per block), `--warmup N` (1 round),
//! `--connect-rounds N` (100), `--connects N` (5000 per block), `--budget-ms MS` (200 per
//! block), `--names N` (10000, at most 32768), `--first-ttl-s N` (20), `--parts
//! latency,connect,memory` (all), `--nice N` (-10; 0 leaves priorities alone), `--out DIR`
//! (also writes `dns.md` and `dns.json` there). The defaults take about a minute here.

// The connect bench's load generator.
#[path = "../connect/client.rs"]
mod client;
#[path = "../common/mod.rs"]
mod common;
mod connects;
mod latency;
mod memory;
mod report;
// The connect bench's sink: a blocking accept with a 4096 backlog, on its own CPU.
#[path = "../connect/sink.rs"]
mod sink;
mod world;

use std::{process::ExitCode, time::Instant};

use common::check_interrupted;

pub const USAGE: &str = "usage: cargo bench -p egress-tests --bench dns -- [--rounds N] [--lookups N] \
     [--warmup N] [--connect-rounds N] [--connects N] [--budget-ms MS] [--names N] [--first-ttl-s N] \
     [--parts latency,connect,memory] [--nice N] [--out DIR]";

/// Command-line options (after `cargo bench ... --`).
pub struct Options {
    /// Part 1: measured rounds, lookups per block, uncounted rounds first.
    pub rounds: usize,
    pub lookups: usize,
    pub warmup: usize,
    /// Part 2: measured rounds, uncounted rounds first, and per block: untimed connects,
    /// timed connects at most, and the time after which it stops early.
    pub connect_rounds: usize,
    pub connect_warmup_rounds: usize,
    pub connect_warmup: u64,
    pub connect_count: u64,
    pub connect_budget_ms: u64,
    /// Part 3: names, and the TTL of their first answers.
    pub names: usize,
    pub first_ttl: u32,
    /// Which parts run.
    pub latency: bool,
    pub connect: bool,
    pub memory: bool,
    /// Nice value of the bench and everything it starts.
    pub nice: i32,
    /// Where to write `dns.md` and `dns.json` (besides printing the report).
    pub out: Option<std::path::PathBuf>,
}

/// Part 3's addresses: two per name in each /16 of 198.18.0.0/15.
const MAX_NAMES: usize = 32_768;

fn parse(args: &[String]) -> Options {
    let mut options = Options {
        rounds: 50,
        lookups: 300,
        warmup: 1,
        connect_rounds: 100,
        connect_warmup_rounds: 2,
        connect_warmup: 100,
        connect_count: 5_000,
        connect_budget_ms: 200,
        names: 10_000,
        first_ttl: 20,
        latency: true,
        connect: true,
        memory: true,
        nice: -10,
        out: None,
    };
    let mut args = common::Flags::new(args, USAGE).with_separators();
    while let Some(arg) = args.next() {
        let flag = arg.as_str();
        match flag {
            // cargo bench passes --bench to a harness = false target.
            "--bench" => {}
            "--rounds" => options.rounds = args.number(flag),
            "--lookups" => options.lookups = args.number(flag),
            "--warmup" => options.warmup = args.number(flag),
            "--connect-rounds" => options.connect_rounds = args.number(flag),
            "--connects" => options.connect_count = args.number(flag),
            "--budget-ms" => options.connect_budget_ms = args.number(flag),
            "--names" => options.names = args.number(flag),
            "--first-ttl-s" => options.first_ttl = args.number(flag),
            "--parts" => {
                let list = args.value(flag);
                let parts: Vec<&str> = list.split(',').filter(|p| !p.is_empty()).collect();
                for part in &parts {
                    assert!(
                        ["latency", "connect", "memory"].contains(part),
                        "--parts: unknown part {part:?}; {USAGE}"
                    );
                }
                options.latency = parts.contains(&"latency");
                options.connect = parts.contains(&"connect");
                options.memory = parts.contains(&"memory");
            }
            "--nice" => options.nice = args.number(flag),
            "--out" => options.out = Some(args.dir(flag)),
            other => panic!("unknown argument {other:?}; {USAGE}"),
        }
    }
    assert!(
        options.rounds >= 1 && options.lookups >= 2 && options.connect_rounds >= 1,
        "at least 1 round of 2 lookups and 1 connect round; {USAGE}"
    );
    assert!(
        (options.warmup + options.rounds) * options.lookups < 65_536,
        "part 1's new names need an address each in 198.18.0.0/16: (warmup + rounds) x lookups < 65,536"
    );
    assert!(
        (1..=MAX_NAMES).contains(&options.names),
        "--names must be 1..={MAX_NAMES}"
    );
    assert!(
        options.first_ttl >= 5,
        "--first-ttl-s below 5 s is held for 5 s (the floor) anyway"
    );
    assert!(
        options.latency || options.connect || options.memory,
        "--parts names no part"
    );
    options
}

fn main() -> ExitCode {
    common::bench_main("dns", |args| {
        let options = parse(args);
        common::catch_interrupts();
        run(&options);
    })
}

fn run(options: &Options) {
    let started = Instant::now();
    // Before any thread or process is started: they all inherit it.
    common::set_nice(options.nice);
    // Each part's agents and sandboxes are gone before the next part starts.
    let latency = options.latency.then(|| latency::run(options));
    let connects = options.connect.then(|| connects::run(options));
    let memory = options.memory.then(|| memory::run(options));
    report::print(
        options,
        latency.as_ref(),
        connects.as_ref(),
        memory.as_ref(),
        started.elapsed(),
    );
}
