//! `egress-bench-report RESULTS DOCS COMMAND`: writes `DOCS/benchmarks.md` and its plots
//! (`DOCS/benchmarks/*.png`) from what the benchmarks left in `RESULTS` with `--out`
//! (`connect`, `http`, `reload`, `instructions`: a `.md` report and a `.json` of its numbers
//! each). `cargo xtask bench` runs it after the benchmarks; COMMAND is how it was started.
//!
//! The page starts with the headline table: BENCHMARKS.md metrics 1-7, egress's number, the
//! contenders' in the same run, the target and whether it is met. Then the plots, then each
//! benchmark's own report. Everything after the line [`KEEP`] in the existing page (notes
//! written by hand) is kept.
//!
//! Plots use plotters' bitmap backend with ab_glyph text: the font is Debian's DejaVu Sans
//! (package fonts-dejavu-core, which `cargo xtask bench` installs), read from [`FONT`].

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use egress_tests::thousands;
use plotters::prelude::*;
use serde_json::Value;

/// The line after which docs/benchmarks.md is written by hand and kept.
const KEEP: &str =
    "<!-- Everything below this line is written by hand; `cargo xtask bench` keeps it. -->";

/// The font the plots are drawn with.
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// The benchmarks, in the order of the page.
const BENCHES: [&str; 4] = ["connect", "http", "reload", "instructions"];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [results, docs, command] = args.as_slice() else {
        eprintln!("usage: egress-bench-report RESULTS_DIR DOCS_DIR COMMAND");
        return ExitCode::FAILURE;
    };
    match run(Path::new(results), Path::new(docs), command) {
        Ok(page) => {
            eprintln!("bench: wrote {}", page.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("egress-bench-report: {e}");
            ExitCode::FAILURE
        }
    }
}

/// One benchmark's results: its report and its numbers, or `None` if it did not run.
struct Results {
    name: &'static str,
    markdown: Option<String>,
    json: Option<Value>,
}

