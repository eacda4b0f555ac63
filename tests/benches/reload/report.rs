//! The printed report: the machine and the method, markdown tables, and a one-line JSON
//! summary for scripts (also written to `reload.json` with `--out`).

use std::time::Duration;

use serde_json::json;

use crate::{
    Contender, DEBOUNCE, Options, Steps, Way,
    common::{machine_json, machine_line, publish, summary, thousands},
    phases::{Big, Breakdown, Startup},
};

/// One contender's measurements, its agent stopped.
pub struct Series {
    pub rules: usize,
    pub way: Way,
    pub samples: Vec<f64>,
    pub gaps: Vec<f64>,
    pub steps: Vec<Steps>,
}

impl From<Contender> for Series {
    fn from(c: Contender) -> Self {
        Self {
            rules: c.rules,
            way: c.way,
            samples: c.samples.clone(),
            gaps: c.gaps.clone(),
            steps: c.steps.clone(),
        }
    }
}

/// p50, p99 (nearest rank) and max.
#[derive(Clone, Copy)]
pub struct Percentiles {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    fn of(values: &[f64]) -> Self {
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let rank = |q: f64| {
            let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len().max(1)) - 1;
            v.get(i).copied().unwrap_or(f64::NAN)
        };
        Self {
            p50: summary(v.iter().copied()).0,
            p99: rank(0.99),
            max: v.last().copied().unwrap_or(f64::NAN),
        }
    }

    fn minus(self, ms: f64) -> Self {
        Self {
            p50: self.p50 - ms,
            p99: self.p99 - ms,
            max: self.max - ms,
        }
    }

    fn cell(self) -> String {
        format!("{} / {} / {}", ms(self.p50), ms(self.p99), ms(self.max))
    }

    fn json(self) -> serde_json::Value {
        json!({"p50": round(self.p50), "p99": round(self.p99), "max": round(self.max)})
    }
}

/// Milliseconds for a table: one decimal, none from 1,000 on.
fn ms(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else if v.abs() >= 1000.0 {
        thousands(v.round() as usize)
    } else {
        format!("{v:.1}")
    }
}

