//! The recorded instruction counts CI compares a build with (`--check`), and recording them
//! (`--record`).

use std::{fs, path::Path, process::ExitCode};

use serde_json::{Value, json};

use crate::{Counts, common::command_output};

/// How far above its baseline a count may be: a 10 % slower path fails.
const TOLERANCE: f64 = 0.05;

/// What the counts depend on besides the code: the compiler and valgrind (the build's
/// profile, target and static glibc are the CI step's, which records and checks alike).
fn tools() -> Value {
    json!({
        "rustc": command_output("rustc", &["--version"]),
        "valgrind": command_output("valgrind", &["--version"]),
    })
}

/// Writes `counts` as the baseline `file`.
pub fn record(file: &Path, counts: Counts) {
    let baseline = json!({
        "about": "Instruction counts CI checks (tests/benches/instructions, `cargo xtask test --step instructions`); \
                  recorded by that step with EGRESS_RECORD_BASELINE=1. A count more than `tolerance` above its value fails.",
        "tools": tools(),
        "tolerance": TOLERANCE,
        "proxy_path_per_request": counts.proxy_path_per_request,
        "reload": counts.reload,
        "reload_edit": counts.reload_edit,
    });
    let text = serde_json::to_string_pretty(&baseline).expect("JSON of plain values") + "\n";
    fs::write(file, text).unwrap_or_else(|e| panic!("writing {}: {e}", file.display()));
    eprintln!("instructions: recorded the baseline in {}", file.display());
}

/// Compares `counts` with the baseline `file`; fails when one is more than its tolerance
/// above it, or when the baseline was recorded with other tools (its counts do not compare).
pub fn check(file: &Path, counts: Counts) -> ExitCode {
    let text =
        fs::read_to_string(file).unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
    let baseline: Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: not JSON: {e}", file.display()));
    let record_again = "record it again with `EGRESS_RECORD_BASELINE=1 cargo xtask test --step instructions` \
                        and commit it";
    if baseline["tools"] != tools() {
        eprintln!(
            "instructions: {} was recorded with {}, this build uses {}: the counts do not compare; {record_again}",
            file.display(),
            baseline["tools"],
            tools()
        );
        return ExitCode::FAILURE;
    }
    let tolerance = baseline["tolerance"].as_f64().unwrap_or(TOLERANCE);
    let mut failed = false;
    for (key, what, measured) in [
        (
            "proxy_path_per_request",
            "the proxy's request path, per request",
            counts.proxy_path_per_request,
        ),
        (
            "reload",
            "a 10,000-rule reload's user-space work",
            counts.reload,
        ),
        (
            "reload_edit",
            "a one-rule edit's user-space work at 10,000 rules",
            counts.reload_edit,
        ),
    ] {
        let Some(recorded) = baseline[key].as_u64().filter(|&n| n > 0) else {
            eprintln!(
                "instructions: {} has no count {key:?}; {record_again}",
                file.display()
            );
            failed = true;
            continue;
        };
        let ratio = measured as f64 / recorded as f64;
        let verdict = if ratio > 1.0 + tolerance {
            failed = true;
            "REGRESSION: more than the tolerance above the baseline"
        } else if ratio < 1.0 - tolerance {
            "better than the baseline by more than the tolerance: record the gain"
        } else {
            "ok"
        };
        eprintln!(
            "instructions: {what}: {measured} against the baseline's {recorded} ({:+.2} %, tolerance {:.0} %): {verdict}",
            (ratio - 1.0) * 100.0,
            tolerance * 100.0
        );
    }
    if failed {
        eprintln!(
            "instructions: a count is above its baseline in {}; if the cost is intended, {record_again}",
            file.display()
        );
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
