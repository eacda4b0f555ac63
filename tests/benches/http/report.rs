//! The printed report: the machine and the method, then a markdown table per metric.

use std::{path::Path, process::Command, time::Duration};

use crate::{
    Contender, Kind, Options,
    common::{command_output, machine_json, machine_line, publish, spread, summary, thousands},
};

/// What the report says about the run besides the numbers.
pub struct Shown {
    /// A wrk command line (the direct contender's).
    pub wrk: String,
    /// An oha command line, when metric 6 ran.
    pub oha: Option<String>,
    pub proxy_cpu: Option<usize>,
    pub load_cpu: Option<usize>,
    pub upstream_cpu: Option<usize>,
    pub rate_upstream_cpu: Option<usize>,
    pub setup: Duration,
    pub elapsed: Duration,
}

/// Prints the report, as markdown, on stdout (and with `--out`, writes it and the numbers
/// behind it).
pub fn print(options: &Options, contenders: &[Contender], shown: &Shown) {
    let cpu = |c: Option<usize>| c.map_or("any".to_owned(), |c| c.to_string());
    let mut out = String::new();
    out.push_str("\n## HTTP egress proxy: throughput, added latency, footprint\n\n");
    out.push_str(&machine_line());
    out.push_str(&format!(
        "- command: `cargo xtask bench http{}`\n",
        if options.shown_args.is_empty() {
            String::new()
        } else {
            format!(" -- {}", options.shown_args.join(" "))
        }
    ));
    out.push_str(&format!("- versions: {}\n", versions(options)));
    out.push_str(&format!(
        "- one fresh network namespace; proxies on CPU {}, load generator on CPU {}, nginx on CPU {} (CPU {} for \
         the fixed-rate runs), all at nice {}; \
         {} rounds, contenders interleaved (each round: plain, TLS, fixed rate; each list starting one \
         contender later than the round before), after a {} s warm-up per contender and protocol\n",
        cpu(shown.proxy_cpu),
        cpu(shown.load_cpu),
        cpu(shown.upstream_cpu),
        cpu(shown.rate_upstream_cpu),
        options.nice,
        options.rounds,
        options.warmup,
    ));
    out.push_str(&format!("- wrk: `{}`\n", shown.wrk));
    if let Some(oha) = &shown.oha {
        out.push_str(&format!("- oha: `{oha}`\n"));
    }
    out.push_str(&format!(
        "- took {:.0?} ({:.0?} of it setting up)\n",
        shown.elapsed, shown.setup
    ));
    let envoy = contenders.iter().find(|c| c.kind == Kind::Envoy);

    for (title, tls) in [
        (
            "Metric 4: plain HTTP, keep-alive, 1 KB body, Host checked (target: egress >= 1.0x Envoy req/s at <= Envoy p99)",
            false,
        ),
        (
            "Metric 5: TLS origination, HTTP in, HTTPS (TLS 1.3, pooled) to nginx (target: egress >= Envoy)",
            true,
        ),
    ] {
        out.push_str(&format!(
            "\n### {title}\n\nwrk -t1 -c{} -d{}s; median (min-max) over rounds; CPU is the proxy's, utime + stime.\n\n",
            options.connections, options.seconds
        ));
        out.push_str(
            "| contender | req/s | ratio to Envoy, same round | p50 (ms) | p99 (ms) | proxy CPU-s per 1000 req |\n\
             |---|---|---|---|---|---|\n",
        );
        for c in contenders {
            let samples = if tls { &c.tls } else { &c.plain };
            if samples.is_empty() {
                continue;
            }
            let ratio = match envoy {
                Some(e) if e.kind != c.kind => {
                    let other = if tls { &e.tls } else { &e.plain };
                    let (m, lo, hi) = summary(
                        samples
                            .iter()
                            .zip(other)
                            .map(|(a, b)| a.run.rps / b.run.rps),
                    );
                    format!("{m:.2}x ({lo:.2}-{hi:.2})")
                }
                _ => "-".into(),
            };
            let cpu = if samples.iter().all(|s| s.cpu_per_1k.is_some()) {
                med_range(samples.iter().filter_map(|s| s.cpu_per_1k), 4)
            } else {
                "-".into()
            };
            out.push_str(&format!(
                "| {} | {} | {ratio} | {} | {} | {cpu} |\n",
                c.kind.name(),
                med_range_rps(samples.iter().map(|s| s.run.rps)),
                med_range(samples.iter().map(|s| s.run.p50_ms), 3),
                med_range(samples.iter().map(|s| s.run.p99_ms), 3),
            ));
        }
    }

    let direct = contenders.iter().find(|c| c.kind == Kind::Direct);
    if let Some(direct) = direct.filter(|d| !d.rate.is_empty()) {
        out.push_str(&format!(
            "\n### Metric 6: latency added at a fixed {} req/s, {} connections, 1 KB, plain HTTP \
             (target: <= +0.15 ms p90, <= +0.25 ms p99)\n\n\
             oha -q {} -c {} -z {}s --latency-correction; added = the contender's percentile minus \
             direct's in the same round; median (min-max) over rounds.\n\n",
            options.rate,
            options.rate_connections,
            options.rate,
            options.rate_connections,
            options.rate_seconds,
        ));
        out.push_str(
            "| contender | req/s achieved | p50 (ms) | p90 (ms) | p99 (ms) | added p50 (ms) | added p90 (ms) | added p99 (ms) |\n\
             |---|---|---|---|---|---|---|---|\n",
        );
        for c in contenders.iter().filter(|c| !c.rate.is_empty()) {
            let added = |pick: fn(&crate::RateSample) -> f64| {
                if c.kind == Kind::Direct {
                    return "-".to_owned();
                }
                let (m, lo, hi) = summary(
                    c.rate
                        .iter()
                        .zip(&direct.rate)
                        .map(|(a, b)| pick(a) - pick(b)),
                );
                format!("{m:+.3} ({lo:+.3} to {hi:+.3})")
            };
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
                c.kind.name(),
                med_range(c.rate.iter().map(|s| s.run.rps), 0),
                med_range(c.rate.iter().map(|s| s.run.p50_ms), 3),
                med_range(c.rate.iter().map(|s| s.run.p90_ms), 3),
                med_range(c.rate.iter().map(|s| s.run.p99_ms), 3),
                added(|s| s.run.p50_ms),
                added(|s| s.run.p90_ms),
                added(|s| s.run.p99_ms),
            ));
        }
    }

    let proxies: Vec<&Contender> = contenders.iter().filter(|c| c.daemon.is_some()).collect();
    if !proxies.is_empty() {
        out.push_str(&format!(
            "\n### Metric 7: proxy footprint (target: <= 20 MB, <= 0.10 vCPU per 1000 req/s)\n\n\
             RSS is VmRSS (MiB): idle after start-up, and half-way through each {} req/s run; peak is VmHWM \
             at the end of the bench. CPU-s per 1000 requests at {} req/s equals vCPU at that rate.\n\n",
            options.rate, options.rate
        ));
        out.push_str(&format!(
            "| proxy | RSS idle | RSS at {} req/s | peak RSS | CPU-s per 1000 req at {} req/s | at full load, plain | at full load, TLS |\n\
             |---|---|---|---|---|---|---|\n",
            options.rate, options.rate
        ));
        for c in proxies {
            let or_dash = |s: String| if s.starts_with("NaN") { "-".into() } else { s };
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} |\n",
                c.kind.name(),
                c.idle_rss_mib.map_or("-".into(), |m| format!("{m:.1}")),
                or_dash(med_range(c.rate.iter().filter_map(|s| s.rss_mib), 1)),
                c.peak_rss_mib.map_or("-".into(), |m| format!("{m:.1}")),
                or_dash(med_range(c.rate.iter().filter_map(|s| s.cpu_per_1k), 4)),
                or_dash(med_range(c.plain.iter().filter_map(|s| s.cpu_per_1k), 4)),
                or_dash(med_range(c.tls.iter().filter_map(|s| s.cpu_per_1k), 4)),
            ));
        }
    }
    let json = serde_json::json!({
        "machine": machine_json(),
        "versions": versions(options),
        "rounds": options.rounds,
        "seconds": shown.elapsed.as_secs_f64(),
        "contenders": contenders.iter().map(|c| contender_json(c, envoy, direct)).collect::<Vec<_>>(),
    });
    publish(options.out.as_deref(), "http", &out, &json);
}

