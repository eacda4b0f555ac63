//! The printed report: a markdown table per metric.

use std::time::Duration;

use crate::{
    Options,
    common::{machine_json, machine_line, publish, spread, summary, thousands},
    contender::{Contender, Expect, Kind, Round},
    run_time::RunTime,
};

/// What the report says about the run besides the numbers.
pub struct Context {
    /// `kernel.bpf_stats_enabled` was already on before the bench (someone else enabled it).
    pub stats_were_on: bool,
    /// Time spent creating the contenders and loading the rulesets.
    pub setup: Duration,
    /// Time the whole bench took.
    pub elapsed: Duration,
    /// Where the load generators ran (`None`: anywhere).
    pub client_cpu: Option<usize>,
    /// Where the sinks' accept threads ran (`None`: anywhere).
    pub sink_cpu: Option<usize>,
}

/// Prints the three tables, as markdown, on stdout (and with `--out`, writes them and the
/// numbers behind them).
pub fn print_report(
    options: &Options,
    contenders: &[Contender],
    run_times: &[RunTime],
    notes: &[String],
    context: &Context,
) {
    let cpu = |c: Option<usize>| c.map_or("any".to_owned(), |c| c.to_string());
    let none = &contenders[0];
    let mut out = String::new();
    out.push_str("\n## connect() cost and program run time\n\n");
    out.push_str(&machine_line());
    out.push_str(&format!(
        "- command: `cargo xtask bench connect` (`cargo bench -p egress-tests --bench connect -- --rounds {} --count {} \
         --budget-ms {} --warmup {} --stats-rounds {} --rules {}`)\n",
        options.rounds, options.count, options.budget_ms, options.warmup, options.stats_rounds, options.rules
    ));
    out.push_str(&format!(
        "- each contender in its own fresh netns; {} rounds, contenders interleaved one block each per round; a block is \
         {} untimed then up to {} timed `connect()`s (or {} ms); client pinned to CPU {}, sink accept threads on CPU {}; \
         sockets closed with SO_LINGER 0 (RST, no TIME_WAIT)\n",
        options.rounds,
        options.warmup,
        options.count,
        options.budget_ms,
        cpu(context.client_cpu),
        cpu(context.sink_cpu),
    ));
    out.push_str(&format!(
        "- took {:.0?} ({:.0?} of it setting up)\n",
        context.elapsed, context.setup
    ));
    if context.stats_were_on {
        out.push_str("- WARNING: kernel.bpf_stats_enabled was already 1: the egress connect times include stats overhead\n");
    }
    for note in notes {
        out.push_str(&format!("- {note}\n"));
    }
    out.push_str(
        "\n### Metric 1: connect() time (mean of each block; median and min-max over rounds)\n\n",
    );
    out.push_str(
        "| contender | median (us) | min-max (us) | ratio to no filter, same round: median (min-max) | p50 (us) \
         | p50 ratio, same round: median | p99 (us) | timed connects per block | ruleset load |\n",
    );
    out.push_str("|---|---|---|---|---|---|---|---|---|\n");
    let mut rows = Vec::new();
    // A contender's ratio to no filter in the same round, of one of the rounds' times.
    let to_none = |c: &Contender, time: fn(&Round) -> u64| {
        summary(
            c.rounds
                .iter()
                .zip(&none.rounds)
                .map(|(a, b)| time(a) as f64 / time(b) as f64),
        )
    };
    for c in contenders {
        let (med, lo, hi) = summary(c.rounds.iter().map(|r| r.mean_ns as f64));
        let (rmed, rlo, rhi) = to_none(c, |r| r.mean_ns);
        let ratio = match c.expect {
            Expect::Denied => format!("({rmed:.2}x: fails before any packet)"),
            Expect::Connected => format!("{rmed:.3}x ({rlo:.3}-{rhi:.3})"),
        };
        let (p50, _, _) = summary(c.rounds.iter().map(|r| r.p50_ns as f64));
        let (p50_ratio, _, _) = to_none(c, |r| r.p50_ns);
        let (p99, _, _) = summary(c.rounds.iter().map(|r| r.p99_ns as f64));
        let (cmed, cmin, cmax) = summary(c.rounds.iter().map(|r| r.count as f64));
        let counts = if cmin == cmax {
            thousands(cmed as usize)
        } else {
            format!("{}-{}", thousands(cmin as usize), thousands(cmax as usize))
        };
        out.push_str(&format!(
            "| {} | {:.2} | {:.2}-{:.2} | {ratio} | {:.2} | {p50_ratio:.3}x | {:.1} | {counts} | {} |\n",
            c.name,
            us(med),
            us(lo),
            us(hi),
            us(p50),
            us(p99),
            c.load.map_or("-".into(), |d| format!("{d:.0?}")),
        ));
        let added_p50 = summary(
            c.rounds
                .iter()
                .zip(&none.rounds)
                .map(|(a, b)| us(a.p50_ns as f64 - b.p50_ns as f64)),
        );
        rows.push(serde_json::json!({
            "name": c.name,
            "kind": c.kind.label(),
            "keys": c.keys,
            "load_ms": c.load.map(|d| d.as_secs_f64() * 1e3),
            "mean_us": spread((us(med), us(lo), us(hi))),
            "p50_us": spread(summary(c.rounds.iter().map(|r| us(r.p50_ns as f64)))),
            "p99_us": spread(summary(c.rounds.iter().map(|r| us(r.p99_ns as f64)))),
            "ratio_mean": spread((rmed, rlo, rhi)),
            "ratio_p50": spread(summary(c.rounds.iter().zip(&none.rounds).map(|(a, b)| a.p50_ns as f64 / b.p50_ns as f64))),
            "added_p50_us": spread(added_p50),
            "timed_connects": c.rounds.iter().map(|r| r.count).sum::<u64>(),
        }));
    }
    scaling_table(&mut out, contenders);
    out.push_str("\n### Metric 2: connect4 program run time per invocation (BPF_ENABLE_STATS: run_time_ns / run_cnt per block)\n\n");
    out.push_str("| program | median (ns) | min-max (ns) | runs |\n|---|---|---|---|\n");
    let mut stats = Vec::new();
    for r in run_times {
        let (med, lo, hi) = summary(r.per_run_ns.iter().copied());
        stats.push(serde_json::json!({
            "name": r.name,
            "keys": r.keys,
            "denied": r.denied,
            "ns": spread((med, lo, hi)),
            "runs": r.runs,
        }));
        out.push_str(&format!(
            "| {} | {med:.0} | {lo:.0}-{hi:.0} | {} |\n",
            r.name,
            thousands(r.runs as usize)
        ));
    }
    let json = serde_json::json!({
        "machine": machine_json(),
        "rounds": options.rounds,
        "rules": options.rules,
        "seconds": context.elapsed.as_secs_f64(),
        "contenders": rows,
        "run_time": stats,
        "notes": notes,
    });
    publish(options.out.as_deref(), "connect", &out, &json);
}