fn round(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

/// What the report says about the run besides the numbers.
pub struct Context {
    /// Starting the agents.
    pub setup: Duration,
    /// The interleaved reload rounds.
    pub reloads_took: Duration,
    /// The whole bench.
    pub elapsed: Duration,
}

/// Prints the report on stdout.
pub fn print(
    options: &Options,
    series: &[Series],
    breakdowns: &[Breakdown],
    big: Option<&Big>,
    context: &Context,
) {
    let debounce = DEBOUNCE.as_secs_f64() * 1e3;
    let sizes: Vec<String> = options.sizes.iter().map(ToString::to_string).collect();
    let mut out = String::new();
    out.push_str("\n## Reload to enforced, and large-policy load time\n\n");
    out.push_str(&machine_line());
    out.push_str(&format!(
        "- command: `cargo xtask bench reload` (`cargo bench -p egress-tests --bench reload -- --reloads {} --sizes {} \
         --warmup {} --poll-us {} --budget-s {} --starts {} --big-rules {} --nice {}{}{}`)\n",
        options.reloads,
        sizes.join(","),
        options.warmup,
        options.poll.as_micros(),
        options.budget.as_secs(),
        options.starts,
        options.big_rules,
        options.nice,
        if options.big { "" } else { " --no-big" },
        if options.million { "" } else { " --no-1m" },
    ));
    out.push_str(&format!(
        "- release `egress run`, one agent per size and way, each in its own network namespace, cgroup, pin directory, \
         state directory and control socket; {} rounds of one reload per agent, interleaved (each round starting one \
         agent later), after {} warm-up rounds; every reload alternates between two policies that differ in which of two \
         test destinations `target` allows, and moves one filler rule to one of three addresses in turn (so that each \
         writes keys into the agent's standby trie, as a real edit does), and is checked (next generation, both verdicts \
         flipped); everything at nice {}\n",
        options.reloads, options.warmup, options.nice
    ));
    out.push_str(&format!(
        "- round trip: the `Reload` request on the control socket (what `egress reload` sends), timed from sending it to \
         the answer; the file was renamed into place before. End to end: from just before `rename()` of the new file \
         into the watched directory to the return of the first `connect()` that succeeds, from a process in the managed \
         cgroup polling every {} us; includes the agent's {} ms debounce\n",
        options.poll.as_micros(),
        debounce
    ));
    out.push_str(&format!(
        "- took {:.0?} ({:.0?} starting the agents, {:.0?} for the reload rounds)\n",
        context.elapsed, context.setup, context.reloads_took
    ));

    out.push_str("\n### Reload to enforced, ms: p50 / p99 (nearest rank) / max\n\n");
    out.push_str(&format!(
        "| rules | reloads | `egress reload` round trip | file rename to new verdict (end to end) | end to end minus the {debounce:.0} ms debounce | \
         poll resolution: gap between last old and first new verdict, median (max) |\n"
    ));
    out.push_str("|---|---|---|---|---|---|\n");
    let mut summary_sizes = serde_json::Map::new();
    for &rules in &options.sizes {
        let find = |way: Way| {
            series
                .iter()
                .find(|s| s.rules == rules && s.way == way)
                .expect("a series per size and way")
        };
        let (rt, e2e) = (find(Way::RoundTrip), find(Way::EndToEnd));
        let (rt_p, e2e_p) = (Percentiles::of(&rt.samples), Percentiles::of(&e2e.samples));
        let gap = Percentiles::of(&e2e.gaps);
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {:.2} ({:.2}) |\n",
            thousands(rules),
            rt.samples.len().min(e2e.samples.len()),
            rt_p.cell(),
            e2e_p.cell(),
            e2e_p.minus(debounce).cell(),
            gap.p50,
            gap.max
        ));
        summary_sizes.insert(
            rules.to_string(),
            json!({
                "reloads": rt.samples.len().min(e2e.samples.len()),
                "round_trip_ms": rt_p.json(),
                "end_to_end_ms": e2e_p.json(),
                "end_to_end_minus_debounce_ms": e2e_p.minus(debounce).json(),
            }),
        );
    }

    out.push_str(
        "\n### Where the round trip goes, ms: p50 of what the agent logged of each measured `egress reload` above\n\n",
    );
    out.push_str(
        "| rules | read, hash, parse and validate the sources (`build_ms`) | proxy configuration (`proxy_ms`) \
         | `pipeline::change` (`kernel_ms`) | all of `Agent::apply` (`total_ms`) | round trip | round trip less `total_ms`, p50 of the differences (the request's way in and the answer's way out, and what the agent does after the change is in force) |\n",
    );
    out.push_str("|---|---|---|---|---|---|---|\n");
    let mut summary_steps = serde_json::Map::new();
    for &rules in &options.sizes {
        let Some(rt) = series
            .iter()
            .find(|s| s.rules == rules && s.way == Way::RoundTrip)
        else {
            continue;
        };
        let p50 =
            |f: fn(&Steps) -> f64| Percentiles::of(&rt.steps.iter().map(f).collect::<Vec<_>>()).p50;
        let outside: Vec<f64> = rt
            .samples
            .iter()
            .zip(&rt.steps)
            .map(|(ms, s)| ms - s.total)
            .collect();
        let (build, proxy, kernel, total) = (
            p50(|s| s.build),
            p50(|s| s.proxy),
            p50(|s| s.kernel),
            p50(|s| s.total),
        );
        let outside = Percentiles::of(&outside).p50;
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            thousands(rules),
            ms(build),
            ms(proxy),
            ms(kernel),
            ms(total),
            ms(Percentiles::of(&rt.samples).p50),
            ms(outside),
        ));
        summary_steps.insert(
            rules.to_string(),
            json!({
                "build": round(build),
                "proxy": round(proxy),
                "kernel": round(kernel),
                "total": round(total),
                "outside": round(outside),
            }),
        );
    }

    out.push_str(
        "\n### Where a reload's time goes, ms (the same steps in the bench's own process, on a scratch sandbox; median of 5)\n\n",
    );
    out.push_str(
        "| rules | parse and validate the file (`policy::load_files`: the changed document parsed, the others from the document cache) | proxy configuration (`Proxy::new`; the system's CA roots read again only when their files change) \
         | whole kernel generation (`pipeline::apply`: fresh maps filled, every program loaded and verified, links swapped; old one dropped) \
         | the same change as rules alone (`pipeline::change`: compiled, the standby trie brought to it, the generation number flipped, programs kept), what the agent does \
         | sum with the whole generation | round trip p50, for comparison \
         | every rule new, as the agent does it (parse and validate every document, proxy configuration, `pipeline::change`: new rows, a fresh trie, programs kept) |\n",
    );
    out.push_str("|---|---|---|---|---|---|---|---|\n");
    for b in breakdowns {
        let rt = series
            .iter()
            .find(|s| s.rules == b.rules && s.way == Way::RoundTrip)
            .map_or(f64::NAN, |s| Percentiles::of(&s.samples).p50);
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            thousands(b.rules),
            ms(b.parse),
            ms(b.proxy),
            ms(b.kernel),
            ms(b.rules_only),
            ms(b.parse + b.proxy + b.kernel),
            ms(rt),
            ms(b.replaced)
        ));
    }

    let mut summary = json!({
        "bench": "reload",
        "machine": machine_json(),
        "seconds": context.elapsed.as_secs_f64(),
        "breakdown_ms": breakdowns.iter().map(|b| json!({
            "rules": b.rules,
            "parse": round(b.parse),
            "proxy": round(b.proxy),
            "kernel": round(b.kernel),
            "rules_only": round(b.rules_only),
            "replaced": round(b.replaced),
        })).collect::<Vec<_>>(),
        "reloads": options.reloads,
        "poll_us": options.poll.as_micros() as u64,
        "sizes": summary_sizes,
        "agent_steps_ms": summary_steps,
    });
    if let Some(big) = big {
        print_big(&mut out, big, options);
        let (start, _, _) = summary_of(&big.runs, |r| r.start);
        let (reload, _, _) = summary_of(&big.runs, |r| r.reload);
        summary["start_ready_ms"] = json!({ big.rules.to_string(): round(start) });
        summary["reload_ms"] = json!({ big.rules.to_string(): round(reload) });
        if let Ok((_, m)) = &big.million {
            summary["start_ready_ms"]["1000000_keys"] = json!(round(m.start));
            summary["reload_ms"]["1000000_keys"] = json!(round(m.reload));
        }
    }
    publish(options.out.as_deref(), "reload", &out, &summary);
    println!("summary: {summary}");
}

