//! `cargo xtask bench reload`: how long a policy change takes to be enforced by a running
//! `egress run`, and how long a large policy takes to load.
//!
//! # Method
//! - Every measured agent is the release build of the `egress` CLI (`egress-cli`, built by
//!   `cargo bench` with this target), started as `egress run --policy DIR` in its own
//!   [`Sandbox`](egress_tests::Sandbox): a fresh network namespace with no route out (where its
//!   proxy listens), its own cgroup, pin directory, state directory and control socket, all
//!   removed when the bench ends, also when it fails. Its log (`EGRESS_LOG=info`) is read line
//!   by line and each line is stamped with `CLOCK_MONOTONIC` when it arrives.
//! - The policies: `N` TCP rules, `N - 1` filler rules (a /32 each in 198.18.0.0/15, never
//!   connected to) and the rule `target`, which allows either `192.0.2.1:8080` (A) or
//!   `198.51.100.1:8080` (B), both on the sandbox's own veth, with a sink listening on each.
//!   Each reload alternates between the two, so each one flips both verdicts; it also moves the
//!   first filler rule to one of three addresses in turn, so each one writes rule keys.
//! - The workload is `egress-verdict-poll`, a process in the managed cgroup and the namespace
//!   (a thread cannot join a cgroup by itself).
//! - Reload to enforced, for each size (`--sizes`, default 10, 1,000 and 10,000 rules), two
//!   ways, each with its own agent and sandbox:
//!   - *round trip*: the agent runs with `--no-watch`; the new file is renamed into the policy
//!     directory (untimed), then the bench sends the `Reload` request on the control socket
//!     itself (what `egress reload` sends, without starting a process) and times until the
//!     answer. The agent answers once the new generation is in force, so right after the
//!     answer the workload must see both new verdicts, at once, without retrying: checked.
//!   - *end to end*: the agent watches its policy directory. The workload starts polling the
//!     destination the new policy allows (every `--poll-us`, 1,000 us; a denied `connect()`
//!     fails with `EPERM` in about a microsecond without sending a packet, so polling costs
//!     almost nothing); then the bench renames the new file into the directory. Measured: from
//!     just before the `rename()` to the return of the first `connect()` that succeeds. This
//!     includes by design the 200 ms the agent waits for the files to be quiet; the table also
//!     shows the time minus 200 ms. The resolution is the gap between the last denied and the
//!     first successful connect (reported). Afterwards the other destination must be denied,
//!     and the agent must log the reload with the next generation, before the next change.
//!   - The `2 x sizes` agents run side by side, and each round does one reload on each, the
//!     round's order starting one agent later each time, so that drift in this shared
//!     machine's load spreads over all of them. `--warmup` rounds first, not counted. Reported:
//!     p50, p99 (nearest rank) and max over `--reloads` rounds, or fewer if `--budget-s` runs
//!     out first: a round takes about 1.5 s on the 2-core VM (most of it the 10,000-rule
//!     reloads and the three 200 ms debounces), so 200 rounds alone take 5 minutes; the budget
//!     (210 s) keeps the whole bench near 5 minutes, and the table says how many were measured.
//! - Everything the bench starts runs at nice -10 (`--nice`): the machine is shared, and a
//!   workload that does not get the CPU for a while reports the flip late.
//! - Where the round trip goes, in the agent: every applied reload logs its steps
//!   (`build_ms`: reading, hashing, parsing and checking the sources; `proxy_ms`;
//!   `kernel_ms`: `pipeline::change`; `total_ms`: all of `Agent::apply`); the bench reads them
//!   from each measured reload's log lines and reports their p50 per size beside the round
//!   trip's, and the p50 of round trip less `total_ms` (the control socket's way in and out).
//!   A reload whose lines lack them stops the bench.
//! - Where the time goes: for each size, in the bench's own process, on a scratch sandbox,
//!   what a reload does one step at a time: parsing and validating the file
//!   (`policy::load_files`), configuring the proxy (`Proxy::new`, which reads the system's
//!   trusted roots), and the kernel generation (`pipeline::apply`: load and fill fresh maps,
//!   load and verify the 5 programs, swap them behind the pinned links; plus dropping the old
//!   generation), and the same change as rules alone (`pipeline::change`, the agent's way:
//!   compiled, written in place in the standby trie, put in force by the generation number:
//!   in this A/B alternation the standby holds the new policy already, so nothing is written,
//!   where the agents' reloads, which also move one rule in a cycle of three, write a key or
//!   two, microseconds); and a reload in which
//!   every rule is new (three such policies in turn: every document parsed, new rows, a
//!   fresh trie). Median of 5.
//! - Start-up at 100,000 rules (`--big-rules`): `--starts` (3) fresh agents, each in a fresh
//!   sandbox; from just before the agent process is spawned until its `ready: enforcing egress
//!   policy` line arrives, and the `loading rules: N%` lines on the way (which must all be
//!   there); then, on the same agent, the round trip of a `Reload` to the other 100,000-rule
//!   policy. Median (min-max). Then 1,000,000 keys (100,000 rules of 10 ports each: a million
//!   separate rules would not fit the 131,072 counter rows), once, unless the 100,000-rule
//!   start-up predicts more than 60 s (a note says so), or `--no-1m`.
//!
//! # Checks
//! The bench stops with an error when a reload is not answered with the next generation, when
//! a verdict is not the new one right after the answer, when the workload does not see the new
//! verdict within the timeout, when the other destination is not denied after a flip, when the
//! agent logs an error or exits, or when the `loading rules` progress lines are missing.
//!
//! # Options (after `cargo bench -p egress-tests --bench reload --`)
//! `--reloads N` (200), `--sizes 10,1000,10000`, `--warmup N` (2 rounds), `--poll-us N` (1000),
//! `--budget-s N` (210; 0: no limit), `--starts N` (3), `--big-rules N` (100000),
//! `--nice N` (-10; 0 leaves priorities alone), `--no-big` (skip start-up and 1M), `--no-1m`.