fn run(results: &Path, docs: &Path, command: &str) -> Result<PathBuf, String> {
    let benches: Vec<Results> = BENCHES
        .iter()
        .map(|&name| {
            let read = |ext: &str| fs::read_to_string(results.join(format!("{name}.{ext}"))).ok();
            Ok(Results {
                name,
                markdown: read("md"),
                json: read("json")
                    .map(|text| serde_json::from_str(&text))
                    .transpose()
                    .map_err(|e| format!("{}/{name}.json: {e}", results.display()))?,
            })
        })
        .collect::<Result<_, String>>()?;
    let get = |name: &str| {
        benches
            .iter()
            .find(|b| b.name == name)
            .and_then(|b| b.json.as_ref())
    };
    if benches.iter().all(|b| b.json.is_none()) {
        return Err(format!("no results in {}", results.display()));
    }

    let font = fs::read(FONT).map_err(|e| {
        format!("{FONT}: {e} (Debian package fonts-dejavu-core; `cargo xtask bench` installs it)")
    })?;
    plotters::style::register_font("sans-serif", FontStyle::Normal, font.leak())
        .map_err(|_| format!("{FONT}: not a font ab_glyph can read"))?;
    let plots_dir = docs.join("benchmarks");
    fs::create_dir_all(&plots_dir).map_err(|e| format!("{}: {e}", plots_dir.display()))?;
    let mut plots = Vec::new();
    if let Some(connect) = get("connect") {
        let path = plots_dir.join("connect-scaling.png");
        plot_connect(connect, &path)?;
        plots.push((
            "connect() p50 against the number of CIDR+port keys, per filter (log-log; bars: min-max over rounds)",
            "benchmarks/connect-scaling.png",
        ));
    }
    if let Some(http) = get("http") {
        let path = plots_dir.join("http.png");
        plot_http(http, &path)?;
        plots.push((
            "HTTP proxy: req/s and p99 per contender, plain HTTP and TLS origination (bars: median; whiskers: min-max over rounds)",
            "benchmarks/http.png",
        ));
    }

    let mut page = String::from("# Benchmarks\n\n");
    let machine = benches
        .iter()
        .find_map(|b| b.json.as_ref().map(|j| &j["machine"]))
        .cloned()
        .unwrap_or(Value::Null);
    let _ = writeln!(
        page,
        "Written by `{command}` (as root) on {}, at commit {}: every benchmark of \
         docs/testing.md in one run, each with all of its contenders interleaved round by round. \
         Machine: kernel `{}`, {} ({} CPUs), a shared VM: read ratios measured in the same round \
         rather than absolute numbers.\n",
        text(&machine["date"]),
        git_revision(),
        text(&machine["kernel"]),
        text(&machine["cpu"]),
        text(&machine["cpus"]),
    );
    let took: f64 = benches
        .iter()
        .filter_map(|b| b.json.as_ref()?["seconds"].as_f64())
        .sum();
    if took > 0.0 {
        let _ = writeln!(
            page,
            "The benchmarks took {:.1} minutes (plus building and installing the contenders).\n",
            took / 60.0
        );
    }
    headline(
        &mut page,
        get("connect"),
        get("http"),
        get("reload"),
        get("instructions"),
    );
    page.push_str("\n## Plots\n\n");
    for (title, file) in &plots {
        let _ = writeln!(page, "{title}:\n\n![{title}]({file})\n");
    }
    page.push_str("## The benchmarks' own reports\n");
    for b in &benches {
        match &b.markdown {
            Some(markdown) => {
                // Each report starts with its own "## " heading.
                page.push_str(markdown.trim_end());
                page.push('\n');
            }
            None => {
                let _ = writeln!(page, "\n## {}\n\nNot run in this invocation.", b.name);
            }
        }
    }
    let path = docs.join("benchmarks.md");
    let kept = fs::read_to_string(&path)
        .ok()
        .and_then(|old| old.split_once(KEEP).map(|(_, notes)| notes.to_owned()))
        .unwrap_or_else(|| "\n\n## Reading it\n\n(Notes written by hand go here.)\n".into());
    page.push('\n');
    page.push_str(KEEP);
    page.push_str(&kept);
    fs::write(&path, page).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path)
}