/// A contender's numbers for the results file: per phase, median/min/max over rounds, with the
/// ratio to Envoy in the same round (metrics 4, 5) and the latency added to direct's (metric 6).
fn contender_json(
    c: &Contender,
    envoy: Option<&Contender>,
    direct: Option<&Contender>,
) -> serde_json::Value {
    let wrk = |samples: &[crate::Sample], envoys: Option<&[crate::Sample]>| {
        if samples.is_empty() {
            return serde_json::Value::Null;
        }
        serde_json::json!({
            "rps": spread(summary(samples.iter().map(|s| s.run.rps))),
            "p50_ms": spread(summary(samples.iter().map(|s| s.run.p50_ms))),
            "p99_ms": spread(summary(samples.iter().map(|s| s.run.p99_ms))),
            "cpu_s_per_1k": spread(summary(samples.iter().filter_map(|s| s.cpu_per_1k))),
            "rps_ratio_to_envoy": envoys.filter(|e| !e.is_empty()).map(|e| {
                spread(summary(samples.iter().zip(e).map(|(a, b)| a.run.rps / b.run.rps)))
            }),
            "p99_ratio_to_envoy": envoys.filter(|e| !e.is_empty()).map(|e| {
                spread(summary(samples.iter().zip(e).map(|(a, b)| a.run.p99_ms / b.run.p99_ms)))
            }),
        })
    };
    let other_envoy = envoy.filter(|e| e.kind != c.kind);
    let added = |pick: fn(&crate::RateSample) -> f64| {
        direct
            .filter(|d| d.kind != c.kind && !d.rate.is_empty())
            .map(|d| {
                spread(summary(
                    c.rate.iter().zip(&d.rate).map(|(a, b)| pick(a) - pick(b)),
                ))
            })
    };
    serde_json::json!({
        "name": c.kind.name(),
        "plain": wrk(&c.plain, other_envoy.map(|e| e.plain.as_slice())),
        "tls": wrk(&c.tls, other_envoy.map(|e| e.tls.as_slice())),
        "rate": if c.rate.is_empty() { serde_json::Value::Null } else { serde_json::json!({
            "rps": spread(summary(c.rate.iter().map(|s| s.run.rps))),
            "p50_ms": spread(summary(c.rate.iter().map(|s| s.run.p50_ms))),
            "p90_ms": spread(summary(c.rate.iter().map(|s| s.run.p90_ms))),
            "p99_ms": spread(summary(c.rate.iter().map(|s| s.run.p99_ms))),
            "added_p50_ms": added(|s| s.run.p50_ms),
            "added_p90_ms": added(|s| s.run.p90_ms),
            "added_p99_ms": added(|s| s.run.p99_ms),
            "rss_mib": spread(summary(c.rate.iter().filter_map(|s| s.rss_mib))),
            "cpu_s_per_1k": spread(summary(c.rate.iter().filter_map(|s| s.cpu_per_1k))),
        }) },
        "idle_rss_mib": c.idle_rss_mib,
        "peak_rss_mib": c.peak_rss_mib,
    })
}

