//! `egress-bench-report RESULTS DOCS COMMAND`: writes `DOCS/benchmarks.md` and its plots
//! (`DOCS/benchmarks/*.png`) from what the benchmarks left in `RESULTS` with `--out`
//! (`connect`, `http`, `reload`, `instructions`, `kube`: a `.md` report and a `.json` of its numbers
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
use plotters::style::FontStyle;
use serde_json::Value;

mod headline;
mod plot;

use headline::headline;
use plot::{new_paths, plot_connect, plot_http, plot_paths, plot_reload};

/// The line after which docs/benchmarks.md is written by hand and kept.
const KEEP: &str =
    "<!-- Everything below this line is written by hand; `cargo xtask bench` keeps it. -->";

/// The font the plots are drawn with.
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// The benchmarks, in the order of the page.
const BENCHES: [&str; 8] = [
    "connect",
    "http",
    "reload",
    "instructions",
    "kube",
    "dns",
    "xdp",
    "pods",
];

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
    // (bench, how its plot is drawn, file, title)
    type Draw = fn(&Value, &Path) -> Result<(), String>;
    let drawn: [(&str, Draw, &str, &str); 3] = [
        (
            "connect",
            plot_connect,
            "connect-scaling.png",
            "connect() p50 against the number of CIDR+port keys, per filter (log-log; bars: min-max over rounds)",
        ),
        (
            "http",
            plot_http,
            "http.png",
            "HTTP proxy: req/s and p99 per contender, plain HTTP and TLS origination (bars: median; whiskers: min-max over rounds)",
        ),
        (
            "reload",
            plot_reload,
            "policy-change.png",
            "A one-rule policy change to enforced, against the number of rules in force (log-log; `egress reload` round trip p50 and p99)",
        ),
    ];
    let mut plots = Vec::new();
    for (bench, draw, file, title) in drawn {
        if let Some(results) = get(bench) {
            draw(results, &plots_dir.join(file))?;
            plots.push((title, format!("benchmarks/{file}")));
        }
    }
    let paths = new_paths(get("dns"), get("pods"), get("kube"), get("reload"));
    if !paths.is_empty() {
        let file = "new-paths.png";
        plot_paths(&paths, &plots_dir.join(file))?;
        plots.push((
            "The paths of pods, FQDN rules and the API: time to enforced or added, p50 and p99 (log scale)",
            format!("benchmarks/{file}"),
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
        git_revision(docs),
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
        headline::Benches {
            connect: get("connect"),
            http: get("http"),
            reload: get("reload"),
            instructions: get("instructions"),
            dns: get("dns"),
            xdp: get("xdp"),
            pods: get("pods"),
            kube: get("kube"),
        },
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

/// The commit the benchmarks ran at, and whether the tree had changes besides this page and
/// its plots in `docs` (written before this is asked).
fn git_revision(docs: &Path) -> String {
    let run = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    let rev = run(&["rev-parse", "--short", "HEAD"]);
    let own = |path: PathBuf| format!(":(exclude){}", path.display());
    let (page, plots) = (
        own(docs.join("benchmarks.md")),
        own(docs.join("benchmarks")),
    );
    let dirty = !run(&[
        "status",
        "--porcelain",
        "--untracked-files=no",
        "--",
        ".",
        &page,
        &plots,
    ])
    .is_empty();
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