/// The headline table: one row per BENCHMARKS.md metric.
fn headline(
    page: &mut String,
    connect: Option<&Value>,
    http: Option<&Value>,
    reload: Option<&Value>,
    instructions: Option<&Value>,
) {
    page.push_str(
        "## Where egress stands\n\n\
         Medians over rounds (min-max in brackets where it matters); \"same round\" ratios divide two contenders measured \
         back to back.\n\n\
         | # | metric | egress | the other contenders, same run | target | met |\n|---|---|---|---|---|---|\n",
    );
    let mut row =
        |n: &str, metric: &str, egress: String, others: String, target: &str, met: Option<bool>| {
            let met = match met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "-",
            };
            let _ = writeln!(
                page,
                "| {n} | {metric} | {egress} | {others} | {target} | {met} |"
            );
        };
    if let Some(c) = connect {
        let rows = c["contenders"].as_array().cloned().unwrap_or_default();
        let rules = c["rules"].as_u64().unwrap_or(10_000);
        let find = |kind: &str, keys: u64| {
            rows.iter()
                .find(|r| r["kind"] == kind && r["keys"].as_u64() == Some(keys))
        };
        let ratio =
            |r: Option<&Value>| r.map_or("-".into(), |r| spread_text(&r["ratio_p50"], 3, "x"));
        let egress = find("egress", rules);
        let egress_ratio = egress.and_then(|r| r["ratio_p50"]["median"].as_f64());
        row(
            "1",
            &format!(
                "connect() p50 with {} CIDR+port rules, ratio to no filter",
                thousands(rules)
            ),
            ratio(egress),
            format!(
                "iptables-nft {}; nft interval set {}",
                ratio(find("iptables-nft", rules)),
                ratio(find("nft-set", rules))
            ),
            "<= 1.05x (ambitious 1.03x)",
            egress_ratio.map(|r| r <= 1.05),
        );
        let run_times = c["run_time"].as_array().cloned().unwrap_or_default();
        let ns = |keys: u64| {
            run_times
                .iter()
                .find(|r| r["keys"].as_u64() == Some(keys) && r["denied"] == false)
                .and_then(|r| r["ns"]["median"].as_f64())
        };
        let (at_rules, at_million) = (ns(rules), ns(1_000_000));
        row(
            "2",
            &format!(
                "connect4 program run time at {} / 1,000,000 keys (BPF_ENABLE_STATS)",
                thousands(rules)
            ),
            format!("{} / {} ns", number(at_rules, 0), number(at_million, 0)),
            "-".into(),
            "<= 300 / 400 ns (ambitious 200 / 300)",
            at_rules
                .zip(at_million)
                .map(|(a, b)| a <= 300.0 && b <= 400.0),
        );
        let egress_rows: Vec<&Value> = rows.iter().filter(|r| r["kind"] == "egress").collect();
        let worst_added = egress_rows
            .iter()
            .filter_map(|r| r["added_p50_us"]["median"].as_f64())
            .fold(f64::NAN, f64::max);
        let keys_list = |rows: &[&Value]| -> String {
            rows.iter()
                .map(|r| {
                    format!(
                        "{}: {}",
                        short_count(r["keys"].as_u64().unwrap_or(0)),
                        signed(r["added_p50_us"]["median"].as_f64(), 2)
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        let iptables_rows: Vec<&Value> = rows
            .iter()
            .filter(|r| r["kind"] == "iptables-nft")
            .collect();
        row(
            "3a",
            "rule scaling: connect() p50 added to no filter's, by key count (us)",
            keys_list(&egress_rows),
            if iptables_rows.is_empty() {
                "-".into()
            } else {
                format!("iptables-nft {}", keys_list(&iptables_rows))
            },
            "flat within +1 us",
            (!worst_added.is_nan()).then_some(worst_added <= 1.0),
        );
    }
    if let Some(r) = reload {
        let p50 = r["sizes"]["10000"]["round_trip_ms"]["p50"].as_f64();
        let parts = r["breakdown_ms"]
            .as_array()
            .and_then(|b| b.iter().find(|b| b["rules"] == 10_000))
            .map_or(String::new(), |b| {
                format!(
                    " (parse and validate {} ms, proxy configuration {} ms, kernel {} ms)",
                    number(b["parse"].as_f64(), 1),
                    number(b["proxy"].as_f64(), 1),
                    number(b["kernel"].as_f64(), 1)
                )
            });
        row(
            "3b",
            "10,000-rule policy loaded: `egress reload` round trip p50, YAML to enforced",
            format!("{} ms{parts}", number(p50, 1)),
            "-".into(),
            "<= 100 ms (ambitious 20 ms)",
            p50.map(|p| p <= 100.0),
        );
    }
    if let Some(h) = http {
        let contenders = h["contenders"].as_array().cloned().unwrap_or_default();
        let find = |name: &str| contenders.iter().find(|c| c["name"] == name);
        let (egress, envoy, direct) = (
            find("egress proxy"),
            find("Envoy"),
            find("direct (no proxy)"),
        );
        for (n, phase, metric, target) in [
            (
                "4",
                "plain",
                "plain-HTTP proxy req/s (ratio to Envoy, same round) and p99",
                ">= 1.0x Envoy req/s at <= Envoy p99 (ambitious 1.5x)",
            ),
            (
                "5",
                "tls",
                "TLS origination req/s (ratio to Envoy, same round) and p99",
                ">= Envoy (ambitious 1.3x)",
            ),
        ] {
            let Some(e) = egress.map(|e| &e[phase]).filter(|v| !v.is_null()) else {
                continue;
            };
            let ratio = e["rps_ratio_to_envoy"]["median"].as_f64();
            let p99_ratio = e["p99_ratio_to_envoy"]["median"].as_f64();
            let others =
                envoy
                    .map(|v| &v[phase])
                    .filter(|v| !v.is_null())
                    .map_or("-".into(), |v| {
                        format!(
                            "Envoy {} req/s, p99 {} ms",
                            rps(&v["rps"]),
                            number(v["p99_ms"]["median"].as_f64(), 2)
                        )
                    });
            let direct = direct
                .map(|v| &v[phase])
                .filter(|v| !v.is_null())
                .map_or(String::new(), |v| {
                    format!("; direct {} req/s", rps(&v["rps"]))
                });
            let met =
                ratio.map(|r| r >= 1.0 && (phase == "tls" || p99_ratio.is_some_and(|p| p <= 1.0)));
            row(
                n,
                metric,
                format!(
                    "{} req/s ({}), p99 {} ms",
                    rps(&e["rps"]),
                    spread_text(&e["rps_ratio_to_envoy"], 2, "x"),
                    number(e["p99_ms"]["median"].as_f64(), 2)
                ),
                format!("{others}{direct}"),
                target,
                met,
            );
        }
        let added = |c: Option<&Value>| -> (String, Option<f64>, Option<f64>) {
            let Some(rate) = c.map(|c| &c["rate"]).filter(|v| !v.is_null()) else {
                return ("-".into(), None, None);
            };
            let pick = |k: &str| rate[k]["median"].as_f64();
            (
                format!(
                    "+{} / +{} / +{} ms",
                    number(pick("added_p50_ms"), 3),
                    number(pick("added_p90_ms"), 3),
                    number(pick("added_p99_ms"), 3)
                ),
                pick("added_p90_ms"),
                pick("added_p99_ms"),
            )
        };
        let (egress_added, p90, p99) = added(egress);
        if egress.is_some_and(|e| !e["rate"].is_null()) {
            row(
                "6",
                "latency added at 1000 req/s, 16 connections, 1 KB: p50 / p90 / p99 minus direct's",
                egress_added,
                format!("Envoy {}", added(envoy).0),
                "<= +0.15 ms p90, <= +0.25 ms p99 (ambitious 0.10 / 0.20)",
                p90.zip(p99).map(|(a, b)| a <= 0.15 && b <= 0.25),
            );
        }
        let footprint = |c: Option<&Value>| -> (String, Option<f64>, Option<f64>) {
            let Some(c) = c else {
                return ("-".into(), None, None);
            };
            let rss = c["rate"]["rss_mib"]["median"].as_f64();
            let cpu = c["rate"]["cpu_s_per_1k"]["median"].as_f64();
            (
                format!(
                    "RSS {} MiB idle, {} at 1000 req/s (peak {}); {} vCPU at 1000 req/s",
                    number(c["idle_rss_mib"].as_f64(), 1),
                    number(rss, 1),
                    number(c["peak_rss_mib"].as_f64(), 1),
                    number(cpu, 3)
                ),
                rss,
                cpu,
            )
        };
        if egress.is_some() {
            let (text, rss, cpu) = footprint(egress);
            row(
                "7",
                "proxy footprint",
                text,
                format!("Envoy {}", footprint(envoy).0),
                "<= 20 MB, <= 0.10 vCPU per 1000 req/s (ambitious 12 MB, 0.06)",
                rss.zip(cpu).map(|(r, c)| r <= 20.0 && c <= 0.10),
            );
        }
    }
    if let Some(i) = instructions {
        row(
            "-",
            "instructions per proxied request (callgrind; a regression signal, no target)",
            number(i["proxy_path_per_request"].as_f64(), 0),
            format!(
                "the request without the proxy: {}",
                number(i["direct_per_request"].as_f64(), 0)
            ),
            "-",
            None,
        );
    }
}

/// connect() p50 against key count, one line per filter, no filter as a flat line.
fn plot_connect(connect: &Value, path: &Path) -> Result<(), String> {
    let rows = connect["contenders"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    // (filter, colour, points of (keys, p50 median, min, max))
    type Points = Vec<(f64, f64, f64, f64)>;
    let series: Vec<(&str, RGBColor, Points)> = [
        ("egress", RGBColor(0, 114, 178)),
        ("iptables-nft", RGBColor(213, 94, 0)),
        ("nft-set", RGBColor(0, 158, 115)),
    ]
    .into_iter()
    .map(|(kind, color)| {
        let mut points: Vec<(f64, f64, f64, f64)> = rows
            .iter()
            .filter(|r| r["kind"] == kind)
            .filter_map(|r| {
                let p = &r["p50_us"];
                Some((
                    r["keys"].as_f64()?,
                    p["median"].as_f64()?,
                    p["min"].as_f64()?,
                    p["max"].as_f64()?,
                ))
            })
            .collect();
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        (kind, color, points)
    })
    .filter(|(_, _, points)| !points.is_empty())
    .collect();
    let none = rows
        .iter()
        .find(|r| r["kind"] == "none")
        .and_then(|r| r["p50_us"]["median"].as_f64());
    let all = series.iter().flat_map(|s| s.2.iter());
    let (x_lo, x_hi) = all.clone().fold((f64::MAX, f64::MIN), |(lo, hi), p| {
        (lo.min(p.0), hi.max(p.0))
    });
    let y_hi = all.clone().map(|p| p.3).fold(1.0, f64::max) * 2.0;
    let y_lo = all.map(|p| p.2).chain(none).fold(f64::MAX, f64::min) / 2.0;
    if series.is_empty() {
        return Err("connect.json has no scaling contenders to plot".into());
    }
    let root = BitMapBackend::new(path, (1000, 620)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_error)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "connect() p50 by number of CIDR+port keys",
            ("sans-serif", 24),
        )
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(
            (x_lo / 1.5..x_hi * 1.5).log_scale(),
            (y_lo..y_hi).log_scale(),
        )
        .map_err(draw_error)?;
    chart
        .configure_mesh()
        .x_desc("keys (network, port) in the allow-list")
        .y_desc("connect() p50, us (log)")
        .x_label_formatter(&|x| short_count(x.round() as u64))
        .y_label_formatter(&|y| format!("{y}"))
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(draw_error)?;
    if let Some(none) = none {
        chart
            .draw_series(LineSeries::new(
                [(x_lo / 1.5, none), (x_hi * 1.5, none)],
                ShapeStyle::from(&BLACK.mix(0.5)).stroke_width(2),
            ))
            .map_err(draw_error)?
            .label(format!("no filter ({none:.1} us)"))
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK.mix(0.5)));
    }
    for (kind, color, points) in &series {
        let color = *color;
        chart
            .draw_series(LineSeries::new(
                points.iter().map(|p| (p.0, p.1)),
                color.stroke_width(3),
            ))
            .map_err(draw_error)?
            .label(*kind)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(3)));
        chart
            .draw_series(
                points
                    .iter()
                    .map(|p| ErrorBar::new_vertical(p.0, p.2, p.1, p.3, color.filled(), 8)),
            )
            .map_err(draw_error)?;
        chart
            .draw_series(
                points
                    .iter()
                    .map(|p| Circle::new((p.0, p.1), 5, color.filled())),
            )
            .map_err(draw_error)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font(("sans-serif", 16))
        .draw()
        .map_err(draw_error)?;
    root.present().map_err(draw_error)
}