#[path = "../common/mod.rs"]
mod common;
mod daemon;
mod phases;
mod policies;
mod report;

use std::{
    path::Path,
    process::ExitCode,
    time::{Duration, Instant},
};

use common::check_interrupted;

use daemon::{Agent, IN_FORCE, Line, READY, RELOADED, generation_of, ms_field};
use egress_tests::poll::Poller;
use egress_tests::{Sandbox, Sink};
use egress_user::control::{Request, Response, client};
use phases::{Breakdown, big, breakdown};
use policies::{Allowed, MAX_FILLER, PolicyDir, yaml};

pub const USAGE: &str = "usage: cargo bench -p egress-tests --bench reload -- [--reloads N] \
     [--sizes 10,1000,10000] [--warmup N] [--poll-us N] [--budget-s N] [--starts N] [--big-rules N] [--nice N] \
     [--no-big] [--no-1m] [--out DIR]";

/// The agent's debounce: how long the policy files must stay quiet before a watched change is
/// applied (`egress_user::agent::watch::QUIET`).
pub const DEBOUNCE: Duration = egress_user::agent::watch::QUIET;

/// Start-ups predicted to take longer than this are not run.
const MILLION_LIMIT: Duration = Duration::from_secs(60);

/// Command-line options (after `cargo bench ... --`).
pub struct Options {
    /// Measured reloads per size and way.
    pub reloads: usize,
    /// Policy sizes, in rules.
    pub sizes: Vec<usize>,
    /// Uncounted rounds first.
    pub warmup: usize,
    /// Poll interval of the end-to-end workload.
    pub poll: Duration,
    /// Fresh start-ups of the big policy.
    pub starts: usize,
    /// Rules of the big policy.
    pub big_rules: usize,
    /// Run the start-up phase.
    pub big: bool,
    /// Try 1,000,000 keys.
    pub million: bool,
    /// The reload rounds stop after this long, even before `reloads` (zero: no limit).
    pub budget: Duration,
    /// Nice value of the bench and everything it starts.
    pub nice: i32,
    /// Where to write `reload.md` and `reload.json` (besides printing the report).
    pub out: Option<std::path::PathBuf>,
}