/// "median (min-max)" with `decimals`.
fn med_range(values: impl Iterator<Item = f64>, decimals: usize) -> String {
    let (m, lo, hi) = summary(values);
    format!("{m:.decimals$} ({lo:.decimals$}-{hi:.decimals$})")
}

/// "median (min-max)" of request rates, with thousands separators.
fn med_range_rps(values: impl Iterator<Item = f64>) -> String {
    let (m, lo, hi) = summary(values);
    let n = |v: f64| thousands(v.round() as usize);
    format!("{} ({}-{})", n(m), n(lo), n(hi))
}

/// The tools' versions, one phrase each.
fn versions(options: &Options) -> String {
    let first_line = |program: &Path, args: &[&str]| -> String {
        Command::new(program)
            .args(args)
            .output()
            .map(|o| {
                let text = format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                );
                text.lines()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("")
                    .trim()
                    .to_owned()
            })
            .unwrap_or_else(|e| format!("({}: {e})", program.display()))
    };
    let mut parts = vec![
        // "nginx version: nginx/1.22.1"
        first_line(Path::new("nginx"), &["-v"]).replace("nginx version: nginx/", "nginx "),
        // "wrk debian/4.1.0-3+b2 [epoll] Copyright (C) 2012 Will Glozer"
        first_line(Path::new("wrk"), &["-v"])
            .split(" Copyright")
            .next()
            .unwrap_or("")
            .to_owned(),
    ];
    if let Some(envoy) = &options.envoy {
        let line = first_line(envoy, &["--version"]);
        // "... version: <sha>/1.40.0/Clean/RELEASE/BoringSSL"
        let version = line
            .split_once("version: ")
            .and_then(|(_, v)| v.split('/').nth(1))
            .unwrap_or(&line);
        parts.push(format!("Envoy {version}"));
    }
    if let Some(oha) = &options.oha {
        parts.push(first_line(oha, &["--version"]));
    }
    let workspace = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let rev = command_output("git", &["-C", workspace, "rev-parse", "--short", "HEAD"]);
    let dirty = !command_output("git", &["-C", workspace, "status", "--porcelain"]).is_empty();
    parts.push(format!(
        "egress {rev}{}",
        if dirty { " + uncommitted changes" } else { "" }
    ));
    parts.join(", ")
}