/// Metric 3: connect() p50 per filter and key count, and what each adds to no filter's p50 in
/// the same round.
fn scaling_table(out: &mut String, contenders: &[Contender]) {
    let mut counts: Vec<usize> = contenders
        .iter()
        .filter(|c| c.kind != Kind::None)
        .map(|c| c.keys)
        .collect();
    counts.sort_unstable();
    counts.dedup();
    let none = &contenders[0];
    out.push_str(
        "\n### Metric 3: rule scaling, connect() p50 (us) by key count; in brackets what it adds to no filter's p50 in \
         the same round (median); then the time to put the ruleset in force\n\n",
    );
    let (base, _, _) = summary(none.rounds.iter().map(|r| r.p50_ns as f64));
    out.push_str(&format!("no filter: p50 {:.2} us.\n\n| filter |", us(base)));
    for n in &counts {
        out.push_str(&format!(" {} keys |", thousands(*n)));
    }
    for n in &counts {
        out.push_str(&format!(" load {} |", thousands(*n)));
    }
    out.push_str("\n|---|");
    out.push_str(&"---|".repeat(counts.len() * 2));
    out.push('\n');
    for kind in [Kind::Egress, Kind::IptablesNft, Kind::NftSet] {
        let of_kind: Vec<&Contender> = contenders.iter().filter(|c| c.kind == kind).collect();
        if of_kind.is_empty() {
            continue;
        }
        out.push_str(&format!("| {} |", kind.label()));
        for n in &counts {
            let cell = of_kind
                .iter()
                .find(|c| c.keys == *n)
                .map_or("-".into(), |c| {
                    let (p50, _, _) = summary(c.rounds.iter().map(|r| r.p50_ns as f64));
                    let (added, _, _) = summary(
                        c.rounds
                            .iter()
                            .zip(&none.rounds)
                            .map(|(a, b)| a.p50_ns as f64 - b.p50_ns as f64),
                    );
                    format!("{:.2} ({:+.2})", us(p50), us(added))
                });
            out.push_str(&format!(" {cell} |"));
        }
        for n in &counts {
            let cell = of_kind
                .iter()
                .find(|c| c.keys == *n)
                .and_then(|c| c.load)
                .map_or("-".into(), |d| format!("{d:.0?}"));
            out.push_str(&format!(" {cell} |"));
        }
        out.push('\n');
    }
    out.push_str(
        "\nThe egress load time here is the kernel side only (maps filled from a compiled policy); \
         the reload benchmark below times the whole path from YAML.\n",
    );
}

/// Nanoseconds to microseconds.
pub fn us(ns: f64) -> f64 {
    ns / 1000.0
}