fn summary_of(runs: &[Startup], f: impl Fn(&Startup) -> f64) -> (f64, f64, f64) {
    summary(runs.iter().map(f))
}

fn mib(bytes: usize) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn print_big(out: &mut String, big: &Big, options: &Options) {
    let n = thousands(big.rules);
    out.push_str(
        "\n### Start-up and reload of a large policy, ms (fresh agent, fresh pins: from spawning `egress run` to its \
         `ready` line; then the `egress reload` round trip to another policy of the same size)\n\n",
    );
    out.push_str(
        "| policy | file | start to ready: median (min-max) | reload round trip: median (min-max) | runs |\n",
    );
    out.push_str("|---|---|---|---|---|\n");
    let (s, slo, shi) = summary_of(&big.runs, |r| r.start);
    let (r, rlo, rhi) = summary_of(&big.runs, |r| r.reload);
    out.push_str(&format!(
        "| {n} rules, 1 port each | {} | {} ({}-{}) | {} ({}-{}) | {} |\n",
        mib(big.bytes),
        ms(s),
        ms(slo),
        ms(shi),
        ms(r),
        ms(rlo),
        ms(rhi),
        big.runs.len()
    ));
    match &big.million {
        Ok((bytes, m)) => out.push_str(&format!(
            "| 1,000,000 keys: 100,000 rules, 10 ports each | {} | {} | {} | 1 |\n",
            mib(*bytes),
            ms(m.start),
            ms(m.reload)
        )),
        Err(note) => out.push_str(&format!("\n- {note}\n")),
    }
    out.push_str(
        "\n- 1,000,000 separate rules cannot be loaded: a rule takes a counter row and there are 131,072 \
         (`COUNTER_ROWS`, 3 reserved), so 1M keys means 100,000 rules of 10 ports\n",
    );
    // The run with the median start-up: its progress lines.
    let mut order: Vec<&Startup> = big.runs.iter().collect();
    order.sort_by(|a, b| a.start.total_cmp(&b.start));
    let median = order[order.len() / 2];
    out.push_str(&format!(
        "\nThe `loading rules` lines of the median {n}-rule start-up ({} ms to ready), with when each arrived \
         (ms after spawn); every start-up of this size logged {} of them (a one-rule reload fills no map, so it logs none):\n\n```\n",
        ms(median.start),
        median.progress.len()
    ));
    for (at, line) in &median.progress {
        out.push_str(&format!("+{at:>8.1} ms  {line}\n"));
    }
    out.push_str(&format!(
        "+{:>8.1} ms  ready: enforcing egress policy\n```\n",
        median.start
    ));
    if let Ok((_, m)) = &big.million {
        out.push_str("\nThe same for 1,000,000 keys:\n\n```\n");
        for (at, line) in &m.progress {
            out.push_str(&format!("+{at:>8.1} ms  {line}\n"));
        }
        out.push_str(&format!(
            "+{:>8.1} ms  ready: enforcing egress policy\n```\n",
            m.start
        ));
    }
    let _ = options;
}
