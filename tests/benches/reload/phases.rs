//! The bench's one-off phases: where one reload's time goes, and start-up of a large policy.

use std::time::{Duration, Instant};

use egress_tests::{Sandbox, poll::Poller};
use egress_user::{pipeline, proxy::Proxy};

use crate::{
    MILLION_LIMIT, Options, POLL, check_interrupted, common,
    daemon::{RELOADED, generation_of},
    expect_verdicts,
    policies::{Allowed, PolicyDir, yaml},
    reload_request, start_agent, text,
};

/// What one reload does, step by step, in the bench's own process (milliseconds, median of
/// the runs).
pub struct Breakdown {
    pub rules: usize,
    pub parse: f64,
    pub proxy: f64,
    pub kernel: f64,
    /// The same change as rules alone (`pipeline::change`: written in place in the standby
    /// trie, then put in force by the generation number, programs kept), what the agent does
    /// for it.
    pub rules_only: f64,
    /// A reload in which every rule is new, as the agent makes it: parse and validate every
    /// document, the proxy configuration, and `pipeline::change` (new rows for every rule and
    /// a fresh trie, programs kept).
    pub replaced: f64,
}

/// Untimed pause before each timed change of rules alone: longer than an RCU grace period
/// here (5-16 ms), so that the change does not wait for the previous one's.
const GRACE: Duration = Duration::from_millis(50);

/// `text` with every filler rule renamed (so every rule but the target gets a new row) and,
/// for `variant` 1, moved to the other half of 198.18.0.0/15: three such texts in turn make a
/// reload in which every rule is new and the standby trie never holds the next policy.
fn every_rule_new(text: &str, variant: usize) -> String {
    let renamed = text.replace("{name: r", &format!("{{name: v{variant}r"));
    if variant == 1 {
        renamed.replace("{service: 198.18.", "{service: 198.19.")
    } else {
        renamed
    }
}

/// Times parsing, the proxy configuration and the kernel generation of `rules`-rule policies,
/// alternating as the reloads do, on a scratch sandbox.
pub(crate) fn breakdown(rules: usize, runs: usize) -> Breakdown {
    let sandbox = Sandbox::new();
    let policies = PolicyDir::new(&sandbox.run_dir);
    let target = sandbox.target();
    let texts = [yaml(rules, 1, Allowed::A), yaml(rules, 1, Allowed::B)];
    let mut which = Allowed::A;
    policies.replace(text(&texts, which));
    let load = || egress_user::policy::load_files(&[policies.file()]).expect("the policy loads");
    let mut enforcer = pipeline::apply(&target, &load()).expect("first generation");
    let (mut parse, mut proxy, mut kernel) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        which = which.flip();
        policies.replace(text(&texts, which));
        let started = Instant::now();
        let policy = load();
        parse.push(started.elapsed());
        let started = Instant::now();
        let p = Proxy::new(&policy).expect("proxy config");
        proxy.push(started.elapsed());
        drop(p);
        let started = Instant::now();
        let next = pipeline::apply(&target, &policy).expect("next generation");
        // The agent drops the old generation before it answers, too.
        drop(std::mem::replace(&mut enforcer, next));
        kernel.push(started.elapsed());
    }
    // The agent's way for a change of rules alone, on the same generation.
    let kernel_features = egress_user::loader::features::kernel()
        .assess(false)
        .expect("this kernel runs the filter");
    let mut rules_only = Vec::new();
    for _ in 0..runs {
        which = which.flip();
        policies.replace(text(&texts, which));
        let policy = load();
        // One change alone, as the agent's reloads come: back to back, each would first wait
        // for the last one's RCU grace period (docs/operations.md).
        std::thread::sleep(GRACE);
        let started = Instant::now();
        let way = pipeline::change(&mut enforcer, &target, &kernel_features, &policy, &[], &[])
            .expect("a change of rules");
        rules_only.push(started.elapsed());
        assert_eq!(way, pipeline::Way::Rules, "one rule changed: rules alone");
        drop(policy);
    }
    let replacing: Vec<String> = (0..3).map(|k| every_rule_new(&texts[0], k)).collect();
    let mut replaced = Vec::new();
    for run in 0..runs {
        policies.replace(&replacing[run % replacing.len()]);
        std::thread::sleep(GRACE);
        let started = Instant::now();
        let policy = load();
        drop(Proxy::new(&policy).expect("proxy config"));
        let way = pipeline::change(&mut enforcer, &target, &kernel_features, &policy, &[], &[])
            .expect("a change of every rule");
        replaced.push(started.elapsed());
        assert_eq!(
            way,
            pipeline::Way::Rules,
            "every rule new, nothing else: rules alone"
        );
        assert_eq!(
            enforcer.rows().len(),
            rules,
            "the policy replaced has its {rules} rules"
        );
        drop(policy);
    }
    drop(enforcer);
    let med = |v: &[Duration]| common::summary(v.iter().map(|d| d.as_secs_f64() * 1e3)).0;
    Breakdown {
        rules,
        parse: med(&parse),
        proxy: med(&proxy),
        kernel: med(&kernel),
        rules_only: med(&rules_only),
        replaced: med(&replaced),
    }
}