fn parse(args: &[String]) -> Options {
    let mut options = Options {
        reloads: 200,
        sizes: vec![10, 1_000, 10_000],
        warmup: 2,
        poll: Duration::from_micros(1000),
        starts: 3,
        big_rules: 100_000,
        big: true,
        million: true,
        budget: Duration::from_secs(210),
        nice: -10,
        out: None,
    };
    let mut args = common::Flags::new(args, USAGE).with_separators();
    while let Some(arg) = args.next() {
        let flag = arg.as_str();
        match flag {
            // cargo bench passes --bench to a harness = false target.
            "--bench" => {}
            "--reloads" => options.reloads = args.number::<usize>(flag),
            "--warmup" => options.warmup = args.number::<usize>(flag),
            "--poll-us" => options.poll = Duration::from_micros(args.number::<usize>(flag) as u64),
            "--starts" => options.starts = args.number::<usize>(flag),
            "--big-rules" => options.big_rules = args.number::<usize>(flag),
            "--sizes" => {
                let list = args.value(flag);
                options.sizes = list
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(|s| args.parse(s, flag))
                    .collect()
            }
            "--budget-s" => options.budget = Duration::from_secs(args.number::<usize>(flag) as u64),
            "--nice" => options.nice = args.number(flag),
            "--no-big" => options.big = false,
            "--no-1m" => options.million = false,
            "--out" => options.out = Some(args.dir("--out")),
            other => panic!("unknown argument {other:?}; {USAGE}"),
        }
    }
    assert!(options.reloads >= 1 && options.starts >= 1, "{USAGE}");
    for &n in options.sizes.iter().chain([&options.big_rules]) {
        assert!(
            (1..=MAX_FILLER + 1).contains(&n),
            "sizes must be 1..={} rules",
            MAX_FILLER + 1
        );
    }
    options
}

fn main() -> ExitCode {
    common::bench_main("reload", |args| {
        let options = parse(args);
        common::catch_interrupts();
        run(&options);
    })
}

/// The `egress` CLI and the workload, built by `cargo bench` in the release profile.
const EGRESS: &str = env!("CARGO_BIN_EXE_egress-cli");
const POLL: &str = env!("CARGO_BIN_EXE_egress-verdict-poll");

/// How a reload is started and what is timed.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Way {
    /// `Reload` on the control socket, timed to the answer.
    RoundTrip,
    /// A file renamed into the watched directory, timed until the workload sees the new verdict.
    EndToEnd,
}

/// One agent with one policy size, reloaded one way, and what was measured.
pub struct Contender {
    // Fields drop in order: the processes go before the sandbox they live in.
    agent: Agent,
    poller: Poller,
    _sinks: [Sink; 2],
    pub rules: usize,
    pub way: Way,
    policies: PolicyDir,
    texts: [String; 2],
    current: Allowed,
    generation: u32,
    /// Reloads made: picks the address of the rule [`edited`] moves.
    edits: usize,
    /// Log lines before this index belong to reloads already checked.
    log_from: usize,
    /// Milliseconds per measured reload.
    pub samples: Vec<f64>,
    /// End to end: the gap between the last connect with the old verdict and the first with
    /// the new one, in milliseconds (the resolution).
    pub gaps: Vec<f64>,
    /// What the agent logged of each measured reload.
    pub steps: Vec<Steps>,
    sandbox: Sandbox,
}

fn text(texts: &[String; 2], which: Allowed) -> &str {
    match which {
        Allowed::A => &texts[0],
        Allowed::B => &texts[1],
    }
}

/// One reload's steps as the agent logs them, ms: from reading the sources to the new
/// generation in force, that is all of `Agent::apply` (`total_ms`), and three parts of it.
#[derive(Clone, Copy)]
pub struct Steps {
    /// Reading, hashing, parsing and validating the sources (`build_ms`).
    pub build: f64,
    /// The proxy's configuration (`proxy_ms`).
    pub proxy: f64,
    /// `pipeline::change` (`kernel_ms`).
    pub kernel: f64,
    /// The whole of it (`total_ms`).
    pub total: f64,
}

impl Steps {
    /// From the reload's log lines: the one that puts it in force, then [`RELOADED`].
    fn of(in_force: &str, reloaded: &str) -> Option<Self> {
        Some(Self {
            build: ms_field(reloaded, "build_ms")?,
            proxy: ms_field(in_force, "proxy_ms")?,
            kernel: ms_field(in_force, "kernel_ms")?,
            total: ms_field(reloaded, "total_ms")?,
        })
    }
}

/// `text` with the first filler rule (`r0`, 198.18.0.0/32) at one of three addresses by
/// `edit`: with the A/B flip, each reload then also moves one key, so the agent's standby
/// trie (two generations back) never holds the new policy already and the change writes
/// keys, as a real one-rule edit does.
fn edited(text: &str, edit: usize) -> String {
    let to = ["198.18.0.0/32", "198.19.255.1/32", "198.19.255.2/32"][edit % 3];
    text.replacen("{service: 198.18.0.0/32}", &format!("{{service: {to}}}"), 1)
}