/// Two panels: req/s and p99 per contender, plain and TLS side by side.
fn plot_http(http: &Value, path: &Path) -> Result<(), String> {
    let contenders = http["contenders"].as_array().cloned().unwrap_or_default();
    let names: Vec<String> = contenders.iter().map(|c| text(&c["name"])).collect();
    let root = BitMapBackend::new(path, (1100, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_error)?;
    let panels = root.split_evenly((1, 2));
    let phases = [
        ("plain", "plain HTTP", RGBColor(0, 114, 178)),
        ("tls", "TLS origination", RGBColor(213, 94, 0)),
    ];
    for (panel, (key, title)) in panels.iter().zip([
        ("rps", "requests per second (wrk -c50)"),
        ("p99_ms", "p99 latency, ms (wrk -c50)"),
    ]) {
        let value = |c: &Value, phase: &str, which: &str| c[phase][key][which].as_f64();
        let top = contenders
            .iter()
            .flat_map(|c| {
                phases
                    .iter()
                    .filter_map(move |(p, _, _)| value(c, p, "max"))
            })
            .fold(0.0, f64::max)
            * 1.1;
        let mut chart = ChartBuilder::on(panel)
            .caption(title, ("sans-serif", 20))
            .margin(14)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..names.len() as f64, 0.0..top.max(1e-9))
            .map_err(draw_error)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(names.len() * 2 + 1)
            .x_label_formatter(&|x| {
                let i = x.floor() as usize;
                if (x - i as f64 - 0.5).abs() < 0.01 {
                    names.get(i).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .y_label_formatter(&|y| {
                if key == "rps" {
                    short_count(y.round() as u64)
                } else {
                    format!("{y:.1}")
                }
            })
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(draw_error)?;
        for (j, (phase, label, color)) in phases.iter().enumerate() {
            let color = *color;
            let bars: Vec<(f64, f64, f64, f64)> = contenders
                .iter()
                .enumerate()
                .filter_map(|(i, c)| {
                    Some((
                        i as f64 + 0.1 + 0.4 * j as f64,
                        value(c, phase, "median")?,
                        value(c, phase, "min")?,
                        value(c, phase, "max")?,
                    ))
                })
                .collect();
            chart
                .draw_series(bars.iter().map(|&(x, m, _, _)| {
                    Rectangle::new([(x, 0.0), (x + 0.38, m)], color.mix(0.8).filled())
                }))
                .map_err(draw_error)?
                .label(*label)
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled())
                });
            chart
                .draw_series(bars.iter().map(|&(x, m, lo, hi)| {
                    ErrorBar::new_vertical(x + 0.19, lo, m, hi, BLACK.filled(), 8)
                }))
                .map_err(draw_error)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(draw_error)?;
    }
    root.present().map_err(draw_error)
}

fn draw_error(e: impl std::fmt::Display) -> String {
    format!("drawing a plot: {e}")
}

/// The commit the benchmarks ran at, with `+` when the tree had changes.
fn git_revision() -> String {
    let run = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    let rev = run(&["rev-parse", "--short", "HEAD"]);
    let dirty = !run(&["status", "--porcelain", "--untracked-files=no"]).is_empty();
    format!(
        "`{rev}`{}",
        if dirty {
            " (with uncommitted changes)"
        } else {
            ""
        }
    )
}

/// A JSON string or number as text.
fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "?".into(),
        other => other.to_string(),
    }
}