/// One big start-up: a fresh agent, then one reload to the other policy.
pub struct Startup {
    /// Spawn to the ready line, ms.
    pub start: f64,
    /// `Reload` round trip to the other policy, ms.
    pub reload: f64,
    /// The `loading rules` lines of the start-up: (ms since spawn, the line's message and
    /// fields).
    pub progress: Vec<(f64, String)>,
    /// How many `loading rules` lines the reload logged.
    pub reload_progress: usize,
}

/// Starts an agent with `texts[0]` (allows A), times it to ready, checks the verdicts, then
/// reloads to `texts[1]` (allows B) and times that.
pub(crate) fn startup(texts: &[String; 2], timeout: Duration) -> Startup {
    let sandbox = Sandbox::new();
    let policies = PolicyDir::new(&sandbox.run_dir);
    policies.replace(&texts[0]);
    let _sinks = [
        sandbox.sink(Allowed::A.allowed()),
        sandbox.sink(Allowed::B.allowed()),
    ];
    let (mut agent, index, ready) = start_agent(&sandbox, &policies, false, timeout);
    let since = |ns: u64| ns.saturating_sub(agent.spawned_ns) as f64 / 1e6;
    let start = since(ready.at_ns);
    let progress: Vec<(f64, String)> = agent
        .lines_from(0)
        .into_iter()
        .take(index)
        .filter(|l| l.text.contains("loading rules:"))
        .map(|l| {
            let message = l
                .text
                .split_once("loading rules:")
                .map_or(l.text.clone(), |(_, rest)| format!("loading rules:{rest}"));
            (since(l.at_ns), message)
        })
        .collect();
    let mut poller = Poller::start(POLL, &sandbox);
    expect_verdicts(&mut poller, Allowed::A, "after start-up", &agent);
    policies.replace(&texts[1]);
    let before = agent.line_count();
    let (took, generation) = reload_request(&sandbox);
    assert_eq!(generation, 2, "the reload did not make generation 2");
    expect_verdicts(&mut poller, Allowed::B, "right after the answer", &agent);
    let (_, line) = agent.wait_for(before, RELOADED, Duration::from_secs(5));
    assert_eq!(generation_of(&line.text), Some(2), "{}", line.text);
    let reload_progress = agent
        .lines_from(before)
        .iter()
        .filter(|l| l.text.contains("loading rules:"))
        .count();
    drop(poller);
    drop(agent);
    Startup {
        start,
        reload: took.as_secs_f64() * 1e3,
        progress,
        reload_progress,
    }
}

/// The start-up phase's results.
pub struct Big {
    pub rules: usize,
    /// Bytes of one of the policy files.
    pub bytes: usize,
    pub runs: Vec<Startup>,
    /// 1,000,000 keys: (bytes, result), or why not.
    pub million: Result<(usize, Startup), String>,
}

pub(crate) fn big(options: &Options) -> Big {
    let rules = options.big_rules;
    let n = common::thousands(rules);
    let texts = [yaml(rules, 1, Allowed::A), yaml(rules, 1, Allowed::B)];
    let mut runs = Vec::new();
    for i in 0..options.starts {
        check_interrupted();
        let run = startup(&texts, Duration::from_secs(120));
        eprintln!(
            "bench reload: {n} rules, start-up {}/{}: ready after {:.0} ms ({} progress lines), reload {:.0} ms",
            i + 1,
            options.starts,
            run.start,
            run.progress.len(),
            run.reload
        );
        // Ten lines at every tenth of the one big map fill (RULES_V4).
        let wanted = if rules >= 10_000 { 10 } else { 0 };
        assert_eq!(
            run.progress.len(),
            wanted,
            "the start-up should log `loading rules: N%` at every 10% of the {n}-rule fill: {:?}",
            run.progress
        );
        // The reload changes one rule: written in place in the standby trie, no fill.
        assert_eq!(
            run.reload_progress, 0,
            "a one-rule change fills no map: no progress lines"
        );
        runs.push(run);
    }
    let million = if !options.million {
        Err("1,000,000 keys: skipped (--no-1m)".to_owned())
    } else {
        let start = common::summary(runs.iter().map(|r| r.start)).0;
        // A million keys are ten times the map fill of 100,000 one-port rules, and their YAML
        // is about three times larger: ten times is a generous forecast.
        let forecast = Duration::from_secs_f64(start * 10.0 * 100_000.0 / rules as f64 / 1e3);
        if forecast > MILLION_LIMIT {
            Err(format!(
                "1,000,000 keys: skipped, the {n}-rule start-up ({start:.0} ms) forecasts about {forecast:.0?}, over {MILLION_LIMIT:?}"
            ))
        } else {
            eprintln!("bench reload: 1,000,000 keys (forecast under {forecast:.0?})...");
            let texts = [yaml(100_000, 10, Allowed::A), yaml(100_000, 10, Allowed::B)];
            let run = startup(&texts, MILLION_LIMIT * 3);
            eprintln!(
                "bench reload: 1,000,000 keys: ready after {:.0} ms, reload {:.0} ms",
                run.start, run.reload
            );
            assert_eq!(run.progress.len(), 10, "progress lines: {:?}", run.progress);
            Ok((texts[0].len(), run))
        }
    };
    Big {
        rules,
        bytes: texts[0].len(),
        runs,
        million,
    }
}