/// Starts an agent on a fresh sandbox with the policy that allows A; returns the agent, the
/// index of its ready line, and the ready line.
fn start_agent(
    sandbox: &Sandbox,
    policies: &PolicyDir,
    watch: bool,
    timeout: Duration,
) -> (Agent, usize, Line) {
    let mut agent = Agent::spawn(Path::new(EGRESS), sandbox, &policies.dir, watch);
    let (index, line) = agent.wait_for(0, READY, timeout);
    assert_eq!(
        generation_of(&line.text),
        Some(1),
        "a fresh agent starts at generation 1: {}",
        line.text
    );
    (agent, index, line)
}

/// Checks both verdicts right now: `allowed` connects, the other is denied.
fn expect_verdicts(poller: &mut Poller, allowed: Allowed, when: &str, agent: &Agent) {
    let (a, d) = (
        poller.check(allowed.allowed()),
        poller.check(allowed.denied()),
    );
    assert!(
        a == "connected" && d == "denied",
        "{when}: {} should connect (got {a}) and {} be denied (got {d}); the agent's log:\n{}",
        allowed.allowed(),
        allowed.denied(),
        agent.tail(30)
    );
}

/// Sends `Reload` on the control socket; returns the round trip and the generation in force.
fn reload_request(sandbox: &Sandbox) -> (Duration, u32) {
    let socket = sandbox.socket();
    let started = Instant::now();
    let answer = client::call(&socket, &Request::Reload);
    let took = started.elapsed();
    match answer {
        Ok(Response::Applied { generation, .. }) => (took, generation),
        other => panic!("reload on {}: {other:?}", socket.display()),
    }
}

impl Contender {
    fn new(rules: usize, way: Way) -> Self {
        let sandbox = Sandbox::new();
        let policies = PolicyDir::new(&sandbox.run_dir);
        let texts = [yaml(rules, 1, Allowed::A), yaml(rules, 1, Allowed::B)];
        policies.replace(&texts[0]);
        let sinks = [
            sandbox.sink(Allowed::A.allowed()),
            sandbox.sink(Allowed::B.allowed()),
        ];
        let (agent, index, _) = start_agent(
            &sandbox,
            &policies,
            way == Way::EndToEnd,
            Duration::from_secs(60),
        );
        let mut poller = Poller::start(POLL, &sandbox);
        expect_verdicts(&mut poller, Allowed::A, "after start-up", &agent);
        Self {
            agent,
            poller,
            _sinks: sinks,
            rules,
            way,
            policies,
            texts,
            current: Allowed::A,
            edits: 0,
            generation: 1,
            log_from: index + 1,
            samples: Vec::new(),
            gaps: Vec::new(),
            steps: Vec::new(),
            sandbox,
        }
    }

    pub fn name(&self) -> String {
        format!(
            "{} rules, {}",
            common::thousands(self.rules),
            match self.way {
                Way::RoundTrip => "`egress reload` round trip",
                Way::EndToEnd => "file rename to new verdict",
            }
        )
    }

    /// One reload to the other policy, checked; returns milliseconds (and the resolution), and
    /// the steps as the agent logged them.
    fn reload(&mut self, poll: Duration) -> (f64, Option<f64>, Steps) {
        let next = self.current.flip();
        let timeout = Duration::from_secs(10) + Duration::from_millis(self.rules as u64 / 10);
        self.edits += 1;
        let new_text = edited(text(&self.texts, next), self.edits);
        let result = match self.way {
            Way::RoundTrip => {
                self.policies.replace(&new_text);
                let (took, generation) = reload_request(&self.sandbox);
                assert_eq!(
                    generation,
                    self.generation + 1,
                    "the reload did not make the next generation; the agent's log:\n{}",
                    self.agent.tail(30)
                );
                // In force when answered: no retry, no wait.
                expect_verdicts(
                    &mut self.poller,
                    next,
                    "right after the answer",
                    &self.agent,
                );
                (took.as_secs_f64() * 1e3, None)
            }
            Way::EndToEnd => {
                self.poller.start_wait(next.allowed(), poll, timeout);
                let renamed = self.policies.replace(&new_text);
                let flip = self.poller.flipped().unwrap_or_else(|line| {
                    panic!(
                        "the workload did not see {} allowed within {timeout:?} of the rename: \
                         {line}; the agent's log:\n{}",
                        next.allowed(),
                        self.agent.tail(30)
                    )
                });
                let denied = self.poller.check(next.denied());
                assert_eq!(
                    denied,
                    "denied",
                    "{} should be denied once {} is allowed",
                    next.denied(),
                    next.allowed()
                );
                let ms = |ns: u64| ns as f64 / 1e6;
                (
                    ms(flip.at_ns.saturating_sub(renamed)),
                    Some(ms(flip.at_ns.saturating_sub(flip.last_old_ns))),
                )
            }
        };
        // The agent logs every applied reload: it must be this one, and it must be done
        // before the next change (a change seen while a reload runs would be timed late).
        let (index, line) = self.agent.wait_for(self.log_from, RELOADED, timeout);
        assert_eq!(
            generation_of(&line.text),
            Some(self.generation + 1),
            "unexpected reload: {}",
            line.text
        );
        if self.way == Way::EndToEnd {
            assert!(
                line.text.contains("policy files changed"),
                "not the file watch: {}",
                line.text
            );
        }
        let in_force = self
            .agent
            .lines_from(self.log_from)
            .into_iter()
            .take(index - self.log_from)
            .rfind(|l| l.text.contains(IN_FORCE))
            .unwrap_or_else(|| {
                panic!(
                    "the agent did not log {IN_FORCE:?} before {RELOADED:?}; its log:\n{}",
                    self.agent.tail(30)
                )
            });
        let steps = Steps::of(&in_force.text, &line.text).unwrap_or_else(|| {
            panic!(
                "no build_ms, proxy_ms, kernel_ms and total_ms in the agent's lines:\n{}\n{}",
                in_force.text, line.text
            )
        });
        self.log_from = index + 1;
        self.generation += 1;
        self.current = next;
        (result.0, result.1, steps)
    }
}