/// A number with `decimals`, or "-".
fn number(v: Option<f64>, decimals: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.decimals$}"))
}

/// A number with a sign, or "-".
fn signed(v: Option<f64>, decimals: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:+.decimals$}"))
}

/// "median (min-max)" of a {median, min, max} object, with a unit suffix.
fn spread_text(v: &Value, decimals: usize, unit: &str) -> String {
    let pick = |k: &str| v[k].as_f64();
    match (pick("median"), pick("min"), pick("max")) {
        (Some(m), Some(lo), Some(hi)) => {
            format!("{m:.decimals$}{unit} ({lo:.decimals$}-{hi:.decimals$})")
        }
        (Some(m), _, _) => format!("{m:.decimals$}{unit}"),
        _ => "-".into(),
    }
}

/// A request rate's median with thousands separators.
fn rps(v: &Value) -> String {
    v["median"]
        .as_f64()
        .map_or("-".into(), |r| thousands(r.round() as u64))
}

/// 1000 -> "1k", 1000000 -> "1M".
fn short_count(n: u64) -> String {
    match n {
        n if n >= 1_000_000 && n.is_multiple_of(1_000_000) => format!("{}M", n / 1_000_000),
        n if n >= 1_000 && n.is_multiple_of(1_000) => format!("{}k", n / 1_000),
        n => thousands(n),
    }
}