fn run(options: &Options) {
    let started = Instant::now();
    // Before any thread or process is started: they all inherit it.
    common::set_nice(options.nice);
    eprintln!(
        "bench reload: starting {} agents ({} sizes x 2 ways)...",
        options.sizes.len() * 2,
        options.sizes.len()
    );
    let mut contenders: Vec<Contender> = options
        .sizes
        .iter()
        .flat_map(|&rules| {
            [
                Contender::new(rules, Way::RoundTrip),
                Contender::new(rules, Way::EndToEnd),
            ]
        })
        .collect();
    for (i, c) in contenders.iter().enumerate() {
        eprintln!("  [{i}] {}", c.name());
    }
    let setup = started.elapsed();
    let count = contenders.len();
    let rounds = options.warmup + options.reloads;
    eprintln!(
        "bench reload: {} rounds ({} warm-up), one reload per agent each, ms:",
        rounds, options.warmup
    );
    let mut measured_from = None;
    for round in 0..rounds {
        if round == options.warmup {
            measured_from = Some(Instant::now());
        }
        check_interrupted();
        if measured_from.is_some_and(|t| !options.budget.is_zero() && t.elapsed() >= options.budget)
        {
            eprintln!(
                "  stopping after {} measured rounds: the {:?} budget (--budget-s) is spent",
                round - options.warmup,
                options.budget
            );
            break;
        }
        // Each round starts one agent later, so none always follows the same one.
        let mut last = vec![f64::NAN; count];
        for i in (0..count).map(|k| (round + k) % count) {
            let c = &mut contenders[i];
            let (ms, gap, steps) = c.reload(options.poll);
            last[i] = ms;
            if round >= options.warmup {
                c.samples.push(ms);
                c.gaps.extend(gap);
                c.steps.push(steps);
            }
        }
        if round < options.warmup
            || (round + 1 - options.warmup).is_multiple_of(20)
            || round + 1 == rounds
        {
            let last: Vec<String> = last
                .iter()
                .enumerate()
                .map(|(i, ms)| format!("[{i}] {ms:.1}"))
                .collect();
            eprintln!(
                "  round {:>3}{}: {}",
                round + 1,
                if round < options.warmup {
                    " (warm-up)"
                } else {
                    ""
                },
                last.join(" ")
            );
        }
    }
    let reloads_took = started.elapsed() - setup;
    // The agents are done; stop them before the next phases.
    let results: Vec<report::Series> = contenders.drain(..).map(report::Series::from).collect();

    eprintln!("bench reload: where a reload's time goes (in this process, median of 5)...");
    let breakdowns: Vec<Breakdown> = options.sizes.iter().map(|&n| breakdown(n, 5)).collect();

    let big = options.big.then(|| {
        eprintln!(
            "bench reload: start-up with {} rules, {} fresh agents...",
            common::thousands(options.big_rules),
            options.starts
        );
        big(options)
    });
    let context = report::Context {
        setup,
        reloads_took,
        elapsed: started.elapsed(),
    };
    report::print(options, &results, &breakdowns, big.as_ref(), &context);
}
